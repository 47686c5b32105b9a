package microsandbox

// End-to-end tests: they boot real VMs (default busybox root, the guest network
// disabled; the SSH endpoint listens on 127.0.0.1) and run only with MSB_E2E=1. They
// reach no network: the runtime must be installed already (scripts/setup; the tests
// check with EnsureInstalled(ctx, WithSkipDownload()) and build nothing). Their state
// lives in a private MSB_HOME (TestMain). From go/,
// after scripts/build-ffi --debug (scripts/test-go runs them this way):
//
//	MSB_E2E=1 MSB_VMM=$PWD/../target/debug/msb-vmm go test -run E2E -v -timeout 40m ./...

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestMain gives the end-to-end tests a private state directory (MSB_HOME, mode 0700,
// removed at the end), so they neither see nor leave anything in the user's
// ~/.microsandbox; the example they run inherits it.
func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	if os.Getenv("MSB_E2E") == "1" {
		home, err := os.MkdirTemp("", "msb-go-e2e-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e: a private MSB_HOME:", err)
			return 1
		}
		defer os.RemoveAll(home)
		if err := os.Setenv("MSB_HOME", home); err != nil {
			fmt.Fprintln(os.Stderr, "e2e: MSB_HOME:", err)
			return 1
		}
	}
	return m.Run()
}

func e2e(t *testing.T) {
	t.Helper()
	if os.Getenv("MSB_E2E") != "1" {
		t.Skip("end-to-end test: set MSB_E2E=1 (boots VMs)")
	}
}

// hostKind says how this host runs VMs: PVM (the kvm_pvm module, KVM without hardware
// virtualisation) or hardware KVM.
func hostKind() string {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return "PVM (/sys/module/kvm_pvm exists)"
	}
	return "hardware KVM (no /sys/module/kvm_pvm)"
}

// step logs how long each part of the flow took.
func step(t *testing.T, what string, start *time.Time) {
	t.Helper()
	t.Logf("%-28s %6.1fs", what, time.Since(*start).Seconds())
	*start = time.Now()
}

