//! Batch consumers on Redis, JetStream and memory: each event of a batch
//! settled on its own, nacked ones back, acked ones not, bad answers and
//! poison handled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::watch;
use tower::service_fn;
use watchtower::prelude::*;
use watchtower::{ServeStats, ext};
use watchtower_memory::MemoryBroker;
use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig, StreamConfig};
use watchtower_test_support::{unique, within};
use watchtower_toolkit::batch::serve_batch;

const EVENTS: u64 = 60;
const MAX_SIZE: usize = 16;

#[derive(Default)]
struct Record {
    /// Deliveries per event number.
    deliveries: HashMap<u64, u32>,
    /// Batch sizes, in order.
    sizes: Vec<usize>,
}

/// Fails every odd event on its first delivery, handles the rest; sends
/// the number of successes so far.
fn odd_fail_once(
    record: &Arc<Mutex<Record>>,
    done: watch::Sender<u64>,
) -> impl tower::Service<Vec<Event>, Response = Vec<Result<(), Error>>, Error = Error, Future: Send + 'static>
+ Send
+ 'static {
    let record = record.clone();
    service_fn(move |batch: Vec<Event>| {
        let record = record.clone();
        let done = done.clone();
        async move {
            let mut record = record.lock().unwrap();
            record.sizes.push(batch.len());
            let results = batch
                .iter()
                .map(|event| {
                    let n = event.json::<u64>().unwrap();
                    *record.deliveries.entry(n).or_default() += 1;
                    if n % 2 == 1 && event.extension(ext::ATTEMPT).is_none() {
                        Err(Error::new(ErrorKind::Handler, "try again"))
                    } else {
                        done.send_modify(|ok| *ok += 1);
                        Ok(())
                    }
                })
                .collect();
            Ok::<_, Error>(results)
        }
    })
}

