//! Throughput of the RabbitMQ transport against raw lapin code doing the
//! same work with the same guarantee, in the same run, on the local broker.
//!
//! * publish: persistent CloudEvents messages with publisher confirms and
//!   `mandatory`, 1,024 unconfirmed at most: a raw lapin loop on one
//!   channel vs `RabbitPublisher` under dead letter + retry + circuit
//!   breaker, and under the same stack with the backpressure layer in
//!   front of the publisher;
//! * consume: a durable queue preloaded with the messages, prefetch 256: a
//!   raw lapin loop acknowledging each message singly vs
//!   `watchtower::serve` over `RabbitSubscriber` (decoding every event,
//!   acknowledging only after the handler finished, in batches).
//!
//! `cargo bench -p watchtower-rabbitmq --bench rabbitmq`. Environment:
//! `BENCH_N` messages per run (default 50,000), `BENCH_ROUNDS` publish
//! rounds (default 5; each round runs raw and both stacks, in an order
//! that rotates from round to round), `BENCH_CHANNELS` publisher channels,
//! `BENCH_BARE=1` the publisher without layers, `BENCH_ONLY=publish` skips
//! the consume runs. Publish ratios are printed per round, with their
//! median and range. The CPU time per message of this process and of the
//! broker (`beam.smp`, read from /proc when it runs on this machine) is
//! printed too, since the broker shares the cores.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection};
use tokio::sync::Notify;
use tower::{Service, ServiceBuilder, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Event, SubscribeOptions, Subscriber, serve};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
use watchtower_layers::retry::RetryConfig;
use watchtower_rabbitmq::{
    ExchangeKind, PublishOptions, QueueOptions, RabbitConfig, RabbitPublisher, RabbitSubscriber,
};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const IN_FLIGHT: usize = 1024;
const PREFETCH: u16 = 256;
const ROUNDS: usize = 3;
const PUBLISH_ROUNDS: usize = 5;

fn event(i: usize) -> Event {
    Event::new(
        "bench.order",
        serde_json::json!({"order": i, "item": "book", "qty": 1}),
    )
}

/// The properties a hand-written CloudEvents client sends.
fn raw_properties(id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    let time = watchtower::codec::format_time(time::OffsetDateTime::now_utc());
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", id),
        ("cloudEvents_type", "bench.order"),
        ("cloudEvents_source", "/watchtower"),
        ("cloudEvents_time", time.as_str()),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.as_bytes().into()));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_headers(headers)
}

async fn raw_publish(connection: &Connection, exchange: &str, n: usize) -> Duration {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut confirmed = 0;
    for i in 0..n {
        if in_flight.len() >= IN_FLIGHT {
            confirmed += in_flight.next().await.unwrap();
        }
        let channel = channel.clone();
        let exchange = exchange.to_owned();
        in_flight.push(async move {
            let id = uuid::Uuid::now_v7().to_string();
            let body =
                serde_json::to_vec(&serde_json::json!({"order": i, "item": "book", "qty": 1})).unwrap();
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    "bench.order".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    raw_properties(&id),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            match confirm {
                Confirmation::Ack(None) => 1,
                other => panic!("not confirmed: {other:?}"),
            }
        });
    }
    while let Some(c) = in_flight.next().await {
        confirmed += c;
    }
    let elapsed = start.elapsed();
    assert_eq!(confirmed, n);
    let _ = channel.close(200, "done".into()).await;
    elapsed
}

async fn stack_publish(config: &RabbitConfig, n: usize, backpressure: bool) -> Duration {
    let publisher = RabbitPublisher::connect_with(config.clone(), publish_options())
        .await
        .unwrap();
    if std::env::var("BENCH_BARE").is_ok() {
        return bare_publish(publisher, n).await;
    }
    let dlq = MemoryDeadLetters::new(n);
    let stack = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new())
        .circuit_breaker(CircuitBreakerConfig::new());
    let elapsed = if backpressure {
        let stack = stack
            .backpressure(BackpressureLayer::new(IN_FLIGHT, Overflow::Block).concurrency(IN_FLIGHT))
            .service(publisher);
        drive(stack, n).await
    } else {
        drive(stack.service(publisher), n).await
    };
    assert_eq!(dlq.len(), 0);
    elapsed
}

