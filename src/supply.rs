//! Supply-chain attachments: for each platform manifest of a built image, its SPDX SBOM
//! ([`crate::sbom`]) and SLSA provenance ([`crate::provenance`]), each wrapped in an OCI 1.1
//! referrer manifest (image-spec manifest.md "Guidelines for Artifact Usage": `artifactType`,
//! the empty config `{}`, the document as the one layer, `subject` = the platform manifest).
//!
//! Referrers never enter the image index: the index digest is the same with and without them.
//! The registry sink is `registry::referrers`; a layout build lists them in `index.json`.

use crate::base::ResolvedBase;
use crate::cache::LayerCache;
use crate::digest::{Digest, FileSums, FileSumsMemo};
use crate::error::Error;
use crate::image::{self, BuiltImage, Descriptor, JsonBlob, MEDIA_TYPE_MANIFEST};
use crate::plan::Plan;
use crate::platform::Platform;
use crate::progress::{Event, Progress};
use crate::provenance::{self, MEDIA_TYPE_IN_TOTO, ProvenanceInput};
use crate::sbom::{self, BasePackage, CratePackage, FileEntry, MEDIA_TYPE_SPDX, SbomInput};
use crate::spec::Spec;
use bytes::Bytes;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The empty config of artifact manifests (image-spec manifest.md "Guidance for an Empty
/// Descriptor"): the two bytes `{}`.
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// On our referrer manifests (and their descriptors in a referrers index): which document
/// imgbuild attached, so a later push replaces its own and leaves other tools' alone.
pub const ANNOTATION_KIND: &str = "dev.imgbuild.attestation";

/// What to attach (`--sbom`, `--provenance`, `--sbom-output`).
#[derive(Debug, Clone, Default)]
pub struct SupplyOptions {
    pub sbom: bool,
    pub provenance: bool,
    /// Also write the plain documents here (`<platform>.spdx.json`, `<platform>.provenance.json`).
    pub output_dir: Option<PathBuf>,
    /// `GITHUB_*` and `RUNNER_ENVIRONMENT` variables that were set.
    pub github: BTreeMap<String, String>,
}

impl SupplyOptions {
    pub fn any(&self) -> bool {
        self.sbom || self.provenance
    }
}

/// Which document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Sbom,
    Provenance,
}

impl Kind {
    pub fn artifact_type(self) -> &'static str {
        match self {
            Kind::Sbom => MEDIA_TYPE_SPDX,
            Kind::Provenance => MEDIA_TYPE_IN_TOTO,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sbom => "sbom",
            Kind::Provenance => "provenance",
        }
    }
}

/// One document attached to one platform manifest.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub platform: Platform,
    pub kind: Kind,
    /// The platform manifest it is about.
    pub subject: Descriptor,
    /// The document itself (the referrer's one layer).
    pub document: JsonBlob,
    /// The referrer manifest.
    pub manifest: JsonBlob,
}

impl Attachment {
    /// The descriptor a referrers index lists for it (distribution-spec "Listing Referrers":
    /// the manifest's `artifactType` and annotations copied in).
    pub fn referrer_descriptor(&self) -> serde_json::Value {
        json!({
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": self.manifest.digest,
            "size": self.manifest.bytes.len(),
            "artifactType": self.kind.artifact_type(),
            "annotations": self.annotations(),
        })
    }

    fn annotations(&self) -> BTreeMap<&'static str, String> {
        annotations(self.kind, &self.manifest_created())
    }

    fn manifest_created(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.manifest.bytes)
            .ok()
            .and_then(|v| {
                v["annotations"][image::ANNOTATION_CREATED]
                    .as_str()
                    .map(String::from)
            })
            .unwrap_or_default()
    }
}

fn annotations(kind: Kind, created: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (image::ANNOTATION_CREATED, created.to_string()),
        (ANNOTATION_KIND, kind.name().to_string()),
    ])
}

/// The empty config blob.
pub fn empty_config() -> JsonBlob {
    let bytes = Bytes::from_static(EMPTY_JSON);
    JsonBlob {
        media_type: MEDIA_TYPE_EMPTY.into(),
        digest: Digest::of(&bytes),
        bytes,
    }
}

/// What the documents say beyond the image itself.
#[derive(Debug, Clone)]
pub struct BuildFacts<'a> {
    pub spec: &'a Spec,
    /// The subject name: the repository, or the spec's name.
    pub image_name: &'a str,
    pub repository: Option<&'a str>,
    pub tags: &'a [String],
    pub epoch: u64,
    pub bases: &'a BTreeMap<Platform, ResolvedBase>,
    /// The layer cache the build used: file checksums and crate lists come from it, so a
    /// re-push reads no input for its documents. None (`--no-cache`): the files are read.
    pub cache: Option<&'a LayerCache>,
    /// Without a cache: the sums the build's tar pass kept (`BuildOptions::file_sums`).
    pub file_sums: Option<&'a FileSumsMemo>,
}

