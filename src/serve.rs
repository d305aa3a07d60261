//! The consumer runtime: [`serve`](crate::serve()).

use std::fmt;
use std::future::{Future, IntoFuture, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_core::Stream;
use futures_util::future::OptionFuture;
use futures_util::{FutureExt as _, StreamExt as _, stream::FuturesUnordered};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::dead_letter::MemoryDeadLetters;
use crate::error::{BoxError, Error};
use crate::event::{Event, ext};
use crate::subscribe::{Acker, Delivery, SubscribeOptions, Subscriber};
use crate::trace::{ConsumerMeter, Settlement, process_span_in, record_error};

/// How many events may be settling (ack on its way) per concurrency slot.
const SETTLING_FACTOR: usize = 4;

/// The redelivery delay after a failed first delivery, doubled on each
/// further one.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The longest redelivery delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Deliveries of one event before the runtime gives up on it.
const MAX_DELIVERIES: u32 = 10;

/// How long to wait before a message whose dead-letter path failed comes
/// back, at least.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Events in flight at once unless set: 64, enough to hide broker round
/// trips without unbounded work.
pub(crate) const DEFAULT_CONCURRENCY: usize = 64;

/// How long shutdown waits for in-flight events unless set: 30 s, the
/// JetStream ack-wait default, so a broker would redeliver about then
/// anyway.
pub(crate) const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

type DeadLetterPath = BoxCloneSyncService<Event, (), Error>;
type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Drives `subscription` into `handler`.
///
/// The consumer runtime: drives a subscription into a handler service.
///
/// [`serve`](crate::serve()) takes a subscription (a stream of
/// [`Delivery`]s) and a handler, any `Service<Event>` — often
/// [`tower::service_fn`], often wrapped in layers — and:
///
/// * keeps at most [`concurrency`](Serve::concurrency) events in flight,
///   and pulls nothing from the subscription while the handler's
///   `poll_ready` is pending;
/// * acknowledges an event when the handler returns `Ok`, and nacks it when
///   the handler returns a retryable `Err` or panics — a panic is an error,
///   not a crash — asking the transport to redeliver it after a growing
///   delay (100 ms, doubling on each delivery up to 30 s by default, see
///   [`redelivery_backoff`](Serve::redelivery_backoff); the error's own
///   [`retry_after`](crate::Error::retry_after) hint wins when it has one);
///   a redelivered event carries its delivery count in the `attempt`
///   extension;
/// * gives up on an event when the handler's error is not retryable (a
///   decode error will not go away) or the delivery count reaches
///   [`max_deliveries`](Serve::max_deliveries) (10 by default): the event,
///   annotated by [`annotate`](crate::dead_letter::annotate), goes to the
///   dead-letter path and the delivery is rejected;
/// * sends messages that did not decode to the same dead-letter path (set
///   with [`poison`](Serve::poison); by default a [`MemoryDeadLetters`]) as
///   [`Poison::into_event`](crate::Poison::into_event) events, then rejects
///   them so they do not loop; if the dead-letter path fails, the message
///   is nacked and kept by the transport;
/// * on graceful shutdown stops pulling, lets in-flight events finish
///   within [`shutdown_timeout`](Serve::shutdown_timeout), settles them and
///   returns the final [`ServeStats`]. Events still running at the deadline
///   are dropped unsettled, which makes the transport redeliver them.
///
/// Handler futures run concurrently on the serving task; spawn inside the
/// handler for CPU-heavy work.
///
/// # The default dead-letter path is not durable
///
/// Unless [`poison`](Serve::poison) names a durable path (a dead-letter
/// stream or queue on the broker, a file), what the runtime gives up on is
/// kept in a [`MemoryDeadLetters`] in this process's memory, and **lost
/// when the process exits**; the delivery has been rejected, so the broker
/// no longer has it either. Every event that goes there is logged at WARN
/// with its id. Read it with
/// [`default_dead_letters`](Serve::default_dead_letters) (or
/// [`SubscriptionHandle::dead_letters`]), or set a durable path for
/// production.
///
/// # Redelivery delays
///
/// The delay is asked of the transport with the nack. Transports that
/// declare [`Capabilities::nack_delay`](crate::Capabilities::nack_delay)
/// (memory, NATS JetStream, Redis, RabbitMQ) honour it; one that cannot
/// delay redelivers at once, and [`max_deliveries`](Serve::max_deliveries)
/// still bounds the attempts.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower::service_fn;
/// use watchtower::{serve, Event, PublishExt, SubscribeOptions, Subscriber};
/// use watchtower_memory::MemoryBroker;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let broker = MemoryBroker::new();
/// let subscription = broker.subscriber().open(SubscribeOptions::new(["user.*"])?).await?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(
///     serve(subscription, service_fn(|event: Event| async move {
///         println!("got {}", event.ty());
///         Ok::<_, watchtower::Error>(())
///     }))
///     .concurrency(16)
///     .with_graceful_shutdown(async { stopped.await.ok(); })
///     .into_future(),
/// );
/// broker.publisher().publish(Event::new("user.created", serde_json::json!({}))).await?;
/// broker.wait_idle(Duration::from_secs(5)).await;
/// stop.send(()).ok();
/// let stats = server.await.expect("serve task")?;
/// assert_eq!(stats.acked, 1);
/// # Ok(()) }
/// ```
///
///
/// Configure with the builder methods, then `.await` it (or call
/// [`into_future`](IntoFuture::into_future) to spawn it).
pub fn serve<St, A, H>(subscription: St, handler: H) -> Serve<St, H>
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    H: Service<Event> + Send + 'static,
    H::Error: Into<BoxError>,
    H::Future: Send + 'static,
{
    let dead_letters = MemoryDeadLetters::default();
    Serve {
        subscription,
        handler,
        concurrency: DEFAULT_CONCURRENCY,
        poison: BoxCloneSyncService::new(dead_letters.clone()),
        default_dead_letters: Some(dead_letters),
        shutdown: None,
        shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
        max_deliveries: MAX_DELIVERIES,
        counters: Arc::default(),
    }
}

/// A configured consumer runtime; `.await` it to run. See [`serve`].
#[must_use = "a Serve does nothing until awaited"]
pub struct Serve<St, H> {
    subscription: St,
    handler: H,
    concurrency: usize,
    poison: DeadLetterPath,
    default_dead_letters: Option<MemoryDeadLetters>,
    shutdown: Option<Shutdown>,
    shutdown_timeout: Duration,
    backoff: Backoff,
    max_deliveries: u32,
    counters: Arc<Counters>,
}

impl<St, H> fmt::Debug for Serve<St, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("concurrency", &self.concurrency)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("redelivery_backoff", &self.backoff)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

impl<St, H> Serve<St, H> {
    /// At most `n` events in the handler at once (at least 1). Default
    /// 64, enough to hide broker round trips without unbounded work. Events whose handler finished but whose
    /// settlement is still on its way to the broker do not count, up to
    /// four times `n` in all, so that transports that batch their acks
    /// keep the handler busy.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The dead-letter path: where messages that do not decode go, as
    /// [`Poison::into_event`](crate::Poison::into_event) events, and events
    /// the handler gave up on. Any cloneable `Service<Event>` (a
    /// dead-letter stream, a file). Default: a [`MemoryDeadLetters`] of the
    /// default capacity, which is **not durable**: what it holds is lost
    /// when the process exits, so every event sent there is logged at WARN
    /// with its id. Set a durable path in production.
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
    /// [`poison`](Serve::poison) replaced it. Not durable: see the
    /// [docs of `serve`](crate::serve()#the-default-dead-letter-path-is-not-durable).
    pub fn default_dead_letters(&self) -> Option<&MemoryDeadLetters> {
        self.default_dead_letters.as_ref()
    }

    /// Shuts down gracefully when `signal` completes (a Ctrl-C future, a
    /// [`CancellationToken::cancelled_owned`](tokio_util::sync::CancellationToken::cancelled_owned)).
    pub fn with_graceful_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown = Some(Box::pin(signal));
        self
    }

    /// How long shutdown (or the end of the subscription) waits for
    /// in-flight events. Default 30 s, the JetStream ack-wait default, so a broker would redeliver about then anyway.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// A fixed redelivery delay, the same after every failed delivery:
    /// shorthand for [`redelivery_backoff(delay, delay)`](Serve::redelivery_backoff).
    pub fn nack_delay(self, delay: Duration) -> Self {
        self.redelivery_backoff(delay, delay)
    }

    /// The delay asked of the transport when nacking after a handler error
    /// or panic: `initial` after the first delivery, doubled after each
    /// further one, at most `max`. A retry-after hint on the handler's
    /// error ([`Error::with_retry_after`]) is used instead when present.
    /// Default: 100 ms doubling up to 30 s (the JetStream ack-wait default),
    /// so that a failing event comes back quickly once or twice, then
    /// slowly, and never in a busy loop; with the default
    /// [`max_deliveries`](Serve::max_deliveries) an event is tried for
    /// about 50 s before it is given up on.
    pub fn redelivery_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// Gives up on an event whose handler still fails on its `n`th
    /// delivery (by the transport's delivery count, at least 1): it goes to
    /// the dead-letter path and is rejected. Default 10: enough for a
    /// passing failure to clear under the default
    /// [`redelivery_backoff`](Serve::redelivery_backoff), few enough that an
    /// event the handler can never take (a panic on its content) stops
    /// costing work within a minute. `u32::MAX` means no limit.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// A handle to read the statistics while the runtime runs.
    pub fn stats(&self) -> StatsHandle {
        StatsHandle(self.counters.clone())
    }
}

