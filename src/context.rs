//! Build contexts (README "Build contexts"): where relative `src` paths are read from. A stage before
//! [`crate::plan`]: it turns `--context` into a directory on local disk.
//!
//! - A directory is used as it is.
//! - A tar file (plain, gzip or zstd: told by its magic bytes, never by its name), a tar on
//!   standard input (`-`), or an S3 object (`s3://bucket/key`, streamed from GetObject into the
//!   unpacker, never held in memory) is unpacked into a private temporary directory (0700,
//!   under `TMPDIR`), removed when the [`Context`] is dropped: after the push, after an error,
//!   and on SIGINT/SIGTERM through [`remove_unpacked`].
//!
//! Unpacking is safe for tarballs from anywhere (a Kaniko-style Job unpacks what CI
//! uploaded): absolute paths, `..`, symlinks and hard links that point outside the context,
//! entries written through a symlink, devices and FIFOs are refused, and
//! `--context-max-size` / `--context-max-entries` stop tar bombs. The checks are pure
//! functions ([`normalize`], [`symlink_stays_inside`], [`Budget`], [`entry_kind`]) over what a
//! tar header says; the I/O around them only creates what they allowed. After the last entry
//! every symlink is resolved once more against the unpacked tree (a link may go through
//! another link), so no symlink leads outside however the links combine.

pub mod s3;

use crate::exit::ExitCode;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// `--context-max-size` default: 4 GiB of unpacked file content.
pub const DEFAULT_MAX_SIZE: u64 = 4 << 30;
/// `--context-max-entries` default.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Bytes of tar stream allowed per entry on top of the content (a header and its padding,
/// with room for a long name), so that headers alone cannot be a bomb either.
const STREAM_BYTES_PER_ENTRY: u64 = 2048;
/// Symlinks followed while resolving one link (Linux's own limit is 40).
const MAX_LINK_HOPS: usize = 40;

/// What `--context` names (parsed without touching the filesystem).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextSource {
    /// A directory, or a tar file: told apart when it is opened.
    Path(PathBuf),
    /// `-`: a tar on standard input.
    Stdin,
    /// `s3://bucket/key`.
    S3 { bucket: String, key: String },
}

impl FromStr for ContextSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "-" {
            return Ok(ContextSource::Stdin);
        }
        if s.is_empty() {
            return Err(
                "empty; give a directory, a .tar/.tar.gz/.tar.zst file, - or s3://bucket/key"
                    .into(),
            );
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !bucket_ok {
                return Err(format!(
                    "{s}: {bucket:?} is not an S3 bucket name (3-63 of a-z 0-9 . -); write s3://bucket/path/to/context.tar.gz"
                ));
            }
            if key.is_empty() || key.ends_with('/') {
                return Err(format!(
                    "{s}: no object key; name the tarball itself, e.g. s3://{bucket}/contexts/app.tar.gz"
                ));
            }
            return Ok(ContextSource::S3 {
                bucket: bucket.into(),
                key: key.into(),
            });
        }
        Ok(ContextSource::Path(PathBuf::from(s)))
    }
}

impl fmt::Display for ContextSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextSource::Path(p) => write!(f, "{}", p.display()),
            ContextSource::Stdin => f.write_str("- (standard input)"),
            ContextSource::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// Parse a size like `4G`, `512M`, `100k`, `4GiB` or `1048576` (suffixes are powers of
/// 1024, case-insensitive, an optional `i`/`iB`/`B` after them), for `--context-max-size`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let bad = || format!("{s:?} is not a size; write e.g. 4G, 512M or a number of bytes");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .or_else(|| unit.strip_suffix('i'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The tar bomb caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content unpacked, in all.
    pub max_size: u64,
    /// Entries in the archive (files, directories, links).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size: DEFAULT_MAX_SIZE,
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// How a tar stream is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarCompression {
    None,
    Gzip,
    Zstd,
}

