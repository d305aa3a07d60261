//! What the layers record through the [`metrics`](https://docs.rs/metrics)
//! facade, with the cargo feature `metrics` (off by default).
//!
//! Every layer already keeps counters behind its handle (for
//! [`HealthView`](crate::health::HealthView)); with the feature on, the
//! same places that count also record these series, each labelled with the
//! layer's `name` (set on its config or layer, `default` when unset):
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `watchtower.breaker.state` | gauge | `name` | the breaker's [`State`](crate::circuit_breaker::State), as a number (below) |
//! | `watchtower.breaker.transitions` | counter | `name`, `from`, `to` | state changes, by [`State::as_str`](crate::circuit_breaker::State::as_str) |
//! | `watchtower.breaker.rejected` | counter | `name` | calls refused because the breaker was open |
//! | `watchtower.backpressure.depth` | gauge | `name` | events waiting in the queue |
//! | `watchtower.backpressure.capacity` | gauge | `name` | the queue's capacity |
//! | `watchtower.backpressure.dropped` | counter | `name`, `policy` | events refused (`drop_newest`) or evicted (`drop_oldest`) |
//! | `watchtower.backpressure.abandoned` | counter | `name` | queued events never sent because their caller stopped waiting |
//! | `watchtower.retry.retries` | counter | `name` | retries made (attempts after the first) |
//! | `watchtower.retry.calls` | counter | `name`, `outcome` | calls that failed at least once, by how they ended: `succeeded_after_retry`, `exhausted`, `not_retryable`, `budget_exhausted` |
//! | `watchtower.dead_letter.events` | counter | `name`, `reason` | events the dead-letter service took, by the failure's [`ErrorKind::as_str`](watchtower::ErrorKind::as_str) |
//! | `watchtower.dead_letter.failures` | counter | `name`, `reason` | events the dead-letter service refused too (returned to their callers) |
//!
//! The breaker's state gauge reads `0` closed, `1` half-open, `2` open,
//! `3` forced open, `-1` disabled and `-2` metrics-only: `>= 2` means calls
//! are refused, `> 0` that the breaker is not simply closed, and the two
//! states in which it stands aside are below zero. An open breaker turns
//! half-open lazily, when a call or a read of its state comes by, so the
//! gauge may read `2` past the open wait until then. Breakers of a
//! [`KeyedBreakers`](crate::circuit_breaker::KeyedBreakers) registry share
//! the registry's name and record transitions and rejections summed over
//! their keys, but no state gauge (one per key would make the series as
//! many as the keys).
//!
//! Names are the dotted OpenTelemetry style; the Prometheus exporter turns
//! the dots into underscores (`watchtower_breaker_state`), and with its
//! recommended naming adds `_total` to counters.
//!
//! # Cost
//!
//! Each layer registers its handles once, when it (or, for backpressure,
//! each service it wraps) is built, and keeps them: a call then costs an
//! atomic add on the recorder's own counter, and a branch on an empty
//! handle when no recorder was installed. Only the rare paths register
//! later: a breaker looks its transition counter up at each change of
//! state (thirty from/to pairs, few ever seen), and a dead-letter layer
//! registers a pair of counters per failure kind at its first dead letter
//! of that kind. Install the recorder **before** building the layers:
//! handles registered earlier belong to the no-op recorder for good.
//! Without the feature, no metrics code is compiled in.
//!
//! # Example
//!
//! ```
//! use metrics_exporter_prometheus::PrometheusBuilder;
//! use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
//!
//! let recorder = PrometheusBuilder::new().build_recorder();
//! let prometheus = recorder.handle();
//! // An application installs its recorder globally at start-up instead.
//! let breaker = metrics::with_local_recorder(&recorder, || {
//!     CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("orders"))
//! });
//! breaker.handle().force_open();
//! # #[cfg(feature = "metrics")]
//! assert!(prometheus.render().contains(r#"watchtower_breaker_state{name="orders"} 3"#));
//! ```

