use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::TpsBudget;
use tower::{Layer, Service, ServiceExt, service_fn};
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event};

use super::*;

type Log = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

/// Fails the first `failures` calls with `kind`, logging when each call
/// came and its attempt extension.
fn failing(
    failures: u32,
    kind: ErrorKind,
    retry_after: Option<Duration>,
) -> (impl Service<Event, Response = (), Error = Error> + Clone, Log) {
    let log = Log::default();
    let calls = Arc::new(AtomicU32::new(0));
    let l = log.clone();
    let svc = service_fn(move |e: Event| {
        l.lock()
            .unwrap()
            .push((Instant::now(), e.extension(ext::ATTEMPT).map(str::to_owned)));
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < failures {
                let mut err = Error::new(kind, "fail");
                if let Some(after) = retry_after {
                    err = err.with_retry_after(after);
                }
                Err(err)
            } else {
                Ok(())
            }
        }
    });
    (svc, log)
}

fn gaps(log: &Log) -> Vec<Duration> {
    let log = log.lock().unwrap();
    log.windows(2).map(|w| w[1].0 - w[0].0).collect()
}

#[tokio::test(start_paused = true)]
async fn backoff_schedule_is_reproducible_with_a_seed() {
    let config = RetryConfig::new()
        .max_attempts(5)
        .delays(Duration::from_millis(100), Duration::from_millis(500))
        .max_elapsed(None)
        .seed(7);
    let mut rng = config.rng();
    let expected: Vec<Duration> = (2..=5).map(|n| config.delay_before(n, &mut rng)).collect();
    for (i, d) in expected.iter().enumerate() {
        let cap = Duration::from_millis((100u64 << i).min(500));
        assert!(
            *d >= Duration::from_millis(100) && *d <= cap,
            "{d:?} outside [100ms, {cap:?}]"
        );
    }
    let hooked = Arc::new(Mutex::new(Vec::new()));
    let h = hooked.clone();
    let layer = RetryLayer::new(config.on_retry(move |a| h.lock().unwrap().push((a.attempt, a.delay))));
    let (inner, log) = failing(10, ErrorKind::Connection, None);
    let mut svc = layer.layer(inner);
    let mut err = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(gaps(&log), expected);
    let attempts: Vec<_> = log.lock().unwrap().iter().map(|(_, a)| a.clone()).collect();
    assert_eq!(
        attempts,
        [
            None,
            Some("2".into()),
            Some("3".into()),
            Some("4".into()),
            Some("5".into())
        ]
    );
    assert_eq!(*hooked.lock().unwrap(), (2..=5).zip(expected).collect::<Vec<_>>());
    let event = err.take_event().expect("the event comes back");
    assert_eq!(event.extension(ext::ATTEMPT), Some("5"));
    assert_eq!(
        layer.handle().stats(),
        RetryStats {
            retries: 4,
            exhausted: 1,
            ..Default::default()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn without_jitter_delays_double_up_to_the_cap() {
    let layer = RetryLayer::new(
        RetryConfig::new()
            .max_attempts(6)
            .jitter(Jitter::None)
            .delays(Duration::from_millis(100), Duration::from_millis(500))
            .max_elapsed(None),
    );
    let (inner, log) = failing(5, ErrorKind::Timeout, None);
    let mut svc = layer.layer(inner);
    svc.ready().await.unwrap().call(Event::empty("x")).await.unwrap();
    let ms: Vec<u128> = gaps(&log).iter().map(Duration::as_millis).collect();
    assert_eq!(ms, [100, 200, 400, 500, 500]);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_errors_are_returned_at_once() {
    let layer = RetryLayer::new(RetryConfig::new());
    let (inner, log) = failing(1, ErrorKind::Rejected, None);
    let mut svc = layer.layer(inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert_eq!(err.event().map(Event::ty), Some("x"));
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(layer.handle().stats().not_retryable, 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_hint_is_honoured() {
    let layer = RetryLayer::new(RetryConfig::new().jitter(Jitter::None));
    let (inner, log) = failing(1, ErrorKind::Throttled, Some(Duration::from_secs(5)));
    let mut svc = layer.layer(inner);
    svc.ready().await.unwrap().call(Event::empty("x")).await.unwrap();
    assert_eq!(gaps(&log), [Duration::from_secs(5)]);
}

#[tokio::test(start_paused = true)]
async fn gives_up_when_the_next_wait_would_pass_max_elapsed() {
    let layer = RetryLayer::new(
        RetryConfig::new()
            .max_attempts(10)
            .jitter(Jitter::None)
            .delays(Duration::from_secs(10), Duration::from_secs(60))
            .max_elapsed(Duration::from_secs(15)),
    );
    let (inner, log) = failing(10, ErrorKind::Connection, None);
    let mut svc = layer.layer(inner);
    let start = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    // 0 s first attempt, 10 s second; a third would start at 30 s > 15 s.
    assert_eq!(log.lock().unwrap().len(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_stops_retries() {
    let layer = RetryLayer::new(RetryConfig::new().budget(TpsBudget::new(Duration::from_secs(10), 0, 0.0)));
    let (inner, log) = failing(5, ErrorKind::Connection, None);
    let mut svc = layer.layer(inner);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(layer.handle().stats().budget_exhausted, 1);
}

#[tokio::test(start_paused = true)]
async fn each_retry_waits_for_readiness_of_its_own_clone() {
    let layer = RetryLayer::new(RetryConfig::new().jitter(Jitter::None));
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, &'static str, _>(layer);
    mock.allow(1);
    assert!(svc.poll_ready().is_ready());
    let fut = tokio::spawn(svc.call(Event::empty("x")));
    let (_, respond) = mock.next_request().await.unwrap();
    respond.send_error(Error::new(ErrorKind::Connection, "reset"));
    // The retry is due after 100 ms but the service is not ready: nothing is sent.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1), mock.next_request())
            .await
            .is_err()
    );
    mock.allow(1);
    let (event, respond) = mock.next_request().await.unwrap();
    assert_eq!(event.extension(ext::ATTEMPT), Some("2"));
    respond.send_response("sent");
    assert_eq!(fut.await.unwrap().unwrap(), "sent");
}

/// Answers each request of `mock` with the next error of `errors`, then
/// with `"sent"`; returns the ids of the events that came.
async fn answer_with(
    mut mock: tower_test::mock::Handle<Event, &'static str>,
    errors: Vec<Error>,
) -> Vec<String> {
    let mut errors = errors.into_iter();
    let mut calls = Vec::new();
    while let Some((event, respond)) = mock.next_request().await {
        calls.push(event.id().to_owned());
        match errors.next() {
            Some(e) => respond.send_error(e),
            None => respond.send_response("sent"),
        }
    }
    calls
}

fn throttled(after: Duration) -> Error {
    Error::new(ErrorKind::Throttled, "503").with_retry_after(after)
}

#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_within_max_elapsed_gives_up_without_panic() {
    let layer = RetryLayer::new(RetryConfig::new().max_attempts(5).jitter(Jitter::None));
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, &'static str, _>(layer.clone());
    mock.allow(10);
    let answers = tokio::spawn(answer_with(
        mock,
        vec![
            throttled(Duration::from_secs(1)),
            throttled(Duration::from_secs(u64::MAX)),
        ],
    ));
    assert!(svc.poll_ready().is_ready());
    let start = Instant::now();
    let mut err = svc.call(Event::empty("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(u64::MAX)));
    assert_eq!(err.take_event().map(|e| e.ty().to_owned()).as_deref(), Some("x"));
    // Waited the 1 s hint, then gave up at once: the capped hint (60 s)
    // would pass the 30 s limit.
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    drop(svc);
    assert_eq!(answers.await.unwrap().len(), 2);
    let stats = layer.handle().stats();
    assert_eq!((stats.retries, stats.exhausted), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn without_max_elapsed_a_huge_retry_after_waits_the_cap() {
    let layer = RetryLayer::new(
        RetryConfig::new()
            .max_attempts(5)
            .jitter(Jitter::None)
            .max_elapsed(None)
            .max_retry_after(Duration::from_secs(20)),
    );
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, &'static str, _>(layer.clone());
    mock.allow(10);
    let answers = tokio::spawn(answer_with(
        mock,
        vec![
            throttled(Duration::from_secs(1)),
            throttled(Duration::from_secs(u64::MAX)),
            throttled(Duration::MAX),
        ],
    ));
    assert!(svc.poll_ready().is_ready());
    let start = Instant::now();
    let event = Event::empty("x");
    let id = event.id().to_owned();
    assert_eq!(svc.call(event).await.unwrap(), "sent");
    assert_eq!(start.elapsed(), Duration::from_secs(1 + 20 + 20));
    drop(svc);
    // Every attempt carries the same event id, for consumers to dedup by.
    assert_eq!(answers.await.unwrap(), vec![id; 4]);
    assert_eq!(layer.handle().stats().retries, 3);
}

#[tokio::test(start_paused = true)]
async fn a_hint_past_max_elapsed_gives_up_now_rather_than_sleep() {
    let layer = RetryLayer::new(
        RetryConfig::new()
            .jitter(Jitter::None)
            .max_elapsed(Duration::from_secs(10))
            .max_retry_after(Duration::from_secs(3600)),
    );
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Event, &'static str, _>(layer.clone());
    mock.allow(10);
    let answers = tokio::spawn(answer_with(mock, vec![throttled(Duration::from_secs(11))]));
    assert!(svc.poll_ready().is_ready());
    let start = Instant::now();
    let err = svc.call(Event::empty("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert_eq!(start.elapsed(), Duration::ZERO);
    drop(svc);
    assert_eq!(answers.await.unwrap().len(), 1);
    assert_eq!(layer.handle().stats().exhausted, 1);
}

#[test]
fn extreme_settings_saturate_instead_of_overflowing() {
    let config = RetryConfig::new()
        .max_attempts(u32::MAX)
        .multiplier(f64::MAX)
        .delays(Duration::MAX, Duration::MAX)
        .jitter(Jitter::None);
    let mut rng = config.rng();
    assert_eq!(config.delay_before(u32::MAX, &mut rng), Duration::MAX);
    let full = config.clone().jitter(Jitter::Full);
    assert_eq!(full.delay_before(3, &mut rng), Duration::MAX);
}
