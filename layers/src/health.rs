//! One health view over the transports and the layers' handles.
//!
//! [`HealthView`] collects transport clients (anything that implements
//! [`Transport`], whose [`health`](Transport::health) answers with the
//! core's one [`Health`] type) and the layers'
//! handles — breakers, backpressure queues, retry and dead-letter counters,
//! in-memory DLQs — and the statistics of consumer runtimes
//! ([`watchtower::serve`]), and [`HealthView::report`] reads them all into
//! one serialisable [`HealthReport`], e.g. for a `/ready` route
//! (`watchtower-axum` serves one).
//!
//! ```
//! use watchtower::dead_letter::MemoryDeadLetters;
//! use watchtower::health::Status;
//! use watchtower_layers::circuit_breaker::CircuitBreakerLayer;
//! use watchtower_layers::health::HealthView;
//! use watchtower_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let broker = MemoryBroker::new();
//! let breaker = CircuitBreakerLayer::default();
//! let dlq = MemoryDeadLetters::new(100);
//! let health = HealthView::new()
//!     .transport("events", broker.clone())
//!     .breaker("events", breaker.handle())
//!     .memory_dead_letters("dlq", dlq.clone());
//! assert_eq!(health.report().await.status, Status::Up);
//!
//! breaker.handle().force_open();
//! let report = health.report().await;
//! assert_eq!(report.status, Status::Down);
//! assert_eq!(report.breakers[0].metrics.state.as_str(), "forced_open");
//! assert_eq!(report.transports[0].health.system(), "memory");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::health::{Health, Status};
use watchtower::{ServeStats, StatsHandle, Transport};

use crate::backpressure::{BackpressureHandle, BackpressureStats};
use crate::circuit_breaker::{CircuitBreakerHandle, KeyedBreakers, Metrics, State};
use crate::dead_letter::{DeadLetterHandle, DeadLetterStats};
use crate::retry::{RetryHandle, RetryStats};

/// One transport client's health, by the name it was added under.
#[derive(Debug, Clone, Serialize)]
pub struct TransportHealth {
    /// The name given to [`HealthView::transport`].
    pub name: String,
    /// What the client answered (or `Down` if it did not answer in time).
    pub health: Health,
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

/// One consumer runtime in a [`HealthReport`].
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerHealth {
    /// The name it was registered under.
    pub name: String,
    /// Its statistics.
    pub stats: ServeStats,
}

/// Everything a [`HealthView`] read, at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    /// The worst of the parts.
    pub status: Status,
    /// Transport clients.
    pub transports: Vec<TransportHealth>,
    /// Breakers.
    pub breakers: Vec<BreakerHealth>,
    /// Backpressure queues.
    pub queues: Vec<QueueHealth>,
    /// Retry layers.
    pub retries: Vec<RetryHealth>,
    /// Dead-letter queues and layers.
    pub dead_letters: Vec<DeadLetterHealth>,
    /// Consumer runtimes.
    pub consumers: Vec<ConsumerHealth>,
}

impl HealthReport {
    /// Whether the status is [`Status::Up`].
    pub fn is_up(&self) -> bool {
        self.status == Status::Up
    }
}

/// How long a report waits for a transport: see [`HealthView::check_timeout`].
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

type DeadLetterProbe = Arc<dyn Fn() -> DeadLetterHealth + Send + Sync>;
type TransportProbe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Health> + Send>> + Send + Sync>;
type KeyedProbe = Arc<dyn Fn() -> Vec<(String, CircuitBreakerHandle)> + Send + Sync>;

/// A set of named handles to report on. Cheap to clone; put it in your
/// application state.
#[derive(Clone, Default)]
pub struct HealthView {
    transports: Vec<(String, &'static str, TransportProbe)>,
    check_timeout: Option<Duration>,
    breakers: Vec<(String, CircuitBreakerHandle)>,
    queues: Vec<(String, BackpressureHandle)>,
    retries: Vec<(String, RetryHandle)>,
    dead_letters: Vec<DeadLetterProbe>,
    keyed: Vec<KeyedProbe>,
    consumers: Vec<(String, StatsHandle)>,
}

impl HealthView {
    /// An empty set.
    pub fn new() -> Self {
        HealthView::default()
    }

    /// Adds a transport client under `name`: each report asks it for its
    /// [`health`](Transport::health), all clients at once.
    pub fn transport<T: Transport>(mut self, name: impl Into<String>, client: T) -> Self {
        self.transports.push((
            name.into(),
            T::SYSTEM,
            Arc::new(move || {
                let client = client.clone();
                Box::pin(async move { client.health().await })
            }),
        ));
        self
    }

    /// How long a report waits for a transport's answer before counting
    /// it [`Down`](Status::Down). Default 5 s: far longer than a healthy
    /// broker's round trip under load, and shorter than the period of a
    /// Kubernetes probe (10 s by default), so that a stalled broker shows as
    /// down instead of hanging the probe.
    pub fn check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = Some(timeout);
        self
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

    /// Adds a consumer runtime, by the statistics handle of
    /// [`Serve::stats`](watchtower::Serve::stats). Its counters go into the
    /// report; they do not change its status: a consumer is as ready as
    /// the transport it reads from and the breakers its handler goes
    /// through, which are added on their own.
    pub fn consumer(mut self, name: impl Into<String>, stats: StatsHandle) -> Self {
        self.consumers.push((name.into(), stats));
        self
    }

