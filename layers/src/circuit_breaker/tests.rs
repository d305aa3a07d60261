use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt, service_fn};
use watchtower::{Error, ErrorKind, Event};

use super::*;

type Calls = Arc<AtomicUsize>;

/// Fails events of type `fail` (connection) and `bad` (rejected); `slow`
/// takes two seconds.
fn flaky(calls: Calls) -> impl Service<Event, Response = (), Error = Error, Future: Send> + Clone {
    service_fn(move |e: Event| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match e.ty() {
                "fail" => Err(Error::new(ErrorKind::Connection, "down")),
                "bad" => Err(Error::new(ErrorKind::Rejected, "bad request")),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok(())
                }
                _ => Ok(()),
            }
        }
    })
}

async fn send<S>(svc: &mut S, ty: &str) -> Result<(), Error>
where
    S: Service<Event, Response = (), Error = Error>,
{
    svc.ready().await?.call(Event::empty(ty)).await
}

fn config() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .sliding_window(SlidingWindow::count(10))
        .minimum_calls(4)
        .failure_rate_threshold(50.0)
        .open_wait(Duration::from_secs(10))
        .half_open_permits(2)
}

#[tokio::test(start_paused = true)]
async fn opens_only_after_minimum_calls_at_threshold() {
    let calls = Calls::default();
    let layer = CircuitBreakerLayer::new(config());
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(calls.clone()));
    for _ in 0..3 {
        assert_eq!(
            send(&mut svc, "fail").await.unwrap_err().kind(),
            ErrorKind::Connection
        );
    }
    // Three failures of three calls, but the minimum is four.
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().failure_rate, None);
    send(&mut svc, "ok").await.unwrap();
    // 3 of 4 failed: 75 % >= 50 %.
    assert_eq!(handle.state(), State::Open);
    let m = handle.metrics();
    // The window that tripped the breaker stays readable until it closes.
    assert_eq!((m.window_calls, m.window_failures, m.trips), (4, 3, 1));
    assert_eq!(m.open_remaining, Some(Duration::from_secs(10)));

    let err = send(&mut svc, "ok").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(10)));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "an open breaker never calls the service"
    );
    assert_eq!(handle.metrics().rejected_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn below_threshold_stays_closed_and_window_rolls() {
    let layer = CircuitBreakerLayer::new(config().sliding_window(SlidingWindow::count(4)));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    for ty in ["fail", "ok", "ok", "ok", "ok", "ok", "fail"] {
        let _ = send(&mut svc, ty).await;
    }
    let m = handle.metrics();
    assert_eq!(m.state, State::Closed);
    // The window of four holds ok, ok, ok, fail: the first failure rolled out.
    assert_eq!((m.window_calls, m.window_failures), (4, 1));
    assert_eq!(m.failure_rate, Some(25.0));
    assert_eq!((m.successful_calls, m.failed_calls), (5, 2));
}

#[tokio::test(start_paused = true)]
async fn caller_errors_do_not_trip_by_default() {
    let layer = CircuitBreakerLayer::new(config());
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    for _ in 0..10 {
        assert_eq!(
            send(&mut svc, "bad").await.unwrap_err().kind(),
            ErrorKind::Rejected
        );
    }
    assert_eq!(handle.state(), State::Closed);

    let layer = CircuitBreakerLayer::new(config().classifier(|_| Verdict::Failure));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    for _ in 0..4 {
        let _ = send(&mut svc, "bad").await;
    }
    assert_eq!(
        handle.state(),
        State::Open,
        "a custom classifier counts every error"
    );
}

async fn trip<S: Service<Event, Response = (), Error = Error>>(svc: &mut S) {
    for _ in 0..4 {
        let _ = send(svc, "fail").await;
    }
}

#[tokio::test(start_paused = true)]
async fn half_open_after_wait_then_closes_on_good_probes() {
    let changes = Arc::new(Mutex::new(Vec::new()));
    let log = changes.clone();
    let layer =
        CircuitBreakerLayer::new(config().on_state_change(move |c| log.lock().unwrap().push((c.from, c.to))));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    trip(&mut svc).await;
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert_eq!(handle.state(), State::Open);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(handle.state(), State::HalfOpen);

    // Two probe permits, reserved in poll_ready; the third caller is refused.
    let mut a = svc.clone();
    let mut b = svc.clone();
    let mut c = svc.clone();
    a.ready().await.unwrap();
    b.ready().await.unwrap();
    assert_eq!(c.ready().await.err().unwrap().kind(), ErrorKind::CircuitOpen);
    a.call(Event::empty("ok")).await.unwrap();
    assert_eq!(handle.state(), State::HalfOpen);
    b.call(Event::empty("ok")).await.unwrap();
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(
        *changes.lock().unwrap(),
        vec![
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed)
        ]
    );
    send(&mut c, "ok").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failed_probes_reopen_with_growing_wait() {
    let layer = CircuitBreakerLayer::new(
        config()
            .half_open_permits(1)
            .open_wait_backoff(2.0, Duration::from_secs(30)),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    trip(&mut svc).await;
    for expected in [20, 30, 30] {
        tokio::time::advance(handle.metrics().open_remaining.unwrap()).await;
        assert_eq!(
            send(&mut svc, "fail").await.unwrap_err().kind(),
            ErrorKind::Connection
        );
        assert_eq!(handle.state(), State::Open);
        assert_eq!(
            handle.metrics().open_remaining,
            Some(Duration::from_secs(expected))
        );
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    send(&mut svc, "ok").await.unwrap();
    assert_eq!(handle.state(), State::Closed);
    // A close resets the backoff.
    trip(&mut svc).await;
    assert_eq!(handle.metrics().open_remaining, Some(Duration::from_secs(10)));
    assert_eq!(handle.metrics().trips, 5);
}

#[tokio::test(start_paused = true)]
async fn probe_slot_comes_back_when_service_or_future_is_dropped() {
    let layer = CircuitBreakerLayer::new(config().half_open_permits(1));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    trip(&mut svc).await;
    tokio::time::advance(Duration::from_secs(10)).await;

    let mut holder = svc.clone();
    holder.ready().await.unwrap();
    assert_eq!(svc.ready().await.err().unwrap().kind(), ErrorKind::CircuitOpen);
    drop(holder);
    let mut holder = svc.clone();
    holder.ready().await.unwrap();
    let fut = holder.call(Event::empty("slow"));
    assert_eq!(svc.ready().await.err().unwrap().kind(), ErrorKind::CircuitOpen);
    drop(fut);
    assert_eq!(
        handle.state(),
        State::HalfOpen,
        "a cancelled probe records nothing"
    );
    send(&mut svc, "ok").await.unwrap();
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn permit_is_held_while_inner_is_not_ready() {
    let layer = CircuitBreakerLayer::new(config().half_open_permits(1));
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, (), _>(layer);
    handle.force_open();
    handle.reset();
    mock.allow(0);
    assert!(svc.poll_ready().is_pending());
    mock.allow(1);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Event::empty("x"));
    let (event, respond) = mock.next_request().await.unwrap();
    assert_eq!(event.ty(), "x");
    respond.send_error(Error::new(ErrorKind::Timeout, "slow"));
    assert_eq!(fut.await.unwrap_err().kind(), ErrorKind::Timeout);
    assert_eq!(handle.metrics().failed_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn half_open_probe_reserved_while_inner_pending() {
    let layer = CircuitBreakerLayer::new(config().half_open_permits(1));
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, (), _>(layer.clone());
    let mut other = layer.layer(flaky(Calls::default()));
    trip(&mut other).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    mock.allow(0);
    assert!(svc.poll_ready().is_pending());
    // The pending service holds the only probe slot.
    assert_eq!(other.ready().await.err().unwrap().kind(), ErrorKind::CircuitOpen);
    drop(svc);
    other.ready().await.unwrap();
    other.call(Event::empty("ok")).await.unwrap();
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip() {
    let layer = CircuitBreakerLayer::new(config().minimum_calls(2).slow_call(Duration::from_secs(1), 50.0));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    send(&mut svc, "ok").await.unwrap();
    send(&mut svc, "slow").await.unwrap();
    let m = handle.metrics();
    assert_eq!(m.state, State::Open);
    assert_eq!(m.failed_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let layer = CircuitBreakerLayer::new(config().minimum_calls(2).sliding_window(SlidingWindow::Time {
        size: Duration::from_secs(10),
        buckets: 10,
    }));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    let _ = send(&mut svc, "fail").await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let _ = send(&mut svc, "ok").await;
    assert_eq!(handle.metrics().window_calls, 1);
    let _ = send(&mut svc, "fail").await;
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn count_window_too_large_for_the_ring_behaves_the_same() {
    let size = super::window::ATOMIC_MAX + 1;
    let layer = CircuitBreakerLayer::new(config().sliding_window(SlidingWindow::count(size)));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    for ty in ["ok", "fail", "bad", "ok"] {
        let _ = send(&mut svc, ty).await;
    }
    let m = handle.metrics();
    assert_eq!(
        (
            m.state,
            m.window_calls,
            m.window_failures,
            m.successful_calls,
            m.failed_calls
        ),
        (State::Closed, 4, 1, 3, 1)
    );
    let _ = send(&mut svc, "fail").await;
    let _ = send(&mut svc, "fail").await;
    // 3 of 6 failed: 50 % >= 50 %.
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_are_all_counted() {
    const TASKS: usize = 8;
    const EACH: usize = 250;
    let calls = Calls::default();
    let layer = CircuitBreakerLayer::new(config().sliding_window(SlidingWindow::count(64)));
    let handle = layer.handle();
    // Every outcome is recorded, but a burst of failures may not open it.
    handle.metrics_only();
    let svc = layer.layer(flaky(calls.clone()));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..EACH {
                    let ty = if (i + t) % 4 == 0 { "fail" } else { "ok" };
                    let _ = send(&mut svc, ty).await;
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), TASKS * EACH);
    let m = handle.metrics();
    assert_eq!(m.state, State::MetricsOnly);
    assert_eq!((m.successful_calls, m.failed_calls), (1500, 500));
    assert_eq!(m.window_calls, 64, "the window holds exactly the last 64");
    assert!(m.window_failures <= 64);

    // Back to closed: the window starts empty and fills again exactly.
    handle.reset();
    let mut svc = svc.clone();
    for _ in 0..3 {
        send(&mut svc, "ok").await.unwrap();
    }
    let m = handle.metrics();
    assert_eq!(
        (m.state, m.window_calls, m.window_failures),
        (State::Closed, 3, 0)
    );
    assert_eq!(m.successful_calls, 1503);
}

#[tokio::test(start_paused = true)]
async fn forced_disabled_and_metrics_only() {
    let calls = Calls::default();
    let rejected = Arc::new(AtomicUsize::new(0));
    let r = rejected.clone();
    let layer = CircuitBreakerLayer::new(config().on_rejected(move || {
        r.fetch_add(1, Ordering::SeqCst);
    }));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(calls.clone()));

    handle.force_open();
    tokio::time::advance(Duration::from_secs(3600)).await;
    let err = send(&mut svc, "ok").await.unwrap_err();
    // Forced open has no end the breaker knows: callers are told to check
    // back after the open wait.
    assert_eq!(
        (err.kind(), err.retry_after()),
        (ErrorKind::CircuitOpen, Some(Duration::from_secs(10)))
    );
    assert_eq!(rejected.load(Ordering::SeqCst), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    handle.disable();
    trip(&mut svc).await;
    assert_eq!(handle.state(), State::Disabled);
    assert_eq!(handle.metrics().failed_calls, 0, "disabled records nothing");

    handle.metrics_only();
    trip(&mut svc).await;
    trip(&mut svc).await;
    let m = handle.metrics();
    assert_eq!(
        (m.state, m.failed_calls, m.window_failures),
        (State::MetricsOnly, 8, 8)
    );

    handle.reset();
    assert_eq!(handle.metrics().window_calls, 0);
    trip(&mut svc).await;
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn wait_when_open_waits_instead_of_failing() {
    let calls = Calls::default();
    let layer = CircuitBreakerLayer::new(config().wait_when_open(true));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(calls.clone()));
    trip(&mut svc).await;
    let start = tokio::time::Instant::now();
    send(&mut svc, "ok").await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(handle.metrics().rejected_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn outcomes_from_an_earlier_state_are_ignored() {
    let layer = CircuitBreakerLayer::new(config().half_open_permits(1));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    let mut early = svc.clone();
    early.ready().await.unwrap();
    let slow = tokio::spawn(early.call(Event::empty("slow")));
    trip(&mut svc).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(handle.state(), State::HalfOpen);
    // The slow call admitted while closed ends now, in half-open: no effect.
    slow.await.unwrap().unwrap();
    assert_eq!(handle.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_are_independent_and_bounded() {
    let calls = Calls::default();
    let layer = KeyedCircuitBreakerLayer::new(config(), 2, |e: &Event| e.subject().unwrap_or("").to_owned());
    let breakers = layer.breakers();
    let mut svc = layer.layer(flaky(calls.clone()));
    let ev = |ty: &str, key: &str| Event::builder(ty).subject(key).build().unwrap();
    for _ in 0..4 {
        let _ = svc.ready().await.unwrap().call(ev("fail", "a")).await;
    }
    assert_eq!(breakers.get("a".into()).state(), State::Open);
    let mut err = svc.ready().await.unwrap().call(ev("ok", "a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert_eq!(
        err.take_event().unwrap().subject(),
        Some("a"),
        "the refused event comes back"
    );
    svc.ready().await.unwrap().call(ev("ok", "b")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    // A third key evicts the least recently used closed breaker ("b"), not the open one.
    svc.ready().await.unwrap().call(ev("ok", "c")).await.unwrap();
    assert_eq!(breakers.len(), 2);
    let mut keys: Vec<String> = breakers.handles().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    assert_eq!(keys, ["a", "c"]);
}

/// Many callers waiting on an open breaker all get through once the
/// probes close it again: none is left waiting in half-open.
#[tokio::test(start_paused = true)]
async fn many_waiting_callers_all_get_through_after_the_probes() {
    let calls = Calls::default();
    let layer = CircuitBreakerLayer::new(config().wait_when_open(true));
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(calls.clone()));
    trip(&mut svc).await;
    let before = calls.load(Ordering::SeqCst);
    let waiting: Vec<_> = (0..255)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { send(&mut svc, "ok").await })
        })
        .collect();
    for caller in waiting {
        tokio::time::timeout(Duration::from_secs(60), caller)
            .await
            .expect("every waiting caller gets through")
            .unwrap()
            .unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst) - before, 255);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().rejected_calls, 0);
}

/// The same with probes that fail first: the breaker opens again, the
/// callers wait another round, and the next probes close it.
#[tokio::test(start_paused = true)]
async fn waiting_callers_survive_a_failed_probe_round() {
    let calls = Calls::default();
    let fail_next = Arc::new(AtomicUsize::new(2));
    let inner = {
        let fail_next = fail_next.clone();
        let calls = calls.clone();
        service_fn(move |_: Event| {
            calls.fetch_add(1, Ordering::SeqCst);
            let fail = fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            async move {
                if fail {
                    Err(Error::new(ErrorKind::Connection, "down"))
                } else {
                    Ok(())
                }
            }
        })
    };
    let layer = CircuitBreakerLayer::new(config().wait_when_open(true));
    let handle = layer.handle();
    let mut tripper = layer.layer(flaky(Calls::default()));
    trip(&mut tripper).await;
    let svc = layer.layer(inner);
    let waiting: Vec<_> = (0..64)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { send(&mut svc, "ok").await })
        })
        .collect();
    let mut failed = 0;
    for caller in waiting {
        match tokio::time::timeout(Duration::from_secs(60), caller)
            .await
            .expect("every waiting caller finishes")
            .unwrap()
        {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Connection);
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 2, "only the two failing probes fail");
    assert_eq!(calls.load(Ordering::SeqCst), 64);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().trips, 2);
}

type MockHandle = tower_test::mock::Handle<Event, ()>;

/// A breaker over a mock, opened by one failure: one probe permit, 10 s
/// open wait (and so a 10 s probe timeout).
async fn opened_over_mock() -> (
    tower_test::mock::Spawn<CircuitBreaker<tower_test::mock::Mock<Event, ()>>>,
    MockHandle,
    CircuitBreakerHandle,
) {
    let layer = CircuitBreakerLayer::new(config().minimum_calls(1).half_open_permits(1));
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, (), _>(layer);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Event::empty("x"));
    let (_, respond) = mock.next_request().await.unwrap();
    respond.send_error(Error::new(ErrorKind::Connection, "down"));
    assert_eq!(fut.await.unwrap_err().kind(), ErrorKind::Connection);
    assert_eq!(handle.state(), State::Open);
    (svc, mock, handle)
}

fn rejection<S: Service<Event, Error = Error>>(svc: &mut tower_test::mock::Spawn<S>) -> Error {
    match svc.poll_ready() {
        std::task::Poll::Ready(Err(e)) => {
            assert_eq!(e.kind(), ErrorKind::CircuitOpen);
            e
        }
        other => panic!(
            "expected a CircuitOpen rejection, got {:?}",
            other.map(|r| r.is_ok())
        ),
    }
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_never_finishes_times_out_as_a_failure() {
    let (mut svc, mut mock, handle) = opened_over_mock().await;
    let mut other = tower_test::mock::Spawn::new(svc.get_ref().clone());
    assert_eq!(rejection(&mut other).retry_after(), Some(Duration::from_secs(10)));
    tokio::time::advance(Duration::from_secs(10)).await;

    // The only probe is sent and never answered.
    assert!(svc.poll_ready().is_ready());
    let stuck = svc.call(Event::empty("probe"));
    let (_, stuck_respond) = mock.next_request().await.unwrap();
    assert_eq!(handle.state(), State::HalfOpen);
    // Refused while the probe runs, told to check back within a second,
    // or when it times out if that is sooner.
    assert_eq!(rejection(&mut other).retry_after(), Some(Duration::from_secs(1)));
    tokio::time::advance(Duration::from_millis(9_600)).await;
    assert_eq!(
        rejection(&mut other).retry_after(),
        Some(Duration::from_millis(400))
    );
    tokio::time::advance(Duration::from_millis(400)).await;

    // Timed out: counted as a failed probe, the breaker opens again.
    assert_eq!(handle.state(), State::Open);
    assert_eq!(rejection(&mut other).retry_after(), Some(Duration::from_secs(10)));
    let m = handle.metrics();
    assert_eq!((m.trips, m.open_remaining), (2, Some(Duration::from_secs(10))));

    // After the wait, a new probe goes and closes it.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(other.poll_ready().is_ready());
    let probe = other.call(Event::empty("probe 2"));
    let (event, respond) = mock.next_request().await.unwrap();
    assert_eq!(event.ty(), "probe 2");
    respond.send_response(());
    probe.await.unwrap();
    assert_eq!(handle.state(), State::Closed);

    // The stuck probe finishing late changes nothing.
    stuck_respond.send_error(Error::new(ErrorKind::Connection, "late"));
    assert_eq!(stuck.await.unwrap_err().kind(), ErrorKind::Connection);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().trips, 2);
}

#[tokio::test(start_paused = true)]
async fn the_probe_timeout_is_configurable() {
    let layer = CircuitBreakerLayer::new(
        config()
            .minimum_calls(1)
            .half_open_permits(2)
            .probe_timeout(Duration::from_secs(3)),
    );
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, (), _>(layer);
    let mut other = tower_test::mock::Spawn::new(svc.get_ref().clone());
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Event::empty("x"));
    let (_, respond) = mock.next_request().await.unwrap();
    respond.send_error(Error::new(ErrorKind::Connection, "down"));
    fut.await.unwrap_err();
    tokio::time::advance(Duration::from_secs(10)).await;

    // Two probes: one answers well, one hangs.
    assert!(svc.poll_ready().is_ready());
    let good = svc.call(Event::empty("good"));
    assert!(other.poll_ready().is_ready());
    let _hung = other.call(Event::empty("hung"));
    let (_, respond) = mock.next_request().await.unwrap();
    respond.send_response(());
    good.await.unwrap();
    let mut third = tower_test::mock::Spawn::new(svc.get_ref().clone());
    tokio::time::advance(Duration::from_millis(2_500)).await;
    assert_eq!(
        rejection(&mut third).retry_after(),
        Some(Duration::from_millis(500))
    );
    assert_eq!(handle.state(), State::HalfOpen);
    tokio::time::advance(Duration::from_millis(500)).await;
    // One success and one timed-out failure of two: 50 %, at the threshold.
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_permit_back_at_once() {
    let (mut svc, mut mock, handle) = opened_over_mock().await;
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(svc.poll_ready().is_ready());
    let probe = svc.call(Event::empty("probe"));
    let (_, _unanswered) = mock.next_request().await.unwrap();
    let mut other = tower_test::mock::Spawn::new(svc.get_ref().clone());
    rejection(&mut other);
    drop(probe);
    assert_eq!(handle.state(), State::HalfOpen, "a dropped probe records nothing");
    assert!(other.poll_ready().is_ready(), "its permit is free again");
    let probe = other.call(Event::empty("probe 2"));
    let (_, respond) = mock.next_request().await.unwrap();
    respond.send_response(());
    probe.await.unwrap();
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn every_rejection_says_when_to_try_again() {
    let (mut svc, mut mock, handle) = opened_over_mock().await;
    // Just opened.
    assert_eq!(rejection(&mut svc).retry_after(), Some(Duration::from_secs(10)));
    // Open for a while.
    tokio::time::advance(Duration::from_secs(7)).await;
    assert_eq!(rejection(&mut svc).retry_after(), Some(Duration::from_secs(3)));
    // Half-open with every probe permit taken.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(svc.poll_ready().is_ready());
    let probe = svc.call(Event::empty("probe"));
    let (_, respond) = mock.next_request().await.unwrap();
    let mut other = tower_test::mock::Spawn::new(svc.get_ref().clone());
    assert_eq!(rejection(&mut other).retry_after(), Some(Duration::from_secs(1)));
    respond.send_response(());
    probe.await.unwrap();
    assert_eq!(handle.state(), State::Closed);
    // Forced open: the open wait, to check back.
    handle.force_open();
    assert_eq!(rejection(&mut other).retry_after(), Some(Duration::from_secs(10)));
    assert_eq!(handle.metrics().rejected_calls, 4);
}

#[tokio::test(start_paused = true)]
async fn a_caller_waiting_on_a_hung_probe_gets_through_after_the_next_round() {
    let layer = CircuitBreakerLayer::new(
        config()
            .minimum_calls(1)
            .half_open_permits(1)
            .wait_when_open(true),
    );
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, (), _>(layer);
    assert!(svc.poll_ready().is_ready());
    let fut = svc.call(Event::empty("x"));
    let (_, respond) = mock.next_request().await.unwrap();
    respond.send_error(Error::new(ErrorKind::Connection, "down"));
    fut.await.unwrap_err();
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(svc.poll_ready().is_ready());
    let _hung = svc.call(Event::empty("hung"));
    let (_, _never) = mock.next_request().await.unwrap();

    let mut waiter = svc.get_ref().clone();
    let start = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(60), waiter.ready())
        .await
        .expect("the waiter is not left waiting")
        .unwrap();
    // 10 s until the probe times out, then 10 s open again.
    assert_eq!(start.elapsed(), Duration::from_secs(20));
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(handle.metrics().trips, 2);
}

#[tokio::test(start_paused = true)]
async fn an_endless_open_wait_saturates_instead_of_overflowing() {
    let layer = CircuitBreakerLayer::new(
        config()
            .open_wait(Duration::MAX)
            .open_wait_backoff(f64::MAX, Duration::MAX),
    );
    let handle = layer.handle();
    let mut svc = layer.layer(flaky(Calls::default()));
    trip(&mut svc).await;
    assert_eq!(handle.state(), State::Open);
    let err = send(&mut svc, "ok").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert!(err.retry_after().unwrap() > Duration::from_secs(86_400 * 365));
}
