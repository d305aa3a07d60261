//! The server side: [`WsHub`], mounted as an axum route.
//!
//! A hub accepts WebSocket connections, fans the events published into it
//! (it is a `Service<Event>`) out to every connection subscribed to a
//! matching pattern, and hands the events clients send to a handler
//! service. Each connection has a bounded outbound queue, so a slow client
//! never holds up the others: when its queue is full the hub drops the
//! client's oldest queued event or disconnects it ([`SlowClient`]), and
//! counts either in its [`HubStats`].
//!
//! # Example
//!
//! ```
//! use axum::Router;
//! use axum::http::{HeaderMap, StatusCode};
//! use tower::service_fn;
//! use watchtower::prelude::*;
//! use watchtower_websocket::{SlowClient, WsHub};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let hub = WsHub::builder()
//!     // Events that clients send.
//!     .handler(service_fn(|event: Event| async move {
//!         println!("client sent {}", event.ty());
//!         Ok::<_, Error>(())
//!     }))
//!     .slow_client(SlowClient::DropOldest)
//!     .authenticate(|headers: &HeaderMap| match headers.get("authorization") {
//!         Some(v) if v == "Bearer s3cret" => Ok(()),
//!         _ => Err(StatusCode::UNAUTHORIZED),
//!     })
//!     .build();
//! let app: Router = Router::new().route("/events", hub.route());
//!
//! // Events published into the hub go to every matching subscriber.
//! let mut publisher = hub.clone();
//! publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! # let _ = app;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};
use watchtower::{BoxError, Error, Event, Poison, RawMessage, Receipt, TopicPattern};

use crate::SUBPROTOCOL;
use crate::protocol::{Control, Frame, classify, code, encode};

type Handler = BoxCloneSyncService<Event, (), Error>;
type AuthFn = Arc<dyn Fn(&HeaderMap) -> Result<(), StatusCode> + Send + Sync>;

/// How long a closing connection waits for the peer's close frame, and for
/// its last frames to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Control replies queued for a client before the hub stops reading from it.
const MAX_PENDING_CONTROL: usize = 256;
/// Frames written per flush.
const BATCH: usize = 64;
/// The close code for "message too big" (RFC 6455 §7.4.1).
const CLOSE_TOO_BIG: u16 = 1009;

/// What the hub does when a client's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowClient {
    /// Drop the oldest queued event for that client (counted in
    /// [`HubStats::dropped`]); the client is told how many it lost with a
    /// `dropped` error message. The default: a browser tab that falls
    /// behind keeps its connection and sees the newest events.
    #[default]
    DropOldest,
    /// Close the client's connection with code 1008 (counted in
    /// [`HubStats::slow_disconnects`]); a reconnecting client starts afresh.
    Disconnect,
}

/// Builds a [`WsHub`]; see [`WsHub::builder`].
pub struct WsHubBuilder {
    handler: Option<Handler>,
    poison: Option<Handler>,
    relay: bool,
    outbound_capacity: usize,
    slow_client: SlowClient,
    max_message_size: usize,
    ping_interval: Duration,
    idle_timeout: Duration,
    auth: Option<AuthFn>,
}

impl fmt::Debug for WsHubBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsHubBuilder")
            .field("handler", &self.handler.is_some())
            .field("poison", &self.poison.is_some())
            .field("relay", &self.relay)
            .field("outbound_capacity", &self.outbound_capacity)
            .field("slow_client", &self.slow_client)
            .field("max_message_size", &self.max_message_size)
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

