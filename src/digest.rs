//! Content digests (`sha256:<hex>`) and the streaming hashers that compute them.
//!
//! Every blob is hashed while it is written or read (OCI image spec, descriptor.md
//! "Digests"): [`HashingWriter`] hashes bytes on their way to a sink, so no blob is ever read
//! a second time just to learn its digest.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

/// A `sha256:<64 lowercase hex>` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// Why a string is not a digest we accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
pub struct DigestParseError(pub String);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Always `sha256`: the only algorithm we write (image-spec descriptor.md: sha256 is the
    /// one every implementation must support).
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .filter(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
            .ok_or_else(|| DigestParseError(s.to_string()))?;
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A writer that hashes and counts every byte it passes on to `inner`.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// The inner writer, the digest and the byte count of everything written.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.size)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Incremental hasher for streams that are not `Write` (e.g. an upload body).
#[derive(Debug, Default, Clone)]
pub struct StreamHasher {
    hasher: Sha256,
    size: u64,
}

impl StreamHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.size)
    }
}

/// A source file's content digests, both from the one read of the file: sha256 (the layer
/// cache's key, provenance) and SHA-1, the one checksum SPDX 2.3 requires of every file
/// (clause 8.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSums {
    pub sha256: Digest,
    /// 40 lowercase hex digits.
    pub sha1: String,
}

impl FileSums {
    /// The sums of `bytes` (tests, small inputs).
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = FileHasher::default();
        h.update(bytes);
        h.finish()
    }
}

/// Computes [`FileSums`] over a stream (`Write` discards what it hashes).
#[derive(Debug, Default, Clone)]
pub struct FileHasher {
    sha256: Sha256,
    sha1: sha1::Sha1,
}

impl FileHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        sha1::Digest::update(&mut self.sha1, bytes);
    }
    pub fn finish(self) -> FileSums {
        FileSums {
            sha256: Digest::from_hasher(self.sha256),
            sha1: hex::encode(sha1::Digest::finalize(self.sha1)),
        }
    }
}

impl Write for FileHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Each source file's sums as a build's tar pass read them, by source path and size: what
/// the SBOM and provenance use when there is no layer cache (`--no-cache`) to keep them, so
/// that each input is still read once. Shared by the layer threads of one run.
#[derive(Debug, Clone, Default)]
pub struct FileSumsMemo(
    std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<(std::path::PathBuf, u64), FileSums>>,
    >,
);

impl FileSumsMemo {
    pub fn insert(&self, src: &std::path::Path, size: u64, sums: FileSums) {
        self.lock().insert((src.to_path_buf(), size), sums);
    }

    pub fn get(&self, src: &std::path::Path, size: u64) -> Option<FileSums> {
        self.lock().get(&(src.to_path_buf(), size)).cloned()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(std::path::PathBuf, u64), FileSums>>
    {
        // Single inserts: a panic elsewhere cannot leave the map half-updated.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        // sha256 of the empty string and of "abc" (FIPS 180-2 test vectors).
        let cases: &[(&[u8], &str)] = &[
            (
                b"",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                b"abc",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
        ];
        for (input, hex) in cases {
            assert_eq!(Digest::of(input).hex(), *hex);
            let mut w = HashingWriter::new(Vec::new());
            w.write_all(input).unwrap();
            let (out, d, n) = w.finish();
            assert_eq!(
                (out.as_slice(), d.hex(), n),
                (*input, *hex, input.len() as u64)
            );
        }
    }

    #[test]
    fn parse() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(ok.parse::<Digest>().unwrap().to_string(), ok);
        for bad in [
            "sha256:abc",
            "sha512:aa",
            &format!("sha256:{}", "A".repeat(64)),
            "",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }
}
