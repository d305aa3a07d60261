//! Redis Streams for WatchTower: publish with `XADD`, consume through
//! consumer groups with batched `XACK`, reclaim what crashed consumers left
//! with `XAUTOCLAIM`.
//!
//! # Connect
//!
//! A [`RedisConfig`] says where Redis is (`redis://`, or `rediss://` for
//! TLS) and how topics map to stream keys; [`RedisClient::connect`] checks
//! it once and opens the connection that publishers and subscribers made
//! from the client share. [`RedisClient`] is cheap to clone and implements
//! [`Transport`](watchtower::Transport): `client.health()` is a `PING`
//! round trip.
//!
//! ```no_run
//! use std::time::Duration;
//! use watchtower::Transport;
//! use watchtower_redis::{RedisClient, RedisConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let config = RedisConfig::new("redis://127.0.0.1:6379")
//!     .response_timeout(Duration::from_secs(2))
//!     .stream_prefix("events:");
//! let client = RedisClient::connect(config).await?;
//! println!("{:?}", client.health().await.status());
//! # Ok(()) }
//! ```
//!
//! # Publish
//!
//! [`client.publisher()`](RedisClient::publisher) (or
//! [`publisher_with`](RedisClient::publisher_with) and
//! [`RedisPublisherOptions`] for trimming, content mode, queue size) makes
//! a [`RedisPublisher`], a `tower::Service<Event>`: one stream per topic,
//! optional `MAXLEN` trimming, a [`Receipt`](watchtower::Receipt) with the
//! entry id. Concurrent calls are gathered into batches of `XADD`s on the
//! publisher's own connection, each caller answered with its own entry id
//! or its own error (see [Batching](RedisPublisher#batching)).
//!
//! ```no_run
//! use watchtower::{Event, PublishExt};
//! use watchtower_redis::{MaxLen, RedisClient, RedisConfig, RedisPublisherOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = RedisClient::connect(RedisConfig::default()).await?;
//! let mut publisher = client.publisher();
//! let receipt = publisher
//!     .publish(Event::new("user.created", serde_json::json!({"user_id": 123})))
//!     .await?;
//! println!("stored as entry {:?}", receipt.message_id);
//!
//! let trimmed = client.publisher_with(RedisPublisherOptions::new().max_len(MaxLen::Approx(100_000)))?;
//! # drop(trimmed);
//! # Ok(()) }
//! ```
//!
//! # Subscribe
//!
//! [`client.subscriber()`](RedisClient::subscriber) (or
//! [`subscriber_with`](RedisClient::subscriber_with) and
//! [`RedisSubscriberOptions`] for the consumer name, batch size, claim
//! times, dead-lettering) makes a [`RedisSubscriber`], a
//! [`watchtower::Subscriber`]: consumer groups, redelivery with rising
//! delivery counts, reclaiming, patterns resolved against existing
//! streams.
//!
//! ```no_run
//! use tower::service_fn;
//! use watchtower::{Event, SubscribeOptions, SubscriberExt};
//! use watchtower_redis::{RedisClient, RedisConfig, RedisSubscriberOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = RedisClient::connect(RedisConfig::default()).await?;
//! let subscriber = client.subscriber_with(RedisSubscriberOptions::new().consumer("billing-1"))?;
//! let handle = subscriber
//!     .subscribe_with(
//!         SubscribeOptions::new(["user.created"])?.group("billing")?,
//!         service_fn(|event: Event| async move {
//!             println!("received {}", event.id());
//!             Ok::<_, watchtower::Error>(())
//!         }),
//!     )
//!     .await?;
//! handle.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * **Publishing**: a caller answered `Ok` has its event stored under the
//!   entry id in its receipt. A caller told
//!   [`Timeout`](watchtower::ErrorKind::Timeout) or
//!   [`Connection`](watchtower::ErrorKind::Connection) cannot know whether
//!   it was stored; Redis Streams does not deduplicate, so a retry may
//!   store it twice (see [Duplicates](RedisPublisher#duplicates)). A call
//!   whose caller stopped waiting before it was sent is not sent.
//! * **Consuming**: at least once. An entry stays pending in its group
//!   until it is acknowledged; one a consumer dropped or crashed with is
//!   reclaimed after the [claim idle time](RedisSubscriberOptions::claim_idle)
//!   and delivered again with a higher delivery count; after
//!   [`max_deliveries`](RedisSubscriberOptions::max_deliveries) it goes to
//!   the [`DeadLetter`] path. Entries of one stream are delivered in stream
//!   order (redeliveries aside).
//! * **Loss**: only through trimming ([`MaxLen`]), which deletes entries
//!   whether or not they were read; the subscriber counts what it finds
//!   trimmed ([`RedisSubscription::trimmed`]). An entry that does not
//!   decode reaches the consumer as a
//!   [`Delivery::poison`](watchtower::Delivery::poison) with its raw
//!   fields.
//! * **Received events** carry the topic they were published to, and spans
//!   and deliveries carry `messaging.system = "redis"`.
//!
//! # Redis Cluster
//!
//! [`RedisConfig::cluster`] takes the URLs of some nodes of a Redis
//! Cluster. Topics are partitioned over the masters by hash slot: each
//! topic's stream key carries the topic as a hash tag, `prefix{topic}`, so
//! that the topic's stream and its dead-letter stream
//! (`watchtower:dead-letter{topic}`, the dead-letter stream name plus the
//! tag) live on one slot, and an entry moves to its dead letters and is
//! acknowledged in one transaction, as on a single Redis. Order holds per
//! topic (one stream), not across topics.
//!
//! How it is built: the connection shared by publishers and subscribers is
//! the `redis` crate's cluster connection, which keeps the slot map and a
//! connection per master, follows `MOVED` and `ASK`, and learns the new
//! master after a failover. A pipeline that spans slots (a publisher's
//! batch of `XADD`s, a subscriber's batch of `XACK`s) is split into one
//! pipeline per slot, sent at once, the replies put back in order. A
//! subscription reads each stream with its own `XREADGROUP` on a cluster
//! connection of its own (one read cannot span slots, and a blocking read
//! holds its connection); patterns are resolved with `SCAN` on every
//! master. The publisher's own pipelined connection, which makes a single
//! Redis fast, is used only for a single Redis: the cluster path goes
//! through the `redis` crate, so the single-node path keeps its speed
//! untouched.
//!
//! What a master's death costs, measured by the cluster tests
//! (`tests/cluster.rs`, three masters with one replica each, a node timeout
//! of 1 s, 10,000 events over four topics through retry and dead letter,
//! 256 in flight, the master of one topic killed after 3,000): every call
//! delivered, none dead-lettered, every event consumed, publishing stalled
//! for about 3 s until the replica took over, and 130 to 190 events
//! delivered twice to the consumer (acknowledgements lost with the master
//! come back after the claim idle time). Redis replicates asynchronously:
//! an entry acknowledged by a master in its last moments can be lost with
//! it (none was, in these runs). A publisher that cannot afford that asks
//! for [`RedisPublisherOptions::wait_for_replicas`]: each master's share of
//! a batch is followed by `WAIT n timeout` on the same connection, and a
//! caller hears of its event only once `n` replicas have it, or gets a
//! retryable [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout) whose
//! source is a [`ReplicasNotAcknowledged`] (the event is on the master;
//! `tests/replicas.rs` checks both, on a cluster and on a master with one
//! replica). It costs a round trip to a replica per batch: 400 events
//! over eight topics, 64 at once, on the 3-master cluster took 18 ms
//! waiting for one replica against 13 ms without (1.4×, one debug-build
//! run on a busy machine; the test prints it). `WAIT` does not make Redis
//! strongly consistent: a failover
//! may still promote a replica that missed a write. For that, a broker
//! that replicates before it acknowledges (JetStream, RabbitMQ quorum
//! queues). `scripts/cluster-up redis` starts such a cluster to try.
//!
//! Delayed events (a [`deliverat`](watchtower::ext::DELIVER_AT) in the
//! future) wait in a sorted set beside their stream,
//! `prefix{topic}#delayed`, on the stream's slot, so the script that moves
//! them when due touches one slot only; an index of the streams with
//! delayed events (`prefix#delayed-streams`) tells every publisher's mover
//! where to look (`tests/cluster.rs`: 240 events over eight topics on
//! three masters, each delivered once, none early).
//!
//! Throughput beside a single Redis in the same run
//! (`cargo bench -p watchtower-redis --bench cluster`: 50,000 events over
//! eight topics, 256 callers, one round on two busy cores): publishing
//! 0.44× (136,000 against 60,000 events/s: the single Redis gets the
//! publisher's own connection, the cluster the `redis` crate's), consuming
//! 1.57× (69,000 against 109,000 events/s: eight streams read at once on
//! three masters).
//!
//! # Wire format
//!
//! Both CloudEvents content modes, chosen per publisher with
//! [`RedisPublisherOptions::content_mode`]; a subscriber reads both, told
//! apart by the `content-type` field, which only structured entries have.
//!
//! * [`ContentMode::Structured`] (the default): two fields,
//!   `content-type: application/cloudevents+json` and `data` holding the
//!   CloudEvents JSON document, a JSON payload spliced in as it is:
//!
//!   ```text
//!   1) "content-type" "application/cloudevents+json"
//!   2) "data" "{\"specversion\":\"1.0\",\"id\":\"0190...\",\"type\":\"user.created\",
//!             \"source\":\"/watchtower\",\"time\":\"2026-01-01T00:00:00Z\",
//!             \"datacontenttype\":\"application/json\",\"data\":{\"user_id\":123}}"
//!   ```
//!
//!   Any client writes one with `XADD stream * content-type
//!   application/cloudevents+json data '<json>'` and reads one with the
//!   JSON event format that every CloudEvents SDK has.
//! * [`ContentMode::Binary`]: one stream field per attribute under its
//!   plain name (`specversion`, `id`, `type`, `source`, `time`, `subject`,
//!   `datacontenttype`, `dataschema`, extensions by name), and the payload's
//!   bytes in `data`:
//!
//!   ```text
//!   1) "specversion" "1.0"  "id" "0190..."  "type" "user.created"
//!      "source" "/watchtower"  "time" "2026-01-01T00:00:00Z"
//!      "datacontenttype" "application/json"  "data" "{\"user_id\":123}"
//!   ```
//!
//! ## Content modes
//!
//! Structured is the default, for speed and for foreign clients. A stream
//! entry costs Redis and every client by its field count: a binary entry of
//! a small JSON event has seven fields (fourteen strings to write, store,
//! and parse on every read), a structured one two. Measured with this
//! crate's bench (`benches/redis.rs`, 50,000 events of about 195 bytes,
//! 256 callers, on 2 busy cores, load average about 7, medians of three
//! per-round ratios to the raw `redis` crate sending one field of
//! pre-built JSON: the shared harness's `redis-xadd-pipe` and
//! `redis-xreadgroup`):
//!
//! | | binary | structured |
//! |---|--:|--:|
//! | publisher alone | 0.77× | 0.95× |
//! | four-layer stack | 0.74× | 0.95× |
//! | consume through `serve` (concurrency 256) | 0.54× | 0.63× |
//!
//! (CPU per event: publishing, Redis 2.2 µs either way, client 1.6 µs;
//! consuming, client 7.0 µs binary, 5.2 µs structured. A quieter run gave
//! the same order: publisher 0.76× against 0.89×, Redis 2.0 µs against
//! 1.6 µs per event.) There is no CloudEvents binding for Redis Streams, so a
//! binary entry can be read only by a client that knows these field
//! names, while a structured one is the standard JSON event format in a
//! field marked with its standard media type. Binary mode stays for
//! readers that select single fields (`redis-cli`, Lua scripts, consumers
//! that never parse the payload).

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod acks;
mod batch;
mod client;
mod config;
mod conn;
mod error;
mod link;
mod publisher;
mod resp;
mod subscriber;
mod wire;

pub use client::RedisClient;
pub use config::RedisConfig;
pub use error::ReplicasNotAcknowledged;
pub use publisher::{MaxLen, RedisBatchPublisher, RedisPublisher, RedisPublisherOptions, ResponseFuture};
pub use subscriber::{DeadLetter, RedisAcker, RedisSubscriber, RedisSubscriberOptions, RedisSubscription};
pub use wire::{CONTENT_TYPE_FIELD, ContentMode, DATA_FIELD};

/// The reply reader of the publisher's own connection, for the fuzz
/// targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::resp::{Frame, MAX_DEPTH, MAX_ELEMENTS, MAX_REPLY, Malformed, Reader};
}

/// Everything a program using the Redis transport needs:
/// `use watchtower_redis::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ContentMode, DeadLetter, MaxLen, RedisClient, RedisConfig, RedisPublisher, RedisPublisherOptions,
        RedisSubscriber, RedisSubscriberOptions,
    };
    pub use watchtower::prelude::*;
}
