//! Helpers shared by the toolkit's integration tests.

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use watchtower_redis::{RedisClient, RedisConfig, RedisSubscriberOptions};

pub const REDIS: &str = "redis://127.0.0.1:6379";
pub const NATS: &str = "nats://127.0.0.1:4222";

pub async fn raw(url: &str) -> MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(20)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// A Redis client whose streams live under `prefix`.
pub async fn redis_client(prefix: &str) -> RedisClient {
    RedisClient::connect(
        RedisConfig::new(REDIS)
            .stream_prefix(prefix)
            .response_timeout(Duration::from_secs(20)),
    )
    .await
    .unwrap()
}

/// Subscriber options with short timings, so that redelivery and new
/// streams show up within a test; the defaults suit production.
pub fn quick() -> RedisSubscriberOptions {
    RedisSubscriberOptions::new()
        .block(Duration::from_millis(100))
        .claim_idle(Duration::from_secs(2))
        .claim_interval(Duration::from_millis(100))
        .rescan_interval(Duration::from_millis(100))
}

/// Deletes every key starting with `prefix`.
pub async fn cleanup(prefix: &str) {
    let mut conn = raw(REDIS).await;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// The shared PostgreSQL (trust authentication, database `test`).
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A SQL transport client on PostgreSQL whose tables are named `name_*`,
/// with short timings (the defaults suit production).
pub async fn sql_client(name: &str) -> watchtower_sql::SqlClient {
    watchtower_sql::SqlClient::connect(
        watchtower_sql::SqlConfig::new(POSTGRES)
            .table_prefix(format!("{name}_"))
            .poll_interval(Duration::from_millis(100))
            .visibility_timeout(Duration::from_secs(10))
            .batch_size(50)
            .max_connections(8),
    )
    .await
    .unwrap()
}

/// A PostgreSQL idempotency store on a table `name` of its own, created.
pub async fn postgres_store(name: &str) -> watchtower_toolkit::idempotent::PostgresStore {
    let store = watchtower_toolkit::idempotent::PostgresStore::connect(POSTGRES)
        .await
        .unwrap()
        .table(name)
        .unwrap();
    store.create_table().await.unwrap();
    store
}
