//! The shared connection: [`NatsClient`], split into making the
//! connection ([`connect`]) and what its event callback keeps ([`state`]).

mod connect;
mod state;

pub(crate) use state::{DropCounter, subscription_id};

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Context;
use std::time::Duration;

use async_nats::connection::State;
use watchtower::health::Health;
use watchtower::{Error, ErrorKind, Transport};

use crate::config::{NatsConfig, WhenDisconnected};
use crate::jetstream::{Acks, JetStreamPublisher, JetStreamSubscriber};
use crate::publisher::NatsPublisher;
use crate::request::NatsRequester;
use crate::subscriber::NatsSubscriber;
use state::ConnState;

/// A NATS connection shared by publishers and subscribers: the value every
/// publisher and subscriber of this crate is made from.
///
/// One `NatsClient` is one NATS connection (with its reconnect loop);
/// cloning it is cheap and the clones share it. It makes
///
/// * [`publisher`](Self::publisher) and [`subscriber`](Self::subscriber)
///   for core NATS,
/// * [`jetstream_publisher`](Self::jetstream_publisher) and
///   [`jetstream_subscriber`](Self::jetstream_subscriber) for JetStream,
///
/// answers [`health`](Transport::health) with a round trip to the server,
/// and watches the connection's events to
///
/// * wake publishers whose `poll_ready` waits for the connection to come
///   back (see [`WhenDisconnected`]),
/// * attribute slow-consumer drops to the subscription that lost messages,
///   which then reports them as an [`ErrorKind::Dropped`] item,
/// * count disconnects for [`NatsClient::stats`].
///
/// # Example
///
/// ```no_run
/// use watchtower::Transport;
/// use watchtower_nats::{NatsClient, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// assert!(client.health().await.is_up());
/// assert!(client.is_connected());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsClient {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    state: Arc<ConnState>,
    servers: String,
    request_timeout: Duration,
    when_disconnected: WhenDisconnected,
    /// The JetStream publishers' acknowledgement inbox, opened by the
    /// first of them.
    acks: tokio::sync::OnceCell<Acks>,
}

/// Counters of a connection's life, from [`NatsClient::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Connections established, the first one included.
    pub connects: u64,
    /// Times the connection was lost.
    pub disconnects: u64,
    /// Messages the client dropped because a subscription was not read fast
    /// enough (at least this many: the client reports drops best-effort).
    pub slow_consumer_drops: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
}

