//! imgbuild's own image (`build-specs/imgbuild.toml` + `scripts/image-context.sh`): built from
//! the binary under test, pushed to a local registry, pulled into the Docker Engine and run
//! the way a locked-down cluster runs it (uid 65532, read-only root filesystem, all
//! capabilities dropped, no-new-privileges, tmpfs only on /tmp and /cache), including a real
//! `imgbuild push` from inside the container that skopeo checks.
//!
//! The binary under test is the dynamically linked glibc build cargo made; release binaries
//! are static musl builds (cargo-zigbuild), which no target here can produce. The context
//! script's `IMGBUILD_IMAGE_BUNDLE_LIBS=1` puts exactly the loader and libraries that binary
//! loads into the image instead: no second build, and the image runs the very code tested.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::harness::{
    Registry, docker_available, find_program, imgbuild, repo_root, run_ok, skip_missing,
};
use crate::harness::{inspect_raw, skopeo_ok};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Is the Docker Engine there? When not, [`skip_missing`] skips the test with a message, or
/// fails it under `CI=true` unless `IMGBUILD_TEST_ALLOW_SKIP` lists `docker`.
pub fn docker_or_skip(what: &str) -> bool {
    if docker_available() {
        return true;
    }
    skip_missing(
        "docker",
        &format!("no Docker Engine answers (`docker info`): {what}"),
    );
    false
}

/// The host's platform in the spec's terms (`amd64`/`arm64`).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("imgbuild's image has no platform for {other}"),
    }
}

/// A pulled image in the Docker Engine, removed on drop.
#[derive(Debug)]
pub struct DockerImage {
    /// `127.0.0.1:PORT/imgbuild@sha256:...`, as pulled.
    pub reference: String,
    pub digest: String,
}

impl Drop for DockerImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.reference])
            .output();
    }
}

/// Build imgbuild's image for the host platform from the binary under test (stripped copy)
/// with `scripts/image-context.sh`, push it to `reg` as `imgbuild:test`, `docker pull` it.
pub fn imgbuild_image(reg: &Registry, work: &Path) -> DockerImage {
    let bin = work.join("imgbuild");
    // The debug binary is ~300 MiB, nearly all debug info; the image needs none of it.
    let stripped = find_program("strip").is_some_and(|strip| {
        Command::new(strip)
            .arg("-o")
            .arg(&bin)
            .arg(env!("CARGO_BIN_EXE_imgbuild"))
            .status()
            .is_ok_and(|s| s.success())
    });
    if !stripped {
        fs::copy(env!("CARGO_BIN_EXE_imgbuild"), &bin).unwrap();
    }
    let ctx = work.join("ctx");
    let (amd64, arm64) = match host_arch() {
        "amd64" => (bin.to_str().unwrap(), "-"),
        _ => ("-", bin.to_str().unwrap()),
    };
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("scripts/image-context.sh"))
            .args([ctx.to_str().unwrap(), amd64, arm64])
            .env("IMGBUILD_IMAGE_BUNDLE_LIBS", "1"),
    );
    let out = run_ok(
        imgbuild()
            .arg("push")
            .arg("-f")
            .arg(ctx.join("imgbuild-bundled.toml"))
            .arg("--context")
            .arg(&ctx)
            .args(["--platform", &format!("linux/{}", host_arch())])
            .args(["--repo", &format!("{}/imgbuild", reg.addr)])
            .args(["--tag", "test", "--quiet"]),
    );
    let line = text(&out.stdout).trim().to_owned();
    let digest = line
        .rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_else(|| panic!("push printed {line:?}"));
    let reference = format!("{}/imgbuild@{digest}", reg.addr);
    // The Docker Engine treats 127.0.0.0/8 registries as insecure (plain http) by default.
    run_ok(Command::new("docker").args(["pull", "-q", &reference]));
    DockerImage { reference, digest }
}

/// `docker run --rm` the way a restricted pod runs: uid/gid 65532, read-only root
/// filesystem, no capabilities, no-new-privileges, host network (the registry is on
/// loopback), and tmpfs at the two paths the image documents as writable. The tmpfs belong
/// to 65532 (a kubelet's emptyDir is mode 0777; this Docker Engine ignores tmpfs `mode=`).
pub fn restricted_run() -> Command {
    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm", "--network", "host", "--user", "65532:65532"])
        .args(["--read-only", "--cap-drop", "ALL"])
        .args(["--security-opt", "no-new-privileges"]);
    for dir in ["/tmp", "/cache"] {
        cmd.args([
            "--tmpfs",
            &format!("{dir}:rw,nosuid,nodev,uid=65532,gid=65532"),
        ]);
    }
    cmd
}