/// The breaker's state as a number: see the [module docs](self).
pub const BREAKER_STATE: &str = "watchtower.breaker.state";
/// State changes of a breaker, labelled `from` and `to`.
pub const BREAKER_TRANSITIONS: &str = "watchtower.breaker.transitions";
/// Calls a breaker refused because it was open.
pub const BREAKER_REJECTED: &str = "watchtower.breaker.rejected";
/// Events waiting in a backpressure queue.
pub const BACKPRESSURE_DEPTH: &str = "watchtower.backpressure.depth";
/// A backpressure queue's capacity.
pub const BACKPRESSURE_CAPACITY: &str = "watchtower.backpressure.capacity";
/// Events a backpressure queue refused or evicted, labelled `policy`.
pub const BACKPRESSURE_DROPPED: &str = "watchtower.backpressure.dropped";
/// Queued events never sent because their caller stopped waiting.
pub const BACKPRESSURE_ABANDONED: &str = "watchtower.backpressure.abandoned";
/// Retries made.
pub const RETRY_RETRIES: &str = "watchtower.retry.retries";
/// Calls that failed at least once, labelled `outcome`.
pub const RETRY_CALLS: &str = "watchtower.retry.calls";
/// Events dead-lettered, labelled `reason`.
pub const DEAD_LETTER_EVENTS: &str = "watchtower.dead_letter.events";
/// Events the dead-letter service refused, labelled `reason`.
pub const DEAD_LETTER_FAILURES: &str = "watchtower.dead_letter.failures";

#[cfg(feature = "metrics")]
pub(crate) use on::*;

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;

#[cfg(feature = "metrics")]
mod on {
    use std::sync::{Arc, Mutex};

    use ::metrics::{Counter, Gauge, SharedString, counter, describe_counter, describe_gauge, gauge};
    use watchtower::ErrorKind;

    use super::*;
    use crate::circuit_breaker::{State, StateChange};

    /// The `name` label of a layer that was not given one.
    const DEFAULT_NAME: &str = "default";

    /// The `name` label: `name`, or [`DEFAULT_NAME`] when empty.
    fn label(name: &Arc<str>) -> SharedString {
        if name.is_empty() {
            SharedString::const_str(DEFAULT_NAME)
        } else {
            SharedString::from(Arc::clone(name))
        }
    }

    /// The `# HELP` lines, given to the recorder with each layer built.
    fn describe() {
        describe_gauge!(
            BREAKER_STATE,
            "Circuit breaker state: 0 closed, 1 half-open, 2 open, 3 forced open, -1 disabled, -2 metrics-only"
        );
        describe_counter!(BREAKER_TRANSITIONS, "Circuit breaker state changes");
        describe_counter!(BREAKER_REJECTED, "Calls a circuit breaker refused while open");
        describe_gauge!(BACKPRESSURE_DEPTH, "Events waiting in a backpressure queue");
        describe_gauge!(BACKPRESSURE_CAPACITY, "Capacity of a backpressure queue");
        describe_counter!(
            BACKPRESSURE_DROPPED,
            "Events a full backpressure queue refused or evicted"
        );
        describe_counter!(
            BACKPRESSURE_ABANDONED,
            "Queued events never sent because their caller stopped waiting"
        );
        describe_counter!(RETRY_RETRIES, "Retries made");
        describe_counter!(RETRY_CALLS, "Calls that failed at least once, by how they ended");
        describe_counter!(
            DEAD_LETTER_EVENTS,
            "Events sent to the dead-letter service, by failure kind"
        );
        describe_counter!(
            DEAD_LETTER_FAILURES,
            "Events the dead-letter service refused too, returned to their callers"
        );
    }

    fn state_value(state: State) -> f64 {
        match state {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
            State::ForcedOpen => 3.0,
            State::Disabled => -1.0,
            State::MetricsOnly => -2.0,
        }
    }

