//! Ed25519 signatures and key rotation between a real sender and a real
//! receiver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Connect, Counter, SECRET, serve};
use tower::{ServiceBuilder, service_fn};
use watchtower::{ErrorKind, Event, PublishExt};
use watchtower_webhook::SigningKey;
use watchtower_webhook::{WebhookConfig, WebhookPublisher, WebhookReceiverLayer, WebhookVerifier};

const SIGNING_KEY: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";

/// A receiver counting handled events, verifying with `verifier`.
async fn receiver(verifier: WebhookVerifier) -> (String, Counter) {
    let handled = Counter::default();
    let counted = handled.clone();
    let handler = service_fn(move |_event: Event| {
        counted.incr();
        async { Ok::<_, watchtower::Error>(()) }
    });
    let service = ServiceBuilder::new()
        .layer(WebhookReceiverLayer::new(verifier))
        .service(handler);
    let addr = serve(axum::Router::new().route_service("/hooks", service)).await;
    (format!("http://{addr}/hooks"), handled)
}

fn event(n: u32) -> Event {
    Event::new("key.rotation", serde_json::json!({"n": n}))
}

#[tokio::test]
async fn ed25519_signatures_pass_a_receiver_that_holds_only_the_public_key() {
    let public = SigningKey::new(SIGNING_KEY).unwrap().public_key().to_string();
    let (url, handled) = receiver(WebhookVerifier::new([public.as_str()]).unwrap()).await;
    let mut sender = WebhookConfig::new(&url)
        .secret(SIGNING_KEY)
        .allow("127.0.0.1")
        .publisher()
        .await;
    sender.publish(event(1)).await.unwrap();
    assert_eq!(handled.get(), 1);

    // A sender with a shared secret is refused by it.
    let mut hmac = support::sender(&url).publisher().await;
    let err = hmac.publish(event(2)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(handled.get(), 1);
}

/// Sender and receiver rotate from a shared secret to an Ed25519 key, each
/// at its own moment; no delivery fails on the way.
#[tokio::test]
async fn rotation_on_both_sides_loses_no_delivery_during_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(3600);
    let verifier = WebhookVerifier::new([SECRET]).unwrap();
    let (url, handled) = receiver(verifier.clone()).await;
    let client = support::sender(&url).connect().await;
    let mut sender = client.publisher();
    let mut n = 0;
    let mut deliver = async |sender: &mut WebhookPublisher| {
        n += 1;
        sender.publish(event(n)).await
    };
    deliver(&mut sender).await.unwrap();

    // The sender rotates first: both signatures travel, the receiver still
    // knows only the old secret.
    let new = SigningKey::new(SIGNING_KEY).unwrap();
    client.rotate(new.clone(), GRACE);
    deliver(&mut sender).await.unwrap();
    deliver(&mut sender.clone()).await.unwrap();

    // The receiver learns the new key; it still takes the old one.
    verifier.rotate(new.public_key(), GRACE);
    deliver(&mut sender).await.unwrap();
    let mut old_only = support::sender(&url).publisher().await;
    deliver(&mut old_only).await.unwrap();

    // The grace periods end: only the new key signs and verifies.
    tokio::time::pause();
    tokio::time::advance(GRACE + Duration::from_secs(1)).await;
    tokio::time::resume();
    deliver(&mut sender).await.unwrap();
    assert_eq!(handled.get(), 6);
    let err = deliver(&mut old_only).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(handled.get(), 6);
}
