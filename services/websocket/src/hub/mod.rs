//! The server side: [`WsHub`], mounted as an axum route.

mod builder;
mod connection;

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocketUpgrade};
use axum::http::header::ORIGIN;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};
use watchtower::trace::PublishTrace;
use watchtower::{BoxError, Error, Event, Receipt, TopicPattern};

use crate::index::PatternIndex;
use crate::protocol::{code, encode};
use crate::{CONTROL_SUBPROTOCOL, SUBPROTOCOL};

type Handler = BoxCloneSyncService<Event, (), Error>;
/// A connection's identity, as [`WsHubBuilder::authenticate`] returned it.
type Identity = Arc<dyn Any + Send + Sync>;
type AuthFn = Arc<dyn Fn(&HeaderMap) -> Result<Identity, StatusCode> + Send + Sync>;
type SubscribeHook = Arc<dyn Fn(&Identity, &TopicPattern) -> bool + Send + Sync>;
type PublishHook = Arc<dyn Fn(&Identity, &Event) -> bool + Send + Sync>;

use builder::Settings;
pub use builder::{HubStats, SlowClient, WsHubBuilder};
use connection::{Conn, Pushed, serve_connection};

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
    forbidden: AtomicU64,
    limited: AtomicU64,
    abandoned: AtomicU64,
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
    settings: Settings,
    auth: Option<AuthFn>,
    can_subscribe: Option<SubscribeHook>,
    can_publish: Option<PublishHook>,
    /// Every connection's patterns. Written when a connection subscribes,
    /// unsubscribes or leaves; read by a publish only while it collects the
    /// matching connections. Connecting does not touch it.
    index: RwLock<PatternIndex<Arc<Conn>>>,
    open: AtomicUsize,
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
///
/// It implements [`Transport`](watchtower::Transport): its health is up
/// while it serves and down after [`shutdown`](WsHub::shutdown).
///
/// A hub accepts WebSocket connections, fans the events published into it
/// (it is a `Service<Event>`) out to every connection subscribed to a
/// matching pattern, and hands the events clients send to a handler
/// service. Each connection has a bounded outbound queue, so a slow client
/// never holds up the others: when its queue is full the hub drops the
/// client's oldest queued event or disconnects it ([`SlowClient`]), and
/// counts either in its [`HubStats`].
///
/// # Example
///
/// ```
/// use axum::Router;
/// use axum::http::{HeaderMap, StatusCode};
/// use tower::service_fn;
/// use watchtower::prelude::*;
/// use watchtower_websocket::covers;
/// use watchtower_websocket::{SlowClient, WsHub};
///
/// /// Who a connection is, as the application knows it.
/// struct User {
///     name: String,
///     may_read: Vec<TopicPattern>,
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
/// let orders = TopicPattern::new("orders.*")?;
/// let hub = WsHub::builder()
///     // Events that clients send.
///     .handler(service_fn(|event: Event| async move {
///         println!("client sent {}", event.ty());
///         Ok::<_, Error>(())
///     }))
///     .slow_client(SlowClient::DropOldest)
///     .allowed_origins(["https://app.example.com"])
///     .authenticate(move |headers: &HeaderMap| match headers.get("authorization") {
///         Some(v) if v == "Bearer s3cret" => Ok(User {
///             name: "alice".into(),
///             may_read: vec![orders.clone()],
///         }),
///         _ => Err(StatusCode::UNAUTHORIZED),
///     })
///     // A pattern is allowed when every topic it matches may be read.
///     .can_subscribe(|user: &User, pattern: &TopicPattern| {
///         user.may_read.iter().any(|allowed| covers(allowed, pattern))
///     })
///     .can_publish(|user: &User, event: &Event| event.topic() == format!("chat.{}", user.name))
///     .build();
/// let app: Router = Router::new().route("/events", hub.route());
///
/// // Events published into the hub go to every matching subscriber.
/// let mut publisher = hub.clone();
/// publisher.publish(Event::new("orders.created", serde_json::json!({"id": 1}))).await?;
/// # let _ = app;
/// # Ok(()) }
/// ```
///
/// # Limits
///
/// A hub is reachable from outside, so every connection is bounded: its
/// subscriptions ([`max_subscriptions`](WsHubBuilder::max_subscriptions)),
/// the patterns in them ([`max_patterns`](WsHubBuilder::max_patterns)),
/// the length of a pattern ([`max_pattern_len`](WsHubBuilder::max_pattern_len))
/// and of a subscription id (128 bytes),
/// the rate of its control messages
/// ([`max_control_rate`](WsHubBuilder::max_control_rate)) and, by option, of
/// its events ([`max_event_rate`](WsHubBuilder::max_event_rate)), the size
/// of a message ([`max_message_size`](WsHubBuilder::max_message_size)), the
/// events queued for it in both directions
/// ([`outbound_capacity`](WsHubBuilder::outbound_capacity),
/// [`inbound_capacity`](WsHubBuilder::inbound_capacity)). A subscription or
/// an event over a limit is refused with an error message naming it (code
/// `limit` or `rate_limited`) and the connection stays open: the client can
/// correct itself, and each refusal costs the hub no more than the frame
/// did. Only a message over the size limit closes the connection (code
/// 1009), since the rest of it cannot be skipped.
///
/// Publishing looks up the subscribers of a topic in an index of every
/// connection's patterns (a trie of the dot-separated tokens): its cost
/// grows with the number of matching connections, not with the number of
/// patterns held, and the index is locked only while the matching
/// connections are collected.
///
/// # Authorization
///
/// [`authenticate`](WsHubBuilder::authenticate) runs on each upgrade request
/// and returns the connection's identity, a type of the application's
/// choosing. [`can_subscribe`](WsHubBuilder::can_subscribe) decides, for
/// that identity, each pattern a connection subscribes to: the hook sees the
/// pattern, not the topics it will match, so a user allowed `orders.*` must
/// be refused `admin.>` and `>` as well — [`covers`](crate::covers) answers exactly that
/// question. [`can_publish`](WsHubBuilder::can_publish) decides each event
/// a connection sends, before it is relayed or handled. A refusal is an
/// error message with code `forbidden` (a `nack` for an event when the
/// client asked for acknowledgements), counted in [`HubStats::forbidden`].
/// [`allowed_origins`](WsHubBuilder::allowed_origins) refuses browsers on
/// other sites.
///
/// # Subprotocols
///
/// The hub speaks two subprotocols, chosen by the client at the upgrade:
///
/// * [`SUBPROTOCOL`], `cloudevents.json`: every text
///   frame in both directions is a CloudEvent and nothing else, as the
///   CloudEvents WebSocket binding says. Such a client subscribes with
///   `topic` parameters in the URL (`/events?topic=orders.*&topic=chat.%3E`,
///   percent-encoded as usual), checked against the limits and
///   [`can_subscribe`](WsHubBuilder::can_subscribe) before the upgrade: a
///   refused pattern is refused with HTTP 403, an invalid one or too many
///   with 400. (A `watchtower.v1` client may subscribe this way too; the
///   subscription's id is `url`.) It is never sent a control message; what the hub would have
///   told it (a refused or failed event, dropped events) is only counted.
///   Control messages it sends are not CloudEvents and are treated as
///   malformed frames.
/// * [`CONTROL_SUBPROTOCOL`], `watchtower.v1`:
///   the same events plus the control messages of the
///   [wire protocol](crate#wire-protocol) (subscribe, acknowledgements,
///   errors). [`WsClient`](crate::WsClient) speaks this one. A client that
///   offers no subprotocol is served this way too.
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

    /// A builder for a hub with a handler, limits, authentication and
    /// authorization.
    pub fn builder() -> WsHubBuilder {
        WsHubBuilder::new()
    }

    /// The hub as an axum route: `Router::new().route("/events", hub.route())`.
    pub fn route<S>(&self) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let hub = self.clone();
        any(move |ws: WebSocketUpgrade, headers: HeaderMap, uri: Uri| {
            let hub = hub.clone();
            async move { hub.upgrade_with_uri(ws, &headers, &uri) }
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

    /// Accepts an upgrade request in a handler of your own, without a
    /// subscription in the URL; see [`upgrade_with_uri`](WsHub::upgrade_with_uri).
    pub fn upgrade(&self, ws: WebSocketUpgrade, headers: &HeaderMap) -> Response {
        self.upgrade_with_uri(ws, headers, &Uri::from_static("/"))
    }

    /// Accepts an upgrade request in a handler of your own: checks the
    /// `Origin` header against [`allowed_origins`](WsHubBuilder::allowed_origins),
    /// runs the authentication hook on `headers`, subscribes the connection
    /// to the `topic` parameters of `uri`'s query (see the
    /// [module docs](WsHub#subprotocols)), negotiates the subprotocol
    /// (`watchtower.v1` preferred, then `cloudevents.json`; clients that
    /// offer none are served as `watchtower.v1`) and serves the connection.
    pub fn upgrade_with_uri(&self, ws: WebSocketUpgrade, headers: &HeaderMap, uri: &Uri) -> Response {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        let refuse = |status: StatusCode, why: &str| {
            bump(&inner.counters.refused);
            tracing::debug!(%status, why, "websocket upgrade refused");
            (status, why.to_owned()).into_response()
        };
        if let Some(allowed) = &inner.settings.allowed_origins
            && let Some(origin) = headers.get(ORIGIN)
            && !allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
        {
            return refuse(StatusCode::FORBIDDEN, "origin not allowed");
        }
        let identity: Identity = match &inner.auth {
            Some(auth) => match auth(headers) {
                Ok(identity) => identity,
                Err(status) => {
                    bump(&inner.counters.refused);
                    return status.into_response();
                }
            },
            None => Arc::new(()),
        };
        let patterns = match url_patterns(inner, &identity, uri.query()) {
            Ok(patterns) => patterns,
            Err(refusal) => return refuse(refusal.status(), &refusal.message),
        };
        bump(&inner.counters.accepted);
        let ws = ws
            .protocols([CONTROL_SUBPROTOCOL, SUBPROTOCOL])
            .max_message_size(inner.settings.max_message_size)
            .max_frame_size(inner.settings.max_message_size);
        let control = ws
            .selected_protocol()
            .is_none_or(|p| p.as_bytes() != SUBPROTOCOL.as_bytes());
        let inner = self.inner.clone();
        ws.on_upgrade(move |socket| serve_connection(inner, socket, identity, control, patterns))
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
            forbidden: get(&c.forbidden),
            limited: get(&c.limited),
            abandoned: get(&c.abandoned),
        }
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
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

    fn call(&mut self, mut event: Event) -> Self::Future {
        let trace = PublishTrace::start(crate::SYSTEM, &event.shared_topic(), &mut event);
        let entered = trace.span().enter();
        let result = self
            .broadcast(&event)
            .map(|_| Receipt::for_event(&event))
            .map_err(|e| {
                if e.event().is_some() {
                    e
                } else {
                    e.with_event(event)
                }
            });
        drop(entered);
        trace.finish(&result);
        std::future::ready(result)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a subscription was refused: an error code and a message.
struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status for a refusal at the upgrade.
    fn status(&self) -> StatusCode {
        if self.code == code::FORBIDDEN {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::BAD_REQUEST
        }
    }
}

/// The patterns of the upgrade URL's `topic` parameters, checked.
fn url_patterns(
    inner: &Inner,
    identity: &Identity,
    query: Option<&str>,
) -> Result<Vec<TopicPattern>, Refusal> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let mut texts = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "topic" {
            if texts.len() >= inner.settings.max_patterns {
                bump(&inner.counters.limited);
                return Err(Refusal::new(
                    code::LIMIT,
                    format!("more than {} topic patterns", inner.settings.max_patterns),
                ));
            }
            texts.push(value);
        }
    }
    inner.check_patterns(identity, &texts)
}

