//! Base images (issue 6) with real parts: bases assembled by imgbuild itself from Debian's
//! busybox-static (amd64 and arm64, cached by `scripts/install-deps.sh test`), pushed to
//! Debian's docker-registry (and re-pushed with Docker media types by `skopeo copy --format
//! v2s2`); the results are checked with skopeo, the registry's access log, tar, qemu and the
//! Docker Engine.

use crate::build::workspace;
use crate::harness::*;
use serde_json::{Value, json};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `<cache>/<arch>/busybox` from `scripts/install-deps.sh test` (`IMGBUILD_TEST_BUSYBOX`, else
/// `~/.cache/imgbuild-test/busybox`).
fn busybox(arch: &str) -> PathBuf {
    let dir = std::env::var_os("IMGBUILD_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/imgbuild-test/busybox")
        });
    let bin = dir.join(arch).join("busybox");
    assert!(
        bin.is_file(),
        "{} missing: run scripts/install-deps.sh test",
        bin.display()
    );
    bin
}

const BASE_SPEC: &str = r#"
platforms = ["linux/amd64", "linux/arm64"]
[config]
env = { PATH = "/usr/local/bin:/bin", BASE_VAR = "base", SHARED = "from-base" }
user = "0:0"
workdir = "/srv"
cmd = ["sh"]
labels = { "org.example.base" = "busybox", "org.example.who" = "base" }
exposed_ports = [22]
[[layer]]
files = [{ src = "../bb/{arch}/bin", dest = "/bin" }]
"#;

const APP_SPEC: &str = r#"
platforms = ["linux/amd64", "linux/arm64"]
[config]
env = { SHARED = "from-app", APP_VAR = "app" }
labels = { "org.example.who" = "app" }
exposed_ports = [8080]
[[layer]]
files = [{ src = "../fixtures/dist/{arch}/hello", dest = "/usr/local/bin/hello", mode = 0o755 }]
"#;

