//! Reliability and security of `imgbuild push` (README "When the registry or the network misbehaves"), against the real docker-registry
//! with the fault-injecting proxy (`proxy.rs`) in between: a push through ~1-in-5 faulted
//! requests, permanent 5xx within the deadline, kill -9 and resume, a web page instead of a
//! registry, a lying `Docker-Content-Digest`, Bearer tokens end to end, and no
//! `Authorization` header across a redirect to another host. Every result is checked on the
//! registry directly (skopeo verifies every digest).

use crate::harness::*;
use crate::proxy::{ALL_FAULTS, Fault, Proxy, ProxyOpts, Recorder};
use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A workspace with `build-specs/many.toml`: linux/amd64 + linux/arm64, nine layers each
/// holding one small file that differs per platform: 18 layers + 2 configs = 20 blobs.
fn many_blobs_workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    let mut spec =
        String::from("platforms = [\"linux/amd64\", \"linux/arm64\"]\ntags = [\"v1\"]\n");
    for (arch, salt) in [("amd64", 0), ("arm64", 101)] {
        let dir = ws.path().join("data").join(arch);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..9 {
            // A few KiB of varied bytes, different per file and platform.
            let bytes: Vec<u8> = (0..(4096 + i * 1000))
                .map(|j| ((j * 7 + i * 13 + salt) % 251) as u8)
                .collect();
            fs::write(dir.join(format!("f{i}")), bytes).unwrap();
        }
    }
    for i in 0..9 {
        spec.push_str(&format!(
            "[[layer]]\nfiles = [{{ src = \"../data/{{arch}}/f{i}\", dest = \"/data/f{i}\" }}]\n"
        ));
    }
    fs::create_dir_all(ws.path().join("build-specs")).unwrap();
    fs::write(ws.path().join("build-specs/many.toml"), spec).unwrap();
    ws
}

/// `imgbuild push -f build-specs/many.toml --repo ADDR/REPO <extra>` in `ws`.
fn push_many(ws: &Path, addr: &str, repo: &str, extra: &[&str]) -> Command {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .args(["push", "-f", "build-specs/many.toml", "--repo"])
        .arg(format!("{addr}/{repo}"))
        .args(extra);
    cmd
}

/// The index digest of a plain, offline build of the workspace's spec.
fn built_digest(ws: &Path) -> String {
    let out = run_ok(imgbuild().current_dir(ws).args([
        "build",
        "-q",
        "-f",
        "build-specs/many.toml",
        "-o",
        "out",
    ]));
    text(&out.stdout).trim().to_string()
}

