//! The whole build, stage after stage: spec -> plan -> layers -> image JSON. The result is a
//! [`BuiltImage`] whose blobs are all in the given [`BlobStore`]; the caller hands it to a sink
//! (an OCI layout on disk, or a registry).

use crate::base::{self, ResolvedBase};
use crate::cache::{self, LayerCache, Outcome};
use crate::digest::FileSumsMemo;
use crate::error::Error;
use crate::image::{self, BuiltImage, LayerInfo, PlatformImage};
use crate::layer::{self, LayerOptions};
use crate::plan::{self, LayerPlan, PlanOptions};
use crate::platform::Platform;
use crate::progress::{Event, Progress};
use crate::spec::Spec;
use crate::store::BlobStore;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

/// Everything about a build that does not come from the spec file.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `--context`: overrides the spec file's directory for relative `src` paths.
    pub context: Option<PathBuf>,
    /// `--platform`: overrides the spec's `platforms`.
    pub platforms: Option<Vec<Platform>>,
    pub arch_check: bool,
    /// `--allow-outside-context`: `src` may name files outside the build context (off: a
    /// spec reads only inside `context`, or the spec's project directory without it).
    pub allow_outside_context: bool,
    /// Extra annotations (`--annotation`, GitHub Actions source/revision), over the spec's.
    pub annotations: BTreeMap<String, String>,
    /// Includes `SOURCE_DATE_EPOCH` (`layer.epoch`), which also dates the config and index.
    pub layer: LayerOptions,
    /// How many layers to compress at once.
    pub jobs: usize,
    /// The layer cache; None with `--no-cache`.
    pub cache: Option<LayerCache>,
    /// Without a layer cache: keep each file's sums from the tar pass here (for the SBOM and
    /// provenance, which then read no input again). None: not wanted.
    pub file_sums: Option<FileSumsMemo>,
    /// Each platform's base image, resolved (`base::resolve`); platforms not here are scratch.
    pub bases: BTreeMap<Platform, ResolvedBase>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            context: None,
            platforms: None,
            arch_check: true,
            allow_outside_context: false,
            annotations: BTreeMap::new(),
            layer: LayerOptions::default(),
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cache: None,
            file_sums: None,
            bases: BTreeMap::new(),
        }
    }
}

/// The build context's root every file the spec names must stay inside: `--context`, else
/// the spec's project directory; None with `--allow-outside-context`.
pub fn confine_root(spec: &Spec, opts: &BuildOptions) -> Option<PathBuf> {
    (!opts.allow_outside_context)
        .then(|| opts.context.clone().unwrap_or_else(|| spec.default_root()))
}

/// Build the image for every platform into `store`.
pub fn build(
    spec: &Spec,
    opts: &BuildOptions,
    store: &BlobStore,
    progress: &dyn Progress,
) -> Result<BuiltImage, Error> {
    build_with_plan(spec, opts, store, progress).map(|(image, _)| image)
}

