//! The HTTP side of a registry: building the reqwest client (TLS roots, timeouts, redirect
//! policy), choosing https or http, the `/v2/` ping (distribution-spec spec.md "Determining
//! support"), and sending one request with the `Authorization` header attached and one
//! re-authentication on 401 (token spec: "a 401 response ... the client should request a
//! token and retry").

use super::auth::{self, Auth};
use super::{RegistryError, RegistryOptions};
use crate::progress::{Event, Progress};
use crate::reference::{Repository, host_of};
use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A registry reached over a known scheme, for one repository.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// `https://host[:port]/` or `http://host[:port]/`.
    base: Url,
    registry: String,
    repo_path: String,
    auth: Auth,
    timeout: Duration,
    /// `--retries` / `--deadline`, the deadline counted from `connect`.
    retrier: super::retry::Retrier,
    /// The client's certificate verifier (its roots are loaded on first use).
    #[cfg_attr(not(test), allow(dead_code))]
    verifier: Arc<LazyVerifier>,
}

/// Build the reqwest client shared by every request of a push, and its certificate verifier
/// (to [`Roots::prewarm`] when https is certain).
///
/// - TLS: rustls with the `ring` provider, system roots (rustls-platform-verifier) plus the
///   `--ca-cert` files; verification is never turned off. The TLS configuration is reqwest's
///   own (TLS 1.3 and 1.2, SNI, ALPN h2 and http/1.1), made here only so that the verifier is
///   [`LazyVerifier`]: the system roots (hundreds of files) are read when a server first
///   shows a certificate, not for a plain-http registry on loopback that never does.
/// - Timeouts: `connect_timeout` for the connect phase; each small request sets its own total
///   timeout, and blob uploads have a stall watchdog (upload.rs). Not reqwest's `read_timeout`:
///   in reqwest 0.13 it counts from the start of the request to the response headers, so it
///   would cut off any upload slower than the timeout.
/// - Redirects: at most 10; never from https to http. reqwest itself drops `Authorization`
///   when a redirect leaves the origin (blob GETs are redirected to object storage).
pub(crate) fn build_http(
    opts: &RegistryOptions,
) -> Result<(reqwest::Client, Arc<LazyVerifier>), RegistryError> {
    // Another part of the process may have installed a provider already; either is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut roots = Vec::new();
    for path in &opts.ca_certs {
        let pem = std::fs::read(path).map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?;
        let ca_cert = |reason: &str| RegistryError::CaCert {
            path: path.clone(),
            reason: reason.into(),
        };
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ca_cert("invalid certificate encoding"))?;
        if certs.is_empty() {
            return Err(ca_cert("it holds no PEM certificate"));
        }
        // Refused now, as reqwest would when building the client, not at the first handshake.
        for cert in &certs {
            rustls::RootCertStore::empty()
                .add(cert.clone())
                .map_err(|e| ca_cert(&e.to_string()))?;
        }
        roots.extend(certs);
    }
    let verifier = Arc::new(LazyVerifier::new(roots, Arc::clone(&provider)));
    let client_error = |reason: String| RegistryError::Client { reason };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| client_error(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<_>)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        match redirect_refusal(attempt.previous(), attempt.url()) {
            Some(why) => attempt.error(why),
            None => attempt.follow(),
        }
    });
    let http = super::resolve::apply(reqwest::Client::builder(), &opts.resolve)
        .user_agent(opts.user_agent.clone())
        .connect_timeout(opts.timeout)
        .redirect(policy)
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| client_error(error_chain(&e)))?;
    Ok((http, verifier))
}

/// rustls-platform-verifier's verifier (system roots plus the `--ca-cert` roots, what reqwest
/// uses by default), made on first use: loading the system roots reads and parses every
/// file of the system's certificate store, tens of milliseconds that a push to a plain-http
/// registry never needs. The signature schemes offered in the ClientHello come from the
/// crypto provider, as the platform verifier's own do, so the roots are still not read
/// until the server's certificate is there to check.
#[derive(Debug)]
pub(crate) struct LazyVerifier {
    extra_roots: Vec<CertificateDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    inner: OnceLock<Result<Arc<rustls_platform_verifier::Verifier>, rustls::Error>>,
}

