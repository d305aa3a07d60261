//! WatchTower: one event API over real message transports, built on tower.
//!
//! A transport's publisher is a `tower::Service<Event>`; circuit breaking,
//! backpressure, retry and dead-lettering are `tower::Layer`s (in
//! `watchtower-layers`) that compose with `ServiceBuilder`. Consuming is the
//! mirror image: a transport's [`Subscriber`] yields [`Delivery`]s, and
//! [`serve()`] drives them into a handler service, acknowledging on `Ok`.
//!
//! This crate is the core every transport and layer shares:
//!
//! * [`Event`]: CloudEvents 1.0, payload as bytes, cheap to clone;
//! * [`codec`]: the CloudEvents JSON format and the binary-mode header
//!   mappings of NATS, HTTP, AMQP and Redis, with the decoding
//!   [`Limits`](codec::Limits) every transport shares;
//! * [`Error`] and [`ErrorKind`]: what failed and whether retrying helps;
//! * [`TopicPattern`]: `user.*` and `user.>` for every transport;
//! * [`Receipt`], [`Subscriber`], [`Delivery`], [`Acker`],
//!   [`Capabilities`]: the publish and subscribe contracts;
//! * [`batch`]: batch publishing, a publisher that is also a
//!   `Service<Vec<Event>>` answering each event;
//! * [`serve()`]: the consumer runtime; by default it tries an event at
//!   most 10 times, with redelivery delays growing from 100 ms to 30 s;
//! * [`MemoryDeadLetters`](dead_letter::MemoryDeadLetters): a bounded
//!   in-memory dead-letter queue, [`serve()`]'s default dead-letter path
//!   (not durable: lost when the process exits);
//! * [`Transport`], [`health`] and [`backoff`]: what every transport
//!   client shares: its `messaging.system` name, one health type, one
//!   exponential backoff for its reconnect loop, and one [`Overflow`]
//!   policy for its bounded queues;
//! * [`delay`]: delayed delivery, a time carried in the `deliverat`
//!   extension that transports honour or refuse;
//! * [`trace`]: the publish and process spans with the OpenTelemetry
//!   messaging attributes, opened by every transport and the runtime;
//! * [`reply`]: a one-shot reply whose sender chooses when to wake the
//!   receiver, for transport and layer authors who answer many callers at
//!   once;
//! * [`request`]: what every request–reply implementation shares (the
//!   table of callers waiting for replies, timeouts, error replies);
//! * `conformance` (feature `conformance`): the test suite every transport
//!   runs.
//!
//! # Example
//!
//! ```
//! use tower::{service_fn, ServiceBuilder};
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let broker = MemoryBroker::new();
//! let handle = broker
//!     .subscriber()
//!     .subscribe(["user.created"], service_fn(|event: Event| async move {
//!         println!("received {event:?}");
//!         Ok::<_, Error>(())
//!     }))
//!     .await?;
//!
//! let mut publisher = ServiceBuilder::new().service(broker.publisher());
//! publisher.publish(Event::new("user.created", serde_json::json!({"user_id": 123}))).await?;
//!
//! broker.wait_idle(std::time::Duration::from_secs(5)).await;
//! let stats = handle.stop().await?;
//! assert_eq!(stats.acked, 1);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

// The contracts: private modules, their items at the root.
mod error;
mod event;
mod overflow;
mod publish;
mod serve;
mod subscribe;
mod topic;
mod transport;

// Namespaces: their items are named through the module.
pub mod backoff;
pub mod batch;
pub mod codec;
pub mod dead_letter;
pub mod delay;
pub mod health;
pub mod reply;
pub mod request;
pub mod trace;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use batch::PublishBatchExt;
pub use error::{BoxError, Error, ErrorKind, redact_url};
pub use event::{
    APPLICATION_JSON, Event, EventBuilder, SPEC_VERSION, ext, is_json_content_type, validate_extension_name,
};
pub use overflow::Overflow;
pub use publish::PublishExt;
pub use serve::{Serve, ServeStats, StatsHandle, SubscriberExt, SubscriptionHandle, serve};
pub use subscribe::{
    Acker, Capabilities, Delivery, POISON_EVENT_TYPE, Poison, RawMessage, Receipt, SubscribeOptions,
    Subscriber,
};
pub use topic::{MAX_TOPIC_LEN, TopicPattern, validate_topic};
pub use transport::Transport;

/// The names most programs need: `use watchtower::prelude::*;`.
pub mod prelude {
    pub use crate::dead_letter::MemoryDeadLetters;
    pub use crate::{
        Acker, Capabilities, Delivery, Error, ErrorKind, Event, Overflow, PublishBatchExt, PublishExt,
        Receipt, SubscribeOptions, Subscriber, SubscriberExt, SubscriptionHandle, TopicPattern, Transport,
        serve,
    };
}
