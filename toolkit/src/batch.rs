//! Batches: a consumer runtime for handlers that take many events at once
//! and settle each on its own.
//!
//! [`serve_batch`] is [`serve`](watchtower::serve()) for a handler that
//! is a `Service<Vec<Event>>` answering one `Result` per event, in order:
//! a bulk insert, a batched HTTP call, a vectorised computation. It
//! gathers deliveries into a batch until the batch holds
//! [`max_size`](ServeBatch::max_size) events or
//! [`max_wait`](ServeBatch::max_wait) has passed since its first event
//! came, calls the handler, and settles every event by its own result,
//! with the rules of `serve`:
//!
//! * `Ok` acks the event;
//! * a retryable error nacks it with a growing redelivery delay, so it
//!   comes back (100 ms, doubling, at most 30 s, or the error's own
//!   retry-after hint);
//! * a non-retryable error, or a retryable one on the
//!   [`max_deliveries`](ServeBatch::max_deliveries)th delivery, sends the
//!   annotated event to the dead-letter path and rejects it;
//! * an error for the whole batch (the handler's `Err`, or a panic) counts
//!   as that error for every event in it; an answer that is short counts
//!   the missing events as failed (retryable);
//! * messages that do not decode never reach the handler: they go to the
//!   dead-letter path as poison, as with `serve`.
//!
//! One batch at a time: the next is gathered once the previous one is
//! settled, so the transport's prefetch or batch size should be at least
//! `max_size`.
//! Redelivered events carry their delivery count in the `attempt`
//! extension. On graceful shutdown, the gathering batch is handled and
//! settled, then the runtime returns its [`ServeStats`].
//!
//! The default dead-letter path is a [`MemoryDeadLetters`], not durable,
//! as with `serve`: set a durable one with [`poison`](ServeBatch::poison).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::service_fn;
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//! use watchtower_toolkit::batch::serve_batch;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let broker = MemoryBroker::new();
//! let subscription = broker.subscriber().open(SubscribeOptions::new(["row.*"])?).await?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(
//!     serve_batch(subscription, service_fn(|rows: Vec<Event>| async move {
//!         println!("inserting {} rows", rows.len());
//!         Ok::<_, Error>(rows.iter().map(|_| Ok(())).collect::<Vec<_>>())
//!     }))
//!     .max_size(500)
//!     .max_wait(Duration::from_millis(50))
//!     .with_graceful_shutdown(async { stopped.await.ok(); })
//!     .into_future(),
//! );
//! broker.publisher().publish(Event::new("row.new", serde_json::json!({"id": 1}))).await?;
//! broker.wait_idle(Duration::from_secs(5)).await;
//! stop.send(()).ok();
//! assert_eq!(server.await.expect("serve task")?.acked, 1);
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::{Future, IntoFuture};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use futures_util::{FutureExt as _, StreamExt as _};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};
use watchtower::backoff::Backoff;
use watchtower::dead_letter::{MemoryDeadLetters, annotate};
use watchtower::{Acker, BoxError, Delivery, Error, ErrorKind, Event, ServeStats, ext};

type DeadLetterPath = BoxCloneSyncService<Event, (), Error>;
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Drives `subscription` into a batch `handler`. See the
/// [module docs](self).
pub fn serve_batch<St, A, H>(subscription: St, handler: H) -> ServeBatch<St, H>
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    H: Service<Vec<Event>, Response = Vec<Result<(), Error>>> + Send + 'static,
    H::Error: Into<BoxError>,
    H::Future: Send + 'static,
{
    let dead_letters = MemoryDeadLetters::default();
    ServeBatch {
        subscription,
        handler,
        max_size: 100,
        max_wait: Duration::from_millis(100),
        poison: BoxCloneSyncService::new(dead_letters.clone()),
        default_dead_letters: Some(dead_letters),
        shutdown: None,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
        max_deliveries: 10,
    }
}

/// A configured batch consumer; `.await` it to run. See [`serve_batch`].
#[must_use = "a ServeBatch does nothing until awaited"]
pub struct ServeBatch<St, H> {
    subscription: St,
    handler: H,
    max_size: usize,
    max_wait: Duration,
    poison: DeadLetterPath,
    default_dead_letters: Option<MemoryDeadLetters>,
    shutdown: Option<Shutdown>,
    backoff: Backoff,
    max_deliveries: u32,
}

impl<St, H> fmt::Debug for ServeBatch<St, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeBatch")
            .field("max_size", &self.max_size)
            .field("max_wait", &self.max_wait)
            .field("redelivery_backoff", &self.backoff)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

impl<St, H> ServeBatch<St, H> {
    /// At most `n` events per batch (at least 1). Default 100.
    pub fn max_size(mut self, n: usize) -> Self {
        self.max_size = n.max(1);
        self
    }

