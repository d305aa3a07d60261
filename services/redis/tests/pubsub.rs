//! Publishing and subscribing against the local Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use tower::{Service, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::health::Status;
use watchtower::{
    Error, ErrorKind, Event, PublishBatchExt, PublishExt, SubscribeOptions, Subscriber, Transport, serve,
};
use watchtower_redis::{
    ContentMode, DeadLetter, MaxLen, RedisClient, RedisConfig, RedisPublisher, RedisPublisherOptions,
    RedisSubscriberOptions,
};
use watchtower_test_support::{free_port, unique};

use common::{URL, cleanup, numbered, pending, raw, wait_entries};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_and_readable_wire_format() {
    let ns = unique("wtr_wire");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL).stream_prefix(format!("{ns}:")))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().content_mode(ContentMode::Binary))
        .unwrap();
    let event = Event::builder("user.created")
        .subject("u-7")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": 7}))
        .unwrap()
        .build()
        .unwrap();
    let receipt = publisher.publish(event.clone()).await.unwrap();
    let key = format!("{ns}:user.created");
    assert_eq!(receipt.stream.as_deref(), Some(key.as_str()));
    assert_eq!(&*receipt.topic, "user.created");
    assert_eq!(&*receipt.event_id, event.id());
    let entry_id = receipt.message_id.clone().unwrap();

    let mut conn = raw(URL).await;
    let entries = wait_entries(&mut conn, &key, "0").await;
    assert_eq!(entries.len(), 1);
    let (id, fields) = &entries[0];
    assert_eq!(id, &*entry_id);
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(get("specversion").as_deref(), Some("1.0"));
    assert_eq!(get("id").as_deref(), Some(event.id()));
    assert_eq!(get("type").as_deref(), Some("user.created"));
    assert_eq!(get("source").as_deref(), Some("/watchtower"));
    assert_eq!(get("subject").as_deref(), Some("u-7"));
    assert_eq!(get("tenant").as_deref(), Some("acme"));
    assert_eq!(get("datacontenttype").as_deref(), Some("application/json"));
    assert_eq!(get("data").as_deref(), Some(r#"{"user_id":7}"#));
    assert!(get("time").is_some());
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_len_trims_and_bad_topics_are_refused() {
    let ns = unique("wtr_maxlen");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().max_len(MaxLen::Exact(10)))
        .unwrap();
    let topic = format!("{ns}.trim");
    for i in 0..30 {
        publisher
            .publish(Event::new(topic.clone(), serde_json::json!({"i": i})))
            .await
            .unwrap();
    }
    let mut conn = raw(URL).await;
    let len: i64 = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 10);

    let bad = Event::new("x", serde_json::json!({})).with_topic("a..b");
    let mut err = publisher.publish(bad.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
    assert_eq!(
        err.take_event().map(|e| e.id().to_owned()).as_deref(),
        Some(bad.id())
    );

    let client = RedisClient::connect(RedisConfig::new(URL)).await.unwrap();
    let err = client
        .publisher_with(RedisPublisherOptions::new().max_len(MaxLen::Approx(0)))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_and_batches() {
    let ns = unique("wtr_concurrent");
    let topic = format!("{ns}.load");
    let publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let calls = (0..500).map(|i| {
        let publisher = publisher.clone();
        let topic = topic.clone();
        async move {
            publisher
                .oneshot(Event::new(topic, serde_json::json!({"i": i})))
                .await
        }
    });
    let receipts = futures_util::future::join_all(calls).await;
    let ids: HashSet<String> = receipts
        .into_iter()
        .map(|r| r.unwrap().message_id.unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 500);

    let mut events: Vec<Event> = (0..20)
        .map(|i| Event::new(topic.clone(), serde_json::json!({"b": i})))
        .collect();
    events.insert(
        5,
        Event::new("bad", serde_json::json!({})).with_topic("bad topic"),
    );
    let results = publisher.batched().publish_batch(events).await.unwrap();
    assert_eq!(results.len(), 21);
    assert_eq!(results[5].as_ref().unwrap_err().kind(), ErrorKind::InvalidTopic);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 20);
    let mut conn = raw(URL).await;
    let len: i64 = redis::cmd("XLEN")
        .arg(&topic)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 520);
    // Receipts follow the stream's order.
    let batch_ids: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.message_id.clone().unwrap().to_string())
        .collect();
    let mut sorted = batch_ids.clone();
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    });
    assert_eq!(batch_ids, sorted);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_acks_in_batches_and_nothing_stays_pending() {
    let ns = unique("wtr_serve");
    let topic = format!("{ns}.orders");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber();
    let options = SubscribeOptions::new([&topic]).unwrap().group("billing").unwrap();
    let subscription = subscriber.open(options).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let sent = tx.send(event);
                async move { sent.map_err(|_| Error::closed("test over")) }
            }),
        )
        .concurrency(32)
        .with_graceful_shutdown(async {
            stopped.await.ok();
        })
        .into_future(),
    );
    let publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let sent = numbered(&topic, 300);
    for result in publisher.batched().publish_batch(sent.clone()).await.unwrap() {
        result.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 300 {
        got.push(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap());
    }
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    assert_eq!(stats.acked, 300);
    assert_eq!(stats.settle_errors, 0);
    let got_ids: Vec<&str> = got.iter().map(Event::id).collect();
    let sent_ids: Vec<&str> = sent.iter().map(Event::id).collect();
    assert_eq!(got_ids, sent_ids, "one stream is delivered in order");
    let mut conn = raw(URL).await;
    assert_eq!(pending(&mut conn, &topic, "billing").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_redelivers_with_rising_count() {
    let ns = unique("wtr_nack");
    let topic = format!("{ns}.retry");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber();
    let mut subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let event = Event::new(topic.clone(), serde_json::json!({"n": 1}));
    publisher.publish(event.clone()).await.unwrap();
    let first = next(&mut subscription).await;
    assert_eq!(first.delivery_count(), 1);
    assert_eq!(first.event(), Some(&event));
    first.nack(Some(Duration::from_millis(100))).await.unwrap();
    let second = next(&mut subscription).await;
    assert_eq!(second.delivery_count(), 2);
    assert_eq!(second.event(), Some(&event));
    second.nack(None).await.unwrap();
    let third = next(&mut subscription).await;
    assert_eq!(third.delivery_count(), 3);
    third.ack().await.unwrap();
    let mut conn = raw(URL).await;
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_go_to_the_dead_letter_stream() {
    let ns = unique("wtr_maxdel");
    let topic = format!("{ns}.fragile");
    let dlq = format!("{ns}:dlq");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(
            RedisSubscriberOptions::new()
                .max_deliveries(Some(2))
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
        .publisher_with(RedisPublisherOptions::new().content_mode(ContentMode::Binary))
        .unwrap();
    let doomed = Event::new(topic.clone(), serde_json::json!({"doomed": true}));
    publisher.publish(doomed.clone()).await.unwrap();
    for count in 1..=2 {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.delivery_count(), count);
        delivery.nack(None).await.unwrap();
    }
    let mut conn = raw(URL).await;
    let entries = wait_entries(&mut conn, &dlq, "0").await;
    assert_eq!(entries.len(), 1);
    let fields = &entries[0].1;
    let get = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(get("id").as_deref(), Some(doomed.id()));
    assert_eq!(get("deadlettertopic").as_deref(), Some(topic.as_str()));
    assert_eq!(get("attempt").as_deref(), Some("3"));
    assert!(get("deadletterreason").unwrap().contains("delivered 3 times"));
    // The dead-lettered entry is a valid event, and acknowledged in its group.
    let fields: Vec<(bytes::Bytes, bytes::Bytes)> = fields
        .iter()
        .map(|(n, v)| (bytes::Bytes::from(n.clone()), bytes::Bytes::from(v.clone())))
        .collect();
    let back = watchtower::codec::Binding::REDIS
        .decode(
            fields
                .iter()
                .filter(|(n, _)| &n[..] != b"data")
                .map(|(n, v)| (std::str::from_utf8(n).unwrap(), v)),
            fields
                .iter()
                .find(|(n, _)| &n[..] == b"data")
                .map(|(_, v)| v.clone()),
        )
        .unwrap();
    assert_eq!(back.data(), doomed.data());
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);

    // The consumer goes on with the next entry.
    let fine = Event::new(topic.clone(), serde_json::json!({"fine": true}));
    publisher.publish(fine.clone()).await.unwrap();
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.event(), Some(&fine));
    delivery.ack().await.unwrap();
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_can_use_the_poison_path() {
    let ns = unique("wtr_maxpoison");
    let topic = format!("{ns}.fragile");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(
            RedisSubscriberOptions::new()
                .max_deliveries(Some(1))
                .dead_letter(DeadLetter::Poison),
        )
        .unwrap();
    let subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let dead = MemoryDeadLetters::new(8);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(
            subscription,
            service_fn(|_: Event| async { Err::<(), _>(Error::new(ErrorKind::Handler, "always fails")) }),
        )
        .poison(dead.clone())
        .with_graceful_shutdown(async {
            stopped.await.ok();
        })
        .into_future(),
    );
    // In binary mode the payload is the entry's `data` field, so the
    // poison's raw body is the payload itself.
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().content_mode(ContentMode::Binary))
        .unwrap();
    let event = Event::new(topic.clone(), serde_json::json!({"x": 1}));
    publisher.publish(event.clone()).await.unwrap();
    tokio::time::timeout(WAIT, dead.wait_for(1)).await.unwrap();
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    assert_eq!((stats.handler_errors, stats.poisoned), (1, 1));
    let poisoned = dead.drain().remove(0);
    assert_eq!(poisoned.ty(), watchtower::POISON_EVENT_TYPE);
    assert_eq!(poisoned.data(), event.data());
    assert_eq!(poisoned.extension("deadletterkind"), Some("rejected"));
    let mut conn = raw(URL).await;
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_reach_the_poison_path_and_the_consumer_goes_on() {
    let ns = unique("wtr_poison");
    let topic = format!("{ns}.mixed");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber();
    let subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let mut conn = raw(URL).await;
    // Garbage bytes, missing attributes, a bad time, a non-UTF-8 attribute.
    let bad: Vec<Vec<(&[u8], &[u8])>> = vec![
        vec![(b"data", b"\xff\x00garbage")],
        vec![(b"specversion", b"1.0"), (b"id", b"1"), (b"data", b"{}")],
        vec![
            (b"specversion", b"1.0"),
            (b"id", b"1"),
            (b"type", b"t"),
            (b"source", b"s"),
            (b"time", b"yesterday"),
        ],
        vec![
            (b"specversion", b"1.0"),
            (b"id", b"\xff"),
            (b"type", b"t"),
            (b"source", b"s"),
        ],
    ];
    for fields in &bad {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&topic).arg("*");
        for (n, v) in fields {
            cmd.arg(*n).arg(*v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let good = Event::new(topic.clone(), serde_json::json!({"ok": true}));
    publisher.publish(good.clone()).await.unwrap();

    let dead = MemoryDeadLetters::new(16);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let sent = tx.send(event);
                async move { sent.map_err(|_| Error::closed("test over")) }
            }),
        )
        .poison(dead.clone())
        .with_graceful_shutdown(async {
            stopped.await.ok();
        })
        .into_future(),
    );
    let received = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(received, good);
    tokio::time::timeout(WAIT, dead.wait_for(4)).await.unwrap();
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    assert_eq!((stats.acked, stats.poisoned), (1, 4));
    let poisoned = dead.drain();
    assert_eq!(poisoned[0].data().map(|d| &d[..]), Some(&b"\xff\x00garbage"[..]));
    assert!(
        poisoned
            .iter()
            .all(|e| e.extension("deadletterkind") == Some("decode"))
    );
    assert!(
        poisoned
            .iter()
            .all(|e| e.extension("deadlettertopic") == Some(topic.as_str()))
    );
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_first_takes_back_its_own_pending_entries() {
    let ns = unique("wtr_restart");
    let topic = format!("{ns}.jobs");
    let options = SubscribeOptions::new([&topic]).unwrap().group("workers").unwrap();
    let builder = RedisSubscriberOptions::new()
        .consumer(format!("{ns}-worker-1"))
        // Far beyond the test: what comes back comes from the consumer's own
        // pending list, not from reclaiming.
        .claim_idle(Duration::from_secs(600));
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let sent = numbered(&topic, 5);
    let taken = crash_after_taking(builder.clone(), options.clone(), &mut publisher, &sent).await;
    assert_eq!(taken, 5);

    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(builder)
        .unwrap();
    let mut subscription = subscriber.open(options).await.unwrap();
    for event in &sent {
        let delivery = next(&mut subscription).await;
        assert_eq!(delivery.event(), Some(event));
        assert_eq!(delivery.delivery_count(), 2);
        delivery.ack().await.unwrap();
    }
    let mut conn = raw(URL).await;
    assert_eq!(pending(&mut conn, &topic, "workers").await, 0);
    cleanup(URL, &ns).await;
}