impl WsHubBuilder {
    /// The service that receives the events clients send. Each connection
    /// hands its events to the handler one at a time, in the order they
    /// arrived, waiting for its readiness: a busy handler slows the sending
    /// client down through TCP and nobody else. Without a handler (and
    /// without [`relay`](Self::relay)) events from clients are discarded
    /// after being counted in [`HubStats::received`].
    pub fn handler<S>(mut self, handler: S) -> Self
    where
        S: Service<Event> + Clone + Send + Sync + 'static,
        S::Response: 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.handler = Some(boxed(handler));
        self
    }

    /// Where frames from clients that are not events go (malformed text,
    /// binary frames), wrapped by [`Poison::into_event`] with the raw bytes
    /// and the reason: a dead-letter service such as
    /// [`MemoryDeadLetters`](watchtower::dead_letter::MemoryDeadLetters).
    /// The client gets an error message either way, and the frame is
    /// counted in [`HubStats::invalid_frames`].
    pub fn poison<S>(mut self, poison: S) -> Self
    where
        S: Service<Event> + Clone + Send + Sync + 'static,
        S::Response: 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.poison = Some(boxed(poison));
        self
    }

    /// Also publishes the events clients send into the hub, to every
    /// subscribed connection (the sender too, if it subscribed), before
    /// handing them to the handler. Default off.
    pub fn relay(mut self, relay: bool) -> Self {
        self.relay = relay;
        self
    }

    /// Events queued per connection before [`SlowClient`] applies. Default
    /// 1024: a few seconds of a busy feed, a few hundred KiB of small events.
    pub fn outbound_capacity(mut self, capacity: usize) -> Self {
        self.outbound_capacity = capacity.max(1);
        self
    }

    /// What to do with a client whose queue is full. Default
    /// [`SlowClient::DropOldest`].
    pub fn slow_client(mut self, policy: SlowClient) -> Self {
        self.slow_client = policy;
        self
    }

    /// The largest message (and frame) a client may send, in bytes. A
    /// larger one is answered with a `too_large` error message and the
    /// connection is closed with code 1009, since the rest of the oversized
    /// message cannot be skipped. Default 1 MiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes.max(1);
        self
    }

    /// How often the hub pings each client. Default 15 s, well inside the
    /// 60 s idle timeouts of common proxies and load balancers.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// A client the hub has heard nothing from (no frame, no pong) for this
    /// long is dead and is disconnected, even while a write to it is
    /// blocked because it reads nothing. Default 45 s: three missed pings.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Checks each upgrade request's headers (a bearer token, a cookie)
    /// before accepting it; an `Err` status is the HTTP response, and the
    /// refusal is counted in [`HubStats::refused`].
    pub fn authenticate<F>(mut self, auth: F) -> Self
    where
        F: Fn(&HeaderMap) -> Result<(), StatusCode> + Send + Sync + 'static,
    {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// Builds the hub.
    pub fn build(self) -> WsHub {
        WsHub {
            inner: Arc::new(Inner {
                handler: self.handler,
                poison: self.poison,
                relay: self.relay,
                outbound_capacity: self.outbound_capacity,
                slow_client: self.slow_client,
                max_message_size: self.max_message_size,
                ping_interval: self.ping_interval,
                idle_timeout: self.idle_timeout,
                auth: self.auth,
                conns: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                counters: Counters::default(),
                shutdown: CancellationToken::new(),
                gone: Notify::new(),
            }),
        }
    }
}

/// A snapshot of a hub's counters; see [`WsHub::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HubStats {
    /// Connections open now.
    pub connections: usize,
    /// Upgrade requests accepted (past authentication) since the hub was
    /// built.
    pub accepted: u64,
    /// Upgrade requests the authentication hook refused.
    pub refused: u64,
    /// Events published into the hub (including relayed ones).
    pub published: u64,
    /// Event frames queued for a connection.
    pub queued: u64,
    /// Event frames written to a connection.
    pub sent: u64,
    /// Queued events dropped because their client fell behind
    /// ([`SlowClient::DropOldest`]).
    pub dropped: u64,
    /// Clients disconnected for falling behind ([`SlowClient::Disconnect`]).
    pub slow_disconnects: u64,
    /// Events received from clients.
    pub received: u64,
    /// Events from clients the handler returned an error for.
    pub handler_errors: u64,
    /// Frames from clients that were neither events nor control messages,
    /// binary, or too large.
    pub invalid_frames: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    published: AtomicU64,
    queued: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    slow_disconnects: AtomicU64,
    received: AtomicU64,
    handler_errors: AtomicU64,
    invalid_frames: AtomicU64,
}

fn boxed<S>(service: S) -> Handler
where
    S: Service<Event> + Clone + Send + Sync + 'static,
    S::Response: 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(
        service
            .map_response(|_| ())
            .map_err(|e: S::Error| Error::from_boxed(e.into())),
    )
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    handler: Option<Handler>,
    poison: Option<Handler>,
    relay: bool,
    outbound_capacity: usize,
    slow_client: SlowClient,
    max_message_size: usize,
    ping_interval: Duration,
    idle_timeout: Duration,
    auth: Option<AuthFn>,
    conns: RwLock<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    counters: Counters,
    shutdown: CancellationToken,
    gone: Notify,
}