    /// How long a batch waits for more events after its first came.
    /// Default 100 ms: a tenth of a second of added latency buys batches
    /// as large as the traffic allows.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// The dead-letter path, as [`Serve::poison`](watchtower::Serve::poison).
    pub fn poison<P>(mut self, path: P) -> Self
    where
        P: Service<Event> + Clone + Send + Sync + 'static,
        P::Error: Into<BoxError>,
        P::Future: Send + 'static,
    {
        self.poison =
            BoxCloneSyncService::new(path.map_response(|_| ()).map_err(|e| Error::from_boxed(e.into())));
        self.default_dead_letters = None;
        self
    }

    /// The default dead-letter path's queue, unless
    /// [`poison`](ServeBatch::poison) replaced it. Not durable.
    pub fn default_dead_letters(&self) -> Option<&MemoryDeadLetters> {
        self.default_dead_letters.as_ref()
    }

    /// Shuts down gracefully when `signal` completes: the batch being
    /// gathered is handled and settled, then the runtime returns.
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// The redelivery delays, as
    /// [`Serve::redelivery_backoff`](watchtower::Serve::redelivery_backoff).
    /// Default 100 ms, doubling up to 30 s.
    pub fn redelivery_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// Deliveries of one event before it is dead-lettered (at least 1).
    /// Default 10, as `serve`.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }
}

impl<St, A, H> IntoFuture for ServeBatch<St, H>
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    H: Service<Vec<Event>, Response = Vec<Result<(), Error>>> + Send + 'static,
    H::Error: Into<BoxError>,
    H::Future: Send + 'static,
{
    type Output = Result<ServeStats, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<ServeStats, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// One event of a batch, with what settling it needs.
struct Pending<A> {
    event: Event,
    topic: Arc<str>,
    count: u32,
    acker: A,
}

impl<St, A, H> ServeBatch<St, H>
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    H: Service<Vec<Event>, Response = Vec<Result<(), Error>>> + Send + 'static,
    H::Error: Into<BoxError>,
    H::Future: Send + 'static,
{
    async fn run(self) -> Result<ServeStats, Error> {
        let ServeBatch {
            mut subscription,
            mut handler,
            max_size,
            max_wait,
            poison,
            shutdown,
            backoff,
            max_deliveries,
            ..
        } = self;
        let mut shutdown = shutdown.unwrap_or_else(|| Box::pin(std::future::pending()));
        let mut stats = ServeStats::default();
        let settle = Settle {
            backoff,
            max_deliveries,
            dead_letter: poison,
        };
        let mut stopping = false;
        while !stopping {
            // Wait for the first event of a batch.
            let first = tokio::select! {
                _ = &mut shutdown => break,
                next = subscription.next() => next,
            };
            let mut batch = Vec::with_capacity(max_size);
            let Some(first) = first else { break };
            let mut ended = !take(first, &mut batch, &settle, &mut stats).await;
            let deadline = tokio::time::sleep(max_wait);
            tokio::pin!(deadline);
            while !ended && batch.len() < max_size {
                tokio::select! {
                    biased;
                    _ = &mut shutdown, if !stopping => stopping = true,
                    // What is ready joins the batch before the deadline
                    // is looked at: a late wake-up does not split it.
                    next = subscription.next() => match next {
                        Some(item) => ended = !take(item, &mut batch, &settle, &mut stats).await,
                        None => ended = true,
                    },
                    _ = &mut deadline => break,
                }
                if stopping {
                    break;
                }
            }
            if !batch.is_empty()
                && let Err(e) = handle(&mut handler, batch, &settle, &mut stats).await
            {
                tracing::error!(error = %e, "batch handler failed in poll_ready; stopping");
                return Err(e);
            }
            if ended {
                break;
            }
        }
        Ok(stats)
    }
}

struct Settle {
    backoff: Backoff,
    max_deliveries: u32,
    dead_letter: DeadLetterPath,
}

/// Adds one item of the subscription to the batch (poison goes straight
/// to the dead-letter path). Returns whether the subscription goes on.
async fn take<A: Acker>(
    item: Result<Delivery<A>, Error>,
    batch: &mut Vec<Pending<A>>,
    settle: &Settle,
    stats: &mut ServeStats,
) -> bool {
    let delivery = match item {
        Ok(delivery) => delivery,
        Err(e) => {
            stats.stream_errors += 1;
            tracing::warn!(error = %e, "subscription reported an error");
            return true;
        }
    };
    stats.received += 1;
    let count = delivery.delivery_count();
    let topic = delivery.shared_topic();
    let (content, acker) = delivery.into_parts();
    match content {
        Ok(mut event) => {
            if count > 1 {
                // A number is a valid value of a valid, known name.
                let _ = event.set_extension(ext::ATTEMPT, count.to_string());
            }
            batch.push(Pending {
                event,
                topic,
                count,
                acker,
            });
        }
        Err(poison) => {
            tracing::warn!(topic = &*topic, error = %poison.error, "message is not a valid event; sending it to the dead-letter path");
            if dead_letter(poison.into_event(), acker, settle, stats).await {
                stats.poisoned += 1;
            }
        }
    }
    true
}

async fn handle<A, H>(
    handler: &mut H,
    batch: Vec<Pending<A>>,
    settle: &Settle,
    stats: &mut ServeStats,
) -> Result<(), Error>
where
    A: Acker,
    H: Service<Vec<Event>, Response = Vec<Result<(), Error>>>,
    H::Error: Into<BoxError>,
{
    handler.ready().await.map_err(|e| Error::from_boxed(e.into()))?;
    let events: Vec<Event> = batch.iter().map(|p| p.event.clone()).collect();
    let len = events.len();
    let answer = match std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(events))) {
        // Reduced to `Send` types before awaiting.
        Ok(fut) => {
            AssertUnwindSafe(fut.map(|r| r.map_err(|e| Error::from_boxed(e.into()))))
                .catch_unwind()
                .await
        }
        Err(panic) => Err(panic),
    };
    let mut results: Vec<Result<(), Error>> = match answer {
        Ok(Ok(results)) => results,
        Ok(Err(e)) => (0..len).map(|_| Err(copy(&e))).collect(),
        Err(_panic) => {
            stats.panics += 1;
            tracing::error!("batch handler panicked");
            (0..len)
                .map(|_| Err(Error::new(ErrorKind::Handler, "handler panicked")))
                .collect()
        }
    };
    if results.len() != len {
        tracing::warn!(
            expected = len,
            got = results.len(),
            "batch handler answered for a different number of events"
        );
    }
    results.resize_with(len, || {
        Err(Error::new(
            ErrorKind::Handler,
            "the batch handler gave no result for this event",
        ))
    });
    for (pending, result) in batch.into_iter().zip(results) {
        settle_one(pending, result, settle, stats).await;
    }
    Ok(())
}

