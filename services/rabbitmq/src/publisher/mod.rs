//! [`RabbitPublisher`]: a `tower::Service<Event>` that publishes to an
//! exchange with publisher confirms.

mod channels;
mod delay;
mod future;

pub(crate) use channels::declare_exchange;
pub(crate) use delay::DELAY_QUEUE_PREFIX;
pub use future::ResponseFuture;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll, ready};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Confirmation, Connection, PublisherConfirm};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tower::Service;
use watchtower::batch::{BatchFuture, BatchReceipts};
use watchtower::trace::PublishTrace;
use watchtower::{Error, ErrorKind, Event, Receipt};

use crate::config::{ContentMode, PublishOptions, RabbitConfig, short};
use crate::confirms::{Confirms, Outcome};
use crate::connection::{Link, LinkGuard, LinkState, Session, Setup, breaks_channel, map_lapin_error};
use crate::wire;
use channels::{Channels, open_channels, pick, repair, retire};
use delay::Declared;

struct Inner {
    pub(super) link: Link<Channels>,
    exchange: ShortString,
    /// The exchange name as the receipts' `stream`, allocated once.
    stream: Arc<str>,
    pub(super) options: PublishOptions,
    mode: ContentMode,
    pub(super) next: AtomicUsize,
    /// The delay queues declared, for delayed events.
    delays: Declared,
    _guard: LinkGuard,
}

