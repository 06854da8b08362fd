//! SBOM and provenance referrers (README "SBOM and provenance") against Debian's docker-registry 2.8, which has
//! no referrers API: the referrers tag schema path. skopeo reads what was pushed; PyPI
//! spdx-tools (`pyspdxtools`, installed by `scripts/install-deps.sh test`) validates every
//! SPDX document; the provenance is checked field by field.

use crate::build::workspace;
use crate::harness::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const SPDX: &str = "application/spdx+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";

/// `pyspdxtools` from the venv `scripts/install-deps.sh test` makes.
fn pyspdxtools() -> PathBuf {
    let venv = std::env::var_os("IMGBUILD_TEST_SPDX_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/imgbuild-test/spdx-venv"))
        })
        .expect("HOME");
    let p = venv.join("bin/pyspdxtools");
    assert!(
        p.is_file(),
        "{} missing: run scripts/install-deps.sh test",
        p.display()
    );
    p
}

fn push(ws: &Path, reg: &Registry, repo: &str, extra: &[&str]) -> String {
    let out = run_ok(
        imgbuild()
            .current_dir(ws)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["push", "-q", "-f", "build-specs/hello.toml", "--repo"])
            .arg(format!("{}/{repo}", reg.addr))
            .args(["--tag", "v1"])
            .args(extra),
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split_once('@').expect("REPO@DIGEST").1.to_string()
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes));
    })
}

/// A blob's bytes, straight from the registry (GET /v2/<repo>/blobs/<digest>).
fn get_blob(reg: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let (status, text) =
        http_get(&reg.addr, &format!("/v2/{repo}/blobs/{digest}"), None).expect("GET blob");
    assert_eq!(status, 200, "{text}");
    let body = text.split_once("\r\n\r\n").expect("headers end").1;
    body.as_bytes().to_vec()
}

