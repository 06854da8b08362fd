//! A fault-injecting HTTP proxy for the integration tests: it sits between imgbuild
//! and a real docker-registry and, by a seeded schedule, answers some requests itself with
//! 5xx, 429 + `Retry-After`, a reset in the middle of the request or response body, a stall
//! beyond the client's timeout, or a 401 on a request that carried a valid token.
//!
//! It also plays the parts docker-registry cannot: a Bearer token server (`/token`, with the
//! `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge on `/v2/`), a web
//! server answering HTML, a registry that lies in `Docker-Content-Digest`, a registry that
//! redirects blob requests to another host, a registry that stops answering (for kill -9),
//! and the OCI 1.1 referrers API ([`ProxyOpts::referrers_api`]: docker-registry 2.8 stores
//! manifests with a `subject` but cannot list them; no registry with the API installs here).
//!
//! The schedule is deterministic per request *kind*, not per arrival order, so concurrent
//! uploads see the same faults in every run: a request's key is its method and path with the
//! upload session id removed; the n-th occurrence of a key is faulted when
//! `hash(seed, key, n) % one_in == 0` and the key has had fewer than `max_per_key` faults (so
//! every request eventually passes and `--retries` bounds the run). Which fault is injected
//! cycles through [`ProxyOpts::kinds`], so every kind shows up in a run with enough faults.
//!
//! It can serve TLS (`tls_hosts`: a throwaway CA, rustls) in front of the plain registry, and
//! lie in the ways a registry can: an upload `Location` or a blob redirect to plain http, an
//! upload session in another repository, a manifest answer without (or with another)
//! `Docker-Content-Digest`, Bearer tokens that expire after a few seconds, and ECR's
//! `NAME_UNKNOWN` until the repository exists in moto.
//!
//! Plain std: one thread per connection, one request per connection (`Connection: close` both
//! ways), request bodies buffered (tests use small blobs).

use crate::harness::{ThrowawayTls, throwaway_tls};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Answer this status (500, 502, 503, 504) with a distribution-spec error body.
    Status(u16),
    /// 429 with `Retry-After: 1` (seconds) or an HTTP date one second ahead.
    TooMany { http_date: bool },
    /// Read half the request body (or none), then close the connection without answering.
    ResetRequest,
    /// Forward the request (the registry acts on it), then send half the answer and close.
    ResetResponse,
    /// Hold the request for [`ProxyOpts::stall`] (beyond the client's timeout), then close.
    Stall,
    /// 401 with a fresh challenge although the request's token was valid (a token that
    /// expired mid-push). Bearer mode only (elsewhere a 503 instead); never twice in a row
    /// for one request key (that request passes and the next fault is the 401).
    Unauthorized,
}

/// Every fault kind, for a scenario that wants them all.
pub const ALL_FAULTS: &[Fault] = &[
    Fault::Status(500),
    Fault::TooMany { http_date: false },
    Fault::ResetRequest,
    Fault::Status(502),
    Fault::Unauthorized,
    Fault::ResetResponse,
    Fault::Status(503),
    Fault::TooMany { http_date: true },
    Fault::Stall,
    Fault::Status(504),
];

