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

/// A handler that answers requests, as a `Responder` takes it.
pub trait Answering:
    tower::Service<
        watchtower::Event,
        Response = watchtower::Event,
        Error = watchtower::Error,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Answering for S where
    S: tower::Service<
            watchtower::Event,
            Response = watchtower::Event,
            Error = watchtower::Error,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Doubles `n`; refuses negative numbers for good, fails on 13 for now:
/// the handler of the request–reply tests.
pub fn doubler() -> impl Answering {
    use watchtower::{Error, ErrorKind, Event};
    tower::service_fn(|request: Event| async move {
        let n: i64 = request.json()?;
        if n < 0 {
            return Err(Error::new(ErrorKind::Rejected, "negative numbers are not served"));
        }
        if n == 13 {
            return Err(Error::new(ErrorKind::Handler, "unlucky, try later"));
        }
        Ok(Event::new("doubled", serde_json::json!(n * 2)))
    })
}

/// Asks `requester` about `n` on `topic`.
pub async fn ask<R>(requester: &mut R, topic: &str, n: i64) -> Result<watchtower::Event, watchtower::Error>
where
    R: tower::Service<watchtower::Event, Response = watchtower::Event, Error = watchtower::Error>,
{
    use tower::ServiceExt as _;
    requester
        .ready()
        .await?
        .call(watchtower::Event::new(topic.to_owned(), serde_json::json!(n)))
        .await
}

/// A NATS client and a responder with `handler` served on a fresh topic
/// (`<unique prefix>.<name>`), ready once the server has the subscription.
pub async fn nats_responder(
    prefix: &str,
    name: &str,
    handler: impl Answering,
) -> (
    watchtower_nats::NatsClient,
    String,
    watchtower::SubscriptionHandle,
) {
    use watchtower::SubscriberExt as _;
    let client = watchtower_nats::NatsClient::connect(watchtower_nats::NatsConfig::new(NATS))
        .await
        .unwrap();
    let topic = format!("{}.{name}", watchtower_test_support::unique(prefix));
    let handle = client
        .subscriber()
        .subscribe(
            [&topic],
            watchtower_toolkit::request::Responder::new(handler, client.publisher()),
        )
        .await
        .unwrap();
    client.round_trip().await.unwrap();
    (client, topic, handle)
}

/// The doubler's failures reach the caller as errors of their kind:
/// `-1` refused for good, `13` failing for now.
pub async fn failures_come_back<R>(requester: &mut R, topic: &str)
where
    R: tower::Service<watchtower::Event, Response = watchtower::Event, Error = watchtower::Error>,
{
    use watchtower::ErrorKind;
    let refused = ask(requester, topic, -1).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Rejected);
    assert!(!refused.is_retryable());
    assert!(!watchtower::request::NoResponders::is(&refused));
    assert!(
        refused.to_string().contains("negative numbers are not served"),
        "{refused}"
    );
    let unlucky = ask(requester, topic, 13).await.unwrap_err();
    assert_eq!(unlucky.kind(), ErrorKind::Handler);
    assert!(unlucky.is_retryable());
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
