package microsandbox

import (
	"context"
	"encoding/json"
	"time"
)

// SandboxHandle is a sandbox's persisted metadata, as GetSandbox and ListSandboxes
// return it: a snapshot of its state plus lifecycle operations by name. It holds no
// resource of the core (nothing to close). Use Connect or Start for a *Sandbox.
type SandboxHandle struct {
	info wireHandleInfo
}

type wireHandleInfo struct {
	Name        string            `json:"name"`
	Status      string            `json:"status"`
	Config      json.RawMessage   `json:"config"`
	Labels      map[string]string `json:"labels"`
	CreatedAtMs *int64            `json:"created_at_ms"`
	UpdatedAtMs *int64            `json:"updated_at_ms"`
	VMMPid      *int              `json:"vmm_pid"`
	Detached    bool              `json:"detached"`
	ExitReason  *string           `json:"exit_reason"`
	Ephemeral   bool              `json:"ephemeral"`
}

// GetSandbox looks a sandbox up by name; ErrSandboxNotFound when there is none.
func GetSandbox(ctx context.Context, name string) (*SandboxHandle, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	var w wireHandleInfo
	if err := call(ctx, "get", map[string]any{"name": name}, &w); err != nil {
		return nil, err
	}
	return &SandboxHandle{info: w}, nil
}

// ListSandboxes returns every known sandbox.
func ListSandboxes(ctx context.Context) ([]*SandboxHandle, error) {
	return ListSandboxesWith(ctx, SandboxFilter{})
}

// ListSandboxesWith returns the sandboxes matching filter.
func ListSandboxesWith(ctx context.Context, filter SandboxFilter) ([]*SandboxHandle, error) {
	args := map[string]any{}
	if len(filter.labels) > 0 {
		args["labels"] = filter.labels
	}
	if filter.status != "" {
		args["status"] = string(filter.status)
	}
	var ws []wireHandleInfo
	if err := call(ctx, "list", args, &ws); err != nil {
		return nil, err
	}
	out := make([]*SandboxHandle, len(ws))
	for i := range ws {
		out[i] = &SandboxHandle{info: ws[i]}
	}
	return out, nil
}

// SandboxFilter narrows ListSandboxesWith. The zero value matches every sandbox; the
// With methods return a new value, so calls chain.
type SandboxFilter struct {
	labels map[string]string
	status SandboxStatus
}

// NewSandboxFilter returns a filter matching every sandbox.
func NewSandboxFilter() SandboxFilter { return SandboxFilter{} }

// WithLabels requires all of these labels (AND); repeated calls merge.
func (f SandboxFilter) WithLabels(labels map[string]string) SandboxFilter {
	merged := make(map[string]string, len(f.labels)+len(labels))
	for k, v := range f.labels {
		merged[k] = v
	}
	for k, v := range labels {
		merged[k] = v
	}
	f.labels = merged
	return f
}

// WithLabel requires one label.
func (f SandboxFilter) WithLabel(key, value string) SandboxFilter {
	return f.WithLabels(map[string]string{key: value})
}

// WithStatus requires this status.
func (f SandboxFilter) WithStatus(status SandboxStatus) SandboxFilter {
	f.status = status
	return f
}

// Labels returns the required labels.
func (f SandboxFilter) Labels() map[string]string { return f.labels }

// Status returns the required status ("" for any).
func (f SandboxFilter) Status() SandboxStatus { return f.status }

// Name returns the sandbox's name.
func (h *SandboxHandle) Name() string { return h.info.Name }

// Status returns the last-known status.
func (h *SandboxHandle) Status() SandboxStatus { return SandboxStatus(h.info.Status) }

// ConfigJSON returns the configuration as the state database holds it (raw JSON).
func (h *SandboxHandle) ConfigJSON() string { return string(h.info.Config) }

// ConfigMap returns the configuration decoded into generic JSON values.
func (h *SandboxHandle) ConfigMap() (map[string]any, error) {
	var m map[string]any
	if err := json.Unmarshal(h.info.Config, &m); err != nil {
		return nil, newError(ErrInternal, "sandbox config: "+err.Error())
	}
	return m, nil
}

// Labels returns the sandbox's labels.
func (h *SandboxHandle) Labels() map[string]string {
	out := make(map[string]string, len(h.info.Labels))
	for k, v := range h.info.Labels {
		out[k] = v
	}
	return out
}

// CreatedAt returns the creation time (zero when unknown).
func (h *SandboxHandle) CreatedAt() time.Time { return msToTime(h.info.CreatedAtMs) }

// UpdatedAt returns the last-update time (zero when unknown).
func (h *SandboxHandle) UpdatedAt() time.Time { return msToTime(h.info.UpdatedAtMs) }

// VMMPid returns the VM process id while it runs.
func (h *SandboxHandle) VMMPid() (int, bool) {
	if h.info.VMMPid == nil {
		return 0, false
	}
	return *h.info.VMMPid, true
}

// Detached reports whether the sandbox runs detached.
func (h *SandboxHandle) Detached() bool { return h.info.Detached }

// Ephemeral reports whether the sandbox's state is removed when it ends.
func (h *SandboxHandle) Ephemeral() bool { return h.info.Ephemeral }