/// The image config of the host platform, as skopeo reads it from the registry.
fn config_of(reg: &Registry, digest: &str) -> serde_json::Value {
    let target = reg.docker_ref(&format!("imgbuild@{digest}"));
    let out = skopeo_ok(&["inspect", "--config", "--tls-verify=false", &target]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn imgbuild_image_runs_locked_down_and_pushes_from_inside() {
    if !docker_or_skip("imgbuild's own image was not run") {
        return;
    }
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let image = imgbuild_image(&reg, work.path());

    // What the spec promises, as the registry holds it.
    let config = config_of(&reg, &image.digest);
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "{config}");
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/imgbuild"])
    );
    let labels = &c["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    assert!(
        labels["org.opencontainers.image.source"].is_string(),
        "{labels}"
    );
    let env: Vec<&str> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for want in ["TMPDIR=/tmp", "IMGBUILD_CACHE=/cache", "HOME=/home/nonroot"] {
        assert!(env.contains(&want), "{want} not in {env:?}");
    }

    // No shell in the image.
    let out = restricted_run()
        .args(["--entrypoint", "/bin/sh", &image.reference, "-c", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a shell ran: {}", text(&out.stdout));

    let out = run_ok(restricted_run().args([&image.reference, "--version"]));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("imgbuild {}", env!("CARGO_PKG_VERSION"))
    );

    // A real push from inside: the example spec and its fixtures mounted read-only, the
    // registry named `localhost` so the name goes through the image's nsswitch.conf and
    // /etc/hosts (glibc's resolver), not only an IP literal.
    let root = repo_root();
    let out = run_ok(
        restricted_run()
            .arg("-v")
            .arg(format!(
                "{}:/src/build-specs:ro",
                root.join("build-specs").display()
            ))
            .arg("-v")
            .arg(format!(
                "{}:/src/fixtures:ro",
                root.join("fixtures").display()
            ))
            .arg(&image.reference)
            .args(["push", "-f", "/src/build-specs/hello.toml"])
            .args(["--repo", &format!("localhost:{}/hello", reg.port)])
            .args(["--tag", "from-container", "--quiet"]),
    );
    let printed = text(&out.stdout).trim().to_owned();
    let (repo, digest) = printed.rsplit_once('@').unwrap();
    assert_eq!(repo, format!("localhost:{}/hello", reg.port));

    // skopeo sees that digest under the tag, and it is what the host builds from the same
    // spec (same bytes inside and outside the container).
    let raw = inspect_raw(&reg, "hello:from-container");
    let served = format!("sha256:{}", sha256_hex(&raw));
    assert_eq!(served, digest);
    let out = run_ok(
        imgbuild()
            .args(["build", "-f"])
            .arg(root.join("build-specs/hello.toml"))
            .arg("-o")
            .arg(work.path().join("hello-layout"))
            .arg("--quiet"),
    );
    assert_eq!(text(&out.stdout).trim(), digest);
    let index: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 3, "{index}");
    let copied = work.path().join("hello-copy");
    skopeo_ok(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &reg.docker_ref("hello:from-container"),
        &format!("oci:{}:x", copied.display()),
    ]);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Without the test-only bundling, a dynamically linked binary is refused: the release image
