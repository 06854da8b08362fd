//! The GitHub Action (`action.yml` -> `scripts/action.sh`) run for real, as the runner runs
//! it: inputs as `INPUT_*` variables, `GITHUB_OUTPUT`, `GITHUB_STEP_SUMMARY` and `GITHUB_PATH`
//! as files, against the harness's docker-registry, with skopeo checking what was pushed.
//! Installation is exercised both ways: the freshly built imgbuild already on PATH (or named by
//! `IMGBUILD_BIN`), and a fake release served over loopback HTTP whose `SHA256SUMS` matches
//! (installed and used) or does not (the step fails, nothing installed, nothing pushed).
//!
//! Also the lint gate for every workflow and action file: actionlint (with shellcheck for the
//! `run:` scripts), check-jsonschema's built-in GitHub schemas, and shellcheck for the scripts.

use crate::build::workspace;
use crate::harness::*;
use base64::Engine as _;
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The PATH a GitHub runner would have, minus imgbuild and cargo: system directories only.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One run of the action's script: its temp files and the command.
struct Step {
    dir: tempfile::TempDir,
    cmd: Command,
}

impl Step {
    /// `bash scripts/action.sh` in `ws` with a runner-like, hermetic environment: nothing of
    /// this process's environment but what is set here (env_clear), imgbuild NOT on PATH.
    fn new(ws: &Path) -> Step {
        Step::script(ws, "scripts/action.sh")
    }

    /// The same environment for another script of the repository (`rel` from its root).
    fn script(ws: &Path, rel: &str) -> Step {
        let dir = tempfile::tempdir().expect("step temp dir");
        for d in ["home", "runner-temp"] {
            fs::create_dir_all(dir.path().join(d)).expect("create step dirs");
        }
        for p in SYSTEM_PATH.split(':') {
            assert!(
                !Path::new(p).join("imgbuild").exists() && !Path::new(p).join("cargo").exists(),
                "{p} holds imgbuild or cargo: the action tests need a PATH without them"
            );
        }
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join(rel))
            .current_dir(ws)
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .env("HOME", dir.path().join("home"))
            .env("RUNNER_TEMP", dir.path().join("runner-temp"))
            .env("GITHUB_OUTPUT", dir.path().join("github-output"))
            .env("GITHUB_STEP_SUMMARY", dir.path().join("step-summary"))
            .env("GITHUB_PATH", dir.path().join("github-path"))
            .env("GITHUB_REPOSITORY", "example/imgbuild")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_COLOR", "1")
            .env("IMGBUILD_CACHE", shared_cache())
            .stdin(Stdio::null());
        Step { dir, cmd }
    }

    /// Put the imgbuild under test on PATH (as a previous step or the tool cache would).
    fn with_imgbuild_on_path(mut self) -> Step {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_imgbuild"))
            .parent()
            .expect("bin dir")
            .to_owned();
        self.cmd
            .env("PATH", format!("{}:{SYSTEM_PATH}", bin_dir.display()));
        self
    }

    fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Step {
        self.cmd.env(k, v);
        self
    }

    fn run(&mut self) -> Output {
        self.cmd.output().expect("run bash scripts/action.sh")
    }

    fn file(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// The `GITHUB_OUTPUT` lines as a map; panics on a key written twice.
    fn outputs(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        for line in self.file("github-output").lines() {
            let (k, v) = line
                .split_once('=')
                .expect("key=value line in GITHUB_OUTPUT");
            assert!(
                map.insert(k.to_owned(), v.to_owned()).is_none(),
                "{k} written twice to GITHUB_OUTPUT"
            );
        }
        map
    }
}

fn assert_ok(out: &Output, reg: &Registry) {
    assert!(
        out.status.success(),
        "action.sh failed with {}\n--- stdout\n{}\n--- stderr\n{}\n--- registry\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        reg.log()
    );
}

