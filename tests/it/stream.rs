//! Layers uploaded while they are compressed (`--upload-mode stream`, the default but for
//! ECR): chunks PATCHed with `Content-Range` as the compressed bytes come, the rest with the
//! final PUT (distribution-spec spec.md "Pushing a blob in chunks"), through the recording
//! proxy in front of a real docker-registry; skopeo checks every digest of the result.
//!
//! The layer is 10 MiB of random bytes (they do not compress): two 4 MiB PATCHes and a final
//! PUT of the last 2 MiB (more, if compression outruns the uploads), quick to compress in a
//! debug build.

use crate::harness::*;
use crate::proxy::{Fault, Proxy, ProxyOpts, Seen};
use std::fs;
use std::path::Path;
use std::process::Output;

const CHUNK: u64 = 4 << 20;
const LAYER: usize = 10 << 20;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A workspace with `spec.toml`: one platform, one layer of `LAYER` random bytes (fixed
/// seed), and a small second layer (uploaded the usual way).
fn random_workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    fs::write(
        ws.path().join("random.bin"),
        noise(LAYER, 0x9e37_79b9_7f4a_7c15),
    )
    .unwrap();
    fs::write(ws.path().join("notes.txt"), "notes\n").unwrap();
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\n\
         [[layer]]\nfiles = [{ src = \"random.bin\", dest = \"/random.bin\" }]\n\
         [[layer]]\nfiles = [{ src = \"notes.txt\", dest = \"/notes.txt\" }]\n",
    )
    .unwrap();
    set_mtime_recursive(ws.path(), 1_000_000_000);
    ws
}

/// `imgbuild push` of `ws/spec.toml` to `<proxy>/<repo>` without a layer cache.
fn push(ws: &Path, proxy: &Proxy, repo: &str, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .args([
            "push",
            "-f",
            "spec.toml",
            "--no-cache",
            "-v",
            "--sbom",
            "none",
        ])
        .args(["--provenance", "none", "--retry-base-ms", "10"])
        .arg("--repo")
        .arg(format!("{}/{repo}", proxy.addr))
        .args(extra);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run imgbuild")
}

/// Push, expect success; the index digest and the requests the proxy saw for it.
fn push_ok(
    ws: &Path,
    proxy: &Proxy,
    repo: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (String, Vec<Seen>) {
    let before = proxy.seen().len();
    let out = push(ws, proxy, repo, extra, envs);
    assert!(out.status.success(), "push failed: {}", text(&out.stderr));
    (pushed_digest(&out.stdout), proxy.seen()[before..].to_vec())
}

fn patches(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter().filter(|s| s.method == "PATCH").collect()
}

/// The whole-blob PUTs with `digest=` (a final PUT of a chunked upload also has one).
fn blob_puts(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|s| s.method == "PUT" && s.target.contains("/blobs/uploads/"))
        .count()
}

/// skopeo copies the image (checking every digest) and the random layer is in it whole.
fn verify(reg: &Registry, repo: &str) {
    let dest = tempfile::tempdir().unwrap();
    pull_oci(reg, &format!("{repo}:latest"), dest.path(), "latest");
    let layout = dest.path();
    let top = top_index(layout);
    let manifest = top["manifests"][0]["digest"].as_str().unwrap().to_string();
    let unpacked = tempfile::tempdir().unwrap();
    unpack_layers(layout, &manifest, unpacked.path());
    assert_eq!(
        fs::metadata(unpacked.path().join("random.bin"))
            .unwrap()
            .len(),
        LAYER as u64
    );
}

#[test]
fn a_large_layer_is_patched_in_chunks_while_compressed_and_put_mode_sends_the_same_image() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, ProxyOpts::default());
    let ws = random_workspace();

    let (streamed, seen) = push_ok(
        ws.path(),
        &proxy,
        "stream/a",
        &["--upload-mode", "stream"],
        &[],
    );
    let ranges: Vec<String> = patches(&seen)
        .iter()
        .map(|s| {
            s.content_range
                .clone()
                .expect("a PATCH without Content-Range")
        })
        .collect();
    // Consecutive chunks from the start: two, unless compression outran the uploads (the
    // final PUT then carries more).
    let want: Vec<String> = (0..LAYER as u64 / CHUNK)
        .map(|i| format!("{}-{}", i * CHUNK, (i + 1) * CHUNK - 1))
        .collect();
    assert!(!ranges.is_empty(), "{seen:#?}");
    assert_eq!(ranges, want[..ranges.len()], "{seen:#?}");
    // One POST per blob (3: two layers and the config) and one PUT each: the streamed layer's
    // final PUT carries the rest.
    let posts = seen
        .iter()
        .filter(|s| s.method == "POST" && s.target.contains("/blobs/uploads/"))
        .count();
    assert_eq!((posts, blob_puts(&seen)), (3, 3), "{seen:#?}");
    verify(&reg, "stream/a");

    // The default for a registry that is not ECR streams too; put mode (from the
    // environment) sends no PATCH, and the same image.
    let (default, seen) = push_ok(ws.path(), &proxy, "stream/b", &[], &[]);
    assert!(!patches(&seen).is_empty(), "{seen:#?}");
    let (put, seen) = push_ok(
        ws.path(),
        &proxy,
        "stream/c",
        &[],
        &[("IMGBUILD_UPLOAD_MODE", "put")],
    );
    assert!(patches(&seen).is_empty(), "{seen:#?}");
    assert_eq!(streamed, put);
    assert_eq!(default, put);

    // One build pushed to two repositories: the layer is streamed to each, read from the
    // one file while it is written.
    let more = format!("{}/stream/e", proxy.addr);
    let (both, seen) = push_ok(ws.path(), &proxy, "stream/d", &["--repo", &more], &[]);
    assert_eq!(both, put);
    for repo in ["/v2/stream/d/", "/v2/stream/e/"] {
        let to = |s: &&Seen| s.target.starts_with(repo);
        assert!(patches(&seen).iter().any(to), "{repo}: {seen:#?}");
    }
    verify(&reg, "stream/e");
}

