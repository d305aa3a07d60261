//! Throughput of the RabbitMQ transport against raw lapin code doing the
//! same work with the same guarantee, in the same run, on the local broker.
//!
//! * publish: persistent CloudEvents messages with publisher confirms and
//!   `mandatory`, 1,024 unconfirmed at most: a raw lapin loop on one
//!   channel vs `RabbitPublisher` under dead letter + retry + circuit
//!   breaker;
//! * consume: a durable queue preloaded with the messages, prefetch 256: a
//!   raw lapin loop acknowledging each message singly vs
//!   `watchtower::serve` over `RabbitSubscriber` (decoding every event,
//!   acknowledging only after the handler finished, in batches).
//!
//! `cargo bench -p watchtower-rabbitmq --bench rabbitmq`. Environment:
//! `BENCH_N` messages per run (default 50,000), `BENCH_CHANNELS` publisher
//! channels, `BENCH_BARE=1` the publisher without layers, `BENCH_ONLY=publish`
//! skips the consume runs. The client CPU time per message is printed too,
//! since the broker shares the machine.

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
use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
use watchtower_layers::retry::RetryConfig;
use watchtower_rabbitmq::{
    ExchangeKind, PublishOptions, QueueOptions, RabbitConfig, RabbitPublisher, RabbitSubscriber,
};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const IN_FLIGHT: usize = 1024;
const PREFETCH: u16 = 256;
const ROUNDS: usize = 3;

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

async fn stack_publish(config: &RabbitConfig, n: usize) -> Duration {
    let publisher = RabbitPublisher::connect_with(config.clone(), publish_options())
        .await
        .unwrap();
    if std::env::var("BENCH_BARE").is_ok() {
        return bare_publish(publisher, n).await;
    }
    let dlq = MemoryDeadLetters::new(n);
    let mut stack = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new())
        .circuit_breaker(CircuitBreakerConfig::new())
        .service(publisher);
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
    assert_eq!((delivered, dlq.len()), (n, 0));
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

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
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

        println!("RabbitMQ, {n} messages per run, best of {ROUNDS} runs, same broker, same process");
        let (mut raw_pub, mut stack_pub) = (Duration::MAX, Duration::MAX);
        let (mut raw_cpu, mut stack_cpu) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..ROUNDS {
            let c = cpu();
            raw_pub = raw_pub.min(raw_publish(&connection, &exchange, n).await);
            raw_cpu += cpu() - c;
            admin.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.unwrap();
            let c = cpu();
            stack_pub = stack_pub.min(stack_publish(&config, n).await);
            stack_cpu += cpu() - c;
            admin.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.unwrap();
        }
        println!(
            "publish, confirms, persistent, {IN_FLIGHT} in flight: raw lapin {:>9.0}/s | dead letter + retry + breaker + RabbitPublisher {:>9.0}/s | ratio {:.2}x",
            rate(n, raw_pub),
            rate(n, stack_pub),
            raw_pub.as_secs_f64() / stack_pub.as_secs_f64()
        );
        println!(
            "  client CPU per message: raw {:.1} us | stack {:.1} us",
            raw_cpu.as_secs_f64() * 1e6 / (n * ROUNDS) as f64,
            stack_cpu.as_secs_f64() * 1e6 / (n * ROUNDS) as f64
        );

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
