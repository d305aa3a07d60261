//! Redis Streams throughput: WatchTower against the raw `redis` crate, in
//! the cases of the shared baseline harness (`shared/bench/run.sh`
//! `redis-xadd-pipe` and `redis-xreadgroup`), in the same run, as per-round
//! ratios.
//!
//! * publish, `N` events of about 195 bytes: raw is the harness's
//!   `redis-xadd-pipe`, pipelines of 256 `XADD MAXLEN ~ 100000` of one field
//!   holding a pre-built JSON body, one pipeline on the wire at a time.
//!   WatchTower, 256 concurrent callers, `MaxLen::Approx(100_000)`, in each
//!   content mode: the publisher alone, and under dead letter + retry +
//!   circuit breaker + backpressure (the four-layer stack).
//! * consume: `N` entries already in a stream, a fresh group each run. Raw
//!   is the harness's `redis-xreadgroup`: `XREADGROUP COUNT 256` then one
//!   `XACK` per batch, in a loop, over entries of one pre-built JSON field.
//!   WatchTower: [`RedisSubscriber`] through `watchtower::serve`
//!   (concurrency 256) over entries it wrote in each content mode.
//!
//! Run with `cargo bench -p watchtower-redis --bench redis` against the
//! local Redis (`REDIS_URL` to change it; `REDIS_BENCH=publish` or
//! `consume` for one half, `REDIS_BENCH_ROUNDS` for the number of rounds,
//! `REDIS_BENCH_CALLERS` for the concurrent publishers, 256 by default).
//! Each row gives the median, best and range over the rounds; each ratio
//! is taken per round (the cases of a round run back to back) and given as
//! median, range and per round.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tower::{ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event, PublishBatchExt as _, Receipt, SubscribeOptions, Subscriber, serve};
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome};
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_redis::{
    ContentMode, MaxLen, RedisClient, RedisConfig, RedisPublisher, RedisPublisherOptions,
    RedisSubscriberOptions,
};

const N: usize = 50_000;
/// Concurrent callers unless `REDIS_BENCH_CALLERS` says otherwise.
const CALLERS: usize = 256;

/// Concurrent callers of the publish cases.
fn callers() -> usize {
    std::env::var("REDIS_BENCH_CALLERS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CALLERS)
}
const ROUNDS: usize = 5;

/// Wall time and CPU time (this process and the Redis server, when its
/// `/proc` entry is readable) over a timed section.
struct Clock {
    start: Instant,
    cpu: (u64, Option<u64>),
}

/// CPU microseconds per event of the last timed section: (client, server).
static LAST_CPU: std::sync::Mutex<(f64, Option<f64>)> = std::sync::Mutex::new((0.0, None));

/// utime + stime of a process in clock ticks (1/100 s).
fn ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn redis_pid() -> Option<String> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PID.get_or_init(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "redis-server").then_some(name)
        })
    })
    .clone()
}

impl Clock {
    fn start() -> Clock {
        // Reading `/proc` allocates: before the clock starts.
        let cpu = (ticks("self").unwrap_or(0), redis_pid().and_then(|p| ticks(&p)));
        Clock {
            start: Instant::now(),
            cpu,
        }
    }

    /// Events per second since `start`; records the CPU time per event.
    fn rate(self) -> f64 {
        // The clock stops before `/proc` is read.
        let rate = N as f64 / self.start.elapsed().as_secs_f64();
        let per_event = |ticks: u64| ticks as f64 * 10_000.0 / N as f64;
        let client = per_event(ticks("self").unwrap_or(0).saturating_sub(self.cpu.0));
        let server = match (self.cpu.1, redis_pid().and_then(|p| ticks(&p))) {
            (Some(a), Some(b)) => Some(per_event(b.saturating_sub(a))),
            _ => None,
        };
        *LAST_CPU.lock().unwrap() = (client, server);
        rate
    }
}

/// A rate and the CPU per event that went with it.
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    client: f64,
    server: Option<f64>,
}

async fn sample(rate: impl std::future::Future<Output = f64>) -> Sample {
    let rate = rate.await;
    let (client, server) = *LAST_CPU.lock().unwrap();
    Sample { rate, client, server }
}

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn key(name: &str) -> String {
    format!("wtbench_{name}_{}", uuid::Uuid::now_v7().simple())
}

fn events(topic: &str) -> Vec<Event> {
    (0..N)
        .map(|i| {
            Event::new(
                topic.to_owned(),
                serde_json::json!({"order_id": i, "amount": 1999, "currency": "EUR"}),
            )
        })
        .collect()
}

/// The harness's bodies: CloudEvents-like JSON documents of about 195
/// bytes, built before the clock starts.
fn raw_bodies(topic: &str) -> Vec<Vec<u8>> {
    events(topic)
        .iter()
        .map(|e| watchtower::codec::structured::to_vec(e).unwrap())
        .collect()
}

/// Trimming as the harness does it.
const MAX_LEN: u64 = 100_000;

async fn raw_conn() -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_pipeline_buffer_size(1024);
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

