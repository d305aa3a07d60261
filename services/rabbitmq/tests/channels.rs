//! A publisher spread over several confirm-mode channels: every caller gets
//! its own confirm (or its own typed error), and nothing is lost or
//! duplicated.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::future::poll_fn;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tower::Service;
use watchtower::{Error, ErrorKind, Event, Receipt};
use watchtower_rabbitmq::{ContentMode, PublishOptions, RabbitPublisher};
use watchtower_test_support::{unique, within};

use common::{Admin, config};

/// A durable queue bound to `exchange` for `key`.
async fn bound_queue(admin: &Admin, exchange: &str, key: &str) -> String {
    let queue = format!("{exchange}.q");
    admin
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    admin
        .channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    queue
}

/// The `message-id`s of every message in `queue`, taking them off.
async fn drain_ids(admin: &Admin, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(message) = admin.get(queue).await {
        ids.push(message.properties.message_id().as_ref().unwrap().to_string());
    }
    ids
}

/// Calls `publisher` for each event (waiting for readiness before each
/// call) and gives the calls back, each answering with its event.
async fn call_each(
    publisher: &mut RabbitPublisher,
    events: &[Event],
) -> FuturesUnordered<impl Future<Output = (Event, Result<Receipt, Error>)> + use<>> {
    let calls = FuturesUnordered::new();
    for event in events {
        within("ready", poll_fn(|cx| publisher.poll_ready(cx)))
            .await
            .unwrap();
        let call = publisher.call(event.clone());
        let event = event.clone();
        calls.push(async move { (event, call.await) });
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_gets_its_own_confirm_across_channels() {
    const N: usize = 2_000;
    let exchange = unique("wt-multi-ch");
    let mut publisher = common::publisher_with(
        config(&exchange),
        // Room for all of them: the calls are only polled once all are made.
        PublishOptions::new().channels(4).max_in_flight(N),
    )
    .await
    .unwrap();
    let admin = Admin::connect().await;
    let queue = bound_queue(&admin, &exchange, "mc.#").await;

    let events: Vec<Event> = (0..N)
        .map(|i| Event::new("mc.x", serde_json::json!({"i": i})))
        .collect();
    let mut calls = call_each(&mut publisher, &events).await;
    let mut confirmed = HashSet::new();
    within("confirms", async {
        while let Some((event, result)) = calls.next().await {
            let id = event.id().to_owned();
            let receipt = result.unwrap();
            // The receipt is this caller's, not a neighbour's.
            assert_eq!(&*receipt.event_id, id.as_str());
            assert_eq!(receipt.stream.as_deref(), Some(exchange.as_str()));
            assert!(confirmed.insert(id));
        }
    })
    .await;
    assert_eq!(confirmed.len(), N);

    let ids = drain_ids(&admin, &queue).await;
    assert_eq!(ids.len(), N, "exactly one copy of each");
    let sent: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), sent);

    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_event_on_a_multi_channel_publisher_fails_only_its_caller() {
    unroutable_events_fail_only_their_callers("multi-unroutable", ContentMode::Structured, 3, 300, 10).await;
}

/// The broker confirms many publishes with one ack while a returned message
/// waits: the return must reach its own caller, not a neighbour's. In
/// structured mode the return is matched by its `message-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_messages_reach_their_own_callers_when_acks_come_in_batches() {
    unroutable_events_fail_only_their_callers("batched-returns", ContentMode::Structured, 1, 2_000, 4).await;
}

/// The same in binary mode, where the return is matched by its
/// `cloudEvents_id` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_binary_messages_reach_their_own_callers_when_acks_come_in_batches() {
    unroutable_events_fail_only_their_callers("batched-returns-b", ContentMode::Binary, 1, 2_000, 4).await;
}

/// Publishes `n` events in `mode` over `channels` channels, every
/// `every`-th with no queue bound for it; each caller must hear its own
/// fate.
async fn unroutable_events_fail_only_their_callers(
    name: &str,
    mode: ContentMode,
    channels: usize,
    n: usize,
    every: usize,
) {
    let exchange = unique(&format!("wt-{name}"));
    let mut publisher = common::publisher_with(
        config(&exchange),
        PublishOptions::new().channels(channels).content_mode(mode),
    )
    .await
    .unwrap();
    let admin = Admin::connect().await;
    let queue = bound_queue(&admin, &exchange, "routed.*").await;

    let events: Vec<Event> = (0..n)
        .map(|i| {
            let topic = if i % every == 0 { "lost.x" } else { "routed.x" };
            Event::new(topic, serde_json::json!({"i": i}))
        })
        .collect();
    let mut calls = call_each(&mut publisher, &events).await;
    let (mut routed, mut returned) = (HashSet::new(), HashSet::new());
    within("confirms", async {
        while let Some((event, result)) = calls.next().await {
            let id = event.id().to_owned();
            match (event.topic(), result) {
                ("routed.x", Ok(receipt)) => {
                    assert_eq!(&*receipt.event_id, id.as_str());
                    routed.insert(id);
                }
                ("lost.x", Err(err)) => {
                    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
                    assert!(!err.is_retryable());
                    // The error carries this caller's event back.
                    assert_eq!(err.event().map(Event::id), Some(id.as_str()));
                    returned.insert(id);
                }
                (topic, result) => panic!("{topic}: {result:?}"),
            }
        }
    })
    .await;
    let lost = n.div_ceil(every);
    assert_eq!((routed.len(), returned.len()), (n - lost, lost));

    let ids = drain_ids(&admin, &queue).await;
    assert_eq!(ids.len(), n - lost);
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), routed);

    admin.delete_queue(&queue).await;
    admin.delete_exchange(&exchange).await;
    admin.close().await;
}
