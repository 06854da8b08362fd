//! Tests of the test harness itself: registries start and answer, fixtures are what they
//! claim to be, the file and OCI helpers work. Nothing here runs imgbuild's own logic.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plain_registry_answers_v2() {
    let reg = Registry::start();
    assert!(reg.addr.starts_with("127.0.0.1:"), "{}", reg.addr);
    assert_eq!(reg.url(), format!("http://{}", reg.addr));
    assert!(reg.ca_cert().is_none() && reg.cert_dir().is_none());
    assert!(reg.storage().is_dir());
    let (status, resp) = http_get(&reg.addr, "/v2/", None).expect("GET /v2/");
    assert_eq!(status, 200, "{resp}");
    assert!(resp.contains("registry/2.0"), "{resp}");
    // The access log reaches log().
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !reg.log().contains("\"GET /v2/ HTTP/1.0\" 200") {
        assert!(
            std::time::Instant::now() < deadline,
            "no access log line:\n{}",
            reg.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn registries_get_distinct_ports_and_stop_on_drop() {
    let a = Registry::start();
    let b = Registry::start();
    assert_ne!(a.addr, b.addr);
    let addr = a.addr.clone();
    drop(a);
    // After drop, the port no longer answers (killed and reaped).
    assert!(
        http_get(&addr, "/v2/", None).is_err(),
        "registry on {addr} still answers after drop"
    );
    assert_eq!(http_get(&b.addr, "/v2/", None).expect("GET b").0, 200);
}

#[test]
fn htpasswd_registry_requires_credentials() {
    let reg = Registry::start_htpasswd("alice", "s3cret");
    assert_eq!(reg.creds, Some(("alice".to_owned(), "s3cret".to_owned())));
    let (status, resp) = http_get(&reg.addr, "/v2/", None).expect("GET /v2/");
    assert_eq!(status, 401, "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("www-authenticate: basic realm="),
        "{resp}"
    );
    let (status, resp) = http_get(&reg.addr, "/v2/", Some(("alice", "wrong"))).expect("GET");
    assert_eq!(status, 401, "{resp}");
    let (status, resp) = http_get(&reg.addr, "/v2/", Some(("alice", "s3cret"))).expect("GET");
    assert_eq!(status, 200, "{resp}");
}

#[test]
fn empty_registry_via_skopeo_is_not_found() {
    let reg = Registry::start();
    let flags = reg.skopeo_args("");
    let target = reg.docker_ref("nope/missing:latest");
    let mut args = vec!["inspect", "--raw"];
    args.extend(flags.iter().map(String::as_str));
    args.push(&target);
    let out = skopeo(&args);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("unknown") || err.contains("not found"),
        "{err}"
    );
}

fn assert_not_found_not_tls(err: &str) {
    assert!(
        err.contains("manifest unknown")
            || err.contains("name unknown")
            || err.contains("not found"),
        "expected a not-found error, got:\n{err}"
    );
    for tls_word in ["x509", "certificate", "tls:"] {
        assert!(!err.contains(tls_word), "TLS error:\n{err}");
    }
}

#[test]
fn tls_registry_is_trusted_with_its_ca() {
    let reg = Registry::start_tls(&["registry.test"]);
    assert_eq!(reg.url(), format!("https://{}", reg.addr));
    let ca = reg.ca_cert().expect("ca cert");
    let cert_dir = reg.cert_dir().expect("cert dir");
    let listing: Vec<_> = fs::read_dir(&cert_dir)
        .expect("read cert dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(
        listing,
        vec!["ca.crt".to_owned()],
        "cert_dir must hold only ca.crt"
    );
    assert!(
        fs::read_to_string(&ca)
            .expect("read CA")
            .contains("BEGIN CERTIFICATE")
    );

    // skopeo with the CA: reaches the registry, which says "not found".
    let target = reg.docker_ref("nope/missing:latest");
    let cd = cert_dir.display().to_string();
    let out = skopeo(&["inspect", "--raw", "--cert-dir", &cd, &target]);
    assert!(!out.status.success());
    assert_not_found_not_tls(&stderr_of(&out));

    // Without the CA, verification fails: it really is TLS with an untrusted issuer.
    let out = skopeo(&["inspect", "--raw", &target]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("x509") || err.contains("certificate"), "{err}");

    // curl, when present, with --cacert, by IP and by the SAN host name.
    if find_program("curl").is_some() {
        let port = reg.port.to_string();
        for url in [
            format!("{}/v2/", reg.url()),
            format!("https://registry.test:{port}/v2/"),
            format!("https://localhost:{port}/v2/"),
        ] {
            let out = Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&ca)
                .args(["--resolve", &format!("registry.test:{port}:127.0.0.1")])
                .arg(&url)
                .env_remove("CURL_CA_BUNDLE")
                .output()
                .expect("run curl");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "200",
                "{url}: {}",
                stderr_of(&out)
            );
        }
    } else {
        skip_missing("curl", "curl not installed: TLS checked with skopeo only");
    }
}

