//! The `resolve` command (deploy by digest): read the YAML inputs, find where each referenced
//! spec's image is, once per spec (an earlier push's `--metadata-file`, or a push now, all
//! pushes at once), and return the inputs with every reference replaced. The text work is in
//! [`crate::resolve`]; the push itself is the caller's closure (the binary builds a
//! `run::PushRequest` per spec), so this module has no command line and no environment.

use crate::resolve::{self, MetadataEntry, Pushed, Reference, ResolveError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One YAML text to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// How errors name it: the file's path, or `-` for standard input.
    pub name: String,
    pub text: String,
}

impl Input {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Input {
        Input {
            name: name.into(),
            text: text.into(),
        }
    }
}

/// A file, or every `*.yaml` / `*.yml` under a directory (recursively, sorted by path, as
/// `kubectl apply -f DIR -R` and ko read them). Hidden files and directories are skipped.
pub fn read_inputs(path: &Path) -> Result<Vec<Input>, ResolveError> {
    let read = |p: &Path| -> Result<Input, ResolveError> {
        let bytes = std::fs::read(p).map_err(|source| ResolveError::Read {
            path: p.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ResolveError::Input {
            path: p.to_path_buf(),
            message: "not UTF-8 text; Kubernetes YAML is UTF-8".into(),
        })?;
        Ok(Input::new(p.display().to_string(), text))
    };
    let meta = std::fs::metadata(path).map_err(|source| ResolveError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![read(path)?]);
    }
    let mut files = Vec::new();
    let walk = walkdir::WalkDir::new(path)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walk {
        let entry = entry.map_err(|e| ResolveError::Input {
            path: e.path().unwrap_or(path).to_path_buf(),
            message: e.to_string(),
        })?;
        let is_yaml = entry
            .path()
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml");
        if entry.file_type().is_file() && is_yaml {
            files.push(read(entry.path())?);
        }
    }
    if files.is_empty() {
        return Err(ResolveError::Input {
            path: path.to_path_buf(),
            message: "a directory without *.yaml or *.yml files".into(),
        });
    }
    Ok(files)
}

/// The images named by `--metadata-file`s, by spec name. Two files naming one spec with
/// different images are an error (which one would be deployed?).
pub fn read_metadata(paths: &[PathBuf]) -> Result<BTreeMap<String, Pushed>, ResolveError> {
    let mut out: BTreeMap<String, Pushed> = BTreeMap::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| ResolveError::Read {
            path: path.clone(),
            source,
        })?;
        let MetadataEntry { name, pushed } =
            resolve::parse_metadata(&text).map_err(|message| ResolveError::Metadata {
                path: path.clone(),
                message,
            })?;
        if let Some(old) = out.get(&name)
            && old != &pushed
        {
            return Err(ResolveError::Metadata {
                path: path.clone(),
                message: format!(
                    "names spec {name:?} again, with another image ({} vs {}); give one metadata file per spec",
                    pushed.render(resolve::Form::Image),
                    old.render(resolve::Form::Image)
                ),
            });
        }
        out.insert(name, pushed);
    }
    Ok(out)
}

/// Where each reference's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Metadata(String),
    Build(PathBuf),
}

/// The references of every input, checked, and the specs to push (each once, in order of
/// first use).
#[derive(Debug)]
pub struct Plan {
    docs: Vec<(Input, Vec<(Reference, Source)>)>,
    /// Spec files to build and push.
    pub builds: Vec<PathBuf>,
}

impl Plan {
    /// How many references the inputs hold.
    pub fn references(&self) -> usize {
        self.docs.iter().map(|(_, r)| r.len()).sum()
    }
}

/// Scan every input and decide where each reference's image comes from: a metadata entry
/// with the spec's name, else the spec file (relative to the working directory) if
/// `is_spec(path)`. Anything else is an error naming file:line:column, before anything is
/// pushed.
pub fn plan(
    inputs: Vec<Input>,
    metadata: &BTreeMap<String, Pushed>,
    is_spec: impl Fn(&Path) -> bool,
) -> Result<Plan, ResolveError> {
    let mut docs = Vec::new();
    let mut builds: Vec<PathBuf> = Vec::new();
    for input in inputs {
        let mut refs = Vec::new();
        for r in resolve::scan(&input.text) {
            let fail = |message: String| ResolveError::Reference {
                file: input.name.clone(),
                line: r.line,
                column: r.column,
                spec: r.spec.clone(),
                message,
            };
            let path = resolve::spec_path(&r.spec).map_err(fail)?;
            let name = resolve::spec_name(&path);
            let source = if metadata.contains_key(&name) {
                Source::Metadata(name)
            } else if is_spec(&path) {
                if !builds.contains(&path) {
                    builds.push(path.clone());
                }
                Source::Build(path)
            } else {
                let known = if metadata.is_empty() {
                    String::new()
                } else {
                    let names: Vec<_> = metadata.keys().map(String::as_str).collect();
                    format!(" (the metadata files name: {})", names.join(", "))
                };
                return Err(fail(format!(
                    "unknown reference: no spec file {} (relative to the working directory) and no --metadata-file for {name:?}{known}",
                    path.display()
                )));
            };
            refs.push((r, source));
        }
        docs.push((input, refs));
    }
    Ok(Plan { docs, builds })
}

