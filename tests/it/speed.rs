//! Speed features (README "Speed"), correctness only (nothing here is timed): the parallel gzip and zstd layers
//! as standard tools read them, golden digests for both codecs, the layer cache's hits and
//! misses on each kind of input change, a corrupted cache entry rebuilt, a no-op re-push that
//! uploads nothing, and bounded memory for a layer far larger than any buffer.

use crate::build::workspace;
use crate::harness::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Index digest of `build-specs/hello.toml` with `--compression zstd` (level 3), the zstd
/// counterpart of build.rs's GOLDEN_HELLO. Changes only with a deliberate format change.
const GOLDEN_HELLO_ZSTD: &str =
    "sha256:e91532bde0a81a12f552326eeaa83049293f797ae7871c324cc9344280f2e53b";

/// Index digest of the generated 3 MiB one-layer spec ([`data_workspace`]) per codec and
/// level: several 128 KiB gzip blocks, so the block/dictionary scheme is pinned too.
const GOLDEN_DATA: &[(&str, &str, &str)] = &[
    // The default level and `--compression-level fast` (gzip 1: imgbuild's own encoder).
    (
        "gzip",
        "5",
        "sha256:780bda66d344a573fe8e8c5a8a614bc83e1ebd78f606f59a0f378d4d9e73a10e",
    ),
    (
        "gzip",
        "fast",
        "sha256:46e64779fc7c93a6005003a424635696378bfbaf5768244e78dadb917e835c8d",
    ),
    (
        "gzip",
        "6",
        "sha256:1c880a9344f5936aa56982f34593119cd42e1d49201322609e511553e833ac4d",
    ),
    (
        "gzip",
        "9",
        "sha256:4ec594659d1b77ca6ae01eca07af2b6f7d8265d6c5cacbb3d56ecc023578c341",
    ),
    (
        "zstd",
        "3",
        "sha256:74f77adc87073bdaf6760a3cb38258fd2727c9e0bd8b8c7c03031a184bd63586",
    ),
];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reproducible, realistically compressible bytes: words and numbers from a xorshift stream.
fn generated(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "registry ",
        "manifest ",
        "layer ",
        "digest ",
        "sha256:",
        "\n",
        "0x7f454c46 ",
        "{\"a\":1} ",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(format!("{} ", x % 100_000).as_bytes());
        } else {
            out.extend_from_slice(words[(x >> 20) as usize % words.len()].as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A workspace with `data/blob.bin` (3 MiB generated) and `data/notes.txt`, and
/// `spec.toml`: one platform, one layer with both files. mtimes set in the past.
fn data_workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    fs::create_dir_all(ws.path().join("data")).unwrap();
    fs::write(ws.path().join("data/blob.bin"), generated(3 << 20, 42)).unwrap();
    fs::write(ws.path().join("data/notes.txt"), "notes\n").unwrap();
    write_spec(ws.path(), "/opt/app/blob.bin", "0o644");
    set_mtime_recursive(ws.path(), 1_000_000_000);
    ws
}

fn write_spec(dir: &Path, dest: &str, mode: &str) {
    fs::write(
        dir.join("spec.toml"),
        format!(
            "platforms = [\"linux/amd64\"]\n\
             [[layer]]\n\
             files = [\n\
               {{ src = \"data/blob.bin\", dest = \"{dest}\", mode = {mode} }},\n\
               {{ src = \"data/notes.txt\", dest = \"/opt/app/notes.txt\" }},\n\
             ]\n"
        ),
    )
    .unwrap();
}

/// `imgbuild build` of `ws/spec.toml` into `ws/out` with the cache at `cache`.
fn build(ws: &Path, cache: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .env("IMGBUILD_CACHE", cache)
        .args(["build", "-f", "spec.toml", "--output", "out"])
        .args(extra);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    run_ok(&mut cmd)
}

/// The layer lines on stderr ("layer <short digest> <size> (<what>[, cached])").
fn layer_lines(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("layer "))
        .map(String::from)
        .collect()
}

