//! The in-cluster build Job (`deploy/k8s/`) and the IAM templates (`deploy/iam/`).
//!
//! There is no Kubernetes cluster here. The manifests are checked with kubernetes-validate
//! (strict, offline OpenAPI schemas of current Kubernetes versions), and the Job's container
//! is run by the Docker Engine standing in for the kubelet: its image (imgbuild's image built
//! from the binary under test), args, env (ConfigMap references resolved), security context,
//! memory limit, tmpfs where the Job mounts emptyDirs, the ConfigMap volume, and the
//! termination-message file, all read from the manifest files. IRSA is played by what EKS
//! injects (AWS_ROLE_ARN + a web identity token file) against moto's STS; the S3 context
//! lives in moto's S3; the registry is the harness's docker-registry.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::ecr::Moto;
use crate::harness::{Registry, inspect_raw, moto_server_bin, repo_root, run_ok};
use crate::image::{docker_or_skip, imgbuild_image};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn k8s_dir() -> PathBuf {
    repo_root().join("deploy/k8s")
}

/// The venv `scripts/install-deps.sh test` put kubernetes-validate (and PyYAML, its
/// dependency) into.
fn kubeval_venv() -> PathBuf {
    let venv = std::env::var_os("IMGBUILD_TEST_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/imgbuild-test/k8s-venv")
        });
    assert!(
        venv.join("bin/kubernetes-validate").is_file(),
        "kubernetes-validate not installed in {}: run scripts/install-deps.sh test",
        venv.display()
    );
    venv
}

/// Every YAML document of `path`, as JSON (PyYAML's safe loader from the venv).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = run_ok(
        Command::new(kubeval_venv().join("bin/python"))
            .args([
                "-c",
                "import json, sys, yaml; \
                 print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
            ])
            .arg(path),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_doc(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

/// The resource files the kustomization lists (paths), checked against the directory: every
/// manifest in deploy/k8s is listed and every listed file exists.
fn kustomization_resources() -> Vec<PathBuf> {
    let kust = yaml_doc(&k8s_dir().join("kustomization.yaml"));
    let listed: Vec<PathBuf> = kust["resources"]
        .as_array()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| k8s_dir().join(r.as_str().unwrap()))
        .collect();
    let mut on_disk: Vec<PathBuf> = fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted, on_disk,
        "kustomization.yaml resources vs. files in deploy/k8s"
    );
    listed
}

/// The resource of `kind` among the kustomization's resources.
fn resource(kind: &str) -> Value {
    kustomization_resources()
        .iter()
        .flat_map(|p| yaml_docs(p))
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/k8s"))
}

fn kubernetes_validate(version: &str, files: &[PathBuf]) -> std::process::Output {
    Command::new(kubeval_venv().join("bin/kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", version])
        .args(files)
        .stdin(Stdio::null())
        .output()
        .expect("run kubernetes-validate")
}

/// Mebibytes of a Kubernetes memory quantity (`256Mi`, `1Gi`).
fn mebibytes(q: &str) -> u64 {
    if let Some(n) = q.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = q.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("memory quantity {q:?}: use Mi or Gi")
    }
}

