//! Command-line interface: flags follow ko, crane and buildx where they have one
//! (`--platform a,b`, `--tag` repeatable, `--image-refs`, `--metadata-file`, `--insecure-registry`,
//! `--password-stdin`, `-f`).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "imgbuild",
    version,
    about = "Build deterministic multi-arch OCI images from prebuilt artifacts and push them, without a daemon",
    after_help = "Exit codes: 0 ok, 1 internal error, 2 usage or spec error, 3 input artifact error (also a base image tag or digest that does not exist), 4 authentication, 5 registry or network (the only one worth retrying), 6 TLS certificate not trusted, not valid for the name, or expired."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the image into a local OCI image layout (no registry, no credentials).
    Build(BuildArgs),
    /// Build the image and push it to a registry; prints REPO@sha256:<index digest>.
    Push(PushArgs),
    /// Replace each `imgbuild://SPEC` in Kubernetes YAML or Helm values by REPO@sha256:...,
    /// pushing each referenced spec once; prints the YAML (like ko resolve).
    Resolve(ResolveArgs),
    /// Write a starter build-specs/<package>.toml for the Cargo project here.
    Init(InitArgs),
    /// Copy an image or index (every platform, its referrers) to another repository or
    /// registry, digest unchanged; prints DST-REPO@sha256:<digest>.
    Copy(CopyArgs),
    /// Point more tags at an image in a registry (its manifest is put unchanged); prints
    /// REPO@sha256:<digest>.
    Tag(TagArgs),
    /// Show an image: index digest, platforms, sizes, config summary, base, referrers (SBOM,
    /// provenance). REF is REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:... or oci:DIR[:TAG].
    Inspect(InspectArgs),
    /// Show or shrink the cache (IMGBUILD_CACHE, default ~/.cache/imgbuild).
    #[command(subcommand)]
    Cache(CacheCommand),
}

/// `imgbuild cache ...`: the layer, base-image and push-record cache. After each build or
/// push it is pruned to IMGBUILD_CACHE_MAX_SIZE (default 10G; `off` disables), least
/// recently used first; blobs a running build or push uses are never removed.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print the cache's size per section and in total.
    Du,
    /// Remove cache entries, least recently used first; without options, every entry no
    /// running build or push uses (like `go clean -cache`).
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Shrink the cache to at most SIZE (500M, 10G, 10GiB: powers of 1024; or bytes).
    #[arg(long, value_name = "SIZE", value_parser = imgbuild::prune::parse_size)]
    pub max_size: Option<u64>,

    /// Remove entries not used for DURATION (90m, 72h, 30d, 2w).
    #[arg(long, value_name = "DURATION", value_parser = imgbuild::prune::parse_duration)]
    pub older_than: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image: REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:... or oci:DIR[:TAG].
    #[arg(value_name = "REF")]
    pub reference: String,

    /// Print the report as JSON.
    #[arg(long, conflicts_with_all = ["sbom", "provenance"])]
    pub json: bool,

    /// Print the SPDX SBOM attached to this platform's manifest (e.g. linux/amd64).
    #[arg(long, value_name = "PLATFORM", conflicts_with = "provenance")]
    pub sbom: Option<String>,

    /// Print the provenance statement attached to this platform's manifest.
    #[arg(long, value_name = "PLATFORM")]
    pub provenance: Option<String>,

    /// Allow plain HTTP for this registry (after HTTPS fails to connect); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// Trust this PEM CA certificate in addition to the system roots; repeatable.
    #[arg(long = "ca-cert", value_name = "PEM")]
    pub ca_certs: Vec<PathBuf>,

    /// Registry user name (with --password-stdin); else push's credential sources.
    #[arg(short, long, requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the registry password or token from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
}

