//! Pushing an image: blobs first, then manifests, then the index under its tags.
//!
//! Order (distribution-spec spec.md "Pushing manifests": a registry may refuse a manifest whose
//! blobs it does not have): every layer and config of every platform is confirmed present,
//! then each platform manifest is stored by digest, and only then does the index go up (under
//! its tags, or by digest without one), so a failure never leaves a tag on a partial image.
//!
//! Round trips (a CI runner is often 20-80 ms from its registry): each stage is one wave of
//! concurrent requests, not one request after another: all blobs (layers, configs, base
//! layers) together, all platform manifests together, then the index under all its tags at
//! once (a PUT by tag stores the manifest and tags it; by digest when there is no tag). A
//! cold push is thus the ping, the four requests of one blob, and two more (manifests, the
//! index with its tags). A re-push first asks the tags for their digest ([`push_image`]): a
//! tag that already names our index makes everything else unnecessary.
//!
//! One blob (spec.md "Pushing blobs"): `HEAD /v2/<name>/blobs/<digest>`; 200 means the registry
//! has it. Otherwise `POST /v2/<name>/blobs/uploads/` opens a session (202 + `Location`), and
//! one `PUT <location>&digest=<digest>` sends the whole blob with `Content-Length`, streamed
//! from the file and hashed on the way ("monolithic upload" after POST). Not the one-request
//! POST with a body (docker-registry 2.8 answers 202 and drops the body, TESTBED.md).
//!
//! A layer still being written (`--upload-mode stream`, crate::overlap) is uploaded in
//! chunks instead ([`ChunkedUpload`]): POST once a chunk is written, one `PATCH` with
//! `Content-Range` per chunk as the compressor writes them, and when the digest is known a
//! final `PUT <location>&digest=` with the rest and the same confirming HEAD. Any doubt (an
//! error, a `Range` other than what was sent) ends the streaming and the layer goes the way
//! above once complete. Not for ECR by default: it has answered PATCHes wrongly and dropped
//! their bodies (aws/containers-roadmap#2831).
//!
//! Cross-repo mount (spec.md "Mounting a blob from another repository"): when the
//! caller knows another repository of the same registry that has the blob (the layer cache's
//! push records), it first asks for `POST ?mount=<digest>&from=<repo>` (`pull::mount`, shared
//! with base layers). 201 means mounted, nothing sent; 202 means "not mounted" (ECR answers so
//! unless a manifest in `from` references the blob): the blob is then uploaded as usual. A
//! mount the credentials may not do (401/403 for the `from` repository) falls back to a plain
//! upload.

use super::client::{Client, display_url, is_html, unexpected};
use super::{PushReport, RegistryError};
use crate::digest::{Digest, StreamHasher};
use crate::image::{BuiltImage, JsonBlob};
use crate::progress::{Event, Progress};
use crate::store::BlobStore;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Response, StatusCode, Url};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::mpsc;

/// Read size for streaming a layer file into a request body.
const CHUNK: usize = 256 * 1024;

/// Where a blob's bytes are.
#[derive(Debug)]
enum Source {
    /// A layer in the blob store.
    File(PathBuf),
    /// A config, already in memory.
    Bytes(Bytes),
}

#[derive(Debug)]
struct Blob {
    digest: Digest,
    size: u64,
    source: Source,
}

impl Blob {
    /// A layer blob streamed from its file in the store.
    fn file(digest: &Digest, size: u64, path: PathBuf) -> Blob {
        Blob {
            digest: digest.clone(),
            size,
            source: Source::File(path),
        }
    }
}

/// The blobs one session has made sure of, shared by the layers pushed while the build runs
/// and the image push: each digest is pushed once (a second caller waits for the first), and
/// a failed attempt leaves nothing behind, so the next caller tries again with its own
/// retries (the image push reports that error).
#[derive(Debug)]
pub(crate) struct Blobs {
    cells: Mutex<HashMap<Digest, Arc<Entry>>>,
    /// Streamed (layer) uploads at once: `--jobs`, for the early uploads and the image push
    /// together. Configs are small and in memory: they do not wait for a layer's slot, so
    /// every blob of an image goes in one wave.
    streams: tokio::sync::Semaphore,
}

/// One digest of [`Blobs`].
#[derive(Debug, Default)]
struct Entry {
    /// Once confirmed: whether this session uploaded it (false: it was there, or was
    /// mounted).
    cell: tokio::sync::OnceCell<bool>,
    /// Held by an upload streamed while the layer was written, from the moment its digest
    /// is known until it is finished ([`Blobs::claim`]): everyone else waits for it, then
    /// finds the blob confirmed or (if finishing failed) tries the usual way. Taken without
    /// waiting, so who goes first does not depend on which task runs first.
    claim: Arc<tokio::sync::Mutex<()>>,
}

