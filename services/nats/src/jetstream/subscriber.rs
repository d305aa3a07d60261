//! JetStream subscribing: [`ConsumerSettings`], [`JetStreamSubscriber`],
//! its subscriptions and their settlement.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use futures_core::Stream;
use futures_util::StreamExt as _;
use watchtower::{
    Acker, Capabilities, Delivery, Error, ErrorKind, SubscribeOptions, Subscriber, TopicPattern, Transport,
};

use crate::client::NatsClient;
use crate::jetstream::pull::{Pull, PullSettings};
use crate::wire::{self, TopicCache};

/// How a [`JetStreamSubscriber`] sets up and reads its consumers.
///
/// Each default is the JetStream default unless said otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    ack_wait: Duration,
    max_deliver: Option<u32>,
    backoff: Vec<Duration>,
    max_ack_pending: u32,
    batch: usize,
    expires: Duration,
    inactive_threshold: Duration,
    double_ack: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            backoff: Vec::new(),
            max_ack_pending: 1000,
            batch: 200,
            expires: Duration::from_secs(30),
            inactive_threshold: Duration::from_secs(300),
            double_ack: false,
        }
    }
}

impl ConsumerSettings {
    /// Default settings.
    pub fn new() -> ConsumerSettings {
        ConsumerSettings::default()
    }

    /// How long the server waits for a settlement before it redelivers.
    /// Default 30 s, the JetStream default; handlers that take longer call
    /// [`Acker::progress`].
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Delivers a message at most `n` times; after that the server stops
    /// (pair it with a dead-letter handler). Default: no limit.
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.max_deliver = Some(n);
        self
    }

    /// Redelivery delays after an ack timeout, one per delivery (the last
    /// one repeats). Needs [`max_deliver`](Self::max_deliver) larger than
    /// the list. Default: none (redeliver after `ack_wait`).
    pub fn backoff(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.backoff = delays.into_iter().collect();
        self
    }

    /// Unsettled messages the server hands out at once. Default 1000, the
    /// JetStream default.
    pub fn max_ack_pending(mut self, n: u32) -> Self {
        self.max_ack_pending = n;
        self
    }

    /// Messages asked for per pull request. Default 200: large enough to
    /// keep a busy consumer fed, small enough that prefetched messages do
    /// not sit long against their ack wait. A subscription asks again once
    /// fewer than half a batch are still owed to it.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n;
        self
    }

    /// How long a pull request waits for messages. Default 30 s. While a
    /// request waits, the server sends a heartbeat every half of this (at
    /// most every 15 s); when two heartbeat periods pass with nothing
    /// received, the subscription reports a [`ErrorKind::Connection`]
    /// error and asks again, so a request lost with a connection or a
    /// consumer leader costs at most that long.
    pub fn expires(mut self, expires: Duration) -> Self {
        self.expires = expires;
        self
    }

    /// How long the server keeps a subscription's consumer without a
    /// reader, for subscriptions without a group (durable group consumers
    /// are kept until deleted). Default 5 min.
    pub fn inactive_threshold(mut self, threshold: Duration) -> Self {
        self.inactive_threshold = threshold;
        self
    }

    /// Waits for the server to confirm each `ack` (slower; an ack lost in a
    /// connection cut is then reported instead of causing a redelivery).
    /// Default off.
    pub fn double_ack(mut self, yes: bool) -> Self {
        self.double_ack = yes;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.ack_wait.is_zero() {
            return Err(Error::config("JetStream ack wait must be positive"));
        }
        if self.max_deliver == Some(0) {
            return Err(Error::config("JetStream max deliver must be at least 1"));
        }
        if self.batch == 0 || self.max_ack_pending == 0 {
            return Err(Error::config(
                "JetStream batch and max ack pending must be at least 1",
            ));
        }
        if self.expires < Duration::from_secs(1) {
            return Err(Error::config("JetStream pull expiry must be at least 1 s"));
        }
        if !self.backoff.is_empty() {
            let enough = self
                .max_deliver
                .is_some_and(|n| usize::try_from(n).is_ok_and(|n| n > self.backoff.len()));
            if !enough {
                return Err(Error::config(
                    "JetStream backoff needs max deliver larger than the number of delays",
                ));
            }
        }
        Ok(())
    }

    /// The consumer configuration for a subscription with `options`.
    pub fn consumer_config(&self, options: &SubscribeOptions) -> pull::Config {
        let patterns = options.patterns();
        pull::Config {
            durable_name: options.group_name().map(str::to_owned),
            deliver_policy: if options.is_replay() {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver.map_or(-1, i64::from),
            backoff: self.backoff.clone(),
            max_ack_pending: i64::from(self.max_ack_pending),
            filter_subject: match patterns {
                [one] => one.as_str().to_owned(),
                _ => String::new(),
            },
            inactive_threshold: if options.group_name().is_some() {
                Duration::ZERO
            } else {
                self.inactive_threshold
            },
            ..Default::default()
        }
    }
}

