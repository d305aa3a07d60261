//! The hub's builder, its settings and its counters.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::Service;
use watchtower::{BoxError, Event, TopicPattern};

use super::{AuthFn, Counters, Handler, Identity, Inner, PublishHook, SubscribeHook, WsHub, boxed};
use crate::index::PatternIndex;

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
pub(super) struct Settings {
    pub(super) relay: bool,
    pub(super) outbound_capacity: usize,
    pub(super) inbound_capacity: usize,
    pub(super) slow_client: SlowClient,
    pub(super) max_message_size: usize,
    pub(super) ping_interval: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) max_subscriptions: usize,
    pub(super) max_patterns: usize,
    pub(super) max_pattern_len: usize,
    pub(super) max_control_rate: u32,
    pub(super) max_event_rate: Option<u32>,
    pub(super) allowed_origins: Option<Vec<String>>,
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

impl WsHubBuilder {
    pub(super) fn new() -> WsHubBuilder {
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
    /// binary frames), wrapped by [`Poison::into_event`](watchtower::Poison::into_event) with the raw bytes
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
    /// may be read, for which [`covers`](crate::covers) is made. A refused pattern refuses
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
    /// Events received from clients, those refused for a rate or by
    /// [`can_publish`](WsHubBuilder::can_publish) included.
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
