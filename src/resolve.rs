//! `imgbuild resolve`, the pure part: find `imgbuild://<spec>` references in Kubernetes YAML
//! or Helm values text ([`scan`]) and splice digest references in their place ([`replace`]).
//!
//! The text is never parsed into a YAML tree and serialised again: each reference is a byte
//! range of the input, and everything outside those ranges is copied as it is. So comments,
//! key order, quoting, anchors, `---` separators and unrelated fields come out byte-identical
//! (what `kubectl diff` and code review want), which a round trip through a YAML library
//! cannot promise.
//!
//! The scanner knows just enough YAML to find scalar values: block mappings and sequences,
//! flow collections (`{repository: imgbuild://x, tag: v1}`), plain, single- and double-quoted
//! scalars, comments, and block scalars (`|`, `>`), whose content is text and never scanned.
//! A reference is a whole scalar that starts with `imgbuild://`; the word inside a longer
//! string or a comment is left alone (ko's rule for `ko://`).
//!
//! What a reference becomes depends on the key it is the value of, so Helm charts that split
//! the image into fields work too ([`Form`]).

use crate::exit::ExitCode;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

/// The scheme that marks a reference.
pub const SCHEME: &str = "imgbuild://";

/// Directory (relative to the working directory) where a bare name is looked up:
/// `imgbuild://hello` is `build-specs/hello.toml`.
pub const SPEC_DIR: &str = "build-specs";

/// What can go wrong before anything is built; every one is a usage error (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A reference that names no spec (and no `--metadata-file` entry), or is malformed.
    #[error("{file}:{line}:{column}: {SCHEME}{spec}: {message}")]
    Reference {
        file: String,
        line: usize,
        column: usize,
        spec: String,
        message: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input that is not YAML text (not UTF-8, a directory without YAML files).
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("--metadata-file {}: {message}", path.display())]
    Metadata { path: PathBuf, message: String },
}

impl ResolveError {
    /// A reference that names no spec, or a spec it cannot read, is a usage error (2).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// How the scalar was written; the replacement keeps the quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quote {
    Plain,
    Single,
    Double,
}

/// What a reference is replaced with, chosen by its key (case-insensitive suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `REPO@sha256:...`: `image:`, a sequence item, any other key.
    Image,
    /// `REPO` alone: a key ending in `repository` (Helm's `image.repository`).
    Repository,
    /// `TAG@sha256:...`: a key ending in `tag`. Charts write `{{ repository }}:{{ tag }}`,
    /// which becomes `REPO:TAG@sha256:...`, a reference pinned by its digest.
    Tag,
    /// `sha256:...`: a key ending in `digest` (charts that write `{{ repository }}@{{ digest }}`).
    Digest,
}

impl Form {
    fn for_key(key: Option<&str>) -> Form {
        let Some(key) = key else {
            return Form::Image;
        };
        let key = key.to_ascii_lowercase();
        if key.ends_with("repository") {
            Form::Repository
        } else if key.ends_with("digest") {
            Form::Digest
        } else if key.ends_with("tag") {
            Form::Tag
        } else {
            Form::Image
        }
    }
}

/// One `imgbuild://<spec>` scalar in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// What follows `imgbuild://`.
    pub spec: String,
    /// The mapping key the scalar is the value of (`image`, `repository`...), if any.
    pub key: Option<String>,
    pub form: Form,
    /// 1-based line and column (in characters) of the scalar's first character.
    pub line: usize,
    pub column: usize,
    /// Byte range of the scalar's content (inside the quotes, if quoted).
    pub span: Range<usize>,
    pub quote: Quote,
}

/// Where a pushed image is: what every reference to it is replaced with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// `REGISTRY/PATH`
    pub repository: String,
    /// `sha256:...` of the index.
    pub digest: String,
    /// The tags pushed; the first is used for [`Form::Tag`].
    pub tags: Vec<String>,
}

