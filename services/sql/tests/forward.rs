//! The forwarder is `serve(sql_subscription, broker_publisher)`: events
//! written to the SQL transport reach a real broker, at least once, shared
//! between forwarder instances, and exactly once into JetStream thanks to
//! its deduplication by event id.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use tower::{ServiceExt as _, service_fn};
use watchtower::{
    Error, ErrorKind, Event, PublishExt as _, ServeStats, SubscribeOptions, Subscriber as _, serve,
};
use watchtower_nats::{NatsClient, NatsConfig, StorageType, StreamConfig};
use watchtower_redis::{RedisClient, RedisConfig};
use watchtower_test_support::PATIENCE;

use common::{Db, NATS, REDIS, Tables, collect, redis_delete, redis_ids, take};

/// `n` events over `keys` topics under `ns`, published concurrently.
async fn publish(client: &watchtower_sql::SqlClient, ns: &str, keys: usize, n: usize) -> Vec<Event> {
    let events: Vec<Event> = (0..n)
        .map(|i| Event::new(format!("{ns}.k{}", i % keys), serde_json::json!({ "i": i })))
        .collect();
    let publisher = client.publisher();
    let calls = events.iter().cloned().map(|event| {
        let publisher = publisher.clone();
        async move { publisher.oneshot(event).await }
    });
    for receipt in join_all(calls).await {
        receipt.unwrap();
    }
    events
}

fn ids(events: &[Event]) -> HashSet<String> {
    events.iter().map(|e| e.id().to_owned()).collect()
}

