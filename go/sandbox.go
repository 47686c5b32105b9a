package microsandbox

import (
	"context"
	"encoding/json"
	"runtime"
	"time"
)

// Sandbox is a running sandbox: a handle of the core's table. It is safe for
// concurrent use. Close releases it (stopping the VM when this handle owns it: an
// attached sandbox, not a detached one); Detach releases it leaving the VM running.
type Sandbox struct {
	name string
	h    *handleRef
}

func newSandbox(ref sandboxRef) *Sandbox {
	s := &Sandbox{name: ref.Name, h: newHandleRef(ref.Sandbox, "sandbox")}
	runtime.SetFinalizer(s, func(s *Sandbox) { releaseInBackground(s.h) })
	return s
}

func checkName(name string) error {
	if name == "" {
		return invalidArgument("sandbox name must not be empty")
	}
	return nil
}

// CreateSandbox creates and boots a sandbox and waits until it accepts commands. ctx
// cancels the boot only. The returned *Sandbox owns the VM: Close it (or Stop, then
// Close) when done.
func CreateSandbox(ctx context.Context, name string, opts ...SandboxOption) (*Sandbox, error) {
	args, err := createWireArgs(name, opts)
	if err != nil {
		return nil, err
	}
	var ref sandboxRef
	if err := call(ctx, "create", args, &ref); err != nil {
		return nil, err
	}
	return newSandbox(ref), nil
}

// createWireArgs are the wire arguments of create and create_with_progress.
func createWireArgs(name string, opts []SandboxOption) (map[string]any, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	cfg := SandboxConfig{Name: name}
	for _, o := range opts {
		if o != nil {
			o(&cfg)
		}
	}
	wire, err := cfg.wire()
	if err != nil {
		return nil, err
	}
	return map[string]any{"name": name, "config": wire, "detached": cfg.Detached}, nil
}

// CreateSandboxDetached is CreateSandbox with WithDetached.
func CreateSandboxDetached(ctx context.Context, name string, opts ...SandboxOption) (*Sandbox, error) {
	return CreateSandbox(ctx, name, append(append([]SandboxOption(nil), opts...), WithDetached())...)
}

func startSandbox(ctx context.Context, name string, detached bool) (*Sandbox, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	var ref sandboxRef
	if err := call(ctx, "start", map[string]any{"name": name, "detached": detached}, &ref); err != nil {
		return nil, err
	}
	return newSandbox(ref), nil
}

// StartSandbox boots a stopped sandbox with its persisted configuration.
func StartSandbox(ctx context.Context, name string) (*Sandbox, error) {
	return startSandbox(ctx, name, false)
}

// StartSandboxDetached boots a stopped sandbox detached.
func StartSandboxDetached(ctx context.Context, name string) (*Sandbox, error) {
	return startSandbox(ctx, name, true)
}

// ConnectSandbox attaches to a running sandbox without owning its lifecycle.
func ConnectSandbox(ctx context.Context, name string) (*Sandbox, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	var ref sandboxRef
	if err := call(ctx, "connect", map[string]any{"name": name}, &ref); err != nil {
		return nil, err
	}
	return newSandbox(ref), nil
}

// RemoveSandbox deletes a stopped sandbox and its persisted state; ErrSandboxStillRunning
// while it runs.
func RemoveSandbox(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	return call(ctx, "remove", map[string]any{"name": name}, nil)
}

// AllSandboxMetrics returns a metrics snapshot of every running sandbox, by name.
func AllSandboxMetrics(ctx context.Context) (map[string]*Metrics, error) {
	var w map[string]wireMetrics
	if err := call(ctx, "all_metrics", nil, &w); err != nil {
		return nil, err
	}
	out := make(map[string]*Metrics, len(w))
	for name, m := range w {
		m := m
		out[name] = m.toMetrics()
	}
	return out, nil
}

func (s *Sandbox) call(ctx context.Context, method string, args map[string]any, out any) error {
	return s.h.call(ctx, s, method, args, out)
}

// Name returns the sandbox's name.
func (s *Sandbox) Name() string { return s.name }

