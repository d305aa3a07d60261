//! The breaker itself: a state machine shared by every clone of a
//! service, by the handle, and by keyed breakers.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use watchtower::{Error, ErrorKind};

use super::config::{CircuitBreakerConfig, SlidingWindow, StateChange, Verdict};
use super::window::{AtomicCountWindow, CountWindow, Counts, Outcome, Recorded, TimeWindow, Window};
use crate::metrics::BreakerMetrics;

/// The state of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls flow; outcomes are recorded and may open the breaker.
    Closed,
    /// Calls are refused until the open wait has passed.
    Open,
    /// A limited number of probe calls decide between closed and open.
    HalfOpen,
    /// Open until [`reset`](CircuitBreakerHandle::reset), whatever happens.
    ForcedOpen,
    /// Every call passes and nothing is recorded.
    Disabled,
    /// Every call passes; outcomes are recorded but never open the breaker.
    MetricsOnly,
}

impl State {
    const fn to_bits(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
            State::MetricsOnly => 5,
        }
    }

    /// A short lowercase name (`closed`, `half_open`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics_only",
        }
    }

    /// Whether calls are let through without a probe permit.
    const fn is_free(bits: u64) -> bool {
        bits == 0 || bits == 4 || bits == 5
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a breaker's state and counters.
///
/// Calls finish without taking a lock, so under concurrent load a snapshot
/// may miss the outcomes of calls finishing while it is taken, and the
/// lifetime counters may lag the window by those calls; once they have
/// finished, the next snapshot counts them all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// The state now.
    pub state: State,
    /// Calls in the sliding window.
    pub window_calls: u32,
    /// Failed calls in the window.
    pub window_failures: u32,
    /// Slow calls in the window.
    pub window_slow: u32,
    /// Failure rate of the window in percent; `None` below the minimum
    /// number of calls.
    pub failure_rate: Option<f64>,
    /// Slow-call rate of the window in percent; `None` below the minimum.
    pub slow_call_rate: Option<f64>,
    /// Successful calls recorded since creation.
    pub successful_calls: u64,
    /// Failed calls recorded since creation.
    pub failed_calls: u64,
    /// Calls refused because the breaker was open.
    pub rejected_calls: u64,
    /// Times the breaker has opened since creation.
    pub trips: u64,
    /// Time left before an open breaker lets probes through.
    pub open_remaining: Option<Duration>,
}

// State in the low byte, epoch above: one load tells the fast path whether
// to let the call through and which epoch its outcome belongs to.
const STATE_BITS: u64 = 0xff;

pub(crate) struct Breaker {
    pub(crate) config: CircuitBreakerConfig,
    packed: AtomicU64,
    rejected: AtomicU64,
    /// The count window, when it is small enough to be kept lock-free: a
    /// call that ends while closed or metrics-only records here without the
    /// lock, which is taken only to open the breaker.
    ring: Option<AtomicCountWindow>,
    /// Failures recorded in `ring`; its other writes are successes.
    ring_failures: AtomicU64,
    machine: Mutex<Machine>,
    pub(crate) notify: Arc<Notify>,
    /// What a permit's start time is measured from.
    origin: Instant,
    metrics: BreakerMetrics,
}

struct Machine {
    state: State,
    epoch: u64,
    /// The window kept under the lock: time-based, or too large for `ring`.
    window: Option<Window>,
    open_until: Option<Instant>,
    consecutive_trips: u32,
    probes_issued: u32,
    /// When each probe of this half-open round that is still out was
    /// issued (see [`Breaker::stamp`]); one past its probe timeout, it
    /// counts as failed and leaves this list.
    probes_out: Vec<u64>,
    probe_counts: Counts,
    successes: u64,
    failures: u64,
    trips: u64,
}

/// The longest `retry_after` of a refusal in half-open with every probe
/// out.
const HALF_OPEN_HINT: Duration = Duration::from_secs(1);

/// Why a call was refused.
#[derive(Debug)]
pub(crate) struct Rejection {
    /// When to ask again: the time left open, the time until the oldest
    /// probe out times out (at most [`HALF_OPEN_HINT`]), or (forced open)
    /// the open wait.
    pub(crate) retry_after: Duration,
}

