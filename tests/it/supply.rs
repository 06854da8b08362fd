//! SBOM and provenance referrers (README "SBOM and provenance") against Debian's docker-registry 2.8, which has
//! no referrers API: the referrers tag schema path. skopeo reads what was pushed; PyPI
//! spdx-tools (`pyspdxtools`, installed by `scripts/install-deps.sh test`) validates every
//! SPDX document; the provenance is checked field by field.

use crate::build::workspace;
use crate::harness::*;
use crate::proxy::{Proxy, ProxyOpts};
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
    push_at(ws, &reg.addr, repo, extra)
}

/// `push` to the registry at `addr` (a registry, or a proxy in front of one).
fn push_at(ws: &Path, addr: &str, repo: &str, extra: &[&str]) -> String {
    let out = run_ok(
        imgbuild()
            .current_dir(ws)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["push", "-q", "-f", "build-specs/hello.toml", "--repo"])
            .arg(format!("{addr}/{repo}"))
            .args(["--tag", "v1"])
            .args(extra),
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split_once('@').expect("REPO@DIGEST").1.to_string()
}

/// Push without attachments; the pushed index digest and the index as the registry serves it.
fn push_plain(ws: &Path, reg: &Registry, repo: &str) -> (String, Value) {
    let digest = push(ws, reg, repo, &["--sbom", "none", "--provenance", "none"]);
    let index = json(&inspect_raw(reg, &format!("{repo}@{digest}")));
    (digest, index)
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
    let (digest, index) = push_plain(dir, &reg, "broken");
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

/// The SPDX document `build --sbom spdx --sbom-output docs` wrote for linux/amd64, and stderr.
fn build_amd64_sbom(dir: &Path, spec: &str, out: &str) -> (Value, String) {
    let o = run_ok(
        imgbuild()
            .current_dir(dir)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["build", "-q", "-f", spec, "-o", out, "--sbom", "spdx"])
            .args(["--sbom-output", &format!("{out}-docs")]),
    );
    let path = dir.join(format!("{out}-docs/linux-amd64.spdx.json"));
    let out = Command::new(pyspdxtools())
        .arg("-i")
        .arg(&path)
        .output()
        .expect("run pyspdxtools");
    assert!(
        out.status.success(),
        "pyspdxtools -i {}: {}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        json(&fs::read(&path).unwrap()),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The SPDX id of the file entry named `name`.
fn file_id(doc: &Value, name: &str) -> String {
    doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fileName"] == name)
        .unwrap_or_else(|| panic!("{name} not in the SBOM"))["SPDXID"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `(name, version, purl)` of the packages the file `name` CONTAINS.
fn crates_in(doc: &Value, name: &str) -> Vec<(String, String, Option<String>)> {
    let id = file_id(doc, name);
    let packages = doc["packages"].as_array().unwrap();
    let mut out: Vec<_> = doc["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["spdxElementId"] == id.as_str() && r["relationshipType"] == "CONTAINS")
        .map(|r| {
            let p = packages
                .iter()
                .find(|p| p["SPDXID"] == r["relatedSpdxElement"])
                .expect("relationship to a package of the document");
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
                p["externalRefs"][0]["referenceLocator"]
                    .as_str()
                    .map(String::from),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn sbom_lists_the_crates_inside_a_cargo_auditable_binary() {
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    // A copy of the fixture whose `.dep-v0` data is damaged (same size, zlib stream broken).
    let good = fs::read(dir.join("fixtures/dist/amd64/hello-auditable")).unwrap();
    let range = {
        use object::{Object as _, ObjectSection as _};
        let elf = object::File::parse(&*good).expect("ELF");
        let s = elf.section_by_name(".dep-v0").expect(".dep-v0 section");
        let (at, len) = s.file_range().unwrap();
        at as usize..(at + len) as usize
    };
    let mut broken = good.clone();
    for b in &mut broken[range.start + 2..range.end - 4] {
        *b = 0xff;
    }
    fs::write(dir.join("fixtures/dist/amd64/broken-auditable"), &broken).unwrap();
    set_mtime_recursive(dir.join("fixtures"), 1_700_000_000);
    fs::write(
        dir.join("build-specs/rust.toml"),
        r#"platforms = ["linux/amd64"]
base = "scratch"
[config]
entrypoint = ["/usr/local/bin/app"]
[[layer]]
files = [
  { src = "../fixtures/dist/amd64/hello-auditable", dest = "/usr/local/bin/app", mode = 0o755 },
  { src = "../fixtures/dist/amd64/hello", dest = "/usr/local/bin/hello", mode = 0o755 },
  { src = "../fixtures/dist/amd64/broken-auditable", dest = "/usr/local/bin/broken", mode = 0o755 },
]
"#,
    )
    .unwrap();

    let (doc, stderr) = build_amd64_sbom(dir, "build-specs/rust.toml", "one");
    let want = vec![
        ("hello-auditable".to_string(), "0.1.0".to_string(), None),
        (
            "itoa".into(),
            "1.0.11".into(),
            Some("pkg:cargo/itoa@1.0.11".into()),
        ),
        (
            "ryu".into(),
            "1.0.18".into(),
            Some("pkg:cargo/ryu@1.0.18".into()),
        ),
    ];
    assert_eq!(crates_in(&doc, "./usr/local/bin/app"), want, "{doc}");
    // A binary without the section, and one whose data is malformed: their files only.
    assert_eq!(crates_in(&doc, "./usr/local/bin/hello"), []);
    assert_eq!(crates_in(&doc, "./usr/local/bin/broken"), []);
    assert_eq!(
        stderr.matches("cargo-auditable").count(),
        1,
        "one warning, for the malformed data:\n{stderr}"
    );
    assert!(
        stderr.contains("./usr/local/bin/broken") && stderr.contains("cargo-auditable"),
        "{stderr}"
    );
    // The root package depends on both crates.
    let packages = doc["packages"].as_array().unwrap();
    let id_of = |name: &str| {
        packages.iter().find(|p| p["name"] == name).unwrap()["SPDXID"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let rels = doc["relationships"].as_array().unwrap();
    for dep in ["itoa", "ryu"] {
        assert!(
            rels.iter()
                .any(|r| r["spdxElementId"] == id_of("hello-auditable").as_str()
                    && r["relationshipType"] == "DEPENDS_ON"
                    && r["relatedSpdxElement"] == id_of(dep).as_str()),
            "hello-auditable DEPENDS_ON {dep}"
        );
    }

    // Again, the crate lists now from the layer cache: the same document, the same warning.
    let (again, stderr) = build_amd64_sbom(dir, "build-specs/rust.toml", "two");
    assert_eq!(again, doc);
    assert_eq!(stderr.matches("cargo-auditable").count(), 1, "{stderr}");
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// One plain HTTP/1.0 request (so no chunked answers): status, headers (names lower case),
/// body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let text = String::from_utf8_lossy(&answer[..split]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (
        status.parse().unwrap(),
        headers,
        answer[split + 4..].to_vec(),
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Upload `bytes` as a blob (POST, then PUT ?digest=); its digest.
fn upload_blob(addr: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(bytes));
    let (status, headers, _) = http(
        addr,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    );
    assert_eq!(status, 202);
    let location = header(&headers, "location").expect("Location");
    let location = match location.find("/v2/") {
        Some(at) => &location[at..],
        None => location,
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let (status, _, body) = http(
        addr,
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    digest
}

/// PUT a manifest or index under `reference`; its digest.
fn put_manifest(addr: &str, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) -> String {
    let (status, _, body) = http(
        addr,
        "PUT",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Content-Type", media_type)],
        bytes,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    format!("sha256:{}", sha256_hex(bytes))
}

fn sorted_types(list: &[Value]) -> Vec<String> {
    let mut t: Vec<String> = list
        .iter()
        .map(|r| {
            r.get("artifactType")
                .or_else(|| r.get("artifact_type"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string()
        })
        .collect();
    t.sort();
    t
}

#[test]
fn with_the_referrers_api_imgbuild_lists_through_it_and_writes_no_referrers_tag() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.addr,
        ProxyOpts {
            referrers_api: true,
            ..ProxyOpts::default()
        },
    );
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    let digest = push_at(dir, &proxy.addr, "api", &[]);
    let first = proxy.seen().len();
    // A re-push with the cache that recorded the attach: the tag names our index, so nothing
    // (not even the referrers) is asked again.
    assert_eq!(push_at(dir, &proxy.addr, "api", &[]), digest);
    let after_cached = proxy.seen().len();
    assert!(
        after_cached - first <= 3,
        "a no-op re-push is at most 3 requests: {:#?}",
        &proxy.seen()[first..]
    );
    // Without the cache's record the referrers are asked through the API, and nothing that is
    // already there is attached again.
    assert_eq!(push_at(dir, &proxy.addr, "api", &["--no-cache"]), digest);
    let seen = proxy.seen();
    let second = &seen[after_cached..];
    // The referrers tag is asked beside the API (which one the registry keeps is only known
    // from the answers), never written.
    assert!(
        !seen
            .iter()
            .any(|r| r.method != "GET" && r.target.contains("/manifests/sha256-")),
        "the referrers tag schema is not used when the API answers: {seen:#?}"
    );
    let index = json(&inspect_raw(&reg, "api:v1"));
    let platforms = platform_manifests(&index);
    // The re-push asks the API once per platform manifest and attaches nothing again.
    let asked = second
        .iter()
        .filter(|r| r.method == "GET" && r.target.contains("/referrers/"))
        .count();
    assert_eq!(asked, platforms.len(), "{second:#?}");
    assert!(
        !second.iter().any(|r| r.method == "POST"),
        "no blob uploaded again: {second:#?}"
    );
    for (platform, manifest) in &platforms {
        let path = format!("/v2/api/referrers/{manifest}");
        let (status, headers, body) = http(&proxy.addr, "GET", &path, &[], b"");
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "content-type"), Some(OCI_INDEX));
        let list = json(&body)["manifests"].as_array().unwrap().clone();
        assert_eq!(
            sorted_types(&list),
            [SPDX, IN_TOTO],
            "{platform}: one of each"
        );
        for r in &list {
            let d = r["digest"].as_str().unwrap();
            assert!(
                !second
                    .iter()
                    .any(|s| s.method == "PUT" && s.target.ends_with(d)),
                "{platform}: referrer {d} PUT again"
            );
            let m = json(&inspect_raw(&reg, &format!("api@{d}")));
            assert_eq!(m["subject"]["digest"], manifest.as_str());
        }
        // The filter a client may ask for.
        let (_, headers, body) = http(
            &proxy.addr,
            "GET",
            &format!("{path}?artifactType=application/spdx%2Bjson"),
            &[],
            b"",
        );
        assert_eq!(
            header(&headers, "oci-filters-applied"),
            Some("artifactType")
        );
        let list = json(&body)["manifests"].as_array().unwrap().clone();
        assert_eq!(sorted_types(&list), [SPDX], "{platform}");
    }
    // inspect finds them through the API too.
    let out = run_ok(imgbuild().args(["inspect", "--json", &format!("{}/api:v1", proxy.addr)]));
    let report = json(&out.stdout);
    assert_eq!(report["digest"], digest.as_str());
    for p in report["platforms"].as_array().unwrap() {
        let list = p["referrers"].as_array().unwrap();
        assert_eq!(sorted_types(list), [SPDX, IN_TOTO], "{p}");
    }
    let out = run_ok(imgbuild().args(["inspect", &format!("{}/api:v1", proxy.addr)]));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("referrer application/spdx+json"), "{table}");
    assert!(
        table.contains("referrer application/vnd.in-toto+json"),
        "{table}"
    );
}

#[test]
fn another_tools_referrer_survives_two_pushes_in_the_referrers_tag() {
    let reg = Registry::start();
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    let (digest, index) = push_plain(dir, &reg, "keep");
    let subject = index["manifests"][0].clone();
    let hex = subject["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    // Another tool's artifact about the first platform manifest, and the referrers tag
    // listing it, written with plain HTTP requests.
    let config = upload_blob(&reg.addr, "keep", b"{}");
    let payload = b"a signature, as far as imgbuild knows";
    let layer = upload_blob(&reg.addr, "keep", payload);
    let foreign = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signature.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": payload.len()}],
        "subject": {"mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"]},
    });
    let foreign_bytes = serde_json::to_vec(&foreign).unwrap();
    let foreign_digest = format!("sha256:{}", sha256_hex(&foreign_bytes));
    put_manifest(
        &reg.addr,
        "keep",
        &foreign_digest,
        OCI_MANIFEST,
        &foreign_bytes,
    );
    let foreign_entry = serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": foreign_digest,
        "size": foreign_bytes.len(),
        "artifactType": "application/vnd.example.signature.v1+json",
    });
    let tag_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [foreign_entry],
    });
    let tag = format!("sha256-{hex}");
    put_manifest(
        &reg.addr,
        "keep",
        &tag,
        OCI_INDEX,
        &serde_json::to_vec(&tag_index).unwrap(),
    );

    // imgbuild attaches its documents, twice.
    assert_eq!(push(dir, &reg, "keep", &[]), digest);
    let after = inspect_raw(&reg, &format!("keep:{tag}"));
    assert_eq!(push(dir, &reg, "keep", &[]), digest);
    assert_eq!(
        inspect_raw(&reg, &format!("keep:{tag}")),
        after,
        "the second push leaves the tag alone"
    );
    let list = json(&after)["manifests"].as_array().unwrap().clone();
    assert_eq!(
        list[0], foreign_entry,
        "the other tool's referrer is kept as it was"
    );
    assert_eq!(
        sorted_types(&list),
        [SPDX, "application/vnd.example.signature.v1+json", IN_TOTO],
        "ours exactly once each: {list:#?}"
    );
    // The foreign artifact itself is untouched.
    assert_eq!(
        inspect_raw(&reg, &format!("keep@{foreign_digest}")),
        foreign_bytes
    );
}

#[test]
fn inspect_reads_a_docker_manifest_list() {
    let reg = Registry::start();
    let ws = workspace(1_700_000_000);
    let dir = ws.path();
    push(dir, &reg, "oci", &[]);
    // skopeo converts the OCI index and its manifests to Docker schema 2 on the way.
    let mut args: Vec<String> = vec!["copy".into(), "--all".into()];
    args.extend(["--format".into(), "v2s2".into()]);
    args.extend(reg.skopeo_args("src-"));
    args.extend(reg.skopeo_args("dest-"));
    args.push(reg.docker_ref("oci:v1"));
    args.push(reg.docker_ref("docker:v1"));
    skopeo_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let raw = inspect_raw(&reg, "docker:v1");
    let list = json(&raw);
    assert_eq!(
        list["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let list_digest = format!("sha256:{}", sha256_hex(&raw));

    let out = run_ok(imgbuild().args(["inspect", "--json", &format!("{}/docker:v1", reg.addr)]));
    let report = json(&out.stdout);
    assert_eq!(report["digest"], list_digest.as_str());
    assert_eq!(report["media_type"], list["mediaType"]);
    let platforms = report["platforms"].as_array().unwrap();
    let names: Vec<&str> = platforms
        .iter()
        .map(|p| p["platform"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    for (p, entry) in platforms.iter().zip(list["manifests"].as_array().unwrap()) {
        assert_eq!(p["manifest_digest"], entry["digest"]);
        let m = json(&inspect_raw(
            &reg,
            &format!("docker@{}", entry["digest"].as_str().unwrap()),
        ));
        assert_eq!(
            m["mediaType"],
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        let sizes: Vec<u64> = m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .collect();
        assert_eq!(p["layers"], serde_json::json!(sizes));
        assert_eq!(
            p["size"].as_u64().unwrap(),
            m["config"]["size"].as_u64().unwrap() + sizes.iter().sum::<u64>()
        );
        assert_eq!(p["entrypoint"], serde_json::json!(["/usr/local/bin/hello"]));
        assert_eq!(p["env"], serde_json::json!(["GREETING_FILE"]), "names only");
        assert_eq!(
            p["referrers"],
            serde_json::json!([]),
            "a converted image has none"
        );
    }
    let out = run_ok(imgbuild().args(["inspect", &format!("{}/docker:v1", reg.addr)]));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&list_digest), "{table}");
    assert!(table.contains("linux/arm/v7"), "{table}");
    assert!(!table.contains("referrer "), "{table}");
}
