//! Redis Streams for WatchTower: publish with `XADD`, consume through
//! consumer groups with batched `XACK`, reclaim what crashed consumers left
//! with `XAUTOCLAIM`.
//!
//! * [`RedisPublisher`] is a `tower::Service<Event>`: one stream per topic
//!   (named by [`RedisConfig::stream_prefix`] plus the topic), optional
//!   `MAXLEN ~` trimming, a [`Receipt`](watchtower::Receipt) with the entry
//!   id. Concurrent calls are gathered into batches of `XADD`s on the
//!   publisher's own connection, each caller answered with its own entry id or
//!   its own error (see [Batching](RedisPublisher#batching)).
//! * [`RedisSubscriber`] implements [`watchtower::Subscriber`]: consumer
//!   groups, redelivery with rising delivery counts, reclaiming, a
//!   dead-letter stream after too many deliveries, patterns resolved against
//!   existing streams. See its docs for the details.
//!
//! # Wire format
//!
//! Both CloudEvents content modes, chosen per publisher with
//! [`RedisPublisherBuilder::content_mode`]; a subscriber reads both, told
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
//!
//! An entry that does not decode reaches the consumer as a
//! [`Delivery::poison`](watchtower::Delivery::poison) with its raw fields.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::service_fn;
//! use watchtower::{Event, PublishExt, SubscriberExt};
//! use watchtower_redis::{RedisConfig, RedisPublisher, RedisSubscriber};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let config = RedisConfig::new("redis://127.0.0.1:6379");
//! let subscriber = RedisSubscriber::connect(config.clone()).await?;
//! let handle = subscriber
//!     .subscribe(["user.created"], service_fn(|event: Event| async move {
//!         println!("received {}", event.id());
//!         Ok::<_, watchtower::Error>(())
//!     }))
//!     .await?;
//!
//! let mut publisher = RedisPublisher::connect(config).await?;
//! let receipt = publisher
//!     .publish(Event::new("user.created", serde_json::json!({"user_id": 123})))
//!     .await?;
//! println!("stored as entry {:?}", receipt.message_id);
//! # tokio::time::sleep(Duration::from_millis(100)).await;
//! handle.stop().await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod acks;
mod batch;
mod config;
mod error;
mod link;
mod publisher;
mod resp;
mod subscriber;
mod wire;

pub use config::{
    DEFAULT_CONNECTION_TIMEOUT, DEFAULT_PIPELINE_BUFFER, DEFAULT_RECONNECT_RETRIES, DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_URL, RedisConfig,
};
pub use publisher::{DEFAULT_MAX_PENDING, MaxLen, RedisPublisher, RedisPublisherBuilder, ResponseFuture};
pub use subscriber::{
    DEFAULT_BATCH_SIZE, DEFAULT_BLOCK, DEFAULT_CLAIM_IDLE, DEFAULT_CLAIM_INTERVAL,
    DEFAULT_DEAD_LETTER_STREAM, DEFAULT_MAX_DELIVERIES, DEFAULT_RESCAN_INTERVAL, DeadLetter, RedisAcker,
    RedisSubscriber, RedisSubscriberBuilder, RedisSubscription,
};
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
    pub use crate::{ContentMode, DeadLetter, MaxLen, RedisConfig, RedisPublisher, RedisSubscriber};
    pub use watchtower::prelude::*;
}
