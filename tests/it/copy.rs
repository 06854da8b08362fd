//! `imgbuild copy` and `imgbuild tag` between real docker-registry instances, checked with
//! skopeo (exact bytes by `inspect --raw`, every blob verified by `copy --all`) and the
//! registries' access logs (mounts, uploads).

use crate::build::workspace;
use crate::harness::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Output;
use std::time::Duration;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Push the example (three platforms, an index) to `reg`/`repo`:`tag`; returns the digest.
fn push_example(reg: &Registry, repo: &str, tag: &str) -> String {
    let ws = workspace(1_000_000_000);
    let mut cmd = imgbuild();
    cmd.current_dir(ws.path()).args([
        "push",
        "-q",
        "-f",
        "build-specs/hello.toml",
        "--repo",
        &format!("{}/{repo}", reg.addr),
        "--tag",
        tag,
    ]);
    let out = match &reg.creds {
        Some((u, p)) => output_with_stdin(cmd.args(["-u", u, "--password-stdin"]), p),
        None => cmd.output().expect("run imgbuild"),
    };
    assert!(out.status.success(), "push: {}", text(&out.stderr));
    let line = text(&out.stdout);
    line.trim()
        .split_once('@')
        .expect("REPO@DIGEST")
        .1
        .to_string()
}

/// `imgbuild <args>`, with the destination password on stdin when `dst` has one.
fn run(args: &[&str], dst: Option<&Registry>) -> Output {
    let mut cmd = imgbuild();
    cmd.args(args);
    match dst.and_then(|r| r.creds.clone()) {
        Some((u, p)) => output_with_stdin(cmd.args(["-u", &u, "--password-stdin"]), &p),
        None => cmd.output().expect("run imgbuild"),
    }
}

fn run_ok_line(args: &[&str], dst: Option<&Registry>) -> String {
    let out = run(args, dst);
    assert!(
        out.status.success(),
        "imgbuild {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout:?}");
    stdout.trim().to_string()
}

/// One plain HTTP/1.0 request to a registry without auth: (status, headers, body).
fn http(addr: &str, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let t = text(&buf);
    let status = t.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, t)
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Upload `bytes` as a blob of `repo` (POST, then PUT ?digest=).
fn upload_blob(reg: &Registry, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let (status, resp) = http(
        &reg.addr,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        "x",
        b"",
    );
    assert_eq!(status, 202, "{resp}");
    let location = resp
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .expect("Location")
        .trim();
    let path = location.split_once(&reg.addr).map_or(location, |(_, p)| p);
    let sep = if path.contains('?') { '&' } else { '?' };
    let put = format!("{path}{sep}digest={}", digest.replace(':', "%3A"));
    let (status, resp) = http(&reg.addr, "PUT", &put, "application/octet-stream", bytes);
    assert_eq!(status, 201, "{resp}");
    digest
}

