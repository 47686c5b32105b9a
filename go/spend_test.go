package microsandbox

// The calls that consume a handle (the core takes the object out of its table as the
// call starts): what is left of the handle after each outcome, and what Close does then.

import (
	"context"
	"errors"
	"testing"
)

// spendFake answers method with *answer (when it is "block": blocking until the call's
// context is done, see cancelInCore), release with *release, and the calls that make
// objects.
func spendFake(t *testing.T, method string, answer, release *string) *fakeCore {
	reached = make(chan struct{}, 1)
	return useFake(t, func(ctx context.Context, c recordedCall) string {
		switch c.Method {
		case method:
			if *answer == "block" {
				reached <- struct{}{}
				return blockUntilCancelled(ctx, c)
			}
			return *answer
		case "release":
			return *release
		case "sandbox.exec_stream":
			return `{"ok":{"exec":21}}`
		case "exec.recv":
			return `{"ok":null}`
		case "sandbox.metrics":
			return `{"error":{"kind":"internal","message":"unused"}}`
		case "ssh.serve":
			return sshServeAnswer
		}
		return `{"error":{"kind":"internal","message":"fake: unexpected method ` + c.Method + `"}}`
	})
}

// reached receives once a "block" call is in the fake core.
var reached chan struct{}

// cancelInCore returns a context that is cancelled once a call blocks in the fake core
// (so the cancel is seen there, not before the call).
func cancelInCore() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-reached
		cancel()
	}()
	return ctx
}

// callsAfter returns the methods called since n calls.
func callsAfter(f *fakeCore, n int) []string { return f.methods()[n:] }

func TestExecWaitOutcomes(t *testing.T) {
	const ok = `{"ok":null}`
	const gone = `{"error":{"kind":"invalid_handle","message":"handle 21 does not name an object"}}`
	answer, rel := "", ok
	f := spendFake(t, "exec.wait", &answer, &rel)
	sb := testSandbox(t, 11)
	ctx := context.Background()
	start := func() *ExecHandle {
		h, err := sb.ExecStream(ctx, "sleep", []string{"9"})
		disarm(t, h)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}

	// Refused before the take: the handle stays, and works.
	answer = `{"error":{"kind":"invalid_argument","message":"exec.wait: unknown argument"}}`
	h := start()
	if _, err := h.Wait(ctx); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("wait: %v", err)
	}
	if _, err := h.Recv(ctx); err != nil {
		t.Errorf("recv after a refused wait: %v", err)
	}
	n := len(f.all())
	if err := h.Close(); err != nil || len(f.all()) != n+1 || f.last(t).Method != "release" {
		t.Errorf("close after a refused wait: %v, calls %v", err, callsAfter(f, n))
	}

	// A context done before the call: the core never sees it, the handle stays.
	h = start()
	done, cancel := context.WithCancel(ctx)
	cancel()
	n = len(f.all())
	if _, err := h.Wait(done); !errors.Is(err, context.Canceled) || len(f.all()) != n {
		t.Fatalf("wait with a done context: %v, calls %v", err, callsAfter(f, n))
	}
	answer = `{"ok":{"exit_code":0,"success":true,"signal":null,"timed_out":false}}`
	if code, err := h.Wait(ctx); err != nil || code != 0 {
		t.Errorf("wait after a done context: %d %v", code, err)
	}
	n = len(f.all())
	if err := h.Close(); err != nil || len(f.all()) != n {
		t.Errorf("close after wait: %v, calls %v", err, callsAfter(f, n))
	}

	// Failed after the take: spent, nothing to release, Close is nil without a call.
	answer = `{"error":{"kind":"connection_closed","message":"the sandbox went away"}}`
	h = start()
	if _, err := h.Wait(ctx); !errors.Is(err, ErrConnectionClosed) {
		t.Fatalf("wait: %v", err)
	}
	n = len(f.all())
	if _, err := h.Recv(ctx); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("recv after a failed wait: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("close after a failed wait: %v", err)
	}
	if err := h.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("a spent handle reached the core: %v", callsAfter(f, n))
	}

	// Cancelled in the core: taken or not, unknown. The handle is spent for calls;
	// Close releases it, and an invalid_handle answer (it was taken) is no error.
	for _, relAnswer := range []string{gone, ok} {
		answer, rel = "block", relAnswer
		h = start()
		if _, err := h.WaitStatus(cancelInCore()); !errors.Is(err, ErrCancelled) || !errors.Is(err, context.Canceled) {
			t.Fatalf("wait: %v", err)
		}
		n = len(f.all())
		if _, err := h.Recv(ctx); !errors.Is(err, ErrInvalidHandle) || len(f.all()) != n {
			t.Errorf("recv after a cancelled wait: %v, calls %v", err, callsAfter(f, n))
		}
		if err := h.Close(); err != nil {
			t.Errorf("close after a cancelled wait (release answers %s): %v", relAnswer, err)
		}
		if got := callsAfter(f, n); len(got) != 1 || got[0] != "release" {
			t.Errorf("close after a cancelled wait: calls %v", got)
		}
		if err := h.Close(); err != nil || len(f.all()) != n+1 {
			t.Errorf("second close: %v, calls %v", err, callsAfter(f, n))
		}
	}
}

