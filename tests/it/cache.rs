//! One cache shared by concurrent runs (as CI runners running several jobs on one machine
//! share `~/.cache/imgbuild`): real `imgbuild` processes at once, two real registries, skopeo
//! verifying every digest; `kill -9` in the middle of writing a layer; `imgbuild cache prune`
//! while a push runs; `imgbuild cache du` and `IMGBUILD_CACHE_MAX_SIZE`.

use crate::build::workspace;
use crate::harness::*;
use crate::proxy::{Fault, Proxy, ProxyOpts};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `imgbuild push -q -f build-specs/hello.toml --repo ADDR/REPO` in `ws` with the cache at
/// `cache`.
fn push_cmd(ws: &Path, cache: &Path, addr: &str, repo: &str) -> Command {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .env("IMGBUILD_CACHE", cache)
        .args(["push", "-q", "-f", "build-specs/hello.toml", "--repo"])
        .arg(format!("{addr}/{repo}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn finish(child: Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{what} failed: {}", text(&out.stderr));
    let line = text(&out.stdout).trim().to_string();
    line.split_once('@').expect("REPO@DIGEST").1.to_string()
}

/// Every blob under a digest name in the cache hashes to that name, and every layer record
/// names a blob that is there: nothing a later run trusts without verifying is wrong.
fn assert_cache_consistent(cache: &Path) {
    for dir in ["blobs/sha256", "bases/blobs/sha256"] {
        let Ok(rd) = fs::read_dir(cache.join(dir)) else {
            continue;
        };
        for e in rd {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp") {
                continue;
            }
            let out = Command::new("sha256sum").arg(e.path()).output().unwrap();
            assert!(
                text(&out.stdout).starts_with(&name),
                "{dir}/{name} holds other content"
            );
        }
    }
    for e in fs::read_dir(cache.join("layers")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with(".tmp") {
            continue;
        }
        let record: serde_json::Value = serde_json::from_slice(&fs::read(e.path()).unwrap())
            .expect("a layer record is whole JSON");
        let digest = record["digest"].as_str().unwrap();
        let blob = cache.join("blobs/sha256").join(&digest[7..]);
        assert_eq!(
            fs::metadata(&blob).map(|m| m.len()).ok(),
            record["size"].as_u64(),
            "record for {digest}"
        );
    }
}

#[test]
fn concurrent_pushes_share_one_cache_across_images_and_registries() {
    let (reg1, reg2) = (Registry::start(), Registry::start());
    let ws = workspace(1_000_000_000);
    let cache = tempfile::tempdir().unwrap();
    // Two images: the spec as it is, and with another SOURCE_DATE_EPOCH (every layer,
    // config and manifest differs). Same image twice to one repository, to another
    // repository of the same registry, and to the other registry; all at once, twice over
    // (a cold cache, then a warm one).
    type Case<'a> = (&'a Registry, &'a str, Option<&'a str>);
    let cases: &[Case] = &[
        (&reg1, "a", None),
        (&reg1, "a", None),
        (&reg1, "b", None),
        (&reg2, "a", None),
        (&reg1, "epoch", Some("1700000000")),
        (&reg2, "epoch", Some("1700000000")),
    ];
    let mut digests = Vec::new();
    for round in ["cold", "warm"] {
        let children: Vec<Child> = cases
            .iter()
            .map(|(reg, repo, epoch)| {
                let mut cmd = push_cmd(ws.path(), cache.path(), &reg.addr, repo);
                if let Some(e) = epoch {
                    cmd.env("SOURCE_DATE_EPOCH", e);
                }
                cmd.spawn().unwrap()
            })
            .collect();
        let got: Vec<String> = children
            .into_iter()
            .enumerate()
            .map(|(i, c)| finish(c, &format!("{round} push {i}")))
            .collect();
        digests.push(got);
    }
    let (cold, warm) = (&digests[0], &digests[1]);
    assert_eq!(cold, warm, "warm pushes give the same digests");
    let plain = &cold[0];
    let epoch = &cold[4];
    assert_ne!(plain, epoch);
    for (i, d) in cold.iter().enumerate() {
        assert_eq!(d, if i < 4 { plain } else { epoch }, "push {i}");
    }
    // An independent client pulls every blob of every pushed image and checks its digest.
    for (i, (reg, repo, _)) in cases.iter().enumerate() {
        let dest = tempfile::tempdir().unwrap();
        pull_oci(reg, &format!("{repo}@{}", cold[i]), dest.path(), "x");
        assert_eq!(
            inspect_raw(reg, &format!("{repo}:latest")),
            fs::read(cache.path().join("blobs/sha256").join(&cold[i][7..])).unwrap(),
            "{repo}:latest names the index we built"
        );
    }
    assert_cache_consistent(cache.path());
}

