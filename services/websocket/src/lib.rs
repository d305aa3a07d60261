//! WebSocket transport for WatchTower: a reconnecting client and a fan-out
//! hub for axum.
//!
//! * [`WsHub`] is the server side. Mount it in an axum router; it is a
//!   `Service<Event>` that fans events out to every connected client whose
//!   subscription matches, and hands the events clients send to a handler
//!   service of yours: two-way, real-time events between services and to
//!   browsers.
//! * [`WsClient`] is one connection to a hub that reconnects by itself. A
//!   [`WsPublisher`] (a `Service<Event>`) and [`WsSubscriber`] (a
//!   [`Subscriber`](watchtower::Subscriber)) made from it share that
//!   connection.
//!
//! # Connect
//!
//! [`WsClient::connect`] takes a [`WsConfig`] and waits for the first
//! connection ([`WsClient::lazy`] connects in the background instead). The
//! server side is a [`WsHub`], built with [`WsHub::builder`] and mounted in
//! an axum router. Both implement [`Transport`](watchtower::Transport):
//! the client's health is up when connected, degraded while (re)connecting
//! and down once closed ([details](WsClient#health)); the hub's is up while
//! it serves and down after [`WsHub::shutdown`].
//!
//! ```
//! use watchtower::prelude::*;
//! use watchtower_websocket::{WsClient, WsConfig, WsHub};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The server: a hub at /events.
//! let hub = WsHub::builder()
//!     .handler(tower::service_fn(|event: Event| async move {
//!         println!("from a client: {}", event.ty());
//!         Ok::<_, Error>(())
//!     }))
//!     .build();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("ws://{}/events", listener.local_addr()?);
//! tokio::spawn(axum::serve(listener, hub.router::<()>("/events")).into_future());
//!
//! // A client.
//! let client = WsClient::connect(WsConfig::new(url)).await?;
//! assert!(client.health().await.is_up());
//! assert!(hub.health().await.is_up());
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Publish
//!
//! [`client.publisher()`](WsClient::publisher) is a `Service<Event>` that
//! sends to the hub's handler; the hub itself is a `Service<Event>` that
//! fans out to its clients' subscriptions.
//!
//! ```no_run
//! use watchtower::prelude::*;
//! use watchtower_websocket::{WsClient, WsConfig, WsHub};
//!
//! # async fn f(hub: WsHub) -> Result<(), Error> {
//! let client = WsClient::connect(WsConfig::new("ws://127.0.0.1:3000/events").bearer("s3cret")).await?;
//! client.publisher().publish(Event::new("user.clicked", serde_json::json!({}))).await?;
//! hub.clone().publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! # Ok(()) }
//! ```
//!
//! # Subscribe
//!
//! [`client.subscriber()`](WsClient::subscriber) is a
//! [`Subscriber`](watchtower::Subscriber) of the events the hub publishes.
//!
//! ```
//! use futures_util::StreamExt as _;
//! use watchtower::prelude::*;
//! use watchtower_websocket::{WsClient, WsConfig, WsHub};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let hub = WsHub::new();
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let url = format!("ws://{}/events", listener.local_addr()?);
//! # tokio::spawn(axum::serve(listener, hub.router::<()>("/events")).into_future());
//! let client = WsClient::connect(WsConfig::new(url)).await?;
//! let mut subscription = client.subscriber().open(SubscribeOptions::new(["user.*"])?).await?;
//! hub.clone().publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! let delivery = subscription.next().await.ok_or("ended")??;
//! assert_eq!(delivery.event().map(|e| e.ty()), Some("user.created"));
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! [`WsSubscriber::CAPABILITIES`]: wildcard patterns and per-publisher order, nothing
//! more. The hub keeps no events: a client that is not connected when an
//! event is published misses it, and acknowledging, nacking or rejecting a
//! delivery does nothing. Delivery is **at most once**; nothing is lost
//! silently, though:
//!
//! * a client's publish resolves with an error carrying the event when the
//!   event was dropped from the outgoing queue
//!   ([`ErrorKind::Dropped`](watchtower::ErrorKind::Dropped), see
//!   [`Overflow`](watchtower::Overflow)), when the connection broke while it was being written
//!   ([`ErrorKind::Connection`](watchtower::ErrorKind::Connection),
//!   retryable) or when the client closed first, so a dead-letter layer
//!   (for instance into
//!   [`MemoryDeadLetters`](watchtower::dead_letter::MemoryDeadLetters)) can
//!   keep it;
//! * with [`WsConfig::acks`] a publish resolves only when the hub's handler
//!   has run, which with a retry layer makes client-to-hub delivery at least
//!   once;
//! * events the hub drops for a slow client are counted in [`HubStats`]
//!   and the client's subscriptions get an
//!   [`ErrorKind::Dropped`](watchtower::ErrorKind::Dropped) item saying how
//!   many; a dropped connection shows as an
//!   [`ErrorKind::Connection`](watchtower::ErrorKind::Connection) item;
//! * a frame from the hub that is not an event reaches every subscription
//!   of the client as a poison delivery (nothing in it says which
//!   subscription it was for);
//! * a frame from a client that is not an event is answered with an error
//!   message, counted, and with [`WsHubBuilder::poison`] handed to a
//!   dead-letter service with its raw bytes.
//!
//! # Wire protocol
//!
//! A hub speaks two subprotocols (see [`WsHub`](crate::WsHub#subprotocols)).
//! On [`SUBPROTOCOL`], `cloudevents.json`, every frame is a CloudEvent and
//! nothing else: a browser needs nothing more than
//! `new WebSocket(url + "?topic=user.*", "cloudevents.json")`, subscribing
//! with the URL's `topic` parameters. On [`CONTROL_SUBPROTOCOL`],
//! `watchtower.v1` (what [`WsClient`] speaks), the control messages below
//! travel beside the events. Every frame is a text frame holding one JSON
//! object:
//!
//! * an **event** is CloudEvents 1.0 in the JSON format (structured mode),
//!   exactly as [`watchtower::codec::structured`] writes it. It always has a
//!   `specversion` member. Its topic is its `type`, unless it carries the
//!   `wttopic` extension (written when a publisher routed the event to
//!   another topic, removed again on receipt);
//! * a **control message** has a `wt` member naming it and never a
//!   `specversion` member, so the two cannot be confused:
//!
//! | from | message | meaning |
//! |---|---|---|
//! | client | `{"wt":"subscribe","id":"1","patterns":["user.*","order.>"]}` | deliver events on matching topics; the same `id` again replaces the patterns |
//! | client | `{"wt":"unsubscribe","id":"1"}` | stop subscription `1` |
//! | client | `{"wt":"options","acks":true}` | acknowledge each event this client sends |
//! | hub | `{"wt":"subscribed","id":"1"}` / `{"wt":"unsubscribed","id":"1"}` | done |
//! | hub | `{"wt":"ack","id":"<event id>"}` | the handler accepted the event (with acks on) |
//! | hub | `{"wt":"nack","id":"<event id>","message":"..."}` | the handler failed on it (with acks on) |
//! | hub | `{"wt":"error","code":"...","message":"...","re":"...","count":n}` | something went wrong; `re` names the subscription or event |
//!
//! Error codes: `malformed` (a text frame that is neither a valid event nor
//! a known control message), `binary` (a binary frame), `unsupported` (a
//! control message only the hub sends), `invalid_pattern` (`re` is the
//! subscription), `handler` (the handler failed on event `re`, acks off),
//! `dropped` (`count` events for this client were dropped because it fell
//! behind), `limit` (a subscription over the connection's limits, `re` the
//! subscription), `rate_limited` (a control message or event over the
//! connection's rate; `re` names it), `forbidden` (the authorization hooks
//! refused the subscription or event `re`), `too_large`. With acks on, an
//! event refused as `rate_limited` or `forbidden` is answered with a `nack`
//! instead. The connection survives all of them except
//! `too_large`, after which the hub closes it with code 1009: the rest of an
//! oversized message cannot be skipped. Patterns are
//! [`TopicPattern`](watchtower::TopicPattern)s: `*` one token, `>` the rest.
//!
//! Both sides ping every 15 s by default and drop a connection they heard
//! nothing from for 45 s. The hub closes connections it shuts down with code
//! 1001, slow clients it disconnects with 1008; the client closes with 1000.
//!
//! # Features
//!
//! * `rustls-ring`: `wss://` URLs for the client, with rustls on the `ring`
//!   provider and the webpki root certificates. Without it the client speaks
//!   plain `ws://` (put TLS in a proxy in front of the hub).
#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The `messaging.system` name of the WebSocket transport.
pub(crate) const SYSTEM: &str = "websocket";

