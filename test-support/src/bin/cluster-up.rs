//! Starts a private cluster on free ports of 127.0.0.1, prints where it
//! is as environment lines, and keeps it running until interrupted
//! (Ctrl-C, SIGTERM or SIGHUP), then stops it and removes its stores.
//!
//! ```text
//! cargo run -p watchtower-test-support --bin cluster-up -- redis
//! WATCHTOWER_REDIS_CLUSTER=127.0.0.1:41001,127.0.0.1:41002,...
//! ```
//!
//! `redis`: 3 masters and 3 replicas (Redis Cluster); `nats`: 3 routed
//! `nats-server`s with clustered JetStream; `rabbitmq`: a 3-node RabbitMQ
//! cluster (guest/guest) for quorum queues. The shared brokers on their
//! standard ports are never touched.

use tokio::signal::unix::{SignalKind, signal};
use watchtower_test_support::{NatsCluster, RabbitCluster, RedisCluster};

const USAGE: &str = "usage: cluster-up redis|nats|rabbitmq";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let kind = std::env::args().nth(1).unwrap_or_default();
    let held: Box<dyn std::any::Any> = match kind.as_str() {
        "redis" => {
            let cluster = RedisCluster::start(3, 1).await;
            println!("WATCHTOWER_REDIS_CLUSTER={}", hosts(&cluster.urls()));
            Box::new(cluster)
        }
        "nats" => {
            let cluster = NatsCluster::start(3).await;
            println!("WATCHTOWER_NATS_CLUSTER={}", hosts(&cluster.urls()));
            Box::new(cluster)
        }
        "rabbitmq" => {
            let cluster = RabbitCluster::start(3).await;
            println!("WATCHTOWER_RABBITMQ_CLUSTER={}", hosts(&cluster.urls()));
            Box::new(cluster)
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    eprintln!("cluster-up: {kind} cluster running; Ctrl-C stops it");
    let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("a SIGHUP handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        _ = hangup.recv() => {}
    }
    drop(held);
    // The processes were sent SIGKILL on drop; let the runtime reap them.
    tokio::task::yield_now().await;
    eprintln!("cluster-up: {kind} cluster stopped");
}

/// `host:port` of each URL (without scheme, credentials or path),
/// comma-separated.
fn hosts(urls: &[String]) -> String {
    urls.iter()
        .map(|url| {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            rest.split('/').next().unwrap_or(rest)
        })
        .collect::<Vec<_>>()
        .join(",")
}
