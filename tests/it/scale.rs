//! Resources at scale, with figures: a layer of 100,000 small files builds in bounded memory
//! and time; a registry that reads uploads at 1 MB/s does not trip the stall timeout, and one
//! that stops reading does (the fault proxy of `proxy.rs` in front of the real registry).
//! The measured figures are printed (`cargo test --test it scale -- --nocapture`).

use crate::harness::*;
use crate::proxy::{Proxy, ProxyOpts};
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run `cmd` under `limit` (a hang fails the test), sampling its peak resident memory
/// (`VmHWM` from /proc, in KiB). Returns the output, the time taken and the peak. stdout and
/// stderr are drained while it runs: a child that writes more than a pipe holds would
/// otherwise block on the write and look hung.
fn measured(cmd: &mut Command, limit: Duration, what: &str) -> (Output, Duration, u64) {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if let Some(kib) = fs::read_to_string(&status).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        }) {
            peak = peak.max(kib);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status: exit,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, start.elapsed(), peak)
}

/// Where a tree of many small files is made: tmpfs (`/dev/shm`) when there is one. On this
/// machine's ext4, mounted with `discard`, every unlink of a non-empty file waits for a
/// discard: removing the 100,000-file tree and the cache's 100,000 file records took over 10
/// minutes after the builds had finished (the test that "hung"). The disk's cost is measured
/// by bench/many-files.sh instead; these tests measure imgbuild.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let on_tmpfs = shm.is_dir() && tempfile::tempdir_in(shm).is_ok();
    if on_tmpfs {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// A layer of `files` small files (100 directories), built cold and warm from the same tree:
/// same image, every file in the layer, peak RSS under `max_rss_mib` and each build under
/// `max_time`. Prints the figures.
fn many_small_files(files: usize, max_time: Duration, max_rss_mib: u64) {
    let ws = scratch_dir();
    let tree = ws.path().join("tree");
    let per_dir = files / 100;
    for d in 0..100 {
        let dir = tree.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            fs::write(dir.join(format!("f{f:05}")), format!("{d} {f}\n")).unwrap();
        }
    }
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n[[layer]]\nfiles = [{ src = \"tree\", dest = \"/data\" }]\n",
    )
    .unwrap();
    let cache = ws.path().join("cache");
    let run = || {
        let mut cmd = imgbuild();
        cmd.current_dir(ws.path())
            .env("IMGBUILD_CACHE", &cache)
            .args(["build", "-q", "-f", "spec.toml", "-o", "out"]);
        cmd
    };
    // A hang fails the test instead of holding CI until its timeout.
    let hang = Duration::from_secs(300);
    let (out, cold, cold_peak) = measured(&mut run(), hang, "many files, cold cache");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out2, warm, warm_peak) = measured(&mut run(), hang, "many files, warm cache");
    assert!(out2.status.success());
    assert_eq!(
        out.stdout, out2.stdout,
        "the same files give the same image"
    );
    eprintln!(
        "FIGURES {files} files: cold {:.1} s ({:.0} files/s), peak RSS {} MiB; cached {:.1} s ({:.0} files/s), peak RSS {} MiB",
        cold.as_secs_f64(),
        files as f64 / cold.as_secs_f64(),
        cold_peak / 1024,
        warm.as_secs_f64(),
        files as f64 / warm.as_secs_f64(),
        warm_peak / 1024
    );
    // Memory grows with the number of entries (the plan), never with their content.
    assert!(
        cold_peak < max_rss_mib * 1024 && warm_peak < max_rss_mib * 1024,
        "peak RSS {cold_peak} / {warm_peak} KiB, bound {max_rss_mib} MiB"
    );
    assert!(
        cold < max_time && warm < max_time,
        "{cold:?} / {warm:?}, bound {max_time:?}"
    );

    // Every file is in the layer (+ 100 directories + /data's own entry).
    let out_dir = ws.path().join("out");
    let idx = top_index(&out_dir);
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &out_dir,
        idx["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let layer = blob_path(&out_dir, manifest["layers"][0]["digest"].as_str().unwrap());
    // Counted in process (a `tar -tv` of 100,000 entries through the harness was slow here).
    let gz = flate2::read::GzDecoder::new(fs::File::open(layer).unwrap());
    let entries = tar::Archive::new(gz).entries().unwrap().count();
    assert_eq!(entries, 100 * per_dir + 101, "entries in the layer");
}

/// Runs in CI: 20,000 files (a debug build on a loaded 2-core machine).
#[test]
fn a_layer_of_20000_small_files_builds_in_bounded_memory_and_time() {
    many_small_files(20_000, Duration::from_secs(60), 64);
}

/// The full 100,000 (`cargo test --test it 100000 -- --ignored --nocapture`); the figures of
/// a release build are in bench/many-files.sh.
#[test]
#[ignore = "57 s in a debug build on the loaded 2-core machine (cold 28 s, warm 18 s, 128 MiB), too close to a minute for every CI run; CI runs the 20,000-file variant"]
fn a_layer_of_100000_small_files_builds_in_bounded_memory_and_time() {
    many_small_files(100_000, Duration::from_secs(240), 256);
}

/// A workspace with one 10 MB incompressible file.
fn big_file_workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    fs::write(
        ws.path().join("big.bin"),
        noise(10_000_000, 0x9e37_79b9_7f4a_7c15),
    )
    .unwrap();
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n[[layer]]\nfiles = [{ src = \"big.bin\", dest = \"/big.bin\" }]\n",
    )
    .unwrap();
    ws
}

fn push_through(ws: &Path, proxy: &Proxy, repo: &str, extra: &[&str]) -> (Output, Duration, u64) {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .args(["push", "-f", "spec.toml", "--no-cache", "--repo"])
        .arg(format!("{}/{repo}", proxy.addr))
        .args(["--retry-base-ms", "10"])
        .args(extra);
    measured(
        &mut cmd,
        Duration::from_secs(240),
        "push through a slow proxy",
    )
}

#[test]
fn a_slow_registry_is_waited_for_and_one_that_stops_reading_times_out() {
    let reg = Registry::start();
    let ws = big_file_workspace();

    // 1 MB/s: a 10 MB layer takes ~10 s, far over the 5 s stall timeout, and succeeds
    // because bytes keep moving.
    let slow = Proxy::start(
        &reg.addr,
        ProxyOpts {
            read_rate: Some(1_000_000),
            ..ProxyOpts::default()
        },
    );
    let (out, took, _) = push_through(
        ws.path(),
        &slow,
        "slow",
        &["--timeout", "5", "--retries", "0"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took > Duration::from_secs(5),
        "the proxy did not slow the upload: {took:?}"
    );
    let rate = 10.0 / took.as_secs_f64();
    eprintln!(
        "FIGURES slow registry: 10 MB at 1 MB/s pushed in {took:.1?} ({rate:.2} MB/s), --timeout 5 not tripped"
    );

    // A registry that stops reading after 1 MB: the stall timeout ends the push with exit 5.
    let stuck = Proxy::start(
        &reg.addr,
        ProxyOpts {
            stop_reading_after: Some(1 << 20),
            ..ProxyOpts::default()
        },
    );
    let (out, took, _) = push_through(
        ws.path(),
        &stuck,
        "stuck",
        &["--timeout", "3", "--retries", "1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("no progress"), "{err}");
    // Two attempts of at most ~3 s of silence each (plus the bytes socket buffers absorb).
    assert!(took < Duration::from_secs(40), "{took:?}");
    eprintln!("FIGURES stopped registry: --timeout 3 --retries 1 gave up after {took:.1?}");
}
