//! The two commands as library calls: [`build`] (into an OCI image layout) and [`push`] (to a
//! registry, uploading each layer while the others are still being built). Each resolves the
//! base images, runs the [`pipeline`], hands the image to its sink and writes the requested
//! [`Outputs`].
//!
//! Everything comes in as plain data: no environment, no standard input, no command line. The
//! caller (`main.rs`) gathers the requests and prints the result.

use crate::base::{self, BaseSource};
use crate::docker_archive;
use crate::error::Error;
use crate::image::BuiltImage;
use crate::layout;
use crate::output::{self, Outputs, Summary};
use crate::overlap::{self, LayerFeed};
use crate::pipeline::{self, BuildOptions};
use crate::progress::{Event, Progress};
use crate::reference::Repository;
use crate::registry::{self, RegistryOptions};
use crate::spec::{self, Spec};
use crate::static_base;
use crate::store::BlobStore;
use crate::supply::{self, BuildFacts, SupplyOptions};
use std::path::PathBuf;

/// What to build, shared by [`BuildRequest`] and [`PushRequest`].
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub spec: Spec,
    /// `bases` is left empty: the bases are resolved here, from `base` and the spec.
    pub options: BuildOptions,
    /// `--base`: the base of every platform without a `[base_overrides]` entry.
    pub base: Option<spec::Base>,
    /// Where base images from registries are cached ([`base::default_cache_dir`]).
    pub base_cache: Option<PathBuf>,
    /// Tags to push; the first also names the image in a layout.
    pub tags: Vec<String>,
    pub outputs: Outputs,
    /// SBOM and provenance referrers (`--sbom`, `--provenance`, `--sbom-output`).
    pub supply: SupplyOptions,
    /// The CA bundle of the built-in base `static` (default `static_base::DEFAULT_BUNDLE`).
    pub static_ca_bundle: Option<PathBuf>,
}

/// `imgbuild build`.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub image: ImageRequest,
    /// How to reach base image registries.
    pub pull: RegistryOptions,
    /// The OCI image layout to write.
    pub layout: PathBuf,
    /// Also write the layout as this tar file.
    pub tarball: Option<PathBuf>,
    /// What `tarball` holds: the OCI layout, or one platform as `docker save` writes it.
    pub tarball_format: layout::TarballFormat,
    /// Named in the outputs; nothing is pushed.
    pub repository: Option<Repository>,
}

/// `imgbuild push`.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub image: ImageRequest,
    /// How to reach the registry; `mount_sources` and `mount_from` are filled in here.
    pub push: RegistryOptions,
    pub repository: Repository,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushOutcome {
    pub image: BuiltImage,
    /// `REPO@sha256:...`, the pushed index.
    pub image_ref: String,
    /// Tags now pointing at the index.
    pub tags: Vec<String>,
}