// ExitReason returns how the sandbox last ended, when known.
func (h *SandboxHandle) ExitReason() (string, bool) {
	if h.info.ExitReason == nil {
		return "", false
	}
	return *h.info.ExitReason, true
}

// Refresh returns a fresh handle for the same name.
func (h *SandboxHandle) Refresh(ctx context.Context) (*SandboxHandle, error) {
	return GetSandbox(ctx, h.info.Name)
}

func (h *SandboxHandle) nameCall(ctx context.Context, method string, args map[string]any, out any) error {
	if args == nil {
		args = map[string]any{}
	}
	args["name"] = h.info.Name
	return call(ctx, method, args, out)
}

// Logs reads the sandbox's captured output without starting it.
func (h *SandboxHandle) Logs(ctx context.Context, opts LogOptions) ([]LogEntry, error) {
	args := map[string]any{}
	opts.wire(args)
	var w []wireLogEntry
	if err := h.nameCall(ctx, "handle.logs", args, &w); err != nil {
		return nil, err
	}
	return decodeLogEntries(w)
}

// Connect attaches to the running sandbox (not owning its lifecycle).
func (h *SandboxHandle) Connect(ctx context.Context) (*Sandbox, error) {
	return ConnectSandbox(ctx, h.info.Name)
}

// Start boots the stopped sandbox attached.
func (h *SandboxHandle) Start(ctx context.Context) (*Sandbox, error) {
	return StartSandbox(ctx, h.info.Name)
}

// StartDetached boots the stopped sandbox detached.
func (h *SandboxHandle) StartDetached(ctx context.Context) (*Sandbox, error) {
	return StartSandboxDetached(ctx, h.info.Name)
}

// Stop shuts the sandbox down gracefully (WithStopTimeout) and waits until it stopped.
func (h *SandboxHandle) Stop(ctx context.Context, opts ...StopOption) error {
	args := map[string]any{}
	if err := stopArgs(args, opts); err != nil {
		return err
	}
	return h.nameCall(ctx, "handle.stop", args, nil)
}

// Kill terminates the sandbox at once (WithKillTimeout) and waits until it stopped.
func (h *SandboxHandle) Kill(ctx context.Context, opts ...KillOption) error {
	args := map[string]any{}
	if err := killArgs(args, opts); err != nil {
		return err
	}
	return h.nameCall(ctx, "handle.kill", args, nil)
}

// Drain asks for a drain (running commands finish, new ones are rejected, then the
// sandbox stops) and returns once the request is sent: the same as RequestDrain.
func (h *SandboxHandle) Drain(ctx context.Context) error {
	return h.nameCall(ctx, "handle.drain", nil, nil)
}

// RequestStop asks for a graceful shutdown and returns once the request is sent.
func (h *SandboxHandle) RequestStop(ctx context.Context) error {
	return h.nameCall(ctx, "handle.request_stop", nil, nil)
}

// RequestKill asks for immediate termination and returns once the request is sent.
func (h *SandboxHandle) RequestKill(ctx context.Context) error {
	return h.nameCall(ctx, "handle.request_kill", nil, nil)
}

// RequestDrain asks for a drain and returns once the request is sent.
func (h *SandboxHandle) RequestDrain(ctx context.Context) error {
	return h.nameCall(ctx, "handle.request_drain", nil, nil)
}

// Metrics returns a snapshot of the running sandbox's resource usage, without
// connecting to it.
func (h *SandboxHandle) Metrics(ctx context.Context) (*Metrics, error) {
	var w wireMetrics
	if err := h.nameCall(ctx, "handle.metrics", nil, &w); err != nil {
		return nil, err
	}
	return w.toMetrics(), nil
}

// Pause pauses the VM.
func (h *SandboxHandle) Pause(ctx context.Context) error {
	return h.nameCall(ctx, "handle.pause", nil, nil)
}

// Resume resumes a paused VM.
func (h *SandboxHandle) Resume(ctx context.Context) error {
	return h.nameCall(ctx, "handle.resume", nil, nil)
}

// WaitUntilStopped waits until the sandbox is in a terminal state.
func (h *SandboxHandle) WaitUntilStopped(ctx context.Context) (*SandboxStopResult, error) {
	var w wireStopResult
	if err := h.nameCall(ctx, "handle.wait_until_stopped", nil, &w); err != nil {
		return nil, err
	}
	return w.toResult(), nil
}

// Remove deletes the stopped sandbox and its persisted state.
func (h *SandboxHandle) Remove(ctx context.Context) error {
	return RemoveSandbox(ctx, h.info.Name)
}

// LogStream streams the sandbox's captured output without connecting to it. Close the
// returned handle when done.
func (h *SandboxHandle) LogStream(ctx context.Context, opts LogStreamOptions) (*LogStreamHandle, error) {
	args := map[string]any{}
	if err := opts.wire(args); err != nil {
		return nil, err
	}
	var w struct {
		Stream uint64 `json:"stream"`
	}
	if err := h.nameCall(ctx, "handle.log_stream", args, &w); err != nil {
		return nil, err
	}
	return &LogStreamHandle{stream: newStream(w.Stream, nil)}, nil
}