func TestExecCollectOutcomes(t *testing.T) {
	answer, rel := `{"error":{"kind":"connection_closed","message":"the sandbox went away"}}`, `{"ok":null}`
	f := spendFake(t, "exec.collect", &answer, &rel)
	sb := testSandbox(t, 11)
	ctx := context.Background()
	h, err := sb.ExecStream(ctx, "sleep", []string{"9"})
	disarm(t, h)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Collect(ctx); !errors.Is(err, ErrConnectionClosed) {
		t.Fatalf("collect: %v", err)
	}
	n := len(f.all())
	if _, err := h.Collect(ctx); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("collect after a failed collect: %v", err)
	}
	if err := h.Close(); err != nil || len(f.all()) != n {
		t.Errorf("close after a failed collect: %v, calls %v", err, callsAfter(f, n))
	}

	// Busy (another call holds the command): nothing changed.
	answer = `{"error":{"kind":"busy","message":"handle 21 is in use by another call"}}`
	h, err = sb.ExecStream(ctx, "sleep", []string{"9"})
	disarm(t, h)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Collect(ctx); !errors.Is(err, ErrBusy) {
		t.Fatalf("collect: %v", err)
	}
	answer = `{"ok":{"exit_code":0,"success":true,"signal":null,"timed_out":false,"stdout_b64":"aGkK","stderr_b64":""}}`
	if out, err := h.Collect(ctx); err != nil || out.Stdout() != "hi\n" {
		t.Errorf("collect after busy: %v", err)
	}
}

func TestExecTimeoutErrorOutput(t *testing.T) {
	useFake(t, answers(map[string]string{
		"sandbox.shell": `{"error":{"kind":"exec_timeout","message":"timed out",` +
			`"output":{"exit_code":-1,"success":false,"signal":null,"timed_out":true,"stdout_b64":"b25lCg==","stderr_b64":""}}}`,
		"sandbox.exec": `{"error":{"kind":"exec_timeout","message":"timed out",` +
			`"output":{"exit_code":-1,"success":false,"signal":null,"timed_out":true,"stdout_b64":"!!","stderr_b64":""}}}`,
		"fs.read": `{"error":{"kind":"filesystem","message":"gone","fs_kind":"not_found"}}`,
	}))
	sb := testSandbox(t, 11)
	ctx := context.Background()
	_, err := sb.Shell(ctx, "echo one; sleep 9", WithExecTimeout(1e9))
	var e *Error
	if !errors.As(err, &e) || !errors.Is(err, ErrExecTimeout) || e.Output == nil || e.Output.Stdout() != "one\n" ||
		e.Output.Stderr() != "" || !e.Output.Status().TimedOut || e.Output.ExitCode() != -1 {
		t.Fatalf("shell: %#v", err)
	}
	// Unreadable output: the error keeps its kind, says so, and has no Output.
	_, err = sb.Exec(ctx, "x", nil)
	if !errors.As(err, &e) || e.Kind != ErrExecTimeout || e.Output != nil || e.Message == "timed out" {
		t.Errorf("exec: %#v", err)
	}
	_, err = sb.FS().Read(ctx, "/x")
	if !errors.As(err, &e) || e.Output != nil {
		t.Errorf("other kinds have no output: %#v", err)
	}
}

