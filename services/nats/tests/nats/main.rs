//! Integration tests against the local NATS broker (127.0.0.1:4222) and
//! private `nats-server` processes.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, unreachable_pub)]

mod batch;
mod cluster;
mod config;
mod conformance;
mod core;
mod faults;
mod jetstream;
mod support;
