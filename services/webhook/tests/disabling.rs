//! Endpoints disabled after failing for a whole window, and the health
//! changes the application is told about.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::routing::post;
use http::StatusCode;
use support::{Connect, Counter, PATIENCE, sender, serve};
use watchtower::Transport;
use watchtower::health::Status;
use watchtower::{ErrorKind, Event, PublishExt};
use watchtower_webhook::{Endpoint, WebhookFanOut};

const WINDOW: Duration = Duration::from_secs(600);

/// An endpoint answering whatever status `status` holds, counting requests.
async fn endpoint(status: Arc<AtomicU16>) -> (String, Counter) {
    let requests = Counter::default();
    let seen = requests.clone();
    let router = axum::Router::new().route(
        "/",
        post(move || {
            seen.incr();
            let code = status.load(Ordering::SeqCst);
            async move { StatusCode::from_u16(code).unwrap() }
        }),
    );
    (format!("http://{}/", serve(router).await), requests)
}

/// Moves the clock on without waiting; time runs again afterwards.
async fn skip(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

fn event() -> Event {
    Event::new("order.placed", serde_json::json!({}))
}

#[tokio::test]
async fn an_endpoint_failing_for_the_whole_window_is_disabled_and_reported() {
    let status = Arc::new(AtomicU16::new(500));
    let (url, requests) = endpoint(status.clone()).await;
    let failing = sender(url).name("failing").disable_after(WINDOW).connect().await;
    let mut fan_out = WebhookFanOut::builder()
        .endpoint(Endpoint::new(failing.clone()))
        .build()
        .unwrap();
    let mut watched = fan_out.subscribe_health();
    assert_eq!(watched.len(), 1);
    let (name, mut health) = watched.pop().unwrap();
    assert_eq!(&*name, "failing");
    assert_eq!(health.borrow_and_update().status(), Status::Up);

    assert!(fan_out.publish(event()).await.is_err());
    skip(WINDOW - Duration::from_secs(1)).await;
    assert!(fan_out.publish(event()).await.is_err());
    let now = failing.health().await;
    assert_eq!(now.status(), Status::Degraded, "not yet a whole window: {now:?}");
    assert_eq!(fan_out.health()[0].1, now);
    skip(Duration::from_secs(1)).await;
    assert!(fan_out.publish(event()).await.is_err());
    assert_eq!(requests.get(), 3);

    tokio::time::timeout(PATIENCE, health.changed())
        .await
        .unwrap()
        .unwrap();
    let disabled = health.borrow_and_update().clone();
    assert_eq!(disabled.status(), Status::Down);
    let reason = disabled.reason().unwrap();
    assert!(reason.contains("600s"), "{reason}");
    assert_eq!(failing.health().await, disabled);
    assert_eq!(fan_out.health()[0].1, disabled);

    // Disabled: no request, a Gone error that a dead-letter layer keeps.
    let err = fan_out.publish(event()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Gone);
    assert_eq!(requests.get(), 3);

    // Enabled again, the endpoint gets requests and a fresh window.
    status.store(200, Ordering::SeqCst);
    failing.enable();
    tokio::time::timeout(PATIENCE, health.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(health.borrow_and_update().status(), Status::Up);
    fan_out.publish(event()).await.unwrap();
    assert_eq!(failing.health().await.status(), Status::Up);
    assert_eq!(requests.get(), 4);
}

#[tokio::test]
async fn a_success_within_the_window_starts_it_afresh() {
    let status = Arc::new(AtomicU16::new(503));
    let (url, requests) = endpoint(status.clone()).await;
    let client = sender(url).disable_after(WINDOW).connect().await;
    let mut sender = client.publisher();
    let health = client.subscribe_health();

    assert!(sender.publish(event()).await.is_err());
    skip(WINDOW - Duration::from_secs(60)).await;
    status.store(204, Ordering::SeqCst);
    sender.publish(event()).await.unwrap();
    status.store(503, Ordering::SeqCst);
    skip(Duration::from_secs(120)).await;
    assert!(sender.publish(event()).await.is_err());
    skip(WINDOW - Duration::from_secs(1)).await;
    assert!(sender.publish(event()).await.is_err());
    assert!(!client.is_disabled());
    assert!(!health.has_changed().unwrap());
    assert_eq!(requests.get(), 4);

    // Without a window, failures never disable.
    let (url, _) = endpoint(status).await;
    let plain_client = support::sender(url).connect().await;
    let mut plain = plain_client.publisher();
    assert!(plain.publish(event()).await.is_err());
    skip(WINDOW * 100).await;
    assert!(plain.publish(event()).await.is_err());
    assert_eq!(plain_client.health().await.status(), Status::Degraded);
}