/// The one `error:` line of a failed run (and there is exactly one).
fn error_line(out: &Output) -> String {
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

/// Does the registry list `tag` for `repo`? (Straight to the registry, no proxy.)
fn has_tag(reg: &Registry, repo: &str, tag: &str) -> bool {
    let (status, raw) = http_get(&reg.addr, &format!("/v2/{repo}/tags/list"), None).unwrap();
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let tags: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    status == 200
        && tags["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == tag))
}

/// Blob PUTs the registry answered 201, by digest hex, from its access log.
fn blob_puts(reg: &Registry, repo: &str) -> Vec<String> {
    let re = regex::Regex::new(&format!(
        r#""PUT /v2/{repo}/blobs/uploads/[^" ]*digest=sha256%3A([0-9a-f]{{64}})[^"]*" 201"#
    ))
    .unwrap();
    re.captures_iter(&reg.log())
        .map(|c| c[1].to_string())
        .collect()
}

#[test]
fn push_survives_one_fault_in_five_and_skopeo_verifies_every_digest() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            seed: 7,
            one_in: 5,
            kinds: ALL_FAULTS.to_vec(),
            max_per_key: 2,
            bearer: Some(Some(("ci-bot".into(), "proxy-pass-4242".into()))),
            lose_puts: 2,
            // Far beyond the client's 1 s --timeout, so a stall is always seen as a stall
            // (a timeout), never as the close that ends it, even when a loaded machine
            // delays the client's timer by seconds.
            stall: Duration::from_secs(8),
            ..ProxyOpts::default()
        },
    );
    let ws = many_blobs_workspace();
    let started = Instant::now();
    let mut child = push_many(
        ws.path(),
        &proxy.addr,
        "faulty",
        &[
            "-vv",
            "--timeout",
            "1",
            "--retries",
            "8",
            "--retry-base-ms",
            "20",
            "--username",
            "ci-bot",
            "--password-stdin",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"proxy-pass-4242\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");

    // The faults really happened: about one request in five, every kind at least once.
    let seen = proxy.seen();
    let faulted: Vec<Fault> = seen.iter().filter_map(|s| s.fault).collect();
    let rate = faulted.len() as f64 / seen.len() as f64;
    assert!(
        (0.1..=0.35).contains(&rate),
        "{} of {}",
        faulted.len(),
        seen.len()
    );
    eprintln!("{} of {} requests faulted", faulted.len(), seen.len());
    // The kinds cycle in order (proxy.rs), whatever the arrival order of requests: with at
    // least as many faults as kinds, every kind was injected.
    assert!(
        faulted.len() >= ALL_FAULTS.len(),
        "too few faults to see every kind: {faulted:?}"
    );
    let kinds: HashSet<Fault> = faulted.iter().copied().collect();
    for k in ALL_FAULTS {
        assert!(kinds.contains(k), "{k:?} never injected: {faulted:?}");
    }
    assert!(stderr.contains("retry 1 of"), "{stderr}");
    // Two blobs were acknowledged and dropped. The HEAD after the PUT catches a loss (unless
    // that HEAD is itself faulted: then the retry's first HEAD finds the blob missing and
    // uploads it again); skopeo below proves none is missing.
    assert_eq!(proxy.lost(), 2);
    assert!(
        stderr.contains("but does not have it (HEAD answered 404)"),
        "{stderr}"
    );
    eprintln!(
        "fault scenario: {} requests, {} faulted, {:.1} s",
        seen.len(),
        faulted.len(),
        elapsed.as_secs_f64()
    );

    // Every forwarded registry request carried a token the token server issued, and the
    // password and tokens never reached the output, even at -vv.
    let tokens = proxy.tokens();
    assert!(
        tokens.len() >= 2,
        "the injected 401s made it fetch again: {tokens:?}"
    );
    for secret in tokens.iter().map(String::as_str).chain(["proxy-pass-4242"]) {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }

    // The registry has the image under the tag; skopeo pulls it and checks every digest.
    let digest = stdout.trim().rsplit_once('@').unwrap().1.to_string();
    assert!(has_tag(&reg, "faulty", "v1"));
    let pulled = ws.path().join("pulled");
    pull_oci(&reg, &format!("faulty@{digest}"), &pulled, "v1");
    let index: serde_json::Value = serde_json::from_slice(&read_blob(&pulled, &digest)).unwrap();
    let mut blobs = 0;
    for m in index["manifests"].as_array().unwrap() {
        let manifest: serde_json::Value =
            serde_json::from_slice(&read_blob(&pulled, m["digest"].as_str().unwrap())).unwrap();
        blobs += 1 + manifest["layers"].as_array().unwrap().len();
    }
    assert_eq!(blobs, 20);
    // Same image as a fault-free build.
    assert_eq!(built_digest(ws.path()), digest);
}

#[test]
fn permanent_5xx_ends_with_exit_5_within_the_deadline() {
    let reg = Registry::start();
    let ws = many_blobs_workspace();
    // (retries, deadline seconds, base ms, longest acceptable run). The bound only catches
    // a run that ignores --retries or --deadline (it would go on for minutes): both cases
    // end in about 2 s, the wide margin is for a loaded 2-core machine.
    let cases = [(3, 600, 50, 30), (1000, 2, 200, 30)];
    for (retries, deadline, base, limit) in cases {
        let proxy = Proxy::start(
            &reg.addr,
            ProxyOpts {
                one_in: 1,
                kinds: vec![Fault::Status(503)],
                max_per_key: u32::MAX,
                ..ProxyOpts::default()
            },
        );
        let started = Instant::now();
        let out = push_many(
            ws.path(),
            &proxy.addr,
            "down",
            &[
                "--retries",
                &retries.to_string(),
                "--deadline",
                &deadline.to_string(),
                "--retry-base-ms",
                &base.to_string(),
            ],
        )
        .output()
        .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
        let line = error_line(&out);
        assert!(
            line.contains("HTTP 503") && line.contains(&proxy.addr),
            "{line}"
        );
        assert!(elapsed < Duration::from_secs(limit), "{elapsed:?}");
        let seen = proxy.seen().len();
        if retries == 3 {
            assert_eq!(seen, 4, "one attempt and three retries");
        } else {
            assert!(seen > 3, "retried until the deadline: {seen}");
        }
        assert!(out.stdout.is_empty());
    }
    assert!(!has_tag(&reg, "down", "v1"));
}

