//! Base images (README "Base images"): resolve `base` / `[base_overrides]` / `--base` into, per platform,
//! the base's layers (descriptors kept exactly: media type, digest, size — never re-tarred or
//! recompressed) and its config JSON, which [`crate::image::inherit`] merges into ours.
//!
//! Sources:
//! - a registry (`REGISTRY/REPO:TAG` or `@sha256:...`): the manifest is fetched with every
//!   media type we read in `Accept` (OCI index/manifest, Docker manifest list/v2), verified
//!   against its digest, and the platform picked from the index;
//! - an OCI image layout (`oci:PATH[:TAG]`): `index.json`, then blobs by digest, verified.
//!
//! Everything fetched from a registry by digest (manifests, configs, and layers a local build
//! needs) goes into a content-addressed cache (`$IMGBUILD_CACHE/bases`, default
//! `~/.cache/imgbuild/bases`), so a base pinned by digest resolves — and a local build
//! completes — without the network once it has been fetched once. A tag is always asked of
//! the registry (it may have moved).

use crate::digest::Digest;
use crate::exit::ExitCode;
use crate::image::{ANNOTATION_BASE_DIGEST, ANNOTATION_BASE_NAME, ANNOTATION_REF_NAME, Descriptor};
use crate::platform::Platform;
use crate::progress::{Event, Progress};
use crate::reference::{RefTarget, Repository};
use crate::registry::pull::Puller;
use crate::registry::{RegistryError, RegistryOptions};
use crate::spec::Base;
use crate::store::BlobStore;
use bytes::Bytes;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// One platform's base image, ready to build on.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedBase {
    /// The base as the user named it (for `org.opencontainers.image.base.name`).
    pub name: String,
    /// What the reference resolved to: the index, or the manifest of a one-platform base.
    pub digest: Digest,
    /// This platform's manifest (for `org.opencontainers.image.base.digest`).
    pub manifest_digest: Digest,
    pub layers: Vec<Descriptor>,
    /// The base's image config, as JSON.
    pub config: Value,
    pub source: BaseSource,
}

/// Where a base's blobs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseSource {
    Registry(Repository),
    /// The layout's blob store.
    Layout(PathBuf),
}

impl ResolvedBase {
    /// The manifest annotations that record the base (image-spec annotations.md).
    pub fn annotations(&self) -> [(String, String); 2] {
        [
            (ANNOTATION_BASE_NAME.to_string(), self.name.clone()),
            (
                ANNOTATION_BASE_DIGEST.to_string(),
                self.manifest_digest.to_string(),
            ),
        ]
    }
}

/// Why a base could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(
        "base {base} has no {platform} image; it offers {}; pick another base, remove the platform, or set [base_overrides] \"{platform}\"",
        crate::untrusted::shown_list(offered, 20, 64)
    )]
    MissingPlatform {
        base: String,
        platform: Platform,
        offered: Vec<String>,
    },
    #[error(
        "base {base}: {reference} not found in {repo}; check the base's tag or digest (skopeo list-tags docker://{repo} lists the tags), or push the base first"
    )]
    NotFound {
        base: String,
        /// `tag v1` or `manifest sha256:...`.
        reference: String,
        repo: String,
    },
    #[error("base {base}: {reason}")]
    Invalid { base: String, reason: String },
    // The causes are part of the one-line message, not a `source()` chain: main prints the
    // chain too, and the line must not say everything twice.
    #[error("base {base}: {cause}")]
    Registry { base: String, cause: RegistryError },
    #[error("base {base}: cannot read {}: {cause}; check the oci: path", path.display())]
    Layout {
        base: String,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("base image cache {}: {cause}", path.display())]
    Cache {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl BaseError {
    /// A base that does not fit (no such platform, malformed, missing layout) is an input
    /// problem like a wrong-architecture artifact: 3. Registry failures keep their own codes.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            BaseError::MissingPlatform { .. }
            | BaseError::NotFound { .. }
            | BaseError::Invalid { .. }
            | BaseError::Layout { .. } => ExitCode::Input,
            BaseError::Registry { cause, .. } => cause.exit_code(),
            BaseError::Cache { .. } => ExitCode::Internal,
        }
    }
}