/// The right to finish a streamed upload of a blob before anyone else tries it.
#[derive(Debug)]
pub(crate) struct Claim(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

impl Blobs {
    pub(crate) fn new(jobs: usize) -> Self {
        Blobs {
            cells: Mutex::new(HashMap::new()),
            streams: tokio::sync::Semaphore::new(jobs.max(1)),
        }
    }

    fn entry(&self, digest: &Digest) -> Arc<Entry> {
        Arc::clone(
            self.cells
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(digest.clone())
                .or_default(),
        )
    }

    /// Claim `digest` for a streamed upload about to be finished; None when it is confirmed
    /// already or another streamed upload claimed it (that one finishes it, or the usual
    /// path does).
    pub(crate) fn claim(&self, digest: &Digest) -> Option<Claim> {
        let entry = self.entry(digest);
        if entry.cell.initialized() {
            return None;
        }
        Arc::clone(&entry.claim).try_lock_owned().ok().map(Claim)
    }

    /// Finish the streamed upload `upload` of `digest` (`size` bytes) under `claim`: the
    /// final PUT and the confirming HEAD, once, remembered like any other blob (no retries:
    /// on failure the caller uploads it the usual way).
    pub(crate) async fn finish_stream(
        &self,
        client: &Client,
        upload: ChunkedUpload,
        digest: &Digest,
        size: u64,
        claim: Claim,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        let entry = self.entry(digest);
        let result = entry
            .cell
            .get_or_try_init(|| upload.finish(client, digest, size, progress))
            .await
            .copied();
        drop(claim);
        result
    }

    /// [`push_layer`] for a layer pushed while the build runs, remembered for the image push.
    pub(crate) async fn layer(
        &self,
        client: &Client,
        digest: &Digest,
        size: u64,
        path: PathBuf,
        mount_from: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        let blob = Blob::file(digest, size, path);
        self.ensure(client, &blob, mount_from, progress).await
    }

    /// Make sure the registry has `blob` (HEAD, mount or upload, confirming HEAD; with
    /// retries), unless this session already did; `Ok(true)` if it was uploaded.
    async fn ensure(
        &self,
        client: &Client,
        blob: &Blob,
        mount_from: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        let entry = self.entry(&blob.digest);
        // A streamed upload finishing this blob goes first (bounded: its requests time out).
        drop(entry.claim.lock().await);
        entry
            .cell
            .get_or_try_init(|| async {
                let _slot = match blob.source {
                    Source::File(_) => Some(
                        self.streams
                            .acquire()
                            .await
                            .expect("the semaphore is never closed"),
                    ),
                    Source::Bytes(_) => None,
                };
                push_blob(client, blob, mount_from, progress).await
            })
            .await
            .copied()
    }
}

/// Push `image` and tag it; see the module docs for the order.
///
/// Round trips (a registry is often 20-80 ms away): every blob of the image (layers, configs,
/// and the base layers `base_layers` makes sure of) goes in one wave, `blobs` holding those
/// already under way or confirmed since the build started; then all platform manifests at
/// once, and the index under all its tags at once (by digest when there is no tag).
///
/// Before that, the tags are asked for their digest (HEAD, every manifest type accepted): a
/// tag that already names our index means the repository has the index, its manifests and
/// their blobs (nothing is tagged before they are all confirmed), so none of them is sent and
/// only the tags naming something else are written. When the layer cache recorded every blob
/// of the image in this repository (`recorded`: most likely a re-push of the same build) the
/// tags are asked first and nothing else is sent until they answer (a no-op re-push is the
/// ping and one HEAD per tag); otherwise the question goes beside the blob wave and costs no
/// round trip.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn push_image<B>(
    client: &Client,
    blobs: &Blobs,
    image: &BuiltImage,
    store: &BlobStore,
    tags: &[String],
    mount_sources: &HashMap<Digest, Vec<String>>,
    recorded: &HashSet<Digest>,
    base_layers: B,
    progress: &dyn Progress,
) -> Result<PushReport, RegistryError>
where
    B: Future<Output = Result<(), RegistryError>>,
{
    // Layers first (they are the big ones, start them early), then configs; each digest once.
    // Base layers not in the store are `base_layers`' to make sure of.
    let remote: HashSet<&Digest> = image.remote_layers.iter().map(|(_, d)| &d.digest).collect();
    let layers = image.unique_layers();
    let mut seen = HashSet::new();
    let mut list = Vec::new();
    for layer in &layers {
        if !remote.contains(&layer.digest) && seen.insert(layer.digest.clone()) {
            list.push(Blob::file(
                &layer.digest,
                layer.size,
                store.path(&layer.digest),
            ));
        }
    }
    for config in image.images.iter().map(|i| &i.config) {
        if seen.insert(config.digest.clone()) {
            list.push(Blob {
                digest: config.digest.clone(),
                size: config.bytes.len() as u64,
                source: Source::Bytes(config.bytes.clone()),
            });
        }
    }
    let index = &image.index;
    let all_recorded = layers.iter().all(|l| recorded.contains(&l.digest))
        && image
            .images
            .iter()
            .all(|i| recorded.contains(&i.config.digest));

    // The stream maps plain indices: a closure taking `&Blob` would make the future not
    // provably `Send` (rustc's higher-ranked lifetime limitation).
    let list = &list;
    let wave = async {
        let ours = futures::stream::iter(0..list.len())
            .map(|i| async move {
                let from = mount_sources
                    .get(&list[i].digest)
                    .and_then(|repos| repos.first())
                    .map(String::as_str);
                blobs
                    .ensure(client, &list[i], from, progress)
                    .await
                    .map(|uploaded| (i, uploaded))
            })
            // Every blob at once: layer uploads wait for one of `blobs`' slots, configs and
            // blobs already confirmed do not.
            .buffer_unordered(list.len().max(1))
            .try_collect::<Vec<(usize, bool)>>();
        let ((), outcomes) = futures::try_join!(base_layers, ours)?;
        Ok::<_, RegistryError>(outcomes)
    };
    let (named, outcomes) = if all_recorded && !tags.is_empty() {
        let named = tags_naming(client, tags, &index.digest, progress).await?;
        if named.contains(&true) {
            (named, Vec::new())
        } else {
            (named, wave.await?)
        }
    } else {
        futures::try_join!(tags_naming(client, tags, &index.digest, progress), wave)?
    };
    let index_was_tagged = named.contains(&true);

    let mut report = PushReport {
        index_digest: index.digest.clone(),
        tags: Vec::new(),
        uploaded: Vec::new(),
        skipped: Vec::new(),
        uploaded_bytes: 0,
        index_was_tagged,
    };
    let mut outcomes = outcomes;
    outcomes.sort_unstable();
    for (i, uploaded) in outcomes {
        let blob = &list[i];
        if uploaded {
            report.uploaded.push(blob.digest.clone());
            report.uploaded_bytes += blob.size;
        } else {
            report.skipped.push(blob.digest.clone());
        }
    }

    if index_was_tagged {
        progress.event(Event::Debug(&format!(
            "the repository already has {} under a tag: no manifest or index sent",
            index.digest
        )));
    } else {
        let mut pushed = HashSet::new();
        let manifests: Vec<(&JsonBlob, String)> = image
            .images
            .iter()
            .map(|i| &i.manifest)
            .filter(|m| pushed.insert(&m.digest))
            .map(|m| (m, m.digest.to_string()))
            .collect();
        futures::future::try_join_all(
            manifests
                .iter()
                .map(|(m, reference)| put_manifest(client, m, reference, progress)),
        )
        .await?;
        // With tags, the index goes up under them (below): a PUT by tag stores the manifest
        // and points the tag at it in one request (spec.md "Pushing manifests"), a round trip
        // less than by digest and then by tag, and no tag exists before the manifests do.
        if tags.is_empty() {
            put_manifest(client, index, &index.digest.to_string(), progress).await?;
        }
    }
    let missing = tags
        .iter()
        .zip(&named)
        .filter(|(_, named)| !**named)
        .map(|(tag, _)| put_manifest(client, index, tag, progress));
    futures::future::try_join_all(missing).await?;
    report.tags = tags.to_vec();
    Ok(report)
}

