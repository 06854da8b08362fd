//! The built-in base `base = "static"`: what distroless/static (`:nonroot`) gives a static
//! program, generated here deterministically, with nothing downloaded.
//!
//! One gzip layer, the same on every platform:
//! - `/etc/passwd`, `/etc/group`: `root` (0), `nobody` (65534) and `nonroot` (65532), so
//!   `id`, `whoami` and libraries that look up the user (glibc, Go's `os/user`) find the
//!   default user `65532:65532`;
//! - `/etc/nsswitch.conf` (`hosts: files dns`: Go and glibc read it before resolving);
//! - `/etc/ssl/certs/ca-certificates.crt`: the CA bundle, taken from the build machine
//!   (Debian's `ca-certificates`, [`DEFAULT_BUNDLE`]) or the file given with
//!   `--static-ca-bundle` / `IMGBUILD_STATIC_CA_BUNDLE`, byte for byte;
//! - `/tmp` (1777), `/home/nonroot` (0700, owned by 65532), `/root` (0700).
//!
//! No tzdata: a program that needs zones embeds them (Go's `time/tzdata`) or adds a layer.
//! The tar has fixed metadata (mtime 0, numeric owners, no names), so the layer's digest
//! depends only on the bundle's bytes (tests/it/static_base.rs pins one). The config sets
//! `User` 65532:65532, `PATH` and `SSL_CERT_FILE` as distroless does.

use crate::compress::{Codec, Compression, Encoder};
use crate::digest::{Digest, HashingWriter};
use crate::exit::ExitCode;
use crate::image::Descriptor;
use crate::platform::Platform;
use crate::store::BlobStore;
use serde_json::json;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where Debian's (and Ubuntu's, Alpine's) `ca-certificates` keeps the PEM bundle; also the
/// path inside the image.
pub const DEFAULT_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The base's name in specs, `--base` and the `base.name` annotation.
pub const NAME: &str = "static";

const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
";
const GROUP: &str = "root:x:0:
tty:x:5:
staff:x:50:
nobody:x:65534:
nonroot:x:65532:
";
const NSSWITCH: &str = "passwd:         files
group:          files
shadow:         files
gshadow:        files
hosts:          files dns
networks:       files
protocols:      files
services:       files
ethers:         files
rpc:            files
netgroup:       files
";

/// Why the static base could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StaticBaseError {
    #[error(
        "base \"static\": cannot read the CA bundle {}: {cause}; install Debian's ca-certificates (apt-get install ca-certificates), or point --static-ca-bundle (or IMGBUILD_STATIC_CA_BUNDLE) at a PEM bundle",
        path.display()
    )]
    Bundle { path: PathBuf, cause: io::Error },
    #[error(
        "base \"static\": {} holds no PEM certificate; --static-ca-bundle (or IMGBUILD_STATIC_CA_BUNDLE) takes a PEM bundle like {DEFAULT_BUNDLE}",
        path.display()
    )]
    NotPem { path: PathBuf },
    #[error("base \"static\": writing its layer into {}: {cause}", dir.display())]
    Write { dir: PathBuf, cause: io::Error },
}

impl StaticBaseError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            StaticBaseError::Bundle { .. } | StaticBaseError::NotPem { .. } => ExitCode::Input,
            StaticBaseError::Write { .. } => ExitCode::Internal,
        }
    }
}

/// The static layer: its descriptor (gzip) and diff_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticLayer {
    pub descriptor: Descriptor,
    pub diff_id: Digest,
}

/// Read the bundle at `path` (default [`DEFAULT_BUNDLE`]) and write the static layer into
/// `store`.
pub fn write_layer(path: Option<&Path>, store: &BlobStore) -> Result<StaticLayer, StaticBaseError> {
    let path = path.unwrap_or(Path::new(DEFAULT_BUNDLE));
    let bundle = std::fs::read(path).map_err(|cause| StaticBaseError::Bundle {
        path: path.to_path_buf(),
        cause,
    })?;
    if !bundle
        .windows(27)
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(StaticBaseError::NotPem {
            path: path.to_path_buf(),
        });
    }
    layer_from_bundle(&bundle, store).map_err(|cause| StaticBaseError::Write {
        dir: store.root().to_path_buf(),
        cause,
    })
}

