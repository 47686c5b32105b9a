package microsandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"sync"
	"time"
)

// transport carries one call to the core: the method, the JSON object of its
// arguments, the answer document. It is ffiTransport (ffi.go); unit tests substitute a
// fake that answers without a VM.
var transport = ffiTransport

// wireError is the "error" member of an answer.
type wireError struct {
	Kind    string `json:"kind"`
	Message string `json:"message"`
	FsKind  string `json:"fs_kind"`
}

type answer struct {
	OK    json.RawMessage `json:"ok"`
	Error *wireError      `json:"error"`
}

// call runs method with args (marshalled to a JSON object; nil is {}) and decodes the
// "ok" value into out (ignored when out is nil). Failures are *Error; a call ended by
// ctx is an *Error of kind ErrCancelled that also matches ctx.Err().
func call(ctx context.Context, method string, args map[string]any, out any) error {
	if ctx == nil {
		ctx = context.Background()
	}
	if err := ctx.Err(); err != nil {
		return cancelledError(err)
	}
	if args == nil {
		args = map[string]any{}
	}
	argsJSON, err := json.Marshal(args)
	if err != nil {
		return invalidArgument(fmt.Sprintf("%s: encoding the arguments: %v", method, err))
	}
	return decodeAnswer(ctx, method, transport(ctx, method, argsJSON), out)
}

func decodeAnswer(ctx context.Context, method string, doc []byte, out any) error {
	var a answer
	if err := json.Unmarshal(doc, &a); err != nil {
		return newError(ErrInternal, fmt.Sprintf("%s: unreadable answer %q: %v", method, truncate(doc), err))
	}
	if a.Error != nil {
		e := &Error{Kind: ErrorKind(a.Error.Kind), Message: a.Error.Message, FsKind: a.Error.FsKind}
		if e.Kind == ErrCancelled {
			e.cause = ctx.Err()
		}
		return e
	}
	if a.OK == nil {
		return newError(ErrInternal, fmt.Sprintf("%s: answer without ok or error: %q", method, truncate(doc)))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(a.OK, out); err != nil {
		return newError(ErrInternal, fmt.Sprintf("%s: unexpected value %q: %v", method, truncate(a.OK), err))
	}
	return nil
}

func truncate(b []byte) string {
	const max = 300
	if len(b) > max {
		return string(b[:max]) + "..."
	}
	return string(b)
}

// handleRef is one handle of the core's table held by a Go object: read under a lock,
// taken exactly once (Close, a spending call, or the finalizer).
type handleRef struct {
	mu       sync.Mutex
	id       uint64
	released bool
	what     string // "sandbox", "exec", "stream": for messages
}

func newHandleRef(id uint64, what string) *handleRef {
	return &handleRef{id: id, what: what}
}

// get returns the handle, or an ErrInvalidHandle error once it was taken.
func (h *handleRef) get() (uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return 0, newError(ErrInvalidHandle, h.what+" handle already closed or spent")
	}
	return h.id, nil
}

// take marks the handle gone and returns it; false when it already was.
func (h *handleRef) take() (uint64, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return 0, false
	}
	h.released = true
	return h.id, true
}

// release drops the handle from the core's table.
func release(id uint64) error {
	return call(context.Background(), "release", map[string]any{"handle": id}, nil)
}

// releaseInBackground is the finalizers' release: a finalizer must not block (releasing
// an owned sandbox stops it), so the call runs on its own goroutine, errors ignored.
func releaseInBackground(h *handleRef) {
	if id, ok := h.take(); ok {
		go func() { _ = release(id) }()
	}
}

// seconds renders a duration as whole seconds, rounding up (max_duration, idle_timeout).
func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

// secondsMs renders a duration as seconds with millisecond precision, sub-millisecond
// rounded up: an integer when whole, a fraction otherwise.
func secondsMs(d time.Duration) any {
	ms := (d + time.Millisecond - 1) / time.Millisecond
	if ms%1000 == 0 {
		return uint64(ms / 1000)
	}
	return float64(ms) / 1000
}

// msToTime converts the wire's milliseconds since the epoch; nil is the zero time.
func msToTime(ms *int64) time.Time {
	if ms == nil {
		return time.Time{}
	}
	return time.UnixMilli(*ms)
}

// secsToDuration converts the wire's (possibly fractional) seconds.
func secsToDuration(s float64) time.Duration {
	if s <= 0 || math.IsNaN(s) {
		return 0
	}
	return time.Duration(s * float64(time.Second))
}

// rawValue keeps an "ok" value undecoded until its type is known.
type rawValue []byte

func (r *rawValue) UnmarshalJSON(b []byte) error {
	*r = append((*r)[:0], b...)
	return nil
}

func (r rawValue) null() bool { return len(r) == 0 || string(r) == "null" }

func (r rawValue) decode(out any) error { return json.Unmarshal(r, out) }