/// The documents of every platform of `image` (built from `plan`), with their referrer
/// manifests; written to `opts.output_dir` too.
pub fn attachments(
    image: &BuiltImage,
    plan: &Plan,
    facts: &BuildFacts<'_>,
    opts: &SupplyOptions,
    progress: &dyn Progress,
) -> Result<Vec<Attachment>, Error> {
    if !opts.any() {
        return Ok(Vec::new());
    }
    let spec_bytes = std::fs::read(&facts.spec.path)
        .map_err(|e| Error::io(format!("reading {}", facts.spec.path.display()), e))?;
    let spec_digest = Digest::of(&spec_bytes);
    let spec_path = facts.spec.path.display().to_string();
    let platforms: Vec<Platform> = image.images.iter().map(|i| i.platform.clone()).collect();
    // Without a layer cache: the build's sums, else each file read once however many
    // platforms hold it.
    let mut read = HashMap::<PathBuf, FileSums>::new();
    let mut sums = |src: &Path, size: u64| match facts.cache {
        Some(c) => c.file_sums(src, size),
        None => {
            if let Some(s) = read.get(src) {
                return Ok(s.clone());
            }
            if let Some(s) = facts.file_sums.and_then(|m| m.get(src, size)) {
                return Ok(s);
            }
            let s = crate::cache::hash_file(src, size)?;
            read.insert(src.to_path_buf(), s.clone());
            Ok(s)
        }
    };
    let mut crates_of = CrateLists::default();
    let mut out = Vec::new();
    for pi in &image.images {
        let Some(pp) = plan.platforms.iter().find(|p| p.platform == pi.platform) else {
            continue;
        };
        let mut files = sbom::hash_files(&pp.layers, &mut sums)?;
        let crates = if opts.sbom {
            crates_of.of_files(&files, facts.cache, progress)
        } else {
            Vec::new()
        };
        // Sources as the user wrote them: relative to the context, not this machine's paths.
        for f in &mut files {
            if let Ok(rel) = f.src.strip_prefix(&facts.spec.context) {
                f.src = rel.to_path_buf();
            }
        }
        let base = facts.bases.get(&pi.platform).map(|b| BasePackage {
            name: b.name.clone(),
            digest: b.manifest_digest.clone(),
        });
        let subject = pi.manifest.descriptor();
        let mut docs = Vec::new();
        if opts.sbom {
            let bytes = sbom::spdx(&SbomInput {
                image: facts.image_name,
                platform: &pi.platform,
                manifest_digest: &subject.digest,
                epoch: facts.epoch,
                files: &files,
                base: base.as_ref(),
                crates: &crates,
            });
            docs.push((Kind::Sbom, bytes));
        }
        if opts.provenance {
            let bytes = provenance::statement(&ProvenanceInput {
                image: facts.image_name,
                platform: &pi.platform,
                manifest_digest: &subject.digest,
                spec_path: &spec_path,
                spec_digest: &spec_digest,
                platforms: &platforms,
                tags: facts.tags,
                repository: facts.repository,
                epoch: facts.epoch,
                files: &files,
                base: base.as_ref(),
                github: &opts.github,
            });
            docs.push((Kind::Provenance, bytes));
        }
        for (kind, bytes) in docs {
            let a = attachment(&pi.platform, kind, &subject, bytes, facts.epoch)?;
            if let Some(dir) = &opts.output_dir {
                write_document(dir, &a)?;
            }
            out.push(a);
        }
    }
    Ok(out)
}

/// What the cargo-auditable data of each executable says, read once per content.
#[derive(Debug, Default)]
struct CrateLists {
    by_content: HashMap<String, Option<Vec<CratePackage>>>,
}

/// A crate list as the layer cache keeps it (keyed by the executable's sha256).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum CratesRecord {
    Crates(Vec<CratePackage>),
    NoData,
    Unreadable(String),
}

impl CrateLists {
    /// The crates of every executable among `files`, in file order; a file whose data cannot
    /// be read is a warning (once per content per run) and contributes none.
    fn of_files(
        &mut self,
        files: &[FileEntry],
        cache: Option<&LayerCache>,
        progress: &dyn Progress,
    ) -> Vec<CratePackage> {
        let mut out = Vec::new();
        for f in files.iter().filter(|f| f.executable) {
            let list = self.by_content.entry(f.sha256.clone()).or_insert_with(|| {
                let record = lookup_crates(f, cache);
                match record {
                    CratesRecord::Crates(c) => Some(c),
                    CratesRecord::NoData => None,
                    CratesRecord::Unreadable(reason) => {
                        progress.event(Event::Warning(&format!(
                            "{}: its cargo-auditable dependency data cannot be read ({reason}); the SBOM lists the file without its crates",
                            f.path
                        )));
                        None
                    }
                }
            });
            for c in list.iter().flatten() {
                out.push(CratePackage {
                    binary: f.path.clone(),
                    ..c.clone()
                });
            }
        }
        out
    }
}