fn platform_manifests(index: &Value) -> Vec<(String, String)> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut name = format!(
                "{}-{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                name = format!("{name}-{v}");
            }
            (name, m["digest"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn push_attaches_sbom_and_provenance_as_referrers_via_the_tag_schema() {
    let reg = Registry::start();
    let ws = workspace(1_700_000_000);
    let dir = ws.path();

    // Without attachments and with both: the same image index.
    let plain = push(
        dir,
        &reg,
        "plain",
        &["--sbom", "none", "--provenance", "none"],
    );
    let digest = push(dir, &reg, "att", &["--sbom-output", "docs"]);
    assert_eq!(plain, digest, "attachments must not change the index");
    let index_bytes = inspect_raw(&reg, "att:v1");
    let index = json(&index_bytes);
    assert_eq!(
        index["manifests"].as_array().unwrap().len(),
        3,
        "platforms only"
    );
    let plain_log = reg.log();
    assert!(
        !plain_log.contains("GET /v2/plain/manifests/sha256-"),
        "--sbom none --provenance none attaches nothing"
    );

    let mut tag_indexes = Vec::new();
    for (platform, manifest) in platform_manifests(&index) {
        let hex = manifest.strip_prefix("sha256:").unwrap();
        // The referrers tag schema: an index of this manifest's referrers, read by skopeo.
        let tag_index_bytes = inspect_raw(&reg, &format!("att:sha256-{hex}"));
        let tag_index = json(&tag_index_bytes);
        assert_eq!(
            tag_index["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let referrers = tag_index["manifests"].as_array().unwrap();
        let mut types: Vec<&str> = referrers
            .iter()
            .map(|r| r["artifactType"].as_str().unwrap())
            .collect();
        types.sort_unstable();
        assert_eq!(types, [SPDX, IN_TOTO], "{platform}");
        for r in referrers {
            let rd = r["digest"].as_str().unwrap();
            let m_bytes = inspect_raw(&reg, &format!("att@{rd}"));
            assert_eq!(m_bytes.len() as u64, r["size"].as_u64().unwrap());
            let m = json(&m_bytes);
            let kind = r["artifactType"].as_str().unwrap();
            assert_eq!(m["artifactType"], kind);
            assert_eq!(m["subject"]["digest"], manifest.as_str());
            assert_eq!(
                m["subject"]["mediaType"],
                "application/vnd.oci.image.manifest.v1+json"
            );
            assert_eq!(
                m["config"]["mediaType"],
                "application/vnd.oci.empty.v1+json"
            );
            assert_eq!(m["config"]["size"], 2);
            assert_eq!(
                get_blob(&reg, "att", m["config"]["digest"].as_str().unwrap()),
                b"{}"
            );
            let layers = m["layers"].as_array().unwrap();
            assert_eq!(layers.len(), 1);
            assert_eq!(layers[0]["mediaType"], kind);
            let doc = get_blob(&reg, "att", layers[0]["digest"].as_str().unwrap());
            let file = if kind == SPDX {
                format!("{platform}.spdx.json")
            } else {
                format!("{platform}.provenance.json")
            };
            let written = fs::read(dir.join("docs").join(&file)).unwrap();
            assert_eq!(
                doc, written,
                "--sbom-output {file} is the attached document"
            );
            if kind == SPDX {
                check_spdx(
                    &dir.join("docs").join(&file),
                    &json(&doc),
                    &manifest,
                    &platform,
                );
            } else {
                check_provenance(&json(&doc), &manifest, &reg, &platform);
            }
        }
        tag_indexes.push((hex.to_string(), tag_index_bytes));
    }

    // A second push of the same image: nothing new, still one referrer of each type.
    let before = reg.log().len();
    let again = push(dir, &reg, "att", &[]);
    assert_eq!(again, digest);
    let log = reg.log()[before..].to_string();
    for (hex, bytes) in &tag_indexes {
        assert_eq!(&inspect_raw(&reg, &format!("att:sha256-{hex}")), bytes);
        assert!(
            !log.contains(&format!("PUT /v2/att/manifests/sha256-{hex}")),
            "the referrers tag is rewritten only when it changes:\n{log}"
        );
    }
    assert!(
        !log.contains("\"POST /v2/att/blobs/uploads/"),
        "no document uploaded again:\n{log}"
    );
}

fn check_spdx(path: &Path, doc: &Value, manifest: &str, platform: &str) {
    let out = Command::new(pyspdxtools())
        .arg("-i")
        .arg(path)
        .output()
        .expect("run pyspdxtools");
    assert!(
        out.status.success(),
        "pyspdxtools -i {}: {}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
    assert!(
        doc["documentNamespace"]
            .as_str()
            .unwrap()
            .ends_with(&manifest.replace(':', "-")),
        "{platform}: namespace from the manifest digest"
    );
    let arch = platform.split('-').nth(1).unwrap();
    let files = doc["files"].as_array().unwrap();
    let names: Vec<&str> = files
        .iter()
        .map(|f| f["fileName"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "./usr/local/bin/hello");
    for want in ["./etc/hello/greeting.txt", "./etc/hello/conf/app.toml"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert!(names.iter().all(|n| n.starts_with("./")));
    // The hello binary's checksums are those of the fixture for this architecture.
    let hello = fs::read(fixtures().join("dist").join(arch).join("hello")).unwrap();
    let f = &files[0];
    let sums: Vec<(&str, &str)> = f["checksums"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["algorithm"].as_str().unwrap(),
                c["checksumValue"].as_str().unwrap(),
            )
        })
        .collect();
    let sha256 = sha256_hex(&hello);
    assert!(sums.contains(&("SHA256", sha256.as_str())), "{sums:?}");
    assert!(sums.iter().any(|(a, v)| *a == "SHA1" && v.len() == 40));
    assert_eq!(f["comment"], format!("size: {} bytes", hello.len()));
    let rels = doc["relationships"].as_array().unwrap();
    assert!(
        rels.iter()
            .any(|r| r["spdxElementId"] == "SPDXRef-DOCUMENT"
                && r["relationshipType"] == "DESCRIBES")
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn check_provenance(doc: &Value, manifest: &str, reg: &Registry, platform: &str) {
    // in-toto Statement v1.
    assert_eq!(doc["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(doc["predicateType"], "https://slsa.dev/provenance/v1");
    let subject = doc["subject"].as_array().unwrap();
    assert_eq!(subject.len(), 1);
    assert_eq!(subject[0]["name"], format!("{}/att", reg.addr));
    assert_eq!(
        subject[0]["digest"]["sha256"],
        manifest.strip_prefix("sha256:").unwrap()
    );
    // SLSA provenance v1: buildDefinition + runDetails.
    let def = &doc["predicate"]["buildDefinition"];
    assert!(def["buildType"].as_str().unwrap().contains(':'));
    let ext = &def["externalParameters"];
    assert_eq!(ext["spec"]["path"], "build-specs/hello.toml");
    let spec = fs::read(repo_root().join("build-specs/hello.toml")).unwrap();
    assert_eq!(ext["spec"]["digest"]["sha256"], sha256_hex(&spec));
    assert_eq!(
        ext["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64", "linux/arm/v7"])
    );
    assert_eq!(ext["tags"], serde_json::json!(["v1"]));
    assert_eq!(ext["repository"], format!("{}/att", reg.addr));
    let deps = def["resolvedDependencies"].as_array().unwrap();
    let arch = platform.split('-').nth(1).unwrap();
    let hello = fs::read(fixtures().join("dist").join(arch).join("hello")).unwrap();
    assert!(
        deps.iter()
            .any(|d| d["digest"]["sha256"] == sha256_hex(&hello)
                && d["name"] == format!("../fixtures/dist/{arch}/hello")),
        "{deps:?}"
    );
    let builder = &doc["predicate"]["runDetails"]["builder"];
    assert_eq!(builder["id"], "pkg:cargo/imgbuild");
    assert_eq!(builder["version"]["imgbuild"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn build_writes_the_referrers_into_the_layout() {
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    let build = |out: &str, extra: &[&str]| {
        let o = run_ok(
            imgbuild()
                .current_dir(dir)
                .args(["build", "-q", "-f", "build-specs/hello.toml", "-o", out])
                .args(extra),
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let plain = build("plain", &[]);
    let with = build("with", &["--sbom", "spdx", "--provenance"]);
    assert_eq!(plain, with, "referrers do not change the index");
    let plain_index = json(&fs::read(dir.join("plain/index.json")).unwrap());
    assert_eq!(plain_index["manifests"].as_array().unwrap().len(), 1);
    let index = json(&fs::read(dir.join("with/index.json")).unwrap());
    let entries = index["manifests"].as_array().unwrap();
    // The image (tag `latest`) and two referrers for each of the three platforms.
    assert_eq!(entries.len(), 1 + 6, "{index}");
    let image_index = json(&read_blob(&dir.join("with"), &with));
    let subjects: Vec<String> = platform_manifests(&image_index)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    for e in &entries[1..] {
        let m = json(&read_blob(&dir.join("with"), e["digest"].as_str().unwrap()));
        assert_eq!(m["artifactType"], e["artifactType"]);
        assert!(subjects.contains(&m["subject"]["digest"].as_str().unwrap().to_string()));
        let doc = read_blob(
            &dir.join("with"),
            m["layers"][0]["digest"].as_str().unwrap(),
        );
        json(&doc);
    }
    // The tagged image still copies (skopeo verifies every digest).
    let copy = dir.join("copied");
    skopeo_ok(&[
        "copy",
        "--all",
        &format!("oci:{}:latest", dir.join("with").display()),
        &format!("oci:{}:latest", copy.display()),
    ]);
}

#[test]
fn inspect_reports_platforms_config_and_referrers() {
    let reg = Registry::start();
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    let digest = push(dir, &reg, "insp", &["--sbom-output", "docs"]);
    let out = run_ok(imgbuild().args(["inspect", "--json", &format!("{}/insp:v1", reg.addr)]));
    let text = String::from_utf8_lossy(&out.stdout).replace(&reg.addr, "REGISTRY");
    let report = json(text.as_bytes());
    assert_eq!(report["digest"], digest.as_str());
    let platforms = report["platforms"].as_array().unwrap();
    assert_eq!(platforms.len(), 3);
    for p in platforms {
        let types: Vec<&str> = p["referrers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["artifact_type"].as_str().unwrap())
            .collect();
        assert_eq!(types, [SPDX, IN_TOTO]);
        let env: Vec<&str> = p["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(env.contains(&"GREETING_FILE"), "{env:?}");
        assert!(
            !text.contains("/etc/hello/greeting.txt\""),
            "env values are not shown"
        );
    }
    // The documents name the registry (a random port): their digests and sizes vary per run.
    let mut stable = report.clone();
    for p in stable["platforms"].as_array_mut().unwrap() {
        for r in p["referrers"].as_array_mut().unwrap() {
            r["digest"] = "<document manifest>".into();
            r["size"] = 0.into();
        }
    }
    insta::assert_snapshot!(
        "inspect_hello_json",
        serde_json::to_string_pretty(&stable).unwrap()
    );

    // --sbom / --provenance print the attached documents back, byte for byte.
    for (flag, file) in [
        ("--sbom", "linux-arm64.spdx.json"),
        ("--provenance", "linux-arm64.provenance.json"),
    ] {
        let out = run_ok(imgbuild().args([
            "inspect",
            flag,
            "linux/arm64",
            &format!("{}/insp@{digest}", reg.addr),
        ]));
        let mut want = fs::read(dir.join("docs").join(file)).unwrap();
        want.push(b'\n');
        assert_eq!(out.stdout, want, "{flag}");
    }

    // The same from an OCI layout (build --sbom spdx --provenance).
    run_ok(
        imgbuild()
            .current_dir(dir)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args([
                "build",
                "-q",
                "-f",
                "build-specs/hello.toml",
                "-o",
                "lay",
                "--sbom",
                "spdx",
                "--provenance",
            ]),
    );
    let out = run_ok(
        imgbuild()
            .current_dir(dir)
            .args(["inspect", "--json", "oci:lay:latest"]),
    );
    let local = json(&out.stdout);
    assert_eq!(local["digest"], digest.as_str());
    for p in local["platforms"].as_array().unwrap() {
        assert_eq!(p["referrers"].as_array().unwrap().len(), 2, "{p}");
    }
    // The table a terminal gets.
    let out = run_ok(
        imgbuild()
            .current_dir(dir)
            .args(["inspect", "oci:lay:latest"]),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("linux/arm/v7"), "{table}");
    assert!(table.contains("referrer application/spdx+json"), "{table}");
}

#[test]
fn a_failure_to_attach_is_exit_5_and_says_the_image_is_complete() {
    let reg = Registry::start();
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    let digest = push(
        dir,
        &reg,
        "broken",
        &["--sbom", "none", "--provenance", "none"],
    );
    let index = json(&inspect_raw(&reg, &format!("broken@{digest}")));
    let (_, first) = platform_manifests(&index).remove(0);
    // Something that is not a referrers index already holds the referrers tag of the first
    // platform manifest: imgbuild must not overwrite it blindly.
    let mut args: Vec<String> = vec!["copy".into(), "--preserve-digests".into()];
    args.extend(reg.skopeo_args("src-"));
    args.extend(reg.skopeo_args("dest-"));
    args.push(reg.docker_ref(&format!("broken@{first}")));
    args.push(reg.docker_ref(&format!(
        "broken:sha256-{}",
        first.strip_prefix("sha256:").unwrap()
    )));
    skopeo_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let out = imgbuild()
        .current_dir(dir)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["push", "-q", "-f", "build-specs/hello.toml", "--repo"])
        .arg(format!("{}/broken", reg.addr))
        .args(["--tag", "v1", "--retries", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("the image itself is complete"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}/broken@{digest}", reg.addr),
        "stdout still names the pushed image"
    );
    // The image and its tag are there.
    assert_eq!(
        inspect_raw(&reg, "broken:v1"),
        inspect_raw(&reg, &format!("broken@{digest}"))
    );
}
