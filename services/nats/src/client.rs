//! The shared connection: [`NatsClient`].
//!
//! One [`NatsClient`] is one NATS connection (with its reconnect loop).
//! Publishers and subscribers built from it share it; cloning it is cheap.
//! It watches the connection's events to
//!
//! * wake publishers whose `poll_ready` waits for the connection to come
//!   back (see [`WhenDisconnected`]),
//! * attribute slow-consumer drops to the subscription that lost messages,
//!   which then reports them as an
//!   [`ErrorKind::Dropped`] item,
//! * count disconnects for [`NatsClient::stats`].
//!
//! # Example
//!
//! ```no_run
//! use watchtower_nats::{NatsClient, NatsConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! client.health().await?;
//! assert!(client.is_connected());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use watchtower::{Error, ErrorKind};

use crate::config::{Auth, NatsConfig, WhenDisconnected};

/// A NATS connection shared by publishers and subscribers. See the
/// [module docs](self).
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
        let servers = parse_servers(&config)?;
        let state = Arc::new(ConnState::default());
        let options = options(&config, state.clone()).await?;
        let shown = config.servers_redacted();
        let client = options
            .connect(servers)
            .await
            .map_err(|e| connect_error(&shown, &e))?;
        let jetstream = async_nats::jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            // The publishers bound their own in-flight window in `poll_ready`;
            // this one only has to be larger.
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
            }),
        })
    }

    /// The underlying async-nats client, for anything WatchTower does not
    /// wrap (request/reply, key-value stores).
    pub fn raw(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context of this connection.
    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.inner.jetstream
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

    /// Checks the connection with a round trip to the server: a message
    /// sent to a subscription of its own on this connection must come back
    /// within the request timeout.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] if the connection is closed for good,
    /// [`ErrorKind::Connection`] if it is down, [`ErrorKind::Timeout`] if
    /// the server did not answer within the request timeout.
    pub async fn health(&self) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::closed("NATS connection closed"));
        }
        if !self.is_connected() {
            return Err(self.disconnected_error());
        }
        self.probe("the health check").await
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

impl fmt::Debug for NatsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsClient")
            .field("servers", &self.inner.servers)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

fn parse_servers(config: &NatsConfig) -> Result<Vec<ServerAddr>, Error> {
    if config.servers.is_empty() {
        return Err(Error::config("no NATS server given"));
    }
    if config.auth_set_twice {
        return Err(Error::config(
            "more than one kind of NATS credentials given (token, user/password, nkey, credentials)",
        ));
    }
    if config.subscription_capacity == 0 || config.client_capacity == 0 {
        return Err(Error::config(
            "NATS subscription and client capacities must be at least 1",
        ));
    }
    if config.connect_timeout.is_zero() || config.request_timeout.is_zero() {
        return Err(Error::config(
            "NATS connect and request timeouts must be positive",
        ));
    }
    config
        .servers
        .iter()
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|_| {
                Error::config(format!(
                    "invalid NATS server address {:?}",
                    watchtower::redact_url(s)
                ))
            })
        })
        .collect()
}

