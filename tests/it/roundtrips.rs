//! Round trips: a CI runner is 20-80 ms from its registry, so a push should wait for as few
//! request-after-request steps as its guarantees allow. The proxy holds every request for
//! [`DELAY`] (its delay mode) and records when each started and ended; the tests count the
//! requests and the longest chain of requests that ran one after another
//! ([`proxy::critical_path`]), not wall times.
//!
//! build-specs/hello.toml: 3 platforms, 4 layers (3 per-platform + 1 shared), 3 configs.

use crate::build::workspace;
use crate::harness::*;
use crate::proxy::{self, Proxy, ProxyOpts, Seen};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// Long beside the client's own work between two requests (a few ms in a debug build with a
/// warm layer cache, more on a loaded machine), so that requests of one wave never look like
/// one after another.
const DELAY: Duration = Duration::from_millis(200);

const NO_REFERRERS: &[&str] = &["--sbom", "none", "--provenance", "none"];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn delaying(reg: &Registry) -> Proxy {
    Proxy::start(
        &reg.addr,
        ProxyOpts {
            delay: Some(DELAY),
            ..ProxyOpts::default()
        },
    )
}

/// `imgbuild push -f build-specs/hello.toml --repo <proxy>/<repo> <extra>` with the layer
/// cache `cache`.
fn push(ws: &Path, cache: &Path, proxy: &Proxy, repo: &str, extra: &[&str]) -> Output {
    imgbuild()
        .current_dir(ws)
        .env("IMGBUILD_CACHE", cache)
        .args(["push", "-f", "build-specs/hello.toml", "--repo"])
        .arg(format!("{}/{repo}", proxy.addr))
        .args(extra)
        .output()
        .expect("run imgbuild")
}

/// Push, expect success, return the requests the proxy saw for it.
fn push_ok(ws: &Path, cache: &Path, proxy: &Proxy, repo: &str, extra: &[&str]) -> Vec<Seen> {
    let before = proxy.seen().len();
    let out = push(ws, cache, proxy, repo, extra);
    assert!(out.status.success(), "push failed: {}", text(&out.stderr));
    // Every request has ended once the process has exited, but the proxy's thread may not
    // have marked it yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while proxy.seen()[before..].iter().any(|s| s.end.is_none())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.seen()[before..].to_vec()
}

/// Fill the layer cache `cache` with hello's layers (`imgbuild build`): the pushes then take
/// a few ms to build, and the registry side is what is counted (a cold layer cache costs
/// compression time, not round trips).
fn warm(ws: &Path, cache: &Path) {
    let out = tempfile::tempdir().unwrap();
    run_ok(
        imgbuild()
            .current_dir(ws)
            .env("IMGBUILD_CACHE", cache)
            .args(["build", "-q", "-f", "build-specs/hello.toml", "-o"])
            .arg(out.path().join("layout")),
    );
}

/// A registry behind a delaying proxy, a hello.toml workspace and a layer cache already
/// holding its layers ([`warm`]).
fn warmed_behind_a_delay() -> (Registry, Proxy, tempfile::TempDir, tempfile::TempDir) {
    let reg = Registry::start();
    let proxy = delaying(&reg);
    let ws = workspace(1_700_000_000);
    let cache = tempfile::tempdir().unwrap();
    warm(ws.path(), cache.path());
    (reg, proxy, ws, cache)
}

/// The round trips on the critical path of `seen`, printed with the request log.
fn logged_depth(label: &str, seen: &[Seen]) -> usize {
    let depth = proxy::critical_path(seen, |_| true, |_| true);
    eprintln!(
        "{label}: {depth} round trips, {} requests:\n{}",
        seen.len(),
        show(seen)
    );
    depth
}

/// The image's part of a push (up to its `latest` tag) took at most `max` round trips.
fn assert_image_part_within(seen: &[Seen], max: usize) {
    let depth = proxy::critical_path(seen, |_| true, |s| is_tag_put(s, "latest"));
    assert!(
        depth <= max,
        "{depth} round trips to the tag:\n{}",
        show(seen)
    );
}

