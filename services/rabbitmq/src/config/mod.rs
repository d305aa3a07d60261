//! Connection, exchange, publishing and queue configuration.
//!
//! [`RabbitConfig`] says where the broker is and which exchange to use;
//! [`PublishOptions`] and [`QueueOptions`] tune the publisher and the
//! subscriber. They are plain data: setters never fail. Everything is
//! checked once, when [`RabbitClient::connect`](crate::RabbitClient::connect)
//! (or the subscriber or publisher made from the client) uses it, so a bad
//! URL, an over-long name or an impossible combination fails there with an
//! [`ErrorKind::Config`] error instead of at the first publish.
//!
//! ```
//! use std::time::Duration;
//! use watchtower_rabbitmq::{ExchangeKind, QueueOptions, RabbitConfig};
//!
//! let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .exchange("orders", ExchangeKind::Topic)
//!     .heartbeat(Duration::from_secs(10))
//!     .connection_name("billing");
//! // The password never shows.
//! assert!(!format!("{config:?}").contains("guest:guest"));
//!
//! let queue = QueueOptions::new()
//!     .quorum(true)
//!     .delivery_limit(5)
//!     .dead_letter_exchange("orders.dlx")
//!     .prefetch(256);
//! assert!(queue.is_quorum());
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::ShortString;
use lapin::uri::{AMQPScheme, AMQPUri};
use watchtower::redact_url;
use watchtower::{Error, ErrorKind};

mod exchange;
mod publish;
mod queue;

pub use exchange::ExchangeKind;
pub use publish::{ContentMode, PublishOptions};
pub use queue::{QueueOptions, QueueOverflow};

/// How long connecting may take unless set: 10 s, long enough for a TLS
/// handshake to a remote broker, short enough to notice a dead one.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat asked for unless set: 10 s, so a silently dead peer is
/// noticed within about 20 s (two missed heartbeats) rather than RabbitMQ's
/// 60 s default.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// The first reconnect delay: 100 ms, doubled after each failed attempt.
const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);

/// The longest reconnect delay: 5 s, so a broker that comes back is used
/// again within seconds.
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The exchange used unless set: `watchtower`, a durable topic exchange.
const DEFAULT_EXCHANGE: &str = "watchtower";

/// Where the broker is, how to log in, and which exchange to use.
///
/// The `Debug` output shows the URL without its credentials.
#[derive(Clone)]
pub struct RabbitConfig {
    /// The parsed URL, or the redacted URL and why it does not parse
    /// (reported by [`validate`](RabbitConfig::validate)).
    pub(crate) uri: Result<AMQPUri, (Arc<str>, Arc<str>)>,
    /// Further nodes, tried in order when the URL's does not answer:
    /// `host:port`, or the text that did not parse.
    pub(crate) nodes: Vec<Result<(String, u16), Arc<str>>>,
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
    /// for `/`). The exchange is `watchtower`, a durable topic exchange;
    /// the heartbeat 10 s unless the URL sets `?heartbeat=`.
    ///
    /// A URL that does not parse is reported, without its password, as an
    /// [`ErrorKind::Config`] error by
    /// [`RabbitClient::connect`](crate::RabbitClient::connect).
    pub fn new(url: &str) -> RabbitConfig {
        let uri = AMQPUri::from_str(url)
            .map(|mut uri| {
                if uri.query.heartbeat.is_none() {
                    uri.query.heartbeat = Some(DEFAULT_HEARTBEAT.as_secs() as u16);
                }
                uri
            })
            .map_err(|reason| {
                let password = url_password(url);
                let reason = if !password.is_empty() && reason.contains(password) {
                    "malformed URL".to_owned()
                } else {
                    reason
                };
                (Arc::from(redact_url(url).as_ref()), Arc::from(reason))
            });
        RabbitConfig::with_uri(uri)
    }

