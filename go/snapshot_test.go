package microsandbox

import (
	"context"
	"errors"
	"testing"
)

const snapshotJSON = `{"name":"snap1","path":"/msb/snapshots/snap1","source_sandbox":"box","image":"default",` +
	`"image_digest":null,"size_bytes":4096,"created_at_ms":1700000000250,"digest":"sha256:feed"}`

const snapshotPinnedJSON = `{"name":"s2","path":"/tmp/s2","source_sandbox":"box","image":"python:3.12",` +
	`"image_digest":"sha256:beef","size_bytes":0,"created_at_ms":1700000001000,"digest":"sha256:cafe"}`

func TestSnapshotCalls(t *testing.T) {
	f := useFake(t, answers(map[string]string{
		"get":                  handleInfoAnswer,
		"handle.snapshot":      `{"ok":` + snapshotJSON + `}`,
		"handle.snapshot_to":   `{"ok":` + snapshotPinnedJSON + `}`,
		"snapshot.list":        `{"ok":[` + snapshotJSON + `,` + snapshotPinnedJSON + `]}`,
		"snapshot.get":         `{"ok":` + snapshotJSON + `}`,
		"snapshot.remove":      `{"ok":null}`,
		"snapshot.export":      `{"ok":null}`,
		"snapshot.import":      `{"ok":` + snapshotPinnedJSON + `}`,
		"handle.request_drain": `{"ok":null}`,
	}))
	ctx := context.Background()
	h, err := GetSandbox(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	s, err := h.Snapshot(ctx, "snap1")
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle.snapshot", f.last(t), `{"Method": "handle.snapshot", "Args": {"name": "box", "snapshot": "snap1"}, "Raw": "{\"name\":\"box\",\"snapshot\":\"snap1\"}"}`)
	want := SnapshotArtifact{Name: "snap1", Path: "/msb/snapshots/snap1", SourceSandbox: "box", Image: "default",
		SizeBytes: 4096, Digest: "sha256:feed"}
	if s.CreatedAt.UnixMilli() != 1700000000250 {
		t.Errorf("created at %v", s.CreatedAt)
	}
	got := *s
	got.CreatedAt = want.CreatedAt
	if got != want {
		t.Errorf("snapshot %+v", *s)
	}
	var info *SnapshotInfo = s // the alias
	_ = info

	s2, err := h.SnapshotTo(ctx, "/tmp/s2")
	if err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "handle.snapshot_to", f.last(t), `{"Method": "handle.snapshot_to", "Args": {"name": "box", "path": "/tmp/s2"}, "Raw": "{\"name\":\"box\",\"path\":\"/tmp/s2\"}"}`)
	if s2.ImageDigest != "sha256:beef" || s2.Image != "python:3.12" || s2.SizeBytes != 0 || s2.Path != "/tmp/s2" {
		t.Errorf("snapshot_to %+v", s2)
	}

	list, err := ListSnapshots(ctx)
	if err != nil || len(list) != 2 || list[0].Name != "snap1" || list[1].Digest != "sha256:cafe" || list[1].CreatedAt.Unix() != 1700000001 {
		t.Errorf("list %+v %v", list, err)
	}
	sameJSON(t, "snapshot.list", f.last(t), `{"Method": "snapshot.list", "Args": {}, "Raw": "{}"}`)

	if g, err := GetSnapshot(ctx, "snap1"); err != nil || g.Digest != "sha256:feed" {
		t.Errorf("get %+v %v", g, err)
	}
	sameJSON(t, "snapshot.get", f.last(t), `{"Method": "snapshot.get", "Args": {"name": "snap1"}, "Raw": "{\"name\":\"snap1\"}"}`)
	if _, err := GetSnapshot(ctx, "/tmp/s2"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "snapshot.get by path", f.last(t).Args, `{"name": "/tmp/s2"}`)

	if err := RemoveSnapshot(ctx, "snap1"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "snapshot.remove", f.last(t), `{"Method": "snapshot.remove", "Args": {"name": "snap1"}, "Raw": "{\"name\":\"snap1\"}"}`)

	if err := ExportSnapshot(ctx, "snap1", "/tmp/snap1.tar.zst", true); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "snapshot.export", f.last(t), `{"Method": "snapshot.export", "Args": {"name": "snap1", "path": "/tmp/snap1.tar.zst", "with_image": true},
	  "Raw": "{\"name\":\"snap1\",\"path\":\"/tmp/snap1.tar.zst\",\"with_image\":true}"}`)
	if err := ExportSnapshot(ctx, "/tmp/s2", "/tmp/s2.tar.zst", false); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "snapshot.export without image", f.last(t).Args, `{"name": "/tmp/s2", "path": "/tmp/s2.tar.zst", "with_image": false}`)

	imp, err := ImportSnapshot(ctx, "/tmp/s2.tar.zst", "")
	if err != nil || imp.Name != "s2" {
		t.Fatalf("import %+v %v", imp, err)
	}
	sameJSON(t, "snapshot.import", f.last(t), `{"Method": "snapshot.import", "Args": {"path": "/tmp/s2.tar.zst"}, "Raw": "{\"path\":\"/tmp/s2.tar.zst\"}"}`)
	if _, err := ImportSnapshot(ctx, "/tmp/s2.tar.zst", "renamed"); err != nil {
		t.Fatal(err)
	}
	sameJSON(t, "snapshot.import renamed", f.last(t).Args, `{"path": "/tmp/s2.tar.zst", "name": "renamed"}`)

	// Empty names and paths are refused here, before the core.
	n := len(f.all())
	for what, err := range map[string]error{
		"Snapshot":       func() error { _, err := h.Snapshot(ctx, ""); return err }(),
		"SnapshotTo":     func() error { _, err := h.SnapshotTo(ctx, ""); return err }(),
		"GetSnapshot":    func() error { _, err := GetSnapshot(ctx, ""); return err }(),
		"RemoveSnapshot": RemoveSnapshot(ctx, ""),
		"ExportSnapshot": ExportSnapshot(ctx, "snap1", "", false),
		"ImportSnapshot": func() error { _, err := ImportSnapshot(ctx, "", "x"); return err }(),
	} {
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s with an empty argument: %v", what, err)
		}
	}
	if len(f.all()) != n {
		t.Errorf("empty arguments reached the core: %v", f.methods()[n:])
	}
}

func TestSnapshotErrors(t *testing.T) {
	useFake(t, answers(map[string]string{
		"get":             handleInfoAnswer,
		"handle.snapshot": `{"error":{"kind":"sandbox_still_running","message":"sandbox box is running: stop it first"}}`,
		"snapshot.get":    `{"error":{"kind":"snapshot_not_found","message":"no snapshot at /msb/snapshots/gone"}}`,
	}))
	ctx := context.Background()
	h, err := GetSandbox(ctx, "box")
	if err != nil {
		t.Fatal(err)
	}
	if s, err := h.Snapshot(ctx, "s"); !errors.Is(err, ErrSandboxStillRunning) || s != nil {
		t.Errorf("snapshot of a running sandbox: %v %v", s, err)
	}
	if _, err := GetSnapshot(ctx, "gone"); !errors.Is(err, ErrSnapshotNotFound) {
		t.Errorf("get of a missing snapshot: %v", err)
	}
}
