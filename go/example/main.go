// A tour of the Go SDK: boot a sandbox, run commands, use its files, read its metrics
// and logs, then stop and remove it.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	m "github.com/superradcompany/microsandbox/sdk/go"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := run(ctx); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context) error {
	// Checks that msb-vmm and the guest kernel and root filesystem are installed
	// (scripts/setup builds them), and fails with ErrNotInstalled if not. Without
	// WithSkipDownload, EnsureInstalled would build what is missing from source: many
	// minutes, with packages fetched for the kernel build.
	if err := m.EnsureInstalled(ctx, m.WithSkipDownload()); err != nil {
		return err
	}

	// No WithImage: the default root filesystem (busybox). Nothing here needs the
	// network, so the sandbox gets none.
	name := fmt.Sprintf("go-example-%d", os.Getpid())
	sb, err := m.CreateSandbox(ctx, name,
		m.WithMemory(512),
		m.WithNetwork(m.NetworkPolicy.Disabled()),
		m.WithEnv(map[string]string{"GREETING": "hello"}),
		m.WithLabel("example", "go"),
	)
	if err != nil {
		return err
	}
	removed := false
	defer func() {
		if !removed { // an early return: stop the sandbox and delete it
			_ = sb.Close()
			_ = m.RemoveSandbox(context.Background(), name)
		}
	}()

	out, err := sb.Shell(ctx, `echo "$GREETING from $(uname -s)"`)
	if err != nil {
		return err
	}
	fmt.Print(out.Stdout()) // hello from Linux

	out, err = sb.Exec(ctx, "cat", nil, m.WithExecStdin([]byte("piped in\n")))
	if err != nil {
		return err
	}
	fmt.Print(out.Stdout())

	out, err = sb.Shell(ctx, "exit 7")
	if err != nil {
		return err
	}
	fmt.Printf("exit code %d, success %v\n", out.ExitCode(), out.Success())

	if err := sb.FS().WriteString(ctx, "/root/note.txt", "written from Go\n"); err != nil {
		return err
	}
	note, err := sb.FS().ReadString(ctx, "/root/note.txt")
	if err != nil {
		return err
	}
	fmt.Print(note)

	metrics, err := sb.Metrics(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("memory limit %d MiB, up %s\n", metrics.MemoryLimitBytes>>20, metrics.Uptime.Round(time.Second))

	code, err := sb.StopAndWait(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("stopped (exit code %d)\n", code)
	if err := sb.Close(); err != nil {
		return err
	}

	// The captured output outlives the VM.
	h, err := m.GetSandbox(ctx, name)
	if err != nil {
		return err
	}
	entries, err := h.Logs(ctx, m.LogOptions{Sources: []m.LogSource{m.LogSourceStdout}})
	if err != nil {
		return err
	}
	for _, e := range entries {
		fmt.Printf("log [%s] %s", e.Source, e.Text())
	}

	if err := m.RemoveSandbox(ctx, name); err != nil {
		return err
	}
	removed = true
	fmt.Println("removed", name)
	return nil
}
