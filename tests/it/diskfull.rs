//! A full disk (a 16 MiB tmpfs and a 40 MB incompressible layer): `build --output` on it,
//! `push` with the layer cache on it, and `push --no-cache` with TMPDIR on it each end at once
//! with one error line naming the path and exit 1 (a local failure, not bad input), leave no
//! temporary file and no `index.json` pointing at missing blobs, and leave the cache usable:
//! after the file system grows, the same push succeeds.
//!
//! Every run is under a time limit: a hang (every thread asleep, as the layer pipeline once did
//! when the compressor's sink failed) fails the test instead of blocking it.
//!
//! Mounting needs root: outside root the test is skipped, except under CI where it fails.

use crate::harness::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A run that has not ended in this time is a hang (the 40 MB layer takes ~1 s here).
const LIMIT: Duration = Duration::from_secs(120);

/// A tmpfs mounted on a temporary directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `mib` MiB, or None (after saying why) when this is not possible here.
    fn mount(mib: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(Tmpfs { dir });
        }
        let why = "cannot mount a tmpfs (needs root)";
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}: CI must run this test"
        );
        skip(why);
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Give it more room (what a user does after the error).
    fn grow(&self, mib: u32) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {}", self.path().display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}

/// A context with a 40 MB pseudo-random (incompressible) file and a spec for it.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    fs::write(
        ws.path().join("big.bin"),
        noise(40_000_000, 0x2545_f491_4f6c_dd1d),
    )
    .unwrap();
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n[[layer]]\nfiles = [{ src = \"big.bin\", dest = \"/big.bin\" }]\n",
    )
    .unwrap();
    ws
}

/// Run `cmd` under [`LIMIT`]; a run that takes longer is killed and fails the test.
fn run_limited(cmd: &mut Command, what: &str) -> Output {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {LIMIT:?} (a hang); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run failed with exit 1 and one line naming `path` and the full disk.
fn assert_disk_full(out: &Output, path: &Path, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{what}: {err}");
    let line = lines[0];
    assert!(
        line.contains(&path.display().to_string()) && line.contains("No space left on device"),
        "{what}: the error names neither {} nor the full disk: {line}",
        path.display()
    );
}

/// Files under `dir` whose name says they are temporary.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            out.extend(temporaries(&p));
        } else if name.starts_with(".tmp") || name.ends_with(".tmp") || name.ends_with(".partial") {
            out.push(p);
        }
    }
    out
}

/// If `layout` has an index.json, every blob it leads to is there.
fn assert_layout_consistent(layout: &Path) {
    let Ok(bytes) = fs::read(layout.join("index.json")) else {
        return;
    };
    let mut todo = vec![serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()];
    while let Some(doc) = todo.pop() {
        let descs = ["manifests", "layers"]
            .iter()
            .filter_map(|k| doc[k].as_array().cloned())
            .flatten()
            .chain(doc.get("config").cloned());
        for d in descs {
            let digest = d["digest"].as_str().unwrap();
            let blob = blob_path(layout, digest);
            assert!(blob.is_file(), "index.json leads to missing {digest}");
            if d["mediaType"].as_str().is_some_and(|t| t.contains("json")) {
                todo.push(serde_json::from_slice(&fs::read(blob).unwrap()).unwrap());
            }
        }
    }
}

#[test]
fn a_full_disk_ends_every_run_with_exit_1_naming_the_path() {
    let Some(fs16) = Tmpfs::mount(16) else {
        return;
    };
    let ws = workspace();
    let reg = Registry::start();

    // build --output on the full disk, both codecs (two different compressor pipelines).
    for codec in ["gzip", "zstd"] {
        let out_dir = fs16.path().join(format!("out-{codec}"));
        let cache = tempfile::tempdir().unwrap();
        let out = run_limited(
            imgbuild()
                .current_dir(ws.path())
                .env("IMGBUILD_CACHE", cache.path())
                .args(["build", "-f", "spec.toml", "--compression", codec, "-o"])
                .arg(&out_dir),
            &format!("build --compression {codec}"),
        );
        assert_disk_full(&out, &out_dir, &format!("build {codec}"));
        assert_layout_consistent(&out_dir);
        assert_eq!(temporaries(fs16.path()), Vec::<PathBuf>::new(), "{codec}");
        // The failed build removes the output directory it created (space freed, too).
        assert!(
            !out_dir.exists(),
            "{codec}: a failed build left its new output directory"
        );
    }

    // push --no-cache with TMPDIR on the full disk: the scratch store is removed too.
    let tmp = fs16.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let out = run_limited(
        imgbuild()
            .current_dir(ws.path())
            .env("TMPDIR", &tmp)
            .args(["push", "-f", "spec.toml", "--no-cache", "--repo"])
            .arg(format!("{}/full", reg.addr)),
        "push --no-cache",
    );
    assert_disk_full(&out, &tmp, "push --no-cache");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "scratch store left");

    // push with the layer cache on the full disk; then more room, and the same push works.
    let cache = fs16.path().join("cache");
    let push = || {
        let mut cmd = imgbuild();
        cmd.current_dir(ws.path())
            .env("IMGBUILD_CACHE", &cache)
            .args(["push", "-f", "spec.toml", "--repo"])
            .arg(format!("{}/full", reg.addr));
        cmd
    };
    let out = run_limited(&mut push(), "push with the cache on a full disk");
    assert_disk_full(&out, &cache, "push with cache");
    assert_eq!(temporaries(&cache), Vec::<PathBuf>::new());
    let (_, tags) = http_get(&reg.addr, "/v2/full/tags/list", None).unwrap();
    assert!(!tags.contains("\"v1\""), "a failed push tagged v1: {tags}");
    fs16.grow(200);
    let out = run_limited(&mut push(), "push after the disk grew");
    assert!(
        out.status.success(),
        "the cache left by the failed run breaks the next: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let raw = inspect_raw(&reg, "full:v1");
    assert!(
        pushed.ends_with(&format!("@{}", imgbuild::digest::Digest::of(&raw))),
        "{pushed}"
    );
    // skopeo pulls it all, verifying every digest.
    let dest = tempfile::tempdir().unwrap();
    pull_oci(&reg, "full:v1", dest.path(), "v1");
}
