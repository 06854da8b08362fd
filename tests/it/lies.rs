//! Registries that do what a hostile or careless one can, end to end against the real
//! docker-registry behind the proxy (`proxy.rs`), with moto for ECR: an https registry that
//! sends us to plain http, Bearer tokens that expire while a large blob is uploading, an ECR
//! identity that may push but not describe (create-on-push through NAME_UNKNOWN), and answers
//! that lie about where an upload goes or what was stored. skopeo judges every result.

use crate::build::workspace;
use crate::ecr::{ECR_HOST, MOTO_PASSWORD, Moto, push_amd64};
use crate::harness::*;
use crate::proxy::{Proxy, ProxyOpts, Recorder};
use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one `error:` line of a failed run (and there is exactly one).
fn error_line(out: &Output) -> String {
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

/// Does skopeo find `repo:tag` on the (plain) registry?
fn skopeo_finds(reg: &Registry, reference: &str) -> bool {
    let target = reg.docker_ref(reference);
    let mut args: Vec<String> = vec!["inspect".into(), "--raw".into()];
    args.extend(reg.skopeo_args(""));
    args.push(target);
    skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .status
        .success()
}

const USER: &str = "ci-bot";
const PASS: &str = "lies-pass-5150";

/// `push_amd64` to `repo` through a TLS proxy (trusting its CA), with the Bearer
/// credentials on stdin.
fn push_through(ws: &Path, proxy: &Proxy, repo: &str, extra: &[&str]) -> Output {
    let mut cmd = push_amd64(ws, &format!("{}/{repo}", proxy.addr));
    cmd.arg("--ca-cert")
        .arg(proxy.ca_cert())
        .args(["--username", USER, "--password-stdin"])
        .args(extra);
    output_with_stdin(&mut cmd, &format!("{PASS}\n"))
}

#[test]
fn https_to_http_is_refused_for_redirects_and_upload_locations_and_no_credential_goes_over_http() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    // A base image for the build case, pushed straight to the registry.
    run_ok(push_amd64(ws.path(), &format!("{}/base", reg.addr)).args([
        "--sbom",
        "none",
        "--provenance",
        "none",
    ]));
    // 127.0.0.2 is loopback too, but plain http and another host: whatever reaches it went
    // over http.
    let plain = Recorder::start("127.0.0.2");
    let to_http = format!("http://{}", plain.addr);
    let tls = ProxyOpts {
        tls_hosts: Some(vec![]),
        bearer: Some(Some((USER.into(), PASS.into()))),
        ..ProxyOpts::default()
    };
    // (what, proxy options, fragment of the error line)
    let cases = [
        (
            "blob HEAD redirected to http",
            ProxyOpts {
                redirect_blob_head_to: Some(to_http.clone()),
                redirect_every_blob_head: true,
                ..tls.clone()
            },
            "refusing a redirect from https to plain http",
        ),
        (
            "upload Location on http",
            ProxyOpts {
                upload_location_to: Some(to_http.clone()),
                ..tls.clone()
            },
            "refusing an upload location that moves from https to plain http",
        ),
        (
            "base blob GET redirected to http",
            ProxyOpts {
                redirect_blob_get_to: Some(to_http.clone()),
                ..tls.clone()
            },
            "refusing a redirect from https to plain http",
        ),
    ];
    for (what, opts, want) in cases {
        let proxy = Proxy::start(&reg.addr, opts);
        let out = if what.starts_with("base") {
            // `build` pulls the base's config and layers with blob GETs, with the
            // credentials of an auth file (build has no --username).
            use base64::Engine as _;
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
            let auth_file = ws.path().join("auth.json");
            fs::write(
                &auth_file,
                format!(
                    "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
                    proxy.addr
                ),
            )
            .unwrap();
            let mut cmd = imgbuild();
            cmd.env("REGISTRY_AUTH_FILE", &auth_file);
            cmd.current_dir(ws.path())
                .args(["build", "-vv", "-f", "build-specs/hello.toml"])
                .args(["--platform", "linux/amd64", "--output", "out-base"])
                .arg("--base")
                .arg(format!("{}/base:v1", proxy.addr))
                .arg("--ca-cert")
                .arg(proxy.ca_cert());
            cmd.output().unwrap()
        } else {
            push_through(ws.path(), &proxy, "down", &["--retry-base-ms", "20"])
        };
        assert_eq!(out.status.code(), Some(5), "{what}: {}", text(&out.stderr));
        let line = error_line(&out);
        eprintln!("{what}: {line}");
        // The line names the plain-http URL refused.
        assert!(
            line.contains(want) && line.contains(&format!("({to_http}/v2/")),
            "{what}: {line}"
        );
        assert!(out.stdout.is_empty(), "{what}");
        // The https side did carry a credential (so the test could fail) ...
        assert!(
            proxy.seen().iter().any(|s| s
                .authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer "))),
            "{what}: no token was ever sent: {:?}",
            proxy.seen()
        );
        // ... and nothing at all, let alone an Authorization header, went over http.
        assert_eq!(plain.seen(), Vec::<Vec<(String, String)>>::new(), "{what}");
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for secret in proxy.tokens().iter().map(String::as_str).chain([PASS]) {
            assert!(!all.contains(secret), "{what}: {secret} leaked");
        }
    }
    assert!(!skopeo_finds(&reg, "down:v1"), "a refused push left a tag");
    assert!(!reg.log().contains("PUT /v2/down/manifests/"));
}

/// A registry (or a proxy) whose redirects go round in circles: the push ends at once with
/// a line that says so, not as a security refusal, and no retries (it would loop again).
#[test]
fn a_redirect_loop_ends_the_push_with_its_own_error() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            redirect_blob_head_to: Some("self".into()),
            redirect_every_blob_head: true,
            ..ProxyOpts::default()
        },
    );
    let out = push_amd64(ws.path(), &format!("{}/loop", proxy.addr))
        .args(["--retry-base-ms", "20"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let line = error_line(&out);
    assert!(
        line.contains("redirected more than 10 times (a redirect loop)")
            && line.contains(&format!("http://{}/v2/loop/blobs/sha256:", proxy.addr))
            && !line.contains("refusing"),
        "{line}"
    );
    // One HEAD and its 10 redirects per blob tried, not a retried loop.
    let heads = proxy.seen().iter().filter(|s| s.method == "HEAD").count();
    assert!((11..=11 * 8).contains(&heads), "{heads} HEADs");
    assert!(!skopeo_finds(&reg, "loop:v1"), "a failed push left a tag");
}

/// A workspace with `spec.toml`: one platform, three layers of `mib` MiB of incompressible
/// bytes each (so each upload takes as long as the proxy makes it).
fn noise_workspace(mib: usize) -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    let mut spec = String::from("platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n");
    for (i, seed) in [(0, 11u64), (1, 23), (2, 37)] {
        fs::write(
            ws.path().join(format!("noise{i}.bin")),
            noise(mib << 20, seed),
        )
        .unwrap();
        spec.push_str(&format!(
            "[[layer]]\nfiles = [{{ src = \"noise{i}.bin\", dest = \"/noise{i}.bin\" }}]\n"
        ));
    }
    fs::write(ws.path().join("spec.toml"), spec).unwrap();
    ws
}

