//! Dead letter: an event that cannot be delivered is kept, never lost.
//!
//! [`DeadLetterLayer`] sits outermost. When the services below fail for
//! good — the retry layer gave up, the circuit breaker is open, the
//! backpressure queue dropped the event, or the event was simply refused —
//! it sends the event to a dead-letter service, any `Service<Event>`:
//!
//! * a broker transport (a NATS subject, a Redis stream, a RabbitMQ queue;
//!   build the layer with
//!   [`with_topic`](DeadLetterLayer::with_topic) so it does not go back to the
//!   original topic);
//! * a bounded in-memory queue with inspection,
//!   [`MemoryDeadLetters`](watchtower::dead_letter::MemoryDeadLetters);
//! * an append-only JSON-lines file, [`FileDeadLetters`].
//!
//! The event is annotated with the extensions of
//! [`watchtower::ext`]: `deadletterreason` (the error's text),
//! `deadletterkind` ([`ErrorKind::as_str`](watchtower::ErrorKind::as_str)),
//! `deadlettertopic` (where it was going), `deadlettertime` (RFC 3339) and
//! `attempt` (from the retry layer below, `1` if there was none).
//!
//! # Response
//!
//! The layer answers [`Outcome`]: `Ok(Outcome::Delivered(response))` or
//! `Ok(Outcome::DeadLettered(..))` with the annotated event and the
//! failure. Both are `Ok` because in both cases the event is safe; use
//! [`Outcome::into_result`] where "dead-lettered" must be an error. If the
//! dead-letter service fails too, the caller gets `Err`: an error of the
//! original kind whose text names both failures, whose source is a
//! [`DeadLetterFailed`] holding both, and which carries the event
//! ([`Error::event`](watchtower::Error::event)). Nothing disappears.
//!
//! # Readiness
//!
//! When the inner service's `poll_ready` fails (an open circuit breaker
//! fails fast there), this layer reports ready, keeps the error, and
//! dead-letters the next event with it without calling the inner service.
//! So a stack with a dead-letter layer on top never fails `poll_ready`,
//! which is what the consumer runtime and axum expect.
//!
//! # Order
//!
//! Dead letter goes **outermost**, above retry. Placed below a retry
//! layer, it would answer `Ok(DeadLettered)` to the first failure and the
//! retry layer would never see an error to retry: events would be
//! dead-lettered on their first transient failure. The
//! [`ServiceBuilderExt`](crate::ServiceBuilderExt) docs list the order.
//!
//! # Example
//!
//! ```
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use watchtower::dead_letter::MemoryDeadLetters;
//! use watchtower::{Error, ErrorKind, Event};
//! use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let dlq = MemoryDeadLetters::new(1000);
//! let mut svc = ServiceBuilder::new()
//!     .layer(DeadLetterLayer::new(dlq.clone()))
//!     .service(service_fn(|_: Event| async {
//!         Err::<(), _>(Error::new(ErrorKind::Rejected, "unknown stream"))
//!     }));
//!
//! let outcome = svc.ready().await?.call(Event::empty("order.placed")).await?;
//! assert!(matches!(outcome, Outcome::DeadLettered(_)));
//! let kept = dlq.drain();
//! assert_eq!(kept[0].extension("deadletterkind"), Some("rejected"));
//! assert_eq!(kept[0].extension("deadlettertopic"), Some("order.placed"));
//! assert_eq!(kept[0].extension("attempt"), Some("1"));
//! # Ok(()) }
//! ```

mod file;
mod future;
mod outcome;
mod redrive;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use serde::Serialize;
use tower::{Layer, Service};
use watchtower::{BoxError, Error, ErrorKind, Event};

use crate::metrics::DeadLetterMetrics;

pub use file::{FileContents, FileDeadLetters, WriteFuture};
pub use future::ResponseFuture;
pub use outcome::{DeadLetterFailed, DeadLettered, Outcome};
pub use redrive::{RedriveReport, redrive, redrive_memory, restore};

pub(crate) struct Shared<D> {
    dlq: D,
    topic: Option<Arc<str>>,
    name: Arc<str>,
    stats: Counters,
    metrics: DeadLetterMetrics,
}

#[derive(Debug, Default)]
struct Counters {
    dead_lettered: AtomicU64,
    failed: AtomicU64,
}

impl<D> Shared<D> {
    fn new(dlq: D, topic: Option<Arc<str>>, name: Arc<str>) -> Arc<Self> {
        Arc::new(Shared {
            dlq,
            topic,
            metrics: DeadLetterMetrics::new(&name),
            name,
            stats: Counters::default(),
        })
    }

    /// The dead-letter service took an event that failed with `kind`.
    fn dead_lettered(&self, kind: ErrorKind) {
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.metrics.dead_lettered(kind);
    }

    /// The dead-letter service refused an event that failed with `kind`.
    fn failed(&self, kind: ErrorKind) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.metrics.failed(kind);
    }
}

/// Adds the dead-letter extensions to `event`, and routes it to `topic`
/// when one is set.
fn annotate(event: Event, failure: &Error, topic: Option<&str>) -> Event {
    let original = event.topic().to_owned();
    let mut event = watchtower::dead_letter::annotate(event, failure, &original, None);
    if let Some(topic) = topic {
        event.set_topic(topic);
    }
    event
}

