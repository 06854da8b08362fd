//! Registry authentication: `WWW-Authenticate` challenge parsing, credential sources, and the
//! token cache.
//!
//! The flow follows the distribution token authentication spec (docker/distribution
//! `docs/spec/auth/token.md`): a request answered 401 carries a challenge; for `Basic` we send
//! `Authorization: Basic` with the user's credentials, for `Bearer` we fetch a token from the
//! challenge's `realm` for `service` and our `scope` (`repository:<path>:pull,push`), sending the
//! credentials (if any) to the token server, and retry with `Authorization: Bearer <token>`.
//! An identity token from `docker login` is exchanged with the OAuth2 `refresh_token` grant
//! (`docs/spec/auth/oauth.md`).
//!
//! Credentials come from, in order: `--username/--password-stdin` ([`Credentials`] in
//! `RegistryOptions`), then the docker config (`auths`, `credHelpers`, `credsStore`, through the
//! `docker_credential` crate). They are looked up only when a registry asks for them.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` print `<redacted>`, so no log line,
//! error or `{:?}` can show them.

use super::ecr::{EcrError, EcrRegistry};
use super::{RegistryError, RegistryOptions};
use base64::Engine as _;
use reqwest::Url;
use reqwest::header::HeaderValue;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A password or token. Prints as `<redacted>`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for building a request header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A user name and password (from `--username` and `--password-stdin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// One credential, wherever it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    Basic(Credentials),
    /// A `docker login` identity token: an OAuth2 refresh token for the Bearer token server.
    IdentityToken(Secret),
}

/// The credential for a registry and a description of where we looked, for error messages
/// (`tried` never holds a secret).
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) credential: Option<Credential>,
    pub(crate) tried: String,
}

/// Where the docker config lives: the override, else `$DOCKER_CONFIG`, else `~/.docker`.
pub(crate) fn docker_config_dir(over: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = over {
        return Some(dir.to_path_buf());
    }
    std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))
}

/// The credential files to search, in order: `$REGISTRY_AUTH_FILE` (podman, skopeo and
/// buildah's variable), the docker config (`config_dir/config.json`), then podman's
/// `$XDG_RUNTIME_DIR/containers/auth.json` (containers-auth.json(5)). All share the docker
/// format (`auths`, `credHelpers`, `credsStore`).
pub(crate) fn auth_files(config_dir: Option<&Path>) -> Vec<PathBuf> {
    let env_path = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut files = Vec::new();
    files.extend(env_path("REGISTRY_AUTH_FILE"));
    files.extend(config_dir.map(|d| d.join("config.json")));
    files.extend(env_path("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")));
    files
}

/// Find the credential for `registry` (`host[:port]`): the explicit one first, then the
/// credential files of [`auth_files`]. Blocking: a credential helper may run as a child process.
pub(crate) fn resolve(
    registry: &str,
    explicit: Option<&Credentials>,
    config_dir: Option<&Path>,
) -> Resolved {
    if let Some(c) = explicit {
        return Resolved {
            credential: Some(Credential::Basic(c.clone())),
            tried: "the credentials given with --username".into(),
        };
    }
    let files = auth_files(config_dir);
    if files.is_empty() {
        return Resolved {
            credential: None,
            tried: "no credentials (no --username, and no docker config directory: HOME and DOCKER_CONFIG are unset)"
                .into(),
        };
    }
    for path in &files {
        match docker_config_credential(path, registry) {
            Ok(Some(credential)) => {
                let what = match credential {
                    Credential::Basic(_) => "the credentials",
                    Credential::IdentityToken(_) => "the identity token",
                };
                return Resolved {
                    credential: Some(credential),
                    tried: format!("{what} for {registry} from {}", path.display()),
                };
            }
            Ok(None) => {}
            Err(why) => {
                return Resolved {
                    credential: None,
                    tried: format!("no credentials (no --username; {}: {why})", path.display()),
                };
            }
        }
    }
    let shown: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    Resolved {
        credential: None,
        tried: format!(
            "no credentials (no --username, and none for {registry} in {})",
            shown.join(", ")
        ),
    }
}

/// Look `registry` up in a docker `config.json`: `credHelpers`, then `auths` (base64 `auth`, or
/// `username`/`password`, or `identitytoken`), then `credsStore`. `Ok(None)` when the file or
/// the entry does not exist; `Err` (a message without secrets) when it is unusable.
pub(crate) fn docker_config_credential(
    path: &Path,
    registry: &str,
) -> Result<Option<Credential>, String> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    match docker_credential::get_credential_from_reader(std::io::BufReader::new(file), registry) {
        Ok(DockerCredential::UsernamePassword(username, password)) => {
            Ok(Some(Credential::Basic(Credentials {
                username,
                password: Secret(password),
            })))
        }
        Ok(DockerCredential::IdentityToken(token)) => {
            Ok(Some(Credential::IdentityToken(Secret(token))))
        }
        Err(E::NoCredentialConfigured) => Ok(None),
        // A helper that has nothing for this host says so on stdout and exits 1.
        Err(E::HelperFailure { stdout, .. }) if stdout.contains("credentials not found") => {
            Ok(None)
        }
        // The helper's output is not shown: it may hold a secret.
        Err(E::HelperFailure { helper, .. }) => Err(format!("credential helper {helper} failed")),
        Err(E::HelperCommunicationError) => {
            Err("its credential helper could not be run (is it installed?)".into())
        }
        Err(E::ConfigReadError) => Err("it is not valid JSON".into()),
        Err(other) => Err(other.to_string()),
    }
}

/// One `WWW-Authenticate` challenge (RFC 9110 section 11.6.1): scheme lowercased, parameter
/// names lowercased, values unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) scheme: String,
    pub(crate) params: BTreeMap<String, String>,
}

/// Parse every challenge in the given `WWW-Authenticate` header values. Tolerant: handles
/// several challenges per header, quoted values holding commas and escaped quotes, token68
/// forms (ignored), and stray whitespace; garbage yields fewer challenges, never a panic.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for value in values {
        parse_one_header(value, &mut out);
    }
    out
}

/// RFC 9110 `tchar`, plus '/' so that token68 values (base64) read as one token.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~/".contains(c)
}

fn parse_one_header(s: &str, out: &mut Vec<Challenge>) {
    let mut p = Parser { s, i: 0 };
    loop {
        p.skip(|c| c == ',' || c.is_whitespace());
        let scheme = p.token();
        if scheme.is_empty() {
            break; // end of input or an unexpected character
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: BTreeMap::new(),
        };
        let mut first = true;
        loop {
            let save = p.i;
            p.skip(|c| c == ',' || c.is_whitespace());
            let after_comma = p.s[save..p.i].contains(',');
            let name = p.token();
            if name.is_empty() {
                p.i = save;
                break;
            }
            p.skip(char::is_whitespace);
            if p.peek() == Some('=') {
                // `name=value`, or a token68 ending in padding (`abc==`).
                let eq = p.i;
                p.skip(|c| c == '=');
                let padding = p.i - eq;
                p.skip(char::is_whitespace);
                if padding == 1 && !matches!(p.peek(), None | Some(',')) {
                    let value = if p.peek() == Some('"') {
                        p.quoted()
                    } else {
                        p.bare_value()
                    };
                    challenge.params.insert(name.to_ascii_lowercase(), value);
                }
            } else if !(first && !after_comma && matches!(p.peek(), None | Some(','))) {
                // Not a bare token68 right after the scheme (`Negotiate abc`), so this token
                // after a comma is the scheme of the next challenge.
                p.i = save;
                break;
            }
            first = false;
        }
        out.push(challenge);
    }
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.i..].chars().next()
    }

    fn skip(&mut self, pred: impl Fn(char) -> bool) {
        while let Some(c) = self.peek().filter(|&c| pred(c)) {
            self.i += c.len_utf8();
        }
    }

    fn token(&mut self) -> &'a str {
        let start = self.i;
        self.skip(is_tchar);
        &self.s[start..self.i]
    }

    /// An unquoted value: everything up to a comma or whitespace (lenient: real registries
    /// send `realm=https://...` unquoted, and ':' and '/' are not token characters).
    fn bare_value(&mut self) -> String {
        let start = self.i;
        self.skip(|c| c != ',' && !c.is_whitespace());
        self.s[start..self.i].to_string()
    }

    /// A quoted-string starting at `"`; `\x` stands for `x`. An unterminated one runs to the end.
    fn quoted(&mut self) -> String {
        let mut out = String::new();
        let mut chars = self.s[self.i..].char_indices().skip(1);
        let mut end = self.s.len() - self.i;
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    end = at + 1;
                    break;
                }
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        out.push(escaped);
                    }
                }
                c => out.push(c),
            }
        }
        self.i += end;
        out
    }
}

