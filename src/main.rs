//! The `imgbuild` binary: parse the command line, read the environment, call the library,
//! map errors to the documented exit codes. Nothing else lives here.

mod cli;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cli::{
    BuildArgs, Cli, Command, CommonArgs, CopyArgs, InitArgs, PushArgs, RemoteArgs, ResolveArgs,
    TagArgs,
};
use imgbuild::base;
use imgbuild::cache::LayerCache;
use imgbuild::compress::{Codec, Compression};
use imgbuild::context;
use imgbuild::layer::LayerOptions;
use imgbuild::output::Outputs;
use imgbuild::pipeline::BuildOptions;
use imgbuild::progress::{self, Progress, Verbosity};
use imgbuild::reference::{Repository, validate_tag};
use imgbuild::registry::{AwsOptions, Credentials, RegistryOptions, RetryPolicy, Secret};
use imgbuild::spec::{self, Spec};
use imgbuild::{Error, ExitCode, run};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write as _};
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
            // The push succeeded: stdout still carries the reference (README "Outputs").
            if let Some(
                Error::OutputsAfterPush { image_ref, .. }
                | Error::AttachAfterPush { image_ref, .. },
            ) = e.chain().find_map(|c| c.downcast_ref::<Error>())
            {
                println!("{image_ref}");
            }
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
    // Point at the help of the subcommand the error is about, when there is one.
    let sub = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .filter(|a| {
            <Cli as clap::CommandFactory>::command()
                .get_subcommands()
                .any(|s| s.get_name() == a)
        });
    let help = match sub {
        Some(s) => format!("imgbuild {s} --help"),
        None => "imgbuild --help".into(),
    };
    eprintln!("error: {line}; see {help}");
    std::process::ExitCode::from(ExitCode::Usage as u8)
}

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build(args) => build(&args),
        Command::Push(args) => push(&args),
        Command::Inspect(args) => inspect(&args),
        Command::Resolve(args) => resolve(&args),
        Command::Init(args) => init(&args),
        Command::Copy(args) => copy(&args),
        Command::Tag(args) => tag(&args),
        Command::Cache(cmd) => cache_command(&cmd),
    }
}

/// `imgbuild cache du|prune`: prints to stdout (the sizes, or what was removed).
fn cache_command(cmd: &cli::CacheCommand) -> Result<()> {
    use imgbuild::prune::{self, human};
    let root = imgbuild::cache::default_dir().ok_or_else(|| {
        Error::Usage("no cache directory: set IMGBUILD_CACHE, XDG_CACHE_HOME or HOME".into())
    })?;
    let io = |what: &str| {
        let what = format!("{what} the cache {}", root.display());
        move |e| Error::io(what, e)
    };
    match cmd {
        cli::CacheCommand::Du => {
            let usage = prune::du(&root).map_err(io("reading"))?;
            for (section, size, n) in &usage.sections {
                println!("{:<10} {:>10}  {n} entries", section.name(), human(*size));
            }
            println!(
                "{:<10} {:>10}  {}",
                "total",
                human(usage.total),
                root.display()
            );
        }
        cli::CacheCommand::Prune(a) => {
            let policy = match (a.max_size, a.older_than) {
                (None, None) => prune::Policy {
                    max_size: Some(0),
                    older_than: None,
                },
                (max_size, older_than) => prune::Policy {
                    max_size,
                    older_than,
                },
            };
            let r = prune::prune(&root, policy, true).map_err(io("pruning"))?;
            let in_use = match r.in_use {
                0 => String::new(),
                n => format!("; kept {n} blobs a running build or push uses"),
            };
            println!(
                "removed {} entries, freed {}; cache now {}{in_use}",
                r.removed,
                human(r.freed),
                human(r.remaining)
            );
        }
    }
    Ok(())
}

/// `-v`: how many bytes were read from input files (tarring and hashing them): equal to the
/// inputs' size on a cold cache, 0 on a warm one (README "Layer cache").
fn report_input_bytes(c: &CommonArgs) {
    if c.verbose > 0 && !c.quiet {
        eprintln!(
            "read {} bytes from input files",
            imgbuild::layer::input_bytes_read()
        );
    }
}

