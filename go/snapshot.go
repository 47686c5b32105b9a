package microsandbox

import (
	"context"
	"time"
)

// SnapshotArtifact is a snapshot of a stopped sandbox: its frozen writable layer plus a
// manifest naming the image it sits on, in a directory (by name under the runtime's
// snapshots directory, or at an explicit path). Boot from one with WithSnapshot.
type SnapshotArtifact struct {
	// Name is the snapshot's name (its directory's).
	Name string
	// Path is the snapshot's directory.
	Path string
	// SourceSandbox is the sandbox it was taken of.
	SourceSandbox string
	// Image is the image the sandbox was created from, as it was named.
	Image string
	// ImageDigest is the image's pinned digest ("" when not pinned).
	ImageDigest string
	// SizeBytes is the size of the frozen writable layer.
	SizeBytes uint64
	// CreatedAt is when it was taken.
	CreatedAt time.Time
	// Digest is its content digest ("sha256:...").
	Digest string
}

// SnapshotInfo is another name of SnapshotArtifact.
type SnapshotInfo = SnapshotArtifact

type wireSnapshot struct {
	Name          string  `json:"name"`
	Path          string  `json:"path"`
	SourceSandbox string  `json:"source_sandbox"`
	Image         string  `json:"image"`
	ImageDigest   *string `json:"image_digest"`
	SizeBytes     uint64  `json:"size_bytes"`
	CreatedAtMs   *int64  `json:"created_at_ms"`
	Digest        string  `json:"digest"`
}

func (w *wireSnapshot) artifact() *SnapshotArtifact {
	a := &SnapshotArtifact{
		Name:          w.Name,
		Path:          w.Path,
		SourceSandbox: w.SourceSandbox,
		Image:         w.Image,
		SizeBytes:     w.SizeBytes,
		CreatedAt:     msToTime(w.CreatedAtMs),
		Digest:        w.Digest,
	}
	if w.ImageDigest != nil {
		a.ImageDigest = *w.ImageDigest
	}
	return a
}

func checkSnapshotRef(what, value string) error {
	if value == "" {
		return invalidArgument(what + " must not be empty")
	}
	return nil
}

// Snapshot snapshots the stopped sandbox under a bare name, in the runtime's snapshots
// directory.
func (h *SandboxHandle) Snapshot(ctx context.Context, name string) (*SnapshotArtifact, error) {
	if err := checkSnapshotRef("snapshot name", name); err != nil {
		return nil, err
	}
	var w wireSnapshot
	if err := h.nameCall(ctx, "handle.snapshot", map[string]any{"snapshot": name}, &w); err != nil {
		return nil, err
	}
	return w.artifact(), nil
}

// SnapshotTo snapshots the stopped sandbox into the directory path.
func (h *SandboxHandle) SnapshotTo(ctx context.Context, path string) (*SnapshotArtifact, error) {
	if err := checkSnapshotRef("snapshot path", path); err != nil {
		return nil, err
	}
	var w wireSnapshot
	if err := h.nameCall(ctx, "handle.snapshot_to", map[string]any{"path": path}, &w); err != nil {
		return nil, err
	}
	return w.artifact(), nil
}

// ListSnapshots returns the snapshots of the runtime's snapshots directory.
func ListSnapshots(ctx context.Context) ([]*SnapshotArtifact, error) {
	var ws []wireSnapshot
	if err := call(ctx, "snapshot.list", nil, &ws); err != nil {
		return nil, err
	}
	out := make([]*SnapshotArtifact, len(ws))
	for i := range ws {
		out[i] = ws[i].artifact()
	}
	return out, nil
}

// GetSnapshot reads a snapshot by bare name or by path, checking it against its digests.
// A snapshot that does not exist is an ErrSnapshotNotFound error.
func GetSnapshot(ctx context.Context, nameOrPath string) (*SnapshotArtifact, error) {
	if err := checkSnapshotRef("snapshot name or path", nameOrPath); err != nil {
		return nil, err
	}
	var w wireSnapshot
	if err := call(ctx, "snapshot.get", map[string]any{"name": nameOrPath}, &w); err != nil {
		return nil, err
	}
	return w.artifact(), nil
}

// RemoveSnapshot deletes a snapshot, by bare name or by path (sandboxes booted from it
// keep running).
func RemoveSnapshot(ctx context.Context, nameOrPath string) error {
	if err := checkSnapshotRef("snapshot name or path", nameOrPath); err != nil {
		return err
	}
	return call(ctx, "snapshot.remove", map[string]any{"name": nameOrPath}, nil)
}

// ExportSnapshot packs a snapshot (by bare name or path) into the .tar.zst file path;
// withImage also packs the blobs of the image it sits on, so it boots where that image
// was never pulled.
func ExportSnapshot(ctx context.Context, nameOrPath, path string, withImage bool) error {
	if err := checkSnapshotRef("snapshot name or path", nameOrPath); err != nil {
		return err
	}
	if err := checkSnapshotRef("export path", path); err != nil {
		return err
	}
	return call(ctx, "snapshot.export", map[string]any{"name": nameOrPath, "path": path, "with_image": withImage}, nil)
}

// ImportSnapshot unpacks a .tar.zst made by ExportSnapshot into the runtime's snapshots
// directory under name ("" keeps the name it was exported with), checking its digests
// first, and loads the image it carries, if any.
func ImportSnapshot(ctx context.Context, path string, name string) (*SnapshotArtifact, error) {
	if err := checkSnapshotRef("import path", path); err != nil {
		return nil, err
	}
	args := map[string]any{"path": path}
	setString(args, "name", name)
	var w wireSnapshot
	if err := call(ctx, "snapshot.import", args, &w); err != nil {
		return nil, err
	}
	return w.artifact(), nil
}
