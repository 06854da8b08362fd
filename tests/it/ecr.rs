//! Amazon ECR with real parts (README "Amazon ECR"): moto_server answers STS and ECR on loopback (its
//! request recorder tells us which calls were made and with which key), and Debian's
//! docker-registry stands in for the ECR registry: TLS for the ECR host name (throwaway CA),
//! htpasswd user `AWS` with moto's token password, reached with `--resolve` and `--ca-cert`.
//!
//! Container credentials (ECS task roles, EKS Pod Identity) come from a loopback endpoint
//! speaking the agents' small JSON protocol, since neither agent runs here.
//!
//! Every imgbuild run here has AWS_EC2_METADATA_DISABLED=true (from the harness), the
//! container-credential variables cleared, and AWS_ENDPOINT_URL at a loopback port.

use crate::build::workspace;
use crate::harness::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const ECR_HOST: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
/// What moto 5's GetAuthorizationToken decodes to: `AWS:<account>-auth-token` (TESTBED.md).
pub const MOTO_PASSWORD: &str = "123456789012-auth-token";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running `moto_server` on a free loopback port with its request recorder on; killed on drop.
pub struct Moto {
    pub url: String,
    recording: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = moto_server_bin().unwrap_or_else(|| {
            panic!("moto_server not installed: run scripts/install-deps.sh test")
        });
        let dir = tempfile::tempdir().expect("moto dir");
        let recording = dir.path().join("recording.jsonl");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_ENABLE_RECORDING", "True")
                .env("MOTO_RECORDER_FILEPATH", &recording)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto_server");
            let addr = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken, or broken: try another port
                }
                if matches!(http_get(&addr, "/moto-api/", None), Ok((200, _))) {
                    let _ = fs::remove_file(&recording); // our readiness probe
                    return Moto {
                        url: format!("http://{addr}"),
                        recording,
                        child,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start");
    }

    /// Every AWS request moto received since the last [`Moto::take_calls`].
    pub fn take_calls(&self) -> Vec<Call> {
        let raw = fs::read_to_string(&self.recording).unwrap_or_default();
        let _ = fs::remove_file(&self.recording);
        raw.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("recording line");
                let header = |name: &str| {
                    v["headers"]
                        .as_object()
                        .and_then(|h| {
                            h.iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                                .and_then(|(_, v)| v.as_str())
                        })
                        .unwrap_or_default()
                        .to_string()
                };
                let body = v["body"].as_str().unwrap_or_default();
                let body = if v["body_encoded"] == true {
                    use base64::Engine as _;
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(body)
                        .expect("recorded body is base64");
                    text(&raw)
                } else {
                    body.to_string()
                };
                // ECR is JSON 1.1 (X-Amz-Target), STS is the query protocol (Action=...).
                let target = header("X-Amz-Target");
                let operation = match target.rsplit_once('.') {
                    Some((_, op)) => op.to_string(),
                    None => body
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("Action="))
                        .unwrap_or_default()
                        .to_string(),
                };
                Call {
                    operation,
                    authorization: header("Authorization"),
                    security_token: header("X-Amz-Security-Token"),
                    body,
                }
            })
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One recorded AWS request.
#[derive(Debug, Clone)]
pub struct Call {
    pub operation: String,
    /// The SigV4 `Authorization` header (names the access key and the region).
    pub authorization: String,
    pub security_token: String,
    pub body: String,
}

impl Call {
    fn signed_with(&self, access_key: &str) -> bool {
        self.authorization
            .contains(&format!("Credential={access_key}/"))
    }
}

fn ops(calls: &[Call]) -> Vec<&str> {
    calls.iter().map(|c| c.operation.as_str()).collect()
}

/// The ECR stand-in: TLS for [`ECR_HOST`], htpasswd `AWS` / `password`.
pub fn ecr_registry(password: &str) -> Registry {
    Registry::start_with(
        RegistryOpts::default()
            .with_tls(&[ECR_HOST])
            .with_htpasswd("AWS", password),
    )
}

