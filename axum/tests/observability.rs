//! The observability routes over real HTTP: a known workload through a
//! memory-broker publisher stack, scraped from `/metrics` and parsed as
//! Prometheus text; `/ready` following breakers and transports.

use std::future::{Future, IntoFuture as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::sync::{Semaphore, mpsc};
use tower::{Service, ServiceBuilder, ServiceExt as _};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, ErrorKind, Event, Receipt, SubscribeOptions, Subscriber as _, ext};
use watchtower_axum::{InstallError, Observability, observability};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::DeadLetterLayer;
use watchtower_layers::health::HealthView;
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_memory::{MemoryBroker, MemoryPublisher};
use watchtower_test_support::within;

/// A recorder of this test's own, so that tests in one process do not
/// share a global one.
fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

/// Serves `app` on a free port of 127.0.0.1.
async fn start(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app).into_future());
    addr
}

/// A plain HTTP client: rustls with ring and no roots, whatever TLS
/// features the workspace build gives reqwest (the tests speak plain HTTP
/// to 127.0.0.1).
fn client() -> reqwest::Client {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, Option<String>) {
    let response = client().get(format!("http://{addr}{path}")).send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, response.text().await.unwrap(), content_type)
}

/// `/metrics`, parsed.
async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body, content_type) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the one sample of `metric` with `labels`; panics if there
/// is none or more than one.
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
    match found[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{metric}: unexpected {other:?}"),
    }
}

/// The memory publisher, failing some events by their type: `flaky` on
/// its first attempt, `bad` always as the caller's fault, `down` always as
/// the broker's; `held` waits for a permit of `gate` after saying so on
/// `entered`.
#[derive(Clone)]
struct Scripted {
    inner: MemoryPublisher,
    gate: Arc<Semaphore>,
    entered: mpsc::UnboundedSender<String>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>;

impl Service<Event> for Scripted {
    type Response = Receipt;
    type Error = Error;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: Event) -> Answer {
        let retried = event.extension(ext::ATTEMPT).is_some();
        match event.ty() {
            "flaky" if !retried => Box::pin(async { Err(Error::new(ErrorKind::Connection, "reset")) }),
            "bad" => Box::pin(async { Err(Error::new(ErrorKind::Rejected, "schema mismatch")) }),
            "down" => Box::pin(async { Err(Error::new(ErrorKind::Connection, "refused")) }),
            "held" => {
                let gate = self.gate.clone();
                let _ = self.entered.send(event.id().to_owned());
                let mut inner = self.inner.clone();
                Box::pin(async move {
                    let _permit = gate.acquire().await.map_err(|_| Error::closed("gate"))?;
                    inner.ready().await?.call(event).await
                })
            }
            _ => Box::pin(self.inner.call(event)),
        }
    }
}

