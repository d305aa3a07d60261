//! What tracing and metrics cost per event, in one run: NATS core publish
//! and the memory round trip (publish → `serve` → handler).
//!
//! ```text
//! cargo run --release -p watchtower-bench-observability               # features off
//! cargo run --release -p watchtower-bench-observability --features on # idle
//! BENCH_MODE=installed cargo run --release -p watchtower-bench-observability --features on
//! ```
//!
//! Built without the feature `on`, WatchTower has neither `opentelemetry`
//! nor `metrics`: the baseline. Built with it, it measures, by
//! `BENCH_MODE`:
//!
//! * `idle` (the default): the features compiled in, no subscriber and no
//!   recorder installed;
//! * `installed`: a `tracing` subscriber whose OpenTelemetry layer (as
//!   `tracing_opentelemetry::layer()` comes) records every WatchTower
//!   span, batch-exported to an exporter that drops them, and a Prometheus
//!   recorder;
//! * `sampled`: the configuration the crate docs recommend for
//!   production: the same recorder, and the layer without the attributes
//!   nobody reads on a messaging span (source location, thread, busy and
//!   idle times), its tracer sampling 1 trace in 100 by trace id (a
//!   parent-based ratio sampler: a consumer follows the publisher's
//!   decision).
//!
//! It prints events/s per round and the median;
//! `scripts/bench-observability` runs the modes in turn and compares them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tower::{Service, ServiceExt as _, service_fn};
use watchtower::{Error, Event, SubscribeOptions, Subscriber as _, serve};
use watchtower_memory::MemoryBroker;
use watchtower_nats::{NatsClient, NatsConfig};

const EVENTS: usize = 100_000;

fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5)
}

fn event(n: usize, topic: &str) -> Event {
    Event::new(
        "bench.observed",
        serde_json::json!({"n": n, "pad": "x".repeat(128)}),
    )
    .with_topic(topic)
}

/// Publishes `EVENTS` events to a subject nobody listens on, then waits
/// for the server to have them all (a flush).
async fn nats_publish(client: &NatsClient, topic: &str) -> f64 {
    let mut publisher = client.publisher();
    let events: Vec<Event> = (0..EVENTS).map(|n| event(n, topic)).collect();
    let start = Instant::now();
    for event in events {
        publisher
            .ready()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .call(event)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    client.raw().flush().await.unwrap_or_else(|e| panic!("{e}"));
    EVENTS as f64 / start.elapsed().as_secs_f64()
}

/// Publishes `EVENTS` events through the memory broker to `serve` and a
/// handler that counts them; done when the handler saw the last.
async fn memory_round_trip() -> f64 {
    let broker = MemoryBroker::new();
    let handled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["bench.rt"]).unwrap_or_else(|e| panic!("{e}")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (h, d) = (handled.clone(), done.clone());
    let consumer = tokio::spawn(
        serve(
            subscription,
            service_fn(move |_: Event| {
                if h.fetch_add(1, Ordering::Relaxed) + 1 == EVENTS {
                    d.notify_one();
                }
                std::future::ready(Ok::<_, Error>(()))
            }),
        )
        .into_future(),
    );
    let events: Vec<Event> = (0..EVENTS).map(|n| event(n, "bench.rt")).collect();
    let start = Instant::now();
    let mut publisher = broker.publisher();
    for event in events {
        publisher
            .ready()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .call(event)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    tokio::time::timeout(Duration::from_secs(60), done.notified())
        .await
        .unwrap_or_else(|_| panic!("handled {} of {EVENTS}", handled.load(Ordering::Relaxed)));
    let rate = EVENTS as f64 / start.elapsed().as_secs_f64();
    consumer.abort();
    rate
}

/// CPU time this process's threads have run so far, in nanoseconds (the
/// first field of each thread's `schedstat`; 0 where there is none): on a
/// loaded machine the events/s of a round say more about the other
/// processes than about this one, its CPU time per event does not.
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `case`; its events/s and its CPU nanoseconds per event.
async fn measured(case: impl std::future::Future<Output = f64>) -> (f64, f64) {
    let before = cpu_ns();
    let rate = case.await;
    (rate, cpu_ns().saturating_sub(before) as f64 / EVENTS as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(feature = "on")]
mod installed {
    //! The subscriber and recorder of the `installed` rounds.

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Drops every span: the export itself is not what is measured.
    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            drop(batch);
            Ok(())
        }
    }

    /// A subscriber recording WatchTower's spans (DEBUG) into
    /// OpenTelemetry, as an application would enable them: every span
    /// with the layer's defaults, or (`sampled`) 1 trace in 100 with a lean
    /// layer.
    pub(crate) fn subscriber(sampled: bool) -> (impl tracing::Subscriber + Send + Sync, SdkTracerProvider) {
        let mut provider = SdkTracerProvider::builder().with_batch_exporter(Discard);
        if sampled {
            provider =
                provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.01))));
        }
        let provider = provider.build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("bench"))
            .with_location(!sampled)
            .with_threads(!sampled)
            .with_tracked_inactivity(!sampled)
            .with_filter(Targets::new().with_target("watchtower", tracing::Level::DEBUG));
        (tracing_subscriber::registry().with(layer), provider)
    }

    pub(crate) fn recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
        metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = rounds();
    let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222"))
        .await
        .unwrap_or_else(|e| panic!("NATS at 127.0.0.1:4222: {e}"));
    let topic = format!("bench.observability.{}", std::process::id());
    let build = if cfg!(feature = "on") { "on" } else { "off" };
    println!("observability cost, {EVENTS} events per round, {rounds} rounds, features {build}");

    let mut results: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let mut record = |case: &'static str, mode: &'static str, (rate, cpu): (f64, f64)| {
        println!("  {case:<22} {mode:<10} {rate:>12.0} events/s {cpu:>8.0} cpu-ns/event");
        match results.iter_mut().find(|(c, m, _)| *c == case && *m == mode) {
            Some((_, _, v)) => v.push(rate),
            None => results.push((case, mode, vec![rate])),
        }
    };
    // One mode per process: once a `tracing` subscriber has been set, even
    // scoped and dropped, span creation takes tracing's slower path for the
    // rest of the process, so `idle` rounds after `installed` ones would
    // not measure `idle`.
    let mode = match (cfg!(feature = "on"), std::env::var("BENCH_MODE").as_deref()) {
        (false, _) => "off",
        (true, Ok("installed")) => "installed",
        (true, Ok("sampled")) => "sampled",
        (true, Ok("idle") | Err(_)) => "idle",
        (true, Ok(other)) => panic!("BENCH_MODE={other}: idle, installed or sampled"),
    };
    #[cfg(feature = "on")]
    let recorder = installed::recorder();
    #[cfg(feature = "on")]
    let _installed = (mode != "idle").then(|| {
        let (subscriber, provider) = installed::subscriber(mode == "sampled");
        (
            tracing::subscriber::set_default(subscriber),
            metrics::set_default_local_recorder(&recorder),
            provider,
        )
    });
    for _ in 0..rounds {
        record(
            "nats core publish",
            mode,
            measured(nats_publish(&client, &topic)).await,
        );
        record("memory round trip", mode, measured(memory_round_trip()).await);
    }
    println!();
    println!("| case | mode | median events/s | ns/event |");
    println!("|---|---|--:|--:|");
    for (case, mode, rates) in &results {
        let m = median(rates.clone());
        println!("| {case} | {mode} | {m:.0} | {:.0} |", 1e9 / m);
    }
}
