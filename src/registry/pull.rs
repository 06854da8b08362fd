//! The pull side of a registry (base images, `inspect`): manifests by tag or digest, blobs
//! verified while they stream, and moving a base image's layers to the target repository —
//! cross-repository mount on the same registry, a streamed copy between registries.
//!
//! distribution-spec spec.md: "Pulling manifests" (the `Accept` header lists every manifest
//! type we understand), "Pulling blobs", "Mounting a blob from another repository". Every
//! byte received is hashed on the way and compared with the digest asked for: a registry (or
//! anything between) that hands out other content is an error, never a silent pass.

use super::client::{Client, display_url, is_html, unexpected};
use super::upload::{Mount, blob_exists, mount, start_upload};
use super::{RegistryError, RegistryOptions};
use crate::digest::{Digest, StreamHasher};
use crate::image::Descriptor;
use crate::progress::{Event, Progress};
use crate::reference::Repository;
use crate::store::BlobStore;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

/// Manifest types we can read (image-spec, and Docker's image manifest v2 schema 2).
pub const MANIFEST_ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The largest manifest or config we read into memory: distribution's own manifest limit.
pub const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// A registry repository to read from.
#[derive(Debug)]
pub struct Puller {
    client: Client,
}

impl Puller {
    /// A puller over a client already connected (the copy command's source, registry/copy.rs).
    pub(super) fn from_client(client: Client) -> Puller {
        Puller { client }
    }

    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    /// Reach `repo`'s registry (same scheme rules, credentials and token flow as a push; the
    /// token asked for is `repository:<path>:pull,push`, which token servers narrow to pull).
    pub async fn connect(
        repo: &Repository,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<Puller, RegistryError> {
        Ok(Puller {
            client: Client::connect(repo, opts, progress).await?,
        })
    }

    /// `GET /v2/<name>/manifests/<reference>`: the exact bytes and their digest. A digest
    /// reference must match what came; for a tag, the registry's `Docker-Content-Digest` (when
    /// sent) must.
    pub async fn manifest(
        &self,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<(Bytes, Digest), RegistryError> {
        let url = self.client.repo_url(&format!("manifests/{reference}"));
        self.client
            .retry(&format!("manifest {reference}"), progress, || async {
                let response = self
                    .client
                    .send(|http| {
                        Ok(http
                            .get(url.clone())
                            .header(ACCEPT, MANIFEST_ACCEPT.join(", "))
                            .timeout(self.client.timeout()))
                    })
                    .await?;
                if response.status() != StatusCode::OK {
                    return Err(unexpected(&url, response).await);
                }
                let header = response
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.trim().to_string());
                let bytes = read_limited(&url, response, self.client.timeout()).await?;
                let digest = Digest::of(&bytes);
                let expected = reference
                    .parse::<Digest>()
                    .ok()
                    .map(|d| d.to_string())
                    .or(header);
                match expected {
                    Some(e) if e != digest.to_string() => Err(RegistryError::ContentMismatch {
                        url: display_url(&url),
                        expected: crate::untrusted::shown(&e, 100),
                        got: digest.to_string(),
                    }),
                    _ => Ok((bytes, digest)),
                }
            })
            .await
    }

    /// A small blob (a config) into memory, verified.
    pub async fn small_blob(
        &self,
        digest: &Digest,
        progress: &dyn Progress,
    ) -> Result<Bytes, RegistryError> {
        let url = self.client.repo_url(&format!("blobs/{digest}"));
        self.client
            .retry(&format!("blob {digest}"), progress, || async {
                let response = self.get_blob(digest).await?;
                let bytes = read_limited(&url, response, self.client.timeout()).await?;
                let got = Digest::of(&bytes);
                if got != *digest {
                    return Err(mismatch(&url, digest, &got));
                }
                Ok(bytes)
            })
            .await
    }

    /// Stream the blob `desc` into `store`, hashing it on the way; content that is not
    /// `desc.digest` (or not `desc.size` bytes) is deleted and reported.
    pub async fn download(
        &self,
        desc: &Descriptor,
        store: &BlobStore,
        progress: &dyn Progress,
    ) -> Result<(), RegistryError> {
        let url = self.client.repo_url(&format!("blobs/{}", desc.digest));
        let io = |source| RegistryError::Io {
            path: store.root().to_path_buf(),
            source,
        };
        self.client
            .retry(&format!("blob {}", desc.digest), progress, || async {
                let response = self.get_blob(&desc.digest).await?;
                progress.event(Event::Debug(&format!(
                    "downloading base layer {} ({} bytes)",
                    desc.digest, desc.size
                )));
                let mut writer = store.writer().map_err(io)?;
                let mut stream = response.bytes_stream();
                let timeout = self.client.timeout();
                let stalled = || RegistryError::Timeout {
                    url: display_url(&url),
                    secs: timeout.as_secs(),
                };
                // A chunk at least every `timeout`, or the source stalled.
                let mut received: u64 = 0;
                while let Some(chunk) = tokio::time::timeout(timeout, stream.try_next())
                    .await
                    .map_err(|_| stalled())?
                    .map_err(|e| super::client::transport_error(&url, e, timeout))?
                {
                    received += chunk.len() as u64;
                    if received > desc.size {
                        // Never more than the descriptor says (image-spec descriptor.md:
                        // `size` lets a client verify before processing): a registry that
                        // keeps sending does not fill the disk. The temporary file goes with
                        // `writer`.
                        return Err(too_long(&url, desc.size));
                    }
                    writer.write_all(&chunk).map_err(io)?;
                }
                let (got, size) = writer.commit().map_err(io)?;
                if got != desc.digest || size != desc.size {
                    if got != desc.digest {
                        let _ = std::fs::remove_file(store.path(&got));
                    }
                    return Err(mismatch(&url, &desc.digest, &got));
                }
                progress.event(Event::LayerBuilt {
                    digest: &desc.digest,
                    size: desc.size,
                    what: "base layer, downloaded",
                });
                Ok(())
            })
            .await
    }

    /// `GET /v2/<name>/blobs/<digest>` (redirects followed; `Authorization` is not sent to
    /// another host, client.rs).
    async fn get_blob(&self, digest: &Digest) -> Result<reqwest::Response, RegistryError> {
        let url = self.client.repo_url(&format!("blobs/{digest}"));
        // The headers must come within the timeout (the body is watched chunk by chunk by
        // the callers): a registry that accepts the request and says nothing is a stall.
        let timeout = self.client.timeout();
        let response =
            tokio::time::timeout(timeout, self.client.send(|http| Ok(http.get(url.clone()))))
                .await
                .map_err(|_| RegistryError::Timeout {
                    url: display_url(&url),
                    secs: timeout.as_secs(),
                })??;
        if response.status() != StatusCode::OK {
            return Err(unexpected(&url, response).await);
        }
        Ok(response)
    }

    /// Stream the blob `desc` from this repository into `target` without holding it: the GET
    /// body becomes the PUT body, hashed on the way (spec.md "Pushing a blob monolithically":
    /// POST, then one PUT with `Content-Length`). The target registry checks the digest too.
    pub(crate) async fn copy_to(
        &self,
        target: &Client,
        desc: &Descriptor,
        progress: &dyn Progress,
    ) -> Result<(), RegistryError> {
        target
            .retry(
                &format!("copying blob {}", desc.digest),
                progress,
                || async {
                    let source = self.get_blob(&desc.digest).await?;
                    let src_url = source.url().clone();
                    let url = start_upload(target, &desc.digest).await?;
                    progress.event(Event::BlobStart {
                        digest: &desc.digest,
                        size: desc.size,
                    });
                    let hasher = Arc::new(Mutex::new(StreamHasher::default()));
                    let seen = Arc::clone(&hasher);
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
                    let stream = source.bytes_stream().inspect_ok(move |chunk| {
                        seen.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .update(chunk);
                        let _ = tx.send(chunk.len() as u64);
                    });
                    // The source stream can be sent once: a 401 on this PUT is not retried in place
                    // (the POST before it has already settled authentication).
                    let mut body = Some(reqwest::Body::wrap_stream(stream));
                    let send = target.send(|http| {
                        let body = body.take().ok_or_else(|| RegistryError::Protocol {
                            url: display_url(&url),
                            status: 401,
                            body_snippet: "authentication changed during a streamed copy".into(),
                            retry_after: None,
                        })?;
                        Ok(http
                            .put(url.clone())
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_LENGTH, desc.size)
                            .body(body))
                    });
                    let response = stall_guard(send, &mut rx, target.timeout(), &url, |n| {
                        progress.event(Event::BlobProgress {
                            digest: &desc.digest,
                            n,
                        });
                    })
                    .await?;
                    let (got, size) = hasher
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone()
                        .finish();
                    if size == desc.size && got != desc.digest {
                        return Err(mismatch(&src_url, &desc.digest, &got));
                    }
                    if !response.status().is_success() || is_html(response.headers()) {
                        return Err(unexpected(&url, response).await);
                    }
                    // Confirmed like our own blobs before a manifest names it (upload.rs: a 201 is not proof).
                    if !blob_exists(target, &desc.digest).await? {
                        return Err(RegistryError::BlobMissing {
                            url: display_url(&target.repo_url(&format!("blobs/{}", desc.digest))),
                            digest: desc.digest.clone(),
                        });
                    }
                    progress.event(Event::BlobDone {
                        digest: &desc.digest,
                    });
                    Ok(())
                },
            )
            .await
    }
}