/// Publishes events to a RabbitMQ exchange: a `tower::Service<Event>`,
/// made by [`RabbitClient::publisher`](crate::RabbitClient::publisher).
///
/// Cheap to clone: clones share the publisher's connection, its channels
/// and the in-flight window. The connection closes when the last clone
/// drops.
///
/// exchange with publisher confirms.
///
/// Each event goes to the configured exchange with its
/// [`topic`](Event::topic) as the routing key, in the
/// [`ContentMode`] of its options (binary unless set,
/// see the [crate docs](crate#wire-format)), persistent, with the
/// `mandatory` flag unless the exchange has an
/// [alternate exchange](crate::RabbitConfig::alternate_exchange).
/// The call resolves when the broker confirms the event:
///
/// * `Ok(Receipt)` once the broker has taken responsibility for it (for a
///   persistent event on a durable queue: written to disk; for an event no
///   binding routes, once it is in the alternate exchange's queue);
/// * [`ErrorKind::Rejected`] if no queue is bound for the routing key (the
///   broker returned it, `mandatory`), not retryable;
/// * [`ErrorKind::Rejected`], retryable, if the broker nacked it (a full
///   queue with `reject-publish` overflow, an internal error, a quorum
///   queue whose leader moved); the channel it went out on is then
///   replaced, since a channel opened while a quorum queue's leader moved
///   can go on nacking every publish (the events awaiting their confirm
///   on it fail with a retryable [`ErrorKind::Connection`]);
/// * [`ErrorKind::Connection`], retryable, if the connection or the
///   channel failed before the confirm arrived: the event may or may not
///   have been stored, so a retry can duplicate it (at-least-once).
///
/// Confirms are pipelined: up to
/// [`max_in_flight`](PublishOptions::max_in_flight) events are unconfirmed
/// at once, across all channels; `poll_ready` is pending while that window
/// is full and while the connection is being re-established.
///
/// # Duplicates
///
/// A caller told [`ErrorKind::Connection`] (or whose own timeout fired
/// while it waited for the confirm) cannot know whether the broker stored
/// its event: the publish may have reached the queue and only its confirm
/// been lost. RabbitMQ has no deduplication, so retrying it (a retry layer,
/// a dead-letter path replayed later) can put the event in the queue
/// twice. Both copies carry the same event [`id`](Event::id) (the
/// `cloudEvents_id` header and the AMQP `message-id` property): a consumer
/// that must not act twice keeps the ids it has handled (for as long as a
/// retry can come) and skips one it has seen, or makes its handler
/// idempotent.
///
/// # Performance
///
/// Measured with the crate's benchmark (`benches/rabbitmq.rs`): 50,000
/// persistent events (~200 bytes structured), confirms, 1,024 in flight,
/// to a durable classic queue, on a 2-core machine that also runs the
/// broker and other builds (load average 5 to 10). Ratio: raw lapin's time
/// over ours, per round (raw sends pre-built ~195-byte JSON bodies with no
/// header table and no `mandatory`, the shared baseline's
/// `amqp-pub-confirm`); median and range. "Alternate exchange": without
/// `mandatory`, the exchange's
/// [alternate exchange](crate::RabbitConfig::alternate_exchange) keeping
/// what no binding routes.
///
/// Runs A and B measured a variant whose confirm task answered without
/// the `basic.qos` round trip (a local fence on lapin's lock; the paths
/// without `mandatory` do not use the task and are this code): A with
/// three rounds under the heavier load, B with four rounds. Run C, right
/// after B, set this code's `mandatory` path against that variant, twice
/// three rounds each, alternating. Run D: this code, three rounds, last.
///
/// | publishing | run A | run B | run C | run D | broker CPU per event |
/// |---|--:|--:|--:|--:|--:|
/// | publisher, binary, `mandatory` (default) | | | 1.02 (0.98–1.09), 1.07 (0.93–1.20) | 0.95 (0.80–1.42) | 67–69 µs |
/// | the same, local fence | 0.78 (0.65–1.19) | 0.98 (0.88–1.08) | 1.00 (0.91–1.06), 1.02 (0.72–1.32) | | 71–74 µs |
/// | publisher, structured, local fence | 0.90 (0.60–1.06) | 0.81 (0.68–0.84) | | | 79–82 µs |
/// | publisher, binary, alternate exchange | 0.70 (0.64–1.46) | 1.07 (0.84–1.09) | | 1.11 (0.79–1.23) | 59–72 µs |
/// | publisher, structured, alternate exchange | 0.79 (0.58–1.13) | | | | 72 µs |
/// | four layers + publisher, binary, `mandatory` | | | 1.03 (0.99–1.18), 1.11 (0.90–1.32) | 0.79 (0.78–1.44) | 62–66 µs |
/// | the same, local fence | 0.73 (0.50–1.24) | 0.98 (0.87–1.04) | 0.83 (0.82–1.04), 0.83 (0.70–1.11) | | 72–76 µs |
/// | four layers + publisher, structured, local fence | 0.66 (0.60–0.93) | | | | 84 µs |
/// | four layers + publisher, binary, alternate exchange | 0.91 (0.87–1.40) | 1.06 (0.83–1.13) | | 0.90 (0.83–1.02) | 61–62 µs |
/// | four layers + publisher, structured, alternate exchange | 0.98 (0.57–1.03) | | | | 75 µs |
///
/// Raw lapin cost the broker 60 to 66 µs of CPU per event and its own
/// process 20 µs (it awaits each publish's write before the next: a
/// wake-up of lapin's I/O thread per event); this crate's publisher 11 to
/// 16 µs, so the broker sets the pace. Raw lapin's own rate swung from
/// 7,100 to 15,300 events/s between rounds of one run, and every
/// contender's rounds with it: read the columns as tendencies. The
/// shared harness's peer, ruststream (no `mandatory`, no event
/// attributes: the broker drops unroutable events), publishing
/// concurrently as this crate does, measured 1.05 (1.00 to 1.32) times its
/// raw lapin in the session of run A and 1.25 (1.14 to 1.38) in that of
/// run B.
///
/// # Channels
///
/// The publisher holds [`PublishOptions::channels`] confirm-mode channels
/// on its connection (1 by default) and hands events to them in turn. Each
/// call waits for the confirm of its own event on its own channel: a
/// broker nack or a returned (unroutable) event is that caller's error,
/// never a neighbour's. A channel that fails on a live connection (the
/// broker closes a channel on a channel-level error, such as a publish to
/// an exchange deleted under the publisher) is replaced in place, the
/// exchange declared (or checked) again on the new channel, while the
/// other channels go on; the callers whose confirms were pending on it get
/// a retryable [`ErrorKind::Connection`] error, and a retry layer sends
/// their events again. If the replacement fails, or every channel is down,
/// the whole connection is re-established as when it drops.
///
/// # Example
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_rabbitmq::{RabbitClient, RabbitConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RabbitClient::connect(RabbitConfig::local()).await?;
/// let mut publisher = client.publisher().await?;
/// let receipt = publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
/// assert_eq!(&*receipt.topic, "user.created");
/// # Ok(()) }
/// ```
pub struct RabbitPublisher {
    inner: Arc<Inner>,
    semaphore: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
    reconnect: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Clone for RabbitPublisher {
    fn clone(&self) -> Self {
        RabbitPublisher {
            inner: self.inner.clone(),
            semaphore: self.semaphore.clone(),
            permit: None,
            reconnect: None,
        }
    }
}

impl fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitPublisher")
            .field("url", &self.inner.link.config().redacted_url())
            .field("exchange", &self.inner.exchange.as_str())
            .field("options", &self.inner.options)
            .field("ready", &self.permit.is_some())
            .finish()
    }
}

