use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::retry::budget::Budget;
use watchtower::Error;
use watchtower::backoff::{Backoff, Jitter};

use crate::metrics::RetryMetrics;

/// What a retry hook is told before each retry.
#[derive(Debug)]
pub struct RetryAttempt<'a> {
    /// The attempt about to be made (2 for the first retry).
    pub attempt: u32,
    /// How long the layer waits before it.
    pub delay: Duration,
    /// The failure that caused it.
    pub error: &'a Error,
}

pub(crate) type RetryIf = Arc<dyn Fn(&Error) -> bool + Send + Sync>;
pub(crate) type OnRetry = Arc<dyn Fn(&RetryAttempt<'_>) + Send + Sync>;
pub(crate) type SharedBudget = Arc<dyn Budget + Send + Sync>;

/// When and how often [`Retry`](super::Retry) tries again.
///
/// ```
/// use std::time::Duration;
/// use watchtower_layers::retry::{Jitter, RetryConfig};
///
/// let config = RetryConfig::new()
///     .max_attempts(5)
///     .delays(Duration::from_millis(50), Duration::from_secs(5))
///     .max_elapsed(Duration::from_secs(20))
///     .jitter(Jitter::Full)
///     .seed(42);
/// assert_eq!(config.delay_before(2, &mut config.rng()), Duration::from_millis(50));
/// ```
#[derive(Clone)]
pub struct RetryConfig {
    pub(crate) name: Arc<str>,
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_elapsed: Option<Duration>,
    pub(crate) max_retry_after: Duration,
    pub(crate) seed: Option<u64>,
    pub(crate) budget: Option<SharedBudget>,
    pub(crate) retry_if: Option<RetryIf>,
    pub(crate) on_retry: Option<OnRetry>,
}

impl RetryConfig {
    /// The defaults, listed with each setter.
    pub fn new() -> Self {
        RetryConfig {
            name: Arc::from(""),
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).jitter(Jitter::Full),
            max_elapsed: Some(Duration::from_secs(30)),
            max_retry_after: Duration::from_secs(60),
            seed: None,
            budget: None,
            retry_if: None,
            on_retry: None,
        }
    }

    /// The `name` label of the layer's [metrics](crate::metrics).
    /// Default: empty, labelled `default`.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Attempts in all, the first included (at least 1). Default: 3, which
    /// rides out a blip without tripling an outage's load for long.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The first retry's delay and the cap on any computed delay.
    /// Default: 100 ms and 10 s.
    pub fn delays(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = self.backoff.delays(min, max);
        self
    }

    /// The factor each further retry's delay grows by (at least 1).
    /// Default: 2.
    pub fn multiplier(mut self, m: f64) -> Self {
        self.backoff = self
            .backoff
            .multiplier(if m.is_finite() { m.max(1.0) } else { 2.0 });
        self
    }

    /// Gives up when the next wait would end later than this after the
    /// first failure; `None` for no limit. Default: 30 s, so that a caller
    /// hears back within a bounded time.
    pub fn max_elapsed(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.max_elapsed = limit.into();
        self
    }

    /// The longest wait a [`retry_after`](watchtower::Error::retry_after)
    /// hint can ask for; a longer hint (a `Retry-After` header from an
    /// untrusted server, a breaker with a long open wait) is cut to this.
    /// A hint still never takes a retry past
    /// [`max_elapsed`](Self::max_elapsed): if the wait would end after it,
    /// the layer gives up at once with the last error instead of
    /// sleeping. Default: 60 s, the longest a caller should wait on one
    /// hint before trying again.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// How delays are spread. Default: [`Jitter::Full`].
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.backoff = self.backoff.jitter(jitter);
        self
    }

    /// Seeds the jitter, for reproducible schedules in tests. Default: a
    /// random seed per layer.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Limits retries to a share of calls, so that retries cannot multiply
    /// load during an outage; e.g. tower's
    /// [`TpsBudget`](tower::retry::budget::TpsBudget). Default: none.
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.budget = Some(Arc::new(budget));
        self
    }

    /// Which errors are retried. Default:
    /// [`Error::is_retryable`](watchtower::Error::is_retryable), which
    /// follows the error's kind.
    pub fn retry_if(mut self, f: impl Fn(&Error) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Some(Arc::new(f));
        self
    }

    /// Called before each retry (for logs and metrics).
    pub fn on_retry(mut self, f: impl Fn(&RetryAttempt<'_>) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Arc::new(f));
        self
    }

    /// The random source the layer draws jitter from: seeded by
    /// [`seed`](Self::seed) if set.
    pub fn rng(&self) -> SmallRng {
        SmallRng::seed_from_u64(self.seed.unwrap_or_else(|| RandomState::new().hash_one(0u8)))
    }

    /// The delay before attempt `attempt` (2 for the first retry), before
    /// any retry-after hint: `min · multiplier^(attempt-2)` capped at the
    /// maximum, then jittered (in whole milliseconds).
    pub fn delay_before(&self, attempt: u32, rng: &mut SmallRng) -> Duration {
        self.backoff.delay_with(attempt.saturating_sub(1), rng.random())
    }

    /// The backoff the delays follow.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    pub(crate) fn is_retryable(&self, err: &Error) -> bool {
        match &self.retry_if {
            Some(f) => f(err),
            None => err.is_retryable(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig::new()
    }
}

impl fmt::Debug for RetryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryConfig")
            .field("name", &self.name)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("max_elapsed", &self.max_elapsed)
            .field("max_retry_after", &self.max_retry_after)
            .field("seed", &self.seed)
            .field("budget", &self.budget.is_some())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub(crate) config: RetryConfig,
    pub(crate) rng: Mutex<SmallRng>,
    pub(crate) stats: super::stats::Counters,
    pub(crate) metrics: RetryMetrics,
}

impl Shared {
    pub(crate) fn new(config: RetryConfig) -> Arc<Shared> {
        Arc::new(Shared {
            metrics: RetryMetrics::new(&config.name),
            rng: Mutex::new(config.rng()),
            config,
            stats: Default::default(),
        })
    }

    pub(crate) fn delay_before(&self, attempt: u32) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.config.delay_before(attempt, &mut rng)
    }
}
