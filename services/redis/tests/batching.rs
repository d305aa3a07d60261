//! The publisher's automatic pipelining: many calls in flight at once, each
//! answered with its own entry id or its own error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use tower::{Service, ServiceExt as _};
use watchtower::{ErrorKind, Event, Receipt};
use watchtower_redis::{RedisClient, RedisConfig, RedisPublisher, RedisPublisherOptions, ResponseFuture};
use watchtower_test_support::{TcpProxy, unique};

use common::{URL, cleanup, numbered};

const WAIT: Duration = Duration::from_secs(30);

/// Every entry of `key` in stream order: (entry id, the event's `id` field).
async fn entries(conn: &mut MultiplexedConnection, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async::<redis::Value>(conn)
            .await
            .map(|v| redis::from_redis_value(v).unwrap())
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        start = format!("({last}");
        for (entry, fields) in page {
            // The `id` field in binary mode, the document's `id` in
            // structured mode.
            let id = match fields.iter().find(|(n, _)| n == "id") {
                Some((_, id)) => id.clone(),
                None => {
                    let (_, document) = fields.iter().find(|(n, _)| n == "data").unwrap();
                    let document: serde_json::Value = serde_json::from_str(document).unwrap();
                    document["id"].as_str().unwrap().to_owned()
                }
            };
            out.push((entry, id));
        }
    }
    out
}

