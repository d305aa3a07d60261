//! Connection, exchange, publishing and queue configuration.
//!
//! [`RabbitConfig`] says where the broker is and which exchange to use;
//! [`PublishOptions`] and [`QueueOptions`] tune the publisher and the
//! subscriber. Everything is checked when it is built, so a bad URL, an
//! over-long name or an impossible combination fails at construction with an
//! [`ErrorKind::Config`] error instead of at the first publish.
//!
//! ```
//! use std::time::Duration;
//! use watchtower_rabbitmq::{ExchangeKind, QueueOptions, RabbitConfig};
//!
//! let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")?
//!     .exchange("orders", ExchangeKind::Topic)?
//!     .heartbeat(Duration::from_secs(10))
//!     .connection_name("billing");
//! // The password never shows.
//! assert!(!format!("{config:?}").contains("guest:guest"));
//!
//! let queue = QueueOptions::new()
//!     .quorum(true)
//!     .delivery_limit(5)
//!     .dead_letter_exchange("orders.dlx")?
//!     .prefetch(256);
//! assert!(queue.is_quorum());
//! # Ok::<(), watchtower::Error>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use watchtower::redact_url;
use watchtower::{Error, ErrorKind};

/// How long connecting may take unless set: 10 s, long enough for a TLS
/// handshake to a remote broker, short enough to notice a dead one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat asked for unless set: 10 s, so a silently dead peer is
/// noticed within about 20 s (two missed heartbeats) rather than RabbitMQ's
/// 60 s default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// The first reconnect delay: 100 ms, doubled after each failed attempt.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);

/// The longest reconnect delay: 5 s, so a broker that comes back is used
/// again within seconds.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The exchange used unless set: `watchtower`, a durable topic exchange.
pub const DEFAULT_EXCHANGE: &str = "watchtower";

/// The kind of exchange events are published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExchangeKind {
    /// Routing keys matched against `*`/`#` binding patterns: the default,
    /// and the only kind on which wildcard subscriptions are exact.
    #[default]
    Topic,
    /// Routing key equal to the binding key.
    Direct,
    /// Every bound queue gets every event; subscribers filter by topic.
    Fanout,
    /// Routing on headers (the `cloudEvents_*` attributes); subscribers
    /// bind with [`QueueOptions::binding_arguments`] and filter by topic.
    Headers,
}

