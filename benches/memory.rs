//! Publish → handler through the memory transport and the consumer
//! runtime, next to a bare `tokio::sync::mpsc` channel carrying the same
//! events to the same handler, in the same run; and the cost of cloning an
//! event.
//!
//! ```text
//! cargo bench --bench memory
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tower::{Service, service_fn};
use watchtower::{Error, Event, SubscribeOptions, Subscriber, serve};
use watchtower_memory::MemoryBroker;

const EVENTS: usize = 200_000;
/// Events in a latency round, published one at a time.
const PACED: usize = 20_000;
const ROUNDS: usize = 5;

/// Send instants, and what the handler saw.
struct Probe {
    start: Instant,
    sent_at: Vec<AtomicU64>,
    latency_ns: Vec<AtomicU64>,
    handled: AtomicUsize,
    done: Notify,
    each: Notify,
}

impl Probe {
    fn new() -> Arc<Probe> {
        Arc::new(Probe {
            start: Instant::now(),
            sent_at: (0..EVENTS).map(|_| AtomicU64::new(0)).collect(),
            latency_ns: (0..EVENTS).map(|_| AtomicU64::new(0)).collect(),
            handled: AtomicUsize::new(0),
            done: Notify::new(),
            each: Notify::new(),
        })
    }

    fn stamp(&self, seq: usize) {
        self.sent_at[seq].store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The handler both variants run: read the sequence number from the
    /// payload and record the latency.
    fn handle(&self, event: &Event) {
        let data = event.data().map(|d| &d[..]).unwrap_or_default();
        let seq = u64::from_le_bytes(data.try_into().unwrap_or_default()) as usize;
        let now = self.start.elapsed().as_nanos() as u64;
        self.latency_ns[seq].store(
            now.saturating_sub(self.sent_at[seq].load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.each.notify_one();
        if self.handled.fetch_add(1, Ordering::AcqRel) + 1 == EVENTS {
            self.done.notify_one();
        }
    }

    fn report(&self, name: &str, elapsed: Duration) -> f64 {
        let rate = EVENTS as f64 / elapsed.as_secs_f64();
        println!("{name:<28} throughput {rate:>12.0} events/s");
        rate
    }

    fn report_latency(&self, name: &str) -> (f64, f64) {
        let mut lat: Vec<u64> = self.latency_ns[..PACED]
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect();
        lat.sort_unstable();
        let (p50, p99) = (lat[PACED / 2] as f64 / 1e3, lat[PACED * 99 / 100] as f64 / 1e3);
        println!("{name:<28} latency    p50 {p50:>6.1} µs   p99 {p99:>6.1} µs (one event at a time)");
        (p50, p99)
    }
}

fn events() -> Vec<Event> {
    events_n(EVENTS)
}

fn events_n(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::binary(
                "bench.event",
                "application/octet-stream",
                (i as u64).to_le_bytes().to_vec(),
            )
        })
        .collect()
}

async fn mpsc_round() -> f64 {
    let probe = Probe::new();
    let events = events();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let consumer = {
        let probe = probe.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                probe.handle(&event);
            }
        })
    };
    let begin = Instant::now();
    for (seq, event) in events.into_iter().enumerate() {
        probe.stamp(seq);
        let _ = tx.send(event);
    }
    probe.done.notified().await;
    let rate = probe.report("tokio mpsc (bare)", begin.elapsed());
    let paced = Probe::new();
    drop(tx);
    let _ = consumer.await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let consumer = {
        let paced = paced.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                paced.handle(&event);
            }
        })
    };
    for (seq, event) in events_n(PACED).into_iter().enumerate() {
        paced.stamp(seq);
        let _ = tx.send(event);
        paced.each.notified().await;
    }
    paced.report_latency("tokio mpsc (bare)");
    drop(tx);
    let _ = consumer.await;
    rate
}

async fn memory_round() -> f64 {
    let probe = Probe::new();
    let rate = memory_run(&probe, EVENTS, false).await;
    probe.report("memory transport + serve", rate);
    let paced = Probe::new();
    memory_run(&paced, PACED, true).await;
    paced.report_latency("memory transport + serve");
    EVENTS as f64 / rate.as_secs_f64()
}

async fn memory_run(probe: &Arc<Probe>, n: usize, paced: bool) -> Duration {
    let events = events_n(n);
    let broker = MemoryBroker::new();
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["bench.event"]).expect("pattern"))
        .await
        .expect("subscribe");
    let handler = {
        let probe = probe.clone();
        service_fn(move |event: Event| {
            probe.handle(&event);
            std::future::ready(Ok::<_, Error>(()))
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(
        serve(subscription, handler)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    let mut publisher = broker.publisher();
    let begin = Instant::now();
    for (seq, event) in events.into_iter().enumerate() {
        probe.stamp(seq);
        std::future::poll_fn(|cx| publisher.poll_ready(cx))
            .await
            .expect("ready");
        publisher.call(event).await.expect("publish");
        if paced {
            probe.each.notified().await;
        }
    }
    if !paced {
        probe.done.notified().await;
    }
    let elapsed = begin.elapsed();
    stop.send(()).ok();
    let _ = consumer.await;
    elapsed
}

fn clone_cost() {
    let event = Event::builder("user.created")
        .subject("a-fairly-long-subject-string-for-the-benchmark")
        .extension(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .extension("tenant", "acme")
        .json(&serde_json::json!({"user_id": 123, "payload": "x".repeat(4096)}))
        .and_then(|b| b.build())
        .expect("event");
    let n = 10_000_000u32;
    let begin = Instant::now();
    for _ in 0..n {
        black_box(black_box(&event).clone());
    }
    let per_clone = begin.elapsed() / n;
    println!("Event::clone (4 KiB payload, 2 extensions): {per_clone:?} per clone");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("{EVENTS} events per round, {ROUNDS} rounds each, 2 worker threads");
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bare.push(runtime.block_on(mpsc_round()));
        ours.push(runtime.block_on(memory_round()));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (bare, ours) = (median(&mut bare), median(&mut ours));
    println!(
        "median: mpsc {bare:.0} events/s, memory transport {ours:.0} events/s, ratio {:.2}",
        ours / bare
    );
    clone_cost();
}
