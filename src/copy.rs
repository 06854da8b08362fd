//! `imgbuild copy` and `imgbuild tag`: promote an image that was already pushed, without
//! rebuilding it (crane copy / crane tag). A sink beside `layout` and `registry::push`: its
//! input is not a [`crate::image::BuiltImage`] but a manifest graph read from a registry.
//!
//! `copy SRC DST` walks the graph from SRC (an index or a manifest, by tag or digest): every
//! child manifest of an index (all platforms, attestations too), every config and layer blob,
//! and every referrer (signatures, SBOMs: OCI 1.1 referrers API or the `sha256-<hex>` fallback
//! tag) of each manifest copied, recursively. Blobs go first, then each manifest after the
//! manifests and blobs it names, then referrers, and the tag last, so an interrupted copy
//! never leaves a tag on a partial image. Manifests are pushed as the exact bytes fetched
//! under the media type they were served with: the digest at DST is the digest at SRC (a
//! Docker manifest list stays a Docker manifest list).
//!
//! `tag REF TAG...` fetches the manifest bytes of REF and puts them under each TAG.

use crate::digest::Digest;
use crate::exit::ExitCode;
use crate::image::{ANNOTATION_REF_NAME, Descriptor};
use crate::progress::{Event, Progress};
use crate::reference::{ImageRef, RefTarget, Repository, validate_tag};
use crate::registry::copy::{Endpoint, RawManifest, with_repository};
use crate::registry::{RegistryError, RegistryOptions};
use crate::store::BlobStore;
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::Value;
use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// `imgbuild copy SRC DST`.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    /// `REGISTRY/PATH:TAG` or `REGISTRY/PATH@sha256:...`.
    pub source: String,
    /// `REGISTRY/PATH[:TAG]` (no tag: the source's tag, or none when the source is a digest),
    /// or `REGISTRY/PATH@sha256:...` (must be the source's digest).
    pub destination: String,
    /// How to reach the source registry (`credentials` are used only when it is the
    /// destination's registry too: `--username` is for the destination).
    pub source_opts: RegistryOptions,
    /// How to reach the destination registry.
    pub destination_opts: RegistryOptions,
}

/// `imgbuild tag REF TAG...`.
#[derive(Debug, Clone)]
pub struct TagRequest {
    pub image: String,
    pub tags: Vec<String>,
    pub opts: RegistryOptions,
}

/// What a copy or tag did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// `REPO@sha256:...` at the destination.
    pub image_ref: String,
    pub digest: Digest,
    /// The top manifest's media type (unchanged from the source).
    pub media_type: String,
    /// Tags now pointing at it.
    pub tags: Vec<String>,
    /// Manifests put (children, the top one, referrers).
    pub manifests: usize,
    /// Referrer manifests among them.
    pub referrers: usize,
}

/// Why a copy or tag failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "{reference} not found (no such repository, tag or digest; or no such oci: layout or tag); check the name and the tag or digest"
    )]
    NotFound { reference: String },
    #[error("{reference}: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("{what} {input:?}: {reason}")]
    Usage {
        what: &'static str,
        input: String,
        reason: String,
    },
    // The cause is part of the line (main prints the chain, which would repeat it).
    #[error("{side} {reference}: {cause}")]
    Registry {
        side: &'static str,
        reference: String,
        cause: RegistryError,
    },
    /// The command line asks for something the command cannot do.
    #[error("{0}")]
    Command(String),
    /// A local file could not be written (or the async runtime not started).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CopyError {
    /// A source that does not exist or cannot be read as an image is an input problem (3);
    /// a bad reference is usage (2); registry failures keep their own codes; a local write
    /// that fails is 1.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CopyError::NotFound { .. } | CopyError::Invalid { .. } => ExitCode::Input,
            CopyError::Usage { .. } | CopyError::Command(_) => ExitCode::Usage,
            CopyError::Registry { cause, .. } => cause.exit_code(),
            CopyError::Io { .. } => ExitCode::Internal,
        }
    }
}

