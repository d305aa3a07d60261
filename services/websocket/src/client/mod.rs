//! The client side: [`WsClient`], one reconnecting connection to a hub,
//! shared by its [`WsPublisher`]s and [`WsSubscriber`]s.

mod config;
mod connection;
mod publisher;
mod subscriber;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use watchtower::health::Health;
use watchtower::{Delivery, Error, ErrorKind, Event, Receipt, TopicPattern};

pub use config::WsConfig;
pub use publisher::{ResponseFuture, WsPublisher};
pub use subscriber::{WsAcker, WsSubscriber, WsSubscription};
use watchtower::Overflow;

/// The state of a client's connection; see [`WsClient::state_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connecting; `attempt` failed attempts in a row so far.
    Connecting {
        /// Failed attempts since the last connection.
        attempt: u32,
    },
    /// Connected, and every subscription confirmed by the hub.
    Connected,
    /// Closed for good: by [`WsClient::close`], by dropping every handle,
    /// or after giving up (the error says why).
    Closed(Option<Arc<str>>),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An event on its way to the hub. Dropped unsent, it tells its caller so.
pub(crate) struct Outgoing {
    pub(crate) event: Event,
    pub(crate) text: Utf8Bytes,
    done: Option<oneshot::Sender<Result<Receipt, Error>>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// Whether its caller has stopped waiting (its response future was
    /// dropped: a timeout above, a cancelled task).
    pub(crate) fn is_abandoned(&self) -> bool {
        self.done.as_ref().is_some_and(oneshot::Sender::is_closed)
    }

    pub(crate) fn resolve(mut self, result: Result<Receipt, Error>) {
        if let Some(done) = self.done.take() {
            let _ = done.send(result);
        }
    }

    pub(crate) fn fail(self, error: Error) {
        let event = self.event.clone();
        self.resolve(Err(error.with_event(event)));
    }

    pub(crate) fn succeed(self) {
        let receipt = Receipt::for_event(&self.event);
        self.resolve(Ok(receipt));
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(Error::closed(
                "websocket client closed before the event was sent",
            )
            .with_event(self.event.clone())));
        }
    }
}

pub(crate) struct Subscription {
    pub(crate) patterns: Vec<TopicPattern>,
    pub(crate) tx: mpsc::Sender<Result<Delivery<WsAcker>, Error>>,
    pub(crate) confirmed: Option<oneshot::Sender<Result<(), Error>>>,
}

impl Subscription {
    pub(crate) fn matches(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(topic))
    }
}

pub(crate) enum Command {
    Subscribe(u64),
    Unsubscribe(u64),
}

/// What the handles and the connection task share.
pub(crate) struct Shared {
    pub(crate) config: WsConfig,
    pub(crate) outbox: Mutex<VecDeque<Outgoing>>,
    pub(crate) outbox_ready: Notify,
    /// Queue slots for [`Overflow::Block`].
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) subs: Mutex<HashMap<u64, Subscription>>,
    pub(crate) next_sub: AtomicU64,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) state: watch::Sender<ConnectionState>,
    pub(crate) shutdown: CancellationToken,
    /// Events written and waiting for the hub's ack, by event id.
    pub(crate) inflight: Mutex<HashMap<Arc<str>, VecDeque<Outgoing>>>,
    pub(crate) inflight_changed: Notify,
    /// Queued events never sent because their caller stopped waiting.
    pub(crate) abandoned: AtomicU64,
}

impl Shared {
    /// Queues an event, applying the overflow policy.
    pub(crate) fn enqueue(&self, outgoing: Outgoing) {
        let mut queue = lock(&self.outbox);
        // Checked under the lock: `finish` cancels before it drains, so an
        // event is either drained there or refused here, never stranded.
        if self.shutdown.is_cancelled() {
            drop(queue);
            outgoing.fail(Error::closed("websocket client is closed"));
            return;
        }
        if queue.len() >= self.config.queue_capacity {
            // Room taken by events nobody waits for any more is freed first.
            let before = queue.len();
            queue.retain(|o| !o.is_abandoned());
            let n = before - queue.len();
            self.count_abandoned(n);
        }
        if queue.len() >= self.config.queue_capacity {
            match self.config.overflow {
                Overflow::DropNewest => {
                    drop(queue);
                    outgoing.fail(Error::new(
                        ErrorKind::Dropped,
                        "websocket client queue is full; dropped the newest event",
                    ));
                    return;
                }
                Overflow::DropOldest => {
                    if let Some(oldest) = queue.pop_front() {
                        oldest.fail(Error::new(
                            ErrorKind::Dropped,
                            "websocket client queue is full; dropped the oldest event",
                        ));
                    }
                }
                // Block reserved a slot in poll_ready; a caller that skipped
                // poll_ready overfills by one rather than losing the event.
                Overflow::Block => {}
            }
        }
        queue.push_back(outgoing);
        drop(queue);
        self.outbox_ready.notify_one();
    }