async fn del(key: &str) {
    let mut conn = raw_conn().await;
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await.unwrap();
}

/// The harness's `redis-xadd-pipe`: pipelines of 256, one at a time.
async fn publish_raw() -> f64 {
    let stream = key("pub_raw");
    let bodies = raw_bodies(&stream);
    let mut conn = raw_conn().await;
    let start = Clock::start();
    for chunk in bodies.chunks(256) {
        let mut pipe = redis::pipe();
        for body in chunk {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_LEN)
                .arg("*")
                .arg("event")
                .arg(&body[..])
                .ignore();
        }
        pipe.exec_async(&mut conn).await.unwrap();
    }
    let rate = start.rate();
    del(&stream).await;
    rate
}

async fn publisher(mode: ContentMode) -> RedisPublisher {
    RedisClient::connect(RedisConfig::new(url()))
        .await
        .unwrap()
        .publisher_with(
            RedisPublisherOptions::new()
                .max_len(MaxLen::Approx(MAX_LEN))
                .content_mode(mode),
        )
        .unwrap()
}

async fn publish_bare(mode: ContentMode) -> f64 {
    let stream = key("pub_bare");
    let sent = events(&stream);
    let publisher = publisher(mode).await;
    let start = Clock::start();
    let mut calls = futures_util::stream::iter(sent)
        .map(|event| publisher.clone().oneshot(event))
        .buffer_unordered(callers());
    while let Some(result) = calls.next().await {
        result.unwrap();
    }
    let rate = start.rate();
    del(&stream).await;
    rate
}

/// Dead letter + retry + circuit breaker + a bounded queue (1024,
/// blocking) over the publisher: the layer order the layers crate
/// recommends.
async fn publish_stack(mode: ContentMode) -> f64 {
    let stream = key("pub_wt");
    let sent = events(&stream);
    let publisher = publisher(mode).await;
    let stack = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(MemoryDeadLetters::new(N)))
        .layer(RetryLayer::new(RetryConfig::new()))
        .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new()))
        .layer(
            BackpressureLayer::new(1024, Overflow::Block)
                .concurrency(callers())
                .direct(true),
        )
        .service(publisher);
    let rate = drive(sent, |event| stack.clone().oneshot(event)).await;
    del(&stream).await;
    rate
}

/// Runs `publish` for every event, `CALLERS` at once; the rate in events/s.
async fn drive<F>(sent: Vec<Event>, publish: impl FnMut(Event) -> F) -> f64
where
    F: std::future::Future<Output = Result<Outcome<Receipt>, Error>>,
{
    let start = Clock::start();
    let mut calls = futures_util::stream::iter(sent)
        .map(publish)
        .buffer_unordered(callers());
    while let Some(result) = calls.next().await {
        assert!(result.unwrap().is_delivered());
    }
    start.rate()
}

/// A stream holding `N` entries of one field, as the harness writes them.
async fn raw_stream() -> String {
    let stream = key("consume_raw");
    let bodies = raw_bodies(&stream);
    let mut conn = raw_conn().await;
    for chunk in bodies.chunks(256) {
        let mut pipe = redis::pipe();
        for body in chunk {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("event")
                .arg(&body[..])
                .ignore();
        }
        pipe.exec_async(&mut conn).await.unwrap();
    }
    stream
}

/// A stream holding `N` events, written by WatchTower in `mode`.
async fn filled_stream(mode: ContentMode) -> String {
    let stream = key("consume");
    let publisher = publisher(mode).await;
    let sent = events(&stream);
    for chunk in sent.chunks(1000) {
        for r in publisher.batched().publish_batch(chunk.to_vec()).await.unwrap() {
            r.unwrap();
        }
    }
    stream
}

