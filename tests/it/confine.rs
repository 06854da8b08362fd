//! What a spec may read and write: `src` stays inside the build context (the spec's project
//! directory, or `--context`), and `dest` paths that runtimes would mangle are refused, end
//! to end through the binary, with the system tar and skopeo checking what is written.

use crate::harness::*;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Nothing of an image in the layout `dir`: a refused build removes the output directory it
/// created (no empty `blobs/` that looks like a layout).
fn no_image_in(dir: &Path) -> bool {
    !dir.exists()
}

/// ```text
/// ws/secret.txt                    outside every context ("the runner's credentials")
/// ws/outside/secret.txt
/// ws/proj/app/hello.txt            the project (the root for build-specs/)
/// ws/proj/inner -> app             a directory symlink that stays inside
/// ws/proj/link-in.txt -> app/hello.txt
/// ws/proj/link-out.txt -> ../secret.txt
/// ws/proj/abs-out.txt -> /ws/secret.txt (absolute)
/// ws/proj/dir-out -> ../outside    a directory symlink that leads out
/// ws/proj/tree/passwd -> /etc/passwd   inside a walked directory: kept as a symlink
/// ws/proj/build-specs/             the specs of the cases
/// ws/proj/specs/                   a spec outside build-specs/: its own directory is the root
/// ```
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    fs::write(w.join("secret.txt"), "secret\n").unwrap();
    fs::create_dir_all(w.join("outside")).unwrap();
    fs::write(w.join("outside/secret.txt"), "secret\n").unwrap();
    let p = w.join("proj");
    for d in ["app", "tree", "build-specs", "specs"] {
        fs::create_dir_all(p.join(d)).unwrap();
    }
    fs::write(p.join("app/hello.txt"), "hello\n").unwrap();
    fs::write(p.join("tree/a.txt"), "a\n").unwrap();
    symlink("/etc/passwd", p.join("tree/passwd")).unwrap();
    symlink("app", p.join("inner")).unwrap();
    symlink("app/hello.txt", p.join("link-in.txt")).unwrap();
    symlink("../secret.txt", p.join("link-out.txt")).unwrap();
    symlink(w.join("secret.txt"), p.join("abs-out.txt")).unwrap();
    symlink("../outside", p.join("dir-out")).unwrap();
    ws
}

