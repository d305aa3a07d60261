//! One AMQP connection that heals itself, and its health.
//!
//! A [`Link`] owns a background task that keeps one connection open: it
//! connects, runs a setup step (opening channels, declaring the exchange),
//! publishes the result as the current [`Session`], and watches for failure
//! (a connection error event, a heartbeat timeout, the broker closing the
//! connection, or a user of the session reporting a broken channel). On
//! failure it reconnects with exponential backoff and runs the setup again,
//! so the topology is declared anew on every connection.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use watchtower::backoff::{Backoff, Jitter};
use watchtower::{Error, ErrorKind};

use crate::config::{RabbitConfig, redact};
use lapin::uri::AMQPUri;

pub(crate) type SetupFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;
pub(crate) type Setup<T> = Arc<dyn Fn(Arc<Connection>) -> SetupFuture<T> + Send + Sync>;

/// A live connection and what the setup step made of it.
pub(crate) struct Session<T> {
    pub(crate) connection: Arc<Connection>,
    pub(crate) generation: u64,
    pub(crate) value: T,
    /// Cancelled when this session is given up, so that operations waiting
    /// on it (a confirm whose frame never left) end instead of hanging.
    pub(crate) lost: CancellationToken,
}

pub(crate) enum LinkState<T> {
    Connecting,
    Up(Arc<Session<T>>),
    Closed,
}

impl<T> Clone for LinkState<T> {
    fn clone(&self) -> Self {
        match self {
            LinkState::Connecting => LinkState::Connecting,
            LinkState::Up(s) => LinkState::Up(s.clone()),
            LinkState::Closed => LinkState::Closed,
        }
    }
}

/// The connection's health, as the link sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkHealth {
    /// The connection is open and set up.
    pub(crate) connected: bool,
    /// The transport was closed for good.
    pub(crate) closed: bool,
    /// Connections opened so far (1 after the first connect).
    pub(crate) connections: u64,
    /// Failed connection attempts since the last success.
    pub(crate) failed_attempts: u64,
    /// Why the last connection or attempt failed, credentials removed.
    pub(crate) last_error: Option<String>,
}

struct Shared<T> {
    config: RabbitConfig,
    state: watch::Sender<LinkState<T>>,
    kick: Notify,
    kick_generation: AtomicU64,
    token: CancellationToken,
    connections: AtomicU64,
    failed_attempts: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

/// A self-healing connection. Cheap to clone; the background task stops
/// when [`close`](Link::close) is called or the last [`LinkGuard`] drops.
pub(crate) struct Link<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Link<T> {
    fn clone(&self) -> Self {
        Link {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> fmt::Debug for Link<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("url", &self.shared.config.redacted_url())
            .field("health", &self.health())
            .finish()
    }
}

/// Closes the link when the last user-facing handle drops.
#[derive(Debug)]
pub(crate) struct LinkGuard(CancellationToken);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl<T: Send + Sync + 'static> Link<T> {
    /// Connects and runs `setup` once, failing if either fails, then keeps
    /// the connection healthy in the background.
    pub(crate) async fn connect(
        config: RabbitConfig,
        setup: Setup<T>,
    ) -> Result<(Link<T>, LinkGuard), Error> {
        config.validate()?;
        let (connection, value) = establish(&config, &setup).await?;
        let session = Arc::new(Session {
            connection,
            generation: 1,
            value,
            lost: CancellationToken::new(),
        });
        let (state, _) = watch::channel(LinkState::Up(session.clone()));
        let token = CancellationToken::new();
        let shared = Arc::new(Shared {
            config,
            state,
            kick: Notify::new(),
            kick_generation: AtomicU64::new(0),
            token: token.clone(),
            connections: AtomicU64::new(1),
            failed_attempts: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        });
        tokio::spawn(drive(shared.clone(), setup, session));
        Ok((Link { shared }, LinkGuard(token)))
    }

    /// The current state.
    pub(crate) fn state(&self) -> LinkState<T> {
        if self.shared.token.is_cancelled() {
            return LinkState::Closed;
        }
        self.shared.state.borrow().clone()
    }

    /// A receiver of state changes.
    pub(crate) fn watch(&self) -> watch::Receiver<LinkState<T>> {
        self.shared.state.subscribe()
    }

