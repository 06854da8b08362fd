//! The `imgbuild` binary: parse the command line, read the environment, call the library,
//! map errors to the documented exit codes. Nothing else lives here.

mod cli;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cli::{BuildArgs, Cli, Command, CommonArgs, PushArgs};
use imgbuild::base;
use imgbuild::cache::LayerCache;
use imgbuild::compress::{Codec, Compression};
use imgbuild::context;
use imgbuild::layer::LayerOptions;
use imgbuild::output::Outputs;
use imgbuild::pipeline::BuildOptions;
use imgbuild::progress::{self, Progress, Verbosity};
use imgbuild::reference::{Repository, validate_tag};
use imgbuild::registry::{AwsOptions, Credentials, PushOptions, RetryPolicy, Secret};
use imgbuild::spec::{self, Spec};
use imgbuild::{Error, ExitCode, run};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match execute(cli) {
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

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build(args) => build(&args),
        Command::Push(args) => push(&args),
    }
}

fn build(args: &BuildArgs) -> Result<()> {
    let c = &args.common;
    let progress = make_progress(c);
    let (spec, mut options) = prepare(c)?;
    let repository = repository(c, &spec)?;
    let tags = tags(c, &spec)?;
    // Lives until the build is done: an unpacked context is removed when it is dropped.
    let context = open_context(c, None, false)?;
    options.context = context.as_ref().map(|ctx| ctx.dir().to_path_buf());
    let layout = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("out").join(spec.name()));
    let req = run::BuildRequest {
        image: image_request(c, spec, options, tags)?,
        // Reaching base image registries: like push, without --username.
        pull: PushOptions {
            insecure_registries: args.insecure_registries.clone(),
            ca_certs: args.ca_certs.clone(),
            jobs: usize::from(c.jobs),
            ..PushOptions::default()
        },
        layout,
        tarball: args.tarball.clone(),
        repository,
    };
    let image = run::build(&req, progress.as_ref())?;
    if !c.quiet {
        let dir = req.layout.display();
        let tag = req.image.tags.first().map_or("", String::as_str);
        eprintln!("wrote OCI layout {dir} (oci:{dir}:{tag})");
    }
    println!("{}", image.index.digest);
    Ok(())
}

fn push(args: &PushArgs) -> Result<()> {
    let c = &args.common;
    let progress = make_progress(c);
    let (spec, mut options) = prepare(c)?;
    let repositories = repositories(c, &spec)?;
    let Some((repository, more)) = repositories.split_first() else {
        bail!(Error::Usage(format!(
            "no repository: give --repo REGISTRY/PATH, set IMGBUILD_REPO, or add `repository` to {}",
            spec.path.display()
        )));
    };
    if args.username.is_some()
        && let Some(other) = more.iter().find(|r| r.registry != repository.registry)
    {
        bail!(Error::Usage(format!(
            "--username/--password-stdin are for one registry ({}), but --repo {other} is on {}; log in to each registry instead (docker login, credential helpers, ECR through AWS credentials)",
            repository.registry, other.registry
        )));
    }
    let tags = tags(c, &spec)?;
    let credentials = credentials(args)?;
    let context = open_context(c, args.aws_role_arn.as_deref(), args.password_stdin)?;
    options.context = context.as_ref().map(|ctx| ctx.dir().to_path_buf());
    let repository = repository.clone();
    let req = run::PushRequest {
        image: image_request(c, spec, options, tags)?,
        push: PushOptions {
            jobs: usize::from(c.jobs),
            insecure_registries: args.insecure_registries.clone(),
            ca_certs: args.ca_certs.clone(),
            credentials,
            timeout: Duration::from_secs(args.timeout.max(1)),
            resolve: args.resolve.clone(),
            aws: AwsOptions {
                role_arn: args.aws_role_arn.clone().filter(|a| !a.trim().is_empty()),
                create_repository: args.create_repository,
                scan_on_push: args.ecr_scan_on_push,
                immutable_tags: args.ecr_immutable_tags,
            },
            retry: RetryPolicy {
                retries: args.retries,
                base_delay: Duration::from_millis(args.retry_base_ms),
                deadline: Duration::from_secs(args.deadline),
            },
            ..PushOptions::default()
        },
        repository,
    };
    // One line per repository, in the order given.
    for pushed in run::push_many(&req, more, progress.as_ref())? {
        println!("{}", pushed.image_ref);
    }
    drop(context);
    Ok(())
}