/// Tell the compression from the magic bytes (at least 6 bytes, fewer only at the end).
pub fn sniff(head: &[u8]) -> Result<TarCompression, &'static str> {
    Ok(match head {
        [0x1f, 0x8b, ..] => TarCompression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => TarCompression::Zstd,
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => {
            return Err(
                "is xz-compressed; recompress it with gzip or zstd (tar -czf / tar --zstd -cf)",
            );
        }
        [b'B', b'Z', b'h', ..] => {
            return Err(
                "is bzip2-compressed; recompress it with gzip or zstd (tar -czf / tar --zstd -cf)",
            );
        }
        [b'P', b'K', 3, 4, ..] => {
            return Err("is a zip file; a context is a tar (tar -czf ctx.tar.gz -C DIR .)");
        }
        [] => return Err("is empty; a context tarball holds at least one entry"),
        _ => TarCompression::None,
    })
}

/// Why an entry is refused. Each is said after "entry PATH: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "has an absolute path; a context tarball holds relative paths (tar -C DIR -czf ctx.tar.gz .)"
    )]
    Absolute,
    #[error("has a `..` component, which would write outside the context")]
    ParentDir,
    #[error("is a symlink to {}, outside the context; make it relative and inside the context", .0.display())]
    SymlinkEscapes(PathBuf),
    #[error("is a hard link to {}, outside the context", .0.display())]
    HardLinkEscapes(PathBuf),
    #[error("is a hard link to {}, which is not a regular file earlier in the archive", .0.display())]
    HardLinkTarget(PathBuf),
    #[error("is a {0}; a context holds only files, directories and links")]
    Special(&'static str),
    #[error("is inside {}, which is a symlink; entries are never written through a symlink", .0.display())]
    ThroughSymlink(PathBuf),
    #[error("is inside {}, which is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("would replace the directory of that name earlier in the archive")]
    ReplacesDirectory,
    #[error(
        "takes the unpacked context over --context-max-size ({0} bytes); raise the cap or make the context smaller"
    )]
    TooBig(u64),
    #[error(
        "is more than --context-max-entries ({0}) entries; raise the cap or make the context smaller"
    )]
    TooMany(u64),
}

/// Failure to provide a build context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("--context {source_name}: entry {entry:?} {reason}; nothing was pushed")]
    Refused {
        source_name: String,
        entry: String,
        reason: Refusal,
    },
    #[error("--context {source_name}: {reason}")]
    BadArchive { source_name: String, reason: String },
    #[error("--context {source_name}: {context}: {error}")]
    Io {
        source_name: String,
        context: String,
        #[source]
        error: io::Error,
    },
    #[error(
        "--context {0}: no such file or directory; give a directory, a .tar/.tar.gz/.tar.zst file, - or s3://bucket/key"
    )]
    Missing(String),
    /// S3 refused or failed; `exit` says which kind (auth or network).
    #[error("--context {source_name}: {reason}")]
    S3 {
        source_name: String,
        reason: String,
        exit: ExitCode,
    },
}

impl ContextError {
    /// 3 for a bad or missing context (an input artifact), 4/5 for S3 credentials/network,
    /// 1 for local I/O (README "Exit codes").
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ContextError::Refused { .. }
            | ContextError::BadArchive { .. }
            | ContextError::Missing(_) => ExitCode::Input,
            ContextError::Io { .. } => ExitCode::Internal,
            ContextError::S3 { exit, .. } => *exit,
        }
    }
}

/// What an entry is, from its tar type, with the link target for links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    HardLink(PathBuf),
    /// Metadata the tar crate hands on (a pax global header, as `git archive` writes).
    Skip,
}

/// The tar type byte (and link target) as a [`Kind`], or why it cannot be in a context.
pub fn entry_kind(entry_type: u8, link: Option<&Path>) -> Result<Kind, Refusal> {
    let target = || link.map(Path::to_path_buf).unwrap_or_default();
    Ok(match entry_type {
        // '0', NUL (old tar) and '7' (contiguous) are regular files.
        b'0' | 0 | b'7' => Kind::File,
        b'5' => Kind::Dir,
        b'2' => Kind::Symlink(target()),
        b'1' => Kind::HardLink(target()),
        b'g' => Kind::Skip,
        b'3' => return Err(Refusal::Special("character device")),
        b'4' => return Err(Refusal::Special("block device")),
        b'6' => return Err(Refusal::Special("FIFO")),
        b'S' => return Err(Refusal::Special("GNU sparse file")),
        _ => return Err(Refusal::Special("tar entry of an unsupported type")),
    })
}

