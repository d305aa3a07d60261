//! A combined health view over the layers' handles.
//!
//! [`Health`] collects handles — breakers, backpressure queues, retry and
//! dead-letter counters, in-memory DLQs — and [`Health::report`] reads them
//! all into one serialisable [`HealthReport`], e.g. for a `/health` route.
//!
//! ```
//! use watchtower::dead_letter::MemoryDeadLetters;
//! use watchtower_layers::circuit_breaker::CircuitBreakerLayer;
//! use watchtower_layers::health::{Health, Status};
//!
//! let breaker = CircuitBreakerLayer::default();
//! let dlq = MemoryDeadLetters::new(100);
//! let health = Health::new().breaker("nats", breaker.handle()).memory_dead_letters("dlq", dlq.clone());
//! assert_eq!(health.report().status, Status::Up);
//!
//! breaker.handle().force_open();
//! let report = health.report();
//! assert_eq!(report.status, Status::Down);
//! assert_eq!(report.breakers[0].metrics.state.as_str(), "forced_open");
//! ```

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use serde::Serialize;
use watchtower::dead_letter::MemoryDeadLetters;

use crate::backpressure::{BackpressureHandle, BackpressureStats};
use crate::circuit_breaker::{CircuitBreakerHandle, KeyedBreakers, Metrics, State};
use crate::dead_letter::{DeadLetterHandle, DeadLetterStats};
use crate::retry::{RetryHandle, RetryStats};

/// Overall health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every breaker lets calls through and no queue is full.
    Up,
    /// Working, but something needs a look: a breaker is half-open, a
    /// queue is full, or dead letters are waiting.
    Degraded,
    /// A breaker is open: calls are refused.
    Down,
}

/// One breaker in a [`HealthReport`].
#[derive(Debug, Clone, Serialize)]
pub struct BreakerHealth {
    /// The name it was registered under.
    pub name: String,
    /// Its state and counters.
    pub metrics: Metrics,
}

/// One backpressure queue in a [`HealthReport`].
#[derive(Debug, Clone, Serialize)]
pub struct QueueHealth {
    /// The name it was registered under.
    pub name: String,
    /// Its counters.
    pub stats: BackpressureStats,
}

/// One dead-letter destination or layer in a [`HealthReport`].
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterHealth {
    /// The name it was registered under.
    pub name: String,
    /// Events held now (in-memory queues only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<usize>,
    /// Capacity (in-memory queues only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
    /// The layer's counters (dead-letter layers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<DeadLetterStats>,
}

/// One retry layer in a [`HealthReport`].
#[derive(Debug, Clone, Serialize)]
pub struct RetryHealth {
    /// The name it was registered under.
    pub name: String,
    /// Its counters.
    pub stats: RetryStats,
}

/// Everything [`Health`] read, at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The worst of the parts.
    pub status: Status,
    /// Breakers.
    pub breakers: Vec<BreakerHealth>,
    /// Backpressure queues.
    pub queues: Vec<QueueHealth>,
    /// Retry layers.
    pub retries: Vec<RetryHealth>,
    /// Dead-letter queues and layers.
    pub dead_letters: Vec<DeadLetterHealth>,
}

impl HealthReport {
    /// Whether the status is [`Status::Up`].
    pub fn is_up(&self) -> bool {
        self.status == Status::Up
    }
}

type DeadLetterProbe = Arc<dyn Fn() -> DeadLetterHealth + Send + Sync>;
type KeyedProbe = Arc<dyn Fn() -> Vec<(String, CircuitBreakerHandle)> + Send + Sync>;

/// A set of named handles to report on. Cheap to clone; put it in your
/// application state.
#[derive(Clone, Default)]
pub struct Health {
    breakers: Vec<(String, CircuitBreakerHandle)>,
    queues: Vec<(String, BackpressureHandle)>,
    retries: Vec<(String, RetryHandle)>,
    dead_letters: Vec<DeadLetterProbe>,
    keyed: Vec<KeyedProbe>,
}