/// The layer for the CA bundle `bundle`: fixed entries, fixed metadata, gzip level 6.
pub fn layer_from_bundle(bundle: &[u8], store: &BlobStore) -> io::Result<StaticLayer> {
    // (path, mode, uid/gid, content; None = a directory), sorted by path.
    let entries: [(&str, u32, u64, Option<&[u8]>); 12] = [
        ("etc/", 0o755, 0, None),
        ("etc/group", 0o644, 0, Some(GROUP.as_bytes())),
        ("etc/nsswitch.conf", 0o644, 0, Some(NSSWITCH.as_bytes())),
        ("etc/passwd", 0o644, 0, Some(PASSWD.as_bytes())),
        ("etc/ssl/", 0o755, 0, None),
        ("etc/ssl/certs/", 0o755, 0, None),
        ("etc/ssl/certs/ca-certificates.crt", 0o644, 0, Some(bundle)),
        ("home/", 0o755, 0, None),
        ("home/nonroot/", 0o700, 65532, None),
        ("root/", 0o700, 0, None),
        ("tmp/", 0o1777, 0, None),
        ("usr/", 0o755, 0, None),
    ];
    let gzip = Compression::new(Codec::Gzip, Some(6)).map_err(io::Error::other)?;
    let blob = store.writer()?;
    let encoder = Encoder::new(blob, gzip, 2)?;
    let mut tar = tar::Builder::new(HashingWriter::new(encoder));
    for (path, mode, owner, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_mtime(0);
        match content {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, path, io::empty())?;
            }
            Some(bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(bytes.len() as u64);
                tar.append_data(&mut h, path, bytes)?;
            }
        }
    }
    let (encoder, diff_id, _) = tar.into_inner()?.finish();
    let mut blob = encoder.finish()?;
    blob.flush()?;
    let (digest, size) = blob.commit()?;
    Ok(StaticLayer {
        descriptor: Descriptor::new(Codec::Gzip.media_type(), digest, size),
        diff_id,
    })
}

/// The base's image config for `platform` (what [`crate::image::inherit`] merges ours into).
pub fn config(platform: &Platform, layer: &StaticLayer) -> serde_json::Value {
    let mut cfg = json!({
        "architecture": platform.arch,
        "os": platform.os,
        "config": {
            "User": "65532:65532",
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                format!("SSL_CERT_FILE={DEFAULT_BUNDLE}"),
            ],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id.to_string()] },
        "history": [{
            "created": "1970-01-01T00:00:00Z",
            "created_by": "imgbuild base \"static\": passwd, group, nsswitch.conf, CA certificates, /tmp",
            "comment": "imgbuild",
        }],
    });
    if let Some(v) = &platform.variant {
        cfg["variant"] = json!(v);
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(store: &BlobStore, layer: &StaticLayer) -> Vec<(String, u32, u64)> {
        let file = store.open_blob(&layer.descriptor.digest).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn same_bundle_same_bytes_and_the_expected_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let a = layer_from_bundle(pem, &store).unwrap();
        let b = layer_from_bundle(pem, &store).unwrap();
        assert_eq!(a, b);
        let other = layer_from_bundle(b"-----BEGIN CERTIFICATE-----\nx\n", &store).unwrap();
        assert_ne!(a.descriptor.digest, other.descriptor.digest);
        let got = listing(&store, &a);
        let want: Vec<(String, u32, u64)> = [
            ("etc/", 0o755, 0),
            ("etc/group", 0o644, 0),
            ("etc/nsswitch.conf", 0o644, 0),
            ("etc/passwd", 0o644, 0),
            ("etc/ssl/", 0o755, 0),
            ("etc/ssl/certs/", 0o755, 0),
            ("etc/ssl/certs/ca-certificates.crt", 0o644, 0),
            ("home/", 0o755, 0),
            ("home/nonroot/", 0o700, 65532),
            ("root/", 0o700, 0),
            ("tmp/", 0o1777, 0),
            ("usr/", 0o755, 0),
        ]
        .iter()
        .map(|(p, m, u)| (p.to_string(), *m, *u))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bundle_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("s")).unwrap();
        let missing = dir.path().join("none.crt");
        let e = write_layer(Some(&missing), &store).unwrap_err();
        assert_eq!(e.exit_code(), ExitCode::Input);
        assert!(e.to_string().contains("--static-ca-bundle"), "{e}");
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = write_layer(Some(&junk), &store).unwrap_err();
        assert!(matches!(e, StaticBaseError::NotPem { .. }), "{e}");
    }
}
