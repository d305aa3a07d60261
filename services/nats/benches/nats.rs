//! WatchTower over NATS against raw async-nats, in the same run, against the
//! local broker (127.0.0.1:4222).
//!
//! Run with `cargo bench -p watchtower-nats`. Each case runs raw and
//! through WatchTower alternately (raw, ours, raw, ours, ...),
//! `NATS_BENCH_ROUNDS` times (default 7), so that both see the same load
//! on a shared machine. Each round gives a ratio, WatchTower's throughput
//! over raw's; the report shows the median ratio and its range over the
//! rounds, and the median throughput of each side. It also shows the CPU
//! time the process spent per message on each side (all its threads, from
//! `/proc/self/task/*/schedstat`), which load from other programs on the
//! machine disturbs much less than throughput.
//!
//! * core publish: raw `publish_with_headers` of the same binary-mode
//!   CloudEvent (ce- headers built per message) vs. the full four-layer
//!   stack (dead letter, retry, circuit breaker, backpressure) over
//!   `NatsPublisher`; both end with a flush, so every byte reached the
//!   server;
//! * JetStream publish: 256 publishes awaiting their PubAck at once, raw
//!   (`send_publish` + ack futures) vs. the same stack over
//!   `JetStreamPublisher`;
//! * round trip: events published on core NATS and received by a raw
//!   subscriber loop vs. by `watchtower::serve` (decoding each event and
//!   calling a handler service).
//!
//! Environment: `NATS_BENCH_CORE`, `NATS_BENCH_JS`, `NATS_BENCH_RT` set the
//! events per side and round (200,000, 60,000, 150,000);
//! `NATS_BENCH_ONLY=core|js|rt` runs one case; `NATS_BENCH_BARE=1` adds
//! rounds of the publishers without layers; `NATS_BENCH_PROFILE=<side>`
//! (`core_raw`, `core_stack`, `core_bare`, `js_raw`, `js_stack`, `js_bare`,
//! `rt_raw`, `rt_serve`) runs one side alone, for a profiler.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::{Service, ServiceBuilder, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Event, SubscribeOptions, Subscriber};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
use watchtower_layers::retry::RetryConfig;
use watchtower_nats::jetstream::{StorageType, StreamConfig};
use watchtower_nats::{JetStreamPublisher, NatsClient, NatsConfig, NatsPublisher, NatsSubscriber};

const WINDOW: usize = 256;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload() -> Bytes {
    Bytes::from_static(br#"{"user_id":123,"name":"benchmark","tags":["a","b","c"],"amount":42.5}"#)
}

/// The binary-mode CloudEvent headers a hand-written client would set.
fn raw_headers(ty: &str, msg_id: bool) -> HeaderMap {
    let id = uuid::Uuid::now_v7().to_string();
    let time = watchtower::codec::format_time(time::OffsetDateTime::now_utc());
    let mut h = HeaderMap::new();
    h.insert(
        HeaderName::from_static("ce-specversion"),
        HeaderValue::from("1.0"),
    );
    h.insert(HeaderName::from_static("ce-type"), HeaderValue::from(ty));
    h.insert(HeaderName::from_static("ce-source"), HeaderValue::from("/bench"));
    h.insert(
        HeaderName::from_static("ce-time"),
        HeaderValue::from(time.as_str()),
    );
    h.insert(
        HeaderName::from_static("ce-datacontenttype"),
        HeaderValue::from("application/json"),
    );
    if msg_id {
        h.insert(
            HeaderName::from_static("Nats-Msg-Id"),
            HeaderValue::from(id.as_str()),
        );
    }
    h.insert(HeaderName::from_static("ce-id"), HeaderValue::from(id));
    h
}

fn event(ty: &str) -> Event {
    Event::builder(ty)
        .source("/bench")
        .data("application/json", payload())
        .build()
        .unwrap()
}

fn stack<S>(inner: S) -> impl Service<Event, Error = watchtower::Error, Future: Send> + Send
where
    S: Service<Event, Response = watchtower::Receipt, Error = watchtower::Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .dead_letter(MemoryDeadLetters::new(100_000))
        .retries(RetryConfig::new())
        .circuit_breaker(CircuitBreakerConfig::new().name("bench"))
        .backpressure(BackpressureLayer::new(1024, Overflow::Block).concurrency(WINDOW))
        .service(inner)
}

