//! The sender against a real axum server: signing, modes, every response
//! class, timeouts, the SSRF guard and the payload limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, post};
use bytes::Bytes;
use support::{Connect, Counter, PATIENCE, SECRET, dead_port, sender, serve};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, service_fn};
use watchtower::Transport;
use watchtower::health::Status;
use watchtower::{ErrorKind, Event, PublishExt};
use watchtower_webhook::{
    Secret, WebhookClient, WebhookConfig, WebhookReceiverLayer, WebhookVerifier, signature,
};

type Seen = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// An endpoint that answers `/status/{code}` with that code (redirects
/// pointing at `/status/200`), recording every request.
async fn status_server() -> (std::net::SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let router = axum::Router::new()
        .route(
            "/status/{code}",
            any(
                |State(seen): State<Seen>,
                 Path(code): Path<u16>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    seen.lock().unwrap().push((headers, body));
                    let mut out = HeaderMap::new();
                    if (300..400).contains(&code) {
                        out.insert("location", "/status/200".parse().unwrap());
                    }
                    (StatusCode::from_u16(code).unwrap(), out, "endpoint says no")
                },
            ),
        )
        .with_state(seen.clone());
    (serve(router).await, seen)
}

fn event() -> Event {
    Event::new("user.created", serde_json::json!({"user_id": 7}))
}

#[tokio::test]
async fn signed_delivery_passes_the_receiver_layer_end_to_end() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = service_fn(move |event: Event| {
        let tx = tx.clone();
        async move {
            tx.send(event).unwrap();
            Ok::<_, watchtower::Error>(())
        }
    });
    // Binary mode's ce- headers are not signed: the receiver takes it only
    // when told to.
    let verifier = WebhookVerifier::new([SECRET]).unwrap().binary_mode(true);
    let receiver = ServiceBuilder::new()
        .layer(WebhookReceiverLayer::new(verifier))
        .service(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", receiver)).await;

    for binary in [false, true] {
        let mut builder = sender(format!("http://{addr}/hooks")).name("local");
        if binary {
            builder = builder.binary_mode();
        }
        let mut sender = builder.publisher().await;
        let sent = event().with_extension("tenant", "acme").unwrap();
        let receipt = sender.publish(sent.clone()).await.unwrap();
        assert_eq!(&*receipt.topic, "local");
        assert_eq!(&*receipt.event_id, sent.id());
        let got = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap().unwrap();
        assert_eq!(got.id(), sent.id(), "binary={binary}");
        assert_eq!(got.ty(), "user.created");
        assert_eq!(got.extension("tenant"), Some("acme"));
        assert_eq!(
            got.json::<serde_json::Value>().unwrap(),
            serde_json::json!({"user_id": 7})
        );
    }
}

#[tokio::test]
async fn headers_follow_the_standard_and_sign_the_exact_body() {
    let (addr, seen) = status_server().await;
    let old = Secret::from_bytes(&[1; 32]).unwrap();
    let mut sender = WebhookConfig::new(format!("http://{addr}/status/200"))
        .secret(SECRET)
        .secret_key(old.clone())
        .allow("127.0.0.1")
        .publisher()
        .await;
    let sent = event();
    sender.publish(sent.clone()).await.unwrap();
    sender.publish(sent.clone()).await.unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let mut timestamps = Vec::new();
    for (headers, body) in seen.iter() {
        let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            header("webhook-id"),
            sent.id(),
            "the id is the same on every attempt"
        );
        assert_eq!(header("content-type"), "application/cloudevents+json");
        let ts: i64 = header("webhook-timestamp").parse().unwrap();
        timestamps.push(ts);
        let signatures = header("webhook-signature");
        assert_eq!(signatures.split(' ').count(), 2, "one signature per secret");
        assert!(signatures.split(' ').all(|s| s.starts_with("v1,")));
        let new = Secret::new(SECRET).unwrap();
        assert!(signature::matches(&[new], sent.id(), ts, body, &signatures));
        assert!(signature::matches(
            std::slice::from_ref(&old),
            sent.id(),
            ts,
            body,
            &signatures
        ));
        assert_eq!(watchtower::codec::structured::from_slice(body).unwrap(), sent);
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(timestamps.iter().all(|ts| (now - ts).abs() < 60));
}

#[tokio::test]
async fn binary_mode_sends_ce_headers_and_the_data_as_body() {
    let (addr, seen) = status_server().await;
    let mut sender = sender(format!("http://{addr}/status/202"))
        .binary_mode()
        .publisher()
        .await;
    let sent = Event::binary(
        "blob.stored",
        "application/octet-stream",
        Bytes::from_static(b"\x00\x01raw"),
    )
    .with_extension(watchtower_webhook::ENDPOINT_EXTENSION, "local")
    .unwrap();
    sender.publish(sent.clone()).await.unwrap();
    let seen = seen.lock().unwrap();
    let (headers, body) = &seen[0];
    assert_eq!(&body[..], b"\x00\x01raw");
    assert_eq!(headers["ce-specversion"], "1.0");
    assert_eq!(headers["ce-id"], sent.id());
    assert_eq!(headers["ce-type"], "blob.stored");
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert!(headers.get("ce-webhookendpoint").is_none());
}

