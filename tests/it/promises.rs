//! README promises checked end to end, one test per group: what `push` writes (digest file,
//! image refs, `GITHUB_OUTPUT`, metadata with the tags), `-q`, `--annotation`, the
//! `IMGBUILD_REPO` / `IMGBUILD_COMPRESSION` variables and the order of manifest, index and tag
//! writes in the registry's own log; `build`'s default output, `--context`, `--base oci:DIR`
//! relative to the working directory and an exit code 1; `Retry-After` waited for; an upload
//! that makes progress outliving `--deadline`; ECR's missing repository as exit 2; and
//! `--username` never reaching a base image's registry.

use crate::build::{GOLDEN_HELLO, workspace};
use crate::harness::*;
use crate::proxy::{Fault, Proxy, ProxyOpts};
use std::fs;
use std::path::Path;
use std::time::Duration;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The registry log's request lines (`"PUT /v2/...`), in order, that contain `needle`.
fn log_requests(reg: &Registry, needle: &str) -> Vec<String> {
    reg.log()
        .lines()
        .filter_map(|l| {
            let at = l.find("\"PUT /v2/").or_else(|| l.find("\"POST /v2/"))?;
            let req = &l[at + 1..];
            let req = &req[..req.find(" HTTP/").unwrap_or(req.len())];
            req.contains(needle).then(|| req.to_string())
        })
        .collect()
}