/// What the proxy does besides forwarding.
#[derive(Debug, Clone)]
pub struct ProxyOpts {
    pub seed: u64,
    /// Fault about one request in `one_in` (0 = never).
    pub one_in: u64,
    /// Faults to cycle through.
    pub kinds: Vec<Fault>,
    /// At most this many faults per request key (u32::MAX: a permanent failure).
    pub max_per_key: u32,
    /// How long a [`Fault::Stall`] holds the request.
    pub stall: Duration,
    /// Act as a Bearer token registry; `Some(Some((user, pass)))` also requires Basic
    /// credentials at the token endpoint.
    pub bearer: Option<Option<(String, String)>>,
    /// Answer every request with `200 text/html` (a web server, not a registry).
    pub html: bool,
    /// Replace `Docker-Content-Digest` in answers to PUT with another digest.
    pub wrong_digest: bool,
    /// Redirect the first blob HEAD to this origin (e.g. `http://127.0.0.2:PORT`; `self`: to
    /// this proxy, a loop with `redirect_every_blob_head`).
    pub redirect_blob_head_to: Option<String>,
    /// With `redirect_blob_head_to`: redirect every blob HEAD, not only the first.
    pub redirect_every_blob_head: bool,
    /// Requests numbered from this one on (0-based) are held until the proxy is dropped.
    pub hang_from: Option<usize>,
    /// Answer this many blob-upload PUTs `201 Created` with the right digest but drop them
    /// (a registry that loses what it acknowledged).
    pub lose_puts: usize,
    /// Read request bodies at most this many bytes per second (a slow registry).
    pub read_rate: Option<u64>,
    /// Read this many bytes of a blob-upload PUT (or PATCH) body, then stop reading (and
    /// answering) until the client gives up (a registry that stops reading).
    pub stop_reading_after: Option<usize>,
    /// Answer every manifest PUT `403 DENIED` (a credential that may upload blobs but not
    /// write manifests or tags): an authorization failure in the middle of a push.
    pub deny_manifest_puts: bool,
    /// Answer every blob-upload POST `404 NAME_UNKNOWN` (what ECR answers for a repository
    /// that does not exist).
    pub name_unknown: bool,
    /// Read request bodies larger than 64 KiB in 64 KiB pieces, pausing this long after
    /// each: a slow link on which an upload keeps making progress.
    pub throttle: Option<Duration>,
    /// Hold every request this long before acting on it: a registry one round trip of this
    /// length away (a CI runner is 20-80 ms from its registry). With [`Seen::end`], the
    /// requests' order in time shows how many round trips a push waits for
    /// ([`critical_path`]).
    pub delay: Option<Duration>,
    /// Answer requests with this method whose target contains this text `403 DENIED`.
    pub deny: Option<(String, String)>,
    /// Serve TLS with a leaf for these names (plus localhost and 127.0.0.1) signed by a
    /// throwaway CA ([`Proxy::tls`]); plain http is then refused, as on a TLS port.
    pub tls_hosts: Option<Vec<String>>,
    /// Bearer mode: a token is valid this long after it was issued (`expires_in` says so),
    /// judged when a request's head arrives, as a registry's auth middleware does.
    pub token_ttl: Option<Duration>,
    /// Rewrite the `Location` of every upload-session answer (POST 202) to this origin (e.g.
    /// `http://127.0.0.2:PORT`), keeping its path and query.
    pub upload_location_to: Option<String>,
    /// Redirect every blob GET to this origin, keeping the path.
    pub redirect_blob_get_to: Option<String>,
    /// Open every upload session (POST without `mount=`) in this repository instead of the
    /// one asked for: the `Location` names another repository, the PUT lands there.
    pub upload_to_repo: Option<String>,
    /// Drop `Docker-Content-Digest` from answers to manifest PUTs.
    pub no_manifest_digest: bool,
    /// Replace `Docker-Content-Digest` in answers to manifest PUTs (blob PUTs stay true).
    pub wrong_manifest_digest: bool,
    /// ECR without the repository: answer blob and manifest requests of a repository `404
    /// NAME_UNKNOWN` until moto (this URL) says it exists (DescribeRepositories).
    pub name_unknown_until_in_moto: Option<String>,
    /// Answer `GET /v2/<name>/referrers/<digest>` (distribution-spec 1.1 "Listing
    /// Referrers") from the manifests with a `subject` that were PUT through the proxy and
    /// accepted by the registry, with `?artifactType=` filtering; answer such PUTs with
    /// `OCI-Subject`.
    pub referrers_api: bool,
    /// (method, n, fault): the n-th request (0-based) with this method gets this fault,
    /// whatever the seeded schedule says (e.g. the second PATCH of a chunked upload).
    pub fault_nth: Vec<(String, usize, Fault)>,
    /// Answer PATCHes with this `Range` instead of the registry's (a registry that lost a
    /// chunk).
    pub patch_range: Option<String>,
}

impl Default for ProxyOpts {
    fn default() -> Self {
        ProxyOpts {
            seed: 1,
            one_in: 0,
            kinds: ALL_FAULTS.to_vec(),
            max_per_key: 2,
            stall: Duration::from_millis(1500),
            bearer: None,
            html: false,
            wrong_digest: false,
            redirect_blob_head_to: None,
            redirect_every_blob_head: false,
            hang_from: None,
            lose_puts: 0,
            read_rate: None,
            stop_reading_after: None,
            deny_manifest_puts: false,
            name_unknown: false,
            throttle: None,
            delay: None,
            deny: None,
            tls_hosts: None,
            token_ttl: None,
            upload_location_to: None,
            redirect_blob_get_to: None,
            upload_to_repo: None,
            no_manifest_digest: false,
            wrong_manifest_digest: false,
            name_unknown_until_in_moto: None,
            referrers_api: false,
            fault_nth: Vec::new(),
            patch_range: None,
        }
    }
}

/// Blob PUTs acknowledged and dropped so far (see [`ProxyOpts::lose_puts`]).
impl Proxy {
    pub fn lost(&self) -> usize {
        self.state.lock().unwrap().lost
    }
}

/// One request the proxy saw (fields shown through `Debug` in assertion messages).
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub key: String,
    pub authorization: Option<String>,
    pub fault: Option<Fault>,
    /// When the request's head arrived.
    pub at: std::time::Instant,
    /// When the proxy was done with it (answered, or gave up); None while it is going on.
    pub end: Option<std::time::Instant>,
    /// It carried a Bearer token that had expired ([`ProxyOpts::token_ttl`]).
    pub expired: bool,
    /// Its `Content-Range` header (chunked uploads).
    pub content_range: Option<String>,
}