// A permit's flags, below its epoch.
const RECORD: u64 = 1;
const PROBE: u64 = 2;
const FLAG_BITS: u32 = 2;

/// What `acquire` grants.
#[derive(Debug)]
pub(crate) enum Grant {
    /// A call let through without a probe slot: nothing to give back if it
    /// is never made, so it is held as a plain word until `call`.
    Free(Ticket),
    /// A reserved probe slot, given back when dropped unspent.
    Probe(Permit),
}

/// A [`Grant::Free`]: its permit's epoch and flags, nonzero so that an
/// `Option<Ticket>` is one word.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(NonZeroU64);

impl Ticket {
    const HELD: NonZeroU64 = match NonZeroU64::new(1 << 63) {
        Some(bit) => bit,
        None => NonZeroU64::MIN,
    };

    #[inline]
    fn new(tag: u64) -> Self {
        Ticket(Self::HELD | tag)
    }

    #[inline]
    fn tag(self) -> u64 {
        self.0.get() & !Self::HELD.get()
    }
}

/// The right to make one call, taken in `poll_ready` and spent when the
/// call's outcome is recorded. Dropped unspent, a probe slot is given back.
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    /// `epoch << FLAG_BITS | PROBE | RECORD`, one word so that moving the
    /// permit into the future costs little.
    tag: u64,
    /// When the call started, for slow-call detection: nanoseconds since
    /// the breaker's origin plus one, or 0 if not timed. A word rather than
    /// an `Option<Instant>`, for the same reason.
    start: u64,
    /// For a probe, when it was issued (a [`Breaker::stamp`]), which
    /// tells the breaker whether it has timed out already; 0 otherwise.
    issued: u64,
}

type Transition = Option<StateChange>;

impl Breaker {
    /// A breaker with metrics of its own, its state gauge included.
    pub(crate) fn new(config: CircuitBreakerConfig) -> Arc<Breaker> {
        let metrics = BreakerMetrics::new(&config.name, true);
        Breaker::with_metrics(config, metrics)
    }