/// The entry's path relative to the context root, `.` components dropped; refused when
/// absolute or when it has `..`. `None` for the root itself (`./`).
pub fn normalize(path: &Path) -> Result<Option<PathBuf>, Refusal> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Absolute),
            Component::ParentDir => return Err(Refusal::ParentDir),
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Whether the symlink at `link` (normalized) pointing at `target` stays inside the context
/// by its text alone: relative, and never climbing above the root.
pub fn symlink_stays_inside(link: &Path, target: &Path) -> bool {
    let mut depth = link.parent().map_or(0, |p| p.components().count());
    for c in target.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return false,
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::CurDir => {}
            Component::Normal(_) => depth += 1,
        }
    }
    // An empty target points nowhere; refuse it too (tar would make a broken link).
    !target.as_os_str().is_empty()
}

/// Counts entries and content bytes against [`Limits`].
#[derive(Debug, Clone)]
pub struct Budget {
    limits: Limits,
    entries: u64,
    bytes: u64,
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Budget {
            limits,
            entries: 0,
            bytes: 0,
        }
    }

    /// One more entry with `size` bytes of content.
    pub fn admit(&mut self, size: u64) -> Result<(), Refusal> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Refusal::TooMany(self.limits.max_entries));
        }
        match self.bytes.checked_add(size) {
            Some(b) if b <= self.limits.max_size => {
                self.bytes = b;
                Ok(())
            }
            _ => Err(Refusal::TooBig(self.limits.max_size)),
        }
    }
}

/// Check one entry by its header alone: the path inside, the kind allowed, the link target
/// inside, the caps kept. `Ok(None)` for entries that create nothing (the root, metadata).
pub fn check_entry(
    path: &Path,
    entry_type: u8,
    link: Option<&Path>,
    size: u64,
    budget: &mut Budget,
) -> Result<Option<(PathBuf, Kind)>, Refusal> {
    let kind = entry_kind(entry_type, link)?;
    if kind == Kind::Skip {
        return Ok(None);
    }
    let Some(rel) = normalize(path)? else {
        // `./` itself: the root exists already.
        return Ok(None);
    };
    let kind = match kind {
        Kind::Symlink(t) if !symlink_stays_inside(&rel, &t) => {
            return Err(Refusal::SymlinkEscapes(t));
        }
        Kind::HardLink(t) => match normalize(&t) {
            Ok(Some(t)) => Kind::HardLink(t),
            _ => return Err(Refusal::HardLinkEscapes(t)),
        },
        k => k,
    };
    let content = if kind == Kind::File { size } else { 0 };
    budget.admit(content)?;
    Ok(Some((rel, kind)))
}

/// Temporary directories of unpacked contexts alive in this process, for [`remove_unpacked`].
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remove every unpacked context directory still alive: for a signal handler, just before
/// the process exits (their [`Context`]s will not be dropped then).
pub fn remove_unpacked() {
    let dirs = std::mem::take(&mut *LIVE.lock().unwrap_or_else(PoisonError::into_inner));
    for d in dirs {
        // The build may still be writing next to us: try a few times.
        for _ in 0..5 {
            if fs::remove_dir_all(&d).is_ok() || !d.exists() {
                break;
            }
        }
    }
}

/// A private temporary directory, removed on drop (and by [`remove_unpacked`]).
#[derive(Debug)]
struct TempRoot {
    dir: Option<tempfile::TempDir>,
}

impl TempRoot {
    fn new() -> io::Result<TempRoot> {
        // Private (0700) from the start, under TMPDIR (std::env::temp_dir): the context may
        // hold what others on the machine should not read.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-context-")
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir()?;
        LIVE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(dir.path().to_path_buf());
        Ok(TempRoot { dir: Some(dir) })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            LIVE.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|p| p != &path);
            // Directories are created 0700 and never chmod-ed, so removal cannot be denied.
            let _ = dir.close();
        }
    }
}

/// A build context ready for the plan: a directory, removed on drop when it was unpacked.
#[derive(Debug)]
pub struct Context {
    dir: PathBuf,
    temp: Option<TempRoot>,
}

impl Context {
    /// The directory relative `src` paths are resolved against.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this context was unpacked into a temporary directory.
    pub fn is_unpacked(&self) -> bool {
        self.temp.is_some()
    }
}

