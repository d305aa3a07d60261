//! [`RabbitSubscriber`]: queues, bindings and consumers behind the core's
//! [`Subscriber`] contract.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use watchtower::backoff::{Backoff, Jitter};
use watchtower::{
    Acker, Capabilities, Delivery, Error, ErrorKind, Poison, SubscribeOptions, Subscriber, TopicPattern,
};

use crate::ack::AckWindow;
use crate::config::{ExchangeKind, QueueOptions, short};
use crate::connection::{Link, LinkGuard, LinkState, Session, declare_kept, map_lapin_error};
use crate::wire;

use watchtower::Transport as _;

use crate::RabbitClient;

const SYSTEM: &str = RabbitClient::SYSTEM;

/// Consumes events from RabbitMQ queues: a [`Subscriber`], made by
/// [`RabbitClient::subscriber`](crate::RabbitClient::subscriber).
///
/// Cheap to clone; clones share the client's connection, on which each
/// subscription opens its own channel. The connection closes when the
/// client, the subscriber and all its subscriptions are dropped.
///
/// [`Subscriber`] contract.
///
/// Opening a subscription declares (or, with [`QueueOptions::passive`],
/// checks) the queue, binds it to the exchange with each pattern converted
/// to AMQP syntax ([`TopicPattern::to_amqp`](watchtower::TopicPattern::to_amqp):
/// `user.>` becomes `user.#`), sets the prefetch with `basic.qos` and starts
/// a consumer:
///
/// * with a [consumer group](SubscribeOptions::group) the queue is the
///   durable `<prefix><group>`, shared by every member (competing
///   consumers), and keeps events while no member is connected;
/// * without one, an exclusive, auto-delete queue that lives as long as
///   the subscription's connection.
///
/// Since AMQP's `#` also matches zero tokens (`user.#` matches `user`),
/// deliveries are filtered with [`SubscribeOptions::matches`]; the few that
/// do not match are acknowledged and skipped.
///
/// Settlement: [`ack`](Acker::ack) is batched into `multiple` acks (never
/// before the handler finished, see [`RabbitAcker`]), [`nack`](Acker::nack)
/// requeues, [`reject`](Acker::reject) rejects without requeue, so the
/// queue's dead-letter exchange gets it. A delivery's count comes from the
/// quorum queue's `x-delivery-count` header; on classic queues it is
/// tracked by the subscriber from the `redelivered` flag and the message id.
///
/// When the connection fails, the subscription yields one
/// [`ErrorKind::Connection`] error, waits for the connection to come back,
/// declares its queue and bindings again and resumes.
///
/// # Example
///
/// ```no_run
/// use tower::service_fn;
/// use watchtower::{Event, SubscribeOptions, SubscriberExt};
/// use watchtower_rabbitmq::{QueueOptions, RabbitClient, RabbitConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RabbitClient::connect(RabbitConfig::local()).await?;
/// let subscriber =
///     client.subscriber_with(QueueOptions::new().quorum(true).delivery_limit(5).prefetch(128));
/// let handle = subscriber
///     .subscribe_with(
///         SubscribeOptions::new(["user.>"])?.group("mailer")?,
///         service_fn(|event: Event| async move {
///             println!("{}", event.ty());
///             Ok::<_, watchtower::Error>(())
///         }),
///     )
///     .await?;
/// # handle.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitSubscriber {
    link: Link<()>,
    guard: Arc<LinkGuard>,
    queue: Arc<QueueOptions>,
}

impl fmt::Debug for RabbitSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSubscriber")
            .field("config", self.link.config())
            .field("queue", &self.queue)
            .finish()
    }
}

impl RabbitSubscriber {
    /// What every RabbitMQ subscription can do: persistent consumer groups
    /// (durable queues), ordering per queue with one consumer, wildcards,
    /// redelivery with counts, and delayed nacks (held, see
    /// [`RabbitAcker`]). No replay: a queue only holds events published
    /// after it was bound.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE
        .persistent(true)
        .consumer_groups(true)
        .ordered(true)
        .wildcards(true)
        .redelivery(true)
        .nack_delay(true);

    pub(crate) fn new(link: Link<()>, guard: Arc<LinkGuard>, queue: QueueOptions) -> RabbitSubscriber {
        RabbitSubscriber {
            link,
            guard,
            queue: Arc::new(queue),
        }
    }

    /// The name of the queue a group consumes from.
    pub fn group_queue(&self, group: &str) -> String {
        let prefix = match &self.queue.prefix {
            Some(prefix) => prefix.to_string(),
            None => format!("{}.", self.link.config().exchange),
        };
        format!("{prefix}{group}")
    }