fn all_cached(out: &Output) -> bool {
    let lines = layer_lines(out);
    !lines.is_empty() && lines.iter().all(|l| l.ends_with(", cached)"))
}

/// (manifest JSON, path of the first layer blob) of the single-platform layout `out`.
fn first_layer(out_dir: &Path, index_digest: &str) -> (serde_json::Value, PathBuf) {
    let index: serde_json::Value =
        serde_json::from_slice(&read_blob(out_dir, index_digest)).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(out_dir, m)).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    (manifest, blob_path(out_dir, &layer))
}

#[test]
fn both_codecs_have_golden_digests_and_standard_tools_read_them() {
    let ws = data_workspace();
    for (codec, level, golden) in GOLDEN_DATA {
        let cache = tempfile::tempdir().unwrap();
        let out = build(
            ws.path(),
            cache.path(),
            &["--compression", codec, "--compression-level", level],
            &[],
        );
        let digest = text(&out.stdout).trim().to_string();
        assert_eq!(&digest, golden, "{codec} {level}: golden digest changed");
        let (manifest, blob) = first_layer(&ws.path().join("out"), &digest);
        assert_eq!(
            manifest["layers"][0]["mediaType"],
            format!("application/vnd.oci.image.layer.v1.tar+{codec}")
        );
        // The system's own decoders: gzip -t checks the CRC and length trailer; tar lists it.
        if *codec == "gzip" {
            run_ok(Command::new("gzip").arg("-t").arg(&blob));
        }
        let flag = if *codec == "gzip" { "-z" } else { "--zstd" };
        let listing = run_ok(Command::new("tar").arg(flag).arg("-tvf").arg(&blob));
        let listing = text(&listing.stdout);
        assert!(
            listing
                .lines()
                .any(|l| l.ends_with(" opt/app/blob.bin") && l.contains(&format!(" {} ", 3 << 20))),
            "{codec}: {listing}"
        );
        // And the file comes back byte for byte.
        let unpacked = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("tar")
                .arg(flag)
                .arg("-xf")
                .arg(&blob)
                .arg("-C")
                .arg(unpacked.path()),
        );
        assert!(
            fs::read(unpacked.path().join("opt/app/blob.bin")).unwrap() == generated(3 << 20, 42),
            "{codec}: unpacked file differs"
        );
        // skopeo reads the layout and verifies every digest on the way.
        let copy = tempfile::tempdir().unwrap();
        skopeo_ok(&[
            "copy",
            &format!("oci:{}", ws.path().join("out").display()),
            &format!("oci:{}:x", copy.path().display()),
        ]);
    }
}

#[test]
fn zstd_golden_digest_of_the_example() {
    let ws = workspace(1_000_000_000);
    let out = run_ok(imgbuild().current_dir(ws.path()).args([
        "build",
        "-f",
        "build-specs/hello.toml",
        "--compression",
        "zstd",
        "--output",
        "out",
    ]));
    assert_eq!(text(&out.stdout).trim(), GOLDEN_HELLO_ZSTD);
    // zstd -dc | sha256sum gives every platform's diff_ids.
    assert_eq!(
        verify_digests_with_standard_tools(&ws.path().join("out"), GOLDEN_HELLO_ZSTD),
        (3, 6)
    );
}

/// A workspace for `spec.toml` with three platforms and six layers, each layer a different
/// generated file per platform (`data/<arch>/part<N>.bin`, 96-640 KiB: several 128 KiB gzip
/// blocks each), so 18 distinct layers compress at once with `--jobs 8`, one by one with 1.
fn many_layers_workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    let mut spec =
        String::from("platforms = [\"linux/amd64\", \"linux/arm64\", \"linux/arm/v7\"]\n");
    for (a, arch) in ["amd64", "arm64", "arm"].iter().enumerate() {
        fs::create_dir_all(ws.path().join("data").join(arch)).unwrap();
        for n in 0..6 {
            let len = (96 + 109 * n) << 10;
            fs::write(
                ws.path().join(format!("data/{arch}/part{n}.bin")),
                generated(len, 1000 + (a * 10 + n) as u64),
            )
            .unwrap();
        }
    }
    for n in 0..6 {
        spec.push_str(&format!(
            "[[layer]]\nfiles = [{{ src = \"data/{{arch}}/part{n}.bin\", dest = \"/opt/part{n}.bin\" }}]\n"
        ));
    }
    fs::write(ws.path().join("spec.toml"), spec).unwrap();
    set_mtime_recursive(ws.path(), 1_000_000_000);
    ws
}

