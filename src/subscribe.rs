//! The subscribe contract: [`Subscriber`](crate::Subscriber), deliveries and receipts.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;

use crate::error::{Error, ErrorKind};
use crate::event::{Event, ext};
use crate::topic::TopicPattern;

/// What a broker said about a published event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// The topic (subject, stream, routing key, URL) the event went to.
    pub topic: Arc<str>,
    /// The event's id.
    pub event_id: Arc<str>,
    /// The stream or queue that stored it, where the broker says (JetStream
    /// stream name, Redis stream key).
    pub stream: Option<Arc<str>>,
    /// The broker's sequence number for it (JetStream sequence, memory
    /// transport offset).
    pub sequence: Option<u64>,
    /// A broker-assigned message id (Redis entry id).
    pub message_id: Option<Arc<str>>,
    /// The broker recognised the event as a duplicate of one it already
    /// stored (JetStream `Nats-Msg-Id` deduplication).
    pub duplicate: bool,
}

impl Receipt {
    /// A receipt for `event` sent to `topic`, with no broker details yet.
    pub fn new(topic: impl Into<Arc<str>>, event: &Event) -> Receipt {
        Receipt {
            topic: topic.into(),
            event_id: event.id_shared(),
            stream: None,
            sequence: None,
            message_id: None,
            duplicate: false,
        }
    }

    /// A receipt for `event` sent to its own [topic](Event::topic); shares
    /// the event's strings instead of copying them.
    pub fn for_event(event: &Event) -> Receipt {
        Receipt {
            topic: event.shared_topic(),
            event_id: event.id_shared(),
            stream: None,
            sequence: None,
            message_id: None,
            duplicate: false,
        }
    }

    /// Sets the stream.
    pub fn with_stream(mut self, stream: impl Into<Arc<str>>) -> Receipt {
        self.stream = Some(stream.into());
        self
    }

    /// Sets the sequence.
    pub fn with_sequence(mut self, sequence: u64) -> Receipt {
        self.sequence = Some(sequence);
        self
    }

    /// Sets the broker's message id.
    pub fn with_message_id(mut self, id: impl Into<Arc<str>>) -> Receipt {
        self.message_id = Some(id.into());
        self
    }

    /// Marks the receipt as a duplicate.
    pub fn with_duplicate(mut self, duplicate: bool) -> Receipt {
        self.duplicate = duplicate;
        self
    }
}

/// What a transport can do; the conformance suite runs the cases each flag
/// enables and reports the others as skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Capabilities {
    /// Unacknowledged events survive their subscriber: a new subscriber in
    /// the same group receives them.
    pub persistent: bool,
    /// Named groups of competing consumers: each group gets every event,
    /// members of one group split them.
    pub consumer_groups: bool,
    /// Events on one topic reach a single consumer in publish order.
    pub ordered: bool,
    /// Subscriptions take `*` and `>` patterns.
    pub wildcards: bool,
    /// A nacked event is delivered again with a higher delivery count.
    pub redelivery: bool,
    /// `nack` honours a delay.
    pub nack_delay: bool,
    /// A new subscription can start from events published before it.
    pub replay: bool,
}

impl Capabilities {
    /// No capabilities: at-most-once, fire-and-forget delivery.
    pub const NONE: Capabilities = Capabilities {
        persistent: false,
        consumer_groups: false,
        ordered: false,
        wildcards: false,
        redelivery: false,
        nack_delay: false,
        replay: false,
    };

    /// Sets [`persistent`](Capabilities::persistent).
    pub const fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// Sets [`consumer_groups`](Capabilities::consumer_groups).
    pub const fn consumer_groups(mut self, yes: bool) -> Self {
        self.consumer_groups = yes;
        self
    }

    /// Sets [`ordered`](Capabilities::ordered).
    pub const fn ordered(mut self, yes: bool) -> Self {
        self.ordered = yes;
        self
    }

    /// Sets [`wildcards`](Capabilities::wildcards).
    pub const fn wildcards(mut self, yes: bool) -> Self {
        self.wildcards = yes;
        self
    }

    /// Sets [`redelivery`](Capabilities::redelivery).
    pub const fn redelivery(mut self, yes: bool) -> Self {
        self.redelivery = yes;
        self
    }

    /// Sets [`nack_delay`](Capabilities::nack_delay).
    pub const fn nack_delay(mut self, yes: bool) -> Self {
        self.nack_delay = yes;
        self
    }

    /// Sets [`replay`](Capabilities::replay).
    pub const fn replay(mut self, yes: bool) -> Self {
        self.replay = yes;
        self
    }
}