impl ExchangeKind {
    pub(crate) fn to_lapin(self) -> lapin::ExchangeKind {
        match self {
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// Where the broker is, how to log in, and which exchange to use.
///
/// The `Debug` output shows the URL without its credentials.
#[derive(Clone)]
pub struct RabbitConfig {
    pub(crate) uri: AMQPUri,
    pub(crate) connection_name: Option<Arc<str>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) exchange: Arc<str>,
    pub(crate) exchange_kind: ExchangeKind,
    pub(crate) exchange_passive: bool,
    pub(crate) exchange_durable: bool,
    pub(crate) alternate_exchange: Option<Arc<str>>,
}

impl RabbitConfig {
    /// A configuration for the broker at `url` (`amqp://` or `amqps://`,
    /// user and password in the URL, the virtual host as its path: `%2f`
    /// for `/`). The exchange is [`DEFAULT_EXCHANGE`], a durable topic
    /// exchange; the heartbeat [`DEFAULT_HEARTBEAT`] unless the URL sets
    /// `?heartbeat=`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the URL does not parse; the message never
    /// contains the password.
    pub fn new(url: &str) -> Result<RabbitConfig, Error> {
        let mut uri = AMQPUri::from_str(url).map_err(|reason| {
            let password = url_password(url);
            let reason = if !password.is_empty() && reason.contains(password) {
                "malformed URL".to_owned()
            } else {
                reason
            };
            Error::config(format!("invalid AMQP URL {:?}: {reason}", redact_url(url)))
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(DEFAULT_HEARTBEAT.as_secs() as u16);
        }
        Ok(RabbitConfig {
            uri,
            connection_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            exchange: DEFAULT_EXCHANGE.into(),
            exchange_kind: ExchangeKind::Topic,
            exchange_passive: false,
            exchange_durable: true,
            alternate_exchange: None,
        })
    }

    /// The local broker with the default account:
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn local() -> RabbitConfig {
        let mut uri = AMQPUri::default();
        uri.authority.host = "127.0.0.1".into();
        uri.authority.port = 5672;
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT.as_secs() as u16);
        RabbitConfig {
            uri,
            connection_name: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            exchange: DEFAULT_EXCHANGE.into(),
            exchange_kind: ExchangeKind::Topic,
            exchange_passive: false,
            exchange_durable: true,
            alternate_exchange: None,
        }
    }

    /// Sets the virtual host (unescaped: `/`, `staging`).
    pub fn vhost(mut self, vhost: &str) -> RabbitConfig {
        self.uri.vhost = vhost.to_owned();
        self
    }

    /// Sets the user name and password, replacing those of the URL.
    pub fn credentials(mut self, username: &str, password: &str) -> RabbitConfig {
        self.uri.authority.userinfo.username = username.to_owned();
        self.uri.authority.userinfo.password = password.to_owned();
        self
    }

    /// Sets the heartbeat interval (whole seconds; zero turns heartbeats
    /// off, which leaves dead peers to TCP). Default [`DEFAULT_HEARTBEAT`].
    pub fn heartbeat(mut self, interval: Duration) -> RabbitConfig {
        self.uri.query.heartbeat = Some(interval.as_secs().min(u64::from(u16::MAX)) as u16);
        self
    }

    /// Names the connection in the management UI and `rabbitmqctl
    /// list_connections` (the `connection_name` client property).
    pub fn connection_name(mut self, name: impl Into<Arc<str>>) -> RabbitConfig {
        self.connection_name = Some(name.into());
        self
    }

    /// How long one connection attempt (TCP, TLS and AMQP handshake) may
    /// take. Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> RabbitConfig {
        self.connect_timeout = timeout;
        self
    }

    /// The reconnect backoff: the first delay and the cap of the doubling
    /// delays. Defaults [`DEFAULT_RECONNECT_MIN`], [`DEFAULT_RECONNECT_MAX`].
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> RabbitConfig {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// The exchange to publish to and bind queues on, and its kind.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the name is empty, longer than 255 bytes or
    /// starts with `amq.` (reserved by the broker).
    pub fn exchange(mut self, name: &str, kind: ExchangeKind) -> Result<RabbitConfig, Error> {
        check_name("exchange", name)?;
        if name.starts_with("amq.") {
            return Err(Error::config(format!(
                "exchange name {name:?} is reserved (`amq.` prefix)"
            )));
        }
        self.exchange = name.into();
        self.exchange_kind = kind;
        Ok(self)
    }

    /// Only check that the exchange exists (a passive declare) instead of
    /// declaring it, for brokers whose topology is managed elsewhere.
    pub fn passive_exchange(mut self, passive: bool) -> RabbitConfig {
        self.exchange_passive = passive;
        self
    }

    /// Declares the exchange durable (the default) or transient.
    pub fn durable_exchange(mut self, durable: bool) -> RabbitConfig {
        self.exchange_durable = durable;
        self
    }

    /// Gives the exchange an alternate exchange (the `alternate-exchange`
    /// argument) that keeps every event no binding routes: a durable fanout
    /// exchange `name` and a durable queue `name` bound to it, declared
    /// with the exchange. The broker confirms such an event once it is in
    /// that queue, so nothing is lost, and the publisher need not ask for
    /// unroutable events back: with an alternate exchange, `mandatory` is
    /// off unless set (see [`PublishOptions::mandatory`]), the fast and
    /// safe publishing mode.
    ///
    /// The broker refuses to add the argument to an exchange that already
    /// exists without it (a [`ErrorKind::Config`] error when connecting);
    /// for such an exchange, set the alternate exchange with a broker
    /// policy instead and [`PublishOptions::mandatory`] off.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the name is empty, longer than 255 bytes,
    /// starts with `amq.`, or is the exchange's own name.
    pub fn alternate_exchange(mut self, name: &str) -> Result<RabbitConfig, Error> {
        check_name("alternate exchange", name)?;
        if name.starts_with("amq.") {
            return Err(Error::config(format!(
                "alternate exchange name {name:?} is reserved (`amq.` prefix)"
            )));
        }
        if name == &*self.exchange {
            return Err(Error::config("an exchange cannot be its own alternate exchange"));
        }
        self.alternate_exchange = Some(name.into());
        Ok(self)
    }

    /// The exchange name.
    pub fn exchange_name(&self) -> &str {
        &self.exchange
    }

    /// The exchange kind.
    pub fn exchange_kind(&self) -> ExchangeKind {
        self.exchange_kind
    }

    /// Whether the URL is `amqps://`.
    pub fn is_tls(&self) -> bool {
        self.uri.scheme == AMQPScheme::AMQPS
    }

    /// The broker's address without credentials, for logs and errors.
    pub fn redacted_url(&self) -> String {
        let scheme = if self.is_tls() { "amqps" } else { "amqp" };
        let user = if self.uri.authority.userinfo.username.is_empty() {
            ""
        } else {
            "***@"
        };
        format!(
            "{scheme}://{user}{}:{}/{}",
            self.uri.authority.host,
            self.uri.authority.port,
            self.uri.vhost.replace('/', "%2f")
        )
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("heartbeat", &self.uri.query.heartbeat)
            .field("connection_name", &self.connection_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &(self.reconnect_min, self.reconnect_max))
            .field("exchange", &self.exchange)
            .field("exchange_kind", &self.exchange_kind)
            .field("exchange_passive", &self.exchange_passive)
            .field("alternate_exchange", &self.alternate_exchange)
            .finish()
    }
}

fn url_password(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rfind('@') {
        Some(at) => authority[..at].split_once(':').map_or("", |(_, p)| p),
        None => "",
    }
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::config(format!("{what} name must not be empty")));
    }
    if name.len() > 255 {
        return Err(Error::config(format!("{what} name is longer than 255 bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::config(format!(
            "{what} name {name:?} contains a control character"
        )));
    }
    Ok(())
}

