//! The build spec: a TOML file (conventionally in `build-specs/`) saying what goes into the
//! image. Parsing is pure (text in, validated [`Spec`] out); reading the file is the only I/O.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a typo must not silently build a
//! different image. Every error names the file, line and column and says what to do.

use crate::exit::ExitCode;
use crate::platform::{PLACEHOLDERS, Platform};
use crate::reference::{ImageRef, Repository, validate_tag};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The default image user: distroless's `nonroot` (65532), so images run as non-root unless
/// the spec says otherwise.
pub const DEFAULT_USER: &str = "65532:65532";

/// The runtime configuration from the spec's `[config]` table, as `image` puts it into the
/// image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// `None`: the base image's user, or [`DEFAULT_USER`] on scratch.
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
}

/// A label or annotation value larger than this is refused: registries cap manifest size
/// (4 MiB in distribution) and huge values are nearly always a mistake.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// A place in the spec file, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Why a spec was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read build spec {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{at}: {message}")]
    Invalid { at: Location, message: String },
}

impl SpecError {
    /// A spec that cannot be read or is invalid is the caller's to fix (2).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// What `base` names (README "Base images").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// No base: the image holds only our layers.
    Scratch,
    /// The built-in base (`static_base.rs`): users, CA certificates, /tmp; made locally.
    Static,
    /// An image in a registry, by tag or digest.
    Registry(ImageRef),
    /// An OCI image layout directory (`oci:PATH[:TAG]`); `path` is already resolved against
    /// the spec's directory (or the working directory for `--base`). `text` is what the user
    /// wrote: it names the base in annotations, so the digest does not depend on where the
    /// checkout is.
    Layout {
        path: PathBuf,
        tag: Option<String>,
        text: String,
    },
}

impl Base {
    /// Parse `scratch`, `oci:PATH[:TAG]` or an image reference; relative layout paths are
    /// joined to `dir`. The error is a message without location, for the caller to place.
    pub fn parse(text: &str, dir: &Path) -> Result<Base, String> {
        if text == "scratch" {
            return Ok(Base::Scratch);
        }
        if text == crate::static_base::NAME {
            return Ok(Base::Static);
        }
        if let Some(rest) = text.strip_prefix("oci:") {
            // `oci:dir:tag`: the last `:` starts a tag only if what follows is a valid tag
            // (a path may itself hold `:`), as skopeo's oci: transport reads it.
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !p.is_empty() && validate_tag(t).is_ok() => (p, Some(t)),
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(format!(
                    "{text:?} names no directory; write oci:./path/to/layout[:tag]"
                ));
            }
            return Ok(Base::Layout {
                path: dir.join(path),
                tag: tag.map(str::to_string),
                text: text.to_string(),
            });
        }
        ImageRef::parse(text).map(Base::Registry).map_err(|e| {
            format!("{e}; a base is \"scratch\", \"static\", REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:... or oci:PATH[:TAG]")
        })
    }
}

impl fmt::Display for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base::Scratch => f.write_str("scratch"),
            Base::Static => f.write_str(crate::static_base::NAME),
            Base::Registry(r) => write!(f, "{r}"),
            Base::Layout { text, .. } => f.write_str(text),
        }
    }
}

/// One file or directory to put into a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Source path template, relative to the context directory; may hold placeholders.
    pub src: String,
    /// Absolute destination path in the image, normalised (no trailing `/`, no `.` parts).
    pub dest: String,
    pub mode: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    /// Where this entry is in the spec (the `src` key).
    pub at: Location,
}

/// One `[[layer]]`: becomes one layer tar per platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    pub files: Vec<FileSpec>,
}

/// A validated build spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The spec file.
    pub path: PathBuf,
    /// Directory that relative `src` paths are resolved against (the spec file's own).
    pub context: PathBuf,
    pub repository: Option<Repository>,
    pub tags: Vec<String>,
    pub platforms: Vec<Platform>,
    pub base: Base,
    /// `[base_overrides]`: a different base for some platforms.
    pub base_overrides: BTreeMap<Platform, Base>,
    pub config: RuntimeConfig,
    pub annotations: BTreeMap<String, String>,
    pub layers: Vec<LayerSpec>,
}

