//! The layers together, with tower's own middleware in the same stack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::health::Status;
use watchtower::{Error, ErrorKind, Event};
use watchtower_layers::ServiceBuilderExt;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
use watchtower_layers::health::HealthView;
use watchtower_layers::retry::{Jitter, RetryConfig};

#[tokio::test(start_paused = true)]
async fn tower_timeout_inside_the_stack_is_retried_then_dead_lettered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let dlq = MemoryDeadLetters::new(10);
    let mut svc = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new().max_attempts(3).jitter(Jitter::None))
        .circuit_breaker(CircuitBreakerConfig::new())
        .timeout(Duration::from_secs(1))
        .service(service_fn(move |_: Event| {
            c.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<(), Error>>()
        }));
    let start = tokio::time::Instant::now();
    let outcome = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("slow"))
        .await
        .unwrap();
    let dead = outcome.dead_lettered().expect("dead-lettered");
    assert_eq!(dead.error.kind(), ErrorKind::Timeout);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Three 1 s timeouts and waits of 100 ms and 200 ms.
    assert_eq!(start.elapsed(), Duration::from_millis(3_300));
    let kept = dlq.drain();
    assert_eq!(kept[0].extension(ext::DEAD_LETTER_KIND), Some("timeout"));
    assert_eq!(kept[0].extension(ext::ATTEMPT), Some("3"));
}

