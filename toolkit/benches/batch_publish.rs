//! Batch publishing against one-by-one publishing of the same events, in
//! the same run, on every broker transport with a batch publisher:
//! JetStream, Redis Streams, RabbitMQ and PostgreSQL.
//!
//! * `one by one`: `publisher.publish(event).await` for each event, each
//!   waiting for the broker's answer before the next is sent (what a loop
//!   over `publish` does);
//! * `batches of 1,000`: `publisher.batched().publish_batch(chunk)` for
//!   each chunk of 1,000, one answer per event.
//!
//! 20,000 events of about 200 bytes per round, 3 rounds, alternating the
//! two sides; the ratio is batched over one-by-one throughput per round.
//! Select transports with `BATCH_BENCH=jetstream,redis,rabbitmq,postgres`
//! (default: all).
//!
//! ```text
//! cargo bench -p watchtower-toolkit --bench batch_publish
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tower::Service;
use watchtower::{Error, Event, PublishBatchExt, PublishExt, Receipt};
use watchtower_test_support::unique;

const EVENTS: usize = 20_000;
const ROUNDS: usize = 3;
const BATCH: usize = 1_000;

fn events(topic: &str) -> Vec<Event> {
    (0..EVENTS)
        .map(|i| {
            Event::new(
                topic.to_owned(),
                serde_json::json!({"order_id": i, "customer": "c-1234", "total_cents": 4990, "currency": "EUR"}),
            )
        })
        .collect()
}

async fn one_by_one<P>(publisher: &mut P, events: Vec<Event>) -> Duration
where
    P: Service<Event, Response = Receipt, Error = Error> + Send,
    P::Future: Send,
{
    let start = Instant::now();
    for event in events {
        publisher.publish(event).await.unwrap();
    }
    start.elapsed()
}

async fn batched<B>(batches: &mut B, events: Vec<Event>) -> Duration
where
    B: Service<Vec<Event>, Response = watchtower::batch::BatchReceipts, Error = Error> + Send,
    B::Future: Send,
{
    let start = Instant::now();
    let mut events = events.into_iter();
    loop {
        let chunk: Vec<Event> = events.by_ref().take(BATCH).collect();
        if chunk.is_empty() {
            break;
        }
        for answer in batches.publish_batch(chunk).await.unwrap() {
            answer.unwrap();
        }
    }
    start.elapsed()
}

fn rate(d: Duration) -> f64 {
    EVENTS as f64 / d.as_secs_f64()
}

/// Runs the rounds and prints one line per round and the median ratio.
async fn compare<P, B>(name: &str, topic: &str, mut publisher: P, mut batches: B)
where
    P: Service<Event, Response = Receipt, Error = Error> + Send,
    P::Future: Send,
    B: Service<Vec<Event>, Response = watchtower::batch::BatchReceipts, Error = Error> + Send,
    B::Future: Send,
{
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let single = rate(one_by_one(&mut publisher, events(topic)).await);
        let batch = rate(batched(&mut batches, events(topic)).await);
        ratios.push(batch / single);
        println!(
            "{name:<10} round {round}: one by one {single:>9.0}/s, batches of {BATCH} {batch:>9.0}/s, {:.1}x",
            batch / single
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!("{name:<10} median ratio {:.1}x", ratios[ratios.len() / 2]);
}

fn wanted(name: &str) -> bool {
    std::env::var("BATCH_BENCH").map_or(true, |list| list.split(',').any(|n| n.trim() == name))
}

async fn jetstream() {
    use watchtower_nats::async_nats::jetstream::stream::{Config, StorageType};
    let client =
        watchtower_nats::NatsClient::connect(watchtower_nats::NatsConfig::new("nats://127.0.0.1:4222"))
            .await
            .unwrap();
    let name = unique("BENCHBATCH");
    client
        .create_or_update_stream(Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let publisher = client.jetstream_publisher();
    let batches = publisher.clone().batched();
    compare("jetstream", &format!("{name}.orders"), publisher, batches).await;
    client.delete_stream(&name).await.unwrap();
}

async fn redis() {
    let prefix = format!("{}:", unique("bench_batch"));
    let client = watchtower_redis::RedisClient::connect(
        watchtower_redis::RedisConfig::new("redis://127.0.0.1:6379").stream_prefix(prefix.as_str()),
    )
    .await
    .unwrap();
    let publisher = client.publisher();
    let batches = publisher.batched();
    compare("redis", "orders", publisher, batches).await;
    let conn = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = conn.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}orders"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn rabbitmq() {
    use watchtower_rabbitmq::lapin;
    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let exchange = unique("wt-bench-batch");
    let client = watchtower_rabbitmq::RabbitClient::connect(
        watchtower_rabbitmq::RabbitConfig::new(URL)
            .exchange(&exchange, watchtower_rabbitmq::ExchangeKind::Topic),
    )
    .await
    .unwrap();
    let publisher = client.publisher().await.unwrap();
    // A durable queue, so that the broker writes persistent events to disk
    // before it confirms them, as in production.
    let admin = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = admin.create_channel().await.unwrap();
    let queue = format!("{exchange}.q");
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "orders".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let batches = publisher.batched();
    compare("rabbitmq", "orders", publisher, batches).await;
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let _ = admin.close(200, "done".into()).await;
}

async fn postgres() {
    let name = unique("bench_batch");
    let client = watchtower_sql::SqlClient::connect(
        watchtower_sql::SqlConfig::new("postgres://postgres@127.0.0.1:5432/test")
            .table_prefix(format!("{name}_")),
    )
    .await
    .unwrap();
    let publisher = client.publisher();
    let batches = publisher.batched();
    compare("postgres", "orders", publisher, batches).await;
    client.drop_tables().await.unwrap();
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("{EVENTS} events per side and round, {ROUNDS} rounds");
        if wanted("jetstream") {
            jetstream().await;
        }
        if wanted("redis") {
            redis().await;
        }
        if wanted("rabbitmq") {
            rabbitmq().await;
        }
        if wanted("postgres") {
            postgres().await;
        }
    });
}
