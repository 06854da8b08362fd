//! The registry sink: push a [`BuiltImage`] to an OCI distribution registry
//! (distribution-spec v1.1 spec.md, "Push" workflow).
//!
//! - [`client`]: the reqwest client, https-or-http choice, `/v2/` ping, requests with auth
//!   attached and one re-authentication on 401.
//! - [`auth`]: `WWW-Authenticate` parsing, credential sources, Bearer token cache, [`Secret`].
//! - [`upload`]: blobs (HEAD, POST, one streamed PUT; or, for a layer still being written,
//!   PATCHed chunks as it grows and a final PUT), manifests, index, tags, in that order.
//! - [`ecr`]: Amazon ECR hosts, AWS credentials, the token cache, create-on-push.
//! - [`resolve`]: `--resolve HOST:PORT:ADDR` (curl's convention).
//! - [`retry`]: which failures are retried, backoff with jitter, `Retry-After`, the deadline.
//! - [`copy`]: manifests and blobs moved between repositories as they are (`imgbuild copy`, `tag`).
//! - [`fuzzing`]: the response parsers' entry points for `fuzz/` and the property tests.
//!
//! Entry point: [`push`].

mod auth;
mod client;
pub mod copy;
mod ecr;
pub mod pull;
pub mod referrers;
mod resolve;
pub mod retry;
mod upload;

#[doc(hidden)]
pub mod fuzzing;

pub use auth::{Credentials, Secret};
/// The AWS SDK configuration ECR uses, shared with `--context s3://` (crate::context::s3).
pub(crate) use ecr::sdk_config as aws_sdk_config;
pub use ecr::{AwsOptions, EcrError, EcrHost, parse_host as parse_ecr_host};
pub use resolve::{ResolveOverride, ResolveParseError};
pub use retry::RetryPolicy;
pub(crate) use upload::PATCH_CHUNK;

use crate::digest::Digest;
use crate::exit::ExitCode;
use crate::image::BuiltImage;
use crate::progress::Progress;
use crate::reference::Repository;
use crate::store::BlobStore;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

/// How to reach and authenticate to a registry, in either direction: pushing, and pulling
/// (base images, `inspect`, the source of `copy`). The mount fields matter only to uploads.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Blob transfers (uploads, base layer downloads) at once (at least 1).
    pub jobs: usize,
    /// Hosts (`HOST` = any port, or `HOST:PORT`) that may be reached over plain http when https
    /// fails. Loopback hosts always may.
    pub insecure_registries: Vec<String>,
    /// From `--username` and `--password-stdin`; tried before the docker config.
    pub credentials: Option<Credentials>,
    /// Extra trust roots (PEM files), added to the system's.
    pub ca_certs: Vec<PathBuf>,
    /// Where `config.json` is; default `$DOCKER_CONFIG`, else `~/.docker`.
    pub docker_config_dir: Option<PathBuf>,
    /// Connect timeout, total timeout of small requests, and stall timeout of uploads (no byte
    /// sent and no answer for this long).
    pub timeout: Duration,
    pub user_agent: String,
    /// Other repositories of the same registry known to hold a blob (from the layer cache's
    /// push records): tried as cross-repo mounts before uploading.
    pub mount_sources: HashMap<Digest, Vec<String>>,
    /// Other repositories on the target registry that blobs are mounted from (base
    /// images): the token asks for pull access to them too. Filled in by the caller (`run::push`).
    pub mount_from: Vec<String>,
    /// Blobs the layer cache's push records say this very repository has (a previous push
    /// put them there): not pushed while the build runs, and when every blob of the image is
    /// among them, the tags are asked for their digest before anything else is sent (a
    /// re-push of the same build sends nothing). A stale record costs a round trip, never
    /// correctness: every blob is still confirmed before a manifest names it.
    pub recorded: HashSet<Digest>,
    /// ECR: role to assume, create-on-push (used only for ECR registries).
    pub aws: AwsOptions,
    /// `--resolve`: reach these host names at these addresses (TLS still checks the name).
    pub resolve: Vec<ResolveOverride>,
    /// `--retries`, `--deadline` and the backoff base.
    pub retry: RetryPolicy,
    /// `--upload-mode`: whether layers are uploaded while they are compressed.
    pub upload_mode: UploadMode,
}

