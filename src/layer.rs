//! Layers: a planned entry list becomes a tar stream, compressed (gzip or zstd, see
//! [`crate::compress`]), written into the blob store, with both digests computed in the same
//! single pass:
//!
//! ```text
//! files --read once--> tar::Builder --> HashingWriter (diff_id: sha256 of the tar)
//!                                  --> Encoder --> BlobWriter (digest: sha256 of the blob) --> blobs/sha256/<digest>
//! ```
//!
//! While the blob is written, [`Event::LayerBytes`] says how much of it is in the temporary
//! file (and [`Event::LayerBytesEnd`] how it ended), so that a push can upload a layer while it
//! is still being compressed ([`crate::overlap`]); the build itself knows nothing of registries.
//!
//! Nothing is held whole in memory: each file is streamed through fixed-size buffers, and the
//! parallel encoder keeps a bounded number of blocks in flight.
//! Headers are fully determined by the plan and `SOURCE_DATE_EPOCH`: mtime fixed, numeric
//! owners only (no user/group names), no xattrs, no device numbers, GNU long names for paths
//! over 100 bytes (image-spec layer.md permits any tar the runtimes read; GNU and PAX both are).

use crate::compress::{Compression, Encoder};
use crate::digest::{Digest, FileHasher, FileSums, HashingWriter};
use crate::image::{Descriptor, LayerInfo};
use crate::plan::{EntryKind, LayerPlan};
use crate::progress::{Event, Progress};
use crate::store::{BlobStore, BlobWriter};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Input piece size handed to the encoder.
const ENCODER_INPUT: usize = 1 << 20;
/// Read size for file contents: one read per piece the encoder takes.
const FILE_READ: usize = ENCODER_INPUT;

/// Compressed bytes between two [`Event::LayerBytes`]: often enough that an uploader sending
/// 4 MiB chunks learns of each within a quarter of a chunk, rarely enough to cost nothing
/// (the store's writer buffers 256 KiB, so the extra flushes write nothing early).
const ANNOUNCE_EVERY: u64 = 1 << 20;

/// How to write layers.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// `SOURCE_DATE_EPOCH`: the mtime of every entry.
    pub epoch: u64,
    /// Codec and level (`--compression`, `--compression-level`): part of the layer's identity.
    pub compression: Compression,
    /// Compression threads per layer. Does not change the bytes (see [`crate::compress`]).
    pub threads: usize,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            epoch: 0,
            compression: Compression::default(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// Why a layer could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} changed size while it was being read (planned {planned} bytes); do not modify artifacts during a build", path.display())]
    Changed { path: PathBuf, planned: u64 },
    #[error("writing layer blob to {}: {source}", dir.display())]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    /// A source that cannot be read or changed is the user's input (3); a blob that cannot be
    /// written (a full disk, a read-only store) is a local failure (1), not the input's fault.
    pub fn exit_code(&self) -> crate::exit::ExitCode {
        match self {
            LayerError::Read { .. } | LayerError::Changed { .. } => crate::exit::ExitCode::Input,
            LayerError::Write { .. } => crate::exit::ExitCode::Internal,
        }
    }
}

/// Bytes read from input files by this process (tarring and, in [`crate::cache`], hashing
/// them): what shows that a cold cache reads each input once (`-v` prints it).
static INPUT_BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// See [`INPUT_BYTES_READ`].
pub fn input_bytes_read() -> u64 {
    INPUT_BYTES_READ.load(Ordering::Relaxed)
}

pub(crate) fn count_input_bytes(n: u64) {
    INPUT_BYTES_READ.fetch_add(n, Ordering::Relaxed);
}

/// Write one layer into `store`; return its descriptor and diff_id.
pub fn write_layer(
    layer: &LayerPlan,
    store: &BlobStore,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    write_layer_hashing(layer, store, opts, false, &crate::progress::Silent).map(|(info, _)| info)
}

