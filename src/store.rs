//! A content-addressed blob directory (`blobs/sha256/<hex>`), the same shape as an OCI image
//! layout's (image-spec image-layout.md), so a build can write its layers straight into the
//! output layout and a push can stream them from there.
//!
//! Blobs are written to a temporary file in the same directory, hashed on the way, and renamed
//! to their digest only when complete: a reader never sees a partial blob under a digest name.

use crate::digest::{Digest, HashingWriter};
use crate::lease::Leases;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory holding `blobs/sha256/<hex>` files.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// In a cache: the run's leases, taken on every blob it writes or looks at
    /// ([`crate::lease`]), so that a concurrent prune leaves them alone.
    leases: Option<Arc<Leases>>,
}

impl BlobStore {
    /// Open (creating if needed) the store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let dir = root.join("blobs").join("sha256");
        create_dirs(&dir)?;
        remove_stale_temporaries(&dir);
        Ok(BlobStore { root, leases: None })
    }

    /// The same store, leasing every blob this run writes, checks for or leases explicitly
    /// (a shared cache, see [`crate::lease`]).
    pub fn with_leases(mut self, leases: Arc<Leases>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Keep a concurrent prune from deleting `digest` until this run ends (a no-op outside a
    /// cache). Take it before checking that the blob is there.
    pub fn lease(&self, digest: &Digest) -> io::Result<()> {
        match &self.leases {
            Some(l) => l.hold(digest.hex()),
            None => Ok(()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists yet).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Whether the blob is there; in a cache, it is leased first, so it stays there.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.lease(digest).is_ok() && self.path(digest).is_file()
    }

    /// Start writing a blob whose digest is not known yet.
    pub fn writer(&self) -> io::Result<BlobWriter> {
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix())
            .tempfile_in(self.root.join("blobs").join("sha256"))?;
        // Locked while it is written: a prune deletes temporary files only when no one holds
        // them (what a killed run left behind).
        tmp.as_file().lock()?;
        Ok(BlobWriter {
            temp: tmp.path().to_path_buf(),
            inner: HashingWriter::new(BufWriter::with_capacity(256 * 1024, tmp)),
            store: self.clone(),
        })
    }

    /// Store `bytes` (a config, manifest or index: small, already in memory) and return its digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> io::Result<Digest> {
        let mut w = self.writer()?;
        w.write_all(bytes)?;
        Ok(w.commit()?.0)
    }

    /// Open a stored blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<File> {
        File::open(self.path(digest))
    }
}

/// Temporary blob files are named `.tmp-<pid>-<random>`: a process killed before it could
/// remove its own (SIGKILL, a power cut) leaves them behind, and the next process to open the
/// store can tell they are nobody's any more.
fn temp_prefix() -> String {
    format!(".tmp-{}-", std::process::id())
}

/// Remove the temporary files of processes that no longer run (checked in `/proc`), so
/// killed runs do not fill the disk over time. Files of live processes (concurrent runs
/// sharing a cache) are kept, and so is any file someone holds locked: a run in another PID
/// namespace (a container sharing the cache) may have a pid this process cannot see, but it
/// holds its temporary files locked while it writes them ([`BlobStore::writer`]).
/// Best effort: a failure only leaves the file.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let proc = Path::new("/proc/self");
    if !proc.exists() {
        // No way to tell a live process from a dead one here.
        return;
    }
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new("/proc").join(pid.to_string()).exists()
            && File::open(e.path()).is_ok_and(|f| f.try_lock().is_ok())
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// A blob being written: hashed as it goes, named by its digest on [`BlobWriter::commit`].
#[derive(Debug)]
pub struct BlobWriter {
    inner: HashingWriter<BufWriter<tempfile::NamedTempFile>>,
    /// The temporary file's path until the commit.
    temp: PathBuf,
    store: BlobStore,
}

impl BlobWriter {
    /// The temporary file being written (what [`Write::flush`] has written is in it). It is
    /// renamed by [`BlobWriter::commit`] and removed if the writer is dropped: a reader must
    /// open it while the writer is alive and keep it open.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Finish the blob: flush, rename to its digest, return (digest, size).
    /// A file already under that name is replaced (atomically, by the rename): these bytes
    /// are known to hash to the digest, the old file only claims to (it may be a corrupted
    /// cache entry). Readers that opened the old file keep reading it.
    pub fn commit(self) -> io::Result<(Digest, u64)> {
        let (buf, digest, size) = self.inner.finish();
        let tmp = buf.into_inner().map_err(|e| e.into_error())?;
        let dest = self.store.path(&digest);
        // Leased before it has its name, so no prune can take it between the two.
        self.store.lease(&digest)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        // tempfile creates 0600; a blob is not a secret, give it the umask's default
        // like any other file we write (never world-writable, never narrower).
        set_default_file_mode(&dest)?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Create (or truncate) `path` for writing with mode 0644 before the umask, as Go tools (ko,
/// crane) do: the umask can narrow it, but no umask makes a file we write group- or
/// world-writable (README "Limits and untrusted input").
pub fn create_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
}

/// `create_dir_all` with mode 0755 before the umask (see [`create_file`]).
pub fn create_dirs(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
}

/// Give `path` the mode [`create_file`] would have given it (0644 minus the umask), read
/// from a probe file, since the umask can only be read by changing it.
pub(crate) fn set_default_file_mode(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(default_file_mode()))
}

/// The mode a new file of ours gets under the current umask (see [`set_default_file_mode`]).
pub(crate) fn default_file_mode() -> u32 {
    use std::os::unix::fs::PermissionsExt;
    static MODE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        let dir = std::env::temp_dir();
        let probe = dir.join(format!(".imgbuild-umask-{}", std::process::id()));
        let mode = create_file(&probe)
            .and_then(|f| f.metadata())
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o644);
        let _ = fs::remove_file(&probe);
        mode
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = store.put_bytes(b"abc").unwrap();
        assert_eq!(d, Digest::of(b"abc"));
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"abc");
        // Writing the same bytes again yields the same digest.
        assert_eq!(store.put_bytes(b"abc").unwrap(), d);
        // A corrupted file under the digest is replaced by the good bytes.
        fs::write(store.path(&d), b"abd").unwrap();
        assert_eq!(store.put_bytes(b"abc").unwrap(), d);
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"abc");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let sha = dir.path().join("blobs/sha256");
        // A pid above the kernel's limit (4194304) never runs; ours does.
        let dead = sha.join(".tmp-4194400-abc");
        let live = sha.join(format!(".tmp-{}-abc", std::process::id()));
        let other = sha.join(".tmp-x");
        for p in [&dead, &live, &other] {
            fs::write(p, b"partial").unwrap();
        }
        let w = store.writer().unwrap();
        BlobStore::open(dir.path()).unwrap();
        assert!(!dead.exists(), "a dead process's temporary file is kept");
        assert!(live.exists() && other.exists());
        drop(w);
    }
}