impl LazyVerifier {
    fn new(
        extra_roots: Vec<CertificateDer<'static>>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Self {
        LazyVerifier {
            extra_roots,
            provider,
            inner: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        self.inner
            .get_or_init(|| {
                rustls_platform_verifier::Verifier::new_with_extra_roots(
                    self.extra_roots.iter().cloned(),
                    Arc::clone(&self.provider),
                )
                .map(Arc::new)
            })
            .as_deref()
            .map_err(Clone::clone)
    }

    /// Whether the roots are loaded (tests: a plain-http push never loads them).
    #[cfg(test)]
    fn loaded(&self) -> bool {
        self.inner.get().is_some()
    }

    /// Load the roots on a blocking thread now, while the connection is being made: for a
    /// host reached only over https they are needed one round trip from now.
    pub(crate) fn prewarm(self: &Arc<Self>) {
        let me = Arc::clone(self);
        drop(tokio::task::spawn_blocking(move || {
            let _ = me.get();
        }));
    }
}

impl rustls::client::danger::ServerCertVerifier for LazyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.get()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        // What the platform verifier answers (its inner WebPkiServerVerifier's), without
        // loading the roots.
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A redirect we do not follow (the error the redirect policy hands reqwest).
#[derive(Debug)]
pub(crate) enum RedirectRefusal {
    /// From https to this plain-http URL.
    Downgrade(Url),
    TooMany,
}

impl std::fmt::Display for RedirectRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedirectRefusal::Downgrade(_) => f.write_str("a redirect from https to plain http"),
            RedirectRefusal::TooMany => f.write_str("too many redirects"),
        }
    }
}

impl std::error::Error for RedirectRefusal {}

/// Why a redirect to `next` after visiting `previous` must not be followed, if it must not:
/// from https to plain http (it would expose the request, and the token it may carry, to the
/// network), or more than 10 hops. Dropping `Authorization` when the redirect leaves the
/// origin is reqwest's own rule (both tested end to end: tests/it/faults.rs, tests/it/lies.rs).
pub(crate) fn redirect_refusal(previous: &[Url], next: &Url) -> Option<RedirectRefusal> {
    let downgrade = previous.iter().any(|p| p.scheme() == "https") && next.scheme() != "https";
    if downgrade {
        Some(RedirectRefusal::Downgrade(next.clone()))
    } else if previous.len() >= 10 {
        Some(RedirectRefusal::TooMany)
    } else {
        None
    }
}

/// Whether plain http may be used for `registry` (`host[:port]`): loopback hosts (127.0.0.0/8,
/// ::1, `localhost`), and hosts listed in `--insecure-registry` as `HOST:PORT` (that port only)
/// or `HOST` (any port).
pub(crate) fn plain_http_allowed(registry: &str, insecure: &[String]) -> bool {
    let host = host_of(registry);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback
        || insecure.iter().any(|entry| {
            let entry = entry.trim().trim_end_matches('/');
            let entry = entry
                .strip_prefix("http://")
                .or_else(|| entry.strip_prefix("https://"))
                .unwrap_or(entry);
            entry.eq_ignore_ascii_case(registry)
                || entry.eq_ignore_ascii_case(host)
                || entry.eq_ignore_ascii_case(&format!("[{host}]"))
        })
}

/// The host that serves the registry API for `registry`: Docker Hub's names map to
/// `registry-1.docker.io` (what docker does); everything else is itself.
fn api_host(registry: &str) -> &str {
    match registry {
        "docker.io" | "index.docker.io" => "registry-1.docker.io",
        other => other,
    }
}

