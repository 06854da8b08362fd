//! Layer compression: the codec and level (`--compression gzip|zstd`, `--compression-level`),
//! and encoders whose output bytes depend only on (input, codec, level) — never on the number
//! of threads or the machine — so layer digests stay deterministic.
//!
//! - **gzip**: [`ParGzWriter`], pigz's scheme. The input is cut into fixed 128 KiB blocks; each
//!   block is raw-deflated on a worker thread with the previous 32 KiB of input as its preset
//!   dictionary (RFC 1951 allows back-references up to 32 KiB) and ended with a sync flush
//!   (an empty stored block, so the next block starts byte-aligned); the last block is ended
//!   with `Finish`. The concatenation, with one gzip header and a CRC-32/ISIZE trailer
//!   (RFC 1952), is one ordinary gzip member that any decoder reads. Block boundaries and
//!   dictionaries are fixed by the input alone, so 1, 2 or 64 threads write the same bytes.
//!   Memory is bounded: at most `2 x threads` blocks are in flight.
//! - **zstd**: libzstd's multithreaded mode with at least one worker. Its output does not depend
//!   on the worker count but differs from single-threaded mode (TESTBED.md), so the
//!   single-threaded mode is never used. The job size is fixed (4 MiB): it is part of the
//!   bytes, and it bounds memory (each worker holds one job's input and output).
//!
//! Two deflate engines write the blocks: level 1 (`fast`) is imgbuild's own greedy encoder
//! ([`crate::deflate`], written for speed: bench/compression.md), the other levels zlib-rs
//! (flate2's backend, pinned in Cargo.toml). Both are guarded by golden digests: other deflate
//! implementations produce other, equally valid, bytes.

use crate::image::{MEDIA_TYPE_LAYER_GZIP, MEDIA_TYPE_LAYER_ZSTD};
use flate2::{Compress, FlushCompress, Status};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

/// Input block size of the parallel gzip encoder: pigz's default (128 KiB).
/// Changing it changes every gzip digest.
pub const GZIP_BLOCK: usize = 128 * 1024;
/// `--compression-level fast` for gzip: level 1, imgbuild's own encoder ([`Engine::for_level`];
/// bench/compression.md has the measurements behind the choice).
const GZIP_FAST: u32 = 1;
/// Deflate's window: the dictionary each block is primed with.
const DICT: usize = 32 * 1024;

/// zstd multithreaded job size (bytes of input per job). Changing it changes zstd digests.
const ZSTD_JOB: u32 = 4 << 20;

/// A layer codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Gzip,
    Zstd,
}

impl Codec {
    /// gzip 5: zlib-rs's level 5 writes within 0.2% of its level 6 bytes (1.02x `gzip -6`)
    /// in about 10% less time (bench/compression.md); zstd 3 (zstd's own default, buildkit's
    /// too).
    pub fn default_level(self) -> u32 {
        match self {
            Codec::Gzip => 5,
            Codec::Zstd => 3,
        }
    }

    /// The level `--compression-level fast` names (see [`Compression::parse`]).
    pub fn fast_level(self) -> u32 {
        match self {
            Codec::Gzip => GZIP_FAST,
            Codec::Zstd => 1,
        }
    }

    /// The levels we accept: gzip 0-9, zstd 1-19 (20-22 need zstd's "ultra" mode and
    /// hundreds of MiB of window memory in every decompressor).
    pub fn levels(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Codec::Gzip => 0..=9,
            Codec::Zstd => 1..=19,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            Codec::Gzip => MEDIA_TYPE_LAYER_GZIP,
            Codec::Zstd => MEDIA_TYPE_LAYER_ZSTD,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        })
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(Codec::Gzip),
            "zstd" => Ok(Codec::Zstd),
            _ => Err(format!("unknown compression {s:?}: use gzip or zstd")),
        }
    }
}

/// Codec and level: together they decide the layer bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Compression {
    pub codec: Codec,
    pub level: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            codec: Codec::Gzip,
            level: Codec::Gzip.default_level(),
        }
    }
}

impl Compression {
    /// `--compression-level` as typed: a number, or `fast` ([`Codec::fast_level`]).
    pub fn parse(codec: Codec, level: Option<&str>) -> Result<Self, String> {
        let level =
            match level {
                None => None,
                Some("fast") => Some(codec.fast_level()),
                Some(n) => Some(n.parse::<u32>().map_err(|_| {
                    format!("--compression-level {n:?}: expected a number or `fast`")
                })?),
            };
        Self::new(codec, level)
    }

