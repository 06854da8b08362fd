//! Build and push at the same time (README "Speed": overlap): each layer blob is uploaded as soon as
//! it is in the store, while other layers are still being compressed, and (`--upload-mode
//! stream`, the default but for ECR) a large layer is uploaded while it is compressed.
//!
//! The pipeline already announces every finished layer ([`Event::LayerBuilt`], built or taken
//! from the cache); [`LayerFeed`] is a progress observer that passes every event on and also
//! hands those layers to [`push_as_built`], which pushes them over one
//! [`Session`] at most `jobs` at a time (streamed from the file: memory stays bounded). The
//! build itself does not know about registries. When the build is done, the same task pushes
//! the image at once, beside the layer uploads still under way (one wave of blobs, not two).
//!
//! Streaming: the layer writer also says how much of a blob is in its temporary file
//! ([`Event::LayerBytes`]) and how the write ended ([`Event::LayerBytesEnd`]). Once one chunk
//! ([`crate::registry::PATCH_CHUNK`]) is there, the feed opens the file (while the writer
//! waits for the event to return, so the file is still there) and hands it to each
//! uploader that streams, which PATCHes chunks as they are written and finishes with a PUT
//! when the digest is known ([`Session::stream_layer`]). Smaller layers and cache hits go the
//! usual way. The digest of a streamed layer is claimed for its stream when the feed says it
//! is complete (before its `LayerBuilt`, in one queue, so nothing else can start it first);
//! the image push waits until the queue is drained and then for the claims.
//!
//! Correctness does not depend on this: the image push confirms every blob not yet confirmed
//! (an early upload that failed is tried again there, with its retries, and its error is the
//! one reported), and manifests, index and tags still go only after all blobs. Nothing waits
//! forever for a writer: a write that fails says so (dropped uncommitted), a build that fails
//! aborts the feed, and a feed that is closed or dropped closes every queue.

use crate::digest::Digest;
use crate::image::BuiltImage;
use crate::progress::{Event, Progress};
use crate::registry::{Finished, PushReport, RegistryError, Session};
use crate::store::BlobStore;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::{mpsc, oneshot, watch};

/// What an uploader hears from the build.
#[derive(Debug)]
enum Msg {
    /// A layer is finished and in the store ([`Event::LayerBuilt`]).
    Built(Digest, u64),
    /// A layer being written has a chunk in its temporary file `temp`: `file` reads it,
    /// `written` follows how much of it is there.
    Started {
        id: u64,
        file: Arc<File>,
        temp: PathBuf,
        written: watch::Receiver<u64>,
    },
    /// That layer is complete (sent before its `Built`).
    Finished { id: u64, digest: Digest, size: u64 },
    /// Writing that layer failed.
    Failed { id: u64 },
}

/// One uploader's end of the feed.
#[derive(Debug)]
struct Sink {
    tx: mpsc::UnboundedSender<Msg>,
    /// It uploads layers while they are written.
    streams: bool,
}

#[derive(Debug, Default)]
struct FeedState {
    /// One per uploader (one per destination repository); empty once closed.
    sinks: Vec<Sink>,
    /// Layers being written that some uploader streams: how much of each is written.
    writing: HashMap<u64, watch::Sender<u64>>,
}

/// A progress observer that also sends each finished layer to the uploader.
pub struct LayerFeed<'a> {
    inner: &'a dyn Progress,
    state: Mutex<FeedState>,
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
    rx: mpsc::UnboundedReceiver<Msg>,
    abort: watch::Receiver<bool>,
}

impl<'a> LayerFeed<'a> {
    /// A feed for one uploader that takes layers once they are complete.
    pub fn new(inner: &'a dyn Progress) -> (Self, LayerQueue) {
        let (feed, mut queues) = Self::fan_out(inner, &[false]);
        let queue = queues.pop().unwrap_or_else(|| LayerQueue {
            rx: mpsc::unbounded_channel().1,
            abort: feed.abort.subscribe(),
        });
        (feed, queue)
    }

