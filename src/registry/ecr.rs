//! Amazon ECR: registry host recognition, credentials from the AWS default chain (plus an
//! optional role assumed on top), `ecr:GetAuthorizationToken` with an in-memory token cache,
//! and create-on-push (README "Amazon ECR").
//!
//! - Hosts: `<account>.dkr.ecr[-fips].<region>.<suffix>` and the dual-stack
//!   `<account>.dkr-ecr[-fips].<region>.on.aws` (the forms amazon-ecr-credential-helper
//!   accepts); the region comes from the host name, never from the profile, because the token
//!   must be issued by the registry's own region.
//! - Credentials: aws-config's default chain (environment, shared config/credentials profiles
//!   incl. `role_arn` + `source_profile` and SSO, web identity for EKS IRSA and GitHub OIDC,
//!   ECS/EKS container credentials, EC2 instance metadata). IMDS gets one attempt with 1 s
//!   timeouts so that "no credentials anywhere" fails in about a second, not after the
//!   SDK's retries. `--aws-role-arn` wraps the chain in STS AssumeRole (session name
//!   `imgbuild-<short id>`).
//! - Tokens: one GetAuthorizationToken per registry per process, shared by concurrent uploads
//!   (a mutex around the fetch). A token that was valid when it came is fetched again 5
//!   minutes before it expires (ECR tokens last 12 hours: only very long pushes). A token that
//!   is already expired when it arrives (moto answers 2015-01-01) is used as is. Either way a
//!   401 with our token gets at most one new token per run: never a loop.
//! - Create-on-push ([`with_repository`]): docker-registry-style registries create repositories
//!   on push, ECR does not (it answers NAME_UNKNOWN to the first blob upload). With
//!   `--create-repository` we ask ECR first (DescribeRepositories) and create a missing
//!   repository (CreateRepository) before the first upload. When the identity may not call
//!   DescribeRepositories, we push anyway and, should the registry answer NAME_UNKNOWN, create
//!   the repository and push once more. Without the flag, NAME_UNKNOWN from ECR becomes an
//!   error that says to create the repository or pass the flag.
//!
//! Tokens are wrapped in [`Secret`] at once; nothing here prints one.

use super::auth::{Credentials, Secret};
use crate::progress::{Event, Progress};
use aws_config::BehaviorVersion;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_ecr::config::Region;
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// What the AWS side of a push may do (from `--aws-role-arn`, `--create-repository`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AwsOptions {
    /// Assume this role (STS AssumeRole) with whatever credentials the default chain found.
    pub role_arn: Option<String>,
    /// Create the ECR repository when it does not exist.
    pub create_repository: bool,
    /// With `create_repository`: turn on scan-on-push for a repository we create.
    pub scan_on_push: bool,
    /// With `create_repository`: make the tags of a repository we create immutable.
    pub immutable_tags: bool,
}

/// An ECR registry host, e.g. `123456789012.dkr.ecr.eu-west-1.amazonaws.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrHost {
    /// The 12-digit AWS account id.
    pub account: String,
    pub region: String,
    pub fips: bool,
    pub dual_stack: bool,
}

/// DNS suffixes of the AWS partitions that serve ECR (amazon-ecr-credential-helper's list).
const SUFFIXES: &[&str] = &[
    "amazonaws.com",
    "amazonaws.com.cn",
    "sc2s.sgov.gov",
    "c2s.ic.gov",
    "cloud.adc-e.uk",
    "csp.hci.ic.gov",
];

/// Recognise an ECR registry (`host[:port]`, any case). `None` for every other registry.
pub fn parse_host(registry: &str) -> Option<EcrHost> {
    let host = crate::reference::host_of(registry).to_ascii_lowercase();
    let (account, rest) = host.split_once('.')?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // (prefix, fips, dual-stack, suffixes allowed)
    let forms: [(&str, bool, bool, &[&str]); 4] = [
        ("dkr.ecr.", false, false, SUFFIXES),
        ("dkr.ecr-fips.", true, false, SUFFIXES),
        ("dkr-ecr.", false, true, &["on.aws"]),
        ("dkr-ecr-fips.", true, true, &["on.aws"]),
    ];
    for (prefix, fips, dual_stack, suffixes) in forms {
        let Some(after) = rest.strip_prefix(prefix) else {
            continue;
        };
        let (region, suffix) = after.split_once('.')?;
        let region_ok = !region.is_empty()
            && region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !region.starts_with('-');
        if region_ok && suffixes.contains(&suffix) {
            return Some(EcrHost {
                account: account.to_string(),
                region: region.to_string(),
                fips,
                dual_stack,
            });
        }
        return None;
    }
    None
}