/// A workspace with one big incompressible layer (so that writing it takes a while).
fn big_workspace(mib: usize) -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    fs::create_dir_all(ws.path().join("build-specs")).unwrap();
    let mut bytes = Vec::with_capacity(mib << 20);
    fs::File::open("/dev/urandom")
        .unwrap()
        .take((mib << 20) as u64)
        .read_to_end(&mut bytes)
        .unwrap();
    fs::write(ws.path().join("big.bin"), bytes).unwrap();
    fs::write(ws.path().join("small.txt"), "small\n").unwrap();
    fs::write(
        ws.path().join("build-specs/hello.toml"),
        "platforms = [\"linux/amd64\"]\ntags = [\"latest\"]\n\
         [[layer]]\nfiles = [{ src = \"../small.txt\", dest = \"/small.txt\" }]\n\
         [[layer]]\nfiles = [{ src = \"../big.bin\", dest = \"/big.bin\" }]\n",
    )
    .unwrap();
    set_mtime_recursive(ws.path(), 1_000_000_000);
    ws
}

#[test]
fn a_push_killed_mid_write_leaves_nothing_trusted_and_the_next_one_succeeds() {
    let reg = Registry::start();
    let ws = big_workspace(48);
    let cache = tempfile::tempdir().unwrap();
    let mut child = push_cmd(ws.path(), cache.path(), &reg.addr, "killed")
        .args(["--compression-level", "9"])
        .spawn()
        .unwrap();
    // Kill it once the big layer's temporary blob has some bytes in it.
    let blobs = cache.path().join("blobs/sha256");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut partial = false;
    while Instant::now() < deadline && !partial {
        partial = fs::read_dir(&blobs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(".tmp")
                    && e.metadata().is_ok_and(|m| m.len() > (1 << 20))
            });
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        partial,
        "the push ended before its big layer was half written: {status}"
    );
    assert_cache_consistent(cache.path());

    // The next run builds what is missing and pushes the right image.
    let digest = finish(
        push_cmd(ws.path(), cache.path(), &reg.addr, "killed")
            .args(["--compression-level", "9"])
            .spawn()
            .unwrap(),
        "push after kill -9",
    );
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg, &format!("killed@{digest}"), dest.path(), "x");
    assert_cache_consistent(cache.path());
}