    /// A feed whose every layer goes to each of `streams.len()` queues: one per destination
    /// repository of a push to several (the layer is built once, uploaded to each). Queue `i`
    /// also gets layers while they are written when `streams[i]` (its session's
    /// [`Session::streams_layers`]).
    pub fn fan_out(inner: &'a dyn Progress, streams: &[bool]) -> (Self, Vec<LayerQueue>) {
        let (abort, _) = watch::channel(false);
        let mut sinks = Vec::new();
        let mut queues = Vec::new();
        for &streams in streams {
            let (tx, rx) = mpsc::unbounded_channel();
            sinks.push(Sink { tx, streams });
            queues.push(LayerQueue {
                rx,
                abort: abort.subscribe(),
            });
        }
        let feed = LayerFeed {
            inner,
            state: Mutex::new(FeedState {
                sinks,
                writing: HashMap::new(),
            }),
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
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sinks.clear();
        state.writing.clear();
    }

    /// Send `msg()` to every uploader that streams.
    fn to_streams(state: &FeedState, msg: impl Fn() -> Msg) {
        for sink in state.sinks.iter().filter(|s| s.streams) {
            // The uploader may have stopped (no connection): then the image push does it all.
            let _ = sink.tx.send(msg());
        }
    }
}

impl Progress for LayerFeed<'_> {
    fn event(&self, event: Event<'_>) {
        match &event {
            Event::LayerBuilt { digest, size, .. } => {
                let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                for sink in &state.sinks {
                    let _ = sink.tx.send(Msg::Built((*digest).clone(), *size));
                }
            }
            Event::LayerBytes { id, temp, written } => {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(w) = state.writing.get(id) {
                    w.send_replace(*written);
                } else if *written >= crate::registry::PATCH_CHUNK
                    && state.sinks.iter().any(|s| s.streams)
                    // Opened now, while the writer waits for this call: the file is there.
                    // Unreadable: the layer goes the usual way.
                    && let Ok(file) = File::open(temp)
                {
                    let file = Arc::new(file);
                    let (w, rx) = watch::channel(*written);
                    Self::to_streams(&state, || Msg::Started {
                        id: *id,
                        file: Arc::clone(&file),
                        temp: temp.to_path_buf(),
                        written: rx.clone(),
                    });
                    state.writing.insert(*id, w);
                }
            }
            Event::LayerBytesEnd { id, blob } => {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                // Dropping the sender tells the uploaders nothing more will be written.
                if state.writing.remove(id).is_some() {
                    Self::to_streams(&state, || match blob {
                        Some((digest, size)) => Msg::Finished {
                            id: *id,
                            digest: (*digest).clone(),
                            size: *size,
                        },
                        None => Msg::Failed { id: *id },
                    });
                }
            }
            _ => {}
        }
        self.inner.event(event);
    }
}