/// A manifest the registry does not have (404: MANIFEST_UNKNOWN for a tag or digest,
/// NAME_UNKNOWN for a repository) is a wrong input, not a registry failure: no retry finds it.
fn manifest_error(
    base: &str,
    repo: &impl std::fmt::Display,
    reference: &str,
    cause: RegistryError,
) -> BaseError {
    match cause {
        RegistryError::Protocol { status: 404, .. } => BaseError::NotFound {
            base: base.to_string(),
            reference: reference.to_string(),
            repo: repo.to_string(),
        },
        cause => BaseError::Registry {
            base: base.to_string(),
            cause,
        },
    }
}

/// `$IMGBUILD_CACHE/bases`, else `$XDG_CACHE_HOME/imgbuild/bases`, else
/// `~/.cache/imgbuild/bases`.
pub fn default_cache_dir() -> Option<PathBuf> {
    crate::cache::default_dir().map(|d| d.join("bases"))
}

/// Which base each platform uses: `[base_overrides]` for its platform, else `--base`
/// (`over`), else the spec's `base`. Scratch platforms are left out.
pub fn choose<'a>(
    base: &'a Base,
    overrides: &'a BTreeMap<Platform, Base>,
    over: Option<&'a Base>,
    platforms: &[Platform],
) -> Vec<(Platform, &'a Base)> {
    platforms
        .iter()
        .map(|p| (p.clone(), overrides.get(p).or(over).unwrap_or(base)))
        .filter(|(_, b)| **b != Base::Scratch)
        .collect()
}

/// Connection options for reading from `registry`: `opts`, without the explicit
/// `--username` credentials unless `registry` is the push target (they are for it alone).
pub fn pull_options(
    opts: &RegistryOptions,
    registry: &str,
    target: Option<&str>,
) -> RegistryOptions {
    let mut opts = opts.clone();
    opts.mount_from.clear();
    if target != Some(registry) {
        opts.credentials = None;
    }
    opts
}

/// Resolve every platform's base. Connects to a registry only when something is not in the
/// cache (a tag always is asked for). `target` is the push target's registry, if any.
pub async fn resolve(
    wanted: &[(Platform, &Base)],
    opts: &RegistryOptions,
    target: Option<&str>,
    cache: Option<&BlobStore>,
    progress: &dyn Progress,
) -> Result<BTreeMap<Platform, ResolvedBase>, BaseError> {
    let mut out = BTreeMap::new();
    let mut sources: Vec<(&Base, Source)> = Vec::new();
    for (platform, base) in wanted {
        let i = match sources.iter().position(|(b, _)| b == base) {
            Some(i) => i,
            None => {
                let opts = match base {
                    Base::Registry(r) => pull_options(opts, &r.repo.registry, target),
                    _ => opts.clone(),
                };
                sources.push((base, Source::open(base, opts, cache, progress).await?));
                sources.len() - 1
            }
        };
        let resolved = sources[i].1.platform(platform, progress).await?;
        out.insert(platform.clone(), resolved);
    }
    Ok(out)
}

/// One base being resolved: its top-level document, and how to get more blobs.
struct Source<'a> {
    name: String,
    kind: SourceKind<'a>,
    top: Bytes,
    top_digest: Digest,
    /// How to reach its registry (see [`pull_options`]).
    opts: RegistryOptions,
}

enum SourceKind<'a> {
    Registry {
        repo: Repository,
        cache: Option<&'a BlobStore>,
        /// Connected on first need (boxed: a client is large).
        puller: Option<Box<Puller>>,
    },
    Layout(BlobStore),
}

