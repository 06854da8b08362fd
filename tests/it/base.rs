//! Base images (README "Base images") with real parts: bases assembled by imgbuild itself from Debian's
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

/// A workspace with `bb/<arch>/bin/{busybox,sh}`, `build-specs/base.toml`, `build-specs/app.toml` (no
/// `base`: tests give `--base`, or write their own), and its own base image cache.
fn base_workspace() -> tempfile::TempDir {
    let ws = workspace(1_000_000_000);
    for arch in ["amd64", "arm64"] {
        let bin = ws.path().join("bb").join(arch).join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy(busybox(arch), bin.join("busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    }
    fs::create_dir_all(ws.path().join("build-specs")).unwrap();
    fs::write(ws.path().join("build-specs/base.toml"), BASE_SPEC).unwrap();
    fs::write(ws.path().join("build-specs/app.toml"), APP_SPEC).unwrap();
    ws
}

/// `imgbuild` in `ws` with the base image cache at `ws/cache`.
fn cmd(ws: &Path) -> Command {
    let mut c = imgbuild();
    c.current_dir(ws).env("IMGBUILD_CACHE", ws.join("cache"));
    c
}

/// `imgbuild build -q -f build-specs/app.toml -o <out> --base <base> <extra>` in `ws`.
fn build_on(ws: &Path, out: &str, base: &str, extra: &[&str]) -> Output {
    cmd(ws)
        .args([
            "build",
            "-q",
            "-f",
            "build-specs/app.toml",
            "-o",
            out,
            "--base",
            base,
        ])
        .args(extra)
        .output()
        .unwrap()
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

/// What every image built on the busybox base with `build-specs/app.toml` must have.
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

/// `org.opencontainers.image.base.{name,digest}` of a manifest or index.
fn assert_base_annotations(doc: &Value, name: &str, digest: &str) {
    let a = &doc["annotations"];
    assert_eq!(
        (
            &a["org.opencontainers.image.base.name"],
            &a["org.opencontainers.image.base.digest"]
        ),
        (&json!(name), &json!(digest)),
        "{doc}"
    );
}

/// Exit code and stderr of a run that must fail with one `error:` line.
fn failure(out: &Output) -> (Option<i32>, String) {
    let err = text(&out.stderr);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
    assert!(out.stdout.is_empty());
    (out.status.code(), err)
}

#[test]
fn same_registry_base_is_mounted_inherited_annotated_and_runs_under_docker() {
    let ws = base_workspace();
    let reg = Registry::start();
    // The base's layers in gzip `fast` (imgbuild's own deflate encoder): the Docker Engine's
    // decoder (Go's compress/flate) unpacks them below, a third one besides zlib-rs and GNU gzip.
    let base_digest = push(
        ws.path(),
        "build-specs/base.toml",
        &reg,
        "base/busybox",
        "1",
        &["--compression-level", "fast"],
    );
    let base_index = json_of(&inspect_raw(&reg, &format!("base/busybox@{base_digest}")));
    let base_ref = format!("{}/base/busybox:1", reg.addr);

    let digest = push(
        ws.path(),
        "build-specs/app.toml",
        &reg,
        "app",
        "v1",
        &["--base", &base_ref],
    );
    let index = json_of(&inspect_raw(&reg, &format!("app@{digest}")));
    assert_base_annotations(&index, &base_ref, &base_digest);

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
        assert_base_annotations(&manifest, &base_ref, &base_manifest_digest);
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

    // A registry serving other bytes for a base layer: the download is refused (exit 5) and
    // nothing lands in the cache or the layout under that digest.
    let base_manifest = json_of(&inspect_raw(
        &reg,
        &format!("base/busybox@{}", child(&base_index, "amd64")),
    ));
    let layer = base_manifest["layers"][0]["digest"].as_str().unwrap();
    let hex = layer.trim_start_matches("sha256:");
    let data = reg
        .storage()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&data, &bytes).unwrap();
    let out = cmd(ws.path())
        .args(["build", "-f", "build-specs/app.toml", "-o", "out-corrupt"])
        .args(["--base", &base_ref, "--platform", "linux/amd64"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("served content hashing to") && err.contains(&format!("not the {layer}")),
        "{err}"
    );
    assert!(!blob_path(&ws.path().join("cache/bases"), layer).exists());
    assert!(!blob_path(&ws.path().join("out-corrupt"), layer).exists());
    assert!(!ws.path().join("out-corrupt/index.json").exists());
    bytes[last] ^= 0xff;
    fs::write(&data, &bytes).unwrap();

    if !docker_available() {
        return skip_missing(
            "docker",
            "no Docker Engine answers: the amd64 image was not run",
        );
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

/// `skopeo copy --format v2s2 <flags> <reg>/<from> <reg>/<to>`: Docker media types.
fn copy_as_docker(reg: &Registry, flags: &[&str], from: &str, to: &str) {
    let mut args = vec!["copy", "--format", "v2s2"];
    args.extend_from_slice(flags);
    let (src, dst) = (reg.skopeo_args("src-"), reg.skopeo_args("dest-"));
    args.extend(src.iter().chain(&dst).map(String::as_str));
    let (from, to) = (reg.docker_ref(from), reg.docker_ref(to));
    args.extend([from.as_str(), to.as_str()]);
    skopeo_ok(&args);
}

#[test]
fn docker_media_type_bases_from_another_registry_are_streamed_and_kept_as_is() {
    let ws = base_workspace();
    let source = Registry::start();
    let target = Registry::start();
    // --no-cache: the layer cache would keep this build's layers, and a base layer that is
    // already local is pushed from there instead of streamed from the source.
    push(
        ws.path(),
        "build-specs/base.toml",
        &source,
        "base/busybox",
        "1",
        &["--no-cache"],
    );
    // The base with Docker media types: as a manifest list, and its amd64 image alone.
    copy_as_docker(&source, &["--all"], "base/busybox:1", "base/list:1");
    copy_as_docker(
        &source,
        &["--override-arch", "amd64"],
        "base/busybox:1",
        "base/v2:1",
    );
    let list = json_of(&inspect_raw(&source, "base/list:1"));
    assert_eq!(
        list["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let base_layer = |arch: &str| -> Value {
        let m = json_of(&inspect_raw(
            &source,
            &format!("base/list@{}", child(&list, arch)),
        ));
        assert_eq!(
            m["mediaType"],
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        m["layers"][0].clone()
    };
    let hex = |layer: &Value| {
        layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string()
    };

    let base_ref = format!("{}/base/list:1", source.addr);
    let gets_before: Vec<usize> = ["amd64", "arm64"]
        .iter()
        .map(|a| count_get(&source.log(), &hex(&base_layer(a))))
        .collect();
    let digest = push(
        ws.path(),
        "build-specs/app.toml",
        &target,
        "app",
        "v1",
        &["--base", &base_ref],
    );
    // skopeo pulls everything from the target and verifies every digest.
    let pulled = ws.path().join("pulled");
    pull_oci(&target, &format!("app@{digest}"), &pulled, "v1");
    let index = json_of(&read_blob(&pulled, &digest));
    let log = target.log();
    assert!(!log.contains("mount="), "no mount across registries: {log}");
    for (arch, before) in ["amd64", "arm64"].into_iter().zip(&gets_before) {
        let layer = base_layer(arch);
        assert_eq!(
            layer["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        let manifest = json_of(&read_blob(&pulled, &child(&index, arch)));
        assert_eq!(
            manifest["layers"][0], layer,
            "{arch}: the Docker layer stays as it is"
        );
        assert_inherited(&json_of(&read_blob(
            &pulled,
            manifest["config"]["digest"].as_str().unwrap(),
        )));
        // One GET from the source, one streamed PUT into the target.
        let h = hex(&layer);
        assert_eq!(count_get(&source.log(), &h), before + 1, "{arch}");
        let puts = log
            .lines()
            .filter(|l| l.contains("\"PUT /v2/app/blobs/uploads/") && l.contains(&h))
            .collect::<Vec<_>>();
        assert_eq!(puts.len(), 1, "{arch}: {log}");
        assert!(puts[0].contains("\" 201 "), "{}", puts[0]);
    }
    let root = ws.path().join("root");
    unpack_layers(&pulled, &child(&index, "amd64"), &root);
    let ran = run_ok(Command::new(root.join("bin/sh")).args(["-c", "echo ok"]));
    assert_eq!(text(&ran.stdout), "ok\n");

    // Pushing again: the target has the base layers (HEAD), nothing is fetched.
    push(
        ws.path(),
        "build-specs/app.toml",
        &target,
        "app",
        "v2",
        &["--base", &base_ref],
    );
    for (arch, before) in ["amd64", "arm64"].into_iter().zip(&gets_before) {
        assert_eq!(
            count_get(&source.log(), &hex(&base_layer(arch))),
            before + 1
        );
    }

    // A single Docker v2 manifest serves its own platform, and only that one.
    let single = format!("{}/base/v2:1", source.addr);
    let build = |out: &str, base: &str, platform: &str| {
        build_on(ws.path(), out, base, &["--platform", platform])
    };
    let out = build("out-v2", &single, "linux/amd64");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let built = ws.path().join("out-v2");
    let index = json_of(&read_blob(&built, text(&out.stdout).trim()));
    let manifest = json_of(&read_blob(&built, &child(&index, "amd64")));
    assert_eq!(manifest["layers"][0], base_layer("amd64"));
    assert!(blob_path(&built, manifest["layers"][0]["digest"].as_str().unwrap()).is_file());

    // Platforms the base lacks: a clear error listing what it offers, exit 3.
    let cases = [
        (&single, "linux/arm64", "linux/amd64"),
        (&base_ref, "linux/arm/v7", "linux/amd64, linux/arm64"),
    ];
    for (base, platform, offered) in cases {
        let (code, err) = failure(&build("out-missing", base, platform));
        assert_eq!(code, Some(3), "{err}");
        assert!(
            err.contains(&format!(
                "base {base} has no {platform} image; it offers {offered}; pick another base"
            )),
            "{err}"
        );
    }
}

fn count_get(log: &str, hex: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:") && l.contains(hex))
        .count()
}

#[test]
fn layout_base_builds_a_complete_layout_and_digest_pinned_bases_rebuild_offline() {
    let ws = base_workspace();
    run_ok(cmd(ws.path()).args([
        "build",
        "-q",
        "-f",
        "build-specs/base.toml",
        "-o",
        "base-layout",
        "--tag",
        "1",
    ]));
    // `oci:` in a spec is relative to the spec's directory.
    let spec = format!("base = \"oci:../base-layout:1\"\n{APP_SPEC}");
    fs::write(ws.path().join("build-specs/app-layout.toml"), spec).unwrap();
    let out = run_ok(cmd(ws.path()).args([
        "build",
        "-q",
        "-f",
        "build-specs/app-layout.toml",
        "-o",
        "out",
    ]));
    let digest = text(&out.stdout).trim().to_string();
    let out_dir = ws.path().join("out");
    // The layout is complete: skopeo copies all of it, verifying every blob.
    skopeo_ok(&[
        "copy",
        "--all",
        &format!("oci:{}", out_dir.display()),
        &format!("oci:{}:copy", ws.path().join("copied").display()),
    ]);
    let index = json_of(&read_blob(&out_dir, &digest));
    assert_eq!(
        index["annotations"]["org.opencontainers.image.base.name"], "oci:../base-layout:1",
        "as written in the spec: the digest must not depend on the checkout's place"
    );
    for arch in ["amd64", "arm64"] {
        let root = ws.path().join(format!("root-{arch}"));
        unpack_layers(&out_dir, &child(&index, arch), &root);
        let manifest = json_of(&read_blob(&out_dir, &child(&index, arch)));
        assert_inherited(&json_of(&read_blob(
            &out_dir,
            manifest["config"]["digest"].as_str().unwrap(),
        )));
    }
    let ran = run_ok(Command::new(ws.path().join("root-amd64/bin/sh")).args([
        "-c",
        &format!("{}/root-amd64/usr/local/bin/hello", ws.path().display()),
    ]));
    assert_eq!(text(&ran.stdout), "hello from imgbuild (x86_64)\n");
    let qemu = find_program("qemu-aarch64-static")
        .expect("qemu-user-static: run scripts/install-deps.sh test");
    let root = ws.path().join("root-arm64");
    let ran = run_ok(
        Command::new(&qemu)
            .arg(root.join("bin/sh"))
            .args(["-c", "echo busybox $((6 * 7))"]),
    );
    assert_eq!(text(&ran.stdout), "busybox 42\n");
    let ran = run_ok(Command::new(&qemu).arg(root.join("usr/local/bin/hello")));
    assert_eq!(text(&ran.stdout), "hello from imgbuild (aarch64)\n");

    // [base_overrides]: arm64 on the layout, amd64 on scratch; the index names no base then.
    let spec =
        format!("{APP_SPEC}\n[base_overrides]\n\"linux/arm64\" = \"oci:../base-layout:1\"\n");
    fs::write(ws.path().join("build-specs/app-mixed.toml"), spec).unwrap();
    let out = run_ok(cmd(ws.path()).args([
        "build",
        "-q",
        "-f",
        "build-specs/app-mixed.toml",
        "-o",
        "out-mixed",
    ]));
    let mixed = ws.path().join("out-mixed");
    let index = json_of(&read_blob(&mixed, text(&out.stdout).trim()));
    assert!(
        index["annotations"]
            .get("org.opencontainers.image.base.name")
            .is_none(),
        "{index}"
    );
    for (arch, layers, user) in [("amd64", 1, "65532:65532"), ("arm64", 2, "0:0")] {
        let manifest = json_of(&read_blob(&mixed, &child(&index, arch)));
        assert_eq!(
            manifest["layers"].as_array().unwrap().len(),
            layers,
            "{arch}"
        );
        let based = manifest["annotations"]
            .get("org.opencontainers.image.base.name")
            .is_some();
        assert_eq!(based, layers == 2, "{arch}");
        let config = json_of(&read_blob(
            &mixed,
            manifest["config"]["digest"].as_str().unwrap(),
        ));
        assert_eq!(config["config"]["User"], user, "{arch}");
    }

    // A dynamic program: on scratch its loader is surely missing (warning); on a base it may
    // be there (no warning).
    for (base, warns) in [("oci:../base-layout:1", false), ("scratch", true)] {
        let spec = format!(
            "base = \"{base}\"\nplatforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{{ src = \"../fixtures/dist/amd64/hello-dynamic\", dest = \"/hello\" }}]\n"
        );
        fs::write(ws.path().join("build-specs/dyn.toml"), spec).unwrap();
        let out =
            run_ok(cmd(ws.path()).args(["build", "-f", "build-specs/dyn.toml", "-o", "out-dyn"]));
        let err = text(&out.stderr);
        assert_eq!(
            err.contains("warning: ") && err.contains("is dynamically linked"),
            warns,
            "{base}: {err}"
        );
    }

    // A corrupt layout blob is refused (exit 3), and not copied.
    let base_index =
        json_of(
            &read_blob(
                &ws.path().join("base-layout"),
                json_of(&fs::read(ws.path().join("base-layout/index.json")).unwrap())["manifests"]
                    [0]["digest"]
                    .as_str()
                    .unwrap(),
            ),
        );
    let base_manifest = json_of(&read_blob(
        &ws.path().join("base-layout"),
        &child(&base_index, "amd64"),
    ));
    let layer = base_manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = blob_path(&ws.path().join("base-layout"), layer);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let out = cmd(ws.path())
        .args([
            "build",
            "-f",
            "build-specs/app-layout.toml",
            "-o",
            "out-corrupt",
        ])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "base oci:../base-layout:1: blob {layer} in the layout has other content"
        )),
        "{err}"
    );
    assert!(!blob_path(&ws.path().join("out-corrupt"), layer).exists());
    bytes[0] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();

    // A registry base pinned by digest: built once online, then again with the registry gone.
    let reg = Registry::start();
    let base_digest = push(
        ws.path(),
        "build-specs/base.toml",
        &reg,
        "base/busybox",
        "1",
        &[],
    );
    let pinned = format!("{}/base/busybox@{base_digest}", reg.addr);
    let tagged = format!("{}/base/busybox:1", reg.addr);
    let build = |out: &str, base: &str| build_on(ws.path(), out, base, &[]);
    // A push on a layout base uploads the base's layers like ours.
    let pushed = push(
        ws.path(),
        "build-specs/app-layout.toml",
        &reg,
        "app",
        "v1",
        &[],
    );
    assert_eq!(pushed, digest, "build and push give the same image");
    pull_oci(
        &reg,
        &format!("app@{digest}"),
        &ws.path().join("pulled"),
        "v1",
    );

    let online = build("out-online", &pinned);
    assert!(online.status.success(), "{}", text(&online.stderr));
    drop(reg);
    let offline = build("out-offline", &pinned);
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    assert_eq!(text(&offline.stdout), text(&online.stdout));
    skopeo_ok(&[
        "copy",
        "--all",
        &format!("oci:{}", ws.path().join("out-offline").display()),
        &format!("oci:{}:copy", ws.path().join("copied-offline").display()),
    ]);
    // A tag must be asked of the registry: offline, that is a registry error (5).
    let (code, err) = failure(&build("out-tag", &tagged));
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains(&format!("base {tagged}: cannot connect")),
        "{err}"
    );
}

/// `push` with `--username u --password-stdin` and `-v`; returns (index digest, stderr).
fn push_with_password(
    ws: &Path,
    spec: &str,
    reg: &Registry,
    repo: &str,
    extra: &[&str],
) -> (String, String) {
    let (user, pass) = reg.creds.clone().expect("an htpasswd registry");
    let out = output_with_stdin(
        cmd(ws)
            .args([
                "push",
                "-v",
                "-f",
                spec,
                "--repo",
                &format!("{}/{repo}", reg.addr),
            ])
            .args(["--username", &user, "--password-stdin"])
            .args(extra),
        &format!("{pass}\n"),
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", reg.log());
    assert!(!err.contains(&pass), "password leaked: {err}");
    let line = text(&out.stdout);
    (
        line.trim()
            .split_once('@')
            .expect("REPO@DIGEST")
            .1
            .to_string(),
        err,
    )
}

#[test]
fn base_on_an_authenticated_registry_uses_the_push_credentials_and_mounts() {
    let ws = base_workspace();
    let reg = Registry::start_htpasswd("ci-user", "base-s3cret-42");
    push_with_password(
        ws.path(),
        "build-specs/base.toml",
        &reg,
        "base/busybox",
        &["--tag", "1"],
    );
    let base_ref = format!("{}/base/busybox:1", reg.addr);
    let (digest, err) = push_with_password(
        ws.path(),
        "build-specs/app.toml",
        &reg,
        "app",
        &["--base", &base_ref, "--platform", "linux/arm64"],
    );
    assert!(err.contains("(mounted from base/busybox)"), "{err}");
    let log = reg.log();
    let mounted = log
        .lines()
        .filter(|l| l.contains("\"POST /v2/app/blobs/uploads/?mount=") && l.contains("\" 201 "))
        .count();
    assert_eq!(mounted, 1, "{log}");
    let pulled = ws.path().join("pulled");
    pull_oci(&reg, &format!("app@{digest}"), &pulled, "v1");
    let index = json_of(&read_blob(&pulled, &digest));
    let manifest = json_of(&read_blob(&pulled, &child(&index, "arm64")));
    assert_inherited(&json_of(&read_blob(
        &pulled,
        manifest["config"]["digest"].as_str().unwrap(),
    )));

    // Without credentials the base cannot be read: an authentication error (4) naming the base.
    let out = cmd(ws.path())
        .args([
            "build",
            "-f",
            "build-specs/app.toml",
            "-o",
            "out-noauth",
            "--base",
            &base_ref,
        ])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains(&format!(
            "error: base {base_ref}: authentication to {} failed (HTTP 401)",
            reg.addr
        )),
        "{err}"
    );
}

#[test]
fn base_on_a_tls_registry_needs_its_ca_for_build_too() {
    let ws = base_workspace();
    let reg = Registry::start_tls(&[]);
    let ca = reg.ca_cert().unwrap();
    let ca = ca.to_str().unwrap();
    push(
        ws.path(),
        "build-specs/base.toml",
        &reg,
        "base/busybox",
        "1",
        &["--ca-cert", ca],
    );
    let base_ref = format!("{}/base/busybox:1", reg.addr);
    let build = |out: &str, extra: &[&str]| build_on(ws.path(), out, &base_ref, extra);
    let out = build("out-tls", &["--ca-cert", ca]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    skopeo_ok(&[
        "copy",
        "--all",
        &format!("oci:{}", ws.path().join("out-tls").display()),
        &format!("oci:{}:copy", ws.path().join("copied").display()),
    ]);
    let (code, err) = failure(&build("out-no-ca", &[]));
    assert_eq!(code, Some(6), "an unknown CA is exit 6: {err}");
    assert!(err.contains("pass it with --ca-cert FILE"), "{err}");
}