/// The sorted file names under `<layout>/blobs/sha256`.
fn blob_names(layout: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn jobs_do_not_change_the_bytes() {
    // --jobs changes how many layers compress at once (the per-layer thread count follows the
    // machine; its independence is tested in src/compress.rs with 1-4 threads). With 18
    // distinct layers over 3 platforms, --jobs 1 and --jobs 8 schedule them differently;
    // the digests and every blob must be the same, for both codecs.
    let ws = many_layers_workspace();
    for codec in ["gzip", "zstd"] {
        let runs: Vec<(String, Vec<String>)> = ["1", "8"]
            .iter()
            .map(|jobs| {
                let out_dir = format!("out-{codec}-{jobs}");
                let out = run_ok(
                    imgbuild()
                        .current_dir(ws.path())
                        .args(["build", "-f", "spec.toml", "--no-cache", "--output"])
                        .arg(&out_dir)
                        .args(["--compression", codec, "--jobs", jobs]),
                );
                let digest = text(&out.stdout).trim().to_string();
                (digest, blob_names(&ws.path().join(&out_dir)))
            })
            .collect();
        assert_eq!(runs[0], runs[1], "{codec}: --jobs 1 and --jobs 8 differ");
        // 18 layers + 3 configs + 3 manifests + the index.
        assert_eq!(runs[0].1.len(), 18 + 3 + 3 + 1, "{codec}: {:?}", runs[0].1);
        let layout = ws.path().join(format!("out-{codec}-8"));
        assert_eq!(
            verify_digests_with_standard_tools(&layout, &runs[0].0),
            (3, 18),
            "{codec}"
        );
    }
}

/// One kind of input change, and whether the cached layer may still be used after it.
struct CacheCase {
    name: &'static str,
    change: fn(&Path),
    extra: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    hit: bool,
}

#[test]
fn cache_hits_and_misses_on_each_kind_of_input_change() {
    let cases = [
        CacheCase {
            name: "nothing changed",
            change: |_| {},
            extra: &[],
            env: &[],
            hit: true,
        },
        CacheCase {
            name: "touched, same content (mtime is not an input)",
            change: |ws| set_mtime_recursive(ws, 1_600_000_000),
            extra: &[],
            env: &[],
            hit: true,
        },
        CacheCase {
            name: "content, same size",
            change: |ws| {
                let p = ws.join("data/notes.txt");
                fs::write(&p, "NOTES\n").unwrap();
            },
            extra: &[],
            env: &[],
            hit: false,
        },
        CacheCase {
            name: "mode",
            change: |ws| write_spec(ws, "/opt/app/blob.bin", "0o755"),
            extra: &[],
            env: &[],
            hit: false,
        },
        CacheCase {
            name: "path",
            change: |ws| write_spec(ws, "/opt/app/other.bin", "0o644"),
            extra: &[],
            env: &[],
            hit: false,
        },
        CacheCase {
            name: "epoch",
            change: |_| {},
            extra: &[],
            env: &[("SOURCE_DATE_EPOCH", "1700000000")],
            hit: false,
        },
        CacheCase {
            name: "codec",
            change: |_| {},
            extra: &["--compression", "zstd"],
            env: &[],
            hit: false,
        },
        CacheCase {
            name: "level",
            change: |_| {},
            extra: &["--compression-level", "1"],
            env: &[],
            hit: false,
        },
    ];
    for case in cases {
        let ws = data_workspace();
        let cache = tempfile::tempdir().unwrap();
        let first = build(ws.path(), cache.path(), &[], &[]);
        assert!(
            layer_lines(&first).iter().all(|l| !l.contains("cached")),
            "{}: a fresh cache cannot hit: {:?}",
            case.name,
            layer_lines(&first)
        );
        (case.change)(ws.path());
        let second = build(ws.path(), cache.path(), case.extra, case.env);
        assert_eq!(
            all_cached(&second),
            case.hit,
            "{}: {:?}",
            case.name,
            layer_lines(&second)
        );
        // A hit must give exactly what a build without the cache gives.
        let uncached = {
            let mut extra = case.extra.to_vec();
            extra.push("--no-cache");
            build(ws.path(), cache.path(), &extra, case.env)
        };
        assert_eq!(
            text(&second.stdout),
            text(&uncached.stdout),
            "{}: cached and uncached builds differ",
            case.name
        );
        // After a miss the new inputs are cached in turn.
        let third = build(ws.path(), cache.path(), case.extra, case.env);
        assert!(
            all_cached(&third),
            "{}: {:?}",
            case.name,
            layer_lines(&third)
        );
    }
}

#[test]
fn corrupted_cache_entry_is_detected_and_rebuilt() {
    let ws = data_workspace();
    let cache = tempfile::tempdir().unwrap();
    let first = build(ws.path(), cache.path(), &[], &[]);
    let digest = text(&first.stdout).trim().to_string();
    let (manifest, _) = first_layer(&ws.path().join("out"), &digest);
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let cached_blob = blob_path(cache.path(), &layer);
    // Same size, one byte flipped: only a re-hash can tell.
    let mut bytes = fs::read(&cached_blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    // Break the hard link to the first output layout so only the cache's copy is corrupted.
    fs::remove_file(&cached_blob).unwrap();
    fs::write(&cached_blob, &bytes).unwrap();
    fs::remove_dir_all(ws.path().join("out")).unwrap();

    let second = build(ws.path(), cache.path(), &[], &[]);
    assert!(
        layer_lines(&second).iter().all(|l| !l.contains("cached")),
        "a corrupted entry was reused: {:?}",
        layer_lines(&second)
    );
    assert_eq!(text(&second.stdout).trim(), digest);
    let rebuilt = fs::read(&cached_blob).unwrap();
    assert_eq!(
        format!("sha256:{}", sha256_hex(&rebuilt)),
        layer,
        "the cache holds a good blob again"
    );
    let third = build(ws.path(), cache.path(), &[], &[]);
    assert!(all_cached(&third), "{:?}", layer_lines(&third));
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn noop_repush_uploads_no_blob_and_rebuilds_no_layer() {
    let reg = Registry::start();
    let ws = data_workspace();
    let cache = tempfile::tempdir().unwrap();
    let repo = format!("{}/speed/noop", reg.addr);
    let push = || {
        run_ok(
            imgbuild()
                .current_dir(ws.path())
                .env("IMGBUILD_CACHE", cache.path())
                .args(["push", "-f", "spec.toml", "--repo", &repo]),
        )
    };
    let first = push();
    let log_before = reg.log().len();
    let second = push();
    assert_eq!(text(&first.stdout), text(&second.stdout));
    assert!(all_cached(&second), "{:?}", layer_lines(&second));
    let new_log = &reg.log()[log_before..];
    let blob_writes: Vec<&str> = new_log
        .lines()
        .filter(|l| l.contains("/blobs/uploads/"))
        .collect();
    assert!(
        blob_writes.is_empty(),
        "no-op re-push started blob uploads: {blob_writes:?}"
    );
    assert!(
        !text(&second.stderr).contains("uploaded "),
        "{}",
        text(&second.stderr)
    );
    // What is there is still whole: skopeo verifies every digest.
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg, "speed/noop:latest", dest.path(), "latest");
}

/// Peak resident memory (VmHWM, KiB) of a running child, polled until it exits. The peak of
/// a streaming build is reached early and kept, so polling sees it.
fn run_peak_rss_kib(cmd: &mut Command) -> (Output, u64) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Some(kib) = fs::read_to_string(&status_path).ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        }) {
            peak = peak.max(kib);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (out, peak)
}