impl<St, A, H> IntoFuture for Serve<St, H>
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    H: Service<Event> + Send + 'static,
    H::Error: Into<BoxError>,
    H::Future: Send + 'static,
{
    type Output = Result<ServeStats, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<ServeStats, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

enum Step {
    End,
    Shutdown,
    HandlerFailed(Error),
}

/// Starts handling one delivery: counts it, opens its span, calls the
/// handler (or prepares the dead-letter path for poison).
fn dispatch<A, H>(
    delivery: Delivery<A>,
    handler: &mut H,
    settle: &Settle,
) -> (Work<H::Future>, A, tracing::Span, ConsumerMeter)
where
    A: Acker,
    H: Service<Event>,
{
    let counters = &settle.counters;
    counters.received.fetch_add(1, Ordering::Relaxed);
    counters.in_flight.fetch_add(1, Ordering::Relaxed);
    settle.handling.fetch_add(1, Ordering::Relaxed);
    let span = match delivery.event() {
        Some(event) => process_span_in(
            delivery.system(),
            delivery.topic(),
            event,
            delivery.delivery_count(),
            delivery.group(),
        ),
        None => tracing::Span::current(),
    };
    let count = delivery.delivery_count();
    let topic = delivery.shared_topic();
    let meter = ConsumerMeter::received(delivery.system(), &topic, count);
    let (content, acker) = delivery.into_parts();
    let work = match content {
        Ok(mut event) => {
            if count > 1 {
                event.insert_extension(ext::ATTEMPT, count.to_string().into());
            }
            let _entered = span.enter();
            let kept = event.clone();
            let call = std::panic::catch_unwind(AssertUnwindSafe(|| handler.call(event))).ok();
            Work::Handle {
                call,
                event: kept,
                topic,
                count,
            }
        }
        Err(poison) => {
            meter.poison();
            tracing::warn!(
                topic = &*poison.raw.topic,
                error = %poison.error,
                body_len = poison.raw.body.len(),
                "message is not a valid event; sending it to the dead-letter path"
            );
            Work::Poison(poison.into_event())
        }
    };
    (work, acker, span, meter)
}

impl<St, A, H> Serve<St, H>
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    H: Service<Event> + Send + 'static,
    H::Error: Into<BoxError>,
    H::Future: Send + 'static,
{
    async fn run(self) -> Result<ServeStats, Error> {
        let Serve {
            mut subscription,
            mut handler,
            concurrency,
            poison: dead_letter,
            shutdown,
            shutdown_timeout,
            backoff,
            max_deliveries,
            counters,
            default_dead_letters,
            ..
        } = self;
        let mut shutdown = shutdown.unwrap_or_else(|| Box::pin(std::future::pending()));
        let mut fatal = None;
        let settle = Settle {
            counters: counters.clone(),
            backoff,
            max_deliveries,
            dead_letter,
            durable: default_dead_letters.is_none(),
            handling: AtomicUsize::new(0),
        };
        let mut in_flight = FuturesUnordered::new();
        // The allocation of the last event that finished on the spot,
        // reused for the next one.
        let mut spare = None;
        // One poll takes every delivery that is ready (within tokio's
        // cooperative budget) and dispatches it on the spot.
        let stop = poll_fn(|cx| {
            // Both register this task's waker, so polling them once per
            // wake-up is enough: a shutdown signal or a finished event
            // wakes the task again.
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Shutdown);
            }
            let mut polled_in_flight = false;
            loop {
                // The bound counts events in the handler; events whose
                // settlement is on its way to the broker (a batched ack)
                // do not hold a slot, within a hard cap.
                let full = |in_flight: &FuturesUnordered<_>| {
                    settle.handling.load(Ordering::Relaxed) >= concurrency
                        || in_flight.len() >= concurrency.saturating_mul(SETTLING_FACTOR)
                };
                if !polled_in_flight || full(&in_flight) {
                    while let Poll::Ready(Some(_)) = in_flight.poll_next_unpin(cx) {}
                    polled_in_flight = true;
                    if full(&in_flight) {
                        return Poll::Pending;
                    }
                }
                match handler.poll_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Step::HandlerFailed(Error::from_boxed(e.into())));
                    }
                    Poll::Ready(Ok(())) => {}
                }
                // Take part in tokio's cooperative budget: a subscription
                // that always has a message ready must not starve the
                // other tasks of the runtime.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                let delivery = match std::task::ready!(subscription.poll_next_unpin(cx)) {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => {
                        coop.made_progress();
                        counters.stream_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "subscription reported an error");
                        continue;
                    }
                    None => return Poll::Ready(Step::End),
                };
                coop.made_progress();
                let (work, acker, span, meter) = dispatch(delivery, &mut handler, &settle);
                // Most handlers finish without waiting: settle those here,
                // and keep only the rest in the in-flight set.
                let mut slot = spare.take().unwrap_or_else(|| Box::pin(OptionFuture::from(None)));
                slot.as_mut()
                    .set(Some(process(work, acker, meter, &settle).instrument(span)).into());
                if slot.as_mut().poll(cx).is_pending() {
                    in_flight.push(slot);
                } else {
                    slot.as_mut().set(None.into());
                    spare = Some(slot);
                }
            }
        })
        .await;
        match stop {
            Step::End | Step::Shutdown => {}
            Step::HandlerFailed(e) => {
                tracing::error!(error = %e, "handler failed in poll_ready; stopping");
                fatal = Some(e);
            }
        }
        let drained = tokio::time::timeout(shutdown_timeout, async {
            while in_flight.next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                abandoned = in_flight.len(),
                "shutdown deadline passed; unsettled events will be redelivered"
            );
        }
        drop(in_flight);
        drop(subscription);
        match fatal {
            Some(e) => Err(e),
            None => Ok(StatsHandle(counters).snapshot()),
        }
    }
}