/// [`write_layer`], and with `hash_files` the sha256 and SHA-1 of each regular file's content
/// as it was read into the tar (None for other entries, and without `hash_files`): the layer
/// cache's key and the SBOM need them, and this way a cold cache reads each input once.
/// `progress` hears how much of the blob is written ([`Event::LayerBytes`]).
pub fn write_layer_hashing(
    layer: &LayerPlan,
    store: &BlobStore,
    opts: &LayerOptions,
    hash_files: bool,
    progress: &dyn Progress,
) -> Result<(LayerInfo, Vec<Option<FileSums>>), LayerError> {
    let mut file_digests = Vec::with_capacity(layer.entries.len());
    let write_err = |source| LayerError::Write {
        dir: store.root().to_path_buf(),
        source,
    };
    let blob = Announcing::new(store.writer().map_err(write_err)?, progress);
    let encoder = Encoder::new(blob, opts.compression, opts.threads).map_err(write_err)?;
    // Headers and small files come in small writes; the encoders work per call (zstd's
    // multithreaded mode synchronises with its workers on each one), so feed them 1 MiB at a
    // time (large file contents pass straight through). The bytes do not depend on the piece
    // sizes (compress.rs tests).
    let encoder = io::BufWriter::with_capacity(ENCODER_INPUT, encoder);
    let mut tar = tar::Builder::new(HashingWriter::new(encoder));
    // One read buffer per layer, for all its files.
    let mut read_buf: Option<Vec<u8>> = None;
    for entry in &layer.entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(entry.mode);
        h.set_uid(u64::from(entry.uid));
        h.set_gid(u64::from(entry.gid));
        h.set_mtime(opts.epoch);
        match &entry.kind {
            EntryKind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, &entry.path, io::empty())
                    .map_err(write_err)?;
            }
            EntryKind::Symlink { target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                tar.append_link(&mut h, &entry.path, target)
                    .map_err(write_err)?;
            }
            EntryKind::File { src, size } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(*size);
                let file = File::open(src).map_err(|source| LayerError::Read {
                    path: src.clone(),
                    source,
                })?;
                // tar writes the header (and a GNU long-name entry before it); the content
                // goes in here, in large reads: tar's own copy reads 8 KiB per call.
                tar.append_data(&mut h, &entry.path, io::empty())
                    .map_err(write_err)?;
                let buf = read_buf.get_or_insert_with(|| vec![0; FILE_READ]);
                let sums = copy_content(file, *size, buf, tar.get_mut(), hash_files).map_err(
                    |e| match e {
                        CopyError::Read(source) => LayerError::Read {
                            path: src.clone(),
                            source,
                        },
                        CopyError::Changed => LayerError::Changed {
                            path: src.clone(),
                            planned: *size,
                        },
                        CopyError::Write(source) => write_err(source),
                    },
                )?;
                file_digests.push(sums);
                continue;
            }
        }
        file_digests.push(None);
    }
    let hashing = tar.into_inner().map_err(write_err)?;
    let (buffered, diff_id, _tar_size) = hashing.finish();
    let encoder = buffered
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    let blob = encoder.finish().map_err(write_err)?;
    let (digest, size) = blob.commit().map_err(write_err)?;
    let info = LayerInfo {
        descriptor: Descriptor::new(opts.compression.codec.media_type(), digest, size),
        diff_id,
        created_by: layer.created_by.clone(),
    };
    Ok((info, file_digests))
}

/// Numbers the blob writes of this process, for [`Event::LayerBytes`].
static WRITES: AtomicU64 = AtomicU64::new(0);

/// The store's writer, saying every [`ANNOUNCE_EVERY`] bytes how much is in the temporary
/// file ([`Event::LayerBytes`], after flushing it there), and how the write ended
/// ([`Event::LayerBytesEnd`]: committed, or failed when dropped uncommitted, e.g. on an
/// error or a panic). A blob smaller than that announces nothing.
struct Announcing<'p> {
    /// None once committed.
    blob: Option<BlobWriter>,
    progress: &'p dyn Progress,
    id: u64,
    written: u64,
    /// `written` at the last announcement; 0 before the first.
    announced: u64,
}