func TestE2ESandboxFlow(t *testing.T) {
	e2e(t)
	ctx, cancel := context.WithTimeout(context.Background(), 35*time.Minute)
	defer cancel()
	t.Logf("host: %s", hostKind())
	t0 := time.Now()
	at := time.Now()

	// Check only: without WithSkipDownload, EnsureInstalled would build what is missing
	// (cargo, and apt-get for the guest kernel's build: the network).
	if err := EnsureInstalled(ctx, WithSkipDownload()); err != nil {
		t.Fatalf("the runtime is not installed (run scripts/setup; this test builds nothing): %v", err)
	}
	if !IsInstalled() {
		t.Fatal("IsInstalled false after EnsureInstalled")
	}
	if v, err := RuntimeVersion(); err != nil || v != SDKVersion() {
		t.Fatalf("RuntimeVersion %q %v, SDK %q", v, err, SDKVersion())
	}
	step(t, "EnsureInstalled", &at)

	name := fmt.Sprintf("go-e2e-%d-%d", os.Getpid(), time.Now().UnixNano()%1000000)
	runID := fmt.Sprint(time.Now().UnixNano())
	snapName := name + "-snap"
	snapTaken := false
	defer func() {
		if snapTaken { // the flow failed between taking and removing it
			c, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := RemoveSnapshot(c, snapName); err != nil {
				t.Errorf("cleanup: RemoveSnapshot: %v", err)
			}
		}
	}()
	if _, err := GetSandbox(ctx, name); !errors.Is(err, ErrSandboxNotFound) {
		t.Fatalf("GetSandbox before create: %v", err)
	}

	sb, err := CreateSandbox(ctx, name,
		WithMemory(512),
		WithCPUs(1),
		WithNetwork(NetworkPolicy.Disabled()),
		WithEnv(map[string]string{"GREETING": "hello"}),
		WithLabel("go-e2e-run", runID),
	)
	if err != nil {
		t.Fatalf("CreateSandbox: %v", err)
	}
	step(t, "CreateSandbox (boot)", &at)
	// Whatever happens, leave nothing behind.
	defer func() {
		_ = sb.Close()
		c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if h, err := GetSandbox(c, name); err == nil {
			if h.Status() == SandboxStatusRunning {
				_ = h.Kill(c)
			}
			if err := RemoveSandbox(c, name); err != nil {
				t.Errorf("cleanup: RemoveSandbox: %v", err)
			}
		}
	}()

	if sb.Name() != name {
		t.Errorf("Name() = %q", sb.Name())
	}
	if owns, err := sb.OwnsLifecycle(); err != nil || !owns {
		t.Errorf("OwnsLifecycle = %v, %v", owns, err)
	}
	h, err := GetSandbox(ctx, name)
	if err != nil {
		t.Fatalf("GetSandbox: %v", err)
	}
	if h.Status() != SandboxStatusRunning || h.Labels()["go-e2e-run"] != runID || h.CreatedAt().IsZero() {
		t.Errorf("handle: status %q labels %v created %v", h.Status(), h.Labels(), h.CreatedAt())
	}
	if cfg, err := h.Config(); err != nil {
		t.Errorf("SandboxHandle.Config: %v", err)
	} else if cfg.Name != name || cfg.MemoryMiB != 512 || cfg.CPUs != 1 || cfg.Image != "" ||
		cfg.Env["GREETING"] != "hello" || cfg.Labels["go-e2e-run"] != runID ||
		cfg.Network == nil || cfg.Network.Enabled == nil || *cfg.Network.Enabled {
		t.Errorf("SandboxHandle.Config: %+v (stored %s)", cfg, h.ConfigJSON())
	}
	if out, err := sb.Shell(ctx, "ls /sys/class/net"); err != nil || out.Stdout() != "lo\n" {
		t.Errorf("network interfaces of a sandbox without network: %q, %v", out.Stdout(), err)
	}
	listed, err := ListSandboxesWith(ctx, NewSandboxFilter().WithLabels(map[string]string{"go-e2e-run": runID}))
	if err != nil || len(listed) != 1 || listed[0].Name() != name {
		t.Errorf("ListSandboxesWith(label) = %d entries, %v", len(listed), err)
	}
	if err := RemoveSandbox(ctx, name); !errors.Is(err, ErrSandboxStillRunning) {
		t.Errorf("RemoveSandbox while running: %v", err)
	}

	out, err := sb.Shell(ctx, `echo "shell-out $GREETING"; echo shell-err >&2; exit 3`)
	if err != nil {
		t.Fatalf("Shell: %v", err)
	}
	if out.Stdout() != "shell-out hello\n" || out.Stderr() != "shell-err\n" || out.ExitCode() != 3 || out.Success() {
		t.Errorf("Shell: stdout %q stderr %q code %d success %v", out.Stdout(), out.Stderr(), out.ExitCode(), out.Success())
	}
	step(t, "Shell", &at)

	out, err = sb.Exec(ctx, "sh", []string{"-c", `echo "$FOO"; pwd; cat`},
		WithExecEnv(map[string]string{"FOO": "bar"}),
		WithExecCwd("/tmp"),
		WithExecStdin([]byte("from-stdin")),
	)
	if err != nil {
		t.Fatalf("Exec: %v", err)
	}
	if out.Stdout() != "bar\n/tmp\nfrom-stdin" || !out.Success() {
		t.Errorf("Exec: stdout %q stderr %q code %d", out.Stdout(), out.Stderr(), out.ExitCode())
	}
	if _, err := sb.Exec(ctx, "/no/such/program", nil); !errors.Is(err, ErrCommandNotFound) {
		t.Errorf("Exec of a missing program: %v", err)
	}
	step(t, "Exec", &at)

	payload := []byte("written by the Go e2e test\x00\xff\n")
	fsys := sb.FS()
	if err := fsys.Write(ctx, "/root/go-e2e.bin", payload); err != nil {
		t.Fatalf("FS Write: %v", err)
	}
	got, err := fsys.Read(ctx, "/root/go-e2e.bin")
	if err != nil || !bytes.Equal(got, payload) {
		t.Errorf("FS Read = %q, %v", got, err)
	}
	if ok, err := fsys.Exists(ctx, "/root/go-e2e.bin"); err != nil || !ok {
		t.Errorf("FS Exists = %v, %v", ok, err)
	}
	if st, err := fsys.Stat(ctx, "/root/go-e2e.bin"); err != nil || st.Size != int64(len(payload)) || st.Kind != FsEntryKindFile {
		t.Errorf("FS Stat = %+v, %v", st, err)
	}
	entries, err := fsys.List(ctx, "/root")
	found := false
	for _, e := range entries {
		found = found || e.Name == "go-e2e.bin"
	}
	if err != nil || !found {
		t.Errorf("FS List /root = %+v, %v", entries, err)
	}
	if _, err := fsys.Read(ctx, "/root/missing"); !errors.Is(err, ErrFilesystem) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("FS Read of a missing file: %v", err)
	}
	step(t, "FS", &at)

	stream, err := sb.ShellStream(ctx, "echo one; echo two >&2; exit 5")
	if err != nil {
		t.Fatalf("ShellStream: %v", err)
	}
	var kinds []ExecEventKind
	var streamed string
	exitCode := -100
	for {
		ev, err := stream.Recv(ctx)
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		kinds = append(kinds, ev.Kind)
		switch ev.Kind {
		case ExecEventStdout, ExecEventStderr:
			streamed += string(ev.Data)
		case ExecEventExited:
			exitCode = ev.ExitCode
		}
		if ev.Kind == ExecEventDone {
			break
		}
	}
	if kinds[0] != ExecEventStarted || exitCode != 5 || !strings.Contains(streamed, "one\n") || !strings.Contains(streamed, "two\n") {
		t.Errorf("stream: events %v output %q exit %d", kinds, streamed, exitCode)
	}
	if err := stream.Close(); err != nil {
		t.Errorf("ExecHandle.Close: %v", err)
	}
	step(t, "ShellStream", &at)

	// A timed-out command's error carries what it printed before it was killed.
	_, err = sb.Shell(ctx, "echo before-timeout; sleep 60", WithExecTimeout(2*time.Second))
	var timeoutErr *Error
	if !errors.As(err, &timeoutErr) || timeoutErr.Kind != ErrExecTimeout || timeoutErr.Output == nil ||
		timeoutErr.Output.Stdout() != "before-timeout\n" {
		t.Errorf("Shell past WithExecTimeout: %#v", err)
	}

	// A Wait cancelled in the core spends the handle; Close is then fine (nil).
	waited, err := sb.ShellStream(ctx, "sleep 61")
	if err != nil {
		t.Fatalf("ShellStream: %v", err)
	}
	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	_, err = waited.Wait(wctx)
	wcancel()
	if !errors.Is(err, ErrCancelled) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait past its context: %v", err)
	}
	if _, err := waited.Recv(ctx); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("Recv after a cancelled Wait: %v", err)
	}
	if err := waited.Close(); err != nil {
		t.Errorf("Close after a cancelled Wait: %v", err)
	}
	// Close while another goroutine waits in Recv: the command is killed and that Recv
	// returns its exit.
	read, err := sb.ShellStream(ctx, "echo reading; sleep 62")
	if err != nil {
		t.Fatalf("ShellStream: %v", err)
	}
	events := make(chan *ExecEvent, 8)
	recvErr := make(chan error, 1)
	go func() {
		for {
			ev, err := read.Recv(ctx)
			if err != nil {
				recvErr <- err
				return
			}
			events <- ev
			if ev.Kind == ExecEventExited || ev.Kind == ExecEventDone {
				return
			}
		}
	}()
	firstOutput := time.After(30 * time.Second)