impl Spec {
    /// The name used for the default output directory: the spec file's stem.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    repository: Option<Spanned<String>>,
    tags: Option<Vec<Spanned<String>>>,
    platforms: Option<Spanned<Vec<Spanned<String>>>>,
    base: Option<Spanned<String>>,
    #[serde(default)]
    base_overrides: BTreeMap<String, Spanned<String>>,
    config: Option<RawConfig>,
    #[serde(default)]
    layer: Vec<Spanned<RawLayer>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    user: Option<Spanned<String>>,
    workdir: Option<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    exposed_ports: Vec<Spanned<PortValue>>,
    #[serde(default)]
    annotations: BTreeMap<String, Spanned<String>>,
    stop_signal: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PortValue {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayer {
    files: Vec<RawFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: Spanned<String>,
    dest: Spanned<String>,
    mode: Option<Spanned<ModeValue>>,
    uid: Option<Spanned<i64>>,
    gid: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ModeValue {
    Number(i64),
    Text(String),
}

/// Read and parse the spec at `path`.
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Turns byte offsets into line/column locations in one file.
struct Locator<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>) -> Location {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Location {
            file: self.file.to_path_buf(),
            line,
            column,
        }
    }

    fn err(&self, span: Range<usize>, message: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            at: self.at(span),
            message: message.into(),
        }
    }
}

/// Parse spec text; `file` is used for locations and as the context directory's anchor.
pub fn parse(text: &str, file: &Path) -> Result<Spec, SpecError> {
    let loc = Locator { text, file };
    let raw: RawSpec = toml::from_str(text).map_err(|e| {
        // toml's own Display is several lines with a caret; we want one line.
        let message = e.message().trim().replace('\n', " ");
        loc.err(e.span().unwrap_or(0..0), message)
    })?;

    let repository = raw
        .repository
        .map(|r| {
            Repository::parse(r.get_ref())
                .map_err(|e| loc.err(r.span(), format!("repository: {e}")))
        })
        .transpose()?;

    // `tags = []` pushes by digest only (crane push without a tag, `--no-tag`).
    let tags = match raw.tags {
        None => vec!["latest".to_string()],
        Some(tags) => {
            let mut out = Vec::new();
            for t in tags {
                validate_tag(t.get_ref()).map_err(|e| loc.err(t.span(), format!("tags: {e}")))?;
                out.push(t.into_inner());
            }
            out
        }
    };

    let platforms = match raw.platforms {
        None => Platform::defaults(),
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(loc.err(
                    list.span(),
                    "platforms: the list is empty; name at least one, e.g. [\"linux/amd64\", \"linux/arm64\"]",
                ));
            }
            let mut out: Vec<Platform> = Vec::new();
            for p in list.into_inner() {
                let parsed: Platform = p
                    .get_ref()
                    .parse()
                    .map_err(|e| loc.err(p.span(), format!("platforms: {e}")))?;
                if out.contains(&parsed) {
                    return Err(loc.err(p.span(), format!("platforms: {parsed} is listed twice")));
                }
                out.push(parsed);
            }
            out
        }
    };

    // Relative `oci:` paths are relative to the spec's directory (like `src`).
    let spec_dir = file.parent().unwrap_or(Path::new("."));
    let base = match raw.base {
        None => Base::Scratch,
        Some(b) => Base::parse(b.get_ref(), spec_dir)
            .map_err(|m| loc.err(b.span(), format!("base: {m}")))?,
    };
    let mut base_overrides = BTreeMap::new();
    for (k, v) in raw.base_overrides {
        let platform: Platform = k
            .parse()
            .map_err(|e| loc.err(v.span(), format!("base_overrides: {e}")))?;
        let b = Base::parse(v.get_ref(), spec_dir)
            .map_err(|m| loc.err(v.span(), format!("base_overrides.\"{k}\": {m}")))?;
        base_overrides.insert(platform, b);
    }

    let raw_config = raw.config.unwrap_or_default();
    let mut config = RuntimeConfig {
        entrypoint: raw_config.entrypoint,
        cmd: raw_config.cmd,
        user: None,
        stop_signal: None,
        ..Default::default()
    };
    if let Some(sig) = raw_config.stop_signal {
        check_stop_signal(sig.get_ref()).map_err(|m| loc.err(sig.span(), m))?;
        config.stop_signal = Some(sig.into_inner());
    }
    if let Some(user) = raw_config.user {
        if user.get_ref().is_empty() {
            return Err(loc.err(
                user.span(),
                "config.user: empty; use e.g. \"65532:65532\" or \"0:0\" for root",
            ));
        }
        check_user(user.get_ref()).map_err(|m| loc.err(user.span(), m))?;
        config.user = Some(user.into_inner());
    }
    if let Some(w) = raw_config.workdir {
        if !w.get_ref().starts_with('/') {
            return Err(loc.err(w.span(), "config.workdir: must be an absolute path"));
        }
        config.workdir = Some(w.into_inner());
    }
    for (k, v) in raw_config.env {
        if k.is_empty() || k.contains('=') {
            return Err(loc.err(v.span(), format!("config.env: invalid variable name {k:?}")));
        }
        config.env.insert(k, v.into_inner());
    }
    config.labels = checked_map(&loc, "config.labels", raw_config.labels)?;
    let annotations = checked_map(&loc, "config.annotations", raw_config.annotations)?;
    for port in raw_config.exposed_ports {
        let span = port.span();
        config
            .exposed_ports
            .push(normalize_port(port.into_inner()).map_err(|m| loc.err(span, m))?);
    }
    config.exposed_ports.sort();
    config.exposed_ports.dedup();

    let mut layers = Vec::new();
    for layer in raw.layer {
        let span = layer.span();
        let layer = layer.into_inner();
        if layer.files.is_empty() {
            return Err(loc.err(span, "layer.files: a layer needs at least one file"));
        }
        let mut files = Vec::new();
        for f in layer.files {
            files.push(file_spec(&loc, f)?);
        }
        layers.push(LayerSpec { files });
    }
    if layers.is_empty() {
        return Err(loc.err(
            0..0,
            "no [[layer]] tables: add at least one with [[layer.files]] src/dest entries",
        ));
    }

    let context = file
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    Ok(Spec {
        path: file.to_path_buf(),
        context,
        repository,
        tags,
        platforms,
        base,
        base_overrides,
        config,
        annotations,
        layers,
    })
}