mod client;
mod hub;
mod index;
mod protocol;

pub use client::{
    ConnectionState, ResponseFuture, WsAcker, WsClient, WsConfig, WsPublisher, WsSubscriber, WsSubscription,
};
pub use hub::{HubStats, SlowClient, WsHub, WsHubBuilder};
pub use index::covers;

/// The WebSocket subprotocol of the CloudEvents WebSocket binding:
/// CloudEvents JSON (structured mode) in text frames, and nothing else. A
/// hub sends a client on this subprotocol events only, never a control
/// message; see [`WsHub`](crate::WsHub#subprotocols).
pub const SUBPROTOCOL: &str = "cloudevents.json";

/// The subprotocol with the transport's control messages besides the
/// events (subscribe, acknowledgements, errors; see the
/// [wire protocol](crate#wire-protocol)); [`WsClient`] speaks it.
pub const CONTROL_SUBPROTOCOL: &str = "watchtower.v1";

/// The frame decoder and the pattern index, for the fuzz targets in `fuzz/`.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
// A fuzz target reports a broken property by panicking.
#[allow(clippy::expect_used)]
pub mod fuzzing {
    use watchtower::TopicPattern;

    /// Classifies a text frame as the hub and the client do, then checks
    /// that what it found survives its own encoding.
    ///
    /// # Panics
    ///
    /// When a decoded event or control message does not come back the same
    /// after encoding it again.
    pub fn frame(text: &str) {
        use crate::protocol::{Frame, classify, encode};
        match classify(text) {
            Frame::Event(event) => {
                let again = encode(&event).expect("a decoded event encodes");
                match classify(&again) {
                    Frame::Event(back) => assert_eq!(back, event, "{again}"),
                    other => panic!("{again} classified as {other:?}"),
                }
            }
            Frame::Control(control) => {
                let again = control.to_text();
                match classify(&again) {
                    Frame::Control(back) => assert_eq!(back, control, "{again}"),
                    other => panic!("{again} classified as {other:?}"),
                }
            }
            Frame::Invalid(_) => {}
        }
    }