    /// A breaker's handles.
    #[derive(Clone)]
    pub(crate) struct BreakerMetrics {
        name: SharedString,
        state: Option<Gauge>,
        rejected: Counter,
    }

    impl BreakerMetrics {
        /// For one breaker; `gauge` for its state gauge (not for keyed ones).
        pub(crate) fn new(name: &Arc<str>, gauge: bool) -> Self {
            describe();
            let name = label(name);
            let state = gauge.then(|| {
                let g = gauge!(BREAKER_STATE, "name" => name.clone());
                g.set(state_value(State::Closed));
                g
            });
            BreakerMetrics {
                rejected: counter!(BREAKER_REJECTED, "name" => name.clone()),
                state,
                name,
            }
        }

        /// The state is now `to` (called under the breaker's lock, so that
        /// the gauge follows the changes in their order).
        #[inline]
        pub(crate) fn state(&self, to: State) {
            if let Some(g) = &self.state {
                g.set(state_value(to));
            }
        }

        /// A state change happened. Registered here, not up front: there
        /// are thirty pairs and a breaker sees few.
        pub(crate) fn transition(&self, change: StateChange) {
            counter!(
                BREAKER_TRANSITIONS,
                "name" => self.name.clone(),
                "from" => change.from.as_str(),
                "to" => change.to.as_str(),
            )
            .increment(1);
        }

        #[inline]
        pub(crate) fn rejected(&self) {
            self.rejected.increment(1);
        }
    }

    /// A backpressure queue's handles.
    pub(crate) struct QueueMetrics {
        depth: Gauge,
        dropped_newest: Counter,
        dropped_oldest: Counter,
        abandoned: Counter,
    }

    impl QueueMetrics {
        pub(crate) fn new(name: &Arc<str>, capacity: usize) -> Self {
            describe();
            let name = label(name);
            gauge!(BACKPRESSURE_CAPACITY, "name" => name.clone()).set(capacity as f64);
            QueueMetrics {
                depth: gauge!(BACKPRESSURE_DEPTH, "name" => name.clone()),
                dropped_newest: counter!(BACKPRESSURE_DROPPED, "name" => name.clone(), "policy" => "drop_newest"),
                dropped_oldest: counter!(BACKPRESSURE_DROPPED, "name" => name.clone(), "policy" => "drop_oldest"),
                abandoned: counter!(BACKPRESSURE_ABANDONED, "name" => name),
            }
        }

        #[inline]
        pub(crate) fn depth(&self, depth: usize) {
            self.depth.set(depth as f64);
        }

        #[inline]
        pub(crate) fn dropped_newest(&self) {
            self.dropped_newest.increment(1);
        }

        #[inline]
        pub(crate) fn dropped_oldest(&self) {
            self.dropped_oldest.increment(1);
        }

        #[inline]
        pub(crate) fn abandoned(&self, n: u64) {
            self.abandoned.increment(n);
        }
    }

    /// A retry layer's handles.
    pub(crate) struct RetryMetrics {
        retries: Counter,
        succeeded_after_retry: Counter,
        exhausted: Counter,
        not_retryable: Counter,
        budget_exhausted: Counter,
    }

    impl RetryMetrics {
        pub(crate) fn new(name: &Arc<str>) -> Self {
            describe();
            let name = label(name);
            let outcome = |o: &'static str| counter!(RETRY_CALLS, "name" => name.clone(), "outcome" => o);
            RetryMetrics {
                retries: counter!(RETRY_RETRIES, "name" => name.clone()),
                succeeded_after_retry: outcome("succeeded_after_retry"),
                exhausted: outcome("exhausted"),
                not_retryable: outcome("not_retryable"),
                budget_exhausted: outcome("budget_exhausted"),
            }
        }

        #[inline]
        pub(crate) fn retry(&self) {
            self.retries.increment(1);
        }

        #[inline]
        pub(crate) fn succeeded_after_retry(&self) {
            self.succeeded_after_retry.increment(1);
        }