/// What the registry asked for last.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scheme {
    /// No challenge seen yet (or the registry answered without one): send nothing.
    Anonymous,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug)]
struct State {
    scheme: Scheme,
    /// Bumped whenever the header we send changes, so concurrent requests that all got a 401
    /// refresh the token once, not once each.
    generation: u64,
    /// Bearer tokens by scope (token spec: a token is granted for a scope).
    tokens: HashMap<String, Secret>,
    /// A refreshed ECR token, replacing the resolved credential after a 401 (ecr.rs).
    basic_override: Option<Credentials>,
}

/// The authentication state of one registry client. Cheap to share between concurrent uploads.
#[derive(Debug)]
pub(crate) struct Auth {
    registry: String,
    /// `repository:<path>:pull,push`, the one scope a push needs.
    scope: String,
    explicit: Option<Credentials>,
    config_dir: Option<PathBuf>,
    insecure: Vec<String>,
    timeout: Duration,
    resolved: tokio::sync::OnceCell<Result<Resolved, EcrError>>,
    /// Set when the registry is Amazon ECR: its token replaces the docker config.
    ecr: Option<Arc<EcrRegistry>>,
    /// Whether the resolved credential is an ECR token (not a docker config fallback).
    ecr_in_use: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    refresh: tokio::sync::Mutex<()>,
    /// What re-authentication did since the last [`Auth::take_notices`], for `-v` (the
    /// request path has no progress sink; `Client::retry` passes these on).
    notices: Mutex<Vec<String>>,
}