/// The most requests of `seen` that ran one after another (each started after the one before
/// had ended), counting only requests `wanted` and chains ending in one `last` accepts: the
/// round trips a client waited for, when every request takes at least the proxy's
/// [`ProxyOpts::delay`] and a client's own work between requests is much shorter (requests
/// of one wave start together, so none of them ends before another starts).
pub fn critical_path(
    seen: &[Seen],
    wanted: impl Fn(&Seen) -> bool,
    last: impl Fn(&Seen) -> bool,
) -> usize {
    let mut reqs: Vec<&Seen> = seen.iter().filter(|s| wanted(s)).collect();
    reqs.sort_by_key(|s| s.at);
    // depth[i]: the longest chain ending with reqs[i].
    let mut depth = vec![1usize; reqs.len()];
    for i in 0..reqs.len() {
        for j in 0..i {
            if reqs[j].end.is_some_and(|e| e <= reqs[i].at) {
                depth[i] = depth[i].max(depth[j] + 1);
            }
        }
    }
    reqs.iter()
        .zip(&depth)
        .filter(|(s, _)| last(s))
        .map(|(_, d)| *d)
        .max()
        .unwrap_or(0)
}

/// Marks a request ended when dropped (every way out of `serve`).
struct Ended<'a> {
    state: &'a Mutex<State>,
    seq: usize,
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock()
            && let Some(s) = st.seen.get_mut(self.seq)
        {
            s.end = Some(std::time::Instant::now());
        }
    }
}

/// One request to the token endpoint: method, Authorization header, body (the form of a POST).
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    pub target: String,
    pub authorization: Option<String>,
    pub body: String,
}

#[derive(Debug, Default)]
struct State {
    seen: Vec<Seen>,
    occurrences: HashMap<String, u64>,
    faults_per_key: HashMap<String, u32>,
    last_was_401: HashSet<String>,
    faults: usize,
    tokens: Vec<String>,
    /// When each token was issued.
    issued: HashMap<String, Instant>,
    token_requests: Vec<TokenRequest>,
    redirected: bool,
    lost: usize,
    /// Repositories moto said exist ([`ProxyOpts::name_unknown_until_in_moto`]).
    known_repos: HashSet<String>,
    name_unknown_answers: usize,
    /// (repository, subject digest) -> descriptors of its referrers, in PUT order.
    referrers: HashMap<(String, String), Vec<serde_json::Value>>,
    /// Requests seen per method ([`ProxyOpts::fault_nth`]).
    per_method: HashMap<String, usize>,
}

/// A running proxy on `127.0.0.1:PORT`; stops on drop.
#[derive(Debug)]
pub struct Proxy {
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// The CA and certificate, when it serves TLS.
    pub tls: Option<ThrowawayTls>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    _dir: Option<tempfile::TempDir>,
}

struct Shared {
    upstream: String,
    own: String,
    opts: ProxyOpts,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

/// A rustls server configuration for `tls`'s certificate and key.
fn server_config(tls: &ThrowawayTls) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .expect("read the proxy certificate")
        .collect::<Result<_, _>>()
        .expect("parse the proxy certificate");
    let key = PrivateKeyDer::from_pem_file(&tls.key).expect("read the proxy key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the proxy's certificate and key");
    Arc::new(config)
}

impl Proxy {
    /// Start a proxy in front of `upstream` (`127.0.0.1:PORT` of a plain-http registry).
    pub fn start(upstream: &str, opts: ProxyOpts) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, tls) = match &opts.tls_hosts {
            Some(hosts) => {
                let dir = tempfile::tempdir().expect("proxy TLS dir");
                let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
                let tls = throwaway_tls(dir.path(), &hosts);
                (Some(dir), Some(tls))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            own: addr.clone(),
            opts,
            tls: tls.as_ref().map(server_config),
            state: Arc::clone(&state),
            stop: Arc::clone(&stop),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = handle(&shared, conn);
                });
            }
        });
        Proxy {
            addr,
            tls,
            state,
            stop,
            _dir: dir,
        }
    }

    /// Requests answered NAME_UNKNOWN ([`ProxyOpts::name_unknown_until_in_moto`]).
    pub fn name_unknown_answers(&self) -> usize {
        self.state.lock().unwrap().name_unknown_answers
    }

    /// The CA certificate to trust (TLS mode only).
    pub fn ca_cert(&self) -> std::path::PathBuf {
        self.tls.as_ref().expect("a TLS proxy").ca_cert.clone()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Tokens the token endpoint handed out.
    pub fn tokens(&self) -> Vec<String> {
        self.state.lock().unwrap().tokens.clone()
    }

    /// Every request to the token endpoint.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().token_requests.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(&self.addr);
    }
}