impl Inner {
    fn fan_out(&self, topic: &str, message: &Message) -> usize {
        // Collected under the read lock, pushed after it: the lock is held
        // for the lookup only, and no connection's queue is locked under it.
        let mut targets = Vec::new();
        read(&self.index).matches(topic, &mut targets);
        for (_, conn) in &targets {
            match conn.push(
                message.clone(),
                self.settings.outbound_capacity,
                self.settings.slow_client,
            ) {
                Pushed::Queued => bump(&self.counters.queued),
                Pushed::DroppedOldest => {
                    bump(&self.counters.queued);
                    bump(&self.counters.dropped);
                }
                Pushed::Disconnected => bump(&self.counters.slow_disconnects),
                Pushed::Closing => {}
            }
        }
        targets.len()
    }

    /// Checks a subscription's patterns against the per-pattern limits and
    /// the authorization hook, and parses them.
    fn check_patterns<S: AsRef<str>>(
        &self,
        identity: &Identity,
        texts: &[S],
    ) -> Result<Vec<TopicPattern>, Refusal> {
        let settings = &self.settings;
        if texts.len() > settings.max_patterns {
            bump(&self.counters.limited);
            return Err(Refusal::new(
                code::LIMIT,
                format!(
                    "{} patterns; a connection may hold {}",
                    texts.len(),
                    settings.max_patterns
                ),
            ));
        }
        if texts.iter().any(|t| t.as_ref().len() > settings.max_pattern_len) {
            bump(&self.counters.limited);
            return Err(Refusal::new(
                code::LIMIT,
                format!("a pattern longer than {} bytes", settings.max_pattern_len),
            ));
        }
        let patterns =
            TopicPattern::parse_all(texts).map_err(|e| Refusal::new(code::INVALID_PATTERN, e.to_string()))?;
        if let Some(allowed) = &self.can_subscribe
            && let Some(refused) = patterns.iter().find(|p| !allowed(identity, p))
        {
            bump(&self.counters.forbidden);
            return Err(Refusal::new(
                code::FORBIDDEN,
                format!("not allowed to subscribe to {}", refused.as_str()),
            ));
        }
        Ok(patterns)
    }

