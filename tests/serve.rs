//! The consumer runtime: readiness, concurrency, settlement, poison,
//! shutdown. Deliveries come from a channel with a recording acker, so each
//! settlement can be checked; the memory transport covers the rest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, Stream};
use tokio::sync::{Notify, mpsc};
use tower::service_fn;
use watchtower::prelude::*;
use watchtower::{ErrorKind, Poison, RawMessage, ServeStats};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    Ack,
    Nack(Option<Duration>),
    Reject,
    Dropped,
}

type Log = Arc<Mutex<Vec<(String, Settled)>>>;

struct RecordingAcker {
    id: String,
    log: Log,
    settled: bool,
}

impl RecordingAcker {
    fn record(mut self, how: Settled) -> std::future::Ready<Result<(), Error>> {
        self.settled = true;
        self.log.lock().unwrap().push((self.id.clone(), how));
        std::future::ready(Ok(()))
    }
}

impl Drop for RecordingAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.log.lock().unwrap().push((self.id.clone(), Settled::Dropped));
        }
    }
}

impl Acker for RecordingAcker {
    fn ack(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.record(Settled::Ack)
    }
    fn nack(self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send {
        self.record(Settled::Nack(delay))
    }
    fn reject(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.record(Settled::Reject)
    }
}

/// A subscription fed by the test, counting how many deliveries the
/// runtime has pulled.
struct Feed {
    tx: mpsc::UnboundedSender<Delivery<RecordingAcker>>,
    log: Log,
    pulled: Arc<AtomicUsize>,
}

fn feed() -> (
    Feed,
    impl Stream<Item = Result<Delivery<RecordingAcker>, Error>> + Unpin + Send + 'static,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let stream = Box::pin(stream::unfold(rx, move |mut rx| {
        let counter = counter.clone();
        async move {
            let delivery = rx.recv().await?;
            counter.fetch_add(1, Ordering::SeqCst);
            Some((Ok(delivery), rx))
        }
    }));
    (
        Feed {
            tx,
            log: Log::default(),
            pulled,
        },
        stream,
    )
}

impl Feed {
    fn acker(&self, id: &str) -> RecordingAcker {
        RecordingAcker {
            id: id.into(),
            log: self.log.clone(),
            settled: false,
        }
    }

    fn send(&self, ty: &str) -> String {
        let event = Event::builder(ty).build().unwrap();
        let id = event.id().to_owned();
        self.tx.send(Delivery::new(event, ty, self.acker(&id))).unwrap();
        id
    }

    fn send_poison(&self, body: &'static [u8]) {
        let raw = RawMessage {
            topic: "orders".into(),
            headers: vec![("ce-id".into(), Bytes::from_static(b"\xff"))],
            body: Bytes::from_static(body),
        };
        let poison = Poison::new(raw, Error::decode("not an event"));
        self.tx
            .send(Delivery::poison(poison, self.acker("poison")))
            .unwrap();
    }

    fn settled(&self) -> Vec<(String, Settled)> {
        self.log.lock().unwrap().clone()
    }

    fn settlement_of(&self, id: &str) -> Option<Settled> {
        self.settled().into_iter().find(|(i, _)| i == id).map(|(_, s)| s)
    }
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn pulls_nothing_while_the_handler_is_not_ready() {
    let (feed, subscription) = feed();
    let (handler, mut handle) = tower_test::mock::pair::<Event, ()>();
    handle.allow(0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, handler)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    let first = feed.send("a");
    feed.send("b");
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(feed.pulled.load(Ordering::SeqCst), 0, "pulled while not ready");

    handle.allow(1);
    let (event, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.id(), first);
    assert_eq!(feed.pulled.load(Ordering::SeqCst), 1);
    respond.send_response(());
    until("the ack", || feed.settlement_of(&first) == Some(Settled::Ack)).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        feed.pulled.load(Ordering::SeqCst),
        1,
        "pulled a second event with no readiness"
    );

    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!((stats.received, stats.acked), (1, 1));
}

