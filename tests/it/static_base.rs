//! The built-in base `static`: golden digest of its layer for a fixed bundle, and, under the
//! Docker Engine as uid 65532, an HTTPS client that verifies a harness registry's certificate
//! through the image's CA bundle, a write to /tmp, and `id` resolving `nonroot`.

use crate::harness::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fixed "bundle": not a real CA, only PEM-shaped bytes that never change.
const FIXED_BUNDLE: &str = "# fixed test bundle\n-----BEGIN CERTIFICATE-----\nTUlJQmltZ2J1aWxkLXRlc3Q=\n-----END CERTIFICATE-----\n";

/// The static layer's digest for [`FIXED_BUNDLE`] (gzip level 6, zlib-rs): changes only when
/// the layer's contents or the compressor change.
const GOLDEN_STATIC_LAYER: &str =
    "sha256:998070d7c5fc0d5c1ce6c1edc1ffb49ac46dc319ec0e4ade9dfa40d8fd9e7cc3";

fn spec(dir: &Path, files: &str, extra: &str) -> PathBuf {
    let path = dir.join("static.toml");
    fs::write(
        &path,
        format!(
            "platforms = [\"linux/amd64\", \"linux/arm64\"]\nbase = \"static\"\n{extra}\n[[layer]]\nfiles = [{files}]\n"
        ),
    )
    .unwrap();
    path
}

/// The digest of the first layer of each platform's manifest in the layout `dir`.
fn first_layers(dir: &Path) -> Vec<String> {
    let top = top_index(dir);
    top["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let m: serde_json::Value =
                serde_json::from_slice(&read_blob(dir, m["digest"].as_str().unwrap())).unwrap();
            m["layers"][0]["digest"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn static_layer_is_deterministic_and_golden() {
    let ws = tempfile::tempdir().unwrap();
    fs::write(ws.path().join("bundle.pem"), FIXED_BUNDLE).unwrap();
    fs::write(ws.path().join("greeting.txt"), "hi\n").unwrap();
    let spec = spec(
        ws.path(),
        r#"{ src = "greeting.txt", dest = "/etc/greeting.txt" }"#,
        "",
    );
    let mut digests = Vec::new();
    for (out, epoch) in [("a", "0"), ("b", "1700000000")] {
        run_ok(
            imgbuild()
                .current_dir(ws.path())
                .env("SOURCE_DATE_EPOCH", epoch)
                .env("IMGBUILD_STATIC_CA_BUNDLE", "bundle.pem")
                .args(["build", "-q", "--no-cache", "-f"])
                .arg(&spec)
                .args(["-o", out]),
        );
        digests.push(first_layers(&ws.path().join(out)));
    }
    // One layer for both platforms, independent of SOURCE_DATE_EPOCH, and pinned.
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0][0], digests[0][1]);
    assert_eq!(digests[0][0], GOLDEN_STATIC_LAYER);
    // What it holds, as tar lists it.
    let listing = tar_listing(&blob_path(&ws.path().join("a"), &digests[0][0]));
    for want in [
        "etc/passwd",
        "etc/group",
        "etc/nsswitch.conf",
        "etc/ssl/certs/ca-certificates.crt",
        "drwxrwxrwt 0/0",
        "drwx------ 65532/65532",
    ] {
        assert!(listing.contains(want), "{want} not in\n{listing}");
    }

    // A missing bundle: exit 3, naming the file and the flag.
    let out = imgbuild()
        .current_dir(ws.path())
        .args(["build", "-q", "--static-ca-bundle", "missing.pem", "-f"])
        .arg(&spec)
        .args(["-o", "c"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("missing.pem") && err.contains("--static-ca-bundle"),
        "{err}"
    );
}

/// A static HTTPS client (OpenSSL, linked statically): `https-get IP PORT` GETs `/v2/`,
/// verifying the server against /etc/ssl/certs/ca-certificates.crt (the file Go, curl and
/// OpenSSL-based programs read on Debian), and prints the status line.
const CLIENT_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    char addr[256];
    snprintf(addr, sizeof addr, "%s:%s", argv[1], argv[2]);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!SSL_CTX_load_verify_locations(ctx, "/etc/ssl/certs/ca-certificates.crt", NULL)) {
        ERR_print_errors_fp(stderr);
        return 3;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    BIO *bio = BIO_new_ssl_connect(ctx);
    SSL *ssl = NULL;
    BIO_get_ssl(bio, &ssl);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), argv[1]);
    BIO_set_conn_hostname(bio, addr);
    if (BIO_do_connect(bio) <= 0 || BIO_do_handshake(bio) <= 0) {
        fprintf(stderr, "handshake failed: %s\n", X509_verify_cert_error_string(SSL_get_verify_result(ssl)));
        return 1;
    }
    BIO_puts(bio, "GET /v2/ HTTP/1.0\r\nHost: registry\r\n\r\n");
    char buf[512];
    int n = BIO_read(bio, buf, sizeof buf - 1);
    if (n <= 0) return 1;
    buf[n] = 0;
    printf("%.*s\n", (int)strcspn(buf, "\r\n"), buf);
    return 0;
}
"#;

