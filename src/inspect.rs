//! `imgbuild inspect REF`: what an image is, read back from a registry (a tag or digest, with
//! push's authentication) or an OCI layout (`oci:DIR[:TAG]`): the index digest, each platform
//! with its manifest digest, compressed size, layers and config summary (user, entrypoint,
//! cmd, env names without values, exposed ports), the base annotations, and the referrers
//! attached to each platform manifest (SBOM, provenance, anything else). `document` prints
//! one attached SBOM or provenance back.
//!
//! Read only. Docker manifest lists and v2 manifests are read like their OCI counterparts.

use crate::digest::Digest;
use crate::error::Error;
use crate::image::{ANNOTATION_BASE_DIGEST, ANNOTATION_BASE_NAME, ANNOTATION_REF_NAME};
use crate::progress::Progress;
use crate::reference::{ImageRef, RefTarget};
use crate::registry::RegistryOptions;
use crate::registry::pull::Puller;
use crate::supply::Kind;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What `inspect` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Inspection {
    pub reference: String,
    /// The digest the reference resolved to (the index, or a one-platform manifest).
    pub digest: String,
    pub media_type: String,
    pub platforms: Vec<PlatformReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlatformReport {
    pub platform: String,
    pub manifest_digest: String,
    /// Config + layers, compressed, as the manifest lists them.
    pub size: u64,
    pub layers: Vec<u64>,
    pub user: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Names only: values may be secrets.
    pub env: Vec<String>,
    pub exposed_ports: Vec<String>,
    pub base_name: Option<String>,
    pub base_digest: Option<String>,
    pub referrers: Vec<ReferrerReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReferrerReport {
    pub artifact_type: String,
    pub digest: String,
    pub size: u64,
}

/// Where to read from.
#[derive(Debug)]
enum Source {
    Registry {
        puller: Box<Puller>,
        reference: String,
    },
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl Source {
    async fn open(
        text: &str,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<Self, Error> {
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !d.is_empty() && crate::reference::validate_tag(t).is_ok() => {
                    (d, Some(t.to_string()))
                }
                _ => (rest, None),
            };
            return Ok(Source::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        let r = ImageRef::parse(text)?;
        let reference = match &r.target {
            RefTarget::Tag(t) => t.clone(),
            RefTarget::Digest(d) => d.to_string(),
        };
        Ok(Source::Registry {
            puller: Box::new(Puller::connect(&r.repo, opts, progress).await?),
            reference,
        })
    }

    /// The bytes the reference names.
    async fn top(&self, progress: &dyn Progress) -> Result<(Bytes, Digest), Error> {
        match self {
            Source::Registry { puller, reference } => {
                Ok(puller.manifest(reference, progress).await?)
            }
            Source::Layout { dir, tag } => {
                let index = self.layout_index()?;
                let entry = index["manifests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| match tag {
                        Some(t) => m["annotations"][ANNOTATION_REF_NAME] == t.as_str(),
                        None => m.get("artifactType").is_none(),
                    })
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "{}/index.json has no image{}; give oci:DIR:TAG with a tag it lists",
                            dir.display(),
                            tag.as_ref()
                                .map(|t| format!(" tagged {t}"))
                                .unwrap_or_default()
                        ))
                    })?;
                let d: Digest = entry["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| Error::Usage(format!("{}/index.json: {e}", dir.display())))?;
                Ok((self.blob(&d, progress).await?, d))
            }
        }
    }

    fn layout_index(&self) -> Result<Value, Error> {
        let Source::Layout { dir, .. } = self else {
            return Ok(Value::Null);
        };
        let path = dir.join("index.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Usage(format!("{}: not JSON: {e}", path.display())))
    }

    async fn blob(&self, d: &Digest, progress: &dyn Progress) -> Result<Bytes, Error> {
        match self {
            Source::Registry { puller, .. } => Ok(puller.small_blob(d, progress).await?),
            Source::Layout { dir, .. } => {
                let path = dir.join("blobs/sha256").join(d.hex());
                let bytes = std::fs::read(&path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                if Digest::of(&bytes) != *d {
                    return Err(Error::Usage(format!(
                        "{} does not hash to its name; the layout is corrupt",
                        path.display()
                    )));
                }
                Ok(Bytes::from(bytes))
            }
        }
    }

    async fn manifest(&self, d: &Digest, progress: &dyn Progress) -> Result<Bytes, Error> {
        match self {
            Source::Registry { puller, .. } => {
                Ok(puller.manifest(&d.to_string(), progress).await?.0)
            }
            Source::Layout { .. } => self.blob(d, progress).await,
        }
    }

    /// Descriptors of the referrers of `subject`.
    async fn referrers(
        &self,
        subject: &Digest,
        progress: &dyn Progress,
    ) -> Result<Vec<Value>, Error> {
        match self {
            Source::Registry { puller, .. } => {
                Ok(crate::registry::referrers::list(puller, subject, progress).await?)
            }
            Source::Layout { .. } => {
                let index = self.layout_index()?;
                let mut out = Vec::new();
                for m in index["manifests"].as_array().into_iter().flatten() {
                    if m.get("artifactType").is_none() {
                        continue;
                    }
                    let Ok(d) = m["digest"].as_str().unwrap_or_default().parse::<Digest>() else {
                        continue;
                    };
                    let v: Value =
                        serde_json::from_slice(&self.blob(&d, progress).await?).unwrap_or_default();
                    if v["subject"]["digest"] == subject.to_string().as_str() {
                        out.push(m.clone());
                    }
                }
                Ok(out)
            }
        }
    }
}

fn json(bytes: &[u8], what: &str) -> Result<Value, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Usage(format!("{what} is not JSON: {e}")))
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    })
}