async fn create_group(stream: &str, group: &str) {
    let mut conn = raw_conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// The harness's `redis-xreadgroup`.
async fn consume_raw(stream: &str, round: usize) -> f64 {
    use redis::AsyncTypedCommands as _;
    let group = format!("raw{round}");
    create_group(stream, &group).await;
    let mut conn = raw_conn().await;
    let opts = redis::streams::StreamReadOptions::default()
        .group(&group, "c1")
        .count(256);
    let start = Clock::start();
    let mut got = 0;
    while got < N {
        let reply = conn.xread_options(&[stream], &[">"], &opts).await.unwrap();
        let ids: Vec<String> = reply
            .unwrap()
            .keys
            .into_iter()
            .flat_map(|k| k.ids.into_iter().map(|e| e.id))
            .collect();
        conn.xack(stream, &group, &ids).await.unwrap();
        got += ids.len();
    }
    start.rate()
}

async fn consume_watchtower(stream: &str, round: usize, concurrency: Option<usize>) -> f64 {
    let group = format!("wt{round}_{}", concurrency.unwrap_or(0));
    create_group(stream, &group).await;
    let subscriber = RedisClient::connect(RedisConfig::new(url()))
        .await
        .unwrap()
        .subscriber_with(RedisSubscriberOptions::new().batch_size(256))
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (counter, notify) = (handled.clone(), all.clone());
    let start = Clock::start();
    let subscription = subscriber
        .open(SubscribeOptions::new([stream]).unwrap().group(&group).unwrap())
        .await
        .unwrap();
    let handler = service_fn(move |event: Event| {
        std::hint::black_box(event.data());
        if counter.fetch_add(1, Ordering::Relaxed) + 1 == N {
            notify.notify_one();
        }
        async { Ok::<_, Error>(()) }
    });
    let mut runtime = serve(subscription, handler);
    if let Some(n) = concurrency {
        runtime = runtime.concurrency(n);
    }
    let waiter = all.clone();
    let stats = runtime
        .with_graceful_shutdown(async move { waiter.notified().await })
        .await
        .unwrap();
    let rate = start.rate();
    assert_eq!(stats.acked as usize, N, "{stats}");
    rate
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    (min, best(values))
}

/// The per-round ratios `a[i] / b[i]`: rounds run back to back, so a ratio
/// compares runs under the same machine load.
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

fn rates(samples: &[Sample]) -> Vec<f64> {
    samples.iter().map(|s| s.rate).collect()
}

fn row(name: &str, samples: &[Sample]) {
    let rates = rates(samples);
    let (lo, hi) = range(&rates);
    let client = median(&samples.iter().map(|s| s.client).collect::<Vec<_>>());
    let server: Vec<f64> = samples.iter().filter_map(|s| s.server).collect();
    let server = if server.is_empty() {
        String::new()
    } else {
        format!(", server {:.1}", median(&server))
    };
    println!(
        "  {name:<56} median {:>7.0}  best {:>7.0}  range {lo:.0} - {hi:.0}  (CPU us/event: client {client:.1}{server})",
        median(&rates),
        best(&rates),
    );
}

fn ratio_row(name: &str, samples: &[Sample], base_name: &str, base: &[Sample]) {
    let r = ratios(&rates(samples), &rates(base));
    let (lo, hi) = range(&r);
    let list: Vec<String> = r.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "  {name:<40} / {base_name:<22} median {:.2}x  range {lo:.2} - {hi:.2}  per round [{}]",
        median(&r),
        list.join(" ")
    );
}

fn main() {
    // `REDIS_BENCH=publish` or `consume` runs one half only.
    let only = std::env::var("REDIS_BENCH").unwrap_or_default();
    let rounds = std::env::var("REDIS_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    // `REDIS_BENCH_THREADS=1`: everything on one thread.
    let rt = match std::env::var("REDIS_BENCH_THREADS").as_deref() {
        Ok("1") => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .unwrap();
    rt.block_on(async {
        println!("redis streams, {N} events per run, {rounds} rounds, events/s");
        let modes = [
            ("binary", ContentMode::Binary),
            ("structured", ContentMode::Structured),
        ];
        if only != "consume" {
            let callers = callers();
            let mut raw = Vec::new();
            let mut bare = [Vec::new(), Vec::new()];
            let mut stack = [Vec::new(), Vec::new()];
            for _ in 0..rounds {
                raw.push(sample(publish_raw()).await);
                for (i, (_, mode)) in modes.iter().enumerate() {
                    bare[i].push(sample(publish_bare(*mode)).await);
                    stack[i].push(sample(publish_stack(*mode)).await);
                }
            }
            println!("publish (redis-xadd-pipe), {callers} concurrent callers:");
            row("raw XADD, pipelines of 256, one field of JSON", &raw);
            for (i, (name, _)) in modes.iter().enumerate() {
                row(&format!("watchtower publisher, {name}"), &bare[i]);
                row(&format!("watchtower four-layer stack, {name}"), &stack[i]);
            }
            println!("publish ratios:");
            for (i, (name, _)) in modes.iter().enumerate() {
                ratio_row(&format!("publisher, {name}"), &bare[i], "raw", &raw);
                ratio_row(&format!("four-layer stack, {name}"), &stack[i], "raw", &raw);
            }
        }
        if only != "publish" {
            let raw_key = raw_stream().await;
            let streams = [
                filled_stream(ContentMode::Binary).await,
                filled_stream(ContentMode::Structured).await,
            ];
            let mut craw = Vec::new();
            let mut cwt = [Vec::new(), Vec::new()];
            for round in 0..rounds {
                craw.push(sample(consume_raw(&raw_key, round)).await);
                for (i, stream) in streams.iter().enumerate() {
                    cwt[i].push(sample(consume_watchtower(stream, round, Some(256))).await);
                }
            }
            del(&raw_key).await;
            for stream in &streams {
                del(stream).await;
            }
            println!("consume (redis-xreadgroup):");
            row("raw XREADGROUP COUNT 256 + XACK per batch", &craw);
            for (i, (name, _)) in modes.iter().enumerate() {
                row(&format!("watchtower serve (concurrency 256), {name}"), &cwt[i]);
            }
            println!("consume ratios:");
            for (i, (name, _)) in modes.iter().enumerate() {
                ratio_row(&format!("serve, {name}"), &cwt[i], "raw", &craw);
            }
        }
    });
}