/// How a push uploads layers (`--upload-mode`, `IMGBUILD_UPLOAD_MODE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UploadMode {
    /// `stream`, except `put` for Amazon ECR, whose chunked uploads have been broken
    /// (aws/containers-roadmap#2831, TESTBED.md).
    #[default]
    Auto,
    /// Upload each layer while it is compressed, in chunks as the compressed bytes come
    /// (spec.md "Pushing a blob in chunks"), the rest with the final PUT; a layer smaller
    /// than one chunk, or taken from the cache, goes as with `put`. Falls back to `put` for a
    /// layer whose chunks the registry does not take as it should.
    Stream,
    /// Upload each layer once it is complete, in one streamed PUT.
    Put,
}

impl UploadMode {
    /// Whether layers pushed to `registry` are streamed.
    pub fn streams(self, registry: &str) -> bool {
        match self {
            UploadMode::Auto => ecr::parse_host(registry).is_none(),
            UploadMode::Stream => true,
            UploadMode::Put => false,
        }
    }
}

impl std::str::FromStr for UploadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(UploadMode::Auto),
            "stream" => Ok(UploadMode::Stream),
            "put" => Ok(UploadMode::Put),
            _ => Err(format!(
                "unknown upload mode {s:?}: use stream, put or auto (stream, put for ECR)"
            )),
        }
    }
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            jobs: 4,
            insecure_registries: Vec::new(),
            credentials: None,
            ca_certs: Vec::new(),
            docker_config_dir: None,
            timeout: Duration::from_secs(60),
            user_agent: format!("imgbuild/{}", env!("CARGO_PKG_VERSION")),
            mount_sources: HashMap::new(),
            mount_from: Vec::new(),
            recorded: HashSet::new(),
            aws: AwsOptions::default(),
            resolve: Vec::new(),
            retry: RetryPolicy::default(),
            upload_mode: UploadMode::Auto,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The digest of the pushed index: `REPO@DIGEST` names the image.
    pub index_digest: Digest,
    /// Tags now pointing at the index.
    pub tags: Vec<String>,
    /// Blobs sent, in image order.
    pub uploaded: Vec<Digest>,
    /// Blobs the registry already had.
    pub skipped: Vec<Digest>,
    /// Bytes of the uploaded blobs.
    pub uploaded_bytes: u64,
    /// A tag already named the index before this push, so the repository had the image: no
    /// manifest or index was sent, only the tags that named something else.
    pub index_was_tagged: bool,
}

/// Push every blob, manifest and the index of `image` to `repo`, then point each of `tags` at
/// the index. Layers are streamed from `store`; configs, manifests and the index are sent as
/// their exact bytes. Nothing is tagged unless everything before succeeded.
pub async fn push(
    image: &BuiltImage,
    store: &BlobStore,
    repo: &Repository,
    tags: &[String],
    opts: &RegistryOptions,
    progress: &dyn Progress,
) -> Result<PushReport, RegistryError> {
    let mut opts = opts.clone();
    opts.mount_from = image
        .remote_layers
        .iter()
        .filter(|(from, _)| from.registry == repo.registry)
        .map(|(from, _)| from.path.clone())
        .collect();
    Session::connect(repo, &opts, progress)
        .await?
        .push_image(image, store, tags, progress)
        .await
}

/// A connection to one repository that can take layer blobs as soon as they are built, while
/// other layers still compress (README "Speed": overlap), and then the image. The image push does
/// not ask again about blobs this session already confirmed; manifests still go only after
/// every blob of the image is confirmed. `opts.mount_from` (base repositories blobs are
/// mounted from, for the token's scope) must be set before connecting.
#[derive(Debug)]
pub struct Session {
    client: client::Client,
    repo: Repository,
    opts: RegistryOptions,
    /// Blobs this session made sure of (or is making sure of), shared by the early uploads
    /// and the image push.
    blobs: upload::Blobs,
}