/// For each of `tags`, asked all at once: does it name `digest` now?
async fn tags_naming(
    client: &Client,
    tags: &[String],
    digest: &Digest,
    progress: &dyn Progress,
) -> Result<Vec<bool>, RegistryError> {
    futures::future::try_join_all(tags.iter().map(|t| tag_names(client, t, digest, progress))).await
}

/// `HEAD /v2/<name>/manifests/<tag>` (spec.md "Checking if content exists"), every manifest
/// type accepted (a registry hides a type the client does not take): true when its
/// `Docker-Content-Digest` is `digest`. Any other answer the registry gives on purpose (no
/// such tag, no digest header, no right to read manifests, no HEAD) is "no": the image is
/// then pushed as usual. Transient failures are retried like any request.
async fn tag_names(
    client: &Client,
    tag: &str,
    digest: &Digest,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    let url = client.repo_url(&format!("manifests/{tag}"));
    client
        .retry(&format!("tag {tag}"), progress, || async {
            let response = match client
                .send(|http| {
                    Ok(http
                        .head(url.clone())
                        .header(ACCEPT, super::pull::MANIFEST_ACCEPT.join(", "))
                        .timeout(client.timeout()))
                })
                .await
            {
                Ok(response) => response,
                // May push but not read (a write-only credential): push everything.
                Err(RegistryError::Denied { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            let status = response.status();
            if status == StatusCode::OK && !is_html(response.headers()) {
                let got = response
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim);
                return Ok(got == Some(digest.to_string().as_str()));
            }
            let transient = [StatusCode::REQUEST_TIMEOUT, StatusCode::TOO_MANY_REQUESTS];
            if status.is_client_error() && !transient.contains(&status) {
                return Ok(false);
            }
            Err(unexpected(&url, response).await)
        })
        .await
}

/// Make sure the registry has the layer `digest` (`size` bytes at `path`): the same as for a
/// blob of a built image (without a session's memory of what it confirmed).
pub(crate) async fn push_layer(
    client: &Client,
    digest: &Digest,
    size: u64,
    path: PathBuf,
    mount_from: Option<&str>,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    let blob = Blob::file(digest, size, path);
    push_blob(client, &blob, mount_from, progress).await
}

/// Make sure the registry has the small blob `bytes` (a referrer's document or empty config),
/// like any other blob of a push; `Ok(true)` if it was uploaded. `known_absent`: the caller's
/// HEAD just found it missing, so the first attempt uploads at once.
pub(crate) async fn push_bytes(
    client: &Client,
    blob: &JsonBlob,
    known_absent: bool,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    let blob = Blob {
        digest: blob.digest.clone(),
        size: blob.bytes.len() as u64,
        source: Source::Bytes(blob.bytes.clone()),
    };
    push_blob_after(client, &blob, None, known_absent, progress).await
}

/// Make sure the registry has `blob`; `Ok(true)` if we uploaded it, `Ok(false)` if it was there.
async fn push_blob(
    client: &Client,
    blob: &Blob,
    mount_from: Option<&str>,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    push_blob_after(client, blob, mount_from, false, progress).await
}

/// [`push_blob`]; with `known_absent` the first attempt skips the HEAD (a retry asks again:
/// the failed attempt may have stored the blob).
async fn push_blob_after(
    client: &Client,
    blob: &Blob,
    mount_from: Option<&str>,
    known_absent: bool,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    let what = format!("blob {}", blob.digest);
    let skip_head = std::sync::atomic::AtomicBool::new(known_absent);
    client
        .retry(&what, progress, || async {
            let ask = !skip_head.swap(false, std::sync::atomic::Ordering::Relaxed);
            if ask && blob_exists(client, &blob.digest).await? {
                progress.event(Event::BlobSkipped {
                    digest: &blob.digest,
                    size: blob.size,
                    reason: "already in the registry",
                });
                return Ok(false);
            }
            let uploaded = match upload_blob(client, blob, mount_from, progress).await {
                // A mount the credentials may not do (no pull right on `from`): upload.
                Err(RegistryError::Unauthorized { .. } | RegistryError::Denied { .. })
                    if mount_from.is_some() =>
                {
                    upload_blob(client, blob, None, progress).await
                }
                other => other,
            }?;
            // The PUT (or mount) said 201, but a registry (or a proxy in front of it) can lose what it
            // acknowledged; a manifest naming a missing blob would be refused or, worse, dangle.
            // One HEAD is cheap insurance; a loss is retried like any transient fault.
            confirm_present(client, &blob.digest).await?;
            if uploaded {
                progress.event(Event::BlobDone {
                    digest: &blob.digest,
                });
            }
            Ok(uploaded)
        })
        .await
}

/// HEAD the blob of `desc` (with retries); when the registry has it, report it skipped and
/// answer true. Shared by the base-layer transfer and `copy`.
pub(crate) async fn skip_if_present(
    client: &Client,
    desc: &crate::image::Descriptor,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    let exists = client
        .retry(&format!("blob {}", desc.digest), progress, || {
            blob_exists(client, &desc.digest)
        })
        .await?;
    if exists {
        progress.event(Event::BlobSkipped {
            digest: &desc.digest,
            size: desc.size,
            reason: "already in the registry",
        });
    }
    Ok(exists)
}

/// `HEAD /v2/<name>/blobs/<digest>` (spec.md "Checking if content exists in the registry").
pub(crate) async fn blob_exists(client: &Client, digest: &Digest) -> Result<bool, RegistryError> {
    let url = client.repo_url(&format!("blobs/{digest}"));
    let response = client
        .send(|http| Ok(http.head(url.clone()).timeout(client.timeout())))
        .await?;
    match response.status() {
        // A web page answering 200 to everything must not pass for "the registry has it".
        StatusCode::OK if !is_html(response.headers()) => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(unexpected(&url, response).await),
    }
}

/// POST a session (asking to mount from `mount_from` when given), then one PUT with the whole
/// blob. `Ok(false)` when the registry mounted it instead.
async fn upload_blob(
    client: &Client,
    blob: &Blob,
    mount_from: Option<&str>,
    progress: &dyn Progress,
) -> Result<bool, RegistryError> {
    let digest = &blob.digest;
    // A wrong-sized file cannot have the right digest, and Content-Length must be true.
    if let Source::File(path) = &blob.source {
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|source| RegistryError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if len != blob.size {
            return Err(RegistryError::CorruptBlob {
                path: path.clone(),
                expected: digest.clone(),
                found: format!("{len} bytes instead of {}", blob.size),
            });
        }
    }

    let url = match mount_from {
        None => start_upload(client, digest).await?,
        Some(from) => match mount(client, digest, from).await? {
            Mount::Mounted => {
                progress.event(Event::BlobSkipped {
                    digest,
                    size: blob.size,
                    reason: &format!("mounted from {from}"),
                });
                return Ok(false);
            }
            // Not mounted: upload in the session the answer opened (one POST, not two).
            Mount::Session(url) => url,
        },
    };

    progress.event(Event::BlobStart {
        digest,
        size: blob.size,
    });
    let response = match &blob.source {
        Source::Bytes(bytes) => {
            let response = client
                .send(|http| {
                    Ok(http
                        .put(url.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .body(bytes.clone())
                        .timeout(client.timeout()))
                })
                .await?;
            progress.event(Event::BlobProgress {
                digest,
                n: blob.size,
            });
            response
        }
        Source::File(path) => put_file(client, &url, path, blob, progress).await?,
    };
    if !response.status().is_success() || is_html(response.headers()) {
        return Err(unexpected(&url, response).await);
    }
    check_digest(&url, &response, digest)?;
    Ok(true)
}

/// `POST /v2/<name>/blobs/uploads/`: open an upload session; returns the URL to PUT the
/// whole blob `digest` to.
pub(crate) async fn start_upload(client: &Client, digest: &Digest) -> Result<Url, RegistryError> {
    let start = client.repo_url("blobs/uploads/");
    let response = post_uploads(client, &start).await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(unexpected(&start, response).await);
    }
    session_url(&start, &response, digest)
}

/// What a mount request gave.
#[derive(Debug)]
pub(crate) enum Mount {
    /// 201: the blob is in the repository now.
    Mounted,
    /// 202: not mounted, but the answer opened an upload session; the URL to PUT the blob to.
    Session(Url),
}

/// `POST /v2/<name>/blobs/uploads/?mount=<digest>&from=<repo>` (spec.md "Mounting a blob from
/// another repository"). A registry may decline with 202 (ECR does unless a manifest in
/// `from` references the blob, TESTBED.md); that answer is an upload session, used as is.
pub(crate) async fn mount(
    client: &Client,
    digest: &Digest,
    from: &str,
) -> Result<Mount, RegistryError> {
    let mut start = client.repo_url("blobs/uploads/");
    start
        .query_pairs_mut()
        .append_pair("mount", &digest.to_string())
        .append_pair("from", from);
    let response = post_uploads(client, &start).await?;
    match response.status() {
        StatusCode::CREATED => Ok(Mount::Mounted),
        StatusCode::ACCEPTED => session_url(&start, &response, digest).map(Mount::Session),
        _ => Err(unexpected(&start, response).await),
    }
}

/// The empty POST that starts an upload (or a mount).
async fn post_uploads(client: &Client, start: &Url) -> Result<Response, RegistryError> {
    client
        .send(|http| {
            Ok(http
                .post(start.clone())
                .header(CONTENT_LENGTH, 0)
                .timeout(client.timeout()))
        })
        .await
}

/// The PUT URL of the session a 202 answer to `start` opened.
fn session_url(start: &Url, response: &Response, digest: &Digest) -> Result<Url, RegistryError> {
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| no_location(start, 202))?;
    upload_url(start, location, digest)
}

/// Stream the file at `path` as the body of `PUT url`, hashing it on the way, with a stall
/// watchdog ([`put_watched`]).
async fn put_file(
    client: &Client,
    url: &Url,
    path: &Path,
    blob: &Blob,
    progress: &dyn Progress,
) -> Result<Response, RegistryError> {
    let digest = &blob.digest;
    let mut hasher = Arc::new(Mutex::new(StreamHasher::default()));
    let result = put_watched(
        client,
        url,
        digest,
        blob.size,
        |tx| {
            let file = std::fs::File::open(path).map_err(|source| RegistryError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            // A fresh hasher per attempt (send() rebuilds the request after a 401).
            hasher = Arc::new(Mutex::new(StreamHasher::default()));
            Ok(file_body(
                tokio::fs::File::from_std(file),
                Arc::clone(&hasher),
                tx,
            ))
        },
        progress,
    )
    .await;
    // If every byte went out, they must have been the right ones: otherwise the store is
    // corrupt, whatever the registry answered (it would say DIGEST_INVALID).
    if let Some(got) = sent_other_bytes(&hasher, blob.size, digest) {
        return Err(RegistryError::CorruptBlob {
            path: path.to_path_buf(),
            expected: digest.clone(),
            found: format!("content hashing to {got}"),
        });
    }
    result
}

/// What the bytes hashed in `hasher` hash to, when all `size` of them went out and they are
/// not `digest`.
fn sent_other_bytes(hasher: &Mutex<StreamHasher>, size: u64, digest: &Digest) -> Option<Digest> {
    let (got, hashed) = hasher
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .finish();
    (hashed == size && got != *digest).then_some(got)
}

/// The confirming `HEAD` after an upload: the registry has `digest`, or [`RegistryError::BlobMissing`]
/// (retried like a transient fault by the caller's retry loop).
async fn confirm_present(client: &Client, digest: &Digest) -> Result<(), RegistryError> {
    if blob_exists(client, digest).await? {
        Ok(())
    } else {
        Err(RegistryError::BlobMissing {
            url: display_url(&client.repo_url(&format!("blobs/{digest}"))),
            digest: digest.clone(),
        })
    }
}

/// `PUT url` with the `length`-byte body `body` makes (called again when the request is
/// re-sent after a 401; it reports each piece taken on the sender it is given, as
/// [`Event::BlobProgress`] of `digest`), with a stall watchdog: if no piece is taken for the
/// timeout and no answer came, give up.
async fn put_watched<F>(
    client: &Client,
    url: &Url,
    digest: &Digest,
    length: u64,
    mut body: F,
    progress: &dyn Progress,
) -> Result<Response, RegistryError>
where
    F: FnMut(mpsc::UnboundedSender<u64>) -> Result<reqwest::Body, RegistryError>,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
    let result = {
        let send = client.send(|http| {
            Ok(http
                .put(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, length)
                .body(body(tx.clone())?))
        });
        tokio::pin!(send);
        let timeout = client.timeout();
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut taken: u64 = 0;
        loop {
            tokio::select! {
                result = &mut send => break result,
                Some(n) = rx.recv() => {
                    progress.event(Event::BlobProgress { digest, n });
                    taken += n;
                    deadline = tokio::time::Instant::now() + timeout;
                    if taken >= length {
                        // Everything is taken, but up to the socket buffers' worth (tens of
                        // MB on Linux) may not be read by the registry yet: a registry reading
                        // slowly but steadily still has it to read before it answers.
                        deadline += drain_allowance(length);
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    break Err(RegistryError::Timeout { url: display_url(url), secs: timeout.as_secs() });
                }
            }
        }
    };
    while let Ok(n) = rx.try_recv() {
        progress.event(Event::BlobProgress { digest, n });
    }
    result
}

/// The slowest steady reading rate a registry may have without being called stalled.
const SLOWEST_READ_BYTES_PER_SEC: u64 = 1_000_000;
/// At most this much of a body can sit in kernel socket buffers (Linux: `tcp_wmem` 4 MiB +
/// `tcp_rmem` up to 32 MiB by default) after we have handed it over.
const MAX_IN_FLIGHT: u64 = 36 << 20;

/// Extra time, after the last byte of a `size`-byte body was handed to the connection, for
/// a registry reading at [`SLOWEST_READ_BYTES_PER_SEC`] to read what is still in flight.
fn drain_allowance(size: u64) -> std::time::Duration {
    std::time::Duration::from_millis(size.min(MAX_IN_FLIGHT) * 1000 / SLOWEST_READ_BYTES_PER_SEC)
}

fn file_body(
    file: tokio::fs::File,
    hasher: Arc<Mutex<StreamHasher>>,
    tx: mpsc::UnboundedSender<u64>,
) -> reqwest::Body {
    hashed_body(
        tokio_util::io::ReaderStream::with_capacity(file, CHUNK),
        hasher,
        tx,
    )
}

/// `pieces` as a request body, each piece hashed into `hasher` and its length reported on
/// `tx` as it is taken.
fn hashed_body<S>(
    pieces: S,
    hasher: Arc<Mutex<StreamHasher>>,
    tx: mpsc::UnboundedSender<u64>,
) -> reqwest::Body
where
    S: futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    reqwest::Body::wrap_stream(pieces.inspect_ok(move |piece| {
        hasher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(piece);
        let _ = tx.send(piece.len() as u64);
    }))
}

/// Bytes `start..end` of `file` as a request body, read at their offsets (the descriptor's
/// position is not used: several uploads may share it), hashed on the way, each piece's
/// length reported on `tx`.
fn range_body(
    file: Arc<std::fs::File>,
    start: u64,
    end: u64,
    hasher: Arc<Mutex<StreamHasher>>,
    tx: mpsc::UnboundedSender<u64>,
) -> reqwest::Body {
    let stream = futures::stream::try_unfold(start, move |at| {
        let file = Arc::clone(&file);
        async move {
            if at >= end {
                return Ok(None);
            }
            let len = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let piece = read_at(file, at, len).await?;
            Ok::<_, std::io::Error>(Some((piece, at + len as u64)))
        }
    });
    hashed_body(stream, hasher, tx)
}

/// `len` bytes of `file` at `offset` (a blocking read, off the async threads).
async fn read_at(file: Arc<std::fs::File>, offset: u64, len: usize) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt as _;
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Bytes per PATCH of a layer uploaded while it is written, and the least a layer must have
/// written before such an upload starts (smaller layers go up whole when complete: one PUT
/// is fewer requests). 4 MiB: GHCR refuses PATCH bodies over 4 MiB (TESTBED.md), and a
/// chunk is read into memory whole (bounded: one per upload); small enough that the last
/// chunk, sent after compression ends, is quick. ECR, which wants parts of at least 5 MiB,
/// is not streamed to by default (its chunked uploads are broken, see [`ChunkedUpload`]).
pub(crate) const PATCH_CHUNK: u64 = 4 << 20;

/// A layer uploaded while it is being written (spec.md "Pushing a blob in chunks"): `POST`
/// opens a session once a chunk is ready, each [`PATCH_CHUNK`] of the temporary file goes as
/// `PATCH <location>` with `Content-Range: <start>-<end>` as soon as it is written, and once
/// the layer is complete and its digest known, `PUT <location>&digest=<digest>` carries the
/// rest, then a HEAD confirms the blob, as for a whole upload.
///
/// Each answer's `Location` is followed, and its `Range` must say the registry has exactly
/// the bytes sent (ECR has answered chunked uploads wrongly and dropped PATCH bodies,
/// aws/containers-roadmap#2831): any other answer, or any failure, ends the streaming, and
/// the layer is uploaded whole the usual way (with retries) once complete. The bytes are
/// hashed as they are sent; the final PUT checks them against the compressor's digest, as
/// [`put_file`] does. The file is read through a descriptor opened while it was being
/// written, so its rename to its digest does not matter.
#[derive(Debug)]
pub(crate) struct ChunkedUpload {
    file: Arc<std::fs::File>,
    /// The temporary file's name, for messages.
    temp: PathBuf,
    /// The session's URL (the last answer's `Location`); None before the POST.
    url: Option<Url>,
    /// Bytes the registry has taken (its `Range` said so).
    sent: u64,
    /// Of those bytes.
    hasher: StreamHasher,
}

impl ChunkedUpload {
    pub(crate) fn new(file: Arc<std::fs::File>, temp: PathBuf) -> Self {
        ChunkedUpload {
            file,
            temp,
            url: None,
            sent: 0,
            hasher: StreamHasher::default(),
        }
    }

    /// Whether the session is open (a chunk was ready).
    pub(crate) fn started(&self) -> bool {
        self.url.is_some()
    }

    /// Send every whole chunk of the first `written` bytes not sent yet (opening the session
    /// first if needed).
    pub(crate) async fn send_chunks(
        &mut self,
        client: &Client,
        written: u64,
    ) -> Result<(), RegistryError> {
        while written.saturating_sub(self.sent) >= PATCH_CHUNK {
            let url = match &self.url {
                Some(url) => url.clone(),
                None => open_session(client).await?,
            };
            self.url = Some(url.clone());
            let len = usize::try_from(PATCH_CHUNK).unwrap_or(usize::MAX);
            let chunk = read_at(Arc::clone(&self.file), self.sent, len)
                .await
                .map_err(|source| RegistryError::Io {
                    path: self.temp.clone(),
                    source,
                })?;
            self.url = Some(patch(client, &url, self.sent, chunk.clone()).await?);
            self.hasher.update(&chunk);
            self.sent += PATCH_CHUNK;
        }
        Ok(())
    }

    /// The layer is complete: `PUT` the rest with its digest, check that what was sent hashes
    /// to it, confirm with a HEAD. `Ok(true)`: uploaded.
    async fn finish(
        self,
        client: &Client,
        digest: &Digest,
        size: u64,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        let corrupt = |found: String| RegistryError::CorruptBlob {
            path: self.temp.clone(),
            expected: digest.clone(),
            found,
        };
        let Some(mut url) = self.url.clone() else {
            return Err(RegistryError::Client {
                reason: "a streamed upload was finished before it started".into(),
            });
        };
        if size < self.sent {
            return Err(corrupt(format!(
                "{size} bytes, fewer than the {} already sent",
                self.sent
            )));
        }
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        progress.event(Event::BlobStart { digest, size });
        progress.event(Event::BlobProgress {
            digest,
            n: self.sent,
        });
        let hasher = Arc::new(Mutex::new(self.hasher.clone()));
        let response = put_watched(
            client,
            &url,
            digest,
            size - self.sent,
            |tx| {
                // Each attempt starts from the chunks the registry has.
                *hasher.lock().unwrap_or_else(PoisonError::into_inner) = self.hasher.clone();
                Ok(range_body(
                    Arc::clone(&self.file),
                    self.sent,
                    size,
                    Arc::clone(&hasher),
                    tx,
                ))
            },
            progress,
        )
        .await;
        if let Some(got) = sent_other_bytes(&hasher, size, digest) {
            return Err(corrupt(format!("content hashing to {got}")));
        }
        let response = response?;
        if !response.status().is_success() || is_html(response.headers()) {
            return Err(unexpected(&url, response).await);
        }
        check_digest(&url, &response, digest)?;
        confirm_present(client, digest).await?;
        progress.event(Event::BlobDone { digest });
        Ok(true)
    }
}

/// `POST /v2/<name>/blobs/uploads/` for a chunked upload: the session's URL.
async fn open_session(client: &Client) -> Result<Url, RegistryError> {
    let start = client.repo_url("blobs/uploads/");
    let response = post_uploads(client, &start).await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(unexpected(&start, response).await);
    }
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| no_location(&start, 202))?;
    join_location(&start, location, 202)
}

