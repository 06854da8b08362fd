//! Planning: resolve every `[[layer.files]]` entry for each platform into the exact list of
//! tar entries (path, kind, mode, owner), sorted, with parent directories; and check each ELF
//! artifact against the platform's architecture.
//!
//! Only metadata and ELF headers are read here; file contents are read once, later, while the
//! layer is tarred, compressed and hashed.
//!
//! Normalisation for reproducibility (same inputs, same digest on any machine): modes are not taken verbatim from the host
//! (umask and checkout tools differ) but as 0755 when any execute bit is set and 0644
//! otherwise, unless the spec gives `mode`; directories are 0755, symlinks 0777; owners come
//! from the spec (default 0:0), never from the host.

use crate::exit::ExitCode;
use crate::platform::{Platform, elf_machine_name};
use crate::spec::{FileSpec, Location, Spec};
use object::read::elf::{FileHeader, ProgramHeader};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What a tar entry is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Dir,
    /// A regular file, read from `src` when the layer is written; `size` as planned.
    File {
        src: PathBuf,
        size: u64,
    },
    Symlink {
        target: PathBuf,
    },
}

/// One tar entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Path in the image, relative (no leading `/`), as tar entries are written.
    pub path: PathBuf,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One layer's entries, sorted by path bytes, parents first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerPlan {
    pub entries: Vec<Entry>,
    /// For the config history: which spec layer made it.
    pub created_by: String,
}

/// Everything one platform's image is made of.
#[derive(Debug, Clone)]
pub struct PlatformPlan {
    pub platform: Platform,
    pub layers: Vec<LayerPlan>,
}

/// The whole build, before any content is read.
#[derive(Debug, Clone)]
pub struct Plan {
    pub platforms: Vec<PlatformPlan>,
    /// Problems that do not stop the build (e.g. a dynamic ELF on scratch).
    pub warnings: Vec<String>,
}