/// Calls `svc` for each event with up to `WINDOW` calls in flight,
/// keeping the in-flight calls moving while waiting for readiness.
async fn drive<S>(mut svc: S, events: impl Iterator<Item = Event>)
where
    S: Service<Event>,
    S::Error: std::fmt::Debug,
{
    let mut in_flight = FuturesUnordered::<S::Future>::new();
    for event in events {
        if in_flight.len() >= WINDOW {
            in_flight.next().await.unwrap().unwrap();
        }
        std::future::poll_fn(|cx| {
            while let std::task::Poll::Ready(Some(r)) = in_flight.poll_next_unpin(cx) {
                r.unwrap();
            }
            svc.poll_ready(cx)
        })
        .await
        .unwrap();
        in_flight.push(svc.call(event));
    }
    while let Some(r) = in_flight.next().await {
        r.unwrap();
    }
}

async fn core_raw(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let raw = client.raw();
    let start = Instant::now();
    for _ in 0..n {
        raw.publish_with_headers(subject.to_owned(), raw_headers(subject, false), payload())
            .await
            .unwrap();
    }
    raw.flush().await.unwrap();
    start.elapsed()
}

async fn core_stack(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let svc = stack(NatsPublisher::new(client.clone()));
    let start = Instant::now();
    drive(svc, (0..n).map(|_| event(subject))).await;
    client.raw().flush().await.unwrap();
    start.elapsed()
}

async fn core_bare(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let svc = NatsPublisher::new(client.clone());
    let start = Instant::now();
    drive(svc, (0..n).map(|_| event(subject))).await;
    client.raw().flush().await.unwrap();
    start.elapsed()
}

async fn js_bare(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let svc = JetStreamPublisher::new(client.clone()).max_in_flight(WINDOW);
    let start = Instant::now();
    drive(svc, (0..n).map(|_| event(subject))).await;
    start.elapsed()
}