/// A WebSocket hub: the server side of the transport, mounted in an axum
/// router with [`route`](WsHub::route) or [`router`](WsHub::router).
///
/// As a `Service<Event>` it fans each event out to the connections with a
/// matching subscription; the [`Receipt`] says the event was queued for
/// them, not that they received it (at most once, no persistence: a client
/// that is not connected misses it). [`broadcast`](WsHub::broadcast) also
/// returns how many connections the event was queued for. Cloning a hub is
/// cheap and shares it.
#[derive(Clone)]
pub struct WsHub {
    inner: Arc<Inner>,
}

impl fmt::Debug for WsHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsHub")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Default for WsHub {
    fn default() -> Self {
        WsHub::builder().build()
    }
}

impl WsHub {
    /// A hub with the defaults: no handler, no relay, no authentication.
    pub fn new() -> WsHub {
        WsHub::default()
    }

    /// A builder for a hub with a handler, limits and authentication.
    pub fn builder() -> WsHubBuilder {
        WsHubBuilder {
            handler: None,
            poison: None,
            relay: false,
            outbound_capacity: 1024,
            slow_client: SlowClient::DropOldest,
            max_message_size: 1 << 20,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            auth: None,
        }
    }

    /// The hub as an axum route: `Router::new().route("/events", hub.route())`.
    pub fn route<S>(&self) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let hub = self.clone();
        any(move |ws: WebSocketUpgrade, headers: HeaderMap| {
            let hub = hub.clone();
            async move { hub.upgrade(ws, &headers) }
        })
    }

    /// A router with the hub at `path`, to [`merge`](Router::merge) into an
    /// application or serve on its own.
    pub fn router<S>(&self, path: &str) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        Router::new().route(path, self.route())
    }

    /// Accepts an upgrade request in a handler of your own: runs the
    /// authentication hook on `headers`, negotiates the `cloudevents.json`
    /// subprotocol (clients that offer none are accepted too) and serves
    /// the connection.
    pub fn upgrade(&self, ws: WebSocketUpgrade, headers: &HeaderMap) -> Response {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        if let Some(auth) = &inner.auth
            && let Err(status) = auth(headers)
        {
            bump(&inner.counters.refused);
            return status.into_response();
        }
        bump(&inner.counters.accepted);
        let inner = self.inner.clone();
        ws.protocols([SUBPROTOCOL])
            .max_message_size(inner.max_message_size)
            .max_frame_size(inner.max_message_size)
            .on_upgrade(move |socket| serve_connection(inner, socket))
    }

    /// Queues `event` for every connection subscribed to its topic and
    /// returns how many that was.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidEvent`](watchtower::ErrorKind::InvalidEvent) if
    /// the event cannot be encoded, [`ErrorKind::Closed`](watchtower::ErrorKind::Closed)
    /// after [`shutdown`](WsHub::shutdown).
    pub fn broadcast(&self, event: &Event) -> Result<usize, Error> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::closed("websocket hub is shut down").with_event(event.clone()));
        }
        let text = encode(event)?;
        bump(&self.inner.counters.published);
        Ok(self
            .inner
            .fan_out(event.topic(), &Message::Text(Utf8Bytes::from(text))))
    }

    /// Sends `body` as a binary frame to every connection subscribed to
    /// `topic`, as it is: for forwarding frames of another producer. The
    /// transport's own clients treat binary frames as poison messages.
    pub fn broadcast_raw(&self, topic: &str, body: Bytes) -> usize {
        self.inner.fan_out(topic, &Message::Binary(body))
    }

    /// The hub's counters.
    pub fn stats(&self) -> HubStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HubStats {
            connections: self.connections(),
            accepted: get(&c.accepted),
            refused: get(&c.refused),
            published: get(&c.published),
            queued: get(&c.queued),
            sent: get(&c.sent),
            dropped: get(&c.dropped),
            slow_disconnects: get(&c.slow_disconnects),
            received: get(&c.received),
            handler_errors: get(&c.handler_errors),
            invalid_frames: get(&c.invalid_frames),
        }
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        read(&self.inner.conns).len()
    }

    /// Closes every connection with code 1001 (going away), waits until
    /// they are gone, and refuses new ones; publishing into the hub fails
    /// with [`ErrorKind::Closed`](watchtower::ErrorKind::Closed) from then on.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        loop {
            let gone = self.inner.gone.notified();
            if self.connections() == 0 {
                return;
            }
            gone.await;
        }
    }
}

