package microsandbox

import (
	"encoding/base64"
	"encoding/json"
	"time"
)

// SandboxStatus is a sandbox's lifecycle state.
type SandboxStatus string

const (
	// SandboxStatusRunning: the guest agent is ready; Exec, Shell and FS work.
	SandboxStatusRunning SandboxStatus = "running"
	// SandboxStatusStopped: the VM is shut down; the configuration persists; it can be
	// restarted.
	SandboxStatusStopped SandboxStatus = "stopped"
	// SandboxStatusCrashed: the VM exited unexpectedly.
	SandboxStatusCrashed SandboxStatus = "crashed"
	// SandboxStatusDraining: graceful shutdown in progress.
	SandboxStatusDraining SandboxStatus = "draining"
	// SandboxStatusPaused: the VM is paused.
	SandboxStatusPaused SandboxStatus = "paused"
)

// LogLevel is the sandbox process's log verbosity.
type LogLevel string

const (
	LogLevelDefault LogLevel = ""
	LogLevelTrace   LogLevel = "trace"
	LogLevelDebug   LogLevel = "debug"
	LogLevelInfo    LogLevel = "info"
	LogLevelWarn    LogLevel = "warn"
	LogLevelError   LogLevel = "error"
)

// PullPolicy controls when an OCI image is fetched from its registry.
type PullPolicy string

const (
	// PullPolicyDefault: the runtime default (if-missing).
	PullPolicyDefault   PullPolicy = ""
	PullPolicyAlways    PullPolicy = "always"
	PullPolicyIfMissing PullPolicy = "if-missing"
	PullPolicyNever     PullPolicy = "never"
)

// SecurityProfile is the sandbox-wide in-guest security profile.
type SecurityProfile string

const (
	// SecurityProfileDefault: normal guest-root semantics.
	SecurityProfileDefault SecurityProfile = "default"
	// SecurityProfileRestricted: no_new_privs, no mount-admin capability, nosuid,nodev
	// user mounts.
	SecurityProfileRestricted SecurityProfile = "restricted"
)

// LogSource is the origin of a captured log entry.
type LogSource string

const (
	// LogSourceStdout: captured stdout (pipe mode).
	LogSourceStdout LogSource = "stdout"
	// LogSourceStderr: captured stderr (pipe mode).
	LogSourceStderr LogSource = "stderr"
	// LogSourceOutput: PTY-merged output of a session run with a TTY.
	LogSourceOutput LogSource = "output"
	// LogSourceSystem: lifecycle markers and runtime/kernel diagnostics.
	LogSourceSystem LogSource = "system"
	// LogSourceAll: every source (only as a filter).
	LogSourceAll LogSource = "all"
)

// Metrics is a point-in-time resource usage snapshot of a sandbox.
type Metrics struct {
	CPUPercent              float64
	VCPUTimeNs              uint64
	MemoryBytes             uint64
	MemoryAvailableBytes    *uint64
	MemoryHostResidentBytes *uint64
	MemoryLimitBytes        uint64
	DiskReadBytes           uint64
	DiskWriteBytes          uint64
	NetRxBytes              uint64
	NetTxBytes              uint64
	UpperUsedBytes          *uint64
	UpperFreeBytes          *uint64
	UpperHostAllocatedBytes *uint64
	// Timestamp is when the snapshot was taken.
	Timestamp time.Time
	// Uptime is the time since the sandbox started.
	Uptime time.Duration
	// Status is the sandbox's state when the snapshot was taken.
	Status SandboxStatus
}

type wireMetrics struct {
	CPUPercent              float64 `json:"cpu_percent"`
	VCPUTimeNs              uint64  `json:"vcpu_time_ns"`
	MemoryBytes             uint64  `json:"memory_bytes"`
	MemoryAvailableBytes    *uint64 `json:"memory_available_bytes"`
	MemoryHostResidentBytes *uint64 `json:"memory_host_resident_bytes"`
	MemoryLimitBytes        uint64  `json:"memory_limit_bytes"`
	DiskReadBytes           uint64  `json:"disk_read_bytes"`
	DiskWriteBytes          uint64  `json:"disk_write_bytes"`
	NetRxBytes              uint64  `json:"net_rx_bytes"`
	NetTxBytes              uint64  `json:"net_tx_bytes"`
	UpperUsedBytes          *uint64 `json:"upper_used_bytes"`
	UpperFreeBytes          *uint64 `json:"upper_free_bytes"`
	UpperHostAllocatedBytes *uint64 `json:"upper_host_allocated_bytes"`
	TimestampMs             *int64  `json:"timestamp_ms"`
	UptimeSecs              float64 `json:"uptime_secs"`
	Status                  string  `json:"status"`
}

func (w *wireMetrics) toMetrics() *Metrics {
	return &Metrics{
		CPUPercent:              w.CPUPercent,
		VCPUTimeNs:              w.VCPUTimeNs,
		MemoryBytes:             w.MemoryBytes,
		MemoryAvailableBytes:    w.MemoryAvailableBytes,
		MemoryHostResidentBytes: w.MemoryHostResidentBytes,
		MemoryLimitBytes:        w.MemoryLimitBytes,
		DiskReadBytes:           w.DiskReadBytes,
		DiskWriteBytes:          w.DiskWriteBytes,
		NetRxBytes:              w.NetRxBytes,
		NetTxBytes:              w.NetTxBytes,
		UpperUsedBytes:          w.UpperUsedBytes,
		UpperFreeBytes:          w.UpperFreeBytes,
		UpperHostAllocatedBytes: w.UpperHostAllocatedBytes,
		Timestamp:               msToTime(w.TimestampMs),
		Uptime:                  secsToDuration(w.UptimeSecs),
		Status:                  SandboxStatus(w.Status),
	}
}