impl RabbitPublisher {
    /// Connects, opens the channels and declares the exchange (or checks
    /// it, if [passive](RabbitConfig::passive_exchange)); see
    /// [`RabbitClient::publisher_with`](crate::RabbitClient::publisher_with).
    pub(crate) async fn open(
        config: RabbitConfig,
        options: PublishOptions,
    ) -> Result<RabbitPublisher, Error> {
        config.validate()?;
        let exchange = short("exchange name", &config.exchange)?;
        let mode = options.content_mode_for(config.exchange_kind)?;
        let mut options = options;
        options.mandatory = Some(options.mandatory_for(&config));
        let setup: Setup<Channels> = {
            let config = config.clone();
            let options = options.clone();
            Arc::new(move |connection: Arc<Connection>| {
                let config = config.clone();
                let options = options.clone();
                Box::pin(async move { open_channels(&connection, &config, &options).await })
            })
        };
        let (link, guard) = Link::connect(config, setup).await?;
        let semaphore = PollSemaphore::new(Arc::new(Semaphore::new(options.max_in_flight)));
        Ok(RabbitPublisher {
            inner: Arc::new(Inner {
                link,
                stream: exchange.as_str().into(),
                exchange,
                options,
                mode,
                next: AtomicUsize::new(0),
                delays: Declared::default(),
                _guard: guard,
            }),
            semaphore,
            permit: None,
            reconnect: None,
        })
    }

    /// The publisher connection's health, as its link sees it.
    #[cfg(test)]
    pub(crate) fn link_health(&self) -> crate::connection::LinkHealth {
        self.inner.link.health()
    }

    /// The exchange events go to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// The delay queues this publisher (and its clones) declared for
    /// delayed events (see the [crate docs](crate#delayed-delivery)). The
    /// broker deletes each a few minutes after its last use.
    pub fn delay_queues(&self) -> Vec<String> {
        self.inner.delays.names()
    }

    /// Closes the connection for every clone; later calls fail with
    /// [`ErrorKind::Closed`].
    pub fn close(&self) {
        self.inner.link.close();
    }
}