impl<'a> Source<'a> {
    async fn open(
        base: &Base,
        opts: RegistryOptions,
        cache: Option<&'a BlobStore>,
        progress: &dyn Progress,
    ) -> Result<Source<'a>, BaseError> {
        let name = base.to_string();
        let (kind, top, top_digest) = match base {
            Base::Scratch | Base::Static => {
                return Err(BaseError::Invalid {
                    base: name,
                    reason: "a built-in base has nothing to resolve".into(),
                });
            }
            Base::Registry(r) => {
                let mut kind = SourceKind::Registry {
                    repo: r.repo.clone(),
                    cache,
                    puller: None,
                };
                let (top, top_digest) = match &r.target {
                    RefTarget::Digest(d) => {
                        let top = kind.json(&name, d, true, &opts, progress).await?;
                        (top, d.clone())
                    }
                    RefTarget::Tag(t) => {
                        let puller = kind.puller(&name, &opts, progress).await?;
                        let (top, d) = puller.manifest(t, progress).await.map_err(|source| {
                            manifest_error(&name, &r.repo, &format!("tag {t}"), source)
                        })?;
                        kind.remember(&top)?;
                        (top, d)
                    }
                };
                (kind, top, top_digest)
            }
            Base::Layout { path, tag, .. } => {
                let (top, top_digest) = layout_top(&name, path, tag.as_deref())?;
                verify_layout_blob(&name, &top_digest, &top)?;
                let kind = SourceKind::Layout(BlobStore::open(path).map_err(|source| {
                    BaseError::Layout {
                        base: name.clone(),
                        path: path.clone(),
                        cause: source,
                    }
                })?);
                (kind, top, top_digest)
            }
        };
        Ok(Source {
            name,
            kind,
            top,
            top_digest,
            opts,
        })
    }

    /// The base for `platform`: pick it from an index, or check a single manifest's config.
    async fn platform(
        &mut self,
        platform: &Platform,
        progress: &dyn Progress,
    ) -> Result<ResolvedBase, BaseError> {
        let invalid = |reason: String| BaseError::Invalid {
            base: self.name.clone(),
            reason,
        };
        let top: Value = serde_json::from_slice(&self.top)
            .map_err(|e| invalid(format!("its manifest is not JSON ({e})")))?;
        let top_type = media_type(&top);
        let (manifest, manifest_digest) = if INDEX_TYPES.contains(&top_type.as_str()) {
            let entries = top["manifests"].as_array().cloned().unwrap_or_default();
            let mut offered = Vec::new();
            let mut found = None;
            for e in &entries {
                let p = &e["platform"];
                let text = platform_text(p);
                // Attestation manifests (buildx) say `unknown/unknown`; other non-image entries
                // have no platform: neither is something to offer.
                if text.is_empty() || text.starts_with("unknown/") {
                    continue;
                }
                if found.is_none() && matches(p, platform) {
                    found = Some(e.clone());
                }
                offered.push(text);
            }
            let Some(entry) = found else {
                return Err(BaseError::MissingPlatform {
                    base: self.name.clone(),
                    platform: platform.clone(),
                    offered: nonempty(offered),
                });
            };
            let digest: Digest = entry["digest"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| invalid(format!("index entry: {e}")))?;
            let bytes = self
                .kind
                .json(&self.name, &digest, true, &self.opts, progress)
                .await?;
            (bytes, digest)
        } else if MANIFEST_TYPES.contains(&top_type.as_str()) {
            (self.top.clone(), self.top_digest.clone())
        } else {
            return Err(invalid(format!(
                "unsupported manifest type \"{}\"; supported: {}",
                crate::untrusted::shown(&top_type, 100),
                [INDEX_TYPES, MANIFEST_TYPES].concat().join(", ")
            )));
        };
        let manifest: Value = serde_json::from_slice(&manifest)
            .map_err(|e| invalid(format!("manifest {manifest_digest} is not JSON ({e})")))?;
        let mt = media_type(&manifest);
        if !MANIFEST_TYPES.contains(&mt.as_str()) {
            return Err(invalid(format!(
                "{manifest_digest} is a \"{}\", not an image manifest",
                crate::untrusted::shown(&mt, 100)
            )));
        }
        let descriptor = |v: &Value| -> Result<Descriptor, BaseError> {
            let bad = |field: &str| invalid(format!("manifest {manifest_digest}: {field}"));
            // `urls` and `annotations` are kept exactly (descriptor.md): a layer's
            // non-distributable location or its annotations belong to it.
            let urls = match &v["urls"] {
                Value::Null => Vec::new(),
                Value::Array(a) => a
                    .iter()
                    .map(|u| u.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("urls holds a non-string"))?,
                _ => return Err(bad("urls is not an array")),
            };
            let annotations = match &v["annotations"] {
                Value::Null => std::collections::BTreeMap::new(),
                Value::Object(o) => o
                    .iter()
                    .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("an annotation value is not a string"))?,
                _ => return Err(bad("annotations is not an object")),
            };
            Ok(Descriptor {
                media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
                digest: v["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| invalid(format!("manifest {manifest_digest}: {e}")))?,
                size: v["size"]
                    .as_u64()
                    .ok_or_else(|| invalid(format!("manifest {manifest_digest}: no size")))?,
                urls,
                annotations,
            })
        };
        let config_desc = descriptor(&manifest["config"])?;
        let layers = manifest["layers"]
            .as_array()
            .map(|a| a.iter().map(descriptor).collect::<Result<Vec<_>, _>>())
            .transpose()?
            .unwrap_or_default();
        let config_bytes = self
            .kind
            .json(&self.name, &config_desc.digest, false, &self.opts, progress)
            .await?;
        let config: Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(format!("config {} is not JSON ({e})", config_desc.digest)))?;
        crate::baseconfig::validate(&config).map_err(|e| {
            invalid(format!(
                "config {} breaks the image spec: {e}; the result would not be a valid image",
                config_desc.digest
            ))
        })?;
        // A single-platform base must be for this platform (an index entry already is).
        if MANIFEST_TYPES.contains(&top_type.as_str()) && !matches(&config, platform) {
            return Err(BaseError::MissingPlatform {
                base: self.name.clone(),
                platform: platform.clone(),
                offered: nonempty(vec![platform_text(&config)]),
            });
        }
        let diff_ids = config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
        if diff_ids != layers.len() {
            return Err(invalid(format!(
                "config {} lists {diff_ids} diff_ids for {} layers",
                config_desc.digest,
                layers.len()
            )));
        }
        Ok(ResolvedBase {
            name: self.name.clone(),
            digest: self.top_digest.clone(),
            manifest_digest,
            layers,
            config,
            source: match &self.kind {
                SourceKind::Registry { repo, .. } => BaseSource::Registry(repo.clone()),
                SourceKind::Layout(store) => BaseSource::Layout(store.root().to_path_buf()),
            },
        })
    }
}