impl Client {
    /// Reach the registry of `repo`: ping `/v2/` and learn what authentication it wants.
    ///
    /// Scheme: https, always verified. For loopback and `--insecure-registry` hosts we try
    /// https first and fall back to plain http when https fails below HTTP (refused, TLS
    /// handshake error) — the rule crane/go-containerregistry use for insecure registries. A
    /// TLS registry on 127.0.0.1 (with `--ca-cert`) is thus reached over https, a plain one
    /// over http. When http does not work either, the https error is reported (it is the one
    /// that says what to fix, e.g. an unknown CA), unless http reached a server that answered
    /// otherwise (e.g. wrong credentials, or a web page that is not a registry).
    pub(crate) async fn connect(
        repo: &Repository,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<Client, RegistryError> {
        let (http, roots) = build_http(opts)?;
        let retrier = super::retry::Retrier::start(opts.retry);
        let plain_ok = plain_http_allowed(&repo.registry, &opts.insecure_registries);
        if !plain_ok {
            roots.prewarm();
        }
        let make = |scheme: &str| -> Result<Client, RegistryError> {
            let base = format!("{scheme}://{}/", api_host(&repo.registry));
            Ok(Client {
                http: http.clone(),
                base: Url::parse(&base).map_err(|e| RegistryError::Protocol {
                    url: base.clone(),
                    status: 0,
                    body_snippet: format!("not a valid registry address: {e}"),
                    retry_after: None,
                })?,
                registry: repo.registry.clone(),
                repo_path: repo.path.clone(),
                auth: Auth::new(&repo.registry, &repo.path, opts),
                timeout: opts.timeout,
                retrier,
                verifier: Arc::clone(&roots),
            })
        };
        retrier
            .run("connecting to the registry", progress, || async {
                let https = make("https")?;
                let err = match https.ping().await {
                    Ok(()) => return Ok(https),
                    Err(e) if plain_ok && e.is_transport() => e,
                    Err(e) => return Err(e),
                };
                progress.event(Event::Debug(&format!(
                    "https to {} failed ({}); trying plain http",
                    repo.registry,
                    err.short_reason()
                )));
                let http = make("http")?;
                match http.ping().await {
                    Ok(()) => Ok(http),
                    // A TLS server answers plain http with 400 ("Client sent an HTTP request to an
                    // HTTPS server"): the https error is the one that says what to fix.
                    Err(e)
                        if e.is_transport()
                            || matches!(e, RegistryError::Protocol { status: 400, .. }) =>
                    {
                        Err(err)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(|e| e.in_context(plain_ok, &opts.ca_certs))
    }

    /// `GET /v2/`: 200 means we may go on (anonymously or with the header `send` settled on).
    async fn ping(&self) -> Result<(), RegistryError> {
        let url = self.url("/v2/");
        let response = self
            .send(|http| Ok(http.get(url.clone()).timeout(self.timeout)))
            .await?;
        if response.status().is_success() && !is_html(response.headers()) {
            Ok(())
        } else {
            // A 200 web page (a captive portal, a web server at the wrong address) is not a
            // registry: say so now rather than "push" into it.
            Err(unexpected(&url, response).await)
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run `op` under this push's retry policy (see [`super::retry`]); after each attempt,
    /// say at `-v` whether the requests had to re-authenticate.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        what: &str,
        progress: &dyn Progress,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        self.retrier
            .run(what, progress, || {
                let attempt = op();
                async move {
                    let result = attempt.await;
                    for line in self.auth.take_notices() {
                        progress.event(Event::Debug(&line));
                    }
                    result
                }
            })
            .await
    }

    /// An absolute path on the registry, e.g. `/v2/`.
    pub(crate) fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(path);
        url
    }

    /// `/v2/<name>/<suffix>` for our repository (spec.md endpoints table).
    pub(crate) fn repo_url(&self, suffix: &str) -> Url {
        self.url(&format!("/v2/{}/{suffix}", self.repo_path))
    }

    /// Send a request made by `make` with our `Authorization` header (only to the registry's
    /// own origin: an upload `Location` on another host gets no credentials). On 401, update
    /// the authentication from the response's challenge and, if that changed anything, send a
    /// fresh request from `make` once more. `make` is called again for the retry, so streamed
    /// bodies are rebuilt. Returns the response for any status but 401 and 403, which become
    /// [`RegistryError::Unauthorized`] and [`RegistryError::Denied`].
    pub(crate) async fn send<F>(&self, mut make: F) -> Result<Response, RegistryError>
    where
        F: FnMut(&reqwest::Client) -> Result<RequestBuilder, RegistryError>,
    {
        // The first 401 picks the scheme and credentials (a request starts anonymous); a
        // second 401, with those credentials, lets `Auth` try something fresh if it has one
        // (ECR: one new token per run). `Auth` answers false when nothing changed, so this
        // is bounded: at most two re-sends.
        const MAX_REAUTHS: u8 = 2;
        let mut reauths = 0u8;
        loop {
            let (client, request) = make(&self.http)?.build_split();
            let mut request = request.map_err(|e| RegistryError::Client {
                reason: error_chain(&e),
            })?;
            let url = request.url().clone();
            let (header, generation) = self.auth.header();
            if let Some(value) = header.filter(|_| same_origin(&url, &self.base)) {
                request.headers_mut().insert(AUTHORIZATION, value);
            }
            let response = client
                .execute(request)
                .await
                .map_err(|e| transport_error(&url, e, self.timeout))?;
            match response.status() {
                StatusCode::UNAUTHORIZED if reauths < MAX_REAUTHS => {
                    reauths += 1;
                    let challenges = challenges(response.headers());
                    if self
                        .auth
                        .on_unauthorized(&self.http, &challenges, generation)
                        .await?
                    {
                        continue;
                    }
                    return Err(self.unauthorized(401).await);
                }
                StatusCode::UNAUTHORIZED => return Err(self.unauthorized(401).await),
                StatusCode::FORBIDDEN => {
                    return Err(RegistryError::Denied {
                        url: display_url(&url),
                        tried: self.auth.tried().await,
                    });
                }
                _ => return Ok(response),
            }
        }
    }

    async fn unauthorized(&self, status: u16) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            tried: self.auth.tried().await,
            status,
        }
    }
}

fn challenges(headers: &HeaderMap) -> Vec<auth::Challenge> {
    auth::parse_challenges(
        headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A URL fit for messages: no credentials, no query (upload URLs can carry signatures).
pub(crate) fn display_url(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// Every message in an error's source chain, joined; repeated messages dropped.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// The innermost cause of an error (e.g. `Connection refused (os error 111)`).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// A rustls error anywhere in the chain. io::Error hides its inner error from `source()`
/// (and hyper-util nests io errors two deep), so look inside each io::Error too.
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        let mut inner = err;
        loop {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls.clone());
            }
            match inner
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
            {
                Some(wrapped) => inner = wrapped,
                None => break,
            }
        }
        next = err.source();
    }
    None
}

/// Sort a reqwest failure (no HTTP response) into our errors.
pub(crate) fn transport_error(url: &Url, e: reqwest::Error, timeout: Duration) -> RegistryError {
    let shown = display_url(url);
    if e.is_timeout() {
        RegistryError::Timeout {
            url: shown,
            secs: timeout.as_secs(),
        }
    } else if e.is_redirect() {
        // Name where the redirect wanted to go (reqwest's error names where it came from).
        match find_in_chain::<RedirectRefusal>(&e) {
            Some(RedirectRefusal::Downgrade(to)) => RegistryError::Insecure {
                url: display_url(to),
                reason: "a redirect from https to plain http".into(),
            },
            Some(RedirectRefusal::TooMany) => RegistryError::RedirectLoop { url: shown },
            None => RegistryError::Insecure {
                url: shown,
                reason: root_cause(&e),
            },
        }
    } else if let Some(tls) = tls_error(&e) {
        let (certificate, advice) = tls_advice(&tls, url);
        RegistryError::Tls {
            url: shown,
            reason: tls.to_string(),
            advice,
            certificate,
        }
    } else {
        let reason = if refused(&e) {
            format!(
                "nothing listens on {}:{} (connection refused)",
                url.host_str().unwrap_or("?"),
                url.port_or_known_default().unwrap_or(0)
            )
        } else {
            root_cause(&e)
        };
        RegistryError::Unreachable {
            url: shown,
            reason,
            hint: "check the registry address and that it is running (plain http is tried only for loopback and --insecure-registry hosts)".into(),
            cause: std::sync::Arc::new(e),
        }
    }
}

/// The first error of type `T` in the source chain.
fn find_in_chain<'e, T: std::error::Error + 'static>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// Was the connection refused (an io::Error of that kind anywhere in the chain)?
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        let mut inner = err;
        while let Some(io) = inner.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
            match io.get_ref() {
                Some(wrapped) => inner = wrapped,
                None => break,
            }
        }
        next = err.source();
    }
    false
}

