package microsandbox

import (
	"context"
	"runtime"
)

// stream is a "stream.next" handle (metrics and log subscriptions).
type stream struct {
	h       *handleRef
	sandbox *Sandbox // kept reachable while the stream is
}

func newStream(id uint64, sb *Sandbox) *stream {
	s := &stream{h: newHandleRef(id, "stream"), sandbox: sb}
	runtime.SetFinalizer(s, func(s *stream) { releaseInBackground(s.h) })
	return s
}

// next decodes the next item into out; false at the end of the stream.
func (s *stream) next(ctx context.Context, out any) (bool, error) {
	var raw rawValue
	if err := s.h.call(ctx, s, "stream.next", nil, &raw); err != nil {
		return false, err
	}
	if raw.null() {
		return false, nil
	}
	if err := raw.decode(out); err != nil {
		return false, newError(ErrInternal, "stream.next: "+err.Error())
	}
	return true, nil
}

// close releases the stream (idempotent); a Recv waiting in another goroutine then
// returns the end of the stream.
func (s *stream) close() error {
	_, err := s.h.close()
	runtime.SetFinalizer(s, nil)
	return err
}

// MetricsStreamHandle is a live metrics subscription (Sandbox.MetricsStream).
type MetricsStreamHandle struct {
	stream *stream
}

// Recv waits for the next snapshot; (nil, nil) when the stream ended.
func (m *MetricsStreamHandle) Recv(ctx context.Context) (*Metrics, error) {
	var w wireMetrics
	ok, err := m.stream.next(ctx, &w)
	if err != nil || !ok {
		return nil, err
	}
	return w.toMetrics(), nil
}

// Close stops the subscription. Calling it again returns nil.
func (m *MetricsStreamHandle) Close() error { return m.stream.close() }

// LogStreamHandle is a live log subscription (Sandbox.LogStream).
type LogStreamHandle struct {
	stream *stream
}

// Recv waits for the next entry; (nil, nil) when the stream ended.
func (l *LogStreamHandle) Recv(ctx context.Context) (*LogEntry, error) {
	var w wireLogEntry
	ok, err := l.stream.next(ctx, &w)
	if err != nil || !ok {
		return nil, err
	}
	e, err := w.toLogEntry()
	if err != nil {
		return nil, err
	}
	return &e, nil
}

// Close stops the subscription. Calling it again returns nil.
func (l *LogStreamHandle) Close() error { return l.stream.close() }
