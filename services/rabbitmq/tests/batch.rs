//! Batch publishing to RabbitMQ: every event of a batch sent on one
//! channel, the confirms awaited together, one answer per event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use watchtower::{ErrorKind, Event, PublishBatchExt};
use watchtower_rabbitmq::PublishOptions;
use watchtower_test_support::unique;

use common::{Admin, config};

fn numbered(topic: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new(topic.to_owned(), serde_json::json!({ "i": i })))
        .collect()
}

/// The `message-id`s of everything in `queue`, in queue order.
async fn drain_ids(admin: &Admin, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(message) = admin.get(queue).await {
        ids.push(message.properties.message_id().as_ref().unwrap().to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_window_is_confirmed_complete_and_in_order() {
    let exchange = unique("wt-batch");
    let admin = Admin::connect().await;
    let publisher = common::publisher_with(config(&exchange), PublishOptions::new().max_in_flight(100))
        .await
        .unwrap();
    let queue = admin.bound_queue(&exchange, "b.#").await;
    let events = numbered("b.x", 500);
    let answers = publisher.batched().publish_batch(events.clone()).await.unwrap();
    assert_eq!(answers.len(), 500);
    for (answer, event) in answers.iter().zip(&events) {
        assert_eq!(&*answer.as_ref().unwrap().event_id, event.id());
    }
    assert_eq!(admin.depth(&queue).await, 500);
    let sent: Vec<&str> = events.iter().map(Event::id).collect();
    assert_eq!(drain_ids(&admin, &queue).await, sent);
    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_in_a_batch_fails_alone() {
    let exchange = unique("wt-batch-bad");
    let admin = Admin::connect().await;
    let publisher = common::publisher(config(&exchange)).await.unwrap();
    let queue = admin.bound_queue(&exchange, "b.#").await;
    let mut events = numbered("b.x", 20);
    // No queue is bound for it: returned (`mandatory`).
    events[5] = Event::new("nobody.listens", serde_json::json!({}));
    // A routing key longer than AMQP's 255 bytes.
    events[11] = Event::new(format!("b.{}", "k".repeat(300)), serde_json::json!({}));
    let mut answers = publisher.batched().publish_batch(events.clone()).await.unwrap();
    assert_eq!(answers.len(), 20);
    let returned = answers[5].as_mut().unwrap_err();
    assert_eq!(returned.kind(), ErrorKind::Rejected, "{returned}");
    assert_eq!(
        returned.take_event().map(|e| e.id().to_owned()).as_deref(),
        Some(events[5].id())
    );
    assert!(answers[11].is_err());
    let good: Vec<&str> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 5 && *i != 11)
        .map(|(_, e)| e.id())
        .collect();
    for (i, answer) in answers.iter().enumerate() {
        if i != 5 && i != 11 {
            assert_eq!(&*answer.as_ref().unwrap().event_id, events[i].id(), "{i}");
        }
    }
    assert_eq!(admin.depth(&queue).await, 18);
    assert_eq!(drain_ids(&admin, &queue).await, good);
    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}