/// A reference split as written: `NAME[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    name: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

fn split(what: &'static str, input: &str) -> Result<Written, CopyError> {
    let usage = |reason: String| CopyError::Usage {
        what,
        input: input.to_string(),
        reason,
    };
    let (rest, digest) = match input.split_once('@') {
        Some((n, d)) => (
            n,
            Some(d.parse::<Digest>().map_err(|e| usage(e.to_string()))?),
        ),
        None => (input, None),
    };
    let last = rest.rsplit('/').next().unwrap_or(rest);
    let (name, tag) = match last.rsplit_once(':') {
        // `host:port/path` has its colon before a slash, so `last` holds no port.
        Some((_, tag)) if rest.contains('/') => {
            validate_tag(tag).map_err(|e| usage(e.to_string()))?;
            (&rest[..rest.len() - tag.len() - 1], Some(tag.to_string()))
        }
        _ => (rest, None),
    };
    Ok(Written {
        name: name.to_string(),
        tag,
        digest,
    })
}

/// The source: a registry image by tag or digest (Docker Hub short names as docker reads
/// them; no tag means `latest`).
fn parse_source(input: &str) -> Result<ImageRef, CopyError> {
    ImageRef::parse(input).map_err(|e| CopyError::Usage {
        what: "source",
        input: input.to_string(),
        reason: e.to_string(),
    })
}

/// The destination: a repository with a registry host (never Docker Hub by accident, as for
/// push), and an optional tag and digest.
fn parse_destination(input: &str) -> Result<(Repository, Written), CopyError> {
    let w = split("destination", input)?;
    let repo = Repository::parse(&w.name).map_err(|e| CopyError::Usage {
        what: "destination",
        input: input.to_string(),
        reason: e.to_string(),
    })?;
    Ok((repo, w))
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CopyError {
    let context = context.into();
    move |source| CopyError::Io { context, source }
}

fn runtime() -> Result<tokio::runtime::Runtime, CopyError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))
}