#[tokio::test]
async fn every_response_class_maps_to_its_error() {
    let (addr, seen) = status_server().await;
    let url = |code: u16| format!("http://{addr}/status/{code}");
    // (status, kind, retryable); `None` is success.
    let cases = [
        (200, None, false),
        (204, None, false),
        (301, Some(ErrorKind::Rejected), false),
        (302, Some(ErrorKind::Rejected), false),
        (307, Some(ErrorKind::Rejected), false),
        (400, Some(ErrorKind::Rejected), false),
        (401, Some(ErrorKind::Rejected), false),
        (404, Some(ErrorKind::Rejected), false),
        (413, Some(ErrorKind::Rejected), false),
        (422, Some(ErrorKind::Rejected), false),
        (429, Some(ErrorKind::Throttled), true),
        (500, Some(ErrorKind::Other), true),
        (501, Some(ErrorKind::Other), true),
        (502, Some(ErrorKind::Throttled), true),
        (503, Some(ErrorKind::Throttled), true),
        (504, Some(ErrorKind::Throttled), true),
        (410, Some(ErrorKind::Gone), false),
    ];
    for (code, kind, retryable) in cases {
        let mut sender = sender(url(code)).name(format!("ep{code}")).publisher().await;
        let result = sender.publish(event()).await;
        match kind {
            None => assert!(result.is_ok(), "{code}: {result:?}"),
            Some(kind) => {
                let err = result.unwrap_err();
                assert_eq!(err.kind(), kind, "{code}: {err}");
                assert_eq!(err.is_retryable(), retryable, "{code}: {err}");
                assert!(
                    err.to_string().contains(&format!("ep{code}")),
                    "names the endpoint: {err}"
                );
                assert!(err.to_string().contains(&code.to_string()), "{err}");
            }
        }
    }
    // Redirects were not followed: every request went to its own status path.
    let paths = seen.lock().unwrap().len();
    assert_eq!(paths, cases.len());
}

#[tokio::test]
async fn throttling_carries_retry_after_in_seconds_and_as_a_date() {
    for (code, value, expect) in [
        (429, "7".to_owned(), 7u64),
        (
            503,
            httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(90)),
            90,
        ),
    ] {
        let header = value.clone();
        let router = axum::Router::new().route(
            "/",
            post(move || {
                let header = header.clone();
                async move {
                    let mut headers = HeaderMap::new();
                    headers.insert("retry-after", header.parse().unwrap());
                    (StatusCode::from_u16(code).unwrap(), headers)
                }
            }),
        );
        let addr = serve(router).await;
        let mut sender = sender(format!("http://{addr}/")).publisher().await;
        let err = sender.publish(event()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Throttled);
        assert!(err.is_retryable());
        let after = err.retry_after().expect("retry-after hint").as_secs();
        // A date is converted against the clock, which moves on a little.
        assert!(after <= expect && after + 5 >= expect, "{code} {value}: {after}");
    }
}