/// Settles one delivery with the broker. Implemented by each transport.
///
/// Dropping an acker without calling any method must leave the message to
/// be redelivered (see [`Subscriber`](crate::Subscriber)).
pub trait Acker: Send + 'static {
    /// The event was handled: do not deliver it again.
    fn ack(self) -> impl Future<Output = Result<(), Error>> + Send;

    /// The event was not handled: deliver it again, after `delay` if given
    /// and the transport supports it.
    fn nack(self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send;

    /// The message must never be delivered again (a poison message already
    /// sent to the dead-letter path): JetStream `term`, AMQP reject without
    /// requeue, `XACK` on Redis.
    fn reject(self) -> impl Future<Output = Result<(), Error>> + Send;

    /// The handler is still working: extend the broker's ack deadline
    /// (JetStream `+WPI`). The default does nothing.
    fn progress(&self) -> impl Future<Output = Result<(), Error>> + Send {
        std::future::ready(Ok(()))
    }
}

/// A message as it came off the wire, kept when it does not decode.
#[derive(Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// The topic (subject, stream, routing key) it arrived on.
    pub topic: Arc<str>,
    /// Its headers (or stream fields), in wire order.
    pub headers: Vec<(String, Bytes)>,
    /// Its body.
    pub body: Bytes,
}

impl fmt::Debug for RawMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawMessage")
            .field("topic", &self.topic)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// A message that is not a valid event: the raw message and why.
#[derive(Debug)]
pub struct Poison {
    /// The message as received.
    pub raw: RawMessage,
    /// Why it did not decode.
    pub error: Error,
}

/// The `type` of the events that [`Poison::into_event`] makes.
pub const POISON_EVENT_TYPE: &str = "watchtower.poison";

impl Poison {
    /// A poison message.
    pub fn new(raw: RawMessage, error: Error) -> Poison {
        Poison { raw, error }
    }

    /// Wraps the raw message in an event for a dead-letter service: type
    /// [`POISON_EVENT_TYPE`] (also its topic, so that a publisher used as
    /// the dead-letter path does not send it back where it came from), the
    /// raw body as `application/octet-stream` data, the reason, error kind
    /// and original topic as the `deadletter*` extensions, and the headers
    /// (as a JSON object, values lossily decoded as UTF-8, without headers
    /// that may hold credentials or signatures) in the `poisonheaders`
    /// extension.
    pub fn into_event(self) -> Event {
        let mut event = Event::binary(POISON_EVENT_TYPE, "application/octet-stream", self.raw.body);
        event.insert_extension(ext::DEAD_LETTER_REASON, self.error.to_string().into());
        event.insert_extension(ext::DEAD_LETTER_KIND, self.error.kind().as_str().into());
        event.insert_extension(ext::DEAD_LETTER_TOPIC, self.raw.topic.clone());
        if !self.raw.headers.is_empty() {
            let map: serde_json::Map<String, serde_json::Value> = self
                .raw
                .headers
                .iter()
                .filter(|(k, _)| !is_secret_header(k))
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into()))
                .collect();
            event.insert_extension("poisonheaders", serde_json::Value::Object(map).to_string().into());
        }
        event
    }
}

/// Headers whose values may be credentials, left out of dead letters.
fn is_secret_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "signature",
        "token",
        "secret",
        "password",
        "api-key",
        "apikey",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// One message received from a subscription, with its settlement.
pub struct Delivery<A> {
    content: Result<Event, Poison>,
    topic: Arc<str>,
    system: &'static str,
    group: Option<Arc<str>>,
    delivery_count: u32,
    acker: A,
}

impl<A: Acker> Delivery<A> {
    /// A delivery of `event` received on `topic`, first delivery.
    ///
    /// The event's own [topic](Event::topic) becomes `topic`, so that a
    /// handler sees where the event was published to, the same way on
    /// every transport (the topic is not part of the CloudEvents wire
    /// format: it is the subject, stream or routing key the message came
    /// through).
    pub fn new(mut event: Event, topic: impl Into<Arc<str>>, acker: A) -> Delivery<A> {
        let topic = topic.into();
        if event.topic() != &*topic {
            event.set_topic(topic.clone());
        }
        Delivery {
            content: Ok(event),
            topic,
            system: "unknown",
            group: None,
            delivery_count: 1,
            acker,
        }
    }

    /// A delivery of a message that did not decode.
    pub fn poison(poison: Poison, acker: A) -> Delivery<A> {
        Delivery {
            topic: poison.raw.topic.clone(),
            content: Err(poison),
            system: "unknown",
            group: None,
            delivery_count: 1,
            acker,
        }
    }

    /// Sets how many times the transport has delivered this message
    /// (1 the first time).
    pub fn with_delivery_count(mut self, count: u32) -> Self {
        self.delivery_count = count;
        self
    }

    /// Sets the messaging system's name (`nats`, `redis`, `rabbitmq`, ...)
    /// for tracing.
    pub fn with_system(mut self, system: &'static str) -> Self {
        self.system = system;
        self
    }

    /// Sets the consumer group the message was delivered to (the
    /// [`SubscribeOptions::group`] of the subscription), for tracing as
    /// `messaging.consumer.group.name`.
    pub fn with_group(mut self, group: Option<Arc<str>>) -> Self {
        self.group = group;
        self
    }

    /// The consumer group the message was delivered to, if the
    /// subscription joined one.
    pub fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// The event, unless the message did not decode.
    pub fn event(&self) -> Option<&Event> {
        self.content.as_ref().ok()
    }