/// Copy `req.source` (with every platform and referrer) to `req.destination`.
pub fn copy(req: &CopyRequest, progress: &dyn Progress) -> Result<Copied, CopyError> {
    match (parse_layout(&req.source), parse_layout(&req.destination)) {
        (Some(_), Some(_)) => {
            return Err(CopyError::Command(
                "copy: both sides are oci: layouts; one must be a registry (copy the directory instead)".into(),
            ));
        }
        (Some((dir, tag)), None) => return layout_to_registry(req, &dir, tag.as_deref(), progress),
        (None, Some((dir, tag))) => return registry_to_layout(req, &dir, tag.as_deref(), progress),
        (None, None) => {}
    }
    let source = parse_source(&req.source)?;
    let (dst_repo, dst) = parse_destination(&req.destination)?;
    // No tag at the destination: keep the source's tag (promotion keeps the version); a
    // source named by digest gets none (a digest-only copy, like `crane copy` of a digest).
    let dst_tags: Vec<String> = match (&dst.tag, &source.target) {
        (Some(t), _) => vec![t.clone()],
        (None, RefTarget::Tag(t)) if dst.digest.is_none() && !req.source.contains('@') => {
            vec![t.clone()]
        }
        _ => Vec::new(),
    };
    let mut src_opts = req.source_opts.clone();
    src_opts.mount_from.clear();
    if source.repo.registry != dst_repo.registry {
        src_opts.credentials = None;
    }
    let mut dst_opts = req.destination_opts.clone();
    // Same registry: blobs are mounted from the source repository, so the token must also
    // cover pulling from it.
    dst_opts.mount_from =
        if source.repo.registry == dst_repo.registry && source.repo.path != dst_repo.path {
            vec![source.repo.path.clone()]
        } else {
            Vec::new()
        };
    let runtime = runtime()?;
    let copied = runtime.block_on(async {
        let src_name = source.to_string();
        let src = Endpoint::connect(&source.repo, &src_opts, progress)
            .await
            .map_err(side("source", &src_name))?;
        let top = src
            .manifest(&source.reference(), progress)
            .await
            .map_err(side("source", &src_name))?
            .ok_or_else(|| CopyError::NotFound {
                reference: src_name.clone(),
            })?;
        if let Some(d) = &dst.digest
            && *d != top.digest
        {
            return Err(CopyError::Usage {
                what: "destination",
                input: req.destination.clone(),
                reason: format!(
                    "the source is {}; a copy keeps the digest, so a destination digest must be that one (or leave it out)",
                    top.digest
                ),
            });
        }
        let dst_name = dst_repo.to_string();
        // A source document that is not what it says is an input error (3), not a registry
        // one; `with_repository` speaks only RegistryError, so it is carried out beside it.
        let invalid = std::cell::RefCell::new(None);
        let copied = with_repository(&dst_repo, &dst_opts, progress, || async {
            let target = Endpoint::connect(&dst_repo, &dst_opts, progress).await?;
            let mut walk = Walk {
                src: Source::Registry(&src),
                dst: Target::Registry(&target),
                jobs: dst_opts.jobs.max(1),
                progress,
                seen: HashSet::new(),
                manifests: 0,
                referrers: 0,
            };
            match walk.manifest(top.clone()).await {
                Ok(()) => {}
                Err(WalkError::Registry(e)) => return Err(e),
                Err(WalkError::Invalid(reason)) => {
                    let e = RegistryError::Client {
                        reason: reason.clone(),
                    };
                    *invalid.borrow_mut() = Some(reason);
                    return Err(e);
                }
            }
            for tag in &dst_tags {
                target.put_manifest(&top, tag, progress).await?;
            }
            Ok((walk.manifests, walk.referrers))
        })
        .await
        .map_err(|e| match invalid.take() {
            Some(reason) => CopyError::Invalid {
                reference: src_name.clone(),
                reason,
            },
            None => side("destination", &dst_name)(e),
        })?;
        Ok::<_, CopyError>(Copied {
            image_ref: format!("{dst_repo}@{}", top.digest),
            digest: top.digest.clone(),
            media_type: top.media_type.clone(),
            tags: dst_tags,
            manifests: copied.0,
            referrers: copied.1,
        })
    })?;
    Ok(copied)
}

/// Point each of `req.tags` at the manifest `req.image` names (its bytes are put unchanged).
pub fn tag(req: &TagRequest, progress: &dyn Progress) -> Result<Copied, CopyError> {
    let image = parse_source(&req.image)?;
    if req.tags.is_empty() {
        return Err(CopyError::Command("tag: name at least one TAG".into()));
    }
    for t in &req.tags {
        validate_tag(t).map_err(|r| CopyError::Command(format!("tag: {r}")))?;
    }
    let name = image.to_string();
    let runtime = runtime()?;
    let copied = runtime.block_on(async {
        with_repository(&image.repo, &req.opts, progress, || async {
            let endpoint = Endpoint::connect(&image.repo, &req.opts, progress).await?;
            let Some(top) = endpoint.manifest(&image.reference(), progress).await? else {
                return Ok(None);
            };
            for t in &req.tags {
                endpoint.put_manifest(&top, t, progress).await?;
            }
            Ok(Some(top))
        })
        .await
        .map_err(side("image", &name))?
        .ok_or_else(|| CopyError::NotFound {
            reference: name.clone(),
        })
    })?;
    Ok(Copied {
        image_ref: format!("{}@{}", image.repo, copied.digest),
        digest: copied.digest,
        media_type: copied.media_type,
        tags: req.tags.clone(),
        manifests: 0,
        referrers: 0,
    })
}

fn side<'r>(side: &'static str, reference: &'r str) -> impl Fn(RegistryError) -> CopyError + 'r {
    move |cause| CopyError::Registry {
        side,
        reference: reference.to_string(),
        cause,
    }
}

