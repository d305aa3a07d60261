//! Waiting for replicas (`RedisPublisherOptions::wait_for_replicas`): on a
//! private Redis Cluster with a replica per master, and on a private
//! master with one replica. A caller is answered once a replica has its
//! event, or told, with a typed error, that fewer replicas than asked
//! acknowledged it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::ServiceExt as _;
use watchtower::{ErrorKind, Event, PublishBatchExt as _, PublishExt as _, Receipt};
use watchtower_redis::{
    RedisClient, RedisConfig, RedisPublisher, RedisPublisherOptions, ReplicasNotAcknowledged,
};
use watchtower_test_support::{PATIENCE, RedisCluster, RedisServer, unique};

/// Waiting for one replica, at most 2 s: plenty on a loaded machine,
/// shorter than the 5 s response timeout.
const ONE_REPLICA: (u32, Duration) = (1, Duration::from_secs(2));

/// 400 events over eight topics, 64 calls at once, so that batches span
/// several masters.
async fn publish_many(publisher: &RedisPublisher, ns: &str) -> Vec<Receipt> {
    let mut calls: FuturesUnordered<_> = (0..400)
        .map(|i| {
            let event = Event::new(format!("{ns}.t{}", i % 8), serde_json::json!({ "i": i }));
            publisher.clone().oneshot(event)
        })
        .collect();
    let mut receipts = Vec::new();
    while let Some(result) = calls.next().await {
        receipts.push(result.expect("acknowledged by a replica"));
    }
    receipts
}

/// Whether the node at `url` holds entry `id` of `stream`.
async fn has_entry(url: &str, stream: &str, id: &str) -> bool {
    copies(&[url.to_owned()], stream, id).await == 1
}

/// How many of the nodes at `urls` hold entry `id` of `stream`: masters
/// and replicas (asked after `READONLY`) alike, whatever a failover made
/// of them; a node that does not serve the stream's slot answers `MOVED`
/// and holds none.
async fn copies(urls: &[String], stream: &str, id: &str) -> usize {
    let mut copies = 0;
    for url in urls {
        let mut conn = common::raw(url).await;
        // A node outside a cluster refuses READONLY; it reads all the same.
        let _: redis::RedisResult<String> = redis::cmd("READONLY").query_async(&mut conn).await;
        let entries: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(id)
            .arg(id)
            .query_async(&mut conn)
            .await;
        copies += usize::from(entries.is_ok_and(|entries| entries.len() == 1));
    }
    copies
}

/// The typed error of a caller whose event fewer replicas acknowledged.
fn not_acknowledged(error: &watchtower::Error) -> &ReplicasNotAcknowledged {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref())
        .unwrap_or_else(|| panic!("not a ReplicasNotAcknowledged: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_event_is_on_a_replica_when_its_caller_hears_of_it() {
    let cluster = RedisCluster::start(3, 1).await;
    let config = RedisConfig::cluster(cluster.urls());
    let client = RedisClient::connect(config.clone()).await.unwrap();
    let ns = unique("replicated");
    let (replicas, timeout) = ONE_REPLICA;
    let publisher = client
        .publisher_with(RedisPublisherOptions::new().wait_for_replicas(replicas, timeout))
        .unwrap();

    let started = Instant::now();
    let receipts = publish_many(&publisher, &ns).await;
    let waiting = started.elapsed();
    assert_eq!(receipts.len(), 400);
    let started = Instant::now();
    publish_many(&client.publisher(), &ns).await;
    println!(
        "400 events over 8 topics, 64 at once: {waiting:?} waiting for a replica, {:?} without",
        started.elapsed()
    );
    // Read right after: each entry is on its master and on a replica.
    let urls = cluster.urls();
    for receipt in &receipts {
        let stream = receipt.stream.as_deref().unwrap();
        let id = receipt.message_id.as_deref().unwrap();
        assert_eq!(copies(&urls, stream, id).await, 2, "{stream} {id}");
    }

    // Two replicas asked of masters that have one: each caller is told,
    // and its event is stored on the master all the same.
    let greedy = client
        .publisher_with(RedisPublisherOptions::new().wait_for_replicas(2, Duration::from_millis(200)))
        .unwrap();
    let error = greedy
        .clone()
        .publish(Event::new(format!("{ns}.t0"), serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(error.is_retryable());
    assert!(error.event().is_some(), "the caller gets its event back");
    let missing = not_acknowledged(&error);
    assert_eq!((missing.acknowledged, missing.wanted), (1, 2));
    assert_eq!(&*missing.stream, config.stream_key(&format!("{ns}.t0")));
    assert!(copies(&urls, &missing.stream, &missing.entry_id).await >= 1);

    // A batch of the caller's own waits the same way.
    let batch: Vec<Event> = (0..16)
        .map(|i| Event::new(format!("{ns}.t{}", i % 8), serde_json::json!({ "i": i })))
        .collect();
    let results = publisher.batched().publish_batch(batch.clone()).await.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let results = greedy.batched().publish_batch(batch).await.unwrap();
    for result in results {
        let error = result.unwrap_err();
        assert_eq!(not_acknowledged(&error).acknowledged, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_with_one_replica_acknowledges_each_pipeline_or_says_how_many_did() {
    let master = RedisServer::start().await;
    let replica = RedisServer::with_args(&["--replicaof", "127.0.0.1", &master.port().to_string()]).await;
    replica
        .wait_for_log("MASTER <-> REPLICA sync: Finished with success")
        .await;
    let client = RedisClient::connect(RedisConfig::new(master.url()))
        .await
        .unwrap();
    let ns = unique("replicated");
    let (replicas, timeout) = ONE_REPLICA;
    let publisher = client
        .publisher_with(RedisPublisherOptions::new().wait_for_replicas(replicas, timeout))
        .unwrap();
    let receipts = publish_many(&publisher, &ns).await;
    for receipt in &receipts {
        let (stream, id) = (
            receipt.stream.as_deref().unwrap(),
            receipt.message_id.as_deref().unwrap(),
        );
        assert!(has_entry(&replica.url(), stream, id).await, "{stream} {id}");
    }

    // The replica frozen: nobody acknowledges, the caller is told so.
    replica.freeze().await;
    let error = publisher
        .clone()
        .publish(Event::new(format!("{ns}.t0"), serde_json::json!({})))
        .await
        .unwrap_err();
    replica.resume();
    let missing = not_acknowledged(&error);
    assert_eq!((missing.acknowledged, missing.wanted), (0, 1));
    assert!(has_entry(&master.url(), &missing.stream, &missing.entry_id).await);

    // Options out of range are refused when the publisher is made.
    for (replicas, timeout) in [(0, Duration::from_secs(1)), (1, Duration::ZERO), (1, PATIENCE)] {
        let error = client
            .publisher_with(RedisPublisherOptions::new().wait_for_replicas(replicas, timeout))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    }
}
