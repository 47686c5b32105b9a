package microsandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"time"
)

// transport carries one call to the core: the method, the JSON object of its
// arguments, the answer document. It is ffiTransport (ffi.go); unit tests substitute a
// fake that answers without a VM.
var transport = ffiTransport

// wireError is the "error" member of an answer.
type wireError struct {
	Kind    string          `json:"kind"`
	Message string          `json:"message"`
	FsKind  string          `json:"fs_kind"`
	Output  *wireExecOutput `json:"output"` // exec_timeout: what the command printed
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
		e := cancelledError(err)
		e.early = true // the core never saw the call
		return e
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
		if a.Error.Output != nil {
			out, err := a.Error.Output.output()
			if err != nil {
				e.Message += " (its output is unreadable: " + err.Error() + ")"
			} else {
				e.Output = out
			}
		}
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

// handleState is where a Go object's handle stands.
type handleState int

const (
	// handleLive: the core holds the object; calls may use the handle.
	handleLive handleState = iota
	// handleReleased: the caller gave the handle up (Close, or a consuming call such as
	// Detach or Wait that succeeded).
	handleReleased
	// handleSpent: a consuming call failed after the core had taken the object out of
	// its table; there is nothing left to release.
	handleSpent
	// handleDoubtful: a consuming call was cancelled after it reached the core (or its
	// answer was unreadable), so the core may or may not have taken the object: the
	// handle is spent for calls, and Close (or the finalizer) releases it, a released
	// or unknown handle (invalid_handle) meaning the core had taken it.
	handleDoubtful
)

// handleRef is one handle of the core's table held by a Go object: read under a lock,
// ended exactly once (Close, a consuming call, or the finalizer).
type handleRef struct {
	mu    sync.Mutex
	id    uint64
	state handleState
	why   string // how it ended, for messages
	what  string // "sandbox", "exec", "stream": for messages
}

func newHandleRef(id uint64, what string) *handleRef {
	return &handleRef{id: id, what: what}
}

// get returns the handle, or an ErrInvalidHandle error once it ended.
func (h *handleRef) get() (uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.state != handleLive {
		return 0, newError(ErrInvalidHandle, h.what+" handle "+h.why)
	}
	return h.id, nil
}

// reason says how the handle ended ("already closed", "spent by sandbox.detach").
func (h *handleRef) reason() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.why
}

// end moves a live handle to state (not live); false when it had ended already.
func (h *handleRef) end(state handleState, why string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.state != handleLive {
		return false
	}
	h.state, h.why = state, why
	return true
}

// close ends the handle for Close and releases what the core may still hold (a live or
// doubtful handle); an answer of invalid_handle means the core already took the
// object (a consuming call that ran concurrently or was cancelled) and is not an
// error. It returns the state the handle was in.
func (h *handleRef) close() (handleState, error) {
	h.mu.Lock()
	prev := h.state
	if prev != handleReleased {
		h.state, h.why = handleReleased, "already closed"
	}
	id := h.id
	h.mu.Unlock()
	if prev != handleLive && prev != handleDoubtful {
		return prev, nil
	}
	if err := release(id); err != nil && !IsKind(err, ErrInvalidHandle) {
		return prev, err
	}
	return prev, nil
}

// call runs method with args and "handle" set to h's handle. owner (the Go object
// holding h) is kept alive until the call returns, so its finalizer cannot release the
// handle under a call still using it.
func (h *handleRef) call(ctx context.Context, owner any, method string, args map[string]any, out any) error {
	id, err := h.get()
	if err != nil {
		return err
	}
	if args == nil {
		args = map[string]any{}
	}
	args["handle"] = id
	err = call(ctx, method, args, out)
	runtime.KeepAlive(owner)
	return err
}

// consume runs a call that consumes the handle: the core takes the object out of its
// table as the call starts (exec.wait, exec.collect, sandbox.detach,
// sandbox.remove_persisted, ssh.shutdown, ssh.close). The handle stays live only when
// the call cannot have reached the object: ErrBusy (another call is using it, the core
// left it in place), ErrInvalidArgument (refused before the take), or a context that
// was done before the call reached the core. Any other outcome ends it: released on
// success, spent on failure (nothing left to release), doubtful when the call was
// cancelled in the core or its answer was unreadable (Close releases it to be sure).
func consume(ctx context.Context, h *handleRef, method string, args map[string]any, out any) error {
	if _, err := h.get(); err != nil {
		return err
	}
	err := h.call(ctx, nil, method, args, out)
	var e *Error
	switch {
	case err == nil:
		h.end(handleReleased, "spent by "+method)
	case !errors.As(err, &e):
		h.end(handleDoubtful, "spent by "+method+" (which failed)")
	case e.Kind == ErrBusy || e.Kind == ErrInvalidArgument || (e.Kind == ErrCancelled && e.early):
		// The object is where it was.
	case e.Kind == ErrCancelled || e.Kind == ErrInternal:
		h.end(handleDoubtful, "spent by "+method+" (cancelled or failed)")
	default:
		h.end(handleSpent, "spent by "+method+" (which failed)")
	}
	return err
}

// release drops the handle from the core's table.
func release(id uint64) error {
	return call(context.Background(), "release", map[string]any{"handle": id}, nil)
}

// releaseInBackground is the finalizers' release: a finalizer must not block (releasing
// an owned sandbox stops it), so the call runs on its own goroutine, errors ignored.
func releaseInBackground(h *handleRef) {
	go func() { _, _ = h.close() }()
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