#[test]
fn memory_stays_bounded_for_a_layer_far_larger_than_any_buffer() {
    // 384 MiB, sparse (no disk used): streamed through tar, sha256, the parallel gzip and the
    // blob file. A whole-layer buffer anywhere would show as hundreds of MiB.
    const SIZE: u64 = 384 << 20;
    let ws = tempfile::tempdir().unwrap();
    fs::create_dir_all(ws.path().join("data")).unwrap();
    let big = fs::File::create(ws.path().join("data/blob.bin")).unwrap();
    big.set_len(SIZE).unwrap();
    fs::write(ws.path().join("data/notes.txt"), "notes\n").unwrap();
    write_spec(ws.path(), "/big.bin", "0o644");
    let (out, peak_kib) = run_peak_rss_kib(imgbuild().current_dir(ws.path()).args([
        "build",
        "-f",
        "spec.toml",
        "--output",
        "out",
        "--no-cache",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(peak_kib > 0, "could not read VmHWM");
    assert!(
        peak_kib < 64 * 1024,
        "peak RSS {peak_kib} KiB for a {SIZE}-byte layer"
    );
}

/// Push `ws/spec.toml` to `reg`/`repo` with the cache at `cache`.
fn push_to(ws: &Path, cache: &Path, reg: &Registry, repo: &str) -> Output {
    run_ok(
        imgbuild()
            .current_dir(ws)
            .env("IMGBUILD_CACHE", cache)
            // The mount records cover the image's blobs; referrers are tests/it/supply.rs's.
            .args([
                "push",
                "-f",
                "spec.toml",
                "--sbom",
                "none",
                "--provenance",
                "none",
            ])
            .args(["--repo"])
            .arg(format!("{}/{repo}", reg.addr)),
    )
}

/// The access-log lines written since `from` (a byte offset of the log).
fn log_since(reg: &Registry, from: usize) -> Vec<String> {
    reg.log()[from..]
        .lines()
        .filter(|l| l.contains("HTTP/1.1\""))
        .map(String::from)
        .collect()
}

#[test]
fn blobs_pushed_before_are_mounted_not_uploaded_and_202_falls_back_to_upload() {
    let reg = Registry::start();
    let ws = data_workspace();
    let cache = tempfile::tempdir().unwrap();
    push_to(ws.path(), cache.path(), &reg, "speed/a");

    // Mounted: the cache recorded that speed/a has every blob.
    let mark = reg.log().len();
    let out = push_to(ws.path(), cache.path(), &reg, "speed/b");
    let lines = log_since(&reg, mark);
    let mounts: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("POST /v2/speed/b/blobs/uploads/?") && l.contains("mount=sha256"))
        .collect();
    // Two blobs: the layer and the config.
    assert_eq!(mounts.len(), 2, "{lines:#?}");
    assert!(
        mounts
            .iter()
            .all(|l| l.contains("from=speed%2Fa") && l.contains("\" 201 ")),
        "{mounts:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("PUT /v2/speed/b/blobs/")),
        "a mounted blob was uploaded: {lines:#?}"
    );
    assert!(
        text(&out.stderr).contains("mounted from speed/a"),
        "{}",
        text(&out.stderr)
    );
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg, "speed/b:latest", dest.path(), "latest");

    // 202: the records say speed/a and speed/b have the blobs, but the registry forgot both
    // repositories; the mount is refused and the blobs are uploaded instead.
    let repos = reg.storage().join("docker/registry/v2/repositories/speed");
    fs::remove_dir_all(repos.join("a")).unwrap();
    fs::remove_dir_all(repos.join("b")).unwrap();
    let mark = reg.log().len();
    push_to(ws.path(), cache.path(), &reg, "speed/c");
    let lines = log_since(&reg, mark);
    let refused = lines
        .iter()
        .filter(|l| l.contains("POST /v2/speed/c/blobs/uploads/?") && l.contains("\" 202 "))
        .count();
    let puts = lines
        .iter()
        .filter(|l| l.contains("PUT /v2/speed/c/blobs/uploads/") && l.contains("\" 201 "))
        .count();
    // The declined mount's answer is the upload session: no second POST per blob.
    let plain_posts = lines
        .iter()
        .filter(|l| l.contains("POST /v2/speed/c/blobs/uploads/ "))
        .count();
    assert_eq!((refused, puts, plain_posts), (2, 2, 0), "{lines:#?}");
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg, "speed/c:latest", dest.path(), "latest");
}