/// Counters of a dead-letter layer, as of one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetterStats {
    /// Events the dead-letter service took.
    pub dead_lettered: u64,
    /// Events the dead-letter service refused (returned to their callers).
    pub failed: u64,
}

/// A cloneable handle on a dead-letter layer's counters.
pub struct DeadLetterHandle<D> {
    shared: Arc<Shared<D>>,
}

impl<D> Clone for DeadLetterHandle<D> {
    fn clone(&self) -> Self {
        DeadLetterHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<D> DeadLetterHandle<D> {
    /// The counters now.
    pub fn stats(&self) -> DeadLetterStats {
        DeadLetterStats {
            dead_lettered: self.shared.stats.dead_lettered.load(Ordering::Relaxed),
            failed: self.shared.stats.failed.load(Ordering::Relaxed),
        }
    }

    /// The dead-letter service (e.g. to inspect a
    /// [`MemoryDeadLetters`](watchtower::dead_letter::MemoryDeadLetters)).
    pub fn dead_letters(&self) -> &D {
        &self.shared.dlq
    }
}

impl<D> fmt::Debug for DeadLetterHandle<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DeadLetterHandle").field(&self.stats()).finish()
    }
}

/// Sends events the inner service fails on to a dead-letter service `D`.
/// Services from one layer share `D` and the counters.
pub struct DeadLetterLayer<D> {
    shared: Arc<Shared<D>>,
}

impl<D> DeadLetterLayer<D> {
    /// Dead-letters into `dlq`, any `Service<Event>` that is `Clone`
    /// (wrap one that is not in `tower::buffer::Buffer`).
    pub fn new(dlq: D) -> Self {
        DeadLetterLayer {
            shared: Shared::new(dlq, None, Arc::from("")),
        }
    }

    /// Dead-letters into `dlq` with the events' topic set to `topic`, for
    /// a broker dead-letter service, so that dead letters do not go back to
    /// the topic that failed (the original is kept in `deadlettertopic`).
    pub fn with_topic(dlq: D, topic: impl Into<Arc<str>>) -> Self {
        DeadLetterLayer {
            shared: Shared::new(dlq, Some(topic.into()), Arc::from("")),
        }
    }

    /// The `name` label of the layer's [metrics](crate::metrics).
    /// Default: empty, labelled `default`.
    ///
    /// Name the layer before taking its [`handle`](Self::handle): the
    /// named layer starts counting afresh.
    pub fn name(self, name: impl Into<Arc<str>>) -> Self
    where
        D: Clone,
    {
        DeadLetterLayer {
            shared: Shared::new(self.shared.dlq.clone(), self.shared.topic.clone(), name.into()),
        }
    }

    /// A handle on the counters and the dead-letter service.
    pub fn handle(&self) -> DeadLetterHandle<D> {
        DeadLetterHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<D: tower::Service<Event>> From<D> for DeadLetterLayer<D> {
    fn from(dlq: D) -> Self {
        DeadLetterLayer::new(dlq)
    }
}

impl<D> Clone for DeadLetterLayer<D> {
    fn clone(&self) -> Self {
        DeadLetterLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<D> fmt::Debug for DeadLetterLayer<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterLayer")
            .field("name", &self.shared.name)
            .field("topic", &self.shared.topic)
            .finish_non_exhaustive()
    }
}

impl<S, D> Layer<S> for DeadLetterLayer<D> {
    type Service = DeadLetter<S, D>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadLetter {
            inner,
            shared: self.shared.clone(),
            not_ready: None,
        }
    }
}

/// Dead-letters the events `S` fails on. See the [module docs](self).
pub struct DeadLetter<S, D> {
    inner: S,
    shared: Arc<Shared<D>>,
    not_ready: Option<Error>,
}

impl<S, D> DeadLetter<S, D> {
    /// Dead-letters the events `inner` fails on into `dlq`.
    pub fn new(inner: S, dlq: D) -> Self {
        DeadLetterLayer::new(dlq).layer(inner)
    }

    /// A handle on the counters and the dead-letter service.
    pub fn handle(&self) -> DeadLetterHandle<D> {
        DeadLetterHandle {
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

impl<S: Clone, D> Clone for DeadLetter<S, D> {
    fn clone(&self) -> Self {
        DeadLetter {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            not_ready: None,
        }
    }
}

impl<S: fmt::Debug, D> fmt::Debug for DeadLetter<S, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("inner", &self.inner)
            .field("not_ready", &self.not_ready)
            .finish_non_exhaustive()
    }
}

impl<S, D> Service<Event> for DeadLetter<S, D>
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
    D: Service<Event> + Clone,
    D::Error: Into<BoxError>,
{
    type Response = Outcome<S::Response>;
    type Error = Error;
    type Future = ResponseFuture<S::Future, D>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(Error::from_boxed(e.into()));
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let span = watchtower::trace::create_span(&event);
        match self.not_ready.take() {
            Some(error) => ResponseFuture::not_ready(error, event, self.shared.clone(), span),
            None => {
                let future = {
                    let _entered = span.enter();
                    self.inner.call(event.clone())
                };
                ResponseFuture::called(future, event, self.shared.clone(), span)
            }
        }
    }
}
