//! 10,000 confirmed publishes through dead letter + retry + circuit
//! breaker while the connection is cut twice: every event is in the queue
//! or dead-lettered, and the count says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::future::poll_fn;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::{Service, ServiceBuilder, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Event, SubscribeOptions, Subscriber, serve};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::Outcome;
use watchtower_layers::retry::RetryConfig;
use watchtower_rabbitmq::{ExchangeKind, PublishOptions, RabbitConfig};
use watchtower_test_support::{PATIENCE, TcpProxy, unique, within};

use common::{Admin, config};

const TOTAL: usize = 10_000;
const IN_FLIGHT: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_publishes_survive_two_cuts() {
    let exchange = unique("wt-ten-k");
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await.unwrap();
    // The queue and its consumer talk to the broker directly.
    let subscriber = common::subscriber(config(&exchange)).await.unwrap();
    let subscription = subscriber
        .open(SubscribeOptions::new(["tenk.*"]).unwrap().group("all").unwrap())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(
        serve(
            subscription,
            service_fn(move |event: Event| {
                let _ = tx.send(event.id().to_owned());
                async { Ok::<_, watchtower::Error>(()) }
            }),
        )
        .with_graceful_shutdown(async {
            let _ = stopped.await;
        })
        .into_future(),
    );

    let via_proxy = RabbitConfig::new(&format!("amqp://guest:guest@{}/%2f", proxy.addr()))
        .exchange(&exchange, ExchangeKind::Topic)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connection_name(format!("ten-k {exchange}"));
    let publisher = common::publisher_with(via_proxy, PublishOptions::new().max_in_flight(IN_FLIGHT))
        .await
        .unwrap();
    let dlq = MemoryDeadLetters::new(TOTAL);
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().open_wait(Duration::from_millis(100)));
    let breaker_state = breaker.handle();
    let mut stack = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(
            RetryConfig::new()
                .max_attempts(30)
                .delays(Duration::from_millis(10), Duration::from_millis(200))
                .max_elapsed(Duration::from_secs(10)),
        )
        .circuit_breaker(breaker)
        .service(publisher.clone());

    let events: Vec<Event> = (0..TOTAL)
        .map(|i| Event::new("tenk.x", serde_json::json!({"i": i})))
        .collect();
    let mut in_flight = FuturesUnordered::new();
    let (mut delivered, mut dead_lettered) = (HashSet::new(), HashSet::new());
    let mut cuts = 0;
    let mut settle =
        |outcome: Result<(String, Outcome<watchtower::Receipt>), watchtower::Error>| match outcome {
            Ok((id, Outcome::Delivered(_))) => assert!(delivered.insert(id)),
            Ok((id, Outcome::DeadLettered(_))) => assert!(dead_lettered.insert(id)),
            Err(e) => panic!("an event was neither delivered nor dead-lettered: {e}"),
        };
    for (i, event) in events.iter().enumerate() {
        // Cut while events are in flight, at 30% and 60%.
        if (i == TOTAL * 3 / 10 || i == TOTAL * 6 / 10) && !in_flight.is_empty() {
            proxy.cut();
            cuts += 1;
        }
        while in_flight.len() >= IN_FLIGHT {
            settle(in_flight.next().await.unwrap());
        }
        match tokio::time::timeout(PATIENCE, poll_fn(|cx| stack.poll_ready(cx))).await {
            Ok(ready) => ready.unwrap(),
            Err(_) => panic!(
                "not ready after {i} events: breaker {:?} {:?}, publisher {:?}, {} in flight",
                breaker_state.state(),
                breaker_state.metrics(),
                publisher,
                in_flight.len()
            ),
        }
        let id = event.id().to_owned();
        let call = stack.call(event.clone());
        in_flight.push(async move { call.await.map(|outcome| (id, outcome)) });
    }
    while let Some(outcome) = within("outcomes", in_flight.next()).await {
        settle(outcome);
    }
    assert_eq!(cuts, 2);
    assert_eq!(
        delivered.len() + dead_lettered.len(),
        TOTAL,
        "published = delivered + dead-lettered"
    );
    assert_eq!(dlq.len(), dead_lettered.len());
    // Two reconnects after two cuts.
    assert!(proxy.accepted_connections() >= 3);

    // Every event the broker confirmed is in the queue (a retried one
    // possibly twice).
    let mut received = HashSet::new();
    while !delivered.is_subset(&received) {
        received.insert(within("queued events", rx.recv()).await.unwrap());
    }
    let all: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    let dead = dlq.drain();
    let mut reasons = std::collections::BTreeMap::new();
    for event in &dead {
        *reasons
            .entry(event.extension("deadletterreason").unwrap_or("").to_owned())
            .or_insert(0) += 1;
    }
    println!("dead-letter reasons: {reasons:?}");
    let dead_ids: HashSet<String> = dead.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(dead_ids, dead_lettered);
    assert!(
        received
            .union(&dead_ids)
            .cloned()
            .collect::<HashSet<_>>()
            .is_superset(&all)
    );
    println!(
        "{} delivered, {} dead-lettered, {} connections",
        delivered.len(),
        dead_lettered.len(),
        proxy.accepted_connections()
    );

    stop.send(()).unwrap();
    consumer.await.unwrap().unwrap();
    let admin = Admin::connect().await;
    admin.delete_queue(&subscriber.group_queue("all")).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}