/// Flags shared by `build` and `push`.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// The build spec (TOML).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "SPEC",
        default_value = "imgbuild.toml"
    )]
    pub file: PathBuf,

    /// Where relative `src` paths are read from: a directory, a .tar/.tar.gz/.tar.zst file,
    /// `-` (a tar on stdin) or s3://BUCKET/KEY; tarballs are unpacked into a private temporary
    /// directory [default: the spec's directory].
    #[arg(long, value_name = "DIR|TAR|-|s3://BUCKET/KEY", value_parser = clap::value_parser!(imgbuild::context::ContextSource))]
    pub context: Option<imgbuild::context::ContextSource>,

    /// Let `src` and the spec's `oci:` bases name files outside the build context (absolute
    /// paths, `..` out of it, symlinks leading out). Off by default, so a spec from an untrusted change cannot copy
    /// the machine's files (e.g. credentials) into the image.
    #[arg(long, env = "IMGBUILD_ALLOW_OUTSIDE_CONTEXT")]
    pub allow_outside_context: bool,

    /// Refuse a context tarball that unpacks to more than this (e.g. 512M, 4G).
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = imgbuild::context::parse_size)]
    pub context_max_size: u64,

    /// Refuse a context tarball with more entries than this.
    #[arg(long, value_name = "N", default_value_t = imgbuild::context::DEFAULT_MAX_ENTRIES)]
    pub context_max_entries: u64,

    /// Platforms to build, comma-separated or repeated (overrides `platforms`).
    #[arg(
        long = "platform",
        value_name = "OS/ARCH[/VARIANT]",
        value_delimiter = ','
    )]
    pub platforms: Vec<String>,

    /// Repository, e.g. 127.0.0.1:5000/hello (overrides `repository`); repeat (or separate
    /// with commas) to push one build to several repositories, even on other registries.
    #[arg(
        long,
        env = "IMGBUILD_REPO",
        value_name = "REGISTRY/PATH",
        value_delimiter = ','
    )]
    pub repo: Vec<String>,

    /// Tag; repeat for several (overrides `tags`).
    #[arg(short = 't', long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    /// No tag: push the image by digest only (as `tags = []`).
    #[arg(long, conflicts_with_all = ["tags", "tag_from_git"])]
    pub no_tag: bool,

    /// Add tags from git, as docker/metadata-action does: branch feature/foo -> feature-foo,
    /// tag v1.2.3 -> 1.2.3, 1.2, 1, latest; always sha-<7 hex>. Reads GITHUB_REF/GITHUB_SHA
    /// in GitHub Actions, else git in the spec's directory. Adds to --tag; replaces `tags`.
    #[arg(long)]
    pub tag_from_git: bool,

    /// Timestamp of every file and of the image config: seconds since 1970, or `git` for the
    /// commit time of HEAD (overrides SOURCE_DATE_EPOCH).
    #[arg(long, value_name = "SECONDS|git")]
    pub source_date_epoch: Option<String>,

    /// Extra annotation on the manifests and index; repeatable.
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    pub annotations: Vec<String>,

    /// Do not check that ELF artifacts match each platform's architecture.
    #[arg(long)]
    pub no_arch_check: bool,

    /// Write the index digest (sha256:...) to this file.
    #[arg(long, value_name = "FILE")]
    pub digest_file: Option<PathBuf>,

    /// Write one REPO@sha256:... line to this file (ko's --image-refs).
    #[arg(long, value_name = "FILE")]
    pub image_refs: Option<PathBuf>,

    /// Write JSON metadata (digests, sizes, tags) to this file.
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,

    /// Layers compressed at once, and layers uploaded at once (configs, a few KiB each, go
    /// beside them).
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,

    /// Layer compression: gzip (parallel, deterministic) or zstd.
    #[arg(
        long,
        value_name = "gzip|zstd",
        default_value = "gzip",
        env = "IMGBUILD_COMPRESSION"
    )]
    pub compression: String,

    /// Compression level [default: gzip 5, zstd 3]; gzip 0-9, zstd 1-19; `fast`: gzip 1
    /// (imgbuild's own fast encoder), zstd 1.
    #[arg(long, value_name = "N|fast")]
    pub compression_level: Option<String>,

    /// Do not read or write the layer cache (IMGBUILD_CACHE, default ~/.cache/imgbuild).
    #[arg(long)]
    pub no_cache: bool,

    /// Print only errors and warnings.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More detail on stderr: each step, what was skipped or mounted and why, retries.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Base image: REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:..., oci:DIR[:TAG] or scratch
    /// (overrides `base`; `[base_overrides]` still apply).
    #[arg(long, value_name = "IMAGE")]
    pub base: Option<String>,

    /// SBOM attached to each platform manifest as an OCI referrer: spdx (SPDX 2.3 JSON) or
    /// none [default: spdx for push, none for build].
    #[arg(long, value_name = "spdx|none", value_parser = ["spdx", "none"])]
    pub sbom: Option<String>,

    /// SLSA provenance v1 attached to each platform manifest as an OCI referrer; `none` turns
    /// it off [default: on for push, off for build].
    #[arg(long, value_name = "true|none", num_args = 0..=1, default_missing_value = "true",
          value_parser = ["true", "none"])]
    pub provenance: Option<String>,

    /// Also write the SBOM and provenance documents here as plain JSON files
    /// (<os>-<arch>.spdx.json, <os>-<arch>.provenance.json).
    #[arg(long, value_name = "DIR")]
    pub sbom_output: Option<PathBuf>,

    /// The CA bundle (PEM) put into the built-in base `static` [default:
    /// /etc/ssl/certs/ca-certificates.crt].
    #[arg(long, env = "IMGBUILD_STATIC_CA_BUNDLE", value_name = "PEM")]
    pub static_ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Where to write the OCI image layout [default: out/<spec name>].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Also write the image as a tar file (its directory is created).
    #[arg(long, value_name = "FILE")]
    pub tarball: Option<PathBuf>,

    /// What --tarball holds: oci (the OCI layout, every platform; skopeo, crane, podman,
    /// ctr import, Docker 25+) or docker (`docker save` format, the build machine's platform
    /// or the first; every `docker load`).
    #[arg(
        long,
        value_name = "oci|docker",
        default_value = "oci",
        requires = "tarball"
    )]
    pub tarball_format: imgbuild::layout::TarballFormat,

    /// Allow plain HTTP for this base image registry (after HTTPS fails); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// Trust this PEM CA certificate for base image registries; repeatable.
    #[arg(long = "ca-cert", value_name = "PEM")]
    pub ca_certs: Vec<PathBuf>,

    /// Base image registries: give up on a request that sends or receives nothing for this
    /// many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,

    /// Base image registries: retry a failed request (5xx, 429, reset, stall) this many times.
    #[arg(long, default_value_t = imgbuild::registry::retry::DEFAULT_RETRIES, value_name = "N")]
    pub retries: u32,

    /// Base image registries: start no retry later than this many seconds after the start.
    #[arg(long, default_value_t = imgbuild::registry::retry::DEFAULT_DEADLINE.as_secs(), value_name = "SECONDS")]
    pub deadline: u64,

    /// First backoff step in milliseconds (doubled per retry); for tests.
    #[arg(long, hide = true, default_value_t = 500, value_name = "MS")]
    pub retry_base_ms: u64,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Allow plain HTTP for this registry (after HTTPS fails to connect); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// Trust this PEM CA certificate in addition to the system roots; repeatable.
    #[arg(long = "ca-cert", value_name = "PEM")]
    pub ca_certs: Vec<PathBuf>,

    /// Registry user name (with --password-stdin).
    #[arg(short, long, requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the registry password or token from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,

    /// Give up on a request that sends or receives nothing for this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,

    /// Connect to HOST:PORT at ADDR instead of what DNS says (curl's --resolve); TLS is still
    /// verified for HOST. Repeatable.
    #[arg(long = "resolve", value_name = "HOST:PORT:ADDR", value_parser = clap::value_parser!(imgbuild::registry::ResolveOverride))]
    pub resolve: Vec<imgbuild::registry::ResolveOverride>,

    /// ECR: assume this IAM role (STS AssumeRole) on top of the AWS credentials found.
    #[arg(long, env = "IMGBUILD_AWS_ROLE_ARN", value_name = "ARN")]
    pub aws_role_arn: Option<String>,

    /// ECR: create the repository if it does not exist.
    #[arg(long)]
    pub create_repository: bool,

    /// ECR: turn on scan-on-push for a repository created by --create-repository.
    #[arg(long, requires = "create_repository")]
    pub ecr_scan_on_push: bool,

    /// ECR: make the tags of a repository created by --create-repository immutable.
    #[arg(long, requires = "create_repository")]
    pub ecr_immutable_tags: bool,

    /// How layers are uploaded: stream (while they are compressed: chunks as the compressed
    /// bytes come, then the rest) or put (each once complete, in one request). Default:
    /// stream, but put for Amazon ECR (its chunked uploads have been unreliable).
    #[arg(long, env = "IMGBUILD_UPLOAD_MODE", value_name = "stream|put")]
    pub upload_mode: Option<imgbuild::registry::UploadMode>,
    /// Retry a failed request (5xx, 429, reset, stall) this many times, with backoff.
    #[arg(long, default_value_t = imgbuild::registry::retry::DEFAULT_RETRIES, value_name = "N")]
    pub retries: u32,

    /// Start no retry later than this many seconds after the push began.
    #[arg(long, default_value_t = imgbuild::registry::retry::DEFAULT_DEADLINE.as_secs(), value_name = "SECONDS")]
    pub deadline: u64,

    /// First backoff step in milliseconds (doubled per retry); for tests.
    #[arg(long, hide = true, default_value_t = 500, value_name = "MS")]
    pub retry_base_ms: u64,
}

