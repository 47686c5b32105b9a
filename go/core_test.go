package microsandbox

// Tests against the linked core library itself (no VM, no sandbox state touched).

import (
	"context"
	"errors"
	"strings"
	"testing"
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
	// A cancellable context takes the token path; a context cancelled as the call starts
	// ends either way, never hangs.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := decodeVersion(ffiTransport(ctx, "version", []byte(`{}`))); err != nil {
		t.Fatalf("version with a cancel token: %v", err)
	}
	cancel()
	for i := 0; i < 20; i++ {
		doc := string(ffiTransport(ctx, "version", []byte(`{}`)))
		if !strings.Contains(doc, `"ok"`) && !strings.Contains(doc, `"cancelled"`) {
			t.Fatalf("answer %s", doc)
		}
	}
}

func decodeVersion(doc []byte) (string, error) {
	var v struct {
		SDK string `json:"sdk"`
	}
	err := decodeAnswer(context.Background(), "version", doc, &v)
	return v.SDK, err
}
