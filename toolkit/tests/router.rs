//! The router under `serve`: typed handlers on the memory transport and on
//! Redis, decode failures on the dead-letter path, per-route layers, the
//! fallback, nesting and configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::prelude::*;
use watchtower_memory::MemoryBroker;
use watchtower_test_support::{unique, within};
use watchtower_toolkit::router::{Attributes, Data, DeliveryCount, Router, State, Topic};

#[derive(Debug, Deserialize, PartialEq)]
struct Placed {
    id: u64,
    total_cents: u64,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Cancelled {
    id: u64,
    reason: String,
}

/// What the handlers saw, in order.
type Seen = Arc<Mutex<Vec<String>>>;

async fn placed(Data(order): Data<Placed>, State(seen): State<Seen>) {
    seen.lock()
        .unwrap()
        .push(format!("placed {} {}", order.id, order.total_cents));
}

async fn cancelled(Data(order): Data<Cancelled>, State(seen): State<Seen>) -> Result<(), Error> {
    seen.lock()
        .unwrap()
        .push(format!("cancelled {} {}", order.id, order.reason));
    Ok(())
}

async fn any_order(attributes: Attributes, Topic(topic): Topic, State(seen): State<Seen>) {
    seen.lock()
        .unwrap()
        .push(format!("order {} on {topic}", attributes.ty()));
}

async fn other(event: Event, State(seen): State<Seen>) {
    seen.lock().unwrap().push(format!("fallback {}", event.ty()));
}

fn shop(seen: &Seen) -> Router<Seen> {
    Router::with_state(seen.clone())
        .route("order.placed", placed)
        .route("order.cancelled", cancelled)
        .route("order.>", any_order)
        .fallback(other)
}

fn sorted(seen: &Seen) -> Vec<String> {
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    seen
}

#[tokio::test]
async fn each_event_reaches_its_most_specific_typed_handler_on_the_memory_transport() {
    let seen = Seen::default();
    let broker = MemoryBroker::new();
    let handle = broker.subscriber().subscribe([">"], shop(&seen)).await.unwrap();
    let mut publisher = broker.publisher();
    let events = [
        Event::new("order.placed", serde_json::json!({"id": 1, "total_cents": 250})),
        Event::new("order.cancelled", serde_json::json!({"id": 2, "reason": "late"})),
        Event::new("order.refund.issued", serde_json::json!({})),
        Event::new("user.created", serde_json::json!({})),
    ];
    for event in events {
        publisher.publish(event).await.unwrap();
    }
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 4);
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(
        sorted(&seen),
        [
            "cancelled 2 late",
            "fallback user.created",
            "order order.refund.issued on order.refund.issued",
            "placed 1 250",
        ]
    );
}

/// The core of the decode promise, on a broker: a payload of the wrong
/// shape is not retried, and reaches the dead-letter path with serde's
/// message and the `decode` kind, while the rest is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_payload_goes_to_the_dead_letter_path_with_its_decode_error_on_redis() {
    let prefix = format!("{}:", unique("tk_router"));
    let client = common::redis_client(&prefix).await;
    let seen = Seen::default();
    let subscription = client
        .subscriber_with(common::quick())
        .unwrap()
        .open(
            SubscribeOptions::new(["order.placed"])
                .unwrap()
                .group("shop")
                .unwrap(),
        )
        .await
        .unwrap();
    let dead = MemoryDeadLetters::new(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(subscription, shop(&seen))
            .poison(dead.clone())
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    let mut publisher = client.publisher();
    publisher
        .publish(Event::new(
            "order.placed",
            serde_json::json!({"id": "seven", "total_cents": 1}),
        ))
        .await
        .unwrap();
    publisher
        .publish(Event::new(
            "order.placed",
            serde_json::json!({"id": 8, "total_cents": 2}),
        ))
        .await
        .unwrap();
    within("the bad payload to be dead-lettered", dead.wait_for(1)).await;
    within("the good payload to be handled", async {
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
    })
    .await;
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    assert_eq!(stats.received, 2, "{stats}");
    assert_eq!(stats.acked, 1);
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.nacked, 0, "a decode error is not retried");
    assert_eq!(sorted(&seen), ["placed 8 2"]);
    let letters = dead.drain();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.ty(), "order.placed");
    assert_eq!(letter.extension("deadletterkind"), Some("decode"));
    let reason = letter.extension("deadletterreason").unwrap();
    assert!(
        reason.contains("payload of `order.placed` does not decode") && reason.contains("invalid type"),
        "{reason}"
    );
    assert_eq!(letter.extension("attempt"), Some("1"));
    assert_eq!(letter.json::<serde_json::Value>().unwrap()["id"], "seven");
    common::cleanup(&prefix).await;
}