    /// Takes up to `max` queued events to write. Events whose caller has
    /// stopped waiting are not started: the caller may already have sent
    /// the event again or dead-lettered it, so writing it now could deliver
    /// it twice. They are counted in [`WsClient::abandoned`].
    pub(crate) fn take_outgoing(&self, max: usize, into: &mut Vec<Outgoing>) {
        let mut queue = lock(&self.outbox);
        let mut abandoned = 0;
        while into.len() < max {
            let Some(outgoing) = queue.pop_front() else { break };
            if outgoing.is_abandoned() {
                abandoned += 1;
            } else {
                into.push(outgoing);
            }
        }
        drop(queue);
        self.count_abandoned(abandoned);
    }

    /// Drops the queued events nobody waits for, releasing their slots.
    pub(crate) fn purge_abandoned(&self) {
        let mut queue = lock(&self.outbox);
        let before = queue.len();
        queue.retain(|o| !o.is_abandoned());
        let n = before - queue.len();
        drop(queue);
        self.count_abandoned(n);
    }

    fn count_abandoned(&self, n: usize) {
        if n > 0 {
            self.abandoned.fetch_add(n as u64, Ordering::Relaxed);
            tracing::debug!(
                abandoned = n,
                "dropped queued events whose callers stopped waiting"
            );
        }
    }

    pub(crate) fn set_state(&self, state: ConnectionState) {
        self.state.send_if_modified(|s| {
            if *s == state || matches!(s, ConnectionState::Closed(_)) {
                false
            } else {
                *s = state;
                true
            }
        });
    }

    /// Sends `item` to every subscription without waiting; for errors,
    /// which a full subscription may miss.
    pub(crate) fn notify_subscriptions(&self, item: impl Fn() -> Error) {
        for sub in lock(&self.subs).values() {
            let _ = sub.tx.try_send(Err(item()));
        }
    }

    pub(crate) fn fail_inflight(&self, why: &str) {
        let pending: Vec<Outgoing> = lock(&self.inflight).drain().flat_map(|(_, v)| v).collect();
        for outgoing in pending {
            outgoing.fail(Error::new(
                ErrorKind::Connection,
                format!("{why} before the hub acknowledged the event"),
            ));
        }
        self.inflight_changed.notify_waiters();
    }

    /// The end of the client: every queued event fails with the reason,
    /// subscriptions end, the state becomes closed.
    fn finish(&self, reason: Option<Error>) {
        self.shutdown.cancel();
        self.permits.close();
        let message: Option<Arc<str>> = reason.as_ref().map(|e| e.to_string().into());
        self.state.send_replace(ConnectionState::Closed(message));
        let queued: Vec<Outgoing> = lock(&self.outbox).drain(..).collect();
        for outgoing in queued {
            let error = match &reason {
                Some(e) => Error::new(e.kind(), format!("websocket client gave up: {e}")),
                None => Error::closed("websocket client closed before the event was sent"),
            };
            outgoing.fail(error);
        }
        self.fail_inflight("websocket client closed");
        let subs: Vec<Subscription> = lock(&self.subs).drain().map(|(_, s)| s).collect();
        for mut sub in subs {
            if let Some(confirmed) = sub.confirmed.take() {
                let _ = confirmed.send(Err(Error::closed("websocket client closed")));
            }
            if let Some(e) = &reason {
                let _ = sub.tx.try_send(Err(Error::new(e.kind(), e.to_string())));
            }
        }
    }
}

/// Keeps the connection alive while any handle exists.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// A WebSocket client: one connection to a [`WsHub`](crate::WsHub) (or
/// any server speaking the protocol), reconnecting by itself. Make
/// publishers and subscribers from it; cloning it is cheap and shares the
/// connection. The connection closes when [`close`](WsClient::close) is
/// called or the last client, publisher, subscriber and subscription made
/// from it is dropped.
///
/// One client holds one WebSocket connection. Publishers and subscriptions
/// made from it share that connection; a background task keeps it up,
/// reconnecting with backoff and jitter and re-sending every subscription
/// after a reconnect. While the connection is down, published events wait
/// in a bounded queue (see [`Overflow`](watchtower::Overflow)); subscriptions receive an
/// [`ErrorKind::Connection`] item when the connection drops and carry on
/// after the reconnect (events the hub sent in the meantime are missed:
/// delivery is at most once).
///
/// # Example
///
/// ```no_run
/// use watchtower::prelude::*;
/// use watchtower_websocket::{WsClient, WsConfig};
///
/// # async fn f() -> Result<(), Error> {
/// let client = WsClient::connect(WsConfig::new("ws://127.0.0.1:3000/events").bearer("s3cret")).await?;
/// let handle = client
///     .subscriber()
///     .subscribe(["user.*"], tower::service_fn(|event: Event| async move {
///         println!("{}", event.ty());
///         Ok::<_, Error>(())
///     }))
///     .await?;
/// client.publisher().publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
/// handle.stop().await?;
/// client.close().await;
/// # Ok(()) }
/// ```
///
/// # Health
///
/// It implements [`Transport`](watchtower::Transport); `health()` reads
/// the connection's state: [`Status::Up`](watchtower::health::Status::Up)
/// when connected with every subscription confirmed,
/// [`Status::Degraded`](watchtower::health::Status::Degraded) while
/// connecting or reconnecting (publishes wait in the queue, so nothing is
/// lost yet, but nothing moves either),
/// [`Status::Down`](watchtower::health::Status::Down) once the client is
/// closed or gave up (the reason says why).
#[derive(Clone)]
pub struct WsClient {
    handle: Arc<Handle>,
}