/// Await `fut` (a streamed request), giving up when `rx` reports no bytes moved for
/// `timeout`: a stalled source or target. After the last byte, the answer must come within
/// `timeout` too. (The same watchdog as upload.rs's file uploads; reqwest's own timeouts
/// would cut off any transfer slower than the limit.)
async fn stall_guard<T>(
    fut: impl std::future::Future<Output = Result<T, RegistryError>>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
    timeout: std::time::Duration,
    url: &reqwest::Url,
    mut on_bytes: impl FnMut(u64),
) -> Result<T, RegistryError> {
    tokio::pin!(fut);
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            result = &mut fut => return result,
            Some(n) = rx.recv() => {
                on_bytes(n);
                deadline = tokio::time::Instant::now() + timeout;
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(RegistryError::Timeout { url: display_url(url), secs: timeout.as_secs() });
            }
        }
    }
}

fn mismatch(url: &reqwest::Url, expected: &Digest, got: &Digest) -> RegistryError {
    RegistryError::ContentMismatch {
        url: display_url(url),
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

/// A blob body longer than its descriptor's `size`.
fn too_long(url: &reqwest::Url, size: u64) -> RegistryError {
    RegistryError::Protocol {
        url: display_url(url),
        status: 200,
        body_snippet: format!("the blob is longer than the {size} bytes its descriptor lists"),
        retry_after: None,
    }
}

/// The body of `response` (a manifest, config or token answer), refused past
/// [`MAX_JSON_BYTES`] without reading further; a chunk must arrive at least
/// every `timeout`.
pub(crate) async fn read_limited(
    url: &reqwest::Url,
    mut response: reqwest::Response,
    timeout: std::time::Duration,
) -> Result<Bytes, RegistryError> {
    let mut body = Vec::new();
    while let Some(chunk) = tokio::time::timeout(timeout, response.chunk())
        .await
        .map_err(|_| RegistryError::Timeout {
            url: display_url(url),
            secs: timeout.as_secs(),
        })?
        .map_err(|e| super::client::transport_error(url, e, timeout))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JSON_BYTES {
            return Err(RegistryError::Protocol {
                url: display_url(url),
                status: 200,
                body_snippet: format!(
                    "an answer over {MAX_JSON_BYTES} bytes (manifests, configs and tokens are capped there)"
                ),
                retry_after: None,
            });
        }
    }
    Ok(Bytes::from(body))
}

/// Make sure `target` has every base layer of `image` that is not in the local store
/// ([`crate::image::BuiltImage::remote_layers`]), before the image's own blobs are pushed:
/// already there -> skipped (HEAD); same registry -> mounted from the base's repository;
/// otherwise (or when the mount answers 202) streamed from the base's registry. Up to
/// `opts.jobs` layers at once; each source registry is connected to once, on first need.
pub(crate) async fn transfer_base_layers(
    target: &Client,
    target_repo: &Repository,
    image: &crate::image::BuiltImage,
    opts: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<(), RegistryError> {
    let mut seen = std::collections::HashSet::new();
    let layers: Vec<&(Repository, Descriptor)> = image
        .remote_layers
        .iter()
        .filter(|(_, d)| seen.insert(&d.digest))
        .collect();
    let mut sources: Vec<Source> = Vec::new();
    for (from, _) in &layers {
        if !sources.iter().any(|s| s.repo == *from) {
            let mut opts = opts.clone();
            opts.mount_from.clear();
            // --username/--password-stdin are for the target registry only.
            if from.registry != target_repo.registry {
                opts.credentials = None;
            }
            sources.push(Source {
                repo: from.clone(),
                opts,
                puller: tokio::sync::OnceCell::new(),
            });
        }
    }
    // Plain indices, as in upload.rs: keeps the future provably `Send`.
    let (layers, sources) = (&layers, &sources);
    futures::stream::iter(0..layers.len())
        .map(|i| async move {
            let (from, desc) = layers[i];
            let source = sources
                .iter()
                .find(|s| s.repo == *from)
                .expect("every layer's source was added above");
            transfer_one(target, target_repo, source, desc, progress).await
        })
        .buffer_unordered(opts.jobs.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A base repository that layers may be copied from.
#[derive(Debug)]
struct Source {
    repo: Repository,
    opts: RegistryOptions,
    puller: tokio::sync::OnceCell<Puller>,
}

async fn transfer_one(
    target: &Client,
    target_repo: &Repository,
    source: &Source,
    desc: &Descriptor,
    progress: &dyn Progress,
) -> Result<(), RegistryError> {
    if super::upload::skip_if_present(target, desc, progress).await? {
        return Ok(());
    }
    if source.repo.registry == target_repo.registry {
        let mounted = target
            .retry(&format!("mounting {}", desc.digest), progress, || {
                mount(target, &desc.digest, &source.repo.path)
            })
            .await?;
        // A 202's session is left unused: the copy below opens its own inside its retry.
        if matches!(mounted, Mount::Mounted) {
            progress.event(Event::BlobSkipped {
                digest: &desc.digest,
                size: desc.size,
                reason: &format!("mounted from {}", source.repo.path),
            });
            return Ok(());
        }
    }
    let puller = source
        .puller
        .get_or_try_init(|| Puller::connect(&source.repo, &source.opts, progress))
        .await?;
    puller.copy_to(target, desc, progress).await
}
