//! The layer cache (README "Speed"): a layer whose inputs are unchanged is neither re-tarred nor
//! recompressed; its blob is taken from the cache.
//!
//! ```text
//! $IMGBUILD_CACHE (default $XDG_CACHE_HOME/imgbuild or ~/.cache/imgbuild)
//!   blobs/sha256/<hex>   a BlobStore: cached layers (and, for `push`, the run's config/manifests)
//!   layers/<key hex>     record of a built layer: descriptor, diff_id, the blob's stat identity
//!   files/<id hex>       content digests of a source file (sha256, SHA-1), keyed by its stat identity
//!   crates/<sha256 hex>  the cargo-auditable crate list of an executable, by its content (crate::sbom)
//!   pushed/<registry hex>/<digest hex>   repositories of that registry a push put the blob in
//!   pushed/<registry hex>/referrers-<hex> a push attached these referrers to this index there
//!   shapes/<shape hex>   a layer with this key minus file contents was cached (cold-build rule)
//!   locks/<digest hex>   leases: a run's shared flock on each blob it uses (crate::lease)
//!   bases/blobs/sha256/<hex>   base-image blobs (crate::base), leased the same way
//! ```
//!
//! **Push records** feed cross-repo mounts: after a push, each of its blobs is recorded as
//! present in the repository; a later push of the same blob to another repository of the
//! same registry asks the registry to mount it from there (see `registry::upload`). A record
//! may be stale (the blob deleted since): the registry then answers 202 and the blob is
//! uploaded, so a wrong record costs one request, never correctness.
//!
//! **Key** of a layer: sha256 over a versioned text of everything that decides its bytes:
//! the codec and level, `SOURCE_DATE_EPOCH`, and per entry its path, kind, mode, owner, symlink
//! target, and for regular files the size and content digest. `created_by` is not in the key
//! (it is config history, not layer bytes).
//!
//! **One read on a cold cache**: the key needs every file's content digest, which would mean
//! reading each input twice (hash, then tar). When the file index does not know some of them
//! and no layer of the same *shape* (the key without contents: paths, modes, owners, sizes,
//! codec, epoch) was ever cached, no cached layer can match, so the layer is built at once
//! and each file hashed while it is tarred; its key is computed afterwards.
//!
//! **File contents** are hashed once: the content digests (sha256 for the key, SHA-1 as well
//! for the SBOM, from the same read) are remembered under the file's stat identity (path, device, inode, size, mtime and ctime in nanoseconds) and reused while that
//! identity is unchanged. A file modified within the last two seconds ([`RACY_WINDOW`]) is
//! hashed but not remembered ("racily clean", as git calls it: a second write in the same timestamp tick
//! would go unseen). Within a run every file's sums are also kept in memory (by the same stat
//! identity), so the SBOM made after the build reads no input the build already read.
//!
//! **Verification** before reuse: the record holds the blob's (inode, size, mtime) from when it
//! was written or last verified. If the blob is missing or those differ, the blob is re-hashed;
//! a digest mismatch drops the blob and the record, and the layer is rebuilt — a corrupted entry
//! is never reused. ctime is not compared because hard-linking the blob into an output layout
//! changes it; any write through the filesystem changes mtime. (A registry also re-checks the
//! digest of every uploaded blob.)
//!
//! Every file here is written to a temporary name and renamed, so concurrent runs sharing one
//! cache see whole entries or none, and a run killed mid-write leaves only a `.tmp-*` file,
//! which no name refers to. A lookup never deletes a blob it finds bad (a concurrent run may
//! just have renamed a good one over it); the rebuild replaces it. Every blob a run uses is
//! leased (`locks/`, [`crate::lease`]) so that eviction ([`crate::prune`]: `imgbuild cache
//! prune`, `IMGBUILD_CACHE_MAX_SIZE`) never deletes it under the run.