fn checked_map(
    loc: &Locator<'_>,
    field: &str,
    map: BTreeMap<String, Spanned<String>>,
) -> Result<BTreeMap<String, String>, SpecError> {
    let mut out = BTreeMap::new();
    for (k, v) in map {
        if k.trim().is_empty() {
            return Err(loc.err(
                v.span(),
                format!("{field}: a key is empty; name it, e.g. org.opencontainers.image.title"),
            ));
        }
        if v.get_ref().len() > MAX_VALUE_BYTES {
            return Err(loc.err(
                v.span(),
                format!(
                    "{field}.{k}: value is {} bytes, over the 64 KiB limit",
                    v.get_ref().len()
                ),
            ));
        }
        out.insert(k, v.into_inner());
    }
    Ok(out)
}

/// `8080` or `"8080"` -> `8080/tcp`; `"53/udp"` stays (image-spec config.md ExposedPorts).
fn normalize_port(p: PortValue) -> Result<String, String> {
    let text = match p {
        PortValue::Number(n) => n.to_string(),
        PortValue::Text(t) => t,
    };
    let (num, proto) = text.split_once('/').unwrap_or((&text, "tcp"));
    let ok = num.parse::<u16>().is_ok_and(|n| n > 0) && matches!(proto, "tcp" | "udp" | "sctp");
    if ok {
        Ok(format!("{num}/{proto}"))
    } else {
        Err(format!(
            "config.exposed_ports: {text:?} is not a port; use 8080, \"8080/tcp\" or \"53/udp\""
        ))
    }
}

