use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::config::Shared;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) retries: AtomicU64,
    pub(crate) exhausted: AtomicU64,
    pub(crate) not_retryable: AtomicU64,
    pub(crate) budget_exhausted: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of a retry layer, as of one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetryStats {
    /// Retries made.
    pub retries: u64,
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
