//! Redis Streams throughput: WatchTower against the raw `redis` crate doing
//! the same work with the same guarantee, in the same run.
//!
//! * publish: `N` events, 64 concurrent callers. Raw: `XADD` of the same
//!   fields (encoded per event, as a hand-written client does) on one
//!   multiplexed connection (the client pipelines concurrent commands),
//!   and explicit pipelines of 64 `XADD`s, four on the wire at once (the
//!   baseline), and for reference pipelines half the callers long, two at
//!   a time: as many `XADD`s outstanding as the callers can have. WatchTower: dead letter + retry + circuit breaker
//!   over [`RedisPublisher`], the same with a backpressure queue as fourth
//!   layer (as many calls in flight as there are callers; callers call
//!   the publisher themselves when nothing is queued, since it gathers
//!   pipelines in a task of its own), and the publisher alone.
//! * consume: `N` entries already in a stream, a fresh group each run.
//!   Raw: `XREADGROUP COUNT 256` + one `XACK` per batch, in a loop.
//!   WatchTower: [`RedisSubscriber`] through `watchtower::serve`, with
//!   default settings and tuned (concurrency 256).
//!
//! Run with `cargo bench -p watchtower-redis --bench redis` against the
//! local Redis (`REDIS_URL` to change it; `REDIS_BENCH=publish` or
//! `consume` for one half, `REDIS_BENCH_CASE=raw`, `stack`, `four` or `bare` for
//! one publish case only, to profile it, `REDIS_BENCH_ROUNDS` for the number of rounds,
//! `REDIS_BENCH_CALLERS` for the concurrent publishers, 64 by default).
//! Each row gives the median, best and range over the rounds; each ratio
//! is taken per round (the cases of a round run back to back) and given as
//! median and range.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tower::{ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event, Receipt, SubscribeOptions, Subscriber, serve};
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome};
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_redis::{RedisConfig, RedisPublisher, RedisSubscriber};

const N: usize = 50_000;
/// Concurrent callers unless `REDIS_BENCH_CALLERS` says otherwise.
const CALLERS: usize = 64;

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

/// Appends the fields a hand-written client would send for `e` to `cmd`:
/// the same CloudEvents attributes, encoded per event as it is sent.
fn raw_fields(cmd: &mut redis::Cmd, e: &Event) {
    cmd.arg("specversion")
        .arg("1.0")
        .arg("id")
        .arg(e.id())
        .arg("type")
        .arg(e.ty())
        .arg("source")
        .arg(e.source())
        .arg("time")
        .arg(watchtower::codec::format_time(e.time().unwrap()))
        .arg("datacontenttype")
        .arg("application/json")
        .arg("data")
        .arg(&e.data().unwrap()[..]);
}

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

async fn publish_raw() -> f64 {
    let stream = key("pub_raw");
    let events = events(&stream);
    let conn = raw_conn().await;
    let start = Clock::start();
    let mut calls = futures_util::stream::iter(&events)
        .map(|event| {
            let mut conn = conn.clone();
            let stream = &stream;
            async move {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream).arg("*");
                raw_fields(&mut cmd, event);
                cmd.query_async::<String>(&mut conn).await.unwrap()
            }
        })
        .buffer_unordered(callers());
    while calls.next().await.is_some() {}
    let rate = start.rate();
    del(&stream).await;
    rate
}

/// The baseline: pipelines of 64, four on the wire (256 `XADD`s
/// outstanding).
async fn publish_raw_pipelined() -> f64 {
    publish_raw_pipelines(64, 4).await
}

/// Pipelines of `size`, `in_flight` on the wire at once.
async fn publish_raw_pipelines(size: usize, in_flight: usize) -> f64 {
    let stream = key("pub_pipe");
    let events = events(&stream);
    let conn = raw_conn().await;
    let start = Clock::start();
    let mut calls = futures_util::stream::iter(events.chunks(size))
        .map(|batch| {
            let mut conn = conn.clone();
            let stream = &stream;
            async move {
                let mut pipe = redis::pipe();
                for event in batch {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(stream).arg("*");
                    raw_fields(&mut cmd, event);
                    pipe.add_command(cmd);
                }
                pipe.query_async::<Vec<String>>(&mut conn).await.unwrap()
            }
        })
        .buffer_unordered(in_flight);
    while calls.next().await.is_some() {}
    let rate = start.rate();
    del(&stream).await;
    rate
}

async fn publish_bare() -> f64 {
    let stream = key("pub_bare");
    let sent = events(&stream);
    let publisher = RedisPublisher::connect(RedisConfig::new(url())).await.unwrap();
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

/// Dead letter + retry + circuit breaker over the publisher, and with
/// `backpressure` a bounded queue (1024, blocking) in front of it: the
/// layer order the layers crate recommends.
async fn publish_watchtower(backpressure: bool) -> f64 {
    let stream = key("pub_wt");
    let sent = events(&stream);
    let publisher = RedisPublisher::connect(RedisConfig::new(url())).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(MemoryDeadLetters::new(N)))
        .layer(RetryLayer::new(RetryConfig::new()))
        .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new()));
    let rate = if backpressure {
        let stack = stack
            .layer(
                BackpressureLayer::new(1024, Overflow::Block)
                    .concurrency(callers())
                    .direct(true),
            )
            .service(publisher);
        drive(sent, |event| stack.clone().oneshot(event)).await
    } else {
        let stack = stack.service(publisher);
        drive(sent, |event| stack.clone().oneshot(event)).await
    };
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

