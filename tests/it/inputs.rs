//! Bad and unusual input for `imgbuild push`, the cases tests/it/build.rs
//! does not cover: `--jobs 0`, an over-long label, an unreadable file, a non-UTF-8 file name,
//! a 0-byte artifact, and a file over 4 GiB. Errors are one line with the right exit code and
//! nothing reaches the registry; the allowed cases give correct layers.

use crate::harness::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A workspace with `tree/` (files for the cases) and `build-specs/`; world-readable so that a test
/// can run imgbuild as an unprivileged user.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    for d in ["tree", "build-specs"] {
        fs::create_dir_all(ws.path().join(d)).unwrap();
    }
    fs::write(ws.path().join("tree/hello.txt"), "hello\n").unwrap();
    ws
}

fn write_spec(ws: &Path, name: &str, body: &str) -> String {
    let rel = format!("build-specs/{name}.toml");
    fs::write(
        ws.join(&rel),
        format!("platforms = [\"linux/amd64\"]\ntags = [\"v1\"]\n{body}"),
    )
    .unwrap();
    rel
}

fn layer(src: &str, dest: &str) -> String {
    format!("[[layer]]\nfiles = [{{ src = \"../tree/{src}\", dest = \"{dest}\" }}]\n")
}

/// `prog args...` with the hermetic environment [`imgbuild`] gives (and this PATH), to run
/// imgbuild under a wrapper such as setpriv or sh.
fn wrapped<S: AsRef<std::ffi::OsStr>>(prog: S, args: &[S]) -> Command {
    let mut cmd = Command::new(prog);
    cmd.args(args).env_clear();
    for (k, v) in imgbuild().get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// `imgbuild push -f SPEC --repo REG/inputs <extra>`, run by the `wrap` command if not empty.
fn push(ws: &Path, reg: &Registry, spec: &str, extra: &[&str], wrap: &[&str]) -> Output {
    let mut cmd = match wrap.split_first() {
        Some((prog, args)) => {
            let mut args = args.to_vec();
            args.push(env!("CARGO_BIN_EXE_imgbuild"));
            wrapped(*prog, &args)
        }
        None => imgbuild(),
    };
    cmd.current_dir(ws)
        .args(["push", "-f", spec, "--repo"])
        .arg(format!("{}/inputs", reg.addr))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn bad_push_inputs_fail_with_one_line_the_right_exit_code_and_push_nothing() {
    let reg = Registry::start();
    let ws = workspace();
    let big = "x".repeat(70_000);
    let big_label = write_spec(
        ws.path(),
        "big-label",
        &format!(
            "[config]\nlabels = {{ big = \"{big}\" }}\n{}",
            layer("hello.txt", "/h")
        ),
    );
    let hello = write_spec(ws.path(), "hello", &layer("hello.txt", "/h"));

    // Unreadable: as root, permissions do not stop reads, so run as `nobody` (setpriv,
    // util-linux); without setpriv the case is skipped with a message.
    let locked = ws.path().join("tree/locked");
    fs::write(&locked, "secret").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let unreadable = write_spec(ws.path(), "unreadable", &layer("locked", "/l"));
    let root = is_root();
    let setpriv = find_program("setpriv");
    let wrap: Vec<&str> = match (&root, &setpriv) {
        (true, Some(p)) => vec![
            p.to_str().unwrap(),
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        _ => vec![],
    };
    let mut unreadable_case = true;
    if root && setpriv.is_none() {
        skip_missing(
            "setpriv",
            "running as root without setpriv: the unreadable-file case is not tested",
        );
        unreadable_case = false;
    }
    if root {
        // nobody must reach the workspace (tempdirs are 0700) but not the locked file.
        fs::set_permissions(ws.path(), fs::Permissions::from_mode(0o755)).unwrap();
    }

    // (what, spec, flags, wrapper, exit code, fragment of the one error line)
    type Case<'a> = (&'a str, &'a str, Vec<&'a str>, Vec<&'a str>, i32, String);
    let mut cases: Vec<Case> = vec![
        (
            "--jobs 0",
            &hello,
            vec!["--jobs", "0"],
            vec![],
            2,
            "invalid value '0' for '--jobs <JOBS>'".into(),
        ),
        (
            "label over 64 KiB",
            &big_label,
            vec![],
            vec![],
            2,
            "build-specs/big-label.toml:4:".into(),
        ),
        (
            "bad --retries",
            &hello,
            vec!["--retries", "many"],
            vec![],
            2,
            "--retries <N>".into(),
        ),
    ];
    if unreadable_case {
        cases.push((
            "unreadable file",
            &unreadable,
            // `nobody` cannot write the root-owned shared cache (its blob leases need a
            // lock file): that would be a warning line of its own, not what is tested here.
            vec!["--no-cache"],
            wrap.clone(),
            3,
            "cannot read build-specs/../tree/locked: Permission denied".into(),
        ));
    }
    let mut failures = Vec::new();
    for (what, spec, flags, wrap, code, want) in cases {
        let out = push(ws.path(), &reg, spec, &flags, &wrap);
        let err = text(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        let ok = out.status.code() == Some(code)
            && lines.len() == 1
            && err.lines().count() == 1
            && lines[0].contains(&want)
            && out.stdout.is_empty();
        if !ok {
            failures.push(format!(
                "{what}: exit {:?}, stderr {err:?}, want exit {code} and {want:?}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // The label error names the field and the limit; the permission error says "check".
    let out = push(ws.path(), &reg, &big_label, &[], &[]);
    assert!(
        text(&out.stderr)
            .contains("config.labels.big: value is 70000 bytes, over the 64 KiB limit"),
        "{}",
        text(&out.stderr)
    );
    let log = reg.log();
    assert!(
        !log.contains("/v2/inputs/"),
        "something was sent to the registry: {log}"
    );
}

/// Are we root? (`id -u`: no libc call needed.)
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| text(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The one layer of the one platform of `reference` in `reg`, pulled with skopeo (which
/// verifies every digest), as `tar -tv` rows "mode owner size name".
fn pulled_layer_listing(reg: &Registry, reference: &str, ws: &Path) -> Vec<String> {
    let dir = ws.join("pulled");
    let _ = fs::remove_dir_all(&dir);
    pull_oci(reg, reference, &dir, "x");
    let top = top_index(&dir);
    // skopeo --all keeps the image index: descend to the platform manifest.
    let manifest_digest = top["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&read_blob(&dir, manifest_digest)).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    tar_listing(&blob_path(&dir, layer))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {} {}", f[0], f[1], f[2], f[5..].join(" "))
        })
        .collect()
}

#[test]
fn empty_files_and_non_utf8_names_are_pushed_as_they_are() {
    let reg = Registry::start();
    let ws = workspace();
    let dir = ws.path().join("tree/odd");
    fs::create_dir_all(&dir).unwrap();
    // A name that is not UTF-8 (Latin-1 "café"): kept byte for byte in the tar, no panic.
    fs::write(
        dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9")),
        "latin-1 name\n",
    )
    .unwrap();
    fs::write(dir.join("empty"), "").unwrap();
    let cases = [
        (
            "empty",
            layer("odd/empty", "/empty"),
            vec!["-rw-r--r-- 0/0 0 empty"],
        ),
        (
            "odd",
            layer("odd", "/odd"),
            vec![
                "drwxr-xr-x 0/0 0 odd",
                "-rw-r--r-- 0/0 13 odd/caf\\351",
                "-rw-r--r-- 0/0 0 odd/empty",
            ],
        ),
    ];
    for (name, body, want) in cases {
        let spec = write_spec(ws.path(), name, &body);
        let out = push(ws.path(), &reg, &spec, &["-q"], &[]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let digest = text(&out.stdout)
            .trim()
            .rsplit_once('@')
            .unwrap()
            .1
            .to_string();
        assert_eq!(
            pulled_layer_listing(&reg, &format!("inputs@{digest}"), ws.path()),
            want,
            "{name}"
        );
    }
}

/// A file over 4 GiB still fits ustar's 11-octal-digit size field (up to 8 GiB - 1), so the
/// interesting case is past 8 GiB: 8 GiB + 1 byte needs an extended size (layer.rs writes GNU
/// headers, whose base-256 size GNU tar, Go's archive/tar and containerd read). A sparse file
/// is cheap on disk, but gzip and sha256 still read 8 GiB of zeros.
#[test]
#[ignore = "reads and compresses 8 GiB of zeros: 85 s wall (41 s user + 25 s sys) on the 2-core dev machine; run by hand with --ignored"]
fn a_file_over_8_gib_gets_an_extended_size_header() {
    let ws = workspace();
    let big = ws.path().join("tree/big");
    let f = fs::File::create(&big).unwrap();
    f.set_len((8 << 30) + 1).unwrap();
    drop(f);
    let spec = write_spec(ws.path(), "big", &layer("big", "/big"));
    let out = run_ok(
        imgbuild()
            .current_dir(ws.path())
            .args(["build", "-q", "-f", &spec, "-o", "out"]),
    );
    let digest = text(&out.stdout).trim().to_string();
    let dir = ws.path().join("out");
    let index: serde_json::Value = serde_json::from_slice(&read_blob(&dir, &digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_blob(
        &dir,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let layer = blob_path(&dir, manifest["layers"][0]["digest"].as_str().unwrap());
    let listing = tar_listing(&layer);
    assert!(listing.contains(" 8589934593 "), "{listing}");
}

/// Every file and directory a build writes (layout, tarball, digest files) gets 0644/0755
/// narrowed by the umask: a umask of 000 does not make them world-writable, 077 keeps them
/// private.
#[test]
fn files_written_follow_the_umask_and_are_never_world_writable() {
    let ws = workspace();
    let spec = write_spec(ws.path(), "hello", &layer("hello.txt", "/h"));
    // (umask, mode of files, mode of directories)
    for (umask, file, dir) in [
        ("000", 0o644, 0o755),
        ("022", 0o644, 0o755),
        ("077", 0o600, 0o700),
    ] {
        let out = ws.path().join(format!("o{umask}"));
        let script = format!(
            "umask {umask}; exec \"$0\" build -q -f {spec} -o {o}/layout --tarball {o}/l.tar \
             --digest-file {o}/d.txt --metadata-file {o}/m.json",
            o = out.display()
        );
        run_ok(
            wrapped("sh", &["-c", &script, env!("CARGO_BIN_EXE_imgbuild")]).current_dir(ws.path()),
        );
        let mut seen = 0;
        for entry in walk(&out) {
            let meta = fs::symlink_metadata(&entry).unwrap();
            let want = if meta.is_dir() { dir } else { file };
            assert_eq!(
                meta.permissions().mode() & 0o777,
                want,
                "umask {umask}: {}",
                entry.display()
            );
            seen += 1;
        }
        assert!(seen >= 10, "{seen}");
    }
}

/// `dir` and everything under it.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if dir.is_dir() {
        for e in fs::read_dir(dir).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}