/// The sha256 of the bytes the registry serves for `reference`, as `sha256:<hex>`.
fn served_digest(reg: &Registry, reference: &str) -> String {
    imgbuild::digest::Digest::of(&inspect_raw(reg, reference)).to_string()
}

/// Checks the three outputs against each other, the metadata file and the registry (skopeo).
fn check_outputs(step: &Step, reg: &Registry, repo: &str, tags: &[&str], platforms: &[&str]) {
    let outputs = step.outputs();
    assert_eq!(
        outputs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["digest", "image", "metadata"],
        "{outputs:?}"
    );
    let digest = &outputs["digest"];
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert_eq!(outputs["image"], format!("{}/{repo}@{digest}", reg.addr));

    let meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&outputs["metadata"]).expect("metadata file"))
            .expect("metadata JSON");
    assert_eq!(meta["digest"], digest.as_str());
    assert_eq!(meta["image"], outputs["image"].as_str());
    let mut got_tags: Vec<_> = meta["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t.as_str().expect("tag").to_owned())
        .collect();
    got_tags.sort();
    let mut want_tags: Vec<_> = tags.iter().map(|t| (*t).to_owned()).collect();
    want_tags.sort();
    assert_eq!(got_tags, want_tags);
    let got_platforms: Vec<_> = meta["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["platform"].as_str().expect("platform").to_owned())
        .collect();
    assert_eq!(got_platforms, platforms);

    // skopeo (an independent client) sees the digest under the digest and every tag.
    assert_eq!(served_digest(reg, &format!("{repo}@{digest}")), *digest);
    for tag in tags {
        assert_eq!(
            served_digest(reg, &format!("{repo}:{tag}")),
            *digest,
            "{tag}"
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&inspect_raw(reg, &format!("{repo}@{digest}"))).expect("index");
    assert_eq!(
        index["manifests"]
            .as_array()
            .expect("index manifests")
            .len(),
        platforms.len()
    );

    let summary = step.file("step-summary");
    assert!(summary.contains(&outputs["image"]), "{summary}");
    for p in platforms {
        assert!(summary.contains(&format!("| {p} | `sha256:")), "{summary}");
    }
}

#[test]
fn action_pushes_with_the_imgbuild_on_path_and_writes_outputs() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    // `context: .` (the checkout): the spec's src paths are relative to it.
    let spec = fs::read_to_string(ws.path().join("build-specs/hello.toml")).unwrap();
    fs::write(
        ws.path().join("build-specs/from-root.toml"),
        spec.replace("\"../fixtures/", "\"fixtures/"),
    )
    .unwrap();
    // Mixed separators, blanks and empty items, as people write YAML block scalars.
    let mut step = Step::new(ws.path())
        .with_imgbuild_on_path()
        .env("INPUT_SPEC", "build-specs/from-root.toml")
        .env("INPUT_REPO", format!("{}/action/hello", reg.addr))
        .env("INPUT_TAGS", "v1, latest\n\n  sha-0123abc \n")
        .env("INPUT_PLATFORMS", "linux/amd64\nlinux/arm64\n")
        .env("INPUT_CREATE_REPOSITORY", "false")
        .env("INPUT_COMPRESSION", "gzip")
        .env("INPUT_CONTEXT", ".")
        .env("INPUT_VERSION", env!("CARGO_PKG_VERSION"));
    let out = step.run();
    assert_ok(&out, &reg);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("using {}", env!("CARGO_BIN_EXE_imgbuild"))),
        "the imgbuild on PATH has the wanted version: no download\n{stderr}"
    );
    assert!(
        !step.dir.path().join("github-path").exists(),
        "nothing installed, so nothing added to GITHUB_PATH"
    );
    check_outputs(
        &step,
        &reg,
        "action/hello",
        &["v1", "latest", "sha-0123abc"],
        &["linux/amd64", "linux/arm64"],
    );
    // The log shows imgbuild's one stdout line, the pushed image.
    assert_eq!(text(&out.stdout).trim(), step.outputs()["image"]);
}