reading:
	for {
		select {
		case ev := <-events:
			if ev.Kind == ExecEventStdout {
				break reading // the reader's next Recv waits on the sleep
			}
			if ev.Kind == ExecEventExited || ev.Kind == ExecEventDone {
				t.Fatalf("the command ended early: %+v", ev)
			}
		case err := <-recvErr:
			t.Fatalf("Recv: %v", err)
		case <-firstOutput:
			t.Fatal("no output from the command")
		}
	}
	time.Sleep(500 * time.Millisecond)
	if err := read.Close(); err != nil {
		t.Errorf("Close during Recv: %v", err)
	}
	select {
	case ev := <-events:
		if ev.Kind != ExecEventExited || ev.Status.Success {
			t.Errorf("the reader's Recv after Close: %+v", ev)
		} else {
			signal := "none"
			if ev.Status.Signal != nil {
				signal = fmt.Sprint(*ev.Status.Signal)
			}
			t.Logf("the reader saw the command exit: code %d, signal %s", ev.ExitCode, signal)
		}
	case err := <-recvErr:
		t.Errorf("the reader's Recv after Close: %v", err)
	case <-time.After(30 * time.Second):
		t.Error("the reader's Recv did not return after Close")
	}
	// Neither command runs on.
	var left string
	for i := 0; i < 50; i++ {
		out, err := sb.Shell(ctx, "ps | grep -E '[s]leep 6[12]' || true")
		if err != nil {
			t.Fatalf("ps: %v", err)
		}
		if left = out.Stdout(); left == "" {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if left != "" {
		t.Errorf("commands of closed or spent handles still run:\n%s", left)
	}
	step(t, "exec timeout, Wait, Close", &at)

	m, err := sb.Metrics(ctx)
	if err != nil {
		t.Fatalf("Metrics: %v", err)
	}
	if m.MemoryLimitBytes == 0 || m.Uptime <= 0 || m.Status != SandboxStatusRunning || m.Timestamp.IsZero() {
		t.Errorf("Metrics: %+v", m)
	}
	all, err := AllSandboxMetrics(ctx)
	if err != nil || all[name] == nil {
		t.Errorf("AllSandboxMetrics: has %s = %v, %v", name, all[name] != nil, err)
	}
	if h, err := GetSandbox(ctx, name); err != nil {
		t.Errorf("GetSandbox for Metrics: %v", err)
	} else if hm, err := h.Metrics(ctx); err != nil {
		t.Errorf("SandboxHandle.Metrics: %v", err)
	} else if hm.MemoryLimitBytes != m.MemoryLimitBytes || hm.Status != SandboxStatusRunning || hm.Uptime <= 0 {
		t.Errorf("SandboxHandle.Metrics: %+v (Sandbox.Metrics had limit %d)", hm, m.MemoryLimitBytes)
	}
	step(t, "Metrics", &at)

	// SSH, in process: no port.
	client, err := sb.SSH().OpenClient(ctx)
	if err != nil {
		t.Fatalf("SSH().OpenClient: %v", err)
	}
	sshOut, err := client.Exec(ctx, "echo ssh-ok")
	if err != nil {
		t.Errorf("SSHClient.Exec: %v", err)
	} else if sshOut.StdoutString() != "ssh-ok\n" || sshOut.ExitStatus == nil || *sshOut.ExitStatus != 0 || !sshOut.Success() {
		t.Errorf("SSHClient.Exec: stdout %q stderr %q status %v signal %q",
			sshOut.Stdout, sshOut.Stderr, sshOut.ExitStatus, sshOut.ExitSignal)
	}
	if err := client.Close(); err != nil {
		t.Errorf("SSHClient.Close: %v", err)
	}
	if _, err := client.Exec(ctx, "true"); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("SSHClient.Exec after Close: %v", err)
	}
	step(t, "SSH in-process client", &at)

	// SSH, an endpoint on 127.0.0.1, asked for with no key authorised (its own client
	// brings one). The core refuses that (ErrInvalidConfig: "an SSH endpoint needs at
	// least one authorized key", though docs/bindings.md has authorized_keys optional);
	// then it is asked for with one key.
	ep, err := sb.SSH().Server(ctx)
	if errors.Is(err, ErrInvalidConfig) {
		t.Logf("SSH().Server with no key: %v; again with one", err)
		ep, err = sb.SSH().Server(ctx, WithAuthorizedKeys(testSSHKey()))
	}
	if err != nil {
		t.Fatalf("SSH().Server: %v", err)
	}
	t.Logf("SSH endpoint %s, host key %s", ep.Addr(), ep.Fingerprint())
	if ep.Port() == 0 || ep.Addr() != fmt.Sprintf("127.0.0.1:%d", ep.Port()) ||
		!strings.HasPrefix(ep.Fingerprint(), "SHA256:") || !strings.HasPrefix(ep.HostKey(), "ssh-ed25519 ") ||
		!strings.HasPrefix(ep.KnownHostsLine(), fmt.Sprintf("[127.0.0.1]:%d ssh-ed25519 ", ep.Port())) {
		t.Errorf("endpoint: addr %q port %d host key %q fingerprint %q known_hosts %q",
			ep.Addr(), ep.Port(), ep.HostKey(), ep.Fingerprint(), ep.KnownHostsLine())
	}
	if err := ep.Authorize(ctx, testSSHKey()); err != nil {
		t.Errorf("SSHEndpoint.Authorize: %v", err)
	}
	if err := ep.Authorize(ctx, "not a key"); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("SSHEndpoint.Authorize of a malformed key: %v", err)
	}
	epClient, err := ep.OpenClient(ctx, "root")
	if err != nil {
		t.Errorf("SSHEndpoint.OpenClient: %v", err)
	} else {
		out, err := epClient.Exec(ctx, "echo over-tcp $(id -u)")
		if err != nil || out.StdoutString() != "over-tcp 0\n" || out.ExitCode() != 0 {
			t.Errorf("endpoint client Exec: %+v, %v", out, err)
		}
		if err := epClient.Close(); err != nil {
			t.Errorf("endpoint client Close: %v", err)
		}
	}
	if err := ep.Shutdown(ctx); err != nil {
		t.Errorf("SSHEndpoint.Shutdown: %v", err)
	}
	if err := ep.Close(); err != nil {
		t.Errorf("SSHEndpoint.Close after Shutdown: %v", err)
	}
	step(t, "SSH endpoint", &at)

	// Attach needs a terminal on stdin; go test gives the test binary none.
	if isTerminal, known := stdinTerminal(); known && !isTerminal {
		if code, err := sb.Attach(ctx, "sh", "-c", "exit 0"); !errors.Is(err, ErrNotATerminal) {
			t.Errorf("Attach without a terminal: %d, %v", code, err)
		}
		if code, err := sb.AttachShell(ctx); !errors.Is(err, ErrNotATerminal) {
			t.Errorf("AttachShell without a terminal: %d, %v", code, err)
		}
	} else {
		t.Logf("stdin may be a terminal: the Attach check is skipped")
	}
	step(t, "Attach (no terminal)", &at)

	// A command outliving its context: the call ends promptly with the context's error.
	cctx, ccancel := context.WithTimeout(ctx, 3*time.Second)
	start := time.Now()
	_, err = sb.Shell(cctx, "sleep 120")
	ccancel()
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrCancelled) {
		t.Errorf("Shell past its context: %v", err)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("cancellation took %s", d)
	}
	if out, err := sb.Shell(ctx, "echo still-alive"); err != nil || out.Stdout() != "still-alive\n" {
		t.Errorf("Shell after a cancelled call: %v", err)
	}
	step(t, "cancellation", &at)

	code, err := sb.StopAndWait(ctx)
	if err != nil {
		t.Fatalf("StopAndWait: %v", err)
	}
	t.Logf("StopAndWait exit code %d", code)
	if h, err := GetSandbox(ctx, name); err != nil || h.Status() != SandboxStatusStopped {
		t.Errorf("after StopAndWait: status %v, %v", h, err)
	} else {
		reason, _ := h.ExitReason()
		t.Logf("stopped handle: exit reason %q, updated %v", reason, h.UpdatedAt())
	}
	if err := sb.Close(); err != nil {
		t.Errorf("Close after stop: %v", err)
	}
	if err := sb.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("second Close: %v", err)
	}
	step(t, "StopAndWait", &at)

	// A snapshot of the stopped sandbox, listed, then removed.
	stopped, err := GetSandbox(ctx, name)
	if err != nil {
		t.Fatalf("GetSandbox for Snapshot: %v", err)
	}
	snap, err := stopped.Snapshot(ctx, snapName)
	if err != nil {
		t.Errorf("SandboxHandle.Snapshot: %v", err)
	} else {
		snapTaken = true
		t.Logf("snapshot %s at %s: image %q, %d bytes, %s", snap.Name, snap.Path, snap.Image, snap.SizeBytes, snap.Digest)
		if snap.Name != snapName || snap.SourceSandbox != name || snap.Path == "" ||
			!strings.HasPrefix(snap.Digest, "sha256:") || snap.CreatedAt.IsZero() || time.Since(snap.CreatedAt) > time.Hour {
			t.Errorf("snapshot: %+v", snap)
		}
		snaps, err := ListSnapshots(ctx)
		listed := false
		for _, s := range snaps {
			listed = listed || (s.Name == snapName && s.Digest == snap.Digest)
		}
		if err != nil || !listed {
			t.Errorf("ListSnapshots lacks %s: %d entries, %v", snapName, len(snaps), err)
		}
		if got, err := GetSnapshot(ctx, snap.Path); err != nil || got.Name != snapName || got.Digest != snap.Digest {
			t.Errorf("GetSnapshot by path: %+v, %v", got, err)
		}
		if err := RemoveSnapshot(ctx, snapName); err != nil {
			t.Errorf("RemoveSnapshot: %v", err)
		} else {
			snapTaken = false
		}
		if _, err := GetSnapshot(ctx, snapName); err == nil {
			t.Error("GetSnapshot after RemoveSnapshot found it")
		} else {
			t.Logf("GetSnapshot after RemoveSnapshot: %v", err)
		}
	}
	step(t, "Snapshot, list, remove", &at)

	sb2, err := StartSandbox(ctx, name)
	if err != nil {
		t.Fatalf("StartSandbox: %v", err)
	}
	sb = sb2 // the cleanup closes this one
	step(t, "StartSandbox (boot)", &at)
	if out, err := sb2.Shell(ctx, `echo "again $GREETING"`); err != nil || out.Stdout() != "again hello\n" {
		t.Errorf("Shell after restart: %v %q", err, out.Stdout())
	}
	if got, err := sb2.FS().Read(ctx, "/root/go-e2e.bin"); err != nil || !bytes.Equal(got, payload) {
		t.Errorf("file written before the restart: %q, %v", got, err)
	}

	logs, err := sb2.Logs(ctx, LogOptions{})
	if err != nil {
		t.Fatalf("Logs: %v", err)
	}
	var stdout, stderr string
	for _, e := range logs {
		switch e.Source {
		case LogSourceStdout:
			stdout += e.Text()
		case LogSourceStderr:
			stderr += e.Text()
		}
	}
	for _, want := range []string{"shell-out hello\n", "bar\n/tmp\nfrom-stdin", "one\n", "again hello\n"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("Logs: stdout lacks %q; have %q", want, stdout)
		}
	}
	if !strings.Contains(stderr, "shell-err\n") {
		t.Errorf("Logs: stderr lacks shell-err; have %q", stderr)
	}
	tail, err := sb2.Logs(ctx, LogOptions{Tail: 1, Sources: []LogSource{LogSourceStdout}})
	if err != nil || len(tail) != 1 || tail[0].Text() != "again hello\n" {
		t.Errorf("Logs tail 1: %+v, %v", tail, err)
	}
	step(t, "Logs", &at)

	if err := sb2.Stop(ctx, WithStopTimeout(30*time.Second)); err != nil {
		t.Errorf("Stop: %v", err)
	}
	if err := sb2.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if h, err := GetSandbox(ctx, name); err != nil || h.Status() != SandboxStatusStopped {
		t.Errorf("after Stop: %v, %v", h, err)
	}
	if err := RemoveSandbox(ctx, name); err != nil {
		t.Fatalf("RemoveSandbox: %v", err)
	}
	if _, err := GetSandbox(ctx, name); !errors.Is(err, ErrSandboxNotFound) {
		t.Errorf("GetSandbox after remove: %v", err)
	}
	step(t, "Stop, Close, Remove", &at)
	t.Logf("total %.1fs", time.Since(t0).Seconds())
}

