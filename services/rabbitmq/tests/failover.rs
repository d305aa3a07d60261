//! Failover between two private RabbitMQ nodes: a publisher given both
//! moves to the second when the first stops, and every event a broker
//! confirmed is delivered. The shared broker is not touched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use tower::ServiceBuilder;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Event, SubscribeOptions, Subscriber};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_rabbitmq::{ExchangeKind, RabbitClient, RabbitConfig};
use watchtower_test_support::{RabbitNode, patient_retries, publish_through_faults, within};

fn config(url: &str) -> RabbitConfig {
    RabbitConfig::new(url)
        .exchange("failover", ExchangeKind::Topic)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(2))
}

fn url(node: &RabbitNode) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.port())
}

/// 2,000 events through dead letter + retry to a publisher given two
/// nodes; the first stopped after 700. Each call ends delivered (confirmed
/// by one of the nodes) or dead-lettered, and every confirmed event is
/// consumed: from the second node at once, from the first once it is back
/// (durable queue, persistent messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_fails_over_to_the_next_node_and_every_confirmed_event_is_delivered() {
    const EVENTS: usize = 2_000;
    const CONCURRENCY: usize = 64;

    let (mut first, second) = tokio::join!(RabbitNode::start(), RabbitNode::start());
    // A group queue on each node, declared before anything is published.
    let group = SubscribeOptions::new(["orders.*"])
        .unwrap()
        .group("billing")
        .unwrap();
    let mut subscriptions = Vec::new();
    for node in [&first, &second] {
        let client = RabbitClient::connect(config(&url(node))).await.unwrap();
        subscriptions.push(client.subscriber().open(group.clone()).await.unwrap());
    }
    let both = config(&url(&first)).node(&format!("127.0.0.1:{}", second.port()));
    let client = RabbitClient::connect(both).await.unwrap();
    let dlq = MemoryDeadLetters::new(EVENTS);
    let publisher = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(patient_retries(Duration::from_secs(20)))
        .service(client.publisher().await.unwrap());

    let sent: Vec<Event> = (0..EVENTS)
        .map(|i| Event::new("orders.paid", serde_json::json!({ "i": i })))
        .collect();
    let run = publish_through_faults(publisher, sent.clone(), CONCURRENCY, async |done| {
        if done == 700 {
            first.stop().await;
        }
        done == 700
    })
    .await;
    let delivered = run.delivered_ids();
    assert_eq!(
        delivered.len() + run.dead,
        EVENTS,
        "delivered + dead-lettered = published"
    );

    // The first node comes back with what it had confirmed; its
    // subscription reconnects by itself.
    first.restart().await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut merged = futures_util::stream::select_all(subscriptions);
    within("every confirmed event to be consumed", async {
        while !delivered.iter().all(|id| seen.contains_key(id)) {
            match merged.next().await.unwrap() {
                Ok(d) => {
                    let id = d.event().expect("a valid event").id().to_owned();
                    // Deliveries the first node sent before it stopped
                    // cannot be acknowledged: they come again.
                    if let Err(e) = d.ack().await {
                        assert!(e.is_retryable(), "{e}");
                    }
                    *seen.entry(id).or_default() += 1;
                }
                Err(e) => assert!(e.is_retryable(), "{e}"),
            }
        }
    })
    .await;
    let twice = run.check_consumed(&sent, &seen);
    println!(
        "published {EVENTS} in {:?}: confirmed {}, dead-lettered {}, consumed {} \
         ({} more than once: unacknowledged when the first node stopped), longest publish stall {:?}",
        run.published_in,
        delivered.len(),
        run.dead,
        seen.len(),
        twice,
        run.longest_stall,
    );
}