/// Push every spec of `plan.builds` at once, each on its own thread (`push` is blocking and
/// runs its own runtime), then return the resolved text: the inputs in order, each replaced
/// in place, separated by `---` lines (one YAML stream for `kubectl apply -f -`). The first
/// failed push (in spec order) is the error; then nothing is printed.
pub fn resolve<E: Send>(
    plan: Plan,
    metadata: &BTreeMap<String, Pushed>,
    push: impl Fn(&Path) -> Result<Pushed, E> + Sync,
) -> Result<String, E> {
    let results: Vec<Result<Pushed, E>> = std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .builds
            .iter()
            .map(|spec| {
                let push = &push;
                s.spawn(move || push(spec))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut built = BTreeMap::new();
    for (spec, result) in plan.builds.iter().zip(results) {
        built.insert(spec.clone(), result?);
    }
    let mut out = String::new();
    for (input, refs) in &plan.docs {
        if !out.is_empty() {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("---\n");
        }
        let only: Vec<Reference> = refs.iter().map(|(r, _)| r.clone()).collect();
        let mut sources = refs.iter().map(|(_, s)| s);
        out.push_str(&resolve::replace(&input.text, &only, |r| {
            let pushed = match sources.next() {
                Some(Source::Metadata(name)) => &metadata[name],
                Some(Source::Build(path)) => &built[path],
                None => unreachable!("one source per reference"),
            };
            pushed.render(r.form)
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn pushed(repo: &str, hex: char) -> Pushed {
        Pushed {
            repository: repo.into(),
            digest: format!("sha256:{}", hex.to_string().repeat(64)),
            tags: vec!["v1".into()],
        }
    }

    #[test]
    fn each_spec_is_pushed_once_and_every_reference_replaced() {
        let a = "# a\nimage: imgbuild://hello\n---\nimage: \"imgbuild://build-specs/hello.toml\"\n";
        let b = "image: imgbuild://api\nx: imgbuild://hello\n"; // no trailing newline needed
        let metadata = BTreeMap::from([("api".to_string(), pushed("r/api", 'a'))]);
        let plan = plan(
            vec![Input::new("a.yaml", a), Input::new("b.yaml", b)],
            &metadata,
            |p| p == Path::new("build-specs/hello.toml"),
        )
        .unwrap();
        assert_eq!(plan.builds, [PathBuf::from("build-specs/hello.toml")]);
        assert_eq!(plan.references(), 4);
        let calls = Mutex::new(Vec::new());
        let out = resolve(plan, &metadata, |p| {
            calls.lock().unwrap().push(p.to_path_buf());
            Ok::<_, String>(pushed("r/hello", 'b'))
        })
        .unwrap();
        assert_eq!(calls.into_inner().unwrap().len(), 1);
        let (ha, hb) = ("a".repeat(64), "b".repeat(64));
        assert_eq!(
            out,
            format!(
                "# a\nimage: r/hello@sha256:{hb}\n---\nimage: \"r/hello@sha256:{hb}\"\n---\nimage: r/api@sha256:{ha}\nx: r/hello@sha256:{hb}\n"
            )
        );
    }

    #[test]
    fn unknown_reference_names_file_line_column_and_nothing_is_pushed() {
        let err = plan(
            vec![Input::new("k8s/d.yaml", "a: 1\n  image: imgbuild://nope\n")],
            &BTreeMap::new(),
            |_| false,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("k8s/d.yaml:2:10: imgbuild://nope: unknown reference: no spec file build-specs/nope.toml"),
            "{msg}"
        );
    }

    #[test]
    fn a_failed_push_is_the_error() {
        let plan = plan(
            vec![Input::new("-", "image: imgbuild://x\n")],
            &BTreeMap::new(),
            |_| true,
        )
        .unwrap();
        let err = resolve(plan, &BTreeMap::new(), |_| Err::<Pushed, _>("boom")).unwrap_err();
        assert_eq!(err, "boom");
    }
}
