//! Shared harness of the integration tests: the hermetic `imgbuild` command, throwaway
//! `docker-registry` instances (plain, htpasswd, TLS with a throwaway CA), skopeo helpers,
//! OCI-layout helpers and small file-system utilities.
//!
//! Only std, `tempfile`, `serde_json` and `base64` (regular dependencies of the crate) are
//! used. The external tools come from `scripts/install-deps.sh test`.
//!
//! Skipping. A test that lacks a prerequisite (a tool or service it cannot do without) calls
//! [`skip_missing`] with the prerequisite's name and returns, e.g.
//! `if !docker_available() { return skip_missing("docker", "no Docker Engine answers"); }`.
//! The older one-argument form `skip(reason)` still works: it derives the prerequisite from
//! the reason's first word (`docker ...` -> `docker`, `qemu-aarch64-static ...` -> `qemu`).
//! Prerequisite names: `docker`, `qemu`, `curl`, `setpriv`, `x86_64-host`.
//! - When `CI` is set (not empty, `0` or `false`), a skip FAILS the test with a message saying
//!   what to install, unless `IMGBUILD_TEST_ALLOW_SKIP` (a comma list such as `docker,qemu`,
//!   or `all`) names that prerequisite: CI must not turn a missing tool into a silent pass.
//! - Otherwise (and for an allowed skip in CI) the test passes, and the skip is appended to
//!   the file named by `IMGBUILD_TEST_SKIP_LOG` (one line: prerequisite, test, reason, tab
//!   separated), which `scripts/test.sh` sets and lists with a count at the end.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

const INSTALL_HINT: &str = "run scripts/install-deps.sh test";

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// The repository root (`CARGO_MANIFEST_DIR`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `<repo>/fixtures` (binaries are under `fixtures/dist/{amd64,arm64,arm}/hello`,
/// `fixtures/dist/amd64/hello-dynamic`, text files under `fixtures/dist/share/`).
pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}

/// The per-process HOME handed to `imgbuild` and skopeo: a fresh, empty directory, so the
/// machine's `~/.docker/config.json` (or any other dot file) is never read. It lives under
/// cargo's target tmp dir and is kept for the life of the process.
///
/// It is shared by every test of the process: never write into it. A test that needs a
/// `config.json` or other dot files gives its command its own HOME (or DOCKER_CONFIG) with
/// `.env(..)` on a `tempfile::tempdir()`.
pub fn hermetic_home() -> &'static Path {
    static HOME: OnceLock<TempDir> = OnceLock::new();
    HOME.get_or_init(|| process_tempdir("home-")).path()
}

/// A fresh directory under cargo's target tmp dir, for a per-process `OnceLock`.
fn process_tempdir(prefix: &str) -> TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&base).expect("create CARGO_TARGET_TMPDIR");
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap_or_else(|e| panic!("create {prefix}* under CARGO_TARGET_TMPDIR: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The imgbuild command
// ---------------------------------------------------------------------------------------------

/// Is this environment variable one that must not leak from the machine into a test run?
fn is_leaky_var(name: &str) -> bool {
    const PREFIXES: &[&str] = &["GITHUB_", "IMGBUILD_", "AWS_", "ACTIONS_"];
    const NAMES: &[&str] = &[
        "SOURCE_DATE_EPOCH",
        "DOCKER_CONFIG",
        "REGISTRY_AUTH_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "CI",
        "RUST_LOG",
        "CLICOLOR_FORCE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "XDG_CONFIG_HOME",
        "XDG_RUNTIME_DIR",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
        || NAMES.contains(&name)
        || name.eq_ignore_ascii_case("http_proxy")
        || name.eq_ignore_ascii_case("https_proxy")
        || name.eq_ignore_ascii_case("all_proxy")
        || name.eq_ignore_ascii_case("no_proxy")
}

/// Remove every leaky variable of the current process from `cmd`'s environment and point
/// HOME at [`hermetic_home`].
fn make_hermetic(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str()
            && is_leaky_var(name)
        {
            cmd.env_remove(name);
        }
    }
    // Named explicitly too, in case they appear later or are spelled in odd cases.
    for name in [
        "SOURCE_DATE_EPOCH",
        "DOCKER_CONFIG",
        "REGISTRY_AUTH_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ] {
        cmd.env_remove(name);
    }
    cmd.env("HOME", hermetic_home());
}

/// `Command` for the `imgbuild` binary under test, with a hermetic environment:
/// GITHUB_*, ACTIONS_*, IMGBUILD_*, AWS_* (incl. the container-credential URIs),
/// SOURCE_DATE_EPOCH, DOCKER_CONFIG, REGISTRY_AUTH_FILE, CI, RUST_LOG, proxies,
/// SSL_CERT_FILE/DIR and XDG_CONFIG_HOME/XDG_RUNTIME_DIR are removed;
/// AWS_EC2_METADATA_DISABLED=true, NO_COLOR=1 and HOME=[`hermetic_home`] are set; stdin is
/// null. Tests add what they need with `.env(..)` afterwards.
pub fn imgbuild() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgbuild"));
    make_hermetic(&mut cmd);
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_COLOR", "1")
        .env("IMGBUILD_CACHE", shared_cache())
        .stdin(Stdio::null());
    cmd
}

/// The layer cache every `imgbuild()` command of this process shares (as CI runs share one):
/// never the machine's ~/.cache. Tests about the cache itself give their own IMGBUILD_CACHE.
pub fn shared_cache() -> &'static Path {
    static CACHE: OnceLock<TempDir> = OnceLock::new();
    CACHE.get_or_init(|| process_tempdir("cache-")).path()
}