/// Subscribes to a JetStream stream through pull consumers; made by
/// [`NatsClient::jetstream_subscriber`].
///
/// A subscription with a [group](SubscribeOptions::group) reads from the
/// durable consumer named after the group (created, or updated, on
/// [`open`](Subscriber::open)): members of one group split the events,
/// events left unsettled by a member that stopped go to the others, and a
/// member that starts later continues where the group was. A subscription
/// without a group gets its own consumer, removed by the server after
/// [`inactive_threshold`](ConsumerSettings::inactive_threshold).
///
/// A new consumer starts with events published after it is created, or
/// with the oldest held event with [`replay`](SubscribeOptions::replay).
/// Settlement is explicit: `ack`, `nack` with an optional delay
/// (`-NAK {"delay": ..}`), `reject` (`+TERM`, for poison messages) and
/// `progress` (`+WPI`). Each delivery carries the server's delivery count.
///
/// One pattern filters on the server. Several patterns read the whole
/// stream and filter in the client, acknowledging the rest (servers before
/// 2.10 take one filter per consumer).
#[derive(Debug, Clone)]
pub struct JetStreamSubscriber {
    client: NatsClient,
    stream: String,
    settings: ConsumerSettings,
}

impl JetStreamSubscriber {
    /// What JetStream can do.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE
        .persistent(true)
        .consumer_groups(true)
        .ordered(true)
        .wildcards(true)
        .redelivery(true)
        .nack_delay(true)
        .replay(true);

    /// A subscriber on the stream named `stream`, for
    /// [`NatsClient::jetstream_subscriber`].
    pub(crate) fn new(client: NatsClient, stream: String) -> JetStreamSubscriber {
        JetStreamSubscriber {
            client,
            stream,
            settings: ConsumerSettings::default(),
        }
    }