/// After a successful build or push that used the cache: prune it to `IMGBUILD_CACHE_MAX_SIZE` (a
/// warning, never an error: the run itself succeeded or failed on its own).
fn prune_after_run(cache: Option<&std::path::Path>, c: &CommonArgs) {
    let Some(root) = cache else { return };
    let max = match imgbuild::prune::parse_max_size_env(
        std::env::var("IMGBUILD_CACHE_MAX_SIZE").ok().as_deref(),
    ) {
        Ok(Some(max)) => max,
        Ok(None) => return,
        Err(e) => {
            eprintln!("warning: {e}; the cache was not pruned");
            return;
        }
    };
    match imgbuild::prune::after_run(root, max) {
        Ok(r) if r.removed > 0 && !c.quiet => eprintln!(
            "pruned the cache to {} (IMGBUILD_CACHE_MAX_SIZE): removed {} entries, freed {}",
            imgbuild::prune::human(r.remaining),
            r.removed,
            imgbuild::prune::human(r.freed)
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: pruning the cache {}: {e}", root.display()),
    }
}

/// `imgbuild inspect`: a table on a terminal, JSON with --json, or one attached document.
fn inspect(args: &cli::InspectArgs) -> Result<()> {
    let mut credentials = None;
    if args.password_stdin {
        let mut password = String::new();
        std::io::stdin()
            .read_to_string(&mut password)
            .context("reading the password from standard input")?;
        credentials = Some(Credentials {
            username: args.username.clone().unwrap_or_default(),
            password: Secret::new(password.trim_end_matches(['\n', '\r']).to_string()),
        });
    }
    let opts = RegistryOptions {
        insecure_registries: args.insecure_registries.clone(),
        ca_certs: args.ca_certs.clone(),
        credentials,
        ..RegistryOptions::default()
    };
    let progress = progress::Silent;
    use imgbuild::supply::Kind;
    let wanted = match (&args.sbom, &args.provenance) {
        (Some(p), _) => Some((p, Kind::Sbom)),
        (_, Some(p)) => Some((p, Kind::Provenance)),
        _ => None,
    };
    if let Some((platform, kind)) = wanted {
        let doc = imgbuild::inspect::document(&args.reference, platform, kind, &opts, &progress)?;
        std::io::stdout().write_all(&doc)?;
        println!();
        return Ok(());
    }
    let report = imgbuild::inspect::inspect(&args.reference, &opts, &progress)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", imgbuild::inspect::table(&report));
    }
    Ok(())
}

fn build(args: &BuildArgs) -> Result<()> {
    let c = &args.common;
    let progress = make_progress(c);
    if c.image_refs.is_some() {
        bail!(Error::Usage(
            "--image-refs lists pushed references (REPO@sha256:...), and build pushes nothing; use --digest-file or --metadata-file, or push".into()
        ));
    }
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
    let mut image = image_request(c, spec, options, tags)?;
    image.supply = supply_options(c, false);
    let mut req = run::BuildRequest {
        image,
        // Reaching base image registries: like push, without --username.
        pull: RegistryOptions {
            insecure_registries: args.insecure_registries.clone(),
            ca_certs: args.ca_certs.clone(),
            jobs: usize::from(c.jobs),
            timeout: Duration::from_secs(args.timeout.max(1)),
            retry: RetryPolicy {
                retries: args.retries,
                base_delay: Duration::from_millis(args.retry_base_ms),
                deadline: Duration::from_secs(args.deadline),
            },
            ..RegistryOptions::default()
        },
        layout,
        tarball: args.tarball.clone(),
        tarball_format: args.tarball_format,
        repository,
    };
    let cache_root = req
        .image
        .options
        .cache
        .as_ref()
        .map(|c| c.root().to_path_buf());
    let image = run::build(&req, progress.as_ref());
    // The run's leases are released with the request, before the prune.
    drop(req.image.options.cache.take());
    // A failed run ends with its one error line: no prune (and no prune warning) after it.
    if image.is_ok() {
        prune_after_run(cache_root.as_deref(), c);
    }
    report_input_bytes(c);
    let image = image?;
    if !c.quiet {
        let dir = req.layout.display();
        match req.image.tags.first() {
            Some(tag) => eprintln!("wrote OCI layout {dir} (oci:{dir}:{tag})"),
            None => eprintln!("wrote OCI layout {dir} (oci:{dir}, untagged)"),
        }
        if let (Some(t), imgbuild::layout::TarballFormat::Docker) =
            (&req.tarball, req.tarball_format)
            && let Some(one) = imgbuild::docker_archive::platform_image(&image)
        {
            eprintln!(
                "wrote {} for docker load: {} only (docker load -i {})",
                t.display(),
                one.platform,
                t.display()
            );
        }
    }
    println!("{}", image.index.digest);
    Ok(())
}

