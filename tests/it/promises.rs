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
    // manifests before the index, the index before the tags.
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
    let index_at = pos(&format!("/manifests/{digest}"));
    let tags = [pos("/manifests/a"), pos("/manifests/b")];
    assert!(
        manifests.iter().all(|&m| last_blob < m && m < index_at),
        "{puts:#?}"
    );
    assert!(tags.iter().all(|&t| index_at < t), "{puts:#?}");
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
    let with = build_in(
        dir,
        &[
            "-f",
            "elsewhere/deeper/hello.toml",
            "--context",
            "build-specs",
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