enum Work<F> {
    Handle {
        /// The handler's future, or `None` if `call` itself panicked.
        call: Option<F>,
        /// The event, for the dead-letter path if the handler gives up.
        event: Event,
        topic: Arc<str>,
        count: u32,
    },
    Poison(Event),
}

struct Settle {
    counters: Arc<Counters>,
    backoff: Backoff,
    max_deliveries: u32,
    dead_letter: DeadLetterPath,
    /// Whether the dead-letter path was set by the user (else it is the
    /// in-memory default, whose every event is logged loudly).
    durable: bool,
    /// Events whose handler (or dead-letter path) has not finished.
    handling: AtomicUsize,
}

async fn process<F, R, E, A>(work: Work<F>, acker: A, meter: ConsumerMeter, ctx: &Settle)
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    A: Acker,
{
    let counters = &ctx.counters;
    let settled = match work {
        Work::Handle {
            call,
            event,
            topic,
            count,
        } => {
            // Reduce the handler's result to types that are `Send` before
            // awaiting the settlement.
            let outcome: Result<(), Error> = match call {
                Some(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => {
                        counters.handler_errors.fetch_add(1, Ordering::Relaxed);
                        Err(Error::from_boxed(e.into()))
                    }
                    Err(_panic) => Err(panicked(counters)),
                },
                None => Err(panicked(counters)),
            };
            ctx.handling.fetch_sub(1, Ordering::Relaxed);
            let failure = outcome.as_ref().err().map(|e| e.kind().as_str());
            meter.processed(failure);
            if let Err(e) = &outcome {
                record_error(&tracing::Span::current(), e);
            }
            match outcome {
                Ok(()) => {
                    let settled = acker.ack().await;
                    crate::trace::settled("ack", &settled);
                    if settled.is_ok() {
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                        meter.settled(Settlement::Ack);
                    }
                    settled
                }
                Err(e) if !e.is_retryable() || count >= ctx.max_deliveries => {
                    tracing::debug!(error = %e, attempts = count, "handler gave up; dead-lettering");
                    let event = crate::dead_letter::annotate(event, &e, &topic, Some(count));
                    let settled = dead_letter(event, acker, ctx, &counters.dead_lettered, &meter).await;
                    if let Ok(true) = settled {
                        meter.settled(Settlement::DeadLetter);
                    }
                    settled.map(drop)
                }
                Err(e) => {
                    let delay = e.retry_after().unwrap_or_else(|| ctx.backoff.delay(count));
                    tracing::debug!(error = %e, attempts = count, ?delay, "handler failed; nacking");
                    nack(acker, Some(delay), counters, &meter).await
                }
            }
        }
        Work::Poison(event) => {
            ctx.handling.fetch_sub(1, Ordering::Relaxed);
            let settled = dead_letter(event, acker, ctx, &counters.poisoned, &meter).await;
            if let Ok(true) = settled {
                meter.settled(Settlement::Reject);
            }
            settled.map(drop)
        }
    };
    if let Err(e) = settled {
        counters.settle_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "could not settle a delivery; the transport will redeliver it");
    }
    counters.in_flight.fetch_sub(1, Ordering::Relaxed);
}