use crate::compress::Compression;
use crate::digest::{Digest, FileHasher, FileSums, HashingWriter};
use crate::image::{Descriptor, LayerInfo};
use crate::layer::{LayerError, LayerOptions};
use crate::lease::Leases;
use crate::plan::{EntryKind, LayerPlan};
use crate::reference::Repository;
use crate::store::BlobStore;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bumped whenever the tar or compressed bytes for the same inputs change (a new block size,
/// a different deflate backend, tar header changes): old entries are then simply not found.
/// v2: gzip level 1 (`fast`) became imgbuild's own encoder (issue 11).
const KEY_VERSION: &str = "imgbuild-layer-cache v2";

/// Markers of the layer shapes (key without contents) that were cached.
pub const SHAPES: &str = "shapes";

/// The lock files of the cache's blobs ([`crate::lease`]), beside `blobs/`.
pub const LOCKS: &str = "locks";

/// The cache directory: `$IMGBUILD_CACHE`, else `$XDG_CACHE_HOME/imgbuild`, else
/// `$HOME/.cache/imgbuild` (the XDG base directory spec); None when none is set. Base images
/// are cached in its `bases/` (`crate::base`).
pub fn default_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("IMGBUILD_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("imgbuild")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("imgbuild")))
}

/// How recently a file may have changed and still not be remembered by its stat identity
/// (see "File contents" above).
pub const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// A layer cache directory.
#[derive(Debug, Clone)]
pub struct LayerCache {
    root: PathBuf,
    store: BlobStore,
    /// [`RACY_WINDOW`] unless a test sets another with [`LayerCache::with_racy_window`].
    racy_window: std::time::Duration,
    /// This run's file sums by file-index path (the stat identity), racy or not.
    sums: Arc<Mutex<HashMap<PathBuf, FileSums>>>,
}

/// What a cached layer's record holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    media_type: String,
    digest: Digest,
    size: u64,
    diff_id: Digest,
    /// (inode, mtime ns) of the blob when it was last known good; its size is `size`.
    blob_ino: u64,
    blob_mtime_ns: i128,
}