/// `imgbuild push -vv` of the amd64 image of `build-specs/hello.toml` in `ws` to `repo`
/// (`REGISTRY/PATH`), tag `v1`.
pub fn push_amd64(ws: &Path, repo: &str) -> Command {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .args(["push", "-vv", "-f", "build-specs/hello.toml"])
        .args(["--platform", "linux/amd64", "--tag", "v1", "--repo", repo]);
    cmd
}

/// [`push_amd64`] to `ECR_HOST:PORT/<path>` of the ECR stand-in `reg`, reached through
/// `--resolve` and trusted through `--ca-cert`.
pub fn push_to_ecr_stand_in(ws: &Path, reg: &Registry, path: &str) -> Command {
    let mut cmd = push_amd64(ws, &format!("{ECR_HOST}:{}/{path}", reg.port));
    cmd.arg("--resolve")
        .arg(format!("{ECR_HOST}:{}:127.0.0.1", reg.port))
        .arg("--ca-cert")
        .arg(reg.ca_cert().expect("TLS registry"))
        .env_remove("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .env_remove("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI");
    cmd
}

/// The index digest [`push_amd64`] must give: `imgbuild build` of the same spec and platform.
pub fn amd64_digest(ws: &Path) -> String {
    let out = run_ok(imgbuild().current_dir(ws).args([
        "build",
        "-q",
        "-f",
        "build-specs/hello.toml",
        "--platform",
        "linux/amd64",
        "--output",
        "out-amd64-expected",
    ]));
    let digest = text(&out.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    digest
}

/// [`push_to_ecr_stand_in`] with AWS pointed at `aws_endpoint` and the given extra
/// environment and flags.
fn ecr_push(
    ws: &Path,
    reg: &Registry,
    repo: &str,
    aws_endpoint: &str,
    env: &[(&str, String)],
    extra: &[&str],
) -> Output {
    let mut cmd = push_to_ecr_stand_in(ws, reg, repo);
    cmd.args(extra).env("AWS_ENDPOINT_URL", aws_endpoint);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run imgbuild")
}

/// Assert that none of `secrets` (nor their base64 forms, nor any Authorization value) shows
/// up in the run's stdout or stderr.
pub fn assert_no_secrets(out: &Output, secrets: &[String], what: &str) {
    use base64::Engine as _;
    let all = format!("{}\n{}", text(&out.stdout), text(&out.stderr));
    for s in secrets.iter().filter(|s| s.len() >= 6) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{s}"));
        for needle in [s.as_str(), b64.as_str()] {
            assert!(!all.contains(needle), "{what}: a secret leaked:\n{all}");
        }
    }
    for needle in [
        "Basic ",
        "Bearer ",
        "authorization:",
        "Authorization:",
        "X-Amz-Security-Token",
    ] {
        assert!(
            !all.contains(needle),
            "{what}: {needle:?} in output:\n{all}"
        );
    }
}

const CONTAINER_KEY: &str = "ASIACONTAINER0000006";
const CONTAINER_SECRET: &str = "container-secret-access-key-6";
const CONTAINER_TOKEN: &str = "container-session-token-6";
const CONTAINER_AUTHORIZATION: &str = "pod-identity-authorization-6";

/// The container credentials endpoint an ECS agent or the EKS Pod Identity agent serves
/// (`GET` with the `Authorization` token, JSON answer), on loopback: neither agent runs here.
/// It answers only requests carrying [`CONTAINER_AUTHORIZATION`], as the real agents do.
struct ContainerCredentials {
    url: String,
}

impl ContainerCredentials {
    fn start() -> ContainerCredentials {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/credentials", listener.local_addr().unwrap());
        // Serves until the test process ends.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut authorized = false;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    let l = line.to_ascii_lowercase();
                    authorized |= l.starts_with("authorization:")
                        && line.trim_end().ends_with(CONTAINER_AUTHORIZATION);
                    line.clear();
                }
                let (status, body) = if authorized {
                    let body = serde_json::json!({
                        "AccessKeyId": CONTAINER_KEY,
                        "SecretAccessKey": CONTAINER_SECRET,
                        "Token": CONTAINER_TOKEN,
                        "Expiration": "2099-01-01T00:00:00Z",
                    });
                    ("200 OK", body.to_string())
                } else {
                    ("401 Unauthorized", "{}".to_string())
                };
                let _ = write!(
                    &stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        ContainerCredentials { url }
    }
}

/// One way to give imgbuild AWS credentials.
struct Source {
    name: &'static str,
    /// Environment for the run; `{dir}` in values is the case's temp dir.
    env: Vec<(&'static str, String)>,
    flags: Vec<&'static str>,
    /// Files to write into the case's temp dir (name, contents).
    files: Vec<(&'static str, &'static str)>,
    /// The STS operations expected before GetAuthorizationToken, in order.
    sts: Vec<&'static str>,
    /// A role ARN that must appear in an STS call.
    role: Option<&'static str>,
    /// The access key that must sign the first call (the chain's base credentials).
    base_key: Option<&'static str>,
}

#[test]
fn ecr_push_with_each_aws_credential_source() {
    let moto = Moto::start();
    let reg = ecr_registry(MOTO_PASSWORD);
    let ws = workspace(1_000_000_000);
    let container = ContainerCredentials::start();
    let expected = amd64_digest(ws.path());
    let key = |k: &str| k.to_string();
    let cases = [
        Source {
            name: "static env keys",
            env: vec![
                ("AWS_ACCESS_KEY_ID", key("AKIAENVKEY0000000001")),
                ("AWS_SECRET_ACCESS_KEY", key("env-secret-key-value-1")),
            ],
            flags: vec![],
            files: vec![],
            sts: vec![],
            role: None,
            base_key: Some("AKIAENVKEY0000000001"),
        },
        Source {
            name: "profile with role_arn + source_profile",
            env: vec![
                ("AWS_CONFIG_FILE", key("{dir}/config")),
                ("AWS_SHARED_CREDENTIALS_FILE", key("{dir}/credentials")),
                ("AWS_PROFILE", key("pusher")),
            ],
            flags: vec![],
            files: vec![
                (
                    "config",
                    "[profile pusher]\nrole_arn = arn:aws:iam::123456789012:role/profile-pusher\nsource_profile = base\nregion = eu-west-1\n",
                ),
                (
                    "credentials",
                    "[base]\naws_access_key_id = AKIAPROFILEBASE00002\naws_secret_access_key = profile-secret-key-2\n",
                ),
            ],
            sts: vec!["AssumeRole"],
            role: Some("arn:aws:iam::123456789012:role/profile-pusher"),
            base_key: Some("AKIAPROFILEBASE00002"),
        },
        Source {
            name: "web identity (IRSA / GitHub OIDC)",
            env: vec![
                (
                    "AWS_ROLE_ARN",
                    key("arn:aws:iam::123456789012:role/irsa-pusher"),
                ),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", key("{dir}/token")),
                ("AWS_ROLE_SESSION_NAME", key("ci-run")),
            ],
            flags: vec![],
            files: vec![(
                "token",
                "eyJhbGciOiJSUzI1NiJ9.web-identity-jwt-body.signature-part",
            )],
            sts: vec!["AssumeRoleWithWebIdentity"],
            role: Some("arn:aws:iam::123456789012:role/irsa-pusher"),
            base_key: None,
        },
        Source {
            name: "env keys + --aws-role-arn",
            env: vec![
                ("AWS_ACCESS_KEY_ID", key("AKIAENVKEY0000000004")),
                ("AWS_SECRET_ACCESS_KEY", key("env-secret-key-value-4")),
                ("AWS_SESSION_TOKEN", key("env-session-token-value-4")),
            ],
            flags: vec!["--aws-role-arn", "arn:aws:iam::123456789012:role/on-top"],
            files: vec![],
            sts: vec!["AssumeRole"],
            role: Some("arn:aws:iam::123456789012:role/on-top"),
            base_key: Some("AKIAENVKEY0000000004"),
        },
        Source {
            name: "web identity + IMGBUILD_AWS_ROLE_ARN",
            env: vec![
                (
                    "AWS_ROLE_ARN",
                    key("arn:aws:iam::123456789012:role/oidc-base"),
                ),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", key("{dir}/token")),
                (
                    "IMGBUILD_AWS_ROLE_ARN",
                    key("arn:aws:iam::123456789012:role/cross-account"),
                ),
            ],
            flags: vec![],
            files: vec![(
                "token",
                "eyJhbGciOiJSUzI1NiJ9.second-jwt-body.signature-part",
            )],
            sts: vec!["AssumeRoleWithWebIdentity", "AssumeRole"],
            role: Some("arn:aws:iam::123456789012:role/cross-account"),
            base_key: None,
        },
        Source {
            name: "container credentials (ECS task role, EKS Pod Identity)",
            env: vec![
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", key("{container}")),
                (
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                    key(CONTAINER_AUTHORIZATION),
                ),
            ],
            flags: vec![],
            files: vec![],
            sts: vec![],
            role: None,
            base_key: Some(CONTAINER_KEY),
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        for (name, contents) in &case.files {
            fs::write(dir.path().join(name), contents).unwrap();
        }
        let mut env: Vec<(&str, String)> = case
            .env
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    v.replace("{dir}", &d)
                        .replace("{container}", &container.url),
                )
            })
            .collect();
        // The region must come from the registry's host name, not from here.
        env.push(("AWS_REGION", "eu-west-1".into()));
        let repo = format!("src{i}");
        let started = Instant::now();
        let out = ecr_push(ws.path(), &reg, &repo, &moto.url, &env, &case.flags);
        let what = case.name;
        assert!(
            out.status.success(),
            "{what}: push failed ({:?}):\n{}",
            out.status,
            text(&out.stderr)
        );
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: slow");
        let line = text(&out.stdout);
        assert!(
            line.trim()
                .starts_with(&format!("{ECR_HOST}:{}/{repo}@sha256:", reg.port)),
            "{what}: {line}"
        );
        // The image is there (skopeo, by IP: the certificate names 127.0.0.1 too).
        assert_eq!(pushed_digest(&out.stdout), expected, "{what}");
        assert_serves(&reg, &format!("{repo}:v1"), &expected);

        // What AWS saw: the STS calls of this source, then exactly one
        // GetAuthorizationToken, signed for us-east-1 (the host's region), and no
        // repository calls (no --create-repository).
        let calls = moto.take_calls();
        let mut want = case.sts.clone();
        want.push("GetAuthorizationToken");
        assert_eq!(ops(&calls), want, "{what}: {calls:#?}");
        let gat = calls.last().unwrap();
        assert!(
            gat.authorization.contains("/us-east-1/ecr/aws4_request"),
            "{what}: {}",
            gat.authorization
        );
        if let Some(role) = case.role {
            let encoded = role.replace(':', "%3A").replace('/', "%2F");
            assert!(
                calls.iter().any(|c| c.body.contains(&encoded)),
                "{what}: no STS call for {role}: {calls:#?}"
            );
        }
        if case.flags.contains(&"--aws-role-arn")
            || env.iter().any(|(k, _)| *k == "IMGBUILD_AWS_ROLE_ARN")
        {
            let assume = calls.iter().find(|c| c.operation == "AssumeRole").unwrap();
            assert!(
                assume.body.contains("RoleSessionName=imgbuild-"),
                "{what}: {}",
                assume.body
            );
        }
        if let Some(k) = case.base_key {
            assert!(
                calls[0].signed_with(k),
                "{what}: {:?}",
                calls[0].authorization
            );
        }
        if case.base_key == Some(CONTAINER_KEY) {
            assert_eq!(gat.security_token, CONTAINER_TOKEN, "{what}");
        }
        if !case.sts.is_empty() {
            // The token was fetched with the role's credentials, not the base ones.
            assert!(
                !case.base_key.is_some_and(|k| gat.signed_with(k)),
                "{what}: GetAuthorizationToken not signed with the assumed role"
            );
            assert!(!gat.security_token.is_empty(), "{what}");
        }

        // Nothing secret in the -vv output: the registry password, every AWS secret key,
        // session token and web identity token of this case, and the session tokens moto
        // handed out.
        let mut secrets: Vec<String> = vec![MOTO_PASSWORD.to_string()];
        secrets.extend(
            env.iter()
                .filter(|(k, _)| k.contains("SECRET") || k.contains("SESSION_TOKEN"))
                .map(|(_, v)| v.clone()),
        );
        secrets.extend(
            case.files
                .iter()
                .filter(|(n, _)| *n == "token")
                .map(|(_, c)| c.to_string()),
        );
        secrets.extend(calls.iter().map(|c| c.security_token.clone()));
        secrets.extend([CONTAINER_SECRET.into(), CONTAINER_TOKEN.into()]);
        assert_no_secrets(&out, &secrets, what);
    }
}

