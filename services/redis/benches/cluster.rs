//! Scaling out: publish and consume on a private Redis and on a private
//! Redis Cluster of three masters, in the same run, as per-round ratios.
//!
//! Each round, on each: `N` events of about 60 bytes over eight topics
//! (spread over the masters by their hash tags on the cluster) published by
//! 256 concurrent callers through [`RedisPublisher`]; then the same events
//! consumed through a group, [`watchtower::serve`] with concurrency 256.
//! Both servers are started by the bench on free ports, without
//! persistence; nothing touches the shared Redis.
//!
//! Run with `cargo bench -p watchtower-redis --bench cluster`
//! (`BENCH_ROUNDS` for the number of rounds, 3 by default).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tower::{ServiceExt as _, service_fn};
use watchtower::{Error, Event, SubscribeOptions, Subscriber, serve};
use watchtower_redis::{RedisClient, RedisConfig, RedisSubscriberOptions};
use watchtower_test_support::{RedisCluster, RedisServer, unique};

const N: usize = 50_000;
const CALLERS: usize = 256;
const TOPICS: usize = 8;

async fn publish(config: &RedisConfig, topics: &[String]) -> f64 {
    let publisher = RedisClient::connect(config.clone()).await.unwrap().publisher();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let publisher = publisher.clone();
        let topics = topics.to_vec();
        tasks.push(tokio::spawn(async move {
            for i in (caller..N).step_by(CALLERS) {
                let event = Event::new(topics[i % TOPICS].clone(), serde_json::json!({ "i": i }));
                publisher.clone().oneshot(event).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    N as f64 / start.elapsed().as_secs_f64()
}

async fn consume(config: &RedisConfig, topics: &[String]) -> f64 {
    let subscriber = RedisClient::connect(config.clone())
        .await
        .unwrap()
        .subscriber_with(RedisSubscriberOptions::new().batch_size(256))
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (counter, notify) = (handled.clone(), all.clone());
    let start = Instant::now();
    let options = SubscribeOptions::new(topics)
        .unwrap()
        .group("bench")
        .unwrap()
        .replay(true);
    let subscription = subscriber.open(options).await.unwrap();
    let handler = service_fn(move |event: Event| {
        std::hint::black_box(event.data());
        if counter.fetch_add(1, Ordering::Relaxed) + 1 == N {
            notify.notify_one();
        }
        async { Ok::<_, Error>(()) }
    });
    let stats = serve(subscription, handler)
        .concurrency(256)
        .with_graceful_shutdown(async move { all.notified().await })
        .await
        .unwrap();
    assert_eq!(stats.acked as usize, N, "{stats}");
    N as f64 / start.elapsed().as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let single = RedisServer::start().await;
    let cluster = RedisCluster::start(3, 0).await;
    let configs = [
        ("single Redis", RedisConfig::new(single.url())),
        ("Redis Cluster, 3 masters", RedisConfig::cluster(cluster.urls())),
    ];
    let mut rates = vec![[Vec::new(), Vec::new()]; 2];
    for round in 0..rounds {
        for (i, (_, config)) in configs.iter().enumerate() {
            let ns = unique(&format!("bench{round}"));
            let topics: Vec<String> = (0..TOPICS).map(|t| format!("{ns}.t{t}")).collect();
            rates[i][0].push(publish(config, &topics).await);
            rates[i][1].push(consume(config, &topics).await);
        }
    }
    println!("{N} events over {TOPICS} topics, {CALLERS} callers, {rounds} rounds (median events/s)");
    let mut medians = Vec::new();
    for (i, (name, _)) in configs.iter().enumerate() {
        let publish = median(&mut rates[i][0]);
        let consume = median(&mut rates[i][1]);
        println!("{name:>26}: publish {publish:>9.0}/s, consume {consume:>9.0}/s");
        medians.push((publish, consume));
    }
    println!(
        "{:>26}: publish {:.2}x, consume {:.2}x",
        "cluster / single",
        medians[1].0 / medians[0].0,
        medians[1].1 / medians[0].1
    );
}
