//! SQL as a WatchTower transport: PostgreSQL for production, SQLite as the
//! embedded default. Events live in a table of the application's own
//! database, so the durable pieces are composition, not new mechanisms:
//!
//! * a **transport** like the others: [`SqlClient::connect`],
//!   [`publisher`](SqlClient::publisher) (a `tower::Service<Event>`),
//!   [`subscriber`](SqlClient::subscriber) (a [`watchtower::Subscriber`]
//!   with consumer groups, leases, redelivery), [`health`](watchtower::Transport::health);
//! * the **transactional outbox**: [`SqlPublisher::publish_in`] writes the
//!   event in the caller's own `sqlx` transaction;
//! * the **forwarder** is `watchtower::serve(sql_subscription, broker_publisher)`;
//! * a **local spool**: [`spool`] keeps accepting events while the broker
//!   is down and forwards them in order when it returns;
//! * **durable dead letters**: [`SqlDeadLetters`], a table the dead-letter
//!   layer points at, with inspect and redrive;
//! * a **retry schedule of hours** (a webhook's 5 s to 10 h):
//!   [`RetryScheduleLayer`] turns a handler's failures into nacks with the
//!   schedule's delay, kept in the table, with an attempts log.
//!
//! # Example
//!
//! ```
//! use tower::service_fn;
//! use watchtower::{Event, PublishExt, SubscribeOptions, SubscriberExt};
//! use watchtower_sql::{SqlClient, SqlConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! # let dir = std::env::temp_dir().join(format!("wt-sql-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("lib.db");
//! // A SQLite file (or `postgres://user@host/db`); the tables are created.
//! let client = SqlClient::connect(SqlConfig::new(format!("sqlite://{}", path.display()))).await?;
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let handle = client
//!     .subscriber()
//!     .subscribe_with(
//!         SubscribeOptions::new(["user.*"])?.group("billing")?,
//!         service_fn(move |event: Event| {
//!             let sent = tx.send(event);
//!             async move { sent.map_err(|_| watchtower::Error::closed("done")) }
//!         }),
//!     )
//!     .await?;
//! let mut publisher = client.publisher();
//! publisher.publish(Event::new("user.created", serde_json::json!({"user_id": 1}))).await?;
//! assert_eq!(rx.recv().await.map(|e| e.topic().to_owned()).as_deref(), Some("user.created"));
//! handle.stop().await?;
//! # client.drop_tables().await?;
//! # Ok(()) }
//! ```
//!
//! # Tables
//!
//! Created by [`SqlClient::connect`] with idempotent DDL (or by the
//! application's migrations: [`SqlClient::schema`]), named by the
//! [table prefix](SqlConfig::table_prefix), `watchtower_` by default:
//!
//! | table | holds |
//! |---|---|
//! | `<prefix>events` | one row per event: `seq` (the order), `tx` (PostgreSQL: the writing transaction's id), `topic`, `event_id`, `body`, `created_ms` |
//! | `<prefix>groups` | one row per consumer group: the position of the last event it took |
//! | `<prefix>leases` | one row per event a group has taken and not settled: delivery count, visible again at |
//! | `<prefix>dead_letters` | [`SqlDeadLetters`] |
//! | `<prefix>attempts` | the attempts log of [`RetryScheduleLayer`] |
//!
//! On PostgreSQL a statement trigger on the events table sends
//! `NOTIFY <prefix>events` after every insert, from any writer, at commit.
//!
//! ## The stored format
//!
//! `body` is the event in the CloudEvents JSON format (structured mode,
//! `application/cloudevents+json`, from [`watchtower::codec::structured`]),
//! bytes as written: the same document the other transports send in
//! structured mode, readable by any CloudEvents SDK (`SELECT
//! convert_from(body, 'UTF8')::jsonb FROM watchtower_events` on
//! PostgreSQL), and written once, without re-encoding, when the forwarder
//! hands it on. One column rather than a column per attribute keeps
//! extensions (trace context, dead-letter annotations) without schema
//! changes; `topic` and `event_id` have their own columns for routing and
//! inspection. A row whose body does not decode (written by something
//! else) reaches the consumer as a [poison](watchtower::Delivery::poison)
//! delivery with its raw bytes and goes to the runtime's dead-letter path.
//!
//! # Guarantees
//!
//! * **Publishing**: a caller answered `Ok` has its event committed; its
//!   receipt carries the table and the sequence number. A caller told
//!   [`Timeout`](watchtower::ErrorKind::Timeout) or
//!   [`Connection`](watchtower::ErrorKind::Connection) cannot know whether
//!   it was stored.
//! * **Consuming**: at least once, per group. An event is leased to one
//!   member of a group for the [visibility
//!   timeout](SqlConfig::visibility_timeout); settled, its lease is
//!   deleted; nacked or dropped, it is visible again; a member that dies
//!   loses its leases when the timeout passes. Events reach a group in the
//!   order they committed; redeliveries come first.
//! * **Received events** carry the topic they were published to; spans
//!   and deliveries carry `messaging.system = "sql"` (one name for both
//!   databases: OpenTelemetry names no messaging system for SQL tables).
//! * **Retention**: an event is deleted by [clean-up](SqlClient::cleanup)
//!   once every group has settled it (after the
//!   [retention](SqlConfig::retention)); a group that never comes back
//!   keeps events until it is [deleted](SqlClient::delete_group).
//!
//! # The transactional outbox
//!
//! The business write and the event commit together or not at all:
//!
//! ```no_run
//! use watchtower::Event;
//! use watchtower_sql::{SqlClient, SqlConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = SqlClient::connect(SqlConfig::new("postgres://postgres@127.0.0.1/test")).await?;
//! let outbox = client.publisher();
//! let pool = client.pg_pool().expect("PostgreSQL");
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)").bind(7_i64).bind(990_i64).execute(&mut *tx).await?;
//! outbox.publish_in(&mut tx, Event::new("order.placed", serde_json::json!({"id": 7}))).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # The forwarder
//!
//! Forwarding the outbox to a broker is the consumer runtime serving a
//! subscription of the events table into the broker's publisher (with any
//! layers on top): no new mechanism, the guarantees of both sides.
//!
//! ```no_run
//! use watchtower::{SubscribeOptions, Subscriber, serve};
//! use watchtower_nats::{NatsClient, NatsConfig};
//! use watchtower_sql::{SqlClient, SqlConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let outbox = SqlClient::connect(SqlConfig::new("postgres://postgres@127.0.0.1/test")).await?;
//! let nats = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let subscription = outbox
//!     .subscriber()
//!     .open(SubscribeOptions::new([">"])?.group("forwarder")?)
//!     .await?;
//! serve(subscription, nats.jetstream_publisher()).poison(outbox.dead_letters()).await?;
//! # Ok(()) }
//! ```
//!
//! * **At least once.** An event is acknowledged in the table only after
//!   the broker's publisher answered `Ok`; a forwarder that dies between
//!   the two forwards the event again (after the visibility timeout, from
//!   whichever forwarder takes it). Duplicates come only from what a
//!   forwarder had in flight: at most its `serve` concurrency, its
//!   buffer and the batch it was claiming (the crash test counts them).
//! * **Effectively exactly once into JetStream**: its publisher sends the
//!   event id as `Nats-Msg-Id`, so a second hand-off within the stream's
//!   duplicate window is recognised and not stored (receipt
//!   `duplicate: true`).
//! * **Several forwarders** (processes) in one group share the work: each
//!   event is leased to one of them.
//! * **Order**: events reach the forwarder in commit order; with
//!   `serve(..).concurrency(1)` they leave in that order too.
//!
//! # Performance
//!
//! `benches/sql.rs` (`cargo bench -p watchtower-sql --bench sql`) measures,
//! in one run, `publish_in` against raw `sqlx` inserting the same rows in
//! the same kind of transaction, the batched publisher, and the forwarder.
//! One run on 2 shared cores under a load average of about 12 (absolute
//! rates mean little there; the ratio is what the run supports):
//!
//! | case | rate |
//! |---|--:|
//! | PostgreSQL, one event per transaction, 32 tasks: raw `sqlx` | 516/s |
//! | the same with `publish_in` | 478/s, **0.93×** (rounds 0.95, 0.80, 0.93) |
//! | PostgreSQL, `SqlPublisher`, 32 concurrent callers | 4,575/s |
//! | forwarder, PostgreSQL → NATS core (2,000 events) | 1,599/s |
//! | forwarder, SQLite → NATS core (2,000 events) | 5,683/s |
//!
//! A transaction's cost is its commit; the transport adds the encoding and
//! its span.
//!
//! The forwarder, in another run (5,000 events × 3 rounds, load average
//! about 13), beside the broker's raw client sending the same rows'
//! bodies in the same round:
//!
//! | case | forwarder | raw client |
//! |---|--:|--:|
//! | PostgreSQL → NATS core | 3,466/s | 352,179/s (`publish`, then a flush) |
//! | PostgreSQL → Redis Streams | 2,105/s | 122,694/s (`XADD`s in pipelines of 512) |
//! | SQLite → NATS core | 3,866/s | 805,773/s |
//! | SQLite → Redis Streams | 3,378/s | 179,958/s |
//!
//! The broker is not what bounds a forwarder (its raw client is 50 to 200
//! times faster); what remains is the database side, each event's share of
//! a claiming and of an acknowledging transaction. (The forwarder
//! to Redis once measured 62 to 120 events/s: its group started behind
//! the events a forward to NATS had left in the table, of another topic,
//! and it read past them one page per poll interval. A claim that reads a
//! full page now looks again at once.)
//!
//! # Choosing PostgreSQL or SQLite
//!
//! SQLite (a file, WAL mode, `synchronous=FULL`) suits one process: a
//! spool, an embedded application, tests. Its subscriptions learn of
//! another process's events by polling. PostgreSQL suits many processes:
//! claims use `FOR UPDATE SKIP LOCKED`, and `LISTEN/NOTIFY` wakes
//! subscriptions at once. Positions follow transaction ids on PostgreSQL,
//! so a transaction left open for long anywhere in the database cluster
//! holds deliveries back until it ends (an event committed by it is never
//! skipped, which sequence numbers alone cannot promise).

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod acker;
mod client;
mod config;
mod dead_letters;
mod error;
mod publisher;
mod schedule;
mod schema;
mod spool;
mod subscriber;

pub use acker::SqlAcker;
pub use client::SqlClient;
pub use config::{Backend, SqlConfig};
pub use dead_letters::{DeadLetter, RedriveReport, SqlDeadLetters};
pub use publisher::{Insert, OutboxConnection, ResponseFuture, SqlBatchPublisher, SqlPublisher};
pub use schedule::{Attempt, RetrySchedule, RetryScheduleLayer, RetryScheduled};
pub use spool::{Spool, spool};
pub use subscriber::{SqlSubscriber, SqlSubscription};

/// Everything a program using the SQL transport needs:
/// `use watchtower_sql::prelude::*;`.
pub mod prelude {
    pub use crate::{SqlClient, SqlConfig, SqlPublisher, SqlSubscriber};
    pub use watchtower::prelude::*;
}