#[test]
fn k8s_manifests_validate_and_lock_the_job_down() {
    let files = kustomization_resources();
    // The newest schemas kubernetes-validate ships and the oldest Kubernetes EKS supports
    // in standard support.
    for version in ["1.37.0", "1.33.0"] {
        let out = kubernetes_validate(version, &files);
        assert!(
            out.status.success(),
            "kubernetes-validate {version}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    // The validator does catch a misspelt field (strict mode), so the pass above means something.
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("job.yaml");
    let job_text = fs::read_to_string(k8s_dir().join("job.yaml")).unwrap();
    fs::write(
        &bad,
        job_text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )
    .unwrap();
    let out = kubernetes_validate("1.37.0", &[bad]);
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        text(&out.stdout)
    );

    let job = resource("Job");
    let pod = &job["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let checks: &[(&Value, &str, Value)] = &[
        (pod, "/securityContext/runAsNonRoot", true.into()),
        (pod, "/securityContext/runAsUser", 65532.into()),
        (
            pod,
            "/securityContext/seccompProfile/type",
            "RuntimeDefault".into(),
        ),
        (c, "/securityContext/runAsNonRoot", true.into()),
        (c, "/securityContext/runAsUser", 65532.into()),
        (c, "/securityContext/readOnlyRootFilesystem", true.into()),
        (c, "/securityContext/allowPrivilegeEscalation", false.into()),
        (
            c,
            "/securityContext/capabilities/drop",
            serde_json::json!(["ALL"]),
        ),
        (
            c,
            "/securityContext/seccompProfile/type",
            "RuntimeDefault".into(),
        ),
        (c, "/terminationMessagePath", "/dev/termination-log".into()),
        (pod, "/serviceAccountName", "imgbuild".into()),
    ];
    for (doc, pointer, want) in checks {
        assert_eq!(doc.pointer(pointer), Some(want), "Job container {pointer}");
    }
    for key in [
        "backoffLimit",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
    ] {
        assert!(
            job["spec"][key].as_u64().is_some_and(|n| n > 0),
            "Job spec.{key}"
        );
    }
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--digest-file=/dev/termination-log"),
        "{args:?}"
    );
    // Sized from the measured peaks (90 MiB with zstd): the limit leaves headroom, the
    // request is below the limit.
    let limit = mebibytes(c["resources"]["limits"]["memory"].as_str().unwrap());
    let request = mebibytes(c["resources"]["requests"]["memory"].as_str().unwrap());
    assert!(
        limit >= 2 * 90 && request >= 90 && request <= limit,
        "{limit} {request}"
    );
    // Only emptyDirs are writable, and they sit where the image's TMPDIR and IMGBUILD_CACHE are.
    let writable: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v.get("emptyDir").is_some())
        .map(|v| {
            let name = v["name"].as_str().unwrap();
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == name)
                .and_then(|m| m["mountPath"].as_str())
                .unwrap()
        })
        .collect();
    assert_eq!(writable, ["/tmp", "/cache"]);
    let spec = fs::read_to_string(repo_root().join("build-specs/imgbuild.toml")).unwrap();
    assert!(spec.contains("TMPDIR = \"/tmp\"") && spec.contains("IMGBUILD_CACHE = \"/cache\""));

    let sa = resource("ServiceAccount");
    assert!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|a| a.starts_with("arn:aws:iam::") && a.contains(":role/")),
        "{sa}"
    );
    // kustomize's `images:` override must name the image the Job uses, or it does nothing.
    let kust = yaml_doc(&k8s_dir().join("kustomization.yaml"));
    let image_name = c["image"].as_str().unwrap().split(':').next().unwrap();
    assert_eq!(kust["images"][0]["name"], image_name);
}

/// The placeholders the IAM templates may use (deploy/iam/README.md exports each).
const IAM_PLACEHOLDERS: &[(&str, &str)] = &[
    ("AWS_ACCOUNT_ID", "123456789012"),
    ("AWS_REGION", "eu-west-1"),
    ("ECR_REPOSITORY", "hello"),
    ("CONTEXT_BUCKET", "my-build-contexts"),
    ("CONTEXT_PREFIX", "hello/"),
    ("GITHUB_REPOSITORY", "OWNER/REPO"),
    (
        "EKS_OIDC_PROVIDER",
        "oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE",
    ),
    ("K8S_NAMESPACE", "builds"),
];