#[tokio::test]
async fn acks_on_ok_and_nacks_on_error_and_on_panic() {
    let (feed, subscription) = feed();
    let handler = service_fn(|event: Event| async move {
        match event.ty() {
            "ok" => Ok(()),
            "later" => Err(Error::new(ErrorKind::Throttled, "busy").with_retry_after(Duration::from_secs(7))),
            "fail" => Err(Error::new(ErrorKind::Handler, "no")),
            _ => panic!("handler bug"),
        }
    });
    let ids: Vec<String> = ["ok", "later", "fail", "panic"]
        .iter()
        .map(|t| feed.send(t))
        .collect();
    drop(feed.tx.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, handler)
            .nack_delay(Duration::from_secs(1))
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    until("four settlements", || feed.settled().len() == 4).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(feed.settlement_of(&ids[0]), Some(Settled::Ack));
    assert_eq!(
        feed.settlement_of(&ids[1]),
        Some(Settled::Nack(Some(Duration::from_secs(7))))
    );
    assert_eq!(
        feed.settlement_of(&ids[2]),
        Some(Settled::Nack(Some(Duration::from_secs(1))))
    );
    assert_eq!(
        feed.settlement_of(&ids[3]),
        Some(Settled::Nack(Some(Duration::from_secs(1))))
    );
    assert_eq!(
        (
            stats.received,
            stats.acked,
            stats.nacked,
            stats.handler_errors,
            stats.panics,
            stats.in_flight
        ),
        (4, 1, 3, 2, 1, 0)
    );
}

#[tokio::test]
async fn a_panic_in_call_itself_is_an_error_too() {
    #[derive(Clone)]
    struct PanicsInCall;
    impl tower::Service<Event> for PanicsInCall {
        type Response = ();
        type Error = Error;
        type Future = std::future::Ready<Result<(), Error>>;
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Event) -> Self::Future {
            panic!("bug in call")
        }
    }
    let (feed, subscription) = feed();
    let id = feed.send("x");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, PanicsInCall)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    until("the nack", || feed.settlement_of(&id).is_some()).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    // Redelivered after the first delay of the default backoff, not at once.
    assert_eq!(
        feed.settlement_of(&id),
        Some(Settled::Nack(Some(Duration::from_millis(100))))
    );
    assert_eq!(stats.panics, 1);
}

#[tokio::test]
async fn keeps_at_most_the_concurrency_bound_in_flight() {
    let (feed, subscription) = feed();
    let release = Arc::new(Notify::new());
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (release, running, max_running) = (release.clone(), running.clone(), max_running.clone());
        service_fn(move |_event: Event| {
            let (release, running, max_running) = (release.clone(), running.clone(), max_running.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                release.notified().await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Error>(())
            }
        })
    };
    for _ in 0..10 {
        feed.send("work");
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, handler)
            .concurrency(3)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    until("three running", || running.load(Ordering::SeqCst) == 3).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(feed.pulled.load(Ordering::SeqCst), 3);
    while feed.settled().len() < 10 {
        release.notify_waiters();
        tokio::task::yield_now().await;
    }
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(max_running.load(Ordering::SeqCst), 3);
    assert_eq!(stats.acked, 10);
    assert!(feed.settled().iter().all(|(_, s)| *s == Settled::Ack));
}

#[tokio::test(start_paused = true)]
async fn shutdown_finishes_in_flight_work_and_abandons_it_at_the_deadline() {
    let (feed, subscription) = feed();
    let finish_quick = Arc::new(Notify::new());
    let handler = {
        let finish_quick = finish_quick.clone();
        service_fn(move |event: Event| {
            let finish_quick = finish_quick.clone();
            async move {
                match event.ty() {
                    "quick" => finish_quick.notified().await,
                    _ => std::future::pending::<()>().await,
                }
                Ok::<_, Error>(())
            }
        })
    };
    let quick = feed.send("quick");
    let stuck = feed.send("stuck");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = serve(subscription, handler)
        .shutdown_timeout(Duration::from_secs(5))
        .with_graceful_shutdown(async {
            stopped.await.ok();
        });
    let stats_handle = serve.stats();
    let run = tokio::spawn(serve.into_future());
    until("both in flight", || stats_handle.snapshot().in_flight == 2).await;
    stop.send(()).unwrap();
    // After the signal, the runtime pulls nothing new.
    let late = feed.send("late");
    finish_quick.notify_waiters();
    let stats: ServeStats = run.await.unwrap().unwrap();
    assert_eq!(feed.settlement_of(&quick), Some(Settled::Ack));
    assert_eq!(
        feed.settlement_of(&stuck),
        Some(Settled::Dropped),
        "left for redelivery"
    );
    assert_eq!(
        feed.settlement_of(&late),
        Some(Settled::Dropped),
        "never pulled, left to the transport"
    );
    assert_eq!((stats.received, stats.acked, stats.in_flight), (2, 1, 1));
}

