//! SPDX 2.3 JSON software bill of materials, one per platform manifest (SPDX 2.3 spec,
//! clauses 6 document creation, 7 package, 8 file, 11 relationships).
//!
//! [`spdx`] is pure: file entries and the base image in, canonical JSON bytes out. The same
//! inputs give the same bytes: the document namespace is derived from the manifest digest
//! (no random UUID) and `created` is `SOURCE_DATE_EPOCH`. [`hash_files`] lists each regular
//! file a platform's layers put into the image with its SHA-256 and SHA-1 (SPDX clause 8.4
//! makes SHA-1 the one mandatory file checksum; pyspdxtools refuses a file without it), taken
//! from the layer cache when the build read the file (`crate::cache::LayerCache::file_sums`).
//!
//! [`audited_crates`] reads the crates a Rust binary was built from out of its cargo-auditable
//! `.dep-v0` section (with the `auditable-info` crate, under size limits); each becomes a
//! package with a `pkg:cargo` purl, contained in the binary's file entry, linked to the
//! crates it depends on.

use crate::digest::{Digest, FileSums};
use crate::image::rfc3339;
use crate::layer::LayerError;
use crate::plan::{EntryKind, LayerPlan};
use crate::platform::Platform;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Media type of an SPDX JSON document (the referrer's `artifactType`).
pub const MEDIA_TYPE_SPDX: &str = "application/spdx+json";

/// One regular file imgbuild put into the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// In the image, relative with `./` (SPDX clause 8.1 wants a relative path).
    pub path: String,
    /// Where it was read from (for provenance's resolved dependencies).
    pub src: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub sha1: String,
    /// Any execute bit in the image: a candidate for cargo-auditable data.
    pub executable: bool,
}

/// The base image, as a package of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasePackage {
    /// As the user named it, e.g. `127.0.0.1:5000/base:1`.
    pub name: String,
    /// The base's manifest for this platform.
    pub digest: Digest,
}

/// A crate compiled into a Rust binary (from its cargo-auditable `.dep-v0` section).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct CratePackage {
    pub name: String,
    pub version: String,
    /// `crates.io`, `git`, `local`, ... as cargo-auditable records it.
    pub source: String,
    /// The file (`./usr/local/bin/app`) that holds it (not part of a cached crate list,
    /// which is keyed by the binary's content).
    #[serde(skip)]
    pub binary: String,
    /// The binary's own package (cargo-auditable's `root`).
    #[serde(default)]
    pub root: bool,
    /// Only used at build time (a proc-macro or build script dependency).
    #[serde(default)]
    pub build: bool,
    /// `name@version` of the crates of the same binary this one depends on.
    #[serde(default)]
    pub dependencies: Vec<String>,
}

impl CratePackage {
    /// package-url `pkg:cargo/NAME@VERSION`, for crates from crates.io only: the cargo type
    /// means crates.io, and a local or git crate of the same name is another crate.
    pub fn purl(&self) -> Option<String> {
        (self.source == "crates.io").then(|| format!("pkg:cargo/{}@{}", self.name, self.version))
    }
}

/// Limits on reading cargo-auditable data (auditable-info's defaults, stated here): the
/// binary is read whole, up to this size ...
pub const AUDIT_MAX_BINARY: usize = 1 << 30;
/// ... and its compressed dependency list may inflate to at most this much JSON.
pub const AUDIT_MAX_JSON: usize = 8 << 20;

