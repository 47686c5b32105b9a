package microsandbox

import (
	"context"
	"encoding/json"
	"fmt"
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

// Config returns the configuration as the state database holds it, decoded into a
// SandboxConfig: Name, Image (an OCI reference, a directory or archive path, or a disk
// image with ImageFstype; "" for the default root), Snapshot, OCIUpperSizeMiB,
// MemoryMiB, CPUs, Env, Workdir, Shell, Hostname, User, Labels, Scripts, Entrypoint,
// IdleTimeout, MaxDuration, LogLevel, QuietLogs, Ephemeral, SecurityProfile,
// PullPolicy, Init, Detached, and Network when the network is disabled. The stored
// form has no counterpart for the rest (the network policy as rules, volumes,
// patches, secrets' values, ports, registry credentials, replace): those fields stay
// zero, and ConfigJSON has everything. Decoding is best-effort: a field of an
// unexpected shape is left zero; the error is ErrInternal only when the configuration
// is not a JSON object.
func (h *SandboxHandle) Config() (*SandboxConfig, error) {
	cfg, err := decodeStoredConfig(h.info.Config)
	if err != nil {
		return nil, err
	}
	if cfg.Name == "" {
		cfg.Name = h.info.Name
	}
	cfg.Detached = h.info.Detached
	return cfg, nil
}

// decodeStoredConfig reads the Rust SDK's SandboxConfig as serde writes it (the state
// database's config_json): {"name", "cpus", "memory_mib", "image": "default" |
// {"oci": ref} | {"directory": path} | {"archive": path} | {"disk": {"path",
// "format", "fstype"}} | {"snapshot": path}, "env": [[k, v]], "workdir", "user",
// "shell", "hostname", "scripts": [[name, content]], "labels": {k: v}, "entrypoint",
// "idle_timeout_secs", "max_duration_secs", "log_level", "quiet_logs", "ephemeral",
// "security_profile", "init": null | {"path", "args", "env"}, "pull_policy",
// "network": {"enabled", ...}, "upper_size_mib", ...}.
func decodeStoredConfig(raw json.RawMessage) (*SandboxConfig, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil || fields == nil {
		return nil, newError(ErrInternal, fmt.Sprintf("sandbox config: not a JSON object: %s", truncate(raw)))
	}
	// field decodes one member into out; absent, null or of another shape: false.
	field := func(name string, out any) bool {
		v, ok := fields[name]
		if !ok || string(v) == "null" {
			return false
		}
		return json.Unmarshal(v, out) == nil
	}
	cfg := &SandboxConfig{}
	field("name", &cfg.Name)
	if field("cpus", &cfg.CPUs) {
		cfg.cpusSet = true
	}
	if field("memory_mib", &cfg.MemoryMiB) {
		cfg.memorySet = true
	}
	decodeStoredImage(fields["image"], cfg)
	if field("upper_size_mib", &cfg.OCIUpperSizeMiB) {
		cfg.upperSizeSet = true
	}
	cfg.Env = decodePairs(fields["env"])
	cfg.Scripts = decodePairs(fields["scripts"])
	field("workdir", &cfg.Workdir)
	field("user", &cfg.User)
	field("shell", &cfg.Shell)
	field("hostname", &cfg.Hostname)
	var labels map[string]string
	if field("labels", &labels) && len(labels) > 0 {
		cfg.Labels = labels
	}
	var entrypoint []string
	if field("entrypoint", &entrypoint) {
		cfg.Entrypoint = entrypoint
	}
	var secs uint64
	if field("idle_timeout_secs", &secs) {
		cfg.IdleTimeout = time.Duration(secs) * time.Second
	}
	secs = 0
	if field("max_duration_secs", &secs) {
		cfg.MaxDuration = time.Duration(secs) * time.Second
	}
	var s string
	if field("log_level", &s) {
		cfg.LogLevel = LogLevel(s)
	}
	s = ""
	if field("security_profile", &s) {
		cfg.SecurityProfile = SecurityProfile(s)
	}
	s = ""
	if field("pull_policy", &s) {
		cfg.PullPolicy = PullPolicy(s)
	}
	field("quiet_logs", &cfg.QuietLogs)
	if field("ephemeral", &cfg.Ephemeral) {
		cfg.ephemeralSet = true
	}
	var init struct {
		Path *string         `json:"path"`
		Args []string        `json:"args"`
		Env  json.RawMessage `json:"env"`
	}
	if field("init", &init) {
		ic := InitConfig{Cmd: "auto", Args: init.Args, Env: decodePairs(init.Env)}
		if init.Path != nil {
			ic.Cmd = *init.Path
		}
		cfg.Init = &ic
	}
	var network struct {
		Enabled *bool `json:"enabled"`
	}
	if field("network", &network) && network.Enabled != nil && !*network.Enabled {
		cfg.Network = NetworkPolicy.Disabled()
	}
	return cfg, nil
}

// decodeStoredImage sets the root filesystem fields from the stored RootfsSource.
func decodeStoredImage(raw json.RawMessage, cfg *SandboxConfig) {
	var unit string
	if json.Unmarshal(raw, &unit) == nil {
		return // "default": the default root, no image
	}
	var src map[string]json.RawMessage
	if json.Unmarshal(raw, &src) != nil || len(src) != 1 {
		return
	}
	for kind, v := range src {
		var path string
		switch kind {
		case "oci", "directory", "archive":
			if json.Unmarshal(v, &path) == nil {
				cfg.Image = path
			}
		case "snapshot":
			if json.Unmarshal(v, &path) == nil {
				cfg.Snapshot = path
			}
		case "disk":
			var disk struct {
				Path   string  `json:"path"`
				Fstype *string `json:"fstype"`
			}
			if json.Unmarshal(v, &disk) == nil && disk.Path != "" {
				cfg.Image = disk.Path
				cfg.imageDisk = true
				if disk.Fstype != nil {
					cfg.ImageFstype = *disk.Fstype
				}
			}
		}
	}
}

// decodePairs reads a stored list of [key, value] pairs (a Rust Vec<(String, String)>),
// or an object; nil when empty or of another shape.
func decodePairs(raw json.RawMessage) map[string]string {
	var pairs [][]string
	if json.Unmarshal(raw, &pairs) == nil {
		var out map[string]string
		for _, p := range pairs {
			if len(p) != 2 {
				return nil
			}
			if out == nil {
				out = make(map[string]string, len(pairs))
			}
			out[p[0]] = p[1]
		}
		return out
	}
	var m map[string]string
	if json.Unmarshal(raw, &m) == nil && len(m) > 0 {
		return m
	}
	return nil
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