fn show(seen: &[Seen]) -> String {
    let t0 = seen.first().map(|s| s.at);
    seen.iter()
        .map(|s| {
            let at = |i: std::time::Instant| i.duration_since(t0.unwrap()).as_millis();
            format!(
                "{:>5}-{:<5} {} {}",
                at(s.at),
                s.end.map_or("?".into(), |e| at(e).to_string()),
                s.method,
                s.target
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_tag_put(s: &Seen, tag: &str) -> bool {
    s.method == "PUT" && s.target.ends_with(&format!("/manifests/{tag}"))
}

fn is_manifest_put_by_digest(s: &Seen) -> bool {
    s.method == "PUT" && s.target.contains("/manifests/sha256:")
}

/// Every request of `after` started after every request of `before` ended.
fn all_after(seen: &[Seen], before: impl Fn(&Seen) -> bool, after: impl Fn(&Seen) -> bool) {
    let last_end = seen
        .iter()
        .filter(|s| before(s))
        .map(|s| s.end.expect("ended"))
        .max()
        .expect("some request before");
    for s in seen.iter().filter(|s| after(s)) {
        assert!(
            s.at >= last_end,
            "{} {} started before its prerequisites ended:\n{}",
            s.method,
            s.target,
            show(seen)
        );
    }
}

#[test]
fn cold_push_waits_seven_round_trips_and_a_re_push_sends_two_requests() {
    let (reg, proxy, ws, cache) = warmed_behind_a_delay();

    // Cold (for the registry): the ping, one wave of blobs (HEAD, POST, PUT, confirming HEAD; layers and configs
    // together), the manifests together, the index under its tag (one PUT stores and tags it).
    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/cold", NO_REFERRERS);
    let index = index_of_tag(&reg, "rt/cold", "latest");
    let depth = logged_depth("cold push", &seen);
    assert!(depth <= 7, "{depth} round trips:\n{}", show(&seen));
    // 1 ping + 7 blobs x 4 + 3 manifests + the index by its tag, and the tag's HEAD (beside
    // the blobs).
    assert_eq!(seen.len(), 34, "{}", show(&seen));
    let count = |m: &str, part: &str| {
        seen.iter()
            .filter(|s| s.method == m && s.target.contains(part))
            .count()
    };
    assert_eq!(count("POST", "/blobs/uploads/"), 7, "{}", show(&seen));
    assert_eq!(count("HEAD", "/blobs/sha256:"), 14, "confirming HEADs");
    assert_eq!(count("HEAD", "/manifests/latest"), 1);
    // The order guarantees hold whatever overlaps: every blob confirmed before any manifest,
    // the platform manifests before the index, which is not sent by digest as well: its tag
    // is the only way it goes up.
    let blob = |s: &Seen| s.target.contains("/blobs/");
    all_after(&seen, blob, |s| {
        s.target.contains("/manifests/") && s.method == "PUT"
    });
    all_after(&seen, is_manifest_put_by_digest, |s| {
        is_tag_put(s, "latest")
    });
    assert_eq!(count("PUT", "/manifests/sha256:"), 3, "{}", show(&seen));
    assert!(
        !seen
            .iter()
            .any(|s| s.target.ends_with(&format!("/manifests/{index}"))),
        "the index went up by digest too:\n{}",
        show(&seen)
    );

    // No-op re-push: the ping and the tag's HEAD, which names our index.
    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/cold", NO_REFERRERS);
    assert!(seen.len() <= 3, "{}", show(&seen));
    assert_eq!(
        seen.iter().map(|s| s.method.as_str()).collect::<Vec<_>>(),
        ["GET", "HEAD"],
        "{}",
        show(&seen)
    );

    // Another tag for the same image: the existing one proves the image is there; only the
    // new tag is written.
    let seen = push_ok(
        ws.path(),
        cache.path(),
        &proxy,
        "rt/cold",
        &[
            "--sbom",
            "none",
            "--provenance",
            "none",
            "--tag",
            "latest",
            "--tag",
            "v2",
        ],
    );
    let writes: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method != "HEAD" && s.method != "GET")
        .collect();
    assert_eq!(writes.len(), 1, "{}", show(&seen));
    assert!(is_tag_put(writes[0], "v2"), "{}", show(&seen));

    // The tag moved to another image: a full push (the blobs are confirmed, not trusted),
    // which is right again.
    let other = push_ok(
        ws.path(),
        cache.path(),
        &proxy,
        "rt/cold",
        &[
            "--sbom",
            "none",
            "--provenance",
            "none",
            "--platform",
            "linux/amd64",
        ],
    );
    assert!(
        other.iter().any(|s| is_tag_put(s, "latest")),
        "{}",
        show(&other)
    );
    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/cold", NO_REFERRERS);
    assert!(
        seen.iter().any(|s| is_tag_put(s, "latest")),
        "{}",
        show(&seen)
    );
    assert_eq!(
        seen.iter()
            .filter(|s| s.method == "HEAD" && s.target.contains("/blobs/"))
            .count(),
        7,
        "every blob asked for:\n{}",
        show(&seen)
    );
    assert_eq!(index, index_of_tag(&reg, "rt/cold", "latest"));
    // A layer cache that knows nothing (another runner): the same image is found by its tag;
    // blobs are asked for, nothing is written.
    let fresh = tempfile::tempdir().unwrap();
    warm(ws.path(), fresh.path());
    let seen = push_ok(ws.path(), fresh.path(), &proxy, "rt/cold", NO_REFERRERS);
    assert!(
        seen.iter().all(|s| s.method == "HEAD" || s.method == "GET"),
        "{}",
        show(&seen)
    );
}

#[test]
fn a_registry_that_refuses_the_tag_question_gets_a_full_push() {
    let reg = Registry::start();
    // A credential that may push but not read manifests (403 on the tag's HEAD).
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            deny: Some(("HEAD".into(), "/manifests/".into())),
            ..ProxyOpts::default()
        },
    );
    let ws = workspace(1_700_000_000);
    let cache = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/nohead", NO_REFERRERS);
        assert!(
            seen.iter().any(|s| is_tag_put(s, "latest")),
            "{}",
            show(&seen)
        );
    }
    index_of_tag(&reg, "rt/nohead", "latest");
}

