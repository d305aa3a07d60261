//! WatchTower over NATS against raw async-nats, in the same run, against the
//! local broker (127.0.0.1:4222), case for case with the shared baseline
//! harness (`raw-bench --case nats-core-pub | nats-js-pub |
//! nats-core-roundtrip`).
//!
//! Run with `cargo bench -p watchtower-nats`. Every round runs each side of
//! a case once, raw first, so that all sides see the same load on a shared
//! machine; each side's throughput is reported as a ratio to raw's in the
//! same round (the median over rounds, and every round's ratio). The CPU
//! time the process spent per message over the timed section (all its
//! threads, from `/proc/self/task/*/schedstat`) is shown beside it: load
//! from other programs disturbs it much less than throughput; so is the
//! broker's (`srv us`: the `nats-server` started with `-p 4222`, when its
//! `/proc` entry is readable).
//!
//! The raw side is what the harness's raw client does: a pre-built
//! ~195-byte CloudEvents JSON body per message, no header. WatchTower's
//! sides get events built before the clock starts as well (as raw gets its
//! bodies), so what is timed is encoding and sending.
//!
//! * core publish: raw `publish` of the body; raw with one `content-type`
//!   header and with eight `ce-` headers built per message (what a header
//!   block costs the client alone); `NatsPublisher` alone and under the
//!   four-layer stack (dead letter, retry, circuit breaker, backpressure
//!   with [`direct`](BackpressureLayer::direct) on, and once with it off:
//!   every event through the layer's worker task), in structured and in
//!   binary mode, each publish awaited before the next (as raw does).
//!   Every side ends with a flush.
//! * JetStream publish: 1,024 acknowledgements in flight, as the harness;
//!   raw without header, raw with `Nats-Msg-Id` only, raw with the `ce-`
//!   block and `Nats-Msg-Id`; `JetStreamPublisher` alone and stacked, both
//!   modes. A file stream, as the harness.
//! * round trip: a publisher connection and a subscriber connection (its
//!   buffer `count + 1024`, as the harness); raw publish into a raw
//!   subscriber loop vs. `NatsPublisher` into `watchtower::serve` with a
//!   handler service, both modes. Throughput from the first publish to the
//!   last handled message, and the latency of each message from its
//!   publish call to its handler (p50, p99).
//! * JetStream consume: a memory stream holding `count` messages, read
//!   through a new pull consumer (batches of 200) and each message
//!   acknowledged: raw async-nats's pull stream, acking each message as it
//!   comes (messages stored without a header, and with `Nats-Msg-Id`),
//!   against `JetStreamSubscriber` under `watchtower::serve` with a handler
//!   service (structured events stored by `JetStreamPublisher`, which
//!   carry `Nats-Msg-Id`).
//!   Throughput from opening the consumer to the last message handled.
//! * encode: the cost of the wire format alone, in process: structured
//!   `to_bytes`, and async-nats header maps of one and eight entries built
//!   per message.
//!
//! Environment: `NATS_BENCH_COUNT` events per side and round (50,000, the
//! harness's count), `NATS_BENCH_ROUNDS` (3), `NATS_BENCH_ONLY=core|js|jsc|rt|encode`
//! runs one case, `NATS_BENCH_RT_MODE=structured|binary|raw` one side of the
//! round trip beside raw's.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use async_nats::{HeaderMap, HeaderName};
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
use watchtower_nats::{ContentMode, NatsClient, NatsConfig, StorageType, StreamConfig};

/// Acknowledgements in flight on JetStream, and calls in flight through the
/// stack: the harness's window.
const WINDOW: usize = 1024;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The harness's bodies: CloudEvents-style JSON, ~195 bytes, one per message.
fn bodies(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let body = serde_json::json!({
                "specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "bench",
                "type": "user.created", "time": "2025-01-01T00:00:00Z",
                "datacontenttype": "application/json", "data": {"user_id": i},
            });
            Bytes::from(serde_json::to_vec(&body).unwrap())
        })
        .collect()
}

/// The same events as WatchTower events (the same size on the wire in
/// structured mode).
fn events(subject: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::builder(subject)
                .source("bench")
                .json(&serde_json::json!({"user_id": i}))
                .unwrap()
                .build()
                .unwrap()
        })
        .collect()
}

