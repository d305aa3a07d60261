//! Request–reply round trips per second on the local brokers, in one run:
//! the toolkit's [`Requester`] over a reply topic of its own beside the
//! native requesters (NATS inboxes, RabbitMQ direct reply-to), all
//! answered by the same [`Responder`] with an echo handler.
//!
//! Each case sends `REQUEST_BENCH_TOTAL` requests (default 5,000) with
//! `REQUEST_BENCH_IN_FLIGHT` (default 64) outstanding at once, after a
//! warm-up of 500, and prints requests per second and the median and 99th
//! percentile round trip, per round (`REQUEST_BENCH_ROUNDS`, default 3),
//! the two requesters of a broker in turn, and their ratio per round.
//!
//! ```text
//! cargo bench -p watchtower-toolkit --bench request
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream;
use tower::{Service, ServiceExt as _, service_fn};
use watchtower::prelude::*;
use watchtower_nats::{NatsClient, NatsConfig};
use watchtower_rabbitmq::{ExchangeKind, RabbitClient, RabbitConfig, lapin};
use watchtower_test_support::unique;
use watchtower_toolkit::request::{RequestConfig, Requester, Responder};

const NATS: &str = "nats://127.0.0.1:4222";
const RABBIT: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn echo()
-> impl Service<Event, Response = Event, Error = Error, Future: Send + 'static> + Clone + Send + 'static {
    service_fn(|request: Event| async move {
        Ok::<_, Error>(Event::new("echo", request.json::<serde_json::Value>()?))
    })
}

/// `total` requests, `in_flight` at once; each reply checked.
async fn run<R>(requester: &R, topic: &str, total: usize, in_flight: usize) -> (f64, Duration, Duration)
where
    R: Service<Event, Response = Event, Error = Error> + Clone,
{
    let started = Instant::now();
    let mut times: Vec<Duration> = stream::iter(0..total)
        .map(|n| {
            let requester = requester.clone();
            let request = Event::new(topic.to_owned(), serde_json::json!({ "n": n }));
            async move {
                let sent = Instant::now();
                let reply = requester.oneshot(request).await.unwrap();
                assert_eq!(reply.json::<serde_json::Value>().unwrap()["n"], n);
                sent.elapsed()
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    times.sort();
    (rate, times[times.len() / 2], times[times.len() * 99 / 100])
}

/// Rounds of the reply-topic requester and the native one in turn, so
/// that both see the same load.
async fn measure<A, B>(broker: &str, topic_requester: A, native: B, topic: &str)
where
    A: Service<Event, Response = Event, Error = Error> + Clone,
    B: Service<Event, Response = Event, Error = Error> + Clone,
{
    let total = setting("REQUEST_BENCH_TOTAL", 5_000);
    let in_flight = setting("REQUEST_BENCH_IN_FLIGHT", 64);
    run(&topic_requester, topic, 500, in_flight).await;
    run(&native, topic, 500, in_flight).await;
    for round in 1..=setting("REQUEST_BENCH_ROUNDS", 3) {
        let topic_side = run(&topic_requester, topic, total, in_flight).await;
        let native_side = run(&native, topic, total, in_flight).await;
        for (side, (rate, p50, p99)) in [("reply topic", topic_side), ("native", native_side)] {
            println!(
                "{broker:<8} {side:<11} round {round}: {rate:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
        println!(
            "{broker:<8} native / reply topic, round {round}: {:.2}",
            native_side.0 / topic_side.0
        );
    }
}

async fn nats() {
    let client = NatsClient::connect(NatsConfig::new(NATS)).await.unwrap();
    let topic = format!("{}.echo", unique("bench_req"));
    let handle = client
        .subscriber()
        .subscribe([&topic], Responder::new(echo(), client.publisher()))
        .await
        .unwrap();
    client.round_trip().await.unwrap();
    let requester = Requester::open(&client.subscriber(), client.publisher(), RequestConfig::new())
        .await
        .unwrap();
    client.round_trip().await.unwrap();
    measure("NATS", requester, client.requester().await.unwrap(), &topic).await;
    handle.stop().await.unwrap();
}

async fn rabbitmq() {
    let exchange = unique("bench_req");
    let client = RabbitClient::connect(RabbitConfig::new(RABBIT).exchange(&exchange, ExchangeKind::Topic))
        .await
        .unwrap();
    let handle = client
        .subscriber()
        .subscribe_with(
            SubscribeOptions::new(["echo"])
                .unwrap()
                .group("responders")
                .unwrap(),
            Responder::new(echo(), client.publisher().await.unwrap()),
        )
        .await
        .unwrap();
    let requester = Requester::open(
        &client.subscriber(),
        client.publisher().await.unwrap(),
        RequestConfig::new(),
    )
    .await
    .unwrap();
    measure("RabbitMQ", requester, client.requester().await.unwrap(), "echo").await;
    handle.stop().await.unwrap();
    let connection = lapin::Connection::connect(RABBIT, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let _ = channel
        .queue_delete(
            client.subscriber().group_queue("responders").as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
    let _ = channel
        .exchange_delete(
            exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "done".into()).await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        nats().await;
        rabbitmq().await;
    });
}
