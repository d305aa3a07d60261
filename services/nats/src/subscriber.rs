//! Core NATS subscribing: [`NatsSubscriber`], its subscriptions and their
//! (empty) settlement.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use futures_util::StreamExt as _;
use watchtower::{Acker, Capabilities, Delivery, Error, ErrorKind, SubscribeOptions, Subscriber, Transport};

use crate::client::{DropCounter, NatsClient, subscription_id};
use crate::wire::{self, TopicCache};

/// Subscribes on core NATS; made by [`NatsClient::subscriber`].
///
/// Patterns are NATS subjects already (`user.*`, `user.>`); a
/// [group](watchtower::SubscribeOptions::group) becomes a NATS queue group,
/// so members of one group split the events and every group gets all of
/// them. A subscription is ready once the server has it (a round trip), so
/// events published after [`open`](Subscriber::open) returns reach it.
///
/// Core NATS is **at-most-once**: nothing is stored, an event published
/// while no one listens is gone, and settling a delivery does nothing
/// (`nack` cannot bring an event back). The capability flags say so. When
/// a subscription is read more slowly than events arrive, the client drops
/// messages past its buffer
/// ([`NatsConfig::subscription_capacity`](crate::NatsConfig::subscription_capacity));
/// the subscription then yields an [`ErrorKind::Dropped`] item saying how
/// many were lost, and [`NatsSubscription::dropped`] counts them.
///
/// # Example
///
/// ```no_run
/// use tower::service_fn;
/// use watchtower::{Event, SubscribeOptions, SubscriberExt};
/// use watchtower_nats::{NatsClient, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// let handle = client
///     .subscriber()
///     .subscribe_with(
///         SubscribeOptions::new(["user.>"])?.group("mailer")?,
///         service_fn(|event: Event| async move {
///             println!("{}", event.ty());
///             Ok::<_, watchtower::Error>(())
///         }),
///     )
///     .await?;
/// handle.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NatsSubscriber {
    client: NatsClient,
}

impl NatsSubscriber {
    /// What core NATS can do: wildcards, queue groups, per-publisher order;
    /// no persistence, no redelivery.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE
        .wildcards(true)
        .consumer_groups(true)
        .ordered(true);

    /// A subscriber on `client`'s connection, for [`NatsClient::subscriber`].
    pub(crate) fn new(client: NatsClient) -> NatsSubscriber {
        NatsSubscriber { client }
    }

    /// The connection.
    pub fn client(&self) -> &NatsClient {
        &self.client
    }
}

impl Subscriber for NatsSubscriber {
    type Acker = NatsAcker;
    type Subscription = NatsSubscription;

    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn open(&self, options: SubscribeOptions) -> Result<NatsSubscription, Error> {
        let raw = self.client.raw();
        // Built as it goes so that, on an error, dropping it unregisters
        // what was registered.
        let mut subscription = NatsSubscription {
            client: self.client.clone(),
            streams: Vec::new(),
            next: 0,
            counters: Vec::new(),
            reported: 0,
            topics: TopicCache::default(),
            group: options.group_name().map(Arc::from),
        };
        for pattern in options.patterns() {
            let subscribed = match options.group_name() {
                Some(group) => {
                    raw.queue_subscribe(pattern.as_str().to_owned(), group.to_owned())
                        .await
                }
                None => raw.subscribe(pattern.as_str().to_owned()).await,
            };
            let subscriber = subscribed.map_err(|e| match e.kind() {
                async_nats::SubscribeErrorKind::InvalidSubject
                | async_nats::SubscribeErrorKind::InvalidQueueName => Error::new(
                    ErrorKind::InvalidTopic,
                    format!("cannot subscribe to {:?}: {e}", pattern.as_str()),
                ),
                async_nats::SubscribeErrorKind::Other => Error::closed("NATS client is closed"),
            })?;
            let sid = subscription_id(&subscriber);
            subscription
                .counters
                .push((sid, self.client.state().register(sid)));
            subscription.streams.push(subscriber);
        }
        // Events published after `open` returns must reach the
        // subscriptions: wait for the server to have them.
        self.client.probe("the subscription's confirmation").await?;
        Ok(subscription)
    }
}