#[test]
fn ecr_create_repository_creates_a_missing_repository_once() {
    let moto = Moto::start();
    let reg = ecr_registry(MOTO_PASSWORD);
    let ws = workspace(1_000_000_000);
    let env = vec![
        ("AWS_ACCESS_KEY_ID", "AKIACREATE0000000001".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "create-secret".to_string()),
    ];
    let flags = [
        "--create-repository",
        "--ecr-scan-on-push",
        "--ecr-immutable-tags",
    ];
    let out = ecr_push(ws.path(), &reg, "team/new-app", &moto.url, &env, &flags);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        ops(&moto.take_calls()),
        [
            "DescribeRepositories",
            "CreateRepository",
            "GetAuthorizationToken"
        ]
    );

    // An independent client (boto3 from moto's venv) sees the repository, with the options.
    let described = describe_repositories(&moto);
    let repo = described["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repositoryName"] == "team/new-app")
        .unwrap_or_else(|| panic!("not created: {described}"));
    assert_eq!(repo["imageTagMutability"], "IMMUTABLE", "{repo}");
    assert_eq!(
        repo["imageScanningConfiguration"]["scanOnPush"], true,
        "{repo}"
    );
    assert_eq!(repo["registryId"], "123456789012", "{repo}");

    moto.take_calls(); // boto3's own call

    // Second push: the repository exists, nothing is created.
    let out = ecr_push(ws.path(), &reg, "team/new-app", &moto.url, &env, &flags);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        ops(&moto.take_calls()),
        ["DescribeRepositories", "GetAuthorizationToken"]
    );
}