fn strings(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().map(|s| s.as_str().expect("a string")).collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

#[test]
fn iam_templates_are_valid_json_and_least_privilege() {
    let dir = repo_root().join("deploy/iam");
    let readme = fs::read_to_string(dir.join("README.md")).unwrap();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "ci-policy.json",
            "job-policy.json",
            "trust-github-oidc.json",
            "trust-irsa.json",
            "trust-pod-identity.json"
        ]
    );
    let placeholder = regex::Regex::new(r"\$\{([A-Za-z0-9_]*)\}").unwrap();
    for (path, name) in files.iter().zip(&names) {
        let raw = fs::read_to_string(path).unwrap();
        let doc: Value =
            serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
        assert!(
            readme.contains(name.as_str()),
            "deploy/iam/README.md does not describe {name}"
        );
        // Every placeholder is one the README exports; rendered, it is still JSON.
        let mut rendered = raw.clone();
        for cap in placeholder.captures_iter(&raw) {
            let var = &cap[1];
            let value = IAM_PLACEHOLDERS
                .iter()
                .find(|(k, _)| *k == var)
                .unwrap_or_else(|| panic!("{name}: unknown placeholder ${{{var}}}"))
                .1;
            assert!(
                readme.contains(&format!("{var}=")),
                "README does not export {var}"
            );
            rendered = rendered.replace(&cap[0], value);
        }
        let rendered: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(doc["Version"], "2012-10-17", "{name}");
        let statements = doc["Statement"].as_array().unwrap();
        assert!(!statements.is_empty(), "{name}");
        for st in rendered["Statement"].as_array().unwrap() {
            assert_eq!(st["Effect"], "Allow", "{name}: {st}");
            let sid = st["Sid"].as_str().unwrap_or_default();
            assert!(
                sid.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}: Sid {sid:?}"
            );
            let actions = strings(&st["Action"]);
            assert!(
                actions.iter().all(|a| !a.contains('*')),
                "{name}: wildcard action in {actions:?}"
            );
            if name.starts_with("trust-") {
                assert!(st.get("Principal").is_some(), "{name}: {st}");
                continue;
            }
            for r in strings(&st["Resource"]) {
                if r == "*" {
                    // The one action without resource-level permissions.
                    assert_eq!(
                        actions,
                        ["ecr:GetAuthorizationToken"],
                        "{name}: * for {actions:?}"
                    );
                } else {
                    assert!(
                        r.starts_with("arn:aws:ecr:eu-west-1:123456789012:repository/hello")
                            || r == "arn:aws:s3:::my-build-contexts/hello/*",
                        "{name}: resource {r}"
                    );
                }
            }
        }
    }
    // The Job may read the context prefix (and nothing else of S3), and push.
    let job: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("job-policy.json")).unwrap()).unwrap();
    let actions: Vec<&str> = job["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| strings(&s["Action"]))
        .collect();
    for want in [
        "s3:GetObject",
        "ecr:GetAuthorizationToken",
        "ecr:PutImage",
        "ecr:CompleteLayerUpload",
    ] {
        assert!(actions.contains(&want), "job-policy.json lacks {want}");
    }
    assert!(
        actions.iter().filter(|a| a.starts_with("s3:")).count() == 1,
        "{actions:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The Job's container under the Docker Engine
// ---------------------------------------------------------------------------------------------

/// Put `file` into moto's S3 as `s3://bucket/key` (boto3 from moto's own venv).
fn s3_put(moto: &Moto, bucket: &str, key: &str, file: &Path, region: &str) {
    let python = moto_server_bin().unwrap().with_file_name("python");
    run_ok(
        Command::new(python)
            .args([
                "-c",
                "import sys, boto3\n\
                 url, region, bucket, key, path = sys.argv[1:]\n\
                 s3 = boto3.client('s3', endpoint_url=url, region_name=region,\n\
                                   aws_access_key_id='testing', aws_secret_access_key='testing')\n\
                 s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={'LocationConstraint': region})\n\
                 s3.upload_file(path, bucket, key)\n",
            ])
            .args([&moto.url, region, bucket, key])
            .arg(file),
    );
}

/// Kubernetes' `$(VAR)` expansion in args (`$$` escapes a `$`); unknown names stay as written.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some((name, r)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(n, _)| env.contains_key(*n))
        {
            out.push_str(&env[name]);
            rest = r;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn job_container_runs_under_docker_like_the_kubelet() {
    if !docker_or_skip("the Job's container was not run") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let reg = Registry::start();
    let moto = Moto::start();
    let image = imgbuild_image(&reg, w);

    let job = resource("Job");
    let mut config_map = resource("ConfigMap");
    let sa = resource("ServiceAccount");
    let pod = &job["spec"]["template"]["spec"];
    let c = &pod["containers"][0];

    // What this test substitutes for the cluster: the ConfigMap's values point at the local
    // registry and moto's S3 (the Job's own args and env are used as written).
    let data = config_map["data"].as_object_mut().unwrap();
    let region = data["aws-region"].as_str().unwrap().to_owned();
    let repo = format!("localhost:{}/hello-job", reg.port);
    data.insert("repository".into(), repo.clone().into());
    data.insert(
        "context".into(),
        "s3://build-contexts/hello/context.tar.gz".into(),
    );

    // The context tarball CI would upload: the spec's sources at the tarball's root.
    let ctx = w.join("context");
    for arch in ["amd64", "arm64"] {
        fs::create_dir_all(ctx.join("dist").join(arch)).unwrap();
        fs::copy(
            crate::harness::fixtures()
                .join("dist")
                .join(arch)
                .join("hello"),
            ctx.join("dist").join(arch).join("hello"),
        )
        .unwrap();
    }
    let tarball = w.join("context.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&ctx)
            .arg("dist"),
    );
    s3_put(
        &moto,
        "build-contexts",
        "hello/context.tar.gz",
        &tarball,
        &region,
    );

    let mut cmd = Command::new("docker");
    cmd.args(["run", "--rm", "--network", "host"]);

    // Security context: pod-level values, overridden by the container's.
    let sc = |key: &str| -> Value {
        let v = &c["securityContext"][key];
        if v.is_null() {
            pod["securityContext"][key].clone()
        } else {
            v.clone()
        }
    };
    let (uid, gid) = (sc("runAsUser"), sc("runAsGroup"));
    assert!(sc("runAsNonRoot") == true && uid.as_u64() != Some(0));
    cmd.args(["--user", &format!("{uid}:{gid}")]);
    if sc("readOnlyRootFilesystem") == true {
        cmd.arg("--read-only");
    }
    for cap in c["securityContext"]["capabilities"]["drop"]
        .as_array()
        .into_iter()
        .flatten()
    {
        cmd.args(["--cap-drop", cap.as_str().unwrap()]);
    }
    if sc("allowPrivilegeEscalation") == false {
        cmd.args(["--security-opt", "no-new-privileges"]);
    }
    // RuntimeDefault is the Docker Engine's default seccomp profile: nothing to add.
    assert_eq!(sc("seccompProfile")["type"], "RuntimeDefault");
    if let Some(limit) = c["resources"]["limits"]["memory"].as_str() {
        cmd.args(["--memory", &format!("{}m", mebibytes(limit))]);
    }

    // Volumes: emptyDir -> tmpfs owned by fsGroup's group and the user (the kubelet makes
    // emptyDirs 0777; this Docker Engine ignores tmpfs `mode=`); configMap -> read-only files.
    let fs_group = pod["securityContext"]["fsGroup"].as_u64().unwrap_or(0);
    for m in c["volumeMounts"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let path = m["mountPath"].as_str().unwrap();
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name} not in the pod"));
        if vol.get("emptyDir").is_some() {
            cmd.args(["--tmpfs", &format!("{path}:rw,uid={uid},gid={fs_group}")]);
        } else if let Some(cm) = vol.get("configMap") {
            assert_eq!(cm["name"], config_map["metadata"]["name"]);
            let dir = w.join("volumes").join(name);
            fs::create_dir_all(&dir).unwrap();
            for item in cm["items"].as_array().unwrap() {
                let key = item["key"].as_str().unwrap();
                let content = config_map["data"][key].as_str().unwrap();
                fs::write(dir.join(item["path"].as_str().unwrap()), content).unwrap();
            }
            cmd.arg("-v").arg(format!("{}:{path}:ro", dir.display()));
        } else {
            panic!("volume {name}: only emptyDir and configMap are played here");
        }
    }

    // The termination message file (the kubelet creates it 0666 and mounts it).
    let term = w.join("termination-log");
    fs::write(&term, "").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&term, fs::Permissions::from_mode(0o666)).unwrap();
    }
    let term_path = c["terminationMessagePath"]
        .as_str()
        .unwrap_or("/dev/termination-log");
    cmd.arg("-v").arg(format!("{}:{term_path}", term.display()));

    // IRSA, as EKS's webhook injects it: the role from the ServiceAccount's annotation and a
    // projected token file (moto's STS accepts any token).
    let token = w.join("token");
    fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let token_path = "/var/run/secrets/eks.amazonaws.com/serviceaccount/token";
    cmd.arg("-v")
        .arg(format!("{}:{token_path}:ro", token.display()));
    let role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        .as_str()
        .unwrap();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("AWS_ROLE_ARN".into(), role.into());
    env.insert("AWS_WEB_IDENTITY_TOKEN_FILE".into(), token_path.into());
    env.insert("AWS_STS_REGIONAL_ENDPOINTS".into(), "regional".into());
    // The network is the test's: every AWS call goes to moto.
    env.insert("AWS_ENDPOINT_URL".into(), moto.url.clone());

    // The Job's env, ConfigMap references resolved.
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else {
            let r = &e["valueFrom"]["configMapKeyRef"];
            assert_eq!(r["name"], config_map["metadata"]["name"], "{e}");
            config_map["data"][r["key"].as_str().unwrap()]
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap has no {}", r["key"]))
                .to_owned()
        };
        env.insert(name, value);
    }
    for (k, v) in &env {
        cmd.args(["-e", &format!("{k}={v}")]);
    }
    cmd.arg(&image.reference);
    for a in c["args"].as_array().unwrap() {
        cmd.arg(expand(a.as_str().unwrap(), &env));
    }
    moto.take_calls(); // the S3 upload's

    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    // The termination message is the digest, and skopeo finds that digest under the spec's tag.
    let message = fs::read_to_string(&term).unwrap();
    let digest = message.trim();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{message:?}"
    );
    assert_eq!(text(&out.stdout).trim(), format!("{repo}@{digest}"));
    let raw = inspect_raw(&reg, "hello-job:latest");
    use sha2::Digest as _;
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&raw))),
        digest
    );
    let index: Value = serde_json::from_slice(&raw).unwrap();
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!("{}/{}", m["platform"]["os"], m["platform"]["architecture"]).replace('"', "")
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);

    // The credentials came through the web identity exchange with the annotated role.
    let calls = moto.take_calls();
    assert!(
        calls
            .iter()
            .any(|c| c.operation == "AssumeRoleWithWebIdentity"
                && c.body.contains(role.rsplit('/').next().unwrap())),
        "no AssumeRoleWithWebIdentity for {role}: {:?}",
        calls.iter().map(|c| &c.operation).collect::<Vec<_>>()
    );
}
