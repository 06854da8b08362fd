//! `imgbuild push` against Debian's real docker-registry, checked with skopeo (an independent
//! client that verifies every digest), tar, qemu and, where one answers, the Docker Engine.

use crate::build::{GOLDEN_HELLO, workspace};
use crate::harness::*;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `imgbuild push -f build-specs/hello.toml --repo <reg>/<repo> <extra>` in `ws`.
fn push(ws: &Path, reg: &Registry, repo: &str, extra: &[&str]) -> Output {
    imgbuild()
        .current_dir(ws)
        .args([
            "push",
            "-f",
            "build-specs/hello.toml",
            "--repo",
            &format!("{}/{repo}", reg.addr),
        ])
        .args(extra)
        .output()
        .expect("run imgbuild")
}

fn push_ok(ws: &Path, reg: &Registry, repo: &str, extra: &[&str]) -> String {
    let out = push(ws, reg, repo, extra);
    assert!(
        out.status.success(),
        "push failed: {}\n{}",
        text(&out.stderr),
        reg.log()
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout must be exactly one line: {stdout:?}"
    );
    stdout.trim().to_string()
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn push_two_platforms_then_verify_with_skopeo_tar_qemu_and_docker() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let built = run_ok(imgbuild().current_dir(ws.path()).args([
        "build",
        "-q",
        "-f",
        "build-specs/hello.toml",
        "-o",
        "out",
    ]));
    let built_digest = text(&built.stdout).trim().to_string();

    // Counted requests below are the image's own (referrers: tests/it/supply.rs).
    let line = push_ok(
        ws.path(),
        &reg,
        "hello",
        &[
            "--tag",
            "v1",
            "--tag",
            "latest",
            "--sbom",
            "none",
            "--provenance",
            "none",
        ],
    );
    let (repo, digest) = line.split_once('@').expect("REPO@DIGEST");
    assert_eq!(repo, format!("{}/hello", reg.addr));
    assert_eq!(digest, built_digest, "push and build give the same digest");

    // Both tags and the digest serve the exact index bytes we built.
    let index_bytes = read_blob(&ws.path().join("out"), digest);
    for r in ["hello:v1", "hello:latest", &format!("hello@{digest}")] {
        assert_eq!(inspect_raw(&reg, r), index_bytes, "{r}");
    }
    let index: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let d = m["digest"].as_str().unwrap();
        assert_eq!(
            inspect_raw(&reg, &format!("hello@{d}")),
            read_blob(&ws.path().join("out"), d)
        );
    }

    // Each unique blob was uploaded once: 3 per-arch layers + 1 shared layer + 3 configs.
    let log = reg.log();
    assert_eq!(count(&log, "\"POST /v2/hello/blobs/uploads/"), 7, "{log}");
    // 3 platform manifests, then the index under each of its 2 tags (a PUT by tag stores
    // it; it is served by digest above all the same).
    assert_eq!(count(&log, "\"PUT /v2/hello/manifests/"), 3 + 2, "{log}");

    // skopeo pulls everything and verifies every digest on the way.
    let pulled = ws.path().join("pulled");
    pull_oci(&reg, "hello:v1", &pulled, "v1");
    // What the registry serves, recomputed with sha256sum and gzip -dc.
    assert_eq!(verify_digests_with_standard_tools(&pulled, digest), (3, 6));
    for (m, arch) in index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .zip(["amd64", "arm64", "arm"])
    {
        let root = ws.path().join(format!("root-{arch}"));
        unpack_layers(&pulled, m["digest"].as_str().unwrap(), &root);
        let meta = fs::metadata(root.join("usr/local/bin/hello")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(
            (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid()),
            (0o755, 0, 0)
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hello/greeting.txt")).unwrap(),
            fs::read_to_string(fixtures().join("dist/share/greeting.txt")).unwrap()
        );
    }
    let ran = run_ok(&mut Command::new(
        ws.path().join("root-amd64/usr/local/bin/hello"),
    ));
    assert_eq!(text(&ran.stdout), "hello from imgbuild (x86_64)\n");
    match find_program("qemu-aarch64-static") {
        Some(q) => {
            let ran = run_ok(Command::new(q).arg(ws.path().join("root-arm64/usr/local/bin/hello")));
            assert_eq!(text(&ran.stdout), "hello from imgbuild (aarch64)\n");
        }
        None => skip_missing("qemu", "qemu-aarch64-static not installed"),
    }

    // A second push of the same thing uploads nothing and gives the same digest.
    let again = push_ok(
        ws.path(),
        &reg,
        "hello",
        &["--tag", "v1", "--sbom", "none", "--provenance", "none"],
    );
    assert_eq!(again, line);
    assert_eq!(
        count(&reg.log(), "\"POST /v2/hello/blobs/uploads/"),
        7,
        "re-push uploaded blobs"
    );

    // The Docker Engine pulls it and runs it.
    if !docker_available() {
        skip_missing(
            "docker",
            "no Docker Engine answers: docker pull/run not tested",
        );
        return;
    }
    let image = format!("{}/hello:v1", reg.addr);
    let pulled = Command::new("docker")
        .args(["pull", &image])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !pulled.status.success() {
        let err = text(&pulled.stderr);
        // A daemon in another network namespace cannot see our loopback registry: its dial
        // of exactly this address is refused. Any other failure (a bad manifest, a digest
        // mismatch, another address) is a real pull failure.
        if err.contains(&format!(
            "dial tcp {}: connect: connection refused",
            reg.addr
        )) {
            skip_missing(
                "docker",
                &format!(
                    "the Docker Engine cannot reach {} (another network namespace): {err}",
                    reg.addr
                ),
            );
            return;
        }
        panic!("docker pull failed: {err}");
    }
    let ran = Command::new("docker")
        .args(["run", "--rm", &image])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
    assert!(ran.status.success(), "docker run: {}", text(&ran.stderr));
    assert_eq!(text(&ran.stdout), "hello from imgbuild (x86_64)\n");
}