/// Calls `stack` for `n` events, `IN_FLIGHT` at most at once, keeping the
/// calls moving while waiting for readiness; every event must be delivered.
async fn drive<S>(mut stack: S, n: usize) -> Duration
where
    S: Service<Event, Response = watchtower_layers::dead_letter::Outcome<watchtower::Receipt>>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut delivered = 0;
    for i in 0..n {
        // The publisher's window is 1,024: readiness is the bound.
        while in_flight.len() >= IN_FLIGHT {
            delivered += in_flight.next().await.unwrap_or(0);
        }
        poll_fn(|cx| stack.poll_ready(cx)).await.unwrap();
        let call = stack.call(event(i));
        in_flight.push(async move { if call.await.unwrap().is_delivered() { 1 } else { 0 } });
        while let Some(Some(d)) = futures_util::FutureExt::now_or_never(in_flight.next()) {
            delivered += d;
        }
    }
    while let Some(d) = in_flight.next().await {
        delivered += d;
    }
    let elapsed = start.elapsed();
    assert_eq!(delivered, n);
    elapsed
}

/// The transport alone, without layers (`BENCH_BARE=1`), to tell their
/// cost apart.
async fn bare_publish(mut publisher: RabbitPublisher, n: usize) -> Duration {
    let start = Instant::now();
    let mut in_flight: FuturesUnordered<watchtower_rabbitmq::publisher::ResponseFuture> =
        FuturesUnordered::new();
    for i in 0..n {
        while in_flight.len() >= IN_FLIGHT {
            in_flight.next().await.unwrap().unwrap();
        }
        poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
        in_flight.push(publisher.call(event(i)));
    }
    while let Some(r) = in_flight.next().await {
        r.unwrap();
    }
    start.elapsed()
}

async fn preload(config: &RabbitConfig, n: usize) {
    let mut publisher = RabbitPublisher::connect(config.clone()).await.unwrap();
    let mut in_flight: FuturesUnordered<watchtower_rabbitmq::publisher::ResponseFuture> =
        FuturesUnordered::new();
    for i in 0..n {
        while in_flight.len() >= IN_FLIGHT {
            in_flight.next().await.unwrap().unwrap();
        }
        poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
        in_flight.push(publisher.call(event(i)));
    }
    while let Some(r) = in_flight.next().await {
        r.unwrap();
    }
}

async fn raw_consume(connection: &Connection, queue: &str, n: usize) -> Duration {
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let start = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let delivery = consumer.next().await.unwrap().unwrap();
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let elapsed = start.elapsed();
    let _ = channel.close(200, "done".into()).await;
    elapsed
}

async fn stack_consume(config: &RabbitConfig, queue: &str, n: usize) -> Duration {
    let subscriber = RabbitSubscriber::connect_with(
        config.clone(),
        QueueOptions::new()
            .queue(queue)
            .unwrap()
            .passive(true)
            .prefetch(PREFETCH),
    )
    .await
    .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(Notify::new());
    let start = Instant::now();
    let subscription = subscriber
        .open(SubscribeOptions::new(["bench.>"]).unwrap())
        .await
        .unwrap();
    let (h, a) = (handled.clone(), all.clone());
    let run = serve(
        subscription,
        service_fn(move |_event: Event| {
            if h.fetch_add(1, Ordering::Relaxed) + 1 == n {
                a.notify_one();
            }
            async { Ok::<_, watchtower::Error>(()) }
        }),
    )
    .concurrency(usize::from(PREFETCH))
    .with_graceful_shutdown(async move { all.notified().await });
    // Shutdown waits for every ack to be sent: the time includes them.
    let stats = run.await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(stats.acked as usize, n);
    elapsed
}

fn publish_options() -> PublishOptions {
    let mut options = PublishOptions::new().max_in_flight(IN_FLIGHT);
    if let Some(channels) = std::env::var("BENCH_CHANNELS").ok().and_then(|v| v.parse().ok()) {
        options = options.channels(channels);
    }
    options
}

/// This process's CPU time so far (user + system), from /proc.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

/// The broker's CPU time so far, if it runs on this machine.
fn broker_cpu() -> Option<Duration> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "beam.smp") {
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
            let ticks: u64 = fields
                .get(11..13)?
                .iter()
                .filter_map(|t| t.parse::<u64>().ok())
                .sum();
            return Some(Duration::from_millis(ticks * 10));
        }
    }
    None
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// One publish contender's totals over the rounds.
#[derive(Default)]
struct Tally {
    times: Vec<Duration>,
    cpu: Duration,
    broker: Duration,
}

