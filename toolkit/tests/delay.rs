//! Delayed delivery: honoured by the memory transport (never early),
//! refused with `Unsupported` by the transports that cannot delay, without
//! sending anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::mpsc;
use tower::service_fn;
use watchtower::prelude::*;
use watchtower::{delay, ext};
use watchtower_memory::MemoryBroker;
use watchtower_nats::{NatsClient, NatsConfig};
use watchtower_test_support::{unique, within};

/// Subscribes to `pattern` and sends each event with the wall-clock time it
/// reached the handler.
async fn recorder<S: Subscriber>(
    subscriber: &S,
    options: SubscribeOptions,
) -> (
    SubscriptionHandle,
    mpsc::UnboundedReceiver<(Event, OffsetDateTime)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = subscriber
        .subscribe_with(
            options,
            service_fn(move |event: Event| {
                let tx = tx.clone();
                async move {
                    tx.send((event, OffsetDateTime::now_utc())).unwrap();
                    Ok::<_, Error>(())
                }
            }),
        )
        .await
        .unwrap();
    (handle, rx)
}

#[tokio::test]
async fn the_memory_transport_delivers_a_delayed_event_no_earlier_than_asked() {
    let broker = MemoryBroker::new();
    let (handle, mut received) = recorder(
        &broker.subscriber(),
        SubscribeOptions::new(["reminder.*"]).unwrap(),
    )
    .await;
    let mut publisher = broker.publisher();
    let mut late = Event::new("reminder.late", serde_json::json!({"n": 1}));
    delay::set_delay(&mut late, Duration::from_millis(300));
    let due = delay::deliver_at(&late).unwrap().unwrap();
    let mut sooner = Event::new("reminder.sooner", serde_json::json!({"n": 2}));
    delay::set_delay(&mut sooner, Duration::from_millis(100));
    let sooner_due = delay::deliver_at(&sooner).unwrap().unwrap();
    let mut past = Event::new("reminder.past", serde_json::json!({"n": 3}));
    delay::set_deliver_at(&mut past, OffsetDateTime::UNIX_EPOCH);
    let now = Event::new("reminder.now", serde_json::json!({"n": 4}));
    for event in [late.clone(), sooner.clone(), past, now] {
        publisher.publish(event).await.unwrap();
    }
    // Held events count as outstanding: the broker is idle only after all
    // four were delivered and settled.
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    let mut got = Vec::new();
    while let Ok(item) = received.try_recv() {
        got.push(item);
    }
    let order: Vec<&str> = got.iter().map(|(e, _)| e.ty()).collect();
    assert_eq!(order.len(), 4, "{order:?}");
    assert_eq!(&order[2..], ["reminder.sooner", "reminder.late"], "{order:?}");
    for (event, at) in &got {
        assert_eq!(
            event.extension(ext::DELIVER_AT),
            None,
            "the mark is removed before delivery"
        );
        match event.ty() {
            "reminder.late" => assert!(*at >= due, "delivered at {at}, asked for {due}"),
            "reminder.sooner" => assert!(*at >= sooner_due, "delivered at {at}, asked for {sooner_due}"),
            _ => {}
        }
    }
    assert_eq!(
        got.iter()
            .find(|(e, _)| e.ty() == "reminder.late")
            .unwrap()
            .0
            .id(),
        late.id()
    );
    assert_eq!(handle.stop().await.unwrap().acked, 4);
}

#[tokio::test]
async fn a_malformed_delivery_time_is_refused_by_the_memory_transport() {
    let broker = MemoryBroker::new();
    let event = Event::new("reminder", serde_json::json!({}))
        .with_extension(ext::DELIVER_AT, "next tuesday")
        .unwrap();
    let error = broker.publisher().publish(event).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidEvent);
}

