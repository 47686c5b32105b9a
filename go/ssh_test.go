package microsandbox

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// testSSHKey is an OpenSSH public key line of a fixed ed25519 key.
func testSSHKey() string {
	pub := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)).Public().(ed25519.PublicKey)
	var blob []byte
	for _, part := range [][]byte{[]byte("ssh-ed25519"), pub} {
		blob = binary.BigEndian.AppendUint32(blob, uint32(len(part)))
		blob = append(blob, part...)
	}
	return "ssh-ed25519 " + base64.StdEncoding.EncodeToString(blob) + " go-test"
}

const sshServeAnswer = `{"ok":{"endpoint":61,"addr":"127.0.0.1:40022","port":40022,` +
	`"host_key":"ssh-ed25519 AAAAC3Nza host","fingerprint":"SHA256:abc",` +
	`"known_hosts_line":"[127.0.0.1]:40022 ssh-ed25519 AAAAC3Nza"}}`

func TestSSHClientCalls(t *testing.T) {
	execAnswer := `{"ok":{"stdout_b64":"c3NoLW9rCg==","stderr_b64":"ZQ==","exit_status":0,"exit_signal":null}}`
	closeAnswer := `{"ok":null}`
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "ssh.open_client":
			return `{"ok":{"client":51}}`
		case "ssh.exec":
			return execAnswer
		case "ssh.close":
			return closeAnswer
		}
		return `{"error":{"kind":"internal","message":"unexpected"}}`
	})
	ctx := context.Background()
	sb := testSandbox(t, 11)
	client, err := sb.SSH().OpenClient(ctx)
	disarm(t, client)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "open_client", f.last(t), `{"Method": "ssh.open_client", "Args": {"handle": 11}, "Raw": "{\"handle\":11}"}`)
	out, err := client.Exec(ctx, "echo ssh-ok")
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "exec", f.last(t).Args, `{"handle": 51, "command": "echo ssh-ok"}`)
	if f.last(t).Method != "ssh.exec" {
		t.Errorf("method %s", f.last(t).Method)
	}
	if string(out.Stdout) != "ssh-ok\n" || out.StdoutString() != "ssh-ok\n" || out.StderrString() != "e" ||
		out.ExitStatus == nil || *out.ExitStatus != 0 || out.ExitCode() != 0 || !out.Success() || out.ExitSignal != "" {
		t.Errorf("output %+v", out)
	}

	execAnswer = `{"ok":{"stdout_b64":"","stderr_b64":"","exit_status":null,"exit_signal":"KILL"}}`
	out, err = client.Exec(ctx, "kill -9 $$")
	if err != nil {
		t.Fatal(err)
	}
	if out.ExitStatus != nil || out.ExitCode() != -1 || out.Success() || out.ExitSignal != "KILL" || len(out.Stdout) != 0 {
		t.Errorf("signalled output %+v", out)
	}

	// A close refused while another call uses the client keeps the handle.
	closeAnswer = `{"error":{"kind":"busy","message":"handle 51 is in use by another call"}}`
	if err := client.Close(); !errors.Is(err, ErrBusy) {
		t.Errorf("busy close: %v", err)
	}
	closeAnswer = `{"ok":null}`
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "close", f.last(t), `{"Method": "ssh.close", "Args": {"handle": 51}, "Raw": "{\"handle\":51}"}`)
	n := len(f.all())
	if err := client.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	if _, err := client.Exec(ctx, "true"); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("exec after close: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("a closed client reached the core: %v", f.methods()[n:])
	}

	// A client the core no longer knows (its connection failed in close, say) is closed.
	c2, err := sb.SSH().OpenClient(ctx)
	disarm(t, c2)
	if err != nil {
		t.Fatal(err)
	}
	closeAnswer = `{"error":{"kind":"invalid_handle","message":"gone"}}`
	if err := c2.Close(); err != nil {
		t.Errorf("close of a vanished client: %v", err)
	}
	closeAnswer = `{"error":{"kind":"connection_closed","message":"disconnect: broken pipe"}}`
	c3, _ := sb.SSH().OpenClient(ctx)
	disarm(t, c3)
	if err := c3.Close(); !errors.Is(err, ErrConnectionClosed) {
		t.Errorf("failed close: %v", err)
	}
	n = len(f.all())
	if err := c3.Close(); err != nil || len(f.all()) != n {
		t.Errorf("close after a failed close: %v, calls %v", err, f.methods()[n:])
	}
}