impl Auth {
    pub(crate) fn new(registry: &str, path: &str, opts: &RegistryOptions) -> Self {
        // Cross-repository mounts need pull access to the source too, in the same token
        // (token spec "Requesting a Token": several scopes).
        let mut scope = format!("repository:{path}:pull,push");
        for from in opts.mount_from.iter().filter(|f| *f != path) {
            scope.push_str(&format!(" repository:{from}:pull"));
        }
        Auth {
            registry: registry.to_string(),
            scope,
            explicit: opts.credentials.clone(),
            config_dir: docker_config_dir(opts.docker_config_dir.as_deref()),
            insecure: opts.insecure_registries.clone(),
            timeout: opts.timeout,
            resolved: tokio::sync::OnceCell::new(),
            ecr: EcrRegistry::shared(registry, &opts.aws),
            ecr_in_use: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                scheme: Scheme::Anonymous,
                generation: 0,
                tokens: HashMap::new(),
                basic_override: None,
            }),
            refresh: tokio::sync::Mutex::new(()),
            notices: Mutex::new(Vec::new()),
        }
    }

    /// The re-authentications since the last call (one line each, no secrets).
    pub(crate) fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut *self.notices.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn notice(&self, line: String) {
        self.notices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line);
    }

    /// The credential for this registry, looked up once, off the async threads (a credential
    /// helper is a child process). For ECR (unless --username was given) the ECR token comes
    /// first; when the AWS chain has no credentials at all, the docker config may still hold
    /// some (e.g. from `aws ecr get-login-password | docker login`), else that is the error.
    async fn resolved(&self) -> Result<&Resolved, RegistryError> {
        self.resolved
            .get_or_init(|| async {
                let ecr = self.ecr.as_ref().filter(|_| self.explicit.is_none());
                let ecr_error = match ecr {
                    Some(ecr) => match ecr.credentials().await {
                        Ok(c) => {
                            self.ecr_in_use
                                .store(true, std::sync::atomic::Ordering::Release);
                            return Ok(Resolved {
                                credential: Some(Credential::Basic(c)),
                                tried: ecr.describe(),
                            });
                        }
                        Err(e @ EcrError::NoCredentials { .. }) => Some(e),
                        Err(e) => return Err(e),
                    },
                    None => None,
                };
                let registry = self.registry.clone();
                let explicit = self.explicit.clone();
                let dir = self.config_dir.clone();
                let resolved = tokio::task::spawn_blocking(move || {
                    resolve(&registry, explicit.as_ref(), dir.as_deref())
                })
                .await
                .unwrap_or_else(|e| Resolved {
                    credential: None,
                    tried: format!("no credentials (looking them up failed: {e})"),
                });
                match ecr_error {
                    // Say what the docker config lookup found (e.g. a credHelpers entry whose
                    // helper is not installed), not only that AWS had nothing.
                    Some(EcrError::NoCredentials {
                        registry,
                        imds,
                        profile,
                        ..
                    }) if resolved.credential.is_none() => {
                        let found = resolved.tried.as_str();
                        let found = found
                            .strip_prefix("no credentials (")
                            .and_then(|f| f.strip_suffix(')'))
                            .unwrap_or(found);
                        Err(EcrError::NoCredentials {
                            registry,
                            imds,
                            docker: format!(" ({found})"),
                            profile,
                        })
                    }
                    Some(e) if resolved.credential.is_none() => Err(e),
                    _ => Ok(resolved),
                }
            })
            .await
            .as_ref()
            .map_err(|e| RegistryError::Ecr(e.clone()))
    }

    /// Which credential source was used, for error messages.
    pub(crate) async fn tried(&self) -> String {
        let anonymous = self.state().scheme == Scheme::Anonymous;
        if anonymous {
            "no credentials (the registry did not ask for any)".into()
        } else {
            match self.resolved().await {
                Ok(r) => r.tried.clone(),
                Err(e) => e.to_string(),
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `Authorization` header to send now (if any), and the generation it belongs to.
    pub(crate) fn header(&self) -> (Option<HeaderValue>, u64) {
        let state = self.state();
        let value = match &state.scheme {
            Scheme::Anonymous => None,
            Scheme::Basic => match (
                &state.basic_override,
                self.resolved
                    .get()
                    .and_then(|r| r.as_ref().ok())
                    .and_then(|r| r.credential.as_ref()),
            ) {
                (Some(c), _) | (None, Some(Credential::Basic(c))) => Some(basic_header(c)),
                _ => None,
            },
            Scheme::Bearer { .. } => state
                .tokens
                .get(&self.scope)
                .map(|t| format!("Bearer {}", t.expose())),
        };
        let value = value
            .and_then(|v| HeaderValue::from_str(&v).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        (value, state.generation)
    }

    /// React to a 401 whose request carried the header of generation `sent`. Returns whether the
    /// request is worth sending again (the header changed), or an error (the token server
    /// refused us, or could not be reached).
    pub(crate) async fn on_unauthorized(
        &self,
        http: &reqwest::Client,
        challenges: &[Challenge],
        sent: u64,
    ) -> Result<bool, RegistryError> {
        let _one_at_a_time = self.refresh.lock().await;
        if self.state().generation != sent {
            return Ok(true); // another request already refreshed the header
        }
        // Prefer Bearer: a registry offering both wants tokens (token spec).
        let pick = |s: &str| challenges.iter().find(|c| c.scheme == s);
        let scheme = if let Some(c) = pick("bearer") {
            match c.params.get("realm") {
                Some(realm) => Scheme::Bearer {
                    realm: realm.clone(),
                    service: c.params.get("service").cloned(),
                },
                None => return Ok(false),
            }
        } else if pick("basic").is_some() {
            Scheme::Basic
        } else {
            return Ok(false);
        };
        let resolved = self.resolved().await?;
        match &scheme {
            Scheme::Basic => {
                let have = matches!(resolved.credential, Some(Credential::Basic(_)));
                let from_ecr = self.ecr_in_use.load(std::sync::atomic::Ordering::Acquire);
                if from_ecr && self.state().scheme == Scheme::Basic {
                    // ECR refused its own token (expired, or issued before a long push):
                    // one new token per run, then give up (ecr.rs; never a loop).
                    if let Some(ecr) = &self.ecr
                        && let Some(fresh) = ecr.refresh().await?
                    {
                        {
                            let mut state = self.state();
                            state.basic_override = Some(fresh);
                            state.generation += 1;
                        }
                        self.notice(format!(
                            "re-authenticated to {}: it refused the ECR token; got a new one (GetAuthorizationToken)",
                            self.registry
                        ));
                        return Ok(true);
                    }
                    return Ok(false);
                }
                let mut state = self.state();
                // Sending the same credentials again cannot help.
                if !have || state.scheme == Scheme::Basic {
                    state.scheme = scheme;
                    return Ok(false);
                }
                state.scheme = scheme;
                state.generation += 1;
                Ok(true)
            }
            Scheme::Bearer { realm, service } => {
                let token = self
                    .fetch_token(http, realm, service.as_deref(), resolved)
                    .await?;
                let shown_realm = Url::parse(realm)
                    .map(|u| super::client::display_url(&u))
                    .unwrap_or_default();
                let renewed = {
                    let mut state = self.state();
                    let renewed = state.tokens.insert(self.scope.clone(), token).is_some();
                    state.scheme = scheme;
                    state.generation += 1;
                    renewed
                };
                // A 401 to a token we had (it expired, or was revoked): token spec "a client
                // should request a new token"; say so at -v.
                if renewed {
                    self.notice(format!(
                        "re-authenticated to {}: it refused the Bearer token (expired or revoked); got a new one from {shown_realm}",
                        self.registry
                    ));
                }
                Ok(true)
            }
            Scheme::Anonymous => Ok(false),
        }
    }

    /// Get a token from the token server (token spec "Requesting a Token"; identity tokens use
    /// the OAuth2 refresh-token grant, oauth.md). Credentials go to the realm, which may be
    /// another host: that is how the token protocol works, but never over plain http unless
    /// the realm's host is loopback or listed as insecure.
    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        resolved: &Resolved,
    ) -> Result<Secret, RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| RegistryError::Protocol {
            url: self.registry.clone(),
            status: 401,
            body_snippet: format!(
                "the Bearer challenge's realm \"{}\" is not a URL ({e})",
                crate::untrusted::shown(realm, 100)
            ),
            retry_after: None,
        })?;
        let shown = super::client::display_url(&url);
        if url.scheme() != "https"
            && resolved.credential.is_some()
            && !super::client::plain_http_allowed(&host_port(&url), &self.insecure)
        {
            return Err(RegistryError::Insecure {
                url: shown,
                reason: "sending credentials to a token server over plain http".into(),
            });
        }
        let request = match &resolved.credential {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = Url::parse("x:").expect("a constant URL parses");
                {
                    let mut pairs = form.query_pairs_mut();
                    pairs.append_pair("grant_type", "refresh_token");
                    if let Some(s) = service {
                        pairs.append_pair("service", s);
                    }
                    pairs.append_pair("scope", &self.scope);
                    pairs.append_pair("client_id", "imgbuild");
                    pairs.append_pair("refresh_token", refresh.expose());
                }
                http.post(url.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.query().unwrap_or_default().to_string())
            }
            other => {
                {
                    let mut pairs = url.query_pairs_mut();
                    if let Some(s) = service {
                        pairs.append_pair("service", s);
                    }
                    // One `scope` parameter per scope, as docker and distribution send them.
                    for scope in self.scope.split(' ') {
                        pairs.append_pair("scope", scope);
                    }
                }
                let request = http.get(url.clone());
                match other {
                    Some(Credential::Basic(c)) => {
                        request.basic_auth(&c.username, Some(c.password.expose()))
                    }
                    _ => request,
                }
            }
        };
        let response = request
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| super::client::transport_error(&url, e, self.timeout))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                tried: resolved.tried.clone(),
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(super::client::unexpected(&url, response).await);
        }
        // Do not echo the body on a parse failure: it may hold tokens.
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        // Capped like a manifest: a token server's answer is a few KiB, and one that keeps
        // sending must not fill the memory.
        let bytes = super::pull::read_limited(&url, response, self.timeout).await?;
        let parsed: Option<TokenResponse> = serde_json::from_slice(&bytes).ok();
        parsed
            .and_then(|t| t.token.filter(|t| !t.is_empty()).or(t.access_token))
            .filter(|t| !t.is_empty())
            .map(Secret)
            .ok_or_else(|| RegistryError::Protocol {
                url: shown,
                status: status.as_u16(),
                body_snippet: "the token server's answer has no `token` or `access_token`".into(),
                retry_after: None,
            })
    }
}

fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password.expose());
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// `host[:port]` of a URL, the form `--insecure-registry` uses.
fn host_port(url: &Url) -> String {
    // host_str() keeps the brackets of an IPv6 literal.
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn challenges() {
        let cases: Vec<(Vec<&str>, Vec<Challenge>)> = vec![
            (
                vec![r#"Basic realm="Registry Realm""#],
                vec![ch("basic", &[("realm", "Registry Realm")])],
            ),
            (
                vec![
                    r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
                ],
                vec![ch(
                    "bearer",
                    &[
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:samalba/my-app:pull,push"),
                    ],
                )],
            ),
            // Case-insensitive names, spaces around '=' and ',', token (unquoted) values.
            (
                vec![r#"BEARER  Realm = https://t.example/token , Service=reg"#],
                vec![ch(
                    "bearer",
                    &[("realm", "https://t.example/token"), ("service", "reg")],
                )],
            ),
            // Two challenges in one header; the second starts after a comma.
            (
                vec![r#"Basic realm="a, b", Bearer realm="https://t/x",scope="s""#],
                vec![
                    ch("basic", &[("realm", "a, b")]),
                    ch("bearer", &[("realm", "https://t/x"), ("scope", "s")]),
                ],
            ),
            // Several headers; escaped quotes; a token68 challenge in between.
            (
                vec![r#"Negotiate abc=="#, r#"Basic realm="say \"hi\"""#],
                vec![
                    ch("negotiate", &[]),
                    ch("basic", &[("realm", r#"say "hi""#)]),
                ],
            ),
            (
                vec!["Negotiate", "Basic"],
                vec![ch("negotiate", &[]), ch("basic", &[])],
            ),
            (
                vec![r#"Basic realm="unterminated"#],
                vec![ch("basic", &[("realm", "unterminated")])],
            ),
            (vec!["", "  ,  "], vec![]),
            (vec!["=oops"], vec![]),
        ];
        for (input, want) in cases {
            assert_eq!(parse_challenges(input.iter().copied()), want, "{input:?}");
        }
    }

    #[test]
    fn challenge_parsing_never_panics_or_hangs() {
        let header = r#"Basic realm="a, \"b\"", Bearer realm=https://t/x ,scope="é,ü" , Negotiate abc==, x=="#;
        // The parsing runs in a thread so that a hang fails the test instead of blocking the
        // suite. The parse takes microseconds; the 30 s bound only tells "hangs" from "slow
        // on a loaded machine".
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let splits: Vec<Vec<Challenge>> = (0..=header.len())
                .filter(|&i| header.is_char_boundary(i))
                .map(|end| parse_challenges([&header[..end], &header[end..]]))
                .collect();
            let _ = tx.send(splits);
        });
        let splits = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("parse_challenges panicked or did not return within 30 s");
        assert_eq!(splits.len(), header.chars().count() + 1);
        // The unsplit header (first and last split) parses to the same, complete answer.
        let whole = vec![
            ch("basic", &[("realm", r#"a, "b""#)]),
            ch("bearer", &[("realm", "https://t/x"), ("scope", "é,ü")]),
            ch("negotiate", &[]),
        ];
        assert_eq!(splits[0], whole);
        assert_eq!(splits[splits.len() - 1], whole);
        // Any split: only schemes of the header, lower-cased, and never more challenges than
        // the two halves hold schemes.
        for (i, parsed) in splits.iter().enumerate() {
            assert!(parsed.len() <= 4, "split {i}: {parsed:?}");
            for c in parsed {
                assert!(
                    !c.scheme.is_empty()
                        && c.scheme.chars().all(|ch| !ch.is_ascii_uppercase())
                        && header.to_ascii_lowercase().contains(&c.scheme),
                    "split {i}: {c:?}"
                );
            }
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let creds = Credentials {
            username: "user".into(),
            password: Secret::new("hunter2"),
        };
        let shown = [
            format!("{creds:?}"),
            format!("{:?}", creds.password),
            format!("{}", creds.password),
            format!("{:?}", Credential::IdentityToken(Secret::new("hunter2"))),
            format!(
                "{:?}",
                RegistryOptions {
                    credentials: Some(creds.clone()),
                    ..RegistryOptions::default()
                }
            ),
        ];
        for s in shown {
            assert!(!s.contains("hunter2"), "{s}");
        }
        assert!(format!("{creds:?}").contains("<redacted>"));
        assert_eq!(creds.password.expose(), "hunter2");
    }

    /// A push that mounts from other repositories asks one token for all of them.
    #[test]
    fn scopes_include_mount_sources() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "repository:team/app:pull,push"),
            (
                &["base/busybox", "team/app", "other"],
                "repository:team/app:pull,push repository:base/busybox:pull repository:other:pull",
            ),
        ];
        for (from, want) in cases {
            let opts = RegistryOptions {
                mount_from: from.iter().map(|s| s.to_string()).collect(),
                ..RegistryOptions::default()
            };
            assert_eq!(Auth::new("r.example.com", "team/app", &opts).scope, *want);
        }
    }

    #[test]
    fn docker_config_lookup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let config = serde_json::json!({
            "auths": {
                "127.0.0.1:5000": { "auth": b64("alice:pw1") },
                "https://reg.example.com": { "auth": b64("bob:pw:with:colons") },
                "fields.example.com": { "username": "carol", "password": "pw3" },
                "token.example.com": { "identitytoken": "tok" },
                "broken.example.com": { "auth": "!!!not base64" },
            }
        });
        std::fs::write(&path, config.to_string()).expect("write config");
        let basic = |u: &str, p: &str| {
            Ok(Some(Credential::Basic(Credentials {
                username: u.into(),
                password: Secret::new(p),
            })))
        };
        let cases: Vec<(&str, Result<Option<Credential>, ()>)> = vec![
            ("127.0.0.1:5000", basic("alice", "pw1")),
            ("reg.example.com", basic("bob", "pw:with:colons")),
            ("fields.example.com", basic("carol", "pw3")),
            (
                "token.example.com",
                Ok(Some(Credential::IdentityToken(Secret::new("tok")))),
            ),
            ("127.0.0.1:5001", Ok(None)),
            ("127.0.0.1", Ok(None)),
            ("broken.example.com", Err(())),
        ];
        for (registry, want) in cases {
            let got = docker_config_credential(&path, registry).map_err(|_| ());
            assert_eq!(got, want, "{registry}");
        }
        // A missing file is "no credentials", not an error.
        assert_eq!(
            docker_config_credential(&dir.path().join("nope.json"), "x"),
            Ok(None)
        );

        // resolve(): explicit credentials win; `tried` names the source and no secret.
        let explicit = Credentials {
            username: "u".into(),
            password: Secret::new("secret-pw"),
        };
        let r = resolve("127.0.0.1:5000", Some(&explicit), Some(dir.path()));
        assert_eq!(r.credential, Some(Credential::Basic(explicit)));
        assert!(r.tried.contains("--username"), "{}", r.tried);
        let r = resolve("127.0.0.1:5000", None, Some(dir.path()));
        assert!(
            r.tried.contains("config.json") && !r.tried.contains("pw1"),
            "{}",
            r.tried
        );
        let r = resolve("other:1", None, Some(dir.path()));
        assert!(
            r.credential.is_none() && r.tried.starts_with("no credentials"),
            "{}",
            r.tried
        );
    }
}
