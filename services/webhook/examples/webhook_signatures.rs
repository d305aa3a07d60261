//! Signed webhooks end to end, self-contained: a local axum app receives
//! Standard Webhooks requests through the verifying layer, and a fan-out
//! sends events to it and to a second endpoint that only wants orders.
//!
//! ```text
//! cargo run -p watchtower-webhook --example webhook_signatures
//! ```

use std::time::Duration;

use tower::{ServiceBuilder, service_fn};
use watchtower::{Event, PublishExt};
use watchtower_webhook::{
    Endpoint, WebhookClient, WebhookConfig, WebhookFanOut, WebhookReceiverLayer, WebhookVerifier,
};
use watchtower_webhook::{Secret, signature};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The signature scheme, checked against the spec's published vector.
    let secret: Secret = SECRET.parse()?;
    let header = signature::sign(
        &[secret],
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        br#"{"test": 2432232314}"#,
    );
    println!("spec vector signature: {header}");
    assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");

    // 2. A receiving app: verified requests become events for a handler
    //    service, which can be wrapped in any layers.
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel::<(&'static str, Event)>();
    let app = |name: &'static str, verifier: WebhookVerifier| {
        let tx = tx.clone();
        let handler = service_fn(move |event: Event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((name, event));
                Ok::<_, watchtower::Error>(())
            }
        });
        axum::Router::new().route_service(
            "/hooks",
            ServiceBuilder::new()
                .layer(WebhookReceiverLayer::new(verifier))
                .service(handler),
        )
    };
    let mut urls = Vec::new();
    for name in ["crm", "billing"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}/hooks", listener.local_addr()?));
        // Each app remembers the ids it has seen, to refuse replays.
        let verifier = WebhookVerifier::new([SECRET])?.reject_replays(10_000);
        let router = app(name, verifier);
        tokio::spawn(async move { axum::serve(listener, router).await });
    }

    // 3. Sending: one client per endpoint, fanned out with filters. The SSRF
    //    guard refuses loopback unless it is allowed explicitly.
    let config = |name: &str, url: &str| {
        WebhookConfig::new(url)
            .name(name)
            .secret(SECRET)
            .allow("127.0.0.1")
            .timeout(Duration::from_secs(20))
            .rate_limit(100, Duration::from_secs(1))
    };
    let crm = WebhookClient::connect(config("crm", &urls[0])).await?;
    let billing = WebhookClient::connect(config("billing", &urls[1])).await?;
    let mut fan_out = WebhookFanOut::builder()
        .layer(ServiceBuilder::new().concurrency_limit(32))
        .endpoint(Endpoint::new(crm))
        .endpoint(Endpoint::new(billing).filter(["order.>"])?)
        .build()?;

    for event in [
        Event::new("user.created", serde_json::json!({"user_id": 1})),
        Event::new("order.placed", serde_json::json!({"order_id": 7, "total": 42.5})),
    ] {
        let report = fan_out.publish(event.clone()).await?;
        let endpoints: Vec<&str> = report.succeeded().collect();
        println!("{} {} delivered to {endpoints:?}", event.ty(), event.id());
    }
    for _ in 0..3 {
        let (endpoint, event) = received.recv().await.ok_or("receiver stopped")?;
        println!("{endpoint} received {} {}", event.ty(), event.id());
    }

    // 4. A forged request is refused before any handler sees it.
    let wrong_key = WebhookConfig::new(&urls[0])
        .secret("whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXkhIQ==")
        .allow("127.0.0.1");
    let forged = WebhookClient::connect(wrong_key)
        .await?
        .publisher()
        .publish(Event::new("user.created", serde_json::json!({"user_id": 666})))
        .await;
    match forged {
        Err(err) => println!("wrong secret: {err}"),
        Ok(_) => return Err("a forged request was accepted".into()),
    }
    Ok(())
}