/// Opens a subscription on a runtime of its own, publishes `events`, takes
/// them without settling, and kills the runtime: the consumer's tasks die
/// as in a crashed process, and nothing is released.
async fn crash_after_taking(
    builder: RedisSubscriberOptions,
    options: SubscribeOptions,
    publisher: &mut RedisPublisher,
    events: &[Event],
) -> usize {
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let n = events.len();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let taken = rt.block_on(async move {
            let subscriber = RedisClient::connect(RedisConfig::new(URL))
                .await
                .unwrap()
                .subscriber_with(builder)
                .unwrap();
            let mut subscription = subscriber.open(options).await.unwrap();
            opened_tx.send(()).unwrap();
            go_rx.await.unwrap();
            let mut taken = Vec::new();
            while taken.len() < n {
                taken.push(next(&mut subscription).await);
            }
            (taken, subscription, subscriber)
        });
        drop(rt);
        let count = taken.0.len();
        drop(taken);
        count
    });
    opened_rx.await.unwrap();
    for event in events {
        publisher.publish(event.clone()).await.unwrap();
    }
    go_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_with_100_unacked_is_reclaimed_by_another_without_duplicates() {
    let ns = unique("wtr_reclaim");
    let topic = format!("{ns}.work");
    let options = SubscribeOptions::new([&topic]).unwrap().group("crew").unwrap();
    let claim_idle = Duration::from_millis(500);
    let builder = RedisSubscriberOptions::new()
        .claim_idle(claim_idle)
        .claim_interval(Duration::from_millis(100));
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let sent = numbered(&topic, 100);
    let taken = crash_after_taking(builder.clone(), options.clone(), &mut publisher, &sent).await;
    assert_eq!(taken, 100);
    let mut conn = raw(URL).await;
    assert_eq!(pending(&mut conn, &topic, "crew").await, 100);

    // A second member of the group, with a different consumer name.
    let second = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(builder)
        .unwrap();
    let subscription = second.open(options).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let sent = tx.send(event);
                async move { sent.map_err(|_| Error::closed("test over")) }
            }),
        )
        .with_graceful_shutdown(async {
            stopped.await.ok();
        })
        .into_future(),
    );
    let mut got = Vec::new();
    while got.len() < 100 {
        got.push(tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap());
    }
    // The consumer also goes on with new work.
    let later = Event::new(topic.clone(), serde_json::json!({"later": true}));
    publisher.publish(later.clone()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap(),
        later
    );
    // Shutting down settles everything in flight; an empty pending list
    // afterwards means nothing acknowledged can ever be reclaimed again, and
    // any duplicate handled before is in the channel.
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    got.extend(std::iter::from_fn(|| rx.try_recv().ok()));
    let ids: HashSet<&str> = got.iter().map(Event::id).collect();
    assert_eq!(ids.len(), 100, "no event twice");
    assert_eq!(got.len(), 100, "no event handled twice after its ack");
    assert_eq!(ids, sent.iter().map(Event::id).collect());
    assert_eq!(stats.acked, 101);
    assert_eq!(pending(&mut conn, &topic, "crew").await, 0);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_find_new_streams_and_skip_others() {
    let ns = unique("wtr_patterns");
    let subscriber = RedisClient::connect(RedisConfig::new(URL).stream_prefix(format!("{ns}:")))
        .await
        .unwrap()
        .subscriber_with(RedisSubscriberOptions::new().rescan_interval(Duration::from_millis(100)))
        .unwrap();
    let mut publisher = RedisClient::connect(RedisConfig::new(URL).stream_prefix(format!("{ns}:")))
        .await
        .unwrap()
        .publisher();
    // One stream exists before the subscription, the others come later.
    let early = Event::new("user.early", serde_json::json!({}));
    publisher.publish(early.clone()).await.unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new(["user.*"]).unwrap())
        .await
        .unwrap();
    let late = Event::new("user.late", serde_json::json!({}));
    let other = Event::new("order.late", serde_json::json!({}));
    let deep = Event::new("user.a.b", serde_json::json!({}));
    let early2 = Event::new("user.early", serde_json::json!({"n": 2}));
    for e in [&other, &deep, &late, &early2] {
        publisher.publish(e.clone()).await.unwrap();
    }
    let mut got = HashSet::new();
    for _ in 0..2 {
        let delivery = next(&mut subscription).await;
        got.insert(delivery.event().unwrap().id().to_owned());
        delivery.ack().await.unwrap();
    }
    // The early entry predates the group, which starts at `$`.
    assert_eq!(got, HashSet::from([late.id().to_owned(), early2.id().to_owned()]));
    drop(subscription);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_fails_at_construction() {
    let err = RedisClient::connect(RedisConfig::new("http://u:hunter2@127.0.0.1:6379"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(!err.to_string().contains("hunter2"));
    let client = RedisClient::connect(RedisConfig::new(URL)).await.unwrap();
    for options in [
        RedisSubscriberOptions::new().batch_size(0),
        RedisSubscriberOptions::new().block(Duration::ZERO),
        RedisSubscriberOptions::new().max_deliveries(Some(0)),
        RedisSubscriberOptions::new().consumer("has space"),
        RedisSubscriberOptions::new().dead_letter(DeadLetter::Stream(String::new())),
    ] {
        assert_eq!(
            client.subscriber_with(options).unwrap_err().kind(),
            ErrorKind::Config
        );
    }
    let closed = free_port();
    let err = RedisClient::connect(
        RedisConfig::new(format!("redis://:hunter2@127.0.0.1:{closed}"))
            .reconnect_retries(0)
            .connection_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains("hunter2"));

    // TLS to a server that does not speak it: a connection error, no panic.
    let err = RedisClient::connect(
        RedisConfig::new("rediss://:hunter2@127.0.0.1:6379")
            .reconnect_retries(0)
            .connection_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_follow_the_connection() {
    let client = RedisClient::connect(RedisConfig::new(URL)).await.unwrap();
    let health = client.health().await;
    assert_eq!(health.status(), Status::Up, "{health:?}");
    assert_eq!(health.system(), "redis");
    let mut publisher = client.publisher();
    assert!(publisher.is_connected());
    std::future::poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_still_held_is_not_delivered_again_by_its_own_reclaiming() {
    let ns = unique("wtr_held");
    let topic = format!("{ns}.slow");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let mut conn = raw(URL).await;
    // An entry from before the group, which another consumer will hold
    // and abandon: reclaiming it is the event this test waits on.
    let abandoned = Event::new(topic.clone(), serde_json::json!({"abandoned": true}));
    let receipt = publisher.publish(abandoned.clone()).await.unwrap();
    let abandoned_id = receipt.message_id.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&topic)
        .arg("g")
        .arg("$")
        .query_async(&mut conn)
        .await
        .unwrap();
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(
            RedisSubscriberOptions::new()
                .claim_idle(Duration::from_millis(100))
                .claim_interval(Duration::from_millis(20))
                .max_deliveries(None),
        )
        .unwrap();
    let mut subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("g").unwrap())
        .await
        .unwrap();
    let slow = Event::new(topic.clone(), serde_json::json!({"slow": true}));
    publisher.publish(slow.clone()).await.unwrap();
    let held = next(&mut subscription).await;
    assert_eq!(held.event(), Some(&slow));

    // Only now does the other consumer take (and abandon) its entry, so it
    // becomes idle enough after the held one: by the time reclaiming hands
    // it over, a reclaim pass has gone over the held entry too.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&topic)
        .arg("g")
        .arg("gone")
        .arg(0)
        .arg(&*abandoned_id)
        .arg("FORCE")
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reclaimed = next(&mut subscription).await;
    assert_eq!(
        reclaimed.event(),
        Some(&abandoned),
        "the held entry is not delivered again"
    );
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&topic)
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let held_row = rows.iter().find(|r| *r.0 != *abandoned_id).unwrap();
    assert_eq!(held_row.3, 1, "a held entry's delivery count stays as it was");
    reclaimed.ack().await.unwrap();
    held.ack().await.unwrap();
    assert_eq!(pending(&mut conn, &topic, "g").await, 0);
    cleanup(URL, &ns).await;
}

/// A restarted consumer reads its own pending entries while its reclaiming
/// also finds them idle (and finds the held ones idle again and again):
/// each entry reaches it once, and its delivery count does not grow while
/// it is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pending_entries_and_reclaiming_do_not_deliver_an_entry_twice() {
    let ns = unique("wtr_twice");
    let (topic, sent, _subscriber, mut subscription) = restarted_with_every_entry_pending(
        &ns,
        200,
        RedisSubscriberOptions::new().claim_interval(Duration::from_millis(2)),
    )
    .await;
    let mut held = Vec::new();
    let mut seen = HashSet::new();
    while seen.len() < sent.len() {
        let delivery = next(&mut subscription).await;
        // Delivered before the restart and again now, at least.
        assert!(
            delivery.delivery_count() >= 2,
            "count {}",
            delivery.delivery_count()
        );
        let id = delivery.event().unwrap().id().to_owned();
        assert!(seen.insert(id.clone()), "{id} delivered twice");
        held.push(delivery);
    }
    // Nothing more may come while the deliveries are held, and reclaiming,
    // which finds every one of them idle again and again, leaves their
    // delivery counts alone. (An entry read but not yet taken up when
    // reclaiming finds it idle may count one delivery more: with a claim
    // idle time of 1 ms, the first count depends on the scheduler.)
    let mut conn = raw(URL).await;
    let counts_held = pending_counts(&mut conn, &topic, "workers").await;
    assert_eq!(counts_held.len(), sent.len());
    let extra = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
    assert!(
        extra.is_err(),
        "an entry came a second time: {:?}",
        extra.ok().flatten().map(|d| d.map(|d| d.delivery_count()))
    );
    assert_eq!(pending_counts(&mut conn, &topic, "workers").await, counts_held);
    for delivery in held {
        delivery.ack().await.unwrap();
    }
    assert_eq!(pending(&mut conn, &topic, "workers").await, 0);
    cleanup(URL, &ns).await;
}

/// The same race with each entry acknowledged at once: one path delivers
/// an entry and it is acknowledged while the other path, which read it
/// before, is still on its way to delivering it. The later path must find
/// it no longer pending and leave it: every entry reaches the handler
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_acknowledged_while_another_path_read_it_is_not_delivered_again() {
    let ns = unique("wtr_acked_twice");
    let (topic, sent, _subscriber, mut subscription) = restarted_with_every_entry_pending(
        &ns,
        500,
        RedisSubscriberOptions::new()
            .batch_size(10)
            .claim_interval(Duration::from_millis(1)),
    )
    .await;
    let mut seen = HashSet::new();
    let mut deliveries = 0;
    while seen.len() < sent.len() {
        let delivery = next(&mut subscription).await;
        deliveries += 1;
        let id = delivery.event().unwrap().id().to_owned();
        assert!(seen.insert(id.clone()), "{id} delivered twice");
        delivery.ack().await.unwrap();
    }
    let mut conn = raw(URL).await;
    assert_eq!(pending(&mut conn, &topic, "workers").await, 0);
    let extra = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
    assert!(
        extra.is_err(),
        "an acknowledged entry came again: {:?}",
        extra
            .ok()
            .flatten()
            .map(|d| d.map(|d| d.event().map(|e| e.id().to_owned())))
    );
    assert_eq!(deliveries, sent.len());
    cleanup(URL, &ns).await;
}

/// A consumer of group `workers` restarted after a crash that left `count`
/// events of the topic `<ns>.jobs` pending in its name, every one of them
/// due for reclaiming at once (a claim idle time of 1 ms on `builder`):
/// its own pending list and its reclaiming come upon the same entries.
async fn restarted_with_every_entry_pending(
    ns: &str,
    count: usize,
    builder: RedisSubscriberOptions,
) -> (
    String,
    Vec<watchtower::Event>,
    watchtower_redis::RedisSubscriber,
    watchtower_redis::RedisSubscription,
) {
    let topic = format!("{ns}.jobs");
    let options = SubscribeOptions::new([&topic]).unwrap().group("workers").unwrap();
    let builder = builder
        .consumer(format!("{ns}-worker-1"))
        .claim_idle(Duration::from_millis(1));
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let sent = numbered(&topic, count);
    let taken = crash_after_taking(builder.clone(), options.clone(), &mut publisher, &sent).await;
    assert_eq!(taken, count);
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(builder)
        .unwrap();
    let subscription = subscriber.open(options).await.unwrap();
    (topic, sent, subscriber, subscription)
}

/// The delivery count of every entry pending in `group`, by entry id.
async fn pending_counts(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    group: &str,
) -> std::collections::BTreeMap<String, u64> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query_async(conn)
        .await
        .unwrap();
    rows.into_iter().map(|(id, _, _, count)| (id, count)).collect()
}