fn panicked(counters: &Counters) -> Error {
    counters.panics.fetch_add(1, Ordering::Relaxed);
    tracing::error!("handler panicked");
    Error::new(crate::ErrorKind::Handler, "handler panicked")
}

/// Sends `event` to the dead-letter path and rejects the delivery (`true`);
/// if the path fails, nacks it so that the transport keeps it (`false`).
async fn dead_letter<A: Acker>(
    event: Event,
    acker: A,
    ctx: &Settle,
    counter: &AtomicU64,
    meter: &ConsumerMeter,
) -> Result<bool, Error> {
    let id = (!ctx.durable).then(|| event.id_shared());
    match ctx.dead_letter.clone().oneshot(event).await {
        Ok(()) => {
            if let Some(id) = id {
                tracing::warn!(
                    event_id = &*id,
                    "event sent to the default in-memory dead-letter queue, which is lost when \
                     the process exits; set a durable path with `Serve::poison`"
                );
            }
            let settled = acker.reject().await;
            crate::trace::settled("reject", &settled);
            if settled.is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            settled.map(|()| true)
        }
        Err(e) => {
            ctx.counters.poison_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "dead-letter path failed; nacking so the transport keeps the message");
            nack(
                acker,
                Some(DEAD_LETTER_RETRY.max(ctx.backoff.initial())),
                &ctx.counters,
                meter,
            )
            .await
            .map(|()| false)
        }
    }
}