func TestSSHServerCalls(t *testing.T) {
	f := useFake(t, answers(map[string]string{
		"ssh.serve":           sshServeAnswer,
		"ssh.authorize":       `{"ok":null}`,
		"ssh.endpoint_client": `{"ok":{"client":52}}`,
		"ssh.exec":            `{"ok":{"stdout_b64":"","stderr_b64":"","exit_status":3,"exit_signal":null}}`,
		"ssh.close":           `{"ok":null}`,
		"ssh.shutdown":        `{"ok":null}`,
	}))
	ctx := context.Background()
	sb := testSandbox(t, 11)
	ep, err := sb.SSH().Server(ctx)
	disarm(t, ep)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "serve", f.last(t), `{"Method": "ssh.serve", "Args": {"handle": 11}, "Raw": "{\"handle\":11}"}`)
	if ep.Addr() != "127.0.0.1:40022" || ep.Port() != 40022 || ep.HostKey() != "ssh-ed25519 AAAAC3Nza host" ||
		ep.Fingerprint() != "SHA256:abc" || ep.KnownHostsLine() != "[127.0.0.1]:40022 ssh-ed25519 AAAAC3Nza" {
		t.Errorf("endpoint %+v", ep)
	}

	ep2, err := sb.SSH().Server(ctx, WithSSHPort(2222),
		WithAuthorizedKeys("ssh-ed25519 AAAA1 a@b\n# a comment\n\n  ssh-rsa AAAA2 c@d  \n"),
		WithAuthorizedKeys("ssh-ed25519 AAAA3"))
	disarm(t, ep2)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "serve with options", f.last(t).Args, `{"handle": 11, "port": 2222,
	  "authorized_keys": ["ssh-ed25519 AAAA1 a@b", "ssh-rsa AAAA2 c@d", "ssh-ed25519 AAAA3"]}`)
	ep3, err := sb.SSH().Server(ctx, WithAuthorizedKeys(), WithSSHPort(0))
	disarm(t, ep3)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "serve with empty keys", f.last(t).Args, `{"handle": 11, "port": 0, "authorized_keys": []}`)

	if err := ep.Authorize(ctx, "ssh-ed25519 AAAA9 e@f"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "authorize", f.last(t), `{"Method": "ssh.authorize", "Args": {"handle": 61, "key": "ssh-ed25519 AAAA9 e@f"}, "Raw": "{\"handle\":61,\"key\":\"ssh-ed25519 AAAA9 e@f\"}"}`)
	client, err := ep.OpenClient(ctx, "root")
	disarm(t, client)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "endpoint_client", f.last(t), `{"Method": "ssh.endpoint_client", "Args": {"handle": 61, "user": "root"}, "Raw": "{\"handle\":61,\"user\":\"root\"}"}`)
	if client.endpoint != ep {
		t.Error("the client does not keep its endpoint reachable")
	}
	out, err := client.Exec(ctx, "exit 3")
	if err != nil || out.ExitCode() != 3 || out.Success() {
		t.Errorf("exec %+v %v", out, err)
	}
	sameJSON(t, "exec over the endpoint", f.last(t).Args, `{"handle": 52, "command": "exit 3"}`)
	c2, err := ep.OpenClient(ctx, "")
	disarm(t, c2)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "endpoint_client default user", f.last(t).Args, `{"handle": 61}`)

	if err := ep.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "shutdown", f.last(t), `{"Method": "ssh.shutdown", "Args": {"handle": 61}, "Raw": "{\"handle\":61}"}`)
	n := len(f.all())
	if err := ep.Shutdown(ctx); err != nil {
		t.Errorf("second shutdown: %v", err)
	}
	if err := ep.Close(); err != nil {
		t.Errorf("close after shutdown: %v", err)
	}
	if err := ep.Authorize(ctx, "k"); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("authorize after shutdown: %v", err)
	}
	if _, err := ep.OpenClient(ctx, "root"); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("open client after shutdown: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("a shut endpoint reached the core: %v", f.methods()[n:])
	}
	if err := ep2.Close(); err != nil || f.last(t).Method != "ssh.shutdown" {
		t.Errorf("close: %v %s", err, f.last(t).Method)
	}

	// A cancelled shutdown keeps the handle; the next one finishes it.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := ep3.Shutdown(cctx); !errors.Is(err, ErrCancelled) || !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled shutdown: %v", err)
	}
	if err := ep3.Shutdown(ctx); err != nil {
		t.Errorf("shutdown after a cancelled one: %v", err)
	}
	sameJSON(t, "shutdown ep3", f.last(t).Args, `{"handle": 61}`)
}

func TestAttachCalls(t *testing.T) {
	attach := `{"ok":0}`
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "sandbox.attach":
			return attach
		case "sandbox.attach_shell":
			return `{"ok":3}`
		}
		return `{"error":{"kind":"internal","message":"unexpected"}}`
	})
	ctx := context.Background()
	sb := testSandbox(t, 11)
	code, err := sb.Attach(ctx, "vi", "/etc/hosts", "-R")
	if err != nil || code != 0 {
		t.Errorf("attach %d %v", code, err)
	}
	sameJSON(t, "attach", f.last(t), `{"Method": "sandbox.attach", "Args": {"handle": 11, "cmd": "vi", "args": ["/etc/hosts", "-R"]},
	  "Raw": "{\"args\":[\"/etc/hosts\",\"-R\"],\"cmd\":\"vi\",\"handle\":11}"}`)
	attach = `{"ok":130}`
	if code, err := sb.Attach(ctx, "sh"); err != nil || code != 130 {
		t.Errorf("attach sh %d %v", code, err)
	}
	sameJSON(t, "attach without args", f.last(t).Args, `{"handle": 11, "cmd": "sh", "args": []}`)
	if code, err := sb.AttachShell(ctx); err != nil || code != 3 {
		t.Errorf("attach_shell %d %v", code, err)
	}
	sameJSON(t, "attach_shell", f.last(t), `{"Method": "sandbox.attach_shell", "Args": {"handle": 11}, "Raw": "{\"handle\":11}"}`)

	attach = `{"error":{"kind":"not_a_terminal","message":"stdin is not a terminal"}}`
	code, err = sb.Attach(ctx, "sh")
	if !errors.Is(err, ErrNotATerminal) || code != -1 {
		t.Errorf("not a terminal: %d %v", code, err)
	}
}