/// `ecr.describe_repositories()` through boto3 (moto's venv has it), as JSON.
fn describe_repositories(moto: &Moto) -> serde_json::Value {
    let moto_bin = moto_server_bin().unwrap();
    let python = moto_bin.parent().unwrap().join("python");
    let script = "import boto3, json, sys\n\
        c = boto3.client('ecr', endpoint_url=sys.argv[1], region_name='us-east-1', \
        aws_access_key_id='x', aws_secret_access_key='y')\n\
        print(json.dumps(c.describe_repositories(registryId='123456789012'), default=str))\n";
    let out = run_ok(
        Command::new(python)
            .args(["-c", script, &moto.url])
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null()),
    );
    serde_json::from_slice(&out.stdout).expect("boto3 JSON")
}

#[test]
fn ecr_without_any_credentials_fails_fast_with_the_sources_tried() {
    let reg = ecr_registry(MOTO_PASSWORD);
    let ws = workspace(1_000_000_000);
    // Nothing listens here: if imgbuild found credentials somewhere, the call would fail
    // with exit 5 and this test would see it.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    // An instance metadata service that accepts connections and never answers (what a
    // firewalled 169.254.169.254 looks like), on loopback: imgbuild must bound its wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    /// (case, extra environment, what the message says about IMDS)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: [Case; 2] = [
        (
            "IMDS disabled",
            vec![],
            "(disabled by AWS_EC2_METADATA_DISABLED)",
        ),
        (
            "IMDS silent",
            vec![
                ("AWS_EC2_METADATA_DISABLED", "false".into()),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", silent_url),
            ],
            "instance metadata, and",
        ),
    ];
    for (what, env, imds_note) in cases {
        let started = Instant::now();
        let out = ecr_push(ws.path(), &reg, "hello", &nowhere, &env, &[]);
        let took = started.elapsed();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{what}: {err}");
        // Only a bound against hanging (the SDK's own IMDS defaults retry with longer
        // time-outs): wide, because a loaded 2-core CI machine stretches every step. That
        // IMDS gets exactly one short attempt is checked below by counting its connections,
        // which does not depend on timing.
        assert!(took < Duration::from_secs(30), "{what}: took {took:?}");
        eprintln!("{what}: failed after {took:?}");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: no AWS credentials"),
            "{what}: {err}"
        );
        for source in [
            ECR_HOST,
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS",
            "instance metadata",
            imds_note,
            "--password-stdin",
        ] {
            assert!(last.contains(source), "{what}: {source} missing: {last}");
        }
    }
    // The silent metadata service was really asked, once: each attempt is one connection
    // waiting in its backlog (the IMDSv2 token request; with no answer there is no second).
    silent.set_nonblocking(true).unwrap();
    let mut connections = 0;
    while silent.accept().is_ok() {
        connections += 1;
    }
    eprintln!("IMDS connections: {connections}");
    assert_eq!(connections, 1, "IMDS attempts (one expected)");
    // Nothing was pushed.
    assert!(
        !reg.log().contains("PUT /v2/hello/manifests"),
        "{}",
        reg.log()
    );
}

