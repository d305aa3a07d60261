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
//! use watchtower_websocket::hub::covers;
//! use watchtower_websocket::{SlowClient, WsHub};
//!
//! /// Who a connection is, as the application knows it.
//! struct User {
//!     name: String,
//!     may_read: Vec<TopicPattern>,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let orders = TopicPattern::new("orders.*")?;
//! let hub = WsHub::builder()
//!     // Events that clients send.
//!     .handler(service_fn(|event: Event| async move {
//!         println!("client sent {}", event.ty());
//!         Ok::<_, Error>(())
//!     }))
//!     .slow_client(SlowClient::DropOldest)
//!     .allowed_origins(["https://app.example.com"])
//!     .authenticate(move |headers: &HeaderMap| match headers.get("authorization") {
//!         Some(v) if v == "Bearer s3cret" => Ok(User {
//!             name: "alice".into(),
//!             may_read: vec![orders.clone()],
//!         }),
//!         _ => Err(StatusCode::UNAUTHORIZED),
//!     })
//!     // A pattern is allowed when every topic it matches may be read.
//!     .can_subscribe(|user: &User, pattern: &TopicPattern| {
//!         user.may_read.iter().any(|allowed| covers(allowed, pattern))
//!     })
//!     .can_publish(|user: &User, event: &Event| event.topic() == format!("chat.{}", user.name))
//!     .build();
//! let app: Router = Router::new().route("/events", hub.route());
//!
//! // Events published into the hub go to every matching subscriber.
//! let mut publisher = hub.clone();
//! publisher.publish(Event::new("orders.created", serde_json::json!({"id": 1}))).await?;
//! # let _ = app;
//! # Ok(()) }
//! ```
//!
//! # Limits
//!
//! A hub is reachable from outside, so every connection is bounded: its
//! subscriptions ([`max_subscriptions`](WsHubBuilder::max_subscriptions)),
//! the patterns in them ([`max_patterns`](WsHubBuilder::max_patterns)),
//! the length of a pattern ([`max_pattern_len`](WsHubBuilder::max_pattern_len)),
//! the rate of its control messages
//! ([`max_control_rate`](WsHubBuilder::max_control_rate)) and, by option, of
//! its events ([`max_event_rate`](WsHubBuilder::max_event_rate)), the size
//! of a message ([`max_message_size`](WsHubBuilder::max_message_size)), the
//! events queued for it in both directions
//! ([`outbound_capacity`](WsHubBuilder::outbound_capacity),
//! [`inbound_capacity`](WsHubBuilder::inbound_capacity)). A subscription or
//! an event over a limit is refused with an error message naming it (code
//! `limit` or `rate_limited`) and the connection stays open: the client can
//! correct itself, and each refusal costs the hub no more than the frame
//! did. Only a message over the size limit closes the connection (code
//! 1009), since the rest of it cannot be skipped.
//!
//! Publishing looks up the subscribers of a topic in an index of every
//! connection's patterns (a trie of the dot-separated tokens): its cost
//! grows with the number of matching connections, not with the number of
//! patterns held, and the index is locked only while the matching
//! connections are collected.
//!
//! # Authorization
//!
//! [`authenticate`](WsHubBuilder::authenticate) runs on each upgrade request
//! and returns the connection's identity, a type of the application's
//! choosing. [`can_subscribe`](WsHubBuilder::can_subscribe) decides, for
//! that identity, each pattern a connection subscribes to: the hook sees the
//! pattern, not the topics it will match, so a user allowed `orders.*` must
//! be refused `admin.>` and `>` as well — [`covers`] answers exactly that
//! question. [`can_publish`](WsHubBuilder::can_publish) decides each event
//! a connection sends, before it is relayed or handled. A refusal is an
//! error message with code `forbidden` (a `nack` for an event when the
//! client asked for acknowledgements), counted in [`HubStats::forbidden`].
//! [`allowed_origins`](WsHubBuilder::allowed_origins) refuses browsers on
//! other sites.
//!
//! # Subprotocols
//!
//! The hub speaks two subprotocols, chosen by the client at the upgrade:
//!
//! * [`SUBPROTOCOL`](crate::SUBPROTOCOL), `cloudevents.json`: every text
//!   frame in both directions is a CloudEvent and nothing else, as the
//!   CloudEvents WebSocket binding says. Such a client subscribes with
//!   `topic` parameters in the URL (`/events?topic=orders.*&topic=chat.%3E`,
//!   percent-encoded as usual), checked against the limits and
//!   [`can_subscribe`](WsHubBuilder::can_subscribe) before the upgrade: a
//!   refused pattern is refused with HTTP 403, an invalid one or too many
//!   with 400. It is never sent a control message; what the hub would have
//!   told it (a refused or failed event, dropped events) is only counted.
//!   Control messages it sends are not CloudEvents and are treated as
//!   malformed frames.
//! * [`CONTROL_SUBPROTOCOL`](crate::CONTROL_SUBPROTOCOL), `watchtower.v1`:
//!   the same events plus the control messages of the
//!   [wire protocol](crate#wire-protocol) (subscribe, acknowledgements,
//!   errors). [`WsClient`](crate::WsClient) speaks this one. A client that
//!   offers no subprotocol is served this way too.

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::header::ORIGIN;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt as _};
use watchtower::{BoxError, Error, Event, Poison, RawMessage, Receipt, TopicPattern};