#[test]
fn tls_certificates_have_the_required_shape() {
    let reg = Registry::start_tls(&["a.example", "b.example"]);
    let ca = reg.ca_cert().expect("ca");
    let leaf = ca.with_file_name("server.crt");
    let text = |p: &Path| {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(p)
            .output()
            .expect("openssl x509");
        assert!(out.status.success(), "{}", stderr_of(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ca_text = text(&ca);
    assert!(ca_text.contains("CA:TRUE"), "{ca_text}");
    let leaf_text = text(&leaf);
    for needle in [
        "CA:FALSE",
        "TLS Web Server Authentication",
        "DNS:a.example",
        "DNS:b.example",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "Version: 3",
    ] {
        assert!(leaf_text.contains(needle), "missing {needle}:\n{leaf_text}");
    }
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca)
        .arg(&leaf)
        .output()
        .expect("openssl verify");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
}

#[test]
fn tls_htpasswd_registry_combines_both() {
    let reg = Registry::start_with(
        RegistryOpts::default()
            .with_htpasswd("AWS", "pw")
            .with_tls(&["x.test"]),
    );
    assert!(reg.is_tls());
    assert_eq!(reg.creds_arg().as_deref(), Some("AWS:pw"));
    let target = reg.docker_ref("nope/missing:latest");
    let cd = reg.cert_dir().expect("cert dir").display().to_string();
    let out = skopeo(&["inspect", "--raw", "--cert-dir", &cd, "--no-creds", &target]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("unauthorized") || err.contains("authentication required"),
        "{err}"
    );
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        &cd,
        "--creds",
        "AWS:pw",
        &target,
    ]);
    assert!(!out.status.success());
    assert_not_found_not_tls(&stderr_of(&out));
}

fn e_machine(path: &Path) -> u16 {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    u16::from_le_bytes([bytes[18], bytes[19]])
}

#[test]
fn fixture_binaries_have_the_right_elf_machine() {
    let dist = fixtures().join("dist");
    assert_eq!(e_machine(&dist.join("amd64/hello")), 62);
    assert_eq!(e_machine(&dist.join("arm64/hello")), 183);
    assert_eq!(e_machine(&dist.join("arm/hello")), 40);
    assert_eq!(e_machine(&dist.join("amd64/hello-dynamic")), 62);
    for f in ["amd64/hello", "arm64/hello", "arm/hello"] {
        let len = fs::metadata(dist.join(f)).expect("metadata").len();
        assert!(len < 2048, "{f} is {len} bytes");
    }
    let dynamic = fs::read(dist.join("amd64/hello-dynamic")).expect("read hello-dynamic");
    let interp = b"/lib64/ld-linux-x86-64.so.2";
    assert!(
        dynamic.windows(interp.len()).any(|w| w == interp),
        "hello-dynamic has no interpreter"
    );
    for f in [
        "greeting.txt",
        "conf/app.toml",
        "conf/logging.conf",
        "conf/nested/extra.txt",
    ] {
        assert!(dist.join("share").join(f).is_file(), "missing share/{f}");
    }
}