#[test]
fn prune_while_a_push_runs_keeps_its_blobs_and_du_and_max_size_bound_the_cache() {
    let (reg1, reg2) = (Registry::start(), Registry::start());
    let ws = workspace(1_000_000_000);
    let cache = tempfile::tempdir().unwrap();
    let first = finish(
        push_cmd(ws.path(), cache.path(), &reg1.addr, "warm")
            .spawn()
            .unwrap(),
        "first push",
    );
    // The second push, to the other registry (no mounts: it must upload every blob from the
    // cache), goes through a proxy that fails each request twice (503), so it takes a while.
    let proxy = Proxy::start(
        &reg2.addr,
        ProxyOpts {
            one_in: 1,
            kinds: vec![Fault::Status(503)],
            max_per_key: 2,
            ..ProxyOpts::default()
        },
    );
    let child = push_cmd(ws.path(), cache.path(), &proxy.addr, "during")
        .args(["--retry-base-ms", "200"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.seen().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Everything not in use goes; the running push's blobs stay.
    let pruned = run_ok(
        imgbuild()
            .env("IMGBUILD_CACHE", cache.path())
            .args(["cache", "prune"]),
    );
    let pruned = text(&pruned.stdout);
    assert!(
        pruned.contains("blobs a running build or push uses"),
        "{pruned}"
    );
    let second = finish(child, "push during a prune");
    assert_eq!(second, first);
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg2, &format!("during@{second}"), dest.path(), "x");

    // du: sections and a total; a prune with nothing running empties the blobs.
    let du = text(
        &run_ok(
            imgbuild()
                .env("IMGBUILD_CACHE", cache.path())
                .args(["cache", "du"]),
        )
        .stdout,
    );
    assert!(du.contains("blobs") && du.contains("total"), "{du}");
    run_ok(imgbuild().env("IMGBUILD_CACHE", cache.path()).args([
        "cache",
        "prune",
        "--older-than",
        "0s",
    ]));
    let left: Vec<_> = fs::read_dir(cache.path().join("blobs/sha256"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // IMGBUILD_CACHE_MAX_SIZE: after the run the cache is pruned to 1 KiB (the tiny
    // greeting layer may stay; the hello binaries and JSON beyond 1 KiB go).
    let out = run_ok(
        push_cmd(ws.path(), cache.path(), &reg1.addr, "bounded")
            .env("IMGBUILD_CACHE_MAX_SIZE", "1K"),
    );
    assert!(text(&out.stdout).contains(&first[7..]));
    let du = text(
        &run_ok(
            imgbuild()
                .env("IMGBUILD_CACHE", cache.path())
                .args(["cache", "du"]),
        )
        .stdout,
    );
    let total = du.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(total.contains(" B ") || total.contains("KiB"), "{du}");
    let kib: f64 = total.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(!total.contains("KiB") || kib <= 1.0, "{du}");
}

/// The "read N bytes from input files" figure of a `-v` run.
fn input_bytes(stderr: &[u8]) -> u64 {
    let err = text(stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("read ") && l.ends_with(" bytes from input files"))
        .unwrap_or_else(|| panic!("no input byte count in: {err}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_cold_cache_reads_each_input_once_and_a_fresh_checkout_only_hashes() {
    let ws = big_workspace(8);
    let input_size = (8u64 << 20) + "small\n".len() as u64;
    let cache = tempfile::tempdir().unwrap();
    // Files changed within two seconds are not remembered ("racily clean", src/cache.rs).
    let settle = || std::thread::sleep(Duration::from_secs(3));
    settle();
    let build = |dir: &Path| {
        let out = run_ok(
            imgbuild()
                .current_dir(dir)
                .env("IMGBUILD_CACHE", cache.path())
                .args(["build", "-v", "-f", "build-specs/hello.toml", "-o", "out"])
                // The SBOM's checksums come from the same read (or the cache): no more bytes.
                .args(["--sbom", "spdx", "--provenance"]),
        );
        let cached = text(&out.stderr)
            .lines()
            .filter(|l| l.contains(", cached)"))
            .count();
        (input_bytes(&out.stderr), cached, text(&out.stdout))
    };
    // Cold: every byte read once (hashed while tarred, SHA-1 for the SBOM too), not twice.
    let (cold, cached, digest) = build(ws.path());
    assert_eq!((cold, cached), (input_size, 0));
    // Warm: nothing read, not even for the SBOM.
    let (warm, cached, again) = build(ws.path());
    assert_eq!((warm, cached, &again), (0, 2, &digest));
    // A fresh checkout of the same inputs (new inodes): hashed once, nothing built.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(
        ws.path().join("build-specs"),
        copy.path().join("build-specs"),
    );
    fs::copy(ws.path().join("big.bin"), copy.path().join("big.bin")).unwrap();
    fs::copy(ws.path().join("small.txt"), copy.path().join("small.txt")).unwrap();
    settle();
    let (fresh, cached, same) = build(copy.path());
    assert_eq!((fresh, cached, &same), (input_size, 2, &digest));
    // Same sizes, other content: hashed, missed, built (the one case that reads twice).
    let mut big = fs::read(copy.path().join("big.bin")).unwrap();
    big[0] ^= 1;
    fs::write(copy.path().join("big.bin"), big).unwrap();
    let (changed, cached, other) = build(copy.path());
    assert_eq!(cached, 1, "small.txt's layer is still cached");
    // The big file: hashed (a miss), then tarred.
    assert_eq!(changed, 2 * (8u64 << 20));
    assert_ne!(other, digest);
}

#[test]
fn without_a_cache_the_sbom_takes_its_checksums_from_the_one_read() {
    let ws = big_workspace(8);
    let input_size = (8u64 << 20) + "small\n".len() as u64;
    let cache = tempfile::tempdir().unwrap();
    let build = |extra: &[&str], out: &str| {
        let out_dir = ws.path().join(out);
        let run = run_ok(
            imgbuild()
                .current_dir(ws.path())
                .env("IMGBUILD_CACHE", cache.path())
                .args(["build", "-v", "-f", "build-specs/hello.toml", "-o"])
                .arg(&out_dir)
                .args(["--sbom", "spdx", "--provenance"])
                .args(extra),
        );
        let index = fs::read(out_dir.join("index.json")).unwrap();
        (input_bytes(&run.stderr), index)
    };
    // --no-cache: each input read once, hashed (SHA-256, SHA-1) while it is tarred.
    let (read, plain) = build(&["--no-cache"], "plain");
    assert_eq!(read, input_size);
    // The same image and the same referrer manifests (so the same documents) as with a cache.
    let (read, cached) = build(&[], "cached");
    assert_eq!(read, input_size);
    assert_eq!(text(&plain), text(&cached));
    assert!(
        text(&plain).contains("application/spdx+json"),
        "{}",
        text(&plain)
    );
}