fn file_spec(loc: &Locator<'_>, f: RawFile) -> Result<FileSpec, SpecError> {
    let src_span = f.src.span();
    let src = f.src.into_inner();
    if src.is_empty() {
        return Err(loc.err(src_span, "layer.files.src: empty path"));
    }
    // Reject unknown `{name}` placeholders now rather than looking for a file literally
    // named `{arhc}` later.
    let mut rest = src.as_str();
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').map(|c| open + c + 1);
        let Some(close) = close else { break };
        let ph = &rest[open..close];
        if !PLACEHOLDERS.contains(&ph) {
            return Err(loc.err(
                src_span,
                format!(
                    "layer.files.src: unknown placeholder {ph}; known: {}",
                    PLACEHOLDERS.join(" ")
                ),
            ));
        }
        rest = &rest[close..];
    }

    let dest_span = f.dest.span();
    let dest = normalize_dest(f.dest.get_ref()).map_err(|m| loc.err(dest_span, m))?;

    let mode = f
        .mode
        .map(|m| {
            let span = m.span();
            let raw = loc.text.get(span.clone()).unwrap_or("");
            check_decimal_mode(raw).map_err(|msg| loc.err(span.clone(), msg))?;
            parse_mode(m.into_inner()).map_err(|msg| loc.err(span, msg))
        })
        .transpose()?;
    let id = |v: Option<Spanned<i64>>, field: &str| -> Result<u32, SpecError> {
        match v {
            None => Ok(0),
            Some(v) => u32::try_from(*v.get_ref()).map_err(|_| {
                loc.err(
                    v.span(),
                    format!("layer.files.{field}: must be 0 to 4294967295"),
                )
            }),
        }
    };
    Ok(FileSpec {
        src,
        dest,
        mode,
        uid: id(f.uid, "uid")?,
        gid: id(f.gid, "gid")?,
        at: loc.at(src_span),
    })
}

/// Check and normalise an image path: absolute, no `..`, no empty or `.` components.
pub fn normalize_dest(dest: &str) -> Result<String, String> {
    if !dest.starts_with('/') {
        return Err(format!(
            "layer.files.dest: {dest:?} is not absolute; write it as \"/{dest}\""
        ));
    }
    let mut parts = Vec::new();
    for part in dest.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "layer.files.dest: {dest:?} contains \"..\"; write the path without it"
                ));
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(format!(
            "layer.files.dest: {dest:?} is the root; name a path below /"
        ));
    }
    if dest.contains('\0') {
        return Err("layer.files.dest: contains a NUL byte".into());
    }
    Ok(format!("/{}", parts.join("/")))
}

/// TOML has no bare octal: `mode = 755` is the decimal 755 (0o1363, sticky and odd bits),
/// never what was meant. A bare integer of two or more digits, all 0-7, is refused; decimal
/// with an 8 or 9 (`493` = 0o755) and the `0o`/string forms are taken as written.
fn check_decimal_mode(raw: &str) -> Result<(), String> {
    let raw = raw.trim();
    let looks_octal = raw.len() >= 2 && raw.bytes().all(|b| (b'0'..=b'7').contains(&b));
    if !looks_octal {
        return Ok(());
    }
    let value: u32 = raw.parse().unwrap_or(0);
    Err(format!(
        "layer.files.mode: {raw} is the decimal number {raw} (0o{value:o}), not the mode {raw}; write 0o{raw} or \"0{raw}\""
    ))
}

/// `config.user`: `USER`, `UID`, `USER:GROUP` or `UID:GID` (image-spec config.md `User`);
/// no whitespace or control characters, which no runtime can resolve.
fn check_user(user: &str) -> Result<(), String> {
    if user.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "config.user: {user:?} holds whitespace or a control character; write USER, UID, USER:GROUP or UID:GID, e.g. \"65532:65532\""
        ));
    }
    let mut parts = user.split(':');
    let (name, group, extra) = (parts.next(), parts.next(), parts.next());
    if name.is_some_and(str::is_empty) || group.is_some_and(str::is_empty) || extra.is_some() {
        return Err(format!(
            "config.user: {user:?} is not USER, UID, USER:GROUP or UID:GID; e.g. \"65532:65532\""
        ));
    }
    Ok(())
}

/// Signal names Linux knows (signal(7)), without the `SIG` prefix.
const SIGNALS: &[&str] = &[
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "IOT", "BUS", "FPE", "KILL", "USR1", "SEGV",
    "USR2", "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU",
    "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "POLL", "PWR", "SYS", "RTMIN", "RTMAX",
];