fn run_fixture(runner: Option<&str>, arch_dir: &str, uname_m: &str) {
    let bin = fixtures().join("dist").join(arch_dir).join("hello");
    let mut cmd = match runner {
        Some(r) => {
            let mut c = Command::new(r);
            c.arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let out = run_ok(&mut cmd);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hello from imgbuild ({uname_m})\n")
    );
}

#[test]
fn amd64_fixture_runs() {
    if std::env::consts::ARCH != "x86_64" {
        return skip_missing("x86_64-host", "not an x86_64 host");
    }
    run_fixture(None, "amd64", "x86_64");
}

#[test]
fn arm64_fixture_runs_under_qemu() {
    if find_program("qemu-aarch64-static").is_none() {
        return skip_missing("qemu", "qemu-aarch64-static not installed");
    }
    run_fixture(Some("qemu-aarch64-static"), "arm64", "aarch64");
}

#[test]
fn arm_fixture_runs_under_qemu() {
    if find_program("qemu-arm-static").is_none() {
        return skip_missing("qemu", "qemu-arm-static not installed");
    }
    run_fixture(Some("qemu-arm-static"), "arm", "armv7l");
}

#[test]
fn imgbuild_command_is_hermetic() {
    let cmd = imgbuild();
    assert!(
        Path::new(cmd.get_program()).is_file(),
        "{:?}",
        cmd.get_program()
    );
    let envs: std::collections::HashMap<String, Option<String>> = cmd
        .get_envs()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.map(|v| v.to_string_lossy().into_owned()),
            )
        })
        .collect();
    let home = envs.get("HOME").cloned().flatten().expect("HOME set");
    assert!(Path::new(&home).is_dir(), "{home}");
    assert_ne!(Some(home.clone()), std::env::var("HOME").ok());
    assert_eq!(envs.get("NO_COLOR"), Some(&Some("1".to_owned())));
    assert_eq!(
        envs.get("AWS_EC2_METADATA_DISABLED"),
        Some(&Some("true".to_owned()))
    );
    for must_go in [
        "SOURCE_DATE_EPOCH",
        "DOCKER_CONFIG",
        "REGISTRY_AUTH_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ] {
        assert_eq!(envs.get(must_go), Some(&None), "{must_go} not removed");
    }
    // Whatever of these prefixes this process has is removed for the child.
    for (k, _) in std::env::vars() {
        let leaky = ["GITHUB_", "IMGBUILD_", "AWS_"]
            .iter()
            .any(|p| k.starts_with(p));
        if leaky && k != "AWS_EC2_METADATA_DISABLED" {
            assert_eq!(envs.get(&k), Some(&None), "{k} not removed");
        }
    }
}

#[test]
fn copy_dir_and_set_mtime_recursive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = tmp.path().join("share");
    copy_dir(fixtures().join("dist/share"), &dst);
    std::os::unix::fs::symlink("greeting.txt", dst.join("link")).expect("symlink");
    assert_eq!(
        fs::read(dst.join("conf/nested/extra.txt")).expect("read copy"),
        fs::read(fixtures().join("dist/share/conf/nested/extra.txt")).expect("read original")
    );
    set_mtime_recursive(&dst, 1_000_000_000);
    for p in [
        "",
        "greeting.txt",
        "conf",
        "conf/nested",
        "conf/nested/extra.txt",
        "link",
    ] {
        let md = fs::symlink_metadata(dst.join(p)).expect("metadata");
        let secs = md
            .modified()
            .expect("mtime")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs();
        assert_eq!(secs, 1_000_000_000, "{p}");
    }
}

/// Build a one-layer OCI layout by hand (system tar + gzip) and check unpack_layers and
/// tar_listing on it.
#[test]
fn unpack_layers_and_tar_listing() {
    use sha2::Digest as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("rootfs");
    fs::create_dir_all(root.join("usr/share")).expect("mkdir");
    copy_dir(fixtures().join("dist/share"), root.join("usr/share/hello"));
    set_mtime_recursive(&root, 1_700_000_000);
    let layer = tmp.path().join("layer.tar.gz");
    run_ok(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-czf",
            ])
            .arg(&layer)
            .arg("-C")
            .arg(&root)
            .arg("usr"),
    );

    let oci = tmp.path().join("oci");
    let put_blob = |bytes: &[u8]| -> String {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        let dir = oci.join("blobs/sha256");
        fs::create_dir_all(&dir).expect("mkdir blobs");
        fs::write(dir.join(&hex), bytes).expect("write blob");
        format!("sha256:{hex}")
    };
    let layer_bytes = fs::read(&layer).expect("read layer");
    let layer_digest = put_blob(&layer_bytes);
    let config_digest = put_blob(b"{}");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_bytes.len()}],
    });
    let manifest_digest = put_blob(&serde_json::to_vec(&manifest).expect("json"));

    let dest = tmp.path().join("unpacked");
    unpack_layers(&oci, &manifest_digest, &dest);
    assert_eq!(
        fs::read_to_string(dest.join("usr/share/hello/greeting.txt")).expect("read unpacked"),
        fs::read_to_string(fixtures().join("dist/share/greeting.txt")).expect("read fixture")
    );
    assert!(dest.join("usr/share/hello/conf/nested/extra.txt").is_file());

    let listing = tar_listing(&blob_path(&oci, &layer_digest));
    assert!(listing.contains("0/0"), "{listing}");
    assert!(
        listing.contains("2023-11-14 22:13 usr/share/hello/greeting.txt"),
        "{listing}"
    );
    assert!(
        listing.contains("usr/share/hello/conf/nested/extra.txt"),
        "{listing}"
    );
}

#[test]
fn docker_probe_and_free_port_do_not_hang() {
    let start = std::time::Instant::now();
    let available = docker_available();
    assert!(start.elapsed() < std::time::Duration::from_secs(15));
    eprintln!("docker available: {available}");
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free port is bindable");
    if let Some(moto) = moto_server_bin() {
        eprintln!("moto_server: {}", moto.display());
    }
}