impl NatsClient {
    /// Connects with `config`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if the configuration is invalid (no server, an
    /// unparsable address, two kinds of credentials, an unreadable
    /// credentials file, a TLS set-up error, credentials the server
    /// refused); [`ErrorKind::Connection`] if no server could be reached
    /// (unless [`NatsConfig::retry_initial_connect`] is set).
    pub async fn connect(config: NatsConfig) -> Result<NatsClient, Error> {
        let servers = connect::parse_servers(&config)?;
        let state = Arc::new(ConnState::default());
        let options = connect::options(&config, state.clone()).await?;
        let shown = config.servers_redacted();
        let client = options
            .connect(servers)
            .await
            .map_err(|e| connect::connect_error(&shown, &e))?;
        let jetstream = async_nats::jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            // Streams, consumers and whatever a user does through
            // `raw_jetstream`: the publishers take their acknowledgements on
            // an inbox of their own and bound their window in `poll_ready`.
            .max_ack_inflight(1 << 20)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(NatsClient {
            inner: Arc::new(Inner {
                client,
                jetstream,
                state,
                servers: shown,
                request_timeout: config.request_timeout,
                when_disconnected: config.when_disconnected,
                acks: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The underlying async-nats client, for anything WatchTower does not
    /// wrap (request/reply, key-value stores).
    pub fn raw(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The underlying async-nats JetStream context of this connection, for
    /// anything WatchTower does not wrap (key-value and object stores,
    /// direct gets).
    pub fn raw_jetstream(&self) -> &async_nats::jetstream::Context {
        &self.inner.jetstream
    }

    /// The acknowledgement inbox of this connection's JetStream publishers,
    /// opened on first use.
    pub(crate) async fn acks(&self) -> Result<&Acks, Error> {
        self.inner
            .acks
            .get_or_try_init(|| {
                Acks::open(
                    &self.inner.client,
                    self.inner.request_timeout,
                    self.inner.state.watch_up(),
                )
            })
            .await
    }

    /// The acknowledgement inbox, if a JetStream publisher opened it.
    pub(crate) fn opened_acks(&self) -> Option<&Acks> {
        self.inner.acks.get()
    }

    /// A core NATS publisher on this connection: each event goes to the
    /// subject of its topic (or of a [`SubjectTemplate`](crate::SubjectTemplate)),
    /// at most once. See [`NatsPublisher`] for its options.
    pub fn publisher(&self) -> NatsPublisher {
        NatsPublisher::new(self.clone())
    }

    /// A core NATS subscriber on this connection: subjects with `*`/`>`
    /// wildcards, groups as queue groups, at most once.
    pub fn subscriber(&self) -> NatsSubscriber {
        NatsSubscriber::new(self.clone())
    }

    /// A requester on this connection: request–reply over NATS inboxes,
    /// one wildcard inbox subscription per requester. See
    /// [`NatsRequester`].
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Connection`] if the inbox subscription cannot be made.
    pub async fn requester(&self) -> Result<NatsRequester, Error> {
        NatsRequester::open(self.clone()).await
    }

    /// A JetStream publisher on this connection: each event is stored by
    /// the stream that captures its subject, acknowledged, and deduplicated
    /// by event id. See [`JetStreamPublisher`] for its options.
    pub fn jetstream_publisher(&self) -> JetStreamPublisher {
        JetStreamPublisher::new(self.clone())
    }

    /// A JetStream subscriber reading the stream named `stream` through
    /// pull consumers (at least once), with the default
    /// [`ConsumerSettings`](crate::ConsumerSettings) unless
    /// [`settings`](JetStreamSubscriber::settings) says otherwise. The
    /// stream name and the settings are checked when a subscription opens.
    pub fn jetstream_subscriber(&self, stream: impl Into<String>) -> JetStreamSubscriber {
        JetStreamSubscriber::new(self.clone(), stream.into())
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// Whether the connection is closed for good (after
    /// [`NatsConfig::max_reconnects`] failed attempts).
    pub fn is_closed(&self) -> bool {
        self.inner.state.closed.load(Ordering::Acquire)
    }

    /// Waits until the connection is up (at once if it is).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only watches.
    pub async fn connected(&self) {
        self.wait_state(true).await;
    }

    /// Waits until the connection is down (at once if it is).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only watches.
    pub async fn disconnected(&self) {
        self.wait_state(false).await;
    }

    async fn wait_state(&self, up: bool) {
        let mut changes = self.inner.state.up.subscribe();
        // The connection's notices are best-effort, so the state itself is
        // looked at again now and then.
        let mut recheck = tokio::time::interval(Duration::from_millis(100));
        while self.is_connected() != up {
            tokio::select! {
                _ = changes.changed() => {}
                _ = recheck.tick() => {}
            }
        }
    }

    /// Waits until the server has processed everything this connection sent
    /// before the call, such as subscriptions made through [`raw`](Self::raw).
    ///
    /// `raw().flush()` only empties the client's write buffer: a
    /// subscription may still be on its way when it returns, and messages
    /// another connection publishes right then miss it. This subscribes to a
    /// fresh inbox, publishes to it and waits for the message to come back;
    /// the server handles one connection's protocol messages in order, so
    /// every subscription sent before is registered by then.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Timeout`] if the message did not come back within the
    /// request timeout, [`ErrorKind::Closed`] if the client is closed.
    pub async fn round_trip(&self) -> Result<(), Error> {
        self.probe("a round trip").await
    }

    /// [`round_trip`](Self::round_trip), with `what` it is for in its
    /// errors.
    pub(crate) async fn probe(&self, what: &str) -> Result<(), Error> {
        let client = &self.inner.client;
        let probe = async {
            let inbox = client.new_inbox();
            let mut echo = client
                .subscribe(inbox.clone())
                .await
                .map_err(|_| Error::closed("NATS client is closed"))?;
            client
                .publish(inbox, bytes::Bytes::new())
                .await
                .map_err(|_| Error::closed("NATS client is closed"))?;
            client
                .flush()
                .await
                .map_err(|e| Error::new(ErrorKind::Connection, format!("NATS {what} failed: {e}")))?;
            match futures_util::StreamExt::next(&mut echo).await {
                Some(_) => Ok(()),
                None => Err(Error::closed("NATS client is closed")),
            }
        };
        match tokio::time::timeout(self.inner.request_timeout, probe).await {
            Ok(answer) => answer,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("NATS server did not answer {what}"),
            )),
        }
    }

    /// Counters of this connection's life.
    pub fn stats(&self) -> ConnectionStats {
        let raw = self.inner.client.statistics();
        ConnectionStats {
            connects: raw.connects.load(Ordering::Relaxed),
            disconnects: self.inner.state.disconnects.load(Ordering::Relaxed),
            slow_consumer_drops: self.inner.state.slow_drops.load(Ordering::Relaxed),
            messages_in: raw.in_messages.load(Ordering::Relaxed),
            messages_out: raw.out_messages.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn state(&self) -> &Arc<ConnState> {
        &self.inner.state
    }

    pub(crate) fn when_disconnected(&self) -> WhenDisconnected {
        self.inner.when_disconnected
    }

    pub(crate) fn disconnected_error(&self) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!("not connected to NATS ({})", self.inner.servers),
        )
    }

    /// Readiness of a publisher on this connection: ready when connected;
    /// otherwise registers `cx`'s waker for the reconnection and returns
    /// `false`.
    pub(crate) fn poll_connected(&self, cx: &mut Context<'_>) -> bool {
        if self.is_connected() {
            return true;
        }
        self.inner.state.wait_connected(cx.waker());
        // The state may have changed between the check and the registration.
        self.is_connected()
    }
}

impl Transport for NatsClient {
    const SYSTEM: &'static str = "nats";

    /// Checks the connection with a round trip to the server: a message
    /// sent to a subscription of its own on this connection must come back
    /// within the [request timeout](NatsConfig::request_timeout).
    ///
    /// [`Up`](watchtower::health::Status::Up) when it did;
    /// [`Degraded`](watchtower::health::Status::Degraded) while the
    /// connection is down and the client reconnects with publishers waiting
    /// for it ([`WhenDisconnected::Wait`]);
    /// [`Down`](watchtower::health::Status::Down) when the connection is
    /// closed for good, down with publishers failing
    /// ([`WhenDisconnected::Fail`]), or up but the server did not answer in
    /// time. The reason names the servers without their credentials.
    async fn health(&self) -> Health {
        if self.is_closed() {
            return Health::down(Self::SYSTEM, "NATS connection closed");
        }
        if !self.is_connected() {
            let reason = format!("not connected to NATS ({}); reconnecting", self.inner.servers);
            return match self.inner.when_disconnected {
                WhenDisconnected::Wait => Health::degraded(Self::SYSTEM, reason),
                WhenDisconnected::Fail => Health::down(Self::SYSTEM, reason),
            };
        }
        match self.probe("the health check").await {
            Ok(()) => Health::up(Self::SYSTEM),
            Err(e) => Health::down(Self::SYSTEM, e.to_string()),
        }
    }
}

impl fmt::Debug for NatsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsClient")
            .field("servers", &self.inner.servers)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}
