package microsandbox

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"
)

const outputAnswer = `{"ok":{"exit_code":3,"success":false,"signal":null,"timed_out":false,` +
	`"stdout_b64":"aGVsbG8K","stderr_b64":"b29wcw=="}}`

func TestExecArgumentsAndOutput(t *testing.T) {
	f := useFake(t, answers(map[string]string{"sandbox.exec": outputAnswer, "sandbox.shell": outputAnswer}))
	sb := testSandbox(t, 11)
	ctx := context.Background()
	out, err := sb.Exec(ctx, "python3", []string{"-c", "print(1)"},
		WithExecCwd("/app"),
		WithExecUser("1000"),
		WithExecEnv(map[string]string{"A": "1"}),
		WithExecEnv(map[string]string{"B": "2"}),
		WithExecTimeout(2500*time.Millisecond),
		WithExecStdin([]byte("in\x00put")),
		WithExecTTY(),
		WithExecRlimit("nofile", 64, 128),
		WithExecRlimits(Rlimit{Resource: "cpu", Soft: 5, Hard: 5}),
	)
	if err != nil {
		t.Fatal(err)
	}
	c := f.last(t)
	if c.Method != "sandbox.exec" {
		t.Errorf("method %s", c.Method)
	}
	sameJSON(t, "exec args", c.Args, `{"handle": 11, "cmd": "python3", "args": ["-c", "print(1)"],
	  "cwd": "/app", "user": "1000", "env": {"A": "1", "B": "2"}, "timeout": 2.5,
	  "stdin_b64": "aW4AcHV0", "tty": true,
	  "rlimits": [{"resource": "nofile", "soft": 64, "hard": 128}, {"resource": "cpu", "soft": 5, "hard": 5}]}`)
	if out.Stdout() != "hello\n" || out.Stderr() != "oops" || out.ExitCode() != 3 || out.Success() {
		t.Errorf("output %q %q %d %v", out.Stdout(), out.Stderr(), out.ExitCode(), out.Success())
	}
	if string(out.StdoutBytes()) != "hello\n" || out.Status().TimedOut {
		t.Error("bytes/status")
	}

	if _, err := sb.Exec(ctx, "true", nil); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "exec without args", f.last(t).Args, `{"handle": 11, "cmd": "true", "args": []}`)

	if _, err := sb.Shell(ctx, "echo hi | wc -c", WithExecStdinPipe()); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "shell args", f.last(t).Args, `{"handle": 11, "script": "echo hi | wc -c"}`)

	_, err = sb.Exec(ctx, "x", nil, WithExecStdin(nil), WithExecStdinPipe())
	if !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("stdin and pipe: %v", err)
	}
}

