//! `imgbuild init`: a starter build spec for a Cargo project. Reads `Cargo.toml` (`[package]`
//! name, description, version, license, repository; `[[bin]]` targets and the binaries Cargo
//! infers from `src/main.rs` and `src/bin/`), and writes `build-specs/<name>.toml`: the
//! static musl binaries cargo-zigbuild produces for linux/amd64 and linux/arm64, on the built-in
//! base `static` (users, CA certificates, /tmp),
//! as user 65532, with OCI labels from the package. One binary is the entrypoint; the others
//! are written out commented, for the user to pick.
//!
//! The spec is text written from a template (so it can carry comments); tests parse it with
//! [`crate::spec::parse`]. An existing spec is never overwritten.

use crate::exit::ExitCode;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot read {}: {source}; run imgbuild init in a Cargo project (or give --manifest-path)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{} already exists; imgbuild init never overwrites a spec: edit it, or move it away and run init again", path.display())]
    Exists { path: PathBuf },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl InitError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            InitError::Write { .. } => ExitCode::Internal,
            _ => ExitCode::Usage,
        }
    }
}

/// What the spec is made from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Project {
    pub name: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub license: Option<String>,
    pub repository: Option<String>,
    /// Binary target names, in the order Cargo.toml lists them, then the inferred ones.
    pub bins: Vec<String>,
}

/// A binary target named in `[[bin]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinTarget {
    pub name: String,
    pub path: Option<String>,
}

/// `Cargo.toml`, the parts `init` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub project: Project,
    /// `[[bin]]` entries.
    pub bins: Vec<BinTarget>,
    /// `package.autobins` (default true): whether Cargo infers binaries from the file layout.
    pub autobins: bool,
    /// The manifest has a `[workspace]` table (its `target/` is the workspace's).
    pub workspace_root: bool,
}

