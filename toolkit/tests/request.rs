//! Request–reply on the memory transport and on core NATS: replies matched
//! to their callers, timeouts, a responder that fails, requests without a
//! reply topic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::future::join_all;
use tower::{Service, ServiceExt as _, service_fn};
use watchtower::prelude::*;
use watchtower_memory::MemoryBroker;
use watchtower_nats::{NatsClient, NatsConfig};
use watchtower_test_support::{unique, within};
use watchtower_toolkit::request::{RequestConfig, Requester, Responder};

use common::{ask, doubler};

/// Requests, concurrently, the failure modes, on any transport.
async fn exercise<P>(mut requester: Requester<P>, topic: &str)
where
    P: Service<Event> + Clone + Send + 'static,
    P::Error: Into<watchtower::BoxError>,
    P::Future: Send + 'static,
{
    let reply = ask(&mut requester, topic, 21).await.unwrap();
    assert_eq!(reply.ty(), "doubled");
    assert_eq!(reply.json::<i64>().unwrap(), 42);

    // Many in flight at once on one requester: each gets its own answer.
    let calls = (0..100).map(|n| {
        let mut requester = requester.clone();
        let topic = topic.to_owned();
        async move { (n, ask(&mut requester, &topic, n).await) }
    });
    for (n, reply) in join_all(calls).await {
        if n == 13 {
            continue;
        }
        assert_eq!(reply.unwrap().json::<i64>().unwrap(), n * 2);
    }

    // A failing responder: its error, kind and retryability kept.
    common::failures_come_back(&mut requester, topic).await;
    // A payload the responder cannot decode: a decode error.
    let garbled = requester
        .ready()
        .await
        .unwrap()
        .call(Event::new(topic.to_owned(), serde_json::json!("ten")))
        .await
        .unwrap_err();
    assert_eq!(garbled.kind(), ErrorKind::Decode);
    assert_eq!(requester.in_flight(), 0);
}

#[tokio::test]
async fn requests_are_answered_and_failures_come_back_as_errors_on_the_memory_transport() {
    let broker = MemoryBroker::new();
    let handle = broker
        .subscriber()
        .subscribe(["math.double"], Responder::new(doubler(), broker.publisher()))
        .await
        .unwrap();
    let requester = Requester::open(&broker.subscriber(), broker.publisher(), RequestConfig::new())
        .await
        .unwrap();
    within("the requests", exercise(requester, "math.double")).await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 104, "error replies count as handled: {stats}");
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_and_failures_come_back_as_errors_on_nats() {
    let (client, topic, handle) = common::nats_responder("tk_req", "double", doubler()).await;
    let requester = Requester::open(&client.subscriber(), client.publisher(), RequestConfig::new())
        .await
        .unwrap();
    assert!(requester.reply_topic().starts_with("_reply."));
    within("the requests", exercise(requester, &topic)).await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 104, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_nobody_answers_times_out_on_nats() {
    let client = NatsClient::connect(NatsConfig::new(common::NATS)).await.unwrap();
    let topic = format!("{}.nobody", unique("tk_req"));
    let mut requester = Requester::open(
        &client.subscriber(),
        client.publisher(),
        RequestConfig::new().timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let error = within("the timeout", ask(&mut requester, &topic, 1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(error.is_retryable());
    assert!(error.to_string().contains("no reply to request"), "{error}");
    assert_eq!(requester.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_responder_times_out_and_its_late_reply_is_dropped() {
    let broker = MemoryBroker::new();
    let slow = service_fn(|_request: Event| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, Error>(Event::new("late", serde_json::json!(null)))
    });
    let handle = broker
        .subscriber()
        .subscribe(["slow"], Responder::new(slow, broker.publisher()))
        .await
        .unwrap();
    let mut requester = Requester::open(
        &broker.subscriber(),
        broker.publisher(),
        RequestConfig::new().timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let error = ask(&mut requester, "slow", 1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(requester.in_flight(), 0);
    // The late reply arrives and goes nowhere; the responder still acks.
    assert!(broker.wait_idle(Duration::from_secs(120)).await);
    assert_eq!(requester.late_replies(), 1, "counted");
    assert_eq!(requester.in_flight(), 0);
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 1);
}

#[tokio::test]
async fn a_caller_that_stops_waiting_leaves_nothing_behind_and_a_request_id_in_use_is_refused() {
    let broker = MemoryBroker::new();
    let mut requester = Requester::open(&broker.subscriber(), broker.publisher(), RequestConfig::new())
        .await
        .unwrap();
    let request = Event::new("nobody.home", serde_json::json!(1));
    let first = requester.ready().await.unwrap().call(request.clone());
    assert_eq!(requester.in_flight(), 1);
    let second = requester.ready().await.unwrap().call(request).await.unwrap_err();
    assert_eq!(second.kind(), ErrorKind::InvalidEvent);
    drop(first);
    assert_eq!(requester.in_flight(), 0);
}

#[tokio::test]
async fn a_request_without_a_reply_topic_is_dead_lettered_by_the_responder() {
    let broker = MemoryBroker::new();
    let handle = broker
        .subscriber()
        .subscribe(["math.double"], Responder::new(doubler(), broker.publisher()))
        .await
        .unwrap();
    broker
        .publisher()
        .publish(Event::new("math.double", serde_json::json!(2)))
        .await
        .unwrap();
    let dead = handle.dead_letters().unwrap().clone();
    within("the dead letter", dead.wait_for(1)).await;
    let letter = &dead.drain()[0];
    assert_eq!(letter.extension("deadletterkind"), Some("rejected"));
    assert!(
        letter
            .extension("deadletterreason")
            .unwrap()
            .contains("has no `replyto` extension")
    );
    handle.stop().await.unwrap();
}