    /// Puts `patterns` in the hub's index (subscriber `i` holds pattern
    /// `i`), removes those at odd positions again, and checks that the index
    /// finds, for each topic, exactly the subscribers a linear scan with
    /// [`TopicPattern::matches`] finds.
    ///
    /// # Panics
    ///
    /// When the two disagree.
    pub fn index(patterns: &[TopicPattern], topics: &[&str]) {
        let mut index = crate::index::PatternIndex::default();
        for (i, p) in patterns.iter().enumerate() {
            index.insert(p, i as u64, &());
        }
        for (i, p) in patterns.iter().enumerate().filter(|(i, _)| i % 2 == 1) {
            index.remove(p, i as u64);
        }
        for topic in topics {
            let mut found = Vec::new();
            index.matches(topic, &mut found);
            let mut found: Vec<u64> = found.into_iter().map(|(i, ())| i).collect();
            found.sort_unstable();
            let want: Vec<u64> = patterns
                .iter()
                .enumerate()
                .filter(|(i, p)| i % 2 == 0 && p.matches(topic))
                .map(|(i, _)| i as u64)
                .collect();
            assert_eq!(found, want, "topic {topic:?} patterns {patterns:?}");
        }
    }
}

/// Everything a program using the WebSocket transport needs:
/// `use watchtower_websocket::prelude::*;`.
pub mod prelude {
    pub use crate::{SlowClient, WsClient, WsConfig, WsHub, WsPublisher, WsSubscriber};
    pub use watchtower::prelude::*;
}
