//! Keeping the cache bounded: `imgbuild cache du`, `imgbuild cache prune`, and the automatic
//! prune to `IMGBUILD_CACHE_MAX_SIZE` after each run. A sink of its own: it only reads and
//! deletes the files [`crate::cache`], [`crate::base`] and [`crate::lease`] write.
//!
//! Every file of the cache is an entry with a size (its length) and a "last used" time:
//! - blobs (`blobs/`, `bases/blobs/`): the later of the blob's mtime and its lock file's
//!   (a lease sets it, [`crate::lease`]);
//! - records (`layers/`, `files/`, `pushed/`): their mtime (a hit touches them);
//! - temporary files (`.tmp-*`) of runs that died: removed whenever no run holds them and they
//!   were not written to for a minute, whatever the limits (no name refers to them).
//!
//! A prune removes entries last used before `--older-than`, then the least recently used ones
//! until the cache fits `--max-size`. A blob is removed only under its exclusive lock, taken
//! without waiting: one a concurrent run holds is kept (and reported). Layer records whose
//! blob is gone are removed with it (they could only cause a rebuild). One prune at a time
//! (`prune.lock`); the automatic one skips when another is under way.

use crate::cache::LOCKS;
use crate::lease;
use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The default of `IMGBUILD_CACHE_MAX_SIZE`: 10 GiB, BuildKit's order of magnitude for its
/// build cache, a fraction of a CI runner's free disk (GitHub's standard runners: ~14 GiB+).
pub const DEFAULT_MAX_SIZE: u64 = 10 << 30;

/// How long a temporary file must sit unwritten (and unlocked) before it counts as abandoned.
const TEMP_GRACE: Duration = Duration::from_secs(60);

/// The kinds of entries, as `du` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    /// Layers, and for `push` the configs, manifests and indexes.
    Blobs,
    /// Base-image manifests, configs and layers.
    Bases,
    /// Layer records (`layers/`).
    Layers,
    /// Content digests of source files (`files/`).
    Files,
    /// Push records (`pushed/`).
    Pushed,
    /// What killed runs left behind, and files being written now.
    Temporary,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Blobs => "blobs",
            Section::Bases => "bases",
            Section::Layers => "layers",
            Section::Files => "files",
            Section::Pushed => "pushed",
            Section::Temporary => "temporary",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    section: Section,
    size: u64,
    used: SystemTime,
    /// For blobs: the lock name (digest hex).
    lock: Option<String>,
}

/// Size and count per section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub sections: Vec<(Section, u64, usize)>,
    pub total: u64,
}

/// What to remove.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Remove least recently used entries until the cache is at most this many bytes.
    pub max_size: Option<u64>,
    /// Remove entries last used longer ago than this.
    pub older_than: Option<Duration>,
}

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub removed: usize,
    pub freed: u64,
    /// Blobs that were due but in use by a running build or push.
    pub in_use: usize,
    /// The cache's size afterwards.
    pub remaining: u64,
    /// True when another prune was under way and this one did nothing (automatic prune).
    pub skipped: bool,
}

/// The cache's size per section.
pub fn du(root: &Path) -> io::Result<Usage> {
    let entries = scan(root)?;
    let mut usage = Usage::default();
    for e in &entries {
        usage.total += e.size;
        match usage.sections.iter_mut().find(|(s, _, _)| *s == e.section) {
            Some((_, size, n)) => {
                *size += e.size;
                *n += 1;
            }
            None => usage.sections.push((e.section, e.size, 1)),
        }
    }
    usage.sections.sort();
    Ok(usage)
}

/// Prune the cache at `root` by `policy`. `wait`: wait for a prune already under way (the
/// command) rather than skip (the automatic prune after a run).
pub fn prune(root: &Path, policy: Policy, wait: bool) -> io::Result<Report> {
    let Some(_one_at_a_time) = prune_lock(root, wait)? else {
        return Ok(Report {
            skipped: true,
            ..Report::default()
        });
    };
    let locks = root.join(LOCKS);
    let now = SystemTime::now();
    let mut entries = scan(root)?;
    entries.sort_by_key(|e| e.used);
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut report = Report::default();
    let cutoff = policy.older_than.and_then(|d| now.checked_sub(d));
    let mut removed_blobs = false;
    for e in &entries {
        let due = e.section == Section::Temporary
            || cutoff.is_some_and(|c| e.used < c)
            || policy.max_size.is_some_and(|max| total > max);
        if !due {
            continue;
        }
        let removed = match (e.section, &e.lock) {
            (Section::Temporary, _) => remove_abandoned_temp(&e.path, now)?,
            (_, Some(name)) => match lease::try_exclusive(&locks, name)? {
                Some(_guard) => {
                    let r = remove(&e.path)?;
                    // Its lock file goes with it, still held (see crate::lease).
                    let _ = fs::remove_file(locks.join(name));
                    removed_blobs = true;
                    r
                }
                None => {
                    report.in_use += 1;
                    false
                }
            },
            (_, None) => remove(&e.path)?,
        };
        if removed {
            report.removed += 1;
            report.freed += e.size;
            total -= e.size;
        }
    }
    if removed_blobs {
        let (n, freed) = remove_orphan_layer_records(root)?;
        report.removed += n;
        report.freed += freed;
        total = total.saturating_sub(freed);
    }
    remove_orphan_locks(root)?;
    report.remaining = total;
    Ok(report)
}

