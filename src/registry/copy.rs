//! The wire side of `imgbuild copy` and `imgbuild tag`: one repository seen as a source or a
//! destination of manifests and blobs, moved without being rebuilt or re-serialised.
//!
//! - Manifests travel as the exact bytes fetched, under the media type the registry served
//!   them with (`Content-Type`), so the digest cannot change (distribution-spec spec.md
//!   "Pulling manifests" / "Pushing manifests").
//! - Blobs: already in the destination -> skipped (HEAD); same registry -> cross-repository
//!   mount (`POST ?mount=&from=`, a 202 falls back to a copy); otherwise streamed from the
//!   source's GET into the destination's PUT, hashed on the way (`Puller::copy_to`).
//! - Referrers (distribution-spec v1.1 "Listing Referrers"): `GET /v2/<name>/referrers/<digest>`,
//!   and for registries without that API the fallback tag `sha256-<hex>` holding an index of
//!   the referrers ("Referrers Tag Schema").

use super::client::{Client, display_url, is_html, unexpected};
use super::pull::{MANIFEST_ACCEPT, Puller, read_limited};
use super::upload::{Mount, mount};
use super::{RegistryError, RegistryOptions};
use crate::digest::Digest;
use crate::image::Descriptor;
use crate::progress::{Event, Progress};
use crate::reference::Repository;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::ACCEPT;
use serde_json::Value;

/// The OCI image index media type (the referrers API answers with one).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A manifest or index exactly as a registry served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawManifest {
    pub bytes: Bytes,
    pub digest: Digest,
    /// The `Content-Type` it was served with (else its `mediaType` field, else what its shape
    /// says): the type it is pushed with.
    pub media_type: String,
}

impl RawManifest {
    /// Wrap bytes from a local file (an OCI layout), typing them by their content.
    pub fn from_bytes(bytes: Bytes, media_type: Option<&str>) -> RawManifest {
        let media_type = media_type
            .map(str::to_string)
            .unwrap_or_else(|| sniff_media_type(&bytes));
        RawManifest {
            digest: Digest::of(&bytes),
            bytes,
            media_type,
        }
    }
}

/// `mediaType`, or for a document without one (allowed by OCI), what its shape says.
pub fn sniff_media_type(bytes: &[u8]) -> String {
    let doc: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    match doc["mediaType"].as_str() {
        Some(t) => t.to_string(),
        None if doc.get("manifests").is_some() => OCI_INDEX.to_string(),
        None => "application/vnd.oci.image.manifest.v1+json".to_string(),
    }
}

/// One repository of a copy: where manifests are read from or written to.
#[derive(Debug)]
pub struct Endpoint {
    puller: Puller,
    pub repo: Repository,
}

