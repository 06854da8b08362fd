//! Hostile or broken registries and layouts as base images: a small std HTTP server in the
//! test poses as a registry and misbehaves one way per case (a blob that never ends, answers
//! that stall before or after their headers, an endless token answer, platform strings with
//! newlines and escapes, a config the image spec does not allow); hand-made `oci:` layouts
//! hold a FIFO, a link to `/dev/zero` or an oversized `index.json`. Each run must end, under
//! a time limit, with one short error line and the documented exit code, and leave no
//! temporary file behind.

use crate::harness::*;
use serde_json::{Value, json};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the fake registry does for one request.
#[derive(Clone)]
enum Answer {
    /// 200 with this content type and body.
    Body(&'static str, Vec<u8>),
    /// 200 without a length, then bytes until the client goes away.
    Endless,
    /// Say nothing for this long, then close.
    StallBeforeHeaders(Duration),
    /// Headers announcing `len` bytes and a few of them, then nothing for this long.
    StallAfterHeaders(u64, Duration),
    /// 401 with this `WWW-Authenticate`.
    Challenge(String),
    NotFound,
}

type Route = Arc<dyn Fn(&str, &str) -> Answer + Send + Sync>;

/// A fake registry on 127.0.0.1; `sent` counts the body bytes it wrote.
struct Fake {
    addr: String,
    sent: Arc<AtomicU64>,
}

impl Fake {
    fn start(route: impl Fn(&str, &str) -> Answer + Send + Sync + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let route: Route = Arc::new(route);
        let counter = Arc::clone(&sent);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let route = Arc::clone(&route);
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || serve(conn, &route, &counter));
            }
        });
        Fake { addr, sent }
    }
}

fn serve(mut conn: TcpStream, route: &Route, sent: &AtomicU64) {
    // A TLS ClientHello (imgbuild tries https first on loopback): close, it falls back.
    let mut first = [0u8; 1];
    if conn.peek(&mut first).is_err() || first[0] == 0x16 {
        return;
    }
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
    }
    let head = |status: &str, extra: &str| {
        format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nDocker-Distribution-API-Version: registry/2.0\r\n{extra}\r\n"
        )
    };
    match route(&method, &path) {
        Answer::Body(ct, body) => {
            let _ = conn.write_all(
                head(
                    "200 OK",
                    &format!("Content-Type: {ct}\r\nContent-Length: {}\r\n", body.len()),
                )
                .as_bytes(),
            );
            if method != "HEAD" {
                let _ = conn.write_all(&body);
            }
        }
        Answer::Endless => {
            let _ = conn
                .write_all(head("200 OK", "Content-Type: application/octet-stream\r\n").as_bytes());
            let chunk = vec![b'z'; 64 * 1024];
            while conn.write_all(&chunk).is_ok() {
                sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        }
        Answer::StallBeforeHeaders(d) => std::thread::sleep(d),
        Answer::StallAfterHeaders(len, d) => {
            let _ = conn.write_all(
                head(
                    "200 OK",
                    &format!("Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n"),
                )
                .as_bytes(),
            );
            let _ = conn.write_all(b"{\"a");
            let _ = conn.flush();
            std::thread::sleep(d);
        }
        Answer::Challenge(c) => {
            let _ = conn.write_all(
                head(
                    "401 Unauthorized",
                    &format!("WWW-Authenticate: {c}\r\nContent-Length: 0\r\n"),
                )
                .as_bytes(),
            );
        }
        Answer::NotFound => {
            let _ = conn.write_all(head("404 Not Found", "Content-Length: 0\r\n").as_bytes());
        }
    }
}

fn sha(bytes: &[u8]) -> String {
    imgbuild::digest::Digest::of(bytes).to_string()
}

/// A one-layer linux/amd64 base: (config, layer, manifest) bytes. `layer_size` is what the
/// manifest claims.
fn base_image(config: &Value, layer: &[u8], layer_size: u64) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(config).unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(layer), "size": layer_size}],
    });
    (config, serde_json::to_vec(&manifest).unwrap())
}

