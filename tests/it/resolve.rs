//! `imgbuild resolve` and `imgbuild init`, end to end: examples/hello built with cargo,
//! pushed to a real docker-registry and resolved into its Kubernetes manifests, which
//! kubernetes-validate checks and whose image the Docker Engine runs; digests taken from an
//! earlier push's `--metadata-file`; unknown references; `init` in a Cargo project.

use crate::harness::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// kubernetes-validate from `scripts/install-deps.sh test` (its own venv), or in PATH.
fn kubernetes_validate() -> Option<PathBuf> {
    let venv = std::env::var_os("IMGBUILD_TEST_K8S_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/imgbuild-test/k8s-venv"))
        });
    venv.map(|v| v.join("bin/kubernetes-validate"))
        .filter(|p| p.is_file())
        .or_else(|| find_program("kubernetes-validate"))
}

/// A copy of examples/hello (sources, spec, manifests; not its target/) in a temp dir.
fn hello_workspace() -> tempfile::TempDir {
    let src = repo_root().join("examples/hello");
    let ws = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        fs::copy(src.join(f), ws.path().join(f)).unwrap();
    }
    for d in ["src", "build-specs", "k8s"] {
        copy_dir(src.join(d), ws.path().join(d));
    }
    ws
}

/// Build examples/hello for the host with cargo (offline: it has no dependencies) and put the
/// binary where its spec expects the musl build. This toolchain has no musl target (no rustup
/// downloads here), so a statically linked glibc build (`crt-static`) stands in for it: like the
/// musl binary, it needs nothing from the image. Returns the host's `uname -m`.
fn build_hello(ws: &Path) -> &'static str {
    let arch = std::env::consts::ARCH;
    let triple = format!("{arch}-unknown-linux-gnu");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = ws.join("cargo-target");
    let started = Instant::now();
    run_ok(
        Command::new(cargo)
            .current_dir(ws)
            .args([
                "build",
                "--release",
                "--offline",
                "--locked",
                "--target",
                &triple,
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_BUILD_TARGET")
            .stdin(Stdio::null()),
    );
    eprintln!(
        "examples/hello: cargo build --release took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dest = ws.join(format!("target/{arch}-unknown-linux-musl/release"));
    fs::create_dir_all(&dest).unwrap();
    fs::copy(
        target_dir.join(format!("{triple}/release/hello")),
        dest.join("hello"),
    )
    .unwrap();
    arch
}

fn host_platform(arch: &str) -> &'static str {
    match arch {
        "x86_64" => "linux/amd64",
        "aarch64" => "linux/arm64",
        other => panic!("no platform for host arch {other}"),
    }
}

/// The k8s/ files as resolve reads them (sorted), joined into one stream.
fn joined_manifests(ws: &Path) -> String {
    let mut names: Vec<_> = fs::read_dir(ws.join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let texts: Vec<String> = names
        .iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    texts.join("---\n")
}

/// GET http://ADDR/health until it answers (or `deadline` passes).
fn wait_health(addr: &str, deadline: Duration) -> (u16, String) {
    let until = Instant::now() + deadline;
    loop {
        match http_get(addr, "/health", None) {
            Ok(answer) => return answer,
            Err(e) if Instant::now() > until => panic!("GET http://{addr}/health: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn examples_hello_built_pushed_resolved_validated_and_run() {
    let reg = Registry::start();
    let ws = hello_workspace();
    let arch = build_hello(ws.path());
    let platform = host_platform(arch);

    let prefix = format!("{}/examples", reg.addr);
    let out = run_ok(imgbuild().current_dir(ws.path()).args([
        "resolve",
        "-q",
        "--repo-prefix",
        &prefix,
        "--platform",
        platform,
        "-f",
        "k8s/",
    ]));
    let resolved = text(&out.stdout);

    // The digest is what the registry serves, and skopeo (an independent client) agrees.
    let image = format!("{prefix}/hello@sha256:");
    let at = resolved
        .find(&image)
        .expect("a digest reference in the output");
    let hex = &resolved[at + image.len()..at + image.len() + 64];
    let digest = format!("sha256:{hex}");
    let raw = inspect_raw(&reg, &format!("examples/hello@{digest}"));
    assert_eq!(sha256_hex(&raw), hex, "the index the reference names");
    let index: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "{index}");
    // The index goes up under its tag (`latest`), which stores it by digest too.
    assert_eq!(
        reg.log()
            .lines()
            .filter(|l| {
                l.contains(&format!("PUT /v2/examples/hello/manifests/{digest} "))
                    || l.contains("PUT /v2/examples/hello/manifests/latest ")
            })
            .count(),
        1,
        "the index is pushed once"
    );

    // Byte-identical apart from the reference: the three files in order, `---` between them.
    // (The comment that mentions `imgbuild://hello` stays as it is.)
    let want = joined_manifests(ws.path()).replace(
        "image: imgbuild://hello\n",
        &format!("image: {prefix}/hello@{digest}\n"),
    );
    assert_ne!(want, joined_manifests(ws.path()));
    assert_eq!(resolved, want);

    // Valid Kubernetes objects, checked against the schemas of a current Kubernetes.
    let file = ws.path().join("resolved.yaml");
    fs::write(&file, &resolved).unwrap();
    let Some(validate) = kubernetes_validate() else {
        return skip_missing("kubernetes-validate", "kubernetes-validate not installed");
    };
    let checked = Command::new(validate)
        .args(["--strict", "--quiet"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "kubernetes-validate: {}{}",
        text(&checked.stdout),
        text(&checked.stderr)
    );

    // The Docker Engine pulls the image by its digest and runs it as the Deployment does
    // (non-root, read-only root, no capabilities); /health answers 200 "ok".
    if !docker_available() {
        return skip_missing(
            "docker",
            "no Docker Engine answers: docker run of examples/hello not tested",
        );
    }
    let pull_ref = format!("{prefix}/hello@{digest}");
    let pulled = Command::new("docker")
        .args(["pull", "-q", &pull_ref])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        pulled.status.success(),
        "docker pull: {}",
        text(&pulled.stderr)
    );
    let port = free_port();
    let name = format!("imgbuild-hello-{port}");
    let started: Output = Command::new("docker")
        .args(["run", "-d", "--rm", "--name", &name, "--network", "host"])
        .args(["--user", "65532:65532", "--read-only", "--cap-drop", "ALL"])
        .args(["--security-opt", "no-new-privileges"])
        .args(["-e", &format!("PORT={port}"), &pull_ref])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "docker run: {}",
        text(&started.stderr)
    );
    let answer = wait_health(&format!("127.0.0.1:{port}"), Duration::from_secs(20));
    let logs = Command::new("docker")
        .args(["logs", &name])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    let _ = Command::new("docker")
        .args(["rmi", "-f", &pull_ref])
        .output();
    assert_eq!(answer.0, 200, "{answer:?}");
    assert!(answer.1.ends_with("\r\n\r\nok\n"), "{answer:?}");
    assert!(
        text(&logs.stderr).contains(&format!("listening on 0.0.0.0:{port}")),
        "{}",
        text(&logs.stderr)
    );
}

/// A multi-document file with comments, quotes, flow collections, a block scalar and a Helm
/// values document.
const MIXED: &str = r#"# Deployed by digest; this comment names imgbuild://hello and stays as it is.
apiVersion: v1
kind: Pod
metadata:
  name: a   # a trailing comment
  annotations:
    note: "see imgbuild://hello"
spec:
  containers:
    - name: a
      image: imgbuild://hello
    - name: b
      image: "imgbuild://build-specs/hello.toml"   # by path
  initContainers:
    - {name: c, image: 'imgbuild://hello'}
---
# Helm values: the chart writes {{ .repository }}:{{ .tag }} or {{ .repository }}@{{ .digest }}
image:
  repository: imgbuild://hello
  tag: imgbuild://hello
  digest: imgbuild://hello
  pullPolicy: IfNotPresent
config: |
  image: imgbuild://hello
...
"#;

#[test]
fn resolve_from_a_metadata_file_edits_only_the_references() {
    let reg = Registry::start();
    let ws = crate::build::workspace(1_000_000_000);
    let meta = ws.path().join("hello.json");
    let pushed = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .args([
                "push",
                "-q",
                "-f",
                "build-specs/hello.toml",
                "--platform",
                "linux/amd64",
                "--repo",
                &format!("{}/team/hello", reg.addr),
                "--tag",
                "v1",
                "--metadata-file",
            ])
            .arg(&meta),
    );
    let line = text(&pushed.stdout).trim().to_string();
    let (repo, digest) = line.split_once('@').unwrap();
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
    assert_eq!(m["spec"], "build-specs/hello.toml");

    // Resolve elsewhere: no spec there, the metadata file is the only source; no registry
    // is contacted (it is stopped first).
    drop(reg);
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("mixed.yaml"), MIXED).unwrap();
    let out = run_ok(
        imgbuild()
            .current_dir(dir.path())
            .args(["resolve", "-f", "mixed.yaml", "--metadata-file"])
            .arg(&meta),
    );
    let resolved = text(&out.stdout);
    assert_eq!(out.stderr, b"", "{}", text(&out.stderr));
    let full = format!("{repo}@{digest}");
    // Every line without a reference is byte-identical.
    assert_eq!(resolved.lines().count(), MIXED.lines().count());
    for (a, b) in MIXED.lines().zip(resolved.lines()) {
        if a != b {
            assert!(a.contains("imgbuild://"), "{a:?} changed to {b:?}");
        }
    }
    assert_eq!(resolved.matches(&full).count(), 3, "{resolved}");
    assert!(resolved.contains(&format!("\n  repository: {repo}\n")));
    assert!(resolved.contains(&format!("\n  tag: v1@{digest}\n")));
    assert!(resolved.contains(&format!("\n  digest: {digest}\n")));
    let redacted = resolved
        .replace(repo, "REGISTRY/team/hello")
        .replace(digest, "sha256:<index>");
    insta::assert_snapshot!("resolve_mixed", redacted);

    // From standard input, the same.
    let stdin = output_with_stdin(
        imgbuild()
            .current_dir(dir.path())
            .args(["resolve", "-f", "-", "--metadata-file"])
            .arg(&meta),
        MIXED,
    );
    assert!(stdin.status.success(), "{}", text(&stdin.stderr));
    assert_eq!(text(&stdin.stdout), resolved);
}

#[test]
fn unknown_reference_is_exit_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("k8s")).unwrap();
    fs::write(dir.path().join("k8s/a.yaml"), "kind: ConfigMap\n").unwrap();
    fs::write(
        dir.path().join("k8s/b.yml"),
        "spec:\n  containers:\n    - name: x\n      image: imgbuild://missing\n",
    )
    .unwrap();
    let out = imgbuild()
        .current_dir(dir.path())
        .args(["resolve", "-f", "k8s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"", "nothing printed");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "error: k8s/b.yml:4:14: imgbuild://missing: unknown reference: no spec file build-specs/missing.toml"
        ),
        "{err}"
    );

    // A spec without a repository and no --repo-prefix: exit 2 saying what to add.
    let ws = crate::build::workspace(1_000_000_000);
    fs::write(ws.path().join("d.yaml"), "image: imgbuild://hello\n").unwrap();
    let out = imgbuild()
        .current_dir(ws.path())
        .args(["resolve", "-f", "d.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no `repository`; add one, or give --repo-prefix"));
}