/// `PATCH url` with `chunk`, the bytes from `start` on (spec.md "Pushing a blob in chunks"):
/// the answer must be 202 with a `Range` ending at the chunk's last byte; returns its
/// `Location`, where the next request goes.
async fn patch(client: &Client, url: &Url, start: u64, chunk: Bytes) -> Result<Url, RegistryError> {
    let len = chunk.len() as u64;
    let end = start + len - 1;
    let response = client
        .send(|http| {
            Ok(http
                .patch(url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, len)
                .header(CONTENT_RANGE, format!("{start}-{end}"))
                .body(chunk.clone())
                .timeout(client.timeout() + drain_allowance(len)))
        })
        .await?;
    if response.status() != StatusCode::ACCEPTED || is_html(response.headers()) {
        return Err(unexpected(url, response).await);
    }
    let range = response
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let want = format!("0-{end}");
    if range.map(|r| r.strip_prefix("bytes=").unwrap_or(r)) != Some(want.as_str()) {
        return Err(RegistryError::Protocol {
            url: display_url(url),
            status: 202,
            body_snippet: format!(
                "the upload's Range is {} after bytes {start}-{end} were sent (expected {want})",
                range.unwrap_or("missing")
            ),
            retry_after: None,
        });
    }
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| no_location(url, 202))?;
    join_location(url, location, 202)
}