pub(crate) fn short(what: &str, s: &str) -> Result<ShortString, Error> {
    ShortString::try_new(s)
        .map_err(|_| Error::new(ErrorKind::Encode, format!("{what} is longer than 255 bytes")))
}

/// How a publisher writes an event on an AMQP message. Receivers read
/// both modes, whichever a publisher uses.
///
/// Set with [`PublishOptions::content_mode`]. See the
/// [crate docs](crate#wire-format) for the measurements behind the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ContentMode {
    /// The whole event as one CloudEvents JSON object in the body
    /// (`content-type: application/cloudevents+json`), a JSON payload
    /// spliced in as is (`"data"`), any other as `"data_base64"`; no
    /// header table, only the `message-id`, `timestamp` and
    /// `delivery-mode` properties: for consumers that know the JSON event
    /// format but not the AMQP binding. It saves the consuming process a
    /// few µs per event, but costs the broker more CPU per event than
    /// binary mode in the crate's benchmark.
    Structured,
    /// Attributes as `cloudEvents_<attr>` headers (the CloudEvents AMQP
    /// binding's binary mode), `datacontenttype` as the `content-type`
    /// property, the payload alone as the body. The default: the faster
    /// mode to publish in the crate's benchmark, the mode headers
    /// exchanges route on, and what consumers that want the bare payload
    /// read.
    #[default]
    Binary,
}

/// How the publisher sends events.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub(crate) content_mode: Option<ContentMode>,
    pub(crate) confirms: bool,
    pub(crate) mandatory: Option<bool>,
    pub(crate) persistent: bool,
    pub(crate) channels: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) message_ttl: Option<Duration>,
}

/// Channels the publisher spreads events over unless set: 1. Confirms are
/// pipelined on it (up to [`DEFAULT_MAX_IN_FLIGHT`] outstanding). In the
/// crate's benchmark (one durable classic queue, broker on the same two
/// cores) more channels did not publish faster: the broker's work per
/// message (about 1,470 Erlang reductions) was the same with 1, 2 or 4
/// channels and with 2 connections, and its CPU time per message slightly
/// higher with more channel processes. More channels help when one
/// channel process is the broker's bottleneck, e.g. routing to many queues.
pub const DEFAULT_PUBLISH_CHANNELS: usize = 1;

/// Unconfirmed events allowed at once unless set: 4,096, several
/// round trips' worth at high rates while bounding memory.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            content_mode: None,
            confirms: true,
            mandatory: None,
            persistent: true,
            channels: DEFAULT_PUBLISH_CHANNELS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            message_ttl: None,
        }
    }
}