fn good_config(layer_diff: &str) -> Value {
    json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_diff]},
    })
}

/// A registry serving one base `base:v1` made of `manifest` and `config`, with `blob`
/// deciding what the config and layer GETs get (None: the config as it is).
fn registry_with(
    manifest: Vec<u8>,
    config: Vec<u8>,
    blob: impl Fn(bool) -> Option<Answer> + Send + Sync + 'static,
) -> Fake {
    registry_serving(manifest, config, Vec::new(), blob)
}

/// [`registry_with`], serving `layer` for any blob that is not the config.
fn registry_serving(
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer: Vec<u8>,
    blob: impl Fn(bool) -> Option<Answer> + Send + Sync + 'static,
) -> Fake {
    let config_digest = sha(&config);
    Fake::start(move |_, path| {
        if path == "/v2/" {
            return Answer::Body("application/json", b"{}".to_vec());
        }
        if path.ends_with("/manifests/v1") {
            return Answer::Body(
                "application/vnd.oci.image.manifest.v1+json",
                manifest.clone(),
            );
        }
        if let Some(d) = path.split("/blobs/").nth(1) {
            let is_config = d == config_digest;
            return blob(is_config).unwrap_or_else(|| {
                let body = if is_config { &config } else { &layer };
                Answer::Body("application/octet-stream", body.clone())
            });
        }
        Answer::NotFound
    })
}

/// A workspace with one small file and a spec for it.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    fs::write(ws.path().join("a.txt"), "a\n").unwrap();
    fs::write(
        ws.path().join("spec.toml"),
        "platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n[[layer]]\nfiles = [{ src = \"a.txt\", dest = \"/a.txt\" }]\n",
    )
    .unwrap();
    ws
}

/// `imgbuild build --base BASE` with short timeouts, under a time limit; its cache in `ws`.
fn build(ws: &Path, base: &str, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = imgbuild()
        .current_dir(ws)
        .env("IMGBUILD_CACHE", ws.join("cache"))
        .args(["build", "-f", "spec.toml", "-o", "out", "--base", base])
        .args(["--timeout", "2", "--retries", "1", "--retry-base-ms", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "build --base {base} still running after {limit:?} (a hang): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), start.elapsed())
}

/// The one error line, checked: the exit code, one line, short, no control characters.
fn error_line(out: &Output, code: i32, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{what}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{what}: {err}");
    let line = lines[0];
    assert!(
        line.len() < 2000,
        "{what}: a {} byte error line",
        line.len()
    );
    assert!(
        !line.chars().any(|c| c.is_control()),
        "{what}: control characters in {line:?}"
    );
    line.to_string()
}

/// No temporary file anywhere under `dir`.
fn assert_no_temporaries(dir: &Path, what: &str) {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".tmp"),
                "{what}: {} left",
                e.path().display()
            );
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            }
        }
    }
}