// TestE2ECreateWithProgress creates a sandbox through a PullSession (the default root
// pulls nothing, so there are no events), and cancels a second create by closing its
// session before the result: no sandbox of that name is left running.
func TestE2ECreateWithProgress(t *testing.T) {
	e2e(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	at := time.Now()
	name := fmt.Sprintf("go-e2e-progress-%d", os.Getpid())
	opts := []SandboxOption{WithMemory(256), WithNetwork(NetworkPolicy.Disabled())}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		for _, n := range []string{name, name + "-cancelled"} {
			if h, err := GetSandbox(c, n); err == nil {
				_ = h.Kill(c)
				_ = RemoveSandbox(c, n)
			}
		}
	}()
	p, err := CreateSandboxWithProgress(ctx, name, opts...)
	if err != nil {
		t.Fatalf("CreateSandboxWithProgress: %v", err)
	}
	var events []*PullEvent
	for {
		ev, err := p.Recv(ctx)
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if ev == nil {
			break
		}
		events = append(events, ev)
	}
	if len(events) != 0 {
		t.Errorf("the default root pulled something: %+v", events)
	}
	sb, err := p.Result(ctx)
	if err != nil {
		t.Fatalf("Result: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("Close after Result: %v", err)
	}
	step(t, "CreateSandboxWithProgress", &at)
	out, err := sb.Shell(ctx, "echo booted-with-progress")
	if err != nil || out.Stdout() != "booted-with-progress\n" {
		t.Errorf("Shell: %q, %v", out.Stdout(), err)
	}
	if code, err := sb.StopAndWait(ctx); err != nil || code != 0 {
		t.Errorf("StopAndWait: %d, %v", code, err)
	}
	_ = sb.Close()
	if err := RemoveSandbox(ctx, name); err != nil {
		t.Errorf("RemoveSandbox: %v", err)
	}
	step(t, "Shell, StopAndWait, Remove", &at)

	// Closing the session before Result cancels the create.
	p, err = CreateSandboxWithProgress(ctx, name+"-cancelled", opts...)
	if err != nil {
		t.Fatalf("CreateSandboxWithProgress: %v", err)
	}
	time.Sleep(2 * time.Second) // into the boot
	if err := p.Close(); err != nil {
		t.Errorf("Close before Result: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		h, err := GetSandbox(ctx, name+"-cancelled")
		if errors.Is(err, ErrSandboxNotFound) {
			t.Logf("the cancelled create left no sandbox")
			break
		}
		if err != nil {
			t.Fatalf("GetSandbox: %v", err)
		}
		if h.Status() != SandboxStatusRunning {
			t.Logf("the cancelled create left a sandbox %s", h.Status())
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cancelled create is still running 30 s after Close")
		}
		time.Sleep(500 * time.Millisecond)
	}
	step(t, "a create cancelled by Close", &at)
}

// TestE2EExample runs example/main.go (the README's program) as a user would.
func TestE2EExample(t *testing.T) {
	e2e(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, "go", "run", "./example")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("go run ./example: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
	t.Logf("example ran in %.1fs:\n%s", time.Since(start).Seconds(), stdout.String())
	for _, want := range []string{
		"hello from Linux\n", "piped in\n", "exit code 7, success false\n", "written from Go\n",
		"memory limit ", "stopped (exit code ", "log [stdout] hello from Linux\n", "removed go-example-",
	} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("example output lacks %q", want)
		}
	}
}
