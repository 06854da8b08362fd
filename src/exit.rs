//! The documented process exit codes, so CI can retry on 5 and not on 2-4 or 6.
//!
//! A leaf module: every stage's error says its own code from here without depending on the
//! top-level [`crate::error::Error`] that wraps it.

/// Process exit codes (README "Exit codes"). Stable: scripts depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Ok = 0,
    /// A bug or an unexpected local I/O failure.
    Internal = 1,
    /// Bad command line, bad build spec, bad repository or tag.
    Usage = 2,
    /// An input artifact is missing, unreadable, or for the wrong architecture.
    Input = 3,
    /// The registry refused our credentials, or none could be found.
    Auth = 4,
    /// The registry or network still failed after retries.
    Registry = 5,
    /// The registry's TLS certificate is not trusted (unknown CA), not valid for the name
    /// used, or expired: no retry can fix it, so it is not 5.
    Trust = 6,
}