#[tokio::test]
async fn an_event_without_a_route_or_fallback_is_dead_lettered_never_acked() {
    let broker = MemoryBroker::new();
    let router = Router::new().route("order.placed", || async {});
    let handle = broker.subscriber().subscribe([">"], router).await.unwrap();
    broker
        .publisher()
        .publish(Event::new("user.created", serde_json::json!({})))
        .await
        .unwrap();
    let dead = handle.dead_letters().unwrap().clone();
    within("the unrouted event to be dead-lettered", dead.wait_for(1)).await;
    let stats = handle.stop().await.unwrap();
    assert_eq!((stats.acked, stats.dead_lettered, stats.nacked), (0, 1, 0));
    let letter = &dead.drain()[0];
    assert_eq!(letter.extension("deadletterkind"), Some("rejected"));
    assert_eq!(
        letter.extension("deadletterreason"),
        Some("rejected: no route for event type `user.created`")
    );
}

/// A layer that counts the events that pass through it.
#[derive(Clone)]
struct Counting(Arc<AtomicUsize>);

impl<S> Layer<S> for Counting {
    type Service = CountingService<S>;
    fn layer(&self, inner: S) -> CountingService<S> {
        CountingService(inner, self.0.clone())
    }
}

#[derive(Clone)]
struct CountingService<S>(S, Arc<AtomicUsize>);

impl<S: Service<Event>> Service<Event> for CountingService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, event: Event) -> S::Future {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.call(event)
    }
}