async fn nack<A: Acker>(
    acker: A,
    delay: Option<Duration>,
    counters: &Counters,
    meter: &ConsumerMeter,
) -> Result<(), Error> {
    let settled = acker.nack(delay).await;
    crate::trace::settled("nack", &settled);
    if settled.is_ok() {
        counters.nacked.fetch_add(1, Ordering::Relaxed);
        meter.settled(Settlement::Nack);
    }
    settled
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    poisoned: AtomicU64,
    dead_lettered: AtomicU64,
    handler_errors: AtomicU64,
    panics: AtomicU64,
    poison_errors: AtomicU64,
    settle_errors: AtomicU64,
    stream_errors: AtomicU64,
    in_flight: AtomicU64,
}

/// Reads a running consumer's statistics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Counters>);

impl StatsHandle {
    /// The statistics now.
    pub fn snapshot(&self) -> ServeStats {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServeStats {
            received: get(&c.received),
            acked: get(&c.acked),
            nacked: get(&c.nacked),
            poisoned: get(&c.poisoned),
            dead_lettered: get(&c.dead_lettered),
            handler_errors: get(&c.handler_errors),
            panics: get(&c.panics),
            poison_errors: get(&c.poison_errors),
            settle_errors: get(&c.settle_errors),
            stream_errors: get(&c.stream_errors),
            in_flight: get(&c.in_flight),
        }
    }
}

