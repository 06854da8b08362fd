//! The retry policy: which failures are worth another attempt, how long to wait, and when to
//! give up (README "When the registry or the network misbehaves").
//!
//! - Retried: no answer at all (connection refused or reset, EOF in the middle of a body), a
//!   stall (nothing sent or received for `--timeout`), HTTP 408, 429 and 5xx, and a blob the
//!   registry acknowledged but then does not have ([`RegistryError::BlobMissing`]). Everything
//!   else (400, 404, 401 after the one re-authentication, 403, TLS, a wrong digest) fails at
//!   once: trying again cannot change the answer.
//! - Wait: exponential backoff `base * 2^(n-1)`, capped at [`MAX_BACKOFF`], with "equal jitter"
//!   (half fixed, half random) so that parallel uploads that failed together do not come back
//!   together; or what `Retry-After` asked for (RFC 9110 section 10.2.3: seconds or an HTTP
//!   date), capped at [`MAX_RETRY_AFTER`].
//! - Give up: after `retries` retries (`--retries`, default 5), or when the wait would end past
//!   the deadline (`--deadline`, default 600 s from the start of the push). The deadline never
//!   cuts an attempt that is making progress (a long upload of a big layer): it only stops
//!   starting new ones, so a permanent failure ends within the deadline plus one `--timeout`.
//!
//! An operation is re-run from its start: for a blob that means a fresh HEAD, a new POST
//! session and the file reopened for the PUT (distribution-spec spec.md: an upload session
//! that failed may be abandoned and a new one started; a stream cannot be replayed).

use super::RegistryError;
use crate::progress::{Event, Progress};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Retries after the first attempt unless `--retries` says otherwise.
pub const DEFAULT_RETRIES: u32 = 5;
/// First backoff step.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(500);
/// No retry starts later than this after the push began, unless `--deadline` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
/// Longest backoff step (before jitter).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait a `Retry-After` can impose; a registry asking for more is treated as down.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// How often and how long to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt of each operation (0 = try once).
    pub retries: u32,
    /// First backoff step; doubled for each further retry.
    pub base_delay: Duration,
    /// No retry starts (and no wait ends) later than this after the push began.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: DEFAULT_RETRIES,
            base_delay: DEFAULT_BASE_DELAY,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// A [`RetryPolicy`] started at a point in time: the deadline is absolute.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retrier {
    policy: RetryPolicy,
    until: Instant,
}

impl Retrier {
    /// Start the clock now.
    pub(crate) fn start(policy: RetryPolicy) -> Self {
        Retrier {
            policy,
            until: Instant::now() + policy.deadline,
        }
    }

    /// Run `op` until it succeeds, fails for good, runs out of retries, or the next wait would
    /// end past the deadline. Each retry is announced as [`Event::Retry`].
    pub(crate) async fn run<T, F, Fut>(
        &self,
        what: &str,
        progress: &dyn Progress,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if attempt <= self.policy.retries => {
                    let Some(delay) = e.retry_delay(attempt, self.policy.base_delay) else {
                        return Err(e);
                    };
                    if Instant::now() + delay > self.until {
                        progress.event(Event::Debug(&format!(
                            "not retrying {what}: the --deadline of {} s would pass",
                            self.policy.deadline.as_secs()
                        )));
                        return Err(e);
                    }
                    progress.event(Event::Retry {
                        what,
                        attempt,
                        retries: self.policy.retries,
                        delay,
                        reason: &e.to_string(),
                    });
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

/// `base * 2^(attempt-1)`, capped, with equal jitter: a random point in the upper half.
fn backoff(attempt: u32, base: Duration) -> Duration {
    let exp = base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)))
        .min(MAX_BACKOFF);
    let half = exp / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random() % nanos.saturating_add(1))
}