impl<'p> Announcing<'p> {
    fn new(blob: BlobWriter, progress: &'p dyn Progress) -> Self {
        Announcing {
            blob: Some(blob),
            progress,
            id: WRITES.fetch_add(1, Ordering::Relaxed),
            written: 0,
            announced: 0,
        }
    }

    fn blob(&mut self) -> io::Result<&mut BlobWriter> {
        self.blob
            .as_mut()
            .ok_or_else(|| io::Error::other("layer blob written after its commit"))
    }

    /// [`BlobWriter::commit`], then say the blob is complete.
    fn commit(mut self) -> io::Result<(Digest, u64)> {
        let blob = self
            .blob
            .take()
            .ok_or_else(|| io::Error::other("layer blob committed twice"))?;
        // On an error, drop says the write failed.
        let (digest, size) = blob.commit()?;
        if self.announced > 0 {
            self.announced = 0;
            self.progress.event(Event::LayerBytesEnd {
                id: self.id,
                blob: Some((&digest, size)),
            });
        }
        Ok((digest, size))
    }
}

impl Write for Announcing<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.blob()?.write(buf)?;
        self.written += n as u64;
        if self.written - self.announced >= ANNOUNCE_EVERY {
            self.announced = self.written;
            let (id, written, progress) = (self.id, self.written, self.progress);
            let blob = self.blob()?;
            blob.flush()?;
            progress.event(Event::LayerBytes {
                id,
                temp: blob.temp_path(),
                written,
            });
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.blob()?.flush()
    }
}

impl Drop for Announcing<'_> {
    fn drop(&mut self) {
        // Announced but not committed: whoever reads the file must not wait for the rest.
        if self.announced > 0 {
            self.progress.event(Event::LayerBytesEnd {
                id: self.id,
                blob: None,
            });
        }
    }
}

/// Why a file's content could not be copied into the tar.
enum CopyError {
    Read(io::Error),
    /// The file ended before its planned size, or goes on after it.
    Changed,
    Write(io::Error),
}