/// A stream holding `N` events, written by WatchTower.
async fn filled_stream() -> String {
    let stream = key("consume");
    let publisher = RedisPublisher::connect(RedisConfig::new(url())).await.unwrap();
    let sent = events(&stream);
    for chunk in sent.chunks(1000) {
        for r in publisher.publish_batch(chunk.to_vec()).await.unwrap() {
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

async fn consume_raw(stream: &str, round: usize) -> f64 {
    let group = format!("raw{round}");
    create_group(stream, &group).await;
    let mut conn = raw_conn().await;
    let start = Clock::start();
    let mut got = 0;
    while got < N {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&group)
            .arg("c")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(&group);
        let mut n = 0;
        for key in &reply.keys {
            for entry in &key.ids {
                // Touch the payload as a handler would.
                std::hint::black_box(entry.map.get("data"));
                ack.arg(&entry.id);
                n += 1;
            }
        }
        if n > 0 {
            let _: i64 = ack.query_async(&mut conn).await.unwrap();
        }
        got += n;
    }
    start.rate()
}

async fn consume_watchtower(stream: &str, round: usize, concurrency: Option<usize>) -> f64 {
    let group = format!("wt{round}_{}", concurrency.unwrap_or(0));
    create_group(stream, &group).await;
    let subscriber = RedisSubscriber::builder(RedisConfig::new(url()))
        .batch_size(256)
        .connect()
        .await
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
        if only != "consume" {
            let (mut raw, mut pipe, mut wt, mut wtbp, mut bare, mut pipe64) = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            // `REDIS_BENCH_CASE` runs one publish case only, to profile it.
            let case = std::env::var("REDIS_BENCH_CASE").ok();
            if let Some(case) = case {
                for _ in 0..rounds {
                    let rate = match case.as_str() {
                        "raw" => publish_raw_pipelined().await,
                        "stack" => publish_watchtower(false).await,
                        "four" => publish_watchtower(true).await,
                        _ => publish_bare().await,
                    };
                    println!("{case}: {rate:.0} events/s");
                }
                return;
            }
            for _ in 0..rounds {
                pipe.push(sample(publish_raw_pipelined()).await);
                wt.push(sample(publish_watchtower(false)).await);
                raw.push(sample(publish_raw()).await);
                wtbp.push(sample(publish_watchtower(true)).await);
                bare.push(sample(publish_bare()).await);
                pipe64.push(sample(publish_raw_pipelines(callers().div_ceil(2), 2)).await);
            }
            let callers = callers();
            println!("publish, {callers} concurrent callers:");
            row("raw XADD, concurrent on one multiplexed connection", &raw);
            row("raw XADD, explicit pipelines of 64 (4 in flight)", &pipe);
            row(
                &format!(
                    "raw XADD, pipelines of {}, 2 in flight ({callers} outstanding)",
                    callers.div_ceil(2)
                ),
                &pipe64,
            );
            row("watchtower dead letter + retry + breaker + publisher", &wt);
            row("watchtower the same + backpressure (four layers)", &wtbp);
            row("watchtower publisher alone", &bare);
            println!("publish ratios:");
            ratio_row("dead letter + retry + breaker", &wt, "raw pipelines of 64", &pipe);
            ratio_row(
                "four layers (+ backpressure)",
                &wtbp,
                "raw pipelines of 64",
                &pipe,
            );
            ratio_row("publisher alone", &bare, "raw pipelines of 64", &pipe);
            ratio_row(
                "dead letter + retry + breaker",
                &wt,
                "raw, as many outstanding",
                &pipe64,
            );
            ratio_row("dead letter + retry + breaker", &wt, "raw concurrent XADD", &raw);
        }
        if only != "publish" {
            let stream = filled_stream().await;
            let (mut craw, mut cdef, mut ctuned) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                craw.push(sample(consume_raw(&stream, round)).await);
                cdef.push(sample(consume_watchtower(&stream, round, None)).await);
                ctuned.push(sample(consume_watchtower(&stream, round, Some(256))).await);
            }
            del(&stream).await;
            println!("consume:");
            row("raw XREADGROUP COUNT 256 + XACK per batch", &craw);
            row("watchtower serve, default concurrency (64)", &cdef);
            row("watchtower serve, concurrency 256", &ctuned);
            println!("consume ratios:");
            ratio_row("serve, default concurrency", &cdef, "raw", &craw);
            ratio_row("serve, concurrency 256", &ctuned, "raw", &craw);
        }
    });
}