impl Session {
    /// Reach the registry and authenticate (the `/v2/` ping and challenge). With
    /// `--create-repository`, the ECR repository is made sure of first, so that
    /// layers pushed while the build runs have a repository to go to.
    pub async fn connect(
        repo: &Repository,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) -> Result<Self, RegistryError> {
        if opts.aws.create_repository {
            ecr::with_repository(&repo.registry, &repo.path, &opts.aws, progress, || async {
                Ok(())
            })
            .await?;
        }
        Ok(Session {
            client: client::Client::connect(repo, opts, progress).await?,
            repo: repo.clone(),
            opts: opts.clone(),
            blobs: upload::Blobs::new(opts.jobs),
        })
    }

    /// Make sure the registry has the layer blob `digest` (`size` bytes, in `store`): HEAD,
    /// mount or upload, with retries, as for the image's own blobs. A layer the push records
    /// place in this repository already is left for the image push, which may find that
    /// there is nothing to send at all.
    pub async fn push_layer(
        &self,
        digest: &Digest,
        size: u64,
        store: &BlobStore,
        progress: &dyn Progress,
    ) -> Result<(), RegistryError> {
        if self.opts.recorded.contains(digest) {
            return Ok(());
        }
        let from = self
            .opts
            .mount_sources
            .get(digest)
            .and_then(|r| r.first())
            .map(String::as_str);
        self.blobs
            .layer(
                &self.client,
                digest,
                size,
                store.path(digest),
                from,
                progress,
            )
            .await?;
        Ok(())
    }

    /// Whether layers are uploaded to this session while they are written
    /// ([`RegistryOptions::upload_mode`]).
    pub fn streams_layers(&self) -> bool {
        self.opts.upload_mode.streams(&self.repo.registry)
    }

    /// Claim `digest` for a streamed upload about to be finished: see [`upload::Blobs::claim`].
    pub(crate) fn claim(&self, digest: &Digest) -> Option<upload::Claim> {
        self.blobs.claim(digest)
    }

    /// Upload a layer while it is written ([`upload::ChunkedUpload`]): `file` reads its
    /// temporary file `temp`, `written` follows how much of it is there, and `finished` says
    /// when it is complete (its digest, size, and the claim to finish it; a closed channel:
    /// writing failed, nothing to upload; no claim: someone else makes sure of it). A
    /// layer whose streaming failed is then pushed whole ([`Session::push_layer`]); its
    /// failure is left for the image push to retry and report.
    pub(crate) async fn stream_layer(
        &self,
        file: std::sync::Arc<std::fs::File>,
        temp: PathBuf,
        mut written: tokio::sync::watch::Receiver<u64>,
        finished: tokio::sync::oneshot::Receiver<Finished>,
        store: &BlobStore,
        progress: &dyn Progress,
    ) {
        let mut upload = upload::ChunkedUpload::new(file, temp);
        let mut failed = false;
        let mut growing = true;
        tokio::pin!(finished);
        let end = loop {
            if !failed {
                let ready = *written.borrow_and_update();
                let started = upload.started();
                let sent = upload.send_chunks(&self.client, ready).await;
                if !started && upload.started() {
                    progress.event(crate::progress::Event::Debug(
                        "uploading a layer while it is compressed, in chunks",
                    ));
                }
                if let Err(e) = sent {
                    progress.event(crate::progress::Event::Debug(&format!(
                        "uploading a layer while it is written failed ({}); it is uploaded whole once complete",
                        e.short_reason()
                    )));
                    failed = true;
                }
            }
            tokio::select! {
                biased;
                end = &mut finished => break end,
                changed = written.changed(), if growing && !failed => growing = changed.is_ok(),
            }
        };
        let Ok(Finished {
            digest,
            size,
            claim,
        }) = end
        else {
            return;
        };
        let Some(claim) = claim else { return };
        if !failed && upload.started() {
            match self
                .blobs
                .finish_stream(&self.client, upload, &digest, size, claim, progress)
                .await
            {
                Ok(_) => return,
                Err(e) => progress.event(crate::progress::Event::Debug(&format!(
                    "finishing the streamed upload of {digest} failed ({}); uploading it whole",
                    e.short_reason()
                ))),
            }
        } else {
            drop(claim);
        }
        if let Err(e) = self.push_layer(&digest, size, store, progress).await {
            progress.event(crate::progress::Event::Debug(&format!(
                "early upload of {digest} failed ({e}); the image push tries again"
            )));
        }
    }

