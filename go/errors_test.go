package microsandbox

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"testing"
	"time"
)

func TestErrorDecodingAndIs(t *testing.T) {
	useFake(t, answers(map[string]string{
		"get": `{"error":{"kind":"sandbox_not_found","message":"no sandbox named x"}}`,
	}))
	_, err := GetSandbox(context.Background(), "x")
	if err == nil {
		t.Fatal("no error")
	}
	if !errors.Is(err, ErrSandboxNotFound) {
		t.Errorf("errors.Is(err, ErrSandboxNotFound) = false for %v", err)
	}
	if errors.Is(err, ErrSandboxStillRunning) || errors.Is(err, ErrFilesystem) {
		t.Errorf("matches another kind: %v", err)
	}
	var e *Error
	if !errors.As(err, &e) || e.Kind != ErrSandboxNotFound || e.Message != "no sandbox named x" || e.FsKind != "" {
		t.Errorf("errors.As: %#v", e)
	}
	if !IsKind(err, ErrSandboxNotFound) {
		t.Error("IsKind false")
	}
	if !errors.Is(err, &Error{Kind: ErrSandboxNotFound}) {
		t.Error("an *Error target of the same kind does not match")
	}
	if got := err.Error(); got != "sandbox_not_found: no sandbox named x" {
		t.Errorf("Error() = %q", got)
	}
	if errors.Is(err, context.Canceled) {
		t.Error("not-found matches context.Canceled")
	}
}

func TestFilesystemErrorKinds(t *testing.T) {
	useFake(t, answers(map[string]string{
		"fs.read":  `{"error":{"kind":"filesystem","message":"/nope: not found","fs_kind":"not_found"}}`,
		"fs.mkdir": `{"error":{"kind":"filesystem","message":"/x exists","fs_kind":"already_exists"}}`,
	}))
	sb := testSandbox(t, 3)
	_, err := sb.FS().Read(context.Background(), "/nope")
	var e *Error
	if !errors.As(err, &e) || e.Kind != ErrFilesystem || e.FsKind != FsKindNotFound {
		t.Fatalf("got %#v", err)
	}
	if !errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrExist) {
		t.Errorf("io/fs sentinels: %v", err)
	}
	if !errors.Is(err, &Error{Kind: ErrFilesystem, FsKind: FsKindNotFound}) || errors.Is(err, &Error{Kind: ErrFilesystem, FsKind: FsKindReadOnly}) {
		t.Error("FsKind matching")
	}
	err = sb.FS().Mkdir(context.Background(), "/x")
	if !errors.Is(err, fs.ErrExist) {
		t.Errorf("mkdir: %v", err)
	}
}

func TestEveryDocumentedKindHasAConstant(t *testing.T) {
	kinds := []ErrorKind{ErrInvalidName, ErrInvalidConfig, ErrSandboxAlreadyExists, ErrSandboxNotFound,
		ErrKernelNotFound, ErrState, ErrSandboxStillRunning, ErrSandboxNotRunning, ErrImageNotFound,
		ErrInvalidReference, ErrImageNotCached, ErrRegistryUnauthorized, ErrRegistryUnreachable, ErrRegistry,
		ErrInvalidImage, ErrDigestMismatch, ErrPatchTargetExists, ErrPatchFailed, ErrFilesystem,
		ErrUntrustedDirectory, ErrVMMNotFound, ErrStartFailed, ErrCommandNotFound, ErrPermissionDenied,
		ErrInvalidExecRequest, ErrExecTimeout, ErrTooLarge, ErrAgentUnavailable, ErrBusy, ErrVersion, ErrAgent,
		ErrConnectionClosed, ErrProtocol, ErrInvalidState, ErrPaused, ErrTimeout, ErrNotATerminal, ErrIO,
		ErrInvalidArgument, ErrInvalidHandle, ErrTooManyHandles, ErrCancelled, ErrNotInstalled, ErrInternal}
	// The kinds of docs/bindings.md's table, in its order.
	doc := "invalid_name invalid_config already_exists sandbox_not_found kernel_not_found state " +
		"sandbox_still_running not_running image_not_found invalid_reference image_not_cached " +
		"registry_unauthorized registry_unreachable registry invalid_image digest_mismatch " +
		"patch_target_exists patch filesystem untrusted_directory vmm_not_found start_failed " +
		"command_not_found permission_denied invalid_exec_request exec_timeout too_large " +
		"agent_unavailable busy version agent connection_closed protocol invalid_state paused timeout " +
		"not_a_terminal io invalid_argument invalid_handle too_many_handles cancelled not_installed internal"
	want := strings.Fields(doc)
	if len(kinds) != len(want) {
		t.Fatalf("%d constants for %d kinds", len(kinds), len(want))
	}
	for i, k := range kinds {
		if string(k) != want[i] {
			t.Errorf("constant %d is %q, the table says %q", i, k, want[i])
		}
	}
}

func TestUnknownKindIsKept(t *testing.T) {
	useFake(t, answers(map[string]string{"remove": `{"error":{"kind":"brand_new","message":"m"}}`}))
	err := RemoveSandbox(context.Background(), "x")
	if !IsKind(err, ErrorKind("brand_new")) {
		t.Errorf("got %v", err)
	}
}

func TestMalformedAnswersAreInternal(t *testing.T) {
	for _, doc := range []string{`not json`, `{}`, `{"ok":{"sandbox":"seven"}}`} {
		useFake(t, answers(map[string]string{"create": doc}))
		_, err := CreateSandbox(context.Background(), "box")
		if !IsKind(err, ErrInternal) {
			t.Errorf("%s: got %v", doc, err)
		}
	}
}

// The fake core blocks until the call's context is done, then answers as the core does
// when its cancel token fires.
func blockUntilCancelled(ctx context.Context, c recordedCall) string {
	select {
	case <-ctx.Done():
		return `{"error":{"kind":"cancelled","message":"the call was cancelled"}}`
	case <-time.After(10 * time.Second):
		return `{"ok":null}`
	}
}

func TestCancelledContext(t *testing.T) {
	useFake(t, blockUntilCancelled)
	sb := testSandbox(t, 3)

	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	start := time.Now()
	_, err := sb.Shell(ctx, "sleep 100")
	if time.Since(start) > 5*time.Second {
		t.Fatal("the cancel did not reach the call")
	}
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrCancelled) {
		t.Errorf("got %v", err)
	}

	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	_, err = sb.Exec(ctx2, "sleep", []string{"100"})
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrCancelled) {
		t.Errorf("deadline: got %v", err)
	}
}

func TestAlreadyCancelledContextNeverReachesTheCore(t *testing.T) {
	f := useFake(t, blockUntilCancelled)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := CreateSandbox(ctx, "box")
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrCancelled) {
		t.Errorf("got %v", err)
	}
	if n := len(f.all()); n != 0 {
		t.Errorf("%d calls reached the core", n)
	}
}

func TestOkArrivingAfterCancelIsKept(t *testing.T) {
	// A call that completed as its context was cancelled keeps its result (a created
	// sandbox must not be lost).
	ctx, cancel := context.WithCancel(context.Background())
	useFake(t, func(context.Context, recordedCall) string {
		cancel()
		return refAnswer
	})
	sb, err := CreateSandbox(ctx, "box")
	disarm(t, sb)
	if err != nil || sb == nil {
		t.Fatalf("got %v", err)
	}
}
