//! Image assembly: OCI image config, one manifest per platform, and the image index
//! (image-spec config.md, manifest.md, image-index.md).
//!
//! JSON that gets a digest is serialized exactly once, canonically, into a [`JsonBlob`]; from
//! then on only those bytes move (hashed, written to a layout, pushed). Canonical here means
//! keys sorted at every level and no insignificant whitespace: oci-spec keeps annotations,
//! labels and ports in `HashMap`s whose order varies between processes (oci-spec-rs#249), so
//! we go through `serde_json::Value`, whose maps are `BTreeMap`s (serde_json without
//! `preserve_order`), and RFC 8259 escaping (unlike OLPC canonical JSON, which leaves control
//! characters raw and so is not valid JSON for a label holding a newline).

use crate::digest::Digest;
use crate::exit::ExitCode;
use crate::platform::Platform;
use crate::spec::RuntimeConfig;
use bytes::Bytes;
use oci_spec::image as oci;
use std::collections::{BTreeMap, HashMap};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
pub const ANNOTATION_SOURCE: &str = "org.opencontainers.image.source";
pub const ANNOTATION_REVISION: &str = "org.opencontainers.image.revision";
/// image-spec annotations.md "Pre-Defined Annotation Keys": the image this one is built on.
pub const ANNOTATION_BASE_NAME: &str = "org.opencontainers.image.base.name";
pub const ANNOTATION_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
/// Set on `index.json` entries of an OCI layout so `oci:DIR:TAG` finds them.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor: what a manifest or index says about a blob it references.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// Where else the blob may be fetched (descriptor.md `urls`): kept exactly as a base
    /// image lists it for its layers; empty for ours.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// The descriptor's `annotations`, likewise kept from a base image; empty for ours.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor with no `urls` and no `annotations` (all of ours).
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// JSON bytes fixed once, with their digest and media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBlob {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

/// Errors while assembling JSON documents. These are bugs or impossible inputs: the spec
/// parser has already validated what the user wrote.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("building the {what}: {source}")]
    Oci {
        what: &'static str,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("serializing the {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl ImageError {
    /// Assembling the config or a manifest cannot fail on valid input: a bug (1).
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::Internal
    }
}

impl JsonBlob {
    /// Serialize `value` canonically, once.
    pub fn canonical<T: serde::Serialize>(
        media_type: &str,
        value: &T,
        what: &'static str,
    ) -> Result<JsonBlob, ImageError> {
        let json = |source| ImageError::Json { what, source };
        let value = serde_json::to_value(value).map_err(json)?;
        let bytes = Bytes::from(serde_json::to_vec(&value).map_err(json)?);
        Ok(JsonBlob {
            media_type: media_type.to_string(),
            digest: Digest::of(&bytes),
            bytes,
        })
    }

    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }
}

/// One platform's finished image.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub platform: Platform,
    pub config: JsonBlob,
    pub layers: Vec<Descriptor>,
    pub manifest: JsonBlob,
}

/// All platforms' images and the index that ties them together.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub images: Vec<PlatformImage>,
    pub index: JsonBlob,
    /// Base image layers that are not in the blob store but in a registry repository: a push
    /// mounts or copies them there, a local build downloads them.
    pub remote_layers: Vec<(crate::reference::Repository, Descriptor)>,
}

impl BuiltImage {
    /// Every layer once, in first-use order: identical layers across platforms are one blob.
    pub fn unique_layers(&self) -> Vec<Descriptor> {
        let mut seen = std::collections::HashSet::new();
        self.images
            .iter()
            .flat_map(|i| i.layers.iter())
            .filter(|d| seen.insert(d.digest.clone()))
            .cloned()
            .collect()
    }
}

/// A built layer as the config and manifest need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub descriptor: Descriptor,
    /// Digest of the uncompressed tar (config `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// What made it, for the config's `history`.
    pub created_by: String,
}

/// Format seconds since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`), as the image
/// config's `created` and the `org.opencontainers.image.created` annotation want.
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

