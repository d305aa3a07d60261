//! Publish and subscribe against the local RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::BasicProperties;
use lapin::types::AMQPValue;
use tower::service_fn;
use watchtower::Transport as _;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::health::Status;
use watchtower::{ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber, serve};
use watchtower_rabbitmq::{
    ContentMode, ExchangeKind, PublishOptions, QueueOptions, QueueOverflow, RabbitClient, RabbitConfig,
};
use watchtower_test_support::{unique, within};

use common::{Admin, URL, config};

async fn raw_get(admin: &Admin, queue: &str) -> lapin::message::Delivery {
    within("raw get", async {
        loop {
            if let Some(raw) = admin.get(queue).await {
                return raw;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

#[tokio::test]
async fn round_trip_in_structured_mode() {
    let exchange = unique("wt-rt-s");
    let admin = Admin::connect().await;
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["user.*"]).unwrap())
        .await
        .unwrap();
    let queue = admin.bound_queue(&exchange, "user.#").await;
    let mut publisher = common::publisher_with(
        config(&exchange),
        PublishOptions::new().content_mode(ContentMode::Structured),
    )
    .await
    .unwrap();

    let event = Event::builder("user.created")
        .subject("u-1")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": 1}))
        .unwrap()
        .build()
        .unwrap();
    let receipt = publisher.publish(event.clone()).await.unwrap();
    assert_eq!(&*receipt.event_id, event.id());

    let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
    assert_eq!(delivery.event(), Some(&event));
    assert_eq!(delivery.topic(), "user.created");
    delivery.ack().await.unwrap();

    // What another client sees: one CloudEvents JSON object, no header
    // table, the payload spliced in as JSON.
    let raw = raw_get(&admin, &queue).await;
    let props = &raw.properties;
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/cloudevents+json"
    );
    assert_eq!(props.headers(), &None);
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), event.id());
    assert_eq!(props.delivery_mode(), &Some(2));
    let json: serde_json::Value = serde_json::from_slice(&raw.data).unwrap();
    assert_eq!(json["specversion"], "1.0");
    assert_eq!(json["id"], event.id());
    assert_eq!(json["type"], "user.created");
    assert_eq!(json["subject"], "u-1");
    assert_eq!(json["tenant"], "acme");
    assert_eq!(json["datacontenttype"], "application/json");
    assert_eq!(json["data"], serde_json::json!({"user_id": 1}));

    drop(subscription);
    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

/// One subscription reads both modes, from WatchTower publishers and from
/// hand-written foreign messages alike.
#[tokio::test]
async fn a_subscriber_reads_both_content_modes() {
    let exchange = unique("wt-modes");
    let admin = Admin::connect().await;
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["m.*"]).unwrap())
        .await
        .unwrap();
    let mut sent = Vec::new();
    for mode in [ContentMode::Structured, ContentMode::Binary] {
        let mut publisher =
            common::publisher_with(config(&exchange), PublishOptions::new().content_mode(mode))
                .await
                .unwrap();
        let event = Event::new("m.ours", serde_json::json!({"mode": format!("{mode:?}")}));
        publisher.publish(event.clone()).await.unwrap();
        sent.push(event);
    }
    let foreign_structured =
        br#"{"specversion":"1.0","id":"f-1","type":"m.foreign","source":"/other","data":{"n":1}}"#;
    admin
        .publish_raw(
            &exchange,
            "m.foreign",
            BasicProperties::default().with_content_type("application/cloudevents+json".into()),
            foreign_structured,
        )
        .await;
    let mut headers = lapin::types::FieldTable::default();
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "f-2"),
        ("cloudEvents_type", "m.foreign"),
        ("cloudEvents_source", "/other"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    admin
        .publish_raw(
            &exchange,
            "m.foreign",
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(headers),
            br#"{"n":2}"#,
        )
        .await;

    let mut got = Vec::new();
    for _ in 0..4 {
        let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
        got.push(delivery.event().cloned().expect("decoded"));
        delivery.ack().await.unwrap();
    }
    assert_eq!(&got[..2], &sent[..]);
    assert_eq!((got[2].id(), got[2].source()), ("f-1", "/other"));
    assert_eq!(got[2].data().map(|d| &d[..]), Some(&br#"{"n":1}"#[..]));
    assert_eq!((got[3].id(), got[3].source()), ("f-2", "/other"));
    assert_eq!(got[3].data().map(|d| &d[..]), Some(&br#"{"n":2}"#[..]));
    assert_eq!(got[3].datacontenttype(), Some("application/json"));

    drop(subscription);
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn round_trip_in_binary_mode_by_default() {
    let exchange = unique("wt-rt");
    let admin = Admin::connect().await;
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["user.*"]).unwrap())
        .await
        .unwrap();
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();

    let event = Event::builder("user.created")
        .subject("u-1")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": 1}))
        .unwrap()
        .build()
        .unwrap();
    let receipt = publisher.publish(event.clone()).await.unwrap();
    assert_eq!(&*receipt.topic, "user.created");
    assert_eq!(&*receipt.event_id, event.id());
    assert_eq!(receipt.stream.as_deref(), Some(exchange.as_str()));

    let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
    assert_eq!(delivery.event(), Some(&event));
    assert_eq!(delivery.topic(), "user.created");
    assert_eq!(delivery.delivery_count(), 1);
    assert_eq!(delivery.system(), "rabbitmq");
    delivery.ack().await.unwrap();

    // What another client sees: the AMQP binding of CloudEvents.
    let queue = admin.bound_queue(&exchange, "user.#").await;
    publisher.publish(event.clone()).await.unwrap();
    let raw = raw_get(&admin, &queue).await;
    let props = &raw.properties;
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), event.id());
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        *props.timestamp(),
        Some(event.time().unwrap().unix_timestamp() as u64)
    );
    let headers = props.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get("cloudEvents_type"),
        Some(&AMQPValue::LongString("user.created".into()))
    );
    assert_eq!(
        headers.get("cloudEvents_tenant"),
        Some(&AMQPValue::LongString("acme".into()))
    );
    assert_eq!(
        headers.get("cloudEvents_specversion"),
        Some(&AMQPValue::LongString("1.0".into()))
    );
    assert_eq!(raw.data, event.data().unwrap().to_vec());

    drop(subscription);
    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn unroutable_event_is_rejected_not_lost() {
    let exchange = unique("wt-unroutable");
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();
    let err = publisher
        .publish(Event::new("nobody.listens", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("nobody.listens"), "{err}");
    assert!(err.event().is_some());

    // Without `mandatory`, the broker drops it and says yes.
    let mut lax = common::publisher_with(config(&exchange), PublishOptions::new().mandatory(false))
        .await
        .unwrap();
    lax.publish(Event::new("nobody.listens", serde_json::json!({})))
        .await
        .unwrap();
    Admin::connect().await.delete_exchange(&exchange).await;
}

/// With an alternate exchange, an event no binding routes is confirmed
/// once it is in the alternate queue: kept, without `mandatory`.
#[tokio::test]
async fn alternate_exchange_keeps_unroutable_events() {
    let exchange = unique("wt-ae");
    let alternate = format!("{exchange}.unroutable");
    let admin = Admin::connect().await;
    let with_alternate = config(&exchange).alternate_exchange(&alternate);
    let mut publisher = common::publisher(with_alternate.clone()).await.unwrap();
    let routed_queue = admin.bound_queue(&exchange, "routed.*").await;

    let lost = Event::new("nobody.listens", serde_json::json!({"n": 1}));
    let routed = Event::new("routed.x", serde_json::json!({"n": 2}));
    publisher.publish(lost.clone()).await.unwrap();
    publisher.publish(routed.clone()).await.unwrap();
    // Confirmed means stored: each is in its queue now.
    let kept = admin
        .get(&alternate)
        .await
        .expect("kept by the alternate exchange");
    assert_eq!(kept.properties.message_id().as_ref().unwrap().as_str(), lost.id());
    assert_eq!(kept.routing_key.as_str(), "nobody.listens");
    assert_eq!(admin.depth(&alternate).await, 0);
    let got = admin.get(&routed_queue).await.expect("routed");
    assert_eq!(
        got.properties.message_id().as_ref().unwrap().as_str(),
        routed.id()
    );

    // The broker refuses the argument on an exchange that exists without it.
    let plain = unique("wt-ae-plain");
    drop(common::publisher(config(&plain)).await.unwrap());
    let err = common::publisher(config(&plain).alternate_exchange(&alternate))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let err = common::publisher(config(&plain).alternate_exchange(&plain))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);

    admin.delete_queue(&routed_queue).await;
    admin.delete_queue(&alternate).await;
    admin.delete_exchange(&exchange).await;
    admin.delete_exchange(&alternate).await;
    admin.delete_exchange(&plain).await;
    admin.close().await;
}

