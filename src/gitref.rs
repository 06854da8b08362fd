//! Tags and `SOURCE_DATE_EPOCH` from git (`--tag-from-git`, `--source-date-epoch git`), the
//! way docker/metadata-action derives them, so a pipeline needs no tag-making shell step:
//!
//! - a branch `feature/foo` -> `feature-foo` (characters a tag cannot hold become `-`);
//! - a tag `v1.2.3` -> `1.2.3`, `1.2`, `1` and `latest` (`1` is left out for `0.x`; a
//!   pre-release `v1.2.3-rc.1` gives only `1.2.3-rc.1`); any other tag as it is, sanitised;
//! - a pull request (`refs/pull/12/merge`) -> `pr-12`;
//! - always the commit as `sha-<7 hex>` (metadata-action's `type=sha`).
//!
//! In GitHub Actions the checkout is a detached HEAD, so `GITHUB_REF` and `GITHUB_SHA` say
//! what was built; elsewhere `git` is asked (branch, tags pointing at HEAD, HEAD's commit).

use crate::reference::validate_tag;
use std::path::Path;
use std::process::Command;

/// What git says about the commit being built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitRefs {
    /// The branch checked out (`None` on a detached HEAD).
    pub branch: Option<String>,
    /// Tags pointing at the commit.
    pub tags: Vec<String>,
    /// A pull request number (from `refs/pull/N/merge`).
    pub pull_request: Option<String>,
    /// The commit, full hex.
    pub sha: String,
}

/// Why git could not tell us.
#[derive(Debug, thiserror::Error)]
#[error(
    "{flag}: `{command}` failed in {dir}: {reason}; run imgbuild in a git checkout (with its history and tags, e.g. actions/checkout with fetch-depth: 0), or give {instead}"
)]
pub struct GitError {
    pub flag: &'static str,
    pub command: String,
    pub dir: String,
    pub reason: String,
    pub instead: &'static str,
}

impl GitRefs {
    /// From a GitHub Actions ref (`refs/heads/B`, `refs/tags/T`, `refs/pull/N/merge`) and sha.
    pub fn from_github(github_ref: &str, sha: &str) -> GitRefs {
        let mut refs = GitRefs {
            sha: sha.to_string(),
            ..GitRefs::default()
        };
        if let Some(b) = github_ref.strip_prefix("refs/heads/") {
            refs.branch = Some(b.to_string());
        } else if let Some(t) = github_ref.strip_prefix("refs/tags/") {
            refs.tags.push(t.to_string());
        } else if let Some(pr) = github_ref.strip_prefix("refs/pull/") {
            refs.pull_request = pr.split('/').next().map(str::to_string);
        }
        refs
    }

    /// Ask git in `dir`: HEAD's commit, its branch (if not detached) and the tags on it.
    pub fn from_git(dir: &Path) -> Result<GitRefs, GitError> {
        let sha = git(
            dir,
            &["rev-parse", "HEAD"],
            "--tag-from-git",
            "tags with -t",
        )?;
        let branch = git(
            dir,
            &["symbolic-ref", "-q", "--short", "HEAD"],
            "--tag-from-git",
            "tags with -t",
        )
        .ok()
        .filter(|b| !b.is_empty());
        let tags = git(
            dir,
            &["tag", "--points-at", "HEAD"],
            "--tag-from-git",
            "tags with -t",
        )?;
        Ok(GitRefs {
            branch,
            tags: tags.lines().map(str::to_string).collect(),
            pull_request: None,
            sha,
        })
    }

    /// The image tags, in order, each once.
    pub fn image_tags(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |t: String| {
            if !t.is_empty() && validate_tag(&t).is_ok() && !out.contains(&t) {
                out.push(t);
            }
        };
        for t in &self.tags {
            match semver(t) {
                Some(v) => {
                    add(sanitize(&v.full));
                    if !v.pre_release {
                        add(format!("{}.{}", v.major, v.minor));
                        if v.major != 0 {
                            add(v.major.to_string());
                        }
                        add("latest".into());
                    }
                }
                None => add(sanitize(t)),
            }
        }
        if let Some(b) = &self.branch {
            add(sanitize(b));
        }
        if let Some(pr) = &self.pull_request {
            add(format!("pr-{}", sanitize(pr)));
        }
        if self.sha.len() >= 7 {
            add(format!("sha-{}", &self.sha[..7]));
        }
        out
    }
}

/// The committer time of HEAD in `dir` (`git log -1 --format=%ct`), for `SOURCE_DATE_EPOCH`
/// (reproducible-builds.org's recommendation).
pub fn commit_time(dir: &Path) -> Result<u64, GitError> {
    let flag = "--source-date-epoch git";
    let instead = "--source-date-epoch SECONDS";
    let text = git(dir, &["log", "-1", "--format=%ct"], flag, instead)?;
    text.trim().parse().map_err(|_| GitError {
        flag,
        command: "git log -1 --format=%ct".into(),
        dir: dir.display().to_string(),
        reason: format!("printed {text:?}, not seconds"),
        instead,
    })
}