/// Why planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{at}: src {} does not exist{}; build the artifact first or fix the path", path.display(), for_platform(platform))]
    MissingSrc {
        at: Location,
        path: PathBuf,
        platform: Option<Platform>,
    },
    /// `src` (or what its symlinks lead to) is not inside the build context: a spec must not
    /// be able to copy e.g. the runner's credentials into an image it pushes.
    #[error("{at}: src {} {why}, outside the build context {}; put the file inside the context (the spec's project directory, or --context DIR) and name it relative to it, or pass --allow-outside-context if this spec is trusted", shown_path(path), root.display())]
    OutsideContext {
        at: Location,
        /// The src as written (placeholders expanded).
        path: PathBuf,
        /// How it leaves the context, e.g. "is an absolute path".
        why: String,
        /// The context's root, canonical.
        root: PathBuf,
    },
    /// An `oci:` base of the spec lies outside the build context: its blobs would be read and
    /// pushed like a `src` (e.g. a layout of another project's private images).
    #[error("{}: base {base} {why}, outside the build context {}; put the layout inside the context (the spec's project directory, or --context DIR), or pass --allow-outside-context if this spec is trusted", spec.display(), root.display())]
    BaseOutsideContext {
        /// The spec file.
        spec: PathBuf,
        /// The base as written (`oci:PATH[:TAG]`).
        base: String,
        /// How it leaves the context.
        why: String,
        /// The context's root, canonical.
        root: PathBuf,
    },
    #[error("{at}: src {} is a symlink to {}, which does not exist; fix the link or point src at the real file", path.display(), target.display())]
    DanglingSymlink {
        at: Location,
        path: PathBuf,
        target: PathBuf,
    },
    #[error("{at}: cannot read {}: {source}; check its permissions", path.display())]
    Unreadable {
        at: Location,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{at}: {} is a {what}, which cannot go into an image; only files, directories and symlinks can", path.display())]
    Unsupported {
        at: Location,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{second}: dest {dest} is already written by {first}; give each file its own dest")]
    DuplicateDest {
        dest: String,
        first: Location,
        second: Location,
    },
    #[error("{at}: {} is a {found} ELF file but the image is for {platform} (which needs {expected}); build it for {platform} or use --no-arch-check", path.display())]
    ArchMismatch {
        at: Location,
        path: PathBuf,
        platform: Platform,
        found: String,
        expected: String,
    },
    #[error("{}: starts like an ELF file but is not a valid one ({reason}); rebuild it, or use --no-arch-check if it is data", path.display())]
    InvalidElf { path: PathBuf, reason: String },
    /// A path in the image that runtimes would mangle (see [`check_image_path`]).
    #[error("{at}: /{} {reason}", crate::untrusted::shown(&path.to_string_lossy(), 120))]
    BadImagePath {
        at: Location,
        path: PathBuf,
        reason: String,
        /// The spec's own `dest` (a spec error) rather than a name found in a directory.
        in_spec: bool,
    },
}

/// Longest name component Linux file systems store (NAME_MAX).
const NAME_MAX: usize = 255;
/// Longest path Linux system calls accept (PATH_MAX, including the terminating NUL).
const PATH_MAX: usize = 4096;

/// Why `path` (relative, as in the tar) cannot go into a layer, if it cannot:
/// - a component starting with `.wh.` is an OCI whiteout (image-spec layer.md "Whiteouts"):
///   runtimes would delete files of the layers below instead of creating it;
/// - a component over NAME_MAX or a path over PATH_MAX - 2 bytes (with its leading `/` and
///   NUL) cannot be created by any runtime's extractor, whatever the tar format says.
pub fn check_image_path(path: &Path) -> Option<String> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() + 2 > PATH_MAX {
        return Some(format!(
            "is {} bytes long; extracting it fails over {} (PATH_MAX): shorten the path",
            bytes.len(),
            PATH_MAX - 2
        ));
    }
    for c in path.components() {
        let name = c.as_os_str().as_bytes();
        if name.starts_with(b".wh.") {
            return Some(format!(
                "has a component starting with .wh. ({}), which OCI layers reserve for whiteouts (deletions); rename it",
                crate::untrusted::shown(&String::from_utf8_lossy(name), 60)
            ));
        }
        if name.len() > NAME_MAX {
            return Some(format!(
                "has a component of {} bytes; file systems store at most {NAME_MAX} (NAME_MAX): shorten it",
                name.len()
            ));
        }
    }
    None
}

fn shown_path(p: &Path) -> String {
    crate::untrusted::shown(&p.to_string_lossy(), 200)
}

fn for_platform(p: &Option<Platform>) -> String {
    p.as_ref()
        .map(|p| format!(" (for {p})"))
        .unwrap_or_default()
}

impl PlanError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            PlanError::DuplicateDest { .. } => ExitCode::Usage,
            PlanError::BadImagePath { in_spec: true, .. } => ExitCode::Usage,
            _ => ExitCode::Input,
        }
    }
}

/// How to plan.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Directory relative `src` paths are resolved against.
    pub context: PathBuf,
    /// The build context's root: every `src`, and every symlink it goes through, must stay
    /// inside it. None (`--allow-outside-context`): any path is read.
    pub confine_to: Option<PathBuf>,
    /// Check ELF machine types (on by default; `--no-arch-check` turns it off).
    pub arch_check: bool,
    /// Platforms built on a base image: a dynamic program's interpreter may come from the
    /// base (whose files are not read here), so no "interpreter not in the image" warning.
    pub based: Vec<Platform>,
}