#[test]
fn action_uses_docker_login_credentials_and_never_logs_them() {
    const USER: &str = "ci-robot";
    const PASS: &str = "Pw-7f3a9c1e-never-in-logs";
    let reg = Registry::start_htpasswd(USER, PASS);
    let ws = workspace(1_000_000_000);

    // What docker/login-action leaves behind: $DOCKER_CONFIG/config.json with an `auths` entry.
    let docker_config = |pass: &str| {
        let dir = tempfile::tempdir().expect("docker config dir");
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{pass}"));
        let json = serde_json::json!({ "auths": { reg.addr.clone(): { "auth": auth } } });
        fs::write(dir.path().join("config.json"), json.to_string()).expect("write config.json");
        (dir, auth)
    };
    let secrets_absent = |step: &Step, out: &Output, auth: &str, pass: &str| {
        let mut seen = text(&out.stdout) + &text(&out.stderr);
        for f in ["github-output", "step-summary", "github-path"] {
            seen += &step.file(f);
        }
        if let Some(m) = step.outputs().get("metadata") {
            seen += &fs::read_to_string(m).unwrap_or_default();
        }
        assert!(
            !seen.contains(pass),
            "the password reached the log:\n{seen}"
        );
        assert!(
            !seen.contains(auth),
            "the auth string reached the log:\n{seen}"
        );
    };

    let (cfg, auth) = docker_config(PASS);
    let mut step = Step::new(ws.path())
        .env("IMGBUILD_BIN", env!("CARGO_BIN_EXE_imgbuild"))
        .env("DOCKER_CONFIG", cfg.path())
        .env("INPUT_SPEC", "build-specs/hello.toml")
        .env("INPUT_REPO", format!("{}/private/hello", reg.addr))
        .env("INPUT_TAGS", "v2")
        .env("INPUT_PLATFORMS", "linux/amd64")
        .env("INPUT_COMPRESSION", "zstd")
        .env("INPUT_CREATE_REPOSITORY", "True");
    let out = step.run();
    assert_ok(&out, &reg);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("using IMGBUILD_BIN="), "{stderr}");
    // create-repository reached imgbuild (which only warns on a registry that is not ECR).
    assert!(
        stderr.contains("--create-repository applies to Amazon ECR only"),
        "{stderr}"
    );
    check_outputs(&step, &reg, "private/hello", &["v2"], &["linux/amd64"]);
    // compression reached imgbuild: the layers are zstd.
    let index: serde_json::Value =
        serde_json::from_slice(&inspect_raw(&reg, "private/hello:v2")).expect("index");
    let manifest = index["manifests"][0]["digest"].as_str().expect("digest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&inspect_raw(&reg, &format!("private/hello@{manifest}")))
            .expect("manifest");
    for layer in manifest["layers"].as_array().expect("layers") {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
            "{manifest}"
        );
    }
    secrets_absent(&step, &out, &auth, PASS);

    // A refused credential: the step fails with imgbuild's exit code 4 (authentication),
    // and the wrong secret is not echoed either.
    let wrong = "Wrong-5be0d2-also-never-in-logs";
    let (cfg, auth) = docker_config(wrong);
    let mut step = Step::new(ws.path())
        .env("IMGBUILD_BIN", env!("CARGO_BIN_EXE_imgbuild"))
        .env("DOCKER_CONFIG", cfg.path())
        .env("INPUT_SPEC", "build-specs/hello.toml")
        .env("INPUT_REPO", format!("{}/private/refused", reg.addr))
        .env("INPUT_PLATFORMS", "linux/amd64");
    let out = step.run();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        step.outputs().is_empty(),
        "no outputs from a failed push: {:?}",
        step.outputs()
    );
    secrets_absent(&step, &out, &auth, wrong);
}

// ---------------------------------------------------------------------------------------------
// Installation from a (fake) GitHub release
// ---------------------------------------------------------------------------------------------