#[tokio::test]
async fn gone_disables_the_endpoint_until_enabled() {
    let (addr, seen) = status_server().await;
    let client = sender(format!("http://{addr}/status/410")).connect().await;
    assert_eq!(client.health().await.status(), Status::Up);
    let mut sender = client.publisher();
    let err = sender.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Gone);
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down);
    assert_eq!(health.system(), "webhook");
    assert!(health.reason().unwrap().contains("410"), "{health:?}");
    assert!(client.is_disabled());
    // Clones share the health; no request is made while disabled.
    let mut clone = sender.clone();
    let err = clone.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Gone);
    assert!(!err.is_retryable());
    assert_eq!(seen.lock().unwrap().len(), 1);
    client.enable();
    assert_eq!(client.health().await.status(), Status::Up);
    assert_eq!(clone.publish(event()).await.unwrap_err().kind(), ErrorKind::Gone);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_retryably() {
    let entered = Counter::default();
    let in_handler = entered.clone();
    let router = axum::Router::new().route(
        "/",
        post(move || {
            in_handler.incr();
            std::future::pending::<StatusCode>()
        }),
    );
    let addr = serve(router).await;
    let mut sender = sender(format!("http://{addr}/"))
        .timeout(Duration::from_millis(300))
        .publisher()
        .await;
    let err = sender.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable());
    assert_eq!(entered.get(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retryable() {
    let addr = dead_port().await;
    let mut sender = sender(format!("http://{addr}/")).publisher().await;
    let err = sender.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn the_ssrf_guard_refuses_private_addresses_without_the_allow_list() {
    let (addr, seen) = status_server().await;
    // A literal is refused when the sender is built.
    let err = WebhookClient::connect(WebhookConfig::new(format!("http://{addr}/status/200")).secret(SECRET))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    for private in [
        "http://10.0.0.8/",
        "http://192.168.1.1/",
        "http://[::1]/",
        "http://169.254.169.254/",
    ] {
        let err = WebhookClient::connect(WebhookConfig::new(private).secret(SECRET))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{private}");
    }
    // A name is checked after DNS resolution: localhost resolves to loopback.
    let mut guarded = WebhookConfig::new(format!("http://localhost:{}/status/200", addr.port()))
        .secret(SECRET)
        .publisher()
        .await;
    let err = guarded.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("SSRF"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 0, "nothing reached the endpoint");
    // With the allow-list the same name goes through.
    let mut allowed = WebhookConfig::new(format!("http://localhost:{}/status/200", addr.port()))
        .secret(SECRET)
        .allow("127.0.0.1")
        .allow("::1")
        .publisher()
        .await;
    allowed.publish(event()).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn oversized_payloads_are_refused_before_sending() {
    let (addr, seen) = status_server().await;
    let mut sender = sender(format!("http://{addr}/status/200"))
        .max_payload(512)
        .publisher()
        .await;
    let big = Event::new("blob", serde_json::json!({"data": "x".repeat(1024)}));
    let err = sender.publish(big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(!err.is_retryable());
    assert_eq!(seen.lock().unwrap().len(), 0);
    sender.publish(event()).await.unwrap();
}

#[tokio::test]
async fn huge_response_bodies_are_not_buffered() {
    let router = axum::Router::new().route(
        "/",
        post(|| async { (StatusCode::BAD_REQUEST, "e".repeat(4 * 1024 * 1024)) }),
    );
    let addr = serve(router).await;
    let mut sender = sender(format!("http://{addr}/"))
        .max_response_body(64)
        .publisher()
        .await;
    let err = sender.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().len() < 400, "{err}");
}

#[tokio::test]
async fn errors_and_debug_never_show_secrets_or_url_credentials() {
    let addr = dead_port().await;
    let mut sender = WebhookConfig::new(format!("http://user:hunter2@{addr}/p?token=tok123"))
        .secret(SECRET)
        .allow("127.0.0.1")
        .publisher()
        .await;
    let err = sender.publish(event()).await.unwrap_err();
    let shown = format!("{err} {err:?} {sender:?}");
    for secret in ["hunter2", "tok123", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[tokio::test]
async fn https_goes_through_rustls_with_ring() {
    // A plain-HTTP server cannot complete a TLS handshake: the sender fails
    // with a retryable connection error (and no crypto-provider panic).
    let (addr, seen) = status_server().await;
    let mut sender = sender(format!("https://{addr}/status/200"))
        .https_only(true)
        .publisher()
        .await;
    let err = sender.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_retryable());
    assert_eq!(seen.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn huge_retry_after_hints_are_capped_without_overflow() {
    let far_date = "Fri, 31 Dec 9999 23:59:59 GMT".to_owned();
    for value in [
        "18446744073709551615".to_owned(),
        "184467440737095516150000".to_owned(),
        far_date,
    ] {
        let header = value.clone();
        let router = axum::Router::new().route(
            "/",
            post(move || {
                let header = header.clone();
                async move {
                    let mut headers = HeaderMap::new();
                    headers.insert("retry-after", header.parse().unwrap());
                    (StatusCode::SERVICE_UNAVAILABLE, headers)
                }
            }),
        );
        let addr = serve(router).await;
        let mut default = sender(format!("http://{addr}/")).publisher().await;
        let err = default.publish(event()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Throttled, "{value}");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(3600)), "{value}");
        // The hint can be added to the clock.
        let _ = tokio::time::Instant::now() + err.retry_after().unwrap();

        let mut capped = sender(format!("http://{addr}/"))
            .max_retry_after(Duration::from_secs(30))
            .publisher()
            .await;
        let err = capped.publish(event()).await.unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)), "{value}");
    }
}

#[tokio::test]
async fn a_conflict_is_final() {
    let (addr, seen) = status_server().await;
    let mut sender = sender(format!("http://{addr}/status/409")).publisher().await;
    let err = sender.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("409"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A span's fields, by name.
type SpanFields = Vec<(String, String)>;

/// Records the `publish` spans opened on this thread.
#[derive(Default, Clone)]
struct SpanLog(Arc<Mutex<Vec<SpanFields>>>);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for SpanLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut log = self.0.lock().unwrap();
        if attrs.metadata().name() == "publish" {
            let mut fields = Vec::new();
            attrs.record(&mut Fields(&mut fields));
            log.push(fields);
        }
        tracing::span::Id::from_u64(log.len() as u64 + 1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread")]
async fn each_call_opens_the_core_publish_span() {
    let (addr, _seen) = status_server().await;
    let mut publisher = sender(format!("http://{addr}/status/200")).publisher().await;
    let log = SpanLog::default();
    let _default = tracing::subscriber::set_default(log.clone());
    let sent = event();
    publisher.publish(sent.clone()).await.unwrap();
    drop(_default);
    let spans = log.0.lock().unwrap().clone();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let field = |name: &str| {
        spans[0]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {spans:?}"))
    };
    assert_eq!(field("messaging.system"), "webhook");
    assert_eq!(field("messaging.destination.name"), sent.topic());
    assert_eq!(field("messaging.operation.type"), "send");
    assert_eq!(field("messaging.message.id"), sent.id());
}
