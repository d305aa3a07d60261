//! The in-memory WatchTower transport: the embedded default, and the
//! smallest example of a WatchTower transport.
//!
//! A [`MemoryBroker`] lives in the process. Its [`MemoryPublisher`] is a
//! `Service<Event>`; its [`MemorySubscriber`] opens subscriptions with
//! wildcards (`user.*`, `user.>`), consumer groups (competing consumers),
//! acknowledgements with redelivery and delivery counts, delayed nacks, and
//! optional per-topic retention so a late subscriber can replay earlier
//! events. No external service is needed, which makes it the transport of
//! the quick start and of users' own tests.
//!
//! # Connect
//!
//! There is nothing to connect to: [`MemoryBroker::new`] is the in-process
//! equivalent of a client's `connect`, and
//! [`MemoryBroker::with_config`] takes a [`MemoryConfig`]. The broker is a
//! cheap [`Clone`]; clones share it. It implements
//! [`Transport`](watchtower::Transport): its `health()` is up until
//! [`close`](MemoryBroker::close).
//!
//! ```
//! use watchtower::Transport as _;
//! use watchtower_memory::{MemoryBroker, MemoryConfig};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let broker = MemoryBroker::with_config(MemoryConfig::new().retention(100));
//! assert!(broker.health().await.is_up());
//! # }
//! ```
//!
//! # Publish
//!
//! [`broker.publisher()`](MemoryBroker::publisher) is a `Service<Event>`;
//! the receipt's `sequence` is the broker-wide publish sequence.
//!
//! ```
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let broker = MemoryBroker::new();
//! let receipt = broker.publisher().publish(Event::new("order.placed", serde_json::json!({"id": 1}))).await?;
//! assert_eq!(&*receipt.topic, "order.placed");
//! # Ok(()) }
//! ```
//!
//! # Subscribe
//!
//! [`broker.subscriber()`](MemoryBroker::subscriber) is a
//! [`Subscriber`](watchtower::Subscriber): `subscribe` runs a handler
//! service over a subscription, `open` hands out the stream of deliveries.
//!
//! ```
//! use std::time::Duration;
//! use tower::service_fn;
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let broker = MemoryBroker::new();
//! let handle = broker
//!     .subscriber()
//!     .subscribe(["order.>"], service_fn(|event: Event| async move {
//!         println!("{} {}", event.ty(), event.id());
//!         Ok::<_, Error>(())
//!     }))
//!     .await?;
//! broker.publisher().publish(Event::new("order.placed", serde_json::json!({"id": 1}))).await?;
//! assert!(broker.wait_idle(Duration::from_secs(5)).await);
//! assert_eq!(handle.stop().await?.acked, 1);
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! Within the process, nothing is lost while the broker lives: an event is
//! delivered to every matching subscription until it is acked or rejected.
//!
//! * A subscription **without a group** is ephemeral: it receives events
//!   published while it is open; events it holds unsettled when it closes
//!   are gone with it (like core NATS).
//! * A **group** is durable for the broker's lifetime: its members share
//!   the events, and events published or nacked while no member is
//!   connected wait for the next one. Members of a group should subscribe
//!   to the same patterns (the group receives the union).
//! * An event published to a topic no subscription matches is not stored
//!   (unless retention is on). A subscription that asks to replay gets the
//!   retained events in publish order; a group joined with replay re-queues
//!   them for the whole group.
//! * [`MemoryConfig::max_pending`] is checked when an event is published,
//!   not in `poll_ready` (which cannot know the event's topic): a full
//!   queue makes the publish fail with
//!   [`ErrorKind::Overloaded`](watchtower::ErrorKind::Overloaded), the
//!   event attached.
//! * Dropping a delivery unsettled redelivers it at once; a nack
//!   redelivers it (after its delay) with the delivery count raised.
//! * Order: one consumer sees a topic's events in publish order;
//!   redelivered events go to the back of the queue.
//! * Members of a group share its queue: a member takes at most 16 events
//!   in a row while others are connected, then hands the turn on; a member
//!   that closes gives back, in order, the events it took and had not yet
//!   delivered.
//! * Nothing survives the process: the broker is memory.
//!
//! # Layout
//!
//! A transport author can read this crate as a template: `config`
//! (the [`MemoryConfig`]), `broker` (the handle and its
//! [`Transport`](watchtower::Transport) impl), `state` (routing and
//! groups' bookkeeping), `group` (one group's queue), `publisher`,
//! `subscriber` (the subscription stream) and `acker` (settlement).

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod acker;
mod broker;
mod config;
mod group;
mod publisher;
mod state;
mod subscriber;

pub use acker::MemoryAcker;
pub use broker::MemoryBroker;
pub use config::MemoryConfig;
pub use publisher::MemoryPublisher;
pub use subscriber::{MemorySubscriber, MemorySubscription};

/// Everything a program using the memory transport needs:
/// `use watchtower_memory::prelude::*;`.
pub mod prelude {
    pub use crate::{
        MemoryAcker, MemoryBroker, MemoryConfig, MemoryPublisher, MemorySubscriber, MemorySubscription,
    };
    pub use watchtower::prelude::*;
}