/// Why ECR gave us no token or could not create a repository. Clone: the outcome of the one
/// token fetch is shared by every request of the run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EcrError {
    #[error(
        "no AWS credentials for the ECR registry {registry}: tried environment variables (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY), the shared config and credentials files (AWS_PROFILE, ~/.aws/config, ~/.aws/credentials), web identity (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE), container credentials (AWS_CONTAINER_CREDENTIALS_FULL_URI/RELATIVE_URI), EC2 instance metadata{imds}, and the docker config{docker}{profile}; provide one of them (README \"Credentials\"), or, for the registry `push` pushes to, pipe `aws ecr get-login-password` into --username AWS --password-stdin"
    )]
    NoCredentials {
        registry: String,
        imds: String,
        /// What the docker config lookup found, e.g. ` (…: its credential helper could not
        /// be run (is it installed?))`; empty when not known.
        docker: String,
        /// `; AWS_PROFILE=x is defined in neither …` when the named profile does not exist.
        profile: String,
    },
    #[error(
        "AWS credentials for the ECR registry {registry} could not be obtained: {reason}; check the AWS profile, role ARN or web identity token"
    )]
    Credentials { registry: String, reason: String },
    #[error(
        "AWS refused {operation} for {registry}: {reason}; check that the AWS identity may call ecr:{operation} (and the region in the registry name)"
    )]
    Denied {
        registry: String,
        operation: &'static str,
        reason: String,
    },
    #[error(
        "the ECR repository {path} does not exist in {registry}; create it (aws ecr create-repository --repository-name {path} --region {region}) or pass --create-repository"
    )]
    RepositoryMissing {
        registry: String,
        path: String,
        region: String,
    },
    #[error("{operation} for the ECR registry {registry} failed: {reason}")]
    Api {
        registry: String,
        operation: &'static str,
        reason: String,
        /// A network failure or time-out (worth retrying), not an answer from AWS.
        transient: bool,
    },
}

impl EcrError {
    /// The process exit code: 4 for missing or refused credentials, 5 for the network or AWS
    /// failing (README "Exit codes").
    pub fn exit_code(&self) -> crate::exit::ExitCode {
        use crate::exit::ExitCode;
        match self {
            EcrError::NoCredentials { .. }
            | EcrError::Credentials { .. }
            | EcrError::Denied { .. } => ExitCode::Auth,
            // A setup mistake, like a wrong --repo: retrying will not help.
            EcrError::RepositoryMissing { .. } => ExitCode::Usage,
            EcrError::Api { .. } => ExitCode::Registry,
        }
    }
}

/// Error codes with which AWS says "not you" rather than "not now".
const AUTH_CODES: &[&str] = &[
    "AccessDeniedException",
    "AccessDenied",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
];

/// Sort an SDK error into [`EcrError`]. Credential failures surface inside the SDK error (the
/// client resolves its identity per call); find them in the source chain.
fn classify<E>(registry: &str, operation: &'static str, err: &SdkError<E>) -> EcrError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return match c {
                CredentialsError::CredentialsNotLoaded(_) => EcrError::NoCredentials {
                    registry: registry.into(),
                    imds: if imds_disabled() {
                        " (disabled by AWS_EC2_METADATA_DISABLED)".into()
                    } else {
                        String::new()
                    },
                    docker: String::new(),
                    profile: missing_profile(),
                },
                other => EcrError::Credentials {
                    registry: registry.into(),
                    reason: error_text(other),
                },
            };
        }
        next = e.source();
    }
    let reason = error_text(err);
    match err {
        SdkError::ServiceError(s) if s.err().code().is_some_and(|c| AUTH_CODES.contains(&c)) => {
            EcrError::Denied {
                registry: registry.into(),
                operation,
                reason,
            }
        }
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => EcrError::Api {
            registry: registry.into(),
            operation,
            reason,
            transient: false,
        },
        _ => EcrError::Api {
            registry: registry.into(),
            operation,
            reason,
            transient: true,
        },
    }
}

