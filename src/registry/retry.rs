//! The retry policy, in one place so it can grow (a fuller policy is a later issue).
//!
//! Today: up to 3 attempts of an operation when it failed transiently (connection errors,
//! stalls, HTTP 408/429/5xx — see [`RegistryError::retry_delay`]), waiting 0.5 s then 1 s, or
//! what `Retry-After` asked for (seconds form, capped at 30 s). The operation is re-run from its
//! start: for a blob that means a fresh HEAD, POST and PUT (distribution-spec spec.md: an
//! upload session that failed may be abandoned and a new one started).

use super::RegistryError;
use crate::progress::{Event, Progress};
use std::future::Future;
use std::time::Duration;

pub(crate) const ATTEMPTS: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Run `op` until it succeeds, fails for good, or has been tried [`ATTEMPTS`] times.
pub(crate) async fn with_retries<T, F, Fut>(
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
            Err(e) if attempt < ATTEMPTS => {
                let Some(delay) = e.retry_delay(attempt) else {
                    return Err(e);
                };
                progress.event(Event::Retry {
                    what,
                    attempt,
                    reason: &e.to_string(),
                });
                tokio::time::sleep(delay.min(MAX_RETRY_AFTER)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

impl RegistryError {
    /// How long to wait before trying again after this error on attempt `attempt` (1-based),
    /// or `None` when trying again cannot help.
    pub(crate) fn retry_delay(&self, attempt: u32) -> Option<Duration> {
        let backoff = Duration::from_millis(500) * 2u32.saturating_pow(attempt.saturating_sub(1));
        match self {
            RegistryError::Unreachable { .. } | RegistryError::Timeout { .. } => Some(backoff),
            RegistryError::Protocol {
                status,
                retry_after,
                ..
            } if *status == 408 || *status == 429 || (500..600).contains(status) => {
                Some(retry_after.unwrap_or(backoff))
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

    #[test]
    fn which_errors_are_retried() {
        let cases = [
            (protocol(500, None), Some(Duration::from_millis(500))),
            (protocol(503, Some(2)), Some(Duration::from_secs(2))),
            (protocol(429, None), Some(Duration::from_millis(500))),
            (protocol(400, None), None),
            (protocol(404, None), None),
            (
                RegistryError::Timeout {
                    url: "u".into(),
                    secs: 1,
                },
                Some(Duration::from_millis(500)),
            ),
            (
                RegistryError::Unauthorized {
                    registry: "r".into(),
                    tried: "t".into(),
                    status: 401,
                },
                None,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.retry_delay(1), want, "{e}");
        }
        assert_eq!(
            protocol(502, None).retry_delay(2),
            Some(Duration::from_secs(1))
        );
    }

    #[tokio::test]
    async fn gives_up_after_three_attempts() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retries("x", &Silent, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(protocol(503, None))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);

        let calls = AtomicU32::new(0);
        let result = with_retries("x", &Silent, || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(protocol(500, None)),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(result.expect("second attempt succeeds"), 7);

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retries("x", &Silent, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(protocol(400, None))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