#[tokio::test]
async fn zero_token_matches_of_hash_are_filtered_out() {
    let exchange = unique("wt-filter");
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["user.>"]).unwrap())
        .await
        .unwrap();
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();
    // `user.#` routes `user` too; `user.>` must not see it.
    publisher
        .publish(Event::new("user", serde_json::json!({})))
        .await
        .unwrap();
    let deep = Event::new("user.profile.updated", serde_json::json!({}));
    publisher.publish(deep.clone()).await.unwrap();
    let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
    assert_eq!(delivery.event(), Some(&deep));
    delivery.ack().await.unwrap();
    Admin::connect().await.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn classic_nack_counts_and_reject_dead_letters() {
    let exchange = unique("wt-classic");
    let dlx = format!("{exchange}.dlx");
    let dlq = format!("{exchange}.dlq");
    let queue_options = QueueOptions::new()
        .dead_letter_exchange(&dlx)
        .dead_letter_queue(&dlq);
    let subscriber = common::subscriber_with(config(&exchange), queue_options)
        .await
        .unwrap();
    let options = SubscribeOptions::new(["job.*"])
        .unwrap()
        .group("workers")
        .unwrap();
    let mut subscription = subscriber.open(options).await.unwrap();
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();
    let event = Event::new("job.run", serde_json::json!({"n": 1}));
    publisher.publish(event.clone()).await.unwrap();

    let mut counts = Vec::new();
    for _ in 0..2 {
        let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
        counts.push(delivery.delivery_count());
        delivery.nack(None).await.unwrap();
    }
    let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
    counts.push(delivery.delivery_count());
    assert_eq!(counts, [1, 2, 3]);
    delivery.reject().await.unwrap();

    // The DLQ holds it, with the broker's reason readable.
    let dead_subscriber = common::subscriber_with(
        config(&exchange).exchange(&dlx, ExchangeKind::Topic),
        QueueOptions::new().queue(&dlq).passive(true),
    )
    .await
    .unwrap();
    let mut dead = dead_subscriber
        .open(SubscribeOptions::new([">"]).unwrap())
        .await
        .unwrap();
    let delivery = within("dead letter", dead.next()).await.unwrap().unwrap();
    let got = delivery.event().unwrap();
    assert_eq!(got.id(), event.id());
    assert_eq!(got.data(), event.data());
    assert_eq!(got.extension(ext::DEAD_LETTER_KIND), Some("rejected"));
    assert_eq!(got.extension(ext::DEAD_LETTER_TOPIC), Some("job.run"));
    delivery.ack().await.unwrap();

    drop((subscription, dead));
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("workers")).await;
    admin.delete_queue(&dlq).await;
    admin.delete_exchange(&dlx).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn quorum_delivery_limit_sends_to_dlx_with_x_death() {
    let exchange = unique("wt-quorum");
    let dlx = format!("{exchange}.dlx");
    let dlq = format!("{exchange}.dlq");
    let queue_options = QueueOptions::new()
        .quorum(true)
        .delivery_limit(2)
        .dead_letter_exchange(&dlx)
        .dead_letter_queue(&dlq);
    let subscriber = common::subscriber_with(config(&exchange), queue_options)
        .await
        .unwrap();
    let options = SubscribeOptions::new(["pay.*"]).unwrap().group("payers").unwrap();
    let mut subscription = subscriber.open(options).await.unwrap();
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();
    let event = Event::new("pay.charge", serde_json::json!({"amount": 5}));
    publisher.publish(event.clone()).await.unwrap();

    // Rejected (nacked) more often than the limit allows.
    let mut counts = Vec::new();
    for _ in 0..3 {
        let delivery = within("delivery", subscription.next()).await.unwrap().unwrap();
        assert_eq!(delivery.event().map(Event::id), Some(event.id()));
        counts.push(delivery.delivery_count());
        delivery.nack(None).await.unwrap();
    }
    assert_eq!(counts, [1, 2, 3]);

    let dead_subscriber = common::subscriber_with(
        config(&exchange).exchange(&dlx, ExchangeKind::Topic),
        QueueOptions::new().queue(&dlq).passive(true),
    )
    .await
    .unwrap();
    let mut dead = dead_subscriber
        .open(SubscribeOptions::new([">"]).unwrap())
        .await
        .unwrap();
    let delivery = within("dead letter", dead.next()).await.unwrap().unwrap();
    let got = delivery.event().unwrap().clone();
    assert_eq!(got.id(), event.id());
    assert_eq!(got.extension(ext::DEAD_LETTER_KIND), Some("delivery_limit"));
    assert!(
        got.extension(ext::DEAD_LETTER_REASON)
            .unwrap()
            .contains("delivery_limit")
    );
    delivery.ack().await.unwrap();

    // It can be published again (redrive): back on its original topic.
    let mut redriven = got.clone();
    redriven.set_topic(got.extension(ext::DEAD_LETTER_TOPIC).unwrap().to_owned());
    publisher.publish(redriven).await.unwrap();
    let delivery = within("redriven", subscription.next()).await.unwrap().unwrap();
    assert_eq!(delivery.event().map(Event::id), Some(event.id()));
    delivery.ack().await.unwrap();

    drop((subscription, dead));
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("payers")).await;
    admin.delete_queue(&dlq).await;
    admin.delete_exchange(&dlx).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn poison_goes_to_the_poison_path_and_the_consumer_goes_on() {
    let exchange = unique("wt-poison");
    let admin = Admin::connect().await;
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let subscription = subscriber
        .open(SubscribeOptions::new(["in.*"]).unwrap())
        .await
        .unwrap();
    let garbage: &[u8] = b"\xff\xfe not an event";
    admin
        .publish_raw(&exchange, "in.raw", BasicProperties::default(), garbage)
        .await;
    // Structured mode claimed, but the JSON is broken.
    admin
        .publish_raw(
            &exchange,
            "in.structured",
            BasicProperties::default().with_content_type("application/cloudevents+json".into()),
            b"{\"specversion\":",
        )
        .await;
    let good = Event::new("in.good", serde_json::json!({}));
    common::publisher(config(&exchange))
        .await
        .unwrap()
        .publish(good.clone())
        .await
        .unwrap();

    let poison = MemoryDeadLetters::new(8);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let _ = tx.send(event);
                async { Ok::<_, watchtower::Error>(()) }
            }),
        )
        .poison(poison.clone())
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .into_future(),
    );
    assert_eq!(within("good event", rx.recv()).await, Some(good));
    within("poison", poison.wait_for(2)).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!((stats.poisoned, stats.acked), (2, 1));
    let mut bodies: Vec<Bytes> = poison
        .drain()
        .iter()
        .map(|e| e.data().cloned().unwrap())
        .collect();
    bodies.sort();
    assert_eq!(
        bodies,
        [
            Bytes::from_static(b"{\"specversion\":"),
            Bytes::from_static(garbage)
        ]
    );
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn full_queue_with_reject_publish_nacks_the_publisher() {
    let exchange = unique("wt-full");
    let subscriber = common::subscriber_with(
        config(&exchange),
        QueueOptions::new()
            .max_length(1)
            .overflow(QueueOverflow::RejectPublish),
    )
    .await
    .unwrap();
    let subscription = subscriber
        .open(SubscribeOptions::new(["q.*"]).unwrap().group("tiny").unwrap())
        .await
        .unwrap();
    // Stop consuming so the queue fills.
    drop(subscription);
    let mut publisher = common::publisher(config(&exchange)).await.unwrap();
    publisher
        .publish(Event::new("q.one", serde_json::json!({})))
        .await
        .unwrap();
    let err = publisher
        .publish(Event::new("q.two", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.is_retryable(), "a full queue may drain: {err}");
    let admin = Admin::connect().await;
    assert_eq!(admin.depth(&subscriber.group_queue("tiny")).await, 1);
    admin.delete_queue(&subscriber.group_queue("tiny")).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn message_ttl_expires_into_the_dead_letter_queue() {
    let exchange = unique("wt-ttl");
    let dlx = format!("{exchange}.dlx");
    let dlq = format!("{exchange}.dlq");
    let subscriber = common::subscriber_with(
        config(&exchange),
        QueueOptions::new()
            .dead_letter_exchange(&dlx)
            .dead_letter_queue(&dlq),
    )
    .await
    .unwrap();
    drop(
        subscriber
            .open(SubscribeOptions::new(["t.*"]).unwrap().group("idle").unwrap())
            .await
            .unwrap(),
    );
    let mut publisher = common::publisher_with(
        config(&exchange),
        PublishOptions::new().message_ttl(Duration::from_millis(1)),
    )
    .await
    .unwrap();
    let event = Event::new("t.short", serde_json::json!({}));
    publisher.publish(event.clone()).await.unwrap();
    let dead_subscriber = common::subscriber_with(
        config(&exchange).exchange(&dlx, ExchangeKind::Topic),
        QueueOptions::new().queue(&dlq).passive(true),
    )
    .await
    .unwrap();
    let mut dead = dead_subscriber
        .open(SubscribeOptions::new([">"]).unwrap())
        .await
        .unwrap();
    let delivery = within("expired", dead.next()).await.unwrap().unwrap();
    assert_eq!(delivery.event().map(Event::id), Some(event.id()));
    assert_eq!(
        delivery.event().unwrap().extension(ext::DEAD_LETTER_KIND),
        Some("expired")
    );
    delivery.ack().await.unwrap();
    drop(dead);
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("idle")).await;
    admin.delete_queue(&dlq).await;
    admin.delete_exchange(&dlx).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn serve_acks_everything_in_batches() {
    let exchange = unique("wt-batch");
    let subscriber = common::subscriber_with(config(&exchange), QueueOptions::new().prefetch(64))
        .await
        .unwrap();
    let options = SubscribeOptions::new(["b.*"]).unwrap().group("batch").unwrap();
    let subscription = subscriber.open(options).await.unwrap();
    let publisher = common::publisher(config(&exchange)).await.unwrap();
    let n = 2000;
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let mut publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 8 {
                publisher
                    .publish(Event::new("b.x", serde_json::json!({"i": chunk * 1000 + i})))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let _ = tx.send(event.id().to_owned());
                async { Ok::<_, watchtower::Error>(()) }
            }),
        )
        .concurrency(32)
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .into_future(),
    );
    let mut ids = std::collections::HashSet::new();
    while ids.len() < n {
        ids.insert(within("events", rx.recv()).await.unwrap());
    }
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(stats.acked, n as u64);
    // Every ack reached the broker: a new member finds nothing.
    let admin = Admin::connect().await;
    let queue = subscriber.group_queue("batch");
    let mut again = subscriber
        .open(SubscribeOptions::new(["b.*"]).unwrap().group("batch").unwrap())
        .await
        .unwrap();
    publisher
        .clone()
        .publish(Event::new("b.marker", serde_json::json!({})))
        .await
        .unwrap();
    let next = within("marker", again.next()).await.unwrap().unwrap();
    assert_eq!(next.event().unwrap().ty(), "b.marker", "an acked event came back");
    next.ack().await.unwrap();
    drop(again);
    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn bad_configuration_fails_at_construction() {
    // Nothing listens on port 1.
    let err = common::publisher(RabbitConfig::new("amqp://guest:guest@127.0.0.1:1/%2f"))
        .await
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err}"
    );

    let err = common::subscriber(RabbitConfig::new(URL).credentials("guest", "wrong-s3cret"))
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("wrong-s3cret"), "{err}");
    assert!(!format!("{err:?}").contains("wrong-s3cret"));

    let err = common::publisher(config(&unique("wt-absent")).passive_exchange(true))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");

    let contradictory = unique("wt-x");
    let err = common::subscriber_with(config(&contradictory), QueueOptions::new().delivery_limit(3))
        .await
        .unwrap()
        .open(SubscribeOptions::new(["x.y"]).unwrap())
        .await
        .unwrap_err();
    Admin::connect().await.delete_exchange(&contradictory).await;
    assert_eq!(err.kind(), ErrorKind::Config);

    let err = RabbitClient::connect(RabbitConfig::new("amqp://guest:pw@[::1"))
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("pw"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Config);

    // A headers exchange routes on the binary-mode headers.
    let headers = config(&unique("wt-hdr")).exchange(&unique("wt-hdr"), ExchangeKind::Headers);
    let err = common::publisher_with(
        headers,
        PublishOptions::new().content_mode(ContentMode::Structured),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");

    // A queue that exists with other arguments.
    let exchange = unique("wt-mismatch");
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    drop(
        subscriber
            .open(SubscribeOptions::new(["m.*"]).unwrap().group("g").unwrap())
            .await
            .unwrap(),
    );
    let quorum = common::subscriber_with(config(&exchange), QueueOptions::new().quorum(true))
        .await
        .unwrap();
    let err = quorum
        .open(SubscribeOptions::new(["m.*"]).unwrap().group("g").unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("g")).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test]
