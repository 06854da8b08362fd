//! Leases on cache blobs: what keeps an eviction (`imgbuild cache prune`, or the automatic one
//! after each run, see [`crate::prune`]) from deleting a blob that a concurrent run is using.
//!
//! ```text
//! $IMGBUILD_CACHE/locks/<digest hex>   one empty lock file per blob (layers, configs,
//!                                      manifests, base-image blobs share the namespace)
//! ```
//!
//! A run takes a **shared** `flock` on a blob's lock file before it trusts or writes the blob
//! and keeps it until the run ends (the lock dies with the process, also on `kill -9`). A
//! prune deletes a blob only while it holds the **exclusive** lock, taken without waiting: a
//! blob some run holds is skipped. Taking the lease also sets the lock file's mtime, which is
//! the blob's "last used" time for least-recently-used eviction (the blob's own mtime is part
//! of the layer cache's verification record, so it is not touched).
//!
//! A prune unlinks the lock file together with the blob, while it holds it. A lock taken on a
//! file that was unlinked meanwhile guards nothing, so both sides check after locking that the
//! path still names the file they locked, and otherwise open it again.

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// The leases one run holds in one cache; dropped (and so released) when the run ends.
#[derive(Debug)]
pub struct Leases {
    dir: PathBuf,
    held: Mutex<HashMap<String, File>>,
}

impl Leases {
    /// The leases of `dir` (the cache's `locks/`), created if needed.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Arc<Self>> {
        let dir = dir.into();
        crate::store::create_dirs(&dir)?;
        Ok(Arc::new(Leases {
            dir,
            held: Mutex::new(HashMap::new()),
        }))
    }

    /// Hold `name` (a digest's hex) shared until these leases are dropped, and mark it used
    /// now. Waits only while a prune is deleting that very blob (a few system calls).
    pub fn hold(&self, name: &str) -> io::Result<()> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.contains_key(name) {
            return Ok(());
        }
        let path = self.dir.join(name);
        loop {
            let file = open_lock(&path)?;
            file.lock_shared()?;
            if names_file(&path, &file)? {
                // Best effort: an mtime that cannot be set only makes the blob look older.
                let _ = file.set_modified(SystemTime::now());
                held.insert(name.to_string(), file);
                return Ok(());
            }
        }
    }

    /// How many blobs are held (for tests and debug output).
    pub fn count(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The exclusive lock on `name`, if no run holds it: the right to delete that blob. Dropping
/// the returned file releases it.
pub(crate) fn try_exclusive(dir: &Path, name: &str) -> io::Result<Option<File>> {
    let path = dir.join(name);
    let file = open_lock(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    // Another prune may have deleted it since we opened it; then leave it for the next one.
    Ok(names_file(&path, &file)?.then_some(file))
}

/// The last time a run leased `name`, if it ever did (and the lock file is still there).
pub(crate) fn last_used(dir: &Path, name: &str) -> Option<SystemTime> {
    fs::metadata(dir.join(name)).and_then(|m| m.modified()).ok()
}

fn open_lock(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Write access: the lease sets the mtime. Never truncated: the file is empty anyway.
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
}

/// Whether `path` still names the open `file` (it was not unlinked or replaced).
fn names_file(path: &Path, file: &File) -> io::Result<bool> {
    let open = file.metadata()?;
    Ok(match fs::metadata(path) {
        Ok(m) => m.dev() == open.dev() && m.ino() == open.ino(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lease_blocks_deletion_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        leases.hold("aa").unwrap();
        leases.hold("aa").unwrap();
        assert_eq!(leases.count(), 1);
        // flock locks belong to the open file: another open of the same file conflicts, as
        // another process's would.
        assert!(try_exclusive(dir.path(), "aa").unwrap().is_none());
        assert!(try_exclusive(dir.path(), "bb").unwrap().is_some());
        drop(leases);
        let guard = try_exclusive(dir.path(), "aa").unwrap();
        assert!(guard.is_some());
        // While a prune holds it, it deletes the lock file; a new lease then locks a new file
        // and is not fooled by the unlinked one.
        fs::remove_file(dir.path().join("aa")).unwrap();
        let leases = Leases::open(dir.path()).unwrap();
        leases.hold("aa").unwrap();
        drop(guard);
        assert!(try_exclusive(dir.path(), "aa").unwrap().is_none());
        assert!(last_used(dir.path(), "aa").is_some());
    }
}