/// An error and its sources, Display only (the SDK's `DisplayErrorContext` appends the whole
/// Debug dump, hundreds of characters of Rust structs), each once, on one line.
fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let msg = one_line(&e.to_string());
        if !msg.is_empty() && !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
        next = e.source();
    }
    out
}

/// `AWS_PROFILE` names a profile that no shared file defines: the SDK then says only "no
/// credentials"; say which profile is missing and where it was looked for.
fn missing_profile() -> String {
    let Some(profile) = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()) else {
        return String::new();
    };
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let file = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(default)))
    };
    let config = file("AWS_CONFIG_FILE", ".aws/config");
    let credentials = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    let defined = |path: &Option<std::path::PathBuf>, config: bool| {
        let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) else {
            return false;
        };
        text.lines().any(|l| {
            let Some(name) = l.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')) else {
                return false;
            };
            let name = name.trim();
            // The config file names profiles `[profile x]` (and `[default]`), the
            // credentials file `[x]` (AWS CLI "Configuration and credential file settings").
            let name = match name.strip_prefix("profile ") {
                Some(n) if config => n.trim(),
                _ => name,
            };
            name == profile
        })
    };
    if defined(&config, true) || defined(&credentials, false) {
        return String::new();
    }
    let shown = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or("(no HOME)".to_string(), |p| p.display().to_string())
    };
    format!(
        "; AWS_PROFILE={profile} names a profile defined in neither {} nor {}: fix the name, or unset AWS_PROFILE",
        shown(&config),
        shown(&credentials)
    )
}

fn imds_disabled() -> bool {
    std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Collapse whitespace so an error stays on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `imgbuild-<short id>`: unique per run, so CloudTrail tells runs apart.
fn session_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or_default();
    format!(
        "imgbuild-{:08x}",
        nanos ^ std::process::id().rotate_left(16)
    )
}

/// A registry token and when it stops working.
#[derive(Debug, Clone)]
struct Token {
    credentials: Credentials,
    expires_at: Option<SystemTime>,
    fetched_at: SystemTime,
}

