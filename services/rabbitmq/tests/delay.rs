//! Delayed delivery on RabbitMQ through per-delay TTL queues: never
//! early, in delay order across buckets, without the mark or dead-letter
//! annotations, and kept by the broker across a consumer restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tower::service_fn;
use watchtower::prelude::*;
use watchtower::{delay, ext};
use watchtower_rabbitmq::{RabbitClient, RabbitPublisher};
use watchtower_test_support::{unique, within};

/// Serves group `group` on `topic`, sending each event with the instant
/// it reached the handler.
async fn recorder(
    client: &RabbitClient,
    topic: &str,
    group: &str,
) -> (SubscriptionHandle, mpsc::UnboundedReceiver<(Event, Instant)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = client
        .subscriber()
        .subscribe_with(
            SubscribeOptions::new([topic]).unwrap().group(group).unwrap(),
            service_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send((event, Instant::now())).unwrap();
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .unwrap();
    (handle, rx)
}

/// A client on a fresh exchange (and its name), a recorder serving group
/// `group` on `topic`, and a publisher.
async fn fresh(
    topic: &str,
    group: &str,
) -> (
    String,
    RabbitClient,
    (SubscriptionHandle, mpsc::UnboundedReceiver<(Event, Instant)>),
    RabbitPublisher,
) {
    let exchange = unique("rmq_delay");
    let client = RabbitClient::connect(common::config(&exchange)).await.unwrap();
    let recorded = recorder(&client, topic, group).await;
    let publisher = client.publisher().await.unwrap();
    (exchange, client, recorded, publisher)
}

/// Publishes `event` delayed by `by`, returning the instant taken before
/// the delay was set: the event must not arrive before it plus `by`.
async fn publish_delayed(publisher: &mut RabbitPublisher, mut event: Event, by: Duration) -> Instant {
    let before = Instant::now();
    delay::set_delay(&mut event, by);
    publisher.publish(event).await.unwrap();
    before
}

async fn cleanup(exchange: &str, queues: impl IntoIterator<Item = String>) {
    let admin = common::Admin::connect().await;
    for queue in queues {
        admin.delete_queue(&queue).await;
    }
    admin.delete_exchange(exchange).await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_events_arrive_no_earlier_than_asked_in_delay_order_and_unmarked() {
    let (exchange, client, (handle, mut received), mut publisher) = fresh("reminder.*", "g").await;

    // Ascending delays in three buckets, published in that order.
    let mut due = Vec::new();
    for (n, millis) in [300u64, 600, 900].into_iter().enumerate() {
        let event = Event::new("reminder.later", serde_json::json!({"n": n}));
        let id = event.id().to_owned();
        let by = Duration::from_millis(millis);
        let before = publish_delayed(&mut publisher, event, by).await;
        due.push((id, before + by));
    }
    let mut past = Event::new("reminder.past", serde_json::json!({}));
    delay::set_deliver_at(&mut past, OffsetDateTime::UNIX_EPOCH);
    publisher.publish(past.clone()).await.unwrap();
    let now = Event::new("reminder.now", serde_json::json!({}));
    publisher.publish(now.clone()).await.unwrap();

    let mut got = Vec::new();
    within("five events", async {
        while got.len() < 5 {
            got.push(received.recv().await.unwrap());
        }
    })
    .await;
    let order: Vec<&str> = got.iter().map(|(e, _)| e.id()).collect();
    let undelayed: HashSet<&str> = order[..2].iter().copied().collect();
    assert_eq!(undelayed, HashSet::from([past.id(), now.id()]), "{order:?}");
    let delayed: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(&order[2..], delayed, "in delay order");
    for ((event, at), (_, due)) in got[2..].iter().zip(&due) {
        assert!(at >= due, "{} arrived {:?} early", event.id(), *due - *at);
        assert_eq!(event.topic(), "reminder.later");
        assert_eq!(event.extension(ext::DELIVER_AT), None, "the mark is removed");
        assert_eq!(
            event.extension(ext::DEAD_LETTER_REASON),
            None,
            "not a dead letter"
        );
        assert_eq!(event.extension(ext::DEAD_LETTER_TOPIC), None);
    }
    assert_eq!(got[0].0.extension(ext::DELIVER_AT), None);
    assert_eq!(
        publisher.delay_queues().len(),
        3,
        "{:?}",
        publisher.delay_queues()
    );
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 5);
    let mut queues = publisher.delay_queues();
    queues.push(client.subscriber().group_queue("g"));
    cleanup(&exchange, queues).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_events_wait_on_the_broker_across_a_consumer_restart() {
    const EVENTS: usize = 50;
    // The group's queue is bound; then its consumer goes away.
    let (exchange, client, (handle, _), mut publisher) = fresh("job", "workers").await;
    handle.stop().await.unwrap();
    let mut sent = HashSet::new();
    let mut due = std::collections::HashMap::new();
    for n in 0..EVENTS {
        let event = Event::new("job", serde_json::json!({"n": n}));
        sent.insert(event.id().to_owned());
        let id = event.id().to_owned();
        // Two buckets, so that both kinds of queue are exercised.
        let by = Duration::from_millis(if n % 2 == 0 { 700 } else { 1_000 });
        let before = publish_delayed(&mut publisher, event, by).await;
        due.insert(id, before + by);
    }
    // A new consumer on a connection of its own (another process, as far
    // as the broker knows) takes over.
    let restarted = RabbitClient::connect(common::config(&exchange)).await.unwrap();
    let (handle, mut received) = recorder(&restarted, "job", "workers").await;
    let mut seen = HashSet::new();
    within("every delayed event", async {
        while seen.len() < EVENTS {
            let (event, at) = received.recv().await.unwrap();
            assert!(at >= due[event.id()], "{} arrived early", event.id());
            assert!(seen.insert(event.id().to_owned()), "{} twice", event.id());
        }
    })
    .await;
    assert_eq!(seen, sent);
    assert_eq!(handle.stop().await.unwrap().acked, EVENTS as u64);
    let mut queues = publisher.delay_queues();
    assert_eq!(queues.len(), 2, "{queues:?}");
    queues.push(client.subscriber().group_queue("workers"));
    cleanup(&exchange, queues).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_delivery_time_is_refused_and_nothing_is_sent() {
    let (exchange, client, (handle, mut received), mut publisher) = fresh("t", "g").await;
    let bad = Event::new("t", serde_json::json!({}))
        .with_extension(ext::DELIVER_AT, "next tuesday")
        .unwrap();
    let error = publisher.publish(bad).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidEvent);
    let mut far = Event::new("t", serde_json::json!({}));
    delay::set_delay(&mut far, Duration::from_secs(60 * 86_400));
    let mut error = publisher.publish(far.clone()).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    let back = error.take_event().unwrap();
    assert_eq!(back.id(), far.id());
    assert!(
        back.extension(ext::DELIVER_AT).is_some(),
        "the caller gets the event as it was"
    );
    let marker = Event::new("t", serde_json::json!({"marker": true}));
    publisher.publish(marker.clone()).await.unwrap();
    let (first, _) = within("the marker", received.recv()).await.unwrap();
    assert_eq!(first.id(), marker.id(), "nothing else was sent");
    assert!(publisher.delay_queues().is_empty());
    handle.stop().await.unwrap();
    cleanup(&exchange, [client.subscriber().group_queue("g")]).await;
}
