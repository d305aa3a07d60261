use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::config::Shared;
use crate::metrics::RetryMetrics;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) retries: AtomicU64,
    pub(crate) succeeded_after_retry: AtomicU64,
    pub(crate) exhausted: AtomicU64,
    pub(crate) not_retryable: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
}

/// How a call that failed at least once ended, or that it goes on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    Retry,
    SucceededAfterRetry,
    Exhausted,
    NotRetryable,
    BudgetExhausted,
}

impl Shared {
    /// Counts `what`, in the handle's counters and the metrics alike.
    pub(crate) fn count(&self, what: Count) {
        let (counter, metric): (&AtomicU64, fn(&RetryMetrics)) = match what {
            Count::Retry => (&self.stats.retries, RetryMetrics::retry),
            Count::SucceededAfterRetry => (
                &self.stats.succeeded_after_retry,
                RetryMetrics::succeeded_after_retry,
            ),
            Count::Exhausted => (&self.stats.exhausted, RetryMetrics::exhausted),
            Count::NotRetryable => (&self.stats.not_retryable, RetryMetrics::not_retryable),
            Count::BudgetExhausted => (&self.stats.budget_exhausted, RetryMetrics::budget_exhausted),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metric(&self.metrics);
    }
}

/// Counters of a retry layer, as of one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryStats {
    /// Retries made.
    pub retries: u64,
    /// Calls that succeeded on a retry.
    pub succeeded_after_retry: u64,
    /// Calls that failed after their last allowed attempt or time.
    pub exhausted: u64,
    /// Calls that failed with an error no retry can help.
    pub not_retryable: u64,
    /// Retries skipped because the budget was spent.
    pub budget_exhausted: u64,
}

/// A cloneable handle on a retry layer's counters.
#[derive(Clone)]
pub struct RetryHandle {
    pub(crate) shared: Arc<Shared>,
}

impl RetryHandle {
    /// The counters now.
    pub fn stats(&self) -> RetryStats {
        let c = &self.shared.stats;
        RetryStats {
            retries: c.retries.load(Ordering::Relaxed),
            succeeded_after_retry: c.succeeded_after_retry.load(Ordering::Relaxed),
            exhausted: c.exhausted.load(Ordering::Relaxed),
            not_retryable: c.not_retryable.load(Ordering::Relaxed),
            budget_exhausted: c.budget_exhausted.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for RetryHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RetryHandle").field(&self.stats()).finish()
    }
}