func TestExecStream(t *testing.T) {
	var recv = []string{
		`{"ok":{"type":"started","pid":42}}`,
		`{"ok":{"type":"stdout","data_b64":"b3V0"}}`,
		`{"ok":{"type":"stderr","data_b64":"ZXJy"}}`,
		`{"ok":{"type":"exited","exit_code":0,"success":true,"signal":null,"timed_out":false}}`,
		`{"ok":null}`,
	}
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "sandbox.shell_stream", "sandbox.exec_stream":
			return `{"ok":{"exec":21}}`
		case "exec.recv":
			a := recv[0]
			recv = recv[1:]
			return a
		case "exec.wait":
			return `{"ok":{"exit_code":137,"success":false,"signal":9,"timed_out":false}}`
		}
		return `{"ok":null}`
	})
	sb := testSandbox(t, 11)
	ctx := context.Background()
	h, err := sb.ShellStream(ctx, "echo out; echo err >&2", WithExecStdinPipe(), WithExecEnv(map[string]string{"X": "y"}))
	disarm(t, h)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "shell_stream args", f.last(t).Args, `{"handle": 11, "script": "echo out; echo err >&2", "env": {"X": "y"}, "stdin_pipe": true}`)

	var kinds []string
	var stdout, stderr string
	for {
		ev, err := h.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, string(ev.Kind))
		switch ev.Kind {
		case ExecEventStarted:
			if ev.PID != 42 {
				t.Errorf("pid %d", ev.PID)
			}
		case ExecEventStdout:
			stdout += string(ev.Data)
		case ExecEventStderr:
			stderr += string(ev.Data)
		case ExecEventExited:
			if ev.ExitCode != 0 || !ev.Status.Success {
				t.Errorf("exited %+v", ev)
			}
		}
		if ev.Kind == ExecEventDone {
			break
		}
	}
	if strings.Join(kinds, ",") != "started,stdout,stderr,exited,done" || stdout != "out" || stderr != "err" {
		t.Errorf("events %v %q %q", kinds, stdout, stderr)
	}
	for _, c := range f.all() {
		if c.Method == "exec.recv" && c.Args["handle"] != float64(21) {
			t.Errorf("recv on handle %v", c.Args["handle"])
		}
	}

	if err := h.Write(ctx, []byte("abc")); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "write", f.last(t).Args, `{"handle": 21, "data_b64": "YWJj"}`)
	if _, err := io.WriteString(h.TakeStdin(), "d"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "sink write", f.last(t).Args, `{"handle": 21, "data_b64": "ZA=="}`)
	if err := h.CloseStdin(ctx); err != nil || f.last(t).Method != "exec.close_stdin" {
		t.Errorf("close_stdin: %v %s", err, f.last(t).Method)
	}
	if err := h.Signal(ctx, 15); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "signal", f.last(t).Args, `{"handle": 21, "signal": 15}`)
	if err := h.Kill(ctx); err != nil || f.last(t).Method != "exec.kill" {
		t.Errorf("kill: %v", err)
	}
	code, err := h.Wait(ctx)
	if err != nil || code != 137 {
		t.Errorf("wait: %d %v", code, err)
	}
	// Wait spent the handle: Close does not release it again, and the handle is gone.
	n := len(f.all())
	if err := h.Close(); err != nil {
		t.Errorf("close after wait: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("close after wait called the core: %v", f.methods()[n:])
	}
	if _, err := h.Recv(ctx); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("recv after wait: %v", err)
	}

	h2, err := sb.ExecStream(ctx, "cat", nil)
	disarm(t, h2)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "exec_stream args", f.last(t).Args, `{"handle": 11, "cmd": "cat", "args": [], "stdin_pipe": false}`)
	if err := h2.Close(); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "release", f.last(t), `{"Method": "release", "Args": {"handle": 21}, "Raw": "{\"handle\":21}"}`)
	if err := h2.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

func TestExecCollect(t *testing.T) {
	useFake(t, answers(map[string]string{
		"sandbox.exec_stream": `{"ok":{"exec":5}}`,
		"exec.collect":        outputAnswer,
		"release":             `{"error":{"kind":"invalid_handle","message":"spent"}}`,
	}))
	sb := testSandbox(t, 11)
	h, err := sb.ExecStream(context.Background(), "x", nil)
	disarm(t, h)
	if err != nil {
		t.Fatal(err)
	}
	out, err := h.Collect(context.Background())
	if err != nil || out.Stdout() != "hello\n" {
		t.Fatalf("collect: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}

func TestSandboxLifecycleCalls(t *testing.T) {
	f := useFake(t, answers(map[string]string{
		"sandbox.info":               `{"ok":{"name":"box","owns_lifecycle":true,"config":{"cpus":1}}}`,
		"sandbox.stop":               `{"ok":null}`,
		"sandbox.kill":               `{"ok":null}`,
		"sandbox.drain":              `{"ok":null}`,
		"sandbox.pause":              `{"ok":null}`,
		"sandbox.resume":             `{"ok":null}`,
		"sandbox.stop_and_wait":      `{"ok":{"exit_code":-1,"success":false}}`,
		"sandbox.wait":               `{"ok":{"exit_code":0,"success":true}}`,
		"sandbox.wait_until_stopped": `{"ok":{"name":"box","status":"stopped","exit_code":0,"signal":null,"reason":"requested","observed_at_ms":1700000000123}}`,
		"sandbox.detach":             `{"ok":null}`,
		"release":                    `{"ok":null}`,
	}))
	ctx := context.Background()
	sb := testSandbox(t, 11)
	if owns, err := sb.OwnsLifecycle(); err != nil || !owns || !sb.OwnsLifecycleOrFalse() {
		t.Errorf("owns: %v %v", owns, err)
	}
	if cfg, err := sb.ConfigJSON(); err != nil || cfg != `{"cpus":1}` {
		t.Errorf("config %q %v", cfg, err)
	}
	if err := sb.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "stop", f.last(t).Args, `{"handle": 11}`)
	if err := sb.Stop(ctx, WithStopTimeout(30*time.Second)); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "stop timeout", f.last(t).Args, `{"handle": 11, "timeout": 30}`)
	if err := sb.Kill(ctx, WithKillTimeout(100*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "kill", f.last(t), `{"Method": "sandbox.kill", "Args": {"handle": 11, "timeout": 0.1}, "Raw": "{\"handle\":11,\"timeout\":0.1}"}`)
	for name, fn := range map[string]func(context.Context) error{
		"sandbox.drain": sb.Drain, "sandbox.pause": sb.Pause, "sandbox.resume": sb.Resume,
	} {
		if err := fn(ctx); err != nil || f.last(t).Method != name {
			t.Errorf("%s: %v", name, err)
		}
	}
	if code, err := sb.StopAndWait(ctx); err != nil || code != -1 {
		t.Errorf("stop_and_wait %d %v", code, err)
	}
	if code, err := sb.Wait(ctx); err != nil || code != 0 {
		t.Errorf("wait %d %v", code, err)
	}
	res, err := sb.WaitUntilStopped(ctx)
	if err != nil || res.Status != SandboxStatusStopped || res.ExitCode == nil || *res.ExitCode != 0 ||
		res.Signal != nil || res.Reason == nil || *res.Reason != "requested" || res.ObservedAt.UnixMilli() != 1700000000123 {
		t.Errorf("wait_until_stopped %+v %v", res, err)
	}
	if err := sb.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	n := len(f.all())
	if err := sb.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("close after detach: %v", err)
	}
	if _, err := sb.Metrics(ctx); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("metrics after detach: %v", err)
	}
	if len(f.all()) != n {
		t.Error("a spent handle reached the core")
	}
	if sb.OwnsLifecycleOrFalse() {
		t.Error("owns after detach")
	}

	sb2 := testSandbox(t, 12)
	if err := sb2.Close(); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "release", f.last(t).Args, `{"handle": 12}`)
	if err := sb2.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("second close: %v", err)
	}
}