/// Three entries read by `taker` and never acknowledged, then ten more
/// published with `MAXLEN = 5`: the three pending entries and five the
/// group never read are trimmed. A subscription of `consumer` must report
/// all eight and deliver the five left.
async fn trimmed_entries_are_reported(case: &str, consumer: &str, claim_idle: Duration) {
    let ns = unique(&format!("wtr_{case}"));
    let topic = format!("{ns}.jobs");
    let mut conn = raw(URL).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&topic)
        .arg("workers")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().max_len(MaxLen::Exact(5)))
        .unwrap();
    let sent = numbered(&topic, 13);
    for event in &sent[..3] {
        publisher.publish(event.clone()).await.unwrap();
    }
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("taker")
        .arg("COUNT")
        .arg(3)
        .arg("STREAMS")
        .arg(&topic)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(read, redis::Value::Array(_)), "{read:?}");
    let pending_ids: Vec<String> = redis::cmd("XRANGE")
        .arg(&topic)
        .arg("-")
        .arg("+")
        .query_async::<Vec<(String, std::collections::HashMap<String, Vec<u8>>)>>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(pending_ids.len(), 3);
    for event in &sent[3..] {
        publisher.publish(event.clone()).await.unwrap();
    }

    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .subscriber_with(
            RedisSubscriberOptions::new()
                .consumer(consumer.to_owned())
                .claim_idle(claim_idle)
                .claim_interval(Duration::from_millis(50)),
        )
        .unwrap();
    let options = SubscribeOptions::new([&topic]).unwrap().group("workers").unwrap();
    let mut subscription = subscriber.open(options).await.unwrap();
    let mut delivered = Vec::new();
    let mut reports = Vec::new();
    tokio::time::timeout(WAIT, async {
        // Each report starts with how many entries it is about.
        let reported = |reports: &[String]| -> u64 {
            reports
                .iter()
                .map(|r| r.split(' ').next().unwrap().parse::<u64>().unwrap())
                .sum()
        };
        while delivered.len() < 5 || reported(&reports) < 8 {
            match subscription.next().await.expect("subscription open") {
                Ok(delivery) => {
                    delivered.push(delivery.event().expect("an event").clone());
                    delivery.ack().await.unwrap();
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Dropped, "{e}");
                    reports.push(e.message().to_owned());
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{case}: {} delivered, {} trimmed, {reports:?}",
            delivered.len(),
            subscription.trimmed()
        )
    });
    assert_eq!(subscription.trimmed(), 8, "{case}: {reports:?}");
    assert_eq!(delivered, sent[8..], "{case}");
    // The pending ones are named in a report; the unread ones counted.
    for id in &pending_ids {
        assert!(
            reports.iter().any(|r| r.contains(id.as_str())),
            "{case}: {id} in {reports:?}"
        );
    }
    assert!(
        reports.iter().any(|r| r.starts_with("5 entries were trimmed")),
        "{case}: {reports:?}"
    );
    assert_eq!(pending(&mut conn, &topic, "workers").await, 0, "{case}");
    drop(subscription);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_while_pending_or_before_being_read_are_reported() {
    // The consumer that read them opens again: its own pending list.
    trimmed_entries_are_reported("trim-own", "taker", Duration::from_secs(600)).await;
    // Another consumer reclaims them.
    trimmed_entries_are_reported("trim-claim", "other", Duration::from_millis(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_after_its_entry_was_trimmed_is_reported() {
    let ns = unique("wtr_trim-release");
    let topic = format!("{ns}.jobs");
    let subscriber = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        // Only the release of the dropped deliveries can find them.
        .subscriber_with(RedisSubscriberOptions::new().claim_interval(Duration::from_secs(600)))
        .unwrap();
    let options = SubscribeOptions::new([&topic]).unwrap().group("workers").unwrap();
    let mut subscription = subscriber.open(options).await.unwrap();
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    for event in numbered(&topic, 3) {
        publisher.publish(event).await.unwrap();
    }
    let held = vec![
        next(&mut subscription).await,
        next(&mut subscription).await,
        next(&mut subscription).await,
    ];
    let mut conn = raw(URL).await;
    let ids: Vec<String> = redis::cmd("XRANGE")
        .arg(&topic)
        .arg("-")
        .arg("+")
        .query_async::<Vec<(String, std::collections::HashMap<String, Vec<u8>>)>>(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let _: i64 = redis::cmd("XTRIM")
        .arg(&topic)
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(held);
    // The releases may travel in more than one batch: one report each.
    let mut reports = String::new();
    let mut count = 0;
    while count < 3 {
        let report = tokio::time::timeout(WAIT, subscription.next())
            .await
            .expect("a report within the wait")
            .expect("subscription open")
            .map(drop)
            .expect_err("a report, not a delivery");
        assert_eq!(report.kind(), ErrorKind::Dropped);
        // The release usually finds them; under load another pass over the
        // pending entries can come first. Either says they were read and not
        // settled, and each entry is reported once.
        let (n, what) = report.message().split_once(' ').unwrap();
        assert!(
            what.starts_with("entries delivered and released unsettled were trimmed")
                || what.starts_with("entries read but not acknowledged were trimmed"),
            "{report}"
        );
        count += n.parse::<usize>().unwrap();
        reports.push_str(report.message());
    }
    for id in &ids {
        assert!(reports.contains(id.as_str()), "{id} in {reports}");
    }
    assert_eq!(subscription.trimmed(), 3);
    assert_eq!(pending(&mut conn, &topic, "workers").await, 0);
    drop(subscription);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_serves_publishers_and_subscribers_with_their_own_consumer_names() {
    let ns = unique("wtr_client");
    let topic = format!("{ns}.shared");
    let client = RedisClient::connect(RedisConfig::new(URL)).await.unwrap();
    let first = client.subscriber();
    let second = client.clone().subscriber();
    assert_ne!(first.consumer(), second.consumer());
    let options = RedisSubscriberOptions::new().block(Duration::from_millis(200));
    let third = client.subscriber_with(options.clone()).unwrap();
    let fourth = client.subscriber_with(options).unwrap();
    assert_ne!(third.consumer(), fourth.consumer());

    let mut subscription = first
        .open(SubscribeOptions::new([&topic]).unwrap())
        .await
        .unwrap();
    let mut publisher = client.publisher();
    let event = Event::new(topic.clone(), serde_json::json!({"n": 1}));
    let receipt = publisher.publish(event.clone()).await.unwrap();
    assert_eq!(receipt.stream.as_deref(), Some(topic.as_str()));
    let delivery = next(&mut subscription).await;
    assert_eq!(delivery.event(), Some(&event));
    delivery.ack().await.unwrap();
    drop(subscription);
    cleanup(URL, &ns).await;
}