/// [`build`], also returning the plan (which files each platform's layers hold: the SBOM's
/// and provenance's input, `crate::supply`).
pub fn build_with_plan(
    spec: &Spec,
    opts: &BuildOptions,
    store: &BlobStore,
    progress: &dyn Progress,
) -> Result<(BuiltImage, plan::Plan), Error> {
    let platforms = opts
        .platforms
        .clone()
        .unwrap_or_else(|| spec.platforms.clone());
    if platforms.is_empty() {
        return Err(Error::Usage(
            "no platforms to build: name at least one with --platform".into(),
        ));
    }
    let plan = plan::plan(
        spec,
        &platforms,
        &PlanOptions {
            context: opts.context.clone().unwrap_or_else(|| spec.context.clone()),
            confine_to: confine_root(spec, opts),
            arch_check: opts.arch_check,
            based: opts.bases.keys().cloned().collect(),
        },
    )?;
    for w in &plan.warnings {
        progress.event(Event::Warning(w));
    }

    // Identical layer plans (same files, same modes: typically a layer without placeholders)
    // are built once and shared by every platform that has them.
    let mut unique: Vec<(&LayerPlan, Vec<String>)> = Vec::new();
    let mut slot: HashMap<&LayerPlan, usize> = HashMap::new();
    for pp in &plan.platforms {
        for lp in &pp.layers {
            let i = *slot.entry(lp).or_insert_with(|| {
                unique.push((lp, Vec::new()));
                unique.len() - 1
            });
            unique[i].1.push(pp.platform.to_string());
        }
    }
    let built = build_layers(&unique, store, opts, progress)?;

    let mut annotations = BTreeMap::new();
    annotations.insert(
        image::ANNOTATION_CREATED.to_string(),
        image::rfc3339(opts.layer.epoch),
    );
    annotations.extend(spec.annotations.clone());
    annotations.extend(opts.annotations.clone());

    // Base layers come first, exactly as the base lists them (its diff_ids must match).
    let remote_layers = base::collect_layers(&opts.bases, store)?;
    let mut images = Vec::new();
    for pp in &plan.platforms {
        let base = opts.bases.get(&pp.platform);
        let layers: Vec<LayerInfo> = pp.layers.iter().map(|lp| built[slot[lp]].clone()).collect();
        let config = image::config(
            &pp.platform,
            &spec.config,
            &layers,
            opts.layer.epoch,
            base.map(|b| &b.config),
        )?;
        let mut descriptors: Vec<_> = base.map(|b| b.layers.clone()).unwrap_or_default();
        descriptors.extend(layers.iter().map(|l| l.descriptor.clone()));
        let mut annotations = annotations.clone();
        annotations.extend(base.into_iter().flat_map(ResolvedBase::annotations));
        let manifest = image::manifest(&config, &descriptors, &annotations)?;
        for blob in [&config, &manifest] {
            store
                .put_bytes(&blob.bytes)
                .map_err(|e| Error::io(format!("writing to {}", store.root().display()), e))?;
        }
        images.push(PlatformImage {
            platform: pp.platform.clone(),
            config,
            layers: descriptors,
            manifest,
        });
    }
    let entries: Vec<_> = images
        .iter()
        .map(|i| (i.platform.clone(), i.manifest.descriptor()))
        .collect();
    // The index names the base only when every platform has the same one: then
    // `base.digest` is what that base reference resolved to (its index).
    let mut bases = opts.bases.values();
    if let Some(first) = bases.next()
        && opts.bases.len() == images.len()
        && bases.all(|b| b.name == first.name && b.digest == first.digest)
    {
        annotations.insert(image::ANNOTATION_BASE_NAME.into(), first.name.clone());
        annotations.insert(
            image::ANNOTATION_BASE_DIGEST.into(),
            first.digest.to_string(),
        );
    }
    let index = image::index(&entries, &annotations)?;
    store
        .put_bytes(&index.bytes)
        .map_err(|e| Error::io(format!("writing to {}", store.root().display()), e))?;
    Ok((
        BuiltImage {
            images,
            index,
            remote_layers,
        },
        plan,
    ))
}

/// Compress the unique layers on up to `jobs` threads; results in the same order.
fn build_layers(
    unique: &[(&LayerPlan, Vec<String>)],
    store: &BlobStore,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Vec<LayerInfo>, Error> {
    let jobs = opts.jobs.max(1);
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<Result<LayerInfo, layer::LayerError>>>> =
        Mutex::new((0..unique.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(unique.len()) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some((lp, platforms)) = unique.get(i) else {
                        break;
                    };
                    let r = match (&opts.cache, &opts.file_sums) {
                        (None, Some(memo)) => {
                            write_layer_keeping_sums(lp, store, opts, memo, progress)
                        }
                        (cache, _) => cache::write_layer_cached(
                            cache.as_ref(),
                            lp,
                            store,
                            &opts.layer,
                            progress,
                        ),
                    };
                    let r = r.map(|(info, outcome, warning)| {
                        if let Some(w) = warning {
                            progress.event(Event::Warning(&w));
                        }
                        let cached = if outcome == Outcome::Hit {
                            ", cached"
                        } else {
                            ""
                        };
                        let what =
                            format!("{} for {}{cached}", info.created_by, platforms.join(", "));
                        progress.event(Event::LayerBuilt {
                            digest: &info.descriptor.digest,
                            size: info.descriptor.size,
                            what: &what,
                        });
                        info
                    });
                    let failed = r.is_err();
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                    if failed {
                        // Stop taking new work; the first error is reported.
                        *next.lock().unwrap_or_else(|e| e.into_inner()) = usize::MAX / 2;
                    }
                }
            });
        }
    });
    let mut out = Vec::new();
    for r in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match r {
            Some(Ok(info)) => out.push(info),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}

/// Build `layer` without a cache, hashing each file as it is tarred into `memo`.
fn write_layer_keeping_sums(
    layer: &LayerPlan,
    store: &BlobStore,
    opts: &BuildOptions,
    memo: &FileSumsMemo,
    progress: &dyn Progress,
) -> Result<(LayerInfo, Outcome, Option<String>), layer::LayerError> {
    let (info, sums) = layer::write_layer_hashing(layer, store, &opts.layer, true, progress)?;
    for (e, s) in layer.entries.iter().zip(sums) {
        if let (plan::EntryKind::File { src, size }, Some(s)) = (&e.kind, s) {
            memo.insert(src, *size, s);
        }
    }
    Ok((info, Outcome::Built, None))
}