#[test]
fn init_writes_a_spec_that_builds_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(
        d.join("Cargo.toml"),
        "[package]\nname = \"svc\"\nversion = \"2.0.1\"\nedition = \"2021\"\nlicense = \"MIT\"\n\
         description = \"a service\"\nrepository = \"https://example.com/svc\"\n",
    )
    .unwrap();
    fs::create_dir_all(d.join("src/bin")).unwrap();
    fs::write(d.join("src/main.rs"), "fn main() {}\n").unwrap();
    fs::write(d.join("src/bin/svc-migrate.rs"), "fn main() {}\n").unwrap();

    let out = run_ok(imgbuild().current_dir(d).arg("init"));
    let said = text(&out.stdout);
    insta::assert_snapshot!("init_output", said);
    let spec = fs::read_to_string(d.join("build-specs/svc.toml")).unwrap();
    assert!(
        spec.contains("# entrypoint = [\"/usr/local/bin/svc-migrate\"]"),
        "{spec}"
    );

    // The spec builds once the (cross-compiled) binary is where it says.
    let bin = d.join("target/x86_64-unknown-linux-musl/release");
    fs::create_dir_all(&bin).unwrap();
    fs::copy(fixtures().join("dist/amd64/hello"), bin.join("svc")).unwrap();
    let built = run_ok(imgbuild().current_dir(d).args([
        "build",
        "-q",
        "-f",
        "build-specs/svc.toml",
        "--platform",
        "linux/amd64",
        "-o",
        "out",
    ]));
    let digest = text(&built.stdout).trim().to_string();
    let index: serde_json::Value =
        serde_json::from_slice(&read_blob(&d.join("out"), &digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &d.join("out"),
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&read_blob(
        &d.join("out"),
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/svc");
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.version"],
        "2.0.1"
    );
    assert_eq!(
        config["config"]["Labels"]["org.opencontainers.image.licenses"],
        "MIT"
    );

    // Never overwritten.
    let again = imgbuild().current_dir(d).arg("init").output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("build-specs/svc.toml already exists"));
    assert_eq!(
        fs::read_to_string(d.join("build-specs/svc.toml")).unwrap(),
        spec
    );
}