/// What a consumer runtime did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[non_exhaustive]
pub struct ServeStats {
    /// Deliveries taken from the subscription.
    pub received: u64,
    /// Events handled and acknowledged.
    pub acked: u64,
    /// Events nacked (handler error, panic, or failed poison path).
    pub nacked: u64,
    /// Undecodable messages sent to the dead-letter path and rejected.
    pub poisoned: u64,
    /// Events the handler gave up on (a non-retryable error, or
    /// [`max_deliveries`](Serve::max_deliveries) reached) sent to the
    /// dead-letter path and rejected.
    pub dead_lettered: u64,
    /// Handler calls that returned an error.
    pub handler_errors: u64,
    /// Handler calls that panicked.
    pub panics: u64,
    /// Messages the dead-letter path refused (they were nacked instead).
    pub poison_errors: u64,
    /// Settlements (ack, nack, reject) the transport could not send.
    pub settle_errors: u64,
    /// Errors the subscription reported and survived.
    pub stream_errors: u64,
    /// Events in flight now; after the runtime returned, the events left
    /// unsettled at the shutdown deadline.
    pub in_flight: u64,
}

impl fmt::Display for ServeStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, acked {}, nacked {}, poisoned {}, handler errors {}, panics {}, in flight {}",
            self.received,
            self.acked,
            self.nacked,
            self.poisoned,
            self.handler_errors,
            self.panics,
            self.in_flight
        )
    }
}

/// A running subscription started by [`SubscriberExt::subscribe`].
///
/// [`stop`](SubscriptionHandle::stop) shuts it down gracefully and returns
/// the final statistics. Dropping the handle also starts a graceful
/// shutdown, without waiting for it.
#[derive(Debug)]
pub struct SubscriptionHandle {
    token: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<ServeStats, Error>>>,
    stats: StatsHandle,
    dead_letters: Option<MemoryDeadLetters>,
}

impl SubscriptionHandle {
    /// The statistics so far.
    pub fn stats(&self) -> ServeStats {
        self.stats.snapshot()
    }

    /// A handle that reads the statistics while the subscription runs,
    /// e.g. for a health view.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// The default dead-letter path's queue: messages that did not decode
    /// and events the runtime gave up on. It lives in this process's memory
    /// and is lost when it exits (see [`serve`](crate::serve())).
    pub fn dead_letters(&self) -> Option<&MemoryDeadLetters> {
        self.dead_letters.as_ref()
    }

    /// Stops pulling, lets in-flight events finish and settles them, and
    /// returns the final statistics.
    ///
    /// # Errors
    ///
    /// The runtime's error if the handler failed for good, or
    /// [`ErrorKind::Closed`](crate::ErrorKind::Closed) if its task panicked.
    pub async fn stop(mut self) -> Result<ServeStats, Error> {
        self.token.cancel();
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| Error::closed(format!("consumer task failed: {e}")))?,
            None => Ok(self.stats.snapshot()),
        }
    }
}

impl Drop for SubscriptionHandle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The seed's conveniences on any [`Subscriber`].
pub trait SubscriberExt: Subscriber {
    /// Subscribes to `patterns` and serves `handler` on a spawned task with
    /// the default settings of [`serve`]; the returned handle stops it.
    ///
    /// # Errors
    ///
    /// If a pattern is invalid or the transport cannot subscribe.
    fn subscribe<I, S, H>(
        &self,
        patterns: I,
        handler: H,
    ) -> impl Future<Output = Result<SubscriptionHandle, Error>> + Send
    where
        I: IntoIterator<Item = S> + Send,
        S: AsRef<str>,
        H: Service<Event> + Send + 'static,
        H::Error: Into<BoxError>,
        H::Future: Send + 'static,
    {
        let options = SubscribeOptions::new(patterns);
        async move { self.subscribe_with(options?, handler).await }
    }

    /// As [`subscribe`](SubscriberExt::subscribe), with full options (a
    /// consumer group, replay).
    ///
    /// # Errors
    ///
    /// If the transport cannot subscribe.
    fn subscribe_with<H>(
        &self,
        options: SubscribeOptions,
        handler: H,
    ) -> impl Future<Output = Result<SubscriptionHandle, Error>> + Send
    where
        H: Service<Event> + Send + 'static,
        H::Error: Into<BoxError>,
        H::Future: Send + 'static,
    {
        async move {
            let subscription = self.open(options).await?;
            let token = tokio_util::sync::CancellationToken::new();
            let serve = serve(subscription, handler).with_graceful_shutdown(token.clone().cancelled_owned());
            let stats = serve.stats();
            let dead_letters = serve.default_dead_letters().cloned();
            let task = tokio::spawn(serve.into_future());
            Ok(SubscriptionHandle {
                token,
                task: Some(task),
                stats,
                dead_letters,
            })
        }
    }
}

impl<T: Subscriber + ?Sized> SubscriberExt for T {}
