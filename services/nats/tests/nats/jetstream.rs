//! JetStream publish and subscribe against the local broker.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::ServiceExt as _;
use watchtower::{ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber};
use watchtower_nats::{ConsumerSettings, ContentMode, JetStreamSubscription};
use watchtower_test_support::{PATIENCE, unique};

use crate::support::{call_all, local, numbered, stream};

pub(crate) async fn next(
    sub: &mut JetStreamSubscription,
) -> watchtower::Delivery<watchtower_nats::JetStreamAcker> {
    loop {
        match tokio::time::timeout(PATIENCE, sub.next())
            .await
            .expect("a delivery in time")
        {
            Some(Ok(d)) => return d,
            // A missed heartbeat while the test waits is not a failure.
            Some(Err(e)) if e.kind() == ErrorKind::Connection => continue,
            other => panic!("subscription: {:?}", other.map(|r| r.map(|_| ()))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_carries_stream_sequence_and_dedups_by_event_id() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let mut publisher = client.jetstream_publisher();
    let first = Event::new(format!("{name}.a"), serde_json::json!({"n": 1}));
    let r1 = publisher.publish(first.clone()).await.unwrap();
    let r2 = publisher
        .publish(Event::new(format!("{name}.a"), serde_json::json!({"n": 2})))
        .await
        .unwrap();
    assert_eq!(r1.stream.as_deref(), Some(name.as_str()));
    assert_eq!((r1.sequence, r2.sequence), (Some(1), Some(2)));
    assert!(!r1.duplicate);
    // The same event again (a retry) is recognised and not stored twice.
    let again = publisher.publish(first.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.sequence, Some(1));
    assert_eq!(client.stream_messages(&name).await.unwrap(), 2);

    // No stream captures this subject.
    let err = publisher
        .publish(Event::new(unique("nostream."), serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    // On a cluster the same answer comes while a stream elects a leader.
    assert!(err.is_retryable());
    client.delete_stream(&name).await.unwrap();
}

/// Without deduplication a structured event goes out bare, as a raw
/// publish of its body: no header is stored, a retried event is stored
/// again (the trade-off the option documents), and it reads back equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deduplication_events_carry_no_header_and_a_retry_is_stored_again() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let mut publisher = client.jetstream_publisher().deduplicate(false);
    let event = Event::new(format!("{name}.a"), serde_json::json!({"n": 1}));
    let r1 = publisher.publish(event.clone()).await.unwrap();
    let r2 = publisher.publish(event.clone()).await.unwrap();
    assert_eq!((r1.sequence, r1.duplicate), (Some(1), false));
    assert_eq!((r2.sequence, r2.duplicate), (Some(2), false));
    assert_eq!(client.stream_messages(&name).await.unwrap(), 2);
    let stored = client.raw_jetstream().get_stream(&name).await.unwrap();
    let first = stored.get_raw_message(1).await.unwrap();
    assert_eq!(first.headers.iter().count(), 0);
    assert_eq!(
        watchtower::codec::structured::from_bytes(&first.payload).unwrap(),
        event
    );
    // A clone keeps the choice.
    let mut clone = publisher.clone();
    assert_eq!(clone.publish(event).await.unwrap().sequence, Some(3));
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_content_modes_store_the_dedup_id_and_read_back_equal() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let event = Event::builder(format!("{name}.a"))
        .extension("tenant", "acme")
        .json(&serde_json::json!({"n": 1}))
        .unwrap()
        .build()
        .unwrap();
    let subscriber = client.jetstream_subscriber(&name);
    let mut sub = subscriber
        .open(SubscribeOptions::new([format!("{name}.>")]).unwrap())
        .await
        .unwrap();
    let mut structured = client.jetstream_publisher();
    let mut binary = client.jetstream_publisher().content_mode(ContentMode::Binary);
    let r1 = structured.publish(event.clone()).await.unwrap();
    // The same event id in the other mode is still a duplicate.
    let r2 = binary.publish(event.clone()).await.unwrap();
    assert_eq!((r1.sequence, r1.duplicate), (Some(1), false));
    assert_eq!((r2.sequence, r2.duplicate), (Some(1), true));
    let other = Event::builder(format!("{name}.b"))
        .json(&serde_json::json!({"n": 2}))
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(binary.publish(other.clone()).await.unwrap().sequence, Some(2));

    let stored = client.raw_jetstream().get_stream(&name).await.unwrap();
    // Structured mode: the dedup id is the only header.
    let first = stored.get_raw_message(1).await.unwrap();
    let names: Vec<String> = first.headers.iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(names, ["Nats-Msg-Id"]);
    assert_eq!(first.headers.get("Nats-Msg-Id").unwrap().as_str(), event.id());
    let body: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(
        (body["id"].as_str(), &body["data"]),
        (Some(event.id()), &serde_json::json!({"n": 1}))
    );
    // Binary mode: ce- headers beside it, the payload alone as the body.
    let second = stored.get_raw_message(2).await.unwrap();
    assert_eq!(second.headers.get("Nats-Msg-Id").unwrap().as_str(), other.id());
    assert_eq!(second.headers.get("ce-id").unwrap().as_str(), other.id());
    assert_eq!(&second.payload[..], br#"{"n":2}"#);

    let d = next(&mut sub).await;
    assert_eq!(d.event(), Some(&event));
    d.ack().await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.event(), Some(&other));
    d.ack().await.unwrap();
    drop(sub);
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_stored_in_call_order_and_acks_awaited_in_any_order() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let mut publisher = client.jetstream_publisher().max_in_flight(100);
    let events = numbered(&format!("{name}.o"), 100);
    let futures = call_all(&mut publisher, &events).await;
    assert_eq!(publisher.in_flight(), 100);
    // Awaited last to first: each future gets its own PubAck, and the
    // stream stored the events in the order of the calls.
    let mut receipts = Vec::new();
    for future in futures.into_iter().rev() {
        receipts.push(future.await.unwrap());
    }
    receipts.reverse();
    for (i, (receipt, event)) in receipts.iter().zip(&events).enumerate() {
        assert_eq!(&*receipt.event_id, event.id());
        assert_eq!(receipt.sequence, Some(i as u64 + 1));
        assert!(!receipt.duplicate);
    }
    assert_eq!(publisher.in_flight(), 0);
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_a_full_client_queue_wait_for_room_and_get_their_acks() {
    let client = watchtower_nats::NatsClient::connect(
        watchtower_nats::NatsConfig::new(crate::support::LOCAL)
            .name("watchtower-nats-tests")
            .client_capacity(4),
    )
    .await
    .unwrap();
    let name = unique("WT");
    stream(&client, &name).await;
    let mut publisher = client.jetstream_publisher().max_in_flight(300);
    let mut futures = Vec::new();
    for i in 0..300 {
        std::future::poll_fn(|cx| tower::Service::poll_ready(&mut publisher, cx))
            .await
            .unwrap();
        let event = Event::new(format!("{name}.q"), serde_json::json!({ "i": i }));
        futures.push(tower::Service::call(&mut publisher, event));
    }
    let receipts = tokio::time::timeout(PATIENCE, futures_util::future::join_all(futures))
        .await
        .expect("every publish acknowledged");
    let sequences: HashSet<u64> = receipts
        .into_iter()
        .map(|r| r.unwrap().sequence.unwrap())
        .collect();
    assert_eq!(sequences, (1..=300).collect::<HashSet<u64>>());
    assert_eq!(publisher.in_flight(), 0);
    assert_eq!(client.stream_messages(&name).await.unwrap(), 300);
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_pipeline_with_unique_sequences() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let publisher = client.jetstream_publisher().max_in_flight(64);
    let mut calls = FuturesUnordered::new();
    for i in 0..500 {
        let svc = publisher.clone();
        let event = Event::new(format!("{name}.p"), serde_json::json!({ "i": i }));
        calls.push(async move { svc.oneshot(event).await });
    }
    let mut sequences = HashSet::new();
    while let Some(receipt) = calls.next().await {
        let receipt = receipt.unwrap();
        assert!(!receipt.duplicate);
        sequences.insert(receipt.sequence.unwrap());
    }
    assert_eq!(sequences, (1..=500).collect::<HashSet<u64>>());
    assert_eq!(publisher.in_flight(), 0);
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_nack_with_delay_term_and_delivery_counts() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let subscriber = client.jetstream_subscriber(&name);
    let options = SubscribeOptions::new([format!("{name}.>")])
        .unwrap()
        .group("workers")
        .unwrap();
    let mut sub = subscriber.open(options).await.unwrap();
    let mut publisher = client.jetstream_publisher();
    let nacked = Event::new(format!("{name}.a"), serde_json::json!({"n": 1}));
    let termed = Event::new(format!("{name}.b"), serde_json::json!({"n": 2}));
    publisher.publish(nacked.clone()).await.unwrap();
    publisher.publish(termed.clone()).await.unwrap();

    let d = next(&mut sub).await;
    assert_eq!(
        (d.event(), d.delivery_count(), d.system()),
        (Some(&nacked), 1, "nats")
    );
    d.nack(None).await.unwrap();
    // Order between the redelivery and the second event is the server's.
    let mut seen_term = false;
    let mut redelivered = None;
    while redelivered.is_none() || !seen_term {
        let d = next(&mut sub).await;
        if d.event() == Some(&termed) {
            assert_eq!(d.delivery_count(), 1);
            d.reject().await.unwrap();
            seen_term = true;
        } else {
            assert_eq!(d.event(), Some(&nacked));
            redelivered = Some(d);
        }
    }
    let d = redelivered.unwrap();
    assert_eq!(d.delivery_count(), 2);
    d.nack(Some(Duration::from_secs(1))).await.unwrap();
    // A delayed nack lets a newer event through first.
    let overtaker = Event::new(format!("{name}.c"), serde_json::json!({"first": true}));
    publisher.publish(overtaker.clone()).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        d.event(),
        Some(&overtaker),
        "the delayed event came back before its delay"
    );
    d.ack().await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!((d.event(), d.delivery_count()), (Some(&nacked), 3));
    d.ack().await.unwrap();

    // Acked and terminated events never come back: the next delivery is a
    // new event.
    let marker = Event::new(format!("{name}.c"), serde_json::json!({"marker": true}));
    publisher.publish(marker.clone()).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.event(), Some(&marker));
    d.ack().await.unwrap();
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_delivery_goes_to_the_next_group_member() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let settings = ConsumerSettings::new().ack_wait(Duration::from_secs(1));
    let subscriber = client.jetstream_subscriber(&name).settings(settings);
    let options = SubscribeOptions::new([format!("{name}.x")])
        .unwrap()
        .group("g")
        .unwrap();
    let mut first = subscriber.open(options.clone()).await.unwrap();
    let event = Event::new(format!("{name}.x"), serde_json::json!({}));
    client.jetstream_publisher().publish(event.clone()).await.unwrap();
    let d = next(&mut first).await;
    let (_, acker) = d.into_parts();
    watchtower::Acker::progress(&acker).await.unwrap();
    drop(acker);
    drop(first);
    let mut second = subscriber.open(options).await.unwrap();
    let d = next(&mut second).await;
    assert_eq!(d.event(), Some(&event));
    assert_eq!(d.delivery_count(), 2);
    d.ack().await.unwrap();
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_stops_redelivery_and_replay_reads_history() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let mut publisher = client.jetstream_publisher();
    let old = Event::new(format!("{name}.h"), serde_json::json!({"old": true}));
    publisher.publish(old.clone()).await.unwrap();

    let settings = ConsumerSettings::new()
        .max_deliver(3)
        .backoff([Duration::from_millis(100), Duration::from_millis(200)]);
    let subscriber = client.jetstream_subscriber(&name).settings(settings);
    // A replaying subscription starts at the oldest held event.
    let options = SubscribeOptions::new([format!("{name}.h")]).unwrap().replay(true);
    let mut sub = subscriber.open(options).await.unwrap();
    for count in 1..=3 {
        let d = next(&mut sub).await;
        assert_eq!((d.event(), d.delivery_count()), (Some(&old), count));
        d.nack(None).await.unwrap();
    }
    let marker = Event::new(format!("{name}.h"), serde_json::json!({"marker": true}));
    publisher.publish(marker.clone()).await.unwrap();
    let d = next(&mut sub).await;
    assert_eq!(
        d.event(),
        Some(&marker),
        "a fourth delivery went past max deliver"
    );
    d.ack().await.unwrap();
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_patterns_filter_in_the_client() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let subscriber = client.jetstream_subscriber(&name);
    let options = SubscribeOptions::new([format!("{name}.user.*"), format!("{name}.order.>")]).unwrap();
    let mut sub = subscriber.open(options).await.unwrap();
    let mut publisher = client.jetstream_publisher();
    for topic in ["other", "user.created", "user.a.b", "order.x.y"] {
        publisher
            .publish(Event::new(format!("{name}.{topic}"), serde_json::json!({})))
            .await
            .unwrap();
    }
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    assert_eq!(a.topic(), format!("{name}.user.created"));
    assert_eq!(b.topic(), format!("{name}.order.x.y"));
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_terminated_and_the_consumer_goes_on() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let subscriber = client.jetstream_subscriber(&name);
    let options = SubscribeOptions::new([format!("{name}.>")])
        .unwrap()
        .group("p")
        .unwrap();
    let sub = subscriber.open(options.clone()).await.unwrap();
    let js = client.raw_jetstream();
    js.publish(format!("{name}.raw"), Bytes::from_static(b"\xde\xad\xbe\xef"))
        .await
        .unwrap()
        .await
        .unwrap();
    let good = Event::new(format!("{name}.ok"), serde_json::json!({}));
    client.jetstream_publisher().publish(good.clone()).await.unwrap();

    let dlq = watchtower::dead_letter::MemoryDeadLetters::new(4);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        watchtower::serve(
            sub,
            tower::service_fn(move |e: Event| {
                let sent = tx.send(e);
                async move { sent.map_err(|_| watchtower::Error::closed("over")) }
            }),
        )
        .poison(dlq.clone())
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .into_future(),
    );
    assert_eq!(
        tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap(),
        Some(good)
    );
    tokio::time::timeout(PATIENCE, dlq.wait_for(1)).await.unwrap();
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!((stats.acked, stats.poisoned, stats.settle_errors), (1, 1, 0));
    assert_eq!(
        dlq.drain()[0].data().map(|d| &d[..]),
        Some(&b"\xde\xad\xbe\xef"[..])
    );

    // Terminated: a new member of the group is not handed the poison again.
    // The ack and the termination travel on the subscriber's connection, so
    // this one may ask before the server has them.
    let info = tokio::time::timeout(PATIENCE, async {
        loop {
            let info = client
                .raw_jetstream()
                .get_consumer_from_stream::<watchtower_nats::ConsumerConfig, _, _>("p", name.as_str())
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .clone();
            if info.num_ack_pending == 0 {
                break info;
            }
        }
    })
    .await
    .expect("the ack and the termination reach the server");
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    client.delete_stream(&name).await.unwrap();
}

/// A responder that is no stream, answering publishes on its subject with
/// garbage, an API error, two answers, or nothing: each caller gets an
/// error of the right kind or the first answer's receipt, never another
/// caller's; no publish stays counted in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_that_lies_gives_errors_never_wrong_receipts() {
    use watchtower_nats::{NatsClient, NatsConfig};

    let client = NatsClient::connect(
        NatsConfig::new("nats://127.0.0.1:4222").request_timeout(Duration::from_millis(400)),
    )
    .await
    .unwrap();
    let base = unique("liar");
    let mut requests = client.raw().subscribe(format!("{base}.*")).await.unwrap();
    client.raw().flush().await.unwrap();
    let liar = client.raw().clone();
    let answered = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(request) = requests.next().await {
            let reply = request
                .reply
                .clone()
                .expect("a publish awaiting its ack has a reply subject");
            let case = request.subject.rsplit('.').next().unwrap_or_default().to_owned();
            let answers: &[&str] = match case.as_str() {
                "garbage" => &["not json at all"],
                "refused" => &[
                    r#"{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}"#,
                ],
                "twice" => &[r#"{"stream":"FIRST","seq":1}"#, r#"{"stream":"SECOND","seq":2}"#],
                "partial" => &[r#"{"stream":"S"}"#],
                _ => &[],
            };
            for answer in answers {
                liar.publish(reply.clone(), Bytes::from_static(answer.as_bytes()))
                    .await
                    .unwrap();
            }
            seen.push(case);
            if seen.len() == 5 {
                return seen;
            }
        }
        seen
    });

    let mut publisher = client.jetstream_publisher();
    let event = |case: &str| Event::new(format!("{base}.{case}"), serde_json::json!({}));
    let garbage = publisher.publish(event("garbage")).await.unwrap_err();
    assert_eq!(garbage.kind(), ErrorKind::Connection);
    let refused = publisher.publish(event("refused")).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Rejected);
    assert!(
        refused.to_string().contains("expected stream does not match"),
        "{refused}"
    );
    let twice = publisher.publish(event("twice")).await.unwrap();
    assert_eq!(
        (twice.stream.as_deref(), twice.sequence),
        (Some("FIRST"), Some(1))
    );
    let partial = publisher.publish(event("partial")).await.unwrap_err();
    assert_eq!(partial.kind(), ErrorKind::Connection);
    let silent = publisher.publish(event("silent")).await.unwrap_err();
    assert_eq!(silent.kind(), ErrorKind::Timeout);
    let mut seen = tokio::time::timeout(PATIENCE, answered).await.unwrap().unwrap();
    seen.sort();
    assert_eq!(seen, ["garbage", "partial", "refused", "silent", "twice"]);
    assert_eq!(publisher.in_flight(), 0);
}