/// The digest of what `repo:tag` names, from skopeo (not imgbuild).
fn index_of_tag(reg: &Registry, repo: &str, tag: &str) -> String {
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &reg.docker_ref(&format!("{repo}:{tag}")),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    format!("sha256:{}", imgbuild::digest::Digest::of(&out.stdout).hex())
}

#[test]
fn referrers_are_skipped_only_when_this_cache_recorded_attaching_them() {
    let (reg, proxy, ws, cache) = warmed_behind_a_delay();

    // An attach that fails after the image was tagged (the referrers tag cannot be read):
    // the blobs are recorded, the referrers are not.
    let failing = Proxy::start(
        &reg.addr,
        ProxyOpts {
            deny: Some(("GET".into(), "/manifests/sha256-".into())),
            ..ProxyOpts::default()
        },
    );
    let out = push(ws.path(), cache.path(), &failing, "rt/att", &[]);
    assert!(!out.status.success(), "the attach was to fail");
    let tagged = index_of_tag(&reg, "rt/att", "latest");

    // Through the delaying proxy: the tag names our index, but nothing says its referrers
    // are there: they are attached now. The image itself is not sent again.
    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/att", &[]);
    assert!(
        seen.iter().any(|s| s.target.contains("/manifests/sha256-")),
        "referrers attached:\n{}",
        show(&seen)
    );
    assert!(
        !seen.iter().any(
            |s| (is_manifest_put_by_digest(s) && s.target.ends_with(&tagged))
                || is_tag_put(s, "latest")
        ),
        "the index was not sent again:\n{}",
        show(&seen)
    );
    // The image's part of a push with referrers (ending with its tag) is still seven round
    // trips at most: on a new repository.
    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/att2", &[]);
    assert_image_part_within(&seen, 7);

    // Now recorded: a re-push is the ping and the tag's HEAD, referrers included.
    for repo in ["rt/att", "rt/att2"] {
        let seen = push_ok(ws.path(), cache.path(), &proxy, repo, &[]);
        assert!(seen.len() <= 3, "{repo}:\n{}", show(&seen));
    }
    // Other documents (no provenance): not recorded, attached.
    let seen = push_ok(
        ws.path(),
        cache.path(),
        &proxy,
        "rt/att",
        &["--provenance", "none"],
    );
    assert!(
        seen.iter().any(|s| s.target.contains("/manifests/sha256-")),
        "{}",
        show(&seen)
    );
}

/// Requests of `seen` that started after the image's tag `latest` was written: the attach.
fn after_tag(seen: &[Seen]) -> Vec<Seen> {
    let tagged = seen
        .iter()
        .filter(|s| is_tag_put(s, "latest"))
        .map(|s| s.end.expect("ended"))
        .max()
        .expect("the image was tagged");
    seen.iter().filter(|s| s.at >= tagged).cloned().collect()
}

fn is_referrers_read(s: &Seen) -> bool {
    s.method == "GET"
        && (s.target.contains("/referrers/") || s.target.contains("/manifests/sha256-"))
}