impl Service<Event> for RabbitPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if let Some(wait) = self.reconnect.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.reconnect = None;
            }
            let stale = match self.inner.link.state() {
                LinkState::Up(session) if session.connection.status().connected() => {
                    if session.value.any_usable() {
                        break;
                    }
                    // Every channel failed on a live connection: replace
                    // them, and wait for one (a failed replacement
                    // re-establishes the connection).
                    for index in 0..session.value.slots.len() {
                        repair(&self.inner, &session, index);
                    }
                    self.reconnect = Some(Box::pin(async move {
                        let notified = session.value.repaired.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        if session.value.any_usable() {
                            return;
                        }
                        tokio::select! {
                            () = notified => {}
                            () = session.lost.cancelled() => {}
                        }
                    }));
                    continue;
                }
                // Dead under us but not yet replaced: report it, and wait
                // for the replacement instead of failing fast in a loop.
                LinkState::Up(session) => {
                    self.inner.link.invalidate(session.generation);
                    Some(session.generation)
                }
                LinkState::Closed => {
                    return Poll::Ready(Err(Error::closed("the RabbitMQ publisher is closed")));
                }
                LinkState::Connecting => None,
            };
            let mut rx = self.inner.link.watch();
            self.reconnect = Some(Box::pin(async move {
                let _ = rx
                    .wait_for(|s| match s {
                        LinkState::Connecting => false,
                        LinkState::Up(session) => Some(session.generation) != stale,
                        LinkState::Closed => true,
                    })
                    .await;
            }));
        }
        if self.permit.is_none() {
            match ready!(self.semaphore.poll_acquire(cx)) {
                Some(permit) => self.permit = Some(permit),
                None => return Poll::Ready(Err(Error::closed("the RabbitMQ publisher is closed"))),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        let Some(permit) = self.permit.take() else {
            return ResponseFuture::ready(Err(Error::new(
                ErrorKind::Other,
                "RabbitPublisher::call without poll_ready",
            )));
        };
        let trace = PublishTrace::start(
            <crate::RabbitClient as watchtower::Transport>::SYSTEM,
            &event.shared_topic(),
            &mut event,
        );
        let lane = match Lane::pick(&self.inner) {
            Ok(lane) => lane,
            Err(e) => return ResponseFuture::finished(trace, Err(e)),
        };
        let prepared = match lane.prepare(event) {
            Ok(prepared) => prepared,
            Err(e) => return ResponseFuture::finished(trace, Err(e)),
        };
        let span = trace.span().clone();
        ResponseFuture {
            inner: Box::pin(tracing::Instrument::instrument(
                async move {
                    let _permit = permit;
                    let result = lane
                        .until_lost(async {
                            let sent = lane.send(prepared).await?;
                            lane.confirmed(sent).await
                        })
                        .await;
                    trace.finish(&result);
                    result
                },
                span,
            )),
        }
    }
}

/// How a publish goes out: the session and the channel picked for it.
struct Lane {
    inner: Arc<Inner>,
    session: Arc<Session<Channels>>,
    index: usize,
    channel: Arc<channels::Published>,
}

/// An event encoded for its route.
struct Prepared {
    event: Event,
    properties: lapin::BasicProperties,
    body: bytes::Bytes,
    routing_key: ShortString,
    route: delay::Route,
}

/// A publish handed to its channel, waiting for its confirm.
struct Sent {
    event: Event,
    receipt: Receipt,
    confirm: PublisherConfirm,
    ticket: Option<crate::confirms::Ticket>,
}

