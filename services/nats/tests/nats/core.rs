//! Core NATS publish and subscribe against the local broker.

use std::future::poll_fn;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tower::{Service, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::health::Health;
use watchtower::{ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber, Transport, serve};
use watchtower_nats::{ContentMode, NatsClient, NatsConfig, SubjectTemplate};
use watchtower_test_support::{PATIENCE, unique};

use crate::support::{LOCAL, call_all, local, numbered};

async fn next_event(
    sub: &mut watchtower_nats::NatsSubscription,
) -> watchtower::Delivery<watchtower_nats::NatsAcker> {
    tokio::time::timeout(PATIENCE, sub.next())
        .await
        .expect("a delivery in time")
        .expect("subscription open")
        .expect("no stream error")
}

/// The event id of a structured-mode message, read as a plain client would.
fn body_id(message: &async_nats::Message) -> String {
    let body: serde_json::Value = serde_json::from_slice(&message.payload).expect("a JSON body");
    body["id"].as_str().expect("an id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_in_binary_mode_readable_by_plain_clients() {
    let client = local().await;
    let ns = unique("wt");
    let topic = format!("{ns}.user.created");
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.user.*")]).unwrap())
        .await
        .unwrap();
    let mut raw = client.raw().subscribe(format!("{ns}.>")).await.unwrap();
    client.round_trip().await.unwrap();

    let event = Event::builder(topic.clone())
        .subject("42")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": 42}))
        .unwrap()
        .build()
        .unwrap();
    let mut publisher = client.publisher().content_mode(ContentMode::Binary);
    let receipt = publisher.publish(event.clone()).await.unwrap();
    assert_eq!(&*receipt.topic, topic);
    assert_eq!(&*receipt.event_id, event.id());

    let delivery = next_event(&mut sub).await;
    assert_eq!(delivery.event(), Some(&event));
    assert_eq!(delivery.topic(), topic);
    assert_eq!(delivery.system(), "nats");
    assert_eq!(delivery.delivery_count(), 1);
    delivery.ack().await.unwrap();

    // What a client in another language sees: ce- headers and the JSON body.
    let message = tokio::time::timeout(PATIENCE, raw.next()).await.unwrap().unwrap();
    let headers = message.headers.expect("headers");
    assert_eq!(headers.get("ce-specversion").unwrap().as_str(), "1.0");
    assert_eq!(headers.get("ce-id").unwrap().as_str(), event.id());
    assert_eq!(headers.get("ce-type").unwrap().as_str(), topic);
    assert_eq!(headers.get("ce-subject").unwrap().as_str(), "42");
    assert_eq!(headers.get("ce-tenant").unwrap().as_str(), "acme");
    assert_eq!(
        headers.get("ce-datacontenttype").unwrap().as_str(),
        "application/json"
    );
    assert!(headers.get("ce-time").is_some());
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body, serde_json::json!({"user_id": 42}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_by_default_without_any_header() {
    let client = local().await;
    let ns = unique("wt");
    let topic = format!("{ns}.user.created");
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([topic.clone()]).unwrap())
        .await
        .unwrap();
    let mut raw = client.raw().subscribe(topic.clone()).await.unwrap();
    client.raw().flush().await.unwrap();

    let event = Event::builder(topic.clone())
        .subject("42")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": 42}))
        .unwrap()
        .build()
        .unwrap();
    let mut publisher = client.publisher();
    publisher.publish(event.clone()).await.unwrap();

    let delivery = next_event(&mut sub).await;
    assert_eq!(delivery.event(), Some(&event));
    assert_eq!(delivery.topic(), topic);

    // What a client in another language sees: one CloudEvents JSON object,
    // the payload inline, and no header block.
    let message = tokio::time::timeout(PATIENCE, raw.next()).await.unwrap().unwrap();
    assert!(
        message.headers.as_ref().is_none_or(|h| h.is_empty()),
        "{:?}",
        message.headers
    );
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body["specversion"], "1.0");
    assert_eq!(body["id"], event.id());
    assert_eq!(body["type"], topic.as_str());
    assert_eq!(body["subject"], "42");
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["datacontenttype"], "application/json");
    assert_eq!(body["data"], serde_json::json!({"user_id": 42}));
    assert!(body["time"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_hand_events_over_in_call_order() {
    let client = local().await;
    let subject = format!("{}.order", unique("wt"));
    let mut raw = client.raw().subscribe(subject.clone()).await.unwrap();
    client.round_trip().await.unwrap();
    let mut publisher = client.publisher();
    let events = numbered(&subject, 200);
    let futures = call_all(&mut publisher, &events).await;
    // Awaited last to first: the order on the wire is still that of the calls.
    for future in futures.into_iter().rev() {
        let receipt = future.await.unwrap();
        assert_eq!(&*receipt.topic, subject);
    }
    for event in &events {
        let message = tokio::time::timeout(PATIENCE, raw.next())
            .await
            .expect("a message in time")
            .expect("subscription open");
        assert_eq!(body_id(&message), event.id());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_task_publishing_in_a_loop_lets_other_tasks_run() {
    // Every publish finds room in the client's queue and is answered at
    // once; the answers still count against the task's cooperative budget,
    // so the loop yields and a task woken meanwhile (here: one spawned
    // before it; in practice the connection's writer) runs before the loop
    // ends, on a single thread.
    let client = local().await;
    let subject = format!("{}.coop", unique("wt"));
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let ran = ran.clone();
        async move { ran.store(true, std::sync::atomic::Ordering::Release) }
    });
    let mut publisher = client.publisher();
    let events = numbered(&subject, 1000);
    let mut seen_at = None;
    for (i, event) in events.into_iter().enumerate() {
        publisher.publish(event).await.unwrap();
        if seen_at.is_none() && ran.load(std::sync::atomic::Ordering::Acquire) {
            seen_at = Some(i);
        }
    }
    assert!(seen_at.is_some(), "the other task never ran during the loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_a_full_client_queue_wait_for_room_and_all_arrive() {
    // A queue of 4 messages: most calls find it full, leave their future
    // waiting for room, and must still be woken and sent.
    let client = NatsClient::connect(
        NatsConfig::new(LOCAL)
            .name("watchtower-nats-tests")
            .client_capacity(4),
    )
    .await
    .unwrap();
    let reader = local().await;
    let subject = format!("{}.full", unique("wt"));
    let mut raw = reader.raw().subscribe(subject.clone()).await.unwrap();
    // The subscription must be on the server before the first publish.
    reader.round_trip().await.unwrap();
    let mut publisher = client.publisher();
    let events = numbered(&subject, 500);
    let futures = call_all(&mut publisher, &events).await;
    let results = tokio::time::timeout(PATIENCE, futures_util::future::join_all(futures))
        .await
        .expect("every publish completes");
    assert_eq!(results.into_iter().filter(Result::is_ok).count(), events.len());
    client.raw().flush().await.unwrap();
    let mut ids = Vec::new();
    while ids.len() < events.len() {
        let message = tokio::time::timeout(PATIENCE, raw.next())
            .await
            .expect("a message in time")
            .expect("subscription open");
        ids.push(body_id(&message));
    }
    // Each exactly once (the order past a full queue is not promised).
    let mut sent: Vec<&str> = events.iter().map(Event::id).collect();
    sent.sort_unstable();
    ids.sort_unstable();
    assert_eq!(ids, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_template_and_explicit_topic() {
    let client = local().await;
    let ns = unique("wt");
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([format!("{ns}.>")]).unwrap())
        .await
        .unwrap();
    let mut publisher = client
        .publisher()
        .subject_template(SubjectTemplate::new(&format!("{ns}.events.{{topic}}")).unwrap());
    publisher
        .publish(Event::new("order.paid", serde_json::json!({})))
        .await
        .unwrap();
    publisher
        .publish(Event::new("order.paid", serde_json::json!({})).with_topic("audit"))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut sub).await.topic(),
        format!("{ns}.events.order.paid")
    );
    assert_eq!(next_event(&mut sub).await.topic(), format!("{ns}.events.audit"));

    // A topic that is no subject is refused before it reaches the wire.
    let err = publisher
        .publish(Event::new("bad topic", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_foreign_and_poison_messages() {
    let client = local().await;
    let ns = unique("wt");
    let topic = format!("{ns}.in");
    let sub = client
        .subscriber()
        .open(SubscribeOptions::new([topic.clone()]).unwrap())
        .await
        .unwrap();

    let structured = Event::new("order.paid", serde_json::json!({"amount": 5}));
    let body = watchtower::codec::structured::to_bytes(&structured).unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", watchtower::codec::CLOUDEVENTS_JSON);
    let raw = client.raw();
    raw.publish_with_headers(topic.clone(), headers, body.clone())
        .await
        .unwrap();
    raw.publish(topic.clone(), Bytes::from_static(b"\x00\xffnot an event"))
        .await
        .unwrap();
    // Binary mode without the required `ce-source`.
    let mut partial = async_nats::HeaderMap::new();
    partial.insert("ce-specversion", "1.0");
    partial.insert("ce-id", "1");
    partial.insert("ce-type", "x.y");
    raw.publish_with_headers(topic.clone(), partial, Bytes::new())
        .await
        .unwrap();
    raw.publish(topic.clone(), body).await.unwrap(); // structured, no header
    raw.flush().await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let dlq = MemoryDeadLetters::new(8);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(
            sub,
            service_fn(move |event: Event| {
                let sent = tx.send(event);
                async move { sent.map_err(|_| watchtower::Error::closed("test over")) }
            }),
        )
        .poison(dlq.clone())
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .into_future(),
    );
    for _ in 0..2 {
        let got = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap().unwrap();
        assert_eq!(got, structured);
    }
    tokio::time::timeout(PATIENCE, dlq.wait_for(2)).await.unwrap();
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!((stats.acked, stats.poisoned), (2, 2));
    let dead = dlq.drain();
    let garbage = dead
        .iter()
        .find(|e| e.data().map(|d| &d[..]) == Some(&b"\x00\xffnot an event"[..]))
        .expect("garbage kept with its raw bytes");
    assert_eq!(garbage.extension("deadletterkind"), Some("decode"));
    assert_eq!(garbage.extension("deadlettertopic"), Some(topic.as_str()));
    assert!(
        dead.iter()
            .any(|e| e.extension("deadletterreason").unwrap().contains("source"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_groups_split_and_every_group_gets_all() {
    let client = local().await;
    let ns = unique("wt");
    let topic = format!("{ns}.work");
    let subscriber = client.subscriber();
    assert!(!subscriber.capabilities().persistent);
    assert!(!subscriber.capabilities().redelivery);
    let group = |g: &str| SubscribeOptions::new([topic.clone()]).unwrap().group(g).unwrap();
    let mut a1 = subscriber.open(group("a")).await.unwrap();
    let mut a2 = subscriber.open(group("a")).await.unwrap();
    let mut b = subscriber.open(group("b")).await.unwrap();
    let mut publisher = client.publisher();
    for i in 0..200 {
        publisher
            .publish(Event::new(topic.clone(), serde_json::json!({ "i": i })))
            .await
            .unwrap();
    }
    for _ in 0..200 {
        next_event(&mut b).await;
    }
    let (mut n1, mut n2) = (0, 0);
    while n1 + n2 < 200 {
        tokio::select! {
            Some(d) = a1.next() => { d.unwrap(); n1 += 1 }
            Some(d) = a2.next() => { d.unwrap(); n2 += 1 }
            _ = tokio::time::sleep(PATIENCE) => panic!("group a got {} of 200", n1 + n2),
        }
    }
    assert!(n1 > 0 && n2 > 0, "members did not share: {n1} / {n2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_drops_are_reported() {
    let client = NatsClient::connect(NatsConfig::new(LOCAL).subscription_capacity(4))
        .await
        .unwrap();
    let ns = unique("wt");
    let topic = format!("{ns}.flood");
    let mut sub = client
        .subscriber()
        .open(SubscribeOptions::new([topic.clone()]).unwrap())
        .await
        .unwrap();
    // A subscription that keeps up on the same connection is not blamed.
    let calm_topic = format!("{ns}.calm");
    let mut calm = client
        .subscriber()
        .open(SubscribeOptions::new([calm_topic.clone()]).unwrap())
        .await
        .unwrap();
    let mut publisher = client.publisher();
    publisher
        .publish(Event::new(calm_topic.clone(), serde_json::json!({})))
        .await
        .unwrap();
    next_event(&mut calm).await;
    for i in 0..200 {
        publisher
            .publish(Event::new(topic.clone(), serde_json::json!({ "i": i })))
            .await
            .unwrap();
    }
    // The server delivers in publish order on one connection: once this
    // marker arrives, the client has handed on (or dropped) all 200.
    publisher
        .publish(Event::new(calm_topic, serde_json::json!({ "marker": true })))
        .await
        .unwrap();
    let marker = next_event(&mut calm).await;
    let marker = marker.event().expect("a decoded event");
    assert_eq!(marker.json::<serde_json::Value>().unwrap()["marker"], true);
    // Not reading while 200 arrived overflowed the buffer of 4.
    let mut received = 0u64;
    let mut dropped_error = None;
    while dropped_error.is_none() {
        match tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap() {
            Ok(_) => received += 1,
            Err(e) => dropped_error = Some(e),
        }
    }
    let e = dropped_error.unwrap();
    assert_eq!(e.kind(), ErrorKind::Dropped);
    assert!(e.to_string().contains("slow consumer"), "{e}");
    assert!(sub.dropped() > 0);
    assert!(sub.dropped() + received <= 200);
    // Drops may still be arriving: the connection counts each one before
    // the subscription does, so read the subscription's count first.
    let dropped = sub.dropped();
    assert!(client.stats().slow_consumer_drops >= dropped);
    assert_eq!(calm.dropped(), 0, "drops attributed to the wrong subscription");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_healthy_when_connected() {
    let client = local().await;
    assert_eq!(client.health().await, Health::up("nats"));
    assert!(client.is_connected());
    let mut publisher = client.publisher();
    poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
    assert!(publisher.client().health().await.is_up());
    assert!(client.stats().connects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_view_reports_the_client() {
    let client = local().await;
    let report = watchtower_layers::health::HealthView::new()
        .transport("events", client)
        .report()
        .await;
    assert_eq!(report.status, watchtower::health::Status::Up);
    assert_eq!(report.transports.len(), 1);
    assert_eq!(report.transports[0].name, "events");
    assert_eq!(report.transports[0].health, Health::up("nats"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_subscription_gets_what_another_connection_publishes_right_after() {
    // `open` returns once the server has the subscription: a message another
    // connection publishes at once must arrive, every time.
    let client = local().await;
    let other = local().await;
    let subscriber = client.subscriber();
    let ns = unique("wt");
    for i in 0..200 {
        let topic = format!("{ns}.{i}");
        let mut sub = subscriber
            .open(SubscribeOptions::new([topic.clone()]).unwrap())
            .await
            .unwrap();
        other
            .raw()
            .publish(topic.clone(), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        other.raw().flush().await.unwrap();
        // A message that is not an event arrives as a poison item: either
        // way, something must arrive.
        let item = tokio::time::timeout(PATIENCE, sub.next()).await;
        assert!(
            matches!(item, Ok(Some(_))),
            "iteration {i}: nothing arrived for a subscription opened before the publish"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_waits_for_a_raw_subscription() {
    let client = local().await;
    let other = local().await;
    let ns = unique("wt");
    for i in 0..200 {
        let topic = format!("{ns}.{i}");
        let mut raw = client.raw().subscribe(topic.clone()).await.unwrap();
        client.round_trip().await.unwrap();
        other
            .raw()
            .publish(topic.clone(), Bytes::from_static(b"x"))
            .await
            .unwrap();
        other.raw().flush().await.unwrap();
        let message = tokio::time::timeout(PATIENCE, raw.next())
            .await
            .unwrap_or_else(|_| panic!("iteration {i}: the message did not arrive"))
            .expect("subscription open");
        assert_eq!(&message.payload[..], b"x");
    }
}
