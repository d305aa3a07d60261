//! Native request–reply on the real brokers: NATS inboxes and RabbitMQ
//! direct reply-to, answered by the toolkit's `Responder`. Each reply
//! reaches its own caller (1,000 at once), a responder's failure comes
//! back as its error, a request nobody answers fails with the right kind,
//! and a reply after its caller's timeout is dropped and counted, leaving
//! nothing in the table of waiting callers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt as _, service_fn};
use watchtower::ext;
use watchtower::prelude::*;
use watchtower::request::NoResponders;
use watchtower_nats::{NatsClient, NatsConfig, NatsRequester};
use watchtower_rabbitmq::{ExchangeKind, RabbitClient, RabbitConfig, RabbitRequester, lapin};
use watchtower_test_support::{unique, within};
use watchtower_toolkit::request::Responder;

use common::{Answering, ask, doubler};

const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MANY: i64 = 1_000;

/// Answers only when the test lets it: one permit per reply.
fn held(gate: Arc<Semaphore>) -> impl Answering {
    service_fn(move |request: Event| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            Ok::<_, Error>(Event::new(
                "late",
                request.json::<serde_json::Value>().unwrap_or_default(),
            ))
        }
    })
}

/// 1,000 requests at once, each answered with its own reply; a failing
/// responder's errors; `in_flight` back to zero.
async fn exercise<R>(requester: R, topic: &str, in_flight: impl Fn(&R) -> usize)
where
    R: Service<Event, Response = Event, Error = Error> + Clone,
{
    let calls = (0..MANY).filter(|n| *n != 13).map(|n| {
        let mut requester = requester.clone();
        let request = Event::new(topic.to_owned(), serde_json::json!(n));
        async move {
            let id = request.id().to_owned();
            let reply = requester.ready().await?.call(request).await?;
            Ok::<_, Error>((n, id, reply))
        }
    });
    let mut answered = 0;
    for result in join_all(calls).await {
        let (n, id, reply) = result.unwrap();
        assert_eq!(reply.ty(), "doubled");
        assert_eq!(
            reply.json::<i64>().unwrap(),
            n * 2,
            "request {n} got another's reply"
        );
        assert_eq!(reply.extension(ext::CORRELATION_ID), Some(id.as_str()));
        assert_eq!(reply.extension(ext::REPLY_TO), None);
        answered += 1;
    }
    assert_eq!(answered, MANY - 1);

    let mut requester = requester;
    common::failures_come_back(&mut requester, topic).await;
    assert_eq!(in_flight(&requester), 0);
}