/// A failure inside the walk: from the registry, or a document that is not what it says.
#[derive(Debug)]
enum WalkError {
    Registry(RegistryError),
    Invalid(String),
}

impl From<RegistryError> for WalkError {
    fn from(e: RegistryError) -> Self {
        WalkError::Registry(e)
    }
}

/// The copy of one manifest graph, source to destination.
struct Walk<'a> {
    src: Source<'a>,
    dst: Target<'a>,
    jobs: usize,
    progress: &'a dyn Progress,
    /// Manifests already put (a graph can name one twice; referrers can loop).
    seen: HashSet<Digest>,
    manifests: usize,
    referrers: usize,
}

type WalkFuture<'f> = Pin<Box<dyn Future<Output = Result<(), WalkError>> + 'f>>;

impl<'a> Walk<'a> {
    /// Copy `m` after everything it names, then its referrers.
    fn manifest(&mut self, m: RawManifest) -> WalkFuture<'_> {
        Box::pin(async move {
            if !self.seen.insert(m.digest.clone()) {
                return Ok(());
            }
            let doc: Value = serde_json::from_slice(&m.bytes).map_err(|e| {
                WalkError::Invalid(format!("manifest {} is not JSON ({e})", m.digest))
            })?;
            if let Some(children) = doc["manifests"].as_array() {
                for child in children {
                    let d = descriptor(child, &m.digest)?;
                    let got = self.src.manifest(&d, self.progress).await?.ok_or_else(|| {
                        WalkError::Invalid(format!(
                            "index {} names {}, which the source does not have",
                            m.digest, d.digest
                        ))
                    })?;
                    self.manifest(got).await?;
                }
            } else {
                let mut blobs = Vec::new();
                if doc["config"].is_object() {
                    blobs.push(descriptor(&doc["config"], &m.digest)?);
                }
                for layer in doc["layers"].as_array().into_iter().flatten() {
                    // Non-distributable (foreign) layers live at their `urls`, not in the
                    // registry: left out, as docker, crane and skopeo do.
                    if layer["urls"].is_array() {
                        continue;
                    }
                    blobs.push(descriptor(layer, &m.digest)?);
                }
                self.blobs(&blobs).await?;
            }
            let subject_processed = self.dst.put_manifest(&m, self.progress).await?;
            self.manifests += 1;
            // Keep the fallback tag for the subject when the destination did not take note
            // of it itself (spec.md "Pushing Manifests with Subject").
            if let Some(subject) = doc["subject"]["digest"].as_str()
                && let Target::Registry(dst) = self.dst
                && !subject_processed
            {
                let subject: Digest = subject.parse().map_err(|e| {
                    WalkError::Invalid(format!("manifest {}: subject: {e}", m.digest))
                })?;
                let mut entry = serde_json::json!({
                    "mediaType": m.media_type,
                    "digest": m.digest,
                    "size": m.bytes.len(),
                });
                if let Some(t) = doc["artifactType"]
                    .as_str()
                    .or_else(|| doc["config"]["mediaType"].as_str())
                {
                    entry["artifactType"] = Value::from(t);
                }
                if doc["annotations"].is_object() {
                    entry["annotations"] = doc["annotations"].clone();
                }
                dst.add_to_fallback_tag(&subject, &[entry], self.progress)
                    .await?;
            }
            for r in self.src.referrers(&m.digest, self.progress).await? {
                let d = descriptor(&r, &m.digest)?;
                if self.seen.contains(&d.digest) {
                    continue;
                }
                let Some(referrer) = self.src.manifest(&d, self.progress).await? else {
                    // A stale fallback-tag entry: nothing to copy.
                    self.progress.event(Event::Warning(&format!(
                        "referrer {} of {} is listed but missing in the source; skipped",
                        d.digest, m.digest
                    )));
                    continue;
                };
                self.manifest(referrer).await?;
                self.referrers += 1;
            }
            Ok(())
        })
    }

    /// Every blob of one manifest, `jobs` at once.
    async fn blobs(&self, blobs: &[Descriptor]) -> Result<(), WalkError> {
        let (src, dst, progress) = (self.src, self.dst, self.progress);
        futures::stream::iter(blobs)
            .map(|d| async move {
                match (src, dst) {
                    (Source::Registry(s), Target::Registry(t)) => {
                        t.take_blob(s, d, progress).await?;
                    }
                    (Source::Layout(store), Target::Registry(t)) => {
                        t.put_blob_file(d, store.path(&d.digest), progress).await?;
                    }
                    (Source::Registry(s), Target::Layout(store)) => {
                        if store.contains(&d.digest) {
                            progress.event(Event::BlobSkipped {
                                digest: &d.digest,
                                size: d.size,
                                reason: "already in the layout",
                            });
                        } else {
                            s.download(d, store, progress).await?;
                        }
                    }
                    (Source::Layout(_), Target::Layout(_)) => {
                        return Err(WalkError::Invalid(
                            "a copy between two oci: layouts is not supported".into(),
                        ));
                    }
                }
                Ok::<(), WalkError>(())
            })
            .buffer_unordered(self.jobs)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

/// Where a walk reads from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Registry(&'a Endpoint),
    /// An OCI image layout's blob store.
    Layout(&'a BlobStore),
}

impl Source<'_> {
    /// The manifest `d` names; `None` if the source does not have it.
    async fn manifest(
        &self,
        d: &Descriptor,
        progress: &dyn Progress,
    ) -> Result<Option<RawManifest>, WalkError> {
        match self {
            Source::Registry(e) => Ok(e.manifest(&d.digest.to_string(), progress).await?),
            Source::Layout(store) => {
                let path = store.path(&d.digest);
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(WalkError::Invalid(format!(
                            "cannot read {}: {e}",
                            path.display()
                        )));
                    }
                };
                let typed = Some(d.media_type.as_str()).filter(|t| !t.is_empty());
                let m = RawManifest::from_bytes(bytes.into(), typed);
                if m.digest != d.digest {
                    return Err(WalkError::Invalid(format!(
                        "{} hashes to {}; the layout is corrupt",
                        path.display(),
                        m.digest
                    )));
                }
                Ok(Some(m))
            }
        }
    }

    /// Referrers of `digest` (a layout's are not looked for: it has no referrers API).
    async fn referrers(
        &self,
        digest: &Digest,
        progress: &dyn Progress,
    ) -> Result<Vec<Value>, WalkError> {
        match self {
            Source::Registry(e) => Ok(e.referrers(digest, progress).await?),
            Source::Layout(_) => Ok(Vec::new()),
        }
    }
}