fn git(
    dir: &Path,
    args: &[&str],
    flag: &'static str,
    instead: &'static str,
) -> Result<String, GitError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let err = |reason: String| GitError {
        flag,
        command: format!("git {}", args.join(" ")),
        dir: dir.display().to_string(),
        reason,
        instead,
    };
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| err(format!("cannot run git ({e})")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let first = msg.lines().next().unwrap_or("").trim();
        return Err(err(if first.is_empty() {
            format!("exit status {}", out.status)
        } else {
            first.to_string()
        }));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// metadata-action's rule: every run of characters a tag cannot hold becomes one `-`; a tag
/// cannot start with `.` or `-` (distribution's tag grammar), and holds at most 128.
pub fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_start_matches(['.', '-']);
    out.chars().take(128).collect()
}

struct Version {
    major: u64,
    minor: u64,
    full: String,
    pre_release: bool,
}

/// `v1.2.3`, `1.2.3-rc.1`, `v1.2.3+build.5` (semver.org 2.0.0); the `v` is dropped.
fn semver(tag: &str) -> Option<Version> {
    let text = tag.strip_prefix('v').unwrap_or(tag);
    let (core, build) = match text.split_once('+') {
        Some((c, b)) => (c, Some(b)),
        None => (text, None),
    };
    let (nums, pre) = match core.split_once('-') {
        Some((n, p)) => (n, Some(p)),
        None => (core, None),
    };
    let parts: Vec<&str> = nums.split('.').collect();
    let [major, minor, patch] = parts.as_slice() else {
        return None;
    };
    let num = |p: &str| -> Option<u64> {
        (!p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p == "0" || !p.starts_with('0')))
        .then(|| p.parse().ok())
        .flatten()
    };
    let (major, minor, _) = (num(major)?, num(minor)?, num(patch)?);
    let ident_ok = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if pre.is_some_and(|p| !ident_ok(p)) || build.is_some_and(|b| !ident_ok(b)) {
        return None;
    }
    Some(Version {
        major,
        minor,
        full: text.to_string(),
        pre_release: pre.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_like_metadata_action() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let cases: &[(&str, &str)] = &[
            ("refs/heads/main", "main sha-0123456"),
            ("refs/heads/feature/foo", "feature-foo sha-0123456"),
            ("refs/heads/Fix//Bug #3", "Fix-Bug-3 sha-0123456"),
            ("refs/tags/v1.2.3", "1.2.3 1.2 1 latest sha-0123456"),
            ("refs/tags/1.2.3", "1.2.3 1.2 1 latest sha-0123456"),
            ("refs/tags/v0.4.1", "0.4.1 0.4 latest sha-0123456"),
            ("refs/tags/v1.2.3-rc.1", "1.2.3-rc.1 sha-0123456"),
            (
                "refs/tags/v1.2.3+build.5",
                "1.2.3-build.5 1.2 1 latest sha-0123456",
            ),
            ("refs/tags/release-2024", "release-2024 sha-0123456"),
            ("refs/tags/v1.2", "v1.2 sha-0123456"),
            ("refs/pull/12/merge", "pr-12 sha-0123456"),
        ];
        for (github_ref, want) in cases {
            let got = GitRefs::from_github(github_ref, sha).image_tags().join(" ");
            assert_eq!(got, *want, "{github_ref}");
        }
    }

    #[test]
    fn sanitising() {
        let cases = [
            ("feature/foo", "feature-foo"),
            ("-x", "x"),
            (".hidden/branch", "hidden-branch"),
            ("a\u{e9}b", "a-b"),
        ];
        for (input, want) in cases {
            assert_eq!(sanitize(input), want, "{input}");
        }
        assert_eq!(sanitize(&"b".repeat(300)).len(), 128);
    }

    /// A real repository: a branch with a slash, a version tag on HEAD, and its commit time.
    #[test]
    fn reads_a_real_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .env("GIT_COMMITTER_DATE", "2024-01-02T03:04:05Z")
                .env("GIT_AUTHOR_DATE", "2024-01-02T03:04:05Z")
                .output()
                .map(|o| o.status.success());
            assert!(matches!(ok, Ok(true)), "git {args:?}");
        };
        run(&["init", "-q", "-b", "feature/foo"]);
        run(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ]);
        run(&["tag", "v2.3.4"]);
        let refs = GitRefs::from_git(dir.path()).unwrap();
        let short = &refs.sha[..7];
        assert_eq!(
            refs.image_tags().join(" "),
            format!("2.3.4 2.3 2 latest feature-foo sha-{short}")
        );
        assert_eq!(commit_time(dir.path()).unwrap(), 1_704_164_645);
        let none = tempfile::tempdir().unwrap();
        let err = commit_time(none.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("--source-date-epoch git: `git log -1 --format=%ct` failed in"),
            "{err}"
        );
    }
}
