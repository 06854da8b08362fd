//! Repository names and tags (distribution-spec spec.md "Pulling manifests": `<name>` and
//! `<reference>` grammars), parsed with oci-spec's reference grammar, which is Docker's.

use crate::exit::ExitCode;
use oci_spec::distribution::Reference;
use std::fmt;

/// Where an image goes: a registry host (with optional port) and a repository path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    /// `host[:port]` as written, e.g. `127.0.0.1:5000` or `123456789012.dkr.ecr.us-east-1.amazonaws.com`.
    pub registry: String,
    /// The path inside the registry, e.g. `team/hello`.
    pub path: String,
}

/// Why a repository or tag was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error(
        "invalid repository {input:?}: {reason} (expected REGISTRY/PATH in lowercase, e.g. 127.0.0.1:5000/hello or 123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app)"
    )]
    Repository { input: String, reason: String },
    #[error(
        "invalid tag {input:?}: a tag is 1 to 128 characters of letters, digits, '_', '.' and '-', not starting with '.' or '-'"
    )]
    Tag { input: String },
}

impl ReferenceError {
    /// A malformed repository or tag is a usage error (2).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

impl Repository {
    /// Parse `REGISTRY/PATH`. A tag or digest is refused (tags come from `--tag`/`tags`), as is a
    /// name without a registry host: pushing to Docker Hub by accident is worse than an error.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError::Repository {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if input.contains('@') {
            return Err(err("a repository takes no digest"));
        }
        let last = input.rsplit('/').next().unwrap_or(input);
        if last.contains(':') {
            return Err(err(
                "a repository takes no tag; use --tag or `tags` in the spec",
            ));
        }
        let (first, rest) = input
            .split_once('/')
            .ok_or_else(|| err("no registry host"))?;
        // Docker's rule (reference/normalize.go splitDockerDomain): the first component is a host
        // if it has a '.' or ':' or is `localhost`.
        if !(first.contains('.') || first.contains(':') || first == "localhost") {
            return Err(err("the first component is not a registry host"));
        }
        if rest.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(err("repository paths must be lowercase"));
        }
        let parsed: Reference = input
            .parse()
            .map_err(|e: oci_spec::distribution::ParseError| err(&e.to_string()))?;
        if parsed.registry() != first {
            return Err(err("the registry host is not valid"));
        }
        Ok(Repository {
            registry: first.to_string(),
            path: parsed.repository().to_string(),
        })
    }

    /// The registry's host name without port.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }
}

/// `host` part of `host[:port]` (IPv6 literals in brackets kept whole).
pub fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or(registry);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)
    }
}

/// What an [`ImageRef`] points at: a tag (mutable) or a digest (pinned).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefTarget {
    Tag(String),
    Digest(crate::digest::Digest),
}

/// A pullable image reference: `REGISTRY/PATH:TAG`, `REGISTRY/PATH@sha256:...` (base
/// images, `inspect`, `copy`). As docker and crane do, a name without a registry host means Docker Hub
/// (`alpine` -> `docker.io/library/alpine`), no tag means `latest`, and `NAME:TAG@DIGEST`
/// means the digest (the tag is informational).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub repo: Repository,
    pub target: RefTarget,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError::Repository {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let (name, digest) = match input.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    d.parse::<crate::digest::Digest>()
                        .map_err(|e| err(&e.to_string()))?,
                ),
            ),
            None => (input, None),
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        let (name, tag) = match last.rsplit_once(':') {
            Some((_, tag)) => {
                validate_tag(tag)?;
                (&name[..name.len() - tag.len() - 1], Some(tag))
            }
            None => (name, None),
        };
        let first = name.split('/').next().unwrap_or(name);
        let is_host = name.contains('/')
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let full = match (is_host, name.contains('/')) {
            (true, _) => name.to_string(),
            (false, true) => format!("docker.io/{name}"),
            (false, false) => format!("docker.io/library/{name}"),
        };
        let repo = Repository::parse(&full).map_err(|e| match e {
            ReferenceError::Repository { reason, .. } => err(&reason),
            other => other,
        })?;
        let target = match (digest, tag) {
            (Some(d), _) => RefTarget::Digest(d),
            (None, Some(t)) => RefTarget::Tag(t.to_string()),
            (None, None) => RefTarget::Tag("latest".into()),
        };
        Ok(ImageRef { repo, target })
    }

    /// The tag or digest as it goes into `/v2/<name>/manifests/<reference>`.
    pub fn reference(&self) -> String {
        match &self.target {
            RefTarget::Tag(t) => t.clone(),
            RefTarget::Digest(d) => d.to_string(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            RefTarget::Tag(t) => write!(f, "{}:{t}", self.repo),
            RefTarget::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// Check a tag against `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (distribution-spec).
pub fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let mut chars = tag.chars();
    let ok = tag.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::Tag {
            input: tag.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories() {
        let cases = [
            ("127.0.0.1:5000/hello", Some(("127.0.0.1:5000", "hello"))),
            ("localhost/a/b", Some(("localhost", "a/b"))),
            (
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app",
                Some(("123456789012.dkr.ecr.eu-west-1.amazonaws.com", "team/app")),
            ),
            ("ghcr.io/o/r", Some(("ghcr.io", "o/r"))),
            ("hello", None),
            ("library/hello", None),
            ("127.0.0.1:5000/Hello", None),
            ("127.0.0.1:5000/he llo", None),
            ("127.0.0.1:5000/hello:v1", None),
            ("127.0.0.1:5000/hello@sha256:abc", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = Repository::parse(input).ok();
            let got = got.as_ref().map(|r| (r.registry.as_str(), r.path.as_str()));
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn image_refs() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases: Vec<(String, Option<String>)> = vec![
            (
                "127.0.0.1:5000/base/bb:1".into(),
                Some("127.0.0.1:5000/base/bb:1".into()),
            ),
            (
                "127.0.0.1:5000/base/bb".into(),
                Some("127.0.0.1:5000/base/bb:latest".into()),
            ),
            (format!("ghcr.io/o/r@{d}"), Some(format!("ghcr.io/o/r@{d}"))),
            (
                format!("ghcr.io/o/r:v1@{d}"),
                Some(format!("ghcr.io/o/r@{d}")),
            ),
            ("alpine:3".into(), Some("docker.io/library/alpine:3".into())),
            (
                "bitnami/redis".into(),
                Some("docker.io/bitnami/redis:latest".into()),
            ),
            (
                "gcr.io/distroless/cc-debian12:nonroot".into(),
                Some("gcr.io/distroless/cc-debian12:nonroot".into()),
            ),
            (
                "localhost:5000/x".into(),
                Some("localhost:5000/x:latest".into()),
            ),
            ("ghcr.io/o/r@sha256:abc".into(), None),
            ("ghcr.io/o/r:bad tag".into(), None),
            ("ghcr.io/O/r:1".into(), None),
            ("".into(), None),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(&input).ok().map(|r| r.to_string());
            assert_eq!(got, want, "{input}");
        }
    }

    #[test]
    fn tags() {
        let long = "a".repeat(128);
        let too_long = "a".repeat(129);
        let cases = [
            ("v1", true),
            ("latest", true),
            ("_x.y-z", true),
            (long.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("-x", false),
            (".x", false),
            ("a b", false),
            ("a/b", false),
            ("a:b", false),
        ];
        for (tag, ok) in cases {
            assert_eq!(validate_tag(tag).is_ok(), ok, "{tag}");
        }
    }
}
