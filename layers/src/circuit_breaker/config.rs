//! Circuit breaker configuration: a builder whose defaults each say why.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use watchtower::{Error, ErrorKind};

use super::State;

/// Which calls the failure and slow-call rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// Exactly the last `n` calls (a true rolling window: each new call
    /// pushes the oldest one out).
    Count(usize),
    /// The calls of the last `size`, kept in `buckets` buckets of
    /// `size / buckets` each; a whole bucket expires at a time.
    Time {
        /// How far back the window reaches.
        size: Duration,
        /// Into how many buckets it is split (resolution of expiry).
        buckets: u32,
    },
}

impl SlidingWindow {
    /// The last `n` calls (at least 1).
    pub fn count(n: usize) -> Self {
        SlidingWindow::Count(n.max(1))
    }

    /// The last `size`, one bucket per second (at least one bucket).
    pub fn time(size: Duration) -> Self {
        let buckets = u32::try_from(size.as_secs()).unwrap_or(u32::MAX).max(1);
        SlidingWindow::Time { size, buckets }
    }
}

/// A state transition, passed to the [`on_state_change`] hook.
///
/// [`on_state_change`]: CircuitBreakerConfig::on_state_change
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
}

pub(crate) type Classifier = Arc<dyn Fn(&Error) -> Verdict + Send + Sync>;
pub(crate) type StateHook = Arc<dyn Fn(StateChange) + Send + Sync>;
pub(crate) type RejectHook = Arc<dyn Fn() + Send + Sync>;

/// How the breaker counts an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The service is unwell: counts against it.
    Failure,
    /// The service answered (the error is the caller's): counts as a
    /// success.
    Success,
    /// The call never reached the service (a layer below refused it):
    /// not recorded, and a probe permit is given back.
    Ignore,
}

/// The default classifier.
///
/// * [`Verdict::Failure`]: the service is unwell — `Connection`,
///   `Timeout`, `Throttled`, `Overloaded`, `Handler`, `Closed`, `Gone`,
///   `Other`;
/// * [`Verdict::Ignore`]: a layer below decided without the service —
///   `Dropped` (backpressure), `CircuitOpen` (another breaker),
///   `DeadLettered`;
/// * [`Verdict::Success`]: the caller sent something bad — `Rejected`,
///   `Encode`, `Decode`, `InvalidEvent`, `InvalidTopic`, `Config`.
pub fn default_classifier(err: &Error) -> Verdict {
    match err.kind() {
        ErrorKind::Connection
        | ErrorKind::Timeout
        | ErrorKind::Throttled
        | ErrorKind::Overloaded
        | ErrorKind::Handler
        | ErrorKind::Closed
        | ErrorKind::Gone
        | ErrorKind::Other => Verdict::Failure,
        ErrorKind::Dropped | ErrorKind::CircuitOpen | ErrorKind::DeadLettered => Verdict::Ignore,
        _ => Verdict::Success,
    }
}

/// How a [`CircuitBreaker`](super::CircuitBreaker) decides to open, probe
/// and close.
///
/// ```
/// use std::time::Duration;
/// use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, SlidingWindow};
///
/// let config = CircuitBreakerConfig::new()
///     .sliding_window(SlidingWindow::time(Duration::from_secs(30)))
///     .failure_rate_threshold(25.0)
///     .minimum_calls(10)
///     .slow_call(Duration::from_secs(2), 50.0)
///     .open_wait(Duration::from_secs(5))
///     .open_wait_backoff(2.0, Duration::from_secs(300))
///     .half_open_permits(2);
/// ```
#[derive(Clone)]
pub struct CircuitBreakerConfig {
    pub(crate) name: Arc<str>,
    pub(crate) window: SlidingWindow,
    pub(crate) failure_rate_threshold: f64,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) minimum_calls: u32,
    pub(crate) half_open_permits: u32,
    pub(crate) open_wait: Duration,
    pub(crate) open_wait_multiplier: f64,
    pub(crate) max_open_wait: Duration,
    pub(crate) wait_when_open: bool,
    pub(crate) probe_timeout: Option<Duration>,
    pub(crate) classifier: Classifier,
    pub(crate) on_state_change: Option<StateHook>,
    pub(crate) on_rejected: Option<RejectHook>,
}

impl CircuitBreakerConfig {
    /// The defaults, listed with each setter.
    pub fn new() -> Self {
        CircuitBreakerConfig {
            name: Arc::from(""),
            window: SlidingWindow::Count(100),
            failure_rate_threshold: 50.0,
            slow_call_duration: None,
            slow_call_rate_threshold: 100.0,
            minimum_calls: 20,
            half_open_permits: 3,
            open_wait: Duration::from_secs(30),
            open_wait_multiplier: 1.0,
            max_open_wait: Duration::from_secs(30),
            wait_when_open: false,
            probe_timeout: None,
            classifier: Arc::new(default_classifier),
            on_state_change: None,
            on_rejected: None,
        }
    }

