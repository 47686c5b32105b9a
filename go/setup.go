package microsandbox

import "context"

// Version is the microsandbox release this module belongs to (the Rust workspace's
// version).
const Version = "0.1.0"

// SDKVersion returns the release this SDK was built for.
func SDKVersion() string { return Version }

// RuntimeVersion returns the version the linked core library reports.
func RuntimeVersion() (string, error) {
	var v struct {
		SDK string `json:"sdk"`
	}
	if err := call(context.Background(), "version", nil, &v); err != nil {
		return "", err
	}
	return v.SDK, nil
}

// IsInstalled reports whether the runtime (msb-vmm and the guest kernel, initramfs and
// root filesystem) is present. The core library itself is linked into the program.
func IsInstalled() bool {
	var ok bool
	if err := call(context.Background(), "is_installed", nil, &ok); err != nil {
		return false
	}
	return ok
}

type setupConfig struct {
	skipDownload bool
}

// SetupOption configures EnsureInstalled.
type SetupOption func(*setupConfig)

// WithSkipDownload makes EnsureInstalled only check: it builds nothing and fails with
// ErrNotInstalled when the runtime is missing.
func WithSkipDownload() SetupOption {
	return func(c *setupConfig) { c.skipDownload = true }
}

// EnsureInstalled makes sure the runtime is present: msb-vmm and the guest artifacts
// are built from source when missing (cargo, and apt-get for the packages the guest
// kernel's build needs; progress is printed on stderr; this can take many minutes),
// where the reference downloads a release. ctx ends the call, not a build already
// running: that goes on in the background of the process. With WithSkipDownload it
// only checks. Idempotent; the options are read on every call.
func EnsureInstalled(ctx context.Context, opts ...SetupOption) error {
	var cfg setupConfig
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	if cfg.skipDownload {
		var ok bool
		if err := call(ctx, "is_installed", nil, &ok); err != nil {
			return err
		}
		if !ok {
			return newError(ErrNotInstalled, "the microsandbox runtime (msb-vmm, guest kernel and root filesystem) is not installed; call EnsureInstalled without WithSkipDownload to build it")
		}
		return nil
	}
	return call(ctx, "ensure_installed", nil, nil)
}
