//! `imgbuild build`: the OCI layout it writes, reproducibility (golden digest), outputs, the
//! architecture check, and every bad input's one-line error and exit code.

use crate::harness::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The index digest of `build-specs/hello.toml` over the committed fixtures with
/// SOURCE_DATE_EPOCH unset. If this changes, every user's image digest changes: only update
/// it for a deliberate format change, and say so in the commit.
pub const GOLDEN_HELLO: &str =
    "sha256:0dcf5bc8da6de6f9ea6e8d5f15cacbd9794490dfd5b6dd09c4e16b0a49051dfb";

/// A copy of `build-specs/` and `fixtures/dist/` in a fresh directory, every mtime set to
/// `mtime`, so builds can be compared across places and times.
pub fn workspace(mtime: i64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(
        repo_root().join("build-specs"),
        dir.path().join("build-specs"),
    );
    copy_dir(fixtures().join("dist"), dir.path().join("fixtures/dist"));
    set_mtime_recursive(dir.path(), mtime);
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Build `spec` (relative to `ws`) into `ws/out`, return (stdout digest, output dir).
fn build(ws: &Path, spec: &str, extra: &[&str]) -> (String, PathBuf) {
    let out_dir = ws.join("out");
    let out = run_ok(
        imgbuild()
            .current_dir(ws)
            .args(["build", "-f", spec, "--output"])
            .arg(&out_dir)
            .args(extra),
    );
    (stdout(&out).trim().to_string(), out_dir)
}

#[test]
fn golden_digest_is_independent_of_place_time_and_order() {
    let a = workspace(1_000_000_000);
    let b = workspace(2_000_000_000);
    // Change directory order too: recreate one directory's entries in reverse order.
    let conf = b.path().join("fixtures/dist/share/conf");
    let mut names: Vec<_> = fs::read_dir(&conf)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let tmp = b.path().join("conf-tmp");
    fs::rename(&conf, &tmp).unwrap();
    fs::create_dir(&conf).unwrap();
    for n in names.iter().rev() {
        fs::rename(
            tmp.join(n.file_name().unwrap()),
            conf.join(n.file_name().unwrap()),
        )
        .unwrap();
    }
    let (da, out_a) = build(a.path(), "build-specs/hello.toml", &[]);
    let (db, _) = build(b.path(), "build-specs/hello.toml", &[]);
    assert_eq!(da, db, "same inputs, different digests");
    assert_eq!(da, GOLDEN_HELLO, "golden digest changed");
    // And the layout's own index.json points at it.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out_a.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], GOLDEN_HELLO);
}

#[test]
fn source_date_epoch_sets_times_and_changes_the_digest() {
    let ws = workspace(1_500_000_000);
    let out_dir = ws.path().join("out");
    let out = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "-f", "build-specs/hello.toml", "-q", "--output"])
            .arg(&out_dir),
    );
    let digest = stdout(&out).trim().to_string();
    assert_ne!(digest, GOLDEN_HELLO);
    let index: serde_json::Value = serde_json::from_slice(&read_blob(&out_dir, &digest)).unwrap();
    assert_eq!(
        index["annotations"]["org.opencontainers.image.created"],
        "2023-11-14T22:13:20Z"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &out_dir,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&read_blob(
        &out_dir,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    let listing = tar_listing(&blob_path(
        &out_dir,
        manifest["layers"][0]["digest"].as_str().unwrap(),
    ));
    assert!(listing.contains("2023-11-14 22:13"), "{listing}");
}

#[test]
fn layout_is_accepted_by_skopeo_and_has_the_expected_image() {
    let ws = workspace(1_000_000_000);
    let tarball = ws.path().join("hello.tar");
    let (digest, out_dir) = build(
        ws.path(),
        "build-specs/hello.toml",
        &["--tarball", tarball.to_str().unwrap()],
    );
    let layout = format!("oci:{}", out_dir.display());

    // skopeo reads the index and picks the host's platform from it.
    let inspect: serde_json::Value =
        serde_json::from_str(&skopeo_ok(&["inspect", &layout])).unwrap();
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
    let raw = skopeo_ok(&["inspect", "--raw", &format!("{layout}:latest")]);
    assert_eq!(
        raw.as_bytes(),
        read_blob(&out_dir, &digest),
        "raw index bytes differ"
    );

    let index: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                s = format!("{s}/{v}");
            }
            s
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);

    // Digests and diff_ids recomputed by gzip and sha256sum, for all three platforms.
    assert_eq!(
        verify_digests_with_standard_tools(&out_dir, &digest),
        (3, 6),
        "every platform's two layers checked"
    );

    // Per platform: config fields, the shared layer is one blob.
    let mut second_layers = Vec::new();
    for (m, (arch, machine)) in index["manifests"].as_array().unwrap().iter().zip([
        ("amd64", "X86-64"),
        ("arm64", "AArch64"),
        ("arm", "ARM"),
    ]) {
        let mdigest = m["digest"].as_str().unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&read_blob(&out_dir, mdigest)).unwrap();
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        let config: serde_json::Value = serde_json::from_slice(&read_blob(
            &out_dir,
            manifest["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap();
        assert_eq!(config["architecture"], arch);
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/hello");
        assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        for l in manifest["layers"].as_array().unwrap() {
            assert_eq!(
                l["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
        }
        second_layers.push(
            manifest["layers"][1]["digest"]
                .as_str()
                .unwrap()
                .to_string(),
        );

        let root = ws.path().join(format!("rootfs-{arch}"));
        unpack_layers(&out_dir, mdigest, &root);
        let bin = root.join("usr/local/bin/hello");
        let readelf = run_ok(std::process::Command::new("readelf").arg("-h").arg(&bin));
        assert!(
            stdout(&readelf).contains(machine),
            "{arch}: {}",
            stdout(&readelf)
        );
        let listing = tar_listing(&blob_path(
            &out_dir,
            manifest["layers"][0]["digest"].as_str().unwrap(),
        ));
        assert_eq!(
            listing
                .lines()
                .map(|l| format!(
                    "{} {} {}",
                    &l[..10],
                    l.split_whitespace().nth(1).unwrap(),
                    l.split_whitespace().last().unwrap()
                ))
                .collect::<Vec<_>>(),
            [
                "drwxr-xr-x 0/0 usr",
                "drwxr-xr-x 0/0 usr/local",
                "drwxr-xr-x 0/0 usr/local/bin",
                "-rwxr-xr-x 0/0 usr/local/bin/hello",
            ],
            "{listing}"
        );
    }
    assert!(
        second_layers.iter().all(|d| d == &second_layers[0]),
        "shared layer differs: {second_layers:?}"
    );

    // The amd64 program runs from the unpacked image.
    let ran = run_ok(&mut std::process::Command::new(
        ws.path().join("rootfs-amd64/usr/local/bin/hello"),
    ));
    assert_eq!(stdout(&ran), "hello from imgbuild (x86_64)\n");
    // The arm64 one under qemu, where installed.
    match find_program("qemu-aarch64-static") {
        Some(q) => {
            let ran = run_ok(
                std::process::Command::new(q)
                    .arg(ws.path().join("rootfs-arm64/usr/local/bin/hello")),
            );
            assert_eq!(stdout(&ran), "hello from imgbuild (aarch64)\n");
        }
        None => skip_missing(
            "qemu",
            "qemu-aarch64-static not installed: arm64 binary not run",
        ),
    }

    // The tarball is the same layout, as skopeo's oci-archive transport reads it.
    let from_tar = skopeo_ok(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}", tarball.display()),
    ]);
    assert_eq!(from_tar, raw);
    let list = run_ok(std::process::Command::new("tar").arg("-tf").arg(&tarball));
    let names = stdout(&list);
    assert!(
        names.starts_with("oci-layout\nindex.json\nblobs\nblobs/sha256\n"),
        "{names}"
    );
    // index + 3 manifests + 3 configs + 3 arch layers + 1 shared layer
    assert_eq!(
        names
            .lines()
            .filter(|l| l.starts_with("blobs/sha256/") && l.len() > 20)
            .count(),
        11
    );
}

#[test]
fn digest_outputs_are_written() {
    let ws = workspace(1_000_000_000);
    let gh = ws.path().join("github_output");
    fs::write(&gh, "earlier=step\n").unwrap();
    let out = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .env("GITHUB_OUTPUT", &gh)
            .args([
                "build",
                "-f",
                "build-specs/hello.toml",
                "--output",
                "out",
                "--repo",
                "127.0.0.1:5000/hello",
                "--digest-file",
                "d/digest",
                "--metadata-file",
                "meta.json",
                "--platform",
                "linux/amd64,linux/arm64",
            ]),
    );
    let digest = stdout(&out).trim().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert_eq!(
        fs::read_to_string(ws.path().join("d/digest")).unwrap(),
        format!("{digest}\n")
    );
    // Nothing was pushed: no image= (REPO@DIGEST would not resolve); the layout instead.
    assert_eq!(
        fs::read_to_string(&gh).unwrap(),
        format!("earlier=step\ndigest={digest}\nlayout=out\n")
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(ws.path().join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["digest"], digest.as_str());
    let manifests = meta["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "--platform overrides the spec's three");
    for m in manifests {
        let d = m["digest"].as_str().unwrap();
        assert_eq!(
            m["size"].as_u64().unwrap(),
            read_blob(&ws.path().join("out"), d).len() as u64
        );
    }
}

#[test]
fn github_annotations_and_flags_are_recorded() {
    let ws = workspace(1_000_000_000);
    let out = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .env("GITHUB_SERVER_URL", "https://github.com")
            .env("GITHUB_REPOSITORY", "acme/hello")
            .env("GITHUB_SHA", "0123456789abcdef")
            .args([
                "build",
                "-f",
                "build-specs/hello.toml",
                "-o",
                "out",
                "--annotation",
                "team=infra",
            ]),
    );
    let digest = stdout(&out).trim().to_string();
    let index: serde_json::Value =
        serde_json::from_slice(&read_blob(&ws.path().join("out"), &digest)).unwrap();
    let a = &index["annotations"];
    assert_eq!(
        a["org.opencontainers.image.source"],
        "https://github.com/acme/hello"
    );
    assert_eq!(a["org.opencontainers.image.revision"], "0123456789abcdef");
    assert_eq!(a["team"], "infra");
}

/// Write `spec` into a workspace's build-specs/ and build it; the spec sees fixtures at
/// `../fixtures/dist`.
fn build_spec(ws: &Path, spec: &str, extra: &[&str]) -> Output {
    let path = ws.join("build-specs/case.toml");
    fs::write(&path, spec).unwrap();
    imgbuild()
        .current_dir(ws)
        .args([
            "build",
            "-f",
            "build-specs/case.toml",
            "--output",
            "out-case",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// The `out-case` layout of a [`build_spec`] run holds one image for `platform` (architecture,
/// variant) in the index, manifest and config, whose one layer holds exactly `/hello` with the
/// bytes of `fixtures/dist/<fixture>`.
fn assert_single_image(
    ws: &Path,
    out: &Output,
    platform: (&str, Option<&str>),
    fixture: &str,
    what: &str,
) {
    let layout = ws.join("out-case");
    let digest = stdout(out).trim().to_string();
    let index: serde_json::Value = serde_json::from_slice(&read_blob(&layout, &digest)).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{what}: {index}");
    let p = &manifests[0]["platform"];
    let (arch, variant) = platform;
    assert_eq!(p["os"], "linux", "{what}: {p}");
    assert_eq!(p["architecture"], arch, "{what}: {p}");
    assert_eq!(p["variant"].as_str(), variant, "{what}: {p}");
    let mdigest = manifests[0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(&layout, mdigest)).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&read_blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["architecture"], arch, "{what}");
    assert_eq!(config["variant"].as_str(), variant, "{what}");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{what}");
    let listing = tar_listing(&blob_path(&layout, layers[0]["digest"].as_str().unwrap()));
    let names: Vec<&str> = listing
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(names, ["hello"], "{what}: {listing}");
    let root = ws.join(format!("root-{}", what.replace('/', "-")));
    unpack_layers(&layout, mdigest, &root);
    assert_eq!(
        fs::read(root.join("hello")).unwrap(),
        fs::read(fixtures().join("dist").join(fixture)).unwrap(),
        "{what}: /hello is not {fixture}"
    );
}

const HELLO_LAYER: &str =
    "[[layer]]\nfiles = [{ src = \"../fixtures/dist/{arch}/hello\", dest = \"/hello\" }]\n";

#[test]
fn architecture_check() {
    let ws = workspace(1_000_000_000);
    // An amd64 program in the arm64 image.
    let wrong = "platforms = [\"linux/arm64\"]\n[[layer]]\nfiles = [{ src = \"../fixtures/dist/amd64/hello\", dest = \"/hello\" }]\n";
    let out = build_spec(ws.path(), wrong, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("build-specs/case.toml:3:")
            && err.contains("fixtures/dist/amd64/hello is a 64-bit x86-64 ELF file but the image is for linux/arm64 (which needs AArch64)"),
        "{err}"
    );
    assert!(
        !ws.path().join("out-case/index.json").exists(),
        "nothing written on error"
    );
    // --no-arch-check lets it through: an arm64 image holding the amd64 program, as asked.
    let out = build_spec(ws.path(), wrong, &["--no-arch-check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_single_image(
        ws.path(),
        &out,
        ("arm64", None),
        "amd64/hello",
        "no-arch-check",
    );

    // arm/v7 gets the 32-bit ARM program.
    let out = build_spec(
        ws.path(),
        &format!("platforms = [\"linux/arm/v7\"]\n{HELLO_LAYER}"),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_single_image(ws.path(), &out, ("arm", Some("v7")), "arm/hello", "arm/v7");

    // A dynamically linked program on scratch: a warning, not an error.
    let dynamic = "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{ src = \"../fixtures/dist/amd64/hello-dynamic\", dest = \"/hello\" }]\n";
    let out = build_spec(ws.path(), dynamic, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is dynamically linked and needs /lib64/ld-linux-x86-64.so.2, which is not in the linux/amd64 image"),
        "{}",
        stderr(&out)
    );
    // Truncated ELF: an error naming the file.
    fs::write(ws.path().join("fixtures/dist/trunc"), b"\x7fELF\x02\x01").unwrap();
    let trunc = "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{ src = \"../fixtures/dist/trunc\", dest = \"/t\" }]\n";
    let out = build_spec(ws.path(), trunc, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("trunc: starts like an ELF file but is not a valid one"),
        "{}",
        stderr(&out)
    );
}

/// One bad input: (what, spec text, extra flags, env, exit code, fragment of the error).
type BadCase<'a> = (
    &'a str,
    String,
    Vec<&'a str>,
    Vec<(&'a str, &'a str)>,
    i32,
    &'a str,
);

#[test]
fn bad_inputs_fail_with_one_line_and_the_right_exit_code() {
    let ws = workspace(1_000_000_000);
    fs::create_dir_all(ws.path().join("fixtures/dist/only-amd64/amd64")).unwrap();
    fs::copy(
        fixtures().join("dist/amd64/hello"),
        ws.path().join("fixtures/dist/only-amd64/amd64/hello"),
    )
    .unwrap();
    std::os::unix::fs::symlink("nowhere", ws.path().join("fixtures/dist/dangling")).unwrap();
    let long_tag = "a".repeat(129);
    let two_files = "[[layer]]\nfiles = [\n  { src = \"../fixtures/dist/share/greeting.txt\", dest = \"/a\" },\n  { src = \"../fixtures/dist/share/conf/app.toml\", dest = \"/a\" },\n]\n";
    let cases: Vec<BadCase> = vec![
        ("malformed TOML", "platforms = [\"linux/amd64\"\n".into(), vec![], vec![], 2, "case.toml:1:27: unclosed array"),
        ("unknown key", format!("platfroms = []\n{HELLO_LAYER}"), vec![], vec![], 2, "case.toml:1:1: unknown field `platfroms`"),
        ("wrong type", format!("tags = \"v1\"\n{HELLO_LAYER}"), vec![], vec![], 2, "case.toml:1:8: invalid type"),
        (
            "missing src",
            "[[layer]]\nfiles = [{ src = \"../fixtures/dist/nope\", dest = \"/x\" }]\n".into(),
            vec![],
            vec![],
            3,
            "case.toml:2:18: src build-specs/../fixtures/dist/nope does not exist; build the artifact first",
        ),
        (
            "placeholder missing for one platform",
            "[[layer]]\nfiles = [{ src = \"../fixtures/dist/only-amd64/{arch}/hello\", dest = \"/x\" }]\n".into(),
            vec![],
            vec![],
            3,
            "only-amd64/arm64/hello does not exist (for linux/arm64)",
        ),
        (
            "dangling symlink",
            "[[layer]]\nfiles = [{ src = \"../fixtures/dist/dangling\", dest = \"/x\" }]\n".into(),
            vec![],
            vec![],
            3,
            "is a symlink to nowhere, which does not exist",
        ),
        ("relative dest", "[[layer]]\nfiles = [{ src = \"x\", dest = \"usr/bin/x\" }]\n".into(), vec![], vec![], 2, "case.toml:2:30: layer.files.dest: \"usr/bin/x\" is not absolute"),
        ("dest with ..", "[[layer]]\nfiles = [{ src = \"x\", dest = \"/a/../b\" }]\n".into(), vec![], vec![], 2, "contains \"..\""),
        ("duplicate dest", two_files.into(), vec![], vec![], 2, "case.toml:4:11: dest /a is already written by"),
        ("invalid platform in spec", format!("platforms = [\"linux/s390\"]\n{HELLO_LAYER}"), vec![], vec![], 2, "invalid platform \"linux/s390\""),
        ("invalid --platform", HELLO_LAYER.into(), vec!["--platform", "linux/amd64,darwin/arm64"], vec![], 2, "--platform: invalid platform \"darwin/arm64\""),
        ("empty platform list", format!("platforms = []\n{HELLO_LAYER}"), vec![], vec![], 2, "platforms: the list is empty"),
        ("bad repository", HELLO_LAYER.into(), vec!["--repo", "127.0.0.1:5000/Hello World"], vec![], 2, "--repo: invalid repository"),
        ("bad tag", HELLO_LAYER.into(), vec!["--tag", "v1:bad"], vec![], 2, "--tag: invalid tag \"v1:bad\""),
        ("tag too long", HELLO_LAYER.into(), vec!["--tag", &long_tag], vec![], 2, "--tag: invalid tag"),
        ("SOURCE_DATE_EPOCH not a number", HELLO_LAYER.into(), vec![], vec![("SOURCE_DATE_EPOCH", "yesterday")], 2, "SOURCE_DATE_EPOCH=\"yesterday\" is not a number"),
        ("bad base reference", format!("base = \"alpine:3@sha256:abc\"\n{HELLO_LAYER}"), vec![], vec![], 2, "case.toml:1:8: base: invalid repository \"alpine:3@sha256:abc\""),
        ("bad --base", HELLO_LAYER.into(), vec!["--base", "oci:"], vec![], 2, "--base: \"oci:\" names no directory"),
        ("missing layout base", format!("base = \"oci:../nowhere:v1\"\n{HELLO_LAYER}"), vec![], vec![], 3, "base oci:../nowhere:v1: cannot read build-specs/../nowhere/index.json: No such file or directory"),
    ];
    let mut failures = Vec::new();
    for (what, spec, flags, env, code, want) in cases {
        let path = ws.path().join("build-specs/case.toml");
        fs::write(&path, &spec).unwrap();
        let mut cmd = imgbuild();
        cmd.current_dir(ws.path())
            .args([
                "build",
                "-f",
                "build-specs/case.toml",
                "--output",
                "out-bad",
            ])
            .args(&flags);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        let ok = out.status.code() == Some(code)
            && lines.len() == 1
            && err.lines().count() == 1
            && lines[0].contains(want)
            && out.stdout.is_empty()
            && !ws.path().join("out-bad/index.json").exists();
        if !ok {
            failures.push(format!(
                "{what}: exit {:?}, stderr {err:?}, want exit {code} and {want:?}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn directories_symlinks_and_owners_in_layers() {
    let ws = workspace(1_000_000_000);
    let tree = ws.path().join("tree");
    fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    fs::write(tree.join("sub/deeper/f.txt"), "x").unwrap();
    fs::write(tree.join("run.sh"), "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(tree.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    // Links inside the tree are copied as links, even one pointing outside the context
    // and one making a loop; nothing is followed.
    std::os::unix::fs::symlink("/etc/passwd", tree.join("outside")).unwrap();
    std::os::unix::fs::symlink("..", tree.join("sub/loop")).unwrap();
    // An empty file is fine.
    fs::write(tree.join("empty"), "").unwrap();
    let spec = "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [{ src = \"../tree\", dest = \"/app\", uid = 1000, gid = 2000 }]\n";
    let out = build_spec(ws.path(), spec, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = stdout(&out).trim().to_string();
    let dir = ws.path().join("out-case");
    let index: serde_json::Value = serde_json::from_slice(&read_blob(&dir, &digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &dir,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let listing = tar_listing(&blob_path(
        &dir,
        manifest["layers"][0]["digest"].as_str().unwrap(),
    ));
    let rows: Vec<String> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {} {}", f[0], f[1], f[2], f[5..].join(" "))
        })
        .collect();
    assert_eq!(
        rows,
        [
            "drwxr-xr-x 1000/2000 0 app",
            "-rw-r--r-- 1000/2000 0 app/empty",
            "lrwxrwxrwx 1000/2000 0 app/outside -> /etc/passwd",
            "-rwxr-xr-x 1000/2000 10 app/run.sh",
            "drwxr-xr-x 1000/2000 0 app/sub",
            "drwxr-xr-x 1000/2000 0 app/sub/deeper",
            "-rw-r--r-- 1000/2000 1 app/sub/deeper/f.txt",
            "lrwxrwxrwx 1000/2000 0 app/sub/loop -> ..",
        ],
        "{listing}"
    );
}

#[test]
fn cli_output_snapshot() {
    let ws = workspace(1_000_000_000);
    let out = run_ok(imgbuild().current_dir(ws.path()).args([
        "build",
        "-f",
        "build-specs/hello.toml",
        "--output",
        "out",
        // The shared test cache would add ", cached" to lines other tests built first.
        "--no-cache",
    ]));
    // Layers are built in parallel: their lines come in any order.
    let mut lines: Vec<String> = stderr(&out).lines().map(String::from).collect();
    lines.sort();
    insta::assert_snapshot!("build_hello_stderr", lines.join("\n"));
    insta::assert_snapshot!("build_hello_stdout", stdout(&out));
}
