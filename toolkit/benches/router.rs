//! The cost of dispatching an event through a [`Router`] against a
//! hand-written `match` on the event type in a `service_fn`, in the same
//! run, for the same mix of events and the same handler bodies.
//!
//! * `untyped`: handlers take the event; this measures routing alone
//!   (exact lookup, wildcard scan, the boxed future).
//! * `typed`: handlers decode the JSON payload into a struct, as most
//!   handlers do (`Data<T>` against `event.json::<T>()`).
//!
//! The mix: 1,000 events over three exact types, two wildcard routes and
//! the fallback, so every kind of match is paid for. Futures complete at
//! once, so no runtime is involved and the numbers are dispatch cost.
//!
//! ```text
//! cargo bench -p watchtower-toolkit --bench router
//! ```

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{Criterion, Throughput};
use futures_util::FutureExt as _;
use serde::Deserialize;
use tower::{Service, service_fn};
use watchtower::{Error, Event};
use watchtower_toolkit::router::{Data, Router, State};

#[derive(Deserialize)]
struct Order {
    id: u64,
}

type Counter = Arc<AtomicU64>;

fn events() -> Vec<Event> {
    let types = [
        "order.placed",
        "order.cancelled",
        "order.shipped",
        "order.refund.issued",
        "user.created",
        "audit.login",
    ];
    (0..1000)
        .map(|i| {
            Event::new(
                types[i % types.len()],
                serde_json::json!({"id": i, "note": "a typical small payload"}),
            )
        })
        .collect()
}

fn run<S>(service: &mut S, events: &[Event])
where
    S: Service<Event, Response = (), Error = Error>,
{
    for event in events {
        let fut = service.call(black_box(event.clone()));
        black_box(fut.now_or_never());
    }
}

fn untyped(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("dispatch_untyped");
    group.throughput(Throughput::Elements(events.len() as u64));

    let counter = Counter::default();
    let mut by_match = {
        let counter = counter.clone();
        service_fn(move |event: Event| {
            let add = match event.ty() {
                "order.placed" => 1,
                "order.cancelled" => 2,
                "order.shipped" => 3,
                ty if ty.starts_with("order.") => 4,
                ty if ty.starts_with("user.") && ty.matches('.').count() == 1 => 5,
                _ => 6,
            };
            counter.fetch_add(add, Ordering::Relaxed);
            std::future::ready(Ok::<_, Error>(()))
        })
    };
    group.bench_function("match", |b| b.iter(|| run(&mut by_match, &events)));

    let add = |n: u64| {
        move |State(counter): State<Counter>| async move {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    };
    let mut router = Router::with_state(counter.clone())
        .route("order.placed", add(1))
        .route("order.cancelled", add(2))
        .route("order.shipped", add(3))
        .route("order.>", add(4))
        .route("user.*", add(5))
        .fallback(add(6));
    group.bench_function("router", |b| b.iter(|| run(&mut router, &events)));
    group.finish();
}

fn typed(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("dispatch_typed");
    group.throughput(Throughput::Elements(events.len() as u64));

    let counter = Counter::default();
    let mut by_match = {
        let counter = counter.clone();
        service_fn(move |event: Event| {
            let result = event.json::<Order>().map(|order| {
                let add = match event.ty() {
                    "order.placed" => 1,
                    "order.cancelled" => 2,
                    "order.shipped" => 3,
                    ty if ty.starts_with("order.") => 4,
                    ty if ty.starts_with("user.") && ty.matches('.').count() == 1 => 5,
                    _ => 6,
                };
                counter.fetch_add(add + order.id, Ordering::Relaxed);
            });
            std::future::ready(result)
        })
    };
    group.bench_function("match", |b| b.iter(|| run(&mut by_match, &events)));

    let add = |n: u64| {
        move |Data(order): Data<Order>, State(counter): State<Counter>| async move {
            counter.fetch_add(n + order.id, Ordering::Relaxed);
        }
    };
    let mut router = Router::with_state(counter.clone())
        .route("order.placed", add(1))
        .route("order.cancelled", add(2))
        .route("order.shipped", add(3))
        .route("order.>", add(4))
        .route("user.*", add(5))
        .fallback(add(6));
    group.bench_function("router", |b| b.iter(|| run(&mut router, &events)));
    group.finish();
}

criterion::criterion_group!(benches, untyped, typed);
criterion::criterion_main!(benches);