/// Plan every layer for every platform.
pub fn plan(spec: &Spec, platforms: &[Platform], opts: &PlanOptions) -> Result<Plan, PlanError> {
    let mut out = Plan {
        platforms: Vec::new(),
        warnings: Vec::new(),
    };
    let mut warnings = BTreeSet::new();
    let root = match &opts.confine_to {
        Some(dir) => Some(Root::new(dir, &spec.path)?),
        None => None,
    };
    for platform in platforms {
        let mut layers = Vec::new();
        let mut written: BTreeMap<PathBuf, Location> = BTreeMap::new();
        let mut interpreters: Vec<(PathBuf, PathBuf, String)> = Vec::new();
        for (i, layer) in spec.layers.iter().enumerate() {
            let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
            for file in &layer.files {
                add_file(
                    file,
                    platform,
                    opts,
                    root.as_ref(),
                    &mut entries,
                    &mut written,
                    &mut interpreters,
                )?;
            }
            add_parents(&mut entries);
            let dests: Vec<&str> = layer.files.iter().map(|f| f.dest.as_str()).collect();
            layers.push(LayerPlan {
                entries: entries.into_values().collect(),
                created_by: format!("imgbuild layer {}: {}", i + 1, dests.join(" ")),
            });
        }
        // A dynamically linked program on scratch needs its interpreter in the image.
        let present: BTreeSet<&Path> = layers
            .iter()
            .flat_map(|l| l.entries.iter())
            .map(|e| e.path.as_path())
            .collect();
        if opts.based.contains(platform) {
            interpreters.clear();
        }
        for (src, dest, interp) in interpreters {
            let rel = Path::new(interp.trim_start_matches('/'));
            if !present.contains(rel) {
                warnings.insert(format!(
                    "{} (/{}) is dynamically linked and needs {interp}, which is not in the {platform} image: it will not start; link it statically (e.g. a *-linux-musl target) or add the loader and libraries",
                    src.display(),
                    dest.display()
                ));
            }
        }
        out.platforms.push(PlatformPlan {
            platform: platform.clone(),
            layers,
        });
    }
    out.warnings = warnings.into_iter().collect();
    Ok(out)
}

/// Refuse an `oci:` base of `spec` (its `base` or a `base_overrides` entry) whose layout is
/// outside `root` (the build context), by the same rules as `src`: the path as written, then
/// with its symlinks resolved. A layout that does not exist is left to the base's own error.
/// `--base` on the command line is the user's own choice and is not checked.
pub fn confine_base_layouts(spec: &Spec, root: &Path) -> Result<(), PlanError> {
    let root = Root::new(root, &spec.path)?;
    let spec_dir = spec.path.parent().unwrap_or(Path::new("."));
    for base in std::iter::once(&spec.base).chain(spec.base_overrides.values()) {
        let crate::spec::Base::Layout { path, text, .. } = base else {
            continue;
        };
        let written = path.strip_prefix(spec_dir).unwrap_or(path);
        let why = match root.lexical(written, path) {
            Some(why) => Some(why),
            None => root.resolved(path).ok().flatten(),
        };
        if let Some(why) = why {
            return Err(PlanError::BaseOutsideContext {
                spec: spec.path.clone(),
                base: text.clone(),
                why,
                root: root.canonical,
            });
        }
    }
    Ok(())
}

/// The build context's root, as given and canonical (symlinks resolved).
struct Root {
    given: PathBuf,
    canonical: PathBuf,
}

impl Root {
    fn new(dir: &Path, spec: &Path) -> Result<Root, PlanError> {
        let canonical = fs::canonicalize(dir).map_err(|source| PlanError::Unreadable {
            at: Location {
                file: spec.to_path_buf(),
                line: 1,
                column: 1,
            },
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Root {
            given: lexical_absolute(dir),
            canonical,
        })
    }

    /// Why `src` (`written` in the spec, `joined` to the context directory) is outside the
    /// root before any file is looked at: an absolute path, or `..` leading out of it.
    fn lexical(&self, written: &Path, joined: &Path) -> Option<String> {
        if written.is_absolute() {
            return Some("is an absolute path".into());
        }
        (!lexical_absolute(joined).starts_with(&self.given))
            .then(|| "leads out of it with \"..\"".into())
    }

    /// Why the existing `src` is outside the root once every symlink on its way is resolved.
    fn resolved(&self, src: &Path) -> Result<Option<String>, io::Error> {
        let real = fs::canonicalize(src)?;
        Ok((!real.starts_with(&self.canonical))
            .then(|| format!("resolves (through a symlink) to {}", shown_path(&real))))
    }
}

/// `path` made absolute (against the working directory) with `.` and `..` removed by text
/// alone, as the spec's author reads it.
fn lexical_absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut parts: Vec<std::path::Component<'_>> = Vec::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                if parts.len() > 1 {
                    parts.pop();
                }
            }
            std::path::Component::CurDir => {}
            c => parts.push(c),
        }
    }
    parts.iter().collect()
}

