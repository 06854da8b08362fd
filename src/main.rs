//! The `imgbuild` binary: parse the command line, read the environment, call the library,
//! map errors to the documented exit codes. Nothing else lives here.

mod cli;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cli::{Cli, Command, CommonArgs};
use imgbuild::base;
use imgbuild::cache::LayerCache;
use imgbuild::compress::{Codec, Compression};
use imgbuild::layer::LayerOptions;
use imgbuild::output::{self, Outputs, Summary};
use imgbuild::overlap::{self, LayerFeed};
use imgbuild::pipeline::{self, BuildOptions};
use imgbuild::progress::{self, Progress, Verbosity};
use imgbuild::reference::{Repository, validate_tag};
use imgbuild::registry::{self, AwsOptions, Credentials, PushOptions, Secret};
use imgbuild::spec::{self, Spec};
use imgbuild::store::BlobStore;
use imgbuild::{Error, ExitCode};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain joined with ": ", skipping causes the line already says
            // (many errors quote their io::Error in their own message).
            let mut line = String::new();
            for cause in e.chain() {
                let msg = cause.to_string();
                if !line.contains(&msg) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&msg);
                }
            }
            eprintln!("error: {line}");
            let code = e
                .chain()
                .find_map(|c| c.downcast_ref::<Error>())
                .map_or(ExitCode::Internal, Error::exit_code);
            std::process::ExitCode::from(code as u8)
        }
    }
}