impl Token {
    /// Fetch a new one before use? Only when it was valid when it came and now ends within 5
    /// minutes (a long push). One that arrived already expired is used as is: fetching again
    /// would give the same answer, so that would be a loop (TESTBED.md, moto).
    fn needs_refresh(&self, now: SystemTime) -> bool {
        match self.expires_at {
            Some(exp) if exp > self.fetched_at => now + Duration::from_secs(300) >= exp,
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
struct TokenState {
    current: Option<Token>,
    /// Whether the one refresh after a 401 was spent.
    refreshed: bool,
}

/// The token cache of one registry: the mutex is held across a fetch, so concurrent callers
/// wait for the one fetch in flight and then share its token.
#[derive(Debug, Default)]
struct TokenCache {
    state: tokio::sync::Mutex<TokenState>,
}

impl TokenCache {
    async fn get<F, Fut>(&self, now: SystemTime, fetch: F) -> Result<Credentials, EcrError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Token, EcrError>>,
    {
        let mut state = self.state.lock().await;
        if let Some(t) = state.current.as_ref().filter(|t| !t.needs_refresh(now)) {
            return Ok(t.credentials.clone());
        }
        let token = fetch().await?;
        let out = token.credentials.clone();
        state.current = Some(token);
        Ok(out)
    }

    /// After a 401 with the cached token: a new token once per run, `None` after that.
    async fn refresh<F, Fut>(&self, fetch: F) -> Result<Option<Credentials>, EcrError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Token, EcrError>>,
    {
        let mut state = self.state.lock().await;
        if state.refreshed {
            return Ok(None);
        }
        state.refreshed = true;
        let token = fetch().await?;
        let out = token.credentials.clone();
        state.current = Some(token);
        Ok(Some(out))
    }
}

/// One ECR registry of this process: the SDK client (built on first use) and the token cache.
#[derive(Debug)]
pub(crate) struct EcrRegistry {
    registry: String,
    host: EcrHost,
    opts: AwsOptions,
    client: tokio::sync::OnceCell<aws_sdk_ecr::Client>,
    tokens: TokenCache,
    /// Repositories already made sure of in this run: the overlapped push checks before
    /// connecting and again around the image push; DescribeRepositories is called once.
    ensured: Mutex<std::collections::HashSet<String>>,
}

/// The AWS SDK configuration of every AWS call imgbuild makes (ECR here, S3 for
/// `--context s3://`): the default credential chain with a bounded IMDS, rustls+ring HTTPS,
/// `AWS_ENDPOINT_URL*` as aws-config reads them, and `role_arn` assumed on top when given.
pub(crate) async fn sdk_config(region: Region, role_arn: Option<&str>) -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls;
    // No idle pool: a handful of calls per run, and this client outlives the
    // tokio runtime of the call that made it (process-wide cache), where pooled
    // connections would belong to a runtime that is gone.
    let http = aws_smithy_http_client::Builder::new()
        .pool_max_idle_per_host(0)
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let provider_config = ProviderConfig::default()
        .with_http_client(http.clone())
        .with_region(Some(region.clone()));
    // One attempt, short timeouts: off EC2 nothing answers 169.254.169.254 and the
    // default (retries) would make "no credentials" take several seconds.
    let imds = aws_config::imds::Client::builder()
        .configure(&provider_config)
        .max_attempts(1)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(1))
        .build();
    let chain = DefaultCredentialsChain::builder()
        .configure(provider_config)
        .region(region.clone())
        .imds_client(imds)
        .build()
        .await;
    let timeouts = aws_smithy_types::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(60))
        .build();
    let mut sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(region.clone())
        .http_client(http)
        .timeout_config(timeouts)
        .credentials_provider(chain)
        .load()
        .await;
    if let Some(arn) = role_arn {
        let assume = AssumeRoleProvider::builder(arn)
            .session_name(session_name())
            .region(region)
            .configure(&sdk)
            .build()
            .await;
        sdk = sdk
            .into_builder()
            .credentials_provider(SharedCredentialsProvider::new(assume))
            .build();
    }
    sdk
}

/// Every ECR registry this process talked to, so that a push and a base-image pull from the
/// same registry (or two clients of one push) share one token fetch per run.
static REGISTRIES: LazyLock<Mutex<HashMap<RegistryKey, Arc<EcrRegistry>>>> =
    LazyLock::new(Default::default);

/// `host[:port]` in lowercase, and the options the token was made with.
type RegistryKey = (String, AwsOptions);

impl EcrRegistry {
    /// The shared state for `registry` (`host[:port]`), or `None` when it is not ECR.
    pub(crate) fn shared(registry: &str, opts: &AwsOptions) -> Option<Arc<EcrRegistry>> {
        let host = parse_host(registry)?;
        let mut all = REGISTRIES.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = all
            .entry((registry.to_ascii_lowercase(), opts.clone()))
            .or_insert_with(|| {
                Arc::new(EcrRegistry {
                    registry: registry.to_string(),
                    host,
                    opts: opts.clone(),
                    client: tokio::sync::OnceCell::new(),
                    tokens: TokenCache::default(),
                    ensured: Mutex::default(),
                })
            });
        Some(Arc::clone(entry))
    }

    /// Where the credentials come from, for messages (no secret).
    pub(crate) fn describe(&self) -> String {
        let role = match &self.opts.role_arn {
            Some(arn) => format!(", then role {arn}"),
            None => String::new(),
        };
        format!(
            "an ECR authorization token for {} (AWS credentials from the default chain{role}, region {}; the identity needs ecr:GetAuthorizationToken and push rights on the repository)",
            self.registry, self.host.region
        )
    }

    /// The SDK client, configured once: region from the host, FIPS/dual-stack endpoints as the
    /// host says, rustls+ring HTTPS, bounded IMDS, optional AssumeRole on top of the chain.
    async fn client(&self) -> &aws_sdk_ecr::Client {
        self.client
            .get_or_init(|| async {
                let region = Region::new(self.host.region.clone());
                let sdk = sdk_config(region, self.opts.role_arn.as_deref()).await;
                let conf = aws_sdk_ecr::config::Builder::from(&sdk)
                    .use_fips(self.host.fips)
                    .use_dual_stack(self.host.dual_stack)
                    .build();
                aws_sdk_ecr::Client::from_conf(conf)
            })
            .await
    }