fn add_file(
    file: &FileSpec,
    platform: &Platform,
    opts: &PlanOptions,
    root: Option<&Root>,
    entries: &mut BTreeMap<Vec<u8>, Entry>,
    written: &mut BTreeMap<PathBuf, Location>,
    interpreters: &mut Vec<(PathBuf, PathBuf, String)>,
) -> Result<(), PlanError> {
    let expanded = platform.expand(&file.src);
    let src = opts.context.join(&expanded);
    let templated = expanded != file.src;
    let at = &file.at;
    let outside = |why: String| PlanError::OutsideContext {
        at: at.clone(),
        path: PathBuf::from(&expanded),
        why,
        root: root.map(|r| r.canonical.clone()).unwrap_or_default(),
    };
    if let Some(why) = root.and_then(|r| r.lexical(Path::new(&expanded), &src)) {
        return Err(outside(why));
    }
    // `src` itself is followed if it is a symlink: the user named the file they mean.
    let meta = match fs::metadata(&src) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(match fs::read_link(&src) {
                Ok(target) => PlanError::DanglingSymlink {
                    at: at.clone(),
                    path: src,
                    target,
                },
                Err(_) => PlanError::MissingSrc {
                    at: at.clone(),
                    path: src,
                    platform: templated.then(|| platform.clone()),
                },
            });
        }
        Err(source) => {
            return Err(PlanError::Unreadable {
                at: at.clone(),
                path: src,
                source,
            });
        }
    };
    // Symlinks on the way to `src` (the file itself or a directory above it) are followed
    // only while they stay inside the context. A directory's contents are walked below
    // without following symlinks (they are stored as symlinks), so they stay inside too.
    if let Some(r) = root {
        match r.resolved(&src) {
            Ok(None) => {}
            Ok(Some(why)) => return Err(outside(why)),
            Err(source) => {
                return Err(PlanError::Unreadable {
                    at: at.clone(),
                    path: src,
                    source,
                });
            }
        }
    }
    let dest = PathBuf::from(file.dest.trim_start_matches('/'));
    let spec_dest = dest.clone();
    let mut add = |entry: Entry, source: &Path| -> Result<(), PlanError> {
        if let Some(reason) = check_image_path(&entry.path) {
            return Err(PlanError::BadImagePath {
                at: at.clone(),
                in_spec: spec_dest.starts_with(&entry.path),
                path: entry.path,
                reason,
            });
        }
        if !matches!(entry.kind, EntryKind::Dir) {
            if let Some(first) = written.get(&entry.path) {
                return Err(PlanError::DuplicateDest {
                    dest: format!("/{}", entry.path.display()),
                    first: first.clone(),
                    second: at.clone(),
                });
            }
            written.insert(entry.path.clone(), at.clone());
        }
        if let EntryKind::File { .. } = entry.kind {
            if opts.arch_check {
                if let Some(interp) = check_elf(source, platform, at)? {
                    interpreters.push((source.to_path_buf(), entry.path.clone(), interp));
                }
            } else {
                // Still prove the file can be opened now, so a permission problem is reported
                // with its spec line rather than half-way through writing a layer.
                File::open(source).map_err(|e| PlanError::Unreadable {
                    at: at.clone(),
                    path: source.to_path_buf(),
                    source: e,
                })?;
            }
        }
        entries.insert(entry.path.as_os_str().as_bytes().to_vec(), entry);
        Ok(())
    };

    if meta.is_file() {
        add(
            Entry {
                path: dest,
                kind: EntryKind::File {
                    src: src.clone(),
                    size: meta.len(),
                },
                mode: file
                    .mode
                    .unwrap_or_else(|| normal_mode(meta.permissions().mode())),
                uid: file.uid,
                gid: file.gid,
            },
            &src,
        )?;
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(PlanError::Unsupported {
            at: at.clone(),
            path: src,
            what: kind_name(&meta),
        });
    }
    // A directory: its contents go under `dest`, walked without following symlinks (so no
    // loops and nothing outside the context is read), sorted by name.
    let empty_dir = fs::read_dir(&src)
        .map_err(|source| PlanError::Unreadable {
            at: at.clone(),
            path: src.clone(),
            source,
        })?
        .next()
        .is_none();
    let walk = walkdir::WalkDir::new(&src)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    for item in walk {
        let item = item.map_err(|e| PlanError::Unreadable {
            at: at.clone(),
            path: e
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| src.clone()),
            source: e
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("directory walk failed")),
        })?;
        let rel = item.path().strip_prefix(&src).unwrap_or(Path::new(""));
        let path = if rel.as_os_str().is_empty() {
            dest.clone()
        } else {
            dest.join(rel)
        };
        let ft = item.file_type();
        // `src` itself may be a symlink to a directory (followed, as for a file; walkdir
        // descends into it): it is the directory `dest`, not a symlink.
        let entry = if ft.is_dir() || item.depth() == 0 {
            Entry {
                path,
                kind: EntryKind::Dir,
                // `mode` on an empty source directory is the directory's own mode (a 1777
                // `/tmp`); on a non-empty one it is the mode of the files inside.
                mode: match file.mode {
                    Some(m) if rel.as_os_str().is_empty() && empty_dir => m,
                    _ => 0o755,
                },
                uid: file.uid,
                gid: file.gid,
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(item.path()).map_err(|source| PlanError::Unreadable {
                at: at.clone(),
                path: item.path().to_path_buf(),
                source,
            })?;
            Entry {
                path,
                kind: EntryKind::Symlink { target },
                mode: 0o777,
                uid: file.uid,
                gid: file.gid,
            }
        } else if ft.is_file() {
            let m = item.metadata().map_err(|e| PlanError::Unreadable {
                at: at.clone(),
                path: item.path().to_path_buf(),
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("stat failed")),
            })?;
            Entry {
                path,
                kind: EntryKind::File {
                    src: item.path().to_path_buf(),
                    size: m.len(),
                },
                mode: file
                    .mode
                    .unwrap_or_else(|| normal_mode(m.permissions().mode())),
                uid: file.uid,
                gid: file.gid,
            }
        } else {
            let m = fs::symlink_metadata(item.path()).ok();
            return Err(PlanError::Unsupported {
                at: at.clone(),
                path: item.path().to_path_buf(),
                what: m.as_ref().map_or("special file", kind_name),
            });
        };
        add(entry, item.path())?;
    }
    Ok(())
}