impl LayerCache {
    /// Open (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let store = BlobStore::open(&root)?.with_leases(Leases::open(root.join(LOCKS))?);
        fs::create_dir_all(root.join("layers"))?;
        fs::create_dir_all(root.join("files"))?;
        Ok(LayerCache {
            root,
            store,
            racy_window: RACY_WINDOW,
            sums: Arc::default(),
        })
    }

    /// Remember a file's content digest only when its mtime and ctime are more than `window`
    /// in the past (default [`RACY_WINDOW`]). Tests use a zero window to exercise the
    /// identity shortcut deterministically, with no sleeping.
    pub fn with_racy_window(mut self, window: std::time::Duration) -> Self {
        self.racy_window = window;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cache's blob store: `push` builds straight into it.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The key of `layer` built with `opts`. Reads (and hashes) only files whose stat identity
    /// is not known yet.
    pub fn key(&self, layer: &LayerPlan, opts: &LayerOptions) -> Result<Digest, LayerError> {
        let digests = layer
            .entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { src, size } => self.content_digest(src, *size).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(key_text(layer, opts, Some(&digests)))
    }

    /// The key's text without file contents: what every layer that could have this key shares
    /// (paths, modes, owners, sizes, codec, epoch). `shapes/<it>` marks that one was cached.
    fn shape(layer: &LayerPlan, opts: &LayerOptions) -> Digest {
        key_text(layer, opts, None)
    }

    /// The content digest of `src` if this run or the file index knows it (a stat, no read).
    fn known_digest(&self, src: &Path, size: u64) -> Result<Option<Digest>, LayerError> {
        let (index, _) = self.file_index(src, size)?;
        Ok(self.known_sums(&index).map(|(d, _)| d))
    }

    /// What the file index (or, for a file too recently changed to be in it, this run) knows
    /// of the file whose index entry is `index`: its sha256, and its SHA-1 when known (entries
    /// written before SHA-1 was kept lack it).
    fn known_sums(&self, index: &Path) -> Option<(Digest, Option<String>)> {
        let Ok(text) = fs::read_to_string(index) else {
            let memo = self.memo();
            let s = memo.get(index)?;
            return Some((s.sha256.clone(), Some(s.sha1.clone())));
        };
        let mut words = text.split_whitespace();
        let sha256 = words.next()?.parse::<Digest>().ok()?;
        let sha1 = words
            .next()
            .filter(|h| h.len() == 40 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
            .or_else(|| {
                let memo = self.memo();
                memo.get(index)
                    .filter(|s| s.sha256 == sha256)
                    .map(|s| s.sha1.clone())
            });
        touch(index);
        Some((sha256, sha1))
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, FileSums>> {
        // A panic elsewhere cannot leave the map half-updated (single inserts).
        self.sums
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where the file index keeps `src`'s content digest, by its stat identity (path, device,
    /// inode, size, mtime, ctime), and that stat.
    fn file_index(&self, src: &Path, size: u64) -> Result<(PathBuf, fs::Metadata), LayerError> {
        let meta = fs::metadata(src).map_err(|source| LayerError::Read {
            path: src.to_path_buf(),
            source,
        })?;
        if meta.len() != size {
            return Err(LayerError::Changed {
                path: src.to_path_buf(),
                planned: size,
            });
        }
        let id = Digest::of(
            format!(
                "{} {} {} {} {}.{} {}.{}",
                hex::encode(src.as_os_str().as_bytes()),
                meta.dev(),
                meta.ino(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec()
            )
            .as_bytes(),
        );
        Ok((self.root.join("files").join(id.hex()), meta))
    }

    /// Remember `sums` for the file whose index entry is `index` and stat `meta`: for this
    /// run always, in the file index unless it was modified within the racy window ("racily
    /// clean", see the module docs).
    fn remember(&self, index: &Path, meta: &fs::Metadata, sums: &FileSums) {
        self.memo().insert(index.to_path_buf(), sums.clone());
        if settled(meta, self.racy_window, std::time::SystemTime::now()) {
            // Best effort: a failed write only means hashing again next time.
            let _ = write_atomic(index, format!("{} {}\n", sums.sha256, sums.sha1).as_bytes());
        }
    }

    /// The sha256 of `src`'s first `size` bytes (the planned size), from this run or the file
    /// index when its stat identity is unchanged.
    fn content_digest(&self, src: &Path, size: u64) -> Result<Digest, LayerError> {
        if let Some(d) = self.known_digest(src, size)? {
            return Ok(d);
        }
        Ok(self.file_sums(src, size)?.sha256)
    }

    /// The sha256 and SHA-1 of `src`'s first `size` bytes (the planned size): known when the
    /// build hashed or looked the file up, else read once and remembered. The SBOM takes its
    /// file checksums from here, so a re-push reads no input.
    pub fn file_sums(&self, src: &Path, size: u64) -> Result<FileSums, LayerError> {
        let (index, meta) = self.file_index(src, size)?;
        if let Some((sha256, Some(sha1))) = self.known_sums(&index) {
            return Ok(FileSums { sha256, sha1 });
        }
        let sums = hash_file(src, size)?;
        self.remember(&index, &meta, &sums);
        Ok(sums)
    }

    /// The cached layer for `key`, verified, with its blob present in `store` (linked or
    /// copied there when `store` is not the cache's own). None: build it.
    pub fn lookup(
        &self,
        key: &Digest,
        layer: &LayerPlan,
        store: &BlobStore,
    ) -> io::Result<Option<LayerInfo>> {
        let record_path = self.root.join("layers").join(key.hex());
        let Some(mut record) = fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        else {
            return Ok(None);
        };
        // Leased before it is checked: from here on no prune deletes it during this run.
        self.store.lease(&record.digest)?;
        let blob = self.store.path(&record.digest);
        let good = match fs::metadata(&blob) {
            Err(_) => false,
            Ok(m) if m.len() != record.size => false,
            Ok(m) if m.ino() == record.blob_ino && mtime_ns(&m) == record.blob_mtime_ns => true,
            Ok(m) => {
                // Changed since it was last known good: re-hash before trusting it.
                let mut w = HashingWriter::new(io::sink());
                io::copy(&mut File::open(&blob)?, &mut w)?;
                let ok = w.finish().1 == record.digest;
                if ok {
                    record.blob_ino = m.ino();
                    record.blob_mtime_ns = mtime_ns(&m);
                    let _ = write_atomic(&record_path, &serde_json::to_vec(&record)?);
                }
                ok
            }
        };
        if !good {
            // Corrupted or gone: rebuild. The blob is not deleted: a concurrent run may have
            // just renamed a good one over it (the rebuild replaces it atomically anyway),
            // and the record is replaced by the rebuild's.
            return Ok(None);
        }
        touch(&record_path);
        if store.root() != self.store.root() {
            link_or_copy(&blob, &store.path(&record.digest))?;
        }
        Ok(Some(LayerInfo {
            descriptor: Descriptor::new(record.media_type, record.digest, record.size),
            diff_id: record.diff_id,
            created_by: layer.created_by.clone(),
        }))
    }

    /// Remember a freshly built layer (whose blob is in `store`) under `key`.
    pub fn insert(&self, key: &Digest, info: &LayerInfo, store: &BlobStore) -> io::Result<()> {
        let d = &info.descriptor.digest;
        let blob = self.store.path(d);
        if store.root() != self.store.root() {
            link_or_copy(&store.path(d), &blob)?;
        }
        let m = fs::metadata(&blob)?;
        let record = Record {
            media_type: info.descriptor.media_type.clone(),
            digest: d.clone(),
            size: info.descriptor.size,
            diff_id: info.diff_id.clone(),
            blob_ino: m.ino(),
            blob_mtime_ns: mtime_ns(&m),
        };
        write_atomic(
            &self.root.join("layers").join(key.hex()),
            &serde_json::to_vec(&record)?,
        )
    }
}

/// The versioned key text of `layer` (see the module docs), hashed. `digests`: each entry's
/// content digest (files; None for others); None leaves contents out (the layer's shape).
fn key_text(layer: &LayerPlan, opts: &LayerOptions, digests: Option<&[Option<Digest>]>) -> Digest {
    let Compression { codec, level } = opts.compression;
    let mut text = format!(
        "{KEY_VERSION}\ncompression {codec} {level}\nepoch {}\n",
        opts.epoch
    );
    if digests.is_none() {
        text.push_str("shape\n");
    }
    for (i, e) in layer.entries.iter().enumerate() {
        let path = hex::encode(e.path.as_os_str().as_bytes());
        let what = match &e.kind {
            EntryKind::Dir => "dir".to_string(),
            EntryKind::Symlink { target } => {
                format!("symlink {}", hex::encode(target.as_os_str().as_bytes()))
            }
            EntryKind::File { size, .. } => match digests.and_then(|d| d.get(i).cloned().flatten())
            {
                Some(d) => format!("file {size} {d}"),
                None => format!("file {size}"),
            },
        };
        text.push_str(&format!("{path} {:o} {} {} {what}\n", e.mode, e.uid, e.gid));
    }
    Digest::of(text.as_bytes())
}

/// How a layer was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Taken from the cache: nothing read, tarred or compressed.
    Hit,
    /// Built (and remembered, unless `warning` says why not).
    Built,
}

/// Write `layer` into `store`, through `cache` when there is one. A cache that cannot be
/// read or written is not an error (the layer is built as without a cache); the reason is
/// returned as a warning.
pub fn write_layer_cached(
    cache: Option<&LayerCache>,
    layer: &LayerPlan,
    store: &BlobStore,
    opts: &LayerOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<(LayerInfo, Outcome, Option<String>), LayerError> {
    let Some(cache) = cache else {
        let (info, _) = crate::layer::write_layer_hashing(layer, store, opts, false, progress)?;
        return Ok((info, Outcome::Built, None));
    };
    let shape = LayerCache::shape(layer, opts);
    let shape_path = cache.root.join(SHAPES).join(shape.hex());
    let mut known = Vec::with_capacity(layer.entries.len());
    let mut all_known = true;
    for e in &layer.entries {
        let d = match &e.kind {
            EntryKind::File { src, size } => {
                let d = cache.known_digest(src, *size)?;
                all_known &= d.is_some();
                d
            }
            _ => None,
        };
        known.push(d);
    }
    let mut warning = None;
    // A content key can only hit if a layer of the same shape was cached. When none was and
    // some contents are unknown (a cold cache), build at once and hash each file while it is
    // tarred: one read per input. Otherwise hash first (a fresh checkout of cached inputs
    // then costs one read and no compression).
    let key = if all_known || shape_path.exists() {
        let mut digests = Vec::with_capacity(known.len());
        for (e, k) in layer.entries.iter().zip(known) {
            digests.push(match (&e.kind, k) {
                (EntryKind::File { src, size }, None) => Some(cache.content_digest(src, *size)?),
                (_, k) => k,
            });
        }
        let key = key_text(layer, opts, Some(&digests));
        match cache.lookup(&key, layer, store) {
            Ok(Some(info)) => {
                touch(&shape_path);
                return Ok((info, Outcome::Hit, None));
            }
            Ok(None) => {}
            Err(e) => {
                warning = Some(format!("layer cache {}: {e}", cache.root().display()));
            }
        }
        Some(key)
    } else {
        None
    };
    let (info, sums) =
        crate::layer::write_layer_hashing(layer, store, opts, key.is_none(), progress)?;
    let key = match key {
        Some(key) => key,
        None => {
            for (e, s) in layer.entries.iter().zip(&sums) {
                if let (EntryKind::File { src, size }, Some(s)) = (&e.kind, s)
                    && let Ok((index, meta)) = cache.file_index(src, *size)
                {
                    cache.remember(&index, &meta, s);
                }
            }
            let digests: Vec<Option<Digest>> =
                sums.into_iter().map(|s| s.map(|s| s.sha256)).collect();
            key_text(layer, opts, Some(&digests))
        }
    };
    let _ =
        fs::create_dir_all(cache.root.join(SHAPES)).and_then(|()| write_atomic(&shape_path, b""));
    if let Err(e) = cache.insert(&key, &info, store) {
        warning = Some(format!(
            "layer cache {}: {e}; continuing without caching this layer",
            cache.root().display()
        ));
    }
    Ok((info, Outcome::Built, warning))
}

impl LayerCache {
    /// What [`LayerCache::put_crates_record`] remembered for an executable whose content has
    /// this sha256.
    pub fn crates_record(&self, sha256: &Digest) -> Option<Vec<u8>> {
        let path = self.root.join("crates").join(sha256.hex());
        let bytes = fs::read(&path).ok()?;
        touch(&path);
        Some(bytes)
    }

    /// Remember what the SBOM found in an executable (its cargo-auditable crates, or that it
    /// has none), so a re-push reads no input. Best effort.
    pub fn put_crates_record(&self, sha256: &Digest, bytes: &[u8]) {
        let dir = self.root.join("crates");
        let _ =
            fs::create_dir_all(&dir).and_then(|()| write_atomic(&dir.join(sha256.hex()), bytes));
    }
}

/// How many repositories a push record keeps per blob (the most recent ones).
const MAX_RECORDED_REPOS: usize = 8;

impl LayerCache {
    fn pushed_path(&self, repo: &Repository, digest: &Digest) -> PathBuf {
        self.root
            .join("pushed")
            .join(hex::encode(repo.registry.as_bytes()))
            .join(digest.hex())
    }

    fn pushed_repos(&self, repo: &Repository, digest: &Digest) -> Vec<String> {
        fs::read_to_string(self.pushed_path(repo, digest))
            .map(|s| s.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Remember that `repo` now holds `digests` (best effort: a lost record costs a mount).
    pub fn record_pushed(&self, repo: &Repository, digests: &[Digest]) -> io::Result<()> {
        for d in digests {
            let path = self.pushed_path(repo, d);
            let mut repos = self.pushed_repos(repo, d);
            if repos.first() == Some(&repo.path) {
                continue;
            }
            repos.retain(|r| r != &repo.path);
            repos.insert(0, repo.path.clone());
            repos.truncate(MAX_RECORDED_REPOS);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            write_atomic(&path, format!("{}\n", repos.join("\n")).as_bytes())?;
        }
        Ok(())
    }

    /// Every blob a push record places in `repo` itself (a previous push put it there).
    pub fn recorded_in(&self, repo: &Repository) -> HashSet<Digest> {
        self.push_records(repo)
            .filter(|(_, repos)| repos.contains(&repo.path))
            .map(|(d, _)| d)
            .collect()
    }

    /// The push records of `repo`'s registry: each blob with the repositories it was put in.
    fn push_records(&self, repo: &Repository) -> impl Iterator<Item = (Digest, Vec<String>)> {
        let dir = self
            .root
            .join("pushed")
            .join(hex::encode(repo.registry.as_bytes()));
        fs::read_dir(dir).into_iter().flatten().filter_map(|e| {
            let name = e.ok()?.file_name();
            let d: Digest = format!("sha256:{}", name.to_str()?).parse().ok()?;
            let repos = self.pushed_repos(repo, &d);
            Some((d, repos))
        })
    }

    /// The record that the referrer manifests `referrers` were attached to the index `index`
    /// in `repo` (one file per combination, beside the blob records, pruned like them).
    fn attached_path(&self, repo: &Repository, index: &Digest, referrers: &[Digest]) -> PathBuf {
        let mut sorted: Vec<String> = referrers.iter().map(Digest::to_string).collect();
        sorted.sort();
        let text = format!(
            "imgbuild referrers v1\n{}\n{index}\n{}\n",
            repo.path,
            sorted.join("\n")
        );
        self.root
            .join("pushed")
            .join(hex::encode(repo.registry.as_bytes()))
            .join(format!("referrers-{}", Digest::of(text.as_bytes()).hex()))
    }

    /// Whether a push recorded attaching exactly `referrers` to `index` in `repo`
    /// ([`LayerCache::record_attached`]); a hit marks the record used.
    pub fn attached(&self, repo: &Repository, index: &Digest, referrers: &[Digest]) -> bool {
        let path = self.attached_path(repo, index, referrers);
        let found = path.is_file();
        if found {
            touch(&path);
        }
        found
    }

    /// Remember that `referrers` are attached to `index` in `repo` (after the attach
    /// succeeded), so that a re-push that finds the index already tagged skips them. A stale
    /// record (referrers deleted in the registry since) leaves them missing until the image
    /// changes or the record is pruned; best effort otherwise.
    pub fn record_attached(
        &self,
        repo: &Repository,
        index: &Digest,
        referrers: &[Digest],
    ) -> io::Result<()> {
        let path = self.attached_path(repo, index, referrers);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        write_atomic(&path, b"")
    }

    /// For every blob recorded for `repo`'s registry, the other repositories pushes put it
    /// in, most recent first; blobs with none are left out. Read before the build, since
    /// layers are pushed while it runs (one small file per blob ever pushed there).
    pub fn all_mount_sources(&self, repo: &Repository) -> HashMap<Digest, Vec<String>> {
        self.push_records(repo)
            .filter_map(|(d, repos)| {
                let others: Vec<String> = repos.into_iter().filter(|r| r != &repo.path).collect();
                (!others.is_empty()).then_some((d, others))
            })
            .collect()
    }
}

/// The sums of `src`'s first `size` bytes, read once; a file whose size is not `size` is an
/// error ([`LayerError::Changed`]).
pub fn hash_file(src: &Path, size: u64) -> Result<FileSums, LayerError> {
    let read_err = |source| LayerError::Read {
        path: src.to_path_buf(),
        source,
    };
    let mut h = FileHasher::default();
    let copied =
        io::copy(&mut File::open(src).map_err(read_err)?.take(size), &mut h).map_err(read_err)?;
    crate::layer::count_input_bytes(copied);
    if copied != size {
        return Err(LayerError::Changed {
            path: src.to_path_buf(),
            planned: size,
        });
    }
    Ok(h.finish())
}

/// Mark a record used now: its mtime is its "last used" time for eviction (`crate::prune`).
/// Best effort: a record that looks older is only evicted sooner.
fn touch(path: &Path) {
    if let Ok(f) = fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Are `meta`'s mtime and ctime both more than `window` before `now`? A file changed more
/// recently may change again within the same timestamp tick, unseen by its stat identity.
fn settled(meta: &fs::Metadata, window: std::time::Duration, now: std::time::SystemTime) -> bool {
    let now_ns = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let ctime_ns = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
    let limit = now_ns - window.as_nanos() as i128;
    mtime_ns(meta) < limit && ctime_ns < limit
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// Put `from` at `to`, replacing whatever is there (which only claims to be the same blob):
/// a hard link (no copy, same file system) made under a temporary name and renamed over `to`,
/// else a copy via a temporary file. A link shares the file's mode, so it is made only when
/// that is the mode this run gives its files (the umask rule of [`crate::store::create_file`]); else a copy.
fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    let tmp_path = tmp.path().to_path_buf();
    drop(tmp); // only its unique name is wanted; hard_link needs the name free
    let same_mode =
        fs::metadata(from)?.permissions().mode() & 0o777 == crate::store::default_file_mode();
    match same_mode.then(|| fs::hard_link(from, &tmp_path)) {
        Some(Ok(())) => fs::rename(&tmp_path, to),
        _ => {
            let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
            io::copy(&mut File::open(from)?, tmp.as_file_mut())?;
            tmp.persist(to).map_err(|e| e.error)?;
            // tempfile creates 0600; give it the mode of any file of ours.
            crate::store::set_default_file_mode(to)
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Codec;

    #[test]
    fn push_records_name_the_repository_and_the_attached_referrers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(dir.path().join("cache")).unwrap();
        let repo = |r: &str| Repository::parse(r).unwrap();
        let (app, other, elsewhere) =
            (repo("r:5000/app"), repo("r:5000/other"), repo("q:5000/app"));
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        cache.record_pushed(&app, &[a.clone(), b.clone()]).unwrap();
        cache
            .record_pushed(&other, std::slice::from_ref(&a))
            .unwrap();
        assert_eq!(
            cache.recorded_in(&app),
            HashSet::from([a.clone(), b.clone()])
        );
        assert_eq!(cache.recorded_in(&other), HashSet::from([a.clone()]));
        assert!(cache.recorded_in(&elsewhere).is_empty(), "per registry");

        let (index, sbom, prov) = (Digest::of(b"i"), Digest::of(b"s"), Digest::of(b"p"));
        assert!(!cache.attached(&app, &index, &[sbom.clone(), prov.clone()]));
        cache
            .record_attached(&app, &index, &[sbom.clone(), prov.clone()])
            .unwrap();
        // The same documents in any order; not other documents, indexes or repositories.
        assert!(cache.attached(&app, &index, &[prov.clone(), sbom.clone()]));
        assert!(!cache.attached(&app, &index, std::slice::from_ref(&sbom)));
        assert!(!cache.attached(&app, &a, &[sbom.clone(), prov.clone()]));
        assert!(!cache.attached(&other, &index, &[sbom.clone(), prov.clone()]));
        assert!(!cache.attached(&elsewhere, &index, &[sbom, prov]));
        // The referrers record is not a blob's: mounts and blob records ignore it.
        assert_eq!(cache.recorded_in(&app).len(), 2);
        assert_eq!(cache.all_mount_sources(&other).len(), 2);
    }

    #[test]
    fn key_covers_every_input_that_decides_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(dir.path().join("cache")).unwrap();
        let base = crate::layer::tests::entries(dir.path());
        let opts = LayerOptions::default();
        let key = cache.key(&base, &opts).unwrap();
        type Change = fn(&mut LayerPlan, &mut LayerOptions);
        let cases: &[(&str, Change, bool)] = &[
            ("nothing", |_, _| {}, false),
            (
                "created_by (history only)",
                |p, _| p.created_by = "x".into(),
                false,
            ),
            (
                "threads (bytes do not depend on them)",
                |_, o| o.threads = 7,
                false,
            ),
            ("uid", |p, _| p.entries[1].uid = 1, true),
            ("gid", |p, _| p.entries[1].gid = 1, true),
            ("mode", |p, _| p.entries[1].mode = 0o600, true),
            ("path", |p, _| p.entries[1].path = "app/g".into(), true),
            ("dir mode", |p, _| p.entries[0].mode = 0o700, true),
            (
                "symlink target",
                |p, _| p.entries[2].kind = EntryKind::Symlink { target: "g".into() },
                true,
            ),
            ("epoch", |_, o| o.epoch = 1, true),
            ("level", |_, o| o.compression.level = 9, true),
            (
                "codec",
                |_, o| o.compression = Compression::new(Codec::Zstd, None).unwrap(),
                true,
            ),
            (
                "entry dropped",
                |p, _| {
                    p.entries.pop();
                },
                true,
            ),
        ];
        for (name, change, differs) in cases {
            let (mut p, mut o) = (base.clone(), opts.clone());
            change(&mut p, &mut o);
            assert_eq!(cache.key(&p, &o).unwrap() != key, *differs, "{name}");
        }
        // Content: same size, other bytes.
        fs::write(dir.path().join("f"), b"HELLO\n").unwrap();
        assert_ne!(cache.key(&base, &opts).unwrap(), key, "content");
    }

    /// The number of remembered file digests (`files/`).
    fn remembered(cache: &LayerCache) -> usize {
        fs::read_dir(cache.root().join("files")).unwrap().count()
    }

    /// The file-identity shortcut, made deterministic with a zero racy window instead of
    /// sleeping past the real one.
    #[test]
    fn file_identity_shortcut_hits_without_reading_and_misses_on_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::layer::tests::entries(dir.path());
        let f = dir.path().join("f");
        let opts = LayerOptions::default();
        let set_mtime = |secs: u64| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        set_mtime(1_600_000_000);

        // With the real window, a file changed just now (its ctime is now) is hashed every
        // time and never remembered.
        let fresh = LayerCache::open(dir.path().join("c1")).unwrap();
        let key = fresh.key(&plan, &opts).unwrap();
        assert_eq!(fresh.key(&plan, &opts).unwrap(), key);
        assert_eq!(remembered(&fresh), 0, "a fresh file was remembered");

        // Zero window: the digest is remembered under the file's stat identity ...
        let cache = LayerCache::open(dir.path().join("c2"))
            .unwrap()
            .with_racy_window(std::time::Duration::ZERO);
        assert_eq!(cache.key(&plan, &opts).unwrap(), key);
        let entries: Vec<_> = fs::read_dir(cache.root().join("files"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        let want = Digest::of(b"hello\n");
        let text = fs::read_to_string(&entries[0]).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words, [want.to_string(), FileSums::of(b"hello\n").sha1]);

        // ... and a hit does not read the file: a doctored entry shows through.
        let doctored = Digest::of(b"not the file's bytes");
        fs::write(&entries[0], doctored.to_string()).unwrap();
        let hit = cache.key(&plan, &opts).unwrap();
        assert_ne!(
            hit, key,
            "the file was read again instead of trusting its identity"
        );
        fs::write(&entries[0], want.to_string()).unwrap();
        assert_eq!(cache.key(&plan, &opts).unwrap(), key, "entry restored");

        // Same size, new content, another mtime: the identity differs, the file is read.
        fs::write(&f, b"HELLO\n").unwrap();
        set_mtime(1_600_000_001);
        let changed = cache.key(&plan, &opts).unwrap();
        assert_ne!(changed, key, "stale digest reused for new content");
        let reference = LayerCache::open(dir.path().join("c3")).unwrap();
        assert_eq!(changed, reference.key(&plan, &opts).unwrap());
        assert_eq!(remembered(&cache), 2);
    }

    /// Either a recent mtime or a recent ctime keeps a file out of the index.
    #[test]
    fn settled_needs_both_times_outside_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let meta = fs::metadata(&f).unwrap();
        let ctime = std::time::UNIX_EPOCH
            + std::time::Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32);
        let hour = std::time::Duration::from_secs(3600);
        let cases = [
            (
                "now, real window",
                std::time::SystemTime::now(),
                RACY_WINDOW,
                false,
            ),
            (
                "an hour later, real window",
                ctime + hour,
                RACY_WINDOW,
                true,
            ),
            (
                "an hour later, two-hour window",
                ctime + hour,
                2 * hour,
                false,
            ),
            (
                "ctime itself, zero window",
                ctime,
                std::time::Duration::ZERO,
                false,
            ),
        ];
        for (what, now, window, want) in cases {
            assert_eq!(settled(&meta, window, now), want, "{what}");
        }
        // An old ctime does not help a recent mtime.
        let t = std::time::SystemTime::now() + hour;
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let meta = fs::metadata(&f).unwrap();
        assert!(!settled(&meta, RACY_WINDOW, ctime + hour), "future mtime");
    }
}
