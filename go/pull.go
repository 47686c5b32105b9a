package microsandbox

import (
	"context"
	"runtime"
)

// PullEventType names a step of fetching and unpacking an image.
type PullEventType string

// The pull steps, in order: Resolving, Resolved, then for each layer to download
// (layers download concurrently, so their events interleave) LayerDownloadProgress...,
// LayerDownloadComplete, LayerDownloadVerifying; then for each layer to unpack
// LayerMaterializeStarted, LayerMaterializeProgress..., LayerMaterializeComplete;
// finally Complete. Layers already in the store have no events of their own.
const (
	PullEventResolving                PullEventType = "resolving"
	PullEventResolved                 PullEventType = "resolved"
	PullEventLayerDownloadProgress    PullEventType = "layer_download_progress"
	PullEventLayerDownloadComplete    PullEventType = "layer_download_complete"
	PullEventLayerDownloadVerifying   PullEventType = "layer_download_verifying"
	PullEventLayerMaterializeStarted  PullEventType = "layer_materialize_started"
	PullEventLayerMaterializeProgress PullEventType = "layer_materialize_progress"
	PullEventLayerMaterializeComplete PullEventType = "layer_materialize_complete"
	PullEventComplete                 PullEventType = "complete"
)

// PullEvent is one step of an image pull. Type says which; the fields that step does
// not carry are zero (Fields has exactly what the core sent).
type PullEvent struct {
	Type PullEventType
	// Reference is the full image reference (Resolving, Resolved, Complete).
	Reference string
	// ManifestDigest is the digest of the platform manifest (Resolved).
	ManifestDigest string
	// LayerCount is the number of layers of the image (Resolved, Complete).
	LayerCount int
	// TotalDownloadBytes is what this pull downloads: the layer blobs not in the store
	// yet (Resolved).
	TotalDownloadBytes uint64
	// LayerIndex is the layer's position in the image, bottom first, from 0 (layer events).
	LayerIndex int
	// Digest is the layer blob's digest (download events).
	Digest string
	// DownloadedBytes is the bytes of the blob on disk so far (LayerDownloadProgress), or
	// its size (LayerDownloadComplete).
	DownloadedBytes uint64
	// TotalBytes is the blob's size (LayerDownloadProgress, LayerMaterializeProgress).
	TotalBytes uint64
	// DiffID is the digest of the layer's uncompressed tar (materialize events).
	DiffID string
	// BytesRead is the bytes of the (compressed) blob unpacked so far
	// (LayerMaterializeProgress).
	BytesRead uint64
	// Fields is every field of the event as the core sent it, "type" excepted.
	Fields map[string]any
}

type wirePullEvent struct {
	Type               PullEventType `json:"type"`
	Reference          string        `json:"reference"`
	ManifestDigest     string        `json:"manifest_digest"`
	LayerCount         int           `json:"layer_count"`
	TotalDownloadBytes uint64        `json:"total_download_bytes"`
	LayerIndex         int           `json:"layer_index"`
	Digest             string        `json:"digest"`
	DownloadedBytes    uint64        `json:"downloaded_bytes"`
	TotalBytes         uint64        `json:"total_bytes"`
	DiffID             string        `json:"diff_id"`
	BytesRead          uint64        `json:"bytes_read"`
}

func decodePullEvent(raw rawValue) (*PullEvent, error) {
	var w wirePullEvent
	if err := raw.decode(&w); err != nil {
		return nil, newError(ErrInternal, "pull.next: "+err.Error())
	}
	var fields map[string]any
	if err := raw.decode(&fields); err != nil {
		return nil, newError(ErrInternal, "pull.next: "+err.Error())
	}
	if w.Type == "" {
		return nil, newError(ErrInternal, "pull.next: an event without a type")
	}
	delete(fields, "type")
	return &PullEvent{
		Type:               w.Type,
		Reference:          w.Reference,
		ManifestDigest:     w.ManifestDigest,
		LayerCount:         w.LayerCount,
		TotalDownloadBytes: w.TotalDownloadBytes,
		LayerIndex:         w.LayerIndex,
		Digest:             w.Digest,
		DownloadedBytes:    w.DownloadedBytes,
		TotalBytes:         w.TotalBytes,
		DiffID:             w.DiffID,
		BytesRead:          w.BytesRead,
		Fields:             fields,
	}, nil
}

// PullSession is a sandbox being created with image pull progress
// (CreateSandboxWithProgress): Recv its events until the end, then take the running
// sandbox with Result (once). Close before Result cancels the create (a partly
// downloaded layer is kept and resumed by the next pull). It is safe for concurrent
// use: Result waits for a Recv in progress.
type PullSession struct {
	h *handleRef
}

// CreateSandboxWithProgress starts creating a sandbox as CreateSandbox does, and
// returns at once with a session that reports the image pull's progress. The work goes
// on in the background until Result returns the sandbox or Close cancels it; ctx
// covers only starting it. A sandbox without an OCI image (the default root, a
// directory, a disk) pulls nothing: Recv ends at once.
func CreateSandboxWithProgress(ctx context.Context, name string, opts ...SandboxOption) (*PullSession, error) {
	args, err := createWireArgs(name, opts)
	if err != nil {
		return nil, err
	}
	var ans struct {
		Pull *uint64 `json:"pull"`
	}
	if err := call(ctx, "create_with_progress", args, &ans); err != nil {
		return nil, err
	}
	if ans.Pull == nil {
		return nil, newError(ErrInternal, "create_with_progress: no pull handle in the answer")
	}
	p := &PullSession{h: newHandleRef(*ans.Pull, "pull session")}
	runtime.SetFinalizer(p, func(p *PullSession) { releaseInBackground(p.h) })
	return p, nil
}

// Recv waits for the next pull event; (nil, nil) once the pull has finished (or there
// was nothing to pull). A failed pull reports its error from Result.
func (p *PullSession) Recv(ctx context.Context) (*PullEvent, error) {
	var raw rawValue
	if err := p.h.call(ctx, p, "pull.next", nil, &raw); err != nil {
		return nil, err
	}
	if raw.null() {
		return nil, nil
	}
	return decodePullEvent(raw)
}

// Result waits for the pull and the boot and returns the running sandbox, owned as
// CreateSandbox's is (Close it when done). It spends the session, as ExecHandle.Wait
// spends its handle; cancelling ctx while it waits cancels the create. Close afterwards
// is fine (nil).
func (p *PullSession) Result(ctx context.Context) (*Sandbox, error) {
	var ref sandboxRef
	err := consume(ctx, p.h, "pull.result", nil, &ref)
	runtime.KeepAlive(p)
	if err != nil {
		return nil, err
	}
	return newSandbox(ref), nil
}

// Close releases the session; before Result it cancels the create. Calling it again,
// or after Result, returns nil.
func (p *PullSession) Close() error {
	_, err := p.h.close()
	runtime.SetFinalizer(p, nil)
	return err
}