impl Pushed {
    /// The replacement text for `form`.
    pub fn render(&self, form: Form) -> String {
        match form {
            Form::Image => format!("{}@{}", self.repository, self.digest),
            Form::Repository => self.repository.clone(),
            Form::Digest => self.digest.clone(),
            Form::Tag => {
                let tag = self.tags.first().map_or("latest", String::as_str);
                format!("{tag}@{}", self.digest)
            }
        }
    }
}

/// Every reference in `text`, in order.
pub fn scan(text: &str) -> Vec<Reference> {
    let mut refs = Vec::new();
    // Block scalar in progress: its content is indented more than this column.
    let mut block: Option<usize> = None;
    // Depth of flow collections; they may span lines.
    let mut flow = 0usize;
    let mut line_start = 0usize;
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let offset = line_start;
        line_start += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(parent) = block
            && (line.trim().is_empty() || indent > parent)
        {
            continue;
        }
        block = scan_line(line, index + 1, offset, &mut flow, &mut refs);
    }
    refs
}

/// Is `b` a character that ends a plain scalar in a flow collection?
fn flow_indicator(b: u8) -> bool {
    matches!(b, b',' | b'[' | b']' | b'{' | b'}')
}

/// Scan one line (without its line break) starting at byte `offset` of the text. Returns the
/// column that a block scalar started on this line must be indented beyond.
fn scan_line(
    line: &str,
    number: usize,
    offset: usize,
    flow: &mut usize,
    refs: &mut Vec<Reference>,
) -> Option<usize> {
    let b = line.as_bytes();
    let mut pos = 0;
    // The key of the value that may start at `pos`, and the column of the node that owns it.
    let mut key: Option<String> = None;
    let mut node_col: Option<usize> = None;
    while pos < b.len() {
        let c = b[pos];
        if c == b' ' || c == b'\t' {
            pos += 1;
            continue;
        }
        // A comment starts at a `#` after whitespace (or at the start of the line).
        if c == b'#' && (pos == 0 || matches!(b[pos - 1], b' ' | b'\t')) {
            break;
        }
        match c {
            b'[' | b'{' => {
                *flow += 1;
                key = None;
                pos += 1;
                continue;
            }
            b']' | b'}' => {
                *flow = flow.saturating_sub(1);
                pos += 1;
                continue;
            }
            b',' if *flow > 0 => {
                key = None;
                pos += 1;
                continue;
            }
            // A sequence entry (`- x`) or an explicit key/value indicator (`? x`, `: x`).
            b'-' | b'?' | b':' if b.get(pos + 1).is_none_or(|n| matches!(n, b' ' | b'\t')) => {
                if c == b'-' {
                    node_col = Some(pos);
                    key = None;
                }
                pos += 1;
                continue;
            }
            _ => {}
        }
        // A scalar starts here.
        let start = pos;
        let (content, quote, end) = match c {
            b'"' | b'\'' => {
                let Some(close) = closing_quote(b, pos) else {
                    // A quoted scalar that goes on to the next line: not a reference.
                    return None;
                };
                let q = if c == b'"' {
                    Quote::Double
                } else {
                    Quote::Single
                };
                (pos + 1..close, q, close + 1)
            }
            _ => {
                let mut end = pos;
                while end < b.len() {
                    let e = b[end];
                    if e == b':' && b.get(end + 1).is_none_or(|n| matches!(n, b' ' | b'\t')) {
                        break;
                    }
                    if e == b':' && *flow > 0 && b.get(end + 1).is_some_and(|&n| flow_indicator(n))
                    {
                        break;
                    }
                    if e == b'#' && matches!(b[end - 1], b' ' | b'\t') {
                        break;
                    }
                    if *flow > 0 && flow_indicator(e) {
                        break;
                    }
                    end += 1;
                }
                let text_end = start + line[start..end].trim_end().len();
                (start..text_end, Quote::Plain, text_end)
            }
        };
        pos = end;
        // Followed by `:`, the scalar was a key.
        let mut after = pos;
        while after < b.len() && matches!(b[after], b' ' | b'\t') {
            after += 1;
        }
        if b.get(after) == Some(&b':')
            && (b.get(after + 1).is_none_or(|n| matches!(n, b' ' | b'\t'))
                || (*flow > 0 && b.get(after + 1).is_some_and(|&n| flow_indicator(n))))
        {
            key = Some(line[content.clone()].to_string());
            node_col = Some(start);
            pos = after + 1;
            continue;
        }
        let value = &line[content.clone()];
        if quote == Quote::Plain && *flow == 0 && is_block_indicator(value) {
            return Some(node_col.unwrap_or(start));
        }
        if let Some(spec) = value.strip_prefix(SCHEME) {
            refs.push(Reference {
                spec: spec.to_string(),
                form: Form::for_key(key.as_deref()),
                key: key.clone(),
                line: number,
                column: line[..start].chars().count() + 1,
                span: offset + content.start..offset + content.end,
                quote,
            });
        }
        key = None;
    }
    None
}