/// Parse `Cargo.toml` text (`path` for messages). Fields that inherit from the workspace
/// (`version.workspace = true`) are left out of the labels.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, InitError> {
    let fail = |message: String| InitError::Manifest {
        path: path.to_path_buf(),
        message,
    };
    let doc: toml::Table = toml::from_str(text).map_err(|e| {
        fail(format!(
            "not valid TOML: {}",
            e.to_string().lines().next().unwrap_or("")
        ))
    })?;
    let workspace_root = doc.contains_key("workspace");
    let package = doc.get("package").and_then(toml::Value::as_table).ok_or_else(|| {
        fail(if workspace_root {
            "a workspace root without [package]: run imgbuild init in the member's directory (or give --manifest-path MEMBER/Cargo.toml)".into()
        } else {
            "no [package] table".into()
        })
    })?;
    let string = |k: &str| {
        package
            .get(k)
            .and_then(toml::Value::as_str)
            .map(str::to_string)
    };
    let name = string("name").ok_or_else(|| fail("[package] has no name".into()))?;
    let bins = match doc.get("bin") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|b| {
                let t = b.as_table();
                let field = |k: &str| {
                    t.and_then(|t| t.get(k))
                        .and_then(toml::Value::as_str)
                        .map(str::to_string)
                };
                Ok(BinTarget {
                    name: field("name").ok_or_else(|| fail("a [[bin]] without a name".into()))?,
                    path: field("path"),
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(fail("`bin` is not an array of tables ([[bin]])".into())),
    };
    Ok(Manifest {
        project: Project {
            name,
            description: string("description"),
            version: string("version"),
            license: string("license"),
            repository: string("repository"),
            bins: Vec::new(),
        },
        bins,
        autobins: package
            .get("autobins")
            .and_then(toml::Value::as_bool)
            .unwrap_or(true),
        workspace_root,
    })
}

/// The binary targets: `[[bin]]` entries, then (unless `autobins = false`) those Cargo infers:
/// `src/main.rs` (named like the package), `src/bin/NAME.rs` and `src/bin/NAME/main.rs`;
/// an inferred one that a `[[bin]]` already names (by name or path) is not repeated.
pub fn binaries(manifest: &Manifest, dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = manifest.bins.iter().map(|b| b.name.clone()).collect();
    if !manifest.autobins {
        return out;
    }
    let mut inferred = Vec::new();
    if dir.join("src/main.rs").is_file() {
        inferred.push((manifest.project.name.clone(), "src/main.rs".to_string()));
    }
    if let Ok(entries) = std::fs::read_dir(dir.join("src/bin")) {
        let mut more: Vec<(String, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if path.is_file() {
                    let stem = file.strip_suffix(".rs")?;
                    Some((stem.to_string(), format!("src/bin/{file}")))
                } else if path.join("main.rs").is_file() {
                    Some((file.clone(), format!("src/bin/{file}/main.rs")))
                } else {
                    None
                }
            })
            .collect();
        more.sort();
        inferred.extend(more);
    }
    for (name, path) in inferred {
        let taken = manifest
            .bins
            .iter()
            .any(|b| b.name == name || b.path.as_deref() == Some(path.as_str()));
        if !taken && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A version as an image tag (`[A-Za-z0-9_][A-Za-z0-9_.-]*`): SemVer build metadata's `+`
/// and anything else outside the grammar become `-`.
fn version_tag(version: &str) -> String {
    let tag: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if tag.starts_with(['.', '-']) {
        format!("v{}", &tag[..tag.len().min(127)])
    } else {
        tag
    }
}

/// The spec text. `entrypoint` is one of `project.bins`; `target` is the Cargo target
/// directory relative to the spec's directory (`../target`, or further up in a workspace).
pub fn render_spec(project: &Project, entrypoint: &str, target: &str) -> String {
    let name = &project.name;
    let mut s = String::new();
    let artifact = |bin: &str| {
        format!(
            "{{ src = {}, dest = {}, mode = 0o755 }}",
            quote(&format!(
                "{target}/{{uname_m}}-unknown-linux-musl/release/{bin}"
            )),
            quote(&format!("/usr/local/bin/{bin}"))
        )
    };
    s.push_str(&format!(
        "# Build spec for {name}, written by `imgbuild init`: read it, adjust it, commit it.\n\
         # Every key is described in imgbuild's README, \"The build spec\".\n\
         #\n\
         # Cross-compile static binaries for both platforms on one machine (no QEMU, no Docker):\n\
         #   pip install ziglang cargo-zigbuild\n\
         #   rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl\n\
         #   cargo zigbuild --release --target x86_64-unknown-linux-musl --target aarch64-unknown-linux-musl\n\
         # Then push (prints REPO@sha256:... for the deploy step):\n\
         #   imgbuild push -f build-specs/{name}.toml --repo REGISTRY/{name}\n\n"
    ));
    s.push_str(&format!(
        "# Where `push` sends the image without --repo, e.g. ECR:\n\
         # repository = \"123456789012.dkr.ecr.eu-west-1.amazonaws.com/{name}\"\n"
    ));
    match &project.version {
        Some(v) => s.push_str(&format!(
            "tags = [{}, \"latest\"]\n",
            quote(&version_tag(v))
        )),
        None => s.push_str("tags = [\"latest\"]\n"),
    }
    s.push_str("platforms = [\"linux/amd64\", \"linux/arm64\"]\n");
    s.push_str(
        "# No shell, no libc: the binaries must be static (musl). The built-in base \"static\" adds\n\
         # /etc/passwd (nonroot 65532), CA certificates (from this machine's ca-certificates;\n\
         # --static-ca-bundle for another bundle) and /tmp; \"scratch\" is nothing at all.\n",
    );
    s.push_str("base = \"static\"\n\n[config]\n");
    s.push_str("# The binary targets of this package; one is the entrypoint.\n");
    s.push_str(&format!(
        "entrypoint = [{}]\n",
        quote(&format!("/usr/local/bin/{entrypoint}"))
    ));
    for other in project.bins.iter().filter(|b| *b != entrypoint) {
        s.push_str(&format!(
            "# entrypoint = [{}]\n",
            quote(&format!("/usr/local/bin/{other}"))
        ));
    }
    s.push_str("# Non-root (distroless \"nonroot\"); Kubernetes' runAsNonRoot accepts it.\n");
    s.push_str("user = \"65532:65532\"\n\n[config.labels]\n");
    let mut label = |key: &str, value: &Option<String>| {
        if let Some(v) = value {
            s.push_str(&format!(
                "{} = {}\n",
                quote(&format!("org.opencontainers.image.{key}")),
                quote(v)
            ));
        }
    };
    label("title", &Some(name.clone()));
    label("description", &project.description);
    label("version", &project.version);
    label("licenses", &project.license);
    label("source", &project.repository);
    s.push_str("\n# The binaries cargo-zigbuild wrote ({uname_m}: x86_64, aarch64).\n[[layer]]\nfiles = [\n");
    s.push_str(&format!("  {},\n", artifact(entrypoint)));
    for other in project.bins.iter().filter(|b| *b != entrypoint) {
        s.push_str(&format!("  # {},\n", artifact(other)));
    }
    s.push_str("]\n\n");
    s
}

/// What to initialise.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// `Cargo.toml` of the package.
    pub manifest: PathBuf,
    /// The binary to make the entrypoint (default: the one named like the package, else the
    /// first).
    pub bin: Option<String>,
}

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// `<package dir>/build-specs/<name>.toml`
    pub spec: PathBuf,
    pub name: String,
    pub entrypoint: String,
    /// The other binaries (commented out in the spec).
    pub others: Vec<String>,
}