#[test]
fn push_writes_every_output_and_honours_the_environment() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let dir = ws.path();
    let repo = format!("{}/promised", reg.addr);
    fs::write(dir.join("gh-output"), "earlier=kept\n").unwrap();
    let out = imgbuild()
        .current_dir(dir)
        // No --repo and no --compression: from the environment.
        .env("IMGBUILD_REPO", &repo)
        .env("IMGBUILD_COMPRESSION", "zstd")
        .env("GITHUB_OUTPUT", dir.join("gh-output"))
        .args(["push", "-q", "-f", "build-specs/hello.toml"])
        .args(["--tag", "a", "--tag", "b"])
        .args(["--annotation", "com.example.promise=kept"])
        .args(["--digest-file", "digest.txt", "--image-refs", "refs.txt"])
        .args(["--metadata-file", "meta.json"])
        // The request order checked below is the image's (referrers come after the tags).
        .args(["--sbom", "none", "--provenance", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // -q: nothing at all on stderr; stdout is the one line.
    assert_eq!(text(&out.stderr), "", "-q printed on stderr");
    let stdout = text(&out.stdout);
    let digest = pushed_digest(&out.stdout);
    assert_eq!(stdout, format!("{repo}@{digest}\n"));

    assert_eq!(
        fs::read_to_string(dir.join("digest.txt")).unwrap(),
        format!("{digest}\n")
    );
    assert_eq!(
        fs::read_to_string(dir.join("refs.txt")).unwrap(),
        format!("{repo}@{digest}\n")
    );
    assert_eq!(
        fs::read_to_string(dir.join("gh-output")).unwrap(),
        format!("earlier=kept\ndigest={digest}\nimage={repo}@{digest}\n"),
        "GITHUB_OUTPUT is appended to"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["digest"], digest.as_str(), "{meta}");
    assert_eq!(meta["tags"], serde_json::json!(["a", "b"]), "{meta}");
    assert_eq!(meta["image"], format!("{repo}@{digest}"), "{meta}");

    // The registry serves the index under both tags; the metadata's manifests are the
    // index's, with their sizes; every manifest and the index carry the annotation; every
    // layer is zstd.
    assert_serves(&reg, "promised:a", &digest);
    assert_serves(&reg, "promised:b", &digest);
    let index: serde_json::Value =
        serde_json::from_slice(&inspect_raw(&reg, &format!("promised@{digest}"))).unwrap();
    assert_eq!(index["annotations"]["com.example.promise"], "kept");
    let entries = index["manifests"].as_array().unwrap();
    let listed = meta["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(listed.len(), 3, "{meta}");
    let mut manifest_digests = Vec::new();
    for (entry, m) in entries.iter().zip(listed) {
        let d = entry["digest"].as_str().unwrap();
        assert_eq!(m["digest"], d, "{meta}");
        assert_eq!(m["size"], entry["size"], "{meta}");
        assert_serves(&reg, &format!("promised@{d}"), d);
        let manifest: serde_json::Value =
            serde_json::from_slice(&inspect_raw(&reg, &format!("promised@{d}"))).unwrap();
        assert_eq!(
            manifest["annotations"]["com.example.promise"], "kept",
            "{manifest}"
        );
        for layer in manifest["layers"].as_array().unwrap() {
            assert_eq!(
                layer["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+zstd"
            );
        }
        manifest_digests.push(d.to_string());
    }

    // The registry's log: every blob upload finished before the first manifest, the three
    // manifests before the index, which goes up under its tags only (a PUT by tag stores it).
    let puts = log_requests(&reg, "/v2/promised/");
    let pos = |what: &str| {
        puts.iter()
            .position(|l| l.starts_with("PUT") && l.contains(what))
            .unwrap_or_else(|| panic!("{what} never written: {puts:#?}"))
    };
    let last_blob = puts
        .iter()
        .rposition(|l| l.contains("/blobs/uploads/"))
        .unwrap();
    let manifests: Vec<usize> = manifest_digests
        .iter()
        .map(|d| pos(&format!("/manifests/{d}")))
        .collect();
    let tags = [pos("/manifests/a"), pos("/manifests/b")];
    assert!(
        manifests
            .iter()
            .all(|&m| last_blob < m && tags.iter().all(|&t| m < t)),
        "{puts:#?}"
    );
    assert!(
        !puts
            .iter()
            .any(|l| l.starts_with("PUT") && l.contains(&format!("/manifests/{digest}"))),
        "the index went up by digest too: {puts:#?}"
    );
}

/// `imgbuild build` in `cwd` with `args`.
fn build_in(cwd: &Path, args: &[&str]) -> std::process::Output {
    imgbuild()
        .current_dir(cwd)
        .arg("build")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn build_default_output_context_oci_base_and_exit_code_1() {
    let ws = workspace(1_000_000_000);
    let dir = ws.path();

    // No --output: out/<spec file name> under the working directory.
    let out = build_in(dir, &["-f", "build-specs/hello.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), GOLDEN_HELLO);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("out/hello/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], GOLDEN_HELLO);

    // --context: the spec elsewhere, its relative src paths resolved against the context.
    fs::create_dir_all(dir.join("elsewhere/deeper")).unwrap();
    fs::copy(
        dir.join("build-specs/hello.toml"),
        dir.join("elsewhere/deeper/hello.toml"),
    )
    .unwrap();
    let without = build_in(
        dir,
        &["-f", "elsewhere/deeper/hello.toml", "-o", "out-ctx0"],
    );
    assert_eq!(
        without.status.code(),
        Some(3),
        "the src paths do not exist next to the moved spec: {}",
        text(&without.stderr)
    );
    // `../fixtures` from the context `build-specs` leads out of it: refused, unless allowed.
    let ctx = [
        "-f",
        "elsewhere/deeper/hello.toml",
        "--context",
        "build-specs",
    ];
    let refused = build_in(dir, &[&ctx[..], &["-o", "out-ctx1"]].concat());
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("outside the build context"),
        "{}",
        text(&refused.stderr)
    );
    let allowed = build_in(
        dir,
        &[&ctx[..], &["--allow-outside-context", "-o", "out-ctx2"]].concat(),
    );
    assert!(allowed.status.success(), "{}", text(&allowed.stderr));
    assert_eq!(text(&allowed.stdout).trim(), GOLDEN_HELLO);
    // The same spec with its src paths relative to the context `.`: the same image.
    let spec = fs::read_to_string(dir.join("build-specs/hello.toml")).unwrap();
    fs::write(
        dir.join("elsewhere/deeper/hello.toml"),
        spec.replace("\"../fixtures/", "\"fixtures/"),
    )
    .unwrap();
    let with = build_in(
        dir,
        &[
            "-f",
            "elsewhere/deeper/hello.toml",
            "--context",
            ".",
            "-o",
            "out-ctx",
        ],
    );
    assert!(with.status.success(), "{}", text(&with.stderr));
    assert_eq!(text(&with.stdout).trim(), GOLDEN_HELLO);

    // --base oci:DIR is relative to the working directory, not to the spec's directory.
    let based = build_in(
        dir,
        &[
            "-f",
            "build-specs/hello.toml",
            "--base",
            "oci:out/hello",
            "-o",
            "out-based",
        ],
    );
    assert!(based.status.success(), "{}", text(&based.stderr));
    let based_digest = text(&based.stdout).trim().to_string();
    let layout = dir.join("out-based");
    let index: serde_json::Value =
        serde_json::from_slice(&read_blob(&layout, &based_digest)).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let manifest: serde_json::Value =
            serde_json::from_slice(&read_blob(&layout, m["digest"].as_str().unwrap())).unwrap();
        assert_eq!(
            manifest["layers"].as_array().unwrap().len(),
            4,
            "the base's two layers, then ours: {manifest}"
        );
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.base.name"],
            "oci:out/hello"
        );
    }
    // From another working directory the same flag finds nothing: exit 3.
    let elsewhere = build_in(
        &dir.join("build-specs"),
        &[
            "-f",
            "hello.toml",
            "--base",
            "oci:out/hello",
            "-o",
            "../out-x",
        ],
    );
    assert_eq!(
        elsewhere.status.code(),
        Some(3),
        "{}",
        text(&elsewhere.stderr)
    );

    // Exit code 1 (local I/O failing): the output directory cannot be created because a
    // regular file is in the way. One line, naming the path.
    fs::write(dir.join("not-a-dir"), "x").unwrap();
    let failed = build_in(
        dir,
        &["-f", "build-specs/hello.toml", "-o", "not-a-dir/out"],
    );
    let err = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("not-a-dir"),
        "{err}"
    );
}

