use std::fmt;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use watchtower::redact_url;
use watchtower::{Error, Overflow};

/// How a [`WsClient`](crate::WsClient) connects.
///
/// `Debug` shows the URL with credentials redacted and header names only.
#[derive(Clone)]
pub struct WsConfig {
    pub(crate) url: String,
    pub(crate) headers: HeaderMap,
    pub(crate) queue_capacity: usize,
    pub(crate) overflow: Overflow,
    pub(crate) reconnect_initial: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) max_reconnect_attempts: Option<u32>,
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) subscription_buffer: usize,
    pub(crate) acks: bool,
    pub(crate) max_message_size: usize,
    /// Why a setter refused its input; reported by `connect`.
    invalid: Option<String>,
}

impl fmt::Debug for WsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsConfig")
            .field("url", &redact_url(&self.url))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("queue_capacity", &self.queue_capacity)
            .field("overflow", &self.overflow)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_reconnect_attempts", &self.max_reconnect_attempts)
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("acks", &self.acks)
            .field("max_message_size", &self.max_message_size)
            .finish()
    }
}

impl WsConfig {
    /// Connects to the hub at `url` (`ws://host:port/path`; `wss://` with
    /// the `rustls-ring` feature).
    pub fn new(url: impl Into<String>) -> WsConfig {
        WsConfig {
            url: url.into(),
            headers: HeaderMap::new(),
            queue_capacity: 1024,
            overflow: Overflow::Block,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            max_reconnect_attempts: None,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            subscription_buffer: 1024,
            acks: false,
            max_message_size: 16 << 20,
            invalid: None,
        }
    }

    /// Adds a header to the upgrade request. An invalid name or value makes
    /// [`WsClient::connect`](crate::WsClient::connect) fail with
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config) (the value is
    /// not shown). Default: no headers besides the subprotocol.
    pub fn header(mut self, name: &str, value: &str) -> WsConfig {
        let Ok(header) = HeaderName::try_from(name) else {
            self.refuse(format!("invalid header name {name:?}"));
            return self;
        };
        match HeaderValue::try_from(value) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.headers.append(header, value);
            }
            Err(_) => self.refuse(format!("invalid value for header {header}")),
        }
        self
    }

    /// Keeps the first invalid setting for `connect` to report.
    fn refuse(&mut self, why: String) {
        self.invalid.get_or_insert(why);
    }

    /// The first invalid setting, as `connect` reports it.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        match &self.invalid {
            Some(why) => Err(Error::config(why.clone())),
            None => Ok(()),
        }
    }

    /// Sends `Authorization: Bearer <token>` with the upgrade request. A
    /// token that is not a valid header value makes
    /// [`WsClient::connect`](crate::WsClient::connect) fail with
    /// [`ErrorKind::Config`](watchtower::ErrorKind::Config). Default: none.
    pub fn bearer(self, token: &str) -> WsConfig {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// Events held while disconnected (or not yet written) before
    /// [`Overflow`] applies. Default 1024: a few seconds of a busy
    /// publisher across a reconnect, at a bounded cost in memory.
    pub fn queue_capacity(mut self, capacity: usize) -> WsConfig {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// What publishing does when the queue is full. Default
    /// [`Overflow::Block`]: the caller waits rather than an event being
    /// dropped.
    pub fn overflow(mut self, overflow: Overflow) -> WsConfig {
        self.overflow = overflow;
        self
    }

    /// The reconnect backoff: the first wait, doubling per failed attempt up
    /// to `max`, each wait drawn at random between `initial` and that step
    /// ([`Jitter::Full`](watchtower::backoff::Jitter::Full)) so that many
    /// clients of a restarted hub do not return at once. Default 100 ms to
    /// 10 s: quick after a blip, and a restarted hub is not flooded.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> WsConfig {
        self.reconnect_initial = initial.max(Duration::from_millis(1));
        self.reconnect_max = max.max(self.reconnect_initial);
        self
    }

    /// Gives up after this many failed reconnect attempts in a row; the
    /// client then closes. Default: never gives up, since a hub that
    /// comes back should find its clients again.
    pub fn max_reconnect_attempts(mut self, attempts: u32) -> WsConfig {
        self.max_reconnect_attempts = Some(attempts);
        self
    }

    /// How often the client pings the hub. Default 15 s: often enough to
    /// keep idle proxies from closing the connection.
    pub fn ping_interval(mut self, interval: Duration) -> WsConfig {
        self.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// A hub the client has heard nothing from (no frame, no pong) for this
    /// long is dead: the client drops the connection and reconnects.
    /// Default 45 s, three missed pings.
    pub fn idle_timeout(mut self, timeout: Duration) -> WsConfig {
        self.idle_timeout = timeout;
        self
    }

    /// How long one connection attempt (TCP and upgrade) may take. Default
    /// 10 s: generous for a slow TLS handshake, short enough to retry.
    pub fn connect_timeout(mut self, timeout: Duration) -> WsConfig {
        self.connect_timeout = timeout;
        self
    }

    /// How long [`open`](watchtower::Subscriber::open) waits for the hub to
    /// confirm a subscription, and [`close`](crate::WsClient::close) for the
    /// last acknowledgements. Default 10 s, as for connecting.
    pub fn request_timeout(mut self, timeout: Duration) -> WsConfig {
        self.request_timeout = timeout;
        self
    }

    /// Deliveries buffered per subscription before the client stops reading
    /// from the hub (which then applies its slow-client policy). Default
    /// 1024, matching the publish queue.
    pub fn subscription_buffer(mut self, buffer: usize) -> WsConfig {
        self.subscription_buffer = buffer.max(1);
        self
    }

    /// Asks the hub to acknowledge each published event after its handler
    /// ran: a publish then resolves on the hub's `ack` (an error on its
    /// `nack`, or a retryable connection error if the connection drops
    /// first), which makes delivery at least once with a retry layer on
    /// top. Default off: a publish resolves once the frame is written.
    pub fn acks(mut self, acks: bool) -> WsConfig {
        self.acks = acks;
        self
    }

    /// The largest message the client accepts from the hub. Default 16 MiB:
    /// far above any sensible event, low enough to bound one frame's memory.
    pub fn max_message_size(mut self, bytes: usize) -> WsConfig {
        self.max_message_size = bytes.max(1);
        self
    }
}