fn kind_name(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "named pipe"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// 0755 if any execute bit is set, else 0644 (plus nothing else: no setuid from the host).
fn normal_mode(host: u32) -> u32 {
    if host & 0o111 != 0 { 0o755 } else { 0o644 }
}

/// Emit every missing parent directory (0755, root-owned), so extractors never invent
/// directories with their own defaults (image-spec layer.md "Changesets").
fn add_parents(entries: &mut BTreeMap<Vec<u8>, Entry>) {
    let mut parents = Vec::new();
    for e in entries.values() {
        let mut p = e.path.parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(dir.to_path_buf());
            p = dir.parent();
        }
    }
    for dir in parents {
        entries
            .entry(dir.as_os_str().as_bytes().to_vec())
            .or_insert(Entry {
                path: dir,
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
    }
}

/// If `src` is an ELF file, check its class and machine against `platform`; return its
/// interpreter (PT_INTERP) if it has one. Reads only the headers.
fn check_elf(src: &Path, platform: &Platform, at: &Location) -> Result<Option<String>, PlanError> {
    let unreadable = |source| PlanError::Unreadable {
        at: at.clone(),
        path: src.to_path_buf(),
        source,
    };
    let mut file = File::open(src).map_err(unreadable)?;
    let mut head = [0u8; 20];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(unreadable(e)),
        }
    }
    if n < 4 || &head[..4] != b"\x7fELF" {
        return Ok(None);
    }
    let invalid = |reason: &str| PlanError::InvalidElf {
        path: src.to_path_buf(),
        reason: reason.to_string(),
    };
    if n < 20 {
        return Err(invalid("truncated header"));
    }
    let machine = match head[5] {
        1 => u16::from_le_bytes([head[18], head[19]]),
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => return Err(invalid("unknown byte order")),
    };
    let is_64 = match head[4] {
        1 => false,
        2 => true,
        _ => return Err(invalid("unknown ELF class")),
    };
    if let Some(expected) = platform.elf_machine()
        && (machine != expected || is_64 != platform.elf_is_64())
    {
        let bits = if is_64 { "64-bit" } else { "32-bit" };
        return Err(PlanError::ArchMismatch {
            at: at.clone(),
            path: src.to_path_buf(),
            platform: platform.clone(),
            found: format!("{bits} {}", elf_machine_name(machine)),
            expected: elf_machine_name(expected),
        });
    }
    // Program headers, for PT_INTERP, through a read cache: only the ranges asked for are read.
    let cache = object::read::ReadCache::new(file);
    let interp = if is_64 {
        interpreter::<object::elf::FileHeader64<object::Endianness>>(&cache)
    } else {
        interpreter::<object::elf::FileHeader32<object::Endianness>>(&cache)
    };
    interp.map_err(|e| invalid(&e.to_string()))
}