fn no_location(url: &Url, status: u16) -> RegistryError {
    RegistryError::Protocol {
        url: display_url(url),
        status,
        body_snippet: "the answer has no (readable) Location header".into(),
        retry_after: None,
    }
}

/// `PUT /v2/<name>/manifests/<reference>` with the exact bytes we hashed (spec.md "Pushing
/// manifests"); `reference` is the digest or a tag.
pub(crate) async fn put_manifest(
    client: &Client,
    manifest: &JsonBlob,
    reference: &str,
    progress: &dyn Progress,
) -> Result<(), RegistryError> {
    let url = client.repo_url(&format!("manifests/{reference}"));
    let what = format!("manifest {reference}");
    client
        .retry(&what, progress, || async {
            send_manifest(
                client,
                &url,
                &manifest.media_type,
                &manifest.bytes,
                &manifest.digest,
            )
            .await
            .map(|_| ())
        })
        .await?;
    progress.event(Event::ManifestPushed {
        reference,
        digest: &manifest.digest,
    });
    Ok(())
}

/// The registry's `Docker-Content-Digest`, when it sends one, must be what we sent.
/// One `PUT /v2/<name>/manifests/<reference>` attempt (`url`) with the exact bytes: an answer
/// that is not a success, a web page, or a `Docker-Content-Digest` other than `digest` is an
/// error. Shared by the image push and `copy`.
pub(crate) async fn send_manifest(
    client: &Client,
    url: &Url,
    media_type: &str,
    bytes: &Bytes,
    digest: &Digest,
) -> Result<Response, RegistryError> {
    let response = client
        .send(|http| {
            Ok(http
                .put(url.clone())
                .header(CONTENT_TYPE, media_type)
                .body(bytes.clone())
                .timeout(client.timeout()))
        })
        .await?;
    if !response.status().is_success() || is_html(response.headers()) {
        return Err(unexpected(url, response).await);
    }
    check_digest(url, &response, digest)?;
    Ok(response)
}

