package microsandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"sync"
	"testing"
)

// recordedCall is one call the fake core received.
type recordedCall struct {
	Method string
	Args   map[string]any
	Raw    string
}

// fakeCore replaces the transport for one test: answer maps a method to the answer
// document (a func of the call, or a string); every call is recorded.
type fakeCore struct {
	mu     sync.Mutex
	calls  []recordedCall
	answer func(ctx context.Context, c recordedCall) string
}

func useFake(t *testing.T, answer func(ctx context.Context, c recordedCall) string) *fakeCore {
	t.Helper()
	f := &fakeCore{answer: answer}
	old := transport
	transport = func(ctx context.Context, method string, args []byte) []byte {
		var m map[string]any
		if err := json.Unmarshal(args, &m); err != nil {
			t.Errorf("%s: arguments are not a JSON object: %s", method, args)
		}
		c := recordedCall{Method: method, Args: m, Raw: string(args)}
		f.mu.Lock()
		f.calls = append(f.calls, c)
		f.mu.Unlock()
		return []byte(f.answer(ctx, c))
	}
	t.Cleanup(func() { transport = old })
	return f
}

// answers is a fake answering by method name with fixed documents; unknown methods
// get an internal error.
func answers(m map[string]string) func(context.Context, recordedCall) string {
	return func(_ context.Context, c recordedCall) string {
		if a, ok := m[c.Method]; ok {
			return a
		}
		return fmt.Sprintf(`{"error":{"kind":"internal","message":"fake: unexpected method %s"}}`, c.Method)
	}
}

func (f *fakeCore) all() []recordedCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recordedCall(nil), f.calls...)
}

func (f *fakeCore) last(t *testing.T) recordedCall {
	t.Helper()
	calls := f.all()
	if len(calls) == 0 {
		t.Fatal("no call reached the core")
	}
	return calls[len(calls)-1]
}

func (f *fakeCore) methods() []string {
	var out []string
	for _, c := range f.all() {
		out = append(out, c.Method)
	}
	return out
}

// sameJSON compares a recorded value with the JSON text it should equal.
func sameJSON(t *testing.T, what string, got any, want string) {
	t.Helper()
	var w any
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("%s: bad expectation %s: %v", what, want, err)
	}
	var g any
	gb, _ := json.Marshal(got)
	if err := json.Unmarshal(gb, &g); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	gb, _ = json.Marshal(g)
	wb, _ := json.Marshal(w)
	if string(gb) != string(wb) {
		t.Errorf("%s:\n got  %s\n want %s", what, gb, wb)
	}
}

const refAnswer = `{"ok":{"sandbox":7,"name":"box","owns_lifecycle":true}}`

// disarm forgets objects made against the fake core when the test ends, so that no
// finalizer later releases their (fake) handle numbers in the real core.
func disarm(t *testing.T, objs ...any) {
	t.Helper()
	t.Cleanup(func() {
		for _, o := range objs {
			switch v := o.(type) {
			case *Sandbox:
				if v != nil {
					forget(v.h)
					runtime.SetFinalizer(v, nil)
				}
			case *ExecHandle:
				if v != nil {
					forget(v.h)
					runtime.SetFinalizer(v, nil)
				}
			case *MetricsStreamHandle:
				if v != nil {
					forget(v.stream.h)
					runtime.SetFinalizer(v.stream, nil)
				}
			case *SSHClient:
				if v != nil {
					forget(v.h)
					runtime.SetFinalizer(v, nil)
				}
			case *SSHEndpoint:
				if v != nil {
					forget(v.h)
					runtime.SetFinalizer(v, nil)
				}
			case *PullSession:
				if v != nil {
					forget(v.h)
					runtime.SetFinalizer(v, nil)
				}
			case *LogStreamHandle:
				if v != nil {
					forget(v.stream.h)
					runtime.SetFinalizer(v.stream, nil)
				}
			default:
				t.Errorf("disarm: unexpected %T", o)
			}
		}
	})
}

// forget ends a handle made against the fake core without releasing it.
func forget(h *handleRef) {
	h.mu.Lock()
	h.state, h.why = handleReleased, "forgotten by the test"
	h.mu.Unlock()
}

// testSandbox is a *Sandbox on the fake core with handle id.
func testSandbox(t *testing.T, id uint64) *Sandbox {
	sb := newSandbox(sandboxRef{Sandbox: id, Name: "box", OwnsLifecycle: true})
	disarm(t, sb)
	return sb
}