const CE_NAMES: [HeaderName; 7] = [
    HeaderName::from_static("ce-specversion"),
    HeaderName::from_static("ce-id"),
    HeaderName::from_static("ce-type"),
    HeaderName::from_static("ce-source"),
    HeaderName::from_static("ce-time"),
    HeaderName::from_static("ce-subject"),
    HeaderName::from_static("ce-tenant"),
];
const CONTENT_TYPE: HeaderName = HeaderName::from_static("content-type");
const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");

/// Eight headers, as the harness's `nats-core-pub8hdr`, names pre-built.
fn ce_headers(i: usize) -> HeaderMap {
    let values = [
        "1.0",
        &format!("id-{i}"),
        "user.created",
        "/bench",
        "2025-01-01T00:00:00Z",
        "s",
        "acme",
    ];
    let mut h = HeaderMap::new();
    for (name, value) in CE_NAMES.iter().zip(values) {
        h.insert(name.clone(), value);
    }
    h.insert(CONTENT_TYPE, "application/json");
    h
}

fn one_header() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, "application/cloudevents+json");
    h
}

/// The four layers over `inner`; `direct`: the backpressure layer lets an
/// uncongested caller call the publisher itself (its documented setting for
/// services that hand their work to a connection task, as the publishers
/// do) instead of handing every event to its worker task and back.
fn stack<S>(inner: S, direct: bool) -> impl Service<Event, Error = watchtower::Error, Future: Send> + Send
where
    S: Service<Event, Response = watchtower::Receipt, Error = watchtower::Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .dead_letter(MemoryDeadLetters::new(100_000))
        .retries(RetryConfig::new())
        .circuit_breaker(CircuitBreakerConfig::new().name("bench"))
        .backpressure(
            BackpressureLayer::new(WINDOW, Overflow::Block)
                .concurrency(WINDOW)
                .direct(direct),
        )
        .service(inner)
}

/// Calls `svc` for each event with up to `WINDOW` calls in flight, keeping
/// the in-flight calls moving while waiting for readiness.
async fn drive<S>(mut svc: S, events: Vec<Event>)
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

// ------------------------------------------------------------ core publish

#[derive(Clone, Copy)]
enum Headers {
    None,
    One,
    Eight,
}

async fn core_raw(client: &NatsClient, subject: &str, n: usize, headers: Headers) -> Timed {
    let raw = client.raw();
    let bodies = bodies(n);
    let start = Clock::start();
    for (i, body) in bodies.iter().enumerate() {
        match headers {
            Headers::None => raw.publish(subject.to_owned(), body.clone()).await,
            Headers::One => {
                raw.publish_with_headers(subject.to_owned(), one_header(), body.clone())
                    .await
            }
            Headers::Eight => {
                raw.publish_with_headers(subject.to_owned(), ce_headers(i), body.clone())
                    .await
            }
        }
        .unwrap();
    }
    raw.flush().await.unwrap();
    start.stop()
}

async fn core_ours(
    client: &NatsClient,
    subject: &str,
    n: usize,
    mode: ContentMode,
    layered: Option<bool>,
) -> Timed {
    let events = events(subject, n);
    let publisher = client.publisher().content_mode(mode);
    let start = Clock::start();
    match layered {
        Some(direct) => one_by_one(stack(publisher, direct), events).await,
        None => one_by_one(publisher, events).await,
    }
    client.raw().flush().await.unwrap();
    start.stop()
}

/// Publishes each event and awaits it before the next, as raw awaits each
/// `publish`.
async fn one_by_one<S>(mut svc: S, events: Vec<Event>)
where
    S: Service<Event>,
    S::Error: std::fmt::Debug,
{
    for event in events {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        svc.call(event).await.unwrap();
    }
}

// --------------------------------------------------------------- JetStream

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    async_nats::jetstream::publish::PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

