//! Batch publishing to Redis Streams: one pipeline per batch, one answer
//! per event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use watchtower::{ErrorKind, Event, PublishBatchExt};
use watchtower_redis::{RedisClient, RedisConfig};
use watchtower_test_support::unique;

use common::{URL, cleanup, event_id, numbered, raw, wait_entries};

/// The event ids of the stream `key`, in stream order.
async fn stream_ids(key: &str) -> Vec<String> {
    let mut conn = raw(URL).await;
    wait_entries(&mut conn, key, "0")
        .await
        .into_iter()
        .map(|(_, fields)| String::from_utf8(event_id(fields)).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_complete_and_in_order() {
    let ns = unique("wtr_batch");
    let topic = format!("{ns}.orders");
    let client = RedisClient::connect(RedisConfig::new(URL)).await.unwrap();
    let mut batches = client.publisher().batched();
    let events = numbered(&topic, 1000);
    let answers = batches.publish_batch(events.clone()).await.unwrap();
    assert_eq!(answers.len(), 1000);
    for (answer, event) in answers.iter().zip(&events) {
        let receipt = answer.as_ref().unwrap();
        assert_eq!(&*receipt.event_id, event.id());
        assert_eq!(receipt.stream.as_deref(), Some(topic.as_str()));
    }
    let sent: Vec<&str> = events.iter().map(Event::id).collect();
    assert_eq!(
        stream_ids(&topic).await,
        sent,
        "the stream holds the batch in order"
    );
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_in_a_batch_fails_alone() {
    let ns = unique("wtr_batch_bad");
    let topic = format!("{ns}.orders");
    let wrong = format!("{ns}.wrong");
    let mut conn = raw(URL).await;
    // A key of another type where the stream of one event would go: Redis
    // refuses that `XADD` alone (WRONGTYPE).
    let _: () = redis::cmd("SET")
        .arg(&wrong)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let client = RedisClient::connect(RedisConfig::new(URL)).await.unwrap();
    let mut batches = client.publisher().batched();
    let mut events = numbered(&topic, 20);
    events[4] = Event::new(wrong.clone(), serde_json::json!({}));
    events[9] = Event::new("x", serde_json::json!({})).with_topic("bad topic");
    watchtower::delay::set_delay(&mut events[12], Duration::from_secs(60));
    let answers = batches.publish_batch(events.clone()).await.unwrap();
    assert_eq!(answers.len(), 20);
    let kind = |i: usize| answers[i].as_ref().unwrap_err().kind();
    assert_eq!(kind(4), ErrorKind::Rejected);
    assert_eq!(kind(9), ErrorKind::InvalidTopic);
    assert_eq!(kind(12), ErrorKind::Unsupported);
    for (i, answer) in answers.iter().enumerate() {
        if ![4, 9, 12].contains(&i) {
            assert_eq!(&*answer.as_ref().unwrap().event_id, events[i].id(), "{i}");
        }
    }
    let mut answers = answers;
    let refused = answers[4].as_mut().unwrap_err().take_event();
    assert_eq!(
        refused.map(|e| e.id().to_owned()).as_deref(),
        Some(events[4].id())
    );
    let good: Vec<&str> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| ![4, 9, 12].contains(i))
        .map(|(_, e)| e.id())
        .collect();
    assert_eq!(stream_ids(&topic).await, good);
    let kind: String = redis::cmd("TYPE")
        .arg(&wrong)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "string");
    cleanup(URL, &ns).await;
}