/// A consumer read as fast as the server sends, while 20 publishers write:
/// the pull requests keep pace with what arrives, so every event is read in
/// every round (counting a request only once it was sent lost the messages
/// that answered it first, and the consumer stopped for a request's expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_read_as_fast_as_it_is_fed_never_stops_pulling() {
    let client = local().await;
    for _ in 0..20 {
        let name = unique("WT");
        stream(&client, &name).await;
        let topics: Vec<String> = (0..20).map(|t| format!("{name}.t{t}")).collect();
        let settings = ConsumerSettings::new().batch(40);
        let sub = client
            .jetstream_subscriber(&name)
            .settings(settings)
            .open(SubscribeOptions::new(&topics).unwrap())
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let handler = tower::service_fn(move |event: Event| {
            let sent = tx.send(event.id().to_owned());
            async move { sent.map_err(|_| watchtower::Error::closed("test over")) }
        });
        let serving = tokio::spawn(watchtower::serve(sub, handler).into_future());
        let reader = tokio::spawn(async move {
            let mut ids = HashSet::new();
            while ids.len() < 2000 {
                let id = tokio::time::timeout(PATIENCE, rx.recv()).await;
                ids.insert(id.expect("an event in time").unwrap());
            }
            ids
        });
        let mut publishers = Vec::new();
        let mut sent = HashSet::new();
        for topic in &topics {
            let events = numbered(topic, 100);
            sent.extend(events.iter().map(|e| e.id().to_owned()));
            let mut publisher = client.jetstream_publisher();
            publishers.push(tokio::spawn(async move {
                for event in events {
                    publisher.publish(event).await.unwrap();
                }
            }));
        }
        for publisher in publishers {
            publisher.await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), sent);
        serving.abort();
        client.delete_stream(&name).await.unwrap();
    }
}