impl Lane {
    /// The current session and a usable channel of it.
    fn pick(inner: &Arc<Inner>) -> Result<Lane, Error> {
        let session = match inner.link.state() {
            LinkState::Up(session) => session,
            LinkState::Connecting => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    "the RabbitMQ connection is being re-established",
                ));
            }
            LinkState::Closed => return Err(Error::closed("the RabbitMQ publisher is closed")),
        };
        let Some((index, channel)) = pick(inner, &session) else {
            return Err(Error::new(
                ErrorKind::Connection,
                "every RabbitMQ publisher channel failed; they are being replaced",
            ));
        };
        Ok(Lane {
            inner: inner.clone(),
            session,
            index,
            channel,
        })
    }

    /// Finds `event`'s route (the exchange, a direct reply-to address, or
    /// a delay queue, which takes its delivery mark off) and encodes it in
    /// the publisher's content mode.
    fn prepare(&self, mut event: Event) -> Result<Prepared, Error> {
        let route = delay::route(&mut event, self.inner.exchange.as_str())?;
        let (properties, body) = wire::encode(&event, &self.inner.options, self.inner.mode)?;
        let routing_key = short("routing key", event.topic())?;
        Ok(Prepared {
            event,
            properties,
            body,
            routing_key,
            route,
        })
    }

    /// `work`, unless the session is lost first.
    async fn until_lost<T>(&self, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::select! {
            biased;
            result = work => result,
            () = self.session.lost.cancelled() => Err(Error::new(
                ErrorKind::Connection,
                "the connection was lost before the broker confirmed the event",
            )),
        }
    }

    /// A failure that took the channel down: the channel is replaced, and
    /// the event may or may not have been stored, whatever closed the
    /// channel (another publish may have), so the caller may retry it.
    fn failed(&self, e: lapin::Error, what: &str) -> Error {
        if breaks_channel(&e) && !self.channel.status().connected() {
            repair(&self.inner, &self.session, self.index);
            Error::new(
                ErrorKind::Connection,
                format!("{what}: the channel closed before the broker confirmed the event: {e}"),
            )
            .with_retryable(true)
        } else {
            map_lapin_error(&e, what)
        }
    }

    /// Hands the event to the channel.
    async fn send(&self, prepared: Prepared) -> Result<Sent, Error> {
        let Prepared {
            event,
            properties,
            body,
            routing_key,
            route,
        } = prepared;
        let mut options = BasicPublishOptions {
            mandatory: self.inner.options.is_mandatory(),
            immediate: false,
        };
        let (exchange, routing_key) = match &route {
            delay::Route::Exchange => (self.inner.exchange.clone(), routing_key),
            delay::Route::Reply => {
                // Nobody to tell when the requester is gone: the broker
                // drops the reply.
                options.mandatory = false;
                (ShortString::from(""), routing_key)
            }
            delay::Route::Delay(queue) => {
                self.inner
                    .delays
                    .ensure(&self.channel, queue, &self.inner.exchange)
                    .await
                    .map_err(|e| self.failed(e, "declare the delay queue"))?;
                (ShortString::from(""), queue.name.clone())
            }
        };
        // Announced before it is sent, so that the confirm task waits for
        // its confirm, which may carry another publish's returned message
        // (see `confirms`).
        let ticket = self.channel.confirms.as_ref().map(Confirms::announce);
        let confirm = self
            .channel
            .basic_publish(exchange, routing_key, options, &body, properties)
            .await
            .map_err(|e| self.failed(e, "publish"))?;
        let receipt = Receipt::for_event(&event).with_stream(self.inner.stream.clone());
        Ok(Sent {
            event,
            receipt,
            confirm,
            ticket,
        })
    }

    /// Waits for the broker's confirm of a sent event.
    async fn confirmed(&self, sent: Sent) -> Result<Receipt, Error> {
        let Sent {
            event,
            receipt,
            confirm,
            ticket,
        } = sent;
        if !self.inner.options.confirms {
            return Ok(receipt);
        }
        let outcome = match ticket {
            // The channel's confirm task answers, with the returned message
            // that belongs to this event (see `confirms`).
            Some(ticket) => ticket.track(receipt.event_id.clone(), confirm).await,
            // Nothing can come back: the confirm is the answer.
            None => Some(match confirm.await {
                Ok(Confirmation::Nack(_)) => Outcome::Nack,
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => Outcome::Ack,
                Err(e) => Outcome::Failed(e),
            }),
        };
        match outcome {
            Some(Outcome::Ack) => Ok(receipt),
            Some(Outcome::Returned { code, text }) => Err(Error::new(
                ErrorKind::Rejected,
                format!(
                    "no queue is bound for routing key {:?} on exchange {:?} ({code} {text})",
                    event.topic(),
                    self.inner.exchange.as_str(),
                ),
            )
            .with_event(event)),
            Some(Outcome::Nack) => {
                retire(&self.inner, &self.session, self.index, &self.channel);
                Err(Error::new(
                    ErrorKind::Rejected,
                    "the broker nacked the event (a full queue refusing publishes, or an internal error)",
                )
                .with_retryable(true))
            }
            Some(Outcome::Failed(e)) => Err(self.failed(e, "publisher confirm")),
            None => Err(Error::new(
                ErrorKind::Connection,
                "the channel's confirm task stopped before the broker confirmed the event",
            )
            .with_retryable(true)),
        }
    }
}

impl RabbitPublisher {
    /// A batch publisher on this publisher's connection, channels and
    /// in-flight window: see [`RabbitBatchPublisher`].
    pub fn batched(&self) -> RabbitBatchPublisher {
        RabbitBatchPublisher {
            publisher: self.clone(),
        }
    }
}