struct Request {
    method: String,
    target: String,
    /// (name, value) in arrival order.
    headers: Vec<(String, String)>,
    content_length: usize,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let content_length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    Ok(Some(Request {
        method,
        target,
        headers,
        content_length,
    }))
}

/// The schedule key: method and path, with the upload session id dropped and the `digest=`
/// parameter kept (one key per blob PUT, whatever the session).
fn key_of(method: &str, target: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(at) = path.find("/blobs/uploads/") {
        let digest = query
            .split('&')
            .find(|p| p.starts_with("digest="))
            .unwrap_or("");
        return format!("{method} {}/blobs/uploads/ {digest}", &path[..at]);
    }
    format!("{method} {path}")
}

fn hash3(seed: u64, key: &str, n: u64) -> u64 {
    // DefaultHasher with no random keys: SipHash-1-3 with fixed zero keys, stable in a build.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(seed, 0x5eed);
    key.hash(&mut h);
    n.hash(&mut h);
    h.finish()
}

fn respond(conn: &mut impl Write, status: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        307 => "Temporary Redirect",
        403 => "Forbidden",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Other",
    }
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), from imgbuild's own RFC 3339 formatter.
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let iso = imgbuild::image::rfc3339(secs); // 1994-11-06T08:49:37Z
    let (y, m, d, time) = (&iso[0..4], &iso[5..7], &iso[8..10], &iso[11..19]);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(secs / 86_400 % 7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][m.parse::<usize>().unwrap() - 1];
    format!("{wd}, {d} {mon} {y} {time} GMT")
}

fn challenge(shared: &Shared, target: &str) -> (&'static str, String) {
    let scope = target
        .strip_prefix("/v2/")
        .and_then(|rest| {
            ["/blobs/", "/manifests/"]
                .iter()
                .find_map(|m| rest.find(m).map(|at| &rest[..at]))
        })
        .map(|name| format!(",scope=\"repository:{name}:pull,push\""))
        .unwrap_or_default();
    let scheme = if shared.tls.is_some() {
        "https"
    } else {
        "http"
    };
    (
        "WWW-Authenticate",
        format!(
            "Bearer realm=\"{scheme}://{}/token\",service=\"imgbuild-proxy\"{scope}",
            shared.own
        ),
    )
}

/// One accepted connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn handle(shared: &Shared, tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    // The client tries https first (even on loopback): a plain proxy refuses a TLS handshake
    // at once, as a plain-http registry's port would, so it falls back to http without
    // waiting; a TLS proxy closes plain-http connections.
    let mut first = [0u8; 1];
    if tcp.peek(&mut first)? == 0 || (first[0] == 0x16) != shared.tls.is_some() {
        return Ok(());
    }
    let raw = tcp.try_clone()?;
    let conn = match &shared.tls {
        Some(config) => {
            let server =
                rustls::ServerConnection::new(Arc::clone(config)).map_err(std::io::Error::other)?;
            Conn::Tls(Box::new(rustls::StreamOwned::new(server, tcp)))
        }
        None => Conn::Plain(tcp),
    };
    let mut reader = BufReader::new(conn);
    let result = serve(shared, &mut reader, &raw);
    if let Conn::Tls(s) = reader.get_mut() {
        s.conn.send_close_notify();
        let _ = s.flush();
    }
    result
}

/// Ask moto whether ECR repository `name` exists (DescribeRepositories; moto does not check
/// signatures, the credential scope only picks the region).
fn moto_has_repository(moto: &str, name: &str) -> bool {
    let addr = moto.trim_start_matches("http://").trim_end_matches('/');
    let body = format!("{{\"registryId\":\"123456789012\",\"repositoryNames\":[\"{name}\"]}}");
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-amz-json-1.1\r\n\
         X-Amz-Target: AmazonEC2ContainerRegistry_V20150921.DescribeRepositories\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=AKIAPROXY/20260101/us-east-1/ecr/aws4_request, SignedHeaders=host, Signature=0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

/// The repository name of a `/v2/<name>/(blobs|manifests)/...` target.
fn repo_of(target: &str) -> Option<&str> {
    let rest = target.strip_prefix("/v2/")?;
    ["/blobs/", "/manifests/"]
        .iter()
        .find_map(|m| rest.find(m).map(|at| &rest[..at]))
}

/// The path and query of a `Location` value (absolute or not).
fn path_of(location: &str) -> &str {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
        None => location,
    }
}