use crate::index::PatternIndex;
pub use crate::index::covers;
use crate::protocol::{Control, Frame, classify, code, encode};
use crate::{CONTROL_SUBPROTOCOL, SUBPROTOCOL};

type Handler = BoxCloneSyncService<Event, (), Error>;
/// A connection's identity, as [`WsHubBuilder::authenticate`] returned it.
type Identity = Arc<dyn Any + Send + Sync>;
type AuthFn = Arc<dyn Fn(&HeaderMap) -> Result<Identity, StatusCode> + Send + Sync>;
type SubscribeHook = Arc<dyn Fn(&Identity, &TopicPattern) -> bool + Send + Sync>;
type PublishHook = Arc<dyn Fn(&Identity, &Event) -> bool + Send + Sync>;

/// How long a closing connection waits for the peer's close frame, and for
/// its last frames to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Control replies queued for a client before the hub stops reading from it.
const MAX_PENDING_CONTROL: usize = 256;
/// Frames written per flush.
const BATCH: usize = 64;
/// The close code for "message too big" (RFC 6455 §7.4.1).
const CLOSE_TOO_BIG: u16 = 1009;
/// The id of the subscription made from the upgrade URL's `topic`s.
const URL_SUBSCRIPTION: &str = "url";

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

/// The plain settings of a hub.
#[derive(Debug, Clone)]
struct Settings {
    relay: bool,
    outbound_capacity: usize,
    inbound_capacity: usize,
    slow_client: SlowClient,
    max_message_size: usize,
    ping_interval: Duration,
    idle_timeout: Duration,
    max_subscriptions: usize,
    max_patterns: usize,
    max_pattern_len: usize,
    max_control_rate: u32,
    max_event_rate: Option<u32>,
    allowed_origins: Option<Vec<String>>,
}

/// Builds a [`WsHub`]; see [`WsHub::builder`]. `I` is the identity type
/// [`authenticate`](Self::authenticate) gives each connection, `()` until
/// it is called.
pub struct WsHubBuilder<I = ()> {
    settings: Settings,
    handler: Option<Handler>,
    poison: Option<Handler>,
    auth: Option<AuthFn>,
    can_subscribe: Option<SubscribeHook>,
    can_publish: Option<PublishHook>,
    identity: PhantomData<fn() -> I>,
}

impl<I> fmt::Debug for WsHubBuilder<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsHubBuilder")
            .field("settings", &self.settings)
            .field("handler", &self.handler.is_some())
            .field("poison", &self.poison.is_some())
            .field("auth", &self.auth.is_some())
            .field("can_subscribe", &self.can_subscribe.is_some())
            .field("can_publish", &self.can_publish.is_some())
            .finish()
    }
}