/// `imgbuild resolve`: ko's `resolve`, for specs.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// YAML file, directory (every *.yaml/*.yml below it) or `-` for standard input; repeatable.
    #[arg(
        short = 'f',
        long = "filename",
        visible_alias = "file",
        value_name = "FILE|DIR|-",
        required = true
    )]
    pub filenames: Vec<PathBuf>,

    /// Take the image of a spec from an earlier push's --metadata-file instead of pushing it
    /// (matched by spec name); repeatable.
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_files: Vec<PathBuf>,

    /// Push each spec to PREFIX/<spec name> (overrides the spec's `repository`; ko's
    /// KO_DOCKER_REPO).
    #[arg(long, env = "IMGBUILD_REPO_PREFIX", value_name = "REGISTRY/PATH")]
    pub repo_prefix: Option<String>,

    /// Platforms to build for every spec, comma-separated or repeated (overrides `platforms`).
    #[arg(
        long = "platform",
        value_name = "OS/ARCH[/VARIANT]",
        value_delimiter = ','
    )]
    pub platforms: Vec<String>,

    /// Layers compressed and blobs uploaded at once, per spec.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,

    /// Layer compression: gzip or zstd.
    #[arg(
        long,
        value_name = "gzip|zstd",
        default_value = "gzip",
        env = "IMGBUILD_COMPRESSION"
    )]
    pub compression: String,

    /// Do not read or write the layer cache.
    #[arg(long)]
    pub no_cache: bool,

    /// Do not check that ELF artifacts match each platform's architecture.
    #[arg(long)]
    pub no_arch_check: bool,

    /// Allow plain HTTP for this registry; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// Trust this PEM CA certificate in addition to the system roots; repeatable.
    #[arg(long = "ca-cert", value_name = "PEM")]
    pub ca_certs: Vec<PathBuf>,

    /// Connect to HOST:PORT at ADDR (curl's --resolve); repeatable.
    #[arg(long = "resolve", value_name = "HOST:PORT:ADDR", value_parser = clap::value_parser!(imgbuild::registry::ResolveOverride))]
    pub resolve: Vec<imgbuild::registry::ResolveOverride>,

    /// ECR: assume this IAM role on top of the AWS credentials found.
    #[arg(long, env = "IMGBUILD_AWS_ROLE_ARN", value_name = "ARN")]
    pub aws_role_arn: Option<String>,

    /// ECR: create repositories that do not exist.
    #[arg(long)]
    pub create_repository: bool,

    /// Print only errors and warnings (stderr).
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More detail on stderr.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// `imgbuild init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The package's Cargo.toml.
    #[arg(long, value_name = "PATH", default_value = "Cargo.toml")]
    pub manifest_path: PathBuf,

    /// The binary target to make the entrypoint [default: the one named like the package].
    #[arg(long, value_name = "NAME")]
    pub bin: Option<String>,
}