    /// Closes the connection; open subscriptions end.
    pub fn close(&self) {
        self.link.close();
    }

    fn plan(&self, options: &SubscribeOptions) -> Result<Plan, Error> {
        self.queue.validate()?;
        let config = self.link.config();
        let bindings = match config.exchange_kind {
            ExchangeKind::Topic => options.patterns().iter().map(TopicPattern::to_amqp).collect(),
            ExchangeKind::Direct => {
                if let Some(p) = options.patterns().iter().find(|p| p.is_wildcard()) {
                    return Err(Error::config(format!(
                        "pattern {:?} has wildcards, which a direct exchange cannot route",
                        p.as_str()
                    )));
                }
                options.patterns().iter().map(|p| p.as_str().to_owned()).collect()
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => vec![String::new()],
        };
        let mut bindings: Vec<String> = bindings;
        bindings.sort();
        bindings.dedup();
        let bindings = bindings
            .iter()
            .map(|b| short("binding key", b))
            .collect::<Result<Vec<_>, _>>()?;
        let queue = match (&self.queue.queue, options.group_name()) {
            (Some(name), _) => Some(name.to_string()),
            (None, Some(group)) => Some(self.group_queue(group)),
            (None, None) => None,
        };
        if let Some(name) = &queue {
            short("queue name", name)?;
        }
        Ok(Plan {
            exchange: short("exchange name", &config.exchange)?,
            durable: queue.is_some(),
            queue,
            bindings,
            group: options.group_name().map(Arc::from),
            options: options.clone(),
            queue_options: self.queue.clone(),
        })
    }
}

/// Declares the dead-letter exchange and queue, if configured: redone by
/// every subscription when it starts, so that they are there again after
/// a reconnect.
async fn declare_dead_letter(channel: &Channel, queue: &QueueOptions) -> Result<(), Error> {
    if let (Some(dlx), Some(dlq)) = (&queue.dead_letter_exchange, &queue.dead_letter_queue) {
        let what = format!("dead-letter topology {dlx:?}/{dlq:?}");
        let exchange = (short("dead-letter exchange", dlx)?, lapin::ExchangeKind::Topic);
        declare_kept(
            channel,
            exchange,
            short("dead-letter queue", dlq)?,
            "#".into(),
            &what,
        )
        .await?;
    }
    Ok(())
}

impl Subscriber for RabbitSubscriber {
    type Acker = RabbitAcker;
    type Subscription = RabbitSubscription;

    fn capabilities(&self) -> Capabilities {
        RabbitSubscriber::CAPABILITIES
    }