/// Run `cmd`, panic (with its stdout and stderr) unless it exits 0, return its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `cmd` with `input` on its stdin (e.g. for `--password-stdin`); stdout and stderr
/// captured; no assertion.
pub fn output_with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("wait for the child")
}

/// Is `prog` an executable in PATH (or an existing path)?
pub fn find_program(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(prog))
        .find(|p| p.is_file())
}

fn require_program(prog: &str) -> PathBuf {
    find_program(prog).unwrap_or_else(|| panic!("{prog} not installed: {INSTALL_HINT}"))
}

// ---------------------------------------------------------------------------------------------
// Skipping, docker, misc
// ---------------------------------------------------------------------------------------------

/// Report a test skipped because `prereq` is missing (see the module docs for what happens
/// in CI). The caller returns after it.
pub fn skip_missing(prereq: &str, reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    match skip_decision(
        prereq,
        std::env::var("CI").ok().as_deref(),
        std::env::var("IMGBUILD_TEST_ALLOW_SKIP").ok().as_deref(),
    ) {
        SkipDecision::Fail => panic!(
            "{test}: {reason}. CI is set, so a missing prerequisite fails the test: install \
             {prereq} ({}), or allow this skip with IMGBUILD_TEST_ALLOW_SKIP={prereq}",
            install_hint_for(prereq)
        ),
        SkipDecision::Skip => {
            eprintln!("SKIPPED [{prereq}]: {test}: {reason}");
            if let Some(log) = std::env::var_os("IMGBUILD_TEST_SKIP_LOG") {
                let line = format!("{prereq}\t{test}\t{}\n", reason.replace(['\n', '\t'], " "));
                // One write of one short line with O_APPEND: lines of parallel tests do not
                // interleave.
                let written = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                if let Err(e) = written {
                    panic!("record the skip in {}: {e}", Path::new(&log).display());
                }
            }
        }
    }
}

/// Report a skipped test; the prerequisite is derived from the reason's first word (see the
/// module docs). Kept for callers that predate [`skip_missing`].
pub fn skip(reason: &str) {
    skip_missing(&prereq_of(reason), reason)
}

/// The prerequisite a free-text skip reason is about: its first word, with the qemu binaries
/// folded into `qemu` and "not an x86_64 host" into `x86_64-host`.
pub fn prereq_of(reason: &str) -> String {
    let lower = reason.to_ascii_lowercase();
    let first = lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .find(|w| !w.is_empty())
        .unwrap_or("unknown");
    if lower.contains("x86_64 host") {
        "x86_64-host".into()
    } else if first.starts_with("qemu") {
        "qemu".into()
    } else if lower.contains("docker") {
        "docker".into()
    } else {
        first.into()
    }
}

/// What a skip does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipDecision {
    Skip,
    Fail,
}

/// A skip fails when `ci` is set (not empty, `0` or `false`) and `allow` (comma list, or
/// `all`) does not name `prereq`.
pub fn skip_decision(prereq: &str, ci: Option<&str>, allow: Option<&str>) -> SkipDecision {
    let in_ci = ci.is_some_and(|v| {
        let v = v.trim();
        !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
    });
    let allowed = allow.is_some_and(|list| {
        list.split(',')
            .map(str::trim)
            .any(|p| p.eq_ignore_ascii_case(prereq) || p.eq_ignore_ascii_case("all"))
    });
    if in_ci && !allowed {
        SkipDecision::Fail
    } else {
        SkipDecision::Skip
    }
}

