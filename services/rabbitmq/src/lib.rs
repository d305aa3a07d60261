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
//! * Cost: in the crate's benchmark, publishing in binary mode was as fast
//!   as or faster than structured mode in most rounds, and cost the broker,
//!   which sets the pace, less CPU per event (64 to 72 µs against 88 to 92
//!   without `mandatory`, in the same run): see the table in the
//!   [publisher docs](publisher#performance). Structured mode saves the
//!   processes a few µs per event (a consumer under `serve` spends 8 to
//!   10 µs per structured event, 12.5 to 15 per binary one), but consuming
//!   runs at the same pace in both modes, 1.5 to 2.9 times raw lapin
//!   acknowledging singly.
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

/// The `messaging.system` name of RabbitMQ, as the OpenTelemetry conventions spell it.
pub(crate) const SYSTEM: &str = "rabbitmq";

pub use config::{ContentMode, ExchangeKind, PublishOptions, QueueOptions, QueueOverflow, RabbitConfig};
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
