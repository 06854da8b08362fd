//! `--tarball-format docker`: one platform of the image in the format `docker save` writes
//! and every `docker load` reads (moby `image/tarexport`, "docker-archive" in skopeo's
//! words): a `manifest.json` naming the config, the `RepoTags` and the layer files, and those
//! files. Docker Engine before 25 cannot load an OCI layout tarball; this is for local smoke
//! tests (`docker load -i FILE && docker run ...`), not for registries.
//!
//! The blobs go in as they are (`blobs/sha256/<hex>`, the paths Docker 25 itself writes):
//! `docker load` decompresses gzip layers (and zstd from Docker 23 on) and checks them
//! against the config's `rootfs.diff_ids`, which our config already holds.

use crate::image::{BuiltImage, PlatformImage};
use crate::layout::{append_blob, finish_tar, header, start_tar};
use crate::platform::Platform;
use crate::store::BlobStore;
use serde_json::json;
use std::io;
use std::path::Path;

/// The platform a docker archive holds: the build machine's, when it was built, else the
/// first one (an archive holds one image; `docker load` has no platform choice).
pub fn platform_image(image: &BuiltImage) -> Option<&PlatformImage> {
    let host = host_platform();
    image
        .images
        .iter()
        .find(|i| Some(&i.platform) == host.as_ref())
        .or_else(|| image.images.first())
}

/// This machine's platform in OCI terms, if it is one we build.
fn host_platform() -> Option<Platform> {
    let name = match std::env::consts::ARCH {
        "x86_64" => "linux/amd64",
        "aarch64" => "linux/arm64",
        "arm" => "linux/arm/v7",
        _ => return None,
    };
    name.parse().ok()
}

/// `manifest.json`: one entry, its config and layers as paths in the archive.
pub fn manifest_json(image: &PlatformImage, repo_tags: &[String]) -> Vec<u8> {
    let path = |d: &crate::digest::Digest| format!("blobs/sha256/{}", d.hex());
    let layers: Vec<String> = image.layers.iter().map(|l| path(&l.digest)).collect();
    let manifest = json!([{
        "Config": path(&image.config.digest),
        "RepoTags": repo_tags,
        "Layers": layers,
    }]);
    // serde_json keeps a json! object's keys in the order its map type keeps them: sorted.
    serde_json::to_vec(&manifest).unwrap_or_default()
}

/// Write `image` (its blobs in `store`) to `out` as a docker archive holding `platform`, with
/// `repo_tags` (`REPO:TAG`, may be empty: `docker load` then prints the image ID).
pub fn write(
    platform: &PlatformImage,
    store: &BlobStore,
    repo_tags: &[String],
    out: &Path,
) -> io::Result<()> {
    let manifest = manifest_json(platform, repo_tags);
    let (tmp, mut tar) = start_tar(out)?;
    tar.append_data(
        &mut header(manifest.len() as u64, false),
        "manifest.json",
        &manifest[..],
    )?;
    tar.append_data(&mut header(0, true), "blobs", io::empty())?;
    tar.append_data(&mut header(0, true), "blobs/sha256", io::empty())?;
    let mut blobs = vec![platform.config.digest.clone()];
    for l in &platform.layers {
        if !blobs.contains(&l.digest) {
            blobs.push(l.digest.clone());
        }
    }
    for d in blobs {
        append_blob(&mut tar, store, &d)?;
    }
    finish_tar(tar, &tmp, out)
}
