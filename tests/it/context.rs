//! `--context` sources and repeated `--repo` (README "Build contexts") with real parts: tarballs made here
//! (the `tar` crate, flate2, zstd; bad ones with raw headers), moto's S3 for `s3://`, Debian's
//! docker-registry (two of them for two destinations) and skopeo to check what was pushed.
//!
//! Every run gets its own TMPDIR, checked empty afterwards: an unpacked context must not
//! outlive the run, whether it succeeded or was refused.

use crate::ecr::Moto;
use crate::harness::*;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SPEC: &str = r#"
platforms = ["linux/amd64", "linux/arm64"]
tags = ["v1"]
base = "scratch"

[config]
entrypoint = ["/usr/local/bin/hello"]

[[layer]]
files = [
  { src = "dist/{arch}/hello", dest = "/usr/local/bin/hello", mode = 0o755 },
]

[[layer]]
files = [
  { src = "dist/share/greeting.txt", dest = "/etc/hello/greeting.txt" },
  { src = "dist/share/conf", dest = "/etc/hello/conf" },
]
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A workspace: `spec.toml` (relative `src` paths) and the context directory `ctx/dist`.
struct Ws {
    dir: tempfile::TempDir,
}

impl Ws {
    fn new() -> Ws {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("spec.toml"), SPEC).unwrap();
        copy_dir(fixtures().join("dist"), dir.path().join("ctx/dist"));
        Ws { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ctx(&self) -> PathBuf {
        self.path().join("ctx")
    }

    /// A fresh, empty TMPDIR for one run.
    fn tmpdir(&self, name: &str) -> PathBuf {
        let t = self.path().join("tmp").join(name);
        fs::create_dir_all(&t).unwrap();
        t
    }
}

/// The context directory as an uncompressed tar (entries `./dist/...` like `tar -C ctx .`).
fn tar_of_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// A tar written header by header (old-style headers: the tar crate's builder would refuse
/// `..` and absolute paths, which is what these tests need).
fn raw_tar(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, ty, link, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(*ty));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// `imgbuild build -q -f spec.toml --context CONTEXT` with its own TMPDIR; returns the digest.
fn build_digest(ws: &Ws, context: &str, stdin: Option<&[u8]>, tmp: &Path) -> String {
    let mut cmd = imgbuild();
    cmd.current_dir(ws.path())
        .env("TMPDIR", tmp)
        .args(["build", "-q", "-f", "spec.toml", "-o"])
        .arg(ws.path().join("out").join(context.replace('/', "_")))
        .args(["--context", context]);
    let out = match stdin {
        Some(data) => run_with_stdin(&mut cmd, data),
        None => cmd.output().unwrap(),
    };
    assert!(
        out.status.success(),
        "--context {context}: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

fn run_with_stdin(cmd: &mut Command, data: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    // The child may stop reading early (a refused entry): a broken pipe is fine then.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn assert_empty(dir: &Path, what: &str) {
    let left: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{what}: left in TMPDIR: {left:?}");
}

#[test]
fn tar_contexts_give_the_same_digest_as_the_directory() {
    let ws = Ws::new();
    let tmp = ws.tmpdir("dir");
    let want = build_digest(&ws, "ctx", None, &tmp);
    assert!(want.starts_with("sha256:"), "{want}");

    let tar = tar_of_dir(&ws.ctx());
    fs::write(ws.path().join("ctx.tar"), &tar).unwrap();
    fs::write(ws.path().join("ctx.tar.gz"), gzip(&tar)).unwrap();
    fs::write(ws.path().join("ctx.tar.zst"), zstd(&tar)).unwrap();
    // The compression is told by magic bytes, not by the name.
    fs::write(ws.path().join("ctx.bin"), zstd(&tar)).unwrap();
    for name in ["ctx.tar", "ctx.tar.gz", "ctx.tar.zst", "ctx.bin"] {
        let tmp = ws.tmpdir(name);
        assert_eq!(build_digest(&ws, name, None, &tmp), want, "{name}");
        assert_empty(&tmp, name);
    }
    let tmp = ws.tmpdir("stdin");
    assert_eq!(build_digest(&ws, "-", Some(&gzip(&tar)), &tmp), want, "-");
    assert_empty(&tmp, "-");
}

/// One bad tarball: what it holds, the entry the error must name, extra flags.
struct Bad {
    what: &'static str,
    tar: Vec<u8>,
    entry: &'static str,
    flags: &'static [&'static str],
}

fn bad_tarballs() -> Vec<Bad> {
    let many: Vec<(String, u8, &str, &[u8])> = (0..20)
        .map(|i| (format!("f{i:02}"), b'0', "", &b"x"[..]))
        .collect();
    let many: Vec<(&str, u8, &str, &[u8])> = many
        .iter()
        .map(|(p, t, l, d)| (p.as_str(), *t, *l, *d))
        .collect();
    vec![
        Bad {
            what: "absolute path",
            tar: raw_tar(&[("dist/", b'5', "", b""), ("/etc/evil", b'0', "", b"x")]),
            entry: "/etc/evil",
            flags: &[],
        },
        Bad {
            what: "..",
            tar: raw_tar(&[("dist/../../evil", b'0', "", b"x")]),
            entry: "dist/../../evil",
            flags: &[],
        },
        Bad {
            what: "symlink escaping",
            tar: raw_tar(&[
                ("dist/", b'5', "", b""),
                ("dist/passwd", b'2', "../../etc/passwd", b""),
            ]),
            entry: "dist/passwd",
            flags: &[],
        },
        Bad {
            what: "absolute symlink",
            tar: raw_tar(&[("dist", b'2', "/etc", b"")]),
            entry: "dist",
            flags: &[],
        },
        Bad {
            what: "hard link escaping",
            tar: raw_tar(&[("shadow", b'1', "../../etc/shadow", b"")]),
            entry: "shadow",
            flags: &[],
        },
        Bad {
            what: "device file",
            tar: raw_tar(&[("dist/", b'5', "", b""), ("dist/null", b'3', "", b"")]),
            entry: "dist/null",
            flags: &[],
        },
        Bad {
            what: "FIFO",
            tar: raw_tar(&[("fifo", b'6', "", b"")]),
            entry: "fifo",
            flags: &[],
        },
        Bad {
            what: "too big",
            tar: raw_tar(&[
                ("small", b'0', "", &[1u8; 600]),
                ("big", b'0', "", &[0u8; 600]),
            ]),
            entry: "big",
            flags: &["--context-max-size", "1K"],
        },
        Bad {
            what: "too many entries",
            tar: raw_tar(&many),
            entry: "f10",
            flags: &["--context-max-entries", "10"],
        },
    ]
}

#[test]
fn bad_tarballs_are_refused_with_nothing_pushed_and_nothing_left() {
    let reg = Registry::start();
    let ws = Ws::new();
    for (i, bad) in bad_tarballs().into_iter().enumerate() {
        // As a file (gzip) and on standard input (plain).
        for via_stdin in [false, true] {
            let tmp = ws.tmpdir(&format!("bad{i}-{via_stdin}"));
            let repo = format!("{}/bad{i}", reg.addr);
            let mut cmd = imgbuild();
            cmd.current_dir(ws.path())
                .env("TMPDIR", &tmp)
                .args(["push", "-f", "spec.toml", "--repo", &repo])
                .args(bad.flags);
            let out = if via_stdin {
                cmd.args(["--context", "-"]);
                run_with_stdin(&mut cmd, &bad.tar)
            } else {
                let file = ws.path().join(format!("bad{i}.tar.gz"));
                fs::write(&file, gzip(&bad.tar)).unwrap();
                cmd.arg("--context").arg(&file);
                cmd.output().unwrap()
            };
            let err = text(&out.stderr);
            let what = format!("{} (stdin: {via_stdin})", bad.what);
            assert_eq!(out.status.code(), Some(3), "{what}: {err}");
            assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
            assert!(
                err.contains(&format!("entry {:?}", bad.entry)),
                "{what}: names the entry: {err}"
            );
            assert!(out.stdout.is_empty(), "{what}");
            assert_empty(&tmp, &what);
        }
    }
    // Nothing reached the registry: no repository, no blob, not even a request for one.
    let repos = reg.storage().join("docker/registry/v2/repositories");
    assert!(!repos.exists() || fs::read_dir(&repos).unwrap().next().is_none());
    assert!(!reg.log().contains("/bad"), "{}", reg.log());
}

/// Upload `data` to moto's S3 as `s3://bucket/key` with boto3 (moto's venv has it).
fn s3_put(moto: &Moto, bucket: &str, key: &str, data: &Path) {
    let python = moto_server_bin().unwrap().parent().unwrap().join("python");
    let script = "import boto3, sys\n\
        c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
        aws_access_key_id='x', aws_secret_access_key='y')\n\
        try:\n    c.create_bucket(Bucket=sys.argv[2])\nexcept c.exceptions.BucketAlreadyOwnedByYou:\n    pass\n\
        c.upload_file(sys.argv[4], sys.argv[2], sys.argv[3])\n";
    run_ok(
        Command::new(python)
            .args(["-c", script, &moto.url, bucket, key])
            .arg(data)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null()),
    );
}