/// A consumer deleted under its subscription ends it with a `Closed`
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_ends_its_subscription() {
    let client = local().await;
    let name = unique("WT");
    stream(&client, &name).await;
    let options = SubscribeOptions::new([format!("{name}.>")])
        .unwrap()
        .group("gone")
        .unwrap();
    let mut sub = client.jetstream_subscriber(&name).open(options).await.unwrap();
    // The pull request waits on the server when the consumer goes.
    let pending = tokio::spawn(async move {
        let mut items = Vec::new();
        while let Some(item) = tokio::time::timeout(PATIENCE, sub.next())
            .await
            .expect("the end in time")
        {
            items.push(item.map(|_| ()));
        }
        items
    });
    let js = client.raw_jetstream();
    let stream = js.get_stream(&name).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while stream.consumer_info("gone").await.unwrap().num_waiting == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pull request reached the server"
        );
        tokio::task::yield_now().await;
    }
    stream.delete_consumer("gone").await.unwrap();
    let items = pending.await.unwrap();
    let last = items
        .last()
        .expect("an error before the end")
        .as_ref()
        .unwrap_err();
    assert_eq!(last.kind(), ErrorKind::Closed, "{items:?}");
    assert!(
        items[..items.len() - 1]
            .iter()
            .all(|i| matches!(i, Err(e) if e.kind() == ErrorKind::Connection)),
        "{items:?}"
    );
    client.delete_stream(&name).await.unwrap();
}