#[test]
fn a_hostile_registry_base_ends_the_build_with_one_clean_line() {
    let layer = vec![b'l'; 114];
    let diff = format!("sha256:{}", "0".repeat(64));
    type Case = (&'static str, fn(bool) -> Option<Answer>, i32, &'static str);
    let cases: &[Case] = &[
        (
            "a layer blob that never ends",
            |config| (!config).then_some(Answer::Endless),
            5,
            "longer than the 114 bytes",
        ),
        (
            "a config blob that stalls before its headers",
            |config| config.then_some(Answer::StallBeforeHeaders(Duration::from_secs(60))),
            5,
            "no progress",
        ),
        (
            "a config blob that stalls after its headers",
            |config| config.then_some(Answer::StallAfterHeaders(100, Duration::from_secs(60))),
            5,
            "no progress",
        ),
        (
            "a layer blob that never sends headers",
            |config| (!config).then_some(Answer::StallBeforeHeaders(Duration::from_secs(60))),
            5,
            "no progress",
        ),
    ];
    for (what, blob, code, want) in cases {
        let (config, manifest) = base_image(&good_config(&diff), &layer, 114);
        let fake = registry_with(manifest, config, *blob);
        let ws = workspace();
        let (out, took) = build(
            ws.path(),
            &format!("{}/base:v1", fake.addr),
            Duration::from_secs(60),
        );
        let line = error_line(&out, *code, what);
        assert!(line.contains(want), "{what}: {line}");
        // --timeout 2 with one retry: a stall costs seconds, not minutes.
        assert!(took < Duration::from_secs(30), "{what}: took {took:?}");
        assert!(
            fake.sent.load(Ordering::SeqCst) < 64 << 20,
            "{what}: {} bytes were taken in",
            fake.sent.load(Ordering::SeqCst)
        );
        assert_no_temporaries(ws.path(), what);
        assert!(!ws.path().join("out/index.json").exists(), "{what}");
    }
}

#[test]
fn an_endless_token_answer_is_capped() {
    let fake_addr = Arc::new(std::sync::OnceLock::<String>::new());
    let own = Arc::clone(&fake_addr);
    let fake = Fake::start(move |_, path| {
        if path.starts_with("/token") {
            Answer::Endless
        } else {
            let realm = format!("http://{}/token", own.get().unwrap());
            Answer::Challenge(format!("Bearer realm=\"{realm}\",service=\"fake\""))
        }
    });
    fake_addr.set(fake.addr.clone()).unwrap();
    let ws = workspace();
    let (out, _) = build(
        ws.path(),
        &format!("{}/base:v1", fake.addr),
        Duration::from_secs(60),
    );
    let line = error_line(&out, 5, "endless token");
    assert!(line.contains("over 4194304 bytes"), "{line}");
    assert!(fake.sent.load(Ordering::SeqCst) < 64 << 20);
}

#[test]
fn server_text_in_errors_is_escaped_and_shortened() {
    // 5,000 platforms whose names carry newlines and ANSI escapes, none of them linux/amd64.
    let entries: Vec<Value> = (0..5000)
        .map(|i| {
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{:064x}", i),
                "size": 10,
                "platform": {"os": "linux\n\u{1b}[31mforged: line", "architecture": format!("arch{i}")},
            })
        })
        .collect();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .unwrap();
    let fake = Fake::start(move |_, path| {
        if path == "/v2/" {
            Answer::Body("application/json", b"{}".to_vec())
        } else if path.ends_with("/manifests/v1") {
            Answer::Body("application/vnd.oci.image.index.v1+json", index.clone())
        } else {
            Answer::NotFound
        }
    });
    let ws = workspace();
    let (out, _) = build(
        ws.path(),
        &format!("{}/base:v1", fake.addr),
        Duration::from_secs(60),
    );
    let line = error_line(&out, 3, "5,000 platforms");
    assert!(line.contains("has no linux/amd64 image"), "{line}");
    assert!(line.contains("\\n\\u{1b}[31mforged"), "{line}");
    assert!(line.contains("and 4980 more"), "{line}");
}

#[test]
fn a_base_config_the_spec_does_not_allow_is_refused() {
    let layer = vec![b'l'; 10];
    let diff = format!("sha256:{}", "0".repeat(64));
    let cases: &[(&str, Value, &str)] = &[
        (
            "/history",
            json!([{"created": "last tuesday"}]),
            "history[0].created",
        ),
        ("/config/Cmd", json!("sh -c true"), "config.Cmd"),
        (
            "/config",
            json!(["not", "an", "object"]),
            "config: an array",
        ),
    ];
    for (pointer, value, want) in cases {
        let mut config = good_config(&diff);
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        config.pointer_mut(parent).unwrap()[key] = value.clone();
        let (config, manifest) = base_image(&config, &layer, 10);
        let fake = registry_with(manifest, config, |_| None);
        let ws = workspace();
        let (out, _) = build(
            ws.path(),
            &format!("{}/base:v1", fake.addr),
            Duration::from_secs(60),
        );
        let line = error_line(&out, 3, pointer);
        assert!(
            line.contains(want) && line.contains("image spec"),
            "{pointer}: {line}"
        );
    }
}