/// `|`, `>`, with optional chomping (`+`, `-`) and indentation (a digit) indicators.
fn is_block_indicator(value: &str) -> bool {
    let mut chars = value.chars();
    matches!(chars.next(), Some('|' | '>'))
        && chars.all(|c| matches!(c, '+' | '-' | '1'..='9'))
        && value.len() <= 3
}

/// The index of the quote closing the scalar opened at `open`, on this line.
fn closing_quote(b: &[u8], open: usize) -> Option<usize> {
    let q = b[open];
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if q == b'"' => i += 2,
            // `''` is an escaped quote inside a single-quoted scalar.
            b'\'' if q == b'\'' && b.get(i + 1) == Some(&b'\'') => i += 2,
            x if x == q => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// `text` with each reference's content replaced by `with(reference)`. Everything else is
/// copied unchanged; `refs` must come from [`scan`] of this `text`.
pub fn replace(
    text: &str,
    refs: &[Reference],
    mut with: impl FnMut(&Reference) -> String,
) -> String {
    let mut out = String::with_capacity(text.len() + refs.len() * 64);
    let mut copied = 0;
    for r in refs {
        out.push_str(&text[copied..r.span.start]);
        out.push_str(&with(r));
        copied = r.span.end;
    }
    out.push_str(&text[copied..]);
    out
}

/// The spec file a reference names, relative to the working directory: a path when it has a
/// `/` or ends in `.toml`, else a name in [`SPEC_DIR`]. Lexically normalised (`./a/../b.toml`
/// is `b.toml`), so two spellings of one spec are built once.
pub fn spec_path(spec: &str) -> Result<PathBuf, String> {
    if spec.is_empty() {
        return Err("empty reference: write imgbuild://NAME (build-specs/NAME.toml) or imgbuild://PATH.toml".into());
    }
    if spec.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a reference holds no spaces".into());
    }
    let path = if spec.contains('/') || spec.ends_with(".toml") {
        PathBuf::from(spec)
    } else if spec
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Path::new(SPEC_DIR).join(format!("{spec}.toml"))
    } else {
        return Err(format!(
            "{spec:?} is neither a name (letters, digits, '-', '_', '.') in {SPEC_DIR}/ nor a path to a .toml spec"
        ));
    };
    Ok(normalise(&path))
}

fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The name a spec is known by in metadata files: its file stem (`build-specs/hello.toml` ->
/// `hello`), as `Spec::name` and the default layout directory use.
pub fn spec_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What an earlier push's `--metadata-file` says: the spec name it was built from and where
/// the image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    /// The spec's name: the stem of its `spec` field, or, for a file without one, the last
    /// path segment of its repository.
    pub name: String,
    pub pushed: Pushed,
}

