//! SLSA provenance v1 (slsa.dev/spec/v1.0/provenance) in an in-toto Statement v1
//! (github.com/in-toto/attestation spec/v1/statement.md), one per platform manifest.
//!
//! Pure: the build's facts in, canonical JSON bytes out. Without `GITHUB_*` variables the
//! same build gives the same bytes; in GitHub Actions the run id and URL make each run's
//! statement its own.

use crate::digest::Digest;
use crate::platform::Platform;
use crate::sbom::{BasePackage, FileEntry, canonical, oci_purl};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Media type of an in-toto statement (the referrer's `artifactType`).
pub const MEDIA_TYPE_IN_TOTO: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What the external parameters mean: imgbuild's own build type.
pub const BUILD_TYPE: &str = "urn:imgbuild:build-type:v1";
/// Builder id outside GitHub Actions (inside, the workflow's URL).
pub const LOCAL_BUILDER: &str = "pkg:cargo/imgbuild";

/// The build's facts for one platform.
#[derive(Debug, Clone)]
pub struct ProvenanceInput<'a> {
    /// The repository (or the spec's name for a local build): the subject's name.
    pub image: &'a str,
    pub platform: &'a Platform,
    pub manifest_digest: &'a Digest,
    /// The spec file as given, and the sha256 of its bytes.
    pub spec_path: &'a str,
    pub spec_digest: &'a Digest,
    pub platforms: &'a [Platform],
    pub tags: &'a [String],
    pub repository: Option<&'a str>,
    pub epoch: u64,
    /// Input artifacts (this platform's files), and the base image.
    pub files: &'a [FileEntry],
    pub base: Option<&'a BasePackage>,
    /// `GITHUB_*` variables that were set (name -> value).
    pub github: &'a BTreeMap<String, String>,
}

/// The in-toto Statement, canonical bytes.
pub fn statement(input: &ProvenanceInput<'_>) -> Vec<u8> {
    let gh = |k: &str| input.github.get(k).filter(|v| !v.is_empty());
    let mut external = Map::new();
    external.insert(
        "spec".into(),
        json!({"path": input.spec_path, "digest": {"sha256": input.spec_digest.hex()}}),
    );
    external.insert(
        "platforms".into(),
        json!(
            input
                .platforms
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        ),
    );
    external.insert("platform".into(), json!(input.platform.to_string()));
    external.insert("tags".into(), json!(input.tags));
    if let Some(r) = input.repository {
        external.insert("repository".into(), json!(r));
    }
    // The shape GitHub's own workflow build type uses (actions/buildtypes/workflow/v1).
    if let (Some(repo), Some(wref)) = (gh("GITHUB_REPOSITORY"), gh("GITHUB_WORKFLOW_REF")) {
        let path = wref
            .strip_prefix(&format!("{repo}/"))
            .and_then(|p| p.split('@').next())
            .unwrap_or(wref);
        let mut wf = json!({"repository": repo, "path": path});
        if let Some(r) = gh("GITHUB_REF") {
            wf["ref"] = json!(r);
        }
        external.insert("workflow".into(), wf);
    }

    let mut deps: Vec<Value> = Vec::new();
    // Each distinct source file once (one artifact can go to several paths).
    let mut seen = std::collections::BTreeSet::new();
    for f in input.files {
        if seen.insert((&f.src, &f.sha256)) {
            deps.push(json!({
                "name": f.src.display().to_string(),
                "digest": {"sha256": f.sha256},
                "annotations": {"dest": f.path},
            }));
        }
    }
    if let Some(b) = input.base {
        deps.push(json!({
            "name": b.name,
            "uri": oci_purl(&b.name, &b.digest, Some(input.platform)),
            "digest": {"sha256": b.digest.hex()},
        }));
    }
    if let (Some(server), Some(repo), Some(sha)) = (
        gh("GITHUB_SERVER_URL"),
        gh("GITHUB_REPOSITORY"),
        gh("GITHUB_SHA"),
    ) {
        let mut d = json!({"uri": format!("git+{server}/{repo}"), "digest": {"gitCommit": sha}});
        if let Some(r) = gh("GITHUB_REF") {
            d["uri"] = json!(format!("git+{server}/{repo}@{r}"));
        }
        deps.push(d);
    }

    let mut internal = Map::new();
    internal.insert("sourceDateEpoch".into(), json!(input.epoch));
    let mut github = Map::new();
    for k in [
        "GITHUB_EVENT_NAME",
        "GITHUB_REPOSITORY_ID",
        "GITHUB_REPOSITORY_OWNER_ID",
        "GITHUB_RUN_ATTEMPT",
        "RUNNER_ENVIRONMENT",
    ] {
        if let Some(v) = gh(k) {
            github.insert(k.to_lowercase(), json!(v));
        }
    }
    if !github.is_empty() {
        internal.insert("github".into(), Value::Object(github));
    }

    let run_url = match (
        gh("GITHUB_SERVER_URL"),
        gh("GITHUB_REPOSITORY"),
        gh("GITHUB_RUN_ID"),
    ) {
        (Some(s), Some(r), Some(id)) => {
            let attempt = gh("GITHUB_RUN_ATTEMPT").map_or("1", String::as_str);
            Some(format!("{s}/{r}/actions/runs/{id}/attempts/{attempt}"))
        }
        _ => None,
    };
    let builder_id = match (gh("GITHUB_SERVER_URL"), gh("GITHUB_WORKFLOW_REF")) {
        (Some(s), Some(w)) => format!("{s}/{w}"),
        _ => LOCAL_BUILDER.to_string(),
    };
    let mut metadata = Map::new();
    if let Some(url) = &run_url {
        metadata.insert("invocationId".into(), json!(url));
    }
    let mut byproducts = Vec::new();
    if let Some(id) = gh("GITHUB_RUN_ID") {
        byproducts.push(json!({"name": "github-run-id", "content": b64(id)}));
    }

    let mut run_details = json!({
        "builder": {
            "id": builder_id,
            "version": {"imgbuild": env!("CARGO_PKG_VERSION")},
        },
        "metadata": Value::Object(metadata),
    });
    if !byproducts.is_empty() {
        run_details["byproducts"] = json!(byproducts);
    }
    let doc = json!({
        "_type": STATEMENT_TYPE,
        "subject": [{
            "name": input.image,
            "digest": {"sha256": input.manifest_digest.hex()},
        }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": Value::Object(external),
                "internalParameters": Value::Object(internal),
                "resolvedDependencies": deps,
            },
            "runDetails": run_details,
        },
    });
    canonical(&doc)
}