#[test]
fn attaching_referrers_to_every_platform_is_six_round_trips_after_the_tag() {
    let (reg, proxy, ws, cache) = warmed_behind_a_delay();

    // Referrers tag schema (docker-registry 2.8 has no referrers API). One wave per step,
    // all three platforms together: the lists (API and tag asked at once) and a HEAD per
    // blob; POST, PUT and the confirming HEAD of the empty config and six documents; the six
    // referrer manifests; the three referrers tags.
    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/refs", &[]);
    let attach = after_tag(&seen);
    let depth = logged_depth("attach", &attach);
    assert!(depth <= 6, "{depth} round trips:\n{}", show(&seen));
    // 3 API GETs + 3 tag GETs, 7 blobs x 4 (HEAD, POST, PUT, HEAD), 6 manifests, 3 tags.
    assert_eq!(attach.len(), 6 + 28 + 6 + 3, "{}", show(&attach));
    // The image's part is unchanged by what follows it.
    assert_image_part_within(&seen, 7);
    let whole = proxy::critical_path(&seen, |_| true, |_| true);
    eprintln!("whole push: {whole} round trips, {} requests", seen.len());
    assert!(whole <= 13, "{whole} round trips:\n{}", show(&seen));
    let referrers_tag = |s: &Seen| s.method == "PUT" && s.target.contains("/manifests/sha256-");
    let referrer_manifest =
        |s: &Seen| is_manifest_put_by_digest(s) && !s.target.contains("/manifests/sha256-");
    let blob = |s: &Seen| s.target.contains("/blobs/");
    all_after(&attach, is_referrers_read, |s| {
        !is_referrers_read(s) && !s.target.contains("/blobs/sha256:")
    });
    all_after(&attach, blob, referrer_manifest);
    all_after(&attach, referrer_manifest, referrers_tag);
    // Every platform lists exactly its two documents, and a re-push with another cache (no
    // record of attaching them) reads the lists and writes nothing.
    let fresh = tempfile::tempdir().unwrap();
    warm(ws.path(), fresh.path());
    let seen = push_ok(ws.path(), fresh.path(), &proxy, "rt/refs", &[]);
    let attach = after_tag_or_head(&seen);
    assert!(attach.iter().all(|s| s.method == "GET"), "{}", show(&seen));
    let depth = proxy::critical_path(&attach, |_| true, |_| true);
    assert_eq!(depth, 1, "{}", show(&seen));

    // With the referrers API (the proxy plays it): no tags to write, one step fewer.
    let api = Proxy::start(
        &reg.addr,
        ProxyOpts {
            delay: Some(DELAY),
            referrers_api: true,
            ..ProxyOpts::default()
        },
    );
    let other = tempfile::tempdir().unwrap();
    warm(ws.path(), other.path());
    let seen = push_ok(ws.path(), other.path(), &api, "rt/refs-api", &[]);
    let attach = after_tag(&seen);
    let depth = proxy::critical_path(&attach, |_| true, |_| true);
    assert!(depth <= 5, "{depth} round trips:\n{}", show(&seen));
    assert!(
        !attach
            .iter()
            .any(|s| s.method == "PUT" && s.target.contains("/manifests/sha256-")),
        "{}",
        show(&attach)
    );
}

/// Requests after the image's part of a no-op re-push (the tag's HEAD, which names the index).
fn after_tag_or_head(seen: &[Seen]) -> Vec<Seen> {
    let head = seen
        .iter()
        .filter(|s| s.method == "HEAD" && s.target.ends_with("/manifests/latest"))
        .map(|s| s.end.expect("ended"))
        .max()
        .expect("the tag was asked for");
    seen.iter().filter(|s| s.at >= head).cloned().collect()
}

#[test]
fn a_wiped_registry_gets_the_image_and_its_referrers_again_despite_the_records() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.addr, ProxyOpts::default());
    let ws = workspace(1_700_000_000);
    let cache = tempfile::tempdir().unwrap();
    warm(ws.path(), cache.path());
    push_ok(ws.path(), cache.path(), &proxy, "rt/wiped", &[]);
    let index = index_of_tag(&reg, "rt/wiped", "latest");
    // The repository is gone (blobs, manifests, tags); the layer cache still records every
    // blob and the referrers as pushed there.
    let repo = reg
        .storage()
        .join("docker/registry/v2/repositories/rt/wiped");
    assert!(repo.is_dir(), "{}", repo.display());
    std::fs::remove_dir_all(&repo).unwrap();

    let seen = push_ok(ws.path(), cache.path(), &proxy, "rt/wiped", &[]);
    assert_eq!(index, index_of_tag(&reg, "rt/wiped", "latest"));
    assert!(
        seen.iter()
            .any(|s| s.method == "PUT" && s.target.contains("/manifests/sha256-")),
        "referrers attached again:\n{}",
        show(&seen)
    );
    // Each platform manifest lists its SBOM and provenance again.
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &reg.docker_ref("rt/wiped:latest"),
    ]);
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let hex = m["digest"].as_str().unwrap().trim_start_matches("sha256:");
        let out = skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &reg.docker_ref(&format!("rt/wiped:sha256-{hex}")),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(list["manifests"].as_array().unwrap().len(), 2, "{list}");
    }
}