/// How `copy` and `tag` reach registries: push's flags (they apply to the source and the
/// destination alike, as crane's do), plus quiet/verbose and jobs.
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// Allow plain HTTP for this registry (after HTTPS fails to connect); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,

    /// Trust this PEM CA certificate in addition to the system roots; repeatable.
    #[arg(long = "ca-cert", value_name = "PEM")]
    pub ca_certs: Vec<PathBuf>,

    /// Destination registry user name (with --password-stdin); also used for the source
    /// when it is on the same registry.
    #[arg(short, long, requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the destination registry's password or token from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,

    /// Give up on a request that sends or receives nothing for this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,

    /// Connect to HOST:PORT at ADDR instead of what DNS says (curl's --resolve); TLS is still
    /// verified for HOST. Repeatable.
    #[arg(long = "resolve", value_name = "HOST:PORT:ADDR", value_parser = clap::value_parser!(imgbuild::registry::ResolveOverride))]
    pub resolve: Vec<imgbuild::registry::ResolveOverride>,

    /// ECR: assume this IAM role for the destination (tag: the image's registry).
    #[arg(long, env = "IMGBUILD_AWS_ROLE_ARN", value_name = "ARN")]
    pub aws_role_arn: Option<String>,

    /// Retry a failed request (5xx, 429, reset, stall) this many times, with backoff.
    #[arg(long, default_value_t = imgbuild::registry::retry::DEFAULT_RETRIES, value_name = "N")]
    pub retries: u32,

    /// Start no retry later than this many seconds after the command began.
    #[arg(long, default_value_t = imgbuild::registry::retry::DEFAULT_DEADLINE.as_secs(), value_name = "SECONDS")]
    pub deadline: u64,

    /// First backoff step in milliseconds (doubled per retry); for tests.
    #[arg(long, hide = true, default_value_t = 500, value_name = "MS")]
    pub retry_base_ms: u64,

    /// Blobs copied at once.
    #[arg(short = 'j', long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,

    /// Print only errors and warnings.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More detail on stderr.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The image or index to copy: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...
    #[arg(value_name = "SRC")]
    pub source: String,

    /// Where to: REGISTRY/REPO[:TAG] (no tag: the source's tag; none for a source named by
    /// digest).
    #[arg(value_name = "DST")]
    pub destination: String,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// ECR: assume this IAM role for the source registry (env IMGBUILD_SRC_AWS_ROLE_ARN).
    #[arg(long, env = "IMGBUILD_SRC_AWS_ROLE_ARN", value_name = "ARN")]
    pub src_aws_role_arn: Option<String>,

    /// ECR: create the destination repository if it does not exist.
    #[arg(long)]
    pub create_repository: bool,
}

#[derive(Debug, Args)]
pub struct TagArgs {
    /// The image: REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...
    #[arg(value_name = "REF")]
    pub image: String,

    /// New tags for it (in the same repository).
    #[arg(value_name = "TAG", required = true)]
    pub tags: Vec<String>,

    #[command(flatten)]
    pub remote: RemoteArgs,
}