/// ResourceDescriptor `content` is base64 bytes (in-toto resource_descriptor.md).
fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn statement_layout() {
        let p = Platform::new("linux", "amd64", None);
        let d = Digest::of(b"m");
        let sd = Digest::of(b"spec");
        let files = [FileEntry {
            path: "./app".into(),
            src: PathBuf::from("bin/app"),
            size: 1,
            sha256: Digest::of(b"a").hex().into(),
            sha1: String::new(),
            executable: false,
        }];
        let empty = BTreeMap::new();
        let input = ProvenanceInput {
            image: "r/x",
            platform: &p,
            manifest_digest: &d,
            spec_path: "x.toml",
            spec_digest: &sd,
            platforms: std::slice::from_ref(&p),
            tags: &["1".into()],
            repository: Some("r/x"),
            epoch: 5,
            files: &files,
            base: None,
            github: &empty,
        };
        let local: Value = serde_json::from_slice(&statement(&input)).unwrap();
        assert_eq!(local["_type"], STATEMENT_TYPE);
        assert_eq!(local["subject"][0]["digest"]["sha256"], d.hex());
        assert_eq!(
            local["predicate"]["runDetails"]["builder"]["id"],
            LOCAL_BUILDER
        );
        let deps = &local["predicate"]["buildDefinition"]["resolvedDependencies"];
        assert_eq!(deps[0]["name"], "bin/app");
        assert_eq!(deps.as_array().unwrap().len(), 1);

        let mut github = BTreeMap::new();
        for (k, v) in [
            ("GITHUB_SERVER_URL", "https://github.com"),
            ("GITHUB_REPOSITORY", "o/r"),
            ("GITHUB_RUN_ID", "42"),
            ("GITHUB_SHA", "abc"),
            ("GITHUB_REF", "refs/heads/main"),
            (
                "GITHUB_WORKFLOW_REF",
                "o/r/.github/workflows/ci.yml@refs/heads/main",
            ),
        ] {
            github.insert(k.to_string(), v.to_string());
        }
        let input = ProvenanceInput {
            github: &github,
            ..input
        };
        let gh: Value = serde_json::from_slice(&statement(&input)).unwrap();
        let pred = &gh["predicate"];
        assert_eq!(
            pred["runDetails"]["metadata"]["invocationId"],
            "https://github.com/o/r/actions/runs/42/attempts/1"
        );
        assert_eq!(
            pred["runDetails"]["builder"]["id"],
            "https://github.com/o/r/.github/workflows/ci.yml@refs/heads/main"
        );
        assert_eq!(
            pred["buildDefinition"]["externalParameters"]["workflow"]["path"],
            ".github/workflows/ci.yml"
        );
        assert_eq!(
            pred["buildDefinition"]["resolvedDependencies"][1]["digest"]["gitCommit"],
            "abc"
        );
    }
}
