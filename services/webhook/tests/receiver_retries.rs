//! The receiver's replay memory against a sender that is not this crate's:
//! plain HTTP requests signed by hand as Standard Webhooks describes, with
//! Svix-style `msg_…` ids that differ from the CloudEvent ids.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use sha2::Sha256;
use support::{PATIENCE, SECRET, now, raw_client, serve};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tower::{ServiceBuilder, service_fn};
use watchtower::{Error, ErrorKind, Event};
use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};

/// `v1,<base64 HMAC-SHA256>` of `id.timestamp.body`, computed here rather
/// than by the crate under test.
fn sign(id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// One webhook as a foreign sender would send it: a structured CloudEvent
/// whose id is not the `webhook-id`.
struct Foreign {
    msg_id: String,
    body: Vec<u8>,
}

impl Foreign {
    fn new(n: usize, ty: &str) -> Foreign {
        let mut event = Event::new(ty, serde_json::json!({"n": n}));
        event.set_id(format!("evt-{n}"));
        Foreign {
            msg_id: format!("msg_2KWPBgLlAfxdpx2AI54pPJ{n:04}"),
            body: watchtower::codec::structured::to_vec(&event).unwrap(),
        }
    }

    /// One attempt, freshly timestamped as senders do on each retry.
    async fn send(&self, url: &str) -> reqwest::Response {
        let timestamp = now();
        raw_client()
            .post(url)
            .header("content-type", "application/cloudevents+json")
            .header("webhook-id", &self.msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&self.msg_id, timestamp, &self.body))
            .body(self.body.clone())
            .send()
            .await
            .unwrap()
    }

    /// The raw HTTP/1.1 request of one attempt.
    fn raw(&self, host: &str) -> Vec<u8> {
        let timestamp = now();
        let mut request = format!(
            "POST /hooks HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/cloudevents+json\r\n\
             webhook-id: {}\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {}\r\n\
             content-length: {}\r\n\r\n",
            self.msg_id,
            sign(&self.msg_id, timestamp, &self.body),
            self.body.len()
        )
        .into_bytes();
        request.extend_from_slice(&self.body);
        request
    }
}

/// Successful handlings per CloudEvent id.
type Handled = Arc<Mutex<HashMap<String, usize>>>;

fn verifier() -> WebhookVerifier {
    WebhookVerifier::new([SECRET]).unwrap().reject_replays(1000)
}