func TestRequestCalls(t *testing.T) {
	f := useFake(t, func(_ context.Context, c recordedCall) string {
		if c.Method == "get" {
			return handleInfoAnswer
		}
		if strings.Contains(c.Method, ".request_") {
			return `{"ok":null}`
		}
		return `{"error":{"kind":"internal","message":"unexpected"}}`
	})
	ctx := context.Background()
	sb := testSandbox(t, 11)
	h, err := GetSandbox(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		method string
		run    func(context.Context) error
		args   string
	}{
		{"sandbox.request_stop", sb.RequestStop, `{"handle": 11}`},
		{"sandbox.request_kill", sb.RequestKill, `{"handle": 11}`},
		{"sandbox.request_drain", sb.RequestDrain, `{"handle": 11}`},
		{"handle.request_stop", h.RequestStop, `{"name": "box"}`},
		{"handle.request_kill", h.RequestKill, `{"name": "box"}`},
		{"handle.request_drain", h.RequestDrain, `{"name": "box"}`},
	} {
		if err := c.run(ctx); err != nil {
			t.Errorf("%s: %v", c.method, err)
			continue
		}
		if got := f.last(t); got.Method != c.method {
			t.Errorf("method %s, want %s", got.Method, c.method)
		} else {
			sameJSON(t, c.method, got.Args, c.args)
		}
	}
}

func TestHandleMetrics(t *testing.T) {
	f := useFake(t, answers(map[string]string{"get": handleInfoAnswer, "handle.metrics": `{"ok":` + metricsJSON + `}`}))
	ctx := context.Background()
	h, err := GetSandbox(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	m, err := h.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle.metrics", f.last(t), `{"Method": "handle.metrics", "Args": {"name": "box"}, "Raw": "{\"name\":\"box\"}"}`)
	if m.CPUPercent != 12.5 || m.MemoryLimitBytes != 536870912 || m.Uptime.Seconds() != 1.5 || m.Status != SandboxStatusRunning ||
		m.MemoryHostResidentBytes == nil || *m.MemoryHostResidentBytes != 4096 || m.UpperUsedBytes != nil {
		t.Errorf("metrics %+v", m)
	}
}

func TestExecResize(t *testing.T) {
	f := useFake(t, answers(map[string]string{"sandbox.exec_stream": `{"ok":{"exec":21,"pid":9}}`, "exec.resize": `{"ok":null}`}))
	ctx := context.Background()
	h, err := testSandbox(t, 11).ExecStream(ctx, "top", nil, WithExecTTY())
	disarm(t, h)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Resize(ctx, 50, 132); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "resize", f.last(t), `{"Method": "exec.resize", "Args": {"handle": 21, "rows": 50, "cols": 132}, "Raw": "{\"cols\":132,\"handle\":21,\"rows\":50}"}`)
}

// The linked core knows every ssh.* method this package sends: with a handle it does
// not know, each answers invalid_handle (an unknown method would be invalid_argument).
func TestCoreKnowsSSHMethods(t *testing.T) {
	const unknown = uint64(1) << 52
	for _, c := range []struct {
		method string
		args   map[string]any
	}{
		{"ssh.open_client", nil},
		{"ssh.serve", map[string]any{"port": 0, "authorized_keys": []string{testSSHKey()}}},
		{"ssh.authorize", map[string]any{"key": testSSHKey()}},
		{"ssh.endpoint_client", map[string]any{"user": "root"}},
		{"ssh.shutdown", nil},
		{"ssh.exec", map[string]any{"command": "true"}},
		{"ssh.close", nil},
	} {
		args := map[string]any{"handle": unknown}
		for k, v := range c.args {
			args[k] = v
		}
		if err := call(context.Background(), c.method, args, nil); !errors.Is(err, ErrInvalidHandle) {
			t.Errorf("%s: %v", c.method, err)
		}
	}
	err := call(context.Background(), "ssh.authorize", map[string]any{"handle": unknown, "key": "not a key"}, nil)
	if !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("ssh.authorize with a malformed key: %v", err)
	}
	if err := call(context.Background(), "ssh.no_such_method", map[string]any{"handle": unknown}, nil); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("ssh.no_such_method: %v", err)
	}
}