fn check_digest(url: &Url, response: &Response, expected: &Digest) -> Result<(), RegistryError> {
    let got = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match got {
        Some(got) if got != expected.to_string() => Err(RegistryError::DigestMismatch {
            url: display_url(url),
            expected: expected.clone(),
            got: got.chars().take(100).collect(),
        }),
        _ => Ok(()),
    }
}

/// The URL to PUT a blob to: the session's `Location` (absolute, or relative to the POST URL
/// `request` as HTTP says; any query such as `_state` kept) with `digest=` appended (spec.md
/// "Pushing a blob monolithically": `PUT <location>?digest=<digest>`). A Location that would
/// move us from https to http is refused.
pub(crate) fn upload_url(
    request: &Url,
    location: &str,
    digest: &Digest,
) -> Result<Url, RegistryError> {
    let mut url = join_location(request, location, 202)?;
    url.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    Ok(url)
}

/// A `Location` answered (with `status`) to `request`, as a URL: relative ones are resolved
/// against `request`; a move from https to plain http is refused.
fn join_location(request: &Url, location: &str, status: u16) -> Result<Url, RegistryError> {
    let url = request
        .join(location.trim())
        .map_err(|e| RegistryError::Protocol {
            url: display_url(request),
            status,
            body_snippet: format!("the upload Location is not a URL ({e})"),
            retry_after: None,
        })?;
    if request.scheme() == "https" && url.scheme() != "https" {
        return Err(RegistryError::Insecure {
            url: display_url(&url),
            reason: "an upload location that moves from https to plain http".into(),
        });
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations() {
        let digest = Digest::of(b"abc");
        let d = format!("digest=sha256%3A{}", digest.hex());
        let post = Url::parse("https://reg.example.com:5000/v2/team/app/blobs/uploads/")
            .expect("valid URL");
        let cases: Vec<(&str, Option<String>)> = vec![
            (
                "/v2/team/app/blobs/uploads/123?_state=a%2Bb",
                Some(format!(
                    "https://reg.example.com:5000/v2/team/app/blobs/uploads/123?_state=a%2Bb&{d}"
                )),
            ),
            (
                "https://uploads.example.net/put/123?sig=x",
                Some(format!("https://uploads.example.net/put/123?sig=x&{d}")),
            ),
            (
                "123",
                Some(format!(
                    "https://reg.example.com:5000/v2/team/app/blobs/uploads/123?{d}"
                )),
            ),
            (
                " /v2/team/app/blobs/uploads/9 ",
                Some(format!(
                    "https://reg.example.com:5000/v2/team/app/blobs/uploads/9?{d}"
                )),
            ),
            (
                "http://reg.example.com:5000/v2/team/app/blobs/uploads/1",
                None,
            ),
            ("http://[broken", None),
        ];
        for (location, want) in cases {
            let got = upload_url(&post, location, &digest)
                .ok()
                .map(|u| u.to_string());
            assert_eq!(got, want, "{location}");
        }
        // Over plain http, http locations are fine.
        let post = Url::parse("http://127.0.0.1:5000/v2/a/blobs/uploads/").expect("valid URL");
        let got = upload_url(&post, "http://127.0.0.1:5000/v2/a/blobs/uploads/x", &digest)
            .map(|u| u.to_string());
        assert_eq!(
            got.ok(),
            Some(format!("http://127.0.0.1:5000/v2/a/blobs/uploads/x?{d}"))
        );
    }
}