fn interpreter<H: FileHeader<Endian = object::Endianness>>(
    cache: &object::read::ReadCache<File>,
) -> object::read::Result<Option<String>> {
    let header = H::parse(cache)?;
    let endian = header.endian()?;
    for ph in header.program_headers(endian, cache)? {
        if let Some(interp) = ph.interpreter(endian, cache)? {
            return Ok(Some(String::from_utf8_lossy(interp).into_owned()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_normalised() {
        for (host, want) in [
            (0o700, 0o755),
            (0o600, 0o644),
            (0o4755, 0o755),
            (0o664, 0o644),
            (0o744, 0o755),
        ] {
            assert_eq!(normal_mode(host), want, "{host:o}");
        }
    }

    #[test]
    fn parents_are_added_sorted() {
        let mut entries = BTreeMap::new();
        for p in ["usr/local/bin/x", "etc/a", "usr/local-x"] {
            entries.insert(
                p.as_bytes().to_vec(),
                Entry {
                    path: p.into(),
                    kind: EntryKind::Symlink { target: "t".into() },
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                },
            );
        }
        add_parents(&mut entries);
        let paths: Vec<String> = entries
            .values()
            .map(|e| e.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "etc",
                "etc/a",
                "usr",
                "usr/local",
                "usr/local-x",
                "usr/local/bin",
                "usr/local/bin/x"
            ]
        );
    }

    #[test]
    fn paths_runtimes_would_mangle_are_refused() {
        let long_name = "n".repeat(256);
        let deep = vec!["d".repeat(200); 21].join("/");
        let cases: &[(&str, Option<&str>)] = &[
            ("usr/bin/app", None),
            (&"n".repeat(255), None),
            ("etc/.wh.passwd", Some("whiteouts")),
            (".wh..wh..opq", Some("whiteouts")),
            ("a/.wh.x/b", Some("whiteouts")),
            ("a/x.wh.y", None),
            (&long_name, Some("NAME_MAX")),
            (&deep, Some("PATH_MAX")),
        ];
        for (path, want) in cases {
            let got = check_image_path(Path::new(path));
            match (want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) if g.contains(w) => {}
                _ => panic!(
                    "{}: got {got:?}, want {want:?}",
                    &path[..path.len().min(40)]
                ),
            }
        }
    }
}
