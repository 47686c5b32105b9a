package microsandbox

import (
	"context"
	"encoding/base64"
	"runtime"
	"time"
)

// Rlimit is a resource limit of a command (setrlimit in the guest). Resource is named
// as in setrlimit(2) without the prefix, any case: "nofile", "nproc", "as", "cpu", ...
type Rlimit struct {
	Resource string
	Soft     uint64
	Hard     uint64
}

// ExecConfig is what the ExecOption functions fill in for one command.
type ExecConfig struct {
	// Cwd is the working directory.
	Cwd string
	// User runs the command as this user (name or UID).
	User string
	// Env is added to the sandbox's environment.
	Env map[string]string
	// Timeout kills the command after this long (millisecond precision); the call
	// then fails with ErrExecTimeout.
	Timeout time.Duration
	// Stdin is fed to the command, then end of file.
	Stdin []byte
	// StdinPipe opens stdin for ExecHandle.Write (streaming calls only).
	StdinPipe bool
	// TTY runs the command on a pseudo-terminal (output arrives as stdout).
	TTY bool
	// Rlimits are resource limits.
	Rlimits []Rlimit

	stdinSet bool
}

// ExecOption is a functional option of Exec, Shell, ExecStream and ShellStream.
type ExecOption func(*ExecConfig)

// WithExecCwd sets the command's working directory.
func WithExecCwd(path string) ExecOption {
	return func(c *ExecConfig) { c.Cwd = path }
}

// WithExecUser runs the command as user (name or UID).
func WithExecUser(user string) ExecOption {
	return func(c *ExecConfig) { c.User = user }
}

// WithExecEnv adds environment variables; repeated calls merge.
func WithExecEnv(env map[string]string) ExecOption {
	return func(c *ExecConfig) { mergeMap(&c.Env, env) }
}

// WithExecTimeout kills the command after d; the call fails with ErrExecTimeout.
func WithExecTimeout(d time.Duration) ExecOption {
	return func(c *ExecConfig) { c.Timeout = d }
}

// WithExecStdin feeds data to the command's stdin, then end of file.
func WithExecStdin(data []byte) ExecOption {
	return func(c *ExecConfig) {
		c.Stdin = append([]byte(nil), data...)
		c.stdinSet = true
	}
}

// WithExecStdinPipe opens the command's stdin for ExecHandle.Write / TakeStdin
// (ExecStream and ShellStream; the collecting calls have no writer, so their stdin
// is empty).
func WithExecStdinPipe() ExecOption {
	return func(c *ExecConfig) { c.StdinPipe = true }
}

// WithExecTTY runs the command on a pseudo-terminal.
func WithExecTTY() ExecOption {
	return func(c *ExecConfig) { c.TTY = true }
}

// WithExecRlimits adds resource limits.
func WithExecRlimits(limits ...Rlimit) ExecOption {
	return func(c *ExecConfig) { c.Rlimits = append(c.Rlimits, limits...) }
}

// WithExecRlimit adds one resource limit.
func WithExecRlimit(resource string, soft, hard uint64) ExecOption {
	return WithExecRlimits(Rlimit{Resource: resource, Soft: soft, Hard: hard})
}

func execArgs(opts []ExecOption, stream bool, args map[string]any) error {
	var c ExecConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	if c.Timeout < 0 {
		return invalidArgument("WithExecTimeout: negative timeout")
	}
	if c.stdinSet && c.StdinPipe {
		return invalidArgument("WithExecStdin and WithExecStdinPipe are exclusive")
	}
	setString(args, "cwd", c.Cwd)
	setString(args, "user", c.User)
	if len(c.Env) > 0 {
		args["env"] = c.Env
	}
	if c.Timeout > 0 {
		args["timeout"] = secondsMs(c.Timeout)
	}
	if c.stdinSet {
		args["stdin_b64"] = base64.StdEncoding.EncodeToString(c.Stdin)
	}
	if c.TTY {
		args["tty"] = true
	}
	if len(c.Rlimits) > 0 {
		rl := make([]any, 0, len(c.Rlimits))
		for _, r := range c.Rlimits {
			if r.Resource == "" {
				return invalidArgument("rlimit: empty resource")
			}
			rl = append(rl, map[string]any{"resource": r.Resource, "soft": r.Soft, "hard": r.Hard})
		}
		args["rlimits"] = rl
	}
	if stream {
		args["stdin_pipe"] = c.StdinPipe
	}
	return nil
}

