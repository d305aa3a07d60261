//! The layers' metrics (feature `metrics`), read back from a Prometheus
//! recorder of each test's own.
#![cfg(feature = "metrics")]

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tower::{Service, ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::{Error, ErrorKind, Event};
use watchtower_layers::backpressure::{Backpressure, BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerLayer, KeyedCircuitBreakerLayer, State,
};

fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

/// Every sample of `metric` whose labels include `labels`.
fn samples(prometheus: &PrometheusHandle, metric: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let text = prometheus.render();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{metric}: unexpected {other:?}"),
        })
        .collect()
}

fn one(prometheus: &PrometheusHandle, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match samples(prometheus, metric, labels)[..] {
        [v] => v,
        ref other => panic!("{metric} {labels:?}: {other:?}"),
    }
}

fn transitions(prometheus: &PrometheusHandle, name: &str, from: &str, to: &str) -> f64 {
    let labels = [("name", name), ("from", from), ("to", to)];
    samples(prometheus, "watchtower_breaker_transitions_total", &labels)
        .first()
        .copied()
        .unwrap_or(0.0)
}

fn failing() -> impl Service<Event, Response = (), Error = Error, Future: Send> + Clone {
    service_fn(|event: Event| async move {
        match event.ty() {
            "fail" => Err(Error::new(ErrorKind::Connection, "refused")),
            _ => Ok(()),
        }
    })
}

#[tokio::test(start_paused = true)]
async fn the_breaker_gauge_and_transitions_follow_every_state() {
    let (recorder, prometheus) = recorder();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("payments")
            .minimum_calls(2)
            .open_wait(Duration::from_secs(10))
            .half_open_permits(1),
    );
    let handle = breaker.handle();
    let mut svc = ServiceBuilder::new().layer(breaker).service(failing());
    let state = |p: &PrometheusHandle| one(p, "watchtower_breaker_state", &[("name", "payments")]);
    assert_eq!(state(&prometheus), 0.0);

    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call(Event::empty("fail")).await;
    }
    assert_eq!(handle.state(), State::Open);
    assert_eq!(state(&prometheus), 2.0);
    assert_eq!(
        svc.ready().await.err().map(|e| e.kind()),
        Some(ErrorKind::CircuitOpen)
    );
    assert_eq!(
        one(
            &prometheus,
            "watchtower_breaker_rejected_total",
            &[("name", "payments")]
        ),
        1.0
    );

    // Half-open once the wait has passed and someone looks; the probe fails.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(state(&prometheus), 1.0);
    let _ = svc.ready().await.unwrap().call(Event::empty("fail")).await;
    assert_eq!(state(&prometheus), 2.0);
    // The next probe succeeds.
    tokio::time::advance(Duration::from_secs(10)).await;
    svc.ready().await.unwrap().call(Event::empty("ok")).await.unwrap();
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(state(&prometheus), 0.0);

    handle.force_open();
    assert_eq!(state(&prometheus), 3.0);
    handle.disable();
    assert_eq!(state(&prometheus), -1.0);
    handle.metrics_only();
    assert_eq!(state(&prometheus), -2.0);
    handle.reset();
    assert_eq!(state(&prometheus), 0.0);

    let t = |from, to| transitions(&prometheus, "payments", from, to);
    assert_eq!(t("closed", "open"), 1.0);
    assert_eq!(t("open", "half_open"), 2.0);
    assert_eq!(t("half_open", "open"), 1.0);
    assert_eq!(t("half_open", "closed"), 1.0);
    assert_eq!(t("closed", "forced_open"), 1.0);
    assert_eq!(t("forced_open", "disabled"), 1.0);
    assert_eq!(t("disabled", "metrics_only"), 1.0);
    assert_eq!(t("metrics_only", "closed"), 1.0);
    let all: f64 = samples(
        &prometheus,
        "watchtower_breaker_transitions_total",
        &[("name", "payments")],
    )
    .iter()
    .sum();
    assert_eq!(all, 9.0);
    // The handle's own counters agree.
    assert_eq!(handle.metrics().rejected_calls, 1);
    assert_eq!(handle.metrics().trips, 2);
}

#[tokio::test]
async fn keyed_breakers_sum_over_their_keys_without_a_state_gauge() {
    let (recorder, prometheus) = recorder();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let layer = KeyedCircuitBreakerLayer::new(
        CircuitBreakerConfig::new().name("hooks").minimum_calls(1),
        16,
        |event: &Event| event.subject().unwrap_or_default().to_owned(),
    );
    let mut svc = ServiceBuilder::new().layer(layer).service(failing());
    for url in ["a", "b", "a", "b", "a"] {
        let mut event = Event::empty("fail");
        event.set_subject(Some(url));
        let _ = svc.ready().await.unwrap().call(event).await;
    }
    // Each key opened once; each was then refused (a twice, b once).
    assert_eq!(transitions(&prometheus, "hooks", "closed", "open"), 2.0);
    assert_eq!(
        one(
            &prometheus,
            "watchtower_breaker_rejected_total",
            &[("name", "hooks")]
        ),
        3.0
    );
    assert_eq!(
        samples(&prometheus, "watchtower_breaker_state", &[]),
        Vec::<f64>::new()
    );
}