impl Endpoint {
    /// Reach `repo`'s registry. `opts.mount_from` names the repositories blobs will be mounted
    /// from (their pull access goes into the token's scope).
    pub async fn connect(
        repo: &Repository,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<Endpoint, RegistryError> {
        Ok(Endpoint {
            puller: Puller::from_client(Client::connect(repo, opts, progress).await?),
            repo: repo.clone(),
        })
    }

    fn client(&self) -> &Client {
        self.puller.client()
    }

    /// `GET /v2/<name>/manifests/<reference>`; `None` when the registry answers 404. The
    /// bytes must hash to a digest reference, or to the `Docker-Content-Digest` a tag got.
    pub async fn manifest(
        &self,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<Option<RawManifest>, RegistryError> {
        let client = self.client();
        let url = client.repo_url(&format!("manifests/{reference}"));
        client
            .retry(&format!("manifest {reference}"), progress, || async {
                let response = client
                    .send(|http| {
                        Ok(http
                            .get(url.clone())
                            .header(ACCEPT, MANIFEST_ACCEPT.join(", "))
                            .timeout(client.timeout()))
                    })
                    .await?;
                if response.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if response.status() != StatusCode::OK || is_html(response.headers()) {
                    return Err(unexpected(&url, response).await);
                }
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(|s| s.trim().to_string())
                };
                let served_digest = header("docker-content-digest");
                let content_type = header("content-type")
                    .map(|t| t.split(';').next().unwrap_or_default().trim().to_string())
                    .filter(|t| t.starts_with("application/vnd.") && t.ends_with("json"));
                let bytes = read_limited(&url, response, client.timeout()).await?;
                let digest = Digest::of(&bytes);
                let expected = reference
                    .parse::<Digest>()
                    .ok()
                    .map(|d| d.to_string())
                    .or(served_digest);
                if let Some(e) = expected
                    && e != digest.to_string()
                {
                    return Err(RegistryError::ContentMismatch {
                        url: display_url(&url),
                        expected: e.chars().take(100).collect(),
                        got: digest.to_string(),
                    });
                }
                let media_type = content_type.unwrap_or_else(|| sniff_media_type(&bytes));
                Ok(Some(RawManifest {
                    bytes,
                    digest,
                    media_type,
                }))
            })
            .await
    }

    /// `PUT /v2/<name>/manifests/<reference>` with the exact bytes. Returns whether the
    /// registry processed a `subject` (the `OCI-Subject` header, spec.md "Pushing Manifests
    /// with Subject"): if not, the referrers fallback tag must be kept by the client.
    pub async fn put_manifest(
        &self,
        manifest: &RawManifest,
        reference: &str,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        let client = self.client();
        let url = client.repo_url(&format!("manifests/{reference}"));
        let subject_processed = client
            .retry(&format!("manifest {reference}"), progress, || async {
                let response = super::upload::send_manifest(
                    client,
                    &url,
                    &manifest.media_type,
                    &manifest.bytes,
                    &manifest.digest,
                )
                .await?;
                Ok(response.headers().contains_key("oci-subject"))
            })
            .await?;
        progress.event(Event::ManifestPushed {
            reference,
            digest: &manifest.digest,
        });
        Ok(subject_processed)
    }

    /// The manifests whose `subject` is `digest`, as index entries (descriptor JSON with
    /// `artifactType` and `annotations` kept): the referrers API when the registry has it,
    /// else the `sha256-<hex>` fallback tag, else none.
    pub async fn referrers(
        &self,
        digest: &Digest,
        progress: &dyn Progress,
    ) -> Result<Vec<Value>, RegistryError> {
        let client = self.client();
        let url = client.repo_url(&format!("referrers/{digest}"));
        let api = client
            .retry(&format!("referrers of {digest}"), progress, || async {
                let response = client
                    .send(|http| {
                        Ok(http
                            .get(url.clone())
                            .header(ACCEPT, OCI_INDEX)
                            .timeout(client.timeout()))
                    })
                    .await?;
                match response.status() {
                    StatusCode::OK if !is_html(response.headers()) => {
                        Ok(Some(read_limited(&url, response, client.timeout()).await?))
                    }
                    // No referrers API (docker-registry 2.8 answers 404 for the route):
                    // spec.md "Referrers Tag Schema" says use the fallback tag.
                    StatusCode::NOT_FOUND
                    | StatusCode::BAD_REQUEST
                    | StatusCode::METHOD_NOT_ALLOWED
                    | StatusCode::NOT_IMPLEMENTED => Ok(None),
                    _ => Err(unexpected(&url, response).await),
                }
            })
            .await?;
        let index = match api {
            Some(bytes) => bytes,
            None => match self
                .manifest(&super::referrers::tag_for(digest), progress)
                .await?
            {
                Some(m) => m.bytes,
                None => return Ok(Vec::new()),
            },
        };
        let doc: Value = serde_json::from_slice(&index).map_err(|e| RegistryError::Protocol {
            url: display_url(&url),
            status: 200,
            body_snippet: format!("the referrers list is not JSON ({e})"),
            retry_after: None,
        })?;
        Ok(doc["manifests"].as_array().cloned().unwrap_or_default())
    }

    /// Keep the `sha256-<hex>` fallback tag of `subject` listing `entries` too (for a
    /// registry that does not process `subject` itself): read the index there, add what is
    /// missing, put it back.
    pub async fn add_to_fallback_tag(
        &self,
        subject: &Digest,
        entries: &[Value],
        progress: &dyn Progress,
    ) -> Result<(), RegistryError> {
        let tag = super::referrers::tag_for(subject);
        let mut doc: Value = match self.manifest(&tag, progress).await? {
            Some(m) => serde_json::from_slice(&m.bytes).unwrap_or(Value::Null),
            None => Value::Null,
        };
        if !doc["manifests"].is_array() {
            doc = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [],
            });
        }
        let list = doc["manifests"]
            .as_array_mut()
            .expect("made an array just above");
        let before = list.len();
        for e in entries {
            if !list.iter().any(|have| have["digest"] == e["digest"]) {
                list.push(e.clone());
            }
        }
        if list.len() == before {
            return Ok(());
        }
        let bytes = Bytes::from(serde_json::to_vec(&doc).map_err(|e| RegistryError::Client {
            reason: format!("serializing the referrers index: {e}"),
        })?);
        let manifest = RawManifest::from_bytes(bytes, Some(OCI_INDEX));
        self.put_manifest(&manifest, &tag, progress).await?;
        Ok(())
    }

    /// Make sure this (destination) repository has the blob `desc` of `source`: HEAD-skip,
    /// mount within one registry, else a streamed copy. `Ok(true)` if bytes were moved.
    pub async fn take_blob(
        &self,
        source: &Endpoint,
        desc: &Descriptor,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        let target = self.client();
        if super::upload::skip_if_present(target, desc, progress).await? {
            return Ok(false);
        }
        if source.repo.registry == self.repo.registry && source.repo.path != self.repo.path {
            let mounted = target
                .retry(&format!("mounting {}", desc.digest), progress, || {
                    mount(target, &desc.digest, &source.repo.path)
                })
                .await;
            match mounted {
                Ok(Mount::Mounted) => {
                    progress.event(Event::BlobSkipped {
                        digest: &desc.digest,
                        size: desc.size,
                        reason: &format!("mounted from {}", source.repo.path),
                    });
                    return Ok(false);
                }
                // 202: not mounted (its session is left unused; the copy opens its own).
                Ok(Mount::Session(_)) => {}
                // No pull right on the source repository for this token: copy instead.
                Err(RegistryError::Unauthorized { .. } | RegistryError::Denied { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        source.puller.copy_to(target, desc, progress).await?;
        Ok(true)
    }
}

/// Run `op` against the destination `repo`, taking care of ECR repositories as a push does
/// (`--create-repository`; a missing repository named with the command that creates it).
pub async fn with_repository<T, F, Fut>(
    repo: &Repository,
    opts: &RegistryOptions,
    progress: &dyn Progress,
    op: F,
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    super::ecr::with_repository(&repo.registry, &repo.path, &opts.aws, progress, op).await
}

impl Endpoint {
    /// Upload the blob `desc` from the file `path` (an OCI layout's): HEAD-skip, POST and one
    /// streamed PUT, confirmed, with retries, as for a built layer. `Ok(true)` if sent.
    pub async fn put_blob_file(
        &self,
        desc: &Descriptor,
        path: std::path::PathBuf,
        progress: &dyn Progress,
    ) -> Result<bool, RegistryError> {
        super::upload::push_layer(self.client(), &desc.digest, desc.size, path, None, progress)
            .await
    }

    /// Download the blob `desc` into `store`, verified while it streams.
    pub async fn download(
        &self,
        desc: &Descriptor,
        store: &crate::store::BlobStore,
        progress: &dyn Progress,
    ) -> Result<(), RegistryError> {
        self.puller.download(desc, store, progress).await
    }
}