func TestFilesystemCalls(t *testing.T) {
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "fs.read":
			return `{"ok":{"data_b64":"aGk="}}`
		case "fs.exists":
			return `{"ok":true}`
		case "fs.stat":
			return `{"ok":{"kind":"file","size":2,"mode":33188,"uid":0,"gid":0,"modified_ms":1700000000000,"symlink_target":null}}`
		case "fs.list":
			return `{"ok":[{"path":"/tmp/a","name":"a","kind":"directory","size":0,"metadata":{"kind":"directory","size":0,"mode":16877,"uid":1,"gid":2,"modified_ms":null,"symlink_target":null}}]}`
		}
		return `{"ok":null}`
	})
	ctx := context.Background()
	fs := testSandbox(t, 11).FS()
	if err := fs.Write(ctx, "/tmp/x", []byte("hi")); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "write", f.last(t).Args, `{"handle": 11, "path": "/tmp/x", "data_b64": "aGk="}`)
	if s, err := fs.ReadString(ctx, "/tmp/x"); err != nil || s != "hi" {
		t.Errorf("read %q %v", s, err)
	}
	if ok, err := fs.Exists(ctx, "/tmp/x"); err != nil || !ok {
		t.Errorf("exists %v %v", ok, err)
	}
	st, err := fs.Stat(ctx, "/tmp/x")
	if err != nil || st.Size != 2 || st.Kind != FsEntryKindFile || st.IsDir || st.Mode != 0o100644 || st.ModTime.Unix() != 1700000000 {
		t.Errorf("stat %+v %v", st, err)
	}
	list, err := fs.List(ctx, "/tmp")
	if err != nil || len(list) != 1 || list[0].Name != "a" || !list[0].Stat.IsDir || list[0].Stat.GID != 2 || !list[0].Stat.ModTime.IsZero() {
		t.Errorf("list %+v %v", list, err)
	}
	for _, c := range []struct {
		method string
		run    func() error
		args   string
	}{
		{"fs.mkdir", func() error { return fs.Mkdir(ctx, "/d") }, `{"handle": 11, "path": "/d"}`},
		{"fs.mkdir_all", func() error { return fs.MkdirAll(ctx, "/d/e") }, `{"handle": 11, "path": "/d/e"}`},
		{"fs.remove", func() error { return fs.Remove(ctx, "/f") }, `{"handle": 11, "path": "/f"}`},
		{"fs.remove_dir", func() error { return fs.RemoveDir(ctx, "/d") }, `{"handle": 11, "path": "/d"}`},
		{"fs.rename", func() error { return fs.Rename(ctx, "/a", "/b") }, `{"handle": 11, "from": "/a", "to": "/b"}`},
		{"fs.copy", func() error { return fs.Copy(ctx, "/a", "/b") }, `{"handle": 11, "from": "/a", "to": "/b"}`},
		{"fs.copy_from_host", func() error { return fs.CopyFromHost(ctx, "/host", "/guest") }, `{"handle": 11, "from": "/host", "to": "/guest"}`},
		{"fs.copy_to_host", func() error { return fs.CopyToHost(ctx, "/guest", "/host") }, `{"handle": 11, "from": "/guest", "to": "/host"}`},
	} {
		if err := c.run(); err != nil {
			t.Fatal(err)
		}
		if got := f.last(t); got.Method != c.method {
			t.Errorf("method %s, want %s", got.Method, c.method)
		} else {
			sameJSON(t, c.method, got.Args, c.args)
		}
	}
}

