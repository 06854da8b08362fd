//! What a new user trips over (README "New pipelines"): tags and outputs that say what is true, `--no-tag`,
//! tags and timestamps from git, the docker-archive tarball loaded by the real Docker Engine,
//! duplicate platforms, a 1777 directory, exit codes a retry wrapper can trust (a missing base
//! is 3, a refused certificate 6), and messages that name what to fix.

use crate::build::workspace;
use crate::harness::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error line of a failed run, and its exit code.
fn failure(out: &Output) -> (Option<i32>, String) {
    let err = text(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string();
    (out.status.code(), line)
}

fn build_cmd(ws: &Path) -> Command {
    let mut cmd = imgbuild();
    cmd.current_dir(ws)
        .args(["build", "-f", "build-specs/hello.toml"]);
    cmd
}

fn push_cmd(ws: &Path, repo: &str) -> Command {
    let mut cmd = imgbuild();
    cmd.current_dir(ws).args([
        "push",
        "-f",
        "build-specs/hello.toml",
        "--platform",
        "linux/amd64",
        "--repo",
        repo,
    ]);
    cmd
}

/// `org.opencontainers.image.ref.name`s of a layout's index.json.
fn layout_tags(dir: &Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_string)
        .collect()
}

#[test]
fn build_lists_every_tag_writes_true_outputs_and_creates_the_tarball_directory() {
    let ws = workspace(1_000_000_000);
    let gh = ws.path().join("github_output");
    let out = run_ok(
        build_cmd(ws.path())
            .env("GITHUB_OUTPUT", &gh)
            .args([
                "-o",
                "out",
                "-t",
                "a",
                "-t",
                "b",
                "--platform",
                "linux/amd64",
            ])
            .args([
                "--repo",
                "127.0.0.1:5000/hello",
                "--metadata-file",
                "meta.json",
            ])
            .args(["--tarball", "new/dir/image.tar"]),
    );
    let digest = text(&out.stdout).trim().to_string();
    let dir = ws.path().join("out");
    assert_eq!(layout_tags(&dir), ["a", "b"]);
    for tag in ["a", "b"] {
        let raw = skopeo_ok(&["inspect", "--raw", &format!("oci:{}:{tag}", dir.display())]);
        assert!(
            raw.contains("application/vnd.oci.image.manifest.v1+json"),
            "{raw}"
        );
    }
    assert!(ws.path().join("new/dir/image.tar").is_file());
    let archive = ws.path().join("new/dir/image.tar");
    skopeo_ok(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}:b", archive.display()),
    ]);
    // Nothing was pushed: no image= line, no "image" key; the layout is named instead.
    assert_eq!(
        fs::read_to_string(&gh).unwrap(),
        format!("digest={digest}\nlayout=out\n")
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(ws.path().join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["digest"], digest.as_str());
    assert!(meta.get("image").is_none(), "{meta}");

    // --image-refs names pushed references only.
    let out = build_cmd(ws.path())
        .args(["-o", "out2", "--image-refs", "refs.txt"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--image-refs lists pushed references"),
        "{err}"
    );
    assert!(!ws.path().join("out2").exists());

    // tags = [] (or --no-tag): an untagged layout that skopeo still reads.
    let out = run_ok(build_cmd(ws.path()).args(["-o", "untagged", "--no-tag"]));
    assert!(
        text(&out.stderr).contains("untagged"),
        "{}",
        text(&out.stderr)
    );
    assert!(layout_tags(&ws.path().join("untagged")).is_empty());
    skopeo_ok(&[
        "inspect",
        "--raw",
        &format!("oci:{}", ws.path().join("untagged").display()),
    ]);
}

#[test]
fn docker_tarball_loads_and_runs_in_docker() {
    let ws = workspace(1_000_000_000);
    let tarball = ws.path().join("smoke/hello-docker.tar");
    let out = run_ok(
        build_cmd(ws.path())
            .args(["-o", "out", "--tarball"])
            .arg(&tarball)
            .args(["--tarball-format", "docker", "-t", "smoke"])
            .args(["--repo", "127.0.0.1:5999/imgbuild-newuser"]),
    );
    let err = text(&out.stderr);
    assert!(err.contains("linux/amd64 only (docker load -i"), "{err}");
    let listing = text(&run_ok(Command::new("tar").arg("-tf").arg(&tarball)).stdout);
    assert!(listing.starts_with("manifest.json\n"), "{listing}");
    // amd64 only: the config, two layers, manifest.json and two directories.
    assert_eq!(listing.lines().count(), 6, "{listing}");
    let manifest = text(
        &run_ok(
            Command::new("tar")
                .arg("-xOf")
                .arg(&tarball)
                .arg("manifest.json"),
        )
        .stdout,
    );
    assert!(
        manifest.contains("\"RepoTags\":[\"127.0.0.1:5999/imgbuild-newuser:smoke\"]"),
        "{manifest}"
    );
    if !docker_available() {
        skip("no Docker Engine: the docker load / docker run part is not tested");
        return;
    }
    let image = "127.0.0.1:5999/imgbuild-newuser:smoke";
    let load = run_ok(Command::new("docker").arg("load").arg("-i").arg(&tarball));
    assert!(text(&load.stdout).contains(image), "{}", text(&load.stdout));
    let run = Command::new("docker")
        .args(["run", "--rm", image])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", image]).output();
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("hello"), "{}", text(&run.stdout));
}