func TestSandboxDetachOutcomes(t *testing.T) {
	answer, rel := "", `{"ok":null}`
	f := spendFake(t, "sandbox.detach", &answer, &rel)
	ctx := context.Background()

	// Busy: another call holds the sandbox; the core left it, so does Go.
	answer = `{"error":{"kind":"busy","message":"handle 11 is in use by another call"}}`
	sb := testSandbox(t, 11)
	if err := sb.Detach(ctx); !errors.Is(err, ErrBusy) {
		t.Fatalf("detach: %v", err)
	}
	n := len(f.all())
	if err := sb.Close(); err != nil || len(f.all()) != n+1 || f.last(t).Method != "release" {
		t.Errorf("close after a busy detach: %v, calls %v", err, callsAfter(f, n))
	}

	// A context done before the call: nothing reached the core.
	sb = testSandbox(t, 12)
	done, cancel := context.WithCancel(ctx)
	cancel()
	n = len(f.all())
	if err := sb.Detach(done); !errors.Is(err, context.Canceled) || len(f.all()) != n {
		t.Fatalf("detach with a done context: %v, calls %v", err, callsAfter(f, n))
	}
	answer = `{"ok":null}`
	if err := sb.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	n = len(f.all())
	// The reference: after Detach, Close returns ErrInvalidHandle (and so does a second
	// Close); neither reaches the core.
	if err := sb.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("close after detach: %v", err)
	}
	if err := sb.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("second close after detach: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("calls %v", callsAfter(f, n))
	}

	// Failed after the take: the core dropped the sandbox; Close is nil, once.
	answer = `{"error":{"kind":"not_running","message":"sandbox box is not running"}}`
	sb = testSandbox(t, 13)
	if err := sb.Detach(ctx); !errors.Is(err, ErrSandboxNotRunning) {
		t.Fatalf("detach: %v", err)
	}
	n = len(f.all())
	if _, err := sb.Metrics(ctx); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("metrics after a failed detach: %v", err)
	}
	if err := sb.Close(); err != nil {
		t.Errorf("close after a failed detach: %v", err)
	}
	if err := sb.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("second close after a failed detach: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("a spent sandbox reached the core: %v", callsAfter(f, n))
	}

	// Cancelled in the core: Close releases what may be left; invalid_handle is no error.
	answer, rel = "block", `{"error":{"kind":"invalid_handle","message":"handle 14 does not name an object"}}`
	sb = testSandbox(t, 14)
	if err := sb.Detach(cancelInCore()); !errors.Is(err, ErrCancelled) {
		t.Fatalf("detach: %v", err)
	}
	n = len(f.all())
	if err := sb.Close(); err != nil {
		t.Errorf("close after a cancelled detach: %v", err)
	}
	if got := callsAfter(f, n); len(got) != 1 || got[0] != "release" {
		t.Errorf("close after a cancelled detach: calls %v", got)
	}
}

func TestRemovePersistedOutcomes(t *testing.T) {
	answer, rel := `{"error":{"kind":"sandbox_still_running","message":"box is running"}}`, `{"ok":null}`
	f := spendFake(t, "sandbox.remove_persisted", &answer, &rel)
	ctx := context.Background()
	sb := testSandbox(t, 11)
	if err := sb.RemovePersisted(ctx); !errors.Is(err, ErrSandboxStillRunning) {
		t.Fatalf("remove_persisted: %v", err)
	}
	sameJSON(t, "remove_persisted", f.last(t).Args, `{"handle": 11}`)
	n := len(f.all())
	if err := sb.Close(); err != nil || len(f.all()) != n {
		t.Errorf("close after a failed remove_persisted: %v, calls %v", err, callsAfter(f, n))
	}
	answer = `{"ok":null}`
	sb = testSandbox(t, 12)
	if err := sb.RemovePersisted(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sb.Close(); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("close after remove_persisted: %v", err)
	}
}

func TestSSHShutdownCancelledInTheCore(t *testing.T) {
	answer, rel := "block", `{"error":{"kind":"invalid_handle","message":"gone"}}`
	f := spendFake(t, "ssh.shutdown", &answer, &rel)
	ctx := context.Background()
	sb := testSandbox(t, 11)
	ep, err := sb.SSH().Server(ctx, WithAuthorizedKeys(testSSHKey()))
	disarm(t, ep)
	if err != nil {
		t.Fatal(err)
	}
	if err := ep.Shutdown(cancelInCore()); !errors.Is(err, ErrCancelled) {
		t.Fatalf("shutdown: %v", err)
	}
	n := len(f.all())
	if err := ep.Authorize(ctx, testSSHKey()); !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("authorize after a cancelled shutdown: %v", err)
	}
	if err := ep.Close(); err != nil {
		t.Errorf("close after a cancelled shutdown: %v", err)
	}
	if got := callsAfter(f, n); len(got) != 1 || got[0] != "release" {
		t.Errorf("close after a cancelled shutdown: calls %v", got)
	}
	if err := ep.Close(); err != nil || len(f.all()) != n+1 {
		t.Errorf("second close: %v, calls %v", err, callsAfter(f, n))
	}

	// An invalid_argument refusal leaves the endpoint as it was.
	answer = `{"error":{"kind":"invalid_argument","message":"ssh.shutdown: unknown argument"}}`
	ep2, err := sb.SSH().Server(ctx, WithAuthorizedKeys(testSSHKey()))
	disarm(t, ep2)
	if err != nil {
		t.Fatal(err)
	}
	if err := ep2.Shutdown(ctx); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("shutdown: %v", err)
	}
	answer = `{"ok":null}`
	if err := ep2.Shutdown(ctx); err != nil || f.last(t).Method != "ssh.shutdown" {
		t.Errorf("shutdown after a refused one: %v (%s)", err, f.last(t).Method)
	}
}