    /// `level` None means the codec's default; an out-of-range level is an error message
    /// naming the valid range.
    pub fn new(codec: Codec, level: Option<u32>) -> Result<Self, String> {
        let level = level.unwrap_or_else(|| codec.default_level());
        let range = codec.levels();
        if !range.contains(&level) {
            return Err(format!(
                "--compression-level {level}: {codec} levels are {}-{}",
                range.start(),
                range.end()
            ));
        }
        Ok(Compression { codec, level })
    }
}

/// A streaming encoder for either codec.
#[allow(missing_debug_implementations)] // zstd's encoder has no Debug
pub enum Encoder<W: Write> {
    Gzip(ParGzWriter<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// An encoder writing to `inner`, compressing on `threads` threads (at least one).
    pub fn new(inner: W, c: Compression, threads: usize) -> io::Result<Self> {
        let threads = threads.max(1);
        Ok(match c.codec {
            Codec::Gzip => Encoder::Gzip(ParGzWriter::new(inner, c.level, threads)),
            Codec::Zstd => {
                let level = i32::try_from(c.level).unwrap_or(3);
                let mut e = zstd::stream::write::Encoder::new(inner, level)?;
                // Always the multithreaded mode, even for one thread (see the module docs).
                e.multithread(u32::try_from(threads).unwrap_or(1))?;
                // A fixed job size: part of the bytes (so pinned, not left to libzstd's
                // level-dependent default), and it bounds memory: each worker holds a job's
                // input and output, 4 MiB keeps a 1 GiB layer under 64 MiB resident.
                e.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB))?;
                Encoder::Zstd(e)
            }
        })
    }

    /// Write everything still buffered and the stream's end; return the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Gzip(g) => g.finish(),
            Encoder::Zstd(z) => z.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(g) => g.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        // Flushing mid-stream would add sync markers (different bytes); the data is written
        // by `finish`.
        Ok(())
    }
}

/// A decoder for a layer blob of either media type (for checks and tests).
pub fn decoder<'a, R: io::Read + 'a>(codec: Codec, blob: R) -> io::Result<Box<dyn io::Read + 'a>> {
    Ok(match codec {
        Codec::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
    })
}

struct Job {
    seq: u64,
    /// The previous block (its last 32 KiB are this block's dictionary).
    prev: Option<Arc<Vec<u8>>>,
    data: Arc<Vec<u8>>,
    last: bool,
}

/// A compressed block and the CRC-32 of its input (computed on the worker: no serial CRC pass).
type Done = (u64, io::Result<(Vec<u8>, crc32fast::Hasher)>);

/// What deflates a block: zlib-rs at a level, or imgbuild's own encoder ([`crate::deflate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    ZlibRs(u32),
    Own(crate::deflate::Params),
}

impl Engine {
    /// gzip level 1 (`fast`) is imgbuild's own greedy encoder; the other levels are zlib-rs's.
    pub fn for_level(level: u32) -> Self {
        if level == GZIP_FAST {
            Engine::Own(crate::deflate::FAST)
        } else {
            Engine::ZlibRs(level)
        }
    }

    /// Raw-deflate one block: primed with `dict`, ended with a sync flush, or final if `last`.
    fn deflate(self, dict: Option<&[u8]>, data: &[u8], last: bool) -> io::Result<Vec<u8>> {
        match self {
            Engine::ZlibRs(level) => zlib_block(level, dict, data, last),
            Engine::Own(p) => Ok(crate::deflate::deflate_block(
                &p,
                dict.unwrap_or_default(),
                data,
                last,
            )),
        }
    }
}

/// Parallel, deterministic gzip (see the module docs).
pub struct ParGzWriter<W: Write> {
    inner: W,
    engine: Engine,
    /// The block being filled.
    buf: Vec<u8>,
    prev: Option<Arc<Vec<u8>>>,
    crc: crc32fast::Hasher,
    isize: u64,
    header_written: bool,
    next_seq: u64,
    next_write: u64,
    /// Input bytes per block (part of the output bytes: [`GZIP_BLOCK`] outside benchmarks).
    block: usize,
    /// Compressed blocks that arrived before their turn.
    ready: BTreeMap<u64, (Vec<u8>, crc32fast::Hasher)>,
    max_in_flight: u64,
    /// Dropping it (in `finish`, or with the writer after an error) ends the workers.
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    /// The first error: every later call returns it at once. After a failed write the block
    /// sequence has a hole, and waiting for that block again would wait forever (a full disk
    /// hung builds this way: `BufWriter` and `tar::Builder` write again when dropped).
    failed: Option<(io::ErrorKind, String)>,
}