/// Parse the JSON `--metadata-file` writes (src/output.rs): `repository`, `digest`, `tags`
/// and `spec`.
pub fn parse_metadata(text: &str) -> Result<MetadataEntry, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
    let repository = field("repository")
        .ok_or("no \"repository\": it was written by `imgbuild build`, not `push`; use the push's --metadata-file")?
        .to_string();
    // `image` is written only for an image that is in the registry (`push`).
    if field("image").is_none() {
        return Err("no \"image\": the image was built, not pushed; use the --metadata-file of `imgbuild push`".into());
    }
    let digest = field("digest").ok_or("no \"digest\"")?.to_string();
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("\"digest\" {digest:?} is not sha256:..."))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "\"digest\" {digest:?} is not sha256: and 64 hex digits"
        ));
    }
    let tags = v
        .get("tags")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let name = match field("spec") {
        Some(s) => spec_name(Path::new(s)),
        None => repository
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    Ok(MetadataEntry {
        name,
        pushed: Pushed {
            repository,
            digest,
            tags,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input, [(spec, key, form, line, column, quote)])
    type Case = (
        &'static str,
        &'static [(
            &'static str,
            Option<&'static str>,
            Form,
            usize,
            usize,
            Quote,
        )],
    );

    const CASES: &[Case] = &[
        (
            "image: imgbuild://hello\n",
            &[("hello", Some("image"), Form::Image, 1, 8, Quote::Plain)],
        ),
        (
            "spec:\n  containers:\n    - name: a\n      image: imgbuild://hello # pinned\n",
            &[("hello", Some("image"), Form::Image, 4, 14, Quote::Plain)],
        ),
        (
            "- image: \"imgbuild://x\"\n",
            &[("x", Some("image"), Form::Image, 1, 10, Quote::Double)],
        ),
        (
            "- image: 'imgbuild://x'\n",
            &[("x", Some("image"), Form::Image, 1, 10, Quote::Single)],
        ),
        (
            "  - imgbuild://a/b.toml\n",
            &[("a/b.toml", None, Form::Image, 1, 5, Quote::Plain)],
        ),
        (
            "\"image\": imgbuild://q\r\n",
            &[("q", Some("image"), Form::Image, 1, 10, Quote::Plain)],
        ),
        // Helm values: split fields.
        (
            "image:\n  repository: imgbuild://hello\n  tag: imgbuild://hello\n  digest: \"imgbuild://hello\"\n",
            &[
                (
                    "hello",
                    Some("repository"),
                    Form::Repository,
                    2,
                    15,
                    Quote::Plain,
                ),
                ("hello", Some("tag"), Form::Tag, 3, 8, Quote::Plain),
                ("hello", Some("digest"), Form::Digest, 4, 11, Quote::Double),
            ],
        ),
        (
            "image: {repository: imgbuild://h, tag: imgbuild://h}\n",
            &[
                (
                    "h",
                    Some("repository"),
                    Form::Repository,
                    1,
                    21,
                    Quote::Plain,
                ),
                ("h", Some("tag"), Form::Tag, 1, 40, Quote::Plain),
            ],
        ),
        (
            "images: [imgbuild://a, 'imgbuild://b']\n",
            &[
                ("a", None, Form::Image, 1, 10, Quote::Plain),
                ("b", None, Form::Image, 1, 24, Quote::Single),
            ],
        ),
        (
            "imageRepository: imgbuild://x\n",
            &[(
                "x",
                Some("imageRepository"),
                Form::Repository,
                1,
                18,
                Quote::Plain,
            )],
        ),
        // Not references: comments, longer strings, block scalar content, keys.
        ("# image: imgbuild://hello\n", &[]),
        ("image: nginx # imgbuild://hello\n", &[]),
        ("msg: see imgbuild://hello\n", &[]),
        // A scalar that starts with the scheme is a reference, even a broken one (reported).
        (
            "image: imgbuild://a b\n",
            &[("a b", Some("image"), Form::Image, 1, 8, Quote::Plain)],
        ),
        ("imgbuild://k: v\n", &[]),
        (
            "script: |\n  image: imgbuild://x\n  more\nimage: imgbuild://y\n",
            &[("y", Some("image"), Form::Image, 4, 8, Quote::Plain)],
        ),
        (
            "- args: >-\n    image: imgbuild://x\n  image: imgbuild://z\n",
            &[("z", Some("image"), Form::Image, 3, 10, Quote::Plain)],
        ),
        ("a: \"not closed\n", &[]),
        (
            "---\nimage: imgbuild://a\n...\n---\nimage: imgbuild://b\n",
            &[
                ("a", Some("image"), Form::Image, 2, 8, Quote::Plain),
                ("b", Some("image"), Form::Image, 5, 8, Quote::Plain),
            ],
        ),
    ];

    #[test]
    fn scan_finds_exactly_the_references() {
        for (input, want) in CASES {
            let got = scan(input);
            let got: Vec<_> = got
                .iter()
                .map(|r| {
                    (
                        r.spec.as_str(),
                        r.key.as_deref(),
                        r.form,
                        r.line,
                        r.column,
                        r.quote,
                    )
                })
                .collect();
            assert_eq!(&got, want, "input {input:?}");
            // The span is the scalar's content.
            for r in scan(input) {
                assert_eq!(
                    &input[r.span.clone()],
                    format!("{SCHEME}{}", r.spec),
                    "{input:?}"
                );
            }
        }
    }

    #[test]
    fn replace_touches_only_the_references() {
        let text = "# top\nimage: imgbuild://a  # keep\nother: 'imgbuild://a'\nx: [imgbuild://b]\n";
        let refs = scan(text);
        let out = replace(text, &refs, |r| format!("R-{}", r.spec));
        assert_eq!(out, "# top\nimage: R-a  # keep\nother: 'R-a'\nx: [R-b]\n");
        assert_eq!(replace(text, &[], |_| unreachable!()), text);
    }

    #[test]
    fn forms_render() {
        let p = Pushed {
            repository: "r.example/team/hello".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            tags: vec!["v1".into(), "latest".into()],
        };
        let d = &p.digest.clone();
        for (form, want) in [
            (Form::Image, format!("r.example/team/hello@{d}")),
            (Form::Repository, "r.example/team/hello".to_string()),
            (Form::Tag, format!("v1@{d}")),
            (Form::Digest, d.clone()),
        ] {
            assert_eq!(p.render(form), want);
        }
        let untagged = Pushed { tags: vec![], ..p };
        assert_eq!(untagged.render(Form::Tag), format!("latest@{d}"));
    }

    #[test]
    fn spec_paths() {
        for (spec, want) in [
            ("hello", Ok("build-specs/hello.toml")),
            ("my_app.v2", Ok("build-specs/my_app.v2.toml")),
            ("build-specs/hello.toml", Ok("build-specs/hello.toml")),
            ("./specs/../build-specs/x.toml", Ok("build-specs/x.toml")),
            ("other.toml", Ok("other.toml")),
            ("../up/x.toml", Ok("../up/x.toml")),
            ("", Err(())),
            ("a b", Err(())),
            ("h@llo", Err(())),
        ] {
            let got = spec_path(spec)
                .map(|p| p.display().to_string())
                .map_err(|_| ());
            assert_eq!(got, want.map(str::to_string), "{spec:?}");
        }
    }

    #[test]
    fn metadata_files() {
        let d = format!("sha256:{}", "b".repeat(64));
        let full = format!(
            r#"{{"digest":"{d}","repository":"127.0.0.1:5000/x/hello","image":"127.0.0.1:5000/x/hello@{d}","tags":["v1"],"spec":"build-specs/hello.toml"}}"#
        );
        let e = parse_metadata(&full).unwrap();
        assert_eq!(e.name, "hello");
        assert_eq!(
            e.pushed.render(Form::Image),
            format!("127.0.0.1:5000/x/hello@{d}")
        );
        assert_eq!(e.pushed.tags, ["v1"]);
        // Without `spec`: the repository's last segment.
        let old =
            format!(r#"{{"digest":"{d}","repository":"r/team/api","image":"r/team/api@{d}"}}"#);
        assert_eq!(parse_metadata(&old).unwrap().name, "api");
        for bad in [
            "nope".to_string(),
            format!(r#"{{"digest":"{d}"}}"#),
            r#"{"digest":"sha256:12","repository":"r/x","image":"r/x@sha256:12"}"#.to_string(),
            // Built, not pushed.
            format!(r#"{{"digest":"{d}","repository":"r/x"}}"#),
        ] {
            assert!(parse_metadata(&bad).is_err(), "{bad}");
        }
    }
}
