//! The offline sink: an OCI image layout directory (image-spec image-layout.md) — `oci-layout`,
//! `index.json` and `blobs/sha256/...` — and optionally the same as a tar file.
//!
//! The build writes its blobs straight into the layout's `blobs/`, so this only adds the two
//! small top-level files. `index.json` names the image index once per tag, each entry with
//! `org.opencontainers.image.ref.name` set to that tag, so `oci:DIR:TAG` finds every tag (and
//! once without a name when there is no tag, so `skopeo inspect oci:DIR` finds it).
//!
//! The tarball is this layout as a tar file (read by skopeo, crane, podman, containerd's
//! `ctr import` and Docker Engine 25+), or with `--tarball-format docker` the `docker save`
//! format of one platform (see [`crate::docker_archive`]), which every `docker load` reads.

use crate::digest::Digest;
use crate::image::{ANNOTATION_REF_NAME, BuiltImage, JsonBlob, MEDIA_TYPE_INDEX};
use crate::store::BlobStore;
use serde_json::json;
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The layout's `index.json`, canonical like every other JSON we write.
pub fn layout_index(
    image: &BuiltImage,
    tags: &[String],
) -> Result<JsonBlob, crate::image::ImageError> {
    let desc = json!({
        "mediaType": image.index.media_type,
        "digest": image.index.digest,
        "size": image.index.bytes.len(),
    });
    let manifests: Vec<_> = if tags.is_empty() {
        vec![desc]
    } else {
        tags.iter()
            .map(|tag| {
                let mut d = desc.clone();
                d["annotations"] = json!({ ANNOTATION_REF_NAME: tag });
                d
            })
            .collect()
    };
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    });
    JsonBlob::canonical(MEDIA_TYPE_INDEX, &index, "layout index.json")
}

/// Finish the layout whose blobs are already in `store` (rooted at the layout directory).
/// Images already in its `index.json` under other tags are kept (the same tags are replaced),
/// as `skopeo copy` and `crane` do when they write into an existing layout.
pub fn write_layout(image: &BuiltImage, store: &BlobStore, tags: &[String]) -> io::Result<()> {
    let ours = layout_index(image, tags).map_err(io::Error::other)?;
    let path = store.root().join("index.json");
    let index = match existing_entries(&path)? {
        None => ours,
        Some(old) => {
            let mut doc: serde_json::Value =
                serde_json::from_slice(&ours.bytes).map_err(io::Error::other)?;
            let mine = doc["manifests"].as_array().cloned().unwrap_or_default();
            let name = |e: &serde_json::Value| e["annotations"][ANNOTATION_REF_NAME].clone();
            let names: Vec<serde_json::Value> = mine.iter().map(name).collect();
            let mut kept: Vec<serde_json::Value> = old
                .into_iter()
                .filter(|e| !names.contains(&name(e)))
                .collect();
            kept.extend(mine);
            doc["manifests"] = serde_json::Value::Array(kept);
            JsonBlob::canonical(MEDIA_TYPE_INDEX, &doc, "layout index.json")
                .map_err(io::Error::other)?
        }
    };
    write_atomic(&store.root().join("oci-layout"), OCI_LAYOUT)?;
    write_atomic(&store.root().join("index.json"), &index.bytes)
}

/// The `manifests` of an existing layout `index.json`, or None when there is none. One that
/// cannot be read as an image index is an error: overwriting it would lose what it names.
fn existing_entries(path: &Path) -> io::Result<Option<Vec<serde_json::Value>>> {
    use std::io::Read as _;
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(with_path(e, path)),
    };
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {why}; it is not an OCI layout index this build can add to (choose another --output, or remove it)",
                path.display()
            ),
        )
    };
    if !meta.is_file() {
        return Err(invalid("not a regular file"));
    }
    let max = crate::registry::pull::MAX_JSON_BYTES;
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| with_path(e, path))?;
    if bytes.len() > max {
        return Err(invalid("over 4 MiB"));
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| invalid("not JSON"))?;
    match doc["manifests"].as_array() {
        Some(m) if doc["schemaVersion"] == 2 => Ok(Some(m.clone())),
        _ => Err(invalid("no schemaVersion 2 and manifests list")),
    }
}