    /// Waits until a session is up (or the link is closed).
    pub(crate) async fn session(&self) -> Result<Arc<Session<T>>, Error> {
        let mut rx = self.watch();
        let state = rx
            .wait_for(|s| !matches!(s, LinkState::Connecting))
            .await
            .map_err(|_| Error::closed("the RabbitMQ connection was closed"))?
            .clone();
        match state {
            LinkState::Up(session) => Ok(session),
            _ => Err(Error::closed("the RabbitMQ connection was closed")),
        }
    }

    /// Reports that session `generation` is broken (a channel closed under
    /// it): the link reconnects and sets up anew.
    pub(crate) fn invalidate(&self, generation: u64) {
        if matches!(&*self.shared.state.borrow(), LinkState::Up(s) if s.generation == generation) {
            self.shared.kick_generation.store(generation, Ordering::Release);
            self.shared.kick.notify_one();
        }
    }

    /// Closes the connection for good.
    pub(crate) fn close(&self) {
        self.shared.token.cancel();
    }

    pub(crate) fn config(&self) -> &RabbitConfig {
        &self.shared.config
    }

    pub(crate) fn health(&self) -> LinkHealth {
        let state = self.shared.state.borrow();
        LinkHealth {
            connected: matches!(&*state, LinkState::Up(s) if s.connection.status().connected()),
            closed: self.shared.token.is_cancelled() || matches!(&*state, LinkState::Closed),
            connections: self.shared.connections.load(Ordering::Relaxed),
            failed_attempts: self.shared.failed_attempts.load(Ordering::Relaxed),
            last_error: self.shared.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

async fn drive<T: Send + Sync + 'static>(shared: Arc<Shared<T>>, setup: Setup<T>, first: Arc<Session<T>>) {
    let mut session = Some(first);
    let backoff = Backoff::new(shared.config.reconnect_min, shared.config.reconnect_max).jitter(Jitter::Full);
    let mut failures: u32 = 0;
    let mut generation = 1;
    loop {
        if let Some(current) = session.take() {
            let reason = watch_failure(&shared, &current).await;
            shared.state.send_replace(LinkState::Connecting);
            current.lost.cancel();
            close_quietly(&current.connection).await;
            drop(current);
            match reason {
                None => break,
                Some(reason) => {
                    tracing::warn!(url = %shared.config.redacted_url(), %reason, "RabbitMQ connection lost; reconnecting");
                    set_error(&shared, reason);
                }
            }
        }
        if shared.token.is_cancelled() {
            break;
        }
        let result = tokio::select! {
            result = establish(&shared.config, &setup) => result,
            () = shared.token.cancelled() => break,
        };
        match result {
            Ok((connection, value)) => {
                generation += 1;
                failures = 0;
                shared.connections.fetch_add(1, Ordering::Relaxed);
                shared.failed_attempts.store(0, Ordering::Relaxed);
                let current = Arc::new(Session {
                    connection,
                    generation,
                    value,
                    lost: CancellationToken::new(),
                });
                tracing::info!(url = %shared.config.redacted_url(), generation, "RabbitMQ connection re-established");
                shared.state.send_replace(LinkState::Up(current.clone()));
                session = Some(current);
            }
            Err(e) => {
                shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures);
                tracing::debug!(error = %e, ?delay, "RabbitMQ reconnect attempt failed");
                set_error(&shared, e.to_string());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shared.token.cancelled() => break,
                }
            }
        }
    }
    shared.state.send_replace(LinkState::Closed);
}

fn set_error<T>(shared: &Shared<T>, reason: String) {
    if let Ok(mut last) = shared.last_error.lock() {
        *last = Some(reason);
    }
}

/// Waits until the session fails (returning why) or the link is closed
/// (returning `None`).
async fn watch_failure<T>(shared: &Shared<T>, session: &Session<T>) -> Option<String> {
    let mut events = session.connection.events_listener();
    // Belt and braces: a connection closed by the broker does not always
    // come with an error event, so the status is checked now and then too.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.token.cancelled() => return None,
            () = shared.kick.notified() => {
                if shared.kick_generation.load(Ordering::Acquire) == session.generation {
                    return Some("a channel failed".to_owned());
                }
            }
            event = events.next() => match event {
                Some(lapin::Event::Error(e)) if !session.connection.status().connected() => {
                    return Some(map_lapin_error(&e, "connection").to_string());
                }
                Some(_) => {}
                None => return Some("the connection was dropped".to_owned()),
            },
            _ = tick.tick() => {
                if !session.connection.status().connected() {
                    return Some("the connection is no longer open".to_owned());
                }
            }
        }
    }
}