/// `--help` and `--version` print as clap prints them; a bad command line is one line on
/// stderr (README "Exit codes": every error is one line) and exit code 2.
fn usage_error(e: &clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        let _ = e.print();
        return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
    }
    let rendered = e.render().to_string();
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let line = parts.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("error: {line}; see imgbuild --help");
    std::process::ExitCode::from(ExitCode::Usage as u8)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build(args) => {
            let c = &args.common;
            let progress = make_progress(c);
            let (spec, opts) = prepare(c)?;
            let repo = repository(c, &spec)?;
            let tags = tags(c, &spec)?;
            let dir = args
                .output
                .clone()
                .unwrap_or_else(|| PathBuf::from("out").join(spec.name()));
            let store = BlobStore::open(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            // Reaching base image registries: like push, without --username.
            let pull = PushOptions {
                insecure_registries: args.insecure_registries.clone(),
                ca_certs: args.ca_certs.clone(),
                jobs: usize::from(c.jobs),
                ..PushOptions::default()
            };
            let mut opts = opts;
            let runtime = runtime()?;
            let cache = with_bases(
                c,
                &spec,
                &mut opts,
                &pull,
                None,
                &runtime,
                progress.as_ref(),
            )?;
            let image = pipeline::build(&spec, &opts, &store, progress.as_ref())?;
            // The layout must be complete: the base's layers go into it too.
            runtime
                .block_on(base::fetch_layers(
                    &image.remote_layers,
                    &store,
                    cache.as_ref(),
                    &pull,
                    progress.as_ref(),
                ))
                .map_err(Error::from)?;
            let tag = tags.first().map(String::as_str);
            imgbuild::layout::write_layout(&image, &store, tag)
                .map_err(|e| Error::io(format!("writing OCI layout {}", dir.display()), e))?;
            if let Some(t) = &args.tarball {
                imgbuild::layout::write_tarball(&image, &store, tag, t)
                    .map_err(|e| Error::io(format!("writing {}", t.display()), e))?;
            }
            let summary = Summary {
                image: &image,
                repository: repo.map(|r| r.to_string()),
                tags: Vec::new(),
                layout: Some(dir.clone()),
            };
            output::write(&outputs(c), &summary).map_err(|e| Error::io("writing outputs", e))?;
            if !c.quiet {
                eprintln!(
                    "wrote OCI layout {} (oci:{}:{})",
                    dir.display(),
                    dir.display(),
                    tag.unwrap_or("")
                );
            }
            println!("{}", image.index.digest);
            Ok(())
        }
        Command::Push(args) => {
            let c = &args.common;
            let progress = make_progress(c);
            let (spec, opts) = prepare(c)?;
            let repo = repository(c, &spec)?.ok_or_else(|| {
                Error::Usage(format!(
                    "no repository: give --repo REGISTRY/PATH, set IMGBUILD_REPO, or add `repository` to {}",
                    spec.path.display()
                ))
            })?;
            let tags = tags(c, &spec)?;
            let credentials = if args.password_stdin {
                let mut password = String::new();
                std::io::stdin()
                    .read_to_string(&mut password)
                    .context("reading the password from standard input")?;
                let password = password.trim_end_matches(['\n', '\r']).to_string();
                if password.is_empty() {
                    bail!(Error::Usage(
                        "--password-stdin: standard input was empty".into()
                    ));
                }
                Some(Credentials {
                    username: args.username.clone().unwrap_or_default(),
                    password: Secret::new(password),
                })
            } else {
                None
            };
            // Blobs go into the layer cache's store (kept for the next push), or without a
            // cache into a scratch store removed when the push ends.
            let tmp = tempfile::Builder::new()
                .prefix("imgbuild-")
                .tempdir()
                .context("creating a temporary directory")?;
            let store = match &opts.cache {
                Some(cache) => cache.store().clone(),
                None => BlobStore::open(tmp.path())
                    .map_err(|e| Error::io("creating the blob store", e))?,
            };
            // Mount candidates: what the cache recorded for this registry (any of our blobs).
            let mount_sources = opts
                .cache
                .as_ref()
                .map(|c| c.all_mount_sources(&repo))
                .unwrap_or_default();
            let push_opts = PushOptions {
                jobs: usize::from(c.jobs),
                insecure_registries: args.insecure_registries.clone(),
                ca_certs: args.ca_certs.clone(),
                credentials,
                timeout: std::time::Duration::from_secs(args.timeout.max(1)),
                mount_sources,
                resolve: args.resolve.clone(),
                aws: AwsOptions {
                    role_arn: args.aws_role_arn.clone().filter(|a| !a.trim().is_empty()),
                    create_repository: args.create_repository,
                    scan_on_push: args.ecr_scan_on_push,
                    immutable_tags: args.ecr_immutable_tags,
                },
                retry: registry::RetryPolicy {
                    retries: args.retries,
                    base_delay: std::time::Duration::from_millis(args.retry_base_ms),
                    deadline: std::time::Duration::from_secs(args.deadline),
                },
                ..PushOptions::default()
            };
            let runtime = runtime()?;
            let mut opts = opts;
            let target = Some(repo.registry.as_str());
            with_bases(
                c,
                &spec,
                &mut opts,
                &push_opts,
                target,
                &runtime,
                progress.as_ref(),
            )?;
            // Base repositories on the target registry: their layers are mounted, so the
            // token must cover pulling from them (as registry::push does from the image).
            let mut push_opts = push_opts;
            push_opts.mount_from = opts
                .bases
                .values()
                .filter_map(|b| match &b.source {
                    base::BaseSource::Registry(r) if r.registry == repo.registry => {
                        Some(r.path.clone())
                    }
                    _ => None,
                })
                .collect();
            // Build on this thread; upload each layer as it is finished on another (issue 4).
            let (feed, queue) = LayerFeed::new(progress.as_ref());
            let (image, session) = std::thread::scope(|s| {
                let uploader = s.spawn(|| {
                    runtime.block_on(overlap::upload_as_built(
                        registry::Session::connect(&repo, &push_opts, progress.as_ref()),
                        queue,
                        &store,
                        push_opts.jobs,
                        progress.as_ref(),
                    ))
                });
                let image = pipeline::build(&spec, &opts, &store, &feed);
                feed.close();
                let session = uploader.join();
                (image, session)
            });
            // A build error comes first (it is the user's to fix before any registry one).
            let image = image?;
            let session = session
                .map_err(|_| anyhow::anyhow!("the upload thread panicked"))?
                .map_err(Error::from)?;
            let report = runtime
                .block_on(session.push_image(&image, &store, &tags, progress.as_ref()))
                .map_err(Error::from)?;
            // Every blob of the image (layers, configs) is now in `repo`: record it for mounts.
            let blobs: Vec<_> = image
                .unique_layers()
                .into_iter()
                .map(|d| d.digest)
                .chain(image.images.iter().map(|i| i.config.digest.clone()))
                .collect();
            if let Some(cache) = &opts.cache
                && let Err(e) = cache.record_pushed(&repo, &blobs)
            {
                eprintln!("warning: layer cache {}: {e}", cache.root().display());
            }
            let summary = Summary {
                image: &image,
                repository: Some(repo.to_string()),
                tags: report.tags.clone(),
                layout: None,
            };
            output::write(&outputs(c), &summary).map_err(|e| Error::io("writing outputs", e))?;
            println!("{}", summary.image_ref());
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolve the base image of each platform (`--base`, `[base_overrides]`, `base`) into
/// `opts.bases`; returns the base image cache, when there is a base and a cache directory.
/// `--base` paths (`oci:DIR`) are relative to the working directory, like every flag's.
fn with_bases(
    c: &CommonArgs,
    spec: &Spec,
    opts: &mut BuildOptions,
    pull: &PushOptions,
    target: Option<&str>,
    runtime: &tokio::runtime::Runtime,
    progress: &dyn Progress,
) -> Result<Option<BlobStore>> {
    let over = c
        .base
        .as_deref()
        .map(|b| spec::Base::parse(b, std::path::Path::new("")))
        .transpose()
        .map_err(|m| Error::Usage(format!("--base: {m}")))?;
    let platforms = opts
        .platforms
        .clone()
        .unwrap_or_else(|| spec.platforms.clone());
    let wanted = base::choose(&spec.base, &spec.base_overrides, over.as_ref(), &platforms);
    if wanted.is_empty() {
        return Ok(None);
    }
    // Only registry bases are cached (a layout is local already).
    let remote = wanted
        .iter()
        .any(|(_, b)| matches!(b, spec::Base::Registry(_)));
    let cache = match base::default_cache_dir().filter(|_| remote) {
        Some(dir) => Some(BlobStore::open(&dir).map_err(|e| {
            Error::io(
                format!("creating the base image cache {}", dir.display()),
                e,
            )
        })?),
        None => None,
    };
    opts.bases = runtime
        .block_on(base::resolve(
            &wanted,
            pull,
            target,
            cache.as_ref(),
            progress,
        ))
        .map_err(Error::from)?;
    Ok(cache)
}

fn make_progress(c: &CommonArgs) -> Box<dyn Progress> {
    let verbosity = match (c.quiet, c.verbose) {
        (true, _) => Verbosity::Quiet,
        (false, 0) => Verbosity::Normal,
        _ => Verbosity::Verbose,
    };
    if verbosity == Verbosity::Quiet {
        Box::new(progress::Silent)
    } else if std::io::stderr().is_terminal() {
        Box::new(progress::Bars::new(verbosity))
    } else {
        Box::new(progress::Lines::new(verbosity))
    }
}

/// Load the spec and turn flags and environment into build options.
fn prepare(c: &CommonArgs) -> Result<(Spec, BuildOptions)> {
    let spec = spec::load(&c.file).map_err(Error::from)?;
    let platforms = if c.platforms.is_empty() {
        None
    } else {
        let mut out = Vec::new();
        for p in c.platforms.iter().filter(|p| !p.trim().is_empty()) {
            out.push(
                p.trim()
                    .parse()
                    .map_err(|e| Error::Usage(format!("--platform: {e}")))?,
            );
        }
        if out.is_empty() {
            bail!(Error::Usage(
                "--platform: empty list; name at least one, e.g. linux/amd64".into()
            ));
        }
        Some(out)
    };
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Err(_) => 0,
        Ok(v) if v.trim().is_empty() => 0,
        Ok(v) => v.trim().parse::<u64>().map_err(|_| {
            Error::Usage(format!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970; unset it or set e.g. $(git log -1 --format=%ct)"
            ))
        })?,
    };
    let mut annotations = BTreeMap::new();
    // GitHub Actions: where the image came from (the variables every workflow run sets).
    if let (Ok(server), Ok(repo)) = (
        std::env::var("GITHUB_SERVER_URL"),
        std::env::var("GITHUB_REPOSITORY"),
    ) {
        annotations.insert(
            imgbuild::image::ANNOTATION_SOURCE.to_string(),
            format!("{server}/{repo}"),
        );
    }
    if let Ok(sha) = std::env::var("GITHUB_SHA") {
        annotations.insert(imgbuild::image::ANNOTATION_REVISION.to_string(), sha);
    }
    for a in &c.annotations {
        let (k, v) = a
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| Error::Usage(format!("--annotation {a:?}: expected KEY=VALUE")))?;
        annotations.insert(k.to_string(), v.to_string());
    }
    let codec: Codec = c
        .compression
        .parse()
        .map_err(|e| Error::Usage(format!("--compression: {e}")))?;
    let compression = Compression::new(codec, c.compression_level).map_err(Error::Usage)?;
    let opts = BuildOptions {
        context: c.context.clone(),
        platforms,
        layer: LayerOptions {
            epoch,
            compression,
            ..LayerOptions::default()
        },
        arch_check: !c.no_arch_check,
        annotations,
        jobs: usize::from(c.jobs),
        cache: open_cache(c),
        bases: BTreeMap::new(),
    };
    Ok((spec, opts))
}

