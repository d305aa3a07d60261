//! Webhook benchmarks: the cost of signing and verifying one event, and
//! signed delivery to a local axum endpoint with many requests in flight,
//! next to raw reqwest posting the same body to the same server, and what
//! one receiving core does per request (verify and decode, `v1` and `v1a`).
//!
//! ```text
//! cargo bench -p watchtower-webhook --bench webhook
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use tower::{ServiceBuilder, ServiceExt, service_fn};
use watchtower::Event;
use watchtower_webhook::{Secret, Signer, SigningKey, VerifyKey, signature};
use watchtower_webhook::{WebhookClient, WebhookConfig, WebhookReceiverLayer, WebhookVerifier};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BATCH: usize = 512;
const IN_FLIGHT: usize = 64;

fn event() -> Event {
    Event::new(
        "user.created",
        serde_json::json!({"user_id": 123, "email": "ada@example.com", "plan": "pro", "seats": 5}),
    )
}

fn signing(c: &mut Criterion) {
    let event = event();
    let body = watchtower::codec::structured::to_vec(&event).unwrap();
    let secrets = [Secret::new(SECRET).unwrap()];
    let ts = 1_700_000_000;
    let header = signature::sign(&secrets, event.id(), ts, &body);
    let mut headers = http::HeaderMap::new();
    headers.insert("webhook-id", event.id().parse().unwrap());
    headers.insert("webhook-timestamp", ts.to_string().parse().unwrap());
    headers.insert("webhook-signature", header.parse().unwrap());
    let verifier = WebhookVerifier::from_secrets(secrets.to_vec());

    let mut group = c.benchmark_group("signature");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| {
        b.iter(|| signature::sign(&secrets, event.id(), ts, std::hint::black_box(&body)))
    });
    group.bench_function("verify", |b| {
        b.iter(|| {
            verifier
                .verify_at(&headers, std::hint::black_box(&body), ts)
                .unwrap()
        })
    });
    group.bench_function("encode_sign_verify_decode", |b| {
        b.iter(|| {
            let body = watchtower::codec::structured::to_bytes(&event).unwrap();
            let sig = signature::sign(&secrets, event.id(), ts, &body);
            let mut headers = headers.clone();
            headers.insert("webhook-signature", sig.parse().unwrap());
            verifier.verify_at(&headers, &body, ts).unwrap();
            watchtower::codec::structured::from_bytes(&body).unwrap()
        })
    });
    group.finish();
}

/// What one receiving core does per request once the body is in memory:
/// check the signature, then decode the event, for each signature scheme.
fn receiving(c: &mut Criterion) {
    let event = event();
    let body = bytes::Bytes::from(watchtower::codec::structured::to_vec(&event).unwrap());
    let ts = 1_700_000_000;
    let ed25519 = SigningKey::from_seed(&[7; 32]);
    let schemes = [
        (
            "v1",
            Signer::Symmetric(Secret::new(SECRET).unwrap()),
            VerifyKey::Symmetric(Secret::new(SECRET).unwrap()),
        ),
        (
            "v1a",
            Signer::Asymmetric(ed25519.clone()),
            VerifyKey::Asymmetric(ed25519.public_key()),
        ),
    ];
    let mut group = c.benchmark_group("receive");
    group.throughput(Throughput::Elements(1));
    for (name, signer, key) in schemes {
        let mut headers = http::HeaderMap::new();
        headers.insert("webhook-id", event.id().parse().unwrap());
        headers.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        headers.insert(
            "webhook-signature",
            signer.sign(event.id(), ts, &body).parse().unwrap(),
        );
        let verifier = WebhookVerifier::from_keys([key]);
        group.bench_function(format!("verify_decode_{name}"), |b| {
            b.iter(|| {
                let verified = verifier
                    .verify_at(&headers, std::hint::black_box(&body), ts)
                    .unwrap();
                verifier.decode(&headers, body.clone(), &verified).unwrap()
            })
        });
    }
    group.finish();
}

fn delivery(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let handler = service_fn(|_: Event| async { Ok::<_, watchtower::Error>(()) });
        let hooks = ServiceBuilder::new()
            .layer(WebhookReceiverLayer::new(WebhookVerifier::new([SECRET]).unwrap()))
            .service(handler);
        let router = axum::Router::new().route_service("/hooks", hooks).route(
            "/raw",
            axum::routing::post(|_body: bytes::Bytes| async { axum::http::StatusCode::NO_CONTENT }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    });
    let config = WebhookConfig::new(format!("http://{addr}/hooks"))
        .secret(SECRET)
        .allow("127.0.0.1");
    let sender = rt.block_on(WebhookClient::connect(config)).unwrap().publisher();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let raw = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .unwrap();
    let raw_url = format!("http://{addr}/raw");

    let mut group = c.benchmark_group("delivery");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("raw_reqwest_64_in_flight", |b| {
        b.to_async(&rt).iter(|| async {
            futures_util::stream::iter(0..BATCH)
                .for_each_concurrent(IN_FLIGHT, |_| {
                    let raw = raw.clone();
                    let url = raw_url.clone();
                    async move {
                        // Same work a client does without WatchTower: encode, POST.
                        let body = watchtower::codec::structured::to_bytes(&event()).unwrap();
                        let response = raw
                            .post(url)
                            .header("content-type", "application/cloudevents+json")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        assert!(response.status().is_success());
                    }
                })
                .await
        })
    });
    let hooks_url = format!("http://{addr}/hooks");
    let secrets = [Secret::new(SECRET).unwrap()];
    group.bench_function(
        "raw_reqwest_hand_signed_to_verifying_receiver_64_in_flight",
        |b| {
            b.to_async(&rt).iter(|| async {
                futures_util::stream::iter(0..BATCH)
                    .for_each_concurrent(IN_FLIGHT, |_| {
                        let raw = raw.clone();
                        let url = hooks_url.clone();
                        let secrets = secrets.clone();
                        async move {
                            let event = event();
                            let body = watchtower::codec::structured::to_bytes(&event).unwrap();
                            let ts = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap()
                                .as_secs() as i64;
                            let sig = signature::sign(&secrets, event.id(), ts, &body);
                            let response = raw
                                .post(url)
                                .header("content-type", "application/cloudevents+json")
                                .header("webhook-id", event.id())
                                .header("webhook-timestamp", ts)
                                .header("webhook-signature", sig)
                                .body(body)
                                .send()
                                .await
                                .unwrap();
                            assert!(response.status().is_success());
                        }
                    })
                    .await
            })
        },
    );
    group.bench_function("signed_sender_to_verifying_receiver_64_in_flight", |b| {
        b.to_async(&rt).iter(|| async {
            futures_util::stream::iter(0..BATCH)
                .for_each_concurrent(IN_FLIGHT, |_| {
                    let sender = sender.clone();
                    async move {
                        sender.oneshot(event()).await.unwrap();
                    }
                })
                .await
        })
    });
    group.finish();
}

criterion_group!(benches, signing, receiving, delivery);
criterion_main!(benches);