    /// The local broker with the default account:
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn local() -> RabbitConfig {
        let mut uri = AMQPUri::default();
        uri.authority.host = "127.0.0.1".into();
        uri.authority.port = 5672;
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT.as_secs() as u16);
        RabbitConfig::with_uri(Ok(uri))
    }

    /// The defaults around `uri` (or the redacted URL and the reason it did
    /// not parse).
    fn with_uri(uri: Result<AMQPUri, (Arc<str>, Arc<str>)>) -> RabbitConfig {
        RabbitConfig {
            uri,
            nodes: Vec::new(),
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

    /// Adds a node (`host:port`) to connect to when the URL's node does
    /// not answer: another node of the same cluster, or a standby broker.
    /// It is reached with the URL's credentials, virtual host, TLS and
    /// heartbeat. Every connection, the first and each reconnection, tries
    /// the URL's node first, then these in the order they were added, each
    /// within the [connect timeout](RabbitConfig::connect_timeout).
    ///
    /// What a failover costs a publisher: the publishes awaiting their
    /// confirm when the node went away fail with a retryable
    /// [`ErrorKind::Connection`](watchtower::ErrorKind::Connection) (they
    /// may have been stored: a retry can store them twice), the rest wait
    /// until the next node is connected and the exchange declared there.
    /// Queues live on the node that declared them unless they are quorum
    /// queues of a cluster: a subscriber on a standby broker reads only
    /// what was published there.
    ///
    /// ```
    /// use watchtower_rabbitmq::RabbitConfig;
    ///
    /// let config = RabbitConfig::new("amqp://app:secret@rabbit-1:5672/%2f")
    ///     .node("rabbit-2:5672")
    ///     .node("rabbit-3:5672");
    /// assert!(!format!("{config:?}").contains("secret"));
    /// ```
    pub fn node(mut self, address: &str) -> RabbitConfig {
        let parsed = address
            .rsplit_once(':')
            .and_then(|(host, port)| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = port.parse::<u16>().ok()?;
                (!host.is_empty() && !host.contains(['/', '@', ' '])).then(|| (host.to_owned(), port))
            })
            .ok_or_else(|| Arc::from(address.chars().take(100).collect::<String>()));
        self.nodes.push(parsed);
        self
    }

    /// Sets the virtual host (unescaped: `/`, `staging`).
    /// Default: the URL's path (`/` for `RabbitConfig::local`).
    pub fn vhost(mut self, vhost: &str) -> RabbitConfig {
        if let Ok(uri) = &mut self.uri {
            uri.vhost = vhost.to_owned();
        }
        self
    }

    /// Sets the user name and password, replacing those of the URL.
    /// Default: the URL's (`guest`/`guest` for `RabbitConfig::local`).
    pub fn credentials(mut self, username: &str, password: &str) -> RabbitConfig {
        if let Ok(uri) = &mut self.uri {
            uri.authority.userinfo.username = username.to_owned();
            uri.authority.userinfo.password = password.to_owned();
        }
        self
    }

    /// Sets the heartbeat interval (whole seconds; zero turns heartbeats
    /// off, which leaves dead peers to TCP). Default 10 s (unless the URL
    /// sets `?heartbeat=`): a silently dead peer is noticed within about
    /// 20 s, two missed heartbeats, rather than RabbitMQ's 60 s default.
    pub fn heartbeat(mut self, interval: Duration) -> RabbitConfig {
        if let Ok(uri) = &mut self.uri {
            uri.query.heartbeat = Some(interval.as_secs().min(u64::from(u16::MAX)) as u16);
        }
        self
    }

    /// Names the connection in the management UI and `rabbitmqctl
    /// list_connections` (the `connection_name` client property). Default
    /// none.
    pub fn connection_name(mut self, name: impl Into<Arc<str>>) -> RabbitConfig {
        self.connection_name = Some(name.into());
        self
    }

    /// How long one connection attempt (TCP, TLS and AMQP handshake) may
    /// take, and again how long setting the new connection up (opening
    /// channels, declaring the exchange and queues) may take before it is
    /// given up and tried again. Default 10 s: long enough for a TLS
    /// handshake to a remote broker, short enough to notice a dead one.
    pub fn connect_timeout(mut self, timeout: Duration) -> RabbitConfig {
        self.connect_timeout = timeout;
        self
    }

    /// The reconnect backoff: the first delay and the cap of the doubling
    /// delays (with full jitter, see [`watchtower::backoff`]). Defaults
    /// 100 ms and 5 s, so a broker that comes back is used again within
    /// seconds.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> RabbitConfig {
        self.reconnect_min = min;
        self.reconnect_max = max.max(min);
        self
    }

    /// The exchange to publish to and bind queues on, and its kind.
    /// Default `watchtower`, [`ExchangeKind::Topic`].
    ///
    /// A name that is empty, longer than 255 bytes or starts with `amq.`
    /// (reserved by the broker) fails with [`ErrorKind::Config`] when
    /// connecting.
    pub fn exchange(mut self, name: &str, kind: ExchangeKind) -> RabbitConfig {
        self.exchange = name.into();
        self.exchange_kind = kind;
        self
    }

    /// Only check that the exchange exists (a passive declare) instead of
    /// declaring it, for brokers whose topology is managed elsewhere.
    /// Default off.
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
    /// Default none. A name that is empty, longer than 255 bytes, starts
    /// with `amq.`, or is the exchange's own name fails with
    /// [`ErrorKind::Config`] when connecting.
    pub fn alternate_exchange(mut self, name: &str) -> RabbitConfig {
        self.alternate_exchange = Some(name.into());
        self
    }

    /// Checks everything the setters took: the URL and the names.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        self.amqp_uri()?;
        for node in &self.nodes {
            if let Err(text) = node {
                return Err(Error::config(format!(
                    "invalid RabbitMQ node address {:?}: expected host:port",
                    &**text
                )));
            }
        }
        check_name("exchange", &self.exchange)?;
        if self.exchange.starts_with("amq.") {
            return Err(Error::config(format!(
                "exchange name {:?} is reserved (`amq.` prefix)",
                &*self.exchange
            )));
        }
        if let Some(name) = &self.alternate_exchange {
            check_name("alternate exchange", name)?;
            if name.starts_with("amq.") {
                return Err(Error::config(format!(
                    "alternate exchange name {name:?} is reserved (`amq.` prefix)"
                )));
            }
            if name == &self.exchange {
                return Err(Error::config("an exchange cannot be its own alternate exchange"));
            }
        }
        Ok(())
    }

    /// The parsed URL.
    pub(crate) fn amqp_uri(&self) -> Result<&AMQPUri, Error> {
        self.uri
            .as_ref()
            .map_err(|(url, reason)| Error::config(format!("invalid AMQP URL {:?}: {reason}", &**url)))
    }

    /// The URL's node and then each further [node](RabbitConfig::node):
    /// the URIs to try, in order.
    pub(crate) fn amqp_uris(&self) -> Result<Vec<AMQPUri>, Error> {
        let first = self.amqp_uri()?;
        let mut uris = vec![first.clone()];
        for (host, port) in self.nodes.iter().flatten() {
            let mut uri = first.clone();
            uri.authority.host = host.clone();
            uri.authority.port = *port;
            uris.push(uri);
        }
        Ok(uris)
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
        matches!(&self.uri, Ok(uri) if uri.scheme == AMQPScheme::AMQPS)
    }

    /// The broker's address without credentials, for logs and errors.
    pub fn redacted_url(&self) -> String {
        match &self.uri {
            Ok(uri) => redact(uri),
            Err((url, _)) => url.to_string(),
        }
    }
}

