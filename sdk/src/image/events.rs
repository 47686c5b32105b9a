//! Pull progress: [`PullEvent`], the internal [`Events`] sender the pull and unpack steps
//! report to, and [`PullSession`], a pull running in the background.

use std::pin::Pin;
use std::task::{Context, Poll};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{MicrosandboxError, MicrosandboxResult};

/// One step of fetching and unpacking an image, in order: `Resolving`, `Resolved`, then
/// for each layer to download (layers download concurrently, so their events interleave)
/// `LayerDownloadProgress`..., `LayerDownloadComplete`, `LayerDownloadVerifying`; then for
/// each layer to unpack `LayerMaterializeStarted`, `LayerMaterializeProgress`...,
/// `LayerMaterializeComplete`; finally `Complete`. Layers already in the store have no
/// events of their own; one that another pull finished meanwhile gets only
/// `LayerDownloadComplete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PullEvent {
    /// Looking the reference up.
    Resolving {
        /// The full reference.
        reference: String,
    },
    /// The manifest is known.
    Resolved {
        /// The full reference.
        reference: String,
        /// The digest of the platform manifest.
        manifest_digest: String,
        /// Layers of the image.
        layer_count: usize,
        /// Bytes of the layer blobs not in the store yet (what this pull downloads).
        total_download_bytes: u64,
    },
    /// Bytes of a layer have arrived (counting those a killed pull had already fetched).
    LayerDownloadProgress {
        /// The layer's position in the image, bottom first, from 0.
        layer_index: usize,
        /// The layer blob's digest.
        digest: String,
        /// Bytes on disk so far.
        downloaded_bytes: u64,
        /// The blob's size.
        total_bytes: u64,
    },
    /// All of a layer's bytes have arrived.
    LayerDownloadComplete {
        /// The layer's position.
        layer_index: usize,
        /// The layer blob's digest.
        digest: String,
        /// The blob's size.
        downloaded_bytes: u64,
    },
    /// A layer is being checked against its digest.
    LayerDownloadVerifying {
        /// The layer's position.
        layer_index: usize,
        /// The layer blob's digest.
        digest: String,
    },
    /// A layer starts unpacking into the layer store.
    LayerMaterializeStarted {
        /// The layer's position.
        layer_index: usize,
        /// The digest of its uncompressed tar.
        diff_id: String,
    },
    /// Bytes of a layer blob have been unpacked.
    LayerMaterializeProgress {
        /// The layer's position.
        layer_index: usize,
        /// Bytes of the (compressed) blob read so far.
        bytes_read: u64,
        /// The blob's size.
        total_bytes: u64,
    },
    /// A layer is unpacked and verified.
    LayerMaterializeComplete {
        /// The layer's position.
        layer_index: usize,
        /// The digest of its uncompressed tar.
        diff_id: String,
    },
    /// The image is in the store, ready to use.
    Complete {
        /// The full reference.
        reference: String,
        /// Layers of the image.
        layer_count: usize,
    },
}

impl PullEvent {
    /// The event's name: `resolving`, `resolved`, `layer_download_progress`, ...
    pub fn event_type(&self) -> &'static str {
        match self {
            PullEvent::Resolving { .. } => "resolving",
            PullEvent::Resolved { .. } => "resolved",
            PullEvent::LayerDownloadProgress { .. } => "layer_download_progress",
            PullEvent::LayerDownloadComplete { .. } => "layer_download_complete",
            PullEvent::LayerDownloadVerifying { .. } => "layer_download_verifying",
            PullEvent::LayerMaterializeStarted { .. } => "layer_materialize_started",
            PullEvent::LayerMaterializeProgress { .. } => "layer_materialize_progress",
            PullEvent::LayerMaterializeComplete { .. } => "layer_materialize_complete",
            PullEvent::Complete { .. } => "complete",
        }
    }
}

/// Where pull events go (nowhere, for a plain pull).
#[derive(Debug, Clone, Default)]
pub(crate) struct Events(Option<mpsc::UnboundedSender<PullEvent>>);

impl Events {
    /// Sends an event; a receiver that went away is not an error.
    pub(crate) fn send(&self, event: PullEvent) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(event);
        }
    }
}

/// A pull (or a sandbox create that pulls) running in the background: a stream of
/// [`PullEvent`]s, then [`PullSession::result`]. Dropping the session cancels the work
/// (a partly downloaded layer is kept and resumed by the next pull).
///
/// ```no_run
/// # async fn demo() -> microsandbox::MicrosandboxResult<()> {
/// use microsandbox::{PullEvent, Sandbox};
/// let mut session = Sandbox::builder("app").image("python:3.12").create_with_progress();
/// while let Some(event) = session.next_event().await {
///     if let PullEvent::LayerDownloadProgress { layer_index, downloaded_bytes, total_bytes, .. } = event {
///         println!("layer {layer_index}: {downloaded_bytes}/{total_bytes}");
///     }
/// }
/// let sb = session.result().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PullSession<T> {
    events: mpsc::UnboundedReceiver<PullEvent>,
    task: Option<tokio::task::JoinHandle<MicrosandboxResult<T>>>,
}

impl<T: Send + 'static> PullSession<T> {
    /// Runs `work` on the runtime, handing it the event sender.
    pub(crate) fn spawn<F, Fut>(work: F) -> Self
    where
        F: FnOnce(Events) -> Fut,
        Fut: std::future::Future<Output = MicrosandboxResult<T>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(work(Events(Some(tx))));
        PullSession {
            events: rx,
            task: Some(task),
        }
    }

    /// The next event; `None` once the work has finished (successfully or not).
    pub async fn next_event(&mut self) -> Option<PullEvent> {
        self.events.recv().await
    }

    /// Waits for the work to finish and returns what it made. Events not read yet are
    /// dropped.
    pub async fn result(mut self) -> MicrosandboxResult<T> {
        let Some(task) = self.task.take() else {
            return Err(MicrosandboxError::Io(std::io::Error::other(
                "the pull session's result was already taken",
            )));
        };
        task.await
            .map_err(|e| MicrosandboxError::Io(std::io::Error::other(e)))?
    }
}

impl<T> futures_core::Stream for PullSession<T> {
    type Item = PullEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PullEvent>> {
        self.events.poll_recv(cx)
    }
}

impl<T> Drop for PullSession<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