        #[inline]
        pub(crate) fn exhausted(&self) {
            self.exhausted.increment(1);
        }

        #[inline]
        pub(crate) fn not_retryable(&self) {
            self.not_retryable.increment(1);
        }

        #[inline]
        pub(crate) fn budget_exhausted(&self) {
            self.budget_exhausted.increment(1);
        }
    }

    /// A dead-letter layer's handles, one pair per failure kind seen,
    /// registered at its first dead letter.
    pub(crate) struct DeadLetterMetrics {
        name: SharedString,
        by_kind: Mutex<Vec<(ErrorKind, Counter, Counter)>>,
    }

    impl DeadLetterMetrics {
        pub(crate) fn new(name: &Arc<str>) -> Self {
            describe();
            DeadLetterMetrics {
                name: label(name),
                by_kind: Mutex::new(Vec::new()),
            }
        }

        fn with(&self, kind: ErrorKind, f: impl FnOnce(&Counter, &Counter)) {
            let mut by_kind = self.by_kind.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, events, failures)) = by_kind.iter().find(|(k, ..)| *k == kind) {
                return f(events, failures);
            }
            let events = counter!(DEAD_LETTER_EVENTS, "name" => self.name.clone(), "reason" => kind.as_str());
            let failures =
                counter!(DEAD_LETTER_FAILURES, "name" => self.name.clone(), "reason" => kind.as_str());
            f(&events, &failures);
            by_kind.push((kind, events, failures));
        }

        pub(crate) fn dead_lettered(&self, kind: ErrorKind) {
            self.with(kind, |events, _| events.increment(1));
        }

        pub(crate) fn failed(&self, kind: ErrorKind) {
            self.with(kind, |_, failures| failures.increment(1));
        }
    }
}

/// Without the feature: the same calls, doing nothing, inlined away.
#[cfg(not(feature = "metrics"))]
mod off {
    use std::sync::Arc;

    use watchtower::ErrorKind;

    use crate::circuit_breaker::{State, StateChange};

    #[derive(Clone)]
    pub(crate) struct BreakerMetrics;

    impl BreakerMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &Arc<str>, _: bool) -> Self {
            BreakerMetrics
        }
        #[inline(always)]
        pub(crate) fn state(&self, _: State) {}
        #[inline(always)]
        pub(crate) fn transition(&self, _: StateChange) {}
        #[inline(always)]
        pub(crate) fn rejected(&self) {}
    }

    pub(crate) struct QueueMetrics;

    impl QueueMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &Arc<str>, _: usize) -> Self {
            QueueMetrics
        }
        #[inline(always)]
        pub(crate) fn depth(&self, _: usize) {}
        #[inline(always)]
        pub(crate) fn dropped_newest(&self) {}
        #[inline(always)]
        pub(crate) fn dropped_oldest(&self) {}
        #[inline(always)]
        pub(crate) fn abandoned(&self, _: u64) {}
    }

    pub(crate) struct RetryMetrics;

    impl RetryMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &Arc<str>) -> Self {
            RetryMetrics
        }
        #[inline(always)]
        pub(crate) fn retry(&self) {}
        #[inline(always)]
        pub(crate) fn succeeded_after_retry(&self) {}
        #[inline(always)]
        pub(crate) fn exhausted(&self) {}
        #[inline(always)]
        pub(crate) fn not_retryable(&self) {}
        #[inline(always)]
        pub(crate) fn budget_exhausted(&self) {}
    }

    pub(crate) struct DeadLetterMetrics;

    impl DeadLetterMetrics {
        #[inline(always)]
        pub(crate) fn new(_: &Arc<str>) -> Self {
            DeadLetterMetrics
        }
        #[inline(always)]
        pub(crate) fn dead_lettered(&self, _: ErrorKind) {}
        #[inline(always)]
        pub(crate) fn failed(&self, _: ErrorKind) {}
    }
}