#[test]
fn tokens_expiring_during_a_long_upload_are_renewed_once_per_expiry() {
    let reg = Registry::start();
    let ttl = Duration::from_secs(2);
    // 4 MiB per layer read in 64 KiB pieces, 50 ms apart: each upload takes over 3 s, longer
    // than a token lives. Two uploads at a time: both find the token expired at about the
    // same moment, and must share one new token.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            bearer: Some(Some((USER.into(), PASS.into()))),
            token_ttl: Some(ttl),
            throttle: Some(Duration::from_millis(50)),
            ..ProxyOpts::default()
        },
    );
    let ws = noise_workspace(4);
    let mut cmd = imgbuild();
    cmd.current_dir(ws.path())
        .args(["push", "-vv", "-f", "spec.toml", "--jobs", "2", "--repo"])
        .arg(format!("{}/expiring", proxy.addr))
        .args(["--username", USER, "--password-stdin"]);
    let started = std::time::Instant::now();
    let out = output_with_stdin(&mut cmd, &format!("{PASS}\n"));
    let took = started.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");

    let seen = proxy.seen();
    let tokens = proxy.tokens();
    // Expired tokens were presented (the test did what it says) ...
    let expired: HashSet<&str> = seen
        .iter()
        .filter(|s| s.expired)
        .filter_map(|s| s.authorization.as_deref())
        .collect();
    assert!(
        !expired.is_empty(),
        "no token expired in {took:?}: {seen:#?}"
    );
    // ... one of them during a blob upload: the PUT (or, for a layer uploaded while it was
    // compressed, a PATCH) went in with a valid token, and the next request with that token
    // found it expired.
    let put_outlived_its_token = seen.iter().enumerate().any(|(i, s)| {
        (s.method == "PUT" || s.method == "PATCH")
            && s.target.contains("/blobs/uploads/")
            && !s.expired
            && seen[i + 1..]
                .iter()
                .any(|t| t.expired && t.authorization == s.authorization)
    });
    assert!(put_outlived_its_token, "{seen:#?}");
    // One new token per expiry: the first token, plus one for each token that expired.
    assert_eq!(
        tokens.len(),
        1 + expired.len(),
        "tokens fetched: {}, expired: {expired:?}",
        tokens.len()
    );
    eprintln!(
        "token expiry: push took {:.1} s, {} tokens (ttl {} s), {} requests, {} of them with an expired token ({} distinct)",
        took.as_secs_f64(),
        tokens.len(),
        ttl.as_secs(),
        seen.len(),
        seen.iter().filter(|s| s.expired).count(),
        expired.len()
    );
    // -v says so; no token or password in any output at -vv.
    assert!(
        stderr.contains(&format!(
            "re-authenticated to {}: it refused the Bearer token",
            proxy.addr
        )),
        "{stderr}"
    );
    let all = format!("{stdout}{stderr}");
    for secret in tokens.iter().map(String::as_str).chain([PASS]) {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    assert!(!all.contains(&basic) && !all.contains("Zq8sEcReT"), "{all}");

    // The image is complete: skopeo pulls it and checks every digest.
    let digest = pushed_digest(&out.stdout);
    assert_serves(&reg, "expiring:v1", &digest);
    pull_oci(
        &reg,
        &format!("expiring@{digest}"),
        &ws.path().join("pulled"),
        "v1",
    );
}