#[test]
fn ecr_wrong_registry_password_is_a_clear_401_without_a_refresh_loop() {
    let moto = Moto::start();
    // The registry wants another password than moto's token: ECR refusing the token.
    let reg = ecr_registry("the-registry-wants-this");
    let ws = workspace(1_000_000_000);
    let env = vec![
        ("AWS_ACCESS_KEY_ID", "AKIAWRONGPW000000001".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "wrong-pw-secret".to_string()),
    ];
    let started = Instant::now();
    let out = ecr_push(ws.path(), &reg, "hello", &moto.url, &env, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("401") && last.contains("ECR authorization token") && last.contains(ECR_HOST),
        "{last}"
    );
    let calls = moto.take_calls();
    let fetches = calls
        .iter()
        .filter(|c| c.operation == "GetAuthorizationToken")
        .count();
    // The first token, then after the registry's 401 exactly one fresh one (README: "a
    // token ECR refuses is fetched again once, never in a loop").
    assert_eq!(
        fetches, 2,
        "token fetched {fetches} times: {calls:#?}\n{err}"
    );
    assert_no_secrets(
        &out,
        &[MOTO_PASSWORD.into(), "wrong-pw-secret".into()],
        "wrong password",
    );
}

#[test]
fn ecr_flag_mistakes_are_usage_errors() {
    let ws = workspace(1_000_000_000);
    let cases: [(&[&str], &str); 4] = [
        (&["--resolve", "reg.example.com:443"], "HOST:PORT:ADDR"),
        (
            &["--resolve", "reg.example.com:443:not-an-ip"],
            "ADDR must be an IP",
        ),
        (&["--ecr-scan-on-push"], "--create-repository"),
        (&["--ecr-immutable-tags"], "--create-repository"),
    ];
    for (flags, message) in cases {
        let out = imgbuild()
            .current_dir(ws.path())
            .args(["push", "-f", "build-specs/hello.toml", "--repo"])
            .arg(format!("{ECR_HOST}/hello"))
            .args(flags)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(message), "{flags:?}: {err}");
    }
}