/// Write a one-file spec at `proj/<spec>` and build it from `proj` with `extra` flags.
fn build(ws: &Path, spec: &str, src: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let proj = ws.join("proj");
    fs::write(
        proj.join(spec),
        format!(
            "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [\n  {{ src = \"{src}\", dest = \"/x\" }},\n]\n"
        ),
    )
    .unwrap();
    let out_dir = proj.join("out");
    let _ = fs::remove_dir_all(&out_dir);
    let mut cmd = imgbuild();
    cmd.current_dir(&proj)
        .args(["build", "--no-cache", "-f", spec, "-o", "out"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `/x` of the one image in `proj/out`, extracted with the system tar.
fn extracted(ws: &Path, what: &str) -> PathBuf {
    let layout = ws.join("proj/out");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let top: serde_json::Value = serde_json::from_slice(&read_blob(
        &layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let manifest = top["manifests"][0]["digest"].as_str().unwrap();
    let root = ws.join(format!("root-{}", what.replace([' ', '/'], "-")));
    unpack_layers(&layout, manifest, &root);
    root.join("x")
}

/// (what, spec, src, flags, environment, expected)
type Case<'a> = (
    &'a str,
    &'a str,
    String,
    &'a [&'a str],
    &'a [(&'a str, &'a str)],
    Want,
);

enum Want {
    /// Built; `/x` (or `/x/<file>` for a directory) holds this text.
    Reads(&'static str, &'static str),
    /// Built; `/x/passwd` is a symlink to /etc/passwd, not its content.
    KeepsSymlink,
    /// Refused, exit 3, one line with the spec's line:col, the src, this and the flag.
    Refused(&'static str),
}

#[test]
fn src_is_confined_to_the_context_unless_allowed() {
    let ws = workspace();
    let w = ws.path();
    let abs_secret = w.join("secret.txt").display().to_string();
    let allow = ["--allow-outside-context"];
    let none: [&str; 0] = [];
    let env_allow = [("IMGBUILD_ALLOW_OUTSIDE_CONTEXT", "true")];
    #[rustfmt::skip]
    let cases: Vec<Case<'_>> = vec![
        ("absolute", "build-specs/a.toml", abs_secret.clone(), &none, &[], Want::Refused("is an absolute path")),
        (".. out of the project", "build-specs/a.toml", "../../secret.txt".into(), &none, &[], Want::Refused("leads out of it with \"..\"")),
        ("symlink to an outside file", "build-specs/a.toml", "../link-out.txt".into(), &none, &[], Want::Refused("resolves (through a symlink) to")),
        ("absolute symlink out", "build-specs/a.toml", "../abs-out.txt".into(), &none, &[], Want::Refused("resolves (through a symlink) to")),
        ("through a directory symlink out", "build-specs/a.toml", "../dir-out/secret.txt".into(), &none, &[], Want::Refused("resolves (through a symlink) to")),
        ("a directory symlink out", "build-specs/a.toml", "../dir-out".into(), &none, &[], Want::Refused("resolves (through a symlink) to")),
        ("missing and outside", "build-specs/a.toml", "../../nope.txt".into(), &none, &[], Want::Refused("leads out of it")),
        ("spec outside build-specs/: own directory", "specs/a.toml", "../app/hello.txt".into(), &none, &[], Want::Refused("leads out of it with \"..\"")),
        ("plain file in the project", "build-specs/a.toml", "../app/hello.txt".into(), &none, &[], Want::Reads("", "hello\n")),
        ("directory symlink inside", "build-specs/a.toml", "../inner/hello.txt".into(), &none, &[], Want::Reads("", "hello\n")),
        ("file symlink inside", "build-specs/a.toml", "../link-in.txt".into(), &none, &[], Want::Reads("", "hello\n")),
        ("directory symlink inside, as a directory", "build-specs/a.toml", "../inner".into(), &none, &[], Want::Reads("hello.txt", "hello\n")),
        ("walked directory keeps its symlinks", "build-specs/a.toml", "../tree".into(), &none, &[], Want::KeepsSymlink),
        ("absolute, allowed", "build-specs/a.toml", abs_secret.clone(), &allow, &[], Want::Reads("", "secret\n")),
        (".., allowed", "build-specs/a.toml", "../../secret.txt".into(), &allow, &[], Want::Reads("", "secret\n")),
        ("symlink out, allowed", "build-specs/a.toml", "../link-out.txt".into(), &allow, &[], Want::Reads("", "secret\n")),
        ("directory symlink out, allowed", "build-specs/a.toml", "../dir-out".into(), &allow, &[], Want::Reads("secret.txt", "secret\n")),
        ("spec outside build-specs/, allowed by env", "specs/a.toml", "../app/hello.txt".into(), &none, &env_allow, Want::Reads("", "hello\n")),
    ];
    for (what, spec, src, extra, env, want) in cases {
        let out = build(w, spec, &src, extra, env);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        match want {
            Want::Refused(why) => {
                assert_eq!(out.status.code(), Some(3), "{what}: {err}");
                assert_eq!(
                    err.trim_end().lines().count(),
                    1,
                    "{what}: not one line: {err}"
                );
                for part in [
                    &format!("{spec}:4:"),
                    ": src ",
                    why,
                    "--allow-outside-context",
                    &src,
                ] {
                    assert!(err.contains(part), "{what}: {part:?} not in {err}");
                }
                assert!(!err.contains("secret\n"), "{what}: {err}");
                assert!(
                    no_image_in(&w.join("proj/out")),
                    "{what}: a layout was written"
                );
            }
            Want::Reads(file, text) => {
                assert!(out.status.success(), "{what}: {err}");
                let x = extracted(w, what);
                let x = if file.is_empty() { x } else { x.join(file) };
                assert_eq!(fs::read_to_string(&x).unwrap(), text, "{what}");
            }
            Want::KeepsSymlink => {
                assert!(out.status.success(), "{what}: {err}");
                let x = extracted(w, what);
                assert_eq!(
                    fs::read_link(x.join("passwd")).unwrap(),
                    Path::new("/etc/passwd")
                );
                assert_eq!(fs::read_to_string(x.join("a.txt")).unwrap(), "a\n");
            }
        }
    }
}

/// `--context DIR` and `--context FILE.tar`: the context is the root, wherever the spec is.
#[test]
fn src_is_confined_to_a_directory_or_tar_context() {
    let ws = workspace();
    let w = ws.path();
    let tar = w.join("ctx.tar");
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .args(["-C", "proj", "app"])
            .current_dir(w),
    );
    let ctx_dir = w.join("proj/app").display().to_string();
    let ctx_tar = tar.display().to_string();
    let abs_secret = w.join("secret.txt").display().to_string();
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, String, bool, Option<&str>)> = vec![
        ("dir: inside", &ctx_dir, "hello.txt".into(), false, None),
        ("dir: .. out", &ctx_dir, "../link-in.txt".into(), false, Some("leads out of it")),
        ("dir: absolute", &ctx_dir, abs_secret.clone(), false, Some("is an absolute path")),
        ("dir: .. out, allowed", &ctx_dir, "../link-in.txt".into(), true, None),
        ("tar: inside", &ctx_tar, "app/hello.txt".into(), false, None),
        ("tar: .. out", &ctx_tar, "../secret.txt".into(), false, Some("leads out of it")),
        ("tar: absolute", &ctx_tar, abs_secret.clone(), false, Some("is an absolute path")),
        ("tar: absolute, allowed", &ctx_tar, abs_secret.clone(), true, None),
    ];
    for (what, ctx, src, allowed, refused) in cases {
        let mut extra = vec!["--context", ctx];
        if allowed {
            extra.push("--allow-outside-context");
        }
        let out = build(w, "specs/c.toml", &src, &extra, &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        match refused {
            Some(why) => {
                assert_eq!(out.status.code(), Some(3), "{what}: {err}");
                assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
                assert!(
                    err.contains(why) && err.contains("specs/c.toml:4:"),
                    "{what}: {err}"
                );
                assert!(
                    no_image_in(&w.join("proj/out")),
                    "{what}: a layout was written"
                );
            }
            None => {
                assert!(out.status.success(), "{what}: {err}");
                let text = fs::read_to_string(extracted(w, what)).unwrap();
                assert!(text == "hello\n" || text == "secret\n", "{what}: {text:?}");
            }
        }
    }
}

/// A spec with one layer of `files` (TOML inline tables) in `dir/build-specs/<name>.toml`.
fn write_spec(dir: &Path, name: &str, files: &[String]) -> String {
    let rel = format!("build-specs/{name}.toml");
    fs::create_dir_all(dir.join("build-specs")).unwrap();
    fs::write(
        dir.join(&rel),
        format!(
            "platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n[[layer]]\nfiles = [\n{}\n]\n",
            files.join(",\n")
        ),
    )
    .unwrap();
    rel
}

/// `dest` components of 256 bytes, paths over 4,094 bytes and `.wh.` names are refused by
/// `build` and `push` with one line and nothing written or pushed: exit 2 when the spec's
/// own `dest` is the problem (a bad dest, as the exit-code table says), 3 when the name
/// comes from a directory being copied (the input).
#[test]
fn paths_runtimes_would_mangle_are_refused_end_to_end() {
    let reg = Registry::start();
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    fs::write(w.join("f.txt"), "f\n").unwrap();
    // Directories whose contents make bad names below an otherwise good dest.
    fs::create_dir_all(w.join("wh")).unwrap();
    fs::write(w.join("wh/.wh.passwd"), "x\n").unwrap();
    fs::create_dir_all(w.join("longname")).unwrap();
    fs::write(w.join("longname").join("n".repeat(255)), "x\n").unwrap();
    let comp = "c".repeat(200);
    let deep_dest = format!("/{}", vec![comp.as_str(); 20].join("/")); // 4,020 bytes
    let long = |n: usize| format!("/a/{}", "n".repeat(n));
    let too_deep = format!("/{}", vec![comp.as_str(); 21].join("/")); // 4,221 bytes
    #[rustfmt::skip]
    let cases: Vec<(&str, String, i32, &str)> = vec![
        ("dest component of 256 bytes", format!("{{ src = \"../f.txt\", dest = \"{}\" }}", long(256)), 2, "has a component of 256 bytes"),
        ("dest over 4,094 bytes", format!("{{ src = \"../f.txt\", dest = \"{too_deep}\" }}"), 2, "is 4220 bytes long"),
        ("dest .wh. name", "{ src = \"../f.txt\", dest = \"/etc/.wh.passwd\" }".into(), 2, "reserve for whiteouts"),
        ("copied .wh. name", "{ src = \"../wh\", dest = \"/etc\" }".into(), 3, "reserve for whiteouts"),
        ("copied name of 255 bytes (the longest allowed)", "{ src = \"../longname\", dest = \"/x\" }".into(), 0, ""),
        ("copied path over 4,094 bytes", format!("{{ src = \"../longname\", dest = \"{deep_dest}\" }}"), 3, "bytes long; extracting it fails over 4094"),
    ];
    for (i, (what, file, code, want)) in cases.into_iter().enumerate() {
        let spec = write_spec(w, &format!("bad{i}"), &[file]);
        if code == 0 {
            // A 255-byte name is the longest allowed: built.
            run_ok(
                imgbuild()
                    .current_dir(w)
                    .args(["build", "-q", "-f", &spec, "-o", "ok"]),
            );
            continue;
        }
        for cmd in ["build", "push"] {
            let repo = format!("{}/bad{i}", reg.addr);
            let mut c = imgbuild();
            c.current_dir(w).args([cmd, "--no-cache", "-f", &spec]);
            if cmd == "build" {
                c.args(["-o", "out"]);
            } else {
                c.args(["--repo", &repo]);
            }
            let out = c.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(code), "{what} ({cmd}): {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{what} ({cmd}): {err}");
            assert!(err.contains(want), "{what} ({cmd}): {err}");
            assert!(err.contains(&format!("{spec}:")), "{what} ({cmd}): {err}");
            assert!(out.stdout.is_empty(), "{what} ({cmd})");
            assert!(no_image_in(&w.join("out")), "{what}: a layout was written");
            assert!(
                !reg.storage()
                    .join(format!("docker/registry/v2/repositories/bad{i}"))
                    .exists(),
                "{what}: something was pushed"
            );
        }
    }
}

/// A 300-byte path (components under 255) and a 200-byte symlink target need GNU long-name
/// entries in the tar: written deterministically (the same digest twice), extracted intact
/// by the system tar, and pushed to a registry that skopeo copies back, verifying digests.
#[test]
fn long_but_legal_paths_are_written_and_extracted_intact() {
    let reg = Registry::start();
    let ws = tempfile::tempdir().unwrap();
    let w = ws.path();
    let (a, b) = ("a".repeat(120), "b".repeat(120));
    let name = format!("{}.txt", "c".repeat(50));
    let dest = format!("/opt/{a}/{b}/{name}"); // 301 bytes
    assert!(dest.len() > 300);
    fs::write(w.join("f.txt"), "long path\n").unwrap();
    fs::create_dir_all(w.join("links")).unwrap();
    let target = format!("/opt/{a}/{}", "t".repeat(70)); // 196 bytes
    symlink(&target, w.join("links").join("l".repeat(150))).unwrap();
    let spec = write_spec(
        w,
        "long",
        &[
            format!("{{ src = \"../f.txt\", dest = \"{dest}\" }}"),
            "{ src = \"../links\", dest = \"/links\" }".into(),
        ],
    );
    let build = |out: &str| {
        let o = run_ok(imgbuild().current_dir(w).args([
            "build",
            "--no-cache",
            "-q",
            "-f",
            &spec,
            "-o",
            out,
        ]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let digest = build("out1");
    assert_eq!(
        build("out2"),
        digest,
        "the same long paths give the same image"
    );
    let pushed = run_ok(imgbuild().current_dir(w).args([
        "push",
        "--no-cache",
        "-q",
        "-f",
        &spec,
        "--repo",
        &format!("{}/long", reg.addr),
    ]));
    assert!(
        String::from_utf8_lossy(&pushed.stdout)
            .trim()
            .ends_with(&digest)
    );
    // skopeo pulls it back verifying every digest; the system tar extracts the layer.
    let pulled = w.join("pulled");
    pull_oci(&reg, "long:v1", &pulled, "v1");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(pulled.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let top: serde_json::Value = serde_json::from_slice(&read_blob(&pulled, &digest)).unwrap();
    let manifest = top["manifests"][0]["digest"].as_str().unwrap();
    let root = w.join("root");
    unpack_layers(&pulled, manifest, &root);
    assert_eq!(
        fs::read_to_string(root.join(dest.trim_start_matches('/'))).unwrap(),
        "long path\n"
    );
    assert_eq!(
        fs::read_link(root.join("links").join("l".repeat(150))).unwrap(),
        Path::new(&target)
    );
    let (images, layers) = verify_digests_with_standard_tools(&w.join("out1"), &digest);
    assert_eq!((images, layers), (1, 1));
}

/// An `oci:` base named by the spec is read and pushed like a `src`: the same confinement
/// applies (the path as written, then through symlinks); `--base` on the command line and
/// `--allow-outside-context` are the user's own choice.
#[test]
fn oci_base_layouts_are_confined_too() {
    let ws = workspace();
    let w = ws.path();
    let proj = w.join("proj");
    // Two small layouts to use as bases: one outside the project, one inside.
    for (dir, at) in [
        (w.join("outside-layout"), w),
        (proj.join("layouts/in"), &proj),
    ] {
        fs::write(
            at.join("base.toml"),
            "platforms = [\"linux/amd64\"]\n[[layer]]\nfiles = [ { src = \"base.toml\", dest = \"/base.toml\" } ]\n",
        )
        .unwrap();
        run_ok(
            imgbuild()
                .current_dir(at)
                .args(["build", "-q", "--no-cache", "-f", "base.toml", "-o"])
                .arg(&dir),
        );
    }
    symlink("../outside-layout", proj.join("layout-link")).unwrap();
    let abs_outside = format!("--base=oci:{}", w.join("outside-layout").display());
    #[rustfmt::skip]
    let cases: &[(&str, &str, &[&str], Option<&str>)] = &[
        ("outside with ..", "oci:../../outside-layout", &[], Some("leads out of it with \"..\"")),
        ("absolute", &format!("oci:{}", w.join("outside-layout").display()), &[], Some("is an absolute path")),
        ("a symlink inside leading out", "oci:../layout-link", &[], Some("resolves (through a symlink) to")),
        ("inside the project", "oci:../layouts/in", &[], None),
        ("outside, allowed", "oci:../../outside-layout", &["--allow-outside-context"], None),
        ("--base on the command line", "scratch", &[&abs_outside], None),
    ];
    for (what, base, extra, refused) in cases {
        fs::write(
            proj.join("build-specs/b.toml"),
            format!(
                "platforms = [\"linux/amd64\"]\nbase = \"{base}\"\n[[layer]]\nfiles = [ {{ src = \"../app/hello.txt\", dest = \"/x\" }} ]\n"
            ),
        )
        .unwrap();
        let _ = fs::remove_dir_all(proj.join("out"));
        let out = imgbuild()
            .current_dir(&proj)
            .args([
                "build",
                "--no-cache",
                "-f",
                "build-specs/b.toml",
                "-o",
                "out",
            ])
            .args(*extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        match refused {
            Some(why) => {
                assert_eq!(out.status.code(), Some(3), "{what}: {err}");
                assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
                for part in [
                    "build-specs/b.toml: base ",
                    base,
                    why,
                    "outside the build context",
                    "--allow-outside-context",
                ] {
                    assert!(err.contains(part), "{what}: {part:?} not in {err}");
                }
                assert!(
                    no_image_in(&proj.join("out")),
                    "{what}: a layout was written"
                );
            }
            None => {
                assert!(out.status.success(), "{what}: {err}");
                let index = fs::read_to_string(proj.join("out/index.json")).unwrap();
                assert!(index.contains("manifests"), "{what}: {index}");
            }
        }
    }
}
