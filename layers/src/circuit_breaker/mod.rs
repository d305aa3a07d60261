//! A circuit breaker: stop calling a service that keeps failing, then
//! probe it carefully before trusting it again.
//!
//! [`CircuitBreakerLayer`] keeps a sliding window of outcomes (the last N
//! calls, or the last period in buckets, see [`SlidingWindow`]). Once the
//! window holds [`minimum_calls`](CircuitBreakerConfig::minimum_calls) and
//! the failure rate (or slow-call rate) reaches its threshold, the breaker
//! **opens**: `poll_ready` fails at once with [`ErrorKind::CircuitOpen`],
//! carrying the time left as [`retry_after`](watchtower::Error::retry_after),
//! so a retry layer above waits that long instead of hammering. (With
//! [`wait_when_open`](CircuitBreakerConfig::wait_when_open), `poll_ready`
//! waits instead.) After the open wait it goes **half-open**: a few probe
//! calls, each reserved in `poll_ready`, decide between closed and open
//! again, the wait growing with [`open_wait_backoff`] on repeated trips.
//! A probe that has not finished within its
//! [`probe_timeout`](CircuitBreakerConfig::probe_timeout) counts as a
//! failed one, so a hung call cannot keep the breaker half-open for good.
//!
//! Every `CircuitOpen` refusal says when to ask again, as `retry_after`:
//! the time left open; in half-open with every probe out, the time until
//! the oldest probe times out but at most 1 s (probes usually finish long
//! before their timeout, and asking again costs the service nothing); and
//! when
//! [forced open](CircuitBreakerHandle::force_open), which has no end the
//! breaker knows of, the open wait.
//!
//! The breaker never accepts work it will then refuse: it decides in
//! `poll_ready`, holds the permit until `call`, and gives a probe slot
//! back if the service or the response future is dropped first. The hot
//! path (closed, count-based window) takes no lock: `poll_ready` reads one
//! atomic state word, and a finished call claims the next slot of a ring of
//! outcomes with one atomic increment, touching the counters only when the
//! slot's old outcome differs; the lock is taken only to change state (and
//! for time-based windows). The future is not boxed and the inner service
//! is never cloned. Under concurrent load the [`Metrics`] snapshot is
//! therefore eventually consistent: it may miss calls finishing while it is
//! taken. Likewise a call that finishes at the very moment the breaker
//! changes state may be counted in the window of the state it was let
//! through in or of the next one, and calls finishing together enter the
//! window in either order.
//!
//! Which errors count as failures is the [classifier]'s call: by default a
//! `Rejected` or `InvalidEvent` error (the caller's fault) does not trip
//! the breaker. A [`CircuitBreakerHandle`] reads the [`State`] and
//! [`Metrics`] and can force the breaker open, disable it, switch it to
//! metrics-only, or reset it.
//!
//! [`KeyedCircuitBreakerLayer`] keeps one breaker per key (per webhook URL,
//! per tenant) with bounded memory; see [`KeyedBreakers`].
//!
//! [`open_wait_backoff`]: CircuitBreakerConfig::open_wait_backoff
//! [classifier]: CircuitBreakerConfig::classifier
//! [`ErrorKind::CircuitOpen`]: watchtower::ErrorKind::CircuitOpen
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use watchtower::{Error, ErrorKind, Event};
//! use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::new().minimum_calls(2).open_wait(Duration::from_secs(10)),
//! );
//! let handle = breaker.handle();
//! let mut svc = ServiceBuilder::new().layer(breaker).service(service_fn(|_: Event| async {
//!     Err::<(), _>(Error::new(ErrorKind::Connection, "broker unreachable"))
//! }));
//!
//! for _ in 0..2 {
//!     let err = svc.ready().await.unwrap().call(Event::empty("ping")).await.unwrap_err();
//!     assert_eq!(err.kind(), ErrorKind::Connection);
//! }
//! assert_eq!(handle.state(), State::Open);
//! let err = svc.ready().await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::CircuitOpen);
//! assert!(err.retry_after().is_some());
//! # }
//! ```
//!
//! # Errors
//!
//! [`ErrorKind::CircuitOpen`] from `poll_ready` (or, for keyed breakers,
//! from the response future with the event attached); the inner service's
//! errors pass through, converted with [`Error::from_boxed`](watchtower::Error::from_boxed).

mod config;
mod future;
mod keyed;
mod layer;
mod service;
mod state;
mod window;

#[cfg(test)]
mod tests;

pub use config::{CircuitBreakerConfig, SlidingWindow, StateChange, Verdict, default_classifier};
pub use future::ResponseFuture;
pub use keyed::{KeyedBreakers, KeyedCircuitBreaker, KeyedCircuitBreakerLayer};
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;
pub use state::{CircuitBreakerHandle, Metrics, State};