/// Make a local directory of `source`: a directory as it is, anything else unpacked.
/// `stdin` is called only for `-`; S3 objects are fetched with [`s3::with_object`]
/// (`aws_role_arn`: `--aws-role-arn`, assumed on top of the default chain).
pub fn open(
    source: &ContextSource,
    limits: &Limits,
    aws_role_arn: Option<&str>,
    stdin: impl FnOnce() -> Box<dyn Read + Send>,
) -> Result<Context, ContextError> {
    let name = source.to_string();
    match source {
        ContextSource::Path(p) => {
            let meta = fs::metadata(p).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    ContextError::Missing(name.clone())
                } else {
                    ContextError::Io {
                        source_name: name.clone(),
                        context: "reading it".into(),
                        error: e,
                    }
                }
            })?;
            if meta.is_dir() {
                return Ok(Context {
                    dir: p.clone(),
                    temp: None,
                });
            }
            let file = fs::File::open(p).map_err(|e| ContextError::Io {
                source_name: name.clone(),
                context: "opening it".into(),
                error: e,
            })?;
            unpack(file, &name, limits)
        }
        ContextSource::Stdin => unpack(stdin(), &name, limits),
        ContextSource::S3 { bucket, key } => s3::with_object(bucket, key, aws_role_arn, |body| {
            unpack(body, &name, limits)
        }),
    }
}

/// Counts the bytes of the uncompressed tar stream; fails past `cap` (and says so in `hit`).
struct Capped<R> {
    inner: R,
    left: u64,
    hit: Arc<AtomicBool>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // One byte more than the cap tells a stream that ends exactly there from a bomb.
            let mut one = [0u8; 1];
            if self.inner.read(&mut one)? == 0 {
                return Ok(0);
            }
            self.hit.store(true, Ordering::SeqCst);
            return Err(io::Error::other(
                "the tar stream is larger than the caps allow",
            ));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpack the tar stream `input` (plain, gzip or zstd) into a new private temporary
/// directory. `name` says where it came from, in errors.
pub fn unpack(input: impl Read, name: &str, limits: &Limits) -> Result<Context, ContextError> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let head = input.fill_buf().map_err(|e| ContextError::Io {
        source_name: name.into(),
        context: "reading it".into(),
        error: e,
    })?;
    let compression = sniff(head).map_err(|r| ContextError::BadArchive {
        source_name: name.into(),
        reason: r.into(),
    })?;
    let bad = |e: io::Error| ContextError::BadArchive {
        source_name: name.into(),
        reason: format!(
            "not a readable tar stream ({e}); make it with tar -czf, tar --zstd -cf or tar -cf"
        ),
    };
    let decoded: Box<dyn Read> = match compression {
        TarCompression::None => Box::new(input),
        TarCompression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        TarCompression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(input).map_err(bad)?)
        }
    };
    let hit = Arc::new(AtomicBool::new(false));
    let stream_cap = limits
        .max_size
        .saturating_add(limits.max_entries.saturating_mul(STREAM_BYTES_PER_ENTRY))
        .saturating_add(1 << 20);
    let capped = Capped {
        inner: decoded,
        left: stream_cap,
        hit: Arc::clone(&hit),
    };
    let temp = TempRoot::new().map_err(|e| ContextError::Io {
        source_name: name.into(),
        context: format!(
            "creating a temporary directory in {}",
            std::env::temp_dir().display()
        ),
        error: e,
    })?;
    let root = temp.path().to_path_buf();
    let mut archive = tar::Archive::new(capped);
    let mut unpacker = Unpacker {
        root: &root,
        name,
        budget: Budget::new(*limits),
        symlinks: Vec::new(),
        last: None,
    };
    let entries = archive.entries().map_err(bad)?;
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return Err(unpacker.stream_error(e, &hit)),
        };
        unpacker.entry(entry, &hit)?;
    }
    unpacker.check_symlinks()?;
    Ok(Context {
        dir: root,
        temp: Some(temp),
    })
}

struct Unpacker<'a> {
    root: &'a Path,
    name: &'a str,
    budget: Budget,
    /// Every symlink made, checked again once the tree is complete.
    symlinks: Vec<PathBuf>,
    /// The last entry seen, to name where a broken or oversized stream stopped.
    last: Option<String>,
}