/// Issues one `call` per event on `publisher` without waiting for any
/// reply, so that the `XADD`s queue up and travel in shared pipelines.
async fn call_all(publisher: &mut RedisPublisher, events: &[Event]) -> Vec<ResponseFuture> {
    let mut futures = Vec::with_capacity(events.len());
    for event in events {
        futures.push(publisher.ready().await.unwrap().call(event.clone()));
    }
    futures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_each_get_their_own_entry_id_in_call_order() {
    const N: usize = 3000;
    let ns = unique("wtr_own_ids");
    let topic = format!("{ns}.orders");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let key = publisher.config().stream_key(&topic);
    let events = numbered(&topic, N);

    // All calls issued before any reply is awaited: they share pipelines.
    let futures = call_all(&mut publisher, &events).await;
    let receipts: Vec<Receipt> = tokio::time::timeout(WAIT, join_all(futures))
        .await
        .expect("every call answered")
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();

    let mut conn = common::raw(URL).await;
    let stored = entries(&mut conn, &key).await;
    assert_eq!(stored.len(), N, "one entry per call");
    // Calls from one task keep their order on the wire and in the stream.
    let in_stream: Vec<&str> = stored.iter().map(|(_, id)| id.as_str()).collect();
    let called: Vec<&str> = events.iter().map(Event::id).collect();
    assert_eq!(in_stream, called);
    // Each receipt names the entry holding its own event.
    let by_entry: HashMap<&str, &str> = stored.iter().map(|(e, id)| (e.as_str(), id.as_str())).collect();
    for (event, receipt) in events.iter().zip(&receipts) {
        assert_eq!(&*receipt.event_id, event.id());
        assert_eq!(receipt.stream.as_deref(), Some(key.as_str()));
        let entry = receipt.message_id.as_deref().expect("an entry id");
        assert_eq!(by_entry.get(entry).copied(), Some(event.id()), "entry {entry}");
    }
    let distinct: HashSet<_> = receipts.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(distinct.len(), N);

    // Many clones at once, each awaiting its own call, land as well.
    let more: Vec<Event> = (0..N)
        .map(|i| Event::new(topic.clone(), serde_json::json!({"j": i})))
        .collect();
    let results = tokio::time::timeout(
        WAIT,
        join_all(more.iter().map(|e| publisher.clone().oneshot(e.clone()))),
    )
    .await
    .expect("every call answered");
    let stored = entries(&mut conn, &key).await;
    assert_eq!(stored.len(), 2 * N);
    let by_entry: HashMap<&str, &str> = stored.iter().map(|(e, id)| (e.as_str(), id.as_str())).collect();
    for (event, result) in more.iter().zip(results) {
        let receipt = result.unwrap();
        assert_eq!(
            by_entry.get(receipt.message_id.as_deref().unwrap()).copied(),
            Some(event.id())
        );
    }
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_fails_only_its_own_event() {
    const N: usize = 600;
    let ns = unique("wtr_wrongtype");
    let good = format!("{ns}.good");
    let bad = format!("{ns}.bad");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let good_key = publisher.config().stream_key(&good);
    let bad_key = publisher.config().stream_key(&bad);
    let mut conn = common::raw(URL).await;
    // A plain string where the stream should be: XADD answers WRONGTYPE.
    let _: () = redis::cmd("SET")
        .arg(&bad_key)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();

    // Every third event goes to the broken stream, interleaved with the
    // others in the same pipelines.
    let events: Vec<Event> = (0..N)
        .map(|i| {
            let topic = if i % 3 == 1 { &bad } else { &good };
            Event::new(topic.clone(), serde_json::json!({"i": i}))
        })
        .collect();
    let futures = call_all(&mut publisher, &events).await;
    let results = tokio::time::timeout(WAIT, join_all(futures))
        .await
        .expect("every call answered");

    let stored = entries(&mut conn, &good_key).await;
    let by_entry: HashMap<&str, &str> = stored.iter().map(|(e, id)| (e.as_str(), id.as_str())).collect();
    let (mut ok, mut rejected) = (0, 0);
    for (event, result) in events.iter().zip(results) {
        if event.topic() == bad {
            let err = result.expect_err("XADD to a string key fails");
            assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
            assert!(err.message().contains("WRONGTYPE"), "{err}");
            assert_eq!(
                err.event().map(Event::id),
                Some(event.id()),
                "the event comes back"
            );
            rejected += 1;
        } else {
            let receipt = result.unwrap();
            assert_eq!(
                by_entry.get(receipt.message_id.as_deref().unwrap()).copied(),
                Some(event.id())
            );
            ok += 1;
        }
    }
    assert_eq!((ok, rejected), (N - N / 3, N / 3));
    assert_eq!(stored.len(), ok);
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_do_not_disturb_the_others() {
    const N: usize = 1000;
    let ns = unique("wtr_dropped");
    let topic = format!("{ns}.orders");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher();
    let key = publisher.config().stream_key(&topic);
    let events = numbered(&topic, N);
    let futures = call_all(&mut publisher, &events).await;
    // Every other caller gives up at once; the last one is kept.
    let kept: Vec<_> = futures
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| (i % 2 == 1).then_some(f))
        .collect();
    let receipts: Vec<Receipt> = tokio::time::timeout(WAIT, join_all(kept))
        .await
        .expect("every kept call answered")
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(receipts.len(), N / 2);

    // A dropped future withdraws its XADD unless it was already sent: the
    // stream holds every kept event and the dropped ones that had gone out,
    // in call order, and each dropped one is either there or counted.
    let mut conn = common::raw(URL).await;
    let stored = entries(&mut conn, &key).await;
    let in_stream: Vec<&str> = stored.iter().map(|(_, id)| id.as_str()).collect();
    let called: Vec<&str> = events.iter().map(Event::id).collect();
    let mut order = called.iter();
    for id in &in_stream {
        assert!(order.any(|c| c == id), "{id} stored out of call order");
    }
    for receipt in &receipts {
        assert!(in_stream.contains(&&*receipt.event_id));
    }
    assert_eq!(in_stream.len() as u64 + publisher.abandoned(), N as u64);
    let by_entry: HashMap<&str, &str> = stored.iter().map(|(e, id)| (e.as_str(), id.as_str())).collect();
    for receipt in &receipts {
        assert_eq!(
            by_entry.get(receipt.message_id.as_deref().unwrap()).copied(),
            Some(&*receipt.event_id)
        );
    }
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_batch_fails_its_callers_and_loses_nothing() {
    const N: usize = 5000;
    let ns = unique("wtr_cut_batch");
    let topic = format!("{ns}.orders");
    let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap()).await.unwrap();
    let config = RedisConfig::new(format!("redis://{}", proxy.addr()))
        .reconnect_retries(1)
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2));
    let mut publisher = RedisClient::connect(config).await.unwrap().publisher();
    let key = publisher.config().stream_key(&topic);
    let events = numbered(&topic, N);

    // The cut comes while pipelines are queued and on the wire.
    let futures = call_all(&mut publisher, &events).await;
    proxy.cut();
    let results = tokio::time::timeout(WAIT, join_all(futures))
        .await
        .expect("every call answered, none left hanging");

    let mut conn = common::raw(URL).await;
    let mut failed = Vec::new();
    let mut receipts = Vec::new();
    for (event, result) in events.iter().zip(results) {
        match result {
            Ok(receipt) => receipts.push(receipt),
            Err(err) => {
                assert!(
                    matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
                    "{err:?}"
                );
                assert_eq!(
                    err.event().map(Event::id),
                    Some(event.id()),
                    "the event comes back"
                );
                failed.push(event.clone());
            }
        }
    }
    // What a retry layer does: publish the failed events again.
    let first_failures = failed.len();
    tokio::time::timeout(WAIT, async {
        while !failed.is_empty() {
            let futures = call_all(&mut publisher, &failed).await;
            let results = join_all(futures).await;
            failed = failed
                .into_iter()
                .zip(results)
                .filter_map(|(event, result)| match result {
                    Ok(receipt) => {
                        receipts.push(receipt);
                        None
                    }
                    Err(err) => {
                        assert!(
                            matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
                            "{err:?}"
                        );
                        Some(event)
                    }
                })
                .collect();
        }
    })
    .await
    .expect("Redis accepts the events again");

    let stored = entries(&mut conn, &key).await;
    let by_entry: HashMap<&str, &str> = stored.iter().map(|(e, id)| (e.as_str(), id.as_str())).collect();
    // Every receipt is right, and every event is in the stream.
    assert_eq!(receipts.len(), N);
    for receipt in &receipts {
        assert_eq!(
            by_entry.get(receipt.message_id.as_deref().unwrap()).copied(),
            Some(&*receipt.event_id)
        );
    }
    let in_stream: HashSet<&str> = stored.iter().map(|(_, id)| id.as_str()).collect();
    let missing = events.iter().filter(|e| !in_stream.contains(e.id())).count();
    assert_eq!(missing, 0, "{missing} events lost");
    // Only an XADD whose reply was lost in the cut can be stored twice.
    assert!(stored.len() - N <= first_failures);
    println!(
        "{N} calls: {first_failures} failed in the cut, {} entries in the stream",
        stored.len()
    );
    cleanup(URL, &ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_queue_makes_callers_wait_for_room_and_loses_nothing() {
    const N: usize = 500;
    let ns = unique("wtr_small_queue");
    let topic = format!("{ns}.orders");
    let mut publisher = RedisClient::connect(RedisConfig::new(URL))
        .await
        .unwrap()
        .publisher_with(RedisPublisherOptions::new().max_pending(8))
        .unwrap();
    let key = publisher.config().stream_key(&topic);
    let events = numbered(&topic, N);
    // Far more calls than slots, none of their futures polled yet:
    // `poll_ready` waits for replies to free slots, and no call is refused.
    let futures = tokio::time::timeout(WAIT, call_all(&mut publisher, &events))
        .await
        .expect("slots free up as replies come in");
    let receipts: Vec<Receipt> = tokio::time::timeout(WAIT, join_all(futures))
        .await
        .expect("every call answered")
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(receipts.len(), N);
    let mut conn = common::raw(URL).await;
    let stored = entries(&mut conn, &key).await;
    let in_stream: Vec<&str> = stored.iter().map(|(_, id)| id.as_str()).collect();
    let called: Vec<&str> = events.iter().map(Event::id).collect();
    assert_eq!(in_stream, called);
    cleanup(URL, &ns).await;
}

#[test]
fn calls_fail_rather_than_hang_once_the_connection_task_is_gone() {
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ns = unique("wtr_task_gone");
    let event = Event::new(format!("{ns}.t"), serde_json::json!({}));
    let (mut publisher, queued) = first.block_on(async {
        let mut publisher = RedisClient::connect(RedisConfig::new(URL))
            .await
            .unwrap()
            .publisher();
        // Queued, but the connection task does not run before the runtime
        // goes: dropping the runtime drops the task.
        let queued = publisher.ready().await.unwrap().call(event.clone());
        (publisher, queued)
    });
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let err = tokio::time::timeout(WAIT, queued)
            .await
            .expect("answered")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
        assert_eq!(err.event().map(Event::id), Some(event.id()));
        let err = tokio::time::timeout(WAIT, publisher.ready())
            .await
            .expect("answered")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    });
}