/// Where a walk writes to.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Registry(&'a Endpoint),
    Layout(&'a BlobStore),
}

impl Target<'_> {
    /// Store `m` by digest. `Ok(true)` when nothing more is needed for its `subject` (the
    /// registry processed it, or a layout, which lists referrers in no tag).
    async fn put_manifest(
        &self,
        m: &RawManifest,
        progress: &dyn Progress,
    ) -> Result<bool, WalkError> {
        match self {
            Target::Registry(e) => Ok(e.put_manifest(m, &m.digest.to_string(), progress).await?),
            Target::Layout(store) => {
                store.put_bytes(&m.bytes).map_err(|e| {
                    WalkError::Invalid(format!("writing to {}: {e}", store.root().display()))
                })?;
                Ok(true)
            }
        }
    }
}

/// `oci:DIR[:TAG]`: the directory and the tag (the last `:` starts a tag only when what
/// follows is a valid tag, as skopeo reads it).
fn parse_layout(input: &str) -> Option<(PathBuf, Option<String>)> {
    let rest = input.strip_prefix("oci:")?;
    Some(match rest.rsplit_once(':') {
        Some((p, t)) if !p.is_empty() && validate_tag(t).is_ok() => {
            (PathBuf::from(p), Some(t.to_string()))
        }
        _ => (PathBuf::from(rest), None),
    })
}

