//! Build and push at the same time (README "Speed": overlap): each layer blob is uploaded as soon as
//! it is in the store, while other layers are still being compressed.
//!
//! The pipeline already announces every finished layer ([`Event::LayerBuilt`], built or taken
//! from the cache); [`LayerFeed`] is a progress observer that passes every event on and also
//! hands those layers to [`upload_as_built`], which pushes them over one
//! [`Session`] at most `jobs` at a time (streamed from the file: memory stays bounded). The
//! build itself does not know about registries.
//!
//! Correctness does not depend on this: the image push that follows confirms every blob not
//! yet confirmed (an early upload that failed is tried again there, with its retries, and its
//! error is the one reported), and manifests, index and tags still go only after all blobs.

use crate::digest::Digest;
use crate::progress::{Event, Progress};
use crate::registry::{RegistryError, Session};
use crate::store::BlobStore;
use futures::StreamExt as _;
use std::sync::{Mutex, PoisonError};
use tokio::sync::{mpsc, watch};

type Layer = (Digest, u64);

/// A progress observer that also sends each finished layer to the uploader.
pub struct LayerFeed<'a> {
    inner: &'a dyn Progress,
    /// One sender per uploader (one per destination repository); empty once closed.
    tx: Mutex<Vec<mpsc::UnboundedSender<Layer>>>,
    /// Set by [`LayerFeed::abort`]: the uploader drops what it is doing and returns.
    abort: watch::Sender<bool>,
}

impl std::fmt::Debug for LayerFeed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerFeed").finish_non_exhaustive()
    }
}

/// The receiving end of a [`LayerFeed`].
#[derive(Debug)]
pub struct LayerQueue {
    rx: mpsc::UnboundedReceiver<Layer>,
    abort: watch::Receiver<bool>,
}

impl<'a> LayerFeed<'a> {
    pub fn new(inner: &'a dyn Progress) -> (Self, LayerQueue) {
        let (feed, mut queues) = Self::fan_out(inner, 1);
        let queue = queues.pop().unwrap_or_else(|| LayerQueue {
            rx: mpsc::unbounded_channel().1,
            abort: feed.abort.subscribe(),
        });
        (feed, queue)
    }

    /// A feed whose every layer goes to each of `n` queues: one per destination repository
    /// of a push to several (the layer is built once, uploaded to each).
    pub fn fan_out(inner: &'a dyn Progress, n: usize) -> (Self, Vec<LayerQueue>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let (abort, _) = watch::channel(false);
        let queues = rxs
            .into_iter()
            .map(|rx| LayerQueue {
                rx,
                abort: abort.subscribe(),
            })
            .collect();
        let feed = LayerFeed {
            inner,
            tx: Mutex::new(txs),
            abort,
        };
        (feed, queues)
    }

    /// The build failed: the uploader stops at once (uploads in flight are dropped, their
    /// upload sessions left to expire on the registry), so the run ends with the build's error
    /// instead of waiting for layers nobody will tag.
    pub fn abort(&self) {
        self.close();
        self.abort.send_replace(true);
    }

    /// No more layers: the uploader finishes what it has and returns.
    pub fn close(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Progress for LayerFeed<'_> {
    fn event(&self, event: Event<'_>) {
        if let Event::LayerBuilt { digest, size, .. } = &event {
            for tx in &*self.tx.lock().unwrap_or_else(PoisonError::into_inner) {
                // The uploader may have stopped (no connection): then the image push does it all.
                let _ = tx.send(((*digest).clone(), *size));
            }
        }
        self.inner.event(event);
    }
}

/// Connect (`connect`), then push each layer from `queue` as it arrives, `jobs` at a time,
/// until the feed is closed. Returns the session for the image push, or why it could not
/// connect, or None when the feed was aborted (the build failed). Upload failures are left
/// for the image push to retry and report.
pub async fn upload_as_built<F>(
    connect: F,
    queue: LayerQueue,
    store: &BlobStore,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Option<Session>, RegistryError>
where
    F: Future<Output = Result<Session, RegistryError>>,
{
    let LayerQueue { rx, mut abort } = queue;
    let aborted = async move {
        // The sender lives as long as the feed; if it is gone, nobody can abort.
        if abort.wait_for(|a| *a).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased;
        () = aborted => Ok(None),
        r = upload(connect, rx, store, jobs, progress) => r.map(Some),
    }
}

async fn upload<F>(
    connect: F,
    rx: mpsc::UnboundedReceiver<Layer>,
    store: &BlobStore,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Session, RegistryError>
where
    F: Future<Output = Result<Session, RegistryError>>,
{
    let session = connect.await?;
    let layers = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|layer| (layer, rx))
    });
    let session_ref = &session;
    layers
        .for_each_concurrent(jobs.max(1), |(digest, size)| async move {
            if let Err(e) = session_ref.push_layer(&digest, size, store, progress).await {
                progress.event(Event::Debug(&format!(
                    "early upload of {digest} failed ({e}); the image push tries again"
                )));
            }
        })
        .await;
    Ok(session)
}