#[tokio::test]
async fn poison_goes_to_the_poison_path_and_is_rejected() {
    let (feed, subscription) = feed();
    feed.send_poison(b"\x00garbage");
    let good = feed.send("good");
    let serve = serve(subscription, service_fn(|_: Event| async { Ok::<_, Error>(()) }));
    let dlq = serve.default_dead_letters().cloned().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    tokio::time::timeout(Duration::from_secs(5), dlq.wait_for(1))
        .await
        .unwrap();
    until("both settled", || feed.settled().len() == 2).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(feed.settlement_of("poison"), Some(Settled::Reject));
    assert_eq!(feed.settlement_of(&good), Some(Settled::Ack));
    let dead = dlq.drain();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].ty(), watchtower::POISON_EVENT_TYPE);
    assert_eq!(dead[0].data().map(|d| &d[..]), Some(&b"\x00garbage"[..]));
    assert_eq!(dead[0].extension("deadlettertopic"), Some("orders"));
    assert_eq!(dead[0].extension("deadletterkind"), Some("decode"));
    assert_eq!((stats.poisoned, stats.acked), (1, 1));
}

#[tokio::test]
async fn a_failing_poison_path_keeps_the_message() {
    let (feed, subscription) = feed();
    feed.send_poison(b"junk");
    let full = MemoryDeadLetters::new(0);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, service_fn(|_: Event| async { Ok::<_, Error>(()) }))
            .poison(full)
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    until("the nack", || feed.settlement_of("poison").is_some()).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert!(matches!(
        feed.settlement_of("poison"),
        Some(Settled::Nack(Some(_)))
    ));
    assert_eq!((stats.poisoned, stats.poison_errors), (0, 1));
}

#[tokio::test]
async fn the_subscription_ending_ends_the_runtime() {
    let (feed, subscription) = feed();
    let id = feed.send("last");
    drop(feed.tx);
    let stats = serve(subscription, service_fn(|_: Event| async { Ok::<_, Error>(()) }))
        .await
        .unwrap();
    assert_eq!(stats.acked, 1);
    assert_eq!(feed.log.lock().unwrap().clone(), vec![(id, Settled::Ack)]);
}

#[tokio::test]
async fn subscribe_and_stop_on_the_memory_transport_redelivers_after_a_failure() {
    let broker = watchtower_memory::MemoryBroker::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let handle = broker
        .subscriber()
        .subscribe(
            ["user.*"],
            service_fn(move |event: Event| {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(event.id().to_owned());
                    seen.len() == 1
                };
                async move {
                    if first {
                        Err(Error::new(ErrorKind::Handler, "first attempt fails"))
                    } else {
                        Ok(())
                    }
                }
            }),
        )
        .await
        .unwrap();
    let event = Event::new("user.created", serde_json::json!({"user_id": 123}));
    broker.publisher().publish(event.clone()).await.unwrap();
    assert!(broker.wait_idle(Duration::from_secs(5)).await);
    let stats = handle.stop().await.unwrap();
    assert_eq!(*attempts.lock().unwrap(), vec![event.id().to_owned(); 2]);
    assert_eq!((stats.received, stats.nacked, stats.acked), (2, 1, 1));
}

#[tokio::test]
async fn invalid_patterns_fail_to_subscribe() {
    let broker = watchtower_memory::MemoryBroker::new();
    let err = broker
        .subscriber()
        .subscribe(["user.>.x"], service_fn(|_: Event| async { Ok::<_, Error>(()) }))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic);
}