#[test]
fn a_chunk_the_registry_refuses_loses_or_drops_falls_back_to_one_put() {
    let reg = Registry::start();
    let ws = random_workspace();
    let cases: Vec<(&str, ProxyOpts)> = vec![
        (
            "500",
            ProxyOpts {
                fault_nth: vec![("PATCH".into(), 0, Fault::Status(500))],
                ..ProxyOpts::default()
            },
        ),
        (
            "reset",
            ProxyOpts {
                fault_nth: vec![("PATCH".into(), 0, Fault::ResetRequest)],
                ..ProxyOpts::default()
            },
        ),
        (
            "range",
            ProxyOpts {
                patch_range: Some("0-1023".into()),
                ..ProxyOpts::default()
            },
        ),
    ];
    let mut digests = Vec::new();
    for (name, opts) in cases {
        let proxy = Proxy::start(&reg.addr, opts);
        let repo = format!("fallback/{name}");
        let (pushed, seen) = push_ok(ws.path(), &proxy, &repo, &[], &[]);
        // The first PATCH fails: no more chunks; the failed stream's session is left, and the
        // layer goes whole in a new one.
        assert_eq!(patches(&seen).len(), 1, "{name}: {seen:#?}");
        assert_eq!(blob_puts(&seen), 3, "{name}: {seen:#?}");
        verify(&reg, &repo);
        digests.push(pushed);
    }
    digests.dedup();
    assert_eq!(digests.len(), 1, "{digests:?}");
}

#[test]
fn a_registry_that_stops_answering_a_patch_ends_the_push_with_an_error_not_a_hang() {
    // Every request from the first PATCH on is held: the stream gives up on the PATCH, and
    // the usual upload then stalls too; the run ends with the timeout's one-line error.
    let reg = Registry::start();
    let ws = random_workspace();
    let first_patch = {
        let probe = Proxy::start(&reg.addr, ProxyOpts::default());
        let (_, seen) = push_ok(ws.path(), &probe, "hang/probe", &[], &[]);
        seen.iter().position(|s| s.method == "PATCH").unwrap()
    };
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            hang_from: Some(first_patch),
            ..ProxyOpts::default()
        },
    );
    let started = std::time::Instant::now();
    let out = push(
        ws.path(),
        &proxy,
        "hang/a",
        &["--timeout", "2", "--retries", "1", "--deadline", "5"],
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
}
