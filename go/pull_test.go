package microsandbox

import (
	"context"
	"sync"
	"testing"
)

// pullFake answers create_with_progress with session 9, then pull.next with events in
// order and null after them, and pull.result with a sandbox.
func pullFake(t *testing.T, events []string, result string) *fakeCore {
	var mu sync.Mutex
	next := 0
	return useFake(t, func(_ context.Context, c recordedCall) string {
		switch c.Method {
		case "create_with_progress":
			return `{"ok":{"pull":9}}`
		case "pull.next":
			mu.Lock()
			defer mu.Unlock()
			if next < len(events) {
				next++
				return `{"ok":` + events[next-1] + `}`
			}
			return `{"ok":null}`
		case "pull.result":
			return result
		case "release":
			return `{"ok":null}`
		}
		return `{"error":{"kind":"internal","message":"fake: unexpected method ` + c.Method + `"}}`
	})
}

func TestCreateSandboxWithProgress(t *testing.T) {
	f := pullFake(t, []string{
		`{"type":"resolving","reference":"docker.io/library/python:3.12"}`,
		`{"type":"resolved","reference":"docker.io/library/python:3.12","manifest_digest":"sha256:aa","layer_count":2,"total_download_bytes":1000}`,
		`{"type":"layer_download_progress","layer_index":1,"digest":"sha256:bb","downloaded_bytes":400,"total_bytes":600}`,
		`{"type":"layer_materialize_progress","layer_index":0,"bytes_read":10,"total_bytes":400}`,
		`{"type":"layer_materialize_complete","layer_index":0,"diff_id":"sha256:cc"}`,
		`{"type":"complete","reference":"docker.io/library/python:3.12","layer_count":2}`,
	}, refAnswer)
	ctx := context.Background()
	p, err := CreateSandboxWithProgress(ctx, "box", WithImage("python:3.12"), WithMemory(256), WithDetached())
	if err != nil {
		t.Fatal(err)
	}
	disarm(t, p)
	sameJSON(t, "create_with_progress", f.last(t), `{"Method":"create_with_progress",
		"Args":{"name":"box","config":{"image":"python:3.12","memory":256},"detached":true},
		"Raw":"{\"config\":{\"image\":\"python:3.12\",\"memory\":256},\"detached\":true,\"name\":\"box\"}"}`)
	var got []*PullEvent
	for {
		ev, err := p.Recv(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev == nil {
			break
		}
		got = append(got, ev)
	}
	if len(got) != 6 {
		t.Fatalf("%d events", len(got))
	}
	if got[0].Type != PullEventResolving || got[0].Reference != "docker.io/library/python:3.12" {
		t.Errorf("resolving: %+v", got[0])
	}
	r := got[1]
	if r.Type != PullEventResolved || r.ManifestDigest != "sha256:aa" || r.LayerCount != 2 || r.TotalDownloadBytes != 1000 {
		t.Errorf("resolved: %+v", r)
	}
	d := got[2]
	if d.Type != PullEventLayerDownloadProgress || d.LayerIndex != 1 || d.Digest != "sha256:bb" ||
		d.DownloadedBytes != 400 || d.TotalBytes != 600 || d.Reference != "" {
		t.Errorf("download: %+v", d)
	}
	sameJSON(t, "fields", d.Fields, `{"layer_index":1,"digest":"sha256:bb","downloaded_bytes":400,"total_bytes":600}`)
	if m := got[3]; m.Type != PullEventLayerMaterializeProgress || m.BytesRead != 10 || m.TotalBytes != 400 {
		t.Errorf("materialize: %+v", m)
	}
	if m := got[4]; m.Type != PullEventLayerMaterializeComplete || m.DiffID != "sha256:cc" {
		t.Errorf("materialize complete: %+v", m)
	}
	if c := got[5]; c.Type != PullEventComplete || c.LayerCount != 2 {
		t.Errorf("complete: %+v", c)
	}
	for _, c := range f.all() {
		if c.Method == "pull.next" {
			sameJSON(t, "pull.next", c.Args, `{"handle":9}`)
		}
	}
	sb, err := p.Result(ctx)
	if err != nil {
		t.Fatal(err)
	}
	disarm(t, sb)
	sameJSON(t, "pull.result", f.last(t).Args, `{"handle":9}`)
	if sb.Name() != "box" {
		t.Errorf("name %q", sb.Name())
	}
	// The session is spent: no second result, and Close is a no-op that sends nothing.
	if _, err := p.Result(ctx); !IsKind(err, ErrInvalidHandle) {
		t.Errorf("second Result: %v", err)
	}
	n := len(f.all())
	if err := p.Close(); err != nil {
		t.Errorf("Close after Result: %v", err)
	}
	if len(f.all()) != n {
		t.Errorf("Close after Result called the core: %v", f.methods())
	}
}

func TestPullSessionCloseCancels(t *testing.T) {
	f := pullFake(t, nil, refAnswer)
	p, err := CreateSandboxWithProgress(context.Background(), "box")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "release", f.last(t), `{"Method":"release","Args":{"handle":9},"Raw":"{\"handle\":9}"}`)
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := p.Recv(context.Background()); !IsKind(err, ErrInvalidHandle) {
		t.Errorf("Recv after Close: %v", err)
	}
	if _, err := p.Result(context.Background()); !IsKind(err, ErrInvalidHandle) {
		t.Errorf("Result after Close: %v", err)
	}
}

func TestPullSessionErrors(t *testing.T) {
	// Bad arguments never reach the core.
	f := pullFake(t, nil, refAnswer)
	if _, err := CreateSandboxWithProgress(context.Background(), ""); !IsKind(err, ErrInvalidArgument) {
		t.Errorf("empty name: %v", err)
	}
	if len(f.all()) != 0 {
		t.Errorf("calls: %v", f.methods())
	}
	// A failed pull is Result's error, typed; the session is spent.
	pullFake(t, nil, `{"error":{"kind":"image_not_found","message":"no such image"}}`)
	p, err := CreateSandboxWithProgress(context.Background(), "box", WithImage("nope:1"))
	if err != nil {
		t.Fatal(err)
	}
	disarm(t, p)
	if _, err := p.Result(context.Background()); !IsKind(err, ErrImageNotFound) {
		t.Errorf("Result: %v", err)
	}
	if _, err := p.Recv(context.Background()); !IsKind(err, ErrInvalidHandle) {
		t.Errorf("Recv after a failed Result: %v", err)
	}
	// An event the core sent without a type is an internal error, not a zero event.
	pullFake(t, []string{`{"reference":"x"}`}, refAnswer)
	p, err = CreateSandboxWithProgress(context.Background(), "box")
	if err != nil {
		t.Fatal(err)
	}
	disarm(t, p)
	if _, err := p.Recv(context.Background()); !IsKind(err, ErrInternal) {
		t.Errorf("untyped event: %v", err)
	}
}