async fn direct_exchange_refuses_wildcards_and_routes_exact_keys() {
    let exchange = unique("wt-direct");
    let cfg = config(&exchange).exchange(&exchange, ExchangeKind::Direct);
    let subscriber = common::subscriber(cfg.clone()).await.unwrap();
    let err = subscriber
        .open(SubscribeOptions::new(["a.*"]).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["a.b"]).unwrap())
        .await
        .unwrap();
    let mut publisher = common::publisher(cfg).await.unwrap();
    let event = Event::new("a.b", serde_json::json!({}));
    publisher.publish(event.clone()).await.unwrap();
    let err = publisher
        .publish(Event::new("a.c", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    let delivery = within("direct", subscription.next()).await.unwrap().unwrap();
    assert_eq!(delivery.event(), Some(&event));
    delivery.ack().await.unwrap();
    Admin::connect().await.delete_exchange(&exchange).await;
}

#[tokio::test]
async fn health_reports_the_connection() {
    let exchange = unique("wt-health");
    let client = RabbitClient::connect(config(&exchange)).await.unwrap();
    let health = client.health().await;
    assert_eq!(health.status(), Status::Up);
    assert_eq!(health.system(), "rabbitmq");
    let publisher = client.publisher().await.unwrap();
    publisher.close();
    let mut p = publisher.clone();
    let err = within("closed", p.publish(Event::new("h.x", serde_json::json!({}))))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    client.close();
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down);
    assert!(!health.reason().unwrap_or_default().contains("guest"));
    Admin::connect().await.delete_exchange(&exchange).await;
}