fn with_moto(cmd: &mut Command, moto: &Moto) {
    cmd.env("AWS_ENDPOINT_URL", &moto.url)
        .env("AWS_ACCESS_KEY_ID", "AKIDCONTEXTTEST")
        .env("AWS_SECRET_ACCESS_KEY", "secret-context-test")
        .env("AWS_REGION", "us-east-1");
}

#[test]
fn s3_context_is_pushed_and_skopeo_verifies_it() {
    let moto = Moto::start();
    let reg = Registry::start();
    let ws = Ws::new();
    let tmp = ws.tmpdir("dir");
    let want = build_digest(&ws, "ctx", None, &tmp);
    let tarball = ws.path().join("ctx.tar.gz");
    fs::write(&tarball, gzip(&tar_of_dir(&ws.ctx()))).unwrap();
    s3_put(&moto, "contexts", "ci/app.tar.gz", &tarball);
    moto.take_calls();

    let tmp = ws.tmpdir("s3");
    let repo = format!("{}/from-s3", reg.addr);
    let mut cmd = imgbuild();
    cmd.current_dir(ws.path())
        .env("TMPDIR", &tmp)
        .args(["push", "-q", "-f", "spec.toml", "--repo", &repo])
        .args(["--context", "s3://contexts/ci/app.tar.gz"]);
    with_moto(&mut cmd, &moto);
    let out = run_ok(&mut cmd);
    assert_eq!(text(&out.stdout).trim(), format!("{repo}@{want}"));
    assert_empty(&tmp, "s3");
    // The object was fetched with the chain's credentials (the key from the environment).
    let calls = moto.take_calls();
    assert!(
        calls
            .iter()
            .any(|c| c.authorization.contains("Credential=AKIDCONTEXTTEST/")),
        "{calls:?}"
    );
    // skopeo pulls every blob and checks every digest.
    let oci = ws.path().join("pulled");
    let pulled = pull_oci(&reg, &format!("from-s3@{want}"), &oci, "x");
    assert!(!pulled.is_empty());
    assert_eq!(
        inspect_raw(&reg, "from-s3:v1"),
        inspect_raw(&reg, &format!("from-s3@{want}"))
    );

    // A missing key is an input error, a refused tarball in S3 too; nothing pushed.
    let bad = ws.path().join("bad.tar");
    fs::write(&bad, raw_tar(&[("/abs", b'0', "", b"x")])).unwrap();
    s3_put(&moto, "contexts", "ci/bad.tar", &bad);
    for (key, says) in [
        ("ci/missing.tar.gz", "no such object"),
        ("ci/bad.tar", "entry \"/abs\""),
    ] {
        let tmp = ws.tmpdir(key);
        let mut cmd = imgbuild();
        cmd.current_dir(ws.path())
            .env("TMPDIR", &tmp)
            .args(["push", "-q", "-f", "spec.toml"])
            .args(["--repo", &format!("{}/s3-bad", reg.addr)])
            .arg("--context")
            .arg(format!("s3://contexts/{key}"));
        with_moto(&mut cmd, &moto);
        let out = cmd.output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{key}: {err}");
        assert!(
            err.contains(says) && err.lines().count() == 1,
            "{key}: {err}"
        );
        assert_empty(&tmp, key);
    }
    assert!(!reg.log().contains("/s3-bad/"), "nothing pushed");
}