/// The forwarder: `client`'s subscription to `pattern` in the group
/// "forwarder", served into a Redis publisher until the streams `keys`
/// hold `n` entries, then stopped. Returns the entries' event ids and the
/// runtime's stats.
async fn forward_to_redis(
    client: &watchtower_sql::SqlClient,
    pattern: String,
    keys: &[String],
    n: usize,
) -> (Vec<String>, ServeStats) {
    let redis = RedisClient::connect(RedisConfig::new(REDIS)).await.unwrap();
    let subscription = client
        .subscriber()
        .open(
            SubscribeOptions::new([pattern])
                .unwrap()
                .group("forwarder")
                .unwrap(),
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarder = tokio::spawn(
        serve(subscription, redis.publisher())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let mut got = Vec::new();
    watchtower_test_support::within(&format!("{n} events in Redis"), async {
        loop {
            got.clear();
            for key in keys {
                got.extend(redis_ids(key).await);
            }
            if got.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = stop.send(());
    (got, forwarder.await.unwrap().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_to_redis_at_least_once_then_clean_up() {
    let tables = Tables::new(Db::Postgres, "fwdredis").await;
    let ns = tables.name.clone();
    let sent = publish(&tables.client, &ns, 4, 1000).await;

    let keys: Vec<String> = (0..4).map(|k| format!("{ns}.k{k}")).collect();
    let (got, stats) = forward_to_redis(&tables.client, format!("{ns}.>"), &keys, 1000).await;
    assert_eq!(stats.acked, 1000, "{stats}");
    assert_eq!(got.len(), 1000, "no duplicates without a failure");
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), ids(&sent));

    // Every event settled by the only group: clean-up deletes them all.
    assert_eq!(tables.client.cleanup().await.unwrap(), 1000);
    assert_eq!(tables.client.cleanup().await.unwrap(), 0);
    redis_delete(&keys).await;
    tables.drop_all().await;
}

/// A forwarder whose group starts behind many events of other topics
/// reads past them at once, page after page, rather than one page per
/// poll interval: the interval is an hour here, so a forwarder that waited
/// for it would not forward anything within the test's patience. (Each
/// page of other topics used to cost a poll interval: 120 events/s into
/// Redis after a forward to NATS left its events in the table.)
async fn forward_past_other_topics_without_waiting_for_the_poll_interval(db: Db) {
    let tables = Tables::new(db, "fwdskip").await;
    let ns = tables.name.clone();
    // Twenty pages of the batch size (16) for another topic, then the
    // events the forwarder wants.
    publish(&tables.client, &format!("{ns}.other"), 1, 320).await;
    let sent = publish(&tables.client, &format!("{ns}.wanted"), 2, 40).await;

    let client = tables
        .another(|c| c.poll_interval(Duration::from_secs(3600)))
        .await;
    let keys: Vec<String> = (0..2).map(|k| format!("{ns}.wanted.k{k}")).collect();
    let (got, stats) = forward_to_redis(&client, format!("{ns}.wanted.>"), &keys, 40).await;
    assert_eq!(stats.acked, 40, "{stats}");
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), ids(&sent));
    assert_eq!(got.len(), 40, "no duplicates without a failure");
    redis_delete(&keys).await;
    drop(client);
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_past_other_topics_without_waiting_postgres() {
    forward_past_other_topics_without_waiting_for_the_poll_interval(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_past_other_topics_without_waiting_sqlite() {
    forward_past_other_topics_without_waiting_for_the_poll_interval(Db::Sqlite).await;
}

/// Two forwarders in one group share the work: while the first is held
/// busy (it forwards nothing until the second has forwarded an event), the
/// second claims what the first has no room for; then both go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_forwarders_share_the_work_to_nats_core() {
    let tables = Tables::new(Db::Postgres, "fwdnats").await;
    let ns = tables.name.clone();
    let nats = NatsClient::connect(NatsConfig::new(NATS)).await.unwrap();
    let (mut rx, receiver) = collect(
        &nats.subscriber(),
        SubscribeOptions::new([format!("{ns}.>")]).unwrap(),
    )
    .await;

    // Two forwarder instances, each with its own client (as two processes
    // would have), in one group.
    let (second_forwarded, forwarded_by_second) = tokio::sync::watch::channel(false);
    let second_forwarded = Arc::new(second_forwarded);
    let mut forwarders = Vec::new();
    for member in 0..2 {
        let client = tables.another(|c| c).await;
        let subscription = client
            .subscriber()
            .open(
                SubscribeOptions::new([format!("{ns}.>")])
                    .unwrap()
                    .group("forwarder")
                    .unwrap(),
            )
            .await
            .unwrap();
        let (publisher, second_forwarded, forwarded_by_second) = (
            nats.publisher(),
            second_forwarded.clone(),
            forwarded_by_second.clone(),
        );
        let forward = service_fn(move |event: Event| {
            let (mut publisher, second_forwarded, mut forwarded_by_second) = (
                publisher.clone(),
                second_forwarded.clone(),
                forwarded_by_second.clone(),
            );
            async move {
                if member == 0 {
                    let _ = tokio::time::timeout(PATIENCE, forwarded_by_second.wait_for(|&yes| yes)).await;
                }
                let receipt = publisher.publish(event).await?;
                if member == 1 {
                    second_forwarded.send_replace(true);
                }
                Ok::<_, Error>(receipt)
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(
            serve(subscription, forward)
                .concurrency(8)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        forwarders.push((stop, run, client));
    }
    let sent = publish(&tables.client, &ns, 8, 2000).await;
    let mut got = take(&mut rx, 2000).await;
    let mut acked = Vec::new();
    for (stop, run, _client) in forwarders {
        let _ = stop.send(());
        acked.push(run.await.unwrap().unwrap().acked);
    }
    got.extend(std::iter::from_fn(|| rx.try_recv().ok()));
    receiver.stop().await.unwrap();
    let unique = ids(&got);
    assert_eq!(unique, ids(&sent), "every event forwarded");
    let duplicates = got.len() - unique.len();
    // What the broker received is what the forwarders acknowledged: a
    // duplicate would be an event forwarded twice.
    assert_eq!(acked.iter().sum::<u64>() as usize, got.len(), "acked {acked:?}");
    assert_eq!(duplicates, 0, "no duplicates without a failure");
    assert!(acked.iter().all(|&n| n > 0), "both forwarders worked: {acked:?}");
    tables.drop_all().await;
}

/// A hand-off that fails after the broker stored the event (the forwarder
/// dies before its acknowledgement) forwards it again; JetStream knows it
/// by its id and stores it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_dedup_makes_the_hand_off_exactly_once() {
    let tables = Tables::new(Db::Sqlite, "fwdjs").await;
    let ns = tables.name.clone();
    let stream = ns.to_uppercase();
    let nats = NatsClient::connect(NatsConfig::new(NATS)).await.unwrap();
    nats.create_or_update_stream(StreamConfig {
        name: stream.clone(),
        subjects: vec![format!("{ns}.>")],
        storage: StorageType::Memory,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let sent = publish(&tables.client, &ns, 4, 200).await;

    let publisher = nats.jetstream_publisher();
    let seen = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let duplicates = Arc::new(Mutex::new(0_usize));
    let (seen2, duplicates2) = (seen.clone(), duplicates.clone());
    let handler = service_fn(move |event: Event| {
        let mut publisher = publisher.clone();
        let (seen, duplicates) = (seen2.clone(), duplicates2.clone());
        async move {
            let receipt = publisher.publish(event.clone()).await?;
            if receipt.duplicate {
                *duplicates.lock().unwrap() += 1;
            }
            let mut seen = seen.lock().unwrap();
            let times = seen.entry(event.id().to_owned()).or_default();
            *times += 1;
            if *times == 1 {
                // Stored by the broker, but the forwarder fails before it
                // acknowledges: the SQL transport delivers it again.
                return Err(Error::new(ErrorKind::Connection, "lost after the hand-off"));
            }
            Ok::<_, Error>(())
        }
    });
    let subscription = tables
        .client
        .subscriber()
        .open(
            SubscribeOptions::new([format!("{ns}.>")])
                .unwrap()
                .group("forwarder")
                .unwrap(),
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarder = tokio::spawn(
        serve(subscription, handler)
            .redelivery_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    watchtower_test_support::within("every event handed over twice", async {
        loop {
            if seen.lock().unwrap().values().filter(|&&n| n >= 2).count() == sent.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = stop.send(());
    let stats = forwarder.await.unwrap().unwrap();
    assert_eq!(stats.acked, 200, "{stats}");
    assert_eq!(
        *duplicates.lock().unwrap(),
        200,
        "every second hand-off is a known duplicate"
    );
    assert_eq!(
        nats.stream_messages(&stream).await.unwrap(),
        200,
        "stored once each"
    );
    nats.delete_stream(&stream).await.unwrap();
    tables.drop_all().await;
}