    /// Uses `settings` for the consumers it creates. Default
    /// [`ConsumerSettings::default`]. Checked, with the stream's name, when
    /// a subscription opens: inconsistent settings (zero ack wait, backoff
    /// without a large enough max deliver) fail it with
    /// [`ErrorKind::Config`].
    pub fn settings(mut self, settings: ConsumerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The connection.
    pub fn client(&self) -> &NatsClient {
        &self.client
    }
}

impl Subscriber for JetStreamSubscriber {
    type Acker = JetStreamAcker;
    type Subscription = JetStreamSubscription;

    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn open(&self, options: SubscribeOptions) -> Result<JetStreamSubscription, Error> {
        crate::jetstream::validate_name("stream", &self.stream)?;
        self.settings.validate()?;
        let config = self.settings.consumer_config(&options);
        let context = self.client.raw_jetstream();
        let consumer = match context
            .create_consumer_on_stream(config.clone(), &self.stream)
            .await
        {
            Ok(consumer) => consumer,
            Err(e) => {
                let existing = match &config.durable_name {
                    Some(name) => context
                        .get_consumer_from_stream::<pull::Config, _, _>(name.as_str(), self.stream.as_str())
                        .await
                        .ok(),
                    None => None,
                };
                // A durable consumer the server will not update (a different
                // start policy) is still the group's consumer when it reads the
                // same subjects.
                match existing {
                    Some(consumer)
                        if consumer.cached_info().config.filter_subject == config.filter_subject =>
                    {
                        tracing::warn!(
                            stream = %self.stream,
                            error = %e,
                            "using the existing JetStream consumer; its settings were not updated"
                        );
                        consumer
                    }
                    _ => return Err(consumer_error(&self.stream, &e)),
                }
            }
        };
        let settings = PullSettings {
            batch: self.settings.batch,
            expires: self.settings.expires,
            heartbeat: (self.settings.expires / 2).min(Duration::from_secs(15)),
        };
        let info = consumer.cached_info();
        let messages = Pull::start(
            self.client.raw(),
            &info.stream_name,
            &info.name,
            &settings,
            self.client.state().watch_up(),
        )
        .await?;
        let filter = (options.patterns().len() > 1).then(|| options.patterns().to_vec());
        Ok(JetStreamSubscription {
            messages,
            client: self.client.clone(),
            filter,
            double_ack: self.settings.double_ack,
            done: false,
            topics: TopicCache::default(),
            group: options.group_name().map(Arc::from),
        })
    }
}

fn consumer_error(stream: &str, e: &ConsumerError) -> Error {
    match e.kind() {
        ConsumerErrorKind::JetStream(js) if js.code() == 404 => {
            Error::config(format!("JetStream stream {stream:?} does not exist"))
        }
        ConsumerErrorKind::JetStream(js) => {
            Error::config(format!("JetStream refused the consumer on {stream:?}: {js}"))
        }
        ConsumerErrorKind::TimedOut => Error::new(
            ErrorKind::Timeout,
            "JetStream did not answer the consumer request",
        ),
        ConsumerErrorKind::InvalidName => Error::config("invalid JetStream consumer name"),
        _ => Error::new(
            ErrorKind::Connection,
            format!("cannot create the JetStream consumer: {e}"),
        ),
    }
}

/// A JetStream subscription: a stream of deliveries from a pull consumer.
///
/// Messages are pulled in batches as the stream is read; dropping it stops
/// pulling, and the messages it held unsettled are redelivered after the
/// ack wait.
pub struct JetStreamSubscription {
    messages: Pull,
    /// Where settlements go.
    client: NatsClient,
    filter: Option<Vec<TopicPattern>>,
    double_ack: bool,
    done: bool,
    topics: TopicCache,
    /// The durable consumer's group, for tracing.
    group: Option<Arc<str>>,
}

impl fmt::Debug for JetStreamSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamSubscription")
            .field("filter", &self.filter)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Stream for JetStreamSubscription {
    type Item = Result<Delivery<JetStreamAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let message = match this.messages.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(message))) => message,
            };
            let delivered = message.reply.as_deref().and_then(delivery_count).unwrap_or(1);
            let acker = JetStreamAcker {
                client: this.client.clone(),
                reply: message.reply.clone(),
                double_ack: this.double_ack,
            };
            let subject = message.subject.as_str();
            if let Some(filter) = &this.filter
                && !filter.iter().any(|p| p.matches(subject))
            {
                // Not for this subscription: settle it so the consumer moves on.
                tokio::spawn(async move {
                    if let Err(e) = acker.ack().await {
                        tracing::debug!(error = %e, "could not acknowledge a filtered-out JetStream message");
                    }
                });
                continue;
            }
            let delivery = match wire::decode(subject, message.headers.as_ref(), message.payload) {
                Ok(event) => Delivery::new(event, this.topics.get(subject), acker),
                Err(poison) => Delivery::poison(poison, acker),
            };
            return Poll::Ready(Some(Ok(delivery
                .with_delivery_count(delivered)
                .with_system(NatsClient::SYSTEM)
                .with_group(this.group.clone()))));
        }
    }
}