    /// Push the base layers not in the store (mounted or copied) and what of `image` is not
    /// confirmed yet, then manifests, the index and `tags` ([`upload::push_image`]: nothing
    /// but the tags' HEADs when a tag already names the index). On ECR, a missing repository
    /// is reported (with `--create-repository` it was created by
    /// `connect`).
    pub async fn push_image(
        &self,
        image: &BuiltImage,
        store: &BlobStore,
        tags: &[String],
        progress: &dyn Progress,
    ) -> Result<PushReport, RegistryError> {
        let (repo, opts) = (&self.repo, &self.opts);
        // Made sure of in `connect` (not described a second time); still created here if ECR
        // answers NAME_UNKNOWN, e.g. when the credentials may push but not describe.
        ecr::with_repository(&repo.registry, &repo.path, &opts.aws, progress, || async {
            upload::push_image(
                &self.client,
                &self.blobs,
                image,
                store,
                tags,
                &opts.mount_sources,
                &opts.recorded,
                pull::transfer_base_layers(&self.client, repo, image, opts, progress),
                progress,
            )
            .await
        })
        .await
    }
}

impl Session {
    /// Attach SBOM/provenance referrers to the pushed image's platform manifests
    /// ([`referrers`]); call after [`Session::push_image`]. `image_was_tagged`: its report
    /// said the index was already tagged (the referrers are then probably there as well).
    pub async fn attach(
        &self,
        attachments: &[crate::supply::Attachment],
        image_was_tagged: bool,
        progress: &dyn Progress,
    ) -> Result<referrers::AttachReport, RegistryError> {
        referrers::attach(&self.client, attachments, image_was_tagged, progress).await
    }
}

/// A layer streamed by [`Session::stream_layer`] is complete.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    /// From [`Session::claim`].
    pub(crate) claim: Option<upload::Claim>,
}

