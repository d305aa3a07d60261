//! NATS and JetStream transport for WatchTower, on async-nats.
//!
//! | type | does | guarantee |
//! |---|---|---|
//! | [`NatsPublisher`] | publishes to core NATS subjects | at-most-once |
//! | [`NatsSubscriber`] | subjects, `*`/`>` wildcards, queue groups | at-most-once; slow-consumer drops reported |
//! | [`JetStreamPublisher`] | publishes to streams, awaits the PubAck, dedup by event id | stored once per duplicate window |
//! | [`JetStreamSubscriber`] | durable pull consumers, explicit ack/nack/term/progress | at-least-once |
//!
//! All of them share one [`NatsClient`] (a connection with its reconnect
//! loop), made from a [`NatsConfig`] (servers, token, user/password, nkey,
//! credentials file, TLS, timeouts). Publishers are
//! `tower::Service<Event>`s, so the layers of `watchtower-layers` and
//! tower's own stack on top of them; their `poll_ready` follows the
//! connection state.
//!
//! # Wire format
//!
//! Events are written in CloudEvents binary mode: attributes as `ce-`
//! headers (`ce-id`, `ce-type`, `ce-source`, `ce-time`,
//! `ce-datacontenttype`, extensions as `ce-<name>`), data as the body, so
//! any NATS client can read them. On receive, structured mode
//! (`Content-Type: application/cloudevents+json`, or a header-less JSON
//! body) is accepted too. A message that is neither is a
//! [poison](watchtower::Delivery::poison) delivery, with its raw bytes.
//!
//! # Example
//!
//! ```no_run
//! use tower::service_fn;
//! use watchtower::{Event, PublishExt, SubscriberExt};
//! use watchtower_nats::{NatsClient, NatsConfig, NatsPublisher, NatsSubscriber};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let handle = NatsSubscriber::new(client.clone())
//!     .subscribe(["user.*"], service_fn(|event: Event| async move {
//!         println!("got {}", event.ty());
//!         Ok::<_, watchtower::Error>(())
//!     }))
//!     .await?;
//!
//! let mut publisher = NatsPublisher::new(client);
//! publisher.publish(Event::new("user.created", serde_json::json!({"user_id": 1}))).await?;
//! handle.stop().await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod config;
pub mod jetstream;
pub mod publisher;
pub mod subject;
pub mod subscriber;

mod wire;

pub use async_nats;
pub use client::{ConnectionStats, NatsClient};
pub use config::{NatsConfig, WhenDisconnected};
pub use jetstream::{
    ConsumerSettings, JetStreamAcker, JetStreamPublisher, JetStreamSubscriber, JetStreamSubscription,
};
pub use publisher::NatsPublisher;
pub use subject::SubjectTemplate;
pub use subscriber::{NatsAcker, NatsSubscriber, NatsSubscription};
pub use wire::ContentMode;

/// Everything a program using the NATS transport needs:
/// `use watchtower_nats::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ConsumerSettings, ContentMode, JetStreamPublisher, JetStreamSubscriber, NatsClient, NatsConfig,
        NatsPublisher, NatsSubscriber, SubjectTemplate, WhenDisconnected,
    };
    pub use watchtower::prelude::*;
}