// ExecStatus is how a command ended.
type ExecStatus struct {
	// ExitCode is the exit code, 128+N when killed by signal N, -1 when none.
	ExitCode int
	// Success is true when it exited with code 0.
	Success bool
	// Signal is the terminating signal, when it was killed.
	Signal *int
	// TimedOut is true when its timeout killed it.
	TimedOut bool
}

type wireExecStatus struct {
	ExitCode int  `json:"exit_code"`
	Success  bool `json:"success"`
	Signal   *int `json:"signal"`
	TimedOut bool `json:"timed_out"`
}

func (w wireExecStatus) status() ExecStatus {
	return ExecStatus{ExitCode: w.ExitCode, Success: w.Success, Signal: w.Signal, TimedOut: w.TimedOut}
}

type wireExecOutput struct {
	wireExecStatus
	StdoutB64 string `json:"stdout_b64"`
	StderrB64 string `json:"stderr_b64"`
}

func (w *wireExecOutput) output() (*ExecOutput, error) {
	stdout, err := base64.StdEncoding.DecodeString(w.StdoutB64)
	if err != nil {
		return nil, newError(ErrInternal, "exec output: bad stdout_b64: "+err.Error())
	}
	stderr, err := base64.StdEncoding.DecodeString(w.StderrB64)
	if err != nil {
		return nil, newError(ErrInternal, "exec output: bad stderr_b64: "+err.Error())
	}
	return &ExecOutput{stdout: stdout, stderr: stderr, status: w.status()}, nil
}

// ExecOutput is the collected result of a command. A non-zero exit code is not a Go
// error: inspect Success or ExitCode.
type ExecOutput struct {
	stdout []byte
	stderr []byte
	status ExecStatus
}

// Stdout returns the captured standard output as a string.
func (o *ExecOutput) Stdout() string { return string(o.stdout) }

// StdoutBytes returns the captured standard output.
func (o *ExecOutput) StdoutBytes() []byte { return o.stdout }

// Stderr returns the captured standard error as a string.
func (o *ExecOutput) Stderr() string { return string(o.stderr) }

// StderrBytes returns the captured standard error.
func (o *ExecOutput) StderrBytes() []byte { return o.stderr }

// ExitCode returns the exit code (128+N when killed by signal N, -1 when none).
func (o *ExecOutput) ExitCode() int { return o.status.ExitCode }

// Success reports whether the command exited with code 0.
func (o *ExecOutput) Success() bool { return o.status.Success }

// Status returns how the command ended.
func (o *ExecOutput) Status() ExecStatus { return o.status }

// ExecEventKind says what an ExecEvent carries.
type ExecEventKind string

const (
	// ExecEventStarted: the process started; PID is set.
	ExecEventStarted ExecEventKind = "started"
	// ExecEventStdout: a chunk of standard output in Data.
	ExecEventStdout ExecEventKind = "stdout"
	// ExecEventStderr: a chunk of standard error in Data.
	ExecEventStderr ExecEventKind = "stderr"
	// ExecEventExited: the process ended; ExitCode and Status are set.
	ExecEventExited ExecEventKind = "exited"
	// ExecEventDone: the stream is over; no more events.
	ExecEventDone ExecEventKind = "done"
)

// ExecEvent is one event of a streaming command.
type ExecEvent struct {
	Kind ExecEventKind
	// PID is the guest process id (ExecEventStarted).
	PID uint32
	// Data is output bytes (ExecEventStdout, ExecEventStderr).
	Data []byte
	// ExitCode is the exit code (ExecEventExited).
	ExitCode int
	// Status is how it ended (ExecEventExited).
	Status ExecStatus
}

type wireExecEvent struct {
	Type    string `json:"type"`
	PID     uint32 `json:"pid"`
	DataB64 string `json:"data_b64"`
	wireExecStatus
}

// ExecHandle is a running command started by ExecStream or ShellStream. Close it when
// done (that ends the command if it still runs). Write, CloseStdin, Signal and Kill may
// be called while another goroutine waits in Recv.
type ExecHandle struct {
	h       *handleRef
	sandbox *Sandbox // kept reachable while the command is
}

func newExecHandle(id uint64, sb *Sandbox) *ExecHandle {
	e := &ExecHandle{h: newHandleRef(id, "exec"), sandbox: sb}
	runtime.SetFinalizer(e, func(e *ExecHandle) { releaseInBackground(e.h) })
	return e
}

func (e *ExecHandle) call(ctx context.Context, method string, args map[string]any, out any) error {
	return e.h.call(ctx, e, method, args, out)
}