    /// Puts subscription `sub` of connection `conn` in place, within the
    /// connection's limits.
    fn subscribe(&self, conn: &Arc<Conn>, sub: String, patterns: Vec<TopicPattern>) -> Result<(), Refusal> {
        // The index first, then the connection's list: the one lock order.
        let mut index = write(&self.index);
        let mut subs = lock(&conn.subs);
        let existing = subs.iter().position(|(id, _)| *id == sub);
        let others: usize = subs
            .iter()
            .filter(|(id, _)| *id != sub)
            .map(|(_, p)| p.len())
            .sum();
        if existing.is_none() && subs.len() >= self.settings.max_subscriptions {
            bump(&self.counters.limited);
            return Err(Refusal::new(
                code::LIMIT,
                format!(
                    "a connection may hold {} subscriptions",
                    self.settings.max_subscriptions
                ),
            ));
        }
        if others + patterns.len() > self.settings.max_patterns {
            bump(&self.counters.limited);
            return Err(Refusal::new(
                code::LIMIT,
                format!(
                    "{} patterns with this subscription; a connection may hold {}",
                    others + patterns.len(),
                    self.settings.max_patterns
                ),
            ));
        }
        for pattern in &patterns {
            index.insert(pattern, conn.id, conn);
        }
        match existing {
            Some(i) => {
                let old = std::mem::replace(&mut subs[i].1, patterns);
                for pattern in &old {
                    index.remove(pattern, conn.id);
                }
            }
            None => subs.push((sub, patterns)),
        }
        Ok(())
    }

    fn unsubscribe(&self, conn: &Conn, sub: &str) {
        let mut index = write(&self.index);
        let mut subs = lock(&conn.subs);
        if let Some(i) = subs.iter().position(|(id, _)| id == sub) {
            let (_, old) = subs.swap_remove(i);
            for pattern in &old {
                index.remove(pattern, conn.id);
            }
        }
    }

    fn authorized_publish(&self, conn: &Conn, event: &Event) -> bool {
        self.can_publish
            .as_ref()
            .is_none_or(|allowed| allowed(&conn.identity, event))
    }
}

/// Up while the hub serves, down after [`shutdown`](WsHub::shutdown): the
/// hub is in the process, so there is no connection of its own to check.
impl watchtower::Transport for WsHub {
    const SYSTEM: &'static str = crate::SYSTEM;

    fn health(&self) -> impl std::future::Future<Output = watchtower::health::Health> + Send {
        let health = if self.inner.shutdown.is_cancelled() {
            watchtower::health::Health::down(Self::SYSTEM, "websocket hub is shut down")
        } else {
            watchtower::health::Health::up(Self::SYSTEM)
        };
        std::future::ready(health)
    }
}