impl<I: Send + Sync + 'static> WsHubBuilder<I> {
    /// The service that receives the events clients send. Each connection
    /// hands its events to the handler one at a time, in the order they
    /// arrived, waiting for its readiness, from a queue of
    /// [`inbound_capacity`](Self::inbound_capacity): while the handler is
    /// busy the hub keeps reading from the client (and answering its pings)
    /// until that queue is full, then stops reading, which slows the
    /// sending client down through TCP and nobody else. Without a handler
    /// (and without [`relay`](Self::relay)) events from clients are
    /// discarded after being counted in [`HubStats::received`].
    ///
    /// A queued event from a client that asked for acknowledgements is not
    /// handed to the handler once that client has disconnected: it can no
    /// longer learn the outcome and will send the event again or give it up
    /// itself. It is counted in [`HubStats::abandoned`].
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
    /// handing them to the handler. Only events that
    /// [`can_publish`](Self::can_publish) allows are relayed. Default off.
    pub fn relay(mut self, relay: bool) -> Self {
        self.settings.relay = relay;
        self
    }

    /// Events queued per connection before [`SlowClient`] applies. Default
    /// 1024: a few seconds of a busy feed, a few hundred KiB of small events.
    pub fn outbound_capacity(mut self, capacity: usize) -> Self {
        self.settings.outbound_capacity = capacity.max(1);
        self
    }

    /// Events from one client queued for the [`handler`](Self::handler)
    /// before the hub stops reading from that client. Default 64: enough
    /// that one slow handler call does not stop the connection's pings and
    /// control messages, small enough that a client cannot park much memory
    /// in the hub.
    pub fn inbound_capacity(mut self, capacity: usize) -> Self {
        self.settings.inbound_capacity = capacity.max(1);
        self
    }

    /// What to do with a client whose queue is full. Default
    /// [`SlowClient::DropOldest`].
    pub fn slow_client(mut self, policy: SlowClient) -> Self {
        self.settings.slow_client = policy;
        self
    }

    /// The largest message (and frame) a client may send, in bytes. A
    /// larger one is answered with a `too_large` error message and that
    /// connection (only that one) is closed with code 1009, since the rest
    /// of the oversized message cannot be skipped. Default 1 MiB: the hub
    /// buffers a message whole before decoding it, so this bounds the memory
    /// one frame can take.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.settings.max_message_size = bytes.max(1);
        self
    }

    /// How often the hub pings each client. Default 15 s, well inside the
    /// 60 s idle timeouts of common proxies and load balancers.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.settings.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// A client the hub has heard nothing from (no frame, no pong) for this
    /// long is dead and is disconnected, even while a write to it is
    /// blocked because it reads nothing. Default 45 s: three missed pings.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.settings.idle_timeout = timeout;
        self
    }

    /// Subscriptions (distinct subscription ids) one connection may hold;
    /// one more is refused with a `limit` error. Default 32: a client
    /// multiplexes a handful of views over one connection.
    pub fn max_subscriptions(mut self, n: usize) -> Self {
        self.settings.max_subscriptions = n.max(1);
        self
    }

    /// Patterns one connection may hold across its subscriptions; a
    /// subscription that would take it over is refused whole with a `limit`
    /// error. Default 256: each pattern is an entry in the hub's index, and
    /// a connection that needs more usually wants a wildcard.
    pub fn max_patterns(mut self, n: usize) -> Self {
        self.settings.max_patterns = n.max(1);
        self
    }

    /// The longest pattern a connection may subscribe to, in bytes; a
    /// longer one is refused with a `limit` error. Default 256, far above
    /// any topic naming scheme in use.
    pub fn max_pattern_len(mut self, bytes: usize) -> Self {
        self.settings.max_pattern_len = bytes.max(1);
        self
    }

    /// Control messages (subscribe, unsubscribe, options) one connection
    /// may send per second, with bursts of as many; one more is refused
    /// with a `rate_limited` error and has no effect. Default 20: each one
    /// changes the hub's index, and a client subscribes at start-up and
    /// when its view changes, not in a loop.
    pub fn max_control_rate(mut self, per_second: u32) -> Self {
        self.settings.max_control_rate = per_second.max(1);
        self
    }

    /// Events one connection may send per second, with bursts of as many;
    /// one more is refused with a `rate_limited` error (a `nack` with
    /// acknowledgements on), neither relayed nor handled. Default `None`,
    /// no limit: the [`handler`](Self::handler)'s readiness and the
    /// [`inbound_capacity`](Self::inbound_capacity) already slow a client
    /// down to what the hub can take; set one when events are
    /// [`relay`](Self::relay)ed to many subscribers.
    pub fn max_event_rate(mut self, per_second: Option<u32>) -> Self {
        self.settings.max_event_rate = per_second.map(|n| n.max(1));
        self
    }

    /// Browser origins (`https://app.example.com`, compared without regard
    /// to case) allowed to connect. An upgrade request whose `Origin`
    /// header is not in the list is refused with HTTP 403 (counted in
    /// [`HubStats::refused`]). A request without an `Origin` header is
    /// accepted: browsers always send one on a WebSocket upgrade, so its
    /// absence means a program that could forge any origin anyway, which
    /// [`authenticate`](Self::authenticate) must handle. Default: any
    /// origin, which is only safe when authentication does not rely on
    /// cookies the browser adds by itself.
    pub fn allowed_origins<O>(mut self, origins: O) -> Self
    where
        O: IntoIterator,
        O::Item: Into<String>,
    {
        self.settings.allowed_origins = Some(origins.into_iter().map(Into::into).collect());
        self
    }

    /// Checks each upgrade request's headers (a bearer token, a cookie)
    /// before accepting it and returns the connection's identity, which
    /// [`can_subscribe`](Self::can_subscribe) and
    /// [`can_publish`](Self::can_publish) are given. An `Err` status is the
    /// HTTP response, and the refusal is counted in [`HubStats::refused`].
    /// A hook returning `Ok(())` only authenticates.
    ///
    /// Set this before the authorization hooks: hooks set before it were
    /// written for another identity type and refuse everything.
    pub fn authenticate<J, F>(self, auth: F) -> WsHubBuilder<J>
    where
        J: Send + Sync + 'static,
        F: Fn(&HeaderMap) -> Result<J, StatusCode> + Send + Sync + 'static,
    {
        WsHubBuilder {
            settings: self.settings,
            handler: self.handler,
            poison: self.poison,
            auth: Some(Arc::new(move |headers: &HeaderMap| {
                auth(headers).map(|id| Arc::new(id) as Identity)
            })),
            can_subscribe: self.can_subscribe,
            can_publish: self.can_publish,
            identity: PhantomData,
        }
    }

    /// Decides whether a connection may subscribe to a pattern (from a
    /// subscribe message or the upgrade URL). The hook sees the pattern
    /// itself, wildcards included: allow it only if every topic it can match
    /// may be read, for which [`covers`] is made. A refused pattern refuses
    /// its whole subscription with a `forbidden` error (HTTP 403 for the
    /// upgrade URL). Default: every pattern.
    pub fn can_subscribe<F>(mut self, hook: F) -> Self
    where
        F: Fn(&I, &TopicPattern) -> bool + Send + Sync + 'static,
    {
        self.can_subscribe = Some(Arc::new(move |id: &Identity, pattern: &TopicPattern| {
            (**id).downcast_ref::<I>().is_some_and(|id| hook(id, pattern))
        }));
        self
    }

    /// Decides whether a connection may send an event (to be relayed and
    /// handled); the hook sees the whole event, so it can check the topic,
    /// the type and the source. A refused event is answered with a
    /// `forbidden` error (a `nack` with acknowledgements on) and goes
    /// nowhere. Default: every event.
    pub fn can_publish<F>(mut self, hook: F) -> Self
    where
        F: Fn(&I, &Event) -> bool + Send + Sync + 'static,
    {
        self.can_publish = Some(Arc::new(move |id: &Identity, event: &Event| {
            (**id).downcast_ref::<I>().is_some_and(|id| hook(id, event))
        }));
        self
    }

    /// Builds the hub.
    pub fn build(self) -> WsHub {
        WsHub {
            inner: Arc::new(Inner {
                handler: self.handler,
                poison: self.poison,
                settings: self.settings,
                auth: self.auth,
                can_subscribe: self.can_subscribe,
                can_publish: self.can_publish,
                index: RwLock::new(PatternIndex::default()),
                open: AtomicUsize::new(0),
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
    /// Upgrade requests accepted (past the origin check, authentication and
    /// the URL's subscription) since the hub was built.
    pub accepted: u64,
    /// Upgrade requests refused: a disallowed origin, failed
    /// authentication, or a refused subscription in the URL.
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
    /// Subscriptions and events refused by
    /// [`can_subscribe`](WsHubBuilder::can_subscribe) or
    /// [`can_publish`](WsHubBuilder::can_publish).
    pub forbidden: u64,
    /// Subscriptions, control messages and events refused for a limit of the
    /// connection (patterns, subscriptions, rates).
    pub limited: u64,
    /// Events from clients that were queued for the handler and not handed
    /// to it because their client, waiting for an acknowledgement, had
    /// disconnected.
    pub abandoned: u64,
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
        WsHubBuilder {
            settings: Settings {
                relay: false,
                outbound_capacity: 1024,
                inbound_capacity: 64,
                slow_client: SlowClient::DropOldest,
                max_message_size: 1 << 20,
                ping_interval: Duration::from_secs(15),
                idle_timeout: Duration::from_secs(45),
                max_subscriptions: 32,
                max_patterns: 256,
                max_pattern_len: 256,
                max_control_rate: 20,
                max_event_rate: None,
                allowed_origins: None,
            },
            handler: None,
            poison: None,
            auth: None,
            can_subscribe: None,
            can_publish: None,
            identity: PhantomData,
        }
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
    /// [module docs](self#subprotocols)), negotiates the subprotocol
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
    id: u64,
    identity: Identity,
    /// Whether the client speaks `watchtower.v1` and so gets control
    /// messages; a `cloudevents.json` client gets events only.
    control: bool,
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

    /// Queues a control reply, for a client that takes them. When a client
    /// lets too many pile up (it sends faster than it reads), this waits,
    /// so the hub stops reading from that client instead of growing its
    /// memory.
    async fn reply(&self, control: Control) {
        if !self.control {
            return;
        }
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

    /// Refuses an event: a `nack` if the client asked for acknowledgements,
    /// an error message otherwise.
    async fn refuse_event(&self, event_id: String, code: &str, message: String) {
        if self.acks.load(Ordering::Relaxed) {
            self.reply(Control::Nack {
                id: event_id,
                message,
            })
            .await;
        } else {
            self.reply(Control::Error {
                code: code.to_owned(),
                message,
                re: Some(event_id),
                count: None,
            })
            .await;
        }
    }

    /// Whether the client has gone (or is being disconnected): work queued
    /// for it whose outcome it waits for is abandoned.
    fn is_gone(&self) -> bool {
        self.finish.is_cancelled() || self.close.is_cancelled()
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

    /// Resolves once the writer has closed and the peer had its chance to
    /// answer.
    async fn closing(&self) {
        self.writer_done.cancelled().await;
        tokio::time::sleep(CLOSE_WAIT).await;
    }

    /// Up to [`BATCH`] frames: control replies first, then a note of
    /// dropped events, then events.
    fn take_batch(&self, out: &mut Vec<Message>) -> usize {
        let mut q = lock(&self.queue);
        out.extend(q.control.drain(..));
        if q.dropped > 0 {
            if self.control {
                let control = Control::Error {
                    code: code::DROPPED.to_owned(),
                    message: "events dropped because this client fell behind".to_owned(),
                    re: None,
                    count: Some(q.dropped),
                };
                out.push(Message::Text(Utf8Bytes::from(control.to_text())));
            }
            q.dropped = 0;
        }
        let n = q.events.len().min(BATCH);
        out.extend(q.events.drain(..n));
        drop(q);
        self.drained.notify_waiters();
        n
    }
}

/// Takes the connection out of the hub however its task ends.
struct Registration<'a> {
    inner: &'a Inner,
    conn: Arc<Conn>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        {
            let mut index = write(&self.inner.index);
            let mut subs = lock(&self.conn.subs);
            for (_, patterns) in subs.drain(..) {
                for pattern in &patterns {
                    index.remove(pattern, self.conn.id);
                }
            }
        }
        self.inner.open.fetch_sub(1, Ordering::AcqRel);
        self.inner.gone.notify_waiters();
    }
}

/// A token bucket: `rate` per second, bursts of `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_second: u32) -> Bucket {
        let rate = f64::from(per_second);
        Bucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn serve_connection(
    inner: Arc<Inner>,
    socket: WebSocket,
    identity: Identity,
    control: bool,
    url_patterns: Vec<TopicPattern>,
) {
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn {
        id,
        identity,
        control,
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
    inner.open.fetch_add(1, Ordering::AcqRel);
    let _registration = Registration {
        inner: &inner,
        conn: conn.clone(),
    };
    if !url_patterns.is_empty()
        && let Err(refusal) = inner.subscribe(&conn, URL_SUBSCRIPTION.to_owned(), url_patterns)
    {
        // Checked before the upgrade; only the limits could say no here.
        tracing::debug!(reason = %refusal.message, "subscription from the URL refused");
    }
    tracing::debug!(connection = id, control, "websocket client connected");

    let (mut sink, mut stream) = socket.split();
    let (work_tx, work_rx) = mpsc::channel(inner.settings.inbound_capacity);
    let services = Services {
        handler: inner.handler.clone(),
        poison: inner.poison.clone(),
    };
    tokio::join!(
        read_loop(&inner, &conn, &mut stream, work_tx),
        process(&inner, &conn, work_rx, services),
        write_loop(&inner, &conn, &mut sink),
    );
    tracing::debug!(connection = id, "websocket client disconnected");
}

/// What the reader hands to the connection's processing task.
enum Work {
    /// An event for the handler; `acks` if the client waits for the outcome.
    Event { event: Event, acks: bool },
    /// A frame that is not an event, for the poison service.
    Poison { body: Bytes, error: Error },
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

/// Hands the events a client sent to the handler, one at a time, in order,
/// and answers for them; runs beside the reader, so a slow handler does not
/// stop the connection from being read (pings answered, control messages
/// served) until the inbound queue is full.
async fn process(inner: &Inner, conn: &Conn, mut work: mpsc::Receiver<Work>, mut services: Services) {
    while let Some(item) = work.recv().await {
        match item {
            Work::Poison { body, error } => services.poison(body, error).await,
            Work::Event { event, acks } => {
                if acks && conn.is_gone() {
                    // The client cannot learn the outcome any more; it will
                    // send the event again or dead-letter it itself.
                    bump(&inner.counters.abandoned);
                    continue;
                }
                let id = event.id().to_owned();
                let result = match &mut services.handler {
                    Some(handler) => match handler.ready().await {
                        Ok(handler) => handler.call(event).await,
                        Err(e) => Err(e),
                    },
                    None => Ok(()),
                };
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
        }
    }
}

/// The reader's own state.
struct Reader<'a> {
    inner: &'a Inner,
    conn: &'a Arc<Conn>,
    work: mpsc::Sender<Work>,
    control_rate: Bucket,
    event_rate: Option<Bucket>,
}

impl Reader<'_> {
    /// Queues work for the processing task, waiting while its queue is
    /// full; false if the connection closed meanwhile.
    async fn queue(&self, work: Work) -> bool {
        tokio::select! {
            sent = self.work.send(work) => sent.is_ok(),
            () = self.conn.closing() => false,
            () = self.conn.close.cancelled() => false,
        }
    }

    async fn invalid(&self, body: Bytes, code: &str, error: Error) -> bool {
        bump(&self.inner.counters.invalid_frames);
        self.conn.reply(Control::error(code, error.to_string())).await;
        self.queue(Work::Poison { body, error }).await
    }

    /// Handles a text frame; false if the connection closed meanwhile.
    async fn on_text(&mut self, text: Utf8Bytes) -> bool {
        let (inner, conn) = (self.inner, self.conn);
        let frame = classify(text.as_str());
        if let Frame::Control(_) = &frame
            && !conn.control
        {
            let error = Error::decode(
                "a control message on the cloudevents.json subprotocol, which carries CloudEvents only",
            );
            return self.invalid(Bytes::from(text), code::MALFORMED, error).await;
        }
        match frame {
            Frame::Event(event) => {
                bump(&inner.counters.received);
                if let Some(bucket) = &mut self.event_rate
                    && !bucket.take()
                {
                    bump(&inner.counters.limited);
                    let why = format!(
                        "more than {} events per second",
                        inner.settings.max_event_rate.unwrap_or_default()
                    );
                    conn.refuse_event(event.id().to_owned(), code::RATE_LIMITED, why)
                        .await;
                    return true;
                }
                if !inner.authorized_publish(conn, &event) {
                    bump(&inner.counters.forbidden);
                    let why = format!("not allowed to publish to {}", event.topic());
                    conn.refuse_event(event.id().to_owned(), code::FORBIDDEN, why)
                        .await;
                    return true;
                }
                if inner.settings.relay {
                    bump(&inner.counters.published);
                    inner.fan_out(event.topic(), &Message::Text(text));
                }
                let acks = conn.control && conn.acks.load(Ordering::Relaxed);
                if inner.handler.is_some() {
                    return self.queue(Work::Event { event, acks }).await;
                }
                if acks {
                    conn.reply(Control::Ack {
                        id: event.id().to_owned(),
                    })
                    .await;
                }
                true
            }
            Frame::Control(control) => {
                let re = match &control {
                    Control::Subscribe { id, .. } | Control::Unsubscribe { id } => Some(id.clone()),
                    _ => None,
                };
                let client_sends = matches!(
                    control,
                    Control::Subscribe { .. } | Control::Unsubscribe { .. } | Control::Options { .. }
                );
                if client_sends && !self.control_rate.take() {
                    bump(&inner.counters.limited);
                    conn.reply(Control::Error {
                        code: code::RATE_LIMITED.to_owned(),
                        message: format!(
                            "more than {} control messages per second",
                            inner.settings.max_control_rate
                        ),
                        re,
                        count: None,
                    })
                    .await;
                    return true;
                }
                self.on_control(control).await;
                true
            }
            Frame::Invalid(e) => self.invalid(Bytes::from(text), code::MALFORMED, e).await,
        }
    }

    async fn on_control(&mut self, control: Control) {
        let (inner, conn) = (self.inner, self.conn);
        match control {
            Control::Subscribe { id, patterns } => {
                let done = inner
                    .check_patterns(&conn.identity, &patterns)
                    .and_then(|parsed| inner.subscribe(conn, id.clone(), parsed));
                match done {
                    Ok(()) => conn.reply(Control::Subscribed { id }).await,
                    Err(refusal) => {
                        conn.reply(Control::Error {
                            code: refusal.code.to_owned(),
                            message: refusal.message,
                            re: Some(id),
                            count: None,
                        })
                        .await
                    }
                }
            }
            Control::Unsubscribe { id } => {
                inner.unsubscribe(conn, &id);
                conn.reply(Control::Unsubscribed { id }).await;
            }
            Control::Options { acks } => conn.acks.store(acks, Ordering::Relaxed),
            other => {
                bump(&inner.counters.invalid_frames);
                conn.reply(Control::error(
                    code::UNSUPPORTED,
                    format!("a client cannot send {}", other.to_text()),
                ))
                .await;
            }
        }
    }
}

async fn read_loop(
    inner: &Inner,
    conn: &Arc<Conn>,
    stream: &mut SplitStream<WebSocket>,
    work: mpsc::Sender<Work>,
) {
    let mut reader = Reader {
        inner,
        conn,
        work,
        control_rate: Bucket::new(inner.settings.max_control_rate),
        event_rate: inner.settings.max_event_rate.map(Bucket::new),
    };
    loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            () = conn.closing() => break,
        };
        let Some(next) = next else { break };
        conn.touch();
        let open = match next {
            Ok(Message::Text(text)) => reader.on_text(text).await,
            Ok(Message::Binary(body)) => {
                let why = "binary frames are not supported; send CloudEvents JSON in text frames";
                reader.invalid(body, code::BINARY, Error::decode(why)).await
            }
            Ok(_) => true,
            Err(e) => {
                if is_too_large(&e) {
                    bump(&inner.counters.invalid_frames);
                    conn.reply(Control::error(
                        code::TOO_LARGE,
                        format!("message larger than {} bytes", inner.settings.max_message_size),
                    ))
                    .await;
                    conn.finish_with(CLOSE_TOO_BIG);
                }
                false
            }
        };
        if !open {
            break;
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

async fn write_loop(inner: &Inner, conn: &Conn, sink: &mut SplitSink<WebSocket, Message>) {
    let mut ping = tokio::time::interval_at(
        Instant::now() + inner.settings.ping_interval,
        inner.settings.ping_interval,
    );
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
                () = conn.silent_for(inner.settings.idle_timeout) => {
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
                if conn.idle_for() >= inner.settings.idle_timeout {
                    tracing::debug!("websocket client missed its pings; disconnecting");
                    conn.close_with(close_code::AWAY);
                    break;
                }
                let pinged = tokio::select! {
                    r = sink.send(Message::Ping(Bytes::new())) => r.is_ok(),
                    () = conn.close.cancelled() => break,
                    () = conn.silent_for(inner.settings.idle_timeout) => {
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