impl Service<Event> for WsHub {
    type Response = Receipt;
    type Error = Error;
    type Future = std::future::Ready<Result<Receipt, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.inner.shutdown.is_cancelled() {
            Poll::Ready(Err(Error::closed("websocket hub is shut down")))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        std::future::ready(
            self.broadcast(&event)
                .map(|_| Receipt::for_event(&event))
                .map_err(|e| {
                    if e.event().is_some() {
                        e
                    } else {
                        e.with_event(event)
                    }
                }),
        )
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn fan_out(&self, topic: &str, message: &Message) -> usize {
        let mut n = 0;
        for conn in read(&self.conns).values() {
            if !conn.matches(topic) {
                continue;
            }
            n += 1;
            match conn.push(message.clone(), self.outbound_capacity, self.slow_client) {
                Pushed::Queued => bump(&self.counters.queued),
                Pushed::DroppedOldest => {
                    bump(&self.counters.queued);
                    bump(&self.counters.dropped);
                }
                Pushed::Disconnected => bump(&self.counters.slow_disconnects),
                Pushed::Closing => {}
            }
        }
        n
    }
}

enum Pushed {
    Queued,
    DroppedOldest,
    Disconnected,
    Closing,
}

struct Outbound {
    events: VecDeque<Message>,
    control: VecDeque<Message>,
    /// Events dropped since the client was last told.
    dropped: u64,
}

/// One client connection as the hub sees it.
struct Conn {
    subs: Mutex<Vec<(String, Vec<TopicPattern>)>>,
    queue: Mutex<Outbound>,
    notify: Notify,
    /// Signalled when the writer takes queued frames.
    drained: Notify,
    /// Cancelled when the connection must close at once (hub shutdown, a
    /// slow or silent client); `close_code` says why.
    close: CancellationToken,
    /// Cancelled when the connection is to close once the replies queued so
    /// far are written (the client left, or sent too large a message).
    finish: CancellationToken,
    close_code: AtomicU16,
    writer_done: CancellationToken,
    acks: AtomicBool,
    /// Milliseconds since `started` when a frame last arrived.
    last_seen: AtomicU64,
    started: Instant,
}

impl Conn {
    fn matches(&self, topic: &str) -> bool {
        lock(&self.subs)
            .iter()
            .any(|(_, patterns)| patterns.iter().any(|p| p.matches(topic)))
    }

    fn push(&self, message: Message, capacity: usize, policy: SlowClient) -> Pushed {
        if self.close.is_cancelled() {
            return Pushed::Closing;
        }
        let mut q = lock(&self.queue);
        let mut pushed = Pushed::Queued;
        if q.events.len() >= capacity {
            match policy {
                SlowClient::DropOldest => {
                    q.events.pop_front();
                    q.dropped += 1;
                    pushed = Pushed::DroppedOldest;
                }
                SlowClient::Disconnect => {
                    q.events.clear();
                    drop(q);
                    self.close_with(close_code::POLICY);
                    return Pushed::Disconnected;
                }
            }
        }
        q.events.push_back(message);
        drop(q);
        self.notify.notify_one();
        pushed
    }

    /// Queues a control reply. When a client lets too many pile up (it
    /// sends faster than it reads), this waits, so the hub stops reading
    /// from that client instead of growing its memory.
    async fn reply(&self, control: Control) {
        let message = Message::Text(Utf8Bytes::from(control.to_text()));
        loop {
            let drained = self.drained.notified();
            {
                let mut q = lock(&self.queue);
                if q.control.len() < MAX_PENDING_CONTROL {
                    q.control.push_back(message);
                    drop(q);
                    self.notify.notify_one();
                    return;
                }
            }
            tokio::select! {
                () = drained => {}
                () = self.close.cancelled() => return,
                () = self.finish.cancelled() => return,
            }
        }
    }

    fn close_with(&self, code: u16) {
        // The first reason given wins.
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.close.cancel();
    }

    fn finish_with(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.finish.cancel();
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis();
        self.last_seen
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_seen.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has arrived from the client for `timeout`: a
    /// write blocked on a client that reads nothing ends there.
    async fn silent_for(&self, timeout: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }

    /// Up to [`BATCH`] frames: control replies first, then a note of
    /// dropped events, then events.
    fn take_batch(&self, out: &mut Vec<Message>) -> usize {
        let mut q = lock(&self.queue);
        out.extend(q.control.drain(..));
        if q.dropped > 0 {
            let control = Control::Error {
                code: code::DROPPED.to_owned(),
                message: "events dropped because this client fell behind".to_owned(),
                re: None,
                count: Some(q.dropped),
            };
            q.dropped = 0;
            out.push(Message::Text(Utf8Bytes::from(control.to_text())));
        }
        let n = q.events.len().min(BATCH);
        out.extend(q.events.drain(..n));
        drop(q);
        self.drained.notify_waiters();
        n
    }
}

/// Removes the connection from the hub however its task ends.
struct Registration<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut conns = self.inner.conns.write().unwrap_or_else(|p| p.into_inner());
        conns.remove(&self.id);
        drop(conns);
        self.inner.gone.notify_waiters();
    }
}