type sandboxInfo struct {
	Name          string          `json:"name"`
	OwnsLifecycle bool            `json:"owns_lifecycle"`
	Config        json.RawMessage `json:"config"`
}

func (s *Sandbox) info() (*sandboxInfo, error) {
	var info sandboxInfo
	if err := s.call(context.Background(), "sandbox.info", nil, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// OwnsLifecycle reports whether this handle owns the VM (closing it stops the
// sandbox). The error covers closed handles.
func (s *Sandbox) OwnsLifecycle() (bool, error) {
	info, err := s.info()
	if err != nil {
		return false, err
	}
	return info.OwnsLifecycle, nil
}

// OwnsLifecycleOrFalse is OwnsLifecycle with errors read as false.
func (s *Sandbox) OwnsLifecycleOrFalse() bool {
	owns, err := s.OwnsLifecycle()
	return err == nil && owns
}

// ConfigJSON returns the sandbox's configuration as the core holds it (raw JSON).
func (s *Sandbox) ConfigJSON() (string, error) {
	info, err := s.info()
	if err != nil {
		return "", err
	}
	return string(info.Config), nil
}

// FS returns the sandbox's filesystem accessor.
func (s *Sandbox) FS() *SandboxFSOps { return &SandboxFSOps{sandbox: s} }

func (s *Sandbox) execOutput(ctx context.Context, method string, args map[string]any, opts []ExecOption) (*ExecOutput, error) {
	if err := execArgs(opts, false, args); err != nil {
		return nil, err
	}
	var w wireExecOutput
	if err := s.call(ctx, method, args, &w); err != nil {
		return nil, err
	}
	return w.output()
}

func (s *Sandbox) execStream(ctx context.Context, method string, args map[string]any, opts []ExecOption) (*ExecHandle, error) {
	if err := execArgs(opts, true, args); err != nil {
		return nil, err
	}
	var w struct {
		Exec uint64 `json:"exec"`
	}
	if err := s.call(ctx, method, args, &w); err != nil {
		return nil, err
	}
	return newExecHandle(w.Exec, s), nil
}

func argList(args []string) []string {
	if args == nil {
		return []string{}
	}
	return args
}

// Exec runs cmd with args and waits for it, collecting its output. A non-zero exit
// code is not an error; transport, spawn and timeout failures are.
func (s *Sandbox) Exec(ctx context.Context, cmd string, args []string, opts ...ExecOption) (*ExecOutput, error) {
	return s.execOutput(ctx, "sandbox.exec", map[string]any{"cmd": cmd, "args": argList(args)}, opts)
}

// Shell runs script with the sandbox's shell (sh -c) and waits for it.
func (s *Sandbox) Shell(ctx context.Context, script string, opts ...ExecOption) (*ExecOutput, error) {
	return s.execOutput(ctx, "sandbox.shell", map[string]any{"script": script}, opts)
}

// ExecStream starts cmd and returns a handle streaming its events. Close the handle
// when done.
func (s *Sandbox) ExecStream(ctx context.Context, cmd string, args []string, opts ...ExecOption) (*ExecHandle, error) {
	return s.execStream(ctx, "sandbox.exec_stream", map[string]any{"cmd": cmd, "args": argList(args)}, opts)
}

// ShellStream starts script with the sandbox's shell and returns a handle streaming
// its events. Close the handle when done.
func (s *Sandbox) ShellStream(ctx context.Context, script string, opts ...ExecOption) (*ExecHandle, error) {
	return s.execStream(ctx, "sandbox.shell_stream", map[string]any{"script": script}, opts)
}

// Metrics returns a snapshot of the sandbox's resource usage.
func (s *Sandbox) Metrics(ctx context.Context) (*Metrics, error) {
	var w wireMetrics
	if err := s.call(ctx, "sandbox.metrics", nil, &w); err != nil {
		return nil, err
	}
	return w.toMetrics(), nil
}

// MetricsStream delivers a snapshot every interval (rounded up to milliseconds). Close
// the returned handle when done.
func (s *Sandbox) MetricsStream(ctx context.Context, interval time.Duration) (*MetricsStreamHandle, error) {
	if interval <= 0 {
		interval = time.Millisecond
	}
	var w struct {
		Stream uint64 `json:"stream"`
	}
	if err := s.call(ctx, "sandbox.metrics_stream", map[string]any{"interval": secondsMs(interval)}, &w); err != nil {
		return nil, err
	}
	return &MetricsStreamHandle{stream: newStream(w.Stream, s)}, nil
}

// Logs reads the sandbox's captured output (running or stopped).
func (s *Sandbox) Logs(ctx context.Context, opts LogOptions) ([]LogEntry, error) {
	args := map[string]any{}
	opts.wire(args)
	var w []wireLogEntry
	if err := s.call(ctx, "sandbox.logs", args, &w); err != nil {
		return nil, err
	}
	return decodeLogEntries(w)
}

// LogStream streams the sandbox's captured output. Close the returned handle when done.
func (s *Sandbox) LogStream(ctx context.Context, opts LogStreamOptions) (*LogStreamHandle, error) {
	args := map[string]any{}
	if err := opts.wire(args); err != nil {
		return nil, err
	}
	var w struct {
		Stream uint64 `json:"stream"`
	}
	if err := s.call(ctx, "sandbox.log_stream", args, &w); err != nil {
		return nil, err
	}
	return &LogStreamHandle{stream: newStream(w.Stream, s)}, nil
}

type stopConfig struct {
	timeout *time.Duration
}

// StopOption configures Stop.
type StopOption func(*stopConfig)

// WithStopTimeout sets how long Stop waits for a graceful exit before killing
// (default 10 s).
func WithStopTimeout(timeout time.Duration) StopOption {
	return func(c *stopConfig) { c.timeout = &timeout }
}

// KillOption configures Kill.
type KillOption func(*stopConfig)

// WithKillTimeout sets how long Kill waits to observe the stopped state (default 5 s).
func WithKillTimeout(timeout time.Duration) KillOption {
	return func(c *stopConfig) { c.timeout = &timeout }
}

func timeoutArgs(args map[string]any, timeout *time.Duration) error {
	if timeout == nil {
		return nil
	}
	if *timeout < 0 {
		return invalidArgument("negative timeout")
	}
	args["timeout"] = secondsMs(*timeout)
	return nil
}

func stopArgs(args map[string]any, opts []StopOption) error {
	var c stopConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	return timeoutArgs(args, c.timeout)
}

func killArgs(args map[string]any, opts []KillOption) error {
	var c stopConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	return timeoutArgs(args, c.timeout)
}

// Stop shuts the sandbox down gracefully and waits until it is stopped, killing it
// after the timeout (WithStopTimeout, default 10 s).
func (s *Sandbox) Stop(ctx context.Context, opts ...StopOption) error {
	args := map[string]any{}
	if err := stopArgs(args, opts); err != nil {
		return err
	}
	return s.call(ctx, "sandbox.stop", args, nil)
}

// Kill terminates the sandbox at once (SIGKILL) and waits until it is stopped.
func (s *Sandbox) Kill(ctx context.Context, opts ...KillOption) error {
	args := map[string]any{}
	if err := killArgs(args, opts); err != nil {
		return err
	}
	return s.call(ctx, "sandbox.kill", args, nil)
}

// StopAndWait stops the sandbox and waits for the VM process to exit; it returns the
// exit code (-1 when there was none).
func (s *Sandbox) StopAndWait(ctx context.Context) (int, error) {
	var w wireExitStatus
	if err := s.call(ctx, "sandbox.stop_and_wait", nil, &w); err != nil {
		return -1, err
	}
	return w.ExitCode, nil
}

// Wait waits for the VM process to exit on its own and returns its exit code (-1 when
// there was none).
func (s *Sandbox) Wait(ctx context.Context) (int, error) {
	var w wireExitStatus
	if err := s.call(ctx, "sandbox.wait", nil, &w); err != nil {
		return -1, err
	}
	return w.ExitCode, nil
}

// Drain rejects new commands, lets running ones finish, then stops the sandbox.
func (s *Sandbox) Drain(ctx context.Context) error {
	return s.call(ctx, "sandbox.drain", nil, nil)
}

// RequestStop asks for a graceful shutdown and returns once the request is sent, without
// waiting for the stopped state (WaitUntilStopped does).
func (s *Sandbox) RequestStop(ctx context.Context) error {
	return s.call(ctx, "sandbox.request_stop", nil, nil)
}

// RequestKill asks for immediate termination and returns once the request is sent,
// without waiting for the stopped state.
func (s *Sandbox) RequestKill(ctx context.Context) error {
	return s.call(ctx, "sandbox.request_kill", nil, nil)
}

// RequestDrain asks for a drain (running commands finish, new ones are rejected, then
// the sandbox stops) and returns once the request is sent.
func (s *Sandbox) RequestDrain(ctx context.Context) error {
	return s.call(ctx, "sandbox.request_drain", nil, nil)
}

// Attach bridges this process's terminal to cmd run on a pseudo-terminal in the
// sandbox (raw mode, window size, resizes) until it exits, and returns its exit code.
// Stdin must be a terminal: otherwise the error is ErrNotATerminal. Meant for CLI tools.
func (s *Sandbox) Attach(ctx context.Context, cmd string, args ...string) (int, error) {
	var code int
	if err := s.call(ctx, "sandbox.attach", map[string]any{"cmd": cmd, "args": argList(args)}, &code); err != nil {
		return -1, err
	}
	return code, nil
}

// AttachShell is Attach to the sandbox's shell (WithShell, default /bin/sh).
func (s *Sandbox) AttachShell(ctx context.Context) (int, error) {
	var code int
	if err := s.call(ctx, "sandbox.attach_shell", nil, &code); err != nil {
		return -1, err
	}
	return code, nil
}

// Pause pauses the VM.
func (s *Sandbox) Pause(ctx context.Context) error {
	return s.call(ctx, "sandbox.pause", nil, nil)
}

// Resume resumes a paused VM.
func (s *Sandbox) Resume(ctx context.Context) error {
	return s.call(ctx, "sandbox.resume", nil, nil)
}

// WaitUntilStopped waits until the sandbox is in a terminal state and says how it
// ended.
func (s *Sandbox) WaitUntilStopped(ctx context.Context) (*SandboxStopResult, error) {
	var w wireStopResult
	if err := s.call(ctx, "sandbox.wait_until_stopped", nil, &w); err != nil {
		return nil, err
	}
	return w.toResult(), nil
}

// Detach releases the handle leaving the VM running; reattach with GetSandbox and
// Connect. A later Close returns ErrInvalidHandle. Detach spends the handle whatever
// its outcome, except when it fails with ErrBusy (another call is using the sandbox:
// try again when it returns) or ErrInvalidArgument, or its context was done before the
// call started; after a Detach that failed otherwise, Close returns nil.
func (s *Sandbox) Detach(ctx context.Context) error {
	err := consume(ctx, s.h, "sandbox.detach", nil, nil)
	runtime.KeepAlive(s)
	return err
}

// RemovePersisted removes the stopped sandbox's persisted state. It spends the handle
// as Detach does: after it succeeded Close returns ErrInvalidHandle, after it failed
// Close returns nil.
func (s *Sandbox) RemovePersisted(ctx context.Context) error {
	err := consume(ctx, s.h, "sandbox.remove_persisted", nil, nil)
	runtime.KeepAlive(s)
	return err
}

// Close releases the handle. Releasing a handle that owns an attached sandbox stops
// the sandbox (as dropping a Rust Sandbox does); a detached sandbox (WithDetached,
// StartSandboxDetached), or one reached through Connect, keeps running. As the
// reference says, a second call returns an ErrInvalidHandle error, and so does Close
// after a Detach or RemovePersisted that succeeded; after one that failed or was
// cancelled (the core had taken the sandbox, or may have), Close releases whatever is
// left and returns nil.
func (s *Sandbox) Close() error {
	prev, err := s.h.close()
	runtime.SetFinalizer(s, nil)
	if prev == handleReleased {
		return newError(ErrInvalidHandle, "sandbox handle "+s.h.reason())
	}
	return err
}
