//! Scaling out: JetStream publish and consume on a private `nats-server`
//! (a stream of one replica) and on a private cluster of three (a stream
//! of three replicas), in the same run.
//!
//! Each round, on each: `N` events of about 60 bytes published through
//! [`JetStreamPublisher`] by 256 concurrent callers (1,024 acknowledgements
//! in flight at most), to a file stream; then the same events consumed
//! through a group, [`watchtower::serve`] with concurrency 256. The client
//! of the cluster is given all three servers. The servers are started by
//! the bench on free ports; nothing touches the shared broker.
//!
//! Run with `cargo bench -p watchtower-nats --bench cluster`
//! (`BENCH_ROUNDS` for the number of rounds, 3 by default).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower::{ServiceExt as _, service_fn};
use watchtower::{Error, Event, SubscribeOptions, Subscriber, serve};
use watchtower_nats::{ConsumerSettings, NatsClient, NatsConfig, StorageType, StreamConfig};
use watchtower_test_support::{NatsCluster, NatsServer, unique};

const N: usize = 50_000;
const CALLERS: usize = 256;

async fn connect(urls: &[String]) -> NatsClient {
    let mut config = NatsConfig::new(urls[0].clone()).request_timeout(Duration::from_secs(10));
    for url in &urls[1..] {
        config = config.server(url.clone());
    }
    NatsClient::connect(config).await.unwrap()
}

async fn publish(client: &NatsClient, name: &str) -> f64 {
    let publisher = client.jetstream_publisher().max_in_flight(1024);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let publisher = publisher.clone();
        let topic = format!("{name}.events");
        tasks.push(tokio::spawn(async move {
            for i in (caller..N).step_by(CALLERS) {
                let event = Event::new(topic.clone(), serde_json::json!({ "i": i }));
                publisher.clone().oneshot(event).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    N as f64 / start.elapsed().as_secs_f64()
}

async fn consume(client: &NatsClient, name: &str) -> f64 {
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (counter, notify) = (handled.clone(), all.clone());
    let start = Instant::now();
    let subscription = client
        .jetstream_subscriber(name)
        .settings(
            ConsumerSettings::new()
                .batch(256)
                .max_ack_pending(20_000)
                .expires(Duration::from_secs(2)),
        )
        .open(
            SubscribeOptions::new([format!("{name}.>")])
                .unwrap()
                .group("bench")
                .unwrap()
                .replay(true),
        )
        .await
        .unwrap();
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
    assert!(stats.acked as usize >= N, "{stats}");
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
    let single = NatsServer::start().await;
    let cluster = NatsCluster::start(3).await;
    let sides = [
        ("single server, R1", connect(&[single.url()]).await, 1),
        ("3-server cluster, R3", connect(&cluster.urls()).await, 3),
    ];
    let mut rates = vec![[Vec::new(), Vec::new()]; 2];
    for round in 0..rounds {
        for (i, (_, client, replicas)) in sides.iter().enumerate() {
            let name = unique(&format!("BENCH{round}"));
            client
                .create_or_update_stream(StreamConfig {
                    name: name.clone(),
                    subjects: vec![format!("{name}.>")],
                    storage: StorageType::File,
                    num_replicas: *replicas,
                    ..Default::default()
                })
                .await
                .unwrap();
            rates[i][0].push(publish(client, &name).await);
            rates[i][1].push(consume(client, &name).await);
            client.delete_stream(&name).await.unwrap();
        }
    }
    println!("{N} JetStream events, {CALLERS} callers, {rounds} rounds (median events/s)");
    let mut medians = Vec::new();
    for (i, (name, _, _)) in sides.iter().enumerate() {
        let publish = median(&mut rates[i][0]);
        let consume = median(&mut rates[i][1]);
        println!("{name:>22}: publish {publish:>9.0}/s, consume {consume:>9.0}/s");
        medians.push((publish, consume));
    }
    println!(
        "{:>22}: publish {:.2}x, consume {:.2}x",
        "cluster / single",
        medians[1].0 / medians[0].0,
        medians[1].1 / medians[0].1
    );
}