#[test]
fn small_layer_is_uploaded_while_a_big_one_still_compresses() {
    // Overlap: the notes layer is finished at once and its upload starts while the 512 MiB
    // layer (sparse, but every byte still goes through tar, sha256 and deflate) is compressed.
    let reg = Registry::start();
    let ws = tempfile::tempdir().unwrap();
    fs::create_dir_all(ws.path().join("data")).unwrap();
    fs::File::create(ws.path().join("data/blob.bin"))
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    fs::write(ws.path().join("data/notes.txt"), "notes\n").unwrap();
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\n\
         [[layer]]\nfiles = [{ src = \"data/blob.bin\", dest = \"/big.bin\" }]\n\
         [[layer]]\nfiles = [{ src = \"data/notes.txt\", dest = \"/notes.txt\" }]\n",
    )
    .unwrap();
    let out = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .args([
                "push",
                "-f",
                "spec.toml",
                "--no-cache",
                "--jobs",
                "2",
                "--repo",
            ])
            .arg(format!("{}/speed/overlap", reg.addr)),
    );
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let small_built = pos(&|l| l.starts_with("layer ") && l.contains("/notes.txt")).unwrap();
    let big_built = pos(&|l| l.starts_with("layer ") && l.contains("/big.bin")).unwrap();
    let small_digest = lines[small_built].split_whitespace().nth(1).unwrap();
    let small_upload = pos(&|l| l.starts_with("uploading ") && l.contains(small_digest))
        .unwrap_or_else(|| panic!("no upload of {small_digest}:\n{stderr}"));
    assert!(
        small_built < small_upload && small_upload < big_built,
        "the small layer's upload did not start before the big layer was built:\n{stderr}"
    );
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg, "speed/overlap:latest", dest.path(), "latest");
}

