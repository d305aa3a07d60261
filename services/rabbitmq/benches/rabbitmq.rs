//! Throughput of the RabbitMQ transport against raw lapin, in the same
//! run, on the local broker, in the cases of the shared baseline harness
//! (`../shared/bench`: `amqp-pub-confirm`, `amqp-consume`), so that the
//! ratios can be set side by side.
//!
//! * publish: 50,000 persistent events to a durable topic exchange bound
//!   to one durable classic queue, publisher confirms, 1,024 unconfirmed
//!   at most. The yardstick is the harness's raw case: raw lapin on one
//!   channel sending pre-built ~195-byte JSON bodies, no header table, no
//!   `mandatory`. Against it: `RabbitPublisher` alone and under the
//!   four-layer stack (dead letter + retry + circuit breaker +
//!   backpressure), in structured and binary mode with `mandatory` (the
//!   default), and without it, which the exchange's alternate exchange
//!   makes safe. The events are built before the clock
//!   starts, as the raw bodies are.
//! * consume: a durable queue preloaded with the messages, prefetch 256:
//!   raw lapin acknowledging each message singly (plain JSON bodies, as
//!   the harness) vs `watchtower::serve` over `RabbitSubscriber`
//!   (decoding every event, acknowledging only after the handler
//!   finished, in batches), for events written in each content mode.
//!
//! `cargo bench -p watchtower-rabbitmq --bench rabbitmq`. Environment:
//! `BENCH_N` messages per run (default 50,000), `BENCH_ROUNDS` rounds
//! (default 3; in each, every contender runs once, in an order that
//! rotates from round to round), `BENCH_CASES` a comma-separated subset of
//! the contenders' short names (printed), `BENCH_ONLY=publish` or
//! `consume`. Ratios to raw are printed per round, then their median and
//! range. The CPU time per message of this process and of the broker
//! (`beam.smp`, read from /proc when it runs on this machine) is printed
//! too, since the broker shares the cores.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
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
    ContentMode, ExchangeKind, PublishOptions, QueueOptions, RabbitClient, RabbitConfig, RabbitPublisher,
    RabbitSubscriber,
};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const IN_FLIGHT: usize = 1024;
const PREFETCH: u16 = 256;
const ROUNDS: usize = 3;

/// The event the stacks publish: in structured mode about the size of the
/// harness's raw bodies.
fn event(i: usize) -> Event {
    Event::new("bench.order", serde_json::json!({"user_id": i}))
}

/// The harness's raw bodies: ~195 bytes of CloudEvents-style JSON.
fn raw_bodies(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let body = serde_json::json!({
                "specversion": "1.0", "id": uuid::Uuid::now_v7().to_string(), "source": "bench",
                "type": "user.created", "time": "2025-01-01T00:00:00Z",
                "datacontenttype": "application/json", "data": {"user_id": i},
            });
            Bytes::from(serde_json::to_vec(&body).unwrap())
        })
        .collect()
}

/// The harness's raw publish: one confirm-mode channel, no `mandatory`, no
/// header table, `IN_FLIGHT` confirms outstanding.
async fn raw_publish(connection: &Connection, exchange: &str, bodies: &[Bytes]) -> Duration {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for body in bodies {
        if in_flight.len() >= IN_FLIGHT {
            in_flight.next().await.unwrap();
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                "bench.order".into(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            )
            .await
            .unwrap();
        in_flight.push(async move {
            match confirm.await.unwrap() {
                Confirmation::Ack(None) => {}
                other => panic!("not confirmed: {other:?}"),
            }
        });
    }
    while in_flight.next().await.is_some() {}
    let elapsed = start.elapsed();
    let _ = channel.close(200, "done".into()).await;
    elapsed
}

/// One way of publishing through WatchTower.
#[derive(Clone, Copy)]
struct Contender {
    name: &'static str,
    short: &'static str,
    mode: ContentMode,
    mandatory: bool,
    layers: bool,
}

const CONTENDERS: [Contender; 8] = [
    Contender {
        name: "RabbitPublisher, structured",
        short: "pub-s",
        mode: ContentMode::Structured,
        mandatory: true,
        layers: false,
    },
    Contender {
        name: "RabbitPublisher, binary",
        short: "pub-b",
        mode: ContentMode::Binary,
        mandatory: true,
        layers: false,
    },
    Contender {
        name: "RabbitPublisher, structured, alternate exchange",
        short: "pub-s-ae",
        mode: ContentMode::Structured,
        mandatory: false,
        layers: false,
    },
    Contender {
        name: "4 layers + RabbitPublisher, structured",
        short: "stack-s",
        mode: ContentMode::Structured,
        mandatory: true,
        layers: true,
    },
    Contender {
        name: "4 layers + RabbitPublisher, binary",
        short: "stack-b",
        mode: ContentMode::Binary,
        mandatory: true,
        layers: true,
    },
    Contender {
        name: "4 layers + RabbitPublisher, structured, alternate exchange",
        short: "stack-s-ae",
        mode: ContentMode::Structured,
        mandatory: false,
        layers: true,
    },
    Contender {
        name: "RabbitPublisher, binary, alternate exchange",
        short: "pub-b-ae",
        mode: ContentMode::Binary,
        mandatory: false,
        layers: false,
    },
    Contender {
        name: "4 layers + RabbitPublisher, binary, alternate exchange",
        short: "stack-b-ae",
        mode: ContentMode::Binary,
        mandatory: false,
        layers: true,
    },
];

fn publish_options(mode: ContentMode, mandatory: bool) -> PublishOptions {
    PublishOptions::new()
        .max_in_flight(IN_FLIGHT)
        .content_mode(mode)
        .mandatory(mandatory)
}

async fn stack_publish(config: &RabbitConfig, contender: Contender, events: Vec<Event>) -> Duration {
    let publisher = publisher_with(
        config.clone(),
        publish_options(contender.mode, contender.mandatory),
    )
    .await
    .unwrap();
    if !contender.layers {
        return bare_publish(publisher, events).await;
    }
    let n = events.len();
    let dlq = MemoryDeadLetters::new(n);
    let stack = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new())
        .circuit_breaker(CircuitBreakerConfig::new())
        .backpressure(BackpressureLayer::new(IN_FLIGHT, Overflow::Block).concurrency(IN_FLIGHT))
        .service(publisher);
    let elapsed = drive(stack, events).await;
    assert_eq!(dlq.len(), 0);
    elapsed
}