async fn js_raw(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let js = client.jetstream();
    let start = Instant::now();
    let mut acks = FuturesUnordered::<
        std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            async_nats::jetstream::publish::PublishAck,
                            async_nats::jetstream::context::PublishError,
                        >,
                    > + Send,
            >,
        >,
    >::new();
    for _ in 0..n {
        if acks.len() >= WINDOW {
            acks.next().await.unwrap().unwrap();
        }
        let message = PublishMessage::build()
            .headers(raw_headers(subject, true))
            .payload(payload());
        let ack = js.send_publish(subject.to_owned(), message).await.unwrap();
        acks.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    start.elapsed()
}

async fn js_stack(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let svc = stack(JetStreamPublisher::new(client.clone()).max_in_flight(WINDOW));
    let start = Instant::now();
    drive(svc, (0..n).map(|_| event(subject))).await;
    start.elapsed()
}

async fn publish_raw_events(client: NatsClient, subject: String, n: usize) {
    let raw = client.raw();
    for _ in 0..n {
        raw.publish_with_headers(subject.clone(), raw_headers(&subject, false), payload())
            .await
            .unwrap();
    }
    raw.flush().await.unwrap();
}

async fn rt_raw(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let mut sub = client.raw().subscribe(subject.to_owned()).await.unwrap();
    client.raw().flush().await.unwrap();
    let start = Instant::now();
    let publisher = tokio::spawn(publish_raw_events(client.clone(), subject.to_owned(), n));
    let mut got = 0;
    while got < n {
        let message = sub.next().await.unwrap();
        std::hint::black_box(&message);
        got += 1;
    }
    let elapsed = start.elapsed();
    publisher.await.unwrap();
    elapsed
}

async fn rt_serve(client: &NatsClient, subject: &str, n: usize) -> Duration {
    let sub = NatsSubscriber::new(client.clone())
        .open(SubscribeOptions::new([subject]).unwrap())
        .await
        .unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (seen, done) = (seen.clone(), done.clone());
        service_fn(move |event: Event| {
            std::hint::black_box(&event);
            if seen.fetch_add(1, Ordering::Relaxed) + 1 == n {
                done.notify_one();
            }
            std::future::ready(Ok::<_, watchtower::Error>(()))
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        watchtower::serve(sub, handler)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let start = Instant::now();
    let publisher = tokio::spawn(publish_raw_events(client.clone(), subject.to_owned(), n));
    done.notified().await;
    let elapsed = start.elapsed();
    publisher.await.unwrap();
    let _ = stop.send(());
    let stats = server.await.unwrap().unwrap();
    assert_eq!(stats.acked as usize, n);
    elapsed
}

/// CPU time this process has used so far, all threads, in nanoseconds.
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs one side of a round: its wall time and the CPU time it used.
async fn measured(side: impl std::future::Future<Output = Duration>) -> (Duration, u64) {
    let before = cpu_ns();
    let wall = side.await;
    (wall, cpu_ns().saturating_sub(before))
}

/// Throughputs of alternating rounds of one case.
#[derive(Default)]
struct Rounds {
    raw: Vec<f64>,
    ours: Vec<f64>,
    raw_cpu: Vec<f64>,
    ours_cpu: Vec<f64>,
}

impl Rounds {
    fn push(&mut self, n: usize, raw: (Duration, u64), ours: (Duration, u64)) {
        self.raw.push(n as f64 / raw.0.as_secs_f64());
        self.ours.push(n as f64 / ours.0.as_secs_f64());
        self.raw_cpu.push(raw.1 as f64 / n as f64 / 1000.0);
        self.ours_cpu.push(ours.1 as f64 / n as f64 / 1000.0);
    }

    fn report(&self, name: &str) {
        fn median(mut v: Vec<f64>) -> f64 {
            v.sort_by(f64::total_cmp);
            let mid = v.len() / 2;
            if v.len() % 2 == 1 {
                v[mid]
            } else {
                (v[mid - 1] + v[mid]) / 2.0
            }
        }
        let ratios: Vec<f64> = self.raw.iter().zip(&self.ours).map(|(r, o)| o / r).collect();
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{name:<36} raw {:>9.0} msg/s   watchtower {:>9.0} msg/s   ratio {:.2} ({lo:.2} - {hi:.2}) [{}]",
            median(self.raw.clone()),
            median(self.ours.clone()),
            median(ratios),
            each.join(" "),
        );
        let cpu: Vec<f64> = self
            .ours_cpu
            .iter()
            .zip(&self.raw_cpu)
            .map(|(o, r)| o / r)
            .collect();
        println!(
            "{:<36} cpu {:>7.2} us/msg   watchtower {:>7.2} us/msg   ratio {:.2} (watchtower / raw)",
            "",
            median(self.raw_cpu.clone()),
            median(self.ours_cpu.clone()),
            median(cpu),
        );
    }
}

async fn run() {
    let config = NatsConfig::new("nats://127.0.0.1:4222")
        .name("watchtower-nats-bench")
        .subscription_capacity(1 << 20)
        .client_capacity(8192);
    let client = NatsClient::connect(config).await.expect("the local NATS broker");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let n_core = count("NATS_BENCH_CORE", 200_000);
    let n_js = count("NATS_BENCH_JS", 60_000);
    let n_rt = count("NATS_BENCH_RT", 150_000);

    let rounds = count("NATS_BENCH_ROUNDS", 7);
    // One side of one case alone, for a profiler.
    if let Ok(side) = std::env::var("NATS_BENCH_PROFILE") {
        profile(&client, &tag, &side, rounds, (n_core, n_js, n_rt)).await;
        return;
    }
    let only = std::env::var("NATS_BENCH_ONLY").unwrap_or_default();
    let runs = |case: &str| only.is_empty() || only == case;

    // Warm up connections, allocators and the server.
    core_raw(&client, &format!("bench.{tag}.warm"), 10_000).await;
    core_stack(&client, &format!("bench.{tag}.warm"), 10_000).await;

    let subject = format!("bench.{tag}.core");
    if runs("core") {
        let bare = std::env::var("NATS_BENCH_BARE").is_ok();
        let (mut stacked, mut alone) = (Rounds::default(), Rounds::default());
        for _ in 0..rounds {
            let raw = measured(core_raw(&client, &subject, n_core)).await;
            let ours = measured(core_stack(&client, &subject, n_core)).await;
            stacked.push(n_core, raw, ours);
            if bare {
                let raw = measured(core_raw(&client, &subject, n_core)).await;
                let ours = measured(core_bare(&client, &subject, n_core)).await;
                alone.push(n_core, raw, ours);
            }
        }
        stacked.report("core publish (4-layer stack)");
        if bare {
            alone.report("core publish (publisher alone)");
        }
    }

    if runs("js") {
        let stream = format!("BENCH_{tag}");
        client
            .create_or_update_stream(StreamConfig {
                name: stream.clone(),
                subjects: vec![format!("{stream}.>")],
                storage: StorageType::Memory,
                max_messages: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let subject = format!("{stream}.js");
        js_raw(&client, &subject, 2_000).await;
        js_stack(&client, &subject, 2_000).await;
        let bare = std::env::var("NATS_BENCH_BARE").is_ok();
        let (mut stacked, mut alone) = (Rounds::default(), Rounds::default());
        for _ in 0..rounds {
            let raw = measured(js_raw(&client, &subject, n_js)).await;
            let ours = measured(js_stack(&client, &subject, n_js)).await;
            stacked.push(n_js, raw, ours);
            if bare {
                let raw = measured(js_raw(&client, &subject, n_js)).await;
                let ours = measured(js_bare(&client, &subject, n_js)).await;
                alone.push(n_js, raw, ours);
            }
        }
        stacked.report("JetStream publish (256 in flight)");
        if bare {
            alone.report("JetStream publish (publisher alone)");
        }
        client.delete_stream(&stream).await.unwrap();
    }

    if runs("rt") {
        let mut rt = Rounds::default();
        for round in 0..rounds {
            let raw = measured(rt_raw(&client, &format!("bench.{tag}.rt{round}r"), n_rt)).await;
            let ours = measured(rt_serve(&client, &format!("bench.{tag}.rt{round}s"), n_rt)).await;
            rt.push(n_rt, raw, ours);
        }
        rt.report("round trip (consumer runtime)");
    }
}

async fn profile(client: &NatsClient, tag: &str, side: &str, rounds: usize, n: (usize, usize, usize)) {
    let stream = format!("BENCH_{tag}");
    if side.starts_with("js") {
        client
            .create_or_update_stream(StreamConfig {
                name: stream.clone(),
                subjects: vec![format!("{stream}.>")],
                storage: StorageType::Memory,
                max_messages: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let core = format!("bench.{tag}.core");
    let js = format!("{stream}.js");
    for round in 0..rounds {
        let rt = format!("bench.{tag}.rt{round}");
        let (wall, cpu) = match side {
            "core_raw" => measured(core_raw(client, &core, n.0)).await,
            "core_stack" => measured(core_stack(client, &core, n.0)).await,
            "core_bare" => measured(core_bare(client, &core, n.0)).await,
            "js_raw" => measured(js_raw(client, &js, n.1)).await,
            "js_stack" => measured(js_stack(client, &js, n.1)).await,
            "js_bare" => measured(js_bare(client, &js, n.1)).await,
            "rt_raw" => measured(rt_raw(client, &rt, n.2)).await,
            "rt_serve" => measured(rt_serve(client, &rt, n.2)).await,
            other => panic!("unknown side {other}"),
        };
        let n = match &side[..2] {
            "co" => n.0,
            "js" => n.1,
            _ => n.2,
        };
        println!(
            "{side}: {:.0} msg/s, {:.2} us CPU/msg",
            n as f64 / wall.as_secs_f64(),
            cpu as f64 / n as f64 / 1000.0
        );
    }
    if side.starts_with("js") {
        client.delete_stream(&stream).await.unwrap();
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}