async fn serve_connection(inner: Arc<Inner>, socket: WebSocket) {
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn {
        subs: Mutex::new(Vec::new()),
        queue: Mutex::new(Outbound {
            events: VecDeque::new(),
            control: VecDeque::new(),
            dropped: 0,
        }),
        notify: Notify::new(),
        drained: Notify::new(),
        close: inner.shutdown.child_token(),
        finish: CancellationToken::new(),
        close_code: AtomicU16::new(0),
        writer_done: CancellationToken::new(),
        acks: AtomicBool::new(false),
        last_seen: AtomicU64::new(0),
        started: Instant::now(),
    });
    inner
        .conns
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, conn.clone());
    let _registration = Registration { inner: &inner, id };
    tracing::debug!(connection = id, "websocket client connected");

    let (mut sink, mut stream) = socket.split();
    let services = Services {
        handler: inner.handler.clone(),
        poison: inner.poison.clone(),
    };
    tokio::join!(
        read_loop(&inner, &conn, &mut stream, services),
        write_loop(&inner, &conn, &mut sink),
    );
    tracing::debug!(connection = id, "websocket client disconnected");
}

/// A connection's own clones of the hub's services.
struct Services {
    handler: Option<Handler>,
    poison: Option<Handler>,
}

impl Services {
    async fn poison(&mut self, body: Bytes, error: Error) {
        let Some(poison) = &mut self.poison else { return };
        let raw = RawMessage {
            topic: Arc::from(""),
            headers: Vec::new(),
            body,
        };
        let event = Poison::new(raw, error).into_event();
        let result = match poison.ready().await {
            Ok(poison) => poison.call(event).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "the poison service failed on an invalid frame");
        }
    }
}

async fn read_loop(inner: &Inner, conn: &Conn, stream: &mut SplitStream<WebSocket>, mut services: Services) {
    loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            () = async {
                conn.writer_done.cancelled().await;
                tokio::time::sleep(CLOSE_WAIT).await;
            } => break,
        };
        let Some(next) = next else { break };
        conn.touch();
        match next {
            Ok(Message::Text(text)) => on_text(inner, conn, text, &mut services).await,
            Ok(Message::Binary(body)) => {
                bump(&inner.counters.invalid_frames);
                let why = "binary frames are not supported; send CloudEvents JSON in text frames";
                conn.reply(Control::error(code::BINARY, why)).await;
                services.poison(body, Error::decode(why)).await;
            }
            Ok(_) => {}
            Err(e) => {
                if is_too_large(&e) {
                    bump(&inner.counters.invalid_frames);
                    conn.reply(Control::error(
                        code::TOO_LARGE,
                        format!("message larger than {} bytes", inner.max_message_size),
                    ))
                    .await;
                    conn.finish_with(CLOSE_TOO_BIG);
                }
                break;
            }
        }
    }
    conn.finish_with(close_code::NORMAL);
}

fn is_too_large(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(WsError::Capacity(_)) = s.downcast_ref::<WsError>() {
            return true;
        }
        source = s.source();
    }
    false
}