impl PublishOptions {
    /// The defaults: binary mode, confirms, mandatory (unless the
    /// exchange has an alternate exchange), persistent, 1 channel, 4,096 in
    /// flight, no per-message TTL.
    pub fn new() -> PublishOptions {
        PublishOptions::default()
    }

    /// How events are written on the wire. Default [`ContentMode::Binary`]
    /// (see the [crate docs](crate#wire-format) for why). On a
    /// [headers exchange](ExchangeKind::Headers), which routes on the
    /// `cloudEvents_*` headers only binary mode writes, asking for
    /// structured mode fails when the publisher connects.
    pub fn content_mode(mut self, mode: ContentMode) -> PublishOptions {
        self.content_mode = Some(mode);
        self
    }

    /// The content mode events are written in on an exchange of `kind`.
    pub(crate) fn content_mode_for(&self, kind: ExchangeKind) -> Result<ContentMode, Error> {
        match (self.content_mode, kind) {
            (Some(ContentMode::Structured), ExchangeKind::Headers) => Err(Error::config(
                "a headers exchange routes on the cloudEvents_* headers, which only \
                 ContentMode::Binary writes",
            )),
            (Some(mode), _) => Ok(mode),
            (None, _) => Ok(ContentMode::Binary),
        }
    }

    /// Waits for the broker's publisher confirm before the call resolves
    /// (default on). Off, a call resolves once the frames are written, and
    /// an event lost on the way is not reported.
    pub fn confirms(mut self, on: bool) -> PublishOptions {
        self.confirms = on;
        self
    }

    /// Sets the `mandatory` flag: an event no queue is bound for comes
    /// back as an [`ErrorKind::Rejected`] error instead of being dropped by
    /// the broker. Only reported with confirms on. Default on, unless the
    /// exchange has an [alternate exchange](RabbitConfig::alternate_exchange),
    /// which keeps such events.
    ///
    /// # Trade-off
    ///
    /// lapin hands a returned message to whichever confirm of its channel
    /// completes next, so with `mandatory` the publisher's channels each
    /// run a task that matches returns to their events by id and, before
    /// answering a batch of confirms, waits for one more round trip on the
    /// channel (a `basic.qos`) so that no return of the batch is still
    /// on its way (see the
    /// [crate docs](crate#mandatory-and-the-alternate-exchange)). That
    /// costs the process 2 to 4 µs of CPU per event (the hop through the
    /// task) and the broker one `basic.qos` per batch; in the benchmark,
    /// binary mode with `mandatory` published at 1.02 and 1.07 times raw
    /// lapin (medians of two runs), with an alternate exchange and
    /// without it at 1.07 (see the
    /// [publisher docs](crate::publisher#performance)).
    /// Without `mandatory`, each caller waits for its own
    /// confirm directly, as raw lapin does, and the broker drops an event
    /// no binding routes while confirming it: safe only when every topic
    /// published has a binding, or the exchange has an alternate exchange.
    pub fn mandatory(mut self, on: bool) -> PublishOptions {
        self.mandatory = Some(on);
        self
    }

    /// Whether `mandatory` is set on an exchange configured as `config`.
    pub(crate) fn mandatory_for(&self, config: &RabbitConfig) -> bool {
        self.mandatory.unwrap_or(config.alternate_exchange.is_none())
    }

    /// Whether `mandatory` is set, once resolved by
    /// [`mandatory_for`](PublishOptions::mandatory_for).
    pub(crate) fn is_mandatory(&self) -> bool {
        self.mandatory.unwrap_or(true)
    }

    /// Persistent delivery mode (default on): durable queues keep the event
    /// across a broker restart.
    pub fn persistent(mut self, on: bool) -> PublishOptions {
        self.persistent = on;
        self
    }

    /// Confirm-mode channels to spread events over (1 to 64), in turn, for
    /// brokers where routing to many queues makes a single channel process
    /// the bottleneck. Default [`DEFAULT_PUBLISH_CHANNELS`]. Each call
    /// still resolves on its own event's confirm; a failed channel is
    /// replaced without disturbing the others (see the
    /// [publisher docs](crate::publisher#channels)). Events of one caller
    /// that waits for each receipt keep their order; concurrent events may
    /// be reordered across channels.
    pub fn channels(mut self, n: usize) -> PublishOptions {
        self.channels = n.clamp(1, 64);
        self
    }