/// The image of the layout `dir` named `tag` (its `org.opencontainers.image.ref.name`), or
/// its only image.
fn layout_top(
    input: &str,
    dir: &Path,
    tag: Option<&str>,
) -> Result<(BlobStore, RawManifest), CopyError> {
    let invalid = |reason: String| CopyError::Invalid {
        reference: input.to_string(),
        reason,
    };
    let path = dir.join("index.json");
    let text = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CopyError::NotFound {
            reference: input.to_string(),
        },
        _ => invalid(format!("cannot read {}: {e}", path.display())),
    })?;
    let index: Value = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("{} is not JSON ({e})", path.display())))?;
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let chosen: Vec<&Value> = entries
        .iter()
        .filter(|e| tag.is_none() || e["annotations"][ANNOTATION_REF_NAME].as_str() == tag)
        .collect();
    let entry = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(CopyError::NotFound {
                reference: input.to_string(),
            });
        }
        _ => {
            return Err(invalid(
                "the layout holds several images; name one with oci:DIR:TAG".into(),
            ));
        }
    };
    let d = descriptor(entry, &Digest::of(&text)).map_err(|e| match e {
        WalkError::Invalid(r) => invalid(r),
        WalkError::Registry(e) => invalid(e.to_string()),
    })?;
    let store =
        BlobStore::open(dir).map_err(|e| invalid(format!("cannot open {}: {e}", dir.display())))?;
    let bytes = std::fs::read(store.path(&d.digest))
        .map_err(|e| invalid(format!("cannot read {}: {e}", d.digest)))?;
    let typed = Some(d.media_type.as_str()).filter(|t| !t.is_empty());
    let top = RawManifest::from_bytes(bytes.into(), typed);
    if top.digest != d.digest {
        return Err(invalid(format!(
            "blob {} has other content; the layout is corrupt",
            d.digest
        )));
    }
    Ok((store, top))
}

/// Add (or move) `tag` in the layout's `index.json` to `top`, and write `oci-layout`.
fn tag_layout(store: &BlobStore, top: &RawManifest, tag: Option<&str>) -> std::io::Result<()> {
    let root = store.root();
    let path = root.join("index.json");
    let mut index: Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|v: &Value| v["manifests"].is_array())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let mut entry = serde_json::json!({
        "mediaType": top.media_type,
        "digest": top.digest,
        "size": top.bytes.len(),
    });
    if let Some(t) = tag {
        entry["annotations"] = serde_json::json!({ ANNOTATION_REF_NAME: t });
    }
    let list = index["manifests"]
        .as_array_mut()
        .expect("checked to be an array above");
    list.retain(|e| match tag {
        Some(t) => e["annotations"][ANNOTATION_REF_NAME].as_str() != Some(t),
        None => e["digest"] != entry["digest"],
    });
    list.push(entry);
    let bytes = serde_json::to_vec(&index).map_err(std::io::Error::other)?;
    let tmp = root.join("index.json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
}

/// A walk's error as the copy's.
fn walk_error(reference: &str, side_name: &'static str, e: WalkError) -> CopyError {
    match e {
        WalkError::Registry(cause) => CopyError::Registry {
            side: side_name,
            reference: reference.to_string(),
            cause,
        },
        WalkError::Invalid(reason) => CopyError::Invalid {
            reference: reference.to_string(),
            reason,
        },
    }
}

