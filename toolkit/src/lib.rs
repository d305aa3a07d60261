//! The consumer toolkit of WatchTower: pieces that sit between
//! [`serve`](watchtower::serve()) and a program's handlers, as tower
//! services and layers, so they compose with `ServiceBuilder`, the
//! `watchtower-layers` and axum the way tower users expect.
//!
//! * [`router`]: dispatch by event type pattern to ordinary async
//!   functions whose arguments are extractors (`Data<T>`, `State<S>`,
//!   the delivery count), with per-route layers, nesting and a fallback;
//! * [`idempotent`]: a layer that skips events already handled, with an
//!   in-memory store and stores shared by every consumer on Redis
//!   (feature `redis`) and PostgreSQL (feature `postgres`, which can also
//!   record the key in the handler's own transaction);
//! * [`request`]: request–reply over any transport, a requester that is a
//!   `Service<Event, Response = Event>` and a responder that answers with
//!   the event its handler returns;
//! * [`batch`]: a consumer runtime for handlers that take a batch of
//!   events and settle each on its own.
//!
//! Every piece depends on the core only and works over every transport.
//!
//! # Example
//!
//! ```
//! use serde::Deserialize;
//! use watchtower_toolkit::router::{Data, Router};
//!
//! #[derive(Deserialize)]
//! struct Placed { id: u64 }
//!
//! async fn placed(Data(order): Data<Placed>) {
//!     println!("order {}", order.id);
//! }
//!
//! let router = Router::new().route("order.placed", placed);
//! // serve(subscription, router).await
//! # drop(router);
//! ```

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod idempotent;
pub mod request;
pub mod router;
