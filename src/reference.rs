//! Repository names and tags (distribution-spec spec.md "Pulling manifests": `<name>` and
//! `<reference>` grammars), checked against Docker's reference grammar
//! (distribution/reference/regexp.go), the one oci-spec's `Reference` implements. Checked by
//! hand, not with oci-spec's regular expression: compiling it (Unicode classes repeated 128
//! times) took tens of milliseconds of every run's start; the unit tests compare the two.

use crate::exit::ExitCode;
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
        if !valid_name(first, rest) {
            return Err(err("invalid reference format"));
        }
        // Docker's normalisation (reference/normalize.go splitDockerDomain): the legacy Hub
        // name is another registry's name, and a one-component Hub path is an official image.
        if first == "index.docker.io" {
            return Err(err("the registry host is not valid"));
        }
        let path = if first == "docker.io" && !rest.contains('/') {
            format!("library/{rest}")
        } else {
            rest.to_string()
        };
        if path.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(err(&format!(
                "repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters"
            )));
        }
        Ok(Repository {
            registry: first.to_string(),
            path,
        })
    }

    /// The registry's host name without port.
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }
}

/// The longest repository path (distribution's `NameTotalLengthMax`).
const NAME_TOTAL_LENGTH_MAX: usize = 255;

/// Does `first/rest` match the reference grammar's name, `[domain "/"] path-component
/// ("/" path-component)*`? The first component may be read as either (the grammar is
/// ambiguous there, and the regular expression accepts both readings).
fn valid_name(first: &str, rest: &str) -> bool {
    (domain(first) || path_component(first)) && rest.split('/').all(path_component)
}

/// `domain-component ("." domain-component)* [":" [0-9]+]`, a domain component being
/// `[a-zA-Z0-9]` or `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn domain(s: &str) -> bool {
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
}

/// `[a-z0-9]+ (("." | "_" | "__" | "-"*) [a-z0-9]+)*`: runs of lowercase letters and digits
/// joined by one separator.
fn path_component(s: &str) -> bool {
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(&b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        match &s[sep..i] {
            "." | "_" | "__" => {}
            dashes if dashes.bytes().all(|c| c == b'-') => {}
            _ => return false,
        }
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

    /// What `Repository::parse` answered when it used oci-spec's `Reference` (its regular
    /// expression is the grammar's reference implementation here).
    fn by_oci_spec(input: &str) -> Option<(String, String)> {
        if input.is_empty() || input.contains('@') {
            return None;
        }
        if input.rsplit('/').next().unwrap_or(input).contains(':') {
            return None;
        }
        let (first, rest) = input.split_once('/')?;
        if !(first.contains('.') || first.contains(':') || first == "localhost")
            || rest.chars().any(|c| c.is_ascii_uppercase())
        {
            return None;
        }
        let parsed: oci_spec::distribution::Reference = input.parse().ok()?;
        (parsed.registry() == first).then(|| (first.to_string(), parsed.repository().to_string()))
    }

    #[test]
    fn the_grammar_is_oci_specs() {
        // Every string of up to 5 characters over an alphabet with each kind of character
        // the grammar treats differently, behind a few registries and alone.
        let alphabet = ['a', '0', 'B', '.', '_', '-', ':', '/'];
        let mut tails = vec![String::new()];
        let mut all = Vec::new();
        for _ in 0..5 {
            let mut next = Vec::new();
            for t in &tails {
                for c in alphabet {
                    next.push(format!("{t}{c}"));
                }
            }
            all.extend(next.iter().cloned());
            tails = next;
        }
        let long = "a".repeat(250);
        let prefixes = [
            "",
            "r.io/",
            "localhost/",
            "docker.io/",
            "index.docker.io/",
            "h:5/a/",
        ];
        let mut checked = 0;
        for prefix in prefixes {
            for tail in all.iter().chain([&long, &format!("x/{long}")]) {
                let input = format!("{prefix}{tail}");
                let got = Repository::parse(&input).ok().map(|r| (r.registry, r.path));
                assert_eq!(got, by_oci_spec(&input), "{input:?}");
                checked += 1;
            }
        }
        assert!(checked > 200_000);
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
