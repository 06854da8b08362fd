//! Outputs for deploy steps: the digest alone, ko-style image refs, a metadata JSON, and
//! GitHub Actions step outputs. Deploy by digest, not by mutable tag.

use crate::digest::Digest;
use crate::image::BuiltImage;
use serde_json::json;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where to write what (all optional).
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    /// `--digest-file`: `sha256:...` and nothing else.
    pub digest_file: Option<PathBuf>,
    /// `--image-refs`: one `REPO@sha256:...` line (ko's `--image-refs`).
    pub image_refs: Option<PathBuf>,
    /// `--metadata-file`: JSON with the index digest, per-platform manifests, tags.
    pub metadata_file: Option<PathBuf>,
    /// `$GITHUB_OUTPUT`: `digest=` and (after a push) `image=` lines appended; a build adds
    /// `layout=` instead.
    pub github_output: Option<PathBuf>,
}

/// What was built (and pushed).
#[derive(Debug, Clone)]
pub struct Summary<'a> {
    pub image: &'a BuiltImage,
    /// `REGISTRY/PATH` if the image has a repository.
    pub repository: Option<String>,
    /// Tags pushed (empty for a local build).
    pub tags: Vec<String>,
    /// The OCI layout written, for `build`.
    pub layout: Option<PathBuf>,
    /// The build spec, as given; `imgbuild resolve --metadata-file` finds the image by its name.
    pub spec: Option<&'a Path>,
    /// Whether the image is in the registry: only then is `REPO@DIGEST` a reference that
    /// resolves, and only then is it written (`image=`, `"image"`).
    pub pushed: bool,
}

impl Summary<'_> {
    pub fn digest(&self) -> &Digest {
        &self.image.index.digest
    }

    /// `REPO@sha256:...`, or just the digest without a repository.
    pub fn image_ref(&self) -> String {
        match &self.repository {
            Some(r) => format!("{r}@{}", self.digest()),
            None => self.digest().to_string(),
        }
    }

    pub fn metadata(&self) -> serde_json::Value {
        let platforms: Vec<_> = self
            .image
            .images
            .iter()
            .map(|i| {
                json!({
                    "platform": i.platform.to_string(),
                    "digest": i.manifest.digest,
                    "size": i.manifest.bytes.len(),
                    "mediaType": i.manifest.media_type,
                    "config": i.config.digest,
                })
            })
            .collect();
        let mut v = json!({
            "digest": self.digest(),
            "mediaType": self.image.index.media_type,
            "size": self.image.index.bytes.len(),
            "manifests": platforms,
            "tags": self.tags,
        });
        if let Some(r) = &self.repository {
            v["repository"] = json!(r);
            if self.pushed {
                v["image"] = json!(self.image_ref());
            }
        }
        if let Some(s) = self.spec {
            v["spec"] = json!(s.display().to_string());
        }
        if let Some(l) = &self.layout {
            v["layout"] = json!(l.display().to_string());
        }
        v
    }
}

/// Write every requested output. An error names the flag or variable and the file.
pub fn write(outputs: &Outputs, summary: &Summary<'_>) -> io::Result<()> {
    write_all(outputs, std::slice::from_ref(summary))
}

/// Write every requested output for one image pushed to several repositories (repeated
/// `--repo`), `summaries[0]` being the first: the digest file holds the one index digest,
/// `--image-refs` one line per repository (ko writes one per image), the metadata file keeps
/// the first repository's fields and lists all under `destinations`, and GitHub gets
/// `digest=`, `image=` (the first) and, with several, `images=` (all, comma-separated).
pub fn write_all(outputs: &Outputs, summaries: &[Summary<'_>]) -> io::Result<()> {
    let Some(summary) = summaries.first() else {
        return Ok(());
    };
    if let Some(p) = &outputs.digest_file {
        write_file(
            "--digest-file",
            p,
            format!("{}\n", summary.digest()).as_bytes(),
        )?;
    }
    if let Some(p) = &outputs.image_refs {
        // `REPO@DIGEST` only names something once it was pushed (a build refuses the flag).
        if summary.pushed {
            let refs: String = summaries
                .iter()
                .map(|s| format!("{}\n", s.image_ref()))
                .collect();
            write_file("--image-refs", p, refs.as_bytes())?;
        }
    }
    if let Some(p) = &outputs.metadata_file {
        let mut meta = summary.metadata();
        if summary.pushed {
            meta["destinations"] = summaries
                .iter()
                .filter_map(|s| {
                    let repository = s.repository.as_ref()?;
                    Some(json!({
                        "repository": repository,
                        "image": s.image_ref(),
                        "tags": s.tags,
                    }))
                })
                .collect();
        }
        let mut text = serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?;
        text.push(b'\n');
        write_file("--metadata-file", p, &text)?;
    }
    if let Some(p) = &outputs.github_output {
        let mut lines = format!("digest={}\n", summary.digest());
        if summary.pushed {
            lines.push_str(&format!("image={}\n", summary.image_ref()));
            if summaries.len() > 1 {
                let all: Vec<String> = summaries.iter().map(Summary::image_ref).collect();
                lines.push_str(&format!("images={}\n", all.join(",")));
            }
        }
        if let Some(l) = &summary.layout {
            lines.push_str(&format!("layout={}\n", l.display()));
        }
        // GitHub's file is shared by all steps of the job: append, never truncate. It is the
        // runner's file: a missing directory is not created, but reported.
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .and_then(|mut f| f.write_all(lines.as_bytes()))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot append the step outputs (digest=...) to GITHUB_OUTPUT={}: {e}; check the variable (the runner sets it to a file that exists)",
                        p.display()
                    ),
                )
            })?;
    }
    Ok(())
}

fn write_file(flag: &str, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{flag} {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::store::create_dirs(dir).map_err(named)?;
    }
    crate::store::create_file(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(named)
}