fn push(args: &PushArgs) -> Result<()> {
    let progress = make_progress(&args.common);
    // `_context` lives until the push is done: an unpacked context is removed when dropped.
    let (mut req, more, _context) = push_request(args)?;
    let cache_root = req
        .image
        .options
        .cache
        .as_ref()
        .map(|c| c.root().to_path_buf());
    let pushed = run::push_many(&req, &more, progress.as_ref());
    // The run's leases are released with the request, before the prune.
    drop(req.image.options.cache.take());
    // A failed run ends with its one error line: no prune (and no prune warning) after it.
    if pushed.is_ok() {
        prune_after_run(cache_root.as_deref(), &args.common);
    }
    report_input_bytes(&args.common);
    // One line per repository, in the order given.
    for pushed in pushed? {
        println!("{}", pushed.image_ref);
    }
    Ok(())
}

/// The push that `args` asks for (spec loaded, options, credentials), the further
/// repositories of a repeated `--repo`, and the opened `--context` (keep it until the push
/// is done).
fn push_request(
    args: &PushArgs,
) -> Result<(run::PushRequest, Vec<Repository>, Option<context::Context>)> {
    let c = &args.common;
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
    let mut image = image_request(c, spec, options, tags)?;
    image.supply = supply_options(c, true);
    let req = run::PushRequest {
        image,
        push: RegistryOptions {
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
            upload_mode: args.upload_mode.unwrap_or_default(),
            ..RegistryOptions::default()
        },
        repository,
    };
    Ok((req, more.to_vec(), context))
}

/// `imgbuild resolve`: each referenced spec is pushed like `imgbuild push -f SPEC` with the
/// resolve flags (to PREFIX/NAME with --repo-prefix, else the spec's `repository`), all at
/// once; the YAML goes to stdout only when every push succeeded.
fn resolve(args: &ResolveArgs) -> Result<()> {
    use imgbuild::deploy;
    let mut inputs = Vec::new();
    let mut stdin_read = false;
    for f in &args.filenames {
        if f.as_os_str() == "-" {
            if stdin_read {
                bail!(Error::Usage("-f -: standard input can be read once".into()));
            }
            stdin_read = true;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading YAML from standard input")?;
            inputs.push(deploy::Input::new("-", text));
        } else {
            inputs.extend(deploy::read_inputs(f).map_err(Error::from)?);
        }
    }
    let metadata = deploy::read_metadata(&args.metadata_files).map_err(Error::from)?;
    let prefix = args
        .repo_prefix
        .as_deref()
        .map(|p| p.trim().trim_end_matches('/'))
        .filter(|p| !p.is_empty());
    let plan = deploy::plan(inputs, &metadata, |p| p.is_file()).map_err(Error::from)?;
    let out = deploy::resolve(plan, &metadata, |spec| resolve_push(args, prefix, spec))?;
    print!("{out}");
    Ok(())
}