impl SourceKind<'_> {
    async fn puller(
        &mut self,
        name: &str,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<&Puller, BaseError> {
        let SourceKind::Registry { repo, puller, .. } = self else {
            unreachable!("puller() is only asked of registry sources")
        };
        if puller.is_none() {
            *puller = Some(Box::new(
                Puller::connect(repo, opts, progress)
                    .await
                    .map_err(|source| BaseError::Registry {
                        base: name.to_string(),
                        cause: source,
                    })?,
            ));
        }
        Ok(puller.as_ref().expect("set just above"))
    }

    /// Keep a fetched document in the cache (a no-op without one).
    fn remember(&self, bytes: &[u8]) -> Result<(), BaseError> {
        if let SourceKind::Registry {
            cache: Some(cache), ..
        } = self
        {
            cache.put_bytes(bytes).map_err(|source| BaseError::Cache {
                path: cache.root().to_path_buf(),
                cause: source,
            })?;
        }
        Ok(())
    }

    /// A manifest (`manifest`) or config by digest: from the cache or layout (verified), else
    /// the registry.
    async fn json(
        &mut self,
        name: &str,
        digest: &Digest,
        manifest: bool,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<Bytes, BaseError> {
        if let SourceKind::Layout(store) = self {
            let bytes = read_layout_json(name, &store.path(digest))?;
            verify_layout_blob(name, digest, &bytes)?;
            return Ok(Bytes::from(bytes));
        }
        if let SourceKind::Registry {
            cache: Some(cache), ..
        } = self
            && cache.lease(digest).is_ok()
            && let Ok(bytes) = std::fs::read(cache.path(digest))
            && Digest::of(&bytes) == *digest
        {
            progress.event(Event::Debug(&format!(
                "base {name}: {digest} from the cache"
            )));
            return Ok(Bytes::from(bytes));
        }
        let repo = match self {
            SourceKind::Registry { repo, .. } => repo.to_string(),
            SourceKind::Layout(_) => String::new(),
        };
        let puller = self.puller(name, opts, progress).await?;
        let registry = |source| BaseError::Registry {
            base: name.to_string(),
            cause: source,
        };
        let bytes = if manifest {
            puller
                .manifest(&digest.to_string(), progress)
                .await
                .map_err(|e| manifest_error(name, &repo, &format!("manifest {digest}"), e))?
                .0
        } else {
            puller
                .small_blob(digest, progress)
                .await
                .map_err(registry)?
        };
        self.remember(&bytes)?;
        Ok(bytes)
    }
}

/// A layout blob must be what its name says.
fn verify_layout_blob(name: &str, digest: &Digest, bytes: &[u8]) -> Result<(), BaseError> {
    if Digest::of(bytes) == *digest {
        Ok(())
    } else {
        Err(BaseError::Invalid {
            base: name.to_string(),
            reason: format!("blob {digest} in the layout has other content; the layout is corrupt"),
        })
    }
}

/// The layout's image for `tag` (`org.opencontainers.image.ref.name`), or its only image.
fn layout_top(name: &str, dir: &Path, tag: Option<&str>) -> Result<(Bytes, Digest), BaseError> {
    let path = dir.join("index.json");
    let text = read_layout_json(name, &path)?;
    let invalid = |reason: String| BaseError::Invalid {
        base: name.to_string(),
        reason,
    };
    let index: Value = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("{} is not JSON ({e})", path.display())))?;
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let tags: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["annotations"][ANNOTATION_REF_NAME].as_str())
        .collect();
    let chosen: Vec<&Value> = match tag {
        Some(t) => entries
            .iter()
            .filter(|e| e["annotations"][ANNOTATION_REF_NAME].as_str() == Some(t))
            .collect(),
        None => entries.iter().collect(),
    };
    let entry = match chosen.as_slice() {
        [one] => *one,
        [] => {
            let have = if tags.is_empty() {
                "no tagged image".to_string()
            } else {
                tags.join(", ")
            };
            return Err(invalid(match tag {
                Some(t) => format!(
                    "no image tagged {t:?} in {}; it has: {have}",
                    path.display()
                ),
                None => format!("{} holds no image", path.display()),
            }));
        }
        _ => {
            return Err(invalid(format!(
                "{} holds several images; name one with oci:PATH:TAG (tags: {})",
                path.display(),
                tags.join(", ")
            )));
        }
    };
    let digest: Digest = entry["digest"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let blob = dir.join("blobs/sha256").join(digest.hex());
    let bytes = read_layout_json(name, &blob)?;
    Ok((Bytes::from(bytes), digest))
}