fn platform_name(p: &Value) -> String {
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or("unknown"),
        p["architecture"].as_str().unwrap_or("unknown")
    );
    if let Some(v) = p["variant"].as_str() {
        s = format!("{s}/{v}");
    }
    s
}

/// Read `reference` and everything `inspect` reports.
pub fn inspect(
    reference: &str,
    opts: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<Inspection, Error> {
    runtime()?.block_on(async {
        let src = Source::open(reference, opts, progress).await?;
        let (bytes, digest) = src.top(progress).await?;
        let top = json(&bytes, reference)?;
        let media_type = top["mediaType"].as_str().unwrap_or_default().to_string();
        // An index lists platforms; a single manifest is its own one platform.
        let entries: Vec<(Option<String>, Digest)> = match top["manifests"].as_array() {
            Some(list) => list
                .iter()
                .filter(|m| m["platform"]["os"] != "unknown")
                .filter_map(|m| {
                    let d = m["digest"].as_str()?.parse().ok()?;
                    Some((Some(platform_name(&m["platform"])), d))
                })
                .collect(),
            None => vec![(None, digest.clone())],
        };
        let mut platforms = Vec::new();
        for (name, d) in entries {
            let m = json(&src.manifest(&d, progress).await?, &d.to_string())?;
            let config_d: Digest = m["config"]["digest"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .map_err(|e| Error::Usage(format!("manifest {d}: config digest: {e}")))?;
            let config = json(&src.blob(&config_d, progress).await?, "the config")?;
            let c = &config["config"];
            let layers: Vec<u64> = m["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| l["size"].as_u64().unwrap_or(0))
                .collect();
            let size = layers.iter().sum::<u64>() + m["config"]["size"].as_u64().unwrap_or(0);
            let platform = name.unwrap_or_else(|| {
                platform_name(&json!({"os": config["os"], "architecture": config["architecture"], "variant": config["variant"]}))
            });
            let mut referrers: Vec<ReferrerReport> = src
                .referrers(&d, progress)
                .await?
                .iter()
                .map(|r| ReferrerReport {
                    artifact_type: r["artifactType"].as_str().unwrap_or_default().to_string(),
                    digest: r["digest"].as_str().unwrap_or_default().to_string(),
                    size: r["size"].as_u64().unwrap_or(0),
                })
                .collect();
            referrers.sort_by(|a, b| a.artifact_type.cmp(&b.artifact_type));
            let ann = &m["annotations"];
            platforms.push(PlatformReport {
                platform,
                manifest_digest: d.to_string(),
                size,
                layers,
                user: c["User"].as_str().filter(|s| !s.is_empty()).map(String::from),
                entrypoint: strings(&c["Entrypoint"]),
                cmd: strings(&c["Cmd"]),
                env: strings(&c["Env"])
                    .unwrap_or_default()
                    .iter()
                    .map(|e| e.split('=').next().unwrap_or_default().to_string())
                    .collect(),
                exposed_ports: c["ExposedPorts"]
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
                    .unwrap_or_default(),
                base_name: ann[ANNOTATION_BASE_NAME].as_str().map(String::from),
                base_digest: ann[ANNOTATION_BASE_DIGEST].as_str().map(String::from),
                referrers,
            });
        }
        Ok(Inspection {
            reference: reference.to_string(),
            digest: digest.to_string(),
            media_type,
            platforms,
        })
    })
}

/// The attached document of `kind` for `platform` (e.g. `linux/amd64`), as stored.
pub fn document(
    reference: &str,
    platform: &str,
    kind: Kind,
    opts: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<Bytes, Error> {
    let report = inspect(reference, opts, progress)?;
    let p = report
        .platforms
        .iter()
        .find(|p| p.platform == platform)
        .ok_or_else(|| {
            let have: Vec<&str> = report
                .platforms
                .iter()
                .map(|p| p.platform.as_str())
                .collect();
            Error::Usage(format!(
                "{reference} has no {platform} image; it has {}",
                have.join(", ")
            ))
        })?;
    let r = p
        .referrers
        .iter()
        .find(|r| r.artifact_type == kind.artifact_type())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{reference} ({platform}) has no {} attached; push it without `--{} none`",
                kind.name(),
                kind.name()
            ))
        })?;
    runtime()?.block_on(async {
        let src = Source::open(reference, opts, progress).await?;
        let d: Digest = r
            .digest
            .parse()
            .map_err(|e| Error::Usage(format!("referrer digest: {e}")))?;
        let m = json(&src.manifest(&d, progress).await?, "the referrer manifest")?;
        let layer: Digest = m["layers"][0]["digest"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|e| Error::Usage(format!("referrer {d}: layer digest: {e}")))?;
        src.blob(&layer, progress).await
    })
}