    async fn fetch_token(&self) -> Result<Token, EcrError> {
        const OP: &str = "GetAuthorizationToken";
        let out = self
            .client()
            .await
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| classify(&self.registry, OP, &e))?;
        let bad = |what: &str| EcrError::Api {
            registry: self.registry.clone(),
            operation: OP,
            reason: format!("the answer {what}"),
            transient: false,
        };
        let data = out
            .authorization_data()
            .first()
            .ok_or_else(|| bad("holds no authorizationData"))?;
        let token = data
            .authorization_token()
            .ok_or_else(|| bad("holds no authorizationToken"))?;
        // base64 of `AWS:<password>` (ECR API reference, AuthorizationData). The decoded value
        // goes straight into a Secret and is never shown, even when malformed.
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad("holds a token that is not base64 text"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| bad("holds a token without `user:password`"))?;
        Ok(Token {
            credentials: Credentials {
                username: username.to_string(),
                password: Secret::new(password),
            },
            expires_at: data
                .expires_at()
                .and_then(|t| SystemTime::try_from(*t).ok()),
            fetched_at: SystemTime::now(),
        })
    }

    /// The registry user and password (`AWS`, token), fetched once and cached.
    pub(crate) async fn credentials(&self) -> Result<Credentials, EcrError> {
        self.tokens
            .get(SystemTime::now(), || self.fetch_token())
            .await
    }

    /// The registry refused the cached token: a new one, at most once per run.
    pub(crate) async fn refresh(&self) -> Result<Option<Credentials>, EcrError> {
        self.tokens.refresh(|| self.fetch_token()).await
    }

    /// Make sure `path` exists (DescribeRepositories), creating it (CreateRepository) with the
    /// scan-on-push and tag-immutability options when it does not. Returns whether it was
    /// created. Another run creating it at the same moment is fine.
    pub(crate) async fn ensure_repository(
        &self,
        path: &str,
        progress: &dyn Progress,
    ) -> Result<bool, EcrError> {
        let ensured = || self.ensured.lock().unwrap_or_else(PoisonError::into_inner);
        if ensured().contains(path) {
            return Ok(false);
        }
        let created = self.check_or_create(path, progress).await?;
        ensured().insert(path.to_string());
        Ok(created)
    }

    async fn check_or_create(&self, path: &str, progress: &dyn Progress) -> Result<bool, EcrError> {
        let client = self.client().await;
        let described = client
            .describe_repositories()
            .registry_id(&self.host.account)
            .repository_names(path)
            .send()
            .await;
        match described {
            Ok(_) => return Ok(false),
            Err(SdkError::ServiceError(e)) if e.err().is_repository_not_found_exception() => {}
            Err(e) => match classify(&self.registry, "DescribeRepositories", &e) {
                // May push but not describe: push, and create on NAME_UNKNOWN.
                EcrError::Denied { reason, .. } => {
                    progress.event(Event::Debug(&format!(
                        "cannot check whether ECR repository {path} exists ({reason}); pushing, and creating it if ECR says it is missing"
                    )));
                    return Ok(false);
                }
                other => return Err(other),
            },
        }
        self.create_repository(path, progress).await
    }

    /// CreateRepository with the scan-on-push and tag-immutability options. Returns whether it
    /// was created (false: someone else just did).
    async fn create_repository(
        &self,
        path: &str,
        progress: &dyn Progress,
    ) -> Result<bool, EcrError> {
        use aws_sdk_ecr::types::{ImageScanningConfiguration, ImageTagMutability};
        let client = self.client().await;
        let mutability = if self.opts.immutable_tags {
            ImageTagMutability::Immutable
        } else {
            ImageTagMutability::Mutable
        };
        let created = client
            .create_repository()
            .registry_id(&self.host.account)
            .repository_name(path)
            .image_tag_mutability(mutability)
            .image_scanning_configuration(
                ImageScanningConfiguration::builder()
                    .scan_on_push(self.opts.scan_on_push)
                    .build(),
            )
            .send()
            .await;
        match created {
            Ok(_) => {
                progress.event(Event::Debug(&format!(
                    "created ECR repository {path} in {} (scan on push: {}, immutable tags: {})",
                    self.registry, self.opts.scan_on_push, self.opts.immutable_tags
                )));
                Ok(true)
            }
            Err(SdkError::ServiceError(e)) if e.err().is_repository_already_exists_exception() => {
                Ok(false)
            }
            Err(e) => Err(classify(&self.registry, "CreateRepository", &e)),
        }
    }
}