/// The automatic prune after a run: to `IMGBUILD_CACHE_MAX_SIZE` (`max_size`).
pub fn after_run(root: &Path, max_size: u64) -> io::Result<Report> {
    prune(
        root,
        Policy {
            max_size: Some(max_size),
            older_than: None,
        },
        false,
    )
}

fn prune_lock(root: &Path, wait: bool) -> io::Result<Option<File>> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(root.join("prune.lock"))?;
    if wait {
        file.lock()?;
        return Ok(Some(file));
    }
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Every entry of the cache. Files that vanish while we look are left out.
fn scan(root: &Path) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let locks = root.join(LOCKS);
    let blob_dirs = [
        (root.join("blobs/sha256"), Section::Blobs),
        (root.join("bases/blobs/sha256"), Section::Bases),
    ];
    for (dir, section) in blob_dirs {
        for (path, name, meta) in list(&dir)? {
            if name.starts_with(".tmp") {
                out.push(entry(path, Section::Temporary, &meta, None));
                continue;
            }
            let mut e = entry(path, section, &meta, Some(name.clone()));
            if let Some(t) = lease::last_used(&locks, &name) {
                e.used = e.used.max(t);
            }
            out.push(e);
        }
    }
    let mut record_dirs = vec![
        (root.join("layers"), Section::Layers),
        (root.join(crate::cache::SHAPES), Section::Layers),
        (root.join("files"), Section::Files),
    ];
    for (path, _, meta) in list(&root.join("pushed"))? {
        if meta.is_dir() {
            record_dirs.push((path, Section::Pushed));
        }
    }
    for (dir, section) in record_dirs {
        for (path, name, meta) in list(&dir)? {
            let section = if name.starts_with(".tmp") {
                Section::Temporary
            } else {
                section
            };
            out.push(entry(path, section, &meta, None));
        }
    }
    Ok(out)
}

fn entry(path: PathBuf, section: Section, meta: &fs::Metadata, lock: Option<String>) -> Entry {
    Entry {
        path,
        section,
        size: meta.len(),
        used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        lock,
    }
}

/// (path, file name, metadata) of each entry of `dir`; nothing when it does not exist.
fn list(dir: &Path) -> io::Result<Vec<(PathBuf, String, fs::Metadata)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let name = e.file_name().to_string_lossy().into_owned();
        out.push((e.path(), name, meta));
    }
    Ok(out)
}

/// Remove a file; false when it was gone already.
fn remove(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A temporary file is abandoned when no writer holds its lock (blob writers lock theirs,
/// `crate::store`) and it was not written to for [`TEMP_GRACE`] (record writers live for
/// microseconds and do not lock).
fn remove_abandoned_temp(path: &Path, now: SystemTime) -> io::Result<bool> {
    let Ok(file) = File::open(path) else {
        return Ok(false);
    };
    let idle = file
        .metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d >= TEMP_GRACE));
    if !idle {
        return Ok(false);
    }
    match file.try_lock() {
        Ok(()) => remove(path),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Remove layer records whose blob is gone; (count, bytes).
fn remove_orphan_layer_records(root: &Path) -> io::Result<(usize, u64)> {
    #[derive(serde::Deserialize)]
    struct Digested {
        digest: crate::digest::Digest,
    }
    let blobs = crate::store::BlobStore::open(root)?;
    let (mut n, mut freed) = (0, 0);
    for (path, name, meta) in list(&root.join("layers"))? {
        if name.starts_with(".tmp") {
            continue;
        }
        let digest = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Digested>(&b).ok())
            .map(|r| r.digest);
        if digest.is_none_or(|d| !blobs.path(&d).exists()) && remove(&path)? {
            n += 1;
            freed += meta.len();
        }
    }
    Ok((n, freed))
}

/// Remove lock files of blobs that are in neither store, under their exclusive lock.
fn remove_orphan_locks(root: &Path) -> io::Result<()> {
    let locks = root.join(LOCKS);
    for (path, name, _) in list(&locks)? {
        let exists = |dir: &str| root.join(dir).join(&name).exists();
        if exists("blobs/sha256") || exists("bases/blobs/sha256") {
            continue;
        }
        if let Some(_guard) = lease::try_exclusive(&locks, &name)? {
            let _ = fs::remove_file(&path);
        }
    }
    Ok(())
}

/// `SIZE`: bytes, or a number with K, M, G or T (powers of 1024, as Docker's
/// `--keep-storage` reads them), optionally followed by `i` and/or `B`: `500M`, `10GiB`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let bad =
        || format!("{s:?}: give a size such as 500M, 10G or 10GiB (powers of 1024), or bytes");
    let num: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.strip_suffix('B').unwrap_or(&unit);
    let unit = unit.strip_suffix('I').unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    num.checked_mul(1 << shift).ok_or_else(bad)
}