impl Unpacker<'_> {
    fn refuse(&self, entry: &Path, reason: Refusal) -> ContextError {
        ContextError::Refused {
            source_name: self.name.into(),
            entry: entry.display().to_string(),
            reason,
        }
    }

    fn io(&self, entry: &Path, error: io::Error) -> ContextError {
        ContextError::Io {
            source_name: self.name.into(),
            context: format!("unpacking entry {:?}", entry.display().to_string()),
            error,
        }
    }

    /// A failure of the stream itself: the caps, or a broken archive.
    fn stream_error(&self, e: io::Error, hit: &AtomicBool) -> ContextError {
        let after = match &self.last {
            Some(l) => format!("the entry after {l:?}"),
            None => "the first entry".into(),
        };
        if hit.load(Ordering::SeqCst) {
            // Headers (long names, pax records) past the caps: name where it happened.
            return ContextError::Refused {
                source_name: self.name.into(),
                entry: self
                    .last
                    .clone()
                    .unwrap_or_else(|| "(the first header)".into()),
                reason: Refusal::TooBig(self.budget.limits.max_size),
            };
        }
        ContextError::BadArchive {
            source_name: self.name.into(),
            reason: format!(
                "broken tar stream at {after} ({e}); make it with tar -czf, tar --zstd -cf or tar -cf"
            ),
        }
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        hit: &AtomicBool,
    ) -> Result<(), ContextError> {
        let path = entry
            .path()
            .map_err(|e| self.stream_error(e, hit))?
            .into_owned();
        let link = entry
            .link_name()
            .map_err(|e| self.stream_error(e, hit))?
            .map(std::borrow::Cow::into_owned);
        let header = entry.header();
        let entry_type = header.entry_type().as_byte();
        let executable = header.mode().map(|m| m & 0o111 != 0).unwrap_or(false);
        // The size as pax says, if it does.
        let size = entry.size();
        self.last = Some(path.display().to_string());
        let checked = check_entry(&path, entry_type, link.as_deref(), size, &mut self.budget)
            .map_err(|r| self.refuse(&path, r))?;
        let Some((rel, kind)) = checked else {
            return Ok(());
        };
        self.make_parents(&path, &rel)?;
        let dest = self.root.join(&rel);
        match fs::symlink_metadata(&dest) {
            Ok(m) if m.is_dir() => {
                if kind == Kind::Dir {
                    return Ok(());
                }
                return Err(self.refuse(&path, Refusal::ReplacesDirectory));
            }
            // Later entries win, as with tar: replace the earlier file or link.
            Ok(_) => fs::remove_file(&dest).map_err(|e| self.io(&path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.io(&path, e)),
        }
        match kind {
            Kind::Dir => fs::DirBuilder::new()
                .mode(0o700)
                .create(&dest)
                .map_err(|e| self.io(&path, e))?,
            Kind::File => {
                // Only the execute bit matters: the plan makes modes 0755 or 0644.
                let mode = if executable { 0o700 } else { 0o600 };
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&dest)
                    .map_err(|e| self.io(&path, e))?;
                let n = io::copy(&mut entry, &mut f).map_err(|e| self.stream_error(e, hit))?;
                if n != size {
                    return Err(ContextError::BadArchive {
                        source_name: self.name.into(),
                        reason: format!(
                            "entry {:?} is cut short ({n} of {size} bytes)",
                            path.display().to_string()
                        ),
                    });
                }
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(&target, &dest).map_err(|e| self.io(&path, e))?;
                self.symlinks.push(rel);
            }
            Kind::HardLink(target) => {
                // The target must be a regular file already here, reached through real
                // directories only.
                let ok = self.real_dirs(&target).is_ok()
                    && fs::symlink_metadata(self.root.join(&target)).is_ok_and(|m| m.is_file());
                if !ok {
                    return Err(self.refuse(&path, Refusal::HardLinkTarget(target)));
                }
                fs::hard_link(self.root.join(&target), &dest).map_err(|e| self.io(&path, e))?;
            }
            Kind::Skip => {}
        }
        Ok(())
    }

    /// Check that every parent of `rel` that exists is a real directory (not a symlink).
    fn real_dirs(&self, rel: &Path) -> Result<(), Refusal> {
        let mut at = PathBuf::new();
        let parents: Vec<_> = rel
            .parent()
            .map(|p| p.components().collect())
            .unwrap_or_default();
        for c in parents {
            at.push(c);
            match fs::symlink_metadata(self.root.join(&at)) {
                Ok(m) if m.file_type().is_symlink() => return Err(Refusal::ThroughSymlink(at)),
                Ok(m) if !m.is_dir() => return Err(Refusal::NotADirectory(at)),
                Ok(_) => {}
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    /// Create the missing parents of `rel` (0700), refusing to go through a symlink.
    fn make_parents(&self, path: &Path, rel: &Path) -> Result<(), ContextError> {
        self.real_dirs(rel).map_err(|r| self.refuse(path, r))?;
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(self.root.join(parent))
                .map_err(|e| self.io(path, e))?;
        }
        Ok(())
    }

    /// Resolve every symlink against the finished tree, following links inside it.
    fn check_symlinks(&self) -> Result<(), ContextError> {
        for link in &self.symlinks {
            if let Err(target) = resolve_inside(self.root, link) {
                return Err(self.refuse(link, Refusal::SymlinkEscapes(target)));
            }
        }
        Ok(())
    }
}

/// Follow the symlink `link` (relative to `root`) the way the kernel would, component by
/// component; `Err(target)` when it leaves `root` at some step (or loops), `target` being
/// the link's own target for the message.
fn resolve_inside(root: &Path, link: &Path) -> Result<(), PathBuf> {
    let own = fs::read_link(root.join(link)).unwrap_or_default();
    let mut stack: Vec<std::ffi::OsString> = link
        .parent()
        .map(|p| p.components().map(|c| c.as_os_str().to_owned()).collect())
        .unwrap_or_default();
    let mut todo: Vec<std::ffi::OsString> = own
        .components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        let c = Path::new(&c);
        match c.components().next() {
            Some(Component::RootDir | Component::Prefix(_)) => return Err(own),
            Some(Component::ParentDir) => {
                if stack.pop().is_none() {
                    return Err(own);
                }
            }
            Some(Component::CurDir) | None => {}
            Some(Component::Normal(n)) => {
                stack.push(n.to_owned());
                let here: PathBuf = stack.iter().collect();
                if let Ok(t) = fs::read_link(root.join(&here)) {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(own);
                    }
                    stack.pop();
                    todo.extend(t.components().rev().map(|c| c.as_os_str().to_owned()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        let cases: &[(&str, Result<ContextSource, &str>)] = &[
            ("-", Ok(ContextSource::Stdin)),
            ("dir", Ok(ContextSource::Path("dir".into()))),
            ("ctx.tar.gz", Ok(ContextSource::Path("ctx.tar.gz".into()))),
            (
                "s3://my-bucket/ctx/app.tar.zst",
                Ok(ContextSource::S3 {
                    bucket: "my-bucket".into(),
                    key: "ctx/app.tar.zst".into(),
                }),
            ),
            ("s3://my-bucket", Err("no object key")),
            ("s3://my-bucket/dir/", Err("no object key")),
            ("s3://My_Bucket/k", Err("is not an S3 bucket name")),
            ("s3:///k", Err("is not an S3 bucket name")),
            ("", Err("empty")),
        ];
        for (input, want) in cases {
            let got = input.parse::<ContextSource>();
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{input}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{input}: {g}"),
                _ => panic!("{input}: {got:?}"),
            }
        }
    }

    #[test]
    fn sizes_parse() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1048576", Some(1 << 20)),
            ("512M", Some(512 << 20)),
            ("4G", Some(4 << 30)),
            ("4GiB", Some(4 << 30)),
            ("4gb", Some(4 << 30)),
            ("100k", Some(100 << 10)),
            ("1T", Some(1 << 40)),
            ("0", Some(0)),
            ("4 G", Some(4 << 30)),
            ("G", None),
            ("-1", None),
            ("1.5G", None),
            ("4X", None),
            ("99999999999T", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input).ok(), *want, "{input}");
        }
    }

    #[test]
    fn compression_is_sniffed_from_magic_bytes() {
        let cases: &[(&[u8], Result<TarCompression, &str>)] = &[
            (&[0x1f, 0x8b, 8, 0, 0, 0], Ok(TarCompression::Gzip)),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0, 0], Ok(TarCompression::Zstd)),
            (b"hello.txt\0\0\0", Ok(TarCompression::None)),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Err("xz")),
            (b"BZh91AY", Err("bzip2")),
            (b"PK\x03\x04xx", Err("zip")),
            (b"", Err("empty")),
        ];
        for (head, want) in cases {
            match (want, sniff(head)) {
                (Ok(w), Ok(g)) => assert_eq!(*w, g),
                (Err(w), Err(g)) => assert!(g.contains(w), "{g}"),
                (w, g) => panic!("{head:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn entry_checks() {
        let limits = Limits {
            max_size: 100,
            max_entries: 1000,
        };
        type Want = Result<Option<(&'static str, Kind)>, Refusal>;
        let sym = |t: &str| Kind::Symlink(t.into());
        let cases: Vec<(&str, u8, Option<&str>, u64, Want)> = vec![
            ("bin/app", b'0', None, 10, Ok(Some(("bin/app", Kind::File)))),
            (
                "./bin/app",
                b'0',
                None,
                10,
                Ok(Some(("bin/app", Kind::File))),
            ),
            ("bin/./app", 0, None, 10, Ok(Some(("bin/app", Kind::File)))),
            ("bin/", b'5', None, 0, Ok(Some(("bin", Kind::Dir)))),
            ("./", b'5', None, 0, Ok(None)),
            ("pax_global_header", b'g', None, 52, Ok(None)),
            ("/etc/passwd", b'0', None, 1, Err(Refusal::Absolute)),
            ("../evil", b'0', None, 1, Err(Refusal::ParentDir)),
            ("a/../../evil", b'0', None, 1, Err(Refusal::ParentDir)),
            ("a/../b", b'5', None, 0, Err(Refusal::ParentDir)),
            (
                "lib/l",
                b'2',
                Some("../bin/app"),
                0,
                Ok(Some(("lib/l", sym("../bin/app")))),
            ),
            (
                "lib/l",
                b'2',
                Some("x/../../bin"),
                0,
                Ok(Some(("lib/l", sym("x/../../bin")))),
            ),
            ("l", b'2', Some("./app"), 0, Ok(Some(("l", sym("./app"))))),
            (
                "l",
                b'2',
                Some("../etc"),
                0,
                Err(Refusal::SymlinkEscapes("../etc".into())),
            ),
            (
                "lib/l",
                b'2',
                Some("../../etc"),
                0,
                Err(Refusal::SymlinkEscapes("../../etc".into())),
            ),
            (
                "l",
                b'2',
                Some("/etc/passwd"),
                0,
                Err(Refusal::SymlinkEscapes("/etc/passwd".into())),
            ),
            (
                "l",
                b'2',
                Some(""),
                0,
                Err(Refusal::SymlinkEscapes("".into())),
            ),
            (
                "h",
                b'1',
                Some("./bin/app"),
                0,
                Ok(Some(("h", Kind::HardLink("bin/app".into())))),
            ),
            (
                "h",
                b'1',
                Some("/etc/shadow"),
                0,
                Err(Refusal::HardLinkEscapes("/etc/shadow".into())),
            ),
            (
                "h",
                b'1',
                Some("../x"),
                0,
                Err(Refusal::HardLinkEscapes("../x".into())),
            ),
            (
                "h",
                b'1',
                Some("."),
                0,
                Err(Refusal::HardLinkEscapes(".".into())),
            ),
            (
                "dev/null",
                b'3',
                None,
                0,
                Err(Refusal::Special("character device")),
            ),
            (
                "dev/sda",
                b'4',
                None,
                0,
                Err(Refusal::Special("block device")),
            ),
            ("fifo", b'6', None, 0, Err(Refusal::Special("FIFO"))),
            (
                "sparse",
                b'S',
                None,
                0,
                Err(Refusal::Special("GNU sparse file")),
            ),
            (
                "vol",
                b'V',
                None,
                0,
                Err(Refusal::Special("tar entry of an unsupported type")),
            ),
            ("big", b'0', None, 101, Err(Refusal::TooBig(100))),
            // A symlink's or directory's size field is not content.
            ("l2", b'2', Some("a"), 1 << 40, Ok(Some(("l2", sym("a"))))),
        ];
        for (path, ty, link, size, want) in cases {
            let mut budget = Budget::new(limits);
            let got = check_entry(Path::new(path), ty, link.map(Path::new), size, &mut budget);
            let want = want.map(|o| o.map(|(p, k)| (PathBuf::from(p), k)));
            assert_eq!(got, want, "{path} type {} -> {link:?}", ty as char);
        }
    }

    #[test]
    fn budget_counts_across_entries() {
        let mut b = Budget::new(Limits {
            max_size: 10,
            max_entries: 3,
        });
        assert_eq!(b.admit(6), Ok(()));
        assert_eq!(b.admit(4), Ok(()), "exactly the cap is allowed");
        assert_eq!(b.admit(1), Err(Refusal::TooBig(10)));
        let mut b = Budget::new(Limits {
            max_size: 10,
            max_entries: 3,
        });
        for _ in 0..3 {
            assert_eq!(b.admit(0), Ok(()));
        }
        assert_eq!(b.admit(0), Err(Refusal::TooMany(3)));
        let mut b = Budget::new(Limits {
            max_size: u64::MAX,
            max_entries: 3,
        });
        assert_eq!(b.admit(u64::MAX), Ok(()));
        assert_eq!(b.admit(1), Err(Refusal::TooBig(u64::MAX)), "no overflow");
    }

    /// A tar built in memory with raw headers (the tar crate's builder refuses `..`).
    fn tar_of(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, ty, link, data) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::new(*ty));
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn unpack_in(tar: &[u8]) -> Result<Context, ContextError> {
        unpack(tar, "test.tar", &Limits::default())
    }

    #[test]
    fn unpacks_files_dirs_and_links_inside() {
        let tar = tar_of(&[
            ("bin/", b'5', "", b""),
            ("bin/app", b'0', "", b"#!/bin/sh\n"),
            ("etc/conf", b'0', "", b"x=1\n"),
            ("lib/link", b'2', "../bin/app", b""),
            ("hard", b'1', "bin/app", b""),
        ]);
        let ctx = unpack_in(&tar).unwrap();
        let d = ctx.dir().to_path_buf();
        assert!(ctx.is_unpacked());
        assert_eq!(fs::read(d.join("bin/app")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::read(d.join("lib/link")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::read(d.join("hard")).unwrap(), b"#!/bin/sh\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the context directory is private");
        drop(ctx);
        assert!(!d.exists(), "removed on drop");
    }

    #[test]
    fn links_that_escape_only_together_are_refused() {
        // a/b -> .. stays inside; c -> a/b/.. climbs out through it.
        let tar = tar_of(&[
            ("a/", b'5', "", b""),
            ("a/b", b'2', "..", b""),
            ("c", b'2', "a/b/..", b""),
        ]);
        let err = unpack_in(&tar).unwrap_err();
        assert!(
            matches!(&err, ContextError::Refused { entry, reason: Refusal::SymlinkEscapes(_), .. } if entry == "c"),
            "{err}"
        );
        // Writing through a symlink (even one pointing inside) is refused.
        let tar = tar_of(&[
            ("d/", b'5', "", b""),
            ("l", b'2', "d", b""),
            ("l/f", b'0', "", b"x"),
        ]);
        let err = unpack_in(&tar).unwrap_err();
        assert!(
            matches!(
                &err,
                ContextError::Refused {
                    reason: Refusal::ThroughSymlink(_),
                    ..
                }
            ),
            "{err}"
        );
        // A hard link to a symlink (rather than a file) is refused.
        let tar = tar_of(&[("l", b'2', "x", b""), ("h", b'1', "l", b"")]);
        let err = unpack_in(&tar).unwrap_err();
        assert!(
            matches!(
                &err,
                ContextError::Refused {
                    reason: Refusal::HardLinkTarget(_),
                    ..
                }
            ),
            "{err}"
        );
        // A link loop is no escape, but is refused as one cannot tell where it goes.
        let tar = tar_of(&[("x", b'2', "y/z", b""), ("y", b'2', "x", b"")]);
        assert!(unpack_in(&tar).is_err());
    }

    #[test]
    fn errors_are_one_line_with_exit_codes() {
        let tar = tar_of(&[("../evil", b'0', "", b"x")]);
        let err = unpack(&tar[..], "ctx.tar", &Limits::default()).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("\"../evil\""), "{msg}");
        assert_eq!(err.exit_code(), ExitCode::Input);
        let err = unpack(&b"BZh91AY&SY"[..], "ctx.tar.bz2", &Limits::default()).unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::Input);
        assert!(err.to_string().contains("bzip2"), "{err}");
    }
}