/// Opens a connection and runs `setup` on it, each within the connect
/// timeout: a node that accepts the connection but never answers a
/// channel's opening or a declaration (a cluster node busy with a peer's
/// death) is given up, and the next attempt made, rather than waited on
/// for ever.
async fn establish<T>(config: &RabbitConfig, setup: &Setup<T>) -> Result<(Arc<Connection>, T), Error> {
    let connection = Arc::new(open(config).await?);
    let result = match tokio::time::timeout(config.connect_timeout, setup(connection.clone())).await {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "setting up the connection (channels, declarations) took longer than {:?}",
                config.connect_timeout
            ),
        )),
    };
    match result {
        Ok(value) => Ok((connection, value)),
        Err(e) => {
            close_quietly(&connection).await;
            Err(e)
        }
    }
}

/// Opens one connection, within the connect timeout.
pub(crate) async fn open(config: &RabbitConfig) -> Result<Connection, Error> {
    let mut failed: Option<Error> = None;
    for uri in config.amqp_uris()? {
        match open_node(config, uri).await {
            Ok(connection) => return Ok(connection),
            Err(e) => {
                tracing::debug!(error = %e, "a RabbitMQ node did not answer; trying the next");
                failed = Some(e);
            }
        }
    }
    Err(failed.unwrap_or_else(|| Error::config("no RabbitMQ node to connect to")))
}

/// Connects to the node of `uri`, within the connect timeout.
async fn open_node(config: &RabbitConfig, uri: AMQPUri) -> Result<Connection, Error> {
    let shown = redact(&uri);
    let mut properties = ConnectionProperties::default();
    if let Some(name) = &config.connection_name {
        properties = properties.with_connection_name(name.as_bytes().into());
    }
    let connect = Connection::connect_uri(uri, properties);
    match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => {
            let err = map_lapin_error(&e, "connect");
            Err(Error::new(err.kind(), format!("{shown}: {}", err.message()))
                .with_retryable(err.is_retryable()))
        }
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "connecting to {shown} took longer than {:?}",
                config.connect_timeout
            ),
        )),
    }
}

async fn close_quietly(connection: &Connection) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "closing".into())).await;
    }
}

/// Maps a lapin error to a WatchTower error kind. `what` names the
/// operation, for the message.
/// Declares the durable exchange `exchange` of `kind` and the durable queue
/// `queue` bound to it with `binding`: where the alternate exchange and the
/// dead-letter exchange keep what they are given. `what` names them in
/// errors.
pub(crate) async fn declare_kept(
    channel: &Channel,
    (exchange, kind): (ShortString, lapin::ExchangeKind),
    queue: ShortString,
    binding: ShortString,
    what: &str,
) -> Result<(), Error> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(exchange.clone(), kind, options, FieldTable::default())
        .await
        .map_err(|e| map_lapin_error(&e, &format!("declare {what}")))?;
    channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_lapin_error(&e, &format!("declare the queue of {what}")))?;
    channel
        .queue_bind(
            queue,
            exchange,
            binding,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_lapin_error(&e, &format!("bind the queue of {what}")))?;
    Ok(())
}

pub(crate) fn map_lapin_error(err: &lapin::Error, what: &str) -> Error {
    use lapin::ErrorKind as L;
    let kind = match err.kind() {
        L::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => ErrorKind::Config,
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => ErrorKind::Config,
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorKind::Rejected,
            AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED) => ErrorKind::Rejected,
            AMQPErrorKind::Soft(_) => ErrorKind::Rejected,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorKind::Config,
            AMQPErrorKind::Hard(_) => ErrorKind::Connection,
        },
        L::ParsingError(_) | L::SerialisationError(_) => ErrorKind::Other,
        L::AuthProviderError(_) => ErrorKind::Config,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, format!("{what}: {err}"))
}

/// Whether an error means the channel or connection under it is gone.
pub(crate) fn breaks_channel(err: &lapin::Error) -> bool {
    !matches!(
        err.kind(),
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::SerialisationError(_)
    )
}