/// Build the image into the layout `req.layout` (base layers included) and the tarball.
///
/// A build that fails leaves no trace in an output directory that was missing or empty
/// before it (the blob store is opened before the spec's files are planned and checked, so a
/// refused build would otherwise leave an empty `blobs/sha256/` that looks like a layout).
/// An existing layout keeps what it had; blobs written into it are unreferenced, never listed.
pub fn build(req: &BuildRequest, progress: &dyn Progress) -> Result<BuiltImage, Error> {
    let dir = &req.layout;
    // A directory that is not a layout (or an index.json that cannot be added to) is the
    // user's choice to fix (exit 2); failing to read the directory is local I/O (exit 1).
    layout::check_output_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::InvalidData => {
            Error::Usage(e.to_string())
        }
        _ => Error::io("--output", e),
    })?;
    let existed = dir.exists();
    let was_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    let built = build_into(req, progress);
    if built.is_err() {
        if !existed {
            let _ = std::fs::remove_dir_all(dir);
        } else if was_empty {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    built
}

fn build_into(req: &BuildRequest, progress: &dyn Progress) -> Result<BuiltImage, Error> {
    let dir = &req.layout;
    let store =
        BlobStore::open(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let runtime = runtime()?;
    let (mut opts, cache) = with_bases(&req.image, &req.pull, None, &runtime, progress)?;
    add_static_bases(&req.image, &mut opts, &store)?;
    let (image, plan) = pipeline::build_with_plan(&req.image.spec, &opts, &store, progress)?;
    // The layout must be complete: the base's layers go into it too.
    runtime.block_on(base::fetch_layers(
        &image.remote_layers,
        &store,
        cache.as_ref(),
        &req.pull,
        progress,
    ))?;
    let tags = &req.image.tags;
    layout::write_layout(&image, &store, tags)
        .map_err(|e| Error::io(format!("writing OCI layout {}", dir.display()), e))?;
    // `--sbom spdx` / `--provenance`: the same referrers a push attaches, in the layout.
    let name = req
        .repository
        .as_ref()
        .map_or_else(|| req.image.spec.name(), Repository::to_string);
    let attachments = supply::attachments(
        &image,
        &plan,
        &BuildFacts {
            spec: &req.image.spec,
            image_name: &name,
            repository: req.repository.as_ref().map(|_| name.as_str()),
            tags,
            epoch: opts.layer.epoch,
            bases: &opts.bases,
            cache: opts.cache.as_ref(),
            file_sums: opts.file_sums.as_ref(),
        },
        &req.image.supply,
        progress,
    )?;
    supply::write_to_layout(&store, &attachments)
        .map_err(|e| Error::io(format!("writing referrers into {}", dir.display()), e))?;
    if let Some(t) = &req.tarball {
        let written = match req.tarball_format {
            layout::TarballFormat::Oci => layout::write_tarball(&image, &store, tags, t),
            layout::TarballFormat::Docker => {
                let one = docker_archive::platform_image(&image).ok_or_else(|| {
                    Error::Usage("--tarball-format docker: the image has no platform".into())
                })?;
                // `docker load` tags the image only when it has a repository to name.
                let repo_tags: Vec<String> = req
                    .repository
                    .iter()
                    .flat_map(|r| tags.iter().map(move |t| format!("{r}:{t}")))
                    .collect();
                docker_archive::write(one, &store, &repo_tags, t)
            }
        };
        written.map_err(|e| Error::io(format!("writing --tarball {}", t.display()), e))?;
    }
    let summary = Summary {
        image: &image,
        repository: req.repository.as_ref().map(Repository::to_string),
        tags: Vec::new(),
        layout: Some(dir.clone()),
        spec: Some(&req.image.spec.path),
        pushed: false,
    };
    write_outputs(&req.image.outputs, &summary)?;
    Ok(image)
}

/// Build the image and push it to `req.repository` with `req.image.tags`.
pub fn push(req: &PushRequest, progress: &dyn Progress) -> Result<PushOutcome, Error> {
    // One repository in, one outcome out.
    Ok(push_many(req, &[], progress)?.swap_remove(0))
}

/// Build the image once and push it to `req.repository` and to every repository of `more`
/// (Kaniko's repeated `--destination`), which may be on other registries: layers are built
/// once into one store and uploaded to each repository as they are finished, each registry
/// over its own session with its own credentials (`req.push.credentials` are for
/// `req.repository`'s registry only). One outcome per repository, in order; all share the
/// index digest. The outputs list every destination ([`output::write_all`]).
pub fn push_many(
    req: &PushRequest,
    more: &[Repository],
    progress: &dyn Progress,
) -> Result<Vec<PushOutcome>, Error> {
    let first = &req.repository;
    let mut repos: Vec<&Repository> = vec![first];
    for r in more {
        if !repos.contains(&r) {
            repos.push(r);
        }
    }
    let cache = req.image.options.cache.as_ref();
    // Blobs go into the layer cache's store (kept for the next push), or without a
    // cache into a scratch store removed when the push ends.
    // `_scratch` lives until the push ends; it is created only when there is no cache.
    let (store, _scratch) = match cache {
        Some(cache) => (cache.store().clone(), None),
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("imgbuild-")
                .tempdir()
                .map_err(|e| Error::io("creating a temporary directory", e))?;
            let store =
                BlobStore::open(tmp.path()).map_err(|e| Error::io("creating the blob store", e))?;
            (store, Some(tmp))
        }
    };
    let mut push_opts: Vec<RegistryOptions> = repos
        .iter()
        .map(|repo| RegistryOptions {
            // Mount candidates: what the cache recorded for this registry (any of our blobs).
            mount_sources: cache.map(|c| c.all_mount_sources(repo)).unwrap_or_default(),
            // What earlier pushes put in this very repository (a re-push may send nothing).
            recorded: cache.map(|c| c.recorded_in(repo)).unwrap_or_default(),
            // --username/--password-stdin belong to the first repository's registry.
            credentials: req
                .push
                .credentials
                .clone()
                .filter(|_| repo.registry == first.registry),
            ..req.push.clone()
        })
        .collect();
    let runtime = runtime()?;
    let target = Some(first.registry.as_str());
    let (mut opts, _) = with_bases(&req.image, &push_opts[0], target, &runtime, progress)?;
    add_static_bases(&req.image, &mut opts, &store)?;
    // Base repositories on each target registry: their layers are mounted, so the
    // token must cover pulling from them (as registry::push does from the image).
    for (repo, o) in repos.iter().zip(push_opts.iter_mut()) {
        o.mount_from = opts
            .bases
            .values()
            .filter_map(|b| match &b.source {
                BaseSource::Registry(r) if r.registry == repo.registry => Some(r.path.clone()),
                _ => None,
            })
            .collect();
    }
    // Build on this thread; upload each layer as it is finished on another (overlap), to
    // every repository at once, and push the image from there as soon as it is built (its
    // configs beside the layer uploads still under way).
    // Layers are uploaded while they are compressed to the repositories whose upload mode
    // says so (`--upload-mode`; not ECR by default).
    let streams: Vec<bool> = repos
        .iter()
        .zip(&push_opts)
        .map(|(repo, o)| o.upload_mode.streams(&repo.registry))
        .collect();
    let (feed, queues) = LayerFeed::fan_out(progress, &streams);
    let (built_tx, built_rx) = tokio::sync::watch::channel(None);
    let tags = &req.image.tags;
    let (prepared, pushes) = std::thread::scope(|s| {
        let uploader = s.spawn(|| {
            let pushes = repos
                .iter()
                .zip(&push_opts)
                .zip(queues)
                .map(|((repo, o), q)| {
                    overlap::push_as_built(
                        registry::Session::connect(repo, o, progress),
                        q,
                        built_rx.clone(),
                        tags,
                        &store,
                        progress,
                    )
                });
            runtime.block_on(futures::future::join_all(pushes))
        });
        let prepared = pipeline::build_with_plan(&req.image.spec, &opts, &store, &feed).and_then(
            |(image, plan)| {
                // The documents are made before anything is tagged: a local failure leaves no
                // half push. They name the repository, so each destination gets its own.
                let attachments = repos
                    .iter()
                    .map(|repo| {
                        let repo_name = repo.to_string();
                        supply::attachments(
                            &image,
                            &plan,
                            &BuildFacts {
                                spec: &req.image.spec,
                                image_name: &repo_name,
                                repository: Some(&repo_name),
                                tags,
                                epoch: opts.layer.epoch,
                                bases: &opts.bases,
                                cache: opts.cache.as_ref(),
                                file_sums: opts.file_sums.as_ref(),
                            },
                            &req.image.supply,
                            progress,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((std::sync::Arc::new(image), attachments))
            },
        );
        match &prepared {
            Ok((image, _)) => {
                built_tx.send_replace(Some(std::sync::Arc::clone(image)));
                feed.close();
            }
            // Do not wait for uploads of an image that will not be pushed.
            Err(_) => feed.abort(),
        }
        drop(built_tx);
        let pushes = uploader.join();
        (prepared, pushes)
    });
    // A build error comes first (it is the user's to fix before any registry one).
    let (image, attachments) = prepared?;
    // The channel's copy goes with the last receiver: the image is then moved, not cloned.
    drop(built_rx);
    let image = std::sync::Arc::unwrap_or_clone(image);
    let (sessions, reports): (Vec<_>, Vec<_>) = pushes
        .map_err(|_| Error::UploadThreadPanicked)?
        .into_iter()
        .map(|p| p?.ok_or(Error::UploadThreadPanicked))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    // Every blob of the image (layers, configs) is now in each repository, whatever happens
    // to the referrers: record it for mounts and re-pushes.
    let blobs: Vec<_> = image
        .unique_layers()
        .into_iter()
        .map(|d| d.digest)
        .chain(image.images.iter().map(|i| i.config.digest.clone()))
        .collect();
    if let Some(cache) = cache {
        for repo in &repos {
            if let Err(e) = cache.record_pushed(repo, &blobs) {
                let warning = format!("layer cache {}: {e}", cache.root().display());
                progress.event(Event::Warning(&warning));
            }
        }
    }
    // Referrers go after the image and its tags: the image is usable whatever happens here,
    // and the error says so. Every destination at once (each its own registry session).
    let mut todo = Vec::new();
    for ((repo, session), (docs, report)) in repos
        .iter()
        .zip(&sessions)
        .zip(attachments.iter().zip(&reports))
    {
        if docs.is_empty() {
            continue;
        }
        // A tag naming our index does not prove its referrers were attached (an attach can
        // fail after tagging): skip them only when this cache recorded attaching these very
        // documents to this index in this repository.
        let referrers: Vec<_> = docs.iter().map(|a| a.manifest.digest.clone()).collect();
        if report.index_was_tagged
            && cache.is_some_and(|c| c.attached(repo, &report.index_digest, &referrers))
        {
            progress.event(Event::Debug(&format!(
                "{repo}@{}: its referrers were attached by an earlier push",
                report.index_digest
            )));
            continue;
        }
        todo.push((repo, session, docs, report, referrers));
    }
    let attached = runtime.block_on(futures::future::join_all(todo.iter().map(
        |(_, session, docs, report, _)| session.attach(docs, report.index_was_tagged, progress),
    )));
    let mut failed = None;
    for ((repo, _, _, report, referrers), result) in todo.iter().zip(attached) {
        match result {
            Ok(_) => {
                if let Some(cache) = cache
                    && let Err(e) = cache.record_attached(repo, &report.index_digest, referrers)
                {
                    let warning = format!("layer cache {}: {e}", cache.root().display());
                    progress.event(Event::Warning(&warning));
                }
            }
            Err(source) => {
                failed.get_or_insert(Error::AttachAfterPush {
                    image_ref: format!("{repo}@{}", report.index_digest),
                    source,
                });
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let summaries: Vec<Summary<'_>> = repos
        .iter()
        .zip(reports)
        .map(|(repo, report)| Summary {
            image: &image,
            repository: Some(repo.to_string()),
            tags: report.tags,
            layout: None,
            spec: Some(&req.image.spec.path),
            pushed: true,
        })
        .collect();
    // The image is in the registries whatever happens now: an output that cannot be written
    // is reported with the reference, which the caller still prints.
    output::write_all(&req.image.outputs, &summaries).map_err(|source| {
        Error::OutputsAfterPush {
            image_ref: summaries
                .iter()
                .map(Summary::image_ref)
                .collect::<Vec<_>>()
                .join(" "),
            source,
        }
    })?;
    let outcomes = summaries
        .into_iter()
        .map(|s| PushOutcome {
            image_ref: s.image_ref(),
            tags: s.tags,
            image: image.clone(),
        })
        .collect();
    Ok(outcomes)
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

fn write_outputs(outputs: &Outputs, summary: &Summary<'_>) -> Result<(), Error> {
    output::write(outputs, summary).map_err(|e| Error::io("writing outputs", e))
}

/// The build options with each platform's base image resolved (`--base`, `[base_overrides]`,
/// `base`), and the base image cache, when there is a registry base and a cache directory.
fn with_bases(
    req: &ImageRequest,
    pull: &RegistryOptions,
    target: Option<&str>,
    runtime: &tokio::runtime::Runtime,
    progress: &dyn Progress,
) -> Result<(BuildOptions, Option<BlobStore>), Error> {
    let spec = &req.spec;
    let mut opts = req.options.clone();
    // Without a layer cache, the documents take each file's sums from the build's one read.
    if opts.cache.is_none() && req.supply.any() && opts.file_sums.is_none() {
        opts.file_sums = Some(crate::digest::FileSumsMemo::default());
    }
    if let Some(root) = pipeline::confine_root(spec, &opts) {
        crate::plan::confine_base_layouts(spec, &root)?;
    }
    let platforms = opts
        .platforms
        .clone()
        .unwrap_or_else(|| spec.platforms.clone());
    let mut wanted = base::choose(
        &spec.base,
        &spec.base_overrides,
        req.base.as_ref(),
        &platforms,
    );
    // The built-in base is made locally (`add_static_bases`), not resolved.
    wanted.retain(|(_, b)| **b != spec::Base::Static);
    if wanted.is_empty() {
        return Ok((opts, None));
    }
    // Only registry bases are cached (a layout is local already).
    let remote = wanted
        .iter()
        .any(|(_, b)| matches!(b, spec::Base::Registry(_)));
    let cache = match req.base_cache.as_ref().filter(|_| remote) {
        Some(dir) => Some(open_base_cache(dir).map_err(|e| {
            Error::io(
                format!("creating the base image cache {}", dir.display()),
                e,
            )
        })?),
        None => None,
    };
    opts.bases = runtime.block_on(base::resolve(
        &wanted,
        pull,
        target,
        cache.as_ref(),
        progress,
    ))?;
    Ok((opts, cache))
}

/// The base image cache at `dir` (the cache's `bases/`), its blobs leased in the cache's
/// `locks/` like the layer cache's, so a concurrent prune leaves them alone.
fn open_base_cache(dir: &std::path::Path) -> std::io::Result<BlobStore> {
    let locks = dir
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(crate::cache::LOCKS);
    Ok(BlobStore::open(dir)?.with_leases(crate::lease::Leases::open(locks)?))
}

/// The platforms whose base is the built-in `static`: its layer is written into `store` (so
/// the sinks treat it as one of ours: a push uploads it, a layout holds it) and its config
/// goes into `opts.bases`. Nothing is downloaded.
fn add_static_bases(
    req: &ImageRequest,
    opts: &mut BuildOptions,
    store: &BlobStore,
) -> Result<(), Error> {
    let spec = &req.spec;
    let platforms = opts
        .platforms
        .clone()
        .unwrap_or_else(|| spec.platforms.clone());
    let wanted: Vec<_> = base::choose(
        &spec.base,
        &spec.base_overrides,
        req.base.as_ref(),
        &platforms,
    )
    .into_iter()
    .filter(|(_, b)| **b == spec::Base::Static)
    .map(|(p, _)| p)
    .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let layer = static_base::write_layer(req.static_ca_bundle.as_deref(), store)?;
    for platform in wanted {
        let config = static_base::config(&platform, &layer);
        opts.bases.insert(
            platform,
            base::ResolvedBase {
                name: static_base::NAME.to_string(),
                // Not an image in a registry: its layer's digest names what it was made of
                // (the same for every platform, so the index records it too).
                digest: layer.descriptor.digest.clone(),
                manifest_digest: layer.descriptor.digest.clone(),
                layers: vec![layer.descriptor.clone()],
                config,
                source: BaseSource::Layout(store.root().to_path_buf()),
            },
        );
    }
    Ok(())
}
