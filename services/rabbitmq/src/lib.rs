//! RabbitMQ transport for WatchTower, on [`lapin`].
//!
//! * [`RabbitPublisher`] is a `tower::Service<Event>`: events go to an
//!   exchange (topic by default) with the event's topic as routing key,
//!   persistent, `mandatory`, and the call resolves on the broker's
//!   publisher confirm. Unroutable events come back as
//!   [`ErrorKind::Rejected`](watchtower::ErrorKind::Rejected) errors, or,
//!   faster, are kept by an
//!   [alternate exchange](RabbitConfig::alternate_exchange).
//! * [`RabbitSubscriber`] implements [`watchtower::Subscriber`]: queues and
//!   bindings declared from [`QueueOptions`] (quorum queues, delivery limit,
//!   dead-letter exchange, TTL, max length), prefetch as the backpressure
//!   bound, consumer groups as shared durable queues, batched `multiple`
//!   acks.
//! * Both keep their connection healthy: failures are detected (error
//!   events, heartbeats, broker-closed connections), `poll_ready` and
//!   [`Health`] follow the real state, and the connection is re-opened with
//!   backoff and the topology declared again. A publisher channel the
//!   broker closes is replaced on the same connection, without disturbing
//!   the publisher's other channels.
//!
//! # Wire format
//!
//! CloudEvents over AMQP 0-9-1, in either [`ContentMode`], chosen with
//! [`PublishOptions::content_mode`]:
//!
//! | CloudEvents | [`Structured`](ContentMode::Structured) (default) | [`Binary`](ContentMode::Binary) |
//! |---|---|---|
//! | every attribute, extensions | in the JSON body | headers `cloudEvents_<attr>` (long strings) |
//! | `datacontenttype` | in the JSON body | the `content-type` property |
//! | `content-type` property | `application/cloudevents+json` | `datacontenttype` |
//! | data | the body's `"data"` (JSON spliced in as is) or `"data_base64"` | the body |
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
//! ## Why structured mode is the default
//!
//! * Foreign clients: CloudEvents defines no binding for AMQP 0-9-1. Its
//!   AMQP binding is for AMQP 1.0, where binary mode puts attributes in
//!   application properties named `cloudEvents_<attr>` (what binary mode
//!   writes as headers; RabbitMQ 4 maps them for AMQP 1.0 consumers), and
//!   structured mode is the JSON event format every CloudEvents SDK reads
//!   (`application/cloudevents+json`), whatever the transport. A
//!   structured message can be read by any SDK, and by a client that knows
//!   nothing of CloudEvents but JSON; a binary one only by a client that
//!   maps headers.
//! * Cost: binary mode builds a header table of five or more
//!   `cloudEvents_*` long strings per event, which lapin encodes and every
//!   consumer decodes and copies again. In the crate's benchmark
//!   (`benches/rabbitmq.rs`, 50,000 events, three rounds on a 2-core
//!   machine that also runs the broker) structured mode costs the
//!   publishing process 10.5 to 14 µs of CPU per event against 13 to 15
//!   in binary mode, and the consuming process (`serve` over
//!   [`RabbitSubscriber`]) 8.3 µs against 12.5. Throughput is set by the
//!   broker (about 70 µs of its CPU per event), which treats both modes
//!   alike, so their ratios to raw lapin overlap within the rounds' spread
//!   (±30 %): see the table in the [publisher docs](publisher#performance).
//!   Consuming, `serve` is 1.9 to 2.9 times as fast as raw lapin
//!   acknowledging singly, in either mode.
//! * Binary mode stays for consumers that want the bare payload as the
//!   body, and for [headers exchanges](ExchangeKind::Headers), which route
//!   on the `cloudEvents_*` headers: on a headers exchange binary mode is
//!   the default.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{ServiceBuilder, service_fn};
//! use watchtower::{Event, PublishExt, SubscriberExt};
//! use watchtower_rabbitmq::{ExchangeKind, RabbitConfig, RabbitPublisher, RabbitSubscriber};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")?
//!     .exchange("orders", ExchangeKind::Topic)?
//!     .connection_name("checkout");
//!
//! let subscriber = RabbitSubscriber::connect(config.clone()).await?;
//! let handle = subscriber
//!     .subscribe(["order.*"], service_fn(|event: Event| async move {
//!         println!("{} {}", event.ty(), event.id());
//!         Ok::<_, watchtower::Error>(())
//!     }))
//!     .await?;
//!
//! let mut publisher = ServiceBuilder::new()
//!     .timeout(Duration::from_secs(5))
//!     .service(RabbitPublisher::connect(config).await?);
//! publisher.publish(Event::new("order.placed", serde_json::json!({"order": 7}))).await?;
//! # handle.stop().await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod ack;
pub mod config;
mod confirms;
mod connection;
pub mod publisher;
pub mod subscriber;
mod wire;

pub use config::{ContentMode, ExchangeKind, Overflow, PublishOptions, QueueOptions, RabbitConfig};
pub use connection::Health;
pub use publisher::RabbitPublisher;
pub use subscriber::{RabbitAcker, RabbitSubscriber, RabbitSubscription};

/// The lapin crate, for [`FieldTable`](lapin::types::FieldTable) binding
/// arguments and raw access.
pub use lapin;

/// Everything a program using the RabbitMQ transport needs:
/// `use watchtower_rabbitmq::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ContentMode, ExchangeKind, PublishOptions, QueueOptions, RabbitConfig, RabbitPublisher,
        RabbitSubscriber,
    };
    pub use watchtower::prelude::*;
}