/// `DURATION`: a number with s, m, h, d or w: `90m`, `72h`, `30d`, `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let bad = || format!("{s:?}: give a duration such as 90m, 72h, 30d or 2w");
    let num: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    num.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// `IMGBUILD_CACHE_MAX_SIZE`: a [`parse_size`], or `off` for no automatic prune (None).
pub fn parse_max_size_env(v: Option<&str>) -> Result<Option<u64>, String> {
    match v.map(str::trim) {
        None | Some("") => Ok(Some(DEFAULT_MAX_SIZE)),
        Some(v) if v.eq_ignore_ascii_case("off") => Ok(None),
        Some(v) => parse_size(v)
            .map(Some)
            .map_err(|e| format!("IMGBUILD_CACHE_MAX_SIZE={e}; or `off`")),
    }
}

/// `1.5 GiB`-style, for `du` and prune reports.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlobStore;

    #[test]
    fn sizes_and_durations() {
        let sizes: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("1234", Some(1234)),
            ("1K", Some(1024)),
            ("500M", Some(500 << 20)),
            ("10G", Some(10 << 30)),
            ("10GiB", Some(10 << 30)),
            ("10gb", Some(10 << 30)),
            ("1T", Some(1 << 40)),
            ("", None),
            ("G", None),
            ("10X", None),
            ("-1", None),
            ("99999999999T", None),
        ];
        for (s, want) in sizes {
            assert_eq!(parse_size(s).ok(), *want, "{s}");
        }
        let durations: &[(&str, Option<u64>)] = &[
            ("45s", Some(45)),
            ("90m", Some(5400)),
            ("72h", Some(259_200)),
            ("30d", Some(2_592_000)),
            ("2w", Some(1_209_600)),
            ("30", None),
            ("d", None),
            ("1y", None),
        ];
        for (s, want) in durations {
            assert_eq!(parse_duration(s).ok().map(|d| d.as_secs()), *want, "{s}");
        }
        assert_eq!(parse_max_size_env(None), Ok(Some(DEFAULT_MAX_SIZE)));
        assert_eq!(parse_max_size_env(Some("off")), Ok(None));
        assert_eq!(parse_max_size_env(Some("1M")), Ok(Some(1 << 20)));
        assert!(parse_max_size_env(Some("lots")).is_err());
    }

    fn age(path: &Path, secs: u64) {
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn least_recently_used_first_and_never_a_leased_blob() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let cache = crate::cache::LayerCache::open(root).unwrap();
        // Three 1000-byte blobs of another run (unleased store), used 300, 200, 100 s ago.
        let plain = BlobStore::open(root).unwrap();
        let d: Vec<_> = (0..3u8)
            .map(|i| plain.put_bytes(&[i; 1000]).unwrap())
            .collect();
        for (i, dg) in d.iter().enumerate() {
            age(&plain.path(dg), 300 - 100 * i as u64);
        }
        // A running build (the cache's leased store) uses the oldest one.
        assert!(cache.store().contains(&d[0]));
        let usage = du(root).unwrap();
        assert_eq!(usage.total, 3000);
        assert_eq!(usage.sections, vec![(Section::Blobs, 3000, 3)]);

        let r = prune(
            root,
            Policy {
                max_size: Some(1500),
                older_than: None,
            },
            true,
        )
        .unwrap();
        // d[0] is leased (and, leased just now, the most recent); d[1] (oldest unleased)
        // goes; then the cache is at 2000 > 1500, so d[2] goes too.
        assert!(plain.path(&d[0]).exists());
        assert!(!plain.path(&d[1]).exists());
        assert!(!plain.path(&d[2]).exists());
        assert_eq!((r.removed, r.freed, r.remaining), (2, 2000, 1000));

        // Released: now it can go, by age.
        drop(cache);
        age(&plain.path(&d[0]), 1000);
        age(&root.join(LOCKS).join(d[0].hex()), 1000);
        let r = prune(
            root,
            Policy {
                max_size: None,
                older_than: Some(Duration::from_secs(500)),
            },
            true,
        )
        .unwrap();
        assert_eq!((r.removed, r.in_use, r.remaining), (1, 0, 0));
        assert!(!plain.path(&d[0]).exists());
        assert_eq!(fs::read_dir(root.join(LOCKS)).unwrap().count(), 0);
    }

    #[test]
    fn abandoned_temporary_files_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let live = store.writer().unwrap();
        let dead = dir.path().join("blobs/sha256/.tmp-dead");
        fs::write(&dead, b"partial").unwrap();
        age(&dead, 120);
        for e in fs::read_dir(dir.path().join("blobs/sha256")).unwrap() {
            age(&e.unwrap().path(), 120);
        }
        let r = prune(dir.path(), Policy::default(), true).unwrap();
        assert_eq!(r.removed, 1);
        assert!(!dead.exists());
        let (d, _) = live.commit().unwrap();
        assert!(store.path(&d).exists());
    }
}