fn oci_err(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> ImageError {
    move |source| ImageError::Oci { what, source }
}

fn oci_descriptor(d: &Descriptor) -> Result<oci::Descriptor, ImageError> {
    let digest: oci::Digest = d
        .digest
        .to_string()
        .parse()
        .map_err(oci_err("descriptor"))?;
    let mut out = oci::Descriptor::new(oci::MediaType::from(d.media_type.as_str()), d.size, digest);
    if !d.urls.is_empty() {
        out.set_urls(Some(d.urls.clone()));
    }
    // A HashMap here, but the manifest goes through canonical JSON (sorted keys).
    out.set_annotations(hashmap(&d.annotations));
    Ok(out)
}

fn oci_arch(p: &Platform) -> oci::Arch {
    oci::Arch::from(p.arch.as_str())
}

fn hashmap(m: &BTreeMap<String, String>) -> Option<HashMap<String, String>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The image config for one platform (image-spec config.md). With `base` (the base image's
/// config JSON), the result inherits from it as [`inherit`] describes.
pub fn config(
    platform: &Platform,
    runtime: &RuntimeConfig,
    layers: &[LayerInfo],
    epoch: u64,
    base: Option<&serde_json::Value>,
) -> Result<JsonBlob, ImageError> {
    let created = rfc3339(epoch);
    let env: Vec<String> = runtime
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut cfg = oci::ConfigBuilder::default();
    match (&runtime.user, base) {
        (Some(user), _) => cfg = cfg.user(user.clone()),
        (None, None) => cfg = cfg.user(crate::spec::DEFAULT_USER.to_string()),
        (None, Some(_)) => {} // the base's User, below
    }
    if !env.is_empty() {
        cfg = cfg.env(env);
    }
    if let Some(e) = &runtime.entrypoint {
        cfg = cfg.entrypoint(e.clone());
    }
    if let Some(c) = &runtime.cmd {
        cfg = cfg.cmd(c.clone());
    }
    if let Some(w) = &runtime.workdir {
        cfg = cfg.working_dir(w.clone());
    }
    if let Some(l) = hashmap(&runtime.labels) {
        cfg = cfg.labels(l);
    }
    if !runtime.exposed_ports.is_empty() {
        cfg = cfg.exposed_ports(runtime.exposed_ports.clone());
    }
    if let Some(s) = &runtime.stop_signal {
        cfg = cfg.stop_signal(s.clone());
    }
    let cfg = cfg.build().map_err(oci_err("image config"))?;

    let rootfs = oci::RootFsBuilder::default()
        .typ("layers")
        .diff_ids(
            layers
                .iter()
                .map(|l| l.diff_id.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(oci_err("image config rootfs"))?;
    let history = layers
        .iter()
        .map(|l| {
            oci::HistoryBuilder::default()
                .created(created.clone())
                .created_by(l.created_by.clone())
                .comment("imgbuild")
                .build()
                .map_err(oci_err("image config history"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut image = oci::ImageConfigurationBuilder::default()
        .created(created)
        .architecture(oci_arch(platform))
        .os(oci::Os::from(platform.os.as_str()))
        .config(cfg)
        .rootfs(rootfs)
        .history(history);
    if let Some(v) = &platform.variant {
        image = image.variant(v.clone());
    }
    let image = image.build().map_err(oci_err("image config"))?;
    let mut value = serde_json::to_value(&image).map_err(|source| ImageError::Json {
        what: "image config",
        source,
    })?;
    if let Some(base) = base {
        inherit(&mut value, base);
    }
    JsonBlob::canonical(MEDIA_TYPE_CONFIG, &value, "image config")
}

/// Make our config `ours` (JSON) inherit from the base image's config `base` (what
/// `docker build` does for `FROM`, and ko/crane for a base image):
/// - `Env`: the base's variables in their order, ours replacing a base variable of the same
///   name in place, new ones appended;
/// - `Labels`, `ExposedPorts`, `Volumes`: union, ours win;
/// - every other `config` field (`User`, `WorkingDir`, `Entrypoint`, `Cmd`, `StopSignal`,
///   `Healthcheck`, ...) is the base's unless we set it — except that setting `Entrypoint`
///   drops the base's `Cmd` (Dockerfile reference, "Understand how CMD and ENTRYPOINT
///   interact": a base CMD is meant for the base's entrypoint);
/// - `rootfs.diff_ids` and `history`: the base's first, then ours.
///
/// Platform fields (`architecture`, `os`, `variant`) and `created` stay ours.
pub fn inherit(ours: &mut serde_json::Value, base: &serde_json::Value) {
    use serde_json::{Map, Value};
    let empty = Map::new();
    let base_cfg = base
        .get("config")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    if !ours["config"].is_object() {
        ours["config"] = Value::Object(Map::new());
    }
    if let Some(cfg) = ours["config"].as_object_mut() {
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let name = |e: &str| e.split('=').next().unwrap_or_default().to_string();
        let mut env = strings(base_cfg.get("Env"));
        for ours_var in strings(cfg.get("Env")) {
            match env.iter_mut().find(|b| name(b) == name(&ours_var)) {
                Some(slot) => *slot = ours_var,
                None => env.push(ours_var),
            }
        }
        if !env.is_empty() {
            cfg.insert("Env".into(), Value::from(env));
        }
        for key in ["Labels", "ExposedPorts", "Volumes"] {
            let mut merged = base_cfg
                .get(key)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if let Some(o) = cfg.get(key).and_then(Value::as_object) {
                merged.extend(o.clone());
            }
            if !merged.is_empty() {
                cfg.insert(key.into(), Value::Object(merged));
            }
        }
        let our_entrypoint = cfg.contains_key("Entrypoint");
        for (key, value) in base_cfg {
            if cfg.contains_key(key) || value.is_null() || (key == "Cmd" && our_entrypoint) {
                continue;
            }
            cfg.insert(key.clone(), value.clone());
        }
    }
    let prepend = |ours: &mut Value, base: Option<&Value>| {
        let mut all = base.and_then(Value::as_array).cloned().unwrap_or_default();
        all.extend(ours.as_array().cloned().unwrap_or_default());
        *ours = Value::Array(all);
    };
    prepend(
        &mut ours["rootfs"]["diff_ids"],
        base["rootfs"].get("diff_ids"),
    );
    prepend(&mut ours["history"], base.get("history"));
}

/// The manifest for one platform (image-spec manifest.md).
pub fn manifest(
    config: &JsonBlob,
    layers: &[Descriptor],
    annotations: &BTreeMap<String, String>,
) -> Result<JsonBlob, ImageError> {
    let mut m = oci::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(oci::MediaType::ImageManifest)
        .config(oci_descriptor(&config.descriptor())?)
        .layers(
            layers
                .iter()
                .map(oci_descriptor)
                .collect::<Result<Vec<_>, _>>()?,
        );
    if let Some(a) = hashmap(annotations) {
        m = m.annotations(a);
    }
    let m = m.build().map_err(oci_err("image manifest"))?;
    JsonBlob::canonical(MEDIA_TYPE_MANIFEST, &m, "image manifest")
}

/// The index over all platforms' manifests (image-spec image-index.md), `platform` on each.
pub fn index(
    images: &[(Platform, Descriptor)],
    annotations: &BTreeMap<String, String>,
) -> Result<JsonBlob, ImageError> {
    let manifests = images
        .iter()
        .map(|(p, d)| {
            let mut platform = oci::PlatformBuilder::default()
                .architecture(oci_arch(p))
                .os(oci::Os::from(p.os.as_str()));
            if let Some(v) = &p.variant {
                platform = platform.variant(v.clone());
            }
            let mut desc = oci_descriptor(d)?;
            desc.set_platform(Some(platform.build().map_err(oci_err("index platform"))?));
            Ok(desc)
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    let mut idx = oci::ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(oci::MediaType::ImageIndex)
        .manifests(manifests);
    if let Some(a) = hashmap(annotations) {
        idx = idx.annotations(a);
    }
    let idx = idx.build().map_err(oci_err("image index"))?;
    JsonBlob::canonical(MEDIA_TYPE_INDEX, &idx, "image index")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_table() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ];
        for (epoch, want) in cases {
            assert_eq!(rfc3339(epoch), want);
        }
    }

    #[test]
    fn canonical_json_sorts_keys_and_escapes() {
        let mut labels = BTreeMap::new();
        for k in ["z", "a", "m", "b", "y"] {
            labels.insert(k.to_string(), format!("line1\nline2 {k}"));
        }
        let runtime = RuntimeConfig {
            user: Some("65532:65532".into()),
            labels,
            exposed_ports: vec!["8080/tcp".into(), "53/udp".into()],
            ..Default::default()
        };
        let p = Platform::new("linux", "amd64", None);
        let first = config(&p, &runtime, &[], 0, None).unwrap();
        // Many serializations in this process (HashMap seeds differ per map) give one result.
        for _ in 0..20 {
            assert_eq!(config(&p, &runtime, &[], 0, None).unwrap(), first);
        }
        let text = std::str::from_utf8(&first.bytes).unwrap();
        assert!(
            text.contains(r#""Labels":{"a":"line1\nline2 a","b":"#),
            "{text}"
        );
        assert!(!text.contains(": "), "no insignificant whitespace: {text}");
        assert!(!text.contains('\n'));
        let v: serde_json::Value = serde_json::from_slice(&first.bytes).unwrap();
        assert_eq!(v["architecture"], "amd64");
        assert_eq!(v["config"]["ExposedPorts"]["53/udp"], serde_json::json!({}));
    }

    /// Each case: our `[config]`, and the config fields the result must have (`null`: absent).
    #[test]
    fn inherits_from_a_base_config() {
        use serde_json::{Value, json};
        let base = json!({
            "architecture": "arm64", "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin:/bin", "LANG=C", "TZ=UTC"],
                "User": "1000", "WorkingDir": "/home", "Entrypoint": ["/bin/sh"],
                "Cmd": ["-c", "echo base"], "Labels": {"a": "base", "b": "base"},
                "ExposedPorts": {"22/tcp": {}}, "Volumes": {"/data": {}},
                "Healthcheck": {"Test": ["NONE"]}, "Domainname": null
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:b1", "sha256:b2"]},
            "history": [{"created_by": "base 1"}, {"created_by": "base 2"}]
        });
        let layer = LayerInfo {
            descriptor: Descriptor::new(MEDIA_TYPE_LAYER_GZIP, Digest::of(b"l"), 1),
            diff_id: Digest::of(b"d"),
            created_by: "ours".into(),
        };
        let mut ours_env = BTreeMap::new();
        ours_env.insert("LANG".to_string(), "C.UTF-8".to_string());
        ours_env.insert("APP".to_string(), "1".to_string());
        let mut ours_labels = BTreeMap::new();
        ours_labels.insert("b".to_string(), "ours".to_string());
        let cases: Vec<(RuntimeConfig, Vec<(&str, Value)>)> = vec![
            (
                RuntimeConfig::default(),
                vec![
                    ("Env", json!(["PATH=/usr/bin:/bin", "LANG=C", "TZ=UTC"])),
                    ("User", json!("1000")),
                    ("WorkingDir", json!("/home")),
                    ("Entrypoint", json!(["/bin/sh"])),
                    ("Cmd", json!(["-c", "echo base"])),
                    ("Healthcheck", json!({"Test": ["NONE"]})),
                    ("Volumes", json!({"/data": {}})),
                    ("Domainname", Value::Null),
                ],
            ),
            (
                RuntimeConfig {
                    env: ours_env,
                    user: Some("0:0".into()),
                    entrypoint: Some(vec!["/app".into()]),
                    labels: ours_labels,
                    exposed_ports: vec!["8080/tcp".into()],
                    ..Default::default()
                },
                vec![
                    (
                        "Env",
                        json!(["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "TZ=UTC", "APP=1"]),
                    ),
                    ("User", json!("0:0")),
                    ("Entrypoint", json!(["/app"])),
                    ("Cmd", Value::Null),
                    ("Labels", json!({"a": "base", "b": "ours"})),
                    ("ExposedPorts", json!({"22/tcp": {}, "8080/tcp": {}})),
                ],
            ),
            (
                RuntimeConfig {
                    cmd: Some(vec!["serve".into()]),
                    workdir: Some("/app".into()),
                    ..Default::default()
                },
                vec![
                    ("Entrypoint", json!(["/bin/sh"])),
                    ("Cmd", json!(["serve"])),
                    ("WorkingDir", json!("/app")),
                ],
            ),
        ];
        let p = Platform::new("linux", "amd64", None);
        for (runtime, want) in cases {
            let blob = config(&p, &runtime, std::slice::from_ref(&layer), 0, Some(&base)).unwrap();
            let v: Value = serde_json::from_slice(&blob.bytes).unwrap();
            for (key, value) in want {
                assert_eq!(v["config"][key], value, "{key} for {runtime:?}");
            }
            assert_eq!(v["architecture"], "amd64");
            assert_eq!(
                v["rootfs"]["diff_ids"],
                json!(["sha256:b1", "sha256:b2", Digest::of(b"d").to_string()])
            );
            let history: Vec<&str> = v["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["created_by"].as_str().unwrap())
                .collect();
            assert_eq!(history, ["base 1", "base 2", "ours"]);
        }
        // Without a base, the default user applies.
        let v: Value = serde_json::from_slice(
            &config(&p, &RuntimeConfig::default(), &[], 0, None)
                .unwrap()
                .bytes,
        )
        .unwrap();
        assert_eq!(v["config"]["User"], crate::spec::DEFAULT_USER);
    }
}