/// `copy oci:DIR[:TAG] REGISTRY/REPO[:TAG]`.
fn layout_to_registry(
    req: &CopyRequest,
    dir: &Path,
    tag: Option<&str>,
    progress: &dyn Progress,
) -> Result<Copied, CopyError> {
    let (dst_repo, dst) = parse_destination(&req.destination)?;
    let (store, top) = layout_top(&req.source, dir, tag)?;
    check_digest(req, &dst, &top)?;
    let dst_tags: Vec<String> = dst
        .tag
        .clone()
        .or(tag.map(str::to_string))
        .into_iter()
        .collect();
    let dst_tags = if dst.tag.is_none() && dst.digest.is_some() {
        Vec::new()
    } else {
        dst_tags
    };
    let dst_name = dst_repo.to_string();
    let opts = &req.destination_opts;
    let invalid = std::cell::RefCell::new(None);
    let runtime = runtime()?;
    let counts = runtime
        .block_on(with_repository(&dst_repo, opts, progress, || async {
            let target = Endpoint::connect(&dst_repo, opts, progress).await?;
            let mut walk = Walk {
                src: Source::Layout(&store),
                dst: Target::Registry(&target),
                jobs: opts.jobs.max(1),
                progress,
                seen: HashSet::new(),
                manifests: 0,
                referrers: 0,
            };
            match walk.manifest(top.clone()).await {
                Ok(()) => {}
                Err(WalkError::Registry(e)) => return Err(e),
                Err(WalkError::Invalid(reason)) => {
                    let e = RegistryError::Client {
                        reason: reason.clone(),
                    };
                    *invalid.borrow_mut() = Some(reason);
                    return Err(e);
                }
            }
            for t in &dst_tags {
                target.put_manifest(&top, t, progress).await?;
            }
            Ok((walk.manifests, walk.referrers))
        }))
        .map_err(|e| match invalid.take() {
            Some(reason) => CopyError::Invalid {
                reference: req.source.clone(),
                reason,
            },
            None => side("destination", &dst_name)(e),
        })?;
    Ok(Copied {
        image_ref: format!("{dst_repo}@{}", top.digest),
        digest: top.digest.clone(),
        media_type: top.media_type.clone(),
        tags: dst_tags,
        manifests: counts.0,
        referrers: counts.1,
    })
}

/// `copy REGISTRY/REPO:TAG oci:DIR[:TAG]`: every blob and manifest into the layout's
/// `blobs/`, then the tag (the source's when none is given) in its `index.json`.
fn registry_to_layout(
    req: &CopyRequest,
    dir: &Path,
    tag: Option<&str>,
    progress: &dyn Progress,
) -> Result<Copied, CopyError> {
    let source = parse_source(&req.source)?;
    let tag = match (tag, &source.target) {
        (Some(t), _) => Some(t.to_string()),
        (None, RefTarget::Tag(t)) => Some(t.clone()),
        (None, RefTarget::Digest(_)) => None,
    };
    let store =
        BlobStore::open(dir).map_err(io(format!("creating the OCI layout {}", dir.display())))?;
    let mut opts = req.source_opts.clone();
    opts.mount_from.clear();
    opts.credentials = None;
    let src_name = source.to_string();
    let runtime = runtime()?;
    let (top, counts) = runtime.block_on(async {
        let src = Endpoint::connect(&source.repo, &opts, progress)
            .await
            .map_err(side("source", &src_name))?;
        let top = src
            .manifest(&source.reference(), progress)
            .await
            .map_err(side("source", &src_name))?
            .ok_or_else(|| CopyError::NotFound {
                reference: src_name.clone(),
            })?;
        let mut walk = Walk {
            src: Source::Registry(&src),
            dst: Target::Layout(&store),
            jobs: opts.jobs.max(1),
            progress,
            seen: HashSet::new(),
            manifests: 0,
            referrers: 0,
        };
        walk.manifest(top.clone())
            .await
            .map_err(|e| walk_error(&src_name, "source", e))?;
        Ok::<_, CopyError>((top, (walk.manifests, walk.referrers)))
    })?;
    tag_layout(&store, &top, tag.as_deref())
        .map_err(io(format!("writing {}/index.json", dir.display())))?;
    Ok(Copied {
        image_ref: format!("oci:{}@{}", dir.display(), top.digest),
        digest: top.digest.clone(),
        media_type: top.media_type.clone(),
        tags: tag.into_iter().collect(),
        manifests: counts.0,
        referrers: counts.1,
    })
}