/// Whether a TLS failure is the registry's certificate being refused (exit 6: no retry helps),
/// and what to do about it. `--ca-cert` is suggested only for an unknown issuer.
fn tls_advice(e: &rustls::Error, url: &Url) -> (bool, String) {
    use rustls::CertificateError as C;
    let host = url.host_str().unwrap_or("the registry");
    let rustls::Error::InvalidCertificate(cert) = e else {
        return (
            false,
            "check that a TLS registry answers at this address and port (or allow plain http with --insecure-registry HOST:PORT)".into(),
        );
    };
    let advice = match cert {
        C::UnknownIssuer | C::BadSignature => {
            "if the registry uses a private CA, pass it with --ca-cert FILE (or allow plain http with --insecure-registry HOST:PORT)".to_string()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => format!(
            "the certificate does not name {host}: reach the registry by a name its certificate lists (--resolve NAME:PORT:ADDR reaches that name at another address), or reissue the certificate with {host} in its subjectAltName"
        ),
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            "the certificate is outside its validity period: renew it, or check this machine's clock".to_string()
        }
        _ => format!("the certificate of {host} was refused; inspect it with `openssl s_client -connect HOST:PORT`"),
    };
    (true, advice)
}

/// Turn a response we did not expect into [`RegistryError::Protocol`], with the first 200
/// characters of its body (sanitized) and any `Retry-After` seconds.
pub(crate) async fn unexpected(url: &Url, response: Response) -> RegistryError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| super::retry::parse_retry_after(v, std::time::SystemTime::now()));
    let html = is_html(response.headers());
    // Read at most a few KiB: an error page can be large, and we show 200 characters.
    let mut response = response;
    let mut body = Vec::new();
    while body.len() < 4096 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    RegistryError::Protocol {
        url: display_url(url),
        status,
        body_snippet: snippet(&body, html),
        retry_after,
    }
}