    /// The poison message, if the message did not decode.
    pub fn poisoned(&self) -> Option<&Poison> {
        self.content.as_ref().err()
    }

    /// The topic the message arrived on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic, shared rather than copied.
    pub fn shared_topic(&self) -> Arc<str> {
        self.topic.clone()
    }

    /// The messaging system's name.
    pub fn system(&self) -> &'static str {
        self.system
    }

    /// How many times the transport has delivered this message.
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// Acknowledges the delivery.
    ///
    /// # Errors
    ///
    /// If the transport could not send the acknowledgement; the message may
    /// then be delivered again.
    pub async fn ack(self) -> Result<(), Error> {
        self.acker.ack().await
    }

    /// Asks for redelivery, after `delay` if given.
    ///
    /// # Errors
    ///
    /// If the transport could not send the negative acknowledgement.
    pub async fn nack(self, delay: Option<Duration>) -> Result<(), Error> {
        self.acker.nack(delay).await
    }

    /// Tells the broker the event is still being worked on, extending its
    /// ack deadline (JetStream `+WPI`); a no-op where the transport has no
    /// deadline.
    ///
    /// # Errors
    ///
    /// If the transport could not send it.
    pub async fn progress(&self) -> Result<(), Error> {
        self.acker.progress().await
    }

    /// Settles the delivery so that it is never delivered again.
    ///
    /// # Errors
    ///
    /// If the transport could not settle it.
    pub async fn reject(self) -> Result<(), Error> {
        self.acker.reject().await
    }

    /// Splits the delivery into its content and its acker.
    pub fn into_parts(self) -> (Result<Event, Poison>, A) {
        (self.content, self.acker)
    }
}

impl<A> fmt::Debug for Delivery<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("content", &self.content)
            .field("topic", &self.topic)
            .field("system", &self.system)
            .field("group", &self.group)
            .field("delivery_count", &self.delivery_count)
            .finish_non_exhaustive()
    }
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    patterns: Vec<TopicPattern>,
    group: Option<Arc<str>>,
    replay: bool,
}

impl SubscribeOptions {
    /// Subscribes to `patterns` (see [`TopicPattern`]).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`] if a pattern is invalid or none is given.
    pub fn new<I, S>(patterns: I) -> Result<SubscribeOptions, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(SubscribeOptions {
            patterns: TopicPattern::parse_all(patterns)?,
            group: None,
            replay: false,
        })
    }

    /// Joins the named consumer group (NATS queue group or durable
    /// consumer, Redis consumer group, RabbitMQ queue): members of a group
    /// share its events, and on persistent transports the group keeps
    /// unacknowledged events while no member is connected.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the name is empty or has characters other
    /// than ASCII letters, digits, `-` and `_`.
    pub fn group(mut self, name: &str) -> Result<SubscribeOptions, Error> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!("group name {name:?} must be non-empty ASCII letters, digits, '-' or '_'"),
            ));
        }
        self.group = Some(name.into());
        Ok(self)
    }

    /// Starts from the earliest event the transport still holds instead of
    /// from new events (transports with [`Capabilities::replay`]).
    pub fn replay(mut self, replay: bool) -> SubscribeOptions {
        self.replay = replay;
        self
    }

    /// The patterns.
    pub fn patterns(&self) -> &[TopicPattern] {
        &self.patterns
    }

    /// The consumer group, if any.
    pub fn group_name(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// Whether to start from the earliest held event.
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// Whether `topic` matches one of the patterns.
    pub fn matches(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(topic))
    }
}

/// The subscription contract: deliveries, settlement, capabilities.
///
/// A transport's [`Subscriber`] opens a subscription: a
/// [`Stream`] of [`Delivery`]s. A delivery is an event
/// (or, when the message did not decode, the raw message and why: a
/// [`Poison`]) plus its settlement: [`ack`](Delivery::ack),
/// [`nack`](Delivery::nack) with an optional delay, or
/// [`reject`](Delivery::reject) (never redeliver), and the transport's
/// delivery count.
///
/// Most code does not touch deliveries: [`serve`](crate::serve()) drives a
/// subscription into a handler service and settles each delivery by the
/// handler's result.
///
/// # Dropping a delivery
///
/// A delivery dropped without being settled is *not* acknowledged: the
/// transport redelivers it (at once for the memory transport, after the
/// broker's ack timeout for NATS JetStream, Redis and RabbitMQ), so a crash
/// or a cancelled handler never loses an event on an at-least-once
/// transport.
///
/// A transport's subscribing side.
pub trait Subscriber: Send + Sync {
    /// How this transport settles deliveries.
    type Acker: Acker;

    /// The stream of deliveries. An `Err` item is a failure the
    /// subscription survived (a dropped connection that is being
    /// re-established, messages a slow consumer lost); the stream ends when
    /// the subscription is closed for good.
    type Subscription: Stream<Item = Result<Delivery<Self::Acker>, Error>> + Send + Unpin + 'static;

    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;

    /// Opens a subscription.
    fn open(
        &self,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<Self::Subscription, Error>> + Send;
}