impl fmt::Debug for WsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsClient")
            .field("config", &self.handle.shared.config)
            .field("state", &*self.handle.shared.state.borrow())
            .finish()
    }
}

impl WsClient {
    /// Connects, waiting for the first connection.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a bad URL, [`ErrorKind::Rejected`] if the
    /// hub refused the upgrade (authentication: HTTP 401 or 403),
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if the hub could
    /// not be reached. Use [`WsClient::lazy`] to keep trying instead.
    pub async fn connect(config: WsConfig) -> Result<WsClient, Error> {
        let (client, first) = WsClient::start(config, true);
        match first.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::closed("websocket client stopped while connecting")),
        }
    }

    /// Starts connecting in the background and returns at once; events
    /// published before the connection is up wait in the queue.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a bad URL.
    pub fn lazy(config: WsConfig) -> Result<WsClient, Error> {
        connection::request(&config)?;
        Ok(WsClient::start(config, false).0)
    }

    fn start(config: WsConfig, fail_first: bool) -> (WsClient, oneshot::Receiver<Result<(), Error>>) {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (state, _) = watch::channel(ConnectionState::Connecting { attempt: 0 });
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(config.queue_capacity)),
            config,
            outbox: Mutex::new(VecDeque::new()),
            outbox_ready: Notify::new(),
            subs: Mutex::new(HashMap::new()),
            next_sub: AtomicU64::new(1),
            commands,
            state,
            shutdown: CancellationToken::new(),
            inflight: Mutex::new(HashMap::new()),
            inflight_changed: Notify::new(),
            abandoned: AtomicU64::new(0),
        });
        let (first_tx, first_rx) = oneshot::channel();
        tokio::spawn(connection::drive(
            shared.clone(),
            command_rx,
            first_tx,
            fail_first,
        ));
        let client = WsClient {
            handle: Arc::new(Handle { shared }),
        };
        (client, first_rx)
    }

    /// A publisher over this client's connection.
    pub fn publisher(&self) -> WsPublisher {
        WsPublisher::new(self.handle.clone())
    }

    /// A subscriber over this client's connection.
    pub fn subscriber(&self) -> WsSubscriber {
        WsSubscriber::new(self.handle.clone())
    }

    /// Watches the connection's state.
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.handle.shared.state.subscribe()
    }

    /// Waits until the client is connected with its subscriptions
    /// confirmed.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Closed`] if the client closes first.
    pub async fn connected(&self) -> Result<(), Error> {
        let mut states = self.state_changes();
        let state = states
            .wait_for(|s| matches!(s, ConnectionState::Connected | ConnectionState::Closed(_)))
            .await
            .map_err(|_| Error::closed("websocket client closed"))?
            .clone();
        match state {
            ConnectionState::Connected => Ok(()),
            _ => Err(Error::closed("websocket client closed")),
        }
    }

    /// Events taken out of the publish queue unsent because their caller
    /// had stopped waiting (its response future was dropped, by a timeout
    /// layer above or a cancelled task) before the event's turn came.
    pub fn abandoned(&self) -> u64 {
        self.handle.shared.abandoned.load(Ordering::Relaxed)
    }

    /// Closes the client gracefully: sends the queued events (and, with
    /// [`acks`](WsConfig::acks), waits up to the request timeout for their
    /// acknowledgements), performs the close handshake, then fails whatever
    /// is left with [`ErrorKind::Closed`] (each error carrying its event)
    /// and ends every subscription.
    pub async fn close(&self) {
        let shared = &self.handle.shared;
        shared.shutdown.cancel();
        let mut states = shared.state.subscribe();
        let _ = states.wait_for(|s| matches!(s, ConnectionState::Closed(_))).await;
    }
}

/// Health from the connection's state; see [`WsClient`'s health](WsClient#health).
impl watchtower::Transport for WsClient {
    const SYSTEM: &'static str = crate::SYSTEM;

    fn health(&self) -> impl std::future::Future<Output = Health> + Send {
        let health = match &*self.handle.shared.state.borrow() {
            ConnectionState::Connected => Health::up(Self::SYSTEM),
            ConnectionState::Connecting { attempt: 0 } => {
                Health::degraded(Self::SYSTEM, "connecting; publishes wait in the queue")
            }
            ConnectionState::Connecting { attempt } => Health::degraded(
                Self::SYSTEM,
                format!("reconnecting after {attempt} failed attempts; publishes wait in the queue"),
            ),
            ConnectionState::Closed(None) => Health::down(Self::SYSTEM, "websocket client is closed"),
            ConnectionState::Closed(Some(why)) => {
                Health::down(Self::SYSTEM, format!("websocket client gave up: {why}"))
            }
        };
        std::future::ready(health)
    }
}
