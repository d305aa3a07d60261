//! The WatchTower conformance suite against the local Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use watchtower::conformance::{Harness, run};
use watchtower::{Capabilities, Error, Subscriber};
use watchtower_redis::{RedisClient, RedisConfig, RedisPublisher, RedisSubscriber, RedisSubscriberOptions};

use common::{URL, cleanup};

struct RedisHarness;

impl Harness for RedisHarness {
    type Publisher = RedisPublisher;
    type Subscriber = RedisSubscriber;

    fn name(&self) -> String {
        "redis".into()
    }

    fn system(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE
            .persistent(true)
            .consumer_groups(true)
            .ordered(true)
            .wildcards(true)
            .redelivery(true)
            .nack_delay(true)
            .replay(true)
    }

    async fn teardown(&self, namespace: &str) -> Result<(), Error> {
        cleanup(URL, namespace).await;
        Ok(())
    }

    async fn publisher(&self, _namespace: &str) -> Result<RedisPublisher, Error> {
        Ok(RedisClient::connect(RedisConfig::new(URL)).await?.publisher())
    }

    async fn subscriber(&self, _namespace: &str) -> Result<RedisSubscriber, Error> {
        // Short timings so that reclaiming and new streams show up within a
        // case; the defaults suit production.
        RedisClient::connect(RedisConfig::new(URL))
            .await?
            .subscriber_with(
                RedisSubscriberOptions::new()
                    .block(Duration::from_millis(200))
                    .claim_idle(Duration::from_secs(5))
                    .claim_interval(Duration::from_millis(100))
                    .rescan_interval(Duration::from_millis(100)),
            )
    }

    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }

    async fn publish_raw(&self, _namespace: &str, topic: &str, body: Bytes) -> Result<bool, Error> {
        let mut conn = common::raw(URL).await;
        let _: String = redis::cmd("XADD")
            .arg(topic)
            .arg("*")
            .arg("data")
            .arg(&body[..])
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::new(watchtower::ErrorKind::Connection, e.to_string()))?;
        Ok(true)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let subscriber = RedisHarness.subscriber("x").await.unwrap();
    assert_eq!(subscriber.capabilities(), RedisHarness.capabilities());
    let report = run(RedisHarness).await;
    report.assert_passed();
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "current_thread")]
async fn traces_cross_redis() {
    let traces = watchtower_test_support::otel::Traces::capture();
    watchtower_test_support::otel::check_propagation(&RedisHarness, &traces)
        .await
        .unwrap();
}