/// Push one spec for `resolve`: the flags `imgbuild push` would get.
fn resolve_push(
    args: &ResolveArgs,
    prefix: Option<&str>,
    spec_path: &std::path::Path,
) -> Result<imgbuild::resolve::Pushed> {
    let repo = match prefix {
        Some(p) => Some(format!("{p}/{}", imgbuild::resolve::spec_name(spec_path))),
        None => {
            let spec = spec::load(spec_path).map_err(Error::from)?;
            if spec.repository.is_none() {
                bail!(Error::Usage(format!(
                    "{}: no `repository`; add one, or give --repo-prefix REGISTRY/PATH (or IMGBUILD_REPO_PREFIX) to push it to REGISTRY/PATH/{}",
                    spec_path.display(),
                    spec.name()
                )));
            }
            None
        }
    };
    // Start from `imgbuild push`'s defaults, so every flag resolve does not have keeps the
    // meaning it has there.
    let Command::Push(mut push) = Cli::try_parse_from(["imgbuild", "push"])?.command else {
        bail!("internal: `imgbuild push` did not parse as a push");
    };
    let c = &mut push.common;
    c.file = spec_path.to_path_buf();
    c.repo = repo.into_iter().collect();
    c.platforms = args.platforms.clone();
    c.jobs = args.jobs;
    c.compression = args.compression.clone();
    c.no_cache = args.no_cache;
    c.no_arch_check = args.no_arch_check;
    c.quiet = args.quiet;
    c.verbose = args.verbose;
    push.insecure_registries = args.insecure_registries.clone();
    push.ca_certs = args.ca_certs.clone();
    push.resolve = args.resolve.clone();
    push.aws_role_arn = args.aws_role_arn.clone();
    push.create_repository = args.create_repository;
    let progress = make_progress(&push.common);
    let (req, _, _context) =
        push_request(&push).with_context(|| spec_path.display().to_string())?;
    let pushed = run::push(&req, progress.as_ref())
        .map_err(anyhow::Error::from)
        .with_context(|| spec_path.display().to_string())?;
    Ok(imgbuild::resolve::Pushed {
        repository: req.repository.to_string(),
        digest: pushed.image.index.digest.to_string(),
        tags: pushed.tags,
    })
}

/// `imgbuild init`.
fn init(args: &InitArgs) -> Result<()> {
    let done = imgbuild::init::init(&imgbuild::init::InitRequest {
        manifest: args.manifest_path.clone(),
        bin: args.bin.clone(),
    })
    .map_err(Error::from)?;
    print!("{}", done.next_steps());
    Ok(())
}

/// `imgbuild copy SRC DST`.
fn copy(args: &CopyArgs) -> Result<()> {
    let r = &args.remote;
    let progress = remote_progress(r);
    let dst = remote_options(r, args.create_repository)?;
    let mut src = dst.clone();
    src.aws = AwsOptions {
        role_arn: args
            .src_aws_role_arn
            .clone()
            .filter(|a| !a.trim().is_empty()),
        ..AwsOptions::default()
    };
    let req = imgbuild::copy::CopyRequest {
        source: args.source.clone(),
        destination: args.destination.clone(),
        source_opts: src,
        destination_opts: dst,
    };
    let copied = imgbuild::copy::copy(&req, progress.as_ref()).map_err(Error::from)?;
    println!("{}", copied.image_ref);
    Ok(())
}

/// `imgbuild tag REF TAG...`.
fn tag(args: &TagArgs) -> Result<()> {
    let r = &args.remote;
    let progress = remote_progress(r);
    let req = imgbuild::copy::TagRequest {
        image: args.image.clone(),
        tags: args.tags.clone(),
        opts: remote_options(r, false)?,
    };
    let tagged = imgbuild::copy::tag(&req, progress.as_ref()).map_err(Error::from)?;
    println!("{}", tagged.image_ref);
    Ok(())
}

fn remote_progress(r: &RemoteArgs) -> Box<dyn Progress> {
    progress_for(r.quiet, r.verbose)
}

/// Push's connection options from `copy`/`tag` flags.
fn remote_options(r: &RemoteArgs, create_repository: bool) -> Result<RegistryOptions> {
    let credentials = read_password(r.username.as_deref(), r.password_stdin)?;
    Ok(RegistryOptions {
        jobs: usize::from(r.jobs),
        insecure_registries: r.insecure_registries.clone(),
        ca_certs: r.ca_certs.clone(),
        credentials,
        timeout: Duration::from_secs(r.timeout.max(1)),
        resolve: r.resolve.clone(),
        aws: AwsOptions {
            role_arn: r.aws_role_arn.clone().filter(|a| !a.trim().is_empty()),
            create_repository,
            ..AwsOptions::default()
        },
        retry: RetryPolicy {
            retries: r.retries,
            base_delay: Duration::from_millis(r.retry_base_ms),
            deadline: Duration::from_secs(r.deadline),
        },
        ..RegistryOptions::default()
    })
}

/// `--username` with the password from standard input (`--password-stdin`).
fn credentials(args: &PushArgs) -> Result<Option<Credentials>> {
    read_password(args.username.as_deref(), args.password_stdin)
}