    /// Unconfirmed events allowed at once across all clones (at least 1);
    /// `poll_ready` is pending while the window is full. Default
    /// [`DEFAULT_MAX_IN_FLIGHT`].
    pub fn max_in_flight(mut self, n: usize) -> PublishOptions {
        self.max_in_flight = n.max(1);
        self
    }

    /// Per-message TTL (the `expiration` property): the broker drops or
    /// dead-letters an event not consumed within `ttl`.
    pub fn message_ttl(mut self, ttl: Duration) -> PublishOptions {
        self.message_ttl = Some(ttl);
        self
    }
}

/// What a queue does when it is full (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueOverflow {
    /// Drop (or dead-letter) the oldest messages: the broker's default.
    DropHead,
    /// Refuse new messages; with confirms on, the publisher gets a
    /// retryable [`ErrorKind::Rejected`] error.
    RejectPublish,
    /// Refuse new messages and dead-letter them (classic queues only).
    RejectPublishDlx,
}

impl QueueOverflow {
    fn as_str(self) -> &'static str {
        match self {
            QueueOverflow::DropHead => "drop-head",
            QueueOverflow::RejectPublish => "reject-publish",
            QueueOverflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// Prefetch unless set: 256 unacknowledged deliveries per subscription,
/// enough to keep a fast consumer busy across a network round trip.
pub const DEFAULT_PREFETCH: u16 = 256;

/// How a subscriber's queue is declared and consumed.
///
/// A subscription with a consumer group consumes from a durable queue named
/// `<prefix><group>` (the prefix defaults to `<exchange>.`), shared by every
/// member of the group; one without a group gets an exclusive, auto-delete
/// queue that lives as long as its connection.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    pub(crate) prefix: Option<Arc<str>>,
    pub(crate) queue: Option<Arc<str>>,
    pub(crate) passive: bool,
    pub(crate) quorum: bool,
    pub(crate) delivery_limit: Option<u32>,
    pub(crate) dead_letter_exchange: Option<Arc<str>>,
    pub(crate) dead_letter_routing_key: Option<Arc<str>>,
    pub(crate) dead_letter_queue: Option<Arc<str>>,
    pub(crate) message_ttl: Option<Duration>,
    pub(crate) expires: Option<Duration>,
    pub(crate) max_length: Option<u64>,
    pub(crate) max_length_bytes: Option<u64>,
    pub(crate) overflow: Option<QueueOverflow>,
    pub(crate) prefetch: u16,
    pub(crate) binding_arguments: FieldTable,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            prefix: None,
            queue: None,
            passive: false,
            quorum: false,
            delivery_limit: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            dead_letter_queue: None,
            message_ttl: None,
            expires: None,
            max_length: None,
            max_length_bytes: None,
            overflow: None,
            prefetch: DEFAULT_PREFETCH,
            binding_arguments: FieldTable::default(),
        }
    }
}

impl QueueOptions {
    /// The defaults: classic queues, no dead-lettering, prefetch
    /// [`DEFAULT_PREFETCH`].
    pub fn new() -> QueueOptions {
        QueueOptions::default()
    }

    /// The prefix of group queue names. Default `<exchange>.`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if longer than 200 bytes.
    pub fn queue_prefix(mut self, prefix: &str) -> Result<QueueOptions, Error> {
        if prefix.len() > 200 {
            return Err(Error::config("queue prefix is longer than 200 bytes"));
        }
        self.prefix = Some(prefix.into());
        Ok(self)
    }

    /// Consume from this exact queue, whatever the group, for queues
    /// managed elsewhere (a dead-letter queue being drained).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the name is empty or too long.
    pub fn queue(mut self, name: &str) -> Result<QueueOptions, Error> {
        check_name("queue", name)?;
        self.queue = Some(name.into());
        Ok(self)
    }

    /// Only check that the queue exists (a passive declare), and bind
    /// nothing.
    pub fn passive(mut self, passive: bool) -> QueueOptions {
        self.passive = passive;
        self
    }

    /// Declare group queues as quorum queues (`x-queue-type: quorum`):
    /// replicated, with the `x-delivery-count` header and a delivery limit.
    pub fn quorum(mut self, quorum: bool) -> QueueOptions {
        self.quorum = quorum;
        self
    }

    /// Whether queues are declared as quorum queues.
    pub fn is_quorum(&self) -> bool {
        self.quorum
    }