    /// A name shown in the `CircuitOpen` error's message, in health
    /// reports and as the `name` label of its [metrics](crate::metrics).
    /// Default: empty, labelled `default` in metrics.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// The window rates are computed over. Default: the last 100 calls,
    /// enough for a rate to mean something without remembering old news.
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.window = match window {
            SlidingWindow::Count(n) => SlidingWindow::count(n),
            SlidingWindow::Time { size, buckets } => SlidingWindow::Time {
                size,
                buckets: buckets.max(1),
            },
        };
        self
    }

    /// The failure rate, in percent of the window's calls, at or above
    /// which the breaker opens (clamped to 0–100). Default: 50 %.
    pub fn failure_rate_threshold(mut self, percent: f64) -> Self {
        self.failure_rate_threshold = clamp_percent(percent);
        self
    }

    /// Calls that take `duration` or longer are slow; at or above
    /// `rate_percent` slow calls in the window the breaker opens.
    /// Default: off, so that slowness alone trips nothing unless asked.
    pub fn slow_call(mut self, duration: Duration, rate_percent: f64) -> Self {
        self.slow_call_duration = Some(duration);
        self.slow_call_rate_threshold = clamp_percent(rate_percent);
        self
    }

    /// How many calls the window must hold before a rate can open the
    /// breaker (at least 1). Default: 20, so that two failures of the
    /// first three calls do not trip it.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.minimum_calls = n.max(1);
        self
    }

    /// How many probe calls half-open lets through (at least 1); each is
    /// reserved in `poll_ready`. When all have finished, the breaker closes
    /// if their failure rate is below the threshold and opens again
    /// otherwise. Default: 3, a small sample that is not a single fluke.
    pub fn half_open_permits(mut self, n: u32) -> Self {
        self.half_open_permits = n.max(1);
        self
    }

    /// How long the breaker stays open before it lets probes through.
    /// Default: 30 s, long enough for a restarted broker to come back.
    pub fn open_wait(mut self, wait: Duration) -> Self {
        self.open_wait = wait;
        if self.open_wait_multiplier <= 1.0 {
            self.max_open_wait = wait;
        }
        self
    }

    /// Grows the open wait by `multiplier` on each trip in a row (a probe
    /// that fails), up to `max`; a close resets it. Default: no growth.
    pub fn open_wait_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.open_wait_multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            1.0
        };
        self.max_open_wait = max.max(self.open_wait);
        self
    }

    /// How long a half-open probe may take, from the moment its permit is
    /// reserved in `poll_ready`, before it counts as a failed probe. Its
    /// slot is then spent: with the round's other probes it decides
    /// between closed and open (with one permit, the breaker opens again
    /// and probes anew after the open wait), and its outcome, should it
    /// ever finish, is ignored. Without it, a probe that never finishes
    /// would keep the breaker half-open, refusing everyone, for good.
    /// Default: the [`open_wait`](Self::open_wait), so that a hung probe
    /// holds the breaker shut no longer than a failed one does.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = Some(timeout);
        self
    }

    /// When open, make `poll_ready` wait until a probe may go instead of
    /// failing fast with [`ErrorKind::CircuitOpen`]. Default: fail fast, so
    /// callers (and a dead-letter layer above) learn at once.
    pub fn wait_when_open(mut self, wait: bool) -> Self {
        self.wait_when_open = wait;
        self
    }

    /// Decides how each error counts ([`Verdict`]). Successful responses
    /// are never failures, though they may be slow. Default:
    /// [`default_classifier`].
    pub fn classifier(mut self, f: impl Fn(&Error) -> Verdict + Send + Sync + 'static) -> Self {
        self.classifier = Arc::new(f);
        self
    }

    /// Called on every state change, outside the breaker's lock.
    pub fn on_state_change(mut self, f: impl Fn(StateChange) + Send + Sync + 'static) -> Self {
        self.on_state_change = Some(Arc::new(f));
        self
    }

    /// Called each time a call is refused because the breaker is open.
    pub fn on_rejected(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_rejected = Some(Arc::new(f));
        self
    }

    pub(crate) fn open_wait_for(&self, consecutive_trips: u32) -> Duration {
        if self.open_wait_multiplier <= 1.0 || consecutive_trips <= 1 {
            return self.open_wait;
        }
        let exp = i32::try_from(consecutive_trips - 1).unwrap_or(i32::MAX);
        let secs = self.open_wait.as_secs_f64() * self.open_wait_multiplier.powi(exp);
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max_open_wait)
            .min(self.max_open_wait)
    }
}

fn clamp_percent(p: f64) -> f64 {
    if p.is_nan() { 100.0 } else { p.clamp(0.0, 100.0) }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig::new()
    }
}

impl fmt::Debug for CircuitBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerConfig")
            .field("name", &self.name)
            .field("window", &self.window)
            .field("failure_rate_threshold", &self.failure_rate_threshold)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("slow_call_rate_threshold", &self.slow_call_rate_threshold)
            .field("minimum_calls", &self.minimum_calls)
            .field("half_open_permits", &self.half_open_permits)
            .field("open_wait", &self.open_wait)
            .field("open_wait_multiplier", &self.open_wait_multiplier)
            .field("max_open_wait", &self.max_open_wait)
            .field("wait_when_open", &self.wait_when_open)
            .field("probe_timeout", &self.probe_timeout)
            .finish_non_exhaustive()
    }
}