const logAnswer = `{"ok":[{"source":"stdout","session_id":3,"timestamp_ms":1700000000500,"data_b64":"aGVsbG8K","cursor":"c-1"},` +
	`{"source":"system","session_id":null,"timestamp_ms":1700000000600,"data_b64":"","cursor":17}]}`

func TestLogs(t *testing.T) {
	f := useFake(t, answers(map[string]string{
		"sandbox.logs": logAnswer, "handle.logs": logAnswer, "get": handleInfoAnswer,
		"sandbox.log_stream": `{"ok":{"stream":31}}`,
		"handle.log_stream":  `{"ok":{"stream":32}}`,
		"stream.next":        `{"ok":{"source":"stderr","session_id":1,"timestamp_ms":1,"data_b64":"eA==","cursor":"c-9"}}`,
	}))
	ctx := context.Background()
	sb := testSandbox(t, 11)
	since := time.UnixMilli(1700000000000)
	until := time.UnixMilli(1700000001000)
	entries, err := sb.Logs(ctx, LogOptions{Tail: 5, Since: since, Until: until, Sources: []LogSource{LogSourceStdout, LogSourceSystem}})
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "logs", f.last(t).Args, `{"handle": 11, "tail": 5, "since_ms": 1700000000000, "until_ms": 1700000001000, "sources": ["stdout", "system"]}`)
	if len(entries) != 2 || entries[0].Text() != "hello\n" || entries[0].Source != LogSourceStdout ||
		entries[0].SessionID == nil || *entries[0].SessionID != 3 || entries[0].Timestamp.UnixMilli() != 1700000000500 ||
		entries[0].Cursor != "c-1" || entries[1].SessionID != nil || entries[1].Cursor != "17" {
		t.Errorf("entries %+v", entries)
	}
	if _, err := sb.Logs(ctx, LogOptions{}); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "logs defaults", f.last(t).Args, `{"handle": 11}`)

	h, err := GetSandbox(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Logs(ctx, LogOptions{Sources: []LogSource{LogSourceAll}}); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle logs", f.last(t).Args, `{"name": "box", "sources": ["all"]}`)

	st, err := sb.LogStream(ctx, LogStreamOptions{FromCursor: "1700000000500000-0"})
	disarm(t, st)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "log_stream", f.last(t).Args, `{"handle": 11, "from_cursor": "1700000000500000-0", "follow": false}`)
	e, err := st.Recv(ctx)
	if err != nil || e == nil || e.Text() != "x" || e.Source != LogSourceStderr {
		t.Errorf("recv %+v %v", e, err)
	}
	sameJSON(t, "next", f.last(t).Args, `{"handle": 31}`)
	if _, err := sb.LogStream(ctx, LogStreamOptions{Since: since, FromCursor: "x"}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("since+cursor: %v", err)
	}
	st3, err := h.LogStream(ctx, LogStreamOptions{Until: since})
	disarm(t, st3)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle.log_stream", f.last(t), `{"Method": "handle.log_stream", "Args": {"name": "box", "until_ms": 1700000000000, "follow": false}, "Raw": "{\"follow\":false,\"name\":\"box\",\"until_ms\":1700000000000}"}`)
	st2, err := sb.LogStream(ctx, LogStreamOptions{Follow: true, Since: since, Sources: []LogSource{LogSourceOutput}})
	disarm(t, st2)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "log_stream follow", f.last(t).Args, `{"handle": 11, "follow": true, "since_ms": 1700000000000, "sources": ["output"]}`)
}

const metricsJSON = `{"cpu_percent":12.5,"vcpu_time_ns":1000,"memory_bytes":2048,"memory_available_bytes":null,` +
	`"memory_host_resident_bytes":4096,"memory_limit_bytes":536870912,"disk_read_bytes":1,"disk_write_bytes":2,` +
	`"net_rx_bytes":3,"net_tx_bytes":4,"upper_used_bytes":null,"upper_free_bytes":null,"upper_host_allocated_bytes":null,` +
	`"timestamp_ms":1700000000000,"uptime_secs":1.5,"status":"running"}`

func TestMetrics(t *testing.T) {
	next := []string{`{"ok":` + metricsJSON + `}`, `{"ok":null}`}
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "sandbox.metrics":
			return `{"ok":` + metricsJSON + `}`
		case "all_metrics":
			return `{"ok":{"a":` + metricsJSON + `,"b":` + metricsJSON + `}}`
		case "sandbox.metrics_stream":
			return `{"ok":{"stream":41}}`
		case "stream.next":
			a := next[0]
			next = next[1:]
			return a
		}
		return `{"ok":null}`
	})
	ctx := context.Background()
	sb := testSandbox(t, 11)
	m, err := sb.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m.CPUPercent != 12.5 || m.MemoryLimitBytes != 536870912 || m.MemoryAvailableBytes != nil ||
		m.MemoryHostResidentBytes == nil || *m.MemoryHostResidentBytes != 4096 || m.Uptime != 1500*time.Millisecond ||
		m.Status != SandboxStatusRunning || m.Timestamp.Unix() != 1700000000 || m.NetTxBytes != 4 {
		t.Errorf("metrics %+v", m)
	}
	all, err := AllSandboxMetrics(ctx)
	if err != nil || len(all) != 2 || all["b"].DiskWriteBytes != 2 {
		t.Errorf("all %v %v", all, err)
	}
	st, err := sb.MetricsStream(ctx, 250*time.Millisecond)
	disarm(t, st)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "metrics_stream", f.last(t).Args, `{"handle": 11, "interval": 0.25}`)
	if m, err := st.Recv(ctx); err != nil || m == nil || m.CPUPercent != 12.5 {
		t.Errorf("recv %v %v", m, err)
	}
	if m, err := st.Recv(ctx); err != nil || m != nil {
		t.Errorf("end of stream: %v %v", m, err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "release", f.last(t), `{"Method": "release", "Args": {"handle": 41}, "Raw": "{\"handle\":41}"}`)
	st2, err := sb.MetricsStream(ctx, 2*time.Second)
	disarm(t, st2)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "metrics_stream 2s", f.last(t).Args, `{"handle": 11, "interval": 2}`)
}

const handleInfoAnswer = `{"ok":{"name":"box","status":"stopped","config":{"cpus":1,"env":{"A":"1"}},"labels":{"team":"x"},` +
	`"created_at_ms":1700000000000,"updated_at_ms":null,"vmm_pid":null,"detached":false,"exit_reason":"requested","ephemeral":false}}`

func TestSandboxHandle(t *testing.T) {
	f := useFake(t, answers(map[string]string{
		"get":                       handleInfoAnswer,
		"list":                      `{"ok":[` + strings.TrimSuffix(strings.TrimPrefix(handleInfoAnswer, `{"ok":`), `}`) + `]}`,
		"handle.stop":               `{"ok":null}`,
		"handle.kill":               `{"ok":null}`,
		"handle.drain":              `{"ok":null}`,
		"handle.pause":              `{"ok":null}`,
		"handle.resume":             `{"ok":null}`,
		"handle.wait_until_stopped": `{"ok":{"name":"box","status":"crashed","exit_code":null,"signal":9,"reason":null,"observed_at_ms":5}}`,
		"remove":                    `{"ok":null}`,
		"start":                     refAnswer,
		"connect":                   `{"ok":{"sandbox":8,"name":"box","owns_lifecycle":false}}`,
	}))
	ctx := context.Background()
	h, err := GetSandbox(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "get", f.last(t).Args, `{"name": "box"}`)
	if h.Name() != "box" || h.Status() != SandboxStatusStopped || h.Labels()["team"] != "x" ||
		h.CreatedAt().UnixMilli() != 1700000000000 || !h.UpdatedAt().IsZero() || h.Detached() || h.Ephemeral() {
		t.Errorf("handle %+v", h.info)
	}
	if _, ok := h.VMMPid(); ok {
		t.Error("pid")
	}
	if r, ok := h.ExitReason(); !ok || r != "requested" {
		t.Error("exit reason")
	}
	if h.ConfigJSON() != `{"cpus":1,"env":{"A":"1"}}` {
		t.Errorf("config json %s", h.ConfigJSON())
	}
	if m, err := h.ConfigMap(); err != nil || m["cpus"] != float64(1) {
		t.Errorf("config map %v %v", m, err)
	}
	if err := h.Stop(ctx, WithStopTimeout(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle.stop", f.last(t).Args, `{"name": "box", "timeout": 5}`)
	if err := h.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle.kill", f.last(t).Args, `{"name": "box"}`)
	for name, fn := range map[string]func(context.Context) error{
		"handle.drain": h.Drain, "handle.pause": h.Pause, "handle.resume": h.Resume, "remove": h.Remove,
	} {
		if err := fn(ctx); err != nil || f.last(t).Method != name {
			t.Errorf("%s: %v", name, err)
		}
		sameJSON(t, name, f.last(t).Args, `{"name": "box"}`)
	}
	res, err := h.WaitUntilStopped(ctx)
	if err != nil || res.Status != SandboxStatusCrashed || res.ExitCode != nil || res.Signal == nil || *res.Signal != 9 {
		t.Errorf("wait_until_stopped %+v %v", res, err)
	}
	sb, err := h.Start(ctx)
	disarm(t, sb)
	if err != nil || f.last(t).Method != "start" {
		t.Fatal(err)
	}
	sb2, err := h.Connect(ctx)
	disarm(t, sb2)
	if err != nil || f.last(t).Method != "connect" {
		t.Fatal(err)
	}

	list, err := ListSandboxes(ctx)
	if err != nil || len(list) != 1 || list[0].Name() != "box" {
		t.Fatalf("list %v %v", list, err)
	}
	sameJSON(t, "list", f.last(t).Args, `{}`)
	filter := NewSandboxFilter().WithLabels(map[string]string{"user.id": "alice"}).WithLabel("team", "x").WithStatus(SandboxStatusRunning)
	if _, err := ListSandboxesWith(ctx, filter); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "list filtered", f.last(t).Args, `{"labels": {"user.id": "alice", "team": "x"}, "status": "running"}`)
	base := NewSandboxFilter().WithLabel("a", "1")
	_ = base.WithLabel("b", "2")
	if len(base.Labels()) != 1 {
		t.Error("WithLabels changed its receiver")
	}
}

func TestSetup(t *testing.T) {
	installed := "false"
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "is_installed":
			return `{"ok":` + installed + `}`
		case "ensure_installed":
			return `{"ok":null}`
		case "version":
			return `{"ok":{"sdk":"0.1.0"}}`
		}
		return `{"error":{"kind":"internal","message":"?"}}`
	})
	ctx := context.Background()
	if IsInstalled() {
		t.Error("installed")
	}
	err := EnsureInstalled(ctx, WithSkipDownload())
	if !errors.Is(err, ErrNotInstalled) {
		t.Errorf("skip download, missing: %v", err)
	}
	for _, m := range f.methods() {
		if m == "ensure_installed" {
			t.Error("WithSkipDownload built")
		}
	}
	installed = "true"
	if err := EnsureInstalled(ctx, WithSkipDownload()); err != nil || !IsInstalled() {
		t.Errorf("installed: %v", err)
	}
	if err := EnsureInstalled(ctx); err != nil || f.last(t).Method != "ensure_installed" {
		t.Errorf("ensure: %v", err)
	}
	if v, err := RuntimeVersion(); err != nil || v != "0.1.0" {
		t.Errorf("version %q %v", v, err)
	}
}

func TestReadmeHoldsTheExample(t *testing.T) {
	src, err := os.ReadFile("example/main.go")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "```go\n"+string(src)+"```\n") {
		t.Error("README.md does not hold example/main.go verbatim in a ```go block")
	}
}