/// Publishes batches of events to the publisher's exchange: every event of
/// a batch is handed to **one channel** in the batch's order, then the
/// publisher confirms are awaited **together** (the broker confirms many
/// with one `basic.ack`), and each event is answered with its own receipt
/// or error, in the batch's order (see [`watchtower::batch`]). Made by
/// [`RabbitPublisher::batched`].
///
/// * An event that cannot be sent (a routing key over 255 bytes, an
///   encoding failure) is answered with its error; the others go.
/// * An event no queue is bound for (returned, `mandatory`) is answered
///   with [`ErrorKind::Rejected`] alone; so is one the broker nacks.
/// * A channel or connection lost mid-batch answers the events not yet
///   confirmed with [`ErrorKind::Connection`], with their events attached.
///
/// Each event takes a place in the publisher's
/// [in-flight window](PublishOptions::max_in_flight); a batch larger than
/// the window goes in window-sized parts, each confirmed before the next
/// is sent. `poll_ready` is the publisher's: pending while the connection
/// is being re-established or the window is full.
///
/// ```no_run
/// use watchtower::{Event, PublishBatchExt};
/// use watchtower_rabbitmq::{RabbitClient, RabbitConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RabbitClient::connect(RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
/// let mut batches = client.publisher().await?.batched();
/// let events = (0..100).map(|n| Event::new("order.paid", serde_json::json!({"n": n}))).collect();
/// for answer in batches.publish_batch(events).await? {
///     answer?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RabbitBatchPublisher {
    publisher: RabbitPublisher,
}

