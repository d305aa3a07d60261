//! The receiver layer in a real axum server, fed hand-made requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::StatusCode;
use support::{Counter, OTHER_SECRET, PATIENCE, SECRET, now, raw_client, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, service_fn};
use watchtower::{Error, ErrorKind, Event};
use watchtower_webhook::{Secret, signature};
use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};

struct Receiver {
    url: String,
    events: mpsc::UnboundedReceiver<Event>,
    calls: Counter,
}

/// A receiver whose handler records events; events of type `fail.retry`
/// and `fail.permanent` fail.
async fn receiver(verifier: WebhookVerifier) -> Receiver {
    let (tx, events) = mpsc::unbounded_channel();
    let calls = Counter::default();
    let counted = calls.clone();
    let handler = service_fn(move |event: Event| {
        let tx = tx.clone();
        let counted = counted.clone();
        async move {
            counted.incr();
            match event.ty() {
                "fail.retry" => return Err(Error::new(ErrorKind::Handler, "database down")),
                "fail.permanent" => return Err(Error::decode("unknown schema")),
                _ => {}
            }
            tx.send(event).unwrap();
            Ok::<_, Error>(())
        }
    });
    let service = ServiceBuilder::new()
        .layer(WebhookReceiverLayer::new(verifier))
        .service(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", service)).await;
    Receiver {
        url: format!("http://{addr}/hooks"),
        events,
        calls,
    }
}

fn verifier() -> WebhookVerifier {
    WebhookVerifier::new([SECRET]).unwrap()
}

/// A signed structured request.
struct Signed {
    id: String,
    timestamp: i64,
    body: Vec<u8>,
    secret: &'static str,
}

impl Signed {
    fn new(event: &Event) -> Signed {
        Signed {
            id: event.id().to_owned(),
            timestamp: now(),
            body: watchtower::codec::structured::to_vec(event).unwrap(),
            secret: SECRET,
        }
    }

    async fn send(&self, url: &str) -> (StatusCode, String) {
        self.send_body(url, self.body.clone()).await
    }

    /// Sends `body`, signed as if it were `self.body`.
    async fn send_body(&self, url: &str, body: Vec<u8>) -> (StatusCode, String) {
        let secret = Secret::new(self.secret).unwrap();
        let sig = signature::sign(&[secret], &self.id, self.timestamp, &self.body);
        let response = raw_client()
            .post(url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &self.id)
            .header("webhook-timestamp", self.timestamp.to_string())
            .header("webhook-signature", sig)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }
}

fn event() -> Event {
    Event::new("order.placed", serde_json::json!({"order": 1}))
}

#[tokio::test]
async fn a_verified_request_reaches_the_handler_as_an_event() {
    let mut r = receiver(verifier()).await;
    let sent = event();
    let (status, _) = Signed::new(&sent).send(&r.url).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let got = tokio::time::timeout(PATIENCE, r.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, sent);
}

#[tokio::test]
async fn a_tampered_body_is_unauthorized() {
    let r = receiver(verifier()).await;
    let signed = Signed::new(&event());
    let mut tampered = signed.body.clone();
    let at = tampered.iter().position(|&b| b == b'1').unwrap();
    tampered[at] = b'2';
    let (status, text) = signed.send_body(&r.url, tampered).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert_eq!(r.calls.get(), 0);
}

#[tokio::test]
async fn a_wrong_secret_is_unauthorized_and_a_rotated_one_accepted() {
    let r = receiver(verifier()).await;
    let mut signed = Signed::new(&event());
    signed.secret = OTHER_SECRET;
    assert_eq!(signed.send(&r.url).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(r.calls.get(), 0);

    let rotating = receiver(WebhookVerifier::new([OTHER_SECRET, SECRET]).unwrap()).await;
    assert_eq!(signed.send(&rotating.url).await.0, StatusCode::NO_CONTENT);
    assert_eq!(rotating.calls.get(), 1);
}

#[tokio::test]
async fn stale_and_future_timestamps_are_unauthorized() {
    let r = receiver(verifier()).await;
    for offset in [-301, 301, -3600, 86_400] {
        let mut signed = Signed::new(&event());
        signed.timestamp = now() + offset;
        let (status, text) = signed.send(&r.url).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{offset}: {text}");
    }
    // Within the tolerance both ways is fine.
    for offset in [-200, 200] {
        let mut signed = Signed::new(&event());
        signed.timestamp = now() + offset;
        assert_eq!(signed.send(&r.url).await.0, StatusCode::NO_CONTENT, "{offset}");
    }
    assert_eq!(r.calls.get(), 2);
}

#[tokio::test]
async fn an_oversized_body_is_payload_too_large() {
    let r = receiver(verifier().max_body(1024)).await;
    let big = Event::new("blob", serde_json::json!({"x": "y".repeat(4096)}));
    let (status, _) = Signed::new(&big).send(&r.url).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Without a content-length the limit holds while reading.
    let signed = Signed::new(&big);
    let secret = Secret::new(SECRET).unwrap();
    let sig = signature::sign(&[secret], &signed.id, signed.timestamp, &signed.body);
    let path = r.url.trim_start_matches("http://");
    let (host, path) = path.split_once('/').unwrap();
    let mut request = format!(
        "POST /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/cloudevents+json\r\n\
         webhook-id: {}\r\nwebhook-timestamp: {}\r\nwebhook-signature: {sig}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        signed.id, signed.timestamp
    )
    .into_bytes();
    for chunk in signed.body.chunks(512) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    // The server may answer and close before the whole body is written.
    let _ = stream.write_all(&request).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(r.calls.get(), 0);
}

#[tokio::test]
async fn missing_headers_and_bad_events_are_bad_requests() {
    let r = receiver(verifier()).await;
    let response = raw_client()
        .post(&r.url)
        .header("webhook-id", "msg_1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Correctly signed, but not a CloudEvent.
    let mut signed = Signed::new(&event());
    signed.body = br#"{"specversion":"1.0"}"#.to_vec();
    assert_eq!(signed.send(&r.url).await.0, StatusCode::BAD_REQUEST);
    let response = raw_client().get(&r.url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.calls.get(), 0);
}

#[tokio::test]
async fn replays_are_refused_but_retries_after_failure_are_not() {
    let r = receiver(verifier().reject_replays(1000)).await;
    let signed = Signed::new(&event());
    assert_eq!(signed.send(&r.url).await.0, StatusCode::NO_CONTENT);
    assert_eq!(signed.send(&r.url).await.0, StatusCode::OK);
    assert_eq!(r.calls.get(), 1);

    // A failed handler forgets the id: the sender's retry goes through.
    let failing = Signed::new(&Event::new("fail.retry", serde_json::json!({})));
    assert_eq!(failing.send(&r.url).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failing.send(&r.url).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.calls.get(), 3);
}

#[tokio::test]
async fn handler_failures_answer_by_retryability() {
    let r = receiver(verifier()).await;
    let retry = Signed::new(&Event::new("fail.retry", serde_json::json!({})));
    assert_eq!(retry.send(&r.url).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    let permanent = Signed::new(&Event::new("fail.permanent", serde_json::json!({})));
    let (status, text) = permanent.send(&r.url).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        !text.contains("unknown schema"),
        "handler details stay private: {text}"
    );
}

#[tokio::test]
async fn plain_standard_webhooks_become_events() {
    let mut r = receiver(verifier()).await;
    let body = br#"{"type":"invoice.paid","timestamp":"2024-01-01T00:00:00Z","data":{"n":1}}"#.to_vec();
    let id = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W";
    let ts = now();
    let sig = signature::sign(&[Secret::new(SECRET).unwrap()], id, ts, &body);
    let response = raw_client()
        .post(&r.url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let got = tokio::time::timeout(PATIENCE, r.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id(), id);
    assert_eq!(got.ty(), "invoice.paid");
    assert_eq!(got.data().map(|d| d.to_vec()), Some(body));
}

#[tokio::test]
async fn verify_is_usable_without_a_server() {
    let signed = Signed::new(&event());
    let sig = signature::sign(
        &[Secret::new(SECRET).unwrap()],
        &signed.id,
        signed.timestamp,
        &signed.body,
    );
    let mut headers = http::HeaderMap::new();
    headers.insert("webhook-id", signed.id.parse().unwrap());
    headers.insert("webhook-timestamp", signed.timestamp.to_string().parse().unwrap());
    headers.insert("webhook-signature", sig.parse().unwrap());
    let secrets = [Secret::new(SECRET).unwrap()];
    let verified = watchtower_webhook::verify(&secrets, &headers, &signed.body).unwrap();
    assert_eq!(verified.id, signed.id);
    let err = watchtower_webhook::verify(&secrets, &headers, b"other").unwrap_err();
    assert_eq!(err.kind(), watchtower_webhook::VerifyErrorKind::InvalidSignature);
}

/// A captured binary-mode request, resent with a forged `ce-type`.
async fn send_binary(url: &str, ce_id: &str, ce_type: &str) -> StatusCode {
    let id = "msg_binary0001";
    let ts = now();
    let body = br#"{"order":1}"#.to_vec();
    let sig = signature::sign(&[Secret::new(SECRET).unwrap()], id, ts, &body);
    raw_client()
        .post(url)
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", ce_id)
        .header("ce-source", "/shop")
        .header("ce-type", ce_type)
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn binary_mode_is_refused_by_default_so_forged_ce_headers_never_reach_the_handler() {
    let r = receiver(verifier().reject_replays(100)).await;
    assert_eq!(
        send_binary(&r.url, "msg_binary0001", "order.refunded").await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(r.calls.get(), 0);

    // Accepted by choice: the ce-id must be the signed webhook-id.
    let mut r = receiver(verifier().binary_mode(true).reject_replays(100)).await;
    assert_eq!(
        send_binary(&r.url, "evt-other", "order.placed").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(r.calls.get(), 0);
    assert_eq!(
        send_binary(&r.url, "msg_binary0001", "order.placed").await,
        StatusCode::NO_CONTENT
    );
    let got = tokio::time::timeout(PATIENCE, r.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.id(), "msg_binary0001");
    assert_eq!(got.ty(), "order.placed");
}

/// Sends a request head and the first chunk of a chunked body that never
/// ends, and returns the status line of the answer.
async fn never_ending_body(url: &str, headers: &str) -> String {
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/cloudevents+json\r\n\
         {headers}transfer-encoding: chunked\r\n\r\n400\r\n{}\r\n",
        "x".repeat(0x400)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The client keeps the connection open and sends nothing more.
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        while !answer.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("no answer while the body was still open");
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn headers_are_checked_before_the_body_is_read() {
    let r = receiver(verifier()).await;
    // No webhook-* header at all.
    let status = never_ending_body(&r.url, "").await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    // A timestamp outside the tolerance.
    let stale = format!(
        "webhook-id: msg_1\r\nwebhook-timestamp: {}\r\nwebhook-signature: v1,AAAA\r\n",
        now() - 3600
    );
    let status = never_ending_body(&r.url, &stale).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    assert_eq!(r.calls.get(), 0);
}

#[tokio::test]
async fn a_stalled_body_is_answered_with_a_timeout() {
    let r = receiver(verifier().body_timeout(std::time::Duration::from_millis(200))).await;
    let headers = format!(
        "webhook-id: msg_1\r\nwebhook-timestamp: {}\r\nwebhook-signature: v1,AAAA\r\n",
        now()
    );
    let status = never_ending_body(&r.url, &headers).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert_eq!(r.calls.get(), 0);
}