/// A stand-in for an IAM policy that allows pushing but not `ecr:DescribeRepositories`: in
/// front of moto, it answers DescribeRepositories as AWS does for a denied action (HTTP 400,
/// `AccessDeniedException`) and forwards every other call. Records the operations it saw.
struct DenyDescribe {
    url: String,
    ops: Arc<Mutex<Vec<String>>>,
}

impl DenyDescribe {
    fn start(moto: &str) -> DenyDescribe {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = moto.trim_start_matches("http://").to_string();
        let ops = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&ops);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (upstream, log) = (upstream.clone(), Arc::clone(&log));
                std::thread::spawn(move || {
                    let _ = deny_or_forward(conn, &upstream, &log);
                });
            }
        });
        DenyDescribe { url, ops }
    }

    fn ops(&self) -> Vec<String> {
        self.ops.lock().unwrap().clone()
    }
}

fn deny_or_forward(
    mut conn: TcpStream,
    upstream: &str,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut head = Vec::new();
    let mut line = String::new();
    let (mut length, mut target) = (0usize, String::new());
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            let (n, v) = (n.trim().to_ascii_lowercase(), v.trim());
            if n == "content-length" {
                length = v.parse().unwrap_or(0);
            } else if n == "x-amz-target" {
                target = v.to_string();
            }
            if n == "connection" {
                continue;
            }
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let op = target
        .rsplit_once('.')
        .map_or(target.as_str(), |(_, op)| op);
    log.lock().unwrap().push(op.to_string());
    if op == "DescribeRepositories" {
        let body = "{\"__type\":\"AccessDeniedException\",\"message\":\"User: arn:aws:iam::123456789012:user/ci-pusher is not authorized to perform: ecr:DescribeRepositories on resource: arn:aws:ecr:us-east-1:123456789012:repository/team/pushonly because no identity-based policy allows the ecr:DescribeRepositories action\"}";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n\
             x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes())?;
        return Ok(());
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&head)?;
    up.write_all(b"Connection: close\r\n\r\n")?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    conn.write_all(&answer)?;
    Ok(())
}

#[test]
fn ecr_may_push_but_not_describe_creates_the_repository_once_on_name_unknown() {
    let moto = Moto::start();
    let deny = DenyDescribe::start(&moto.url);
    // The ECR stand-in: docker-registry with htpasswd `AWS` / moto's token, behind a TLS
    // proxy named like the ECR host that answers NAME_UNKNOWN until moto has the repository.
    let reg = Registry::start_htpasswd("AWS", MOTO_PASSWORD);
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            tls_hosts: Some(vec![ECR_HOST.into()]),
            name_unknown_until_in_moto: Some(moto.url.clone()),
            ..ProxyOpts::default()
        },
    );
    let port = proxy.addr.rsplit_once(':').unwrap().1;
    let ws = workspace(1_000_000_000);
    let push = || {
        push_amd64(ws.path(), &format!("{ECR_HOST}:{port}/team/pushonly"))
            .arg("--resolve")
            .arg(format!("{ECR_HOST}:{port}:127.0.0.1"))
            .arg("--ca-cert")
            .arg(proxy.ca_cert())
            .arg("--create-repository")
            .env("AWS_ENDPOINT_URL", &deny.url)
            .env("AWS_ACCESS_KEY_ID", "AKIAPUSHONLY00000001")
            .env("AWS_SECRET_ACCESS_KEY", "push-only-secret")
            .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            .output()
            .unwrap()
    };
    let out = push();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    // The identity was refused DescribeRepositories, the registry said NAME_UNKNOWN, and the
    // repository was created exactly once.
    let ops = deny.ops();
    let count = |op: &str| ops.iter().filter(|o| *o == op).count();
    assert_eq!(count("DescribeRepositories"), 1, "{ops:?}");
    assert_eq!(count("CreateRepository"), 1, "{ops:?}");
    let created: Vec<_> = moto
        .take_calls()
        .into_iter()
        .filter(|c| c.operation == "CreateRepository")
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(created[0].body.contains("team/pushonly"), "{created:?}");
    assert!(
        proxy.name_unknown_answers() >= 1,
        "the registry never said NAME_UNKNOWN: the test proves nothing"
    );
    assert!(
        stderr.contains("cannot check whether ECR repository team/pushonly exists"),
        "{stderr}"
    );
    assert!(
        stderr.contains("created ECR repository team/pushonly"),
        "{stderr}"
    );
    crate::ecr::assert_no_secrets(
        &out,
        &[MOTO_PASSWORD.to_string(), "push-only-secret".to_string()],
        "push-only ECR",
    );

    // skopeo pulls the image from the registry behind the proxy and checks every digest.
    let digest = pushed_digest(&out.stdout);
    assert_serves(&reg, "team/pushonly:v1", &digest);
    pull_oci(
        &reg,
        &format!("team/pushonly@{digest}"),
        &ws.path().join("pulled"),
        "v1",
    );

    // The same push again: the repository exists, nothing is created.
    let answers = proxy.name_unknown_answers();
    let again = push();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(pushed_digest(&again.stdout), digest);
    let ops = deny.ops();
    assert_eq!(
        ops.iter().filter(|o| *o == "CreateRepository").count(),
        1,
        "{ops:?}"
    );
    assert_eq!(proxy.name_unknown_answers(), answers);
}