/// The compact table a terminal gets.
pub fn table(i: &Inspection) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "{}  {}", i.reference, i.digest);
    for p in &i.platforms {
        let _ = writeln!(
            s,
            "  {:<16} {}  {} in {} layers",
            p.platform,
            p.manifest_digest,
            human(p.size),
            p.layers.len()
        );
        let mut cfg = BTreeMap::new();
        if let Some(u) = &p.user {
            cfg.insert("user", u.clone());
        }
        if let Some(e) = &p.entrypoint {
            cfg.insert("entrypoint", e.join(" "));
        }
        if let Some(c) = &p.cmd {
            cfg.insert("cmd", c.join(" "));
        }
        if !p.env.is_empty() {
            cfg.insert("env", p.env.join(","));
        }
        if !p.exposed_ports.is_empty() {
            cfg.insert("ports", p.exposed_ports.join(","));
        }
        if let Some(b) = &p.base_name {
            cfg.insert(
                "base",
                format!("{b} {}", p.base_digest.clone().unwrap_or_default()),
            );
        }
        for (k, v) in cfg {
            let _ = writeln!(s, "    {k}: {v}");
        }
        for r in &p.referrers {
            let _ = writeln!(
                s,
                "    referrer {} {} ({} B)",
                r.artifact_type, r.digest, r.size
            );
        }
    }
    s
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

use serde_json::json;