impl<W: Write> fmt::Debug for ParGzWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParGzWriter")
            .field("engine", &self.engine)
            .field("threads", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl<W: Write> ParGzWriter<W> {
    pub fn new(inner: W, level: u32, threads: usize) -> Self {
        Self::with_engine(inner, Engine::for_level(level), threads, GZIP_BLOCK)
    }

    /// [`ParGzWriter::new`] with another engine or block size: for the comparisons in
    /// bench/compression.sh only (both are part of the bytes; layers use
    /// [`Engine::for_level`] and [`GZIP_BLOCK`]).
    #[doc(hidden)]
    pub fn with_engine(inner: W, engine: Engine, threads: usize, block: usize) -> Self {
        let threads = threads.max(1);
        let block = block.max(DICT);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|_| {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let dict = job
                            .prev
                            .as_deref()
                            .map(|p| &p[p.len() - DICT.min(p.len())..]);
                        // A panic must not lose the block silently (the writer would wait
                        // for it forever): it becomes that block's error.
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let mut crc = crc32fast::Hasher::new();
                            crc.update(&job.data);
                            engine
                                .deflate(dict, &job.data, job.last)
                                .map(|out| (out, crc))
                        }))
                        .unwrap_or_else(|_| Err(io::Error::other("a gzip worker thread panicked")));
                        if done_tx.send((job.seq, out)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        ParGzWriter {
            inner,
            engine,
            buf: Vec::with_capacity(block),
            block,
            prev: None,
            crc: crc32fast::Hasher::new(),
            isize: 0,
            header_written: false,
            next_seq: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            max_in_flight: 2 * threads as u64,
            jobs: Some(jobs),
            done,
            workers,
            failed: None,
        }
    }

    /// Run `f` unless an earlier call failed; remember its failure.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        if let Some((kind, msg)) = &self.failed {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        let r = f(self);
        if let Err(e) = &r {
            self.failed = Some((e.kind(), e.to_string()));
            // Stop the workers now: nothing more will be written.
            self.jobs = None;
        }
        r
    }

    fn submit(&mut self, last: bool) -> io::Result<()> {
        let data = Arc::new(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(if last { 0 } else { self.block }),
        ));
        let job = Job {
            seq: self.next_seq,
            prev: self.prev.take(),
            data: Arc::clone(&data),
            last,
        };
        self.prev = Some(data);
        self.next_seq += 1;
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| io::Error::other("gzip worker threads ended"))?;
        // Bounded memory: wait for the oldest blocks before queueing more.
        while self.next_seq - self.next_write > self.max_in_flight {
            self.write_one()?;
        }
        Ok(())
    }

    /// Wait for the next block in order and write it.
    fn write_one(&mut self) -> io::Result<()> {
        if !self.header_written {
            // RFC 1952: ID1 ID2 CM=8 FLG=0 MTIME=0 XFL OS=255 (unknown), as flate2's GzBuilder
            // wrote before; XFL 2 = best compression, 4 = fastest.
            let xfl = match self.engine {
                Engine::ZlibRs(9) => 2,
                Engine::ZlibRs(1) | Engine::Own(_) => 4,
                _ => 0,
            };
            self.inner
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255])?;
            self.header_written = true;
        }
        while !self.ready.contains_key(&self.next_write) {
            let (seq, out) = self
                .done
                .recv()
                .map_err(|_| io::Error::other("gzip worker thread ended"))?;
            self.ready.insert(seq, out?);
        }
        if let Some((bytes, crc)) = self.ready.remove(&self.next_write) {
            // Blocks are combined in input order: the trailer's CRC of the whole input.
            self.crc.combine(&crc);
            self.inner.write_all(&bytes)?;
        }
        self.next_write += 1;
        Ok(())
    }

    /// Compress what is left, write the trailer, stop the workers; return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.guarded(|w| {
            w.submit(true)?;
            while w.next_write < w.next_seq {
                w.write_one()?;
            }
            let crc = std::mem::take(&mut w.crc).finalize();
            // ISIZE is the input size modulo 2^32 (RFC 1952 2.3.1).
            let isize = (w.isize & 0xffff_ffff) as u32;
            w.inner.write_all(&crc.to_le_bytes())?;
            w.inner.write_all(&isize.to_le_bytes())
        })?;
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParGzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failed.is_some() {
            self.guarded(|_| Ok(()))?;
        }
        // All of `buf`, over as many blocks as it spans: a partial write would make the
        // BufWriter in front of us copy the rest into its own buffer first.
        let mut rest = buf;
        while !rest.is_empty() {
            if self.buf.len() == self.block {
                // A full block is sent only once more input exists: the last block must be
                // the one `finish` ends with `Finish`.
                self.guarded(|w| w.submit(false))?;
            }
            let n = rest.len().min(self.block - self.buf.len());
            self.buf.extend_from_slice(&rest[..n]);
            self.isize += n as u64;
            rest = &rest[n..];
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raw-deflate one block: primed with `dict`, ended with a sync flush, or `Finish` if last.
///
/// A fresh compressor per block, never a reused one after `reset()`: zlib-rs's reset keeps
/// the previous stream's bytes in the window (a fresh window is zeroed) and the match search
/// reads some of them, so the output would depend on which blocks the worker compressed
/// before (bench/compression.md: 5-11 of 230 blocks of binary input at levels 1-6). The
/// fresh state costs about 1% of a build's CPU.
fn zlib_block(level: u32, dict: Option<&[u8]>, data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(flate2::Compression::new(level), false);
    if let Some(d) = dict {
        c.set_dictionary(d).map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(data.len() + data.len() / 8 + 64);
    let mut consumed = 0usize;
    loop {
        let before = c.total_in();
        let status = c
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        consumed += usize::try_from(c.total_in() - before).unwrap_or(0);
        let done = match status {
            Status::StreamEnd => true,
            // A sync flush is complete when all input is in and output space is left over.
            _ => !last && consumed == data.len() && out.len() < out.capacity(),
        };
        if done {
            return Ok(out);
        }
        out.reserve(64 * 1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Realistic, compressible, reproducible input: text-like runs mixed with a xorshift stream.
    fn sample(len: usize) -> Vec<u8> {
        let words: &[&[u8]] = &[
            b"layer ",
            b"image ",
            b"manifest ",
            b"\x7fELF",
            b"\n",
            b"0123",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(4) {
                out.extend_from_slice(&x.to_le_bytes()[..3]);
            } else if x.is_multiple_of(3) {
                // Decimal numbers: the kind of input that exposed reused-compressor state.
                out.extend_from_slice(format!("{} ", x % 100_000).as_bytes());
            } else {
                out.extend_from_slice(words[(x >> 8) as usize % words.len()]);
            }
        }
        out.truncate(len);
        out
    }

    fn encode(c: Compression, threads: usize, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new(), c, threads).unwrap();
        for part in data.chunks(chunk.max(1)) {
            e.write_all(part).unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn output_does_not_depend_on_threads_or_write_sizes() {
        let sizes = [
            0,
            1,
            GZIP_BLOCK - 1,
            GZIP_BLOCK,
            GZIP_BLOCK + 1,
            5 * GZIP_BLOCK + 77,
        ];
        // The default levels, and gzip `fast` (the other engine: its per-thread buffers are
        // reused across blocks and must not carry anything over).
        for (codec, level) in [
            (Codec::Gzip, None),
            (Codec::Gzip, Some(1)),
            (Codec::Zstd, None),
        ] {
            let c = Compression::new(codec, level).unwrap();
            for size in sizes {
                let data = sample(size);
                let one = encode(c, 1, &data, 65536);
                for (threads, chunk) in [(2, 1000), (4, 65536), (3, GZIP_BLOCK * 2)] {
                    assert!(
                        encode(c, threads, &data, chunk) == one,
                        "{codec} size {size}: {threads} threads, writes of {chunk} differ"
                    );
                }
                let mut back = Vec::new();
                decoder(codec, &one[..])
                    .unwrap()
                    .read_to_end(&mut back)
                    .unwrap();
                assert!(back == data, "{codec} size {size}: round trip differs");
            }
        }
    }

    #[test]
    fn gzip_is_one_standard_member() {
        let data = sample(3 * GZIP_BLOCK + 5);
        let gz = encode(Compression::default(), 2, &data, 8192);
        // The single-member decoder must read it all: one member, not a concatenation.
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        // Primed dictionaries matter: the result is smaller than independent blocks would be,
        // and close to a one-stream gzip of the same level.
        let mut plain = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        plain.write_all(&data).unwrap();
        let plain = plain.finish().unwrap();
        assert!(
            gz.len() < plain.len() + plain.len() / 50,
            "parallel gzip {} vs plain {}",
            gz.len(),
            plain.len()
        );
    }

    #[test]
    fn golden_digests() {
        // Guards the exact bytes: a change of deflate backend, block size, dictionary or
        // zstd version shows up here first (every layer digest would change with it).
        let data = sample(3 * GZIP_BLOCK + 12345);
        let cases = [
            (
                Codec::Gzip,
                6,
                "sha256:3c9a6c8453008e91daaaeb9be19a05a1f243745bbc0d66b0e0b4851b888ccf78",
            ),
            (
                Codec::Gzip,
                1,
                "sha256:39520f54704181520a1af25013698a60656857e495658121e516adb47cbc5d49",
            ),
            // The default level; `fast` is level 1 (imgbuild's own encoder).
            (
                Codec::Gzip,
                5,
                "sha256:12af35bdd7f3c6ef0221c4491c26c7423cc2575fa2700e278ffba30b39b062f4",
            ),
            (
                Codec::Gzip,
                2,
                "sha256:2717905d0de36be5a97687554307eaadff3d234e2a99bbac240952b60a9f3e2f",
            ),
            (
                Codec::Zstd,
                3,
                "sha256:52aedb987e6a1660b550c968818cb92b446596086e70baaaccd16147d4eb23a6",
            ),
        ];
        for (codec, level, want) in cases {
            let c = Compression::new(codec, Some(level)).unwrap();
            let got = crate::digest::Digest::of(&encode(c, 2, &data, 10000));
            assert_eq!(got.to_string(), want, "{codec} level {level}");
        }
    }

    #[test]
    fn zstd_jobs_are_pinned_and_thread_independent() {
        // Over two job sizes: several zstd jobs, so the job size is part of what is pinned.
        let data = sample(2 * ZSTD_JOB as usize + 4321);
        let c = Compression::new(Codec::Zstd, None).unwrap();
        let one = encode(c, 1, &data, 1 << 20);
        assert!(
            encode(c, 3, &data, 100_000) == one,
            "zstd: threads change the bytes"
        );
        assert_eq!(
            crate::digest::Digest::of(&one).to_string(),
            "sha256:b302883d34f0ec64b00730746e2212734c15015dbe7791aceee3ad7b6967959c"
        );
    }

    /// A sink that fails like a full disk after `room` bytes.
    struct Full {
        room: usize,
    }
    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_sink_ends_the_encoder_and_every_later_call() {
        // Every call after the first error must return (no wait for a block that was lost),
        // including the writes a BufWriter makes when it is dropped.
        for codec in [Codec::Gzip, Codec::Zstd] {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let c = Compression::new(codec, None).unwrap();
                let data = sample(40 * GZIP_BLOCK);
                let e = Encoder::new(Full { room: 100_000 }, c, 2).unwrap();
                let mut e = io::BufWriter::with_capacity(1 << 20, e);
                let first = data
                    .chunks(8192)
                    .find_map(|p| e.write_all(p).err())
                    .or_else(|| e.flush().err());
                // zstd may hold all of this input in its first job: then the error comes
                // from `finish`, and there is no later call to check.
                let again = first.as_ref().map(|_| {
                    e.write_all(&data[..GZIP_BLOCK * 3])
                        .and_then(|()| e.flush())
                });
                let finished = e
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|e| e.finish());
                let first = first.or(finished.as_ref().err().map(|e| io::Error::from(e.kind())));
                let _ = tx.send((
                    first.map(|e| e.kind()),
                    again.is_none_or(|r| r.is_err()),
                    finished.is_err(),
                ));
            });
            let (first, again, finished) = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{codec}: the encoder hangs after a write error"));
            assert_eq!(first, Some(io::ErrorKind::StorageFull), "{codec}");
            assert!(again && finished, "{codec}: a later call succeeded");
        }
    }

    #[test]
    fn levels_are_checked() {
        let cases = [
            (Codec::Gzip, Some(9), true),
            (Codec::Gzip, Some(0), true),
            (Codec::Gzip, Some(10), false),
            (Codec::Zstd, Some(19), true),
            (Codec::Zstd, Some(0), false),
            (Codec::Zstd, Some(22), false),
            (Codec::Zstd, None, true),
        ];
        for (codec, level, ok) in cases {
            assert_eq!(
                Compression::new(codec, level).is_ok(),
                ok,
                "{codec} {level:?}"
            );
        }
        assert_eq!("zstd".parse::<Codec>(), Ok(Codec::Zstd));
        assert!("xz".parse::<Codec>().is_err());
    }
}