/// A destination `@sha256:...` must be the source's digest.
fn check_digest(req: &CopyRequest, dst: &Written, top: &RawManifest) -> Result<(), CopyError> {
    match &dst.digest {
        Some(d) if *d != top.digest => Err(CopyError::Usage {
            what: "destination",
            input: req.destination.clone(),
            reason: format!(
                "the source is {}; a copy keeps the digest, so a destination digest must be that one (or leave it out)",
                top.digest
            ),
        }),
        _ => Ok(()),
    }
}

/// A descriptor of a document inside manifest `within`.
fn descriptor(v: &Value, within: &Digest) -> Result<Descriptor, WalkError> {
    let invalid = |what: &str| WalkError::Invalid(format!("manifest {within}: {what}"));
    Ok(Descriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: v["digest"]
            .as_str()
            .ok_or_else(|| invalid("a descriptor without digest"))?
            .parse()
            .map_err(|e| invalid(&format!("{e}")))?,
        size: v["size"]
            .as_u64()
            .ok_or_else(|| invalid("a descriptor without size"))?,
        // copy only walks the graph; what it sends is the source's bytes, unchanged.
        urls: Vec::new(),
        annotations: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        let d = Digest::of(b"x");
        // input, (registry, path, tag, digest) or the start of the error
        type Want = Result<(&'static str, &'static str, Option<&'static str>, bool), &'static str>;
        let cases: Vec<(String, Want)> = vec![
            (
                "127.0.0.1:5000/a/b".into(),
                Ok(("127.0.0.1:5000", "a/b", None, false)),
            ),
            (
                "127.0.0.1:5000/a/b:v1".into(),
                Ok(("127.0.0.1:5000", "a/b", Some("v1"), false)),
            ),
            (
                format!("r.example.com/x:v1@{d}"),
                Ok(("r.example.com", "x", Some("v1"), true)),
            ),
            (
                format!("r.example.com/x@{d}"),
                Ok(("r.example.com", "x", None, true)),
            ),
            (
                "alpine:3".into(),
                Err("destination \"alpine:3\": invalid repository"),
            ),
            (
                "r.example.com/x:-bad".into(),
                Err("destination \"r.example.com/x:-bad\": invalid tag"),
            ),
            ("r.example.com/x@sha256:zz".into(), Err("destination")),
        ];
        for (input, want) in cases {
            let got = parse_destination(&input);
            match want {
                Ok((registry, path, tag, has_digest)) => {
                    let (repo, w) = got.unwrap_or_else(|e| panic!("{input}: {e}"));
                    assert_eq!(repo.registry, registry, "{input}");
                    assert_eq!(repo.path, path, "{input}");
                    assert_eq!(w.tag.as_deref(), tag, "{input}");
                    assert_eq!(w.digest.is_some(), has_digest, "{input}");
                }
                Err(start) => {
                    let e = got.expect_err(&input).to_string();
                    assert!(e.starts_with(start), "{input}: {e}");
                }
            }
        }
    }

    #[test]
    fn exit_codes() {
        let cases = [
            (
                CopyError::NotFound {
                    reference: "r/x:1".into(),
                },
                ExitCode::Input,
            ),
            (
                CopyError::Usage {
                    what: "destination",
                    input: "x".into(),
                    reason: "y".into(),
                },
                ExitCode::Usage,
            ),
            (
                CopyError::Registry {
                    side: "source",
                    reference: "r/x".into(),
                    cause: RegistryError::Unauthorized {
                        registry: "r".into(),
                        tried: "t".into(),
                        status: 401,
                    },
                },
                ExitCode::Auth,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
        }
    }
}