/// A random number from std's per-process hash keys (no extra dependency; backoff jitter
/// needs spread, not cryptographic quality).
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Parse a `Retry-After` value (RFC 9110 section 10.2.3): delay-seconds, or an HTTP-date
/// (IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`) turned into the time left from `now`
/// (zero if it is past). `None` for anything else.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` -> the instant (RFC 9110 section 5.6.7). Only the
/// preferred format: it is the one senders must generate.
fn parse_imf_fixdate(s: &str) -> Option<SystemTime> {
    let rest = s.split_once(", ")?.1;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as u64
        + 1;
    let year: u64 = year.parse().ok().filter(|y| (1970..=9999).contains(y))?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    // Days since 1970-01-01 of a civil date (Howard Hinnant's days_from_civil).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = days * 86_400 + h * 3600 + m * 60 + sec;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

impl RegistryError {
    /// How long to wait before trying again after this error on attempt `attempt` (1-based)
    /// with backoff steps starting at `base`, or `None` when trying again cannot help.
    pub(crate) fn retry_delay(&self, attempt: u32, base: Duration) -> Option<Duration> {
        match self {
            RegistryError::Unreachable { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::BlobMissing { .. } => Some(backoff(attempt, base)),
            // A manifest is sent only after every blob it names was confirmed (HEAD), so a
            // registry calling one unknown is in a race, not a verdict: docker distribution
            // rewrites a repository's blob link file in place when another client commits
            // the same blob, and a manifest check that reads it meanwhile fails (seen with
            // concurrent pushes of one image to one repository).
            RegistryError::Protocol {
                status: 400,
                body_snippet,
                ..
            } if body_snippet.contains("MANIFEST_BLOB_UNKNOWN") => Some(backoff(attempt, base)),
            RegistryError::Protocol {
                status,
                retry_after,
                ..
            } if *status == 408 || *status == 429 || (500..600).contains(status) => {
                match retry_after {
                    Some(wait) if *wait > MAX_RETRY_AFTER => None,
                    Some(wait) => Some(*wait),
                    None => Some(backoff(attempt, base)),
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn protocol(status: u16, retry_after: Option<u64>) -> RegistryError {
        RegistryError::Protocol {
            url: "u".into(),
            status,
            body_snippet: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn which_errors_are_retried_and_how_long_to_wait() {
        let base = Duration::from_millis(100);
        // (error, attempt, shortest and longest acceptable wait; None = not retried)
        type Case = (RegistryError, u32, Option<(Duration, Duration)>);
        let cases: Vec<Case> = vec![
            (protocol(500, None), 1, Some((50 * MS, 100 * MS))),
            (protocol(502, None), 2, Some((100 * MS, 200 * MS))),
            (protocol(504, None), 3, Some((200 * MS, 400 * MS))),
            (protocol(503, Some(2)), 1, Some((2000 * MS, 2000 * MS))),
            (
                protocol(429, Some(0)),
                4,
                Some((Duration::ZERO, Duration::ZERO)),
            ),
            (protocol(429, None), 1, Some((50 * MS, 100 * MS))),
            (protocol(408, None), 1, Some((50 * MS, 100 * MS))),
            // A registry asking for minutes is down: give up (exit 5) rather than hang.
            (protocol(503, Some(3600)), 1, None),
            (protocol(400, None), 1, None),
            (
                RegistryError::Protocol {
                    url: "u".into(),
                    status: 400,
                    body_snippet: "MANIFEST_BLOB_UNKNOWN: blob unknown to registry".into(),
                    retry_after: None,
                },
                1,
                Some((50 * MS, 100 * MS)),
            ),
            (protocol(404, None), 1, None),
            (protocol(200, None), 1, None),
            // Capped at 30 s however many attempts.
            (protocol(500, None), 30, Some((15_000 * MS, 30_000 * MS))),
            (
                RegistryError::Timeout {
                    url: "u".into(),
                    secs: 1,
                },
                1,
                Some((50 * MS, 100 * MS)),
            ),
            (
                RegistryError::BlobMissing {
                    url: "u".into(),
                    digest: crate::digest::Digest::of(b""),
                },
                1,
                Some((50 * MS, 100 * MS)),
            ),
            (
                RegistryError::Unauthorized {
                    registry: "r".into(),
                    tried: "t".into(),
                    status: 401,
                },
                1,
                None,
            ),
            (
                RegistryError::DigestMismatch {
                    url: "u".into(),
                    expected: crate::digest::Digest::of(b""),
                    got: "x".into(),
                },
                1,
                None,
            ),
        ];
        for (e, attempt, want) in cases {
            // Jitter is random: sample it.
            for _ in 0..50 {
                let got = e.retry_delay(attempt, base);
                match (got, want) {
                    (None, None) => {}
                    (Some(d), Some((lo, hi))) => {
                        assert!(lo <= d && d <= hi, "{e} attempt {attempt}: {d:?}")
                    }
                    _ => panic!("{e} attempt {attempt}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn jitter_spreads_the_waits() {
        let waits: std::collections::HashSet<Duration> = (0..20)
            .map(|_| backoff(3, Duration::from_millis(100)))
            .collect();
        assert!(waits.len() > 5, "{waits:?}");
    }

    #[test]
    fn retry_after_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            (" 7 ", Some(7)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(0)),
            ("Sun, 06 Nov 1994 08:49:47 GMT", Some(10)),
            ("Mon, 07 Nov 1994 08:49:37 GMT", Some(86_400)),
            // In the past: no wait.
            ("Sat, 05 Nov 1994 08:49:37 GMT", Some(0)),
            (
                "Thu, 29 Feb 2024 00:00:00 GMT",
                Some(1_709_164_800 - 784_111_777),
            ),
            ("Sun, 06 Nov 1994 08:49:37 UTC", None),
            ("Sunday, 06-Nov-94 08:49:37 GMT", None),
            ("Sun, 32 Nov 1994 08:49:37 GMT", None),
            ("Sun, 06 Foo 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 24:49:37 GMT", None),
            ("-1", None),
            ("soon", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(
                parse_retry_after(value, now),
                want.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    fn policy(retries: u32, deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            retries,
            base_delay: Duration::from_millis(1),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    #[tokio::test]
    async fn attempts_are_bounded_by_retries_and_deadline() {
        // (policy, failures before success (u32::MAX = always), error status, calls, ok?)
        let cases = [
            (policy(5, 60_000), u32::MAX, 503, 6, false),
            (policy(0, 60_000), u32::MAX, 503, 1, false),
            (policy(5, 60_000), 1, 500, 2, true),
            (policy(5, 60_000), 5, 502, 6, true),
            (policy(5, 60_000), u32::MAX, 400, 1, false),
            // The deadline has (almost) passed: the first wait would cross it.
            (policy(5, 0), u32::MAX, 503, 1, false),
        ];
        for (policy, failures, status, want_calls, want_ok) in cases {
            let calls = AtomicU32::new(0);
            let result = Retrier::start(policy)
                .run("x", &Silent, || async {
                    if calls.fetch_add(1, Ordering::SeqCst) < failures {
                        Err(protocol(status, None))
                    } else {
                        Ok(7)
                    }
                })
                .await;
            assert_eq!(result.is_ok(), want_ok, "{policy:?} {status}");
            assert_eq!(
                calls.load(Ordering::SeqCst),
                want_calls,
                "{policy:?} {status}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_stops_a_long_retry_after() {
        // Retry-After 10 s with 15 s left: waits once; then 5 s are left and it gives up.
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = Retrier::start(RetryPolicy {
            retries: 10,
            base_delay: Duration::from_millis(1),
            deadline: Duration::from_secs(15),
        })
        .run("x", &Silent, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(protocol(429, Some(10)))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() <= Duration::from_secs(15));
    }
}