/// Connect (`connect`), then push each layer from `queue` as it arrives (`--jobs` at a time:
/// the session's slots), or while it is written when the session streams, until the feed is
/// closed; and as soon as `image` holds the built image, push it
/// ([`Session::push_image`]: its blobs not yet confirmed, manifests, index, `tags`) while
/// the early uploads finish: it waits only for the blobs it names, so configs go in the same
/// wave as the last layers instead of after them. Returns the session (for the referrers)
/// and what the push did, or why it could not connect or push, or None when the feed was
/// aborted or no image came (the build failed). Early upload failures are left for the image
/// push to retry and report.
pub async fn push_as_built<F>(
    connect: F,
    queue: LayerQueue,
    mut image: watch::Receiver<Option<Arc<BuiltImage>>>,
    tags: &[String],
    store: &BlobStore,
    progress: &dyn Progress,
) -> Result<Option<(Session, PushReport)>, RegistryError>
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
    let work = Box::pin(async {
        let session = Box::pin(connect).await?;
        let (drained_tx, drained) = oneshot::channel();
        let push = async {
            let built = match image.wait_for(Option::is_some).await {
                Ok(built) => built.clone(),
                Err(_) => None,
            };
            // Every layer streamed is claimed by then (its `Finished` came before the image).
            let _ = drained.await;
            match built {
                // On the heap: the image push is a large future, and this task runs on a
                // plain thread's stack.
                Some(built) => Box::pin(session.push_image(&built, store, tags, progress))
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let ((), pushed) = futures::join!(upload(&session, rx, store, drained_tx, progress), push);
        Ok(pushed?.map(|report| (session, report)))
    });
    tokio::select! {
        biased;
        () = aborted => Ok(None),
        r = work => r,
    }
}

/// Take messages from `rx` until the feed is closed (then say so on `drained`): push each
/// finished layer ([`Session::push_layer`], at most `--jobs` at once, by the session's
/// slots), stream each layer being written ([`Session::stream_layer`]), and claim each
/// streamed layer's digest when it is complete, so that it is pushed by its stream only.
async fn upload(
    session: &Session,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    store: &BlobStore,
    drained: oneshot::Sender<()>,
    progress: &dyn Progress,
) {
    let mut tasks: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + '_>>> =
        FuturesUnordered::new();
    // Streams waiting to hear that their layer is complete.
    let mut streams: HashMap<u64, oneshot::Sender<Finished>> = HashMap::new();
    // Layers their streams push (or someone else does): their `Built` is not pushed again.
    let mut streamed: HashSet<Digest> = HashSet::new();
    let mut drained = Some(drained);
    loop {
        tokio::select! {
            msg = rx.recv(), if drained.is_some() => match msg {
                None => {
                    // The feed is closed: a stream still waiting hears that its layer
                    // will not come.
                    streams.clear();
                    if let Some(d) = drained.take() {
                        let _ = d.send(());
                    }
                }
                Some(Msg::Built(digest, size)) => {
                    if !streamed.contains(&digest) {
                        tasks.push(Box::pin(async move {
                            if let Err(e) = session.push_layer(&digest, size, store, progress).await {
                                progress.event(Event::Debug(&format!(
                                    "early upload of {digest} failed ({e}); the image push tries again"
                                )));
                            }
                        }));
                    }
                }
                Some(Msg::Started { id, file, temp, written }) => {
                    if session.streams_layers() {
                        let (tx, finished) = oneshot::channel();
                        streams.insert(id, tx);
                        tasks.push(Box::pin(
                            session.stream_layer(file, temp, written, finished, store, progress),
                        ));
                    }
                }
                Some(Msg::Finished { id, digest, size }) => {
                    if let Some(tx) = streams.remove(&id) {
                        let claim = session.claim(&digest);
                        streamed.insert(digest.clone());
                        let _ = tx.send(Finished { digest, size, claim });
                    }
                }
                Some(Msg::Failed { id }) => {
                    streams.remove(&id);
                }
            },
            Some(()) = tasks.next(), if !tasks.is_empty() => {}
            else => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    #[test]
    fn a_layer_being_written_goes_to_streaming_queues_with_its_end_before_its_built() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join(".tmp-layer");
        std::fs::write(&temp, b"compressed").unwrap();
        let (feed, mut queues) = LayerFeed::fan_out(&Silent, &[true, false]);
        let chunk = crate::registry::PATCH_CHUNK;
        let bytes = |id, written| Event::LayerBytes {
            id,
            temp: &temp,
            written,
        };
        // Less than a chunk: nothing yet.
        feed.event(bytes(1, chunk - 1));
        assert!(queues[0].rx.try_recv().is_err());
        feed.event(bytes(1, chunk));
        let Ok(Msg::Started {
            id: 1, mut written, ..
        }) = queues[0].rx.try_recv()
        else {
            panic!("no Started");
        };
        feed.event(bytes(1, chunk + 5));
        assert_eq!(*written.borrow_and_update(), chunk + 5);
        let digest = Digest::of(b"x");
        feed.event(Event::LayerBytesEnd {
            id: 1,
            blob: Some((&digest, 9)),
        });
        feed.event(Event::LayerBuilt {
            digest: &digest,
            size: 9,
            what: "layer",
        });
        assert!(matches!(
            queues[0].rx.try_recv(),
            Ok(Msg::Finished { id: 1, size: 9, .. })
        ));
        // Nothing more will be written: the stream hears it.
        assert!(written.has_changed().is_err());
        assert!(matches!(queues[0].rx.try_recv(), Ok(Msg::Built(_, 9))));
        // A queue that does not stream hears only of the finished layer.
        assert!(matches!(queues[1].rx.try_recv(), Ok(Msg::Built(_, 9))));
        assert!(queues[1].rx.try_recv().is_err());

        // A write that fails ends its stream; one that never had a chunk says nothing.
        feed.event(bytes(2, 2 * chunk));
        assert!(matches!(
            queues[0].rx.try_recv(),
            Ok(Msg::Started { id: 2, .. })
        ));
        feed.event(Event::LayerBytesEnd { id: 2, blob: None });
        assert!(matches!(queues[0].rx.try_recv(), Ok(Msg::Failed { id: 2 })));
        feed.event(Event::LayerBytesEnd { id: 3, blob: None });
        assert!(queues[0].rx.try_recv().is_err());

        // Closed (or aborted): every queue ends, and streams still open hear it too.
        feed.event(bytes(4, chunk));
        let Ok(Msg::Started { written, .. }) = queues[0].rx.try_recv() else {
            panic!("no Started");
        };
        feed.abort();
        assert!(written.has_changed().is_err());
        for q in &mut queues {
            assert!(matches!(
                q.rx.try_recv(),
                Err(mpsc::error::TryRecvError::Disconnected)
            ));
        }
    }
}