/// Answer one request read from `reader` (answers go to `reader.get_mut()`; `raw` is the
/// TCP socket under it, for resets).
fn serve(shared: &Shared, reader: &mut BufReader<Conn>, raw: &TcpStream) -> std::io::Result<()> {
    let Some(req) = read_head(reader)? else {
        return Ok(());
    };
    let opts = &shared.opts;
    let authorization = req.header("authorization").map(str::to_string);
    let key = key_of(&req.method, &req.target);
    let is_token = req.target.starts_with("/token");

    // Decide everything under the lock, act after it.
    let (seq, fault, valid_token) = {
        let mut st = shared.state.lock().unwrap();
        let seq = st.seen.len();
        let presented = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| st.issued.get(t));
        let expired =
            presented.is_some_and(|at| opts.token_ttl.is_some_and(|ttl| at.elapsed() >= ttl));
        let valid_token = presented.is_some() && !expired;
        let mut fault = None;
        let n = {
            let c = st.occurrences.entry(key.clone()).or_default();
            *c += 1;
            *c
        };
        let needs_auth = opts.bearer.is_some() && !valid_token;
        if opts.one_in > 0
            && !is_token
            && !opts.html
            && !needs_auth
            && !opts.kinds.is_empty()
            && st.faults_per_key.get(&key).copied().unwrap_or(0) < opts.max_per_key
            && hash3(opts.seed, &key, n).is_multiple_of(opts.one_in)
        {
            let mut kind = Some(opts.kinds[st.faults % opts.kinds.len()]);
            if kind == Some(Fault::Unauthorized) {
                if opts.bearer.is_none() {
                    kind = Some(Fault::Status(503));
                } else if st.last_was_401.contains(&key) {
                    // Not twice in a row for one request: this one passes, and the 401
                    // stays next in the cycle. (Substituting another kind here would make
                    // which kinds a run sees depend on arrival order: with the cycle
                    // untouched, any run with at least `kinds.len()` faults sees them all.)
                    kind = None;
                }
            }
            if let Some(kind) = kind {
                st.faults += 1;
                *st.faults_per_key.entry(key.clone()).or_default() += 1;
                fault = Some(kind);
            }
        }
        let nth = {
            let c = st.per_method.entry(req.method.clone()).or_default();
            *c += 1;
            *c - 1
        };
        if let Some((_, _, f)) = opts
            .fault_nth
            .iter()
            .find(|(m, n, _)| *m == req.method && *n == nth)
        {
            st.faults += 1;
            fault = Some(*f);
        }
        if fault == Some(Fault::Unauthorized) {
            st.last_was_401.insert(key.clone());
        } else {
            st.last_was_401.remove(&key);
        }
        st.seen.push(Seen {
            method: req.method.clone(),
            target: req.target.clone(),
            key: key.clone(),
            authorization: authorization.clone(),
            fault,
            at: std::time::Instant::now(),
            end: None,
            expired,
            content_range: req.header("content-range").map(str::to_string),
        });
        (seq, fault, valid_token)
    };
    let _ended = Ended {
        state: &shared.state,
        seq,
    };
    if let Some(delay) = opts.delay {
        std::thread::sleep(delay);
    }

    if opts.hang_from.is_some_and(|from| seq >= from) {
        while !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        return Ok(());
    }
    if fault == Some(Fault::ResetRequest) {
        let mut half = vec![0; req.content_length / 2];
        let _ = reader.read_exact(&mut half);
        let _ = raw.shutdown(Shutdown::Both);
        return Ok(());
    }
    let mut body = vec![0; req.content_length];
    // Blob bytes go in PUTs, and in PATCHes for a layer uploaded while it is compressed.
    let upload_put =
        (req.method == "PUT" || req.method == "PATCH") && req.target.contains("/blobs/uploads/");
    match (opts.stop_reading_after, opts.read_rate, opts.throttle) {
        (Some(n), _, _) if upload_put && req.content_length > n => {
            reader.read_exact(&mut body[..n])?;
            while !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        (_, Some(rate), _) => {
            // 10 slices a second, each rate/10 bytes.
            let slice = usize::try_from(rate / 10).unwrap_or(usize::MAX).max(1);
            for part in body.chunks_mut(slice) {
                reader.read_exact(part)?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        (_, _, Some(pause)) if body.len() > 64 << 10 => {
            for piece in body.chunks_mut(64 << 10) {
                reader.read_exact(piece)?;
                std::thread::sleep(pause);
            }
        }
        _ => reader.read_exact(&mut body)?,
    }

    if opts.html {
        let page = b"<!DOCTYPE html><html><head><title>Welcome</title></head><body>Welcome to our network. Please log in.</body></html>";
        let ct = ("Content-Type", "text/html; charset=utf-8".to_string());
        respond(reader.get_mut(), 200, &[ct], page);
        return Ok(());
    }
    if is_token {
        shared
            .state
            .lock()
            .unwrap()
            .token_requests
            .push(TokenRequest {
                method: req.method.clone(),
                target: req.target.clone(),
                authorization: authorization.clone(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        if let Some(Some((user, pass))) = &opts.bearer {
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            );
            if authorization.as_deref() != Some(want.as_str()) {
                respond(
                    reader.get_mut(),
                    401,
                    &[],
                    b"{\"details\":\"bad credentials\"}",
                );
                return Ok(());
            }
        }
        let token = {
            let mut st = shared.state.lock().unwrap();
            let t = format!("proxytoken-{}-{}-Zq8sEcReT", opts.seed, st.tokens.len());
            st.tokens.push(t.clone());
            st.issued.insert(t.clone(), Instant::now());
            t
        };
        let expires_in = opts.token_ttl.map_or(300, |t| t.as_secs().max(1));
        let json = format!("{{\"token\":\"{token}\",\"expires_in\":{expires_in}}}");
        let ct = ("Content-Type", "application/json".to_string());
        respond(reader.get_mut(), 200, &[ct], json.as_bytes());
        return Ok(());
    }
    if opts.bearer.is_some() && !valid_token {
        let ch = challenge(shared, &req.target);
        respond(
            reader.get_mut(),
            401,
            &[(ch.0, ch.1)],
            b"{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}",
        );
        return Ok(());
    }
    match fault {
        Some(Fault::Status(s)) => {
            let ct = ("Content-Type", "application/json".to_string());
            respond(
                reader.get_mut(),
                s,
                &[ct],
                b"{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"injected fault\"}]}",
            );
            return Ok(());
        }
        Some(Fault::TooMany { http_date: d }) => {
            let after = if d {
                http_date(SystemTime::now() + Duration::from_secs(1))
            } else {
                "1".into()
            };
            respond(
                reader.get_mut(),
                429,
                &[("Retry-After", after)],
                b"{\"errors\":[{\"code\":\"TOOMANYREQUESTS\",\"message\":\"slow down\"}]}",
            );
            return Ok(());
        }
        Some(Fault::Stall) => {
            std::thread::sleep(opts.stall);
            let _ = raw.shutdown(Shutdown::Both);
            return Ok(());
        }
        Some(Fault::Unauthorized) => {
            let ch = challenge(shared, &req.target);
            respond(reader.get_mut(), 401, &[(ch.0, ch.1)], b"");
            return Ok(());
        }
        _ => {}
    }
    if opts.name_unknown && req.method == "POST" && req.target.contains("/blobs/uploads/") {
        let ct = ("Content-Type", "application/json".to_string());
        respond(
            reader.get_mut(),
            404,
            &[ct],
            b"{\"errors\":[{\"code\":\"NAME_UNKNOWN\",\"message\":\"The repository with name 'missing/app' does not exist in the registry with id '123456789012'\"}]}",
        );
        return Ok(());
    }
    if let Some(moto) = &opts.name_unknown_until_in_moto
        && let Some(name) = repo_of(&req.target)
    {
        let known = shared.state.lock().unwrap().known_repos.contains(name);
        if !known && !moto_has_repository(moto, name) {
            // What ECR answers for a repository that does not exist (a HEAD has no body).
            let body = format!(
                "{{\"errors\":[{{\"code\":\"NAME_UNKNOWN\",\"message\":\"The repository with name '{name}' does not exist in the registry with id '123456789012'\"}}]}}"
            );
            let body = if req.method == "HEAD" { "" } else { &body };
            shared.state.lock().unwrap().name_unknown_answers += 1;
            let ct = ("Content-Type", "application/json".to_string());
            respond(reader.get_mut(), 404, &[ct], body.as_bytes());
            return Ok(());
        }
        shared
            .state
            .lock()
            .unwrap()
            .known_repos
            .insert(name.to_string());
    }
    let denied = opts
        .deny
        .as_ref()
        .is_some_and(|(m, text)| req.method == *m && req.target.contains(text.as_str()));
    if denied
        || (opts.deny_manifest_puts && req.method == "PUT" && req.target.contains("/manifests/"))
    {
        let ct = ("Content-Type", "application/json".to_string());
        respond(
            reader.get_mut(),
            403,
            &[ct],
            b"{\"errors\":[{\"code\":\"DENIED\",\"message\":\"requested access to the resource is denied\"}]}",
        );
        return Ok(());
    }
    if let Some(to) = &opts.redirect_blob_head_to
        && req.method == "HEAD"
        && req.target.contains("/blobs/sha256:")
    {
        let first = {
            let mut st = shared.state.lock().unwrap();
            !std::mem::replace(&mut st.redirected, true)
        };
        if first || opts.redirect_every_blob_head {
            // "self": back to this proxy, i.e. a redirect loop.
            let to = if to == "self" {
                format!("http://{}", shared.own)
            } else {
                to.clone()
            };
            respond(
                reader.get_mut(),
                307,
                &[("Location", format!("{to}{}", req.target))],
                b"",
            );
            return Ok(());
        }
    }

    if let Some(to) = &opts.redirect_blob_get_to
        && req.method == "GET"
        && req.target.contains("/blobs/sha256:")
    {
        let location = format!("{to}{}", req.target);
        respond(reader.get_mut(), 307, &[("Location", location)], b"");
        return Ok(());
    }

    if req.method == "PUT" && key.contains("/blobs/uploads/ digest=") {
        let lose = {
            let mut st = shared.state.lock().unwrap();
            let lose = st.lost < opts.lose_puts;
            st.lost += usize::from(lose);
            lose
        };
        if lose {
            let digest = key.rsplit_once("digest=").unwrap().1.replace("%3A", ":");
            let location = format!(
                "{}{digest}",
                &req.target[..req.target.find("/uploads/").unwrap() + 1]
            );
            respond(
                reader.get_mut(),
                201,
                &[("Docker-Content-Digest", digest), ("Location", location)],
                b"",
            );
            return Ok(());
        }
    }

    if opts.referrers_api
        && req.method == "GET"
        && let Some((name, subject, artifact_type)) = referrers_request(&req.target)
    {
        let list: Vec<serde_json::Value> = shared
            .state
            .lock()
            .unwrap()
            .referrers
            .get(&(name, subject))
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| {
                artifact_type
                    .as_ref()
                    .is_none_or(|t| d["artifactType"] == t.as_str())
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": list,
        });
        let mut headers = vec![(
            "Content-Type",
            "application/vnd.oci.image.index.v1+json".to_string(),
        )];
        if artifact_type.is_some() {
            headers.push(("OCI-Filters-Applied", "artifactType".to_string()));
        }
        respond(
            reader.get_mut(),
            200,
            &headers,
            &serde_json::to_vec(&index).unwrap(),
        );
        return Ok(());
    }

    // Forward to the registry, one request per connection.
    let mut target = req.target.clone();
    let session_post = req.method == "POST" && req.target.contains("/blobs/uploads/");
    if let Some(other) = &opts.upload_to_repo
        && session_post
        && !req.target.contains("mount=")
        && let Some(name) = repo_of(&req.target)
    {
        target = req
            .target
            .replacen(&format!("/v2/{name}/"), &format!("/v2/{other}/"), 1);
    }
    let mut up = TcpStream::connect(&shared.upstream)?;
    up.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{} {target} HTTP/1.1\r\n", req.method);
    for (n, v) in &req.headers {
        let drop = n.eq_ignore_ascii_case("connection")
            || (opts.bearer.is_some() && n.eq_ignore_ascii_case("authorization"));
        if !drop {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
    }
    if shared.tls.is_some() {
        // The registry builds absolute Locations: tell it the client speaks https.
        head.push_str("X-Forwarded-Proto: https\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4);
    let (resp_head, resp_body) = answer.split_at(split);
    let mut out = String::new();
    let manifest_put = req.method == "PUT" && req.target.contains("/manifests/");
    for line in String::from_utf8_lossy(resp_head).split("\r\n") {
        let lower = line.to_ascii_lowercase();
        if line.is_empty() || lower.starts_with("connection:") {
            continue;
        }
        if let Some(to) = &opts.upload_location_to
            && session_post
            && let Some((_, value)) = line
                .split_once(':')
                .filter(|_| lower.starts_with("location:"))
        {
            out.push_str(&format!("Location: {to}{}\r\n", path_of(value.trim())));
            continue;
        }
        if let Some(range) = &opts.patch_range
            && req.method == "PATCH"
            && lower.starts_with("range:")
        {
            out.push_str(&format!("Range: {range}\r\n"));
            continue;
        }
        if manifest_put && lower.starts_with("docker-content-digest:") {
            if opts.no_manifest_digest {
                continue;
            }
            if opts.wrong_manifest_digest {
                out.push_str(&format!(
                    "Docker-Content-Digest: sha256:{}\r\n",
                    "e".repeat(64)
                ));
                continue;
            }
        }
        if opts.wrong_digest
            && req.method == "PUT"
            && line
                .to_ascii_lowercase()
                .starts_with("docker-content-digest:")
        {
            out.push_str(&format!(
                "Docker-Content-Digest: sha256:{}\r\n",
                "0".repeat(64)
            ));
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    if opts.referrers_api
        && req.method == "PUT"
        && answer.starts_with(b"HTTP/1.1 201")
        && let Some((name, subject, descriptor)) = referrer_put(&req, &body)
    {
        out.push_str(&format!("OCI-Subject: {subject}\r\n"));
        let mut st = shared.state.lock().unwrap();
        let list = st.referrers.entry((name, subject)).or_default();
        if !list.iter().any(|d| d["digest"] == descriptor["digest"]) {
            list.push(descriptor);
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    if fault == Some(Fault::ResetResponse) {
        // Half of what the client needs: half the head if there is no body, else the head
        // and half the body.
        if resp_body.is_empty() {
            reader
                .get_mut()
                .write_all(&out.as_bytes()[..out.len() / 2])?;
        } else {
            reader.get_mut().write_all(out.as_bytes())?;
            reader
                .get_mut()
                .write_all(&resp_body[..resp_body.len() / 2])?;
        }
        let _ = reader.get_mut().flush();
        let _ = raw.shutdown(Shutdown::Both);
        return Ok(());
    }
    reader.get_mut().write_all(out.as_bytes())?;
    reader.get_mut().write_all(resp_body)?;
    reader.get_mut().flush()?;
    Ok(())
}

/// `GET /v2/<name>/referrers/<digest>[?artifactType=<type>]`: name, digest, type.
fn referrers_request(target: &str) -> Option<(String, String, Option<String>)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (name, digest) = path.strip_prefix("/v2/")?.rsplit_once("/referrers/")?;
    let artifact_type = query
        .split('&')
        .find_map(|p| p.strip_prefix("artifactType="))
        .map(|t| t.replace("%2B", "+").replace("%2F", "/"));
    Some((name.to_string(), digest.to_string(), artifact_type))
}

/// A manifest PUT whose body has a `subject`: repository, subject digest, and the descriptor
/// a referrers index lists for it (distribution-spec "Listing Referrers": `artifactType`, else
/// the config's media type; the manifest's annotations).
fn referrer_put(req: &Request, body: &[u8]) -> Option<(String, String, serde_json::Value)> {
    use sha2::Digest as _;
    let (name, _) = req
        .target
        .strip_prefix("/v2/")?
        .rsplit_once("/manifests/")?;
    let m: serde_json::Value = serde_json::from_slice(body).ok()?;
    let subject = m["subject"]["digest"].as_str()?.to_string();
    let media_type = m["mediaType"]
        .as_str()
        .map(String::from)
        .or_else(|| req.header("content-type").map(String::from))?;
    let artifact_type = m["artifactType"]
        .as_str()
        .or_else(|| m["config"]["mediaType"].as_str())?;
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", hex::encode(sha2::Sha256::digest(body))),
        "size": body.len(),
        "artifactType": artifact_type,
    });
    if m["annotations"].is_object() {
        d["annotations"] = m["annotations"].clone();
    }
    Some((name.to_string(), subject, d))
}

/// The (name, value) headers of one request.
pub type Headers = Vec<(String, String)>;

/// A listener that records the headers of every request and answers 404: the "other host"
/// a registry redirects to.
#[derive(Debug)]
pub struct Recorder {
    /// `HOST:PORT` as given to [`Recorder::start`].
    pub addr: String,
    seen: Arc<Mutex<Vec<Headers>>>,
}

impl Recorder {
    /// Listen on `ip` (a loopback address such as 127.0.0.2) and a free port.
    pub fn start(ip: &str) -> Recorder {
        let listener = TcpListener::bind((ip, 0)).expect("bind recorder");
        let addr = listener.local_addr().expect("recorder addr").to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Ok(clone) = conn.try_clone() else {
                    continue;
                };
                let mut reader = BufReader::new(clone);
                if let Ok(Some(req)) = read_head(&mut reader) {
                    log.lock().unwrap().push(req.headers);
                    respond(&mut conn, 404, &[], b"");
                }
            }
        });
        Recorder { addr, seen }
    }

    /// The headers of each request received.
    pub fn seen(&self) -> Vec<Headers> {
        self.seen.lock().unwrap().clone()
    }
}

#[test]
fn schedule_keys_and_dates() {
    let cases = [
        ("GET", "/v2/", "GET /v2/"),
        (
            "PUT",
            "/v2/a/b/blobs/uploads/6f1c?_state=x&digest=sha256%3Aab",
            "PUT /v2/a/b/blobs/uploads/ digest=sha256%3Aab",
        ),
        ("POST", "/v2/a/blobs/uploads/", "POST /v2/a/blobs/uploads/ "),
        (
            "HEAD",
            "/v2/a/blobs/sha256:ab",
            "HEAD /v2/a/blobs/sha256:ab",
        ),
    ];
    for (m, t, want) in cases {
        assert_eq!(key_of(m, t), want);
    }
    assert_eq!(
        http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)),
        "Sun, 06 Nov 1994 08:49:37 GMT"
    );
    assert_eq!(
        http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_164_800)),
        "Thu, 29 Feb 2024 00:00:00 GMT"
    );
}