impl Tally {
    fn per_message(&self, d: Duration, n: usize) -> f64 {
        d.as_secs_f64() * 1e6 / (n * self.times.len().max(1)) as f64
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let exchange = format!("wt-bench-{}", &id[16..]);
        let queue = format!("{exchange}.q");
        let config = RabbitConfig::new(URL)
            .unwrap()
            .exchange(&exchange, ExchangeKind::Topic)
            .unwrap()
            .connection_name("bench");
        let connection = Connection::connect(URL, Default::default()).await.unwrap();
        let admin = connection.create_channel().await.unwrap();
        // Declared through the transport first, so the exchange exists.
        drop(RabbitPublisher::connect(config.clone()).await.unwrap());
        admin
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .unwrap();
        admin
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "bench.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();

        let rounds: usize = std::env::var("BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PUBLISH_ROUNDS);
        println!("RabbitMQ, {n} messages per run, {rounds} publish rounds, same broker, same process");
        const NAMES: [&str; 3] = [
            "raw lapin",
            "dead letter + retry + breaker + RabbitPublisher",
            "the same + backpressure",
        ];
        let mut tallies: [Tally; 3] = Default::default();
        for round in 0..rounds {
            for k in 0..3 {
                // The order rotates, so that no contender always runs first.
                let which = (round + k) % 3;
                let (c, b) = (cpu(), broker_cpu());
                let elapsed = match which {
                    0 => raw_publish(&connection, &exchange, n).await,
                    1 => stack_publish(&config, n, false).await,
                    _ => stack_publish(&config, n, true).await,
                };
                let tally = &mut tallies[which];
                tally.times.push(elapsed);
                tally.cpu += cpu() - c;
                if let (Some(b0), Some(b1)) = (b, broker_cpu()) {
                    tally.broker += b1 - b0;
                }
                admin.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.unwrap();
            }
            let raw = tallies[0].times[round].as_secs_f64();
            println!(
                "  round {}: raw {:>7.0}/s | stack {:>7.0}/s ({:.2}x) | + backpressure {:>7.0}/s ({:.2}x)",
                round + 1,
                n as f64 / raw,
                rate(n, tallies[1].times[round]),
                raw / tallies[1].times[round].as_secs_f64(),
                rate(n, tallies[2].times[round]),
                raw / tallies[2].times[round].as_secs_f64(),
            );
        }
        println!("publish, confirms + mandatory, persistent, {IN_FLIGHT} in flight (median, range over the rounds):");
        for (which, tally) in tallies.iter().enumerate() {
            let rates = spread(tally.times.iter().map(|t| rate(n, *t)).collect());
            let mut line = format!(
                "  {:<48} {:>7.0}/s ({:.0} - {:.0})",
                NAMES[which], rates.0, rates.1, rates.2
            );
            if which > 0 {
                let ratios = spread(
                    tallies[0]
                        .times
                        .iter()
                        .zip(&tally.times)
                        .map(|(raw, ours)| raw.as_secs_f64() / ours.as_secs_f64())
                        .collect(),
                );
                line.push_str(&format!(" | ratio {:.2}x ({:.2} - {:.2})", ratios.0, ratios.1, ratios.2));
            }
            line.push_str(&format!(
                " | CPU per message: client {:.1} us, broker {:.1} us",
                tally.per_message(tally.cpu, n),
                tally.per_message(tally.broker, n)
            ));
            println!("{line}");
        }

        let (mut raw_con, mut stack_con) = (Duration::MAX, Duration::MAX);
        let rounds = if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "publish") { 0 } else { ROUNDS };
        for _ in 0..rounds {
            preload(&config, n).await;
            raw_con = raw_con.min(raw_consume(&connection, &queue, n).await);
            preload(&config, n).await;
            stack_con = stack_con.min(stack_consume(&config, &queue, n).await);
        }
        println!(
            "consume, prefetch {PREFETCH}: raw lapin single acks {:>9.0}/s | serve + RabbitSubscriber {:>9.0}/s | ratio {:.2}x",
            rate(n, raw_con),
            rate(n, stack_con),
            raw_con.as_secs_f64() / stack_con.as_secs_f64()
        );

        admin.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
        admin.exchange_delete(exchange.as_str().into(), Default::default()).await.unwrap();
        let _ = connection.close(200, "done".into()).await;
    });
}