/// The crates cargo-auditable recorded in the binary at `path` (named `binary` in the
/// image): `Ok(None)` when the file is no ELF, PE or Mach-O file or has no `.dep-v0` data;
/// `Err(reason)` when the file or its data cannot be read (malformed, over the limits): the
/// caller warns and lists the file alone.
pub fn audited_crates(path: &Path, binary: &str) -> Result<Option<Vec<CratePackage>>, String> {
    let mut magic = [0u8; 4];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| e.to_string())?;
    crate::layer::count_input_bytes(n as u64);
    let executable_format = n == 4
        && (magic == *b"\x7fELF"
            || magic[..2] == *b"MZ"
            || [
                0xfeed_face_u32,
                0xfeed_facf,
                0xcefa_edfe,
                0xcffa_edfe,
                0xcafe_babe,
            ]
            .contains(&u32::from_be_bytes(magic)));
    if !executable_format {
        return Ok(None);
    }
    let limits = auditable_info::Limits {
        input_file_size: AUDIT_MAX_BINARY,
        decompressed_json_size: AUDIT_MAX_JSON,
    };
    // auditable-info reads the whole file (up to the limit): only when an ELF file has the
    // section at all (its section headers, read through a cache, tell), so a large Go or C
    // executable costs a few reads, not its size in memory.
    if magic == *b"\x7fELF" && !elf_has_section(path, ".dep-v0") {
        return Ok(None);
    }
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    crate::layer::count_input_bytes(size.min(AUDIT_MAX_BINARY as u64));
    match auditable_info::audit_info_from_file(path, limits) {
        Ok(info) => Ok(Some(crates_of(&info, binary))),
        Err(auditable_info::Error::NoAuditData) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Does the ELF file at `path` have a section `name`? Reads its headers only. An unreadable or
/// malformed file answers true: auditable-info then says what is wrong with it.
fn elf_has_section(path: &Path, name: &str) -> bool {
    use object::{Object as _, ObjectSection as _};
    let Ok(file) = File::open(path) else {
        return true;
    };
    let cache = object::ReadCache::new(file);
    match object::File::parse(&cache) {
        Ok(elf) => elf.sections().any(|s| s.name() == Ok(name)),
        Err(_) => true,
    }
}

/// The packages of a parsed `.dep-v0` document, in its order.
fn crates_of(info: &auditable_serde::VersionInfo, binary: &str) -> Vec<CratePackage> {
    let id = |i: usize| {
        info.packages
            .get(i)
            .map(|p| format!("{}@{}", p.name, p.version))
    };
    info.packages
        .iter()
        .map(|p| CratePackage {
            name: p.name.clone(),
            version: p.version.to_string(),
            source: String::from(p.source.clone()),
            binary: binary.to_string(),
            root: p.root,
            build: p.kind == auditable_serde::DependencyKind::Build,
            dependencies: p.dependencies.iter().filter_map(|&i| id(i)).collect(),
        })
        .collect()
}

/// Everything one platform's document says.
#[derive(Debug, Clone)]
pub struct SbomInput<'a> {
    /// The image's name: the repository, or the spec's name for a local build.
    pub image: &'a str,
    pub platform: &'a Platform,
    pub manifest_digest: &'a Digest,
    pub epoch: u64,
    pub files: &'a [FileEntry],
    pub base: Option<&'a BasePackage>,
    pub crates: &'a [CratePackage],
}