/// Copy exactly `size` bytes of `file` into the tar stream `out`, then the zero padding to
/// the next 512-byte record (what tar's `append` writes after the data), hashing the content
/// with `hash`. A file that shrank or grew since planning is [`CopyError::Changed`] rather
/// than a corrupt or silently truncated layer (the tar header already holds the planned size).
fn copy_content(
    mut file: File,
    size: u64,
    buf: &mut [u8],
    out: &mut impl Write,
    hash: bool,
) -> Result<Option<FileSums>, CopyError> {
    let mut hasher = hash.then(FileHasher::default);
    let mut remaining = size;
    while remaining > 0 {
        let max = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = match file.read(&mut buf[..max]) {
            Ok(0) => return Err(CopyError::Changed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        remaining -= n as u64;
        count_input_bytes(n as u64);
        if let Some(h) = &mut hasher {
            h.update(&buf[..n]);
        }
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
    let mut probe = [0u8; 1];
    loop {
        match file.read(&mut probe) {
            Ok(0) => break,
            Ok(_) => return Err(CopyError::Changed),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        }
    }
    let pad = (512 - size % 512) % 512;
    out.write_all(&[0; 512][..pad as usize])
        .map_err(CopyError::Write)?;
    Ok(hasher.map(FileHasher::finish))
}

/// The diff_id (sha256 of the uncompressed tar) of a gzip layer blob, for checks and tests.
pub fn diff_id_of_gzip(blob: impl Read) -> io::Result<Digest> {
    diff_id_of(crate::compress::Codec::Gzip, blob)
}

/// The diff_id (sha256 of the uncompressed tar) of a layer blob, for checks and tests.
pub fn diff_id_of(codec: crate::compress::Codec, blob: impl Read) -> io::Result<Digest> {
    let mut w = HashingWriter::new(io::sink());
    io::copy(&mut crate::compress::decoder(codec, blob)?, &mut w)?;
    w.flush()?;
    Ok(w.finish().1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::plan::Entry;

    /// A small plan (a directory, a file, a symlink with a long name) over a file in `dir`;
    /// also used by the cache's tests.
    pub(crate) fn entries(dir: &std::path::Path) -> LayerPlan {
        let f = dir.join("f");
        std::fs::write(&f, b"hello\n").unwrap();
        LayerPlan {
            entries: vec![
                Entry {
                    path: "app".into(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
                Entry {
                    path: "app/f".into(),
                    kind: EntryKind::File { src: f, size: 6 },
                    mode: 0o644,
                    uid: 1000,
                    gid: 1000,
                },
                Entry {
                    path: format!("app/{}", "long".repeat(40)).into(),
                    kind: EntryKind::Symlink { target: "f".into() },
                    mode: 0o777,
                    uid: 0,
                    gid: 0,
                },
            ],
            created_by: "test".into(),
        }
    }

    #[test]
    fn layer_is_deterministic_and_self_consistent() {
        let src = tempfile::tempdir().unwrap();
        let plan = entries(src.path());
        let a = BlobStore::open(tempfile::tempdir().unwrap().keep()).unwrap();
        let b = BlobStore::open(tempfile::tempdir().unwrap().keep()).unwrap();
        let opts = LayerOptions::default();
        let la = write_layer(&plan, &a, &opts).unwrap();
        // Different mtime on the source: same layer.
        let later =
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000);
        File::options()
            .write(true)
            .open(src.path().join("f"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        let lb = write_layer(&plan, &b, &opts).unwrap();
        assert_eq!(la, lb);
        let blob = std::fs::read(a.path(&la.descriptor.digest)).unwrap();
        assert_eq!(Digest::of(&blob), la.descriptor.digest);
        assert_eq!(blob.len() as u64, la.descriptor.size);
        assert_eq!(diff_id_of_gzip(&blob[..]).unwrap(), la.diff_id);

        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
        let got: Vec<(String, u32, u64, u64, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                    h.size().unwrap(),
                )
            })
            .collect();
        assert_eq!(got[0], ("app".into(), 0o755, 0, 0, 0));
        assert_eq!(got[1], ("app/f".into(), 0o644, 1000, 0, 6));
        assert_eq!(got[2].0.len(), 4 + 160);
    }

    /// How a write ended: its id and blob.
    type End = (u64, Option<(Digest, u64)>);

    /// Records what a layer write announces, and how much its file held at each announcement.
    #[derive(Default)]
    struct Announced {
        /// (id, written, file length then)
        bytes: std::sync::Mutex<Vec<(u64, u64, u64)>>,
        ends: std::sync::Mutex<Vec<End>>,
    }

    impl Progress for Announced {
        fn event(&self, event: Event<'_>) {
            match event {
                Event::LayerBytes { id, temp, written } => {
                    let len = std::fs::metadata(temp).map_or(0, |m| m.len());
                    self.bytes.lock().unwrap().push((id, written, len));
                }
                Event::LayerBytesEnd { id, blob } => {
                    let blob = blob.map(|(d, s)| (d.clone(), s));
                    self.ends.lock().unwrap().push((id, blob));
                }
                _ => {}
            }
        }
    }

    #[test]
    fn a_layer_announces_the_bytes_in_its_file_and_its_end() {
        let src = tempfile::tempdir().unwrap();
        let mut plan = entries(src.path());
        // 3 MiB that hardly compress: an announcement per MiB written but the last.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let data: Vec<u8> = (0..3 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.path().join("f"), &data).unwrap();
        if let EntryKind::File { size, .. } = &mut plan.entries[1].kind {
            *size = data.len() as u64;
        }
        let store = BlobStore::open(tempfile::tempdir().unwrap().keep()).unwrap();
        let seen = Announced::default();
        let (info, _) =
            write_layer_hashing(&plan, &store, &LayerOptions::default(), false, &seen).unwrap();
        let bytes = seen.bytes.into_inner().unwrap();
        assert!(bytes.len() >= 2, "{bytes:?}");
        let id = bytes[0].0;
        let mut last = 0;
        for &(i, written, len) in &bytes {
            assert_eq!(i, id);
            assert!(written >= last + ANNOUNCE_EVERY, "{bytes:?}");
            // Announced bytes are in the file, for another descriptor to read.
            assert!(len >= written, "{bytes:?}");
            last = written;
        }
        let ends = seen.ends.into_inner().unwrap();
        let want = (info.descriptor.digest.clone(), info.descriptor.size);
        assert_eq!(ends, vec![(id, Some(want))]);

        // A write that fails after announcing bytes says it failed (here the file is
        // shorter than planned: found at its end).
        let failed = Announced::default();
        let mut plan = entries(src.path());
        std::fs::write(src.path().join("f"), &data).unwrap();
        if let EntryKind::File { size, .. } = &mut plan.entries[1].kind {
            *size = data.len() as u64 + 100;
        }
        let err = write_layer_hashing(&plan, &store, &LayerOptions::default(), false, &failed);
        assert!(matches!(err, Err(LayerError::Changed { .. })));
        let id = failed.bytes.into_inner().unwrap()[0].0;
        assert_eq!(failed.ends.into_inner().unwrap(), vec![(id, None)]);

        // A small layer announces nothing.
        let small = Announced::default();
        let plan = entries(src.path());
        let _ = write_layer_hashing(&plan, &store, &LayerOptions::default(), false, &small);
        assert!(small.bytes.into_inner().unwrap().is_empty());
        assert!(small.ends.into_inner().unwrap().is_empty());
    }

    #[test]
    fn contents_go_in_as_tar_itself_would_write_them() {
        // The layer's tar, decompressed, against tar's own `append_data` of the same entries:
        // long and short names, sizes around the 512-byte padding and over several reads.
        let src = tempfile::tempdir().unwrap();
        let sizes = [0, 1, 511, 512, 513, FILE_READ + 1000, 2 * FILE_READ];
        let mut entries = Vec::new();
        let mut want = tar::Builder::new(Vec::new());
        for (i, size) in sizes.into_iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|j| (j * 7 + i) as u8).collect();
            let f = src.path().join(format!("f{i}"));
            std::fs::write(&f, &data).unwrap();
            let path = format!("app/{}{i}", "n".repeat(if i % 2 == 0 { 150 } else { 3 }));
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(size as u64);
            want.append_data(&mut h, &path, &data[..]).unwrap();
            entries.push(Entry {
                path: path.into(),
                kind: EntryKind::File {
                    src: f,
                    size: size as u64,
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
            });
        }
        let want = want.into_inner().unwrap();
        let plan = LayerPlan {
            entries,
            created_by: "test".into(),
        };
        let store = BlobStore::open(tempfile::tempdir().unwrap().keep()).unwrap();
        let (info, sums) = write_layer_hashing(
            &plan,
            &store,
            &LayerOptions::default(),
            true,
            &crate::progress::Silent,
        )
        .unwrap();
        let mut got = Vec::new();
        flate2::read::GzDecoder::new(File::open(store.path(&info.descriptor.digest)).unwrap())
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == want, "the tar differs from tar's own");
        assert_eq!(info.diff_id, Digest::of(&want));
        let data: Vec<u8> = (0..513).map(|j| (j * 7 + 4) as u8).collect();
        assert_eq!(sums[4], Some(FileSums::of(&data)));
    }

    #[test]
    fn a_file_that_shrank_or_grew_is_an_error_naming_it() {
        // The file holds 6 bytes; planned larger = it shrank, planned smaller = it grew.
        for planned in [100, 3, 0] {
            let src = tempfile::tempdir().unwrap();
            let mut plan = entries(src.path());
            if let EntryKind::File { size, .. } = &mut plan.entries[1].kind {
                *size = planned;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = BlobStore::open(dir.path()).unwrap();
            let err = write_layer(&plan, &store, &LayerOptions::default()).unwrap_err();
            assert!(
                matches!(&err, LayerError::Changed { planned: p, path } if *p == planned && path.ends_with("f")),
                "planned {planned}: {err}"
            );
            assert_eq!(err.exit_code(), crate::exit::ExitCode::Input);
            // Nothing is left in the store: no blob, no temporary file.
            let left = std::fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count();
            assert_eq!(left, 0, "planned {planned}");
        }
    }
}