    /// After this many failed deliveries (nacks with requeue) a quorum
    /// queue dead-letters the message (`x-delivery-limit`).
    pub fn delivery_limit(mut self, limit: u32) -> QueueOptions {
        self.delivery_limit = Some(limit);
        self
    }

    /// Dead-letter rejected, expired and over-limit messages to this
    /// exchange (`x-dead-letter-exchange`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the name is empty or too long.
    pub fn dead_letter_exchange(mut self, exchange: &str) -> Result<QueueOptions, Error> {
        check_name("dead-letter exchange", exchange)?;
        self.dead_letter_exchange = Some(exchange.into());
        Ok(self)
    }

    /// The routing key dead-lettered messages get
    /// (`x-dead-letter-routing-key`); by default they keep their own.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if longer than 255 bytes.
    pub fn dead_letter_routing_key(mut self, key: &str) -> Result<QueueOptions, Error> {
        if key.len() > 255 {
            return Err(Error::config("dead-letter routing key is longer than 255 bytes"));
        }
        self.dead_letter_routing_key = Some(key.into());
        Ok(self)
    }

    /// Also declare the dead-letter exchange (durable, topic) and a durable
    /// queue of this name bound to it with `#`, so dead letters are kept.
    /// Needs [`dead_letter_exchange`](QueueOptions::dead_letter_exchange).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the name is empty or too long.
    pub fn dead_letter_queue(mut self, queue: &str) -> Result<QueueOptions, Error> {
        check_name("dead-letter queue", queue)?;
        self.dead_letter_queue = Some(queue.into());
        Ok(self)
    }

    /// Messages older than `ttl` are dropped or dead-lettered
    /// (`x-message-ttl`).
    pub fn message_ttl(mut self, ttl: Duration) -> QueueOptions {
        self.message_ttl = Some(ttl);
        self
    }

    /// A group queue unused (no consumers, no declarations) for `idle` is
    /// deleted by the broker (`x-expires`), for short-lived groups.
    pub fn expires(mut self, idle: Duration) -> QueueOptions {
        self.expires = Some(idle);
        self
    }

    /// At most `n` messages in the queue (`x-max-length`); see
    /// [`overflow`](QueueOptions::overflow).
    pub fn max_length(mut self, n: u64) -> QueueOptions {
        self.max_length = Some(n);
        self
    }

    /// At most `n` bytes of bodies in the queue (`x-max-length-bytes`).
    pub fn max_length_bytes(mut self, n: u64) -> QueueOptions {
        self.max_length_bytes = Some(n);
        self
    }

    /// What happens when the queue is full (`x-overflow`).
    pub fn overflow(mut self, overflow: QueueOverflow) -> QueueOptions {
        self.overflow = Some(overflow);
        self
    }

    /// Unacknowledged deliveries per subscription (`basic.qos`), the
    /// backpressure bound between broker and consumer (at least 1).
    /// Default [`DEFAULT_PREFETCH`].
    pub fn prefetch(mut self, n: u16) -> QueueOptions {
        self.prefetch = n.max(1);
        self
    }

    /// Arguments of each binding, for headers exchanges (`x-match` and the
    /// header values).
    pub fn binding_arguments(mut self, arguments: FieldTable) -> QueueOptions {
        self.binding_arguments = arguments;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.dead_letter_queue.is_some() && self.dead_letter_exchange.is_none() {
            return Err(Error::config("a dead-letter queue needs a dead-letter exchange"));
        }
        if self.delivery_limit.is_some() && !self.quorum {
            return Err(Error::config(
                "a delivery limit needs quorum queues (QueueOptions::quorum(true))",
            ));
        }
        if self.quorum && self.overflow == Some(QueueOverflow::RejectPublishDlx) {
            return Err(Error::config(
                "quorum queues do not support reject-publish-dlx overflow",
            ));
        }
        Ok(())
    }