/// The layer cache: `IMGBUILD_CACHE`, else the user's cache directory; none with `--no-cache`.
/// A cache that cannot be created is a warning, not an error: the build works without it.
fn open_cache(c: &CommonArgs) -> Option<LayerCache> {
    if c.no_cache {
        return None;
    }
    let dir = imgbuild::cache::default_dir()?;
    match LayerCache::open(&dir) {
        Ok(cache) => Some(cache),
        Err(e) => {
            eprintln!(
                "warning: layer cache {} unusable ({e}); building without it (--no-cache silences this)",
                dir.display()
            );
            None
        }
    }
}

fn repository(c: &CommonArgs, spec: &Spec) -> Result<Option<Repository>> {
    Ok(match &c.repo {
        Some(r) => Some(
            Repository::parse(r)
                .map_err(Error::from)
                .context("--repo")?,
        ),
        None => spec.repository.clone(),
    })
}

fn tags(c: &CommonArgs, spec: &Spec) -> Result<Vec<String>> {
    if c.tags.is_empty() {
        return Ok(spec.tags.clone());
    }
    for t in &c.tags {
        validate_tag(t).map_err(Error::from).context("--tag")?;
    }
    let mut tags = c.tags.clone();
    tags.dedup();
    Ok(tags)
}

fn outputs(c: &CommonArgs) -> Outputs {
    Outputs {
        digest_file: c.digest_file.clone(),
        image_refs: c.image_refs.clone(),
        metadata_file: c.metadata_file.clone(),
        github_output: std::env::var_os("GITHUB_OUTPUT")
            .map(PathBuf::from)
            .filter(|p| !p.as_os_str().is_empty()),
    }
}