async fn run_and_check<St, A>(subscription: St, mut publish: impl AsyncFnMut(Event))
where
    St: Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
{
    // Everything is published first, so that batches fill up.
    for n in 0..EVENTS {
        publish(Event::new("row", serde_json::json!(n))).await;
    }
    let record = Arc::new(Mutex::new(Record::default()));
    let (done, mut handled) = watch::channel(0u64);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve_batch(subscription, odd_fail_once(&record, done))
            .max_size(MAX_SIZE)
            .max_wait(Duration::from_millis(50))
            .redelivery_backoff(Duration::from_millis(10), Duration::from_millis(10))
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    within("every event to be handled", handled.wait_for(|n| *n == EVENTS))
        .await
        .unwrap();
    stop.send(()).unwrap();
    let stats: ServeStats = server.await.unwrap().unwrap();
    let record = record.lock().unwrap();
    for n in 0..EVENTS {
        let expected = if n % 2 == 1 { 2 } else { 1 };
        assert_eq!(
            record.deliveries.get(&n),
            Some(&expected),
            "event {n}: nacked ones come back once, acked ones never"
        );
    }
    assert_eq!(stats.acked, EVENTS, "{stats}");
    assert_eq!(stats.nacked, EVENTS / 2, "{stats}");
    assert_eq!(stats.dead_lettered, 0);
    assert!(
        record.sizes.iter().all(|s| (1..=MAX_SIZE).contains(s)),
        "{:?}",
        record.sizes
    );
    assert!(
        record.sizes.iter().any(|s| *s > 1),
        "events were batched: {:?}",
        record.sizes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_each_event_on_its_own_on_redis() {
    let prefix = format!("{}:", unique("tk_batch"));
    let client = common::redis_client(&prefix).await;
    let subscription = client
        .subscriber_with(common::quick().batch_size(MAX_SIZE))
        .unwrap()
        .open(SubscribeOptions::new(["row"]).unwrap().group("loader").unwrap())
        .await
        .unwrap();
    let mut publisher = client.publisher();
    run_and_check(subscription, async |event| {
        publisher.publish(event).await.unwrap();
    })
    .await;
    // Nothing is left pending in the group: every entry was acked.
    let mut conn = common::raw(common::REDIS).await;
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(format!("{prefix}row"))
        .arg("loader")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(parts) = summary else {
        panic!("unexpected XPENDING reply {summary:?}")
    };
    assert_eq!(
        parts[0],
        redis::Value::Int(0),
        "pending entries remain: {parts:?}"
    );
    common::cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_each_event_on_its_own_on_jetstream() {
    let client = NatsClient::connect(NatsConfig::new(common::NATS)).await.unwrap();
    let name = unique("TKBATCH");
    client
        .create_or_update_stream(StreamConfig {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            max_age: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .unwrap();
    let subscription = client
        .jetstream_subscriber(&name)
        .settings(
            ConsumerSettings::new()
                .ack_wait(Duration::from_secs(30))
                .batch(MAX_SIZE),
        )
        .open(
            SubscribeOptions::new([format!("{name}.>")])
                .unwrap()
                .group("loader")
                .unwrap(),
        )
        .await
        .unwrap();
    let mut publisher = client.jetstream_publisher();
    let topic = format!("{name}.row");
    run_and_check(subscription, async |event| {
        publisher.publish(event.with_topic(topic.clone())).await.unwrap();
    })
    .await;
    client.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn final_errors_short_answers_whole_batch_errors_and_poison_each_find_their_path() {
    let broker = MemoryBroker::new();
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["job.*"]).unwrap())
        .await
        .unwrap();
    // Published before the runtime starts, so that the first batch holds
    // all of them.
    let mut publisher = broker.publisher();
    for ty in ["job.short", "job.refused", "job.ok"] {
        publisher
            .publish(Event::new(ty, serde_json::json!({})))
            .await
            .unwrap();
    }
    broker
        .publish_raw("job.garbage", &b"\xff not an event"[..])
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
    let handler = {
        let calls = calls.clone();
        service_fn(move |batch: Vec<Event>| {
            let calls = calls.clone();
            async move {
                let names: Vec<String> = batch
                    .iter()
                    .map(|e| format!("{}#{}", e.ty(), e.extension(ext::ATTEMPT).unwrap_or("1")))
                    .collect();
                calls.lock().unwrap().push(names);
                if batch.iter().any(|e| e.ty() == "job.explode") && batch[0].extension(ext::ATTEMPT).is_none()
                {
                    return Err(Error::new(ErrorKind::Handler, "the whole batch failed"));
                }
                // One answer short on purpose when `job.short` is first.
                let mut results: Vec<Result<(), Error>> = batch
                    .iter()
                    .map(|e| match e.ty() {
                        "job.refused" => Err(Error::new(ErrorKind::Rejected, "refused for good")),
                        _ => Ok(()),
                    })
                    .collect();
                if batch[0].ty() == "job.short" && batch[0].extension(ext::ATTEMPT).is_none() {
                    results.pop();
                }
                Ok::<_, Error>(results)
            }
        })
    };
    let serve = serve_batch(subscription, handler)
        .max_size(8)
        .max_wait(Duration::from_millis(20))
        .redelivery_backoff(Duration::from_millis(1), Duration::from_millis(1));
    let dead = serve.default_dead_letters().unwrap().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    publisher
        .publish(Event::new("job.explode", serde_json::json!({})))
        .await
        .unwrap();
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    // job.short, job.ok acked; job.refused dead-lettered; the garbage
    // poisoned; job.ok was the short answer's missing one and came back;
    // job.explode failed with its batch and came back.
    assert_eq!(stats.poisoned, 1, "{stats}");
    assert_eq!(stats.dead_lettered, 1, "{stats}");
    assert_eq!(stats.acked, 3, "{stats}");
    assert_eq!(stats.nacked, 2, "{stats}");
    let letters = dead.drain();
    let kinds: Vec<_> = letters
        .iter()
        .map(|e| {
            (
                e.ty().to_owned(),
                e.extension("deadletterkind").unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("job.refused".to_owned(), "rejected".to_owned())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("watchtower.poison".to_owned(), "decode".to_owned())),
        "{kinds:?}"
    );
    let calls = calls.lock().unwrap();
    let flat: Vec<&str> = calls.iter().flatten().map(String::as_str).collect();
    assert!(flat.contains(&"job.ok#2"), "{flat:?}");
    assert!(flat.contains(&"job.explode#2"), "{flat:?}");
    assert!(!flat.iter().any(|c| c.starts_with("job.garbage")), "{flat:?}");
}