async fn options(config: &NatsConfig, state: Arc<ConnState>) -> Result<ConnectOptions, Error> {
    let mut options = ConnectOptions::new();
    options = match &config.auth {
        Auth::None => options,
        Auth::Token(token) => options.token(token.clone()),
        Auth::UserPassword(user, password) => options.user_and_password(user.clone(), password.clone()),
        Auth::NKey(seed) => options.nkey(seed.clone()),
        Auth::CredsFile(path) => options.credentials_file(path).await.map_err(|e| {
            Error::config(format!(
                "cannot read NATS credentials file {}: {}",
                path.display(),
                e.kind()
            ))
        })?,
        Auth::Credentials(creds) => options
            .credentials(creds)
            .map_err(|_| Error::config("NATS credentials are not a valid .creds document"))?,
    };
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if config.tls_first {
        options = options.tls_first();
    }
    for pem in &config.root_certificates {
        options = options.add_root_certificates(pem.clone());
    }
    if let Some((cert, key)) = &config.client_certificate {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let max_delay = config.max_reconnect_delay;
    options = options
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .ping_interval(config.ping_interval)
        .subscription_capacity(config.subscription_capacity)
        .client_capacity(config.client_capacity)
        .max_reconnects(config.max_reconnects)
        .reconnect_delay_callback(move |attempts| {
            let exp = u32::try_from(attempts.min(16)).unwrap_or(16);
            Duration::from_millis(10u64.saturating_mul(1 << exp)).min(max_delay)
        })
        .event_callback(move |event| {
            state.on_event(event);
            std::future::ready(())
        });
    if config.retry_initial_connect {
        options = options.retry_on_initial_connect();
    }
    Ok(options)
}

fn connect_error(servers: &str, e: &async_nats::ConnectError) -> Error {
    let kind = match e.kind() {
        ConnectErrorKind::ServerParse
        | ConnectErrorKind::Authentication
        | ConnectErrorKind::AuthorizationViolation
        | ConnectErrorKind::Tls => ErrorKind::Config,
        ConnectErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, format!("cannot connect to NATS ({servers}): {}", e.kind()))
}

/// What the connection's event callback keeps.
#[derive(Default)]
pub(crate) struct ConnState {
    up: tokio::sync::watch::Sender<bool>,
    closed: AtomicBool,
    disconnects: AtomicU64,
    slow_drops: AtomicU64,
    waiters: Mutex<Vec<Waker>>,
    subscriptions: Mutex<HashMap<u64, Arc<DropCounter>>>,
    unattributed: Mutex<Vec<Arc<DropCounter>>>,
}

/// Messages a slow-consumer subscription lost, and the task to tell.
#[derive(Default)]
pub(crate) struct DropCounter {
    pub(crate) dropped: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl DropCounter {
    pub(crate) fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn add(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::AcqRel);
        if let Some(w) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            w.wake();
        }
    }
}

impl ConnState {
    fn on_event(&self, event: async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                tracing::debug!("NATS connection established");
                self.up.send_replace(true);
                let waiters =
                    std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
                waiters.into_iter().for_each(Waker::wake);
            }
            async_nats::Event::Disconnected => {
                tracing::warn!("NATS connection lost; reconnecting");
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                self.up.send_replace(false);
            }
            async_nats::Event::Closed => {
                tracing::warn!("NATS connection closed");
                self.closed.store(true, Ordering::Release);
                self.up.send_replace(false);
                let waiters =
                    std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
                waiters.into_iter().for_each(Waker::wake);
            }
            async_nats::Event::SlowConsumer(sid) => self.slow_consumer(Some(sid)),
            async_nats::Event::ServerError(async_nats::ServerError::SlowConsumer(_)) => {
                tracing::warn!("NATS server reports this connection as a slow consumer");
                self.slow_consumer(None);
            }
            async_nats::Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
            async_nats::Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
            other => tracing::debug!(event = %other, "NATS connection event"),
        }
    }

    fn slow_consumer(&self, sid: Option<u64>) {
        self.slow_drops.fetch_add(1, Ordering::Relaxed);
        let counter = sid.and_then(|sid| {
            self.subscriptions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&sid)
                .cloned()
        });
        match counter {
            Some(counter) => counter.add(1),
            // A drop we cannot attribute is told to every subscription we
            // could not identify: over-reporting beats silence.
            None => self
                .unattributed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .for_each(|c| c.add(1)),
        }
    }

    fn wait_connected(&self, waker: &Waker) {
        let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// Starts attributing slow-consumer drops of `sid` (or, if unknown,
    /// of any unidentified subscription) to the returned counter.
    pub(crate) fn register(&self, sid: Option<u64>) -> Arc<DropCounter> {
        let counter = Arc::new(DropCounter::default());
        match sid {
            Some(sid) => {
                self.subscriptions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(sid, counter.clone());
            }
            None => self
                .unattributed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(counter.clone()),
        }
        counter
    }

    pub(crate) fn unregister(&self, sid: Option<u64>, counter: &Arc<DropCounter>) {
        match sid {
            Some(sid) => {
                self.subscriptions
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&sid);
            }
            None => self
                .unattributed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|c| !Arc::ptr_eq(c, counter)),
        }
    }
}

/// The subscription id async-nats gave `subscriber`.
///
/// async-nats reports slow consumers by subscription id but does not
/// expose the id; its `Debug` output does (`Subscriber { sid: 7, .. }`).
/// When that format changes this returns `None` and drops are reported to
/// every unidentified subscription instead.
pub(crate) fn subscription_id(subscriber: &async_nats::Subscriber) -> Option<u64> {
    let shown = format!("{subscriber:?}");
    let rest = shown.strip_prefix("Subscriber { sid: ")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}