/// Waits until `done` holds, checking every few milliseconds.
async fn until(what: &str, done: impl Fn() -> bool) {
    within(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A request to a responder held by `gate` times out on `hasty`, its
/// entry removed; the reply that comes when the gate opens is dropped and
/// counted; a `patient` clone then gets its reply, and nothing is left.
async fn late_reply<R>(
    mut hasty: R,
    patient: R,
    topic: &str,
    gate: &Semaphore,
    in_flight: impl Fn(&R) -> usize,
    late_replies: impl Fn(&R) -> u64,
) where
    R: Service<Event, Response = Event, Error = Error>,
{
    let error = within("the timeout", ask(&mut hasty, topic, 7))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(in_flight(&hasty), 0, "the entry is removed at the timeout");
    gate.add_permits(1);
    until("the late reply", || late_replies(&hasty) == 1).await;
    assert_eq!(in_flight(&hasty), 0);
    // The requester goes on answering.
    gate.add_permits(1);
    let reply = within(
        "a reply in time",
        patient.oneshot(Event::new(topic.to_owned(), serde_json::json!(8))),
    )
    .await
    .unwrap();
    assert_eq!(reply.json::<i64>().unwrap(), 8);
    assert_eq!(late_replies(&hasty), 1);
    assert_eq!(in_flight(&hasty), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_inbox_requests_are_each_answered_and_failures_come_back() {
    let (client, topic, handle) = common::nats_responder("tk_nreq", "double", doubler()).await;
    let requester = client.requester().await.unwrap();
    within(
        "the requests",
        exercise(requester, &topic, NatsRequester::in_flight),
    )
    .await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(
        stats.acked,
        MANY as u64 + 1,
        "error replies count as handled: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_request_nobody_subscribes_to_fails_at_once_with_no_responders() {
    let client = NatsClient::connect(NatsConfig::new(common::NATS)).await.unwrap();
    let topic = format!("{}.nobody", unique("tk_nreq"));
    // A timeout no test run reaches: the answer comes from the server.
    let mut requester = client
        .requester()
        .await
        .unwrap()
        .timeout(Duration::from_secs(3600));
    let error = within("the no-responders answer", ask(&mut requester, &topic, 1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    assert!(error.is_retryable());
    assert!(NoResponders::is(&error), "{error}");
    assert!(error.to_string().contains(&topic), "{error}");
    assert_eq!(requester.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_nats_reply_is_dropped_and_counted() {
    let gate = Arc::new(Semaphore::new(0));
    let (client, topic, handle) = common::nats_responder("tk_nreq", "slow", held(gate.clone())).await;
    let requester = client.requester().await.unwrap();
    late_reply(
        requester.clone().timeout(Duration::from_millis(200)),
        requester.timeout(Duration::from_secs(20)),
        &topic,
        &gate,
        NatsRequester::in_flight,
        NatsRequester::late_replies,
    )
    .await;
    assert_eq!(handle.stop().await.unwrap().acked, 2);
}

/// A client on a fresh exchange, and its name.
async fn rabbit() -> (RabbitClient, String) {
    let exchange = unique("tk_rreq");
    let client = RabbitClient::connect(RabbitConfig::new(RABBIT).exchange(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    (client, exchange)
}

/// Serves `handler` as a responder to `topic` in group `group`.
async fn rabbit_responder(
    client: &RabbitClient,
    topic: &str,
    group: &str,
    handler: impl Answering,
) -> SubscriptionHandle {
    client
        .subscriber()
        .subscribe_with(
            SubscribeOptions::new([topic]).unwrap().group(group).unwrap(),
            Responder::new(handler, client.publisher().await.unwrap()),
        )
        .await
        .unwrap()
}

/// Deletes the exchange and the queues of `groups`.
async fn rabbit_cleanup(exchange: &str, queues: &[String]) {
    let connection = lapin::Connection::connect(RABBIT, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for queue in queues {
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel
        .exchange_delete(exchange.into(), lapin::options::ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_direct_reply_to_requests_are_each_answered_and_failures_come_back() {
    let (client, exchange) = rabbit().await;
    let topic = "math.double";
    let handle = rabbit_responder(&client, topic, "responders", doubler()).await;
    let requester = client.requester().await.unwrap();
    within(
        "the requests",
        exercise(requester, topic, RabbitRequester::in_flight),
    )
    .await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, MANY as u64 + 1, "{stats}");
    rabbit_cleanup(&exchange, &[client.subscriber().group_queue("responders")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_requests_nobody_answers_fail_unroutable_at_once_and_unconsumed_by_timeout() {
    let (client, exchange) = rabbit().await;
    let mut requester = client
        .requester()
        .await
        .unwrap()
        .timeout(Duration::from_secs(3600));
    // No binding routes it: the broker returns it.
    let error = within("the return", ask(&mut requester, "nobody.bound", 1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    assert!(NoResponders::is(&error), "{error}");
    assert!(error.to_string().contains("nobody.bound"), "{error}");
    assert_eq!(requester.in_flight(), 0);

    // A queue keeps it, but nobody consumes: the timeout.
    let handle = rabbit_responder(&client, "nobody.home", "gone", doubler()).await;
    handle.stop().await.unwrap();
    let mut requester = requester.timeout(Duration::from_millis(300));
    let error = within("the timeout", ask(&mut requester, "nobody.home", 1))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(error.is_retryable());
    assert_eq!(requester.in_flight(), 0);
    rabbit_cleanup(&exchange, &[client.subscriber().group_queue("gone")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_rabbitmq_reply_is_dropped_and_counted() {
    let (client, exchange) = rabbit().await;
    let gate = Arc::new(Semaphore::new(0));
    let handle = rabbit_responder(&client, "slow", "slow", held(gate.clone())).await;
    let requester = client.requester().await.unwrap();
    late_reply(
        requester.clone().timeout(Duration::from_millis(200)),
        requester.timeout(Duration::from_secs(20)),
        "slow",
        &gate,
        RabbitRequester::in_flight,
        RabbitRequester::late_replies,
    )
    .await;
    assert_eq!(handle.stop().await.unwrap().acked, 2);
    rabbit_cleanup(&exchange, &[client.subscriber().group_queue("slow")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_nats_request_is_answered_on_its_reply_subject() {
    let (client, topic, handle) = common::nats_responder("tk_nreq", "plain", doubler()).await;
    // Any NATS client: a structured CloudEvent as the body, the client's
    // own request muxer waiting on the reply subject.
    let request = Event::new(topic.clone(), serde_json::json!(4));
    let body = watchtower::codec::structured::to_bytes(&request).unwrap();
    let reply = within("the reply", client.raw().request(topic.clone(), body))
        .await
        .unwrap();
    let reply = watchtower::codec::structured::from_bytes(&reply.payload).unwrap();
    assert_eq!(reply.json::<i64>().unwrap(), 8);
    assert_eq!(reply.extension(ext::CORRELATION_ID), Some(request.id()));
    assert_eq!(handle.stop().await.unwrap().acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_amqp_request_is_answered_with_its_correlation_id() {
    use futures_util::StreamExt as _;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
    let (client, exchange) = rabbit().await;
    let handle = rabbit_responder(&client, "plain", "plain", doubler()).await;
    // Any AMQP client: direct reply-to, `reply_to`, and the event id as
    // `correlation_id` (the responder answers with the request's id).
    let connection = lapin::Connection::connect(RABBIT, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "plain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let request = Event::new("plain", serde_json::json!(5));
    let properties = lapin::BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id(request.id().into());
    channel
        .basic_publish(
            exchange.as_str().into(),
            "plain".into(),
            BasicPublishOptions::default(),
            &watchtower::codec::structured::to_bytes(&request).unwrap(),
            properties,
        )
        .await
        .unwrap();
    let reply = within("the reply", replies.next()).await.unwrap().unwrap();
    assert_eq!(
        reply.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some(request.id()),
        "the reply's correlation id is the request's event id"
    );
    assert_eq!(&*reply.data, b"10");
    let _ = connection.close(200, "done".into()).await;
    assert_eq!(handle.stop().await.unwrap().acked, 1);
    rabbit_cleanup(&exchange, &[client.subscriber().group_queue("plain")]).await;
}