    fn open(
        &self,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<RabbitSubscription, Error>> + Send {
        let plan = self.plan(&options);
        let link = self.link.clone();
        let guard = self.guard.clone();
        async move {
            let plan = Arc::new(plan?);
            let session = link.session().await?;
            let active = start(&session, &plan).await?;
            Ok(RabbitSubscription {
                link,
                _guard: guard,
                plan,
                redeliveries: Arc::default(),
                state: State::Active(Box::new(active)),
                failures: 0,
            })
        }
    }
}

/// What a subscription declares and consumes, kept to redo it after a
/// reconnect.
struct Plan {
    exchange: ShortString,
    queue: Option<String>,
    durable: bool,
    bindings: Vec<ShortString>,
    /// The consumer group, for tracing.
    group: Option<Arc<str>>,
    options: SubscribeOptions,
    queue_options: Arc<QueueOptions>,
}

struct Active {
    consumer: Consumer,
    window: Arc<AckWindow>,
    channel: Channel,
    queue: Arc<str>,
}

async fn start(session: &Session<()>, plan: &Plan) -> Result<Active, Error> {
    let options = &plan.queue_options;
    let channel = session
        .connection
        .create_channel()
        .await
        .map_err(|e| map_lapin_error(&e, "open channel"))?;
    channel
        .basic_qos(options.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| map_lapin_error(&e, "basic.qos"))?;
    declare_dead_letter(&channel, options).await?;
    let name: ShortString = match &plan.queue {
        Some(name) => short("queue name", name)?,
        None => ShortString::default(),
    };
    let declared = if options.passive {
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        }
    } else if plan.durable {
        QueueDeclareOptions::durable()
    } else {
        QueueDeclareOptions::exclusive().auto_delete()
    };
    let arguments = if options.passive {
        FieldTable::default()
    } else {
        options.arguments(plan.durable)
    };
    let queue = channel
        .queue_declare(name, declared, arguments)
        .await
        .map_err(|e| {
            map_lapin_error(
                &e,
                &format!("declare queue {:?}", plan.queue.as_deref().unwrap_or("")),
            )
        })?;
    let queue_name = queue.name().clone();
    if !options.passive {
        for key in &plan.bindings {
            channel
                .queue_bind(
                    queue_name.clone(),
                    plan.exchange.clone(),
                    key.clone(),
                    QueueBindOptions::default(),
                    options.binding_arguments.clone(),
                )
                .await
                .map_err(|e| map_lapin_error(&e, &format!("bind {:?}", key.as_str())))?;
        }
    }
    let tag = format!("watchtower-{}", uuid::Uuid::now_v7());
    let consumer = channel
        .basic_consume(
            queue_name.clone(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_lapin_error(&e, "basic.consume"))?;
    Ok(Active {
        consumer,
        window: Arc::new(AckWindow::new(channel.clone(), options.prefetch)),
        channel,
        queue: queue_name.as_str().into(),
    })
}

const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(5);
/// Classic queues' redelivery counts kept at most; older ones are forgotten
/// (their next redelivery counts from 2 again).
const MAX_TRACKED_REDELIVERIES: usize = 65_536;

type Restart = Pin<Box<dyn Future<Output = Result<Active, Error>> + Send>>;

enum State {
    Active(Box<Active>),
    Restarting(Restart),
    Backoff(Pin<Box<tokio::time::Sleep>>),
    Done,
}

/// A stream of deliveries from one queue; see [`RabbitSubscriber`].
///
/// Dropping it cancels the consumer (by closing its channel); unsettled
/// deliveries are redelivered by the broker.
pub struct RabbitSubscription {
    link: Link<()>,
    _guard: Arc<LinkGuard>,
    plan: Arc<Plan>,
    redeliveries: Arc<Mutex<HashMap<Box<str>, u32>>>,
    state: State,
    /// Failed restarts in a row, for the backoff.
    failures: u32,
}

impl fmt::Debug for RabbitSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSubscription")
            .field("queue", &self.queue())
            .field("patterns", &self.plan.options.patterns())
            .finish_non_exhaustive()
    }
}

impl RabbitSubscription {
    /// The queue consumed from (server-named for subscriptions without a
    /// group), while consuming.
    pub fn queue(&self) -> Option<&str> {
        match &self.state {
            State::Active(active) => Some(&active.queue),
            _ => None,
        }
    }

    fn restart(&mut self) {
        let link = self.link.clone();
        let plan = self.plan.clone();
        self.state = State::Restarting(Box::pin(async move {
            let mut rx = link.watch();
            loop {
                let state = rx.borrow_and_update().clone();
                match state {
                    LinkState::Up(session) if session.connection.status().connected() => {
                        return start(&session, &plan).await;
                    }
                    LinkState::Closed => return Err(Error::closed("the RabbitMQ subscriber is closed")),
                    _ => {}
                }
                // A session that is up on paper but already dead is about
                // to be replaced: wait for the link to notice.
                let changed = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
                if let Ok(Err(_)) = changed {
                    return Err(Error::closed("the RabbitMQ subscriber is closed"));
                }
            }
        }));
    }

    fn delivery_count(&self, message_id: Option<&str>, redelivered: bool) -> u32 {
        if !redelivered {
            return 1;
        }
        let Some(id) = message_id else { return 2 };
        let mut map = self.redeliveries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED_REDELIVERIES && !map.contains_key(id) {
            map.clear();
        }
        let count = map.entry(id.into()).or_insert(1);
        *count = count.saturating_add(1);
        *count
    }

    fn convert(
        &self,
        delivery: lapin::message::Delivery,
        window: &Arc<AckWindow>,
    ) -> Option<Delivery<RabbitAcker>> {
        let tag = delivery.delivery_tag;
        let tracked = window.track(tag);
        let routing_key = delivery.routing_key.as_str();
        let (decoded, raw) = wire::decode(routing_key, &delivery.properties, Bytes::from(delivery.data));
        let acker = RabbitAcker {
            inner: Some((window.clone(), tag, tracked)),
        };
        let count = match decoded.delivery_count {
            Some(count) => count,
            None => {
                let id = delivery.properties.message_id().as_ref().map(|s| s.as_str());
                self.delivery_count(id, delivery.redelivered)
            }
        };
        match decoded.event {
            Ok(event) => {
                if !self.plan.options.matches(event.topic()) {
                    acker.skip();
                    return None;
                }
                let topic = event.topic().to_owned();
                Some(
                    Delivery::new(event, topic, acker)
                        .with_delivery_count(count)
                        .with_system(SYSTEM)
                        .with_group(self.plan.group.clone()),
                )
            }
            Err(error) => Some(
                Delivery::poison(Poison::new(raw, error), acker)
                    .with_delivery_count(count)
                    .with_system(SYSTEM)
                    .with_group(self.plan.group.clone()),
            ),
        }
    }
}