#[tokio::test(start_paused = true)]
async fn retry_waits_out_an_open_breaker_then_succeeds() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .minimum_calls(1)
            .open_wait(Duration::from_secs(2))
            .half_open_permits(1),
    );
    let handle = breaker.handle();
    let mut svc = ServiceBuilder::new()
        .dead_letter(MemoryDeadLetters::new(10))
        .retries(
            RetryConfig::new()
                .max_attempts(3)
                .jitter(Jitter::None)
                .max_elapsed(Duration::from_secs(10)),
        )
        .circuit_breaker(breaker)
        .service(service_fn(move |_: Event| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(Error::new(ErrorKind::Connection, "reset"))
                } else {
                    Ok(())
                }
            }
        }));
    let start = tokio::time::Instant::now();
    // The first failure opens the breaker. After 100 ms the retry finds it
    // open with 1.9 s left (attempt 2 fails in readiness), waits exactly
    // that long, and its probe (attempt 3) succeeds.
    let outcome = svc.ready().await.unwrap().call(Event::empty("x")).await.unwrap();
    assert!(outcome.is_delivered());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn an_event_arriving_while_the_breaker_is_open_is_retried_not_dead_lettered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |_: Event| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(Error::new(ErrorKind::Connection, "reset"))
            } else {
                Ok(())
            }
        }
    });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .minimum_calls(1)
            .open_wait(Duration::from_secs(2))
            .half_open_permits(1),
    );
    let handle = breaker.handle();
    // A call past the breaker alone fails and opens it.
    let mut bare = tower::Layer::layer(&breaker, inner.clone());
    let err = bare
        .ready()
        .await
        .unwrap()
        .call(Event::empty("first"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(handle.state(), State::Open);

    // The next event meets `CircuitOpen` in readiness: retry takes it as a
    // failed first attempt, waits out the open breaker and delivers.
    let dlq = MemoryDeadLetters::new(10);
    let mut svc = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new().max_attempts(3).jitter(Jitter::None))
        .circuit_breaker(breaker)
        .service(inner);
    let start = tokio::time::Instant::now();
    let outcome = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("second"))
        .await
        .unwrap();
    assert!(outcome.is_delivered(), "dead-lettered instead of retried");
    assert_eq!(dlq.len(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn health_reports_the_worst_part() {
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .minimum_calls(1)
            .open_wait(Duration::from_secs(5)),
    );
    let queue = BackpressureLayer::new(1, Overflow::DropNewest).concurrency(1);
    let dlq = MemoryDeadLetters::new(10);
    let health = HealthView::new()
        .breaker("broker", breaker.handle())
        .queue("outbox", queue.handle())
        .memory_dead_letters("dlq", dlq.clone());
    assert_eq!(health.report().await.status, Status::Up);

    let mut svc = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .circuit_breaker(breaker.clone())
        .service(service_fn(|_: Event| async {
            Err::<(), _>(Error::new(ErrorKind::Connection, "down"))
        }));
    let _ = svc.ready().await.unwrap().call(Event::empty("x")).await.unwrap();
    let report = health.report().await;
    assert_eq!(report.status, Status::Down);
    assert_eq!(report.breakers[0].metrics.state, State::Open);
    assert_eq!(report.dead_letters[0].len, Some(1));

    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(
        health.report().await.status,
        Status::Degraded,
        "half-open, and a dead letter waits"
    );
    breaker.handle().reset();
    dlq.drain();
    assert_eq!(health.report().await.status, Status::Up);

    let report = serde_json::to_value(health.report().await).unwrap();
    assert_eq!(report["status"], "up");
    assert_eq!(report["breakers"][0]["metrics"]["state"], "closed");
    assert_eq!(report["queues"][0]["stats"]["capacity"], 1);
}

#[tokio::test(start_paused = true)]
async fn drops_below_the_breaker_do_not_trip_it() {
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().minimum_calls(2));
    let handle = breaker.handle();
    let (inner, mut mock) = tower_test::mock::pair::<Event, ()>();
    mock.allow(0);
    let mut svc = ServiceBuilder::new()
        .circuit_breaker(breaker)
        .backpressure(BackpressureLayer::new(1, Overflow::DropNewest).concurrency(1))
        .service(inner);
    let _queued = svc.ready().await.unwrap().call(Event::empty("1"));
    for _ in 0..5 {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(Event::empty("x"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Dropped);
    }
    let m = handle.metrics();
    assert_eq!((m.state, m.window_calls, m.failed_calls), (State::Closed, 0, 0));
}

#[tokio::test]
async fn health_lists_keyed_breakers() {
    use watchtower_layers::circuit_breaker::KeyedBreakers;
    let breakers = KeyedBreakers::new(CircuitBreakerConfig::new(), 10);
    let health = HealthView::new().keyed_breakers("webhook", breakers.clone());
    assert!(health.report().await.breakers.is_empty());
    breakers.get("https://a.example/hook".to_owned()).force_open();
    let report = health.report().await;
    assert_eq!(report.status, Status::Down);
    assert_eq!(report.breakers[0].name, "webhook/https://a.example/hook");
}

/// The recommended stack over a congested transport: calls take 2 s, one
/// at a time, and the timeout above the queue is 1 s, so most attempts time
/// out while queued. No inner call may start for an attempt whose caller
/// has been answered: every call the transport sees starts before its
/// event's caller got its answer.
#[tokio::test(start_paused = true)]
async fn queued_attempts_that_timed_out_are_never_sent() {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU64;

    const EVENTS: usize = 20;
    // One clock for both sides: the order in which calls start and
    // callers are answered.
    let clock = Arc::new(AtomicU64::new(0));
    let started: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let queued = Arc::new(AtomicUsize::new(0));
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();

    let (c, s) = (clock.clone(), started.clone());
    let transport = service_fn(move |e: Event| {
        // Dropped with the service when the worker ends.
        let _worker_alive = &gone_tx;
        s.lock()
            .unwrap()
            .push((e.id().to_owned(), c.fetch_add(1, Ordering::SeqCst)));
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, Error>(())
        }
    });
    let dlq = MemoryDeadLetters::new(EVENTS * 3);
    let queue = BackpressureLayer::new(64, Overflow::Block).concurrency(1);
    let queue_stats = queue.handle();
    let q = queued.clone();
    let svc = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new().max_attempts(3).jitter(Jitter::None))
        .circuit_breaker(CircuitBreakerConfig::new())
        .timeout(Duration::from_secs(1))
        .map_request(move |e: Event| {
            q.fetch_add(1, Ordering::SeqCst);
            e
        })
        .backpressure(queue)
        .service(transport);

    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..EVENTS {
        let event = Event::empty("congested");
        let id = event.id().to_owned();
        let (svc, clock) = (svc.clone(), clock.clone());
        callers.spawn(async move {
            let outcome = svc.oneshot(event).await.expect("an outcome");
            (
                id,
                clock.fetch_add(1, Ordering::SeqCst),
                outcome.is_dead_lettered(),
            )
        });
    }
    drop(svc);
    let answers = callers.join_all().await;
    // Every caller gone, the worker drains what is left and ends.
    tokio::time::timeout(Duration::from_secs(3600), gone_rx)
        .await
        .expect("the worker ends")
        .unwrap_err();

    let started = started.lock().unwrap().clone();
    let mut calls: HashMap<&str, Vec<u64>> = HashMap::new();
    for (id, at) in &started {
        calls.entry(id.as_str()).or_default().push(*at);
    }
    assert_eq!(answers.len(), EVENTS);
    let mut dead_lettered = 0;
    for (id, answered_at, dead) in &answers {
        let starts = calls.get(id.as_str()).map(Vec::as_slice).unwrap_or_default();
        assert!(starts.len() <= 3, "{id}: {} calls for 3 attempts", starts.len());
        assert!(
            starts.iter().all(|at| at < answered_at),
            "{id} was sent after its caller was answered (calls at {starts:?}, answered at {answered_at})"
        );
        dead_lettered += usize::from(*dead);
    }
    assert_eq!(dlq.len(), dead_lettered);
    // Every attempt that reached the queue was either sent or abandoned.
    let stats = queue_stats.stats();
    assert_eq!(
        queued.load(Ordering::SeqCst),
        started.len() + usize::try_from(stats.abandoned).unwrap()
    );
    assert!(stats.abandoned > 0);
    assert_eq!((stats.depth, stats.in_flight), (0, 0));
}

