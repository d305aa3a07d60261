//! Both CloudEvents content modes against the local Redis: what each
//! writes, that each round trips, and that an entry written by another
//! client in structured mode is read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::StreamExt as _;
use watchtower::{Error, Event, PublishExt, SubscribeOptions, Subscriber};
use watchtower_redis::{
    ContentMode, DeadLetter, RedisClient, RedisConfig, RedisPublisherOptions, RedisSubscriberOptions,
};
use watchtower_test_support::unique;

use common::{URL, cleanup, pending, raw, wait_entries};

const WAIT: Duration = Duration::from_secs(20);

async fn next<S, A>(subscription: &mut S) -> watchtower::Delivery<A>
where
    S: futures_core::Stream<Item = Result<watchtower::Delivery<A>, Error>> + Unpin,
    A: watchtower::Acker,
{
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("a delivery within the wait")
        .expect("subscription open")
        .expect("no subscription error")
}

fn sample(topic: &str, n: u32) -> Event {
    Event::builder(topic)
        .subject(format!("u-{n}"))
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": n}))
        .unwrap()
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_round_trip_to_one_subscriber_and_write_what_they_say() {
    let ns = unique("wtr_modes");
    let topic = format!("{ns}.user.created");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber();
    let mut subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let mut binary = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().content_mode(ContentMode::Binary))
        .unwrap();
    let mut structured = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().content_mode(ContentMode::Structured))
        .unwrap();
    let blob = Event::binary(topic.clone(), "application/octet-stream", &b"\x00\xff\x01"[..]);
    let sent = [
        sample(&topic, 1),
        sample(&topic, 2),
        blob.clone(),
        Event::empty(topic.clone()),
    ];
    binary.publish(sent[0].clone()).await.unwrap();
    structured.publish(sent[1].clone()).await.unwrap();
    structured.publish(sent[2].clone()).await.unwrap();
    structured.publish(sent[3].clone()).await.unwrap();

    for expected in &sent {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.event(), Some(expected));
        assert_eq!(delivery.topic(), topic.as_str());
        delivery.ack().await.unwrap();
    }

    let mut conn = raw(URL).await;
    let entries = wait_entries(&mut conn, &topic, "0").await;
    assert_eq!(entries.len(), 4);
    let names = |i: usize| entries[i].1.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>();
    assert!(names(0).contains(&"specversion") && names(0).contains(&"tenant"));
    assert!(!names(0).contains(&"content-type"));
    for (i, (_, fields)) in entries.iter().enumerate().skip(1) {
        assert_eq!(names(i), ["content-type", "data"]);
        assert_eq!(fields[0].1, b"application/cloudevents+json");
    }
    let document: serde_json::Value = serde_json::from_slice(&entries[1].1[1].1).unwrap();
    assert_eq!(document["specversion"], "1.0");
    assert_eq!(document["id"], sent[1].id());
    assert_eq!(document["tenant"], "acme");
    // The JSON payload is the document's `data` as it is, not a string.
    assert_eq!(document["data"], serde_json::json!({"user_id": 2}));
    let document: serde_json::Value = serde_json::from_slice(&entries[2].1[1].1).unwrap();
    assert_eq!(document["data_base64"], "AP8B");
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_event_added_by_another_client_is_read() {
    let ns = unique("wtr_foreign");
    let topic = format!("{ns}.order.placed");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber();
    let mut subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let mut conn = raw(URL).await;
    // As any CloudEvents SDK writes it, with the attributes in another
    // order than WatchTower's and the marker after the document.
    let json = r#"{"data":{"order":42,"items":["a","b"]},"type":"order.placed","source":"https://shop.example/orders","id":"A234-1234-1234","specversion":"1.0","time":"2026-01-02T03:04:05Z","datacontenttype":"application/json","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#;
    let _: String = redis::cmd("XADD")
        .arg(&topic)
        .arg("*")
        .arg("data")
        .arg(json)
        .arg("content-type")
        .arg("application/cloudevents+json; charset=utf-8")
        .query_async(&mut conn)
        .await
        .unwrap();
    let delivery = next(&mut subscription).await;
    let event = delivery.event().expect("an event, not poison");
    assert_eq!(event.id(), "A234-1234-1234");
    assert_eq!(event.ty(), "order.placed");
    assert_eq!(event.source(), "https://shop.example/orders");
    assert_eq!(event.datacontenttype(), Some("application/json"));
    assert_eq!(
        event.extension("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    let data: serde_json::Value = serde_json::from_slice(event.data().unwrap()).unwrap();
    assert_eq!(data, serde_json::json!({"order": 42, "items": ["a", "b"]}));
    assert_eq!(delivery.topic(), topic.as_str());
    delivery.ack().await.unwrap();
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_entry_is_dead_lettered_as_a_structured_entry_with_its_marks() {
    let ns = unique("wtr_modes_dlq");
    let topic = format!("{ns}.fragile");
    let dlq = format!("{ns}:dlq");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(
            RedisSubscriberOptions::new()
                .max_deliveries(Some(1))
                .dead_letter(DeadLetter::Stream(dlq.clone())),
        )
        .unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().content_mode(ContentMode::Structured))
        .unwrap();
    let doomed = sample(&topic, 9);
    publisher.publish(doomed.clone()).await.unwrap();
    next(&mut subscription).await.nack(None).await.unwrap();
    let mut conn = raw(URL).await;
    let entries = wait_entries(&mut conn, &dlq, "0").await;
    assert_eq!(entries.len(), 1);
    let fields = &entries[0].1;
    assert_eq!(fields.len(), 2);
    assert_eq!(fields[0].0, "content-type");
    let back = watchtower::codec::structured::from_slice(&fields[1].1).unwrap();
    assert_eq!(back.id(), doomed.id());
    assert_eq!(back.data(), doomed.data());
    assert_eq!(back.extension("tenant"), Some("acme"));
    assert_eq!(back.extension("deadlettertopic"), Some(topic.as_str()));
    assert_eq!(back.extension("attempt"), Some("2"));
    assert!(
        back.extension("deadletterreason")
            .unwrap()
            .contains("delivered 2 times")
    );
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}
