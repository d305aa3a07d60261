//! Batch publishing: a publisher that is also a `Service<Vec<Event>>`.
//!
//! A batch is a `Vec<Event>`; its answer is one `Result` per event, in the
//! batch's order ([`BatchReceipts`]), so that the caller learns which
//! events the broker took and which it refused, and can retry or
//! dead-letter exactly those. Transports whose broker can take many events
//! in one go make a batch publisher from their publisher, with
//! `publisher.batched()`:
//!
//! | transport | `batched()` | a batch is |
//! |---|---|---|
//! | NATS JetStream | [`Pipelined`] | every publish sent at once, the PubAcks awaited together |
//! | Redis Streams | `RedisBatchPublisher` | one pipeline of `XADD`s |
//! | RabbitMQ | `RabbitBatchPublisher` | every publish sent on one channel, the confirms awaited together |
//! | SQL | `SqlBatchPublisher` | one multi-row `INSERT` |
//!
//! The batch publisher is a type of its own rather than a second `Service`
//! impl on the publisher: a type with two `Service` impls makes
//! `publisher.ready()` and `publisher.poll_ready(cx)` ambiguous, and every
//! program that calls them would have to name the request type.
//!
//! Any other publisher, or a stack of layers over one, batches through
//! [`OneByOne`] (each event waits for the previous one's answer: the
//! default for transports that cannot pipeline, such as webhooks) or
//! [`Pipelined`] (every call made at once, the answers awaited together:
//! for a stack over a publisher whose calls travel together, so that
//! retry and dead-letter layers apply to each event of the batch).
//!
//! The outer `Result` of a batch's future is an error only when the batch
//! as a whole could not be tried (the publisher closed); a failure that
//! hits every event (a lost connection) answers each event with it, with
//! the event attached.
//!
//! # Performance
//!
//! `cargo bench -p watchtower-toolkit --bench batch_publish` publishes the
//! same 20,000 events (~200 bytes) one by one (`publish(event).await`, each
//! waiting for its answer) and in batches of 1,000 through `batched()`, in
//! the same run, 3 rounds. One run on 2 cores shared with the brokers and
//! other builds (load average 9 to 14); absolute rates swing from round to
//! round, the ratio is what the run supports:
//!
//! | transport | one by one | batches of 1,000 | ratio, median (rounds) |
//! |---|--:|--:|--:|
//! | JetStream (file stream) | 7.2–12.5 k/s | 30–41 k/s | **4.0×** (3.3, 4.4, 4.0) |
//! | Redis Streams | 8.5–16.2 k/s | 84–159 k/s | **10.7×** (18.7, 5.2, 10.7) |
//! | RabbitMQ (durable queue, persistent, confirms) | 166–282/s | 3.6–4.8 k/s | **17.8×** (17.8, 29.0, 12.7) |
//! | PostgreSQL (`synchronous_commit` on) | 300–864/s | 30–103 k/s | **119×** (101, 158, 119) |
//!
//! One by one, each event pays a round trip (and on RabbitMQ and
//! PostgreSQL a disk flush); a batch pays them once. Concurrent callers of
//! the plain publishers get much of the same gain, since those publishers
//! gather concurrent calls themselves; a batch gets it from one caller.
//!
//! # Example
//!
//! ```
//! use tower::service_fn;
//! use watchtower::batch::OneByOne;
//! use watchtower::{Error, Event, PublishBatchExt, Receipt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! // Any publisher will do: a `Service<Event, Response = Receipt>`.
//! let publisher = service_fn(|event: Event| async move { Ok::<_, Error>(Receipt::for_event(&event)) });
//! let mut batches = OneByOne::new(publisher);
//! let events = (0..3).map(|n| Event::new("user.created", serde_json::json!({"n": n}))).collect();
//! let answers = batches.publish_batch(events).await?;
//! assert_eq!(answers.len(), 3);
//! assert!(answers.iter().all(Result::is_ok));
//! # Ok(()) }
//! ```

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::TryFutureExt as _;
use futures_util::future::{Either, MapErr, Ready, ready};
use futures_util::stream::{FuturesOrdered, StreamExt as _};
use tower::Service;

use crate::error::{BoxError, Error};
use crate::{Event, Receipt};