// LogEntry is one captured log entry.
type LogEntry struct {
	// Source is where the bytes came from.
	Source LogSource
	// SessionID is the exec session's id; nil for system entries.
	SessionID *uint64
	// Timestamp is the host's capture time.
	Timestamp time.Time
	// Data is the captured bytes.
	Data []byte
	// Cursor is an opaque resume token for LogStreamOptions.FromCursor.
	Cursor string
}

// Text returns the captured bytes as a string.
func (e *LogEntry) Text() string { return string(e.Data) }

type wireLogEntry struct {
	Source      string          `json:"source"`
	SessionID   *uint64         `json:"session_id"`
	TimestampMs *int64          `json:"timestamp_ms"`
	DataB64     string          `json:"data_b64"`
	Cursor      json.RawMessage `json:"cursor"`
}

func (w *wireLogEntry) toLogEntry() (LogEntry, error) {
	data, err := base64.StdEncoding.DecodeString(w.DataB64)
	if err != nil {
		return LogEntry{}, newError(ErrInternal, "log entry: bad data_b64: "+err.Error())
	}
	return LogEntry{
		Source:    LogSource(w.Source),
		SessionID: w.SessionID,
		Timestamp: msToTime(w.TimestampMs),
		Data:      data,
		Cursor:    cursorText(w.Cursor),
	}, nil
}

// cursorText keeps a cursor whatever JSON scalar the core uses: a string as is, a
// number as its digits.
func cursorText(raw json.RawMessage) string {
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return string(raw)
}

func decodeLogEntries(ws []wireLogEntry) ([]LogEntry, error) {
	out := make([]LogEntry, 0, len(ws))
	for i := range ws {
		e, err := ws[i].toLogEntry()
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// LogOptions filters Logs. The zero value returns everything of the default sources
// (stdout and stderr).
type LogOptions struct {
	// Tail keeps only the last N matching entries (0: all).
	Tail uint64
	// Since is the inclusive lower timestamp bound (zero: none).
	Since time.Time
	// Until is the exclusive upper timestamp bound (zero: none).
	Until time.Time
	// Sources to include; empty uses the runtime default.
	Sources []LogSource
}

func (o LogOptions) wire(args map[string]any) {
	if o.Tail > 0 {
		args["tail"] = o.Tail
	}
	if !o.Since.IsZero() {
		args["since_ms"] = o.Since.UnixMilli()
	}
	if !o.Until.IsZero() {
		args["until_ms"] = o.Until.UnixMilli()
	}
	if len(o.Sources) > 0 {
		args["sources"] = o.Sources
	}
}

// LogStreamOptions configures LogStream. The zero value reads the default sources from
// the beginning with follow off. Since and FromCursor are mutually exclusive.
type LogStreamOptions struct {
	// Sources to include; empty uses the runtime default.
	Sources []LogSource
	// Since starts at the first entry at or after this time.
	Since time.Time
	// FromCursor resumes strictly after the entry with this LogEntry.Cursor.
	FromCursor string
	// Until stops at the first entry at or after this time.
	Until time.Time
	// Follow keeps the stream open past the current end, yielding new entries.
	Follow bool
}

func (o LogStreamOptions) wire(args map[string]any) error {
	if !o.Since.IsZero() && o.FromCursor != "" {
		return invalidArgument("LogStreamOptions: Since and FromCursor are mutually exclusive")
	}
	if len(o.Sources) > 0 {
		args["sources"] = o.Sources
	}
	if !o.Since.IsZero() {
		args["since_ms"] = o.Since.UnixMilli()
	}
	if !o.Until.IsZero() {
		args["until_ms"] = o.Until.UnixMilli()
	}
	if o.FromCursor != "" {
		args["from_cursor"] = o.FromCursor
	}
	args["follow"] = o.Follow
	return nil
}

// SandboxStopResult describes the terminal state WaitUntilStopped observed.
type SandboxStopResult struct {
	// Name of the sandbox.
	Name string
	// Status is the terminal status (stopped or crashed).
	Status SandboxStatus
	// ExitCode is the VM process's exit code when known.
	ExitCode *int
	// Signal is the terminating signal when known.
	Signal *int
	// Reason is the runtime's description of how it ended, when known.
	Reason *string
	// ObservedAt is when the terminal state was observed.
	ObservedAt time.Time
}

type wireStopResult struct {
	Name         string  `json:"name"`
	Status       string  `json:"status"`
	ExitCode     *int    `json:"exit_code"`
	Signal       *int    `json:"signal"`
	Reason       *string `json:"reason"`
	ObservedAtMs *int64  `json:"observed_at_ms"`
}

func (w *wireStopResult) toResult() *SandboxStopResult {
	return &SandboxStopResult{
		Name:       w.Name,
		Status:     SandboxStatus(w.Status),
		ExitCode:   w.ExitCode,
		Signal:     w.Signal,
		Reason:     w.Reason,
		ObservedAt: msToTime(w.ObservedAtMs),
	}
}

type wireExitStatus struct {
	ExitCode int  `json:"exit_code"`
	Success  bool `json:"success"`
}

// sandboxRef is what create, start and connect return.
type sandboxRef struct {
	Sandbox       uint64 `json:"sandbox"`
	Name          string `json:"name"`
	OwnsLifecycle bool   `json:"owns_lifecycle"`
}