/// `push -f build-specs/hello.toml --platform linux/amd64 --tag v1 --repo <repo>` in `ws`.
fn push_amd64(ws: &Path, repo: &str) -> std::process::Command {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .args(["push", "-f", "build-specs/hello.toml"])
        .args(["--platform", "linux/amd64", "--tag", "v1", "--repo", repo]);
    cmd
}

#[test]
fn retry_after_is_waited_for() {
    let reg = Registry::start();
    // Every request kind is answered 429 + `Retry-After: 1` once, then passes.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            one_in: 1,
            kinds: vec![Fault::TooMany { http_date: false }],
            max_per_key: 1,
            ..ProxyOpts::default()
        },
    );
    let ws = workspace(1_000_000_000);
    // Backoff alone would wait about a millisecond. One layer upload at a time (the config
    // goes beside it: `--jobs` bounds layer uploads only).
    let out = push_amd64(ws.path(), &format!("{}/later", proxy.addr))
        .args(["--retry-base-ms", "1", "--jobs", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let seen = proxy.seen();
    let mut checked = 0;
    for (i, s) in seen.iter().enumerate().filter(|(_, s)| s.fault.is_some()) {
        // The upload POST names no blob: another blob's may come between the faulted one
        // and its retry, so the retry is the first one at least the Retry-After later.
        let shared = s.key.starts_with("POST ") && s.key.contains("/blobs/uploads/");
        let next = seen[i + 1..]
            .iter()
            .find(|n| n.key == s.key && (!shared || n.at - s.at >= Duration::from_millis(1000)))
            .unwrap_or_else(|| panic!("{} never retried: {seen:#?}", s.key));
        // A lower bound only: a loaded machine can only make the gap longer.
        let gap = next.at - s.at;
        assert!(
            gap >= Duration::from_millis(1000),
            "{}: retried after {gap:?}, before the 1 s Retry-After",
            s.key
        );
        checked += 1;
    }
    assert!(checked >= 3, "too few 429s to judge: {seen:#?}");
}

#[test]
fn an_upload_making_progress_outlives_the_deadline() {
    let reg = Registry::start();
    // 2 MiB read in 64 KiB pieces with 100 ms pauses: the layer upload takes over 3 s of
    // steady progress, well past --deadline 1.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            throttle: Some(Duration::from_millis(100)),
            ..ProxyOpts::default()
        },
    );
    let ws = tempfile::tempdir().unwrap();
    fs::write(ws.path().join("noise.bin"), noise(2 << 20, 7)).unwrap();
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\n\
         [[layer]]\n\
         files = [{ src = \"noise.bin\", dest = \"/noise.bin\" }]\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = imgbuild()
        .current_dir(ws.path())
        .args(["push", "-f", "spec.toml", "--repo"])
        .arg(format!("{}/slow", proxy.addr))
        .args(["--deadline", "1", "--timeout", "60", "--retries", "0"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "cut: {}", text(&out.stderr));
    assert!(
        took >= Duration::from_secs(3),
        "the upload was not throttled ({took:?}): the test proves nothing"
    );
    let digest = pushed_digest(&out.stdout);
    assert_serves(&reg, "slow:latest", &digest);
}

#[test]
fn a_missing_ecr_repository_is_exit_2_with_the_command_to_create_it() {
    let reg = Registry::start();
    // ECR answers NAME_UNKNOWN to the first blob upload of a repository that does not exist.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            name_unknown: true,
            ..ProxyOpts::default()
        },
    );
    let port = proxy.addr.rsplit_once(':').unwrap().1;
    let host = format!("{}:{port}", crate::ecr::ECR_HOST);
    let ws = workspace(1_000_000_000);
    let out = push_amd64(ws.path(), &format!("{host}/missing/app"))
        .arg("--resolve")
        .arg(format!("{host}:127.0.0.1"))
        .args(["--insecure-registry", &host])
        // No AWS endpoint answers: the registry never asks for credentials here.
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    for part in [
        "error: ",
        "missing/app does not exist",
        "aws ecr create-repository --repository-name missing/app --region us-east-1",
        "--create-repository",
    ] {
        assert!(last.contains(part), "{part:?} missing: {last}");
    }
    assert!(out.stdout.is_empty());
    assert!(!reg.log().contains("PUT /v2/missing/app/manifests"));
}