#[tokio::test]
async fn a_route_layer_wraps_the_routes_before_it_and_nothing_else() {
    let inner = Arc::new(AtomicUsize::new(0));
    let outer = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let count = {
        let handled = handled.clone();
        move || {
            let handled = handled.clone();
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let mut router = Router::new()
        .route("a", count.clone())
        .route("b.*", count.clone())
        .route_layer(Counting(inner.clone()))
        .route("c", count.clone())
        .route_layer(Counting(outer.clone()))
        .route("d", count.clone())
        .fallback(count);
    for (ty, inner_after, outer_after) in [
        ("a", 1, 1),
        ("b.x", 2, 2),
        ("c", 2, 3),
        ("d", 2, 3),
        ("zzz", 2, 3),
    ] {
        router
            .ready()
            .await
            .unwrap()
            .call(Event::new(ty, serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(
            (inner.load(Ordering::SeqCst), outer.load(Ordering::SeqCst)),
            (inner_after, outer_after),
            "after {ty}"
        );
    }
    assert_eq!(handled.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_route_layer_from_tower_bounds_only_its_route() {
    // A timeout on the slow route fails it; the unlayered route is as slow
    // and succeeds.
    tokio::time::pause();
    let slow = || async {
        tokio::time::sleep(Duration::from_secs(10)).await;
    };
    let mut router = Router::new()
        .route("slow.limited", slow)
        .route_layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(1)))
        .route("slow.free", slow);
    let limited = router
        .ready()
        .await
        .unwrap()
        .call(Event::new("slow.limited", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(limited.kind(), ErrorKind::Timeout);
    router
        .ready()
        .await
        .unwrap()
        .call(Event::new("slow.free", serde_json::json!({})))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_handler_reads_the_delivery_count_of_a_redelivered_event() {
    let broker = MemoryBroker::new();
    let counts = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let counts = counts.clone();
        move |DeliveryCount(n): DeliveryCount| {
            let counts = counts.clone();
            async move {
                counts.lock().unwrap().push(n);
                if n < 3 {
                    Err(Error::new(ErrorKind::Handler, "not yet"))
                } else {
                    Ok(())
                }
            }
        }
    };
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["job.run"]).unwrap())
        .await
        .unwrap();
    let router = Router::new().route("job.run", handler);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(subscription, router)
            .nack_delay(Duration::from_millis(1))
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    broker
        .publisher()
        .publish(Event::new("job.run", serde_json::json!({})))
        .await
        .unwrap();
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    stop.send(()).unwrap();
    let stats = server.await.unwrap().unwrap();
    assert_eq!((stats.acked, stats.nacked), (1, 2));
    assert_eq!(*counts.lock().unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn nested_and_merged_routers_route_under_their_prefix() {
    let seen = Seen::default();
    let record = |label: &'static str| {
        move |event: Event, State(seen): State<Seen>| async move {
            seen.lock().unwrap().push(format!("{label} {}", event.ty()));
        }
    };
    let orders = Router::with_state(seen.clone())
        .route("created", record("created"))
        .route("*.line", record("line"))
        .fallback(record("orders-fallback"));
    let users = Router::with_state(seen.clone()).route("user.*", record("user"));
    let mut router = Router::with_state(seen.clone())
        .nest("order", orders)
        .merge(users)
        .fallback(record("root-fallback"));
    router.check().unwrap();
    assert_eq!(router.route_for("order.created"), Some("order.created"));
    assert_eq!(router.route_for("order.x.line"), Some("order.*.line"));
    assert_eq!(router.route_for("order.paid"), Some("order.>"));
    assert_eq!(router.route_for("user.gone"), Some("user.*"));
    assert_eq!(router.route_for("created"), None);
    for ty in [
        "order.created",
        "order.x.line",
        "order.paid",
        "user.gone",
        "created",
    ] {
        router
            .ready()
            .await
            .unwrap()
            .call(Event::new(ty, serde_json::json!({})))
            .await
            .unwrap();
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "created order.created",
            "line order.x.line",
            "orders-fallback order.paid",
            "user user.gone",
            "root-fallback created",
        ]
    );
}

#[tokio::test]
async fn a_misconfigured_router_stops_serve_before_it_takes_an_event() {
    let broker = MemoryBroker::new();
    let router = Router::new()
        .route("order.*", || async {})
        .route("order.*", || async {});
    assert_eq!(router.check().unwrap_err().kind(), ErrorKind::Config);
    let pulled = Arc::new(AtomicUsize::new(0));
    let subscription = {
        use futures_util::StreamExt as _;
        let pulled = pulled.clone();
        broker
            .subscriber()
            .open(SubscribeOptions::new(["order.*"]).unwrap())
            .await
            .unwrap()
            .inspect(move |_| {
                pulled.fetch_add(1, Ordering::SeqCst);
            })
    };
    broker
        .publisher()
        .publish(Event::new("order.placed", serde_json::json!({})))
        .await
        .unwrap();
    let error = within("serve to fail", serve(subscription, router).into_future())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(
        error.to_string().contains("route `order.*` is given twice"),
        "{error}"
    );
    assert_eq!(pulled.load(Ordering::SeqCst), 0, "no event was taken");
    let bad = Router::new().route("order.>.x", || async {});
    assert_eq!(bad.check().unwrap_err().kind(), ErrorKind::Config);
    let nested_bad = Router::new().nest("a", Router::new().route("b..c", || async {}));
    assert!(nested_bad.check().is_err());
    let two_fallbacks = Router::new()
        .fallback(|| async {})
        .merge(Router::new().fallback(|| async {}));
    assert!(two_fallbacks.check().is_err());
}

#[tokio::test]
async fn handler_errors_keep_their_kind_and_foreign_errors_are_retryable_handler_failures() {
    #[derive(Debug)]
    struct Oops;
    impl std::fmt::Display for Oops {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("oops")
        }
    }
    impl std::error::Error for Oops {}

    let mut router = Router::new()
        .route("foreign", || async { Err::<(), _>(Oops) })
        .route("final", || async {
            Err::<(), _>(Error::new(ErrorKind::Rejected, "unknown customer"))
        })
        .route("optional", |data: Option<Data<Placed>>| async move {
            assert!(data.is_none());
        });
    let call = |router: &mut Router, ty: &str| {
        let event = Event::new(ty.to_owned(), serde_json::json!({"id": "x"}));
        router.call(event)
    };
    let foreign = call(&mut router, "foreign").await.unwrap_err();
    assert_eq!(foreign.kind(), ErrorKind::Handler);
    assert!(foreign.is_retryable());
    assert_eq!(foreign.message(), "oops");
    let fin = call(&mut router, "final").await.unwrap_err();
    assert_eq!(fin.kind(), ErrorKind::Rejected);
    assert!(!fin.is_retryable());
    call(&mut router, "optional").await.unwrap();
}

#[tokio::test]
async fn a_router_serves_many_events_concurrently_and_each_once() {
    // Attack: many types, deep and shallow, a huge type name, a payload
    // far larger than typical; every event handled once by its route.
    let broker = MemoryBroker::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let record = move |label: &'static str| {
        let tx = tx.clone();
        move |event: Event| {
            let tx = tx.clone();
            async move {
                tx.send(format!("{label} {}", event.ty())).unwrap();
            }
        }
    };
    let router = Router::new()
        .route("a.b", record("exact"))
        .route("a.*", record("star"))
        .route("a.>", record("tail"))
        .fallback(record("fallback"));
    let handle = broker.subscriber().subscribe([">"], router).await.unwrap();
    let long_type = format!("a.{}", "x".repeat(200));
    let big = serde_json::json!({"blob": "y".repeat(1 << 20)});
    let mut publisher = broker.publisher();
    let mut expected = Vec::new();
    for i in 0..200 {
        let (ty, label) = match i % 5 {
            0 => ("a.b".to_owned(), "exact"),
            1 => (format!("a.n{i}"), "star"),
            2 => (format!("a.n{i}.deep.er"), "tail"),
            3 => (format!("z{i}"), "fallback"),
            _ => (long_type.clone(), "star"),
        };
        let data = if i == 7 {
            big.clone()
        } else {
            serde_json::json!({})
        };
        expected.push(format!("{label} {ty}"));
        publisher.publish(Event::new(ty, data)).await.unwrap();
    }
    let mut got = Vec::new();
    within("every event to be handled", async {
        while got.len() < expected.len() {
            got.push(rx.recv().await.unwrap());
        }
    })
    .await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 200);
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_handler_service_serves_one_typed_handler_without_a_router() {
    use watchtower_toolkit::router::HandlerExt as _;
    let total = Arc::new(AtomicU32::new(0));
    let add = |Data(n): Data<u32>, State(total): State<Arc<AtomicU32>>| async move {
        total.fetch_add(n, Ordering::SeqCst);
    };
    let mut service = add.with_state(total.clone());
    for n in [1, 2, 3] {
        service
            .ready()
            .await
            .unwrap()
            .call(Event::new("n", serde_json::json!(n)))
            .await
            .unwrap();
    }
    let bad = service
        .call(Event::new("n", serde_json::json!("three")))
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::Decode);
    assert!(!bad.is_retryable());
    assert_eq!(total.load(Ordering::SeqCst), 6);
    // service_fn-style handlers still plug in next to typed routes.
    let mut router =
        Router::new().route_service("plain", service_fn(|_event: Event| async { Ok::<_, Error>(()) }));
    router
        .ready()
        .await
        .unwrap()
        .call(Event::new("plain", serde_json::json!({})))
        .await
        .unwrap();
}