/// Why a push failed. Each message is one line, names the URL, registry or file, says what to
/// do, and never holds a secret (URLs are shown without query strings).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot connect to {url}: {reason}; {hint}")]
    Unreachable {
        url: String,
        /// `nothing listens on HOST:PORT (connection refused)`, or the innermost cause.
        reason: String,
        /// What was tried and what to check.
        hint: String,
        /// Kept for library users; not a `source()`: its chain is long and says nothing the
        /// reason does not (main prints every source).
        cause: std::sync::Arc<reqwest::Error>,
    },
    #[error("TLS connection to {url} failed: {reason}; {advice}")]
    Tls {
        url: String,
        reason: String,
        /// What to do, for this kind of failure and the `--ca-cert` files given.
        advice: String,
        /// The registry's certificate was refused (unknown CA, wrong name, expired): exit 6.
        certificate: bool,
    },
    #[error(
        "no progress talking to {url} for {secs} s; the registry or the network stalled (try again, or raise the timeout)"
    )]
    Timeout { url: String, secs: u64 },
    #[error(
        "authentication to {registry} failed (HTTP {status}) using {tried}; {}",
        unauthorized_advice(registry, tried)
    )]
    Unauthorized {
        registry: String,
        /// Which credential source was used (never the secret itself).
        tried: String,
        status: u16,
    },
    #[error(
        "access to {url} denied (HTTP 403) using {tried}; check that this account may push to the repository"
    )]
    Denied { url: String, tried: String },
    #[error(
        "unexpected answer from {url}: HTTP {status}: {body_snippet}; check the registry address, or the registry's logs"
    )]
    Protocol {
        url: String,
        status: u16,
        /// First 200 characters of the body, one line (or the registry's error codes).
        body_snippet: String,
        /// `Retry-After` in seconds, for the retry policy.
        retry_after: Option<Duration>,
    },
    #[error(
        "{url} answered Docker-Content-Digest {got} for content we sent as {expected}; something between us and the registry changed it"
    )]
    DigestMismatch {
        url: String,
        expected: Digest,
        got: String,
    },
    #[error(
        "{url} accepted blob {digest} but does not have it (HEAD answered 404); the registry lost the upload"
    )]
    BlobMissing { url: String, digest: Digest },
    #[error(
        "{url} served content hashing to {got}, not the {expected} asked for; the registry (or something between) serves corrupt content"
    )]
    ContentMismatch {
        url: String,
        /// What was asked for (a digest, or the registry's `Docker-Content-Digest` for a tag).
        expected: String,
        got: String,
    },
    #[error("refusing {reason} ({url}); this would expose credentials or content to tampering")]
    Insecure { url: String, reason: String },
    /// More redirects than a client follows: a loop, usually a misconfigured proxy or
    /// address; not a security refusal, and not retried (it would loop again).
    #[error(
        "{url} redirected more than 10 times (a redirect loop); check the registry address and any proxy or load balancer in front of it"
    )]
    RedirectLoop { url: String },
    #[error(
        "blob {path} is corrupt: expected {expected}, found {found}; delete it and build again"
    )]
    CorruptBlob {
        path: PathBuf,
        expected: Digest,
        found: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "invalid CA certificate file {path}: {reason}; --ca-cert takes PEM-encoded CA certificates"
    )]
    CaCert { path: PathBuf, reason: String },
    #[error("cannot set up the HTTP client: {reason}")]
    Client { reason: String },
    #[error(transparent)]
    Ecr(#[from] EcrError),
}

impl RegistryError {
    /// The process exit code for this failure (README "Exit codes").
    pub fn exit_code(&self) -> ExitCode {
        match self {
            RegistryError::Unauthorized { .. } | RegistryError::Denied { .. } => ExitCode::Auth,
            RegistryError::Tls {
                certificate: true, ..
            } => ExitCode::Trust,
            RegistryError::Unreachable { .. }
            | RegistryError::Tls { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::Protocol { .. }
            | RegistryError::DigestMismatch { .. }
            | RegistryError::BlobMissing { .. }
            | RegistryError::ContentMismatch { .. }
            | RegistryError::Insecure { .. }
            | RegistryError::RedirectLoop { .. } => ExitCode::Registry,
            RegistryError::CaCert { .. } => ExitCode::Usage,
            RegistryError::CorruptBlob { .. }
            | RegistryError::Io { .. }
            | RegistryError::Client { .. } => ExitCode::Internal,
            RegistryError::Ecr(e) => e.exit_code(),
        }
    }

    /// The cause without the advice, for debug lines.
    pub(crate) fn short_reason(&self) -> String {
        match self {
            RegistryError::Unreachable { reason, .. } | RegistryError::Tls { reason, .. } => {
                reason.clone()
            }
            other => other.to_string(),
        }
    }

    /// Say what this connection attempt tried: plain http after https (`http_tried`), and the
    /// `--ca-cert` files given (a TLS failure's advice must not ask for them again).
    pub(crate) fn in_context(self, http_tried: bool, ca_certs: &[PathBuf]) -> Self {
        match self {
            RegistryError::Unreachable {
                url, reason, cause, ..
            } if http_tried => RegistryError::Unreachable {
                url,
                reason,
                hint: "plain http was tried too; check the registry address and that it is running"
                    .into(),
                cause,
            },
            RegistryError::Tls {
                url,
                reason,
                certificate: true,
                ..
            } if !ca_certs.is_empty()
                && (reason.contains("UnknownIssuer") || reason.contains("BadSignature")) =>
            {
                let files: Vec<String> = ca_certs.iter().map(|p| p.display().to_string()).collect();
                RegistryError::Tls {
                    url,
                    reason,
                    advice: format!(
                        "the certificate is signed neither by a system CA nor by the --ca-cert file(s) given ({}); check that they hold the CA that issued the registry's certificate (openssl verify -CAfile FILE CERT)",
                        files.join(", ")
                    ),
                    certificate: true,
                }
            }
            other => other,
        }
    }

    /// A failure below HTTP: no answer at all (refused, TLS, stalled).
    pub(crate) fn is_transport(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::Tls { .. }
                | RegistryError::Timeout { .. }
        )
    }
}

