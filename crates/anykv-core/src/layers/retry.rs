//! Retry with exponential backoff.
//!
//! An operation is tried again when it is idempotent and its error
//! retryable (`Unavailable`, `Timeout`), or when the error proves the request
//! never reached the server ([`Error::never_reached_server`](crate::Error::never_reached_server)),
//! writes included: a write that timed out may have been applied. `lock`
//! (bounded by its own wait) and `close` are never retried.

use std::time::Duration;

use async_trait::async_trait;

use crate::{
    error::{Error, Result},
    layer::{Inner, Layer, Next, Standard},
    layers::request::{Request, Response},
};

/// Retry with exponential backoff, for idempotent operations and retryable errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1: no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound of one delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        exp.min(self.max_backoff)
    }

    /// Whether attempt `attempt` failing with `e` is tried again.
    pub(crate) fn should_retry(&self, e: &Error, idempotent: bool, attempt: u32) -> bool {
        (e.never_reached_server() || idempotent && e.is_retryable()) && attempt < self.max_attempts
    }
}

/// The standard retry layer; its policy is the handle's
/// [`LayerConfig::retry`](crate::LayerConfig::retry).
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryLayer;

#[async_trait]
impl Layer for RetryLayer {
    async fn call(&self, req: Request, next: Next<'_>) -> Result<Response> {
        self.around(req, next).await
    }
}

impl Standard for RetryLayer {
    async fn around<N: Inner>(&self, req: Request, next: N) -> Result<Response> {
        let policy = &next.context().config().retry;
        if matches!(req, Request::Lock { .. } | Request::Close) || policy.max_attempts <= 1 {
            return next.run(req).await;
        }
        let idempotent = req.is_idempotent();
        let mut attempt = 1;
        loop {
            match next.run(req.clone()).await {
                Err(e) if policy.should_retry(&e, idempotent, attempt) => {
                    tracing::debug!(attempt, error = %e, "retrying");
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(50));
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(30), Duration::from_secs(1));
    }
}