/// `--username` with the password from standard input (`--password-stdin`).
fn credentials(args: &PushArgs) -> Result<Option<Credentials>> {
    if !args.password_stdin {
        return Ok(None);
    }
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
    Ok(Some(Credentials {
        username: args.username.clone().unwrap_or_default(),
        password: Secret::new(password),
    }))
}

/// What both commands build: the spec and options, `--base` (relative to the working
/// directory, like every flag's path), the tags and the outputs.
fn image_request(
    c: &CommonArgs,
    spec: Spec,
    options: BuildOptions,
    tags: Vec<String>,
) -> Result<run::ImageRequest> {
    let base = c
        .base
        .as_deref()
        .map(|b| spec::Base::parse(b, std::path::Path::new("")))
        .transpose()
        .map_err(|m| Error::Usage(format!("--base: {m}")))?;
    Ok(run::ImageRequest {
        spec,
        options,
        base,
        base_cache: base::default_cache_dir(),
        tags,
        outputs: outputs(c),
    })
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
        // Set by the command once the context is open (it may have to be unpacked).
        context: None,
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

/// The one repository `build` names in its outputs.
fn repository(c: &CommonArgs, spec: &Spec) -> Result<Option<Repository>> {
    let mut all = repositories(c, spec)?;
    if all.len() > 1 {
        bail!(Error::Usage(
            "build: give one --repo (several are for push, which pushes one build to each)".into()
        ));
    }
    Ok(all.pop())
}

/// `--repo` (repeated or comma-separated, also in IMGBUILD_REPO) in order without
/// duplicates, else the spec's `repository`.
fn repositories(c: &CommonArgs, spec: &Spec) -> Result<Vec<Repository>> {
    let mut out: Vec<Repository> = Vec::new();
    for r in c.repo.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        let repo = Repository::parse(r)
            .map_err(Error::from)
            .context("--repo")?;
        if !out.contains(&repo) {
            out.push(repo);
        }
    }
    if out.is_empty() {
        out.extend(spec.repository.clone());
    }
    Ok(out)
}

/// `--context`: a directory is used as it is; a tarball (file, `-`, S3) is unpacked into a
/// private temporary directory that lives as long as the returned value, and is removed on
/// SIGINT/SIGTERM too. `None` without `--context` (the spec's directory).
fn open_context(
    c: &CommonArgs,
    aws_role_arn: Option<&str>,
    stdin_taken: bool,
) -> Result<Option<context::Context>> {
    let Some(source) = &c.context else {
        return Ok(None);
    };
    if stdin_taken && *source == context::ContextSource::Stdin {
        bail!(Error::Usage(
            "--context - and --password-stdin both want standard input; pass the context as a file or s3:// URL".into()
        ));
    }
    if !matches!(source, context::ContextSource::Path(p) if p.is_dir()) {
        remove_unpacked_context_on_signal();
    }
    let limits = context::Limits {
        max_size: c.context_max_size,
        max_entries: c.context_max_entries,
    };
    let ctx = context::open(source, &limits, aws_role_arn, || Box::new(std::io::stdin()))
        .map_err(Error::from)?;
    Ok(Some(ctx))
}

/// Ctrl-C or a Job's SIGTERM while a tarball context is unpacked: remove it, then exit as
/// the signal would have (128 + signal number).
fn remove_unpacked_context_on_signal() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // no handler: the default (exit without cleanup) stays
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            context::remove_unpacked();
            std::process::exit(128 + sig);
        }
    });
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