/// A static file server on 127.0.0.1 (GET only; 404 for what is not there) that records the
/// paths asked for. It stands where `https://github.com/OWNER/REPO/releases` is.
struct ReleaseServer {
    url: String,
    root: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ReleaseServer {
    fn start(root: &Path) -> ReleaseServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind release server");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (dir, log) = (root.to_owned(), Arc::clone(&requests));
        // Lives until the test process ends; each connection is served on this thread.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &dir, &log);
            }
        });
        ReleaseServer {
            url,
            root: root.to_owned(),
            requests,
        }
    }

    fn put(&self, rel: &str, bytes: &[u8]) {
        let p = self.root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, bytes).expect("write release file");
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

fn serve(mut stream: TcpStream, root: &Path, log: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    log.lock().expect("lock").push(path.clone());
    let file = root.join(path.trim_start_matches('/'));
    if path.contains("..") || !file.is_file() {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nNot Found",
        );
    }
    let mut f = fs::File::open(&file)?;
    let len = f.metadata()?.len();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    std::io::copy(&mut f, &mut stream)?;
    stream.flush()
}

/// The release asset name for this machine, as scripts/action.sh computes it.
fn asset_name() -> String {
    format!("imgbuild-{}-unknown-linux-musl", std::env::consts::ARCH)
}

fn sha256_file(p: &Path) -> String {
    let mut w = imgbuild::digest::HashingWriter::new(std::io::sink());
    std::io::copy(&mut fs::File::open(p).expect("open"), &mut w).expect("hash");
    w.finish().1.hex().to_owned()
}

/// A step that must install `version` from `server` into its own tool directory.
fn installing_step(ws: &Path, server: &ReleaseServer, version: &str, repo: &str) -> Step {
    let step = Step::new(ws);
    let tools = step.dir.path().join("tools");
    step.env("IMGBUILD_RELEASE_URL", &server.url)
        .env("IMGBUILD_INSTALL_DIR", tools)
        .env("INPUT_VERSION", version)
        .env("INPUT_SPEC", "build-specs/hello.toml")
        .env("INPUT_REPO", repo)
        .env("INPUT_PLATFORMS", "linux/amd64")
}

#[test]
fn action_installs_a_release_only_when_sha256sums_matches() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let release = tempfile::tempdir().expect("release dir");
    let server = ReleaseServer::start(release.path());
    let asset = asset_name();

    // v9.9.9: the real imgbuild binary and a SHA256SUMS that lists it (sha256sum format, with
    // another asset beside it as in a real release). Hard link: the debug binary is large.
    let good = release.path().join(format!("download/v9.9.9/{asset}"));
    fs::create_dir_all(good.parent().expect("parent")).expect("mkdir");
    if fs::hard_link(env!("CARGO_BIN_EXE_imgbuild"), &good).is_err() {
        fs::copy(env!("CARGO_BIN_EXE_imgbuild"), &good).expect("copy imgbuild");
    }
    let good_sum = sha256_file(&good);
    let sums = format!(
        "{}  imgbuild-riscv64gc-unknown-linux-musl\n{good_sum}  {asset}\n",
        "0".repeat(64),
    );
    server.put("download/v9.9.9/SHA256SUMS", sums.as_bytes());

    // v6.6.6: the download does not match its SHA256SUMS line (a tampered or truncated asset).
    let bad_bytes = fs::read(fixtures().join("dist/amd64/hello")).expect("fixture");
    server.put(&format!("download/v6.6.6/{asset}"), &bad_bytes);
    server.put(
        "download/v6.6.6/SHA256SUMS",
        format!("{good_sum}  {asset}\n").as_bytes(),
    );
    // v5.5.5: the asset is there but SHA256SUMS does not list it.
    server.put(&format!("download/v5.5.5/{asset}"), &bad_bytes);
    server.put(
        "download/v5.5.5/SHA256SUMS",
        format!("{}  imgbuild-other\n", "1".repeat(64)).as_bytes(),
    );

    let refused = [("v6.6.6", "SHA256 mismatch"), ("v5.5.5", "has no line for")];
    for (version, why) in refused {
        let repo = format!("{}/refused/{}", reg.addr, version.replace('.', "-"));
        let mut step = installing_step(ws.path(), &server, version, &repo);
        let out = step.run();
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{version} must fail the step\n{stderr}"
        );
        assert!(stderr.contains(why), "{version}: {stderr}");
        assert!(
            !step.dir.path().join("tools/bin/imgbuild").exists(),
            "{version}: an unverified binary was installed"
        );
        assert!(step.outputs().is_empty(), "{version}: {:?}", step.outputs());
        assert!(step.file("github-path").is_empty());
        assert!(
            !reg.log()
                .contains(&format!("/v2/refused/{}", version.replace('.', "-"))),
            "{version}: something was pushed"
        );
    }

    // The matching release installs into the tool directory, lands on GITHUB_PATH for the
    // following steps, and pushes.
    let mut step = installing_step(
        ws.path(),
        &server,
        "9.9.9", // without the v: the script adds it
        &format!("{}/installed/hello", reg.addr),
    );
    let out = step.run();
    assert_ok(&out, &reg);
    let installed = step.dir.path().join("tools/bin/imgbuild");
    assert_eq!(sha256_file(&installed), good_sum);
    assert_eq!(
        step.file("github-path").trim(),
        step.dir.path().join("tools/bin").display().to_string()
    );
    check_outputs(
        &step,
        &reg,
        "installed/hello",
        &["latest"],
        &["linux/amd64"],
    );
    let asked = server.requests();
    for want in [
        format!("/download/v9.9.9/{asset}"),
        "/download/v9.9.9/SHA256SUMS".to_owned(),
    ] {
        assert!(asked.contains(&want), "{want} not requested: {asked:?}");
    }
}