#[test]
fn bad_input_the_issue_names_is_refused_and_a_1777_directory_can_be_made() {
    let ws = workspace(1_000_000_000);
    // Duplicate platforms through an alias.
    let out = build_cmd(ws.path())
        .args(["-o", "o", "--platform", "linux/arm64/v8,linux/arm64"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--platform: linux/arm64/v8 and linux/arm64 are the same platform"),
        "{err}"
    );

    // A bare `mode = 755` is refused, with the line and the fix.
    let spec = ws.path().join("build-specs/mode.toml");
    fs::write(
        &spec,
        "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{ src = \"../fixtures/dist/amd64/hello\", dest = \"/hello\", mode = 755 }]\n",
    )
    .unwrap();
    let out = imgbuild()
        .current_dir(ws.path())
        .args(["build", "-f", "build-specs/mode.toml", "-o", "o"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("build-specs/mode.toml:3:") && err.contains("write 0o755 or \"0755\""),
        "{err}"
    );

    // An empty directory with mode 0o1777 becomes a sticky, world-writable /tmp.
    fs::create_dir_all(ws.path().join("empty")).unwrap();
    fs::write(
        &spec,
        "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{ src = \"../empty\", dest = \"/tmp\", mode = 0o1777 }]\n",
    )
    .unwrap();
    run_ok(imgbuild().current_dir(ws.path()).args([
        "build",
        "-f",
        "build-specs/mode.toml",
        "-o",
        "tmpdir",
    ]));
    let dir = ws.path().join("tmpdir");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let idx_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let idx: serde_json::Value = serde_json::from_slice(&read_blob(&dir, idx_digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &dir,
        idx["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let listing = tar_listing(&blob_path(&dir, layer));
    assert!(
        listing.lines().any(|l| l.starts_with("drwxrwxrwt")
            && matches!(l.split_whitespace().last(), Some("tmp" | "tmp/"))),
        "{listing}"
    );
}

/// A git checkout: `--tag-from-git` and `--source-date-epoch git`, from git itself and from the
/// GitHub Actions variables.
#[test]
fn tags_and_timestamps_from_git() {
    let ws = workspace(1_000_000_000);
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(ws.path())
                .args(args)
                .env("GIT_COMMITTER_DATE", "2024-01-02T03:04:05Z")
                .env("GIT_AUTHOR_DATE", "2024-01-02T03:04:05Z"),
        )
    };
    git(&["init", "-q", "-b", "feature/new-user"]);
    git(&["add", "-A"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-qm",
        "x",
    ]);
    git(&["tag", "v1.2.3"]);
    let sha = text(&git(&["rev-parse", "HEAD"]).stdout).trim().to_string();
    let out = run_ok(
        build_cmd(ws.path())
            .args(["-o", "out", "--platform", "linux/amd64", "-t", "extra"])
            .args(["--tag-from-git", "--source-date-epoch", "git"]),
    );
    let dir = ws.path().join("out");
    assert_eq!(
        layout_tags(&dir),
        [
            "extra".to_string(),
            "1.2.3".into(),
            "1.2".into(),
            "1".into(),
            "latest".into(),
            "feature-new-user".into(),
            format!("sha-{}", &sha[..7])
        ]
    );
    let idx: serde_json::Value =
        serde_json::from_slice(&read_blob(&dir, text(&out.stdout).trim())).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &dir,
        idx["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&read_blob(
        &dir,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["created"], "2024-01-02T03:04:05Z", "{config}");

    // GitHub Actions: the ref comes from GITHUB_REF, not from the (detached) checkout.
    run_ok(
        build_cmd(ws.path())
            .args(["-o", "gh", "--platform", "linux/amd64", "--tag-from-git"])
            .env("GITHUB_REF", "refs/heads/release/2.x")
            .env("GITHUB_SHA", "abcdef0123456789"),
    );
    assert_eq!(
        layout_tags(&ws.path().join("gh")),
        ["release-2.x", "sha-abcdef0"]
    );

    // Outside a checkout: a usage error that says what to do.
    let bare = workspace(1_000_000_000);
    let out = build_cmd(bare.path())
        .args(["-o", "o", "--source-date-epoch", "git"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--source-date-epoch git: `git log -1 --format=%ct` failed"),
        "{err}"
    );
}

#[test]
fn push_without_tag_and_outputs_that_fail_after_the_push() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    let repo = format!("{}/newuser", reg.addr);
    let out = run_ok(push_cmd(ws.path(), &repo).arg("--no-tag"));
    let image_ref = text(&out.stdout).trim().to_string();
    let digest = image_ref.rsplit_once('@').unwrap().1.to_string();
    assert!(!inspect_raw(&reg, &format!("newuser@{digest}")).is_empty());
    // The registry's own storage: the repository has manifests but no tag.
    let repo_dir = reg
        .storage()
        .join("docker/registry/v2/repositories/newuser/_manifests");
    assert!(
        repo_dir.join("revisions").is_dir(),
        "{}",
        repo_dir.display()
    );
    let tags = repo_dir.join("tags");
    // `sha256-<hex>` tags are the referrers tag schema (SBOM/provenance), not image tags.
    assert!(
        !tags.exists()
            || fs::read_dir(&tags).unwrap().all(|t| t
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("sha256-")),
        "--no-tag pushed a tag"
    );
    let err = text(&out.stderr);
    assert!(err.contains(&format!("pushed {digest}")), "{err}");
    assert!(
        !err.contains(&format!("pushed {digest} -> {digest}")),
        "{err}"
    );

    // GITHUB_OUTPUT in a missing directory: the pushed reference is still printed, the error
    // names the variable and the file.
    let gh = ws.path().join("missing/dir/out");
    let out = push_cmd(ws.path(), &repo)
        .args(["-t", "v1"])
        .env("GITHUB_OUTPUT", &gh)
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(text(&out.stdout).trim(), image_ref);
    assert!(
        err.contains(&format!(
            "pushed {image_ref}, but cannot append the step outputs"
        )) && err.contains(&format!("GITHUB_OUTPUT={}", gh.display())),
        "{err}"
    );
    assert!(text(&out.stderr).contains(&format!("tagged v1 -> {digest}")));
}

#[test]
fn exit_codes_and_messages_a_retry_wrapper_can_trust() {
    let reg = Registry::start();
    let ws = workspace(1_000_000_000);
    // A base tag that does not exist: input (3), named.
    let base = format!("{}/nothing/here:v9", reg.addr);
    let out = build_cmd(ws.path())
        .args(["-o", "o", "--platform", "linux/amd64", "--base", &base])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains(&format!("tag v9 not found in {}/nothing/here", reg.addr)),
        "{err}"
    );
    assert!(!err.contains("check the registry address"), "{err}");

    // Nothing listens: said plainly, retries counted "N of M in S s", http tried too (5).
    let port = free_port();
    let out = push_cmd(ws.path(), &format!("127.0.0.1:{port}/x"))
        .args(["--retries", "1", "--retry-base-ms", "10"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains(&format!(
            "nothing listens on 127.0.0.1:{port} (connection refused)"
        )) && err.contains("plain http was tried too"),
        "{err}"
    );
    assert!(!err.contains("error sending request"), "{err}");
    let all = text(&out.stderr);
    assert!(all.contains("retry 1 of 1 in 0."), "{all}");

    // A 401 with --username given: check what was given, not "pass --username".
    let auth = Registry::start_htpasswd("newuser", "right");
    let out = output_with_stdin(
        push_cmd(ws.path(), &format!("{}/x", auth.addr)).args([
            "-u",
            "newuser",
            "--password-stdin",
        ]),
        "wrong\n",
    );
    let (code, err) = failure(&out);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("check the user name given with --username"),
        "{err}"
    );
    assert!(!err.contains("pass --username"), "{err}");

    // A TLS registry whose CA is not the one given: 6, and the advice is not "--ca-cert" again.
    let tls = Registry::start_tls(&["127.0.0.1"]);
    let other = Registry::start_tls(&["127.0.0.1"]);
    let wrong_ca = other.ca_cert().unwrap();
    let out = push_cmd(ws.path(), &format!("{}/x", tls.addr))
        .arg("--ca-cert")
        .arg(&wrong_ca)
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(6), "{err}");
    assert!(
        err.contains("signed neither by a system CA nor by the --ca-cert file(s) given")
            && !err.contains("pass it with --ca-cert"),
        "{err}"
    );

    // --help offers only what -v does (there is no -vv level).
    let help = text(&run_ok(imgbuild().args(["push", "--help"])).stdout);
    assert!(!help.contains("-vv"), "{help}");
    let top = text(&run_ok(imgbuild().arg("--help")).stdout);
    assert!(top.contains("6 TLS certificate not trusted"), "{top}");

    // A bad flag points at the subcommand's help.
    let out = imgbuild()
        .args(["push", "--no-such-flag"])
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.ends_with("see imgbuild push --help"), "{err}");
}

/// ECR without AWS credentials: the message says what the docker config held (a credHelpers
/// entry whose helper is not installed) and that AWS_PROFILE names no profile.
#[test]
fn ecr_no_credentials_names_the_missing_helper_and_profile() {
    use crate::ecr::{ECR_HOST, ecr_registry, push_to_ecr_stand_in};
    let reg = ecr_registry("unused");
    let ws = workspace(1_000_000_000);
    let docker = tempfile::tempdir().unwrap();
    fs::write(
        docker.path().join("config.json"),
        format!(
            "{{\"credHelpers\":{{\"{ECR_HOST}:{}\":\"imgbuild-test-not-installed\"}}}}",
            reg.port
        ),
    )
    .unwrap();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = push_to_ecr_stand_in(ws.path(), &reg, "hello")
        .env("AWS_ENDPOINT_URL", &nowhere)
        .env("DOCKER_CONFIG", docker.path())
        .env("AWS_PROFILE", "no-such-profile")
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("its credential helper could not be run (is it installed?)"),
        "{err}"
    );
    assert!(
        err.contains("AWS_PROFILE=no-such-profile names a profile defined in neither"),
        "{err}"
    );
}