#[tokio::test]
async fn a_non_retryable_failure_is_dead_lettered_not_redelivered() {
    let (feed, subscription) = feed();
    let id = feed.send("bad.schema");
    let serve = serve(
        subscription,
        service_fn(|_: Event| async { Err::<(), _>(Error::decode("payload does not match the schema")) }),
    );
    let dlq = serve.default_dead_letters().cloned().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    until("the settlement", || feed.settlement_of(&id).is_some()).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(feed.settlement_of(&id), Some(Settled::Reject));
    let dead = dlq.drain();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id(), id);
    assert_eq!(dead[0].extension("deadletterkind"), Some("decode"));
    assert_eq!(dead[0].extension("deadlettertopic"), Some("bad.schema"));
    assert_eq!(dead[0].extension("attempt"), Some("1"));
    assert_eq!(
        (stats.dead_lettered, stats.nacked, stats.handler_errors),
        (1, 0, 1)
    );
}

#[tokio::test]
async fn max_deliveries_gives_up_and_the_handler_sees_the_attempt() {
    let broker = watchtower_memory::MemoryBroker::new();
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["flaky"]).unwrap())
        .await
        .unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let handler = service_fn(move |event: Event| {
        seen.lock()
            .unwrap()
            .push(event.extension("attempt").map(str::to_owned));
        async { Err::<(), _>(Error::new(ErrorKind::Connection, "database down")) }
    });
    let serve = serve(subscription, handler).max_deliveries(3);
    let dlq = serve.default_dead_letters().cloned().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    broker
        .publisher()
        .publish(Event::new("flaky", serde_json::json!({})))
        .await
        .unwrap();
    assert!(broker.wait_idle(Duration::from_secs(5)).await);
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![None, Some("2".into()), Some("3".into())]
    );
    let dead = dlq.drain();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].extension("attempt"), Some("3"));
    assert_eq!(dead[0].extension("deadletterkind"), Some("connection"));
    assert_eq!((stats.nacked, stats.dead_lettered), (2, 1));
}

/// A handler that always fails with a retryable error, on a transport that
/// redelivers at once, must not starve the runtime it runs on.
#[test]
fn an_always_failing_handler_does_not_starve_a_current_thread_runtime() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stats = runtime.block_on(async {
            let broker = watchtower_memory::MemoryBroker::new();
            let handle = broker
                .subscriber()
                .subscribe(
                    ["loop"],
                    service_fn(|_: Event| async { Err::<(), _>(Error::new(ErrorKind::Handler, "always")) }),
                )
                .await
                .unwrap();
            broker
                .publisher()
                .publish(Event::new("loop", serde_json::json!({})))
                .await
                .unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            handle.stop().await.unwrap()
        });
        let _ = done_tx.send(stats);
    });
    let stats = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the runtime was starved: stop() never completed");
    assert!(stats.nacked >= 1, "{stats}");
    assert_eq!(stats.acked, 0);
}

#[tokio::test]
async fn a_publisher_as_dead_letter_path_does_not_feed_poison_back() {
    let broker = watchtower_memory::MemoryBroker::new();
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["in.>"]).unwrap())
        .await
        .unwrap();
    let mut dead = broker
        .subscriber()
        .open(SubscribeOptions::new([watchtower::POISON_EVENT_TYPE]).unwrap())
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = service_fn(move |event: Event| {
        let _ = tx.send(event.ty().to_owned());
        async { Ok::<_, Error>(()) }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, handler)
            .poison(broker.publisher())
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    broker.publish_raw("in.orders", "not json").unwrap();
    broker
        .publisher()
        .publish(Event::new("in.orders", serde_json::json!({})))
        .await
        .unwrap();
    let parked = tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(&mut dead))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        parked.event().map(|e| e.extension("deadlettertopic")),
        Some(Some("in.orders"))
    );
    assert_eq!(rx.recv().await.as_deref(), Some("in.orders"));
    parked.ack().await.unwrap();
    assert!(broker.wait_idle(Duration::from_secs(5)).await);
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();
    assert!(rx.try_recv().is_err(), "the handler saw the poison event again");
    assert_eq!((stats.poisoned, stats.acked), (1, 1));
}