/// Push the hello spec as user `ci-user` with `password` on standard input.
fn push_with_password(
    ws: &Path,
    reg: &Registry,
    repo: &str,
    password: &str,
    verbosity: &str,
) -> Output {
    let mut child = imgbuild()
        .current_dir(ws)
        .args([
            "push",
            verbosity,
            "-f",
            "build-specs/hello.toml",
            "--repo",
            &format!("{}/{repo}", reg.addr),
        ])
        .args(["--username", "ci-user", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn push_with_basic_auth_from_flags_and_docker_config() {
    let reg = Registry::start_htpasswd("ci-user", "s3cret-pass-123");
    let ws = workspace(1_000_000_000);

    // --username + --password-stdin.
    let out = push_with_password(ws.path(), &reg, "auth", "s3cret-pass-123", "-vv");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(pushed_digest(&out.stdout), GOLDEN_HELLO);
    assert_serves(&reg, "auth:latest", GOLDEN_HELLO);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!all.contains("s3cret-pass-123"), "password leaked: {all}");
    assert!(
        !all.contains("Y2ktdXNlcjpzM2NyZXQtcGFzcy0xMjM"),
        "basic auth header leaked: {all}"
    );

    // ~/.docker/config.json `auths`.
    let home = tempfile::tempdir().unwrap();
    fs::create_dir_all(home.path().join(".docker")).unwrap();
    fs::write(
        home.path().join(".docker/config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"Y2ktdXNlcjpzM2NyZXQtcGFzcy0xMjM="}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let out = imgbuild()
        .current_dir(ws.path())
        .env("HOME", home.path())
        .args([
            "push",
            "-vv",
            "-f",
            "build-specs/hello.toml",
            "--repo",
            &format!("{}/auth2", reg.addr),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The registry holds the image the build gives, under the spec's tag.
    assert_eq!(pushed_digest(&out.stdout), GOLDEN_HELLO);
    assert_serves(&reg, "auth2:latest", GOLDEN_HELLO);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    for secret in ["s3cret-pass-123", "Y2ktdXNlcjpzM2NyZXQtcGFzcy0xMjM"] {
        assert!(!all.contains(secret), "secret leaked at -vv: {all}");
    }

    // Wrong password: exit 4, one line naming the registry and what was tried, no secret.
    let out = push_with_password(ws.path(), &reg, "auth3", "wrong-password-987", "-vv");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(out.stdout.is_empty());
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("an error line");
    assert!(line.contains(&reg.addr), "{line}");
    assert!(
        line.contains("--username"),
        "says which credentials were tried: {line}"
    );
    assert!(
        !err.contains("wrong-password-987"),
        "password leaked: {err}"
    );

    // No credentials at all: also exit 4, and nothing reached the repository.
    let out = push(ws.path(), &reg, "auth4", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    for repo in ["auth3", "auth4"] {
        assert_eq!(
            count(&reg.log(), &format!("\"PUT /v2/{repo}/manifests/")),
            0,
            "{repo}: a manifest was written after an auth failure"
        );
    }
}

/// The tags of `repo` on `reg`, from the registry's own API (`/v2/<repo>/tags/list`); empty
/// when the repository does not exist.
fn tags(reg: &Registry, repo: &str) -> Vec<String> {
    let (status, raw) = http_get(&reg.addr, &format!("/v2/{repo}/tags/list"), None).unwrap();
    if status == 404 {
        return vec![];
    }
    assert_eq!(status, 200, "{raw}");
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["tags"]
        .as_array()
        .map(|t| t.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn authorization_refused_mid_push_leaves_no_tag_on_the_pushed_repository() {
    use crate::proxy::{Proxy, ProxyOpts};
    // Blobs go through; every manifest PUT is refused (403), as for a credential that may
    // upload but not write manifests.
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            deny_manifest_puts: true,
            ..ProxyOpts::default()
        },
    );
    let ws = workspace(1_000_000_000);
    let out = imgbuild()
        .current_dir(ws.path())
        .args(["push", "-f", "build-specs/hello.toml", "--repo"])
        .arg(format!("{}/midway", proxy.addr))
        .args(["--tag", "v1", "--tag", "latest", "--retry-base-ms", "10"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    // The failure came mid-push: the blobs are in the repository ...
    let log = reg.log();
    assert_eq!(count(&log, "\"POST /v2/midway/blobs/uploads/"), 7, "{log}");
    let seen = proxy.seen();
    assert!(
        seen.iter()
            .any(|r| r.method == "PUT" && r.target.contains("/v2/midway/manifests/")),
        "no manifest PUT was tried: {seen:#?}"
    );
    // ... and no manifest, index or tag reached it.
    assert_eq!(count(&log, "\"PUT /v2/midway/manifests/"), 0, "{log}");
    assert_eq!(tags(&reg, "midway"), Vec::<String>::new());
    let tagged = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &reg.docker_ref("midway:v1"),
    ]);
    assert!(
        !tagged.status.success(),
        "midway:v1 exists after a refused push"
    );
}

#[test]
fn push_over_tls_with_a_private_ca() {
    let reg = Registry::start_tls(&["registry.test"]);
    let ws = workspace(1_000_000_000);
    let ca = reg.ca_cert().unwrap();
    let line = push_ok(ws.path(), &reg, "tls", &["--ca-cert", ca.to_str().unwrap()]);
    let digest = line.split_once('@').unwrap().1;
    let raw = inspect_raw(&reg, "tls:latest");
    assert_eq!(format!("sha256:{}", sha256_hex(&raw)), digest);
    // The same with sha256sum, not the crate's own hasher.
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), &raw).unwrap();
    assert_eq!(sha256sum_of(file.path(), None), digest);
}

fn sha256_hex(bytes: &[u8]) -> String {
    imgbuild::digest::Digest::of(bytes).hex().to_string()
}

#[test]
fn unreachable_registry_is_exit_5_naming_the_url() {
    let ws = workspace(1_000_000_000);
    let port = free_port();
    let out = imgbuild()
        .current_dir(ws.path())
        .args([
            "push",
            "-f",
            "build-specs/hello.toml",
            "--repo",
            &format!("127.0.0.1:{port}/x"),
            "--timeout",
            "5",
            // Refused connections are retried (with backoff); once is enough here.
            "--retries",
            "1",
        ])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("error line");
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(
        line.to_lowercase().contains("connection refused") || line.contains("cannot connect"),
        "{line}"
    );
}

#[test]
fn push_without_repository_is_a_usage_error() {
    let ws = workspace(1_000_000_000);
    let out = imgbuild()
        .current_dir(ws.path())
        .args(["push", "-f", "build-specs/hello.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no repository: give --repo"),
        "{}",
        text(&out.stderr)
    );
}