fn install_hint_for(prereq: &str) -> &'static str {
    match prereq {
        "docker" => {
            "scripts/install-deps.sh test installs docker.io; the Docker Engine must also be \
             running and reach 127.0.0.1 (docker info)"
        }
        "qemu" => "apt-get install qemu-user-static, or scripts/install-deps.sh test",
        "curl" => "apt-get install curl, or scripts/install-deps.sh test",
        "setpriv" => "apt-get install util-linux, or scripts/install-deps.sh test",
        "x86_64-host" => "run the suite on an x86_64 machine",
        _ => INSTALL_HINT,
    }
}

/// Wait for `child` at most `timeout`; kill it (and return None) when it takes longer.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Is a working docker daemon reachable (`docker info` succeeds within 10 s)? Cached.
pub fn docker_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let Ok(mut child) = Command::new("docker")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        matches!(wait_timeout(&mut child, Duration::from_secs(10)), Some(s) if s.success())
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Where `scripts/install-deps.sh test` put moto_server (`$MOTO_SERVER`, else
/// `~/.cache/imgbuild-test/venv/bin/moto_server`, else `moto_server` in PATH).
pub fn moto_server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("IMGBUILD_TEST_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/imgbuild-test/venv"))
        });
    if let Some(p) = venv.map(|v| v.join("bin/moto_server"))
        && p.is_file()
    {
        return Some(p);
    }
    find_program("moto_server")
}

/// A minimal HTTP/1.0 GET over plain TCP: returns (status, raw response headers + body).
/// `basic` adds an `Authorization: Basic` header.
pub fn http_get(
    addr: &str,
    path: &str,
    basic: Option<(&str, &str)>,
) -> std::io::Result<(u16, String)> {
    use base64::Engine as _;
    let sock: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut req =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: imgbuild-harness\r\n");
    if let Some((user, pass)) = basic {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad HTTP response: {text:?}"),
            )
        })?;
    Ok((status, text))
}

// ---------------------------------------------------------------------------------------------
// docker-registry
// ---------------------------------------------------------------------------------------------

/// Options for [`Registry::start_with`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOpts {
    /// Require HTTP basic auth with this user and password (bcrypt htpasswd file).
    pub htpasswd: Option<(String, String)>,
    /// Serve TLS with a leaf signed by a throwaway CA; SANs are these host names plus
    /// `localhost` and `IP:127.0.0.1`.
    pub tls_hosts: Option<Vec<String>>,
}

impl RegistryOpts {
    pub fn with_htpasswd(mut self, user: &str, pass: &str) -> Self {
        self.htpasswd = Some((user.to_owned(), pass.to_owned()));
        self
    }

    pub fn with_tls(mut self, hosts: &[&str]) -> Self {
        self.tls_hosts = Some(hosts.iter().map(|h| (*h).to_owned()).collect());
        self
    }
}

#[derive(Debug)]
struct TlsFiles {
    ca_cert: PathBuf,
    cert_dir: PathBuf,
}

/// A running `docker-registry serve` on 127.0.0.1 with its own storage; killed on drop.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub port: u16,
    /// The htpasswd user and password, when the registry requires them.
    pub creds: Option<(String, String)>,
    child: Child,
    log_path: PathBuf,
    storage: PathBuf,
    tls: Option<TlsFiles>,
    dir: TempDir,
}

impl Registry {
    /// Plain HTTP, no auth, deletes enabled.
    pub fn start() -> Registry {
        Registry::start_with(RegistryOpts::default())
    }

    /// Plain HTTP with basic auth (bcrypt htpasswd) for `user`/`pass`.
    pub fn start_htpasswd(user: &str, pass: &str) -> Registry {
        Registry::start_with(RegistryOpts::default().with_htpasswd(user, pass))
    }

    /// TLS (throwaway CA; SANs = `hosts` + localhost + IP:127.0.0.1), no auth.
    pub fn start_tls(hosts: &[&str]) -> Registry {
        Registry::start_with(RegistryOpts::default().with_tls(hosts))
    }