impl Initialized {
    /// What to run next: cross-compile, then push.
    pub fn next_steps(&self) -> String {
        let spec = self.spec.display();
        let others = if self.others.is_empty() {
            String::new()
        } else {
            format!(
                "; other binaries, commented out: {}",
                self.others.join(", ")
            )
        };
        format!(
            "wrote {spec} (entrypoint: {entry}{others})\n\
             \n\
             Cross-compile for linux/amd64 and linux/arm64 (static musl binaries, no QEMU):\n\
             \x20 pip install ziglang cargo-zigbuild\n\
             \x20 rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl\n\
             \x20 cargo zigbuild --release --target x86_64-unknown-linux-musl --target aarch64-unknown-linux-musl\n\
             Push (prints REPO@sha256:... for the deploy step):\n\
             \x20 imgbuild push -f {spec} --repo REGISTRY/{name}\n",
            entry = self.entrypoint,
            name = self.name,
        )
    }
}

/// Write the starter spec for the package of `req.manifest`; never overwrites.
pub fn init(req: &InitRequest) -> Result<Initialized, InitError> {
    let path = &req.manifest;
    let text = std::fs::read_to_string(path).map_err(|source| InitError::Read {
        path: path.clone(),
        source,
    })?;
    let manifest = parse_manifest(&text, path)?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut project = manifest.project.clone();
    project.bins = binaries(&manifest, dir);
    if project.bins.is_empty() {
        return Err(InitError::Manifest {
            path: path.clone(),
            message:
                "no binary target ([[bin]], src/main.rs or src/bin/*.rs): an image runs a program"
                    .into(),
        });
    }
    let entrypoint = match &req.bin {
        Some(b) if project.bins.contains(b) => b.clone(),
        Some(b) => {
            return Err(InitError::Manifest {
                path: path.clone(),
                message: format!(
                    "--bin {b}: no such binary target; the package has: {}",
                    project.bins.join(", ")
                ),
            });
        }
        None if project.bins.contains(&project.name) => project.name.clone(),
        None => project.bins[0].clone(),
    };
    // The target directory is the workspace's when the package is a member of one.
    let ups = if manifest.workspace_root {
        0
    } else {
        workspace_depth(dir).unwrap_or(0)
    };
    let target = format!("..{}/target", "/..".repeat(ups));
    let spec_dir = dir.join("build-specs");
    let spec = spec_dir.join(format!("{}.toml", project.name));
    if spec.exists() {
        return Err(InitError::Exists { path: spec });
    }
    let body = render_spec(&project, &entrypoint, &target);
    let write = |e| InitError::Write {
        path: spec.clone(),
        source: e,
    };
    std::fs::create_dir_all(&spec_dir).map_err(write)?;
    // create_new: a file created between the check above and now is not overwritten either.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spec)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                InitError::Exists { path: spec.clone() }
            } else {
                write(e)
            }
        })?;
    std::io::Write::write_all(&mut f, body.as_bytes()).map_err(write)?;
    let others = project
        .bins
        .iter()
        .filter(|b| **b != entrypoint)
        .cloned()
        .collect();
    Ok(Initialized {
        spec,
        name: project.name,
        entrypoint,
        others,
    })
}