#[test]
fn kill_9_mid_push_leaves_no_tag_and_the_rerun_uploads_only_what_is_missing() {
    let reg = Registry::start();
    let ws = many_blobs_workspace();
    // One upload at a time; the proxy stops answering from request 30 on (a ping, then
    // HEAD, POST, PUT, HEAD per blob: several blobs are complete by then).
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            hang_from: Some(30),
            ..ProxyOpts::default()
        },
    );
    let mut child = push_many(ws.path(), &proxy.addr, "resume", &["--jobs", "1", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.seen().len() <= 30 {
        assert!(
            Instant::now() < deadline,
            "push did not get far: {:?}",
            proxy.seen()
        );
        assert!(child.try_wait().unwrap().is_none(), "push ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no chance to clean up.
    child.kill().unwrap();
    child.wait().unwrap();
    drop(proxy);

    assert!(
        !has_tag(&reg, "resume", "v1"),
        "an interrupted push left a tag"
    );
    let before = blob_puts(&reg, "resume");
    assert!(!before.is_empty() && before.len() < 20, "{before:?}");

    // The same command again, straight to the registry: completes, same digest as a build.
    // (Referrers off: the count below is of the image's own 20 blobs.)
    let out = run_ok(&mut push_many(
        ws.path(),
        &reg.addr,
        "resume",
        &["-q", "--sbom", "none", "--provenance", "none"],
    ));
    let digest = text(&out.stdout)
        .trim()
        .rsplit_once('@')
        .unwrap()
        .1
        .to_string();
    assert_eq!(built_digest(ws.path()), digest);
    assert!(has_tag(&reg, "resume", "v1"));
    // Each blob was PUT exactly once across both runs: the rerun skipped the finished ones.
    let after = blob_puts(&reg, "resume");
    let unique: HashSet<&String> = after.iter().collect();
    assert_eq!(unique.len(), 20, "{after:?}");
    assert_eq!(
        after.len(),
        20,
        "a finished blob was uploaded again: {after:?}"
    );
}

#[test]
fn a_web_page_or_a_lying_digest_is_exit_5_and_nothing_is_tagged() {
    let reg = Registry::start();
    let ws = many_blobs_workspace();
    // (proxy options, fragment of the error)
    let cases = [
        (
            ProxyOpts {
                html: true,
                ..ProxyOpts::default()
            },
            "an HTML page, not a registry API answer",
        ),
        (
            ProxyOpts {
                wrong_digest: true,
                ..ProxyOpts::default()
            },
            "answered Docker-Content-Digest sha256:0000",
        ),
    ];
    for (opts, want) in cases {
        let proxy = Proxy::start(&reg.addr, opts);
        let out = push_many(ws.path(), &proxy.addr, "liar", &[])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
        let line = error_line(&out);
        assert!(line.contains(want) && line.contains(&proxy.addr), "{line}");
        assert!(out.stdout.is_empty());
        assert!(!has_tag(&reg, "liar", "v1"));
        assert!(
            !reg.log().contains("PUT /v2/liar/manifests/"),
            "a manifest was pushed"
        );
    }
}

#[test]
fn authorization_never_follows_a_redirect_to_another_host() {
    let reg = Registry::start();
    let ws = many_blobs_workspace();
    // 127.0.0.2 is loopback too, but another host to the client.
    let other = Recorder::start("127.0.0.2");
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            bearer: Some(None),
            redirect_blob_head_to: Some(format!("http://{}", other.addr)),
            ..ProxyOpts::default()
        },
    );
    let out = run_ok(&mut push_many(ws.path(), &proxy.addr, "redir", &["-vv"]));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let seen = other.seen();
    assert_eq!(seen.len(), 1, "the redirect was followed once: {seen:?}");
    assert!(
        !seen[0]
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("authorization")),
        "Authorization sent to another host: {seen:?}"
    );
    // The registry itself did get the token (so the test could have failed).
    assert!(proxy.seen().iter().any(|s| {
        s.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))
    }),);
    for t in proxy.tokens() {
        assert!(!all.contains(&t), "token leaked at -vv");
    }
    assert!(has_tag(&reg, "redir", "v1"));
}

#[test]
fn tls_is_verified_on_loopback_too_and_a_failure_names_the_fix() {
    let reg = Registry::start_tls(&["registry.test"]);
    let ws = many_blobs_workspace();
    // No --ca-cert: the throwaway CA is unknown, and --insecure-registry does not turn
    // verification off (it only allows plain http, which a TLS port does not speak).
    for extra in [&[][..], &["--insecure-registry", &reg.addr][..]] {
        let out = push_many(ws.path(), &reg.addr, "tls", extra)
            .output()
            .unwrap();
        // An unknown CA is exit 6 (a certificate refused: no retry helps).
        assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
        let line = error_line(&out);
        assert!(
            line.contains("TLS connection to https://") && line.contains("--ca-cert"),
            "{line}"
        );
    }
    assert!(!reg.log().contains("PUT /v2/"), "{}", reg.log());
}