/// A half-open probe that never finishes does not keep the stack refusing:
/// it times out as a failed probe, the breaker probes again after its open
/// wait, and the events that met the refusals are retried and delivered.
#[tokio::test(start_paused = true)]
async fn a_hung_probe_does_not_keep_the_breaker_half_open() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |_: Event| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            match n {
                0 => Err(Error::new(ErrorKind::Connection, "reset")),
                1 => std::future::pending().await,
                _ => Ok(()),
            }
        }
    });
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .minimum_calls(1)
            .open_wait(Duration::from_secs(2))
            .half_open_permits(1),
    );
    let handle = breaker.handle();
    let mut bare = tower::Layer::layer(&breaker, inner.clone());
    let err = bare
        .ready()
        .await
        .unwrap()
        .call(Event::empty("first"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    tokio::time::advance(Duration::from_secs(2)).await;
    // The only probe hangs.
    let _hung = bare.ready().await.unwrap().call(Event::empty("probe"));
    assert_eq!(handle.state(), State::HalfOpen);

    let dlq = MemoryDeadLetters::new(100);
    let svc = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(RetryConfig::new().max_attempts(10).jitter(Jitter::None))
        .circuit_breaker(breaker)
        .service(inner);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..10 {
        callers.spawn(svc.clone().oneshot(Event::empty("next")));
    }
    let outcomes = callers.join_all().await;
    assert!(
        outcomes
            .iter()
            .all(|o| o.as_ref().is_ok_and(|o| o.is_delivered())),
        "every event delivered once the breaker probed again"
    );
    assert_eq!(dlq.len(), 0);
    // The failure, the hung probe, then one call per event.
    assert_eq!(calls.load(Ordering::SeqCst), 12);
    let m = handle.metrics();
    assert_eq!((m.state, m.trips), (State::Closed, 2));
}