/// How many directories above `dir` the enclosing workspace's root is (a `Cargo.toml` with
/// `[workspace]`), if any.
fn workspace_depth(dir: &Path) -> Option<usize> {
    let abs = std::path::absolute(dir).ok()?;
    for (ups, ancestor) in abs.ancestors().skip(1).enumerate() {
        let Ok(text) = std::fs::read_to_string(ancestor.join("Cargo.toml")) else {
            continue;
        };
        if toml::from_str::<toml::Table>(&text).is_ok_and(|t| t.contains_key("workspace")) {
            return Some(ups + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARGO: &str = r#"
[package]
name = "hello"
version = "1.2.0+build.5"
edition = "2021"
description = "Says \"hello\""
license = "MIT OR Apache-2.0"
repository = "https://github.com/example/hello"

[[bin]]
name = "hello-admin"
path = "src/admin.rs"
"#;

    #[test]
    fn manifests() {
        let m = parse_manifest(CARGO, Path::new("Cargo.toml")).unwrap();
        assert_eq!(m.project.name, "hello");
        assert_eq!(m.project.description.as_deref(), Some("Says \"hello\""));
        assert_eq!(m.bins[0].name, "hello-admin");
        assert!(m.autobins && !m.workspace_root);
        let inherited = "[package]\nname = \"x\"\nversion.workspace = true\n";
        assert_eq!(
            parse_manifest(inherited, Path::new("C"))
                .unwrap()
                .project
                .version,
            None
        );
        for (bad, want) in [
            (
                "[workspace]\nmembers = [\"a\"]\n",
                "a workspace root without [package]",
            ),
            ("[package]\nversion = \"1\"\n", "[package] has no name"),
            ("[package\n", "not valid TOML"),
        ] {
            let e = parse_manifest(bad, Path::new("Cargo.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("Cargo.toml: {want}")), "{e}");
        }
    }

    #[test]
    fn version_tags() {
        for (v, want) in [
            ("1.2.0", "1.2.0"),
            ("1.2.0+build.5", "1.2.0-build.5"),
            ("0.1.0-rc.1", "0.1.0-rc.1"),
        ] {
            assert_eq!(version_tag(v), want);
            crate::reference::validate_tag(&version_tag(v)).unwrap();
        }
    }

    /// The spec parses with imgbuild's own loader and says what it should.
    #[test]
    fn rendered_spec_parses() {
        let mut p = parse_manifest(CARGO, Path::new("Cargo.toml"))
            .unwrap()
            .project;
        p.bins = vec!["hello".into(), "hello-admin".into()];
        let text = render_spec(&p, "hello", "../target");
        let spec = crate::spec::parse(&text, Path::new("/p/build-specs/hello.toml")).unwrap();
        assert_eq!(spec.tags, ["1.2.0-build.5", "latest"]);
        assert_eq!(
            spec.platforms
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["linux/amd64", "linux/arm64"]
        );
        assert_eq!(spec.base, crate::spec::Base::Static);
        assert_eq!(
            spec.config.entrypoint.as_deref(),
            Some(&["/usr/local/bin/hello".to_string()][..])
        );
        assert_eq!(spec.config.user.as_deref(), Some("65532:65532"));
        let labels = &spec.config.labels;
        assert_eq!(
            labels["org.opencontainers.image.description"],
            "Says \"hello\""
        );
        assert_eq!(labels["org.opencontainers.image.version"], "1.2.0+build.5");
        assert_eq!(
            labels["org.opencontainers.image.licenses"],
            "MIT OR Apache-2.0"
        );
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://github.com/example/hello"
        );
        assert_eq!(spec.layers.len(), 1);
        assert_eq!(
            spec.layers[0].files.len(),
            1,
            "the other binary is commented out"
        );
        assert_eq!(
            spec.layers[0].files[0].src,
            "../target/{uname_m}-unknown-linux-musl/release/hello"
        );
        assert!(text.contains("# entrypoint = [\"/usr/local/bin/hello-admin\"]"));
    }

    #[test]
    fn init_writes_once_and_finds_inferred_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Cargo.toml"), CARGO).unwrap();
        std::fs::create_dir_all(d.join("src/bin/tool")).unwrap();
        std::fs::write(d.join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(d.join("src/admin.rs"), "fn main() {}").unwrap();
        std::fs::write(d.join("src/bin/migrate.rs"), "fn main() {}").unwrap();
        std::fs::write(d.join("src/bin/tool/main.rs"), "fn main() {}").unwrap();
        let req = InitRequest {
            manifest: d.join("Cargo.toml"),
            bin: None,
        };
        let done = init(&req).unwrap();
        assert_eq!(done.entrypoint, "hello");
        assert_eq!(done.others, ["hello-admin", "migrate", "tool"]);
        let spec = crate::spec::load(&done.spec).unwrap();
        assert_eq!(spec.name(), "hello");
        let before = std::fs::read(&done.spec).unwrap();
        let again = init(&req).unwrap_err();
        assert!(matches!(again, InitError::Exists { .. }), "{again}");
        assert_eq!(again.exit_code(), ExitCode::Usage);
        assert_eq!(
            std::fs::read(&done.spec).unwrap(),
            before,
            "not overwritten"
        );
        let wrong = init(&InitRequest {
            bin: Some("nope".into()),
            ..req
        })
        .unwrap_err();
        assert!(
            wrong
                .to_string()
                .contains("the package has: hello-admin, hello, migrate, tool"),
            "{wrong}"
        );
    }
}
