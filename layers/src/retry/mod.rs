//! Retry: try a failed event again, with exponential backoff and jitter,
//! when the error says a retry can help.
//!
//! [`RetryLayer`] retries errors whose [`is_retryable`] is true (by
//! default; see [`RetryConfig::retry_if`]), up to
//! [`max_attempts`](RetryConfig::max_attempts) and
//! [`max_elapsed`](RetryConfig::max_elapsed). The wait before attempt *n*
//! is `min · multiplier^(n-2)`, capped, with full jitter (seedable), and at
//! least the error's [`retry_after`] hint — so a circuit breaker below,
//! which reports the time left open, or a `429 Retry-After` is honoured.
//! A hint comes from outside and is not trusted: it is cut to
//! [`max_retry_after`](RetryConfig::max_retry_after), every sum of
//! durations saturates, and a hint that would end past `max_elapsed`
//! makes the layer give up at once with the last error rather than sleep.
//! An optional [budget](RetryConfig::budget) stops retries from
//! multiplying load during an outage.
//!
//! Each retry is sent with the [`ATTEMPT`](watchtower::ext::ATTEMPT)
//! extension set to its number; the first attempt is sent untouched. When
//! the layer gives up, the error carries the last attempt's event
//! ([`Error::event`](watchtower::Error::event)), which is how a dead-letter
//! layer above learns the attempt count.
//!
//! Like tower's own `Retry`, the service must be `Clone`: the ready service
//! goes into the response future and a clone takes its place, so each
//! retry waits for readiness on its own copy. A *retryable* readiness
//! error of the inner service (an open circuit breaker's `CircuitOpen`
//! with its time left, a transport that is reconnecting) counts as a
//! failed first attempt: `poll_ready` answers ready, and the call waits
//! and retries as for any failed attempt. Other readiness errors pass
//! through `poll_ready` unchanged; a dead-letter layer above turns them
//! into dead letters.
//!
//! # Duplicates
//!
//! A retry after a timeout or a cut connection may send an event the
//! broker had already stored: the first attempt's answer was lost, not
//! necessarily its write. Brokers without deduplication (Redis Streams,
//! RabbitMQ, webhooks) then hold the event twice; NATS JetStream drops the
//! copy, since the publisher sets `Nats-Msg-Id` to the event id and the
//! stream's duplicate window catches it. Every attempt sends the same
//! event with the same [`id`](watchtower::Event::id) (only the
//! [`ATTEMPT`](watchtower::ext::ATTEMPT) extension changes), so a
//! consumer that must not act twice keys its handler on the event id: an
//! upsert, a unique constraint, or a table of ids already handled.
//!
//! # Order
//!
//! Put retry **above** the circuit breaker and **below** the dead-letter
//! layer. A dead-letter layer below a retry answers `Ok` for a dead-lettered
//! event, so this layer would never see the failure it should retry.
//!
//! [`is_retryable`]: watchtower::Error::is_retryable
//! [`retry_after`]: watchtower::Error::retry_after
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use watchtower::{Error, ErrorKind, Event};
//! use watchtower_layers::retry::{RetryConfig, RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let calls = Arc::new(AtomicU32::new(0));
//! let counter = calls.clone();
//! let mut svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(RetryConfig::new().delays(Duration::from_millis(1), Duration::from_millis(10))))
//!     .service(service_fn(move |event: Event| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             if n == 0 {
//!                 return Err(Error::new(ErrorKind::Connection, "reset"));
//!             }
//!             assert_eq!(event.extension("attempt"), Some("2"));
//!             Ok(())
//!         }
//!     }));
//! svc.ready().await.unwrap().call(Event::empty("ping")).await.unwrap();
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # }
//! ```
//!
//! # Errors
//!
//! The last attempt's error, with the event attached.

mod config;
mod future;
mod stats;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};
use watchtower::{BoxError, Error, Event};

pub use config::{RetryAttempt, RetryConfig};
pub use future::ResponseFuture;
pub use stats::{RetryHandle, RetryStats};
pub use watchtower::backoff::Jitter;

use config::Shared;

/// Wraps services in [`Retry`]. Services from one layer share its
/// counters and jitter source.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    handle: RetryHandle,
}

impl RetryLayer {
    /// A layer retrying as `config` says.
    pub fn new(config: RetryConfig) -> Self {
        RetryLayer {
            handle: RetryHandle {
                shared: Shared::new(config),
            },
        }
    }

    /// A handle on the counters.
    pub fn handle(&self) -> RetryHandle {
        self.handle.clone()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        RetryLayer::new(RetryConfig::default())
    }
}

impl From<RetryConfig> for RetryLayer {
    fn from(config: RetryConfig) -> Self {
        RetryLayer::new(config)
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: self.handle.shared.clone(),
            refused: None,
        }
    }
}

/// Retries failed calls to `S`. See the [module docs](self).
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
    /// A retryable readiness error, to be handled by the next call as its
    /// failed first attempt.
    refused: Option<Error>,
}

impl<S: Clone> Clone for Retry<S> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            refused: None,
        }
    }
}

impl<S> Retry<S> {
    /// Retries calls to `inner` as `config` says.
    pub fn new(inner: S, config: RetryConfig) -> Self {
        RetryLayer::new(config).layer(inner)
    }

    /// A handle on the counters.
    pub fn handle(&self) -> RetryHandle {
        RetryHandle {
            shared: self.shared.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S> Service<Event> for Retry<S>
where
    S: Service<Event> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.refused.is_some() {
            return Poll::Ready(Ok(()));
        }
        match std::task::ready!(self.inner.poll_ready(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let e = Error::from_boxed(e.into());
                if self.shared.config.is_retryable(&e) {
                    self.refused = Some(e);
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Ready(Err(e))
                }
            }
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        if let Some(budget) = &self.shared.config.budget {
            budget.deposit();
        }
        let span = watchtower::trace::create_span(&event);
        if let Some(refused) = self.refused.take() {
            // The inner service refused readiness: the call starts as a
            // failed first attempt, on a copy that waits for readiness.
            return ResponseFuture::refused(refused, self.inner.clone(), event, self.shared.clone(), span);
        }
        // The ready service makes the first attempt; its clone takes its
        // place here and waits for readiness as usual.
        let clone = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, clone);
        let future = {
            let _entered = span.enter();
            service.call(event.clone())
        };
        ResponseFuture::new(future, service, event, self.shared.clone(), span)
    }
}