#[test]
fn username_is_never_sent_to_a_base_image_registry() {
    // The push target wants a password; the base image's registry is another one, an
    // anonymous Bearer registry (like Docker Hub for public images) behind the proxy, which
    // records every Authorization header it gets.
    let target = Registry::start_htpasswd("ci-user", "target-only-pass-31");
    let base_reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let base_push = push_amd64(ws.path(), &format!("{}/base", base_reg.addr))
        .output()
        .unwrap();
    assert!(base_push.status.success(), "{}", text(&base_push.stderr));
    let proxy = Proxy::start(
        &base_reg.addr,
        ProxyOpts {
            bearer: Some(None),
            ..ProxyOpts::default()
        },
    );
    let out = output_with_stdin(
        push_amd64(ws.path(), &format!("{}/app", target.addr))
            .args(["--base", &format!("{}/base:v1", proxy.addr)])
            .args(["--username", "ci-user", "--password-stdin"]),
        "target-only-pass-31\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_serves(&target, "app:v1", &pushed_digest(&out.stdout));

    // The base registry was asked (a challenge, an anonymous token) ...
    let tokens = proxy.token_requests();
    assert!(!tokens.is_empty(), "the base registry was never asked");
    assert!(proxy.seen().len() > tokens.len());
    // ... and never saw the push credentials, nor any Basic header.
    for t in &tokens {
        assert_eq!(
            t.authorization, None,
            "token request with credentials: {t:?}"
        );
        assert!(
            !t.body.contains("ci-user") && !t.target.contains("ci-user"),
            "{t:?}"
        );
    }
    for s in proxy.seen() {
        if let Some(a) = &s.authorization {
            assert!(a.starts_with("Bearer proxytoken-"), "{s:?}");
        }
    }
}

#[test]
fn a_docker_login_identity_token_is_exchanged_with_the_refresh_token_grant() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            bearer: Some(None),
            ..ProxyOpts::default()
        },
    );
    let ws = workspace(1_000_000_000);
    let home = tempfile::tempdir().unwrap();
    let refresh = "refresh-token-0xC0FFEE-9931";
    fs::write(
        home.path().join("config.json"),
        serde_json::json!({ "auths": { proxy.addr.clone(): { "identitytoken": refresh } } })
            .to_string(),
    )
    .unwrap();
    let out = push_amd64(ws.path(), &format!("{}/idtok", proxy.addr))
        .arg("-vv")
        .env("DOCKER_CONFIG", home.path())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_serves(&reg, "idtok:v1", &pushed_digest(&out.stdout));
    let requests = proxy.token_requests();
    assert!(!requests.is_empty(), "no token was asked for");
    for t in &requests {
        // OAuth2 (token spec "OAuth2 Token Authentication"): a form POST, no Basic header.
        assert_eq!(t.method, "POST", "{t:?}");
        assert_eq!(t.authorization, None, "{t:?}");
        let form: Vec<(String, String)> = t
            .body
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%2C", ",")))
            .collect();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("grant_type"), Some("refresh_token"), "{t:?}");
        assert_eq!(get("refresh_token"), Some(refresh), "{t:?}");
        assert_eq!(get("service"), Some("imgbuild-proxy"), "{t:?}");
        assert!(
            get("scope").is_some_and(|s| s.contains("repository:idtok:")),
            "{t:?}"
        );
    }
    assert!(
        !format!("{}{err}", text(&out.stdout)).contains(refresh),
        "identity token leaked"
    );
}