/// What to do after a 401: with `--username` given, check what was given (not "pass
/// --username"); otherwise log in, and `push` (only) also takes the flags for its target.
fn unauthorized_advice(registry: &str, tried: &str) -> String {
    if tried.contains("given with --username") {
        "check the user name given with --username and the password or token piped to --password-stdin (for ECR: --username AWS and `aws ecr get-login-password`)".into()
    } else {
        format!(
            "log in with `docker login {registry}` (or give REGISTRY_AUTH_FILE); for the registry `push` pushes to, --username with --password-stdin also works"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_advice_fits_what_was_tried() {
        let given = RegistryError::Unauthorized {
            registry: "r:5000".into(),
            tried: "the credentials given with --username".into(),
            status: 401,
        }
        .to_string();
        assert!(
            given.contains("check the user name given with --username"),
            "{given}"
        );
        assert!(!given.contains("pass --username"), "{given}");
        let none = RegistryError::Unauthorized {
            registry: "r:5000".into(),
            tried: "no credentials (no --username, and none for r:5000 in /h/config.json)".into(),
            status: 401,
        }
        .to_string();
        assert!(none.contains("log in with `docker login r:5000`"), "{none}");
    }

    /// `push` can run on a multi-threaded runtime's spawned task (its future is `Send`).
    #[allow(dead_code)]
    fn push_future_is_send(
        image: &BuiltImage,
        store: &BlobStore,
        repo: &Repository,
        opts: &RegistryOptions,
        progress: &dyn Progress,
    ) {
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&push(image, store, repo, &[], opts, progress));
    }

    #[test]
    fn upload_mode_streams_except_to_ecr_unless_asked() {
        let ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
        let other = "ghcr.io";
        let modes = |m: &str| m.parse::<UploadMode>().unwrap();
        assert!(modes("auto").streams(other) && !modes("auto").streams(ecr));
        assert!(UploadMode::default().streams("127.0.0.1:5000"));
        assert!(modes("stream").streams(ecr));
        assert!(!modes("put").streams(other));
        let err = "chunked".parse::<UploadMode>().unwrap_err();
        assert!(err.contains("stream, put or auto"), "{err}");
    }

    #[test]
    fn exit_codes() {
        let cases = [
            (
                RegistryError::Unauthorized {
                    registry: "r".into(),
                    tried: "t".into(),
                    status: 401,
                },
                ExitCode::Auth,
            ),
            (
                RegistryError::Denied {
                    url: "u".into(),
                    tried: "t".into(),
                },
                ExitCode::Auth,
            ),
            (
                RegistryError::Timeout {
                    url: "u".into(),
                    secs: 1,
                },
                ExitCode::Registry,
            ),
            (
                RegistryError::Tls {
                    url: "u".into(),
                    reason: "invalid peer certificate: UnknownIssuer".into(),
                    advice: "a".into(),
                    certificate: true,
                },
                ExitCode::Trust,
            ),
            (
                RegistryError::Tls {
                    url: "u".into(),
                    reason: "received fatal alert: HandshakeFailure".into(),
                    advice: "a".into(),
                    certificate: false,
                },
                ExitCode::Registry,
            ),
            (
                RegistryError::Io {
                    path: "p".into(),
                    source: std::io::Error::other("x"),
                },
                ExitCode::Internal,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.exit_code(), want, "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