/// Refuse to write a layout into `dir` when it holds anything but a layout (`oci-layout`,
/// `index.json`, `blobs/`, maybe left by an earlier or failed build): a build must not mix
/// blobs into, say, a source directory named by mistake.
pub fn check_output_dir(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(with_path(e, dir)),
    };
    let foreign: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !matches!(n.as_str(), "oci-layout" | "index.json" | "blobs"))
        .collect();
    if foreign.is_empty() {
        // An index.json that cannot be added to is refused now, before any blob is written.
        existing_entries(&dir.join("index.json")).map(|_| ())
    } else {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is not empty and not an OCI layout (it holds {}); choose a new or empty --output directory",
                dir.display(),
                crate::untrusted::shown_list(&foreign, 5, 60)
            ),
        ))
    }
}

/// Write `bytes` to a temporary name and rename it to `path`; on any failure (a full disk)
/// the temporary file is removed and `path` keeps what it held.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let r = crate::store::create_file(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(|e| with_path(e, path))
}

/// `e` with the file it concerns in its message (an io::Error alone names no path).
fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Every blob the image references, each once, in a stable order.
pub fn referenced_blobs(image: &BuiltImage) -> BTreeSet<Digest> {
    let mut all = BTreeSet::new();
    all.insert(image.index.digest.clone());
    for i in &image.images {
        all.insert(i.manifest.digest.clone());
        all.insert(i.config.digest.clone());
        all.extend(i.layers.iter().map(|l| l.digest.clone()));
    }
    all
}

/// Write the layout as a tar file: the same `oci-layout`, `index.json` and referenced blobs
/// (nothing else that may sit in the directory), deterministic like the layers.
pub fn write_tarball(
    image: &BuiltImage,
    store: &BlobStore,
    tags: &[String],
    out: &Path,
) -> io::Result<()> {
    let index = layout_index(image, tags).map_err(io::Error::other)?;
    let (tmp, mut tar) = start_tar(out)?;
    let r = (|| {
        tar.append_data(
            &mut header(OCI_LAYOUT.len() as u64, false),
            "oci-layout",
            OCI_LAYOUT,
        )?;
        tar.append_data(
            &mut header(index.bytes.len() as u64, false),
            "index.json",
            &index.bytes[..],
        )?;
        tar.append_data(&mut header(0, true), "blobs", io::empty())?;
        tar.append_data(&mut header(0, true), "blobs/sha256", io::empty())?;
        for d in referenced_blobs(image) {
            append_blob(&mut tar, store, &d)?;
        }
        finish_tar(tar, &tmp, out)
    })();
    if r.is_err() {
        // No half-written tarball is left behind (a full disk, an unreadable blob).
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Which tar format `--tarball` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TarballFormat {
    /// The OCI image layout, all platforms.
    #[default]
    Oci,
    /// `docker save`'s format, one platform ([`crate::docker_archive`]).
    Docker,
}

impl std::str::FromStr for TarballFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oci" => Ok(TarballFormat::Oci),
            "docker" | "docker-archive" => Ok(TarballFormat::Docker),
            other => Err(format!(
                "{other:?} is not a tarball format; use oci or docker"
            )),
        }
    }
}

/// A deterministic tar header: root-owned, mtime 0, 0644 files and 0755 directories.
pub(crate) fn header(size: u64, dir: bool) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(if dir { 0o755 } else { 0o644 });
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h
}

pub(crate) type TarWriter = tar::Builder<BufWriter<fs::File>>;

/// Stream the stored blob `digest` into `tar` as `blobs/sha256/<hex>` (both archive formats
/// name blobs that way).
pub(crate) fn append_blob(
    tar: &mut TarWriter,
    store: &BlobStore,
    digest: &Digest,
) -> io::Result<()> {
    let f = store.open_blob(digest)?;
    let size = f.metadata()?.len();
    tar.append_data(
        &mut header(size, false),
        format!("blobs/sha256/{}", digest.hex()),
        f,
    )
}

/// Open `out`'s temporary sibling for writing (its directory is created, as `-o` and the
/// output files create theirs).
pub(crate) fn start_tar(out: &Path) -> io::Result<(std::path::PathBuf, TarWriter)> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::store::create_dirs(dir)?;
    }
    let tmp = out.with_extension("partial");
    let tar = tar::Builder::new(BufWriter::new(crate::store::create_file(&tmp)?));
    Ok((tmp, tar))
}

/// Finish the tar and move it into place.
pub(crate) fn finish_tar(tar: TarWriter, tmp: &Path, out: &Path) -> io::Result<()> {
    let mut w = tar.into_inner()?;
    w.flush()?;
    drop(w);
    fs::rename(tmp, out)
}