#[tokio::test]
async fn the_queue_reports_depth_and_evictions_and_an_unnamed_layer_is_default() {
    let (recorder, prometheus) = recorder();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let layer = BackpressureLayer::new(1, Overflow::DropOldest);
    // The worker is not run: events stay queued.
    let (mut svc, worker) = Backpressure::pair(failing(), &layer);
    let first = svc.ready().await.unwrap().call(Event::empty("first"));
    let depth = |p: &PrometheusHandle| one(p, "watchtower_backpressure_depth", &[("name", "default")]);
    assert_eq!(depth(&prometheus), 1.0);
    let _second = svc.ready().await.unwrap().call(Event::empty("second"));
    let evicted = first.await.unwrap_err();
    assert_eq!(evicted.kind(), ErrorKind::Dropped);
    assert_eq!(evicted.event().map(Event::ty), Some("first"));
    let policy = |p| [("name", "default"), ("policy", p)];
    assert_eq!(
        one(
            &prometheus,
            "watchtower_backpressure_dropped_total",
            &policy("drop_oldest")
        ),
        1.0
    );
    assert_eq!(
        one(
            &prometheus,
            "watchtower_backpressure_dropped_total",
            &policy("drop_newest")
        ),
        0.0
    );
    assert_eq!(depth(&prometheus), 1.0);
    assert_eq!(
        one(
            &prometheus,
            "watchtower_backpressure_capacity",
            &[("name", "default")]
        ),
        1.0
    );
    // The worker gone, the queue is emptied.
    drop(worker);
    assert_eq!(depth(&prometheus), 0.0);
    assert_eq!(layer.handle().stats().dropped_oldest, 1);
}

#[tokio::test]
async fn layers_built_before_a_recorder_record_nowhere_and_still_count() {
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("early"));
    let (recorder, prometheus) = recorder();
    let _recording = metrics::set_default_local_recorder(&recorder);
    breaker.handle().force_open();
    let mut svc = ServiceBuilder::new().layer(breaker.clone()).service(failing());
    assert!(svc.ready().await.is_err());
    assert_eq!(breaker.handle().metrics().rejected_calls, 1);
    assert_eq!(
        samples(&prometheus, "watchtower_breaker_state", &[]),
        Vec::<f64>::new()
    );
    assert_eq!(
        samples(&prometheus, "watchtower_breaker_rejected_total", &[]),
        Vec::<f64>::new()
    );
}

#[tokio::test(start_paused = true)]
async fn retries_by_outcome_and_dead_letters_the_dead_letter_service_refused() {
    use tower::retry::budget::TpsBudget;
    use watchtower_layers::dead_letter::DeadLetterLayer;
    use watchtower_layers::retry::{RetryConfig, RetryLayer};

    let (recorder, prometheus) = recorder();
    let _recording = metrics::set_default_local_recorder(&recorder);
    // A dead-letter service that refuses everything.
    let refusing =
        service_fn(|_: Event| async { Err::<(), _>(Error::new(ErrorKind::Connection, "dlq down")) });
    let dead_letter = DeadLetterLayer::new(refusing).name("audit");
    let handle = dead_letter.handle();
    let retry = RetryLayer::new(RetryConfig::new().name("audit").budget(TpsBudget::new(
        Duration::from_secs(10),
        0,
        0.0,
    )));
    let mut svc = ServiceBuilder::new()
        .layer(dead_letter)
        .layer(retry)
        .service(failing());
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(Event::empty("fail"))
        .await
        .unwrap_err();
    // Both failures come back, with the event.
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(err.event().map(Event::ty), Some("fail"));

    let outcome = |o| [("name", "audit"), ("outcome", o)];
    assert_eq!(
        one(
            &prometheus,
            "watchtower_retry_calls_total",
            &outcome("budget_exhausted")
        ),
        1.0
    );
    assert_eq!(
        one(
            &prometheus,
            "watchtower_retry_retries_total",
            &[("name", "audit")]
        ),
        0.0
    );
    let reason = [("name", "audit"), ("reason", "connection")];
    assert_eq!(
        one(&prometheus, "watchtower_dead_letter_failures_total", &reason),
        1.0
    );
    assert_eq!(
        one(&prometheus, "watchtower_dead_letter_events_total", &reason),
        0.0
    );
    assert_eq!((handle.stats().dead_lettered, handle.stats().failed), (0, 1));
}