#[test]
fn two_specs_are_each_pushed_once() {
    let reg = Registry::start();
    let ws = crate::build::workspace(1_000_000_000);
    fs::copy(
        ws.path().join("build-specs/hello.toml"),
        ws.path().join("build-specs/other.toml"),
    )
    .unwrap();
    // `hello` three times (by name, by path, quoted), `other` once, across two files.
    fs::write(
        ws.path().join("a.yaml"),
        "image: imgbuild://hello\n---\nimage: imgbuild://./build-specs/hello.toml\n",
    )
    .unwrap();
    fs::write(
        ws.path().join("b.yaml"),
        "images:\n  - 'imgbuild://hello'\n  - imgbuild://other\n",
    )
    .unwrap();
    let prefix = format!("{}/two", reg.addr);
    let out = run_ok(imgbuild().current_dir(ws.path()).args([
        "resolve",
        "-q",
        "--repo-prefix",
        &format!("{prefix}/"),
        "--platform",
        "linux/amd64",
        "-f",
        "a.yaml",
        "-f",
        "b.yaml",
    ]));
    let resolved = text(&out.stdout);
    let log = reg.log();
    let mut digests = Vec::new();
    for name in ["hello", "other"] {
        let start = format!("{prefix}/{name}@");
        let at = resolved
            .find(&start)
            .unwrap_or_else(|| panic!("{name}: {resolved}"));
        let digest = &resolved[at + start.len()..at + start.len() + 71];
        // The index goes up under its tag (`latest`), which stores it by digest too.
        let puts = log
            .lines()
            .filter(|l| {
                l.contains(&format!("PUT /v2/two/{name}/manifests/{digest} "))
                    || l.contains(&format!("PUT /v2/two/{name}/manifests/latest "))
            })
            .count();
        assert_eq!(puts, 1, "{name}: index pushed once");
        digests.push(format!("{start}{digest}"));
    }
    let (hello, other) = (&digests[0], &digests[1]);
    assert_eq!(
        resolved,
        format!("image: {hello}\n---\nimage: {hello}\n---\nimages:\n  - '{hello}'\n  - {other}\n")
    );
}