/// has no libraries, so a glibc build must not slip into it.
#[test]
fn image_context_refuses_a_dynamic_binary_and_needs_a_binary() {
    let work = tempfile::tempdir().unwrap();
    let script = repo_root().join("scripts/image-context.sh");
    let dir = work.path().join("ctx");
    let cases: &[(&[&str], &str)] = &[
        (
            &[env!("CARGO_BIN_EXE_imgbuild"), "-"],
            "is dynamically linked",
        ),
        (&["-", ""], "no binary given"),
        (&["/nonexistent/imgbuild", "-"], "does not exist"),
    ];
    for (bins, want) in cases {
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .args(*bins)
            .env_remove("IMGBUILD_IMAGE_BUNDLE_LIBS")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bins:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(want),
            "{bins:?}: {}",
            text(&out.stderr)
        );
    }
    // A static binary (the checked-in fixture) is accepted for either platform alone.
    let hello = crate::harness::fixtures().join("dist/amd64/hello");
    run_ok(
        Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .arg(&hello)
            .arg("-"),
    );
    for f in [
        "amd64/imgbuild",
        "common/etc/passwd",
        "common/etc/group",
        "common/etc/nsswitch.conf",
        "common/etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    assert!(!dir.join("arm64").exists());
    assert!(!dir.join("imgbuild-bundled.toml").exists());
    let passwd = fs::read_to_string(dir.join("common/etc/passwd")).unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
}

/// The release form, no Docker needed: the context script with two static binaries (the
/// checked-in amd64 and arm64 fixtures stand in for the musl builds) and
/// `imgbuild build -f build-specs/imgbuild.toml --context DIR`, exactly as the release
/// workflow calls them.
#[test]
fn release_image_builds_for_both_platforms_from_static_binaries() {
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    let dist = crate::harness::fixtures().join("dist");
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("scripts/image-context.sh"))
            .arg(&ctx)
            .arg(dist.join("amd64/hello"))
            .arg(dist.join("arm64/hello"))
            .env_remove("IMGBUILD_IMAGE_BUNDLE_LIBS"),
    );
    let layout = work.path().join("layout");
    let out = run_ok(
        imgbuild()
            .args(["build", "-f"])
            .arg(repo_root().join("build-specs/imgbuild.toml"))
            .arg("--context")
            .arg(&ctx)
            .arg("-o")
            .arg(&layout),
    );
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
    let digest = text(&out.stdout).trim().to_owned();
    let index: serde_json::Value =
        serde_json::from_slice(&crate::harness::read_blob(&layout, &digest)).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let archs: Vec<&str> = manifests
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    let mut common_layers = Vec::new();
    for m in manifests {
        let manifest: serde_json::Value = serde_json::from_slice(&crate::harness::read_blob(
            &layout,
            m["digest"].as_str().unwrap(),
        ))
        .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&crate::harness::read_blob(
            &layout,
            manifest["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap();
        let c = &config["config"];
        assert_eq!(c["User"], "65532:65532");
        assert_eq!(
            c["Entrypoint"],
            serde_json::json!(["/usr/local/bin/imgbuild"])
        );
        assert_eq!(
            c["Labels"]["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION"),
            "build-specs/imgbuild.toml's version label must follow Cargo.toml"
        );
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "{manifest}");
        common_layers.push(layers[0]["digest"].clone());
        let listing: String = layers
            .iter()
            .map(|l| {
                crate::harness::tar_listing(&crate::harness::blob_path(
                    &layout,
                    l["digest"].as_str().unwrap(),
                ))
            })
            .collect();
        // `tar -tv --numeric-owner`: "MODE UID/GID SIZE DATE TIME PATH".
        let entry = |path: &str| {
            listing
                .lines()
                .find(|l| l.split_whitespace().last() == Some(path))
                .unwrap_or_else(|| panic!("{path} not in the image:\n{listing}"))
                .to_owned()
        };
        for (path, mode, owner) in [
            ("etc/passwd", "-rw-r--r--", "0/0"),
            ("etc/group", "-rw-r--r--", "0/0"),
            ("etc/nsswitch.conf", "-rw-r--r--", "0/0"),
            ("etc/ssl/certs/ca-certificates.crt", "-rw-r--r--", "0/0"),
            ("usr/local/bin/imgbuild", "-rwxr-xr-x", "0/0"),
            ("tmp", "drwxr-xr-x", "65532/65532"),
            ("cache", "drwxr-xr-x", "65532/65532"),
            ("home/nonroot", "drwxr-xr-x", "65532/65532"),
        ] {
            let line = entry(path);
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!((fields[0], fields[1]), (mode, owner), "{line}");
        }
        assert!(
            !listing.contains("bin/sh") && !listing.contains(" lib"),
            "a shell or libraries in the release image:\n{listing}"
        );
    }
    assert_eq!(
        common_layers[0], common_layers[1],
        "the common layer is one blob"
    );
}