/// A hand-made layout in `dir` holding one image (config, one layer, manifest) tagged v1.
fn layout(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let diff = format!("sha256:{}", "0".repeat(64));
    let (config, manifest) = base_image(&good_config(&diff), layer, layer.len() as u64);
    for b in [&config, &manifest, &layer.to_vec()] {
        fs::write(blobs.join(&sha(b)[7..]), b).unwrap();
    }
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(&manifest), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
    }]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn layouts_with_fifos_devices_or_huge_files_are_refused() {
    let layer = vec![b'l'; 10];
    let cases: &[(&str, &str)] = &[
        ("index.json is a FIFO", "not a regular file"),
        ("the layer blob links to /dev/zero", "not a regular file"),
        ("the layer blob is a FIFO", "not a regular file"),
        ("index.json is 5 MiB", "over 4194304 bytes"),
    ];
    for (what, want) in cases {
        let ws = workspace();
        let dir = ws.path().join("base");
        layout(&dir, &layer);
        let layer_blob = dir.join("blobs/sha256").join(&sha(&layer)[7..]);
        let mkfifo = |p: &Path| {
            fs::remove_file(p).unwrap();
            assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
        };
        match *what {
            "index.json is a FIFO" => mkfifo(&dir.join("index.json")),
            "the layer blob links to /dev/zero" => {
                fs::remove_file(&layer_blob).unwrap();
                std::os::unix::fs::symlink("/dev/zero", &layer_blob).unwrap();
            }
            "the layer blob is a FIFO" => mkfifo(&layer_blob),
            _ => {
                let mut big = vec![b' '; 5 << 20];
                big.extend_from_slice(b"{}");
                fs::write(dir.join("index.json"), big).unwrap();
            }
        }
        let base = format!("oci:{}:v1", dir.display());
        let (out, _) = build(ws.path(), &base, Duration::from_secs(60));
        let line = error_line(&out, 3, what);
        assert!(line.contains(want), "{what}: {line}");
        assert_no_temporaries(&ws.path().join("out"), what);
    }
}

#[test]
fn base_layer_urls_and_annotations_are_kept_exactly() {
    let layer = b"not really a tar, the digest is what counts".to_vec();
    let diff = format!("sha256:{}", "0".repeat(64));
    let (config, manifest) = base_image(&good_config(&diff), &layer, layer.len() as u64);
    let mut doc: Value = serde_json::from_slice(&manifest).unwrap();
    let annotations = json!({"org.example.z": "last", "org.example.a": "first \"quoted\""});
    let urls = json!(["https://mirror.example/blob", "https://other.example/b"]);
    doc["layers"][0]["annotations"] = annotations.clone();
    doc["layers"][0]["urls"] = urls.clone();
    let manifest = serde_json::to_vec(&doc).unwrap();
    let fake = registry_serving(manifest, config, layer, |_| None);
    let ws = workspace();
    let (out, _) = build(
        ws.path(),
        &format!("{}/base:v1", fake.addr),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = ws.path().join("out");
    let index: Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let top: Value = serde_json::from_slice(&read_blob(
        &dir,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let ours: Value = serde_json::from_slice(&read_blob(
        &dir,
        top["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(ours["layers"][0]["annotations"], annotations);
    assert_eq!(ours["layers"][0]["urls"], urls);
    // Our own layer has neither.
    assert!(
        ours["layers"][1].get("annotations").is_none() && ours["layers"][1].get("urls").is_none()
    );
}