/// What the distribution spec lets a registry do, and what it does not (spec.md, "Pushing a
/// blob monolithically" / "POST then PUT" and "Pushing Manifests"):
///
/// - The upload `Location` is opaque: it "does not necessarily need to be provided by the
///   registry itself" and clients "SHOULD NOT" assemble it. So a Location naming another
///   path (here: another repository) is not refused by its look; instead the HEAD that
///   confirms every blob in *our* repository after the PUT ("Checking if content exists")
///   finds it missing, the upload is retried, and the push fails (exit 5) with no manifest
///   and no tag.
/// - A manifest PUT "MUST return 201 Created" with a `Location`; `Docker-Content-Digest` is
///   not required there. Its absence is tolerated: we pushed by digest and know our bytes.
/// - A `Docker-Content-Digest` that is present but names other content means the registry
///   stored something else: exit 5, nothing tagged. (The same lie on the final blob PUT is
///   covered by faults.rs `a_web_page_or_a_lying_digest_is_exit_5_and_nothing_is_tagged`.)
#[test]
fn a_registry_that_lies_about_locations_or_manifest_digests() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let expected = crate::ecr::amd64_digest(ws.path());

    // Upload sessions opened in another repository.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            upload_to_repo: Some("elsewhere".into()),
            ..ProxyOpts::default()
        },
    );
    let out = push_amd64(ws.path(), &format!("{}/liar", proxy.addr))
        .args(["--retries", "2", "--retry-base-ms", "20"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let line = error_line(&out);
    assert!(
        line.contains("but does not have it (HEAD answered 404)") && line.contains("/v2/liar/"),
        "{line}"
    );
    // The lie worked on the registry (the blobs went to the other repository) ...
    assert!(
        reg.log().contains("PUT /v2/elsewhere/blobs/uploads/"),
        "{}",
        reg.log()
    );
    // ... and nothing was tagged or even stored as a manifest in ours.
    assert!(!reg.log().contains("PUT /v2/liar/manifests/"));
    assert!(!skopeo_finds(&reg, "liar:v1"));

    // Manifest answers without Docker-Content-Digest: tolerated, and the registry serves our
    // exact bytes.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            no_manifest_digest: true,
            ..ProxyOpts::default()
        },
    );
    let out = run_ok(&mut push_amd64(
        ws.path(),
        &format!("{}/tolerant", proxy.addr),
    ));
    let digest = pushed_digest(&out.stdout);
    assert_eq!(digest, expected);
    assert_serves(&reg, "tolerant:v1", &digest);
    pull_oci(
        &reg,
        &format!("tolerant@{digest}"),
        &ws.path().join("pulled"),
        "v1",
    );

    // Manifest answers naming other content: exit 5, no tag.
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            wrong_manifest_digest: true,
            ..ProxyOpts::default()
        },
    );
    let out = push_amd64(ws.path(), &format!("{}/fibber", proxy.addr))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let line = error_line(&out);
    assert!(
        line.contains(&format!(
            "answered Docker-Content-Digest sha256:{}",
            "e".repeat(64)
        )),
        "{line}"
    );
    assert!(out.stdout.is_empty());
    assert!(!skopeo_finds(&reg, "fibber:v1"));
    assert!(!reg.log().contains("PUT /v2/fibber/manifests/v1"));
}
