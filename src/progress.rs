//! Progress is an observer: the pipeline emits [`Event`]s and a renderer decides how to show
//! them (indicatif bars on a TTY, one plain line per event in CI, nothing with `--quiet`).
//! Everything goes to stderr; stdout carries only the result (`REPO@DIGEST`).

use crate::digest::Digest;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// Something that happened in the pipeline.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A layer was built (or taken as is) for the platforms named.
    LayerBuilt {
        digest: &'a Digest,
        size: u64,
        what: &'a str,
    },
    /// The first `written` compressed bytes of a layer blob still being written are in its
    /// temporary file `temp`, flushed to the OS (a file opened by another descriptor reads
    /// them): an observer may upload them while the rest is compressed ([`crate::overlap`]).
    /// `id` tells concurrent writes apart. Sent every MiB or so; not shown.
    LayerBytes {
        id: u64,
        temp: &'a Path,
        written: u64,
    },
    /// The write `id` that sent [`Event::LayerBytes`] ended: its blob is complete and renamed
    /// to its digest (`size` bytes), or (None) writing it failed. Not shown.
    LayerBytesEnd {
        id: u64,
        blob: Option<(&'a Digest, u64)>,
    },
    /// A warning the user should read (e.g. a dynamically linked ELF on scratch).
    Warning(&'a str),
    /// An upload of `size` bytes starts.
    BlobStart { digest: &'a Digest, size: u64 },
    /// `n` more bytes of that blob were sent.
    BlobProgress { digest: &'a Digest, n: u64 },
    /// The registry already had the blob (HEAD answered 200), or it was mounted.
    BlobSkipped {
        digest: &'a Digest,
        size: u64,
        reason: &'a str,
    },
    /// The blob is uploaded and confirmed.
    BlobDone { digest: &'a Digest },
    /// A manifest or index was stored under `reference` (a digest or a tag).
    ManifestPushed {
        reference: &'a str,
        digest: &'a Digest,
    },
    /// A request is being retried after a transient failure.
    Retry {
        what: &'a str,
        /// This retry's number (1-based) ...
        attempt: u32,
        /// ... of at most this many (`--retries`).
        retries: u32,
        /// The wait before it.
        delay: std::time::Duration,
        reason: &'a str,
    },
    /// Free-form detail for `-v`.
    Debug(&'a str),
}

/// Receives pipeline events; must be cheap and never fail.
pub trait Progress: Send + Sync {
    fn event(&self, event: Event<'_>);
}

/// How much to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// Shows nothing (for `--quiet` and library users).
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn event(&self, event: Event<'_>) {
        // Warnings still matter when quiet: they say an image will not start.
        if let Event::Warning(w) = event {
            eprintln!("warning: {w}");
        }
    }
}

/// One line per event on stderr: what CI logs want.
#[derive(Debug)]
pub struct Lines {
    verbosity: Verbosity,
}

impl Lines {
    pub fn new(verbosity: Verbosity) -> Self {
        Lines { verbosity }
    }
}

fn short(d: &Digest) -> &str {
    &d.hex()[..12]
}

impl Progress for Lines {
    fn event(&self, event: Event<'_>) {
        let verbose = self.verbosity == Verbosity::Verbose;
        let line = match event {
            Event::LayerBuilt { digest, size, what } => {
                format!("layer {} {} ({})", short(digest), human(size), what)
            }
            Event::LayerBytes { .. } | Event::LayerBytesEnd { .. } => return,
            Event::Warning(w) => format!("warning: {w}"),
            Event::BlobStart { digest, size } => {
                format!("uploading {} ({})", short(digest), human(size))
            }
            Event::BlobProgress { .. } => return,
            Event::BlobSkipped { digest, reason, .. } => {
                format!("skipped {} ({reason})", short(digest))
            }
            Event::BlobDone { digest } => format!("uploaded {}", short(digest)),
            Event::ManifestPushed { reference, digest } => manifest_line(reference, digest),
            Event::Retry {
                what,
                attempt,
                retries,
                delay,
                reason,
            } => format!(
                "retry {attempt} of {retries} in {:.1} s: {what}: {reason}",
                delay.as_secs_f64()
            ),
            Event::Debug(d) if verbose => d.to_string(),
            Event::Debug(_) => return,
        };
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// indicatif bars, one per uploading blob, when stderr is a terminal.
#[derive(Debug)]
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
    lines: Lines,
}

impl Bars {
    pub fn new(verbosity: Verbosity) -> Self {
        Bars {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
            lines: Lines::new(verbosity),
        }
    }
}

impl Progress for Bars {
    fn event(&self, event: Event<'_>) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::BlobStart { digest, size } => {
                let bar = self.multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(short(digest).to_string());
                bars.insert(digest.clone(), bar);
            }
            Event::BlobProgress { digest, n } => {
                if let Some(bar) = bars.get(digest) {
                    bar.inc(n);
                }
            }
            Event::BlobDone { digest } => {
                if let Some(bar) = bars.remove(digest) {
                    bar.finish();
                }
            }
            // Frequent and never shown: not worth suspending the bars for.
            Event::LayerBytes { .. } | Event::LayerBytesEnd { .. } => {}
            other => {
                self.multi.suspend(|| self.lines.event(other));
            }
        }
    }
}

/// A manifest stored by its digest is "pushed DIGEST"; a tag is "tagged TAG -> DIGEST".
fn manifest_line(reference: &str, digest: &Digest) -> String {
    if reference == digest.to_string() {
        format!("pushed {digest}")
    } else {
        format!("tagged {reference} -> {digest}")
    }
}

/// `1.5 MiB`-style sizes for log lines.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