/// A workspace with `bb/<arch>/bin/{busybox,sh}`, `specs/base.toml`, `specs/app.toml` (no
/// `base`: tests give `--base`, or write their own), and its own base image cache.
fn base_workspace() -> tempfile::TempDir {
    let ws = workspace(1_000_000_000);
    for arch in ["amd64", "arm64"] {
        let bin = ws.path().join("bb").join(arch).join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy(busybox(arch), bin.join("busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    }
    fs::create_dir_all(ws.path().join("specs")).unwrap();
    fs::write(ws.path().join("specs/base.toml"), BASE_SPEC).unwrap();
    fs::write(ws.path().join("specs/app.toml"), APP_SPEC).unwrap();
    ws
}

/// `imgbuild` in `ws` with the base image cache at `ws/cache`.
fn cmd(ws: &Path) -> Command {
    let mut c = imgbuild();
    c.current_dir(ws).env("IMGBUILD_CACHE", ws.join("cache"));
    c
}

/// Push `spec` to `reg/repo:tag` with `extra` flags; returns the index digest.
fn push(ws: &Path, spec: &str, reg: &Registry, repo: &str, tag: &str, extra: &[&str]) -> String {
    let out = run_ok(
        cmd(ws)
            .args([
                "push",
                "-f",
                spec,
                "--repo",
                &format!("{}/{repo}", reg.addr),
            ])
            .args(["--tag", tag])
            .args(extra),
    );
    let line = text(&out.stdout);
    line.trim()
        .split_once('@')
        .expect("REPO@DIGEST")
        .1
        .to_string()
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The manifest digest for `arch` in an index.
fn child(index: &Value, arch: &str) -> String {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == arch)
        .unwrap_or_else(|| panic!("no {arch} in {index}"))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// What every image built on the busybox base with `specs/app.toml` must have.
fn assert_inherited(config: &Value) {
    let c = &config["config"];
    assert_eq!(
        strings(&c["Env"]),
        [
            "BASE_VAR=base",
            "PATH=/usr/local/bin:/bin",
            "SHARED=from-app",
            "APP_VAR=app"
        ]
    );
    assert_eq!(c["User"], "0:0", "the base's user, not the scratch default");
    assert_eq!(c["WorkingDir"], "/srv");
    assert_eq!(c["Cmd"], json!(["sh"]));
    assert_eq!(
        c["Labels"],
        json!({"org.example.base": "busybox", "org.example.who": "app"})
    );
    assert_eq!(c["ExposedPorts"], json!({"22/tcp": {}, "8080/tcp": {}}));
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    let history: Vec<&str> = config["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["created_by"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "imgbuild layer 1: /bin",
            "imgbuild layer 1: /usr/local/bin/hello"
        ]
    );
}

fn failure(out: &Output) -> (Option<i32>, String) {
    (out.status.code(), text(&out.stderr))
}

#[test]
fn same_registry_base_is_mounted_inherited_annotated_and_runs_under_docker() {
    let ws = base_workspace();
    let reg = Registry::start();
    let base_digest = push(ws.path(), "specs/base.toml", &reg, "base/busybox", "1", &[]);
    let base_index = json_of(&inspect_raw(&reg, &format!("base/busybox@{base_digest}")));
    let base_ref = format!("{}/base/busybox:1", reg.addr);

    let digest = push(
        ws.path(),
        "specs/app.toml",
        &reg,
        "app",
        "v1",
        &["--base", &base_ref],
    );
    let index = json_of(&inspect_raw(&reg, &format!("app@{digest}")));
    assert_eq!(
        index["annotations"]["org.opencontainers.image.base.name"],
        base_ref
    );
    assert_eq!(
        index["annotations"]["org.opencontainers.image.base.digest"],
        base_digest
    );

    let log = reg.log();
    let pulled = ws.path().join("pulled");
    pull_oci(&reg, &format!("app@{digest}"), &pulled, "v1");
    for arch in ["amd64", "arm64"] {
        let base_manifest_digest = child(&base_index, arch);
        let base_manifest = json_of(&inspect_raw(
            &reg,
            &format!("base/busybox@{base_manifest_digest}"),
        ));
        let manifest = json_of(&read_blob(&pulled, &child(&index, arch)));
        // The base layer descriptor, exactly; then ours.
        assert_eq!(manifest["layers"][0], base_manifest["layers"][0], "{arch}");
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 2);
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.base.name"],
            base_ref
        );
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.base.digest"],
            base_manifest_digest
        );
        let config = json_of(&read_blob(
            &pulled,
            manifest["config"]["digest"].as_str().unwrap(),
        ));
        assert_eq!(config["architecture"], arch);
        assert_inherited(&config);

        // Mounted from the base repository (201), never uploaded.
        let hex = base_manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        let mounts: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("\"POST /v2/app/blobs/uploads/?mount=sha256%3A") && l.contains(&hex)
            })
            .collect();
        assert_eq!(mounts.len(), 1, "{arch}: {log}");
        assert!(mounts[0].contains("from=base%2Fbusybox"), "{}", mounts[0]);
        assert!(mounts[0].contains("\" 201 "), "{}", mounts[0]);
        assert!(
            !log.lines()
                .any(|l| l.contains("\"PUT /v2/app/blobs/") && l.contains(&hex)),
            "{arch}: base layer uploaded instead of mounted\n{log}"
        );
    }

    if !docker_available() {
        return skip("docker not available: the amd64 image was not run");
    }
    let image = format!("{}/app@{digest}", reg.addr);
    let out = Command::new("docker")
        .args(["run", "--rm", "--platform", "linux/amd64", &image])
        .args([
            "sh",
            "-c",
            "/usr/local/bin/hello && echo \"$SHARED $BASE_VAR $(pwd)\"",
        ])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    assert!(out.status.success(), "docker run: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "hello from imgbuild (x86_64)\nfrom-app base /srv\n"
    );
}
