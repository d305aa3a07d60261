//! A quorum queue on a private 3-node RabbitMQ cluster: the node leading
//! the queue (and holding the publisher's and the subscriber's
//! connections) is killed while 10,000 events are published with
//! confirms, and every confirmed event is consumed. The shared broker is
//! not touched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tower::ServiceBuilder;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Event, SubscribeOptions, Subscriber};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_rabbitmq::{ExchangeKind, QueueOptions, RabbitClient, RabbitConfig};
use watchtower_test_support::{RabbitCluster, patient_retries, publish_through_faults, unique, within};

/// A configuration that connects to `urls[first]` and fails over to the
/// other nodes.
fn config(cluster: &RabbitCluster, first: usize, exchange: &str) -> RabbitConfig {
    let mut config = RabbitConfig::new(&cluster.urls()[first])
        .exchange(exchange, ExchangeKind::Topic)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(2));
    for i in (0..cluster.len()).filter(|&i| i != first) {
        config = config.node(&format!("127.0.0.1:{}", cluster.node(i).port()));
    }
    config
}

/// 10,000 events through dead letter + retry (+ a 5 s timeout per
/// attempt), 64 in flight, to a publisher given all three nodes; a
/// consumer of a quorum group queue reads them meanwhile. After 3,000
/// calls the node leading the queue, the one both connections use, is
/// killed (SIGKILL). Each call ends delivered (confirmed) or
/// dead-lettered, and every confirmed event is consumed from the two nodes
/// left: a quorum queue keeps what a majority stored. Duplicates
/// (unacknowledged deliveries of the killed node, publishes retried after
/// a lost confirm) are counted, not forbidden; so are the failed attempts
/// by their message. A publish that does not end within the patience
/// fails the test with that count, rather than hang it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_loses_no_confirmed_event_when_its_leader_node_is_killed() {
    const EVENTS: usize = 10_000;
    const CONCURRENCY: usize = 64;
    const KILL_AFTER: usize = 3_000;
    const ATTEMPT: Duration = Duration::from_secs(5);

    let booted = Instant::now();
    let mut cluster = RabbitCluster::start(3).await;
    let boot = booted.elapsed();
    let exchange = unique("quorum");

    // The group queue is declared through node 0, which leads it.
    let consumer = RabbitClient::connect(config(&cluster, 0, &exchange))
        .await
        .unwrap();
    let subscriber = consumer.subscriber_with(QueueOptions::new().quorum(true).prefetch(256));
    let group = SubscribeOptions::new(["orders.*"])
        .unwrap()
        .group("billing")
        .unwrap();
    let mut subscription = subscriber.open(group).await.unwrap();
    let leader = cluster.leader_of(&subscriber.group_queue("billing")).await;

    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let consuming = tokio::spawn(async move {
        while let Some(delivery) = subscription.next().await {
            match delivery {
                Ok(d) => {
                    let id = d.event().expect("a valid event").id().to_owned();
                    // A delivery of the killed node cannot be acknowledged:
                    // it comes again from the new leader.
                    if let Err(e) = d.ack().await {
                        assert!(e.is_retryable(), "{e}");
                    }
                    if seen_tx.send(id).is_err() {
                        break;
                    }
                }
                Err(e) => assert!(e.is_retryable(), "{e}"),
            }
        }
    });

    let publishing = RabbitClient::connect(config(&cluster, leader, &exchange))
        .await
        .unwrap();
    let dlq = MemoryDeadLetters::new(EVENTS);
    let failed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let failures = failed.clone();
    let publisher = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(patient_retries(Duration::from_secs(30)))
        // Failed attempts, counted by their message.
        .map_err(move |e: tower::BoxError| {
            let mut seen = failures.lock().unwrap();
            *seen.entry(e.to_string().chars().take(120).collect()).or_default() += 1;
            e
        })
        // A publish whose confirm has not come within 5 s is tried again.
        .timeout(ATTEMPT)
        .service(publishing.publisher().await.unwrap());

    let sent: Vec<Event> = (0..EVENTS)
        .map(|i| Event::new("orders.paid", serde_json::json!({ "i": i })))
        .collect();
    let run = publish_through_faults(publisher, sent.clone(), CONCURRENCY, async |done| {
        if done == KILL_AFTER {
            cluster.node_mut(leader).kill().await;
        }
        done == KILL_AFTER
    })
    .await;
    let confirmed = run.delivered_ids();
    assert_eq!(
        confirmed.len() + run.dead,
        EVENTS,
        "confirmed + dead-lettered = published"
    );
    assert_eq!(dlq.len(), run.dead);

    let mut seen: HashMap<String, u32> = HashMap::new();
    within("every confirmed event to be consumed", async {
        while !confirmed.iter().all(|id| seen.contains_key(id)) {
            let id = seen_rx.recv().await.expect("the consumer runs");
            *seen.entry(id).or_default() += 1;
        }
    })
    .await;
    let new_leader = cluster.leader_of(&subscriber.group_queue("billing")).await;
    assert_ne!(new_leader, leader, "another node leads the queue");
    drop(seen_rx);
    consuming.abort();

    let twice = run.check_consumed(&sent, &seen);
    println!(
        "3-node cluster up in {boot:?}; published {EVENTS} in {:?}: confirmed {}, \
         dead-lettered {}, failed attempts {:?}, consumed {} distinct ({twice} more than once); \
         recovered (a publish made after the kill confirmed) {:?} after it, longest publish stall {:?}",
        run.published_in,
        confirmed.len(),
        run.dead,
        failed.lock().unwrap(),
        seen.len(),
        run.recovered_in,
        run.longest_stall,
    );
}