    /// A breaker recording into `metrics` (shared by a keyed registry).
    pub(crate) fn with_metrics(config: CircuitBreakerConfig, metrics: BreakerMetrics) -> Arc<Breaker> {
        let now = Instant::now();
        let (ring, window) = match config.window {
            SlidingWindow::Count(n) => match AtomicCountWindow::new(n) {
                Some(ring) => (Some(ring), None),
                None => (None, Some(Window::Count(CountWindow::new(n)))),
            },
            SlidingWindow::Time { size, buckets } => {
                (None, Some(Window::Time(TimeWindow::new(size, buckets, now))))
            }
        };
        Arc::new(Breaker {
            config,
            packed: AtomicU64::new(State::Closed.to_bits()),
            rejected: AtomicU64::new(0),
            ring,
            ring_failures: AtomicU64::new(0),
            machine: Mutex::new(Machine {
                state: State::Closed,
                epoch: 0,
                window,
                open_until: None,
                consecutive_trips: 0,
                probes_issued: 0,
                probes_out: Vec::new(),
                probe_counts: Counts::default(),
                successes: 0,
                failures: 0,
                trips: 0,
            }),
            notify: Arc::new(Notify::new()),
            origin: now,
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // Every update leaves the machine consistent before anything that
        // can panic (hooks run outside the lock), so a poisoned lock is safe.
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a permit, or says why not. Lets the open wait lapse into
    /// half-open on the way.
    // Inlined across crates: this and the other hot-path functions are not
    // generic, so they would otherwise stay calls into this crate.
    #[inline]
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Grant, Rejection> {
        let packed = self.packed.load(Ordering::Acquire);
        let bits = packed & STATE_BITS;
        if State::is_free(bits) {
            let record = u64::from(bits != State::Disabled.to_bits());
            return Ok(Grant::Free(Ticket::new((packed >> 8) << FLAG_BITS | record)));
        }
        self.acquire_locked()
    }

    fn acquire_locked(self: &Arc<Self>) -> Result<Grant, Rejection> {
        let mut m = self.lock();
        let now = Instant::now();
        let change = self.tick(&mut m, now);
        let result = match m.state {
            State::Closed | State::MetricsOnly => Ok(Grant::Free(Ticket::new(m.epoch << FLAG_BITS | RECORD))),
            State::Disabled => Ok(Grant::Free(Ticket::new(m.epoch << FLAG_BITS))),
            State::Open => Err(Rejection {
                retry_after: m
                    .open_until
                    .map_or(self.config.open_wait, |t| t.saturating_duration_since(now)),
            }),
            // No end the breaker knows of: check back after the open wait.
            State::ForcedOpen => Err(Rejection {
                retry_after: self.config.open_wait,
            }),
            State::HalfOpen if m.probes_issued < self.config.half_open_permits => {
                m.probes_issued += 1;
                let issued = self.stamp(now);
                m.probes_out.push(issued);
                Ok(Grant::Probe(Permit {
                    breaker: self.clone(),
                    tag: m.epoch << FLAG_BITS | PROBE | RECORD,
                    start: 0,
                    issued,
                }))
            }
            // Every permit is out: a slot frees up when a probe finishes,
            // at the latest when the oldest one times out. Probes usually
            // finish long before that, and asking again costs the service
            // nothing, so the hint is short.
            State::HalfOpen => Err(Rejection {
                retry_after: m
                    .probes_out
                    .iter()
                    .min()
                    .map_or(self.probe_timeout(), |&oldest| {
                        self.probe_deadline(oldest).saturating_duration_since(now)
                    })
                    .min(HALF_OPEN_HINT),
            }),
        };
        drop(m);
        self.fire(change);
        result
    }

    /// The permit a call made with `ticket` records through.
    #[inline]
    pub(crate) fn permit(self: &Arc<Self>, ticket: Ticket) -> Permit {
        Permit {
            breaker: self.clone(),
            tag: ticket.tag(),
            start: 0,
            issued: 0,
        }
    }

    /// The lazy part of the state machine, run whenever the state is read
    /// under the lock: an open wait that has passed turns into half-open,
    /// and probes out past their timeout count as failed ones.
    fn tick(&self, m: &mut Machine, now: Instant) -> Transition {
        match m.state {
            State::Open if m.open_until.is_some_and(|t| now >= t) => self.transition(m, State::HalfOpen),
            State::HalfOpen if !m.probes_out.is_empty() => {
                let before = m.probes_out.len();
                m.probes_out.retain(|&issued| now < self.probe_deadline(issued));
                let expired = before - m.probes_out.len();
                if expired == 0 {
                    return None;
                }
                tracing::debug!(
                    breaker = &*self.config.name,
                    expired,
                    "circuit breaker probes timed out"
                );
                let failed = Outcome {
                    failure: true,
                    slow: false,
                };
                let mut change = None;
                for _ in 0..expired {
                    change = change.or(self.probe_done(m, failed));
                }
                change
            }
            _ => None,
        }
    }

    /// Now as a probe stamp: nanoseconds since the breaker's origin, plus
    /// one so that 0 means none.
    fn stamp(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        u64::try_from(since.as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// When a probe issued at `stamp` times out.
    fn probe_deadline(&self, stamp: u64) -> Instant {
        let issued = later(self.origin, Duration::from_nanos(stamp.saturating_sub(1)));
        later(issued, self.probe_timeout())
    }

    fn probe_timeout(&self) -> Duration {
        self.config.probe_timeout.unwrap_or(self.config.open_wait)
    }

    /// Counts one finished probe of the half-open round; the last one
    /// decides between closed and open.
    fn probe_done(&self, m: &mut Machine, o: Outcome) -> Transition {
        if m.state != State::HalfOpen {
            return None;
        }
        m.probe_counts.calls += 1;
        m.probe_counts.failures += u32::from(o.failure);
        m.probe_counts.slow += u32::from(o.slow);
        if m.probe_counts.calls < self.config.half_open_permits {
            return None;
        }
        let counts = m.probe_counts;
        let to = if self.probes_fail(&counts) {
            State::Open
        } else {
            State::Closed
        };
        self.transition(m, to)
    }

    /// The permit a call made with `grant` records through, started.
    #[inline]
    pub(crate) fn start(self: &Arc<Self>, grant: Grant) -> Permit {
        match grant {
            Grant::Free(ticket) => self.permit(ticket),
            Grant::Probe(permit) => permit,
        }
        .start()
    }

    /// Counts a refusal the caller sees, and calls the hook.
    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        self.metrics.rejected();
        if let Some(hook) = &self.config.on_rejected {
            hook();
        }
    }

    /// The error a refused caller gets.
    pub(crate) fn open_error(&self, rejection: &Rejection) -> Error {
        Error::new(ErrorKind::CircuitOpen, &*self.config.name).with_retry_after(rejection.retry_after)
    }

    fn transition(&self, m: &mut Machine, to: State) -> Transition {
        let from = m.state;
        if from == to {
            return None;
        }
        m.state = to;
        m.epoch += 1;
        m.probes_issued = 0;
        m.probes_out.clear();
        m.probe_counts = Counts::default();
        match to {
            State::Open => {
                m.trips += 1;
                m.consecutive_trips = m.consecutive_trips.saturating_add(1);
                let wait = self.config.open_wait_for(m.consecutive_trips);
                m.open_until = Some(later(Instant::now(), wait));
            }
            State::Closed => {
                m.consecutive_trips = 0;
                m.open_until = None;
                self.clear_window(m);
            }
            State::MetricsOnly => {
                m.open_until = None;
                // Before the new state is published, so that no outcome
                // recorded in it is wiped.
                self.clear_window(m);
            }
            _ => m.open_until = None,
        }
        self.packed
            .store((m.epoch << 8) | to.to_bits(), Ordering::Release);
        // Under the lock, so that the gauge follows changes in order.
        self.metrics.state(to);
        Some(StateChange { from, to })
    }

    fn fire(&self, change: Transition) {
        if let Some(change) = change {
            self.notify.notify_waiters();
            self.metrics.transition(change);
            tracing::debug!(breaker = &*self.config.name, from = %change.from, to = %change.to, "circuit breaker state change");
            if let Some(hook) = &self.config.on_state_change {
                hook(change);
            }
        }
    }

    fn trips(&self, counts: &Counts) -> bool {
        let c = &self.config;
        counts.calls >= c.minimum_calls
            && (counts.failure_rate() >= c.failure_rate_threshold
                || (c.slow_call_duration.is_some() && counts.slow_rate() >= c.slow_call_rate_threshold))
    }

    fn probes_fail(&self, counts: &Counts) -> bool {
        let c = &self.config;
        counts.failure_rate() >= c.failure_rate_threshold
            || (c.slow_call_duration.is_some() && counts.slow_rate() >= c.slow_call_rate_threshold)
    }

    fn clear_window(&self, m: &mut Machine) {
        if let Some(ring) = &self.ring {
            ring.clear();
        }
        if let Some(w) = &mut m.window {
            w.clear();
        }
    }

    fn window_counts(&self, m: &mut Machine) -> Counts {
        match (&self.ring, &mut m.window) {
            (Some(ring), _) => ring.counts(),
            (None, Some(w)) => w.counts(),
            (None, None) => Counts::default(),
        }
    }

    /// Records `o` for a call let through in `epoch`; `probe` is the
    /// probe's stamp, or 0 for a call that was not a probe.
    #[inline]
    fn record(&self, epoch: u64, probe: u64, o: Outcome) {
        if let Some(ring) = &self.ring {
            // The state word is published after the window is cleared for a
            // new epoch, so a match means the outcome belongs in it. A state
            // change between this check and the write below may still let it
            // in: a call finishing just as the breaker changes state counts
            // in either window (the lock-based path would drop it).
            let packed = self.packed.load(Ordering::Acquire);
            let closed = packed == (epoch << 8) | State::Closed.to_bits();
            if closed || packed == (epoch << 8) | State::MetricsOnly.to_bits() {
                if o.failure {
                    self.ring_failures.fetch_add(1, Ordering::Relaxed);
                }
                match ring.record(o) {
                    Recorded::Raised(counts) if closed && self.trips(&counts) => {
                        self.open(epoch, Some(counts))
                    }
                    Recorded::Torn if closed => self.open(epoch, None),
                    _ => {}
                }
                return;
            }
        }
        self.record_locked(epoch, probe, o);
    }

    /// Opens the breaker if it is still closed in `epoch` and `counts` (or
    /// the window read now, if `None`) trips it.
    fn open(&self, epoch: u64, counts: Option<Counts>) {
        let mut m = self.lock();
        if m.epoch != epoch || m.state != State::Closed {
            return;
        }
        let counts = counts.unwrap_or_else(|| self.window_counts(&mut m));
        let change = if self.trips(&counts) {
            self.transition(&mut m, State::Open)
        } else {
            None
        };
        drop(m);
        self.fire(change);
    }

    fn record_locked(&self, epoch: u64, probe: u64, o: Outcome) {
        let mut m = self.lock();
        if o.failure {
            m.failures += 1;
        } else {
            m.successes += 1;
        }
        // An outcome from an earlier state (a call let through while closed
        // that ends after the breaker opened) says nothing about this one.
        if m.epoch != epoch {
            return;
        }
        let mut change = None;
        let state = m.state;
        match state {
            State::Closed | State::MetricsOnly => {
                match (&self.ring, &mut m.window) {
                    (Some(ring), _) => {
                        // Counted by the ring's writes, not the lock's totals.
                        if o.failure {
                            m.failures -= 1;
                            self.ring_failures.fetch_add(1, Ordering::Relaxed);
                        } else {
                            m.successes -= 1;
                        }
                        ring.record(o);
                    }
                    (None, Some(w)) => w.record(o),
                    (None, None) => {}
                }
                if m.state == State::Closed {
                    let counts = self.window_counts(&mut m);
                    if self.trips(&counts) {
                        change = self.transition(&mut m, State::Open);
                    }
                }
            }
            // A probe that timed out has been counted as failed already.
            State::HalfOpen if probe != 0 && take(&mut m.probes_out, probe) => {
                change = self.probe_done(&mut m, o);
            }
            _ => {}
        }
        drop(m);
        self.fire(change);
    }

    fn release_probe(&self, epoch: u64, issued: u64) {
        let mut m = self.lock();
        // A probe that timed out has been counted as failed: its slot is
        // spent, not given back.
        if m.epoch == epoch && m.state == State::HalfOpen && take(&mut m.probes_out, issued) {
            m.probes_issued = m.probes_issued.saturating_sub(1);
            drop(m);
            self.notify.notify_waiters();
        }
    }

    pub(crate) fn force(&self, to: State) {
        let mut m = self.lock();
        let change = self.transition(&mut m, to);
        // A change of state has cleared the window already; forcing the
        // state it is in starts it afresh all the same.
        if change.is_none() && (to == State::Closed || to == State::MetricsOnly) {
            self.clear_window(&mut m);
        }
        drop(m);
        self.fire(change);
    }

    pub(crate) fn state(&self) -> State {
        let mut m = self.lock();
        let change = self.tick(&mut m, Instant::now());
        let state = m.state;
        drop(m);
        self.fire(change);
        state
    }

    pub(crate) fn metrics(&self) -> Metrics {
        let state = self.state();
        let mut m = self.lock();
        let counts = self.window_counts(&mut m);
        let (ring_successes, ring_failures) = match &self.ring {
            Some(ring) => {
                let failures = self.ring_failures.load(Ordering::Relaxed);
                (ring.recorded().saturating_sub(failures), failures)
            }
            None => (0, 0),
        };
        let enough = counts.calls >= self.config.minimum_calls;
        Metrics {
            state,
            window_calls: counts.calls,
            window_failures: counts.failures,
            window_slow: counts.slow,
            failure_rate: enough.then(|| counts.failure_rate()),
            slow_call_rate: enough.then(|| counts.slow_rate()),
            successful_calls: m.successes + ring_successes,
            failed_calls: m.failures + ring_failures,
            rejected_calls: self.rejected.load(Ordering::Relaxed),
            trips: m.trips,
            open_remaining: m
                .open_until
                .filter(|_| m.state == State::Open)
                .map(|t| t.saturating_duration_since(Instant::now())),
        }
    }
}

impl Permit {
    /// Marks the start of the call, for slow-call detection.
    #[inline]
    pub(crate) fn start(mut self) -> Self {
        if self.tag & RECORD != 0 && self.breaker.config.slow_call_duration.is_some() {
            let since = Instant::now().saturating_duration_since(self.breaker.origin);
            self.start = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        }
        self
    }

    /// Records the call's outcome and spends the permit.
    #[inline]
    pub(crate) fn complete<T>(mut self, result: &Result<T, Error>) {
        if self.tag & RECORD == 0 {
            return;
        }
        let failure = match result {
            Ok(_) => false,
            Err(e) => match (self.breaker.config.classifier)(e) {
                Verdict::Failure => true,
                Verdict::Success => false,
                // Dropping the permit gives a probe slot back.
                Verdict::Ignore => return,
            },
        };
        let slow = match self.breaker.config.slow_call_duration {
            Some(limit) if self.start != 0 => {
                let start = self.breaker.origin + Duration::from_nanos(self.start - 1);
                start.elapsed() >= limit
            }
            _ => false,
        };
        let probe = if self.tag & PROBE != 0 { self.issued } else { 0 };
        self.tag &= !PROBE;
        self.breaker
            .record(self.tag >> FLAG_BITS, probe, Outcome { failure, slow });
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if self.tag & PROBE != 0 {
            self.breaker.release_probe(self.tag >> FLAG_BITS, self.issued);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("epoch", &(self.tag >> FLAG_BITS))
            .field("probe", &(self.tag & PROBE != 0))
            .finish()
    }
}

/// `at + d`, or as far as the clock goes: durations from configuration
/// may be anything up to [`Duration::MAX`].
fn later(at: Instant, d: Duration) -> Instant {
    // Thirty years, as tokio's own far future.
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    at.checked_add(d).or_else(|| at.checked_add(FAR)).unwrap_or(at)
}

/// Removes one `stamp` from `probes`; whether it was there.
fn take(probes: &mut Vec<u64>, stamp: u64) -> bool {
    match probes.iter().position(|&p| p == stamp) {
        Some(i) => {
            probes.swap_remove(i);
            true
        }
        None => false,
    }
}

/// A cloneable handle on a breaker: read its state and metrics, force it
/// open, disable it, or reset it.
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    pub(crate) breaker: Arc<Breaker>,
}

impl CircuitBreakerHandle {
    /// The breaker's name, from its config.
    pub fn name(&self) -> &str {
        &self.breaker.config.name
    }

    /// The state now (an open breaker whose wait has passed reads as
    /// half-open).
    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// A snapshot of the state and counters.
    pub fn metrics(&self) -> Metrics {
        self.breaker.metrics()
    }

    /// Refuses every call until [`reset`](Self::reset). Refusals carry
    /// the configured [`open_wait`](super::CircuitBreakerConfig::open_wait)
    /// as `retry_after`: the breaker cannot know when it will be reset, so
    /// callers are told to check back after that long.
    pub fn force_open(&self) {
        self.breaker.force(State::ForcedOpen);
    }

    /// Lets every call through and records nothing until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.breaker.force(State::Disabled);
    }

    /// Records outcomes but never opens, until [`reset`](Self::reset).
    pub fn metrics_only(&self) {
        self.breaker.force(State::MetricsOnly);
    }

    /// Back to closed with an empty window.
    pub fn reset(&self) {
        // Forcing closed empties the window.
        self.breaker.force(State::Closed);
        self.breaker.lock().consecutive_trips = 0;
    }
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("name", &self.name())
            .field("state", &self.state())
            .finish()
    }
}