async fn on_text(inner: &Inner, conn: &Conn, text: Utf8Bytes, services: &mut Services) {
    match classify(text.as_str()) {
        Frame::Event(event) => {
            bump(&inner.counters.received);
            if inner.relay {
                bump(&inner.counters.published);
                inner.fan_out(event.topic(), &Message::Text(text));
            }
            let id = event.id().to_owned();
            let result = match &mut services.handler {
                Some(handler) => match handler.ready().await {
                    Ok(handler) => handler.call(event).await,
                    Err(e) => Err(e),
                },
                None => Ok(()),
            };
            let acks = conn.acks.load(Ordering::Relaxed);
            match result {
                Ok(()) if acks => conn.reply(Control::Ack { id }).await,
                Ok(()) => {}
                Err(e) => {
                    bump(&inner.counters.handler_errors);
                    tracing::debug!(error = %e, event_id = %id, "handler failed on a client's event");
                    if acks {
                        conn.reply(Control::Nack {
                            id,
                            message: e.to_string(),
                        })
                        .await;
                    } else {
                        conn.reply(Control::Error {
                            code: code::HANDLER.to_owned(),
                            message: e.to_string(),
                            re: Some(id),
                            count: None,
                        })
                        .await;
                    }
                }
            }
        }
        Frame::Control(Control::Subscribe { id, patterns }) => match TopicPattern::parse_all(&patterns) {
            Ok(parsed) => {
                {
                    let mut subs = lock(&conn.subs);
                    match subs.iter_mut().find(|(sid, _)| *sid == id) {
                        Some(entry) => entry.1 = parsed,
                        None => subs.push((id.clone(), parsed)),
                    }
                }
                conn.reply(Control::Subscribed { id }).await;
            }
            Err(e) => {
                conn.reply(Control::Error {
                    code: code::INVALID_PATTERN.to_owned(),
                    message: e.to_string(),
                    re: Some(id),
                    count: None,
                })
                .await
            }
        },
        Frame::Control(Control::Unsubscribe { id }) => {
            lock(&conn.subs).retain(|(sid, _)| *sid != id);
            conn.reply(Control::Unsubscribed { id }).await;
        }
        Frame::Control(Control::Options { acks }) => conn.acks.store(acks, Ordering::Relaxed),
        Frame::Control(other) => {
            bump(&inner.counters.invalid_frames);
            conn.reply(Control::error(
                code::UNSUPPORTED,
                format!("a client cannot send {}", other.to_text()),
            ))
            .await;
        }
        Frame::Invalid(e) => {
            bump(&inner.counters.invalid_frames);
            conn.reply(Control::error(code::MALFORMED, e.to_string())).await;
            services.poison(Bytes::from(text), e).await;
        }
    }
}

async fn write_loop(inner: &Inner, conn: &Conn, sink: &mut SplitSink<WebSocket, Message>) {
    let mut ping = tokio::time::interval_at(Instant::now() + inner.ping_interval, inner.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH + 2);
    loop {
        if conn.finish.is_cancelled() {
            break;
        }
        batch.clear();
        let events = conn.take_batch(&mut batch);
        if !batch.is_empty() {
            let written = tokio::select! {
                r = send_all(sink, &mut batch) => r,
                () = conn.close.cancelled() => break,
                () = conn.silent_for(inner.idle_timeout) => {
                    conn.close_with(close_code::AWAY);
                    break;
                }
            };
            match written {
                Ok(()) => {
                    inner.counters.sent.fetch_add(events as u64, Ordering::Relaxed);
                    continue;
                }
                Err(_) => {
                    conn.close_with(close_code::ABNORMAL);
                    break;
                }
            }
        }
        tokio::select! {
            () = conn.notify.notified() => {}
            _ = ping.tick() => {
                if conn.idle_for() >= inner.idle_timeout {
                    tracing::debug!("websocket client missed its pings; disconnecting");
                    conn.close_with(close_code::AWAY);
                    break;
                }
                let pinged = tokio::select! {
                    r = sink.send(Message::Ping(Bytes::new())) => r.is_ok(),
                    () = conn.close.cancelled() => break,
                    () = conn.silent_for(inner.idle_timeout) => {
                        conn.close_with(close_code::AWAY);
                        break;
                    }
                };
                if !pinged {
                    conn.close_with(close_code::ABNORMAL);
                    break;
                }
            }
            () = conn.close.cancelled() => break,
            () = conn.finish.cancelled() => break,
        }
    }
    // The close handshake: outstanding replies (an error saying why), then
    // the close frame; the reader waits a little for the client's answer.
    let code = match conn.close_code.load(Ordering::Acquire) {
        0 => close_code::AWAY,
        code => code,
    };
    if code != close_code::ABNORMAL {
        let mut last: Vec<Message> = lock(&conn.queue).control.drain(..).collect();
        last.push(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(match code {
                close_code::POLICY => "client fell behind or broke the protocol",
                close_code::NORMAL => "",
                CLOSE_TOO_BIG => "message too big",
                _ => "going away",
            }),
        })));
        let _ = tokio::time::timeout(CLOSE_WAIT, send_all(sink, &mut last)).await;
    }
    conn.writer_done.cancel();
}

async fn send_all(
    sink: &mut SplitSink<WebSocket, Message>,
    batch: &mut Vec<Message>,
) -> Result<(), axum::Error> {
    for message in batch.drain(..) {
        sink.feed(message).await?;
    }
    sink.flush().await
}