/// Which release is asked for: the `version` input, else the action's own ref when it is a
/// version tag, else `latest`. None of these releases has assets (HTTP 404) and this PATH has
/// no cargo, so each run ends in the documented fallback, which fails saying what to do. (A
/// real `cargo install --git` needs GitHub, which tests may not reach.)
#[test]
fn action_picks_the_release_and_falls_back_to_cargo_without_an_asset() {
    let ws = workspace(1_000_000_000);
    let release = tempfile::tempdir().expect("release dir");
    let server = ReleaseServer::start(release.path());
    let asset = asset_name();
    let table = [
        // (version input, action ref, release asked for)
        ("v1.0.0", "", "download/v1.0.0"),
        ("1.0.1", "v3.0.0", "download/v1.0.1"),
        ("", "v1.2.3", "download/v1.2.3"),
        ("", "v2.0.0-rc.1", "download/v2.0.0-rc.1"),
        ("", "main", "latest/download"),
        ("", "", "latest/download"),
        ("latest", "v1.2.3", "latest/download"),
    ];
    for (version, action_ref, asked) in table {
        let mut step = installing_step(ws.path(), &server, version, "127.0.0.1:9/none")
            .env("IMGBUILD_ACTION_REF", action_ref);
        let out = step.run();
        let stderr = text(&out.stderr);
        let case = format!("version={version:?} ref={action_ref:?}");
        assert!(!out.status.success(), "{case}: {stderr}");
        assert!(
            stderr.contains(&format!("has no {asset}")),
            "{case}: {stderr}"
        );
        assert!(
            stderr.contains("no cargo for the fallback"),
            "{case}: {stderr}"
        );
        let want = format!("/{asked}/{asset}");
        assert_eq!(
            server.requests().last(),
            Some(&want),
            "{case}: {:?}",
            server.requests()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The example scripts users copy
// ---------------------------------------------------------------------------------------------

#[test]
fn example_push_script_and_helm_deploy_by_digest() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let repo = format!("{}/examples/hello", reg.addr);

    let mut push = Step::script(ws.path(), "examples/scripts/push.sh")
        .with_imgbuild_on_path()
        .env("REPO", &repo)
        .env("TAG", "v7");
    let out = push.run();
    assert_ok(&out, &reg);
    let line = text(&out.stdout).trim().to_owned();
    let (pushed_repo, digest) = line.split_once('@').expect("REPO@DIGEST on stdout");
    assert_eq!(pushed_repo, repo);
    assert_eq!(served_digest(&reg, "examples/hello:v7"), digest);
    let index: serde_json::Value =
        serde_json::from_slice(&inspect_raw(&reg, "examples/hello:v7")).expect("index");
    let platforms: Vec<_> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            m["platform"]["architecture"]
                .as_str()
                .expect("arch")
                .to_owned()
        })
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);

    // helm is not installed here: DRY_RUN prints the command the script would run, with the
    // digest read from the metadata file of a real push.
    let mut deploy = Step::script(ws.path(), "examples/scripts/helm-deploy.sh")
        .with_imgbuild_on_path()
        .env("REPO", &repo)
        .env("TAG", "v8")
        .env("DRY_RUN", "1");
    let out = deploy.run();
    assert_ok(&out, &reg);
    let helm = text(&out.stdout);
    let tagged = served_digest(&reg, "examples/hello:v8");
    assert!(
        helm.starts_with("helm upgrade --install hello ./chart ")
            && helm.contains(&format!("image.digest={tagged}"))
            && helm.contains(&format!("image.repository={repo}")),
        "{helm}"
    );
}