    /// Reads every handle now.
    pub async fn report(&self) -> HealthReport {
        let timeout = self.check_timeout.unwrap_or(CHECK_TIMEOUT);
        let checks = self.transports.iter().map(|(name, system, probe)| {
            let check = probe();
            async move {
                let health = match tokio::time::timeout(timeout, check).await {
                    Ok(health) => health,
                    Err(_) => Health::down(system, "health check timed out"),
                };
                TransportHealth {
                    name: name.clone(),
                    health,
                }
            }
        });
        let transports = futures_util::future::join_all(checks).await;
        let mut status = transports
            .iter()
            .map(|t| t.health.status())
            .max()
            .unwrap_or(Status::Up);
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
        let consumers = self
            .consumers
            .iter()
            .map(|(name, h)| ConsumerHealth {
                name: name.clone(),
                stats: h.snapshot(),
            })
            .collect();
        HealthReport {
            status,
            transports,
            breakers,
            queues,
            retries,
            dead_letters,
            consumers,
        }
    }
}

impl fmt::Debug for HealthView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthView")
            .field(
                "transports",
                &self.transports.iter().map(|(name, ..)| name).collect::<Vec<_>>(),
            )
            .field("breakers", &self.breakers.len())
            .field("queues", &self.queues.len())
            .field("retries", &self.retries.len())
            .field("dead_letters", &self.dead_letters.len())
            .field("keyed", &self.keyed.len())
            .field(
                "consumers",
                &self.consumers.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use watchtower::Transport;
    use watchtower::health::{Health, Status};

    use super::HealthView;
    use crate::circuit_breaker::CircuitBreakerLayer;

    /// A transport whose broker never answers a health check.
    #[derive(Clone)]
    struct Stalled;

    impl Transport for Stalled {
        const SYSTEM: &'static str = "stalled";

        fn health(&self) -> impl Future<Output = Health> + Send {
            std::future::pending()
        }
    }

    /// A transport that is reconnecting.
    #[derive(Clone)]
    struct Reconnecting;

    impl Transport for Reconnecting {
        const SYSTEM: &'static str = "reconnecting";

        fn health(&self) -> impl Future<Output = Health> + Send {
            std::future::ready(Health::degraded(Self::SYSTEM, "reconnecting"))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transport_that_never_answers_is_down_after_the_check_timeout() {
        let view = HealthView::new()
            .transport("orders", Stalled)
            .transport("audit", Reconnecting)
            .check_timeout(Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let report = view.report().await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(report.status, Status::Down);
        let names: Vec<_> = report.transports.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["orders", "audit"]);
        let stalled = &report.transports[0].health;
        assert_eq!(
            (stalled.system(), stalled.status(), stalled.reason()),
            ("stalled", Status::Down, Some("health check timed out"))
        );
        assert_eq!(report.transports[1].health.status(), Status::Degraded);
    }

    #[tokio::test]
    async fn a_consumer_s_statistics_go_into_the_report_without_changing_its_status() {
        use std::future::IntoFuture as _;

        use tower::service_fn;
        use watchtower::{
            Error, ErrorKind, Event, PublishExt as _, SubscribeOptions, Subscriber as _, serve,
        };
        use watchtower_memory::MemoryBroker;

        let broker = MemoryBroker::new();
        let subscription = broker
            .subscriber()
            .open(SubscribeOptions::new(["orders.*"]).unwrap())
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = serve(
            subscription,
            service_fn(|event: Event| async move {
                match event.ty() {
                    "orders.bad" => Err(Error::new(ErrorKind::Rejected, "schema mismatch")),
                    _ => Ok(()),
                }
            }),
        )
        .with_graceful_shutdown(async {
            stopped.await.ok();
        });
        let view = HealthView::new()
            .transport("events", broker.clone())
            .consumer("orders", server.stats());
        let task = tokio::spawn(server.into_future());
        let mut publisher = broker.publisher();
        for ty in ["orders.placed", "orders.bad", "orders.paid", "orders.placed"] {
            publisher.publish(Event::empty(ty)).await.unwrap();
        }
        assert!(broker.wait_idle(Duration::from_secs(10)).await);
        stop.send(()).unwrap();
        let last = task.await.unwrap().unwrap();

        let report = view.report().await;
        assert_eq!(report.status, Status::Up);
        assert_eq!(report.consumers.len(), 1);
        let consumer = &report.consumers[0];
        assert_eq!(consumer.name, "orders");
        assert_eq!(consumer.stats, last);
        assert_eq!(
            (
                consumer.stats.received,
                consumer.stats.acked,
                consumer.stats.dead_lettered
            ),
            (4, 3, 1)
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["consumers"][0]["name"], "orders");
        assert_eq!(json["consumers"][0]["stats"]["acked"], 3);
        assert_eq!(json["consumers"][0]["stats"]["dead_lettered"], 1);
        assert_eq!(json["consumers"][0]["stats"]["in_flight"], 0);
    }

    #[tokio::test]
    async fn the_worst_part_sets_the_status() {
        let breaker = CircuitBreakerLayer::default();
        let view = HealthView::new()
            .transport("audit", Reconnecting)
            .breaker("audit", breaker.handle());
        assert_eq!(view.report().await.status, Status::Degraded);
        breaker.handle().force_open();
        assert_eq!(view.report().await.status, Status::Down);
    }
}