impl Service<Vec<Event>> for RabbitBatchPublisher {
    type Response = BatchReceipts;
    type Error = Error;
    type Future = BatchFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Service::<Event>::poll_ready(&mut self.publisher, cx)
    }

    fn call(&mut self, events: Vec<Event>) -> BatchFuture {
        // The place `poll_ready` took is given back: the batch takes its
        // own, part by part.
        self.publisher.permit = None;
        let inner = self.publisher.inner.clone();
        let window = self.publisher.semaphore.clone_inner();
        Box::pin(async move {
            let system = <crate::RabbitClient as watchtower::Transport>::SYSTEM;
            let mut answers = Vec::with_capacity(events.len());
            let mut events = events.into_iter().peekable();
            while events.peek().is_some() {
                let part: Vec<Event> = events.by_ref().take(inner.options.max_in_flight).collect();
                let places = u32::try_from(part.len()).unwrap_or(u32::MAX);
                let _permits = window
                    .clone()
                    .acquire_many_owned(places)
                    .await
                    .map_err(|_| Error::closed("the RabbitMQ publisher is closed"))?;
                let lane = match Lane::pick(&inner) {
                    Ok(lane) => lane,
                    Err(e) => {
                        answers.extend(part.into_iter().map(|mut event| {
                            let trace = PublishTrace::start(system, &event.shared_topic(), &mut event);
                            let answer = Err(Error::new(e.kind(), e.message())
                                .with_retryable(e.is_retryable())
                                .with_event(event));
                            trace.finish(&answer);
                            answer
                        }));
                        continue;
                    }
                };
                // Handed to the channel one after the other, in order.
                let mut sent = Vec::with_capacity(part.len());
                for mut event in part {
                    let trace = PublishTrace::start(system, &event.shared_topic(), &mut event);
                    let handed = match lane.prepare(event) {
                        Ok(prepared) => {
                            let span = trace.span().clone();
                            tracing::Instrument::instrument(lane.until_lost(lane.send(prepared)), span).await
                        }
                        Err(e) => Err(e),
                    };
                    sent.push((trace, handed));
                }
                let lane = &lane;
                let confirmed = sent.into_iter().map(|(trace, handed)| {
                    let span = trace.span().clone();
                    tracing::Instrument::instrument(
                        async move {
                            let result = match handed {
                                Ok(sent) => lane.until_lost(lane.confirmed(sent)).await,
                                Err(e) => Err(e),
                            };
                            trace.finish(&result);
                            result
                        },
                        span,
                    )
                });
                answers.extend(futures_util::future::join_all(confirmed).await);
            }
            Ok(answers)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use futures_util::StreamExt as _;
    use futures_util::stream::FuturesUnordered;
    use lapin::options::{
        BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, ConnectionProperties};
    use watchtower::PublishExt as _;
    use watchtower_test_support::within;

    use super::*;
    use crate::ExchangeKind;

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    /// Publishes until confirmed, retrying what is retryable (what a retry
    /// layer does); returns how many attempts failed.
    async fn until_confirmed(mut publisher: RabbitPublisher, event: Event) -> usize {
        let mut failures = 0;
        loop {
            match publisher.publish(event.clone()).await {
                Ok(receipt) => {
                    assert_eq!(&*receipt.event_id, event.id());
                    return failures;
                }
                Err(e) if e.is_retryable() => failures += 1,
                Err(e) => panic!("not retryable: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_the_broker_closes_is_replaced_and_nothing_is_lost() {
        const TOTAL: usize = 3_000;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let exchange = format!("wt-chclose-{}", &id[16..]);
        let queue = format!("{exchange}.q");
        let config = RabbitConfig::new(URL)
            .exchange(&exchange, ExchangeKind::Topic)
            .connection_name(format!("test {exchange}"));
        let publisher = RabbitPublisher::open(config, PublishOptions::new().channels(3).max_in_flight(64))
            .await
            .unwrap();
        let admin = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let admin_channel = admin.create_channel().await.unwrap();
        admin_channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        admin_channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "cc.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();

        let events: Vec<Event> = (0..TOTAL)
            .map(|i| Event::new("cc.x", serde_json::json!({"i": i})))
            .collect();
        let mut pending = events.iter().cloned();
        let mut calls = FuturesUnordered::new();
        for event in pending.by_ref().take(64) {
            calls.push(until_confirmed(publisher.clone(), event));
        }
        let (mut confirmed, mut failures) = (0, 0);
        let victim = match publisher.inner.link.state() {
            LinkState::Up(session) => session.value.slots[1].current(),
            _ => panic!("not connected"),
        };
        within("all confirmed", async {
            while let Some(failed) = calls.next().await {
                confirmed += 1;
                failures += failed;
                if confirmed == TOTAL / 3 {
                    // A publish to a missing exchange on the second channel:
                    // the broker closes that channel, with others' events
                    // in flight on it.
                    let missing = format!("{exchange}-missing");
                    let closed = victim
                        .basic_publish(
                            missing.as_str().into(),
                            "x".into(),
                            BasicPublishOptions::default(),
                            b"{}",
                            BasicProperties::default(),
                        )
                        .await;
                    let closed = match closed {
                        Ok(confirm) => confirm.await.map(|_| ()),
                        Err(e) => Err(e),
                    };
                    assert!(closed.is_err(), "the broker closed the channel");
                    assert!(!victim.status().connected());
                }
                if let Some(event) = pending.next() {
                    calls.push(until_confirmed(publisher.clone(), event));
                }
            }
        })
        .await;
        assert_eq!(confirmed, TOTAL);

        // The channel was replaced on the same connection.
        let LinkState::Up(session) = publisher.inner.link.state() else {
            panic!("not connected");
        };
        let replacement = session.value.slots[1].current();
        assert!(!Arc::ptr_eq(&victim, &replacement));
        assert!(replacement.status().connected());
        assert_eq!(publisher.link_health().connections, 1, "no reconnect was needed");

        // Every event is in the queue; one caught in flight on the closed
        // channel and retried may be there twice.
        let mut got = HashSet::new();
        let mut copies = 0;
        while let Some(message) = admin_channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            copies += 1;
            got.insert(
                message
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .unwrap()
                    .to_string(),
            );
        }
        let sent: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
        assert_eq!(got, sent);
        assert!(
            copies <= TOTAL + failures,
            "{copies} copies, {failures} failed attempts"
        );

        let _ = admin_channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = admin_channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = admin.close(200, "done".into()).await;
    }
}