/// Open a file of an `oci:` layout for reading: only a regular file (symlinks followed). A
/// FIFO would block the build forever, a device such as `/dev/zero` never ends.
fn open_layout_file(name: &str, path: &Path) -> Result<std::fs::File, BaseError> {
    let layout_err = |cause| BaseError::Layout {
        base: name.to_string(),
        path: path.to_path_buf(),
        cause,
    };
    let meta = std::fs::metadata(path).map_err(layout_err)?;
    if !meta.is_file() {
        return Err(layout_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, device or directory)",
        )));
    }
    std::fs::File::open(path).map_err(layout_err)
}

/// `index.json`, a manifest or a config of an `oci:` layout, capped like a registry
/// manifest ([`crate::registry::pull::MAX_JSON_BYTES`]) so a huge or endless file cannot
/// exhaust the memory.
fn read_layout_json(name: &str, path: &Path) -> Result<Vec<u8>, BaseError> {
    use std::io::Read as _;
    let max = crate::registry::pull::MAX_JSON_BYTES;
    let mut bytes = Vec::new();
    open_layout_file(name, path)?
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|cause| BaseError::Layout {
            base: name.to_string(),
            path: path.to_path_buf(),
            cause,
        })?;
    if bytes.len() > max {
        return Err(BaseError::Invalid {
            base: name.to_string(),
            reason: format!(
                "{} is over {max} bytes, more than any index, manifest or config needs",
                path.display()
            ),
        });
    }
    Ok(bytes)
}

/// `mediaType`, or for documents without one (allowed in OCI), what their shape says.
fn media_type(doc: &Value) -> String {
    match doc["mediaType"].as_str() {
        Some(t) => t.to_string(),
        None if doc.get("manifests").is_some() => INDEX_TYPES[0].to_string(),
        None if doc.get("layers").is_some() => MANIFEST_TYPES[0].to_string(),
        None => String::new(),
    }
}

/// `os/arch[/variant]` of an index entry's `platform` or an image config.
fn platform_text(p: &Value) -> String {
    let (Some(os), Some(arch)) = (p["os"].as_str(), p["architecture"].as_str()) else {
        return String::new();
    };
    match p["variant"].as_str() {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    }
}

/// Does the base's `platform` object (or config) describe `want`? Variants are compared as
/// containerd normalises them: arm64 with or without `v8`, arm without a variant is v7.
fn matches(p: &Value, want: &Platform) -> bool {
    let text = platform_text(p);
    !text.is_empty() && text.parse::<Platform>().is_ok_and(|got| got == *want)
}

fn nonempty(list: Vec<String>) -> Vec<String> {
    if list.is_empty() {
        vec!["no platform at all".into()]
    } else {
        list
    }
}