fn build_client(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("https-get.c");
    fs::write(&src, CLIENT_C).unwrap();
    let bin = dir.join("https-get");
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .args(["-lssl", "-lcrypto", "-lpthread"])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("cc: {}", text(&out.stderr));
        return None;
    }
    Some(bin)
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

#[test]
fn static_base_runs_as_nonroot_with_tls_tmp_and_users() {
    if !docker_available() {
        // Fails under CI unless IMGBUILD_TEST_ALLOW_SKIP lists docker (harness.rs).
        skip_missing("docker", "no Docker Engine answers");
        return;
    }
    let ws = tempfile::tempdir().unwrap();
    // Linked straight into the workspace as `https-get`, where the spec takes it from.
    build_client(ws.path()).expect(
        "cannot link the static OpenSSL client: run `bash scripts/install-deps.sh test` (gcc, libssl-dev)",
    );
    let busybox = dirs_busybox();
    fs::copy(&busybox, ws.path().join("busybox")).unwrap();
    let tls = Registry::start_tls(&[]);
    let reg = Registry::start();
    // The machine's bundle plus the harness registry's throwaway CA.
    let mut bundle = fs::read(static_default_bundle()).unwrap_or_default();
    bundle.extend(fs::read(tls.ca_cert().unwrap()).unwrap());
    fs::write(ws.path().join("bundle.pem"), &bundle).unwrap();
    let spec = spec(
        ws.path(),
        r#"{ src = "busybox", dest = "/bin/busybox", mode = 0o755 }, { src = "https-get", dest = "/bin/https-get", mode = 0o755 }"#,
        "[config]\nentrypoint = [\"/bin/busybox\"]\n",
    );
    let push = |bundle: &str, tag: &str| -> String {
        run_ok(
            imgbuild()
                .current_dir(ws.path())
                .env("IMGBUILD_STATIC_CA_BUNDLE", bundle)
                .args(["push", "-q", "--platform", "linux/amd64", "-f"])
                .arg(&spec)
                .args(["--repo", &format!("{}/static", reg.addr), "--tag", tag]),
        );
        let image = format!("{}/static:{tag}", reg.addr);
        let pulled = docker(&["pull", "-q", &image]);
        assert!(
            pulled.status.success(),
            "docker pull: {}",
            text(&pulled.stderr)
        );
        image
    };
    let trusting = push("bundle.pem", "trusting");
    let port = tls.port.to_string();
    // `docker run` as the image's user (65532), on the host network (the TLS registry
    // listens on 127.0.0.1), with another entrypoint when given.
    let run = |image: &str, entrypoint: Option<&str>, args: &[&str]| {
        let mut all = vec!["run", "--rm", "--network", "host"];
        if let Some(e) = entrypoint {
            all.extend(["--entrypoint", e]);
        }
        all.push(image);
        all.extend_from_slice(args);
        docker(&all)
    };

    // HTTPS: the registry's certificate verifies through the image's bundle, as uid 65532.
    let out = run(&trusting, Some("/bin/https-get"), &["127.0.0.1", &port]);
    assert!(
        out.status.success(),
        "https-get: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).starts_with("HTTP/1.0 200")
            || text(&out.stdout).starts_with("HTTP/1.1 200"),
        "{}",
        text(&out.stdout)
    );

    // `id` resolves the user name; /tmp is writable by it.
    let out = run(&trusting, None, &["id"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "uid=65532(nonroot) gid=65532(nonroot) groups=65532(nonroot)",
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &trusting,
        None,
        &[
            "sh",
            "-c",
            "echo written > /tmp/f && cat /tmp/f && ls -ld /tmp",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("written\ndrwxrwxrwt"), "{stdout}");

    // Without the throwaway CA in the bundle, the same client refuses the certificate:
    // the verification above really used the image's bundle.
    let plain = ws.path().join("plain.pem");
    fs::write(
        &plain,
        fs::read(static_default_bundle()).unwrap_or_else(|_| {
            b"-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n".to_vec()
        }),
    )
    .unwrap();
    let untrusting = push("plain.pem", "untrusting");
    let out = run(&untrusting, Some("/bin/https-get"), &["127.0.0.1", &port]);
    assert!(
        !out.status.success(),
        "verified without the CA: {}",
        text(&out.stdout)
    );
    for image in [&trusting, &untrusting] {
        let _ = docker(&["rmi", "-f", image]);
    }
}

fn static_default_bundle() -> &'static str {
    "/etc/ssl/certs/ca-certificates.crt"
}

/// Debian's busybox-static (amd64), cached by scripts/install-deps.sh.
fn dirs_busybox() -> PathBuf {
    let dir = std::env::var_os("IMGBUILD_TEST_BUSYBOX").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/imgbuild-test/busybox")
        },
        PathBuf::from,
    );
    let path = dir.join("amd64/busybox");
    assert!(
        path.is_file(),
        "{} missing: run `bash scripts/install-deps.sh test`",
        path.display()
    );
    path
}