/// Attach an SBOM-like artifact to `subject` in `repo` the way registries without the
/// referrers API keep them: the artifact manifest (with `subject`), and the fallback tag
/// `sha256-<hex>` holding an index that lists it. Returns the artifact's digest and bytes.
fn attach_referrer(
    reg: &Registry,
    repo: &str,
    subject: &str,
    subject_bytes: &[u8],
) -> (String, Vec<u8>) {
    let empty = upload_blob(reg, repo, b"{}");
    let payload = br#"{"spdxVersion":"SPDX-2.3","name":"hello"}"#;
    let layer = upload_blob(reg, repo, payload);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/spdx+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/spdx+json", "digest": layer, "size": payload.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": subject, "size": subject_bytes.len()},
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = sha256(&bytes);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let (status, resp) = http(
        &reg.addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{digest}"),
        mt,
        &bytes,
    );
    assert_eq!(status, 201, "{resp}");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": mt, "digest": digest, "size": bytes.len(), "artifactType": "application/spdx+json"}],
    });
    let tag = subject.replace(':', "-");
    let (status, resp) = http(
        &reg.addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    assert_eq!(status, 201, "{resp}");
    (digest, bytes)
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn copy_index_across_registries_by_tag_and_digest_with_referrers() {
    let src = Registry::start();
    let dst = Registry::start_htpasswd("promoter", "s3cret");
    let digest = push_example(&src, "dev/hello", "v1");
    let index = inspect_raw(&src, "dev/hello:v1");
    let (referrer, referrer_bytes) = attach_referrer(&src, "dev/hello", &digest, &index);

    // By tag, no destination tag: the source's tag is kept.
    let line = run_ok_line(
        &[
            "copy",
            &format!("{}/dev/hello:v1", src.addr),
            &format!("{}/prod/hello", dst.addr),
        ],
        Some(&dst),
    );
    assert_eq!(line, format!("{}/prod/hello@{digest}", dst.addr));
    assert_eq!(
        inspect_raw(&dst, "prod/hello:v1"),
        index,
        "index bytes identical"
    );
    assert_eq!(inspect_raw(&dst, &format!("prod/hello@{digest}")), index);
    // Every platform manifest and blob arrived and verifies (skopeo checks each digest).
    let out = tempfile::tempdir().unwrap();
    pull_oci(&dst, "prod/hello:v1", &out.path().join("oci"), "v1");
    // The referrer came along, byte for byte, and the fallback tag at the destination lists it.
    assert_eq!(
        inspect_raw(&dst, &format!("prod/hello@{referrer}")),
        referrer_bytes
    );
    let listed = inspect_raw(&dst, &format!("prod/hello:{}", digest.replace(':', "-")));
    assert!(text(&listed).contains(&referrer), "{}", text(&listed));
    // Blobs were streamed into the destination (uploaded there, not mounted).
    let log = dst.log();
    assert!(
        count(&log, "PUT /v2/prod/hello/blobs/uploads/") >= 4,
        "{log}"
    );

    // By digest, with a tag: the same digest under the new tag.
    let line = run_ok_line(
        &[
            "copy",
            &format!("{}/dev/hello@{digest}", src.addr),
            &format!("{}/prod/other:release", dst.addr),
        ],
        Some(&dst),
    );
    assert_eq!(line, format!("{}/prod/other@{digest}", dst.addr));
    assert_eq!(inspect_raw(&dst, "prod/other:release"), index);
    // Copied again: nothing to move (every blob already there).
    let before = count(&dst.log(), "blobs/uploads/");
    run_ok_line(
        &[
            "copy",
            &format!("{}/dev/hello:v1", src.addr),
            &format!("{}/prod/hello", dst.addr),
        ],
        Some(&dst),
    );
    assert_eq!(
        count(&dst.log(), "blobs/uploads/"),
        before,
        "a repeated copy uploads nothing"
    );

    // A destination digest that is not the source's is refused before anything moves.
    let other = format!("sha256:{}", "0".repeat(64));
    let out = run(
        &[
            "copy",
            &format!("{}/dev/hello:v1", src.addr),
            &format!("{}/prod/x@{other}", dst.addr),
        ],
        Some(&dst),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn copy_within_a_registry_mounts_and_tag_adds_tags() {
    let reg = Registry::start();
    let digest = push_example(&reg, "dev/app", "v2");
    let index = inspect_raw(&reg, "dev/app:v2");
    let line = run_ok_line(
        &[
            "copy",
            &format!("{}/dev/app:v2", reg.addr),
            &format!("{}/prod/app:v2", reg.addr),
        ],
        None,
    );
    assert_eq!(line, format!("{}/prod/app@{digest}", reg.addr));
    assert_eq!(inspect_raw(&reg, "prod/app:v2"), index);
    let log = reg.log();
    let mounts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("POST /v2/prod/app/blobs/uploads/?") && l.contains("mount="))
        .collect();
    assert!(!mounts.is_empty(), "no mount requests: {log}");
    assert!(mounts.iter().all(|l| l.contains("\" 201 ")), "{mounts:?}");
    assert_eq!(
        count(&log, "PUT /v2/prod/app/blobs/uploads/"),
        0,
        "no blob upload: {log}"
    );
    let out = tempfile::tempdir().unwrap();
    pull_oci(&reg, "prod/app:v2", &out.path().join("oci"), "v2");

    // tag: more tags on the same bytes.
    let line = run_ok_line(
        &[
            "tag",
            &format!("{}/prod/app:v2", reg.addr),
            "stable",
            "2026-12",
        ],
        None,
    );
    assert_eq!(line, format!("{}/prod/app@{digest}", reg.addr));
    let flags = reg.skopeo_args("");
    let mut args: Vec<&str> = vec!["list-tags"];
    args.extend(flags.iter().map(String::as_str));
    let target = reg.docker_ref("prod/app");
    args.push(&target);
    let tags: serde_json::Value = serde_json::from_str(&skopeo_ok(&args)).unwrap();
    let mut tags: Vec<&str> = tags["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        // `sha256-<hex>`: referrers tags (push's SBOM/provenance), copied with the image.
        .filter(|t| !t.starts_with("sha256-"))
        .collect();
    tags.sort_unstable();
    assert_eq!(tags, ["2026-12", "stable", "v2"]);
    assert_eq!(inspect_raw(&reg, "prod/app:stable"), index);

    // Missing sources: exit 3, one line naming the reference.
    for (cmd, args) in [
        (
            "copy",
            vec![
                format!("{}/dev/app:nope", reg.addr),
                format!("{}/prod/app", reg.addr),
            ],
        ),
        (
            "copy",
            vec![
                format!("{}/dev/none:v1", reg.addr),
                format!("{}/prod/app", reg.addr),
            ],
        ),
        (
            "tag",
            vec![format!("{}/dev/app:nope", reg.addr), "x".to_string()],
        ),
    ] {
        let mut all = vec![cmd];
        all.extend(args.iter().map(String::as_str));
        let out = run(&all, None);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{all:?}: {err}");
        assert!(err.contains("not found") && err.contains(&args[0]), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn copy_keeps_a_docker_manifest_list() {
    let src = Registry::start();
    let dst = Registry::start();
    push_example(&src, "oci/hello", "v1");
    // skopeo converts the image to Docker's formats (manifest list + v2s2 manifests).
    let from = src.docker_ref("oci/hello:v1");
    let to = src.docker_ref("docker/hello:v1");
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        "--multi-arch",
        "all",
        &from,
        &to,
    ]);
    let list = inspect_raw(&src, "docker/hello:v1");
    let doc: serde_json::Value = serde_json::from_slice(&list).unwrap();
    let list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
    assert_eq!(doc["mediaType"], list_type, "{doc}");
    let line = run_ok_line(
        &[
            "copy",
            &format!("{}/docker/hello:v1", src.addr),
            &format!("{}/mirror/hello", dst.addr),
        ],
        None,
    );
    assert_eq!(line, format!("{}/mirror/hello@{}", dst.addr, sha256(&list)));
    assert_eq!(inspect_raw(&dst, "mirror/hello:v1"), list);
}

/// ECR to ECR across two accounts: two TLS stand-ins named like ECR hosts, tokens from moto
/// (one GetAuthorizationToken per registry), blobs streamed between them.
#[test]
fn copy_between_two_ecr_accounts_through_moto() {
    use crate::ecr::{ECR_HOST, MOTO_PASSWORD, Moto, ecr_registry, push_to_ecr_stand_in};
    let moto = Moto::start();
    let dev = ecr_registry(MOTO_PASSWORD);
    let prod_host = "210987654321.dkr.ecr.us-west-2.amazonaws.com";
    let prod = Registry::start_with(
        RegistryOpts::default()
            .with_tls(&[prod_host])
            .with_htpasswd("AWS", MOTO_PASSWORD),
    );
    let aws = [
        ("AWS_ENDPOINT_URL", moto.url.as_str()),
        ("AWS_ACCESS_KEY_ID", "AKIACOPYTEST00000001"),
        ("AWS_SECRET_ACCESS_KEY", "copy-test-secret"),
    ];
    let ws = workspace(1_000_000_000);
    let mut push = push_to_ecr_stand_in(ws.path(), &dev, "dev/hello");
    push.envs(aws);
    let out = run_ok(&mut push);
    let pushed = text(&out.stdout);
    let digest = pushed
        .trim()
        .split_once('@')
        .expect("REPO@DIGEST")
        .1
        .to_string();

    let src = format!("{ECR_HOST}:{}/dev/hello:v1", dev.port);
    let dst = format!("{prod_host}:{}/prod/hello", prod.port);
    let out = run_ok(
        imgbuild()
            .envs(aws)
            .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            .args(["copy", &src, &dst])
            .arg("--resolve")
            .arg(format!("{ECR_HOST}:{}:127.0.0.1", dev.port))
            .arg("--resolve")
            .arg(format!("{prod_host}:{}:127.0.0.1", prod.port))
            .arg("--ca-cert")
            .arg(dev.ca_cert().unwrap())
            .arg("--ca-cert")
            .arg(prod.ca_cert().unwrap()),
    );
    assert_eq!(text(&out.stdout).trim(), format!("{dst}@{digest}"));
    assert_eq!(
        inspect_raw(&prod, "prod/hello:v1"),
        inspect_raw(&dev, "dev/hello:v1")
    );
    let tmp = tempfile::tempdir().unwrap();
    pull_oci(&prod, "prod/hello:v1", &tmp.path().join("oci"), "v1");
}

/// `oci:DIR[:TAG]` on either side: a registry image into a layout skopeo reads with the same
/// digest, and a layout `imgbuild build` wrote pushed by `copy` with its build digest.
#[test]
fn copy_to_and_from_an_oci_layout() {
    let reg = Registry::start();
    let digest = push_example(&reg, "dev/hello", "v3");
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("pulled");
    let line = run_ok_line(
        &[
            "copy",
            &format!("{}/dev/hello:v3", reg.addr),
            &format!("oci:{}", layout.display()),
        ],
        None,
    );
    assert_eq!(line, format!("oci:{}@{digest}", layout.display()));
    let raw = skopeo_ok(&["inspect", "--raw", &format!("oci:{}:v3", layout.display())]);
    assert_eq!(raw.as_bytes(), inspect_raw(&reg, "dev/hello:v3"));
    // skopeo reads every blob of every platform from it, verifying each digest.
    skopeo_ok(&[
        "copy",
        "--all",
        &format!("oci:{}:v3", layout.display()),
        &format!("oci:{}:v3", dir.path().join("again").display()),
    ]);

    // A layout from `imgbuild build`, into the registry: the build's digest.
    let ws = workspace(1_000_000_000);
    let built = run_ok(imgbuild().current_dir(ws.path()).args([
        "build",
        "-q",
        "-f",
        "build-specs/hello.toml",
        "-o",
        "out",
        "-t",
        "b1",
    ]));
    let built = text(&built.stdout).trim().to_string();
    let line = run_ok_line(
        &[
            "copy",
            &format!("oci:{}:b1", ws.path().join("out").display()),
            &format!("{}/built/hello", reg.addr),
        ],
        None,
    );
    assert_eq!(line, format!("{}/built/hello@{built}", reg.addr));
    assert_eq!(
        inspect_raw(&reg, "built/hello:b1"),
        read_blob(&ws.path().join("out"), &built)
    );
    // A tag the layout does not have: exit 3.
    let out = run(
        &[
            "copy",
            &format!("oci:{}:nope", ws.path().join("out").display()),
            &format!("{}/built/hello", reg.addr),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}