/// WARN events recorded on this thread: their message and fields.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_span() || *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        if *event.metadata().level() == tracing::Level::WARN {
            let mut text = Text(String::new());
            event.record(&mut text);
            self.0.lock().unwrap().push(text.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// With the default settings, an event whose handler always panics is
/// tried exactly `max_deliveries` (10) times, redelivered by the memory
/// transport after delays that double from 100 ms (never at once), then
/// dead-lettered once into the default in-memory queue with a WARN log
/// naming it.
#[tokio::test(start_paused = true)]
async fn an_always_panicking_handler_is_retried_with_growing_delays_then_dead_lettered_once() {
    let warnings = Warnings::default();
    let _log = tracing::subscriber::set_default(warnings.clone());
    let broker = watchtower_memory::MemoryBroker::new();
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["boom"]).unwrap())
        .await
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    // Rings when the handler has been called more than the limit allows.
    let too_many = Arc::new(Notify::new());
    let ring = too_many.clone();
    let handler = service_fn(move |_: Event| {
        let mut seen = seen.lock().unwrap();
        seen.push(tokio::time::Instant::now());
        if seen.len() > 10 {
            ring.notify_one();
        }
        async {
            if true {
                panic!("the handler cannot take this event");
            }
            Ok::<(), Error>(())
        }
    });
    let serve = serve(subscription, handler);
    let dlq = serve.default_dead_letters().cloned().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    let event = Event::new("boom", serde_json::json!({}));
    broker.publisher().publish(event.clone()).await.unwrap();
    let dead_lettered = tokio::select! {
        () = dlq.wait_for(1) => true,
        () = too_many.notified() => false,
    };
    assert!(
        dead_lettered,
        "the handler was called more than 10 times before the event was dead-lettered"
    );
    // Long after the last delay: nothing more comes.
    tokio::time::sleep(Duration::from_secs(600)).await;
    stop.send(()).unwrap();
    let stats = run.await.unwrap().unwrap();

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 10, "handler calls");
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
    let expected: Vec<Duration> = (0..9).map(|i| Duration::from_millis(100 << i)).collect();
    assert_eq!(gaps, expected);
    let dead = dlq.drain();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id(), event.id());
    assert_eq!(dead[0].extension("attempt"), Some("10"));
    assert_eq!(dead[0].extension("deadletterkind"), Some("handler"));
    assert_eq!(
        (stats.panics, stats.nacked, stats.dead_lettered, stats.acked),
        (10, 9, 1, 0)
    );
    let warned: Vec<String> = warnings
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains("dead-letter"))
        .cloned()
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains(event.id()), "{warned:?}");
    assert!(warned[0].contains("lost when"), "{warned:?}");
}

/// The delay asked of the transport grows with the delivery count and is
/// capped; a retry-after hint on the error wins.
#[tokio::test]
async fn nack_delays_grow_with_the_delivery_count_and_a_retry_after_hint_wins() {
    let (feed, subscription) = feed();
    let mut ids = Vec::new();
    for count in [1u32, 2, 3, 9, 12] {
        let id = format!("e{count}");
        let event = Event::builder("t").id(id.as_str()).build().unwrap();
        feed.tx
            .send(Delivery::new(event, "t", feed.acker(&id)).with_delivery_count(count))
            .unwrap();
        ids.push((id, count));
    }
    let hinted = Event::builder("hint").id("h").build().unwrap();
    feed.tx
        .send(Delivery::new(hinted, "hint", feed.acker("h")))
        .unwrap();
    let handler = service_fn(|event: Event| async move {
        let err = Error::new(ErrorKind::Handler, "failed");
        Err::<(), _>(if event.ty() == "hint" {
            err.with_retry_after(Duration::from_secs(7))
        } else {
            err
        })
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, handler)
            .max_deliveries(u32::MAX)
            .redelivery_backoff(Duration::from_millis(10), Duration::from_secs(1))
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    until("every settlement", || feed.settled().len() == 6).await;
    stop.send(()).unwrap();
    run.await.unwrap().unwrap();
    for (id, count) in ids {
        let expected = Duration::from_millis(10 << (count - 1)).min(Duration::from_secs(1));
        assert_eq!(
            feed.settlement_of(&id),
            Some(Settled::Nack(Some(expected))),
            "{id}"
        );
    }
    assert_eq!(
        feed.settlement_of("h"),
        Some(Settled::Nack(Some(Duration::from_secs(7))))
    );
}