#[tokio::test]
async fn metrics_count_a_known_workload_through_the_layers() {
    let (recorder, prometheus) = recorder();
    // Every handle is registered on this thread (the runtime's only one).
    let _recording = metrics::set_default_local_recorder(&recorder);

    let broker = MemoryBroker::new();
    let mut subscription = broker
        .subscriber()
        .open(SubscribeOptions::new([">"]).unwrap())
        .await
        .unwrap();
    let dlq = MemoryDeadLetters::new(100);
    let dead_letter = DeadLetterLayer::new(dlq.clone()).name("orders");
    let retry = RetryLayer::new(
        RetryConfig::new()
            .name("orders")
            .max_attempts(3)
            .delays(Duration::from_millis(1), Duration::from_millis(2)),
    );
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new()
            .name("orders")
            // Never trips by itself here: the test forces it.
            .minimum_calls(1_000)
            .open_wait(Duration::from_millis(1)),
    );
    let queue = BackpressureLayer::new(2, Overflow::DropNewest)
        .concurrency(1)
        .name("orders");
    let gate = Arc::new(Semaphore::new(0));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let health = HealthView::new()
        .transport("events", broker.clone())
        .breaker("orders", breaker.handle())
        .queue("orders", queue.handle())
        .retry("orders", retry.handle())
        .dead_letter_layer("orders", dead_letter.handle());
    let svc = ServiceBuilder::new()
        .dead_letter(dead_letter)
        .retries(retry)
        .circuit_breaker(breaker.clone())
        .backpressure(queue)
        .service(Scripted {
            inner: broker.publisher(),
            gate: gate.clone(),
            entered: entered_tx,
        });
    let addr = start(observability(health, prometheus)).await;

    // One at a time: 5 delivered, 3 delivered on their retry, 2 refused
    // (not retryable), 1 refused by a broker that stays down (3 attempts).
    let publish = async |ty: &str| svc.clone().oneshot(Event::empty(ty)).await.unwrap();
    for ty in [
        "ok", "flaky", "ok", "bad", "flaky", "ok", "down", "ok", "bad", "flaky", "ok",
    ] {
        let delivered = publish(ty).await.is_delivered();
        assert_eq!(delivered, !matches!(ty, "bad" | "down"), "{ty}");
    }
    // Forced open: refused in `poll_ready` on each of 3 attempts, then
    // dead-lettered; reset.
    breaker.handle().force_open();
    assert!(publish("ok").await.is_dead_lettered());
    breaker.handle().reset();

    // The queue: `held` runs and waits, two queue behind it, the fourth is
    // dropped; one queued caller leaves before its turn.
    let held = svc.clone().oneshot(Event::empty("held"));
    let held = tokio::spawn(held);
    within("the held event reaches the publisher", entered.recv()).await;
    let mut queued = svc.clone();
    let queued = queued.ready().await.unwrap().call(Event::empty("queued"));
    let mut leaving = svc.clone();
    let leaving = leaving.ready().await.unwrap().call(Event::empty("leaving"));
    let dropped = publish("dropped")
        .await
        .dead_lettered()
        .expect("dropped, then dead-lettered");
    assert_eq!(dropped.error.kind(), ErrorKind::Dropped);
    drop(leaving);
    gate.add_permits(1);
    assert!(held.await.unwrap().unwrap().is_delivered());
    assert!(queued.await.unwrap().is_delivered());
    // Behind `leaving` in the queue: when it is through, `leaving` has
    // been skipped.
    assert!(publish("last").await.is_delivered());

    // What the broker saw: 5 ok, 3 flaky, held, queued and last.
    let mut seen = Vec::new();
    while seen.len() < 11 {
        let delivery = within("a delivery", subscription.next()).await.unwrap().unwrap();
        seen.push(delivery.event().unwrap().ty().to_owned());
        delivery.ack().await.unwrap();
    }
    assert_eq!(broker.outstanding(), 0, "nothing else was published");
    seen.sort();
    assert_eq!(
        seen,
        [
            "flaky", "flaky", "flaky", "held", "last", "ok", "ok", "ok", "ok", "ok", "queued"
        ]
    );
    let mut reasons: Vec<_> = dlq
        .drain()
        .iter()
        .map(|e| e.extension(ext::DEAD_LETTER_KIND).unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["circuit_open", "connection", "dropped", "rejected", "rejected"]
    );

    let m = scrape(addr).await;
    let orders = [("name", "orders")];
    let outcome = |o| [("name", "orders"), ("outcome", o)];
    // 3 flaky retried once, `down` and the forced-open call twice each.
    assert_eq!(value(&m, "watchtower_retry_retries_total", &orders), 7.0);
    assert_eq!(
        value(
            &m,
            "watchtower_retry_calls_total",
            &outcome("succeeded_after_retry")
        ),
        3.0
    );
    assert_eq!(
        value(&m, "watchtower_retry_calls_total", &outcome("exhausted")),
        2.0
    );
    // 2 bad, 1 dropped.
    assert_eq!(
        value(&m, "watchtower_retry_calls_total", &outcome("not_retryable")),
        3.0
    );
    assert_eq!(
        value(&m, "watchtower_retry_calls_total", &outcome("budget_exhausted")),
        0.0
    );
    let reason = |r| [("name", "orders"), ("reason", r)];
    assert_eq!(
        value(&m, "watchtower_dead_letter_events_total", &reason("rejected")),
        2.0
    );
    assert_eq!(
        value(&m, "watchtower_dead_letter_events_total", &reason("connection")),
        1.0
    );
    assert_eq!(
        value(&m, "watchtower_dead_letter_events_total", &reason("circuit_open")),
        1.0
    );
    assert_eq!(
        value(&m, "watchtower_dead_letter_events_total", &reason("dropped")),
        1.0
    );
    assert_eq!(
        value(&m, "watchtower_dead_letter_failures_total", &reason("rejected")),
        0.0
    );
    // The forced-open call asked three times.
    assert_eq!(value(&m, "watchtower_breaker_rejected_total", &orders), 3.0);
    let transition = |from, to| [("name", "orders"), ("from", from), ("to", to)];
    assert_eq!(
        value(
            &m,
            "watchtower_breaker_transitions_total",
            &transition("closed", "forced_open")
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "watchtower_breaker_transitions_total",
            &transition("forced_open", "closed")
        ),
        1.0
    );
    let transitions = m
        .samples
        .iter()
        .filter(|s| s.metric == "watchtower_breaker_transitions_total")
        .count();
    assert_eq!(transitions, 2);
    assert_eq!(value(&m, "watchtower_breaker_state", &orders), 0.0);
    assert!(m.docs["watchtower_breaker_state"].contains("2 open, 3 forced open"));
    let policy = |p| [("name", "orders"), ("policy", p)];
    assert_eq!(
        value(
            &m,
            "watchtower_backpressure_dropped_total",
            &policy("drop_newest")
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "watchtower_backpressure_dropped_total",
            &policy("drop_oldest")
        ),
        0.0
    );
    assert_eq!(value(&m, "watchtower_backpressure_abandoned_total", &orders), 1.0);
    assert_eq!(value(&m, "watchtower_backpressure_depth", &orders), 0.0);
    assert_eq!(value(&m, "watchtower_backpressure_capacity", &orders), 2.0);

    // The transport's own: one sent message per event the broker saw.
    let sent: Vec<_> = m
        .samples
        .iter()
        .filter(|s| s.metric == "messaging_client_sent_messages_total")
        .collect();
    assert!(
        sent.iter()
            .all(|s| s.labels.get("messaging_system") == Some("memory"))
    );
    assert!(
        sent.iter().all(|s| s.labels.get("error_type").is_none()),
        "{sent:?}"
    );
    let total: f64 = sent
        .iter()
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(total, 11.0);

    // The same counts behind the handles, in the readiness report.
    let (status, body, _) = get(addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "up");
    assert_eq!(report["retries"][0]["stats"]["retries"], 7);
    assert_eq!(report["retries"][0]["stats"]["succeeded_after_retry"], 3);
    assert_eq!(report["queues"][0]["stats"]["abandoned"], 1);
    assert_eq!(report["dead_letters"][0]["stats"]["dead_lettered"], 5);
}