#[test]
fn bad_compression_flags_are_usage_errors() {
    let ws = data_workspace();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--compression", "xz"],
            "--compression: unknown compression \"xz\": use gzip or zstd",
        ),
        (
            &["--compression-level", "10"],
            "--compression-level 10: gzip levels are 0-9",
        ),
        (
            &["--compression", "zstd", "--compression-level", "0"],
            "--compression-level 0: zstd levels are 1-19",
        ),
    ];
    for (args, want) in cases {
        let out = imgbuild()
            .current_dir(ws.path())
            .args(["build", "-f", "spec.toml", "--output", "out"])
            .args(*args)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn changing_one_of_several_layers_rebuilds_exactly_that_layer() {
    let ws = tempfile::tempdir().unwrap();
    fs::create_dir_all(ws.path().join("data")).unwrap();
    let mut spec = String::from("platforms = [\"linux/amd64\", \"linux/arm64\"]\n");
    for i in 0..4 {
        fs::write(
            ws.path().join(format!("data/part{i}.bin")),
            generated(200_000, i + 1),
        )
        .unwrap();
        spec.push_str(&format!(
            "[[layer]]\nfiles = [{{ src = \"data/part{i}.bin\", dest = \"/data/part{i}.bin\" }}]\n"
        ));
    }
    fs::write(ws.path().join("spec.toml"), spec).unwrap();
    set_mtime_recursive(ws.path(), 1_000_000_000);
    let cache = tempfile::tempdir().unwrap();
    build(ws.path(), cache.path(), &[], &[]);
    fs::write(ws.path().join("data/part2.bin"), generated(200_000, 99)).unwrap();
    let out = build(ws.path(), cache.path(), &[], &[]);
    let rebuilt: Vec<String> = layer_lines(&out)
        .into_iter()
        .filter(|l| !l.ends_with(", cached)"))
        .collect();
    assert_eq!(rebuilt.len(), 1, "{:?}", layer_lines(&out));
    assert!(rebuilt[0].contains("/data/part2.bin"), "{rebuilt:?}");
}