/// `publish_batch(events)` on any batch publisher (a
/// `Service<Vec<Event>>` answering [`BatchReceipts`]).
pub trait PublishBatchExt: Service<Vec<Event>> {
    /// Waits until the service is ready for a batch, then publishes
    /// `events` as one: one answer per event, in order.
    ///
    /// ```
    /// use tower::service_fn;
    /// use watchtower::batch::Pipelined;
    /// use watchtower::{Error, Event, PublishBatchExt, Receipt};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
    /// let publisher = service_fn(|event: Event| async move { Ok::<_, Error>(Receipt::for_event(&event)) });
    /// let mut publisher = Pipelined::new(publisher);
    /// let answers = publisher.publish_batch(vec![Event::new("a", serde_json::json!(1))]).await?;
    /// assert_eq!(answers.len(), 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// The service's readiness error, or an error of the batch as a whole
    /// (each event's own failure is in its answer).
    fn publish_batch(
        &mut self,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<BatchReceipts, Error>> + Send + '_
    where
        Self: Service<Vec<Event>, Response = BatchReceipts> + Send,
        Self::Future: Send,
        Self::Error: Into<BoxError>;
}

impl<S: Service<Vec<Event>>> PublishBatchExt for S {
    fn publish_batch(
        &mut self,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<BatchReceipts, Error>> + Send + '_
    where
        Self: Service<Vec<Event>, Response = BatchReceipts> + Send,
        Self::Future: Send,
        Self::Error: Into<BoxError>,
    {
        crate::publish::ready_then_call(self, events)
    }
}

/// The answer to a batch: one result per event, in the batch's order.
pub type BatchReceipts = Vec<Result<Receipt, Error>>;

/// The future of a batch publish.
pub type BatchFuture = Pin<Box<dyn Future<Output = Result<BatchReceipts, Error>> + Send>>;

/// Publishes a batch through a `Service<Event>` one event at a time: each
/// call waits for the previous answer, so events arrive in order on any
/// publisher. The batch publish of transports that cannot pipeline.
#[derive(Clone, Debug)]
pub struct OneByOne<S> {
    inner: S,
}

/// Publishes a batch through a `Service<Event>` with every call made
/// before any answer is awaited (each after `poll_ready`, so the inner
/// service's in-flight window still holds), then awaits the answers
/// together. On a publisher whose `call` hands its event to the
/// connection at once (JetStream, Redis, the SQL writer) the events
/// travel together and arrive in order.
#[derive(Clone, Debug)]
pub struct Pipelined<S> {
    inner: S,
}

macro_rules! batch_service {
    ($name:ident, $window:expr, $what:literal) => {
        impl<S> $name<S> {
            #[doc = concat!("Batches through `inner` ", $what, ".")]
            pub fn new(inner: S) -> $name<S> {
                $name { inner }
            }

            /// The inner service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The inner service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// The inner service.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }

        impl<S> Service<Vec<Event>> for $name<S>
        where
            S: Service<Event, Response = Receipt> + Clone + Send + 'static,
            S::Error: Into<BoxError>,
            S::Future: Send + 'static,
        {
            type Response = BatchReceipts;
            type Error = Error;
            type Future = BatchFuture;

            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
                self.inner
                    .poll_ready(cx)
                    .map_err(|e| Error::from_boxed(e.into()))
            }

            fn call(&mut self, events: Vec<Event>) -> BatchFuture {
                publish_each(&mut self.inner, events, $window)
            }
        }
    };
}

batch_service!(OneByOne, 1, "one event at a time");
batch_service!(Pipelined, usize::MAX, "with every call made at once");

/// Publishes `events` through `service` (ready for its first call) in
/// order, with at most `window` answers outstanding: the batch of
/// [`OneByOne`] (`1`) and [`Pipelined`] (`usize::MAX`).
///
/// While it waits for `service` to be ready again it drives the answers
/// outstanding, so that a publisher whose in-flight window frees a place
/// only when an answer is taken cannot wait on itself. An event the
/// service is not ready for is answered with the readiness error.
fn publish_each<S>(service: &mut S, events: Vec<Event>, window: usize) -> BatchFuture
where
    S: Service<Event, Response = Receipt> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    // The service made ready goes into the future; a clone stays.
    let clone = service.clone();
    let mut inner = std::mem::replace(service, clone);
    let window = window.max(1);
    Box::pin(async move {
        let mut answers = Vec::with_capacity(events.len());
        let mut pending: FuturesOrdered<Answer<S::Future, S::Error>> = FuturesOrdered::new();
        let mut first = true;
        for event in events {
            while pending.len() >= window {
                if let Some(answer) = pending.next().await {
                    answers.push(answer);
                }
            }
            let ready_now = if std::mem::take(&mut first) {
                Ok(())
            } else {
                poll_fn(|cx| {
                    while let Poll::Ready(Some(answer)) = pending.poll_next_unpin(cx) {
                        answers.push(answer);
                    }
                    inner.poll_ready(cx)
                })
                .await
            };
            pending.push_back(match ready_now {
                Ok(()) => Either::Left(inner.call(event).map_err(to_error::<S::Error> as fn(_) -> _)),
                Err(e) => Either::Right(ready(Err(to_error(e).with_event(event)))),
            });
        }
        while let Some(answer) = pending.next().await {
            answers.push(answer);
        }
        Ok(answers)
    })
}

/// One event's answer: the inner call's, or the readiness error that kept
/// it from being made.
type Answer<F, E> = Either<MapErr<F, fn(E) -> Error>, Ready<Result<Receipt, Error>>>;

fn to_error<E: Into<BoxError>>(e: E) -> Error {
    Error::from_boxed(e.into())
}