/// Calls `stack` for every event, `IN_FLIGHT` at most at once, keeping the
/// calls moving while waiting for readiness; every event must be delivered.
async fn drive<S>(mut stack: S, events: Vec<Event>) -> Duration
where
    S: Service<Event, Response = watchtower_layers::dead_letter::Outcome<watchtower::Receipt>>,
    S::Error: std::fmt::Debug,
{
    let n = events.len();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut delivered = 0;
    for event in events {
        while in_flight.len() >= IN_FLIGHT {
            delivered += in_flight.next().await.unwrap_or(0);
        }
        poll_fn(|cx| stack.poll_ready(cx)).await.unwrap();
        let call = stack.call(event);
        in_flight.push(async move { usize::from(call.await.unwrap().is_delivered()) });
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

/// The transport alone, without layers.
async fn bare_publish(mut publisher: RabbitPublisher, events: Vec<Event>) -> Duration {
    let start = Instant::now();
    let mut in_flight: FuturesUnordered<watchtower_rabbitmq::ResponseFuture> = FuturesUnordered::new();
    for event in events {
        while in_flight.len() >= IN_FLIGHT {
            in_flight.next().await.unwrap().unwrap();
        }
        poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
        in_flight.push(publisher.call(event));
    }
    while let Some(r) = in_flight.next().await {
        r.unwrap();
    }
    start.elapsed()
}

async fn preload(config: &RabbitConfig, mode: ContentMode, n: usize) {
    let publisher = publisher_with(config.clone(), publish_options(mode, true))
        .await
        .unwrap();
    bare_publish(publisher, (0..n).map(event).collect()).await;
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
    let subscriber = subscriber_with(
        config.clone(),
        QueueOptions::new().queue(queue).passive(true).prefetch(PREFETCH),
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
    assert_eq!(stats.poisoned, 0);
    elapsed
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

/// One contender's totals over the rounds.
#[derive(Default, Clone)]
struct Tally {
    times: Vec<Duration>,
    cpu: Duration,
    broker: Duration,
}

impl Tally {
    fn per_message(&self, d: Duration, n: usize) -> f64 {
        d.as_secs_f64() * 1e6 / (n * self.times.len().max(1)) as f64
    }

    /// Times one run into this tally.
    async fn time<F: Future<Output = Duration>>(&mut self, run: F) -> Duration {
        let (c, b) = (cpu(), broker_cpu());
        let elapsed = run.await;
        self.times.push(elapsed);
        self.cpu += cpu() - c;
        if let (Some(b0), Some(b1)) = (b, broker_cpu()) {
            self.broker += b1 - b0;
        }
        elapsed
    }
}

/// Prints the medians of `tallies` against `raw`.
fn summary(raw: &Tally, tallies: &[(&str, &Tally)], n: usize) {
    for (name, tally) in std::iter::once(&("raw lapin", raw)).chain(tallies) {
        let rates = spread(tally.times.iter().map(|t| rate(n, *t)).collect());
        let mut line = format!(
            "  {name:<54} {:>7.0}/s ({:.0} - {:.0})",
            rates.0, rates.1, rates.2
        );
        if !std::ptr::eq(*tally, raw) {
            let ratios = spread(
                raw.times
                    .iter()
                    .zip(&tally.times)
                    .map(|(raw, ours)| raw.as_secs_f64() / ours.as_secs_f64())
                    .collect(),
            );
            line.push_str(&format!(
                " | ratio {:.2}x ({:.2} - {:.2})",
                ratios.0, ratios.1, ratios.2
            ));
        }
        line.push_str(&format!(
            " | CPU/msg: client {:.1} us, broker {:.1} us",
            tally.per_message(tally.cpu, n),
            tally.per_message(tally.broker, n)
        ));
        println!("{line}");
    }
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let n: usize = env("BENCH_N").unwrap_or(50_000);
    let rounds: usize = env("BENCH_ROUNDS").unwrap_or(ROUNDS);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let cases: Option<Vec<String>> = std::env::var("BENCH_CASES")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    let contenders: Vec<Contender> = CONTENDERS
        .into_iter()
        .filter(|c| {
            cases
                .as_ref()
                .is_none_or(|cases| cases.iter().any(|s| s == c.short))
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let exchange = format!("wt-bench-{}", &id[16..]);
        let queue = format!("{exchange}.q");
        // The alternate exchange keeps what no binding routes, which makes
        // publishing without `mandatory` safe; it changes nothing for the
        // routed events measured here.
        let alternate = format!("{exchange}.unroutable");
        let config = RabbitConfig::new(URL)
            .exchange(&exchange, ExchangeKind::Topic)
            .alternate_exchange(&alternate)
            .connection_name("bench");
        let connection = Connection::connect(URL, Default::default()).await.unwrap();
        let admin = connection.create_channel().await.unwrap();
        // Declared through the transport first, so the exchange exists.
        drop(publisher_with(config.clone(), PublishOptions::new()).await.unwrap());
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
        let purge = || admin.queue_purge(queue.as_str().into(), QueuePurgeOptions::default());
        let bodies = raw_bodies(n);
        println!("RabbitMQ, {n} messages per run, {rounds} rounds, same broker, same process");
        for c in &contenders {
            println!("  {:<10} {}", c.short, c.name);
        }

        if only != "consume" {
            let mut raw = Tally::default();
            let mut tallies = vec![Tally::default(); contenders.len()];
            for round in 0..rounds {
                // The order rotates, so that no contender always runs first.
                let k = contenders.len() + 1;
                for j in 0..k {
                    let which = (round + j) % k;
                    if which == 0 {
                        raw.time(raw_publish(&connection, &exchange, &bodies)).await;
                    } else {
                        let events: Vec<Event> = (0..n).map(event).collect();
                        let c = contenders[which - 1];
                        tallies[which - 1].time(stack_publish(&config, c, events)).await;
                    }
                    purge().await.unwrap();
                }
                let raw_time = raw.times[round].as_secs_f64();
                let mut line = format!("  round {}: raw {:>6.0}/s", round + 1, n as f64 / raw_time);
                for (c, tally) in contenders.iter().zip(&tallies) {
                    line.push_str(&format!(
                        " | {} {:.2}x",
                        c.short,
                        raw_time / tally.times[round].as_secs_f64()
                    ));
                }
                println!("{line}");
            }
            println!(
                "publish, confirms, persistent, {IN_FLIGHT} in flight (median, range over the rounds; ratio = raw time / time, per round):"
            );
            let named: Vec<(&str, &Tally)> = contenders.iter().map(|c| c.name).zip(&tallies).collect();
            summary(&raw, &named, n);
        }

        if only != "publish" {
            let (mut raw, mut structured, mut binary) = (Tally::default(), Tally::default(), Tally::default());
            for round in 0..rounds {
                purge().await.unwrap();
                raw_publish(&connection, &exchange, &bodies).await;
                raw.time(raw_consume(&connection, &queue, n)).await;
                preload(&config, ContentMode::Structured, n).await;
                structured.time(stack_consume(&config, &queue, n)).await;
                preload(&config, ContentMode::Binary, n).await;
                binary.time(stack_consume(&config, &queue, n)).await;
                let raw_time = raw.times[round].as_secs_f64();
                println!(
                    "  round {}: raw {:>6.0}/s | structured {:.2}x | binary {:.2}x",
                    round + 1,
                    n as f64 / raw_time,
                    raw_time / structured.times[round].as_secs_f64(),
                    raw_time / binary.times[round].as_secs_f64(),
                );
            }
            println!("consume, prefetch {PREFETCH} (raw: single acks; WatchTower: serve + RabbitSubscriber):");
            summary(
                &raw,
                &[("serve + RabbitSubscriber, structured", &structured), ("serve + RabbitSubscriber, binary", &binary)],
                n,
            );
        }

        admin.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
        admin.exchange_delete(exchange.as_str().into(), Default::default()).await.unwrap();
        admin.queue_delete(alternate.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
        admin.exchange_delete(alternate.as_str().into(), Default::default()).await.unwrap();
        let _ = connection.close(200, "done".into()).await;
    });
}

async fn publisher_with(
    config: RabbitConfig,
    options: PublishOptions,
) -> Result<RabbitPublisher, watchtower::Error> {
    RabbitClient::connect(config).await?.publisher_with(options).await
}

async fn subscriber_with(
    config: RabbitConfig,
    queue: QueueOptions,
) -> Result<RabbitSubscriber, watchtower::Error> {
    Ok(RabbitClient::connect(config).await?.subscriber_with(queue))
}