/// Put the layers of layout-sourced bases into `store` (copied, hashed while copied), and
/// return the registry-sourced layers the store does not have, for the sink to fetch.
pub fn collect_layers(
    bases: &BTreeMap<Platform, ResolvedBase>,
    store: &BlobStore,
) -> Result<Vec<(Repository, Descriptor)>, BaseError> {
    let mut remote = Vec::new();
    for base in bases.values() {
        for layer in &base.layers {
            if store.contains(&layer.digest) {
                continue;
            }
            match &base.source {
                BaseSource::Layout(dir) => {
                    let from = BlobStore::open(dir).map_err(|source| BaseError::Layout {
                        base: base.name.clone(),
                        path: dir.clone(),
                        cause: source,
                    })?;
                    copy_verified(&base.name, &from, store, layer)?;
                }
                BaseSource::Registry(repo) => {
                    if !remote
                        .iter()
                        .any(|(_, d): &(Repository, Descriptor)| d.digest == layer.digest)
                    {
                        remote.push((repo.clone(), layer.clone()));
                    }
                }
            }
        }
    }
    Ok(remote)
}

/// Copy one blob between stores, hashing it on the way; a wrong digest removes the copy.
fn copy_verified(
    name: &str,
    from: &BlobStore,
    to: &BlobStore,
    layer: &Descriptor,
) -> Result<(), BaseError> {
    let src = from.path(&layer.digest);
    let layout_err = |source| BaseError::Layout {
        base: name.to_string(),
        path: src.clone(),
        cause: source,
    };
    let cache_err = |source| BaseError::Cache {
        path: to.root().to_path_buf(),
        cause: source,
    };
    use std::io::{Read as _, Write as _};
    let mut file = open_layout_file(name, &src)?.take(layer.size + 1);
    let mut writer = to.writer().map_err(cache_err)?;
    // At most `size` + 1 bytes: enough to tell a longer blob from the right one. Read and
    // write errors are told apart: a full disk is ours (exit 1), not the layout's.
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(layout_err(e)),
        };
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n]).map_err(cache_err)?;
    }
    let (got, size) = writer.commit().map_err(cache_err)?;
    if got != layer.digest || size != layer.size {
        if got != layer.digest {
            let _ = std::fs::remove_file(to.path(&got));
        }
        return Err(BaseError::Invalid {
            base: name.to_string(),
            reason: format!(
                "blob {} in the layout has other content ({got}, {size} bytes); the layout is corrupt",
                layer.digest
            ),
        });
    }
    Ok(())
}