impl Stream for RabbitSubscription {
    type Item = Result<Delivery<RabbitAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Active(active) => match active.consumer.poll_next_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(delivery))) => {
                        let window = active.window.clone();
                        if let Some(delivery) = this.convert(delivery, &window) {
                            this.failures = 0;
                            return Poll::Ready(Some(Ok(delivery)));
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let error = map_lapin_error(&e, "consume");
                        this.restart();
                        return Poll::Ready(Some(Err(Error::new(
                            ErrorKind::Connection,
                            error.message().to_owned(),
                        ))));
                    }
                    Poll::Ready(None) => {
                        if matches!(this.link.state(), LinkState::Closed) {
                            this.state = State::Done;
                            return Poll::Ready(None);
                        }
                        this.restart();
                        return Poll::Ready(Some(Err(Error::new(
                            ErrorKind::Connection,
                            "the consumer was cancelled; resubscribing",
                        ))));
                    }
                },
                State::Restarting(future) => match future.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(active)) => {
                        tracing::info!(queue = &*active.queue, "RabbitMQ subscription resumed");
                        this.state = State::Active(Box::new(active));
                    }
                    Poll::Ready(Err(e)) if e.kind() == ErrorKind::Closed => {
                        this.state = State::Done;
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Err(e)) => {
                        this.failures = this.failures.saturating_add(1);
                        let delay = Backoff::new(RESTART_MIN, RESTART_MAX)
                            .jitter(Jitter::Full)
                            .delay(this.failures);
                        this.state = State::Backoff(Box::pin(tokio::time::sleep(delay)));
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Backoff(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.restart();
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        if let State::Active(active) = &self.state {
            // Closing the channel cancels the consumer and returns its
            // unacknowledged deliveries to the queue at once.
            let channel = active.channel.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = channel.close(200, "subscription dropped".into()).await;
                });
            }
        }
    }
}

/// Settles one RabbitMQ delivery.
///
/// * `ack`: acknowledged, batched with neighbouring acks into one
///   `basic.ack(multiple)` where possible, never before this call;
/// * `nack(None)`: `basic.nack` with requeue, redelivered at once;
/// * `nack(Some(delay))`: the message is held (keeping its prefetch slot)
///   and nacked with requeue after `delay`: AMQP has no delayed requeue, so
///   a long delay on a full prefetch window slows the consumer;
/// * `reject`: `basic.reject` without requeue: to the queue's dead-letter
///   exchange if it has one, else dropped by the broker;
/// * dropped unsettled: nacked with requeue, so it is redelivered.
pub struct RabbitAcker {
    inner: Option<(Arc<AckWindow>, u64, bool)>,
}

impl fmt::Debug for RabbitAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitAcker")
            .field("delivery_tag", &self.inner.as_ref().map(|(_, tag, _)| *tag))
            .finish()
    }
}

impl RabbitAcker {
    fn skip(mut self) {
        if let Some((window, tag, tracked)) = self.inner.take() {
            window.ack_detached(tag, tracked);
        }
    }
}

impl Acker for RabbitAcker {
    fn ack(mut self) -> impl Future<Output = Result<(), Error>> + Send {
        let inner = self.inner.take();
        async move {
            match inner {
                Some((window, tag, tracked)) => window.ack(tag, tracked).await,
                None => Ok(()),
            }
        }
    }

    fn nack(mut self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send {
        let inner = self.inner.take();
        async move {
            match (inner, delay) {
                (Some((window, tag, tracked)), Some(delay)) if !delay.is_zero() => {
                    window.nack_later(tag, tracked, delay);
                    Ok(())
                }
                (Some((window, tag, tracked)), _) => window.nack(tag, tracked).await,
                (None, _) => Ok(()),
            }
        }
    }

    fn reject(mut self) -> impl Future<Output = Result<(), Error>> + Send {
        let inner = self.inner.take();
        async move {
            match inner {
                Some((window, tag, tracked)) => window.reject(tag, tracked).await,
                None => Ok(()),
            }
        }
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if let Some((window, tag, tracked)) = self.inner.take() {
            window.nack_detached(tag, tracked);
        }
    }
}
