package microsandbox

import (
	"context"
	"encoding/base64"
	"time"
)

// SandboxFSOps is the filesystem of a running sandbox (Sandbox.FS). Failures are
// ErrFilesystem errors with Error.FsKind set; they also match fs.ErrNotExist,
// fs.ErrExist and fs.ErrPermission.
type SandboxFSOps struct {
	sandbox *Sandbox
}

// SandboxFs is the older name of SandboxFSOps.
type SandboxFs = SandboxFSOps

// FsEntryKind is the type of a filesystem object.
type FsEntryKind string

const (
	FsEntryKindFile      FsEntryKind = "file"
	FsEntryKindDirectory FsEntryKind = "directory"
	FsEntryKindSymlink   FsEntryKind = "symlink"
	FsEntryKindOther     FsEntryKind = "other"
)

// FsStat is a file's metadata.
type FsStat struct {
	// Path is the path asked for.
	Path string
	Kind FsEntryKind
	Size int64
	Mode uint32
	UID  uint32
	GID  uint32
	// ModTime is the modification time (zero when not reported).
	ModTime time.Time
	// IsDir is Kind == FsEntryKindDirectory.
	IsDir bool
	// SymlinkTarget is a symlink's target.
	SymlinkTarget *string
}

// FsEntry is one entry of a directory listing.
type FsEntry struct {
	Path string
	Name string
	Kind FsEntryKind
	Size int64
	Mode uint32
	// Stat is the entry's full metadata.
	Stat FsStat
}

type wireFsMetadata struct {
	Kind          string  `json:"kind"`
	Size          int64   `json:"size"`
	Mode          uint32  `json:"mode"`
	UID           uint32  `json:"uid"`
	GID           uint32  `json:"gid"`
	ModifiedMs    *int64  `json:"modified_ms"`
	SymlinkTarget *string `json:"symlink_target"`
}

func (w *wireFsMetadata) stat(path string) FsStat {
	return FsStat{
		Path:          path,
		Kind:          FsEntryKind(w.Kind),
		Size:          w.Size,
		Mode:          w.Mode,
		UID:           w.UID,
		GID:           w.GID,
		ModTime:       msToTime(w.ModifiedMs),
		IsDir:         w.Kind == string(FsEntryKindDirectory),
		SymlinkTarget: w.SymlinkTarget,
	}
}

type wireFsEntry struct {
	Path     string         `json:"path"`
	Name     string         `json:"name"`
	Kind     string         `json:"kind"`
	Size     int64          `json:"size"`
	Metadata wireFsMetadata `json:"metadata"`
}

// Read returns a file's contents.
func (f *SandboxFSOps) Read(ctx context.Context, path string) ([]byte, error) {
	var w struct {
		DataB64 string `json:"data_b64"`
	}
	if err := f.sandbox.call(ctx, "fs.read", map[string]any{"path": path}, &w); err != nil {
		return nil, err
	}
	data, err := base64.StdEncoding.DecodeString(w.DataB64)
	if err != nil {
		return nil, newError(ErrInternal, "fs.read: bad data_b64: "+err.Error())
	}
	return data, nil
}

// ReadString returns a file's contents as a string.
func (f *SandboxFSOps) ReadString(ctx context.Context, path string) (string, error) {
	data, err := f.Read(ctx, path)
	return string(data), err
}

// Write creates or truncates a file with data.
func (f *SandboxFSOps) Write(ctx context.Context, path string, data []byte) error {
	return f.sandbox.call(ctx, "fs.write", map[string]any{"path": path, "data_b64": base64.StdEncoding.EncodeToString(data)}, nil)
}

// WriteString writes a string to a file.
func (f *SandboxFSOps) WriteString(ctx context.Context, path, content string) error {
	return f.Write(ctx, path, []byte(content))
}

// List lists a directory.
func (f *SandboxFSOps) List(ctx context.Context, path string) ([]FsEntry, error) {
	var ws []wireFsEntry
	if err := f.sandbox.call(ctx, "fs.list", map[string]any{"path": path}, &ws); err != nil {
		return nil, err
	}
	out := make([]FsEntry, len(ws))
	for i, w := range ws {
		out[i] = FsEntry{
			Path: w.Path,
			Name: w.Name,
			Kind: FsEntryKind(w.Kind),
			Size: w.Size,
			Mode: w.Metadata.Mode,
			Stat: w.Metadata.stat(w.Path),
		}
	}
	return out, nil
}

// Stat returns a path's metadata.
func (f *SandboxFSOps) Stat(ctx context.Context, path string) (*FsStat, error) {
	var w wireFsMetadata
	if err := f.sandbox.call(ctx, "fs.stat", map[string]any{"path": path}, &w); err != nil {
		return nil, err
	}
	st := w.stat(path)
	return &st, nil
}

// Exists reports whether something exists at path.
func (f *SandboxFSOps) Exists(ctx context.Context, path string) (bool, error) {
	var ok bool
	if err := f.sandbox.call(ctx, "fs.exists", map[string]any{"path": path}, &ok); err != nil {
		return false, err
	}
	return ok, nil
}

// Mkdir creates a directory.
func (f *SandboxFSOps) Mkdir(ctx context.Context, path string) error {
	return f.sandbox.call(ctx, "fs.mkdir", map[string]any{"path": path}, nil)
}

// MkdirAll creates a directory and any missing parents.
func (f *SandboxFSOps) MkdirAll(ctx context.Context, path string) error {
	return f.sandbox.call(ctx, "fs.mkdir_all", map[string]any{"path": path}, nil)
}

// Remove deletes a file. Use RemoveDir for directories.
func (f *SandboxFSOps) Remove(ctx context.Context, path string) error {
	return f.sandbox.call(ctx, "fs.remove", map[string]any{"path": path}, nil)
}

// RemoveDir removes a directory.
func (f *SandboxFSOps) RemoveDir(ctx context.Context, path string) error {
	return f.sandbox.call(ctx, "fs.remove_dir", map[string]any{"path": path}, nil)
}

// Rename renames or moves a file or directory within the sandbox.
func (f *SandboxFSOps) Rename(ctx context.Context, src, dst string) error {
	return f.sandbox.call(ctx, "fs.rename", map[string]any{"from": src, "to": dst}, nil)
}

// Copy copies a file within the sandbox.
func (f *SandboxFSOps) Copy(ctx context.Context, src, dst string) error {
	return f.sandbox.call(ctx, "fs.copy", map[string]any{"from": src, "to": dst}, nil)
}

// CopyFromHost copies the host file hostPath to guestPath.
func (f *SandboxFSOps) CopyFromHost(ctx context.Context, hostPath, guestPath string) error {
	return f.sandbox.call(ctx, "fs.copy_from_host", map[string]any{"from": hostPath, "to": guestPath}, nil)
}

// CopyToHost copies the guest file guestPath to hostPath.
func (f *SandboxFSOps) CopyToHost(ctx context.Context, guestPath, hostPath string) error {
	return f.sandbox.call(ctx, "fs.copy_to_host", map[string]any{"from": guestPath, "to": hostPath}, nil)
}