/// For a local build: put every remote base layer into `store`, from the cache when it has
/// it, else downloaded (verified while it streams) from its registry into the cache first.
/// Up to `opts.jobs` downloads at once; each registry is connected to once, on first need.
pub async fn fetch_layers(
    remote: &[(Repository, Descriptor)],
    store: &BlobStore,
    cache: Option<&BlobStore>,
    opts: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<(), BaseError> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let mut repos: Vec<(&Repository, tokio::sync::OnceCell<Puller>)> = Vec::new();
    for (repo, _) in remote {
        if !repos.iter().any(|(r, _)| *r == repo) {
            repos.push((repo, tokio::sync::OnceCell::new()));
        }
    }
    let repos = &repos;
    futures::stream::iter(remote)
        .map(|(repo, layer)| async move {
            let name = repo.to_string();
            let registry = |cause| BaseError::Registry {
                base: name.clone(),
                cause,
            };
            let dest = cache.unwrap_or(store);
            if dest.contains(&layer.digest) {
                progress.event(Event::BlobSkipped {
                    digest: &layer.digest,
                    size: layer.size,
                    reason: "in the base image cache",
                });
            } else {
                let cell = &repos
                    .iter()
                    .find(|(r, _)| *r == repo)
                    .expect("every repository was added above")
                    .1;
                let opts = pull_options(opts, &repo.registry, None);
                let puller = cell
                    .get_or_try_init(|| Puller::connect(repo, &opts, progress))
                    .await
                    .map_err(registry)?;
                puller
                    .download(layer, dest, progress)
                    .await
                    .map_err(registry)?;
            }
            // A hard link: the cached file was verified when written, and reading it again
            // to copy it would double the I/O of a big base. Across file systems, a verified
            // copy.
            if let Some(cache) = cache
                && !store.contains(&layer.digest)
                && std::fs::hard_link(cache.path(&layer.digest), store.path(&layer.digest)).is_err()
            {
                copy_verified(&name, cache, store, layer)?;
            }
            Ok::<(), BaseError>(())
        })
        .buffer_unordered(opts.jobs.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn platform_matching() {
        // (os, architecture, variant) of the base's entry, the platform we want, match?
        let cases = [
            ("linux", "amd64", "", "linux/amd64", true),
            ("linux", "arm64", "v8", "linux/arm64", true),
            ("linux", "arm64", "", "linux/arm64", true),
            ("linux", "arm", "", "linux/arm/v7", true),
            ("linux", "arm", "v6", "linux/arm/v7", false),
            ("linux", "amd64", "", "linux/arm64", false),
            ("windows", "amd64", "", "linux/amd64", false),
            ("unknown", "unknown", "", "linux/amd64", false),
            ("", "", "", "linux/amd64", false),
        ];
        for (os, arch, variant, want, ok) in cases {
            let mut p = json!({});
            for (k, v) in [("os", os), ("architecture", arch), ("variant", variant)] {
                if !v.is_empty() {
                    p[k] = json!(v);
                }
            }
            assert_eq!(matches(&p, &want.parse().unwrap()), ok, "{p} {want}");
        }
    }

    /// `oci:DIR[:TAG]`: which image of the layout's `index.json` is taken, or the error.
    #[test]
    fn layout_image_choice() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = store.put_bytes(br#"{"a":1}"#).unwrap();
        let b = store.put_bytes(br#"{"b":2}"#).unwrap();
        let entry = |d: &Digest, tag: Option<&str>| {
            let mut e = json!({"mediaType": INDEX_TYPES[0], "digest": d, "size": 7});
            if let Some(t) = tag {
                e["annotations"] = json!({ ANNOTATION_REF_NAME: t });
            }
            e
        };
        /// index.json entries, the tag asked for, and the image chosen or the error.
        type Case<'a> = (Vec<Value>, Option<&'a str>, Result<&'a Digest, &'a str>);
        let cases: Vec<Case> = vec![
            (vec![entry(&a, None)], None, Ok(&a)),
            (
                vec![entry(&a, Some("1")), entry(&b, Some("2"))],
                Some("2"),
                Ok(&b),
            ),
            (
                vec![entry(&a, Some("1")), entry(&b, Some("2"))],
                None,
                Err("holds several images; name one with oci:PATH:TAG (tags: 1, 2)"),
            ),
            (
                vec![entry(&a, Some("1"))],
                Some("3"),
                Err("no image tagged \"3\" in"),
            ),
            (vec![], None, Err("index.json holds no image")),
            (
                vec![entry(&a, None)],
                Some("1"),
                Err("it has: no tagged image"),
            ),
        ];
        for (entries, tag, want) in cases {
            let index = json!({"schemaVersion": 2, "manifests": entries});
            std::fs::write(dir.path().join("index.json"), index.to_string()).unwrap();
            let got = layout_top("x", dir.path(), tag);
            match want {
                Ok(d) => assert_eq!(&got.unwrap().1, d, "{tag:?}"),
                Err(m) => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains(m), "{e}");
                }
            }
        }
    }

    #[test]
    fn base_choice() {
        let amd = Platform::new("linux", "amd64", None);
        let arm = Platform::new("linux", "arm64", None);
        let a = Base::parse("r.example.com/a:1", Path::new(".")).unwrap();
        let b = Base::parse("r.example.com/b:1", Path::new(".")).unwrap();
        let c = Base::parse("oci:c", Path::new(".")).unwrap();
        let mut overrides = BTreeMap::new();
        overrides.insert(arm.clone(), b.clone());
        let both = [amd.clone(), arm.clone()];
        type Case<'a> = (&'a Base, Option<&'a Base>, Vec<(Platform, &'a Base)>);
        let cases: Vec<Case> = vec![
            (&a, None, vec![(amd.clone(), &a), (arm.clone(), &b)]),
            (&a, Some(&c), vec![(amd.clone(), &c), (arm.clone(), &b)]),
            (&Base::Scratch, None, vec![(arm.clone(), &b)]),
            (&a, Some(&Base::Scratch), vec![(arm.clone(), &b)]),
        ];
        for (base, over, want) in cases {
            assert_eq!(
                choose(base, &overrides, over, &both),
                want,
                "{base} {over:?}"
            );
        }
    }
}
