// Package microsandbox creates and controls microVM sandboxes: boot one from an image
// (or the default busybox root), run commands, read and write its files, stream its
// output and metrics, reach it over SSH, stop, snapshot, restart and remove it.
//
//	import m "github.com/superradcompany/microsandbox/sdk/go"
//
//	sb, err := m.CreateSandbox(ctx, "api", m.WithMemory(512))
//	if err != nil {
//		return err
//	}
//	defer sb.Close()
//	out, err := sb.Shell(ctx, "echo hello")
//
// The package is a thin layer over the Rust core (libmicrosandbox_ffi, linked with
// cgo): every operation is one JSON call through the C ABI described in
// docs/bindings.md; objects of the core (sandboxes, running commands, streams, SSH
// endpoints and clients) are handles that Close releases, with a finalizer as a
// fallback. Errors are *Error values with a Kind (errors.Is(err, m.ErrSandboxNotFound)).
// A call whose context is cancelled ends in the core and returns an ErrCancelled error
// that also matches ctx.Err().
package microsandbox
