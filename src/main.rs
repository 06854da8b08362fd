//! The `imgbuild` binary: parse the command line, read the environment, call the library,
//! map errors to the documented exit codes. Nothing else lives here.

mod cli;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cli::{BuildArgs, Cli, Command, CommonArgs, PushArgs};
use imgbuild::base;
use imgbuild::cache::LayerCache;
use imgbuild::compress::{Codec, Compression};
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
    let (spec, options) = prepare(c)?;
    let repository = repository(c, &spec)?;
    let tags = tags(c, &spec)?;
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
            timeout: Duration::from_secs(args.timeout.max(1)),
            retry: RetryPolicy {
                retries: args.retries,
                base_delay: Duration::from_millis(args.retry_base_ms),
                deadline: Duration::from_secs(args.deadline),
            },
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
    let (spec, options) = prepare(c)?;
    let repository = repository(c, &spec)?.ok_or_else(|| {
        Error::Usage(format!(
            "no repository: give --repo REGISTRY/PATH, set IMGBUILD_REPO, or add `repository` to {}",
            spec.path.display()
        ))
    })?;
    let tags = tags(c, &spec)?;
    let credentials = credentials(args)?;
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
    let pushed = run::push(&req, progress.as_ref())?;
    println!("{}", pushed.image_ref);
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
