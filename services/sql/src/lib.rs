//! SQL as a WatchTower transport: PostgreSQL for production, SQLite as the
//! embedded default.
//!
//! TODO docs

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod acker;
mod client;
mod config;
mod dead_letters;
mod error;
mod publisher;
mod schema;
mod spool;
mod subscriber;

pub use acker::SqlAcker;
pub use client::SqlClient;
pub use config::SqlConfig;
pub use dead_letters::{DeadLetter, RedriveReport, SqlDeadLetters};
pub use publisher::{Database, ResponseFuture, SqlPublisher};
pub use spool::{Spool, spool};
pub use subscriber::{SqlSubscriber, SqlSubscription};

/// Everything a program using the SQL transport needs:
/// `use watchtower_sql::prelude::*;`.
pub mod prelude {
    pub use crate::{SqlClient, SqlConfig, SqlPublisher, SqlSubscriber};
    pub use watchtower::prelude::*;
}