    pub fn start_with(opts: RegistryOpts) -> Registry {
        let bin = if Path::new("/usr/bin/docker-registry").is_file() {
            PathBuf::from("/usr/bin/docker-registry")
        } else {
            find_program("docker-registry")
                .unwrap_or_else(|| panic!("docker-registry not installed: {INSTALL_HINT}"))
        };
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-registry-")
            .tempdir()
            .expect("registry temp dir");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("create registry storage");
        let log_path = dir.path().join("registry.log");

        let mut auth_yaml = String::new();
        if let Some((user, pass)) = &opts.htpasswd {
            let out = Command::new(require_program("htpasswd"))
                .args(["-Bbn", user, pass])
                .stdin(Stdio::null())
                .output()
                .expect("run htpasswd");
            assert!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let file = dir.path().join("htpasswd");
            fs::write(&file, &out.stdout).expect("write htpasswd file");
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: imgbuild-test\n    path: {}\n",
                file.display()
            );
        }

        let mut tls_yaml = String::new();
        let tls = opts.tls_hosts.as_ref().map(|hosts| {
            let (files, cert, key) = make_tls(dir.path(), hosts);
            tls_yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            files
        });

        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let config = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: imgbuild-test-secret\n{tls_yaml}\
                 {auth_yaml}",
                storage = storage.display(),
            );
            let config_path = dir.path().join("config.yml");
            fs::write(&config_path, config).expect("write registry config");

            let log = fs::File::create(&log_path).expect("create registry log");
            let log2 = log.try_clone().expect("clone registry log handle");
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config_path)
                .env_remove("REGISTRY_HTTP_ADDR")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));

            match wait_ready(&mut child, &log_path, &addr, tls.is_some()) {
                Ready::Yes => {
                    return Registry {
                        addr,
                        port,
                        creds: opts.htpasswd.clone(),
                        child,
                        log_path,
                        storage,
                        tls,
                        dir,
                    };
                }
                Ready::PortTaken => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = fs::read_to_string(&log_path).unwrap_or_default();
                }
                Ready::Failed(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    panic!("docker-registry did not start on {addr}: {why}\n--- log\n{log}");
                }
            }
        }
        panic!(
            "docker-registry could not bind a free port in 5 attempts\n--- last log\n{last_log}"
        );
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Does this registry serve TLS?
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The throwaway CA certificate (PEM) that signed the server certificate (TLS only).
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.ca_cert.clone())
    }

    /// A folder holding only `ca.crt`, for skopeo's `--cert-dir` (TLS only).
    pub fn cert_dir(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.cert_dir.clone())
    }

    /// The registry's combined stdout/stderr so far (includes access-log lines such as
    /// `"PUT /v2/<name>/manifests/<ref> HTTP/1.1" 201`).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The filesystem storage root of the registry.
    pub fn storage(&self) -> PathBuf {
        self.storage.clone()
    }

    /// `user:pass` when the registry requires credentials.
    pub fn creds_arg(&self) -> Option<String> {
        self.creds.as_ref().map(|(u, p)| format!("{u}:{p}"))
    }

    /// `docker://127.0.0.1:PORT/<reference>` for skopeo.
    pub fn docker_ref(&self, reference: &str) -> String {
        format!("docker://{}/{reference}", self.addr)
    }

    /// skopeo flags to reach this registry. `side` is "" for inspect and similar,
    /// "src-" or "dest-" for `skopeo copy`: `--{side}tls-verify=false` (plain) or
    /// `--{side}cert-dir DIR` (TLS), plus `--{side}creds user:pass` when needed.
    pub fn skopeo_args(&self, side: &str) -> Vec<String> {
        let mut args = Vec::new();
        match &self.tls {
            Some(t) => {
                args.push(format!("--{side}cert-dir"));
                args.push(t.cert_dir.display().to_string());
            }
            None => args.push(format!("--{side}tls-verify=false")),
        }
        if let Some(c) = self.creds_arg() {
            args.push(format!("--{side}creds"));
            args.push(c);
        }
        args
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Ready {
    Yes,
    PortTaken,
    Failed(String),
}

fn wait_ready(child: &mut Child, log_path: &Path, addr: &str, tls: bool) -> Ready {
    let deadline = Instant::now() + Duration::from_secs(10);
    let listening = format!("listening on {addr}");
    loop {
        let log = fs::read_to_string(log_path).unwrap_or_default();
        match child.try_wait() {
            Ok(Some(status)) => {
                return if log.contains("address already in use") {
                    Ready::PortTaken
                } else {
                    Ready::Failed(format!("exited with {status}"))
                };
            }
            Ok(None) => {}
            Err(e) => return Ready::Failed(format!("try_wait: {e}")),
        }
        // Only trust the port once *our* process says it listens on it: a stranger that
        // grabbed the port in the meantime must not pass for the registry.
        if log.contains(&listening) {
            let ok = if tls {
                addr.parse::<SocketAddr>()
                    .ok()
                    .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok())
                    .is_some()
            } else {
                matches!(http_get(addr, "/v2/", None), Ok((200 | 401, _)))
            };
            if ok {
                return Ready::Yes;
            }
        }
        if Instant::now() > deadline {
            return Ready::Failed("not ready within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_openssl(dir: &Path, args: &[&OsStr]) {
    let out = Command::new(require_program("openssl"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("OPENSSL_CONF")
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {:?} failed:\n{}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA and a server certificate it signed (for TLS servers of the tests other
/// than docker-registry, e.g. the fault proxy).
#[derive(Debug, Clone)]
pub struct ThrowawayTls {
    /// The CA certificate (PEM), for `--ca-cert`.
    pub ca_cert: PathBuf,
    /// A folder holding only `ca.crt`, for skopeo's `--cert-dir`.
    pub cert_dir: PathBuf,
    /// The server certificate (PEM) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// [`make_tls`] in `base`: SANs = `hosts` + localhost + IP:127.0.0.1.
pub fn throwaway_tls(base: &Path, hosts: &[&str]) -> ThrowawayTls {
    let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let (files, cert, key) = make_tls(base, &hosts);
    ThrowawayTls {
        ca_cert: files.ca_cert,
        cert_dir: files.cert_dir,
        cert,
        key,
    }
}

/// Make a throwaway CA (CA:TRUE) and a leaf (CA:FALSE, EKU serverAuth, SANs) with the
/// openssl CLI (P-256 keys: fast, and accepted by rustls and Go). Returns the TLS files,
/// the server certificate and its key.
fn make_tls(base: &Path, hosts: &[String]) -> (TlsFiles, PathBuf, PathBuf) {
    let dir = base.join("tls");
    let cert_dir = base.join("certs.d");
    fs::create_dir_all(&dir).expect("create tls dir");
    fs::create_dir_all(&cert_dir).expect("create cert dir");

    let mut sans: Vec<String> = Vec::new();
    for h in hosts.iter().map(String::as_str).chain(["localhost"]) {
        if h.parse::<std::net::IpAddr>().is_ok() {
            if h != "127.0.0.1" {
                sans.push(format!("IP:{h}"));
            }
        } else if !sans.contains(&format!("DNS:{h}")) {
            sans.push(format!("DNS:{h}"));
        }
    }
    sans.push("IP:127.0.0.1".into());
    let cn = hosts.first().map(String::as_str).unwrap_or("127.0.0.1");

    let cnf = format!(
        "[req]\n\
         distinguished_name = dn\n\
         prompt = no\n\
         [dn]\n\
         CN = {cn}\n\
         [v3_ca]\n\
         basicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [v3_leaf]\n\
         basicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage = serverAuth\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid,issuer\n\
         subjectAltName = {}\n",
        sans.join(",")
    );
    fs::write(dir.join("openssl.cnf"), cnf).expect("write openssl.cnf");
    let serial = || {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        format!("0x{:x}", nanos ^ (u128::from(std::process::id()) << 64))
    };
    let os = |s: &str| OsStr::new(s).to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];

    // CA
    let mut args: Vec<std::ffi::OsString> = [
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "v3_ca",
    ]
    .into_iter()
    .chain(ec)
    .map(os)
    .collect();
    let ca_serial = serial();
    args.extend(
        [
            "-subj",
            "/CN=imgbuild throwaway test CA",
            "-days",
            "3650",
            "-set_serial",
            &ca_serial,
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]
        .map(os),
    );
    run_openssl(
        &dir,
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    );

    // Leaf: CSR, then signed by the CA.
    let mut args: Vec<std::ffi::OsString> = ["req", "-new", "-config", "openssl.cnf"]
        .into_iter()
        .chain(ec)
        .map(os)
        .collect();
    args.extend(["-keyout", "server.key", "-out", "server.csr"].map(os));
    run_openssl(
        &dir,
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    );
    let leaf_serial = serial();
    let args = [
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-set_serial",
        &leaf_serial,
        "-days",
        "3650",
        "-extfile",
        "openssl.cnf",
        "-extensions",
        "v3_leaf",
        "-out",
        "server.crt",
    ]
    .map(OsStr::new);
    run_openssl(&dir, &args);

    fs::copy(dir.join("ca.crt"), cert_dir.join("ca.crt")).expect("copy ca.crt to cert dir");
    (
        TlsFiles {
            ca_cert: dir.join("ca.crt"),
            cert_dir,
        },
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

fn skopeo_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(require_program("skopeo"));
    make_hermetic(&mut cmd);
    // The policy only matters for copy; the tests judge images themselves.
    cmd.arg("--insecure-policy").args(args).stdin(Stdio::null());
    cmd
}

/// Run `skopeo --insecure-policy <args>` (hermetic HOME); no assertion.
pub fn skopeo(args: &[&str]) -> Output {
    skopeo_command(args).output().expect("run skopeo")
}

/// Run `skopeo --insecure-policy <args>`, assert success (the panic shows stderr), return
/// stdout.
pub fn skopeo_ok(args: &[&str]) -> String {
    let out = skopeo(args);
    assert!(
        out.status.success(),
        "skopeo {args:?} failed with {}\n--- stderr\n{}\n--- stdout\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The exact manifest or index bytes the registry serves for `reference` (`repo:tag` or
/// `repo@sha256:...`), via `skopeo inspect --raw`.
pub fn inspect_raw(reg: &Registry, reference: &str) -> Vec<u8> {
    let target = reg.docker_ref(reference);
    let flags = reg.skopeo_args("");
    let mut args: Vec<&str> = vec!["inspect", "--raw"];
    args.extend(flags.iter().map(String::as_str));
    args.push(&target);
    let out = skopeo(&args);
    assert!(
        out.status.success(),
        "skopeo {args:?} failed with {}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The digest of a push's one stdout line `REPO@sha256:...`.
pub fn pushed_digest(stdout: &[u8]) -> String {
    let line = String::from_utf8_lossy(stdout);
    let (_, digest) = line
        .trim()
        .rsplit_once('@')
        .unwrap_or_else(|| panic!("not REPO@DIGEST: {line:?}"));
    assert!(digest.starts_with("sha256:"), "{line:?}");
    digest.to_string()
}

/// Assert that `reference` on `reg` serves exactly the manifest or index `digest`: skopeo's
/// bytes hashed by `sha256sum`.
pub fn assert_serves(reg: &Registry, reference: &str, digest: &str) {
    let raw = inspect_raw(reg, reference);
    let file = tempfile::NamedTempFile::new().expect("temp file");
    fs::write(file.path(), &raw).expect("write manifest");
    assert_eq!(
        sha256sum_of(file.path(), None),
        digest,
        "{reference} on {} serves another manifest: {}",
        reg.addr,
        String::from_utf8_lossy(&raw)
    );
}

/// `skopeo copy --all --preserve-digests docker://<reg>/<reference> oci:<dest>:<tag>`: pulls
/// everything and verifies every digest on the way. Returns skopeo's stdout.
pub fn pull_oci(reg: &Registry, reference: &str, dest: &Path, tag: &str) -> String {
    let src = reg.docker_ref(reference);
    let dst = format!("oci:{}:{tag}", dest.display());
    let flags = reg.skopeo_args("src-");
    let mut args: Vec<&str> = vec!["copy", "--all", "--preserve-digests"];
    args.extend(flags.iter().map(String::as_str));
    args.push(&src);
    args.push(&dst);
    skopeo_ok(&args)
}

// ---------------------------------------------------------------------------------------------
// Files and OCI layouts
// ---------------------------------------------------------------------------------------------

/// Recursive copy of `src` into `dst` (created). Symlinks are copied as symlinks; file
/// permissions are kept.
pub fn copy_dir(src: impl AsRef<Path>, dst: impl AsRef<Path>) {
    let (src, dst) = (src.as_ref(), dst.as_ref());
    fs::create_dir_all(dst).unwrap_or_else(|e| panic!("create {}: {e}", dst.display()));
    let entries = fs::read_dir(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    for entry in entries {
        let entry = entry.expect("read_dir entry");
        let ty = entry.file_type().expect("file type");
        let to = dst.join(entry.file_name());
        if ty.is_dir() {
            copy_dir(entry.path(), &to);
            let perm = entry.metadata().expect("metadata").permissions();
            fs::set_permissions(&to, perm).expect("set dir permissions");
        } else if ty.is_symlink() {
            let target = fs::read_link(entry.path()).expect("read_link");
            std::os::unix::fs::symlink(&target, &to)
                .unwrap_or_else(|e| panic!("symlink {}: {e}", to.display()));
        } else {
            fs::copy(entry.path(), &to).unwrap_or_else(|e| {
                panic!("copy {} -> {}: {e}", entry.path().display(), to.display())
            });
        }
    }
}

fn collect_paths(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if fs::symlink_metadata(dir)
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            collect_paths(&entry.expect("read_dir entry").path(), out);
        }
    }
}

/// Set atime and mtime of `dir` and everything under it (symlinks themselves, not their
/// targets) to `secs` since the epoch, with `touch -h -d @SECS`.
pub fn set_mtime_recursive(dir: impl AsRef<Path>, secs: i64) {
    let mut paths = Vec::new();
    collect_paths(dir.as_ref(), &mut paths);
    // Children first, so touching a directory last is never undone (it isn't anyway:
    // touch changes no directory entries).
    paths.reverse();
    for chunk in paths.chunks(500) {
        let out = Command::new("touch")
            .arg("-h")
            .arg("-d")
            .arg(format!("@{secs}"))
            .arg("--")
            .args(chunk)
            .output()
            .expect("run touch");
        assert!(
            out.status.success(),
            "touch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `<oci_dir>/blobs/<alg>/<hex>` for a digest `alg:hex`.
pub fn blob_path(oci_dir: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("not a digest: {digest:?}"));
    oci_dir.join("blobs").join(alg).join(hex)
}

/// The bytes of a blob of an OCI layout.
pub fn read_blob(oci_dir: &Path, digest: &str) -> Vec<u8> {
    let p = blob_path(oci_dir, digest);
    fs::read(&p).unwrap_or_else(|e| panic!("read blob {}: {e}", p.display()))
}

/// The tar flag that decompresses a blob, from its magic bytes.
fn tar_compression_flag(blob: &Path) -> Option<&'static str> {
    let mut magic = [0u8; 4];
    let n = fs::File::open(blob)
        .and_then(|mut f| f.read(&mut magic))
        .unwrap_or_else(|e| panic!("read {}: {e}", blob.display()));
    match &magic[..n] {
        [0x1f, 0x8b, ..] => Some("-z"),
        [0x28, 0xb5, 0x2f, 0xfd] => Some("--zstd"),
        _ => None,
    }
}

fn tar_command() -> Command {
    let mut cmd = Command::new("tar");
    cmd.env("TZ", "UTC").env("LC_ALL", "C").stdin(Stdio::null());
    cmd
}

/// Extract every layer of the image manifest `manifest_digest` (`sha256:...`) of the OCI
/// layout `oci_dir` into `dest`, in order, with the system tar (`--numeric-owner`; as root
/// owners and modes are preserved). Gzip and zstd layers are recognised by their bytes.
pub fn unpack_layers(oci_dir: &Path, manifest_digest: &str, dest: &Path) {
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(oci_dir, manifest_digest))
        .unwrap_or_else(|e| panic!("manifest {manifest_digest} is not JSON: {e}"));
    let layers = manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest {manifest_digest} has no layers array: {manifest}"));
    fs::create_dir_all(dest).unwrap_or_else(|e| panic!("create {}: {e}", dest.display()));
    for layer in layers {
        let digest = layer["digest"]
            .as_str()
            .unwrap_or_else(|| panic!("layer without digest: {layer}"));
        let blob = blob_path(oci_dir, digest);
        let mut cmd = tar_command();
        cmd.arg("-x");
        if let Some(flag) = tar_compression_flag(&blob) {
            cmd.arg(flag);
        }
        cmd.arg("-f")
            .arg(&blob)
            .arg("--numeric-owner")
            .arg("-C")
            .arg(dest);
        run_ok(&mut cmd);
    }
}

/// `sha256sum` of a file, as `sha256:<hex>`, or of `decompress -dc FILE` piped to `sha256sum`
/// when `decompress` is given (`gzip`, `zstd`): digests computed by standard tools, not by
/// the crate under test.
pub fn sha256sum_of(file: &Path, decompress: Option<&str>) -> String {
    let script = match decompress {
        Some(tool) => format!("set -o pipefail; {tool} -dc -- \"$1\" | sha256sum"),
        None => "sha256sum -- \"$1\"".to_string(),
    };
    let out = run_ok(
        Command::new("bash")
            .args(["-c", &script, "bash"])
            .arg(file)
            .stdin(Stdio::null()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    assert_eq!(hex.len(), 64, "sha256sum printed {text:?}");
    format!("sha256:{hex}")
}

/// Check every image of the index `index_digest` in the OCI layout `oci_dir` with standard
/// tools only: each layer blob's `sha256sum` is its digest, and `gzip -dc` / `zstd -dc` (by
/// the layer's media type) piped to `sha256sum` is the config's `rootfs.diff_ids` entry at
/// the same position; the config blob's `sha256sum` is the manifest's config digest. Returns
/// (images, layers) checked, so callers can assert nothing was left out.
pub fn verify_digests_with_standard_tools(oci_dir: &Path, index_digest: &str) -> (usize, usize) {
    let json = |digest: &str| -> serde_json::Value {
        let path = blob_path(oci_dir, digest);
        assert_eq!(sha256sum_of(&path, None), digest, "blob {}", path.display());
        serde_json::from_slice(&read_blob(oci_dir, digest))
            .unwrap_or_else(|e| panic!("{digest} is not JSON: {e}"))
    };
    let index = json(index_digest);
    let manifests = index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests in {index}"));
    let mut layers_checked = 0;
    for m in manifests {
        let manifest = json(m["digest"].as_str().expect("manifest digest"));
        let config = json(
            manifest["config"]["digest"]
                .as_str()
                .expect("config digest"),
        );
        let layers = manifest["layers"].as_array().expect("layers");
        let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
        assert_eq!(layers.len(), diff_ids.len(), "{manifest}\n{config}");
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let digest = layer["digest"].as_str().expect("layer digest");
            let blob = blob_path(oci_dir, digest);
            assert_eq!(sha256sum_of(&blob, None), digest, "layer blob {digest}");
            assert_eq!(
                fs::metadata(&blob).unwrap().len(),
                layer["size"].as_u64().expect("layer size"),
                "size of {digest}"
            );
            let media_type = layer["mediaType"].as_str().expect("media type");
            let tool = match media_type.rsplit_once('+') {
                Some((_, "gzip")) => Some("gzip"),
                Some((_, "zstd")) => Some("zstd"),
                None => None,
                Some((_, other)) => panic!("unknown layer compression {other} in {media_type}"),
            };
            assert_eq!(
                sha256sum_of(&blob, tool),
                diff_id.as_str().expect("diff_id"),
                "diff_id of layer {digest} ({media_type})"
            );
            layers_checked += 1;
        }
    }
    (manifests.len(), layers_checked)
}

/// `tar -tv --numeric-owner` of a layer blob (gzip, zstd or plain), in UTC and the C locale.
pub fn tar_listing(layer_blob: &Path) -> String {
    let mut cmd = tar_command();
    cmd.arg("-tv");
    if let Some(flag) = tar_compression_flag(layer_blob) {
        cmd.arg(flag);
    }
    cmd.arg("-f").arg(layer_blob).arg("--numeric-owner");
    String::from_utf8_lossy(&run_ok(&mut cmd).stdout).into_owned()
}

/// The skip rules themselves: CI turns a skip into a failure unless allowed by name.
#[test]
fn harness_skips_fail_in_ci_unless_allowed() {
    use SkipDecision::{Fail, Skip};
    let cases: &[(&str, Option<&str>, Option<&str>, SkipDecision)] = &[
        ("docker", None, None, Skip),
        ("docker", Some(""), None, Skip),
        ("docker", Some("false"), None, Skip),
        ("docker", Some("0"), None, Skip),
        ("docker", Some("true"), None, Fail),
        ("docker", Some("1"), None, Fail),
        ("docker", Some("true"), Some("docker"), Skip),
        ("docker", Some("true"), Some("qemu, docker"), Skip),
        ("docker", Some("true"), Some("all"), Skip),
        ("docker", Some("true"), Some("qemu"), Fail),
        ("docker", Some("true"), Some("dockerx"), Fail),
        ("qemu", Some("true"), Some(""), Fail),
    ];
    for &(prereq, ci, allow, want) in cases {
        assert_eq!(
            skip_decision(prereq, ci, allow),
            want,
            "{prereq} {ci:?} {allow:?}"
        );
    }
    for (reason, want) in [
        (
            "docker not available: the amd64 image was not run",
            "docker",
        ),
        ("no Docker Engine answers", "docker"),
        ("qemu-aarch64-static not installed", "qemu"),
        ("curl not installed: TLS checked with skopeo only", "curl"),
        ("not an x86_64 host", "x86_64-host"),
        ("setpriv missing", "setpriv"),
    ] {
        assert_eq!(prereq_of(reason), want, "{reason}");
    }
}

/// `len` reproducible bytes (seed `x`) that do not compress (xorshift64*), so a layer is about as large as its file.
pub fn noise(len: usize, mut x: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The image index that the first entry of the layout `oci_dir`'s `index.json` names.
pub fn top_index(oci_dir: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(oci_dir.join("index.json")).unwrap()).unwrap();
    let top = index["manifests"][0]["digest"].as_str().unwrap();
    serde_json::from_slice(&read_blob(oci_dir, top)).unwrap()
}