#[test]
fn create_repository_on_another_registry_only_warns() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let out = push_amd64(ws.path(), &format!("{}/made-by-push", reg.addr))
        .arg("--create-repository")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.matches("--create-repository applies to Amazon ECR only")
            .count(),
        1,
        "warned once: {err}"
    );
    let expected = amd64_digest(ws.path());
    assert_eq!(pushed_digest(&out.stdout), expected);
    assert_serves(&reg, "made-by-push:v1", &expected);
}

#[test]
fn resolve_still_verifies_the_certificate_against_the_host_name() {
    // The registry's certificate names ECR_HOST (and 127.0.0.1), not this host.
    let reg = ecr_registry(MOTO_PASSWORD);
    let ws = workspace(1_000_000_000);
    let other = "registry.other.test";
    let out = push_amd64(ws.path(), &format!("{other}:{}/x", reg.port))
        .arg("--resolve")
        .arg(format!("{other}:{}:127.0.0.1", reg.port))
        .arg("--ca-cert")
        .arg(reg.ca_cert().unwrap())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(6),
        "a certificate for another name: {err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("TLS connection to https://registry.other.test")
            && last.contains("certificate not valid for name \"registry.other.test\""),
        "{last}"
    );
    // --ca-cert was given and is not the problem: the advice is about the name.
    assert!(
        last.contains("the certificate does not name registry.other.test")
            && !last.contains("pass it with --ca-cert"),
        "{last}"
    );
}
