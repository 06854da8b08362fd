//! Registry credentials from files and helpers (issue 3): docker `config.json` (`auths`,
//! `credHelpers`, `credsStore` running a real `docker-credential-<name>` program written by the
//! test), `REGISTRY_AUTH_FILE` and podman's `$XDG_RUNTIME_DIR/containers/auth.json`, pushed to
//! Debian's docker-registry with htpasswd; plus the ECR registry falling back to the docker
//! config when there are no AWS credentials.

use crate::build::workspace;
use crate::ecr::{
    ECR_HOST, MOTO_PASSWORD, amd64_digest, assert_no_secrets, ecr_registry, push_amd64,
    push_to_ecr_stand_in,
};
use crate::harness::*;
use base64::Engine as _;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};

const USER: &str = "ci-bot";
const PASSWORD: &str = "pw-from-a-file-0123";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Write `docker-credential-<name>` into `bin`: answers `get` for `server` with `user` and
/// `secret`, says "credentials not found" for anything else, and logs each server asked for.
fn write_helper(bin: &Path, name: &str, server: &str, user: &str, secret: &str) {
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = get ] || exit 1\n\
         read -r server\n\
         echo \"$server\" >> \"$(dirname \"$0\")/{name}.calls\"\n\
         if [ \"$server\" = \"{server}\" ]; then\n\
           printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}\\n' \"$server\"\n\
         else\n\
           echo 'credentials not found in native keychain'\n\
           exit 1\n\
         fi\n"
    );
    let path = bin.join(format!("docker-credential-{name}"));
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn auths(server: &str, user: &str, password: &str) -> serde_json::Value {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({ "auths": { server: { "auth": auth } } })
}