fn delayed(ty: &str) -> Event {
    let mut event = Event::new(ty.to_owned(), serde_json::json!({}));
    delay::set_delay(&mut event, Duration::from_secs(5));
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_a_delayed_event_and_sends_nothing() {
    let client = NatsClient::connect(NatsConfig::new(common::NATS)).await.unwrap();
    let topic = format!("{}.t", unique("tk_delay"));
    let (handle, mut received) =
        recorder(&client.subscriber(), SubscribeOptions::new([&topic]).unwrap()).await;
    let mut publisher = client.publisher();
    let mut error = publisher.publish(delayed(&topic)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unsupported);
    assert!(!error.is_retryable());
    assert!(
        error.to_string().contains("nats transport cannot delay"),
        "{error}"
    );
    assert!(error.take_event().is_some(), "the caller gets the event back");
    // The next event is the first the subscriber sees.
    let marker = Event::new(topic.clone(), serde_json::json!({"marker": true}));
    publisher.publish(marker.clone()).await.unwrap();
    let (first, _) = within("the marker", received.recv()).await.unwrap();
    assert_eq!(first.id(), marker.id());
    handle.stop().await.unwrap();
}

async fn zcard(key: &str) -> i64 {
    let mut conn = common::raw(common::REDIS).await;
    redis::cmd("ZCARD").arg(key).query_async(&mut conn).await.unwrap()
}

async fn xlen(key: &str) -> i64 {
    let mut conn = common::raw(common::REDIS).await;
    redis::cmd("XLEN").arg(key).query_async(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_delivers_a_delayed_event_no_earlier_than_asked() {
    let prefix = format!("{}:", unique("tk_delay"));
    let client = common::redis_client(&prefix).await;
    let (handle, mut received) = recorder(
        &client.subscriber_with(common::quick()).unwrap(),
        SubscribeOptions::new(["later", "now"])
            .unwrap()
            .group("g")
            .unwrap(),
    )
    .await;
    let mut publisher = client.publisher();
    let mut dues = Vec::new();
    for millis in [400, 150] {
        let mut event = Event::new("later", serde_json::json!({"after_ms": millis}));
        delay::set_delay(&mut event, Duration::from_millis(millis));
        dues.push((event.id().to_owned(), delay::deliver_at(&event).unwrap().unwrap()));
        let receipt = publisher.publish(event).await.unwrap();
        assert_eq!(receipt.message_id, None, "not in the stream yet");
    }
    let now = Event::new("now", serde_json::json!({}));
    publisher.publish(now.clone()).await.unwrap();
    let mut got = Vec::new();
    within("three events", async {
        while got.len() < 3 {
            got.push(received.recv().await.unwrap());
        }
    })
    .await;
    assert_eq!(got[0].0.id(), now.id(), "the undelayed event comes first");
    for (id, due) in &dues {
        let (event, at) = got.iter().find(|(e, _)| e.id() == id).unwrap();
        assert!(at >= due, "delivered at {at}, asked for {due}");
        assert_eq!(event.extension(ext::DELIVER_AT), None);
        assert_eq!(event.ty(), "later");
    }
    assert_eq!(zcard(&format!("{prefix}later#delayed")).await, 0);
    assert_eq!(xlen(&format!("{prefix}later")).await, 2);
    assert_eq!(handle.stop().await.unwrap().acked, 3);
    let bad = Event::new("later", serde_json::json!({}))
        .with_extension(ext::DELIVER_AT, "soon")
        .unwrap();
    assert_eq!(
        publisher.publish(bad).await.unwrap_err().kind(),
        ErrorKind::InvalidEvent
    );
    common::cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_events_of_publishers_dropped_at_once_are_each_moved_once() {
    const EACH: usize = 25;
    let prefix = format!("{}:", unique("tk_delay"));
    let clients = [
        common::redis_client(&prefix).await,
        common::redis_client(&prefix).await,
    ];
    let (handle, mut received) = recorder(
        &clients[0].subscriber_with(common::quick()).unwrap(),
        SubscribeOptions::new(["job"]).unwrap().group("g").unwrap(),
    )
    .await;
    // Each publisher is dropped as soon as it has published: the process's
    // mover still moves what they scheduled, each event once.
    let mut ids = std::collections::HashSet::new();
    for client in &clients {
        let mut publisher = client.publisher();
        for n in 0..EACH {
            let mut event = Event::new("job", serde_json::json!({"n": n}));
            delay::set_delay(&mut event, Duration::from_millis(200));
            ids.insert(event.id().to_owned());
            publisher.publish(event).await.unwrap();
        }
    }
    let mut seen = std::collections::HashSet::new();
    within("every delayed event", async {
        while seen.len() < 2 * EACH {
            let (event, _) = received.recv().await.unwrap();
            assert!(
                seen.insert(event.id().to_owned()),
                "{} delivered twice",
                event.id()
            );
        }
    })
    .await;
    assert_eq!(seen, ids);
    assert_eq!(
        xlen(&format!("{prefix}job")).await,
        2 * EACH as i64,
        "each moved once"
    );
    assert_eq!(zcard(&format!("{prefix}job#delayed")).await, 0);
    handle.stop().await.unwrap();
    common::cleanup(&prefix).await;
}