impl Health {
    /// An empty set.
    pub fn new() -> Self {
        Health::default()
    }

    /// Adds a breaker.
    pub fn breaker(mut self, name: impl Into<String>, handle: CircuitBreakerHandle) -> Self {
        self.breakers.push((name.into(), handle));
        self
    }

    /// Adds every breaker of a keyed registry, named `name/key`, as they
    /// are at each report.
    pub fn keyed_breakers<K>(mut self, name: impl Into<String>, breakers: KeyedBreakers<K>) -> Self
    where
        K: Eq + Hash + Clone + fmt::Display + Send + Sync + 'static,
    {
        let name = name.into();
        self.keyed.push(Arc::new(move || {
            breakers
                .handles()
                .into_iter()
                .map(|(key, handle)| (format!("{name}/{key}"), handle))
                .collect()
        }));
        self
    }

    /// Adds a backpressure queue.
    pub fn queue(mut self, name: impl Into<String>, handle: BackpressureHandle) -> Self {
        self.queues.push((name.into(), handle));
        self
    }

    /// Adds a retry layer.
    pub fn retry(mut self, name: impl Into<String>, handle: RetryHandle) -> Self {
        self.retries.push((name.into(), handle));
        self
    }

    /// Adds an in-memory dead-letter queue (its size and capacity).
    pub fn memory_dead_letters(mut self, name: impl Into<String>, dlq: MemoryDeadLetters) -> Self {
        let name = name.into();
        self.dead_letters.push(Arc::new(move || DeadLetterHealth {
            name: name.clone(),
            len: Some(dlq.len()),
            capacity: Some(dlq.capacity()),
            stats: None,
        }));
        self
    }

    /// Adds a dead-letter layer (its counters).
    pub fn dead_letter_layer<D: Send + Sync + 'static>(
        mut self,
        name: impl Into<String>,
        handle: DeadLetterHandle<D>,
    ) -> Self {
        let name = name.into();
        self.dead_letters.push(Arc::new(move || DeadLetterHealth {
            name: name.clone(),
            len: None,
            capacity: None,
            stats: Some(handle.stats()),
        }));
        self
    }

    /// Reads every handle now.
    pub fn report(&self) -> HealthReport {
        let mut status = Status::Up;
        let keyed: Vec<_> = self.keyed.iter().flat_map(|probe| probe()).collect();
        let breakers: Vec<_> = self
            .breakers
            .iter()
            .chain(&keyed)
            .map(|(name, h)| {
                let metrics = h.metrics();
                status = status.max(match metrics.state {
                    State::Open | State::ForcedOpen => Status::Down,
                    State::HalfOpen => Status::Degraded,
                    State::Closed | State::Disabled | State::MetricsOnly => Status::Up,
                });
                BreakerHealth {
                    name: name.clone(),
                    metrics,
                }
            })
            .collect();
        let queues: Vec<_> = self
            .queues
            .iter()
            .map(|(name, h)| {
                let stats = h.stats();
                if stats.depth >= stats.capacity {
                    status = status.max(Status::Degraded);
                }
                QueueHealth {
                    name: name.clone(),
                    stats,
                }
            })
            .collect();
        let retries = self
            .retries
            .iter()
            .map(|(name, h)| RetryHealth {
                name: name.clone(),
                stats: h.stats(),
            })
            .collect();
        let dead_letters: Vec<_> = self
            .dead_letters
            .iter()
            .map(|probe| {
                let d = probe();
                if d.len.is_some_and(|n| n > 0) {
                    status = status.max(Status::Degraded);
                }
                d
            })
            .collect();
        HealthReport {
            status,
            breakers,
            queues,
            retries,
            dead_letters,
        }
    }
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("breakers", &self.breakers.len())
            .field("queues", &self.queues.len())
            .field("retries", &self.retries.len())
            .field("dead_letters", &self.dead_letters.len())
            .field("keyed", &self.keyed.len())
            .finish()
    }
}