// Recv waits for the next event. After the last event it returns an event of kind
// ExecEventDone.
func (e *ExecHandle) Recv(ctx context.Context) (*ExecEvent, error) {
	var w *wireExecEvent
	if err := e.call(ctx, "exec.recv", nil, &w); err != nil {
		return nil, err
	}
	if w == nil {
		return &ExecEvent{Kind: ExecEventDone}, nil
	}
	ev := &ExecEvent{Kind: ExecEventKind(w.Type), PID: w.PID}
	switch ev.Kind {
	case ExecEventStdout, ExecEventStderr:
		data, err := base64.StdEncoding.DecodeString(w.DataB64)
		if err != nil {
			return nil, newError(ErrInternal, "exec event: bad data_b64: "+err.Error())
		}
		ev.Data = data
	case ExecEventExited:
		ev.Status = w.status()
		ev.ExitCode = w.ExitCode
	}
	return ev, nil
}

// Write sends data to the command's stdin (needs WithExecStdinPipe).
func (e *ExecHandle) Write(ctx context.Context, data []byte) error {
	return e.call(ctx, "exec.write", map[string]any{"data_b64": base64.StdEncoding.EncodeToString(data)}, nil)
}

// CloseStdin ends the command's stdin.
func (e *ExecHandle) CloseStdin(ctx context.Context) error {
	return e.call(ctx, "exec.close_stdin", nil, nil)
}

// TakeStdin returns the command's stdin as an io.WriteCloser (needs
// WithExecStdinPipe); its calls are not cancellable, use Write with a context for that.
func (e *ExecHandle) TakeStdin() *ExecSink { return &ExecSink{e: e} }

// Signal sends a Unix signal to the command (e.g. int(syscall.SIGTERM)).
func (e *ExecHandle) Signal(ctx context.Context, signal int) error {
	return e.call(ctx, "exec.signal", map[string]any{"signal": signal}, nil)
}

// Kill sends SIGKILL to the command.
func (e *ExecHandle) Kill(ctx context.Context) error {
	return e.call(ctx, "exec.kill", nil, nil)
}

// Resize sets the size of the command's pseudo-terminal (started with WithExecTTY).
func (e *ExecHandle) Resize(ctx context.Context, rows, cols uint16) error {
	return e.call(ctx, "exec.resize", map[string]any{"rows": rows, "cols": cols}, nil)
}

// Wait waits for the command to end, discarding output not yet received, and returns
// its exit code. Wait spends the handle, whatever its outcome, except when it fails
// with ErrBusy or ErrInvalidArgument or its context was done before the call started;
// Close afterwards is fine (nil).
func (e *ExecHandle) Wait(ctx context.Context) (int, error) {
	st, err := e.WaitStatus(ctx)
	if err != nil {
		return -1, err
	}
	return st.ExitCode, nil
}

// WaitStatus is Wait returning the full status.
func (e *ExecHandle) WaitStatus(ctx context.Context) (*ExecStatus, error) {
	var w wireExecStatus
	err := consume(ctx, e.h, "exec.wait", nil, &w)
	runtime.KeepAlive(e)
	if err != nil {
		return nil, err
	}
	st := w.status()
	return &st, nil
}

// Collect receives the rest of the output and waits for the end. It spends the handle
// as Wait does; Close afterwards is fine (nil).
func (e *ExecHandle) Collect(ctx context.Context) (*ExecOutput, error) {
	var w wireExecOutput
	err := consume(ctx, e.h, "exec.collect", nil, &w)
	runtime.KeepAlive(e)
	if err != nil {
		return nil, err
	}
	return w.output()
}

// Close releases the handle, and that ends the command unless it has ended already:
// a command another goroutine is reading (waiting in Recv) is killed, so that Recv
// returns its exit (ExecEventExited, then ExecEventDone); otherwise dropping the core's
// last hold on it closes its connection, and the guest kills its process group. To
// let a command run to its end, Wait or Collect instead (or Recv until
// ExecEventExited) before closing. Close is idempotent: calling it again, or after
// Wait or Collect, returns nil.
func (e *ExecHandle) Close() error {
	_, err := e.h.close()
	runtime.SetFinalizer(e, nil)
	return err
}

// ExecSink is a command's stdin as an io.WriteCloser (ExecHandle.TakeStdin).
type ExecSink struct {
	e *ExecHandle
}

// Write sends p to the command's stdin.
func (s *ExecSink) Write(p []byte) (int, error) {
	if err := s.e.Write(context.Background(), p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close ends the command's stdin.
func (s *ExecSink) Close() error { return s.e.CloseStdin(context.Background()) }