/// The SPDX 2.3 JSON document, canonical bytes (keys sorted, no whitespace).
pub fn spdx(input: &SbomInput<'_>) -> Vec<u8> {
    let hex = input.manifest_digest.hex();
    let image_id = "SPDXRef-Image";
    let mut packages = vec![json!({
        "SPDXID": image_id,
        "name": input.image,
        "versionInfo": input.manifest_digest.to_string(),
        "downloadLocation": "NOASSERTION",
        "primaryPackagePurpose": "CONTAINER",
        "filesAnalyzed": true,
        // Clause 7.9: SHA-1 over the sorted SHA-1 values of the package's files.
        "packageVerificationCode": {"packageVerificationCodeValue": verification_code(input.files)},
        "checksums": [{"algorithm": "SHA256", "checksumValue": hex}],
        "externalRefs": [purl_ref(&oci_purl(input.image, input.manifest_digest, Some(input.platform)))],
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    let mut files = Vec::new();
    let mut file_ids = HashMap::new();
    for (i, f) in input.files.iter().enumerate() {
        let id = format!("SPDXRef-File-{}", i + 1);
        files.push(json!({
            "SPDXID": id,
            "fileName": f.path,
            "checksums": [
                {"algorithm": "SHA1", "checksumValue": f.sha1},
                {"algorithm": "SHA256", "checksumValue": f.sha256},
            ],
            // SPDX 2.3 has no size field for files: the size goes in the comment.
            "comment": format!("size: {} bytes", f.size),
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
        file_ids.insert(f.path.as_str(), id);
    }
    if let Some(base) = input.base {
        packages.push(json!({
            "SPDXID": "SPDXRef-Base",
            "name": base.name,
            "versionInfo": base.digest.to_string(),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "checksums": [{"algorithm": "SHA256", "checksumValue": base.digest.hex()}],
            "externalRefs": [purl_ref(&oci_purl(&base.name, &base.digest, Some(input.platform)))],
        }));
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "DESCENDANT_OF",
            "relatedSpdxElement": "SPDXRef-Base",
        }));
    }
    // Crates: one package per crate per binary; the binary's file CONTAINS each, and each
    // DEPENDS_ON (or, at build time only, is a BUILD_DEPENDENCY_OF) another of the same binary.
    let crate_ids: HashMap<(&str, String), String> = input
        .crates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                (c.binary.as_str(), format!("{}@{}", c.name, c.version)),
                format!("SPDXRef-Crate-{}", i + 1),
            )
        })
        .collect();
    for (i, c) in input.crates.iter().enumerate() {
        let id = format!("SPDXRef-Crate-{}", i + 1);
        let mut package = json!({
            "SPDXID": id,
            "name": c.name,
            "versionInfo": c.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": if c.root { "APPLICATION" } else { "LIBRARY" },
            "comment": format!("source: {}; from the cargo-auditable data of {}", c.source, c.binary),
        });
        if let Some(purl) = c.purl() {
            package["externalRefs"] = json!([purl_ref(&purl)]);
        }
        packages.push(package);
        if let Some(file) = file_ids.get(c.binary.as_str()) {
            relationships.push(json!({
                "spdxElementId": file,
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": id,
            }));
        }
        for dep in &c.dependencies {
            let Some(dep_id) = crate_ids.get(&(c.binary.as_str(), dep.clone())) else {
                continue;
            };
            let dep_is_build = input.crates.iter().any(|d| {
                d.binary == c.binary && format!("{}@{}", d.name, d.version) == *dep && d.build
            });
            relationships.push(if dep_is_build {
                json!({
                    "spdxElementId": dep_id,
                    "relationshipType": "BUILD_DEPENDENCY_OF",
                    "relatedSpdxElement": id,
                })
            } else {
                json!({
                    "spdxElementId": id,
                    "relationshipType": "DEPENDS_ON",
                    "relatedSpdxElement": dep_id,
                })
            });
        }
    }
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{} {} {}", input.image, input.platform, input.manifest_digest),
        // Clause 6.5: unique per document; the manifest digest is (the same image gets the
        // same namespace, a different one another).
        "documentNamespace": format!(
            "https://spdx.org/spdxdocs/imgbuild/{}/sha256-{hex}",
            slug(input.image)
        ),
        "creationInfo": {
            "created": rfc3339(input.epoch),
            "creators": [format!("Tool: imgbuild-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "files": files,
        "relationships": relationships,
    });
    canonical(&doc)
}

/// Canonical JSON: serde_json's maps are sorted (no `preserve_order`).
pub(crate) fn canonical(v: &Value) -> Vec<u8> {
    // Serializing a Value cannot fail (string keys only).
    serde_json::to_vec(v).unwrap_or_default()
}

fn purl_ref(purl: &str) -> Value {
    json!({
        "referenceCategory": "PACKAGE-MANAGER",
        "referenceType": "purl",
        "referenceLocator": purl,
    })
}

/// `pkg:oci/NAME@DIGEST?arch=..&repository_url=..` (package-url's `oci` type: the name is
/// the last path segment, lower case; the digest's `:` percent-encoded).
pub fn oci_purl(image: &str, digest: &Digest, platform: Option<&Platform>) -> String {
    // Drop a tag or digest from the name the user gave.
    let repo = image.split('@').next().unwrap_or(image);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    let name = repo.rsplit('/').next().unwrap_or(repo).to_lowercase();
    let mut purl = format!("pkg:oci/{name}@sha256%3A{}", digest.hex());
    let mut q = Vec::new();
    if let Some(p) = platform {
        q.push(format!("arch={}", p.arch));
    }
    if repo.contains('/') {
        q.push(format!("repository_url={repo}"));
    }
    if !q.is_empty() {
        purl.push('?');
        purl.push_str(&q.join("&"));
    }
    purl
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '/' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn verification_code(files: &[FileEntry]) -> String {
    let mut sums: Vec<&str> = files.iter().map(|f| f.sha1.as_str()).collect();
    sums.sort_unstable();
    let mut h = <sha1::Sha1 as sha1::Digest>::new();
    for s in sums {
        sha1::Digest::update(&mut h, s.as_bytes());
    }
    hex::encode(sha1::Digest::finalize(h))
}

/// Every regular file of `layers` (path order within a layer, layers in order) with its
/// checksums from `sums` (the layer cache's, or a read of the file).
pub fn hash_files(
    layers: &[LayerPlan],
    sums: &mut dyn FnMut(&Path, u64) -> Result<FileSums, LayerError>,
) -> Result<Vec<FileEntry>, LayerError> {
    let mut out = Vec::new();
    for layer in layers {
        for e in &layer.entries {
            let EntryKind::File { src, size } = &e.kind else {
                continue;
            };
            let s = sums(src, *size)?;
            out.push(FileEntry {
                path: format!("./{}", e.path.display()),
                src: src.clone(),
                size: *size,
                sha256: s.sha256.hex().to_string(),
                sha1: s.sha1,
                executable: e.mode & 0o111 != 0,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8]) -> FileEntry {
        FileEntry {
            path: path.into(),
            src: PathBuf::from(path),
            size: content.len() as u64,
            sha256: Digest::of(content).hex().to_string(),
            sha1: FileSums::of(content).sha1,
            executable: true,
        }
    }

    #[test]
    fn document_is_deterministic_and_complete() {
        let p = Platform::new("linux", "arm64", None);
        let d = Digest::of(b"manifest");
        let files = [file("./usr/local/bin/hello", b"hi")];
        let base = BasePackage {
            name: "127.0.0.1:5000/base:1".into(),
            digest: Digest::of(b"base"),
        };
        let input = SbomInput {
            image: "127.0.0.1:5000/team/hello",
            platform: &p,
            manifest_digest: &d,
            epoch: 86_400,
            files: &files,
            base: Some(&base),
            crates: &[],
        };
        let a = spdx(&input);
        assert_eq!(a, spdx(&input));
        let v: Value = serde_json::from_slice(&a).unwrap();
        assert_eq!(v["creationInfo"]["created"], "1970-01-02T00:00:00Z");
        assert_eq!(
            v["documentNamespace"],
            format!(
                "https://spdx.org/spdxdocs/imgbuild/127.0.0.1-5000/team/hello/sha256-{}",
                d.hex()
            )
        );
        assert_eq!(v["files"][0]["fileName"], "./usr/local/bin/hello");
        assert_eq!(
            v["files"][0]["checksums"][0]["checksumValue"],
            "c22b5f9178342609428d6f51b2c5af4c0bde6a42"
        );
        assert_eq!(
            v["packages"][1]["externalRefs"][0]["referenceLocator"],
            format!(
                "pkg:oci/base@sha256%3A{}?arch=arm64&repository_url=127.0.0.1:5000/base",
                base.digest.hex()
            )
        );
        let rels = v["relationships"].as_array().unwrap();
        assert!(rels.iter().any(|r| r["relationshipType"] == "DESCRIBES"));
        assert!(
            rels.iter()
                .any(|r| r["relationshipType"] == "DESCENDANT_OF")
        );
    }

    #[test]
    fn crates_are_packages_in_their_binary_with_their_dependencies() {
        let p = Platform::new("linux", "amd64", None);
        let d = Digest::of(b"manifest");
        let files = [file("./app", b"elf")];
        let krate =
            |name: &str, source: &str, root: bool, build: bool, deps: &[&str]| CratePackage {
                name: name.into(),
                version: "1.0.0".into(),
                source: source.into(),
                binary: "./app".into(),
                root,
                build,
                dependencies: deps.iter().map(|d| d.to_string()).collect(),
            };
        let crates = [
            krate("app", "local", true, false, &["itoa@1.0.0", "derive@1.0.0"]),
            krate("itoa", "crates.io", false, false, &[]),
            krate("derive", "crates.io", false, true, &[]),
        ];
        let v: Value = serde_json::from_slice(&spdx(&SbomInput {
            image: "x",
            platform: &p,
            manifest_digest: &d,
            epoch: 0,
            files: &files,
            base: None,
            crates: &crates,
        }))
        .unwrap();
        let pkgs = v["packages"].as_array().unwrap();
        let id = |n: &str| pkgs.iter().find(|p| p["name"] == n).unwrap()["SPDXID"].clone();
        let pkg = |n: &str| pkgs.iter().find(|p| p["name"] == n).unwrap().clone();
        assert_eq!(
            pkg("itoa")["externalRefs"][0]["referenceLocator"],
            "pkg:cargo/itoa@1.0.0"
        );
        assert!(
            pkg("app").get("externalRefs").is_none(),
            "no crates.io purl for a local crate"
        );
        assert_eq!(pkg("app")["primaryPackagePurpose"], "APPLICATION");
        let rels = v["relationships"].as_array().unwrap();
        let has = |a: &Value, t: &str, b: &Value| {
            rels.iter().any(|r| {
                r["spdxElementId"] == *a
                    && r["relationshipType"] == t
                    && r["relatedSpdxElement"] == *b
            })
        };
        let file_id = v["files"][0]["SPDXID"].clone();
        for c in ["app", "itoa", "derive"] {
            assert!(has(&file_id, "CONTAINS", &id(c)), "{c}");
        }
        assert!(has(&id("app"), "DEPENDS_ON", &id("itoa")));
        assert!(has(&id("derive"), "BUILD_DEPENDENCY_OF", &id("app")));
    }

    #[test]
    fn a_file_that_is_no_binary_has_no_crates() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("t");
        std::fs::write(&text, b"#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(audited_crates(&text, "./t"), Ok(None));
    }

    #[test]
    fn purls() {
        let d = Digest::of(b"x");
        let h = d.hex();
        for (image, want) in [
            ("hello", format!("pkg:oci/hello@sha256%3A{h}")),
            (
                "reg:5000/a/Hello:1.0",
                format!("pkg:oci/hello@sha256%3A{h}?repository_url=reg:5000/a/Hello"),
            ),
            (
                "reg/a/b@sha256:abc",
                format!("pkg:oci/b@sha256%3A{h}?repository_url=reg/a/b"),
            ),
        ] {
            assert_eq!(oci_purl(image, &d, None), want, "{image}");
        }
    }
}