/// The delivery count in a JetStream message's reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or with the domain and the account hash before the stream (11 tokens or
/// more, the later ones ignored).
fn delivery_count(reply: &str) -> Option<u32> {
    // One pass: the first nine tokens, and whether there are more.
    let mut tokens = [""; 9];
    let mut n = 0;
    for token in reply.strip_prefix("$JS.ACK.")?.split('.').take(tokens.len()) {
        tokens[n] = token;
        n += 1;
    }
    let delivered = match n {
        7 => tokens[2],
        9 => tokens[4],
        _ => return None,
    };
    let delivered: u64 = delivered.parse().ok()?;
    Some(u32::try_from(delivered.max(1)).unwrap_or(u32::MAX))
}

/// Settles a JetStream delivery: `+ACK`, `-NAK` (with delay), `+TERM`,
/// `+WPI`, published to the message's reply subject (or, with
/// [`double_ack`](ConsumerSettings::double_ack), sent as a request the
/// server confirms).
pub struct JetStreamAcker {
    client: NatsClient,
    reply: Option<async_nats::Subject>,
    double_ack: bool,
}

impl fmt::Debug for JetStreamAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamAcker")
            .field("double_ack", &self.double_ack)
            .finish_non_exhaustive()
    }
}

impl JetStreamAcker {
    async fn send(&self, kind: AckKind, confirmed: bool) -> Result<(), Error> {
        let Some(reply) = &self.reply else {
            return Err(Error::new(
                ErrorKind::Connection,
                "cannot settle the JetStream message: it has no reply subject",
            ));
        };
        let raw = self.client.raw();
        let sent = if confirmed {
            // Boxed: a request's future would make every settlement's large.
            Box::pin(raw.request(reply.clone(), kind.into()))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            raw.publish(reply.clone(), kind.into())
                .await
                .map_err(|e| e.to_string())
        };
        sent.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot settle the JetStream message: {e}"),
            )
        })
    }
}

impl Acker for JetStreamAcker {
    async fn ack(self) -> Result<(), Error> {
        self.send(AckKind::Ack, self.double_ack).await
    }

    async fn nack(self, delay: Option<Duration>) -> Result<(), Error> {
        self.send(AckKind::Nak(delay), self.double_ack).await
    }

    async fn reject(self) -> Result<(), Error> {
        self.send(AckKind::Term, self.double_ack).await
    }

    async fn progress(&self) -> Result<(), Error> {
        self.send(AckKind::Progress, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::delivery_count;

    #[test]
    fn delivery_counts_are_read_from_both_reply_subject_forms() {
        assert_eq!(
            delivery_count("$JS.ACK.ORDERS.c1.3.17.15.1700000000000000000.4"),
            Some(3)
        );
        assert_eq!(
            delivery_count("$JS.ACK.hub.ACCHASH.ORDERS.c1.5.17.15.1700000000000000000.4.rand"),
            Some(5)
        );
        assert_eq!(
            delivery_count("$JS.ACK.hub.ACCHASH.ORDERS.c1.6.17.15.1700000000000000000.4"),
            Some(6)
        );
        // Zero is read as a first delivery; past u32 saturates.
        assert_eq!(delivery_count("$JS.ACK.S.c.0.1.1.1.0"), Some(1));
        assert_eq!(
            delivery_count("$JS.ACK.S.c.18446744073709551615.1.1.1.0"),
            Some(u32::MAX)
        );
        for bad in [
            "",
            "$JS.ACK.",
            "$JS.ACK.S.c.x.1.1.1.0",
            "$JS.ACK.S.c.-1.1.1.1.0",
            "$JS.ACK.S.c.18446744073709551616.1.1.1.0",
            "$JS.ACK.S.c.1.1.1.1",
            "$JS.ACK.S.c.1.1.1.1.1.1",
            "_INBOX.S.c.1.1.1.1.0",
        ] {
            assert_eq!(delivery_count(bad), None, "{bad}");
        }
    }
}