/// The crates of one executable: from the layer cache (by content), else read.
fn lookup_crates(f: &FileEntry, cache: Option<&LayerCache>) -> CratesRecord {
    let digest: Option<Digest> = format!("sha256:{}", f.sha256).parse().ok();
    let key = digest.as_ref().zip(cache);
    if let Some((d, c)) = key
        && let Some(r) = c
            .crates_record(d)
            .and_then(|b| serde_json::from_slice::<CratesRecord>(&b).ok())
    {
        return r;
    }
    let record = match sbom::audited_crates(&f.src, &f.path) {
        Ok(Some(c)) => CratesRecord::Crates(c),
        Ok(None) => CratesRecord::NoData,
        Err(reason) => CratesRecord::Unreadable(reason),
    };
    if let Some((d, c)) = key
        && let Ok(bytes) = serde_json::to_vec(&record)
    {
        c.put_crates_record(d, &bytes);
    }
    record
}

/// Wrap `bytes` into a referrer manifest of `subject`.
pub fn attachment(
    platform: &Platform,
    kind: Kind,
    subject: &Descriptor,
    bytes: Vec<u8>,
    epoch: u64,
) -> Result<Attachment, Error> {
    let bytes = Bytes::from(bytes);
    let document = JsonBlob {
        media_type: kind.artifact_type().into(),
        digest: Digest::of(&bytes),
        bytes,
    };
    let empty = empty_config();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "artifactType": kind.artifact_type(),
        "config": empty.descriptor(),
        "layers": [document.descriptor()],
        "subject": subject,
        "annotations": annotations(kind, &image::rfc3339(epoch)),
    });
    let manifest = JsonBlob::canonical(MEDIA_TYPE_MANIFEST, &manifest, "referrer manifest")?;
    Ok(Attachment {
        platform: platform.clone(),
        kind,
        subject: subject.clone(),
        document,
        manifest,
    })
}

/// Put `attachments` into an OCI layout whose `index.json` is written: their blobs and
/// referrer manifests into `blobs/`, each manifest listed in `index.json` (with its
/// `artifactType` and kind; the manifest names its subject). Nothing for no attachments.
pub fn write_to_layout(
    store: &crate::store::BlobStore,
    attachments: &[Attachment],
) -> std::io::Result<()> {
    if attachments.is_empty() {
        return Ok(());
    }
    store.put_bytes(EMPTY_JSON)?;
    for a in attachments {
        store.put_bytes(&a.document.bytes)?;
        store.put_bytes(&a.manifest.bytes)?;
    }
    let path = store.root().join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let Some(list) = index["manifests"].as_array_mut() else {
        return Err(std::io::Error::other("index.json has no manifests list"));
    };
    list.extend(attachments.iter().map(Attachment::referrer_descriptor));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, sbom::canonical(&index))?;
    std::fs::rename(&tmp, &path)
}

/// The file name `--sbom-output` uses for a platform's document.
pub fn file_name(platform: &Platform, kind: Kind) -> String {
    let p = platform.to_string().replace('/', "-");
    match kind {
        Kind::Sbom => format!("{p}.spdx.json"),
        Kind::Provenance => format!("{p}.provenance.json"),
    }
}

fn write_document(dir: &Path, a: &Attachment) -> Result<(), Error> {
    let path = dir.join(file_name(&a.platform, a.kind));
    crate::store::create_dirs(dir)
        .and_then(|()| std::fs::write(&path, &a.document.bytes))
        .map_err(|e| Error::io(format!("writing --sbom-output {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrer_manifest_layout() {
        let p = Platform::new("linux", "amd64", None);
        let subject = Descriptor::new(MEDIA_TYPE_MANIFEST, Digest::of(b"m"), 1);
        let a = attachment(&p, Kind::Sbom, &subject, b"{\"a\":1}".to_vec(), 0).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&a.manifest.bytes).unwrap();
        assert_eq!(v["artifactType"], MEDIA_TYPE_SPDX);
        assert_eq!(v["config"]["mediaType"], MEDIA_TYPE_EMPTY);
        assert_eq!(
            v["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(v["config"]["size"], 2);
        assert_eq!(v["layers"][0]["digest"], a.document.digest.to_string());
        assert_eq!(v["subject"]["digest"], subject.digest.to_string());
        assert_eq!(
            a.referrer_descriptor()["annotations"][ANNOTATION_KIND],
            "sbom"
        );
        assert_eq!(
            file_name(&p, Kind::Provenance),
            "linux-amd64.provenance.json"
        );
    }
}
