//! NATS and JetStream transport for WatchTower, on async-nats.
//!
//! | type | does | guarantee |
//! |---|---|---|
//! | [`NatsPublisher`] | publishes to core NATS subjects | at-most-once |
//! | [`NatsSubscriber`] | subjects, `*`/`>` wildcards, queue groups | at-most-once; slow-consumer drops reported |
//! | [`JetStreamPublisher`] | publishes to streams, awaits the PubAck, dedup by event id | stored once per duplicate window |
//! | [`JetStreamSubscriber`] | durable pull consumers, explicit ack/nack/term/progress | at-least-once |
//!
//! All of them are made from one [`NatsClient`] (a connection with its
//! reconnect loop, cheap to clone), and share its connection.
//!
//! # Connect
//!
//! A [`NatsConfig`] holds the servers, credentials (token, user/password,
//! nkey, credentials file), TLS, timeouts and the reconnection policy; each
//! setter documents its default. [`NatsClient::connect`] checks it and
//! connects, failing with [`ErrorKind::Config`](watchtower::ErrorKind::Config)
//! for a configuration that cannot work. The client is a
//! [`Transport`](watchtower::Transport): its `health` is a round trip to
//! the server.
//!
//! ```no_run
//! use std::time::Duration;
//! use watchtower::Transport;
//! use watchtower_nats::{NatsClient, NatsConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let config = NatsConfig::new("nats://127.0.0.1:4222")
//!     .name("billing")
//!     .request_timeout(Duration::from_secs(2));
//! let client = NatsClient::connect(config).await?;
//! assert_eq!(NatsClient::SYSTEM, "nats");
//! println!("{:?}", client.health().await.status());
//! # Ok(()) }
//! ```
//!
//! # Publish
//!
//! [`client.publisher()`](NatsClient::publisher) publishes on core NATS,
//! [`client.jetstream_publisher()`](NatsClient::jetstream_publisher) to
//! the JetStream stream that captures the subject. Both are
//! `tower::Service<Event>`s, so the layers of `watchtower-layers` and
//! tower's own stack on top of them; their `poll_ready` follows the
//! connection state. Their options are builder methods:
//! [`content_mode`](NatsPublisher::content_mode),
//! [`subject_template`](NatsPublisher::subject_template) and, on JetStream,
//! [`expected_stream`](JetStreamPublisher::expected_stream) and
//! [`max_in_flight`](JetStreamPublisher::max_in_flight).
//!
//! ```no_run
//! use std::time::Duration;
//! use watchtower::{Event, PublishExt};
//! use watchtower_nats::{NatsClient, NatsConfig, StreamConfig, SubjectTemplate};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let mut publisher = client.publisher();
//! publisher.publish(Event::new("user.created", serde_json::json!({"user_id": 1}))).await?;
//!
//! client
//!     .create_or_update_stream(StreamConfig {
//!         name: "ORDERS".into(),
//!         subjects: vec!["orders.>".into()],
//!         duplicate_window: Duration::from_secs(120),
//!         ..Default::default()
//!     })
//!     .await?;
//! let mut stored = client
//!     .jetstream_publisher()
//!     .subject_template(SubjectTemplate::new("orders.{topic}")?);
//! let receipt = stored.publish(Event::new("order.paid", serde_json::json!({"id": 7}))).await?;
//! assert_eq!(receipt.stream.as_deref(), Some("ORDERS"));
//! # Ok(()) }
//! ```
//!
//! # Subscribe
//!
//! [`client.subscriber()`](NatsClient::subscriber) subscribes to core NATS
//! subjects (a group is a queue group);
//! [`client.jetstream_subscriber(stream)`](NatsClient::jetstream_subscriber)
//! reads a stream through pull consumers, a durable one per group, set up
//! by [`ConsumerSettings`]. Both are [`watchtower::Subscriber`]s.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::service_fn;
//! use watchtower::{Event, SubscribeOptions, SubscriberExt};
//! use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let live = client
//!     .subscriber()
//!     .subscribe(["user.*"], service_fn(|event: Event| async move {
//!         println!("got {}", event.ty());
//!         Ok::<_, watchtower::Error>(())
//!     }))
//!     .await?;
//! let billing = client
//!     .jetstream_subscriber("ORDERS")
//!     .settings(ConsumerSettings::new().ack_wait(Duration::from_secs(10)).max_deliver(5))
//!     .subscribe_with(
//!         SubscribeOptions::new(["orders.>"])?.group("billing")?,
//!         service_fn(|event: Event| async move {
//!             println!("bill {}", event.id());
//!             Ok::<_, watchtower::Error>(())
//!         }),
//!     )
//!     .await?;
//! live.stop().await?;
//! billing.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * **Core NATS is at-most-once.** A receipt says the client queued the
//!   message, not that anyone received it; nothing is stored, and `nack`
//!   cannot bring an event back. A subscription read too slowly loses
//!   messages past its buffer and says so: an
//!   [`ErrorKind::Dropped`](watchtower::ErrorKind::Dropped) item with the
//!   count, and [`NatsSubscription::dropped`]. Events of one publisher
//!   arrive in the order of its calls.
//! * **JetStream is at-least-once.** A receipt comes with the stream's
//!   PubAck (stream name and sequence). The `Nats-Msg-Id` header carries the
//!   event id, so a publish retried within the stream's duplicate window is
//!   stored once ([`Receipt::duplicate`](watchtower::Receipt::duplicate)).
//!   A delivery is redelivered until it is settled: `ack`, `nack` with an
//!   optional delay, `reject` (`+TERM`), `progress` (`+WPI`); a stopped
//!   group member's unsettled events go to the others.
//! * **While the connection is down** publishers are not ready and wait
//!   for it, or fail at once with a retryable error
//!   ([`WhenDisconnected`]); the client reconnects by itself with an
//!   exponential backoff, and JetStream subscriptions resume.
//! * **Every event is accounted for**: published, or its caller gets an
//!   error; a received message that is not a CloudEvent is a
//!   [poison](watchtower::Delivery::poison) delivery with its raw bytes.
//!
//! # Request–reply
//!
//! [`client.requester()`](NatsClient::requester) makes a
//! [`NatsRequester`], a `Service<Event, Response = Event>` over NATS
//! inboxes: one wildcard subscription per requester, a reply subject per
//! request, and the server's no-responders answer turned into an
//! immediate, typed error
//! ([`NoResponders`](watchtower::request::NoResponders)). A received
//! message's reply subject becomes the event's
//! [`replyto`](watchtower::ext::REPLY_TO) extension (unless it has one),
//! so the toolkit's `Responder` answers requests from a `NatsRequester`
//! and from any NATS client's `request` alike.
//!
//! # Scaling out: a NATS cluster
//!
//! Give the client several servers of a cluster
//! ([`NatsConfig::server`]): it connects to one, learns the others from
//! it, and moves to another when its server goes away. Core NATS
//! subscribers on one server receive what publishers on any other publish
//! (interest crosses the routes within milliseconds; a message published
//! before that reaches nobody, as always in core NATS). A JetStream stream
//! with `num_replicas: 3` ([`StreamConfig`]) keeps each event on three
//! servers, acknowledged once a majority stored it; one stream, one
//! leader, so its events stay in one order. Partitioning means one stream
//! per subject space; a stream does not spread over servers.
//!
//! What a server's death costs, measured by the cluster tests
//! (`tests/nats/cluster.rs`, three local servers, 10,000 events through
//! retry and dead letter, 256 in flight, the stream's leader killed after
//! 3,000 and restarted after 6,000): nothing lost, nothing stored twice,
//! nothing dead-lettered, every event consumed; publishing stalled for
//! 2 to 3 s while the replicas elected a new leader. In that window the
//! server answers a publish at once with "no responders", which this
//! transport reports as a retryable
//! [`Rejected`](watchtower::ErrorKind::Rejected): bound retries by time
//! (`max_elapsed` of several seconds), not by a count that fast answers use
//! up. A retried publish whose first acknowledgement was lost is caught by
//! `Nats-Msg-Id` (the receipt says [`duplicate`](watchtower::Receipt::duplicate)).
//! A consumer's pull request is lost when the consumer's leader moves: on a
//! cluster, set [`ConsumerSettings::expires`] to a second or two so that a
//! lost pull is renewed soon rather than after the default 30 s.
//! `scripts/cluster-up nats` starts such a cluster to try.
//!
//! Throughput beside a single server in the same run
//! (`cargo bench -p watchtower-nats --bench cluster`: 50,000 JetStream
//! events to a file stream, 256 callers, one round on two busy cores):
//! three replicas cost publishing 0.42× (41,000 against 17,000 events/s:
//! each event is stored on a majority before its acknowledgement) and
//! consuming 0.50× (60,000 against 30,000 events/s).
//!
//! # Wire format
//!
//! Publishers write CloudEvents in one of two [`ContentMode`]s, set with
//! [`NatsPublisher::content_mode`] and [`JetStreamPublisher::content_mode`]:
//!
//! * [`ContentMode::Structured`] (the default): the whole event as one
//!   CloudEvents JSON object in the body, a JSON payload spliced in as is
//!   (`"data"`), any other payload as `"data_base64"`. No header at all on
//!   core NATS; on JetStream only `Nats-Msg-Id` (the event id, for
//!   deduplication) and `Nats-Expected-Stream` when set.
//! * [`ContentMode::Binary`]: attributes as `ce-` headers (`ce-id`,
//!   `ce-type`, `ce-source`, `ce-time`, `ce-datacontenttype`, extensions as
//!   `ce-<name>`), the payload alone as the body.
//!
//! Subscribers read both, whatever the publisher: `ce-` headers mean binary
//! mode; a `Content-Type: application/cloudevents+json` header, or no such
//! header and a body that starts with `{`, means structured mode. A message
//! that is neither is a [poison](watchtower::Delivery::poison) delivery,
//! with its raw bytes.
//!
//! Structured mode is the default because:
//!
//! * it is the NATS binding's original mode (up to v1.0.1 of the
//!   CloudEvents NATS protocol binding the only one, before NATS had
//!   headers), and what the CloudEvents Go SDK's core NATS protocol sends
//!   (a bare JSON body, no header); its JetStream protocol reads a message
//!   without `ce-specversion` header as structured, so both read these
//!   events;
//! * async-nats keeps headers in a hash map of `String`s: every header
//!   costs allocations to build, to write and, on the receiving side, to
//!   parse, whereas a structured event is one buffer. Measured on the local
//!   broker with 50,000 events of ~195 bytes, as throughput relative to
//!   raw async-nats sending a pre-built body without header in the same
//!   run (`scripts/bench`: `cargo bench -p watchtower-nats`, three rounds,
//!   median of the per-round ratios; 2-core machine shared with the
//!   server, load average about 2, where single rounds ranged from 0.7
//!   to 1.3 times these ratios):
//!
//! | case | raw msgs/s | publisher, structured | publisher, binary | 4-layer stack, structured | 4-layer stack, binary |
//! |---|--:|--:|--:|--:|--:|
//! | core publish | 1.23 M | 0.85 | 0.12 | 0.57 | 0.10 |
//! | JetStream publish, 1,024 in flight | 141 k | 0.61 | 0.61 | 0.54 | 0.48 |
//! | JetStream publish, [`deduplicate`](JetStreamPublisher::deduplicate)`(false)` | 141 k | 0.93 | – | 0.79 | – |
//! | JetStream consume, each message acked (subscriber through `serve`) | 140 k | 0.81 | – | – | – |
//! | publish → handler round trip (through `serve`) | 691 k | 0.58 | 0.26 | – | – |
//!
//! Throughput swings with the machine's load; CPU time per message over
//! the timed section is steadier, the bench process's (all its threads)
//! and the broker's, read from `/proc` beside each side.
//! Core publish: raw 0.80 µs (the broker 0.43), raw with one header 2.3,
//! raw with eight `ce-` headers 7.7; the publisher 1.2 structured (its
//! bodies share blocks of memory, so neither encoding nor the connection's
//! writer allocates or frees one per event), 7.6 binary; the stack 2.1.
//! JetStream publish: the broker stores a stream's messages one after
//! another, and its CPU time per message is the inverse of the rate on
//! every side: 7.0 µs for raw's bare bodies (141 k/s), 10.7 with only
//! `Nats-Msg-Id` (95 k/s), 13.2 with the `ce-` block as well (71 k/s),
//! 11.8 for the publisher's structured events (90 k/s), 7.6 for them
//! without the dedup id (136 k/s). The client spends 4.4 µs raw, 7.2 raw
//! with `Nats-Msg-Id`, 7.2 for the publisher, 5.0 without the dedup id:
//! the header's cost is the broker's, and no client can publish a header
//! to JetStream faster than the broker stores it (in a separate run a
//! header of another name cost the broker 6.9 µs against 6.1 without a
//! header and 7.8 with `Nats-Msg-Id`: about half is carrying a header,
//! half tracking duplicates). The dedup id is on by default,
//! because it is what makes a retried publish safe;
//! [`JetStreamPublisher::deduplicate`]`(false)` leaves it out, and a
//! structured event then goes out as a bare body, as the raw client's.
//! The publisher does not go through async-nats's JetStream context, which
//! makes an inbox string, a timer and a boxed future for every publish and
//! reads each acknowledgement into an untagged enum: its publishes reply
//! to one inbox per connection (`<inbox>.<token>`), a queue of waiting
//! callers indexed by token matches answers to callers, and one task reads
//! the answers, expires the callers that waited past the
//! [request timeout](NatsConfig::request_timeout) and fails the waiting
//! ones at once when the connection drops (their answers are lost with
//! it).
//! JetStream consume (a new pull consumer reading 50,000 stored events,
//! each acknowledged): raw async-nats's pull stream 3.0 µs per message
//! (the broker 8.0), raw reading messages that carry `Nats-Msg-Id` 4.6
//! (9.4) at 0.82 of raw's rate, the subscriber through `serve` 3.8 (11.7)
//! at 0.81: the header costs both sides alike.
//! Subscriptions pull with a request loop of their own: async-nats's pull
//! stream counts a request only once it is handed to the connection, so
//! messages answering it before that are lost to the count, and a reader
//! as fast as the server stopped until a request expired (30 s by
//! default; one run in about twenty of 2,000 events on this machine);
//! here a request is owed from the moment it is made, settlements are
//! published to the message's reply subject without a JetStream context
//! per message.
//! Round trip: raw 1.5 µs (the broker 1.1), structured 2.9 (1.5), binary
//! 8.0 (2.3), the raw client publishing into `serve` 2.5 (1.2); latency
//! from publish to handler at p99 69 ms structured against raw's 22 ms in
//! this run (20.5 against 23.4 in the one before): the consumer, which
//! decodes and dispatches every event, keeps 0.6–0.9 of the raw loop's
//! pace with the raw client publishing, and falls behind a publisher that
//! does not wait, so events queue. In process: a structured event encodes
//! in 0.12 µs and decodes in 0.38 µs (the envelope encoders write is read
//! by hand, repeated `type`, `source` and `datacontenttype` strings are
//! shared, and any other JSON goes through `serde_json`); an async-nats
//! header map of eight entries takes 1.2 µs to build, 0.56 µs to clone.
//!
//! Under `watchtower-layers`' backpressure layer, set
//! `BackpressureLayer::direct(true)` over these publishers: they hand their
//! work to the connection's task already, and without it each event makes
//! a round trip through the layer's worker task (8.5 µs CPU per event
//! when each publish is awaited before the next, against 2.1 µs with it).
//!
//! Binary mode remains for consumers that route or filter on headers
//! without reading bodies. Its header names are built once; the headers
//! that repeat between a publisher's events (`ce-specversion`, `ce-type`,
//! `ce-source`, `ce-datacontenttype`) are copied from a ready map; each
//! header still costs async-nats a `Vec` and a `String`, which is the
//! least its `HeaderMap` allows.
//!

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod client;
mod config;
mod jetstream;
mod publisher;
mod request;
mod subject;
mod subscriber;
mod wire;

pub use async_nats;
pub use client::{ConnectionStats, NatsClient};
pub use config::{NatsConfig, WhenDisconnected};
pub use jetstream::{
    ConsumerConfig, ConsumerSettings, JetStreamAcker, JetStreamPublisher, JetStreamSubscriber,
    JetStreamSubscription, StorageType, StreamConfig, StreamInfo,
};
pub use publisher::{NatsPublisher, ResponseFuture};
pub use request::NatsRequester;
pub use subject::SubjectTemplate;
pub use subscriber::{NatsAcker, NatsSubscriber, NatsSubscription};
pub use wire::ContentMode;

/// Everything a program using the NATS transport needs:
/// `use watchtower_nats::prelude::*;` (the core's prelude included).
pub mod prelude {
    pub use crate::{
        ConsumerSettings, JetStreamPublisher, JetStreamSubscriber, NatsClient, NatsConfig, NatsPublisher,
        NatsSubscriber, SubjectTemplate, WhenDisconnected,
    };
    pub use watchtower::prelude::*;
}