#[tokio::test]
async fn ready_is_503_while_a_breaker_is_forced_open_and_200_again_after_reset() {
    let broker = MemoryBroker::new();
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("orders"));
    let health = HealthView::new()
        .transport("events", broker.clone())
        .breaker("orders", breaker.handle());
    let addr = start(Observability::new(health).into_router()).await;

    let (status, body, content_type) = get(addr, "/ready").await;
    assert_eq!((status, content_type.as_deref()), (200, Some("application/json")));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["status"],
        "up"
    );

    breaker.handle().force_open();
    let (status, body, _) = get(addr, "/ready").await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["status"], "down");
    assert_eq!(report["breakers"][0]["name"], "orders");
    assert_eq!(report["breakers"][0]["metrics"]["state"], "forced_open");
    // Liveness does not follow the breaker.
    assert_eq!(get(addr, "/health").await.0, 200);

    breaker.handle().reset();
    assert_eq!(get(addr, "/ready").await.0, 200);
    // No handle given: no metrics route.
    assert_eq!(get(addr, "/metrics").await.0, 404);
}

#[tokio::test]
async fn ready_is_503_once_a_transport_is_down_while_health_stays_200() {
    let broker = MemoryBroker::new();
    let (_recorder, prometheus) = recorder();
    let health = HealthView::new().transport("events", broker.clone());
    let addr = start(observability(health, prometheus)).await;
    assert_eq!(get(addr, "/ready").await.0, 200);

    broker.close();
    let (status, body, _) = get(addr, "/ready").await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["transports"][0]["name"], "events");
    assert_eq!(report["transports"][0]["health"]["system"], "memory");
    assert_eq!(report["transports"][0]["health"]["status"], "down");
    let (status, body, content_type) = get(addr, "/health").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"up"}"#));
    assert_eq!(content_type.as_deref(), Some("application/json"));
}

