//! Per-call cost of each layer and of the full stack over a no-op service,
//! next to tower's own middleware and other circuit breakers, in one run.
//!
//! Each benchmark makes one call: `ready().await`, `call(event).await`, on
//! a current-thread runtime. Subtract `baseline/no-op` for what a layer adds.
#![allow(missing_docs)]

use std::future::{Ready, ready};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tower::retry::Policy;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event};
use watchtower_layers::ServiceBuilderExt;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::DeadLetterLayer;
use watchtower_layers::retry::{RetryConfig, RetryLayer};

fn noop()
-> impl Service<Event, Response = (), Error = Error, Future = Ready<Result<(), Error>>> + Clone + Send + 'static
{
    service_fn(|_: Event| ready(Ok::<_, Error>(())))
}

fn noop_boxed() -> impl Service<Event, Response = (), Error = BoxError, Future = Ready<Result<(), BoxError>>>
+ Clone
+ Send
+ 'static {
    service_fn(|_: Event| ready(Ok::<_, BoxError>(())))
}

/// Tower's retry policy for the comparison: retry errors, like ours.
#[derive(Clone)]
struct RetryErrors(usize);

impl<E> Policy<Event, (), E> for RetryErrors {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Event, result: &mut Result<(), E>) -> Option<Self::Future> {
        match result {
            Err(_) if self.0 > 0 => {
                self.0 -= 1;
                Some(ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &Event) -> Option<Event> {
        Some(req.clone())
    }
}

fn bench_one<S>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, make: impl FnOnce() -> S)
where
    S: Service<Event> + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let event = Event::new("bench.event", serde_json::json!({"n": 1}));
    let mut svc = Some(rt.block_on(async { make() }));
    // The calls run in a spawned task, as an application's code does (an
    // axum handler, a consumer): wake-ups between tasks are then the
    // scheduler's, not those of `block_on`'s thread.
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut s = svc.take().expect("service");
            let event = event.clone();
            let (s, elapsed) = rt
                .block_on(rt.spawn(async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let r = s.ready().await.unwrap().call(event.clone()).await;
                        std::hint::black_box(r.is_ok());
                    }
                    (s, start.elapsed())
                }))
                .expect("bench task");
            svc = Some(s);
            elapsed
        })
    });
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dlq = MemoryDeadLetters::new(1024);

    bench_one(c, &rt, "baseline/no-op", noop);

    bench_one(c, &rt, "watchtower/circuit_breaker", || {
        ServiceBuilder::new()
            .circuit_breaker(CircuitBreakerConfig::new())
            .service(noop())
    });
    bench_one(c, &rt, "watchtower/retry", || {
        ServiceBuilder::new().retries(RetryConfig::new()).service(noop())
    });
    bench_one(c, &rt, "watchtower/dead_letter", || {
        ServiceBuilder::new().dead_letter(dlq.clone()).service(noop())
    });
    bench_one(c, &rt, "watchtower/backpressure", || {
        ServiceBuilder::new()
            .backpressure(BackpressureLayer::new(1024, Overflow::Block).concurrency(64))
            .service(noop())
    });
    bench_one(c, &rt, "watchtower/backpressure_direct", || {
        ServiceBuilder::new()
            .backpressure(
                BackpressureLayer::new(1024, Overflow::Block)
                    .concurrency(64)
                    .direct(true),
            )
            .service(noop())
    });
    bench_one(c, &rt, "watchtower/breaker+retry+dead_letter", || {
        ServiceBuilder::new()
            .layer(DeadLetterLayer::new(dlq.clone()))
            .layer(RetryLayer::new(RetryConfig::new()))
            .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new()))
            .service(noop())
    });
    bench_one(c, &rt, "watchtower/full_stack", || {
        ServiceBuilder::new()
            .dead_letter(dlq.clone())
            .retries(RetryConfig::new())
            .circuit_breaker(CircuitBreakerConfig::new())
            .backpressure(BackpressureLayer::new(1024, Overflow::Block).concurrency(64))
            .service(noop())
    });
    bench_one(c, &rt, "watchtower/full_stack_direct", || {
        ServiceBuilder::new()
            .dead_letter(dlq.clone())
            .retries(RetryConfig::new())
            .circuit_breaker(CircuitBreakerConfig::new())
            .backpressure(
                BackpressureLayer::new(1024, Overflow::Block)
                    .concurrency(64)
                    .direct(true),
            )
            .service(noop())
    });

    // With the `metrics` feature and a Prometheus recorder the handles
    // were registered with (the rows above then measure the feature with
    // no recorder: compare them with a run without the feature).
    #[cfg(feature = "metrics")]
    {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        bench_one(c, &rt, "watchtower/full_stack+prometheus", || {
            metrics::with_local_recorder(&recorder, || {
                ServiceBuilder::new()
                    .dead_letter(dlq.clone())
                    .retries(RetryConfig::new())
                    .circuit_breaker(CircuitBreakerConfig::new())
                    .backpressure(BackpressureLayer::new(1024, Overflow::Block).concurrency(64))
                    .service(noop())
            })
        });
        std::hint::black_box(recorder.handle().render());
    }

    bench_one(c, &rt, "tower/concurrency_limit", || {
        ServiceBuilder::new().concurrency_limit(64).service(noop_boxed())
    });
    bench_one(c, &rt, "tower/timeout", || {
        ServiceBuilder::new()
            .timeout(Duration::from_secs(30))
            .service(noop_boxed())
    });
    bench_one(c, &rt, "tower/retry", || {
        ServiceBuilder::new().retry(RetryErrors(2)).service(noop_boxed())
    });
    bench_one(c, &rt, "tower/buffer", || {
        ServiceBuilder::new().buffer(1024).service(noop_boxed())
    });
    bench_one(c, &rt, "tower/limit+timeout+retry+load_shed", || {
        ServiceBuilder::new()
            .load_shed()
            .retry(RetryErrors(2))
            .timeout(Duration::from_secs(30))
            .concurrency_limit(64)
            .service(noop_boxed())
    });

    bench_one(c, &rt, "tower_resilience/circuit_breaker", || {
        let layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
            .failure_rate_threshold(0.5)
            .sliding_window_size(100)
            .build()
            .unwrap();
        ServiceBuilder::new().layer(layer).service(noop_boxed())
    });
    // failsafe is not a tower layer: each call's future is wrapped in its
    // breaker, around the same no-op service.
    let breaker = failsafe::Config::new().build();
    let mut svc = noop_boxed();
    let event = Event::new("bench.event", serde_json::json!({"n": 1}));
    c.bench_function("failsafe/circuit_breaker", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let svc = svc.ready().await.unwrap();
                    let r = failsafe::futures::CircuitBreaker::call(&breaker, svc.call(event.clone())).await;
                    std::hint::black_box(r.is_ok());
                }
                start.elapsed()
            })
        })
    });
}

criterion_group! {
    name = benches;
    // Short runs: the differences measured are tens of nanoseconds.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = layers
}
criterion_main!(benches);