/// Whether a registry error is ECR saying the repository does not exist (distribution-spec
/// error code NAME_UNKNOWN on the first blob request).
fn is_name_unknown(e: &super::RegistryError) -> bool {
    matches!(e, super::RegistryError::Protocol { status: 404, body_snippet, .. }
        if body_snippet.contains("NAME_UNKNOWN"))
}

/// Run `push` against `registry`/`path`, taking care of ECR repositories: with
/// `--create-repository`, make sure the repository exists first, and if ECR still answers
/// NAME_UNKNOWN, create it and run `push` once more; without the flag, turn ECR's NAME_UNKNOWN
/// into [`EcrError::RepositoryMissing`]. Other registries: `push` as is.
pub(crate) async fn with_repository<T, F, Fut>(
    registry: &str,
    path: &str,
    opts: &AwsOptions,
    progress: &dyn Progress,
    mut push: F,
) -> Result<T, super::RegistryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, super::RegistryError>>,
{
    let ecr = EcrRegistry::shared(registry, opts);
    let create = match (&ecr, opts.create_repository) {
        (Some(ecr), true) => {
            ecr.ensure_repository(path, progress).await?;
            Some(ecr)
        }
        (None, true) => {
            // `connect` and the image push both come here: warn once per registry and run.
            static WARNED: std::sync::Mutex<std::collections::BTreeSet<String>> =
                std::sync::Mutex::new(std::collections::BTreeSet::new());
            let first = WARNED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(format!("{registry}/{path}"));
            if first {
                progress.event(Event::Warning(&format!(
                    "--create-repository applies to Amazon ECR only; {registry} is not an ECR registry (it is left to create {path} itself)"
                )));
            }
            None
        }
        (_, false) => None,
    };
    match push().await {
        Err(e) if is_name_unknown(&e) => match (create, &ecr) {
            (Some(ecr), _) => {
                ecr.create_repository(path, progress).await?;
                push().await
            }
            (None, Some(ecr)) => Err(EcrError::RepositoryMissing {
                registry: registry.to_string(),
                path: path.to_string(),
                region: ecr.host.region.clone(),
            }
            .into()),
            (None, None) => Err(e),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A credential provider's failure (e.g. instance metadata answering garbage) is shown by
    /// its Display chain, never the SDK's Debug dump.
    #[test]
    fn credential_errors_are_display_only() {
        let e = CredentialsError::provider_error(std::io::Error::other(
            "instance metadata answered HTTP 500",
        ));
        let t = error_text(&e);
        assert!(t.ends_with("instance metadata answered HTTP 500"), "{t}");
        assert!(!t.contains("ProviderError") && !t.contains('{'), "{t}");
    }

    #[test]
    fn ecr_hosts() {
        let ecr = |account: &str, region: &str, fips: bool, dual_stack: bool| {
            Some(EcrHost {
                account: account.into(),
                region: region.into(),
                fips,
                dual_stack,
            })
        };
        let cases = [
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                ecr("123456789012", "eu-west-1", false, false),
            ),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com:5443",
                ecr("123456789012", "us-east-1", false, false),
            ),
            (
                "123456789012.DKR.ECR.US-EAST-1.AMAZONAWS.COM",
                ecr("123456789012", "us-east-1", false, false),
            ),
            (
                "123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
                ecr("123456789012", "cn-north-1", false, false),
            ),
            (
                "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
                ecr("123456789012", "us-gov-west-1", true, false),
            ),
            (
                "123456789012.dkr-ecr.ap-southeast-2.on.aws",
                ecr("123456789012", "ap-southeast-2", false, true),
            ),
            (
                "123456789012.dkr-ecr-fips.us-east-2.on.aws",
                ecr("123456789012", "us-east-2", true, true),
            ),
            (
                "123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov",
                ecr("123456789012", "us-iso-east-1", false, false),
            ),
            // Not ECR: public ECR (another API), wrong account length, other suffixes, forms
            // mixed up, missing region, other registries.
            ("public.ecr.aws", None),
            ("12345678901.dkr.ecr.us-east-1.amazonaws.com", None),
            ("1234567890123.dkr.ecr.us-east-1.amazonaws.com", None),
            ("12345678901a.dkr.ecr.us-east-1.amazonaws.com", None),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com.evil.com",
                None,
            ),
            ("123456789012.dkr.ecr.us-east-1.on.aws", None),
            ("123456789012.dkr-ecr.us-east-1.amazonaws.com", None),
            ("123456789012.dkr.ecr..amazonaws.com", None),
            ("123456789012.dkr.ecr.amazonaws.com", None),
            ("123456789012.ecr.us-east-1.amazonaws.com", None),
            ("ghcr.io", None),
            ("127.0.0.1:5000", None),
        ];
        for (host, want) in cases {
            assert_eq!(parse_host(host), want, "{host}");
        }
    }

    fn token(password: &str, fetched: SystemTime, expires: Option<SystemTime>) -> Token {
        Token {
            credentials: Credentials {
                username: "AWS".into(),
                password: Secret::new(password),
            },
            expires_at: expires,
            fetched_at: fetched,
        }
    }

    #[test]
    fn refresh_decisions() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |s: u64| Duration::from_secs(s);
        let expired_2015 = SystemTime::UNIX_EPOCH + h(1_420_070_400);
        // (expires_at, now, refresh before use?)
        let cases = [
            (Some(t0 + h(12 * 3600)), t0 + h(60), false),
            (Some(t0 + h(12 * 3600)), t0 + h(12 * 3600 - 299), true),
            (Some(t0 + h(12 * 3600)), t0 + h(13 * 3600), true),
            // Already expired on arrival (moto): used as is, no loop.
            (Some(expired_2015), t0, false),
            (Some(expired_2015), t0 + h(3600), false),
            (None, t0 + h(100_000), false),
        ];
        for (expires, now, want) in cases {
            assert_eq!(
                token("p", t0, expires).needs_refresh(now),
                want,
                "{expires:?} {now:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_fetch_for_concurrent_callers_and_at_most_one_refresh() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(AtomicU32::new(0));
        let expired = SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400);
        let fetch = move |fetches: Arc<AtomicU32>| async move {
            let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(token(&format!("pw{n}"), SystemTime::now(), Some(expired)))
        };
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, fetches) = (Arc::clone(&cache), Arc::clone(&fetches));
            tasks.push(tokio::spawn(async move {
                cache
                    .get(SystemTime::now(), || fetch(fetches))
                    .await
                    .map(|c| c.password.expose().to_string())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task").expect("token"), "pw1");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch shared");

        // An expired token is not refetched before use...
        let again = cache
            .get(SystemTime::now(), || fetch(Arc::clone(&fetches)))
            .await
            .expect("token");
        assert_eq!(again.password.expose(), "pw1");
        // ...but refreshed once after a 401, and never again.
        let first = cache.refresh(|| fetch(Arc::clone(&fetches))).await;
        assert_eq!(
            first
                .expect("refresh")
                .map(|c| c.password.expose().to_string()),
            Some("pw2".to_string())
        );
        let second = cache.refresh(|| fetch(Arc::clone(&fetches))).await;
        assert!(second.expect("no error").is_none());
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // The refreshed token is the cached one now.
        let now = cache
            .get(SystemTime::now(), || fetch(Arc::clone(&fetches)))
            .await
            .expect("token");
        assert_eq!(now.password.expose(), "pw2");

        // A failed fetch is reported and not cached: the next caller tries again.
        let failing = TokenCache::default();
        let err = failing
            .get(SystemTime::now(), || async {
                Err(EcrError::Api {
                    registry: "r".into(),
                    operation: "GetAuthorizationToken",
                    reason: "down".into(),
                    transient: true,
                })
            })
            .await;
        assert!(err.is_err());
        let ok = failing
            .get(SystemTime::now(), || fetch(Arc::clone(&fetches)))
            .await;
        assert!(ok.is_ok());
    }

    #[test]
    fn errors_are_one_line_with_exit_codes() {
        use crate::exit::ExitCode;
        let cases = [
            (
                EcrError::NoCredentials {
                    registry: "r".into(),
                    imds: String::new(),
                    docker: String::new(),
                    profile: String::new(),
                },
                ExitCode::Auth,
            ),
            (
                EcrError::Credentials {
                    registry: "r".into(),
                    reason: "x".into(),
                },
                ExitCode::Auth,
            ),
            (
                EcrError::Denied {
                    registry: "r".into(),
                    operation: "CreateRepository",
                    reason: "x".into(),
                },
                ExitCode::Auth,
            ),
            (
                EcrError::Api {
                    registry: "r".into(),
                    operation: "GetAuthorizationToken",
                    reason: "x".into(),
                    transient: true,
                },
                ExitCode::Registry,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    /// `{:?}` of everything that holds an ECR token (the cache, the registry client's auth,
    /// the push options) shows `<redacted>`, never the token or its base64 form.
    #[tokio::test]
    async fn debug_redacts_tokens() {
        let registry = "123456789012.dkr.ecr.eu-north-1.amazonaws.com:1";
        let opts = super::super::RegistryOptions {
            aws: AwsOptions {
                role_arn: Some("arn:aws:iam::123456789012:role/r".into()),
                ..AwsOptions::default()
            },
            credentials: Some(Credentials {
                username: "AWS".into(),
                password: Secret::new("explicit-hunter2"),
            }),
            ..super::super::RegistryOptions::default()
        };
        let ecr = EcrRegistry::shared(registry, &opts.aws).expect("an ECR host");
        let now = SystemTime::now();
        ecr.tokens
            .get(now, || async { Ok(token("token-hunter2", now, None)) })
            .await
            .expect("token");
        let auth = super::super::auth::Auth::new(registry, "app", &opts);
        let b64 = base64::engine::general_purpose::STANDARD.encode("AWS:token-hunter2");
        for shown in [format!("{ecr:?}"), format!("{auth:?}"), format!("{opts:?}")] {
            assert!(
                !shown.contains("hunter2") && !shown.contains(&b64),
                "{shown}"
            );
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[tokio::test]
    async fn name_unknown_from_ecr_says_how_to_create_the_repository() {
        use super::super::RegistryError;
        let protocol = |status: u16, body: &str| RegistryError::Protocol {
            url: "https://r/v2/app/blobs/uploads/".into(),
            status,
            body_snippet: body.into(),
            retry_after: None,
        };
        let missing = "NAME_UNKNOWN: The repository with name 'app' does not exist";
        let ecr = "123456789012.dkr.ecr.us-west-2.amazonaws.com";
        // (registry, status, body, the error that comes out mentions)
        let cases = [
            (ecr, 404, missing, "--create-repository"),
            (ecr, 404, "BLOB_UNKNOWN: blob unknown", "BLOB_UNKNOWN"),
            (ecr, 500, missing, "HTTP 500"),
            ("ghcr.io", 404, missing, "NAME_UNKNOWN"),
        ];
        for (registry, status, body, want) in cases {
            let mut calls = 0;
            let got: Result<(), _> = with_repository(
                registry,
                "app",
                &AwsOptions::default(),
                &crate::progress::Silent,
                || {
                    calls += 1;
                    let e = protocol(status, body);
                    async move { Err(e) }
                },
            )
            .await;
            let e = got.expect_err("an error");
            assert!(e.to_string().contains(want), "{registry} {status}: {e}");
            assert_eq!(calls, 1, "pushed once");
            if want == "--create-repository" {
                assert_eq!(e.exit_code(), crate::exit::ExitCode::Usage);
                assert!(e.to_string().contains("--region us-west-2"), "{e}");
            }
        }
    }

    #[test]
    fn session_names_fit_sts() {
        // STS: 2-64 characters of [\w+=,.@-].
        let name = session_name();
        assert!(name.starts_with("imgbuild-") && name.len() == 17, "{name}");
    }
}