// ---------------------------------------------------------------------------------------------
// Lint: every workflow and action file, and the scripts
// ---------------------------------------------------------------------------------------------

/// A lint tool: `$ENV_VAR`, else the venv scripts/install-deps.sh made, else PATH. Missing in
/// CI (CI set and not "false") is a failure, elsewhere a skip (None).
fn lint_tool(env_var: &str, venv: &str, bin: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("IMGBUILD_TEST_LINT")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/imgbuild-test"))
        });
    let found = std::env::var_os(env_var)
        .map(PathBuf::from)
        .or_else(|| {
            cache
                .map(|c| c.join(venv).join("bin").join(bin))
                .filter(|p| p.is_file())
        })
        .or_else(|| find_program(bin));
    if found.is_none() {
        let ci = std::env::var("CI").unwrap_or_default();
        assert!(
            ci.is_empty() || ci == "false",
            "{bin} not found in CI: run scripts/install-deps.sh test"
        );
        skip(&format!(
            "{bin} not installed: run scripts/install-deps.sh test"
        ));
    }
    found
}

/// The workflow files (GitHub's and the examples users copy).
fn workflow_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in [".github/workflows", "examples/github-actions"] {
        let d = repo_root().join(dir);
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if matches!(p.extension().and_then(|x| x.to_str()), Some("yml" | "yaml")) {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// The shell scripts of the action and the examples.
fn shell_scripts() -> Vec<PathBuf> {
    let mut files = vec![
        repo_root().join("scripts/action.sh"),
        repo_root().join("bench/run.sh"),
    ];
    let d = repo_root().join("examples/scripts");
    for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
        let p = e.expect("dir entry").path();
        if p.extension().and_then(|x| x.to_str()) == Some("sh") {
            files.push(p);
        }
    }
    files.sort();
    files
}

fn run_tool(cmd: &mut Command) -> Output {
    cmd.current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn assert_tool_ok(cmd: &mut Command) {
    let out = run_tool(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn workflows_and_action_pass_actionlint_with_shellcheck() {
    let (Some(actionlint), Some(shellcheck)) = (
        lint_tool("ACTIONLINT", "actionlint-venv", "actionlint"),
        lint_tool("SHELLCHECK", "", "shellcheck"),
    ) else {
        return;
    };
    let files = workflow_files();
    assert!(
        files.len() >= 4,
        "ci, release and the two examples at least: {files:?}"
    );
    let lint = |files: &[PathBuf]| {
        let mut cmd = Command::new(&actionlint);
        // Run from the repository root so `uses: ./` is checked against action.yml's inputs.
        cmd.arg("-no-color")
            .arg("-shellcheck")
            .arg(&shellcheck)
            .arg("-pyflakes")
            .arg("")
            .args(files);
        run_tool(&mut cmd)
    };
    let out = lint(&files);
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The gate can fail: an unknown input of this repository's action, and a `run:` script
    // shellcheck objects to, are both reported.
    let bad_dir = tempfile::tempdir_in(repo_root().join("target")).expect("tmp");
    let bad = bad_dir.path().join("bad.yml");
    fs::write(
        &bad,
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n      \
         - uses: ./\n        with:\n          spec: x.toml\n          no-such-input: 1\n      \
         - run: |\n          x=\"a b\"\n          ls $x\n",
    )
    .expect("write bad workflow");
    let out = lint(std::slice::from_ref(&bad));
    let report = text(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("no-such-input"), "{report}");
    assert!(
        report.contains("SC2086"),
        "shellcheck did not run: {report}"
    );
}

#[test]
fn workflows_and_action_match_githubs_json_schemas() {
    let Some(checker) = lint_tool(
        "CHECK_JSONSCHEMA",
        "check-jsonschema-venv",
        "check-jsonschema",
    ) else {
        return;
    };
    let root = repo_root();
    let table: [(&str, Vec<PathBuf>); 3] = [
        ("vendor.github-workflows", workflow_files()),
        ("vendor.github-actions", vec![root.join("action.yml")]),
        (
            "vendor.dependabot",
            vec![root.join(".github/dependabot.yml")],
        ),
    ];
    for (schema, files) in &table {
        assert_tool_ok(
            Command::new(&checker)
                .args(["--builtin-schema", schema])
                .args(files),
        );
    }
    // And a file the schema refuses (a step with neither `run` nor `uses`) is refused.
    let bad_dir = tempfile::tempdir_in(root.join("target")).expect("tmp");
    let bad = bad_dir.path().join("bad.yml");
    fs::write(
        &bad,
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - name: nothing\n",
    )
    .expect("write");
    let out = run_tool(
        Command::new(&checker)
            .args(["--builtin-schema", "vendor.github-workflows"])
            .arg(&bad),
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn action_and_example_scripts_pass_shellcheck() {
    let Some(shellcheck) = lint_tool("SHELLCHECK", "", "shellcheck") else {
        return;
    };
    let scripts = shell_scripts();
    assert!(scripts.len() >= 3, "{scripts:?}");
    assert_tool_ok(Command::new(&shellcheck).args(&scripts));
}

/// Every input of action.yml reaches scripts/action.sh as its INPUT_* variable, and the
/// script reads it: an input added to one file and not the other would be silently ignored.
#[test]
fn every_action_input_reaches_the_script() {
    let action = fs::read_to_string(repo_root().join("action.yml")).expect("action.yml");
    let script = fs::read_to_string(repo_root().join("scripts/action.sh")).expect("action.sh");
    let inputs = [
        "spec",
        "repo",
        "tags",
        "platforms",
        "context",
        "aws-role-arn",
        "create-repository",
        "compression",
        "version",
    ];
    for input in inputs {
        let var = format!("INPUT_{}", input.to_uppercase().replace('-', "_"));
        assert!(
            action.contains(&format!("\n  {input}:\n")),
            "action.yml lacks input {input}"
        );
        assert!(
            action.contains(&format!("{var}: ${{{{ inputs.{input} }}}}")),
            "action.yml does not pass {input} as {var}"
        );
        assert!(script.contains(&var), "action.sh never reads {var}");
    }
    for output in ["digest", "image", "metadata"] {
        assert!(
            action.contains(&format!("${{{{ steps.push.outputs.{output} }}}}")),
            "action.yml lacks output {output}"
        );
        assert!(
            script.contains(&format!("'{output}=%s\\n'")),
            "action.sh never writes {output}"
        );
    }
}