#[test]
fn one_build_pushed_to_two_registries() {
    let a = Registry::start();
    let b = Registry::start();
    let ws = Ws::new();
    let repo_a = format!("{}/team/app", a.addr);
    let repo_b = format!("{}/mirror/app", b.addr);
    let out = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .args(["push", "-f", "spec.toml", "--context", "ctx", "--no-cache"])
            .args(["--repo", &repo_a, "--repo", &repo_b])
            .args(["--metadata-file", "meta.json", "--image-refs", "refs"])
            .args(["--digest-file", "digest"])
            .env("GITHUB_OUTPUT", ws.path().join("gh")),
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one line per repository: {stdout}");
    let (ra, da) = lines[0].split_once('@').unwrap();
    let (rb, db) = lines[1].split_once('@').unwrap();
    assert_eq!((ra, rb), (repo_a.as_str(), repo_b.as_str()));
    assert_eq!(da, db, "one index digest");

    // Both registries serve the same index, under the digest and the tag; skopeo pulls
    // and verifies every blob from each.
    let index = inspect_raw(&a, &format!("team/app@{da}"));
    assert_eq!(inspect_raw(&b, &format!("mirror/app@{da}")), index);
    assert_eq!(inspect_raw(&b, "mirror/app:v1"), index);
    pull_oci(&a, "team/app:v1", &ws.path().join("oci-a"), "x");
    pull_oci(&b, "mirror/app:v1", &ws.path().join("oci-b"), "x");

    // Layers were compressed once: one "layer" line per distinct layer, while each
    // registry got its own upload of each blob.
    let err = text(&out.stderr);
    let built = err.lines().filter(|l| l.starts_with("layer ")).count();
    assert_eq!(
        built, 3,
        "2 arch layers + 1 shared layer, built once:\n{err}"
    );
    for reg in [&a, &b] {
        let puts = reg
            .log()
            .lines()
            .filter(|l| l.contains("\"PUT /v2/") && l.contains("/blobs/uploads/"))
            .count();
        assert!(
            puts >= 3,
            "each registry received the layers:\n{}",
            reg.log()
        );
    }

    // Outputs: the digest once, one ref per repository, every destination in the metadata.
    assert_eq!(
        fs::read_to_string(ws.path().join("digest")).unwrap(),
        format!("{da}\n")
    );
    assert_eq!(
        fs::read_to_string(ws.path().join("refs")).unwrap(),
        format!("{}\n{}\n", lines[0], lines[1])
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(ws.path().join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["image"], lines[0]);
    let dests = meta["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 2);
    assert_eq!(dests[1]["image"], lines[1]);
    assert_eq!(dests[1]["tags"], serde_json::json!(["v1"]));
    assert_eq!(
        fs::read_to_string(ws.path().join("gh")).unwrap(),
        format!(
            "digest={da}\nimage={}\nimages={},{}\n",
            lines[0], lines[0], lines[1]
        )
    );

    // --username belongs to one registry: refused when the repositories are on two.
    let mut cmd = imgbuild();
    cmd.current_dir(ws.path())
        .args(["push", "-f", "spec.toml", "--context", "ctx"])
        .args(["--repo", &repo_a, "--repo", &repo_b])
        .args(["--username", "u", "--password-stdin"]);
    let out = run_with_stdin(&mut cmd, b"secret\n");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--username"));
}