/// A receiver whose handler fails the first attempt of every event with a
/// retryable error and records the successful ones.
#[tokio::test]
async fn a_failed_handler_is_retried_by_webhook_id_and_every_event_arrives_once() {
    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let handled: Handled = Arc::default();
    let handler = {
        let attempts = attempts.clone();
        let handled = handled.clone();
        service_fn(move |event: Event| {
            let first = {
                let mut attempts = attempts.lock().unwrap();
                let n = attempts.entry(event.id().to_owned()).or_default();
                *n += 1;
                *n == 1
            };
            let handled = handled.clone();
            async move {
                if first {
                    return Err(Error::new(ErrorKind::Handler, "database down"));
                }
                *handled.lock().unwrap().entry(event.id().to_owned()).or_default() += 1;
                Ok::<_, Error>(())
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(WebhookReceiverLayer::new(verifier()))
        .service(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", service)).await;
    let url = format!("http://{addr}/hooks");

    let mut answers = Vec::new();
    for n in 0..20 {
        let hook = Foreign::new(n, "order.placed");
        // A sender's schedule: retry on 5xx and 429, stop on anything else.
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let status = hook.send(&url).await.status();
            statuses.push(status);
            if !(status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS) {
                break;
            }
        }
        answers.push(statuses);
    }
    for (n, statuses) in answers.iter().enumerate() {
        assert_eq!(
            statuses,
            &[StatusCode::INTERNAL_SERVER_ERROR, StatusCode::NO_CONTENT],
            "event {n}"
        );
    }
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 20);
    assert!(handled.values().all(|&n| n == 1), "{handled:?}");

    // A duplicate of a handled delivery is acknowledged, not handled again.
    let again = Foreign::new(3, "order.placed").send(&url).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(attempts.lock().unwrap()["evt-3"], 2);
}

/// A handler that panics on the first attempt of each event.
#[tokio::test]
async fn a_panicking_handler_forgets_the_id_and_the_retry_is_handled() {
    let attempts: Arc<Mutex<usize>> = Arc::default();
    let (tx, mut events) = mpsc::unbounded_channel();
    let handler = {
        let attempts = attempts.clone();
        service_fn(move |event: Event| {
            let tx = tx.clone();
            let first = {
                let mut n = attempts.lock().unwrap();
                *n += 1;
                *n == 1
            };
            async move {
                assert!(!first, "handler bug on the first attempt");
                tx.send(event.id().to_owned()).unwrap();
                Ok::<_, Error>(())
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(WebhookReceiverLayer::new(verifier()))
        .service(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", service)).await;
    let url = format!("http://{addr}/hooks");

    let hook = Foreign::new(1, "order.placed");
    let first = hook.send(&url).await;
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retry = hook.send(&url).await;
    assert_eq!(retry.status(), StatusCode::NO_CONTENT);
    let got = tokio::time::timeout(PATIENCE, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "evt-1");
    assert_eq!(*attempts.lock().unwrap(), 2);
}

/// Signals when the first attempt's handler starts, holds it until told,
/// and signals when its future is dropped unfinished.
struct Gate {
    started: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
    dropped: mpsc::UnboundedReceiver<()>,
    handled: Arc<Mutex<usize>>,
}

struct OnDrop(Option<mpsc::UnboundedSender<()>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

async fn gated_receiver() -> (String, Gate) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let handled: Arc<Mutex<usize>> = Arc::default();
    let calls: Arc<Mutex<usize>> = Arc::default();
    let handler = {
        let release = release.clone();
        let handled = handled.clone();
        service_fn(move |_event: Event| {
            let first = {
                let mut n = calls.lock().unwrap();
                *n += 1;
                *n == 1
            };
            let started_tx = started_tx.clone();
            let dropped_tx = dropped_tx.clone();
            let release = release.clone();
            let handled = handled.clone();
            async move {
                if first {
                    let mut on_drop = OnDrop(Some(dropped_tx));
                    let released = release.notified();
                    started_tx.send(()).unwrap();
                    released.await;
                    on_drop.0 = None;
                }
                *handled.lock().unwrap() += 1;
                Ok::<_, Error>(())
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(WebhookReceiverLayer::new(verifier()))
        .service(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", service)).await;
    let gate = Gate {
        started,
        release,
        dropped,
        handled,
    };
    (addr.to_string(), gate)
}

#[tokio::test]
async fn a_client_that_disconnects_mid_handler_can_retry() {
    let (host, mut gate) = gated_receiver().await;
    let hook = Foreign::new(7, "order.placed");
    let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
    stream.write_all(&hook.raw(&host)).await.unwrap();
    tokio::time::timeout(PATIENCE, gate.started.recv())
        .await
        .unwrap()
        .unwrap();
    drop(stream);
    // The server drops the request's future when the client goes away.
    tokio::time::timeout(PATIENCE, gate.dropped.recv())
        .await
        .expect("the handler future was not dropped")
        .unwrap();

    let retry = hook.send(&format!("http://{host}/hooks")).await;
    assert_eq!(retry.status(), StatusCode::NO_CONTENT);
    assert_eq!(*gate.handled.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_retry_while_the_first_attempt_runs_gets_a_retryable_answer() {
    let (host, mut gate) = gated_receiver().await;
    let url = format!("http://{host}/hooks");
    let hook = Arc::new(Foreign::new(9, "order.placed"));
    let (first_tx, first_rx) = oneshot::channel();
    {
        let hook = hook.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let _ = first_tx.send(hook.send(&url).await.status());
        });
    }
    tokio::time::timeout(PATIENCE, gate.started.recv())
        .await
        .unwrap()
        .unwrap();

    let concurrent = hook.send(&url).await;
    assert_eq!(concurrent.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = concurrent.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(*gate.handled.lock().unwrap(), 0);

    gate.release.notify_one();
    let first = tokio::time::timeout(PATIENCE, first_rx).await.unwrap().unwrap();
    assert_eq!(first, StatusCode::NO_CONTENT);
    // Once handled, the sender's retry learns so with a 2xx.
    let later = hook.send(&url).await;
    assert_eq!(later.status(), StatusCode::OK);
    assert_eq!(*gate.handled.lock().unwrap(), 1);
}