/// `config.stop_signal` as runtimes parse it (moby's `signal.ParseSignal`): a number 1-64, or
/// a name with or without `SIG`, or `RTMIN+N` / `RTMAX-N`.
fn check_stop_signal(sig: &str) -> Result<(), String> {
    let upper = sig.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let ok = match name.parse::<u32>() {
        Ok(n) => (1..=64).contains(&n),
        Err(_) => {
            SIGNALS.contains(&name)
                || [("RTMIN+", 30), ("RTMAX-", 30)].iter().any(|(p, max)| {
                    name.strip_prefix(p)
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|n| n <= *max)
                })
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "config.stop_signal: {sig:?} is not a signal; use a name like \"SIGTERM\" or \"SIGQUIT\", or a number 1-64"
        ))
    }
}

fn parse_mode(m: ModeValue) -> Result<u32, String> {
    let v = match m {
        ModeValue::Number(n) => u32::try_from(n).ok(),
        // "0755" or "755": octal, as chmod reads it.
        ModeValue::Text(t) => u32::from_str_radix(t.trim_start_matches("0o"), 8).ok(),
    };
    v.filter(|v| *v <= 0o7777)
        .ok_or_else(|| "layer.files.mode: use an octal mode like 0o755 or \"0755\"".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
repository = "127.0.0.1:5000/hello"
tags = ["v1", "latest"]
platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
base = "scratch"

[config]
entrypoint = ["/hello"]
env = { RUST_LOG = "info" }
workdir = "/"
labels = { "org.example.team" = "infra" }
exposed_ports = [8080, "53/udp"]

[[layer]]
files = [
  { src = "dist/{arch}/hello", dest = "/usr/local/bin/hello", mode = 0o755 },
]

[[layer]]
[[layer.files]]
src = "share"
dest = "/etc/hello/"
uid = 1000
gid = 1000
mode = "0644"
"#;

    #[test]
    fn parses_full_example() {
        let spec = parse(GOOD, Path::new("specs/x.toml")).unwrap();
        assert_eq!(spec.tags, ["v1", "latest"]);
        assert_eq!(spec.platforms.len(), 3);
        assert_eq!(spec.platforms[2].to_string(), "linux/arm/v7");
        assert_eq!(spec.config.user, None);
        assert_eq!(spec.config.exposed_ports, ["53/udp", "8080/tcp"]);
        assert_eq!(spec.layers.len(), 2);
        assert_eq!(spec.layers[0].files[0].mode, Some(0o755));
        assert_eq!(spec.layers[1].files[0].dest, "/etc/hello");
        assert_eq!(spec.layers[1].files[0].mode, Some(0o644));
        assert_eq!(
            (spec.layers[1].files[0].uid, spec.layers[1].files[0].gid),
            (1000, 1000)
        );
        assert_eq!(spec.layers[0].files[0].at.line, 16);
        assert_eq!(spec.context, Path::new("specs"));
        assert_eq!(spec.name(), "x");
    }

    #[test]
    fn defaults() {
        let spec = parse(
            "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\"}]\n",
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(spec.tags, ["latest"]);
        assert_eq!(spec.platforms, Platform::defaults());
        assert_eq!(spec.repository, None);
        assert_eq!(spec.base, Base::Scratch);
        assert_eq!(spec.context, Path::new("."));
    }

    /// Each bad spec, and the `line:col: message` fragment its error must contain.
    #[test]
    fn rejects_bad_specs() {
        let layer = "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\"}]\n";
        let cases: Vec<(String, &str)> = vec![
            ("tags = [\"v1\"\n".into(), "s.toml:1:"),
            (
                format!("platfroms = [\"linux/amd64\"]\n{layer}"),
                "s.toml:1:1: unknown field `platfroms`",
            ),
            (
                format!("tags = \"v1\"\n{layer}"),
                "s.toml:1:8: invalid type",
            ),
            (
                format!("platforms = []\n{layer}"),
                "s.toml:1:13: platforms: the list is empty",
            ),
            (
                format!("platforms = [\"linux/sparc\"]\n{layer}"),
                "s.toml:1:14: platforms: invalid platform",
            ),
            (
                format!("repository = \"127.0.0.1:5000/Hello\"\n{layer}"),
                "repository: invalid repository",
            ),
            (
                format!("tags = [\"{}\"]\n{layer}", "x".repeat(129)),
                "s.toml:1:9: tags: invalid tag",
            ),
            (format!("tags = [\"a b\"]\n{layer}"), "tags: invalid tag"),
            (
                format!("base = \"ghcr.io/o/r@sha256:abc\"\n{layer}"),
                "s.toml:1:8: base: invalid repository",
            ),
            (
                format!("base = \"oci:\"\n{layer}"),
                "s.toml:1:8: base: \"oci:\" names no directory",
            ),
            (
                format!("[base_overrides]\n\"linux/s390x\" = \"alpine\"\n{layer}"),
                "s.toml:2:17: base_overrides: invalid platform",
            ),
            (
                format!("[base_overrides]\n\"linux/arm64\" = \"x:bad tag\"\n{layer}"),
                "base_overrides.\"linux/arm64\": invalid tag",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"a\"}]\n".into(),
                "s.toml:2:29: layer.files.dest: \"a\" is not absolute",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/x/../a\"}]\n".into(),
                "contains \"..\"",
            ),
            (
                "[[layer]]\nfiles = [{src = \"{arhc}/a\", dest = \"/a\"}]\n".into(),
                "unknown placeholder {arhc}",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\", mode = 0o17777}]\n".into(),
                "layer.files.mode",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\", uid = -1}]\n".into(),
                "layer.files.uid",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\", sorce = \"b\"}]\n".into(),
                "unknown field `sorce`",
            ),
            (
                "[[layer]]\nfiles = []\n".into(),
                "a layer needs at least one file",
            ),
            ("tags = [\"v1\"]\n".into(), "no [[layer]] tables"),
            (
                format!("[config]\nexposed_ports = [\"http\"]\n{layer}"),
                "config.exposed_ports",
            ),
            (
                format!(
                    "[config]\nlabels = {{ big = \"{}\" }}\n{layer}",
                    "x".repeat(70_000)
                ),
                "over the 64 KiB limit",
            ),
            (
                format!("[config]\nworkdir = \"app\"\n{layer}"),
                "config.workdir: must be an absolute path",
            ),
            // A bare 755 is decimal (0o1363): refused with the two spellings that work.
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\", mode = 755}]\n".into(),
                "s.toml:2:42: layer.files.mode: 755 is the decimal number 755 (0o1363), not the mode 755; write 0o755 or \"0755\"",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\", mode = 644}]\n".into(),
                "(0o1204), not the mode 644; write 0o644 or \"0644\"",
            ),
            (
                "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\", mode = 1777}]\n".into(),
                "write 0o1777 or \"01777\"",
            ),
            (
                format!("[config]\nlabels = {{ \"\" = \"x\" }}\n{layer}"),
                "s.toml:2:17: config.labels: a key is empty",
            ),
            (
                format!("[config]\nannotations = {{ \" \" = \"x\" }}\n{layer}"),
                "config.annotations: a key is empty",
            ),
            (
                format!("[config]\nstop_signal = \"SIGFOO\"\n{layer}"),
                "s.toml:2:15: config.stop_signal: \"SIGFOO\" is not a signal",
            ),
            (
                format!("[config]\nstop_signal = \"65\"\n{layer}"),
                "config.stop_signal: \"65\" is not a signal",
            ),
            (
                format!("[config]\nuser = \"0\\n1\"\n{layer}"),
                "s.toml:2:8: config.user: \"0\\n1\" holds whitespace or a control character",
            ),
            (
                format!("[config]\nuser = \"0:\"\n{layer}"),
                "config.user: \"0:\" is not USER, UID, USER:GROUP or UID:GID",
            ),
            (
                format!("[config]\nuser = \"a:b:c\"\n{layer}"),
                "config.user: \"a:b:c\" is not USER",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&text, Path::new("s.toml"))
                .expect_err(want)
                .to_string();
            assert!(
                err.contains(want),
                "error {err:?} does not contain {want:?}"
            );
            assert!(!err.contains('\n'), "error is not one line: {err:?}");
        }
    }

    #[test]
    fn bases() {
        let d = format!("sha256:{}", "b".repeat(64));
        let dir = Path::new("specs");
        let cases: Vec<(String, Base)> = vec![
            ("scratch".into(), Base::Scratch),
            ("static".into(), Base::Static),
            (
                "oci:../layouts/base".into(),
                Base::Layout {
                    path: "specs/../layouts/base".into(),
                    tag: None,
                    text: "oci:../layouts/base".into(),
                },
            ),
            (
                "oci:./l:v1".into(),
                Base::Layout {
                    path: "specs/./l".into(),
                    tag: Some("v1".into()),
                    text: "oci:./l:v1".into(),
                },
            ),
            (
                "oci:/abs/l".into(),
                Base::Layout {
                    path: "/abs/l".into(),
                    tag: None,
                    text: "oci:/abs/l".into(),
                },
            ),
            (
                format!("127.0.0.1:5000/base@{d}"),
                Base::Registry(ImageRef::parse(&format!("127.0.0.1:5000/base@{d}")).unwrap()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Base::parse(&text, dir).unwrap(), want, "{text}");
        }
        let spec = parse(
            "base = \"127.0.0.1:5000/b:1\"\n[base_overrides]\n\"linux/arm64\" = \"oci:l\"\n[config]\nuser = \"0\"\n[[layer]]\nfiles = [{src = \"a\", dest = \"/a\"}]\n",
            Path::new("specs/s.toml"),
        )
        .unwrap();
        assert_eq!(spec.base.to_string(), "127.0.0.1:5000/b:1");
        assert_eq!(
            spec.base_overrides[&Platform::new("linux", "arm64", None)],
            Base::Layout {
                path: "specs/l".into(),
                tag: None,
                text: "oci:l".into(),
            }
        );
        assert_eq!(spec.config.user.as_deref(), Some("0"));
    }

    /// The spellings that are accepted as they are: `0o` and string modes, decimal with an 8
    /// or 9, a single digit; signals as moby parses them; users with and without a group.
    #[test]
    fn accepts_good_values() {
        let layer = "[[layer]]\nfiles = [{src = \"a\", dest = \"/a\"}]\n";
        let modes = [
            ("0o755", 0o755),
            ("\"0755\"", 0o755),
            ("\"755\"", 0o755),
            ("0o1777", 0o1777),
            ("493", 0o755),
            ("7", 0o7),
        ];
        for (m, want) in modes {
            let text = format!("[[layer]]\nfiles = [{{src = \"a\", dest = \"/a\", mode = {m}}}]\n");
            let spec = parse(&text, Path::new("s.toml")).unwrap_or_else(|e| panic!("{m}: {e}"));
            assert_eq!(spec.layers[0].files[0].mode, Some(want), "{m}");
        }
        for sig in ["SIGTERM", "TERM", "sigquit", "9", "SIGRTMIN+3", "RTMAX-1"] {
            let text = format!("[config]\nstop_signal = \"{sig}\"\n{layer}");
            let spec = parse(&text, Path::new("s.toml")).unwrap_or_else(|e| panic!("{sig}: {e}"));
            assert_eq!(spec.config.stop_signal.as_deref(), Some(sig));
        }
        for user in ["65532:65532", "nonroot", "0", "app:staff"] {
            let text = format!("[config]\nuser = \"{user}\"\n{layer}");
            let spec = parse(&text, Path::new("s.toml")).unwrap_or_else(|e| panic!("{user}: {e}"));
            assert_eq!(spec.config.user.as_deref(), Some(user));
        }
        let spec = parse(&format!("tags = []\n{layer}"), Path::new("s.toml")).unwrap();
        assert!(spec.tags.is_empty(), "tags = [] pushes by digest only");
    }

    #[test]
    fn dest_normalisation() {
        let cases = [
            ("/a", Some("/a")),
            ("/a/", Some("/a")),
            ("//a/./b", Some("/a/b")),
            ("a", None),
            ("/", None),
            ("/a/../b", None),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_dest(input).ok().as_deref(), want, "{input}");
        }
    }
}