/// The password from standard input for `username`, when `--password-stdin` was given.
fn read_password(username: Option<&str>, password_stdin: bool) -> Result<Option<Credentials>> {
    if !password_stdin {
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
        username: username.unwrap_or_default().to_string(),
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
        supply: imgbuild::supply::SupplyOptions::default(),
        static_ca_bundle: c.static_ca_bundle.clone(),
    })
}

/// `--sbom`, `--provenance`, `--sbom-output`, and the GitHub Actions variables provenance
/// records; both documents are on by default for `push` (`on_by_default`), off for `build`.
fn supply_options(c: &CommonArgs, on_by_default: bool) -> imgbuild::supply::SupplyOptions {
    let github = std::env::vars()
        .filter(|(k, v)| (k.starts_with("GITHUB_") || k == "RUNNER_ENVIRONMENT") && !v.is_empty())
        // Tokens never go into a document (GITHUB_TOKEN is normally not in the environment).
        .filter(|(k, _)| !k.contains("TOKEN"))
        .collect();
    imgbuild::supply::SupplyOptions {
        sbom: c.sbom.as_deref().map_or(on_by_default, |s| s == "spdx"),
        provenance: c
            .provenance
            .as_deref()
            .map_or(on_by_default, |s| s != "none"),
        output_dir: c.sbom_output.clone(),
        github,
    }
}

fn make_progress(c: &CommonArgs) -> Box<dyn Progress> {
    progress_for(c.quiet, c.verbose)
}

/// Bars on a terminal, one line per event otherwise, nothing but errors with `--quiet`.
fn progress_for(quiet: bool, verbose: u8) -> Box<dyn Progress> {
    let verbosity = match (quiet, verbose) {
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
        Some(
            imgbuild::platform::parse_list(c.platforms.iter().map(String::as_str))
                .map_err(|e| Error::Usage(format!("--platform: {e}")))?,
        )
    };
    let epoch = match (c.source_date_epoch.as_deref(), std::env::var("SOURCE_DATE_EPOCH")) {
        (Some("git"), _) => imgbuild::gitref::commit_time(&spec.context)
            .map_err(|e| Error::Usage(e.to_string()))?,
        (Some(v), _) => v.trim().parse::<u64>().map_err(|_| {
            Error::Usage(format!(
                "--source-date-epoch {v:?}: give seconds since 1970 or `git` (the commit time of HEAD)"
            ))
        })?,
        (None, Err(_)) => 0,
        (None, Ok(v)) if v.trim().is_empty() => 0,
        (None, Ok(v)) => v.trim().parse::<u64>().map_err(|_| {
            Error::Usage(format!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970; unset it or set e.g. $(git log -1 --format=%ct), or pass --source-date-epoch git"
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
    let compression =
        Compression::parse(codec, c.compression_level.as_deref()).map_err(Error::Usage)?;
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
        allow_outside_context: c.allow_outside_context,
        annotations,
        jobs: usize::from(c.jobs),
        cache: open_cache(c),
        file_sums: None,
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

/// `--no-tag` (none), else `--tag`s plus `--tag-from-git`'s, else the spec's `tags`.
fn tags(c: &CommonArgs, spec: &Spec) -> Result<Vec<String>> {
    if c.no_tag {
        return Ok(Vec::new());
    }
    if c.tags.is_empty() && !c.tag_from_git {
        return Ok(spec.tags.clone());
    }
    for t in &c.tags {
        validate_tag(t).map_err(Error::from).context("--tag")?;
    }
    let mut tags = c.tags.clone();
    if c.tag_from_git {
        tags.extend(git_refs(spec)?.image_tags());
    }
    let mut seen = std::collections::HashSet::new();
    tags.retain(|t| seen.insert(t.clone()));
    Ok(tags)
}

/// In GitHub Actions (detached checkout) GITHUB_REF and GITHUB_SHA say what is built;
/// elsewhere git is asked in the spec's directory.
fn git_refs(spec: &Spec) -> Result<imgbuild::gitref::GitRefs> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(r), Some(sha)) = (env("GITHUB_REF"), env("GITHUB_SHA")) {
        return Ok(imgbuild::gitref::GitRefs::from_github(&r, &sha));
    }
    imgbuild::gitref::GitRefs::from_git(&spec.context)
        .map_err(|e| Error::Usage(e.to_string()).into())
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