/// `uri` without credentials.
pub(crate) fn redact(uri: &AMQPUri) -> String {
    let scheme = if uri.scheme == AMQPScheme::AMQPS {
        "amqps"
    } else {
        "amqp"
    };
    let user = if uri.authority.userinfo.username.is_empty() {
        ""
    } else {
        "***@"
    };
    format!(
        "{scheme}://{user}{}:{}/{}",
        uri.authority.host,
        uri.authority.port,
        uri.vhost.replace('/', "%2f")
    )
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &self.redacted_url())
            .field("nodes", &self.nodes)
            .field(
                "heartbeat",
                &self.uri.as_ref().ok().and_then(|u| u.query.heartbeat),
            )
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

pub(crate) fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;

    #[test]
    fn bad_urls_fail_without_leaking_the_password() {
        let err = RabbitConfig::new("http://user:s3cret@host/")
            .validate()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let config = RabbitConfig::new("amqp://user:s3cret@host:notaport/");
        assert!(!format!("{config:?}").contains("s3cret"));
        let err = config.validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!format!("{err:?}").contains("s3cret"));
    }

    #[test]
    fn debug_hides_credentials() {
        let config =
            RabbitConfig::new("amqps://admin:hunter2@broker:5671/prod").credentials("admin", "hunter3");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("amqps://***@broker:5671/prod"), "{shown}");
        assert!(config.is_tls());
    }

    #[test]
    fn nodes_are_tried_after_the_url_with_its_settings() {
        let config = RabbitConfig::new("amqps://app:s3cret@one:5671/staging")
            .node("two:5672")
            .node("[::1]:5673");
        let uris = config.amqp_uris().unwrap();
        let shown: Vec<String> = uris.iter().map(redact).collect();
        assert_eq!(
            shown,
            [
                "amqps://***@one:5671/staging",
                "amqps://***@two:5672/staging",
                "amqps://***@::1:5673/staging"
            ]
        );
        assert!(uris.iter().all(|u| u.authority.userinfo.password == "s3cret"));
        for bad in ["two", "two:port", ":5672", "user@two:5672", "http://two:5672"] {
            let err = RabbitConfig::local().node(bad).validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn url_sets_vhost_and_heartbeat() {
        let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=3");
        let uri = config.amqp_uri().unwrap();
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.query.heartbeat, Some(3));
        let config = RabbitConfig::new("amqp://127.0.0.1").vhost("staging");
        assert_eq!(config.amqp_uri().unwrap().query.heartbeat, Some(10));
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
                .validate()
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
        assert_eq!(
            config
                .clone()
                .exchange("amq.topic", ExchangeKind::Topic)
                .validate()
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
        assert!(
            config
                .clone()
                .exchange(&"x".repeat(256), ExchangeKind::Topic)
                .validate()
                .is_err()
        );
        assert!(
            config
                .clone()
                .alternate_exchange("watchtower")
                .validate()
                .is_err()
        );
        assert!(config.validate().is_ok());
        assert!(QueueOptions::new().queue("").validate().is_err());
        assert!(QueueOptions::new().delivery_limit(3).validate().is_err());
        assert!(QueueOptions::new().dead_letter_queue("dlq").validate().is_err());
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