/// Where a case puts its credentials.
enum Place {
    /// `$DOCKER_CONFIG/config.json`
    DockerConfig,
    /// `$REGISTRY_AUTH_FILE`
    RegistryAuthFile,
    /// `$XDG_RUNTIME_DIR/containers/auth.json`
    PodmanRuntime,
    /// `--username` + `--password-stdin` with this password, and the file in `$DOCKER_CONFIG`
    /// too (the flags must win).
    Stdin(&'static str),
}

struct Case {
    name: &'static str,
    place: Place,
    /// The file's JSON, given the registry's `host:port`.
    config: fn(&str) -> serde_json::Value,
    /// Helper programs to install: (name, password they answer with).
    helpers: &'static [(&'static str, &'static str)],
    /// Expected exit code.
    code: i32,
    /// Text the last stderr line must hold (failures only).
    message: &'static str,
}

fn push_with(ws: &Path, reg: &Registry, repo: &str, case: &Case, home: &Path) -> Output {
    let bin = home.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for (helper, secret) in case.helpers {
        write_helper(&bin, helper, &reg.addr, USER, secret);
    }
    let config = (case.config)(&reg.addr).to_string();
    let mut cmd = push_amd64(ws, &format!("{}/{repo}", reg.addr));
    match case.place {
        Place::DockerConfig | Place::Stdin(_) => {
            fs::create_dir_all(home.join("docker")).unwrap();
            fs::write(home.join("docker/config.json"), &config).unwrap();
            cmd.env("DOCKER_CONFIG", home.join("docker"));
        }
        Place::RegistryAuthFile => {
            fs::write(home.join("auth.json"), &config).unwrap();
            cmd.env("REGISTRY_AUTH_FILE", home.join("auth.json"));
        }
        Place::PodmanRuntime => {
            fs::create_dir_all(home.join("run/containers")).unwrap();
            fs::write(home.join("run/containers/auth.json"), &config).unwrap();
            cmd.env("XDG_RUNTIME_DIR", home.join("run"));
        }
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    let Place::Stdin(password) = case.place else {
        return cmd.output().expect("run imgbuild");
    };
    let mut child = cmd
        .args(["--username", USER, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run imgbuild");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().expect("wait for imgbuild")
}

#[test]
fn credentials_from_docker_config_helpers_and_podman_auth_files() {
    let reg = Registry::start_htpasswd(USER, PASSWORD);
    let ws = workspace(1_000_000_000);
    let expected = amd64_digest(ws.path());
    let cases = [
        Case {
            name: "auths basic",
            place: Place::DockerConfig,
            config: |server| auths(server, USER, PASSWORD),
            helpers: &[],
            code: 0,
            message: "",
        },
        Case {
            name: "credHelpers",
            place: Place::DockerConfig,
            config: |server| serde_json::json!({ "credHelpers": { server: "imgtest" } }),
            helpers: &[("imgtest", PASSWORD)],
            code: 0,
            message: "",
        },
        Case {
            name: "credsStore",
            place: Place::DockerConfig,
            config: |_| serde_json::json!({ "credsStore": "imgstore" }),
            helpers: &[("imgstore", PASSWORD)],
            code: 0,
            message: "",
        },
        Case {
            name: "credHelpers wins over credsStore",
            place: Place::DockerConfig,
            config: |server| serde_json::json!({ "credsStore": "imgstore", "credHelpers": { server: "imgtest" } }),
            helpers: &[("imgtest", PASSWORD), ("imgstore", "wrong-store-password")],
            code: 0,
            message: "",
        },
        Case {
            name: "REGISTRY_AUTH_FILE",
            place: Place::RegistryAuthFile,
            config: |server| auths(server, USER, PASSWORD),
            helpers: &[],
            code: 0,
            message: "",
        },
        Case {
            name: "podman XDG_RUNTIME_DIR/containers/auth.json",
            place: Place::PodmanRuntime,
            config: |server| auths(server, USER, PASSWORD),
            helpers: &[],
            code: 0,
            message: "",
        },
        Case {
            name: "--password-stdin wins over the docker config",
            place: Place::Stdin(PASSWORD),
            config: |server| auths(server, USER, "wrong-password-in-auths"),
            helpers: &[],
            code: 0,
            message: "",
        },
        Case {
            name: "wrong --password-stdin",
            place: Place::Stdin("wrong-password-on-stdin"),
            config: |server| auths(server, USER, PASSWORD),
            helpers: &[],
            code: 4,
            message: "--username",
        },
        Case {
            name: "wrong password in auths",
            place: Place::DockerConfig,
            config: |server| auths(server, USER, "wrong-password-in-auths"),
            helpers: &[],
            code: 4,
            message: "config.json",
        },
        Case {
            name: "helper not installed",
            place: Place::DockerConfig,
            config: |server| serde_json::json!({ "credHelpers": { server: "not-installed" } }),
            helpers: &[],
            code: 4,
            message: "could not be run",
        },
        Case {
            name: "no entry for this registry",
            place: Place::DockerConfig,
            config: |_| auths("other.example.com", USER, PASSWORD),
            helpers: &[],
            code: 4,
            message: "no credentials",
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let home = tempfile::tempdir().unwrap();
        let repo = format!("creds{i}");
        let out = push_with(ws.path(), &reg, &repo, case, home.path());
        let what = case.name;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(case.code), "{what}:\n{err}");
        if case.code == 0 {
            assert_eq!(pushed_digest(&out.stdout), expected, "{what}");
            assert_serves(&reg, &format!("{repo}:v1"), &expected);
        } else {
            let last = err.lines().last().unwrap_or_default();
            assert!(
                last.starts_with("error: authentication to")
                    && last.contains(&reg.addr)
                    && last.contains(case.message),
                "{what}: {last}"
            );
        }
        // Each helper that was configured was asked about this registry.
        for (helper, _) in case.helpers {
            let calls = fs::read_to_string(home.path().join(format!("bin/{helper}.calls")));
            if what.contains("wins") && *helper == "imgstore" {
                assert!(
                    calls.is_err(),
                    "{what}: credsStore asked although credHelpers matched"
                );
                continue;
            }
            assert_eq!(
                calls.unwrap_or_default().trim(),
                reg.addr,
                "{what}: {helper}"
            );
        }
        assert_no_secrets(
            &out,
            &[
                PASSWORD.into(),
                "wrong-password-in-auths".into(),
                "wrong-store-password".into(),
                "wrong-password-on-stdin".into(),
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")),
            ],
            what,
        );
    }
}

#[test]
fn ecr_without_aws_credentials_uses_the_docker_config() {
    // e.g. CI ran `aws ecr get-login-password | docker login ...` earlier.
    let reg = ecr_registry(MOTO_PASSWORD);
    let ws = workspace(1_000_000_000);
    let home = tempfile::tempdir().unwrap();
    let server = format!("{ECR_HOST}:{}", reg.port);
    fs::write(
        home.path().join("config.json"),
        auths(&server, "AWS", MOTO_PASSWORD).to_string(),
    )
    .unwrap();
    let out = push_to_ecr_stand_in(ws.path(), &reg, "hello")
        .env("DOCKER_CONFIG", home.path())
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = amd64_digest(ws.path());
    assert_eq!(pushed_digest(&out.stdout), expected);
    assert_serves(&reg, "hello:v1", &expected);
    assert_no_secrets(&out, &[MOTO_PASSWORD.into()], "ECR via docker config");
}