/// A transport whose broker never answers a health check.
#[derive(Clone)]
struct Stalled;

impl watchtower::Transport for Stalled {
    const SYSTEM: &'static str = "stalled";

    fn health(&self) -> impl Future<Output = watchtower::health::Health> + Send {
        std::future::pending()
    }
}

#[tokio::test]
async fn ready_answers_503_when_a_transport_never_answers() {
    let health = HealthView::new()
        .transport("stalled", Stalled)
        .check_timeout(Duration::from_millis(50));
    let addr = start(Observability::new(health).into_router()).await;
    let (status, body, _) = get(addr, "/ready").await;
    assert_eq!(status, 503);
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report["transports"][0]["health"]["reason"],
        "health check timed out"
    );
}

#[tokio::test]
async fn names_with_quotes_backslashes_and_newlines_are_escaped_in_the_exposition() {
    let (recorder, prometheus) = recorder();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let name = "orders \"eu\" \\ west\nline 2 ✓";
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name(name));
    breaker.handle().force_open();
    let long = "x".repeat(10_000);
    let _svc = ServiceBuilder::new()
        .backpressure(BackpressureLayer::new(7, Overflow::Block).name(long.as_str()))
        .service(broker_publisher());
    let addr = start(observability(HealthView::new(), prometheus)).await;
    let m = scrape(addr).await;
    // One sample on one line, the label escaped as the text format says
    // (prometheus-parse hands label values back as written, unescaped).
    let escaped = name
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    assert_eq!(escaped, r#"orders \"eu\" \\ west\nline 2 ✓"#);
    assert_eq!(value(&m, "watchtower_breaker_state", &[("name", &escaped)]), 3.0);
    assert_eq!(
        value(&m, "watchtower_backpressure_capacity", &[("name", &long)]),
        7.0
    );
}

fn broker_publisher() -> MemoryPublisher {
    MemoryBroker::new().publisher()
}

/// A transport whose health the test sets.
#[derive(Clone)]
struct Switch(Arc<std::sync::Mutex<watchtower::health::Status>>);

impl watchtower::Transport for Switch {
    const SYSTEM: &'static str = "switch";

    fn health(&self) -> impl Future<Output = watchtower::health::Health> + Send {
        use watchtower::health::{Health, Status};
        let status = *self.0.lock().unwrap();
        std::future::ready(match status {
            Status::Up => Health::up(Self::SYSTEM),
            Status::Degraded => Health::degraded(Self::SYSTEM, "reconnecting"),
            Status::Down => Health::down(Self::SYSTEM, "connection refused"),
        })
    }
}

#[tokio::test]
async fn ready_follows_a_transport_down_and_back_and_stays_200_while_degraded() {
    use watchtower::health::Status;

    let switch = Switch(Arc::new(std::sync::Mutex::new(Status::Up)));
    let health = HealthView::new().transport("audit", switch.clone());
    let addr = start(Observability::new(health).into_router()).await;
    let mut seen = Vec::new();
    for status in [
        Status::Up,
        Status::Down,
        Status::Degraded,
        Status::Down,
        Status::Up,
    ] {
        *switch.0.lock().unwrap() = status;
        let (code, body, _) = get(addr, "/ready").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        seen.push((code, report["status"].as_str().unwrap().to_owned()));
        assert_eq!(get(addr, "/health").await.0, 200);
    }
    let expected = [
        (200, "up"),
        (503, "down"),
        (200, "degraded"),
        (503, "down"),
        (200, "up"),
    ];
    assert_eq!(seen, expected.map(|(c, s)| (c, s.to_owned())));
}

#[tokio::test]
async fn a_second_global_recorder_is_refused_and_the_first_keeps_recording() {
    let prometheus = watchtower_axum::install_prometheus().unwrap();
    let err = watchtower_axum::install_prometheus().unwrap_err();
    assert!(matches!(err, InstallError::AlreadyInstalled));
    assert_eq!(err.to_string(), "a metrics recorder is installed already");
    assert_eq!(watchtower::Error::from(err).kind(), ErrorKind::Config);

    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("global"));
    breaker.handle().force_open();
    let addr = start(observability(HealthView::new(), prometheus)).await;
    let m = scrape(addr).await;
    assert_eq!(value(&m, "watchtower_breaker_state", &[("name", "global")]), 3.0);
}