/// The same failure for another event of the batch.
fn copy(e: &Error) -> Error {
    let mut copy = Error::new(e.kind(), e.message().to_owned()).with_retryable(e.is_retryable());
    if let Some(after) = e.retry_after() {
        copy = copy.with_retry_after(after);
    }
    copy
}

async fn settle_one<A: Acker>(
    pending: Pending<A>,
    result: Result<(), Error>,
    settle: &Settle,
    stats: &mut ServeStats,
) {
    let Pending {
        event,
        topic,
        count,
        acker,
    } = pending;
    match result {
        Ok(()) => match acker.ack().await {
            Ok(()) => stats.acked += 1,
            Err(e) => settle_failed(&e, stats),
        },
        Err(e) if !e.is_retryable() || count >= settle.max_deliveries => {
            stats.handler_errors += 1;
            let event = annotate(event, &e, &topic, Some(count));
            if dead_letter(event, acker, settle, stats).await {
                stats.dead_lettered += 1;
            }
        }
        Err(e) => {
            stats.handler_errors += 1;
            let delay = e.retry_after().unwrap_or_else(|| settle.backoff.delay(count));
            match acker.nack(Some(delay)).await {
                Ok(()) => stats.nacked += 1,
                Err(e) => settle_failed(&e, stats),
            }
        }
    }
}

fn settle_failed(e: &Error, stats: &mut ServeStats) {
    stats.settle_errors += 1;
    tracing::warn!(error = %e, "could not settle a delivery; the transport will redeliver it");
}

/// Sends `event` to the dead-letter path and rejects its delivery; if the
/// path fails, nacks it so the transport keeps it. Returns whether it was
/// dead-lettered.
async fn dead_letter<A: Acker>(event: Event, acker: A, settle: &Settle, stats: &mut ServeStats) -> bool {
    match settle.dead_letter.clone().oneshot(event).await {
        Ok(()) => match acker.reject().await {
            Ok(()) => true,
            Err(e) => {
                settle_failed(&e, stats);
                false
            }
        },
        Err(e) => {
            stats.poison_errors += 1;
            tracing::error!(error = %e, "dead-letter path failed; nacking so the transport keeps the message");
            match acker
                .nack(Some(Duration::from_secs(1).max(settle.backoff.initial())))
                .await
            {
                Ok(()) => stats.nacked += 1,
                Err(e) => settle_failed(&e, stats),
            }
            false
        }
    }
}
