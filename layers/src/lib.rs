//! Fault-tolerance layers for WatchTower: circuit breaker, backpressure,
//! retry and dead letter, as plain [`tower::Layer`]s.
//!
//! They know nothing about any transport: each works over any
//! `Service<Event>` whose error converts into a boxed error (so tower's
//! own `Timeout`, `ConcurrencyLimit` or `LoadShed` can sit in the same
//! stack) and answers [`watchtower::Error`], deciding by
//! [`ErrorKind`](watchtower::ErrorKind), never by text. They wrap a
//! publisher on the way out or a consumer's handler on the way in alike.
//!
//! | layer | module | adds |
//! |---|---|---|
//! | [`DeadLetterLayer`](dead_letter::DeadLetterLayer) | [`dead_letter`] | final failures go to a DLQ; answers [`Outcome`](dead_letter::Outcome) |
//! | [`RetryLayer`](retry::RetryLayer) | [`retry`] | backoff with jitter, retry-after, budget |
//! | [`CircuitBreakerLayer`](circuit_breaker::CircuitBreakerLayer) | [`circuit_breaker`] | fails fast in `poll_ready` with `CircuitOpen` |
//! | [`BackpressureLayer`](backpressure::BackpressureLayer) | [`backpressure`] | bounded queue; `Dropped` with the event attached |
//!
//! The table is also the recommended order, outermost first; see
//! [`ServiceBuilderExt`] for why. Every layer has a cloneable handle for
//! its counters, and [`health::HealthView`] combines them. With the cargo
//! feature `metrics`, the same counters are also recorded through the
//! `metrics` facade, labelled with each layer's name: see [`metrics`] for
//! the series, and `watchtower-axum` for serving them with `/health` and
//! `/ready`.
//!
//! Together they keep one promise: an event is delivered, dead-lettered,
//! or its caller gets an error carrying it — never silently dropped.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use watchtower::dead_letter::MemoryDeadLetters;
//! use watchtower::{Error, ErrorKind, Event};
//! use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
//! use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
//! use watchtower_layers::health::HealthView;
//! use watchtower_layers::retry::RetryConfig;
//! use watchtower_layers::ServiceBuilderExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let dlq = MemoryDeadLetters::new(10_000);
//! let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("broker"));
//! let queue = BackpressureLayer::new(1024, Overflow::Block);
//! let health = HealthView::new()
//!     .breaker("broker", breaker.handle())
//!     .queue("outbox", queue.handle())
//!     .memory_dead_letters("dlq", dlq.clone());
//!
//! let mut publisher = ServiceBuilder::new()
//!     .dead_letter(dlq.clone())
//!     .retries(RetryConfig::new().delays(Duration::from_millis(1), Duration::from_millis(5)))
//!     .circuit_breaker(breaker)
//!     .backpressure(queue)
//!     .service(service_fn(|event: Event| async move {
//!         match event.ty() {
//!             "bad" => Err(Error::new(ErrorKind::Rejected, "schema mismatch")),
//!             _ => Ok(()),
//!         }
//!     }));
//!
//! assert!(publisher.ready().await?.call(Event::empty("user.created")).await?.is_delivered());
//! assert!(publisher.ready().await?.call(Event::empty("bad")).await?.is_dead_lettered());
//! assert_eq!(dlq.len(), 1);
//! assert_eq!(health.report().await.dead_letters[0].len, Some(1));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod backpressure;
mod builder;
pub mod circuit_breaker;
pub mod dead_letter;
pub mod health;
pub mod metrics;
pub mod retry;

pub use builder::ServiceBuilderExt;

/// The layers and their configuration: `use watchtower_layers::prelude::*;`.
pub mod prelude {
    pub use crate::ServiceBuilderExt;
    pub use crate::backpressure::{BackpressureLayer, Overflow};
    pub use crate::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    pub use crate::dead_letter::{DeadLetterLayer, Outcome};
    pub use crate::health::HealthView;
    pub use crate::retry::{RetryConfig, RetryLayer};
}
