//! Registry credentials from files and helpers (README "Credentials"): docker `config.json` (`auths`,
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

/// A credential file's JSON for the registry `server`.
type Config = fn(&str) -> serde_json::Value;

/// One precedence case: what each of the three files holds (None: no such file), helper
/// programs (name, password they answer with), the exit code, and for a failure the file
/// (relative to the case's home) the error must name.
struct Precedence {
    name: &'static str,
    registry_auth_file: Option<Config>,
    docker_config: Option<Config>,
    podman: Option<Config>,
    helpers: &'static [(&'static str, &'static str)],
    code: i32,
    names: &'static str,
}

const WRONG: &str = "wrong-password-7781";

fn good(server: &str) -> serde_json::Value {
    auths(server, USER, PASSWORD)
}

fn bad(server: &str) -> serde_json::Value {
    auths(server, USER, WRONG)
}

fn other(_: &str) -> serde_json::Value {
    auths("other.example.com", USER, PASSWORD)
}

#[test]
fn credential_files_and_entries_are_used_in_the_documented_order() {
    let reg = Registry::start_htpasswd(USER, PASSWORD);
    let ws = workspace(1_000_000_000);
    let expected = amd64_digest(ws.path());
    let cases = [
        Precedence {
            name: "REGISTRY_AUTH_FILE before DOCKER_CONFIG and podman's file",
            registry_auth_file: Some(good),
            docker_config: Some(bad),
            podman: Some(bad),
            helpers: &[],
            code: 0,
            names: "",
        },
        Precedence {
            name: "the first file with an entry wins, even a wrong one",
            registry_auth_file: Some(bad),
            docker_config: Some(good),
            podman: Some(good),
            helpers: &[],
            code: 4,
            names: "auth.json",
        },
        Precedence {
            name: "a file without an entry for the registry is passed over",
            registry_auth_file: Some(other),
            docker_config: Some(good),
            podman: Some(bad),
            helpers: &[],
            code: 0,
            names: "",
        },
        Precedence {
            name: "DOCKER_CONFIG before podman's file",
            registry_auth_file: None,
            docker_config: Some(bad),
            podman: Some(good),
            helpers: &[],
            code: 4,
            names: "docker/config.json",
        },
        Precedence {
            name: "podman's file last",
            registry_auth_file: None,
            docker_config: Some(other),
            podman: Some(good),
            helpers: &[],
            code: 0,
            names: "",
        },
        Precedence {
            name: "credHelpers before auths",
            registry_auth_file: None,
            docker_config: Some(|s| {
                let mut v = bad(s);
                v["credHelpers"] = serde_json::json!({ s: "imgtest" });
                v
            }),
            podman: None,
            helpers: &[("imgtest", PASSWORD)],
            code: 0,
            names: "",
        },
        Precedence {
            name: "credHelpers before auths, even a wrong one",
            registry_auth_file: None,
            docker_config: Some(|s| {
                let mut v = good(s);
                v["credHelpers"] = serde_json::json!({ s: "imgtest" });
                v
            }),
            podman: None,
            helpers: &[("imgtest", WRONG)],
            code: 4,
            names: "docker/config.json",
        },
        Precedence {
            name: "auths before credsStore",
            registry_auth_file: None,
            docker_config: Some(|s| {
                let mut v = good(s);
                v["credsStore"] = serde_json::json!("imgstore");
                v
            }),
            podman: None,
            helpers: &[("imgstore", WRONG)],
            code: 0,
            names: "",
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let what = case.name;
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let bin = h.join("bin");
        fs::create_dir_all(&bin).unwrap();
        for (helper, secret) in case.helpers {
            write_helper(&bin, helper, &reg.addr, USER, secret);
        }
        let repo = format!("order{i}");
        let mut cmd = push_amd64(ws.path(), &format!("{}/{repo}", reg.addr));
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        cmd.env("PATH", path);
        let files = [
            (case.registry_auth_file, "auth.json", "REGISTRY_AUTH_FILE"),
            (case.docker_config, "docker/config.json", "DOCKER_CONFIG"),
            (case.podman, "run/containers/auth.json", "XDG_RUNTIME_DIR"),
        ];
        for (config, file, var) in files {
            let Some(config) = config else { continue };
            let p = h.join(file);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, config(&reg.addr).to_string()).unwrap();
            let value = match var {
                "REGISTRY_AUTH_FILE" => p.clone(),
                "DOCKER_CONFIG" => h.join("docker"),
                _ => h.join("run"),
            };
            cmd.env(var, value);
        }
        let out = cmd.output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(case.code), "{what}:\n{err}");
        if case.code == 0 {
            assert_eq!(pushed_digest(&out.stdout), expected, "{what}");
            assert_serves(&reg, &format!("{repo}:v1"), &expected);
        } else {
            let last = err.lines().last().unwrap_or_default();
            let file = h.join(case.names).display().to_string();
            assert!(
                last.starts_with("error: authentication to") && last.contains(&file),
                "{what}: the error must name {file}: {last}"
            );
        }
        if what == "auths before credsStore" {
            assert!(
                !h.join("bin/imgstore.calls").exists(),
                "{what}: credsStore was asked although auths matched"
            );
        }
        assert_no_secrets(&out, &[PASSWORD.into(), WRONG.into()], what);
    }
}

#[test]
fn a_failing_credential_helper_is_exit_4_and_its_output_stays_hidden() {
    let reg = Registry::start_htpasswd(USER, PASSWORD);
    let ws = workspace(1_000_000_000);
    let home = tempfile::tempdir().unwrap();
    let bin = home.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    // A helper that fails, printing something secret-looking on both streams (a real helper
    // may print a token or a keychain dump in its error).
    let helper = bin.join("docker-credential-leaky");
    fs::write(
        &helper,
        "#!/bin/sh\n\
         echo 'stdout-of-helper LEAKY-SECRET-5150'\n\
         echo 'stderr-of-helper LEAKY-SECRET-5150' >&2\n\
         exit 3\n",
    )
    .unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        home.path().join("config.json"),
        serde_json::json!({ "credHelpers": { reg.addr.clone(): "leaky" } }).to_string(),
    )
    .unwrap();
    let out = push_amd64(ws.path(), &format!("{}/leaky", reg.addr))
        .env("DOCKER_CONFIG", home.path())
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: authentication to")
            && last.contains("credential helper")
            && last.contains(&home.path().join("config.json").display().to_string()),
        "{last}"
    );
    let all = format!("{}{err}", text(&out.stdout));
    assert!(
        !all.contains("LEAKY-SECRET-5150"),
        "helper output shown:\n{all}"
    );
    assert!(!all.contains("-of-helper"), "helper output shown:\n{all}");
}