    /// The `x-` arguments of a durable group queue.
    pub(crate) fn arguments(&self, durable: bool) -> FieldTable {
        let mut args = FieldTable::default();
        if self.quorum && durable {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
        if let Some(limit) = self.delivery_limit.filter(|_| durable && self.quorum) {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
        }
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_bytes().into()),
            );
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(key.as_bytes().into()),
            );
        }
        if let Some(ttl) = self.message_ttl {
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(millis(ttl)));
        }
        if let Some(idle) = self.expires.filter(|_| durable) {
            args.insert("x-expires".into(), AMQPValue::LongLongInt(millis(idle).max(1)));
        }
        if let Some(n) = self.max_length {
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(n.min(i64::MAX as u64) as i64),
            );
        }
        if let Some(n) = self.max_length_bytes {
            args.insert(
                "x-max-length-bytes".into(),
                AMQPValue::LongLongInt(n.min(i64::MAX as u64) as i64),
            );
        }
        if let Some(overflow) = self.overflow {
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString(overflow.as_str().into()),
            );
        }
        args
    }
}

pub(crate) fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_fail_without_leaking_the_password() {
        let err = RabbitConfig::new("http://user:s3cret@host/").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = RabbitConfig::new("amqp://user:s3cret@host:notaport/").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!format!("{err:?}").contains("s3cret"));
    }

    #[test]
    fn debug_hides_credentials() {
        let config = RabbitConfig::new("amqps://admin:hunter2@broker:5671/prod")
            .unwrap()
            .credentials("admin", "hunter3");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("amqps://***@broker:5671/prod"), "{shown}");
        assert!(config.is_tls());
    }

    #[test]
    fn url_sets_vhost_and_heartbeat() {
        let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=3").unwrap();
        assert_eq!(config.uri.vhost, "/");
        assert_eq!(config.uri.query.heartbeat, Some(3));
        let config = RabbitConfig::new("amqp://127.0.0.1").unwrap().vhost("staging");
        assert_eq!(config.uri.query.heartbeat, Some(10));
        // The default account (guest) still counts as credentials.
        assert_eq!(config.redacted_url(), "amqp://***@127.0.0.1:5672/staging");
    }

    #[test]
    fn bad_names_and_combinations_fail() {
        let config = RabbitConfig::local();
        assert_eq!(
            config
                .clone()
                .exchange("", ExchangeKind::Topic)
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
        assert_eq!(
            config
                .clone()
                .exchange("amq.topic", ExchangeKind::Topic)
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
        assert!(config.exchange(&"x".repeat(256), ExchangeKind::Topic).is_err());
        assert!(QueueOptions::new().delivery_limit(3).validate().is_err());
        assert!(
            QueueOptions::new()
                .dead_letter_queue("dlq")
                .unwrap()
                .validate()
                .is_err()
        );
        assert!(
            QueueOptions::new()
                .quorum(true)
                .overflow(QueueOverflow::RejectPublishDlx)
                .validate()
                .is_err()
        );
        assert!(
            QueueOptions::new()
                .quorum(true)
                .delivery_limit(3)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn content_mode_defaults_to_binary_and_headers_exchanges_need_it() {
        let default = PublishOptions::new();
        assert_eq!(
            default.content_mode_for(ExchangeKind::Topic).unwrap(),
            ContentMode::Binary
        );
        assert_eq!(
            default.content_mode_for(ExchangeKind::Headers).unwrap(),
            ContentMode::Binary
        );
        let structured = PublishOptions::new().content_mode(ContentMode::Structured);
        assert_eq!(
            structured.content_mode_for(ExchangeKind::Topic).unwrap(),
            ContentMode::Structured
        );
        assert_eq!(
            structured
                .content_mode_for(ExchangeKind::Headers)
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn arguments_follow_options() {
        let args = QueueOptions::new()
            .quorum(true)
            .delivery_limit(2)
            .dead_letter_exchange("dlx")
            .unwrap()
            .message_ttl(Duration::from_secs(1))
            .max_length(10)
            .overflow(QueueOverflow::RejectPublish)
            .arguments(true);
        let inner = args.inner();
        assert_eq!(
            inner.get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(inner.get("x-delivery-limit"), Some(&AMQPValue::LongLongInt(2)));
        assert_eq!(inner.get("x-message-ttl"), Some(&AMQPValue::LongLongInt(1000)));
        assert_eq!(inner.get("x-max-length"), Some(&AMQPValue::LongLongInt(10)));
        assert!(inner.contains_key("x-dead-letter-exchange"));
        // Exclusive queues cannot be quorum queues.
        assert!(
            !QueueOptions::new()
                .quorum(true)
                .arguments(false)
                .contains_key("x-queue-type")
        );
    }
}