async fn js_raw(client: &NatsClient, subject: &str, n: usize, headers: Headers) -> Timed {
    let js = client.raw_jetstream();
    let bodies = bodies(n);
    let start = Clock::start();
    let mut acks = FuturesUnordered::<AckFuture>::new();
    for (i, body) in bodies.iter().enumerate() {
        if acks.len() >= WINDOW {
            acks.next().await.unwrap().unwrap();
        }
        let ack = match headers {
            Headers::None => js.publish(subject.to_owned(), body.clone()).await,
            Headers::One => {
                let mut h = HeaderMap::new();
                h.insert(MSG_ID, uuid::Uuid::now_v7().to_string());
                let message = PublishMessage::build().headers(h).payload(body.clone());
                js.send_publish(subject.to_owned(), message).await
            }
            Headers::Eight => {
                let mut h = ce_headers(i);
                h.insert(MSG_ID, uuid::Uuid::now_v7().to_string());
                let message = PublishMessage::build().headers(h).payload(body.clone());
                js.send_publish(subject.to_owned(), message).await
            }
        }
        .unwrap();
        acks.push(Box::pin(std::future::IntoFuture::into_future(ack)));
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    start.stop()
}

async fn js_ours(
    client: &NatsClient,
    subject: &str,
    n: usize,
    (mode, deduplicate): (ContentMode, bool),
    layered: Option<bool>,
) -> Timed {
    let events = events(subject, n);
    let publisher = client
        .jetstream_publisher()
        .content_mode(mode)
        .deduplicate(deduplicate)
        .max_in_flight(WINDOW);
    let start = Clock::start();
    match layered {
        Some(direct) => drive(stack(publisher, direct), events).await,
        None => drive(publisher, events).await,
    }
    start.stop()
}

// -------------------------------------------------------------- round trip

/// Latencies in microseconds, one slot per message.
struct Latencies {
    sent: Vec<AtomicU64>,
    took: Vec<AtomicU64>,
    base: Instant,
}

impl Latencies {
    fn new(n: usize) -> Arc<Latencies> {
        Arc::new(Latencies {
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            took: (0..n).map(|_| AtomicU64::new(0)).collect(),
            base: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn sent(&self, i: usize) {
        self.sent[i].store(self.now(), Ordering::Release);
    }

    fn received(&self, i: usize) {
        let at = self.now().saturating_sub(self.sent[i].load(Ordering::Acquire));
        self.took[i].store(at / 1000, Ordering::Relaxed);
    }

    /// p50 and p99 in microseconds.
    fn quantiles(&self) -> (u64, u64) {
        let mut v: Vec<u64> = self.took.iter().map(|t| t.load(Ordering::Relaxed)).collect();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        (at(0.50), at(0.99))
    }
}

async fn subscriber_client(n: usize) -> NatsClient {
    NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222").subscription_capacity(n + 1024))
        .await
        .unwrap()
}

/// Raw: a subscriber loop on one connection, `publish` on another.
async fn rt_raw(publisher: &NatsClient, subject: &str, n: usize) -> (Timed, (u64, u64)) {
    let sc = subscriber_client(n).await;
    let mut sub = sc.raw().subscribe(subject.to_owned()).await.unwrap();
    sc.raw().flush().await.unwrap();
    let bodies = bodies(n);
    let lat = Latencies::new(n);
    let rx = {
        let lat = lat.clone();
        tokio::spawn(async move {
            for i in 0..n {
                std::hint::black_box(sub.next().await.unwrap());
                lat.received(i);
            }
        })
    };
    let start = Clock::start();
    let raw = publisher.raw();
    for (i, body) in bodies.into_iter().enumerate() {
        lat.sent(i);
        raw.publish(subject.to_owned(), body).await.unwrap();
    }
    raw.flush().await.unwrap();
    rx.await.unwrap();
    (start.stop(), lat.quantiles())
}

/// WatchTower: `NatsPublisher` in `mode` (or, with `None`, the raw client
/// publishing the harness's JSON bodies) on one connection, `serve` with a
/// handler service on another.
async fn rt_ours(
    publisher: &NatsClient,
    subject: &str,
    n: usize,
    mode: Option<ContentMode>,
) -> (Timed, (u64, u64)) {
    let sc = subscriber_client(n).await;
    let sub = sc
        .subscriber()
        .open(SubscribeOptions::new([subject]).unwrap())
        .await
        .unwrap();
    let events = events(subject, n);
    let lat = Latencies::new(n);
    let seen = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (seen, done, lat) = (seen.clone(), done.clone(), lat.clone());
        service_fn(move |event: Event| {
            std::hint::black_box(&event);
            // One publisher, one subject: the i-th handled is the i-th sent.
            let i = seen.fetch_add(1, Ordering::Relaxed);
            lat.received(i);
            if i + 1 == n {
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
    let start: Clock;
    match mode {
        Some(mode) => {
            let mut svc = publisher.publisher().content_mode(mode);
            start = Clock::start();
            for (i, event) in events.into_iter().enumerate() {
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
                lat.sent(i);
                svc.call(event).await.unwrap();
            }
        }
        None => {
            let raw = publisher.raw();
            let bodies = bodies(n);
            start = Clock::start();
            for (i, body) in bodies.into_iter().enumerate() {
                lat.sent(i);
                raw.publish(subject.to_owned(), body).await.unwrap();
            }
        }
    }
    publisher.raw().flush().await.unwrap();
    done.notified().await;
    let elapsed = start.stop();
    let _ = stop.send(());
    let stats = server.await.unwrap().unwrap();
    assert_eq!(stats.acked as usize, n);
    (elapsed, lat.quantiles())
}

// ------------------------------------------------------- JetStream consume

/// A memory stream `name` holding `n` messages on `name.c`: the harness's
/// bodies (`raw`, with `headers`) or structured events through the
/// publisher.
async fn filled_stream(client: &NatsClient, name: &str, n: usize, raw: Option<Headers>) {
    client
        .create_or_update_stream(StreamConfig {
            name: name.to_owned(),
            subjects: vec![format!("{name}.>")],
            storage: StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    let subject = format!("{name}.c");
    if let Some(headers) = raw {
        js_raw(client, &subject, n, headers).await;
    } else {
        js_ours(client, &subject, n, (ContentMode::Structured, true), None).await;
    }
}

fn pull_config() -> async_nats::jetstream::consumer::pull::Config {
    async_nats::jetstream::consumer::pull::Config {
        deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        max_ack_pending: 1000,
        ..Default::default()
    }
}

/// Raw: async-nats's pull stream, each message acknowledged as it comes.
async fn jsc_raw(client: &NatsClient, name: &str, n: usize) -> Timed {
    let js = client.raw_jetstream();
    let start = Clock::start();
    let consumer = js.create_consumer_on_stream(pull_config(), name).await.unwrap();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(200)
        .messages()
        .await
        .unwrap();
    for _ in 0..n {
        let message = messages.next().await.unwrap().unwrap();
        std::hint::black_box(&message.payload);
        message.ack().await.unwrap();
    }
    start.stop()
}

/// WatchTower: `JetStreamSubscriber` under `serve`, a handler service.
async fn jsc_ours(client: &NatsClient, name: &str, n: usize) -> Timed {
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
    let start = Clock::start();
    let sub = client
        .jetstream_subscriber(name)
        .settings(watchtower_nats::ConsumerSettings::new().max_ack_pending(1000))
        .open(SubscribeOptions::new([format!("{name}.>")]).unwrap().replay(true))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        watchtower::serve(sub, handler)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    done.notified().await;
    let elapsed = start.stop();
    let _ = stop.send(());
    let stats = server.await.unwrap().unwrap();
    assert_eq!(stats.acked as usize, n);
    elapsed
}

// ------------------------------------------------------------------ encode

/// CPU nanoseconds per iteration of `f`, best of three runs of `n`.
fn cpu_per(n: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..3)
        .map(|_| {
            let before = cpu_ns();
            for i in 0..n {
                f(i);
            }
            cpu_ns().saturating_sub(before) as f64 / n as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn encode_costs(n: usize) {
    let events = events("user.created", n);
    let to_bytes = cpu_per(n, |i| {
        std::hint::black_box(watchtower::codec::structured::to_bytes(&events[i]).unwrap());
    });
    let to_vec = cpu_per(n, |i| {
        std::hint::black_box(watchtower::codec::structured::to_vec(&events[i]).unwrap());
    });
    let time = cpu_per(n, |i| {
        std::hint::black_box(watchtower::codec::format_time(events[i].time().unwrap()));
    });
    let bodies: Vec<Bytes> = events
        .iter()
        .map(|e| watchtower::codec::structured::to_bytes(e).unwrap())
        .collect();
    let decode = cpu_per(n, |i| {
        std::hint::black_box(watchtower::codec::structured::from_bytes(&bodies[i]).unwrap());
    });
    let one = cpu_per(n, |_| {
        std::hint::black_box(one_header());
    });
    let eight = cpu_per(n, |i| {
        std::hint::black_box(ce_headers(i));
    });
    let template = ce_headers(0);
    let cloned = cpu_per(n, |_| {
        std::hint::black_box(template.clone());
    });
    println!(
        "encode, CPU ns/event: structured to_bytes {to_bytes:.0} (to_vec {to_vec:.0}, of which format_time {time:.0}), from_bytes {decode:.0}; header map of 1 entry {one:.0}, of 8 entries {eight:.0} ({:.0}/header), clone of 8 {cloned:.0}",
        eight / 8.0
    );
}

// ------------------------------------------------------------- reporting

/// CPU time this process has used so far, all threads, in nanoseconds.
fn cpu_ns() -> u64 {
    process_cpu_ns("self").unwrap_or(0)
}

/// CPU time process `pid` has used so far, all threads, in nanoseconds.
fn process_cpu_ns(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
            .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// The local broker's process (the `nats-server` listening on port 4222),
/// when its `/proc` entry is readable.
fn server_pid() -> Option<&'static str> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PID.get_or_init(|| {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid = e.file_name().into_string().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_server = args.first()?.ends_with(b"nats-server");
            let on_4222 = args.windows(2).any(|w| w[0] == b"-p" && w[1] == b"4222");
            (is_server && on_4222).then_some(pid)
        })
    })
    .as_deref()
}

fn server_cpu_ns() -> Option<u64> {
    process_cpu_ns(server_pid()?)
}

/// One side of one round: throughput, CPU µs per message, latency.
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    cpu_us: f64,
    /// The broker's CPU µs per message, when it runs on this machine.
    server_us: Option<f64>,
    latency: Option<(u64, u64)>,
}

async fn measure<F>(n: usize, side: F) -> Sample
where
    F: std::future::Future<Output = (Timed, Option<(u64, u64)>)>,
{
    let (timed, latency) = side.await;
    let per_message = |ns: u64| ns as f64 / n as f64 / 1000.0;
    Sample {
        rate: n as f64 / timed.wall.as_secs_f64(),
        cpu_us: per_message(timed.cpu_ns),
        server_us: timed.server_ns.map(per_message),
        latency,
    }
}

/// The start of a timed section: wall clock, this process's CPU time and
/// the broker's.
struct Clock {
    wall: Instant,
    cpu_ns: u64,
    server_ns: Option<u64>,
}

/// What a timed section took.
struct Timed {
    wall: Duration,
    cpu_ns: u64,
    server_ns: Option<u64>,
}

impl Clock {
    fn start() -> Clock {
        // Reading `/proc` allocates: before the clock starts.
        let (cpu_ns, server_ns) = (cpu_ns(), server_cpu_ns());
        Clock {
            wall: Instant::now(),
            cpu_ns,
            server_ns,
        }
    }

    fn stop(&self) -> Timed {
        // The clock stops before `/proc` is read.
        let wall = self.wall.elapsed();
        Timed {
            wall,
            cpu_ns: cpu_ns().saturating_sub(self.cpu_ns),
            server_ns: self
                .server_ns
                .zip(server_cpu_ns())
                .map(|(before, after)| after.saturating_sub(before)),
        }
    }
}

/// The rounds of one case: per side, one sample per round; side 0 is raw.
struct Case {
    name: &'static str,
    sides: Vec<(&'static str, Vec<Sample>)>,
}

impl Case {
    fn new(name: &'static str, sides: &[&'static str]) -> Case {
        Case {
            name,
            sides: sides.iter().map(|s| (*s, Vec::new())).collect(),
        }
    }

    fn push(&mut self, side: usize, sample: Sample) {
        self.sides[side].1.push(sample);
    }

    fn report(&self) {
        fn median(mut v: Vec<f64>) -> f64 {
            v.sort_by(f64::total_cmp);
            let mid = v.len() / 2;
            if v.len() % 2 == 1 {
                v[mid]
            } else {
                (v[mid - 1] + v[mid]) / 2.0
            }
        }
        println!("\n{}", self.name);
        println!(
            "  {:<34} {:>10} {:>7} {:>18} {:>9} {:>9} {:>16}",
            "side", "msgs/s", "ratio", "per round", "cpu us", "srv us", "p50/p99 us"
        );
        let raw = &self.sides[0].1;
        for (name, samples) in self.sides.iter().filter(|(_, s)| !s.is_empty()) {
            let ratios: Vec<f64> = samples.iter().zip(raw).map(|(s, r)| s.rate / r.rate).collect();
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
            let latency = if samples.iter().any(|s| s.latency.is_some()) {
                let p50 = median(
                    samples
                        .iter()
                        .filter_map(|s| s.latency)
                        .map(|l| l.0 as f64)
                        .collect(),
                );
                let p99 = median(
                    samples
                        .iter()
                        .filter_map(|s| s.latency)
                        .map(|l| l.1 as f64)
                        .collect(),
                );
                format!("{p50:.0}/{p99:.0}")
            } else {
                String::new()
            };
            let server: Vec<f64> = samples.iter().filter_map(|s| s.server_us).collect();
            let server = if server.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2}", median(server))
            };
            println!(
                "  {name:<34} {:>10.0} {:>7.2} {:>18} {:>9.2} {server:>9} {:>16}",
                median(samples.iter().map(|s| s.rate).collect()),
                median(ratios.clone()),
                each.join(" "),
                median(samples.iter().map(|s| s.cpu_us).collect()),
                latency,
            );
        }
    }
}

fn timed(t: Timed) -> (Timed, Option<(u64, u64)>) {
    (t, None)
}

async fn run() {
    let config = NatsConfig::new("nats://127.0.0.1:4222").name("watchtower-nats-bench");
    let client = NatsClient::connect(config).await.expect("the local NATS broker");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let n = count("NATS_BENCH_COUNT", 50_000);
    let rounds = count("NATS_BENCH_ROUNDS", 3);
    let only = std::env::var("NATS_BENCH_ONLY").unwrap_or_default();
    let runs = |case: &str| only.is_empty() || only == case;
    let rt_modes = std::env::var("NATS_BENCH_RT_MODE").unwrap_or_default();
    let modes = [
        ("structured", ContentMode::Structured),
        ("binary", ContentMode::Binary),
    ];

    if runs("encode") {
        encode_costs(200_000);
    }

    if runs("core") {
        let subject = format!("bench.{tag}.core");
        // Warm up connections, allocators and the server.
        core_raw(&client, &subject, 10_000, Headers::None).await;
        core_ours(&client, &subject, 10_000, ContentMode::Structured, Some(true)).await;
        let mut case = Case::new(
            "core publish",
            &[
                "raw, no header",
                "raw, 1 header",
                "raw, 8 ce- headers",
                "publisher, structured",
                "publisher, binary",
                "4-layer stack, structured",
                "4-layer stack, binary",
                "stack, worker hop, structured",
            ],
        );
        for _ in 0..rounds {
            for (side, headers) in [Headers::None, Headers::One, Headers::Eight]
                .into_iter()
                .enumerate()
            {
                let s = measure(n, async { timed(core_raw(&client, &subject, n, headers).await) }).await;
                case.push(side, s);
            }
            let ours = [
                (ContentMode::Structured, None),
                (ContentMode::Binary, None),
                (ContentMode::Structured, Some(true)),
                (ContentMode::Binary, Some(true)),
                (ContentMode::Structured, Some(false)),
            ];
            for (i, (mode, layered)) in ours.into_iter().enumerate() {
                let s = measure(n, async {
                    timed(core_ours(&client, &subject, n, mode, layered).await)
                })
                .await;
                case.push(3 + i, s);
            }
        }
        case.report();
    }

    if runs("js") {
        let stream = format!("BENCH_{tag}");
        client
            .create_or_update_stream(StreamConfig {
                name: stream.clone(),
                subjects: vec![format!("{stream}.>")],
                storage: StorageType::File,
                max_messages: 1_000_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let subject = format!("{stream}.js");
        js_raw(&client, &subject, 5_000, Headers::None).await;
        js_ours(
            &client,
            &subject,
            5_000,
            (ContentMode::Structured, true),
            Some(true),
        )
        .await;
        let mut case = Case::new(
            "JetStream publish, 1,024 in flight",
            &[
                "raw, no header",
                "raw, Nats-Msg-Id only",
                "raw, ce- block + Nats-Msg-Id",
                "publisher, structured",
                "publisher, binary",
                "4-layer stack, structured",
                "4-layer stack, binary",
                "stack, worker hop, structured",
                "publisher, structured, no dedup id",
                "stack, structured, no dedup id",
            ],
        );
        for _ in 0..rounds {
            for (side, headers) in [Headers::None, Headers::One, Headers::Eight]
                .into_iter()
                .enumerate()
            {
                let s = measure(n, async { timed(js_raw(&client, &subject, n, headers).await) }).await;
                case.push(side, s);
            }
            let ours = [
                ((ContentMode::Structured, true), None),
                ((ContentMode::Binary, true), None),
                ((ContentMode::Structured, true), Some(true)),
                ((ContentMode::Binary, true), Some(true)),
                ((ContentMode::Structured, true), Some(false)),
                ((ContentMode::Structured, false), None),
                ((ContentMode::Structured, false), Some(true)),
            ];
            for (i, (mode, layered)) in ours.into_iter().enumerate() {
                let s = measure(n, async {
                    timed(js_ours(&client, &subject, n, mode, layered).await)
                })
                .await;
                case.push(3 + i, s);
            }
        }
        case.report();
        client.delete_stream(&stream).await.unwrap();
    }

    if runs("jsc") {
        let mut case = Case::new(
            "JetStream consume, acked",
            &[
                "raw",
                "raw, messages with Nats-Msg-Id",
                "subscriber -> serve, structured",
            ],
        );
        for round in 0..rounds {
            let raw = format!("BENCH_{tag}_C{round}R");
            filled_stream(&client, &raw, n, Some(Headers::None)).await;
            let raw_id = format!("BENCH_{tag}_C{round}I");
            filled_stream(&client, &raw_id, n, Some(Headers::One)).await;
            let ours = format!("BENCH_{tag}_C{round}W");
            filled_stream(&client, &ours, n, None).await;
            let s = measure(n, async { timed(jsc_raw(&client, &raw, n).await) }).await;
            case.push(0, s);
            let s = measure(n, async { timed(jsc_raw(&client, &raw_id, n).await) }).await;
            case.push(1, s);
            let s = measure(n, async { timed(jsc_ours(&client, &ours, n).await) }).await;
            case.push(2, s);
            for name in [raw, raw_id, ours] {
                client.delete_stream(&name).await.unwrap();
            }
        }
        case.report();
    }

    if runs("rt") {
        let mut case = Case::new(
            "round trip, publish -> handler",
            &[
                "raw",
                "publisher -> serve, structured",
                "publisher -> serve, binary",
                "raw publish -> serve",
            ],
        );
        for round in 0..rounds {
            let s = measure(n, async {
                let (d, l) = rt_raw(&client, &format!("bench.{tag}.rt{round}r"), n).await;
                (d, Some(l))
            })
            .await;
            case.push(0, s);
            for (i, (name, mode)) in modes.iter().enumerate() {
                if !rt_modes.is_empty() && rt_modes != *name {
                    continue;
                }
                let s = measure(n, async {
                    let (d, l) =
                        rt_ours(&client, &format!("bench.{tag}.rt{round}{name}"), n, Some(*mode)).await;
                    (d, Some(l))
                })
                .await;
                case.push(1 + i, s);
            }
            if rt_modes.is_empty() || rt_modes == "raw" {
                let s = measure(n, async {
                    let (d, l) = rt_ours(&client, &format!("bench.{tag}.rt{round}rs"), n, None).await;
                    (d, Some(l))
                })
                .await;
                case.push(3, s);
            }
        }
        case.report();
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