/// A core NATS subscription: a stream of deliveries, from
/// [`NatsSubscriber`].
///
/// Dropping it unsubscribes.
pub struct NatsSubscription {
    client: NatsClient,
    /// One client subscription per pattern, polled in turn (a message is
    /// taken from each without a task queue in between, unlike
    /// `SelectAll`, which allocates per message).
    streams: Vec<async_nats::Subscriber>,
    /// The stream polled first next time, so that a busy one does not
    /// starve the others.
    next: usize,
    counters: Vec<(Option<u64>, Arc<DropCounter>)>,
    reported: u64,
    topics: TopicCache,
    /// The queue group, for tracing.
    group: Option<Arc<str>>,
}

impl NatsSubscription {
    /// Messages the client dropped because this subscription was read too
    /// slowly (at least this many).
    pub fn dropped(&self) -> u64 {
        self.counters
            .iter()
            .map(|(_, c)| c.dropped.load(Ordering::Acquire))
            .sum()
    }
}

impl Stream for NatsSubscription {
    type Item = Result<Delivery<NatsAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(error) = this.take_drops() {
            return Poll::Ready(Some(Err(error)));
        }
        match this.poll_streams(cx) {
            Poll::Ready(Some(message)) => {
                let subject = message.subject.as_str();
                // The body moves into the event: no reference count taken.
                let delivery = match wire::decode(subject, message.headers.as_ref(), message.payload) {
                    Ok(mut event) => {
                        // A request from any NATS client: its reply subject is
                        // where a responder answers.
                        if let Some(reply) = &message.reply
                            && event.extension(watchtower::ext::REPLY_TO).is_none()
                        {
                            let _ = event.set_extension(watchtower::ext::REPLY_TO, reply.as_str());
                        }
                        Delivery::new(event, this.topics.get(subject), NatsAcker(()))
                    }
                    Err(poison) => Delivery::poison(poison, NatsAcker(())),
                };
                Poll::Ready(Some(Ok(delivery
                    .with_system(NatsClient::SYSTEM)
                    .with_group(this.group.clone()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                // Only an idle subscription needs waking for drops; the check
                // after registering catches one reported in between.
                for (_, counter) in &this.counters {
                    counter.register(cx.waker());
                }
                match this.take_drops() {
                    Some(error) => Poll::Ready(Some(Err(error))),
                    None => Poll::Pending,
                }
            }
        }
    }
}

impl NatsSubscription {
    /// The next message of any of the client subscriptions; `None` once
    /// all of them have ended.
    fn poll_streams(&mut self, cx: &mut Context<'_>) -> Poll<Option<async_nats::Message>> {
        let mut polled = 0;
        while polled < self.streams.len() {
            let i = self.next % self.streams.len();
            match self.streams[i].poll_next_unpin(cx) {
                Poll::Ready(Some(message)) => {
                    self.next = i + 1;
                    return Poll::Ready(Some(message));
                }
                Poll::Ready(None) => {
                    // Ended: the rest move up one, so index `i` is next.
                    self.streams.remove(i);
                    self.next = i;
                }
                Poll::Pending => {
                    self.next = i + 1;
                    polled += 1;
                }
            }
        }
        if self.streams.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn take_drops(&mut self) -> Option<Error> {
        let dropped = self.dropped();
        if dropped <= self.reported {
            return None;
        }
        let lost = dropped - self.reported;
        self.reported = dropped;
        Some(Error::new(
            ErrorKind::Dropped,
            format!("slow consumer: the NATS client dropped {lost} message(s) for this subscription"),
        ))
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        for (sid, counter) in &self.counters {
            self.client.state().unregister(*sid, counter);
        }
    }
}

impl fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("subjects", &self.streams.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// Settles a core NATS delivery: there is nothing to settle, since core
/// NATS neither stores nor redelivers. Every method succeeds at once.
#[derive(Debug)]
pub struct NatsAcker(());

impl Acker for NatsAcker {
    async fn ack(self) -> Result<(), Error> {
        Ok(())
    }

    async fn nack(self, _delay: Option<Duration>) -> Result<(), Error> {
        // At-most-once: the event cannot come back. The consumer runtime
        // has logged the handler's failure.
        tracing::debug!("nack on core NATS: the event is not redelivered");
        Ok(())
    }

    async fn reject(self) -> Result<(), Error> {
        Ok(())
    }
}
