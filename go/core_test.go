package microsandbox

// Tests against the linked core library itself (no VM, no sandbox state touched).

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestCoreVersionMatchesSDK(t *testing.T) {
	v, err := RuntimeVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v != SDKVersion() {
		t.Errorf("core %q, SDK %q", v, SDKVersion())
	}
}

func TestCoreRejectsBadArgumentsTyped(t *testing.T) {
	err := call(context.Background(), "version", map[string]any{"bogus": 1}, nil)
	if !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("unknown field: %v", err)
	}
	err = call(context.Background(), "no.such.method", nil, nil)
	if err == nil {
		t.Error("unknown method accepted")
	}
	err = release(1 << 52)
	if !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("release of an unknown handle: %v", err)
	}
	_, err = (&ExecHandle{h: newHandleRef(1<<52, "exec")}).Recv(context.Background())
	if !errors.Is(err, ErrInvalidHandle) {
		t.Errorf("exec.recv of an unknown handle: %v", err)
	}
}

func TestCoreCancelTokenPlumbing(t *testing.T) {
	// A cancellable context that is not done takes the token path and completes.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := decodeVersion(ffiTransport(ctx, "version", []byte(`{}`))); err != nil {
		t.Fatalf("version with a cancel token: %v", err)
	}
	// A context done before the call: the token is fired before msb_call, and the core
	// answers "cancelled" every time (it looks at the token before running the method).
	cancel()
	for i := 0; i < 50; i++ {
		err := decodeAnswer(ctx, "version", ffiTransport(ctx, "version", []byte(`{}`)), nil)
		if !errors.Is(err, ErrCancelled) || !errors.Is(err, context.Canceled) {
			t.Fatalf("call %d with a done context: %v", i, err)
		}
	}
	// Through call, such a context never reaches the core (see also
	// TestAlreadyCancelledContextNeverReachesTheCore).
	var e *Error
	if err := call(ctx, "version", nil, nil); !errors.As(err, &e) || e.Kind != ErrCancelled || !e.early {
		t.Errorf("call with a done context: %#v", err)
	}
}

func TestCoreCancelEndsABlockedCall(t *testing.T) {
	// A call that blocks in the core without a VM: snapshot.import reading a FIFO no one
	// writes (open(2) waits for a writer), with the core's state in a directory of its
	// own. Only the context's cancel can end the call; the test then lets the core's
	// blocked thread go.
	home := t.TempDir()
	t.Setenv("MSB_HOME", home)
	fifo := filepath.Join(home, "in.tar.zst")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := ImportSnapshot(ctx, fifo, "go-core-test")
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("snapshot.import of a FIFO without a writer returned at once: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, ErrCancelled) || !errors.Is(err, context.Canceled) {
			t.Errorf("the cancelled call: %v", err)
		}
		t.Logf("cancelled after %s", time.Since(start))
	case <-time.After(10 * time.Second):
		t.Fatal("the cancel did not end the call")
	}

	// Let the import's thread go: a writer that closes at once (end of file, so the
	// import fails and removes its staging directory).
	deadline := time.Now().Add(10 * time.Second)
	for {
		fd, err := syscall.Open(fifo, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err == nil {
			syscall.Close(fd)
			break
		}
		if err != syscall.ENXIO || time.Now().After(deadline) {
			t.Fatalf("opening the FIFO for writing: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // no reader yet
	}
	for {
		entries, _ := os.ReadDir(filepath.Join(home, "snapshots"))
		staging := 0
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), ".snapshot-") {
				staging++
			}
		}
		if staging == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the import's staging directory is still there")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func decodeVersion(doc []byte) (string, error) {
	var v struct {
		SDK string `json:"sdk"`
	}
	err := decodeAnswer(context.Background(), "version", doc, &v)
	return v.SDK, err
}
