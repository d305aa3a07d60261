//! RabbitMQ transport for WatchTower, on [`lapin`].
//!
//! # Connect
//!
//! [`RabbitConfig`] is plain data: where the broker is, how to log in,
//! which exchange to use (a durable topic exchange named `watchtower`
//! unless set). Its setters never fail and document their defaults;
//! [`RabbitClient::connect`] checks it once (a bad URL or name is an
//! [`ErrorKind::Config`](watchtower::ErrorKind::Config) error, never with
//! the password in it), connects and declares the exchange. The client is
//! cheap to clone and keeps its connection healthy: failures are detected
//! (error events, heartbeats, broker-closed connections), the connection
//! is re-opened with [backoff](watchtower::backoff) and the topology
//! declared again. Its [`Transport::health`](watchtower::Transport::health)
//! is up while connected, degraded while reconnecting (with the last
//! failure) and down once closed.
//!
//! ```no_run
//! use watchtower::Transport as _;
//! use watchtower_rabbitmq::{ExchangeKind, RabbitClient, RabbitConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .exchange("orders", ExchangeKind::Topic)
//!     .connection_name("checkout");
//! let client = RabbitClient::connect(config).await?;
//! assert!(client.health().await.is_up());
//! # Ok(()) }
//! ```
//!
//! # Publish
//!
//! [`client.publisher()`](RabbitClient::publisher) (or
//! [`publisher_with`](RabbitClient::publisher_with) and
//! [`PublishOptions`]) makes a [`RabbitPublisher`], a
//! `tower::Service<Event>` on a connection of its own: events go to the
//! exchange with the event's topic as routing key, persistent,
//! `mandatory`, and the call resolves on the broker's publisher confirm.
//! A publisher channel the broker closes is replaced on the same
//! connection, without disturbing the publisher's other channels.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use watchtower::{Event, PublishExt};
//! use watchtower_rabbitmq::{RabbitClient, RabbitConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = RabbitClient::connect(RabbitConfig::local()).await?;
//! let mut publisher = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(5))
//!     .service(client.publisher().await?);
//! publisher.publish(Event::new("order.placed", serde_json::json!({"order": 7}))).await?;
//! # Ok(()) }
//! ```
//!
//! # Subscribe
//!
//! [`client.subscriber()`](RabbitClient::subscriber) (or
//! [`subscriber_with`](RabbitClient::subscriber_with) and
//! [`QueueOptions`]) makes a [`RabbitSubscriber`], a
//! [`watchtower::Subscriber`] on the client's connection: queues and
//! bindings declared from the options (quorum queues, delivery limit,
//! dead-letter exchange, TTL, max length), prefetch as the backpressure
//! bound, consumer groups as shared durable queues, batched `multiple`
//! acks.
//!
//! ```no_run
//! use tower::service_fn;
//! use watchtower::{Event, SubscriberExt};
//! use watchtower_rabbitmq::{RabbitClient, RabbitConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = RabbitClient::connect(RabbitConfig::local()).await?;
//! let handle = client
//!     .subscriber()
//!     .subscribe(["order.*"], service_fn(|event: Event| async move {
//!         println!("{} {}", event.ty(), event.id());
//!         Ok::<_, watchtower::Error>(())
//!     }))
//!     .await?;
//! # handle.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * A publish resolves `Ok` only once the broker confirmed the event
//!   (for a persistent event on a durable queue: written to disk).
//!   Unroutable events come back as
//!   [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected) errors, or,
//!   faster, are kept by an
//!   [alternate exchange](RabbitConfig::alternate_exchange); a broker nack
//!   is a retryable `Rejected` error; a connection or channel lost before
//!   the confirm is a retryable
//!   [`ErrorKind::Connection`](watchtower::ErrorKind::Connection) error,
//!   and a retry can duplicate the event (at-least-once; see
//!   [duplicates](RabbitPublisher#duplicates)).
//! * A delivery is acknowledged only after its handler finished; a nack
//!   requeues it, a reject dead-letters it (to the queue's dead-letter
//!   exchange), an unsettled one dropped or on a lost connection is
//!   redelivered by the broker.
//! * Ordering: per queue with one consumer; concurrent publishes on
//!   several channels may be reordered.
//! * A subscription whose connection fails yields one `Connection` error,
//!   waits for the connection to come back, declares its queue and
//!   bindings again and resumes.
//!
//! # More than one node
//!
//! [`RabbitConfig::node`] adds nodes that a connection tries, in order,
//! when the URL's node does not answer: the nodes of a cluster, or a
//! standby broker. On every reconnection the publisher and the
//! subscriptions start again from the URL's node, declare the exchange and
//! their queues there, and go on. A queue lives on the node that declared
//! it (a quorum queue of a cluster on a majority of its nodes), so on two
//! independent brokers each keeps what was confirmed to it. Measured by
//! `tests/failover.rs` (two private nodes, 2,000 events through retry and
//! dead letter, 64 in flight, the first node stopped after 700 and started
//! again after the run): every event confirmed and consumed, none
//! dead-lettered, the publisher on the second node within tens of
//! milliseconds; deliveries the first node had sent and not yet seen
//! acknowledged (about 250) came again once it was back.
//!
//! On a cluster, [`QueueOptions::quorum`] makes group queues quorum
//! queues: replicated on a majority of the nodes, served by one leader,
//! so order holds per queue and a queue survives the loss of a minority of
//! its nodes; scale out by more queues (groups), each led by the node
//! that declared it. Measured by `tests/cluster.rs` (a private 3-node
//! cluster, 20–35 s to start on two busy cores; 10,000 events through
//! retry and dead letter, 64 in flight, every node in the publisher's and
//! the consumer's configuration; after 3,000 the node leading the queue,
//! which both connections use, killed with SIGKILL): every event confirmed
//! and consumed, none dead-lettered, the first publish made after the kill
//! confirmed 0.2 to 0.7 s later (the longest publishing stall), and 62
//! to 255 events consumed twice (deliveries unacknowledged on the dead
//! node, publishes retried after a lost confirm). RabbitMQ 3.10 can go on
//! nacking every publish of a channel opened while the queue's leader
//! moved (thousands of nacks over minutes, while a new channel was
//! confirmed at once), so the publisher replaces a channel the broker
//! nacks a publish on, and the retry goes out on the new one.
//!
//! # Wire format
//!
//! CloudEvents over AMQP 0-9-1, in either [`ContentMode`], chosen with
//! [`PublishOptions::content_mode`]:
//!
//! | CloudEvents | [`Binary`](ContentMode::Binary) (default) | [`Structured`](ContentMode::Structured) |
//! |---|---|---|
//! | every attribute, extensions | headers `cloudEvents_<attr>` (long strings) | in the JSON body |
//! | `datacontenttype` | the `content-type` property | in the JSON body |
//! | `content-type` property | `datacontenttype` | `application/cloudevents+json` |
//! | data | the body | the body's `"data"` (JSON spliced in as is) or `"data_base64"` |
//! | `id` | also the `message-id` property | also the `message-id` property |
//! | `time` | also the `timestamp` property (seconds) | also the `timestamp` property |
//!
//! A subscriber reads both, whatever the publisher's mode: a message whose
//! `content-type` is `application/cloudevents+json` is structured, any
//! other is binary. A message that is neither is a poison message:
//! the consumer runtime hands it, raw, to its poison path and rejects it.
//! Messages the broker dead-lettered carry their `x-death` reason into the
//! event's `deadletterreason`, `deadletterkind` and `deadlettertopic`
//! extensions.
//!
//! ## Why binary mode is the default
//!
//! * Cost: in the crate's benchmark, binary mode published faster than
//!   structured mode in every round of the latest run (0.88 to 1.08 times
//!   raw lapin against 0.68 to 0.84, same run, both with `mandatory`; run B
//!   of the table), and
//!   cost the broker, which sets the pace, less CPU per event (73 µs
//!   against 82): see the table in the [publisher docs](RabbitPublisher#performance).
//!   Structured mode saves the processes a few µs per event (a consumer
//!   under `serve` spends 9 µs per structured event, 15 per binary one),
//!   but consuming runs at the same pace in both modes, 2 to 3.3 times raw
//!   lapin acknowledging singly.
//! * Foreign clients: CloudEvents defines no binding for AMQP 0-9-1. Its
//!   AMQP binding is for AMQP 1.0, where binary mode puts attributes in
//!   application properties named `cloudEvents_<attr>`: what binary mode
//!   writes as headers, and what RabbitMQ 4 hands AMQP 1.0 consumers as
//!   application properties. Binary mode also leaves the bare payload as
//!   the body for clients that know nothing of CloudEvents, and is the
//!   mode [headers exchanges](ExchangeKind::Headers) route on.
//! * Structured mode stays one option away, for consumers that read the
//!   CloudEvents JSON format (every CloudEvents SDK does) but not AMQP
//!   headers.
//!
//! ## Mandatory and the alternate exchange
//!
//! An event no binding routes is dropped by the broker, which confirms it
//! all the same. Two ways keep it from being lost:
//!
//! * `mandatory` (the default without an alternate exchange): the broker
//!   returns the event, and its caller gets an
//!   [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected) error
//!   carrying it. lapin hands a returned message to whichever confirm of
//!   the channel it completes next, not to its own, so each channel's
//!   confirms go through one task that matches returns to events by id,
//!   and answers a batch of confirms only once every return that can
//!   belong to it is in hand: after a `basic.qos` round trip on the
//!   channel, which also batches the answers (see
//!   [`PublishOptions::mandatory`]). The task costs the process 2 to 4 µs
//!   of CPU per event.
//! * an [alternate exchange](RabbitConfig::alternate_exchange): the
//!   broker keeps the event in the alternate exchange's queue and confirms
//!   it there; `mandatory` is then off unless set, and each caller waits
//!   for its own confirm, as raw lapin does. Nothing comes back, so
//!   nothing needs matching: the fast and safe mode, for exchanges this
//!   crate declares (an existing exchange gets one from a broker policy,
//!   with [`PublishOptions::mandatory`] off).
//!
//! Publishing 50,000 persistent events, confirms, 1,024 in flight, on a
//! 2-core machine shared with the broker and other builds; ratio to raw
//! lapin in the same run, per round, median (range):
//!
//! | binary mode | publisher alone | four layers + publisher |
//! |---|--:|--:|
//! | `mandatory` (default), three runs of three rounds | 1.02 (0.98–1.09), 1.07 (0.93–1.20), 0.95 (0.80–1.42) | 1.03 (0.99–1.18), 1.11 (0.90–1.32), 0.79 (0.78–1.44) |
//! | alternate exchange, runs of four and three rounds | 1.07 (0.84–1.09), 1.11 (0.79–1.23) | 1.06 (0.83–1.13), 0.90 (0.83–1.02) |
//!
//! Whole rounds swing together by ±30 % on this machine (in the third
//! run's last round every contender measured 0.78 to 0.83, in its second
//! 1.02 to 1.44), so a single run's median moves by a tenth or more.
//!
//! The broker spent 66 to 69 µs of CPU per event with `mandatory`, 61 to
//! 72 with the alternate exchange (raw lapin: 60 to 66). `mandatory` stays
//! the default because it needs nothing set up to lose nothing, and keeps
//! pace with raw lapin; the alternate exchange saves the task's CPU and
//! some of the broker's. A local fence in place of the `basic.qos` round
//! trip was measured and left out: it answered confirms one by one and
//! was slower (see the publisher docs' table).
//!
//!
//! # Delayed delivery
//!
//! An event with a [delivery time](watchtower::delay) still ahead
//! (`delay::set_delay`, `delay::set_deliver_at`) is not published to the
//! exchange but to a delay queue, through the default exchange. The queue holds messages for a fixed time (`x-message-ttl`)
//! and then dead-letters them to the exchange (`x-dead-letter-exchange`)
//! with the event's topic as the routing key
//! (`x-dead-letter-routing-key`), where the bindings route them as if they
//! had just been published, without the `deliverat` extension. The broker
//! keeps the promise: the queue is durable and the messages persistent
//! (unless [`PublishOptions::persistent`] is off), so a delayed event
//! survives a broker restart and a publisher or consumer that is gone
//! meanwhile.
//!
//! **Why one queue per delay bucket, not a per-message `expiration`.** A
//! RabbitMQ queue expires messages only at its head: a message with a
//! one-hour expiration in front of one with a one-second expiration holds
//! the second back for an hour. In a queue whose messages all have the
//! same TTL, the head is always the first to expire, so every message
//! leaves on time. Each distinct delay would need its own queue, so delays
//! are rounded *up* (never early) to a bucket: exact milliseconds below
//! 32 ms, above that to 5 significant bits (16 buckets per doubling), so
//! an event is held at most 1/16 (6.25 %) longer than asked, and the
//! delays from 1 ms to 24 days use at most about 400 queues per topic.
//!
//! A delay queue is named after the exchange, the bucket and the topic
//! (`watchtower.delay.<exchange>.<bucket>ms.<topic>`, or a hash of the
//! exchange and topic when that is longer than AMQP's 255 bytes). The
//! publisher declares it once and remembers it; it declares it again at
//! most once a minute while using it, since the queue goes away after
//! `x-expires` (its TTL plus three minutes) without a declaration, so
//! that buckets no longer used do not stay on the broker. A message is
//! always published within a minute of the last declaration and expires
//! within its TTL, before the queue can.
//!
//! The delayed publish is `mandatory` and confirmed like any other: its
//! caller's `Ok` means the broker stored it in the delay queue. What
//! happens at the due time is the broker's dead-lettering: a routing key
//! with no binding then drops the event (the publish cannot be told any
//! more), and a classic queue dead-letters at most once (a broker crash at
//! that instant can lose it).
//!
//! The names of the delay queues a publisher declared are in
//! [`RabbitPublisher::delay_queues`]. A consumer's delayed
//! [`nack`](RabbitAcker) does not use them: it holds the message and nacks
//! it after the delay. A copy through a delay queue would have to
//! dead-letter into the consumer's own queue (through the exchange it
//! would reach every other group bound to the topic again), be published
//! and confirmed before the original is acked, and would lose the
//! broker's redelivery count and the quorum queue's delivery limit.
//!
//! # Request–reply
//!
//! [`client.requester()`](RabbitClient::requester) makes a
//! [`RabbitRequester`], a `Service<Event, Response = Event>` over direct
//! reply-to (`amq.rabbitmq.reply-to`): no reply queue to declare or clean
//! up. A received request's `reply_to` becomes its
//! [`replyto`](watchtower::ext::REPLY_TO) extension and a
//! [`RabbitPublisher`] sends an event whose topic is a direct reply-to
//! address to the default exchange, so the toolkit's `Responder` answers
//! as on any transport; a reply's `correlationid` extension (the
//! request's event id) is also its `correlation_id` property, so an AMQP
//! requester of another library matches replies when it sends the event
//! id as the request's `correlation_id`.
//!

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod ack;
mod client;
mod config;
mod confirms;
mod connection;
mod publisher;
mod request;
mod subscriber;
mod wire;

pub use client::{HealthChanges, RabbitClient};
pub use config::{ContentMode, ExchangeKind, PublishOptions, QueueOptions, QueueOverflow, RabbitConfig};
pub use publisher::{RabbitBatchPublisher, RabbitPublisher, ResponseFuture};
pub use request::RabbitRequester;
pub use subscriber::{RabbitAcker, RabbitSubscriber, RabbitSubscription};

/// The lapin crate, for [`FieldTable`](lapin::types::FieldTable) binding
/// arguments and raw access.
pub use lapin;

/// Everything a program using the RabbitMQ transport needs:
/// `use watchtower_rabbitmq::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ExchangeKind, PublishOptions, QueueOptions, RabbitClient, RabbitConfig, RabbitPublisher,
        RabbitSubscriber,
    };
    pub use watchtower::prelude::*;
}