/// Does the response say it is a web page (`Content-Type: text/html`)? The registry API
/// answers JSON or nothing; HTML comes from portals, proxies and wrong addresses.
pub(crate) fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("html"))
}

/// A one-line summary of an error body: the distribution-spec error codes (spec.md "Error
/// Codes") when it is that JSON, else the first 200 characters with control characters and
/// runs of whitespace collapsed.
pub(crate) fn snippet(body: &[u8], html: bool) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(body) {
        let items: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| {
                let code = e.code.as_deref().unwrap_or("ERROR");
                match e.message.as_deref() {
                    Some(m) => format!("{code}: {m}"),
                    None => code.to_string(),
                }
            })
            .collect();
        if !items.is_empty() {
            return clip(&items.join("; "));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = clip(&text);
    let html = html || text.trim_start().starts_with('<');
    match (text.is_empty(), html) {
        (true, _) => "(empty body)".into(),
        (false, true) => format!("an HTML page, not a registry API answer: {text}"),
        (false, false) => text,
    }
}

/// Runs of whitespace and control characters become one space; the rest is shown through
/// the shared rule for server text ([`crate::untrusted::shown`]: escaped, at most 200
/// characters).
fn clip(text: &str) -> String {
    let collapsed: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    crate::untrusted::shown(&collapsed.join(" "), crate::untrusted::MAX_SHOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_decisions() {
        let cases: &[(&str, &[&str], bool)] = &[
            ("127.0.0.1:5000", &[], true),
            ("127.1.2.3", &[], true),
            ("localhost:5000", &[], true),
            ("LOCALHOST", &[], true),
            ("[::1]:5000", &[], true),
            ("localhost.example.com", &[], false),
            ("10.0.0.1:5000", &[], false),
            ("ghcr.io", &[], false),
            ("reg.lan:5000", &["reg.lan:5000"], true),
            ("reg.lan:5000", &["reg.lan"], true),
            ("reg.lan", &["reg.lan"], true),
            ("reg.lan:5001", &["reg.lan:5000"], false),
            ("reg.lan", &["reg.lan:5000"], false),
            ("reg.lan.example.com", &["reg.lan"], false),
            ("REG.lan:5000", &["http://reg.LAN:5000/"], true),
            ("[fd00::1]:5000", &["[fd00::1]:5000"], true),
            ("[fd00::1]:5000", &["fd00::1"], true),
        ];
        for (registry, insecure, want) in cases {
            let insecure: Vec<String> = insecure.iter().map(|s| s.to_string()).collect();
            assert_eq!(
                plain_http_allowed(registry, &insecure),
                *want,
                "{registry} {insecure:?}"
            );
        }
    }

    /// A one-thread-per-connection server on loopback that answers every plain-http request
    /// 200 and closes a TLS ClientHello, as a plain registry's port does.
    fn plain_registry() -> std::net::SocketAddr {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut byte = [0u8; 1];
                    while stream.read(&mut byte).is_ok_and(|n| n == 1) {
                        if buf.is_empty() && byte[0] == 0x16 {
                            return;
                        }
                        buf.push(byte[0]);
                        if buf.ends_with(b"\r\n\r\n") {
                            buf.clear();
                            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                            if stream.write_all(ok).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_plain_http_registry_on_loopback_never_loads_the_system_roots() {
        let addr = plain_registry();
        let repo = Repository {
            registry: addr.to_string(),
            path: "x".into(),
        };
        let client = Client::connect(&repo, &RegistryOptions::default(), &crate::progress::Silent)
            .await
            .expect("connect");
        assert_eq!(client.base.scheme(), "http");
        assert!(!client.verifier.loaded(), "the system roots were loaded");
        // The verifier still works when a certificate does come: loading is only deferred.
        assert!(client.verifier.get().is_ok());
        assert!(client.verifier.loaded());
    }

    #[test]
    fn snippets() {
        let long = "x".repeat(300);
        let cases: Vec<(&[u8], bool, String)> = vec![
            (b"", false, "(empty body)".into()),
            (
                br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}"#,
                false,
                "DIGEST_INVALID: provided digest did not match uploaded content".into(),
            ),
            (
                b"<html>\n<body>\r\n  Bad\tGateway</body></html>",
                false,
                "an HTML page, not a registry API answer: <html> <body> Bad Gateway</body></html>".into(),
            ),
            (b"plain\x1b[31m text", false, "plain [31m text".into()),
            (
                long.as_bytes(),
                false,
                format!("{}… ({} more characters)", "x".repeat(200), long.len() - 200),
            ),
        ];
        for (body, html, want) in cases {
            assert_eq!(snippet(body, html), want);
        }
    }

    #[test]
    fn redirects_that_are_refused() {
        let u = |s: &str| Url::parse(s).expect("valid URL");
        let hops: Vec<Url> = (0..10).map(|i| u(&format!("https://r/{i}"))).collect();
        let cases: Vec<(Vec<Url>, Url, bool)> = vec![
            (
                vec![u("https://r/v2/")],
                u("https://storage.example/b"),
                false,
            ),
            (
                vec![u("http://127.0.0.1/v2/")],
                u("http://localhost/b"),
                false,
            ),
            (vec![u("https://r/v2/")], u("http://r/v2/"), true),
            // A downgrade anywhere along the chain counts.
            (
                vec![u("https://r/a"), u("https://s/b")],
                u("http://t/c"),
                true,
            ),
            (hops[..9].to_vec(), u("https://r/x"), false),
            (hops.clone(), u("https://r/x"), true),
        ];
        for (previous, next, refused) in cases {
            assert_eq!(
                redirect_refusal(&previous, &next).is_some(),
                refused,
                "{previous:?} -> {next}"
            );
        }
    }

    #[test]
    fn display_url_hides_query_and_userinfo() {
        let url = Url::parse(
            "https://u:p@reg.example.com/v2/x/blobs/uploads/abc?_state=s&X-Amz-Signature=z",
        )
        .expect("valid URL");
        assert_eq!(
            display_url(&url),
            "https://reg.example.com/v2/x/blobs/uploads/abc"
        );
    }
}
