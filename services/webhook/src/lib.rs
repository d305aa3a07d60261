//! Webhooks for WatchTower: signed delivery to HTTP endpoints, and a
//! verifying receiver for axum and hyper applications.
//!
//! # Connect
//!
//! HTTP keeps no connection to a webhook endpoint, so "connecting" builds
//! what every delivery shares: [`WebhookClient::connect`] takes a
//! [`WebhookConfig`] (the endpoint URL, its signing keys, timeouts, the
//! `Retry-After` cap, the SSRF policy, a rate limit), checks it once and
//! builds the HTTP client (connection pool, TLS, the SSRF guard). Nothing is
//! sent until the first event. The client is cheap to clone; its
//! [`health`](watchtower::Transport::health) comes from the recent
//! deliveries: up, degraded while the last one failed, down while the
//! endpoint is disabled (a `410 Gone`, or failures for the whole
//! [`disable_after`](WebhookConfig::disable_after) window).
//!
//! ```no_run
//! use std::time::Duration;
//! use watchtower_webhook::{WebhookClient, WebhookConfig};
//!
//! # async fn run() -> Result<(), watchtower::Error> {
//! let config = WebhookConfig::new("https://example.com/hooks")
//!     .secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .timeout(Duration::from_secs(20));
//! let client = WebhookClient::connect(config).await?;
//! # let _ = client; Ok(()) }
//! ```
//!
//! # Publish
//!
//! [`WebhookClient::publisher`] makes a [`WebhookPublisher`], a
//! `Service<Event>` that POSTs each event to the endpoint, signed per
//! Standard Webhooks 1.0, and turns the answer into a typed
//! [`Error`](watchtower::Error) the retry, circuit-breaker and dead-letter
//! layers understand (see the table in [`WebhookPublisher`]'s docs).
//! [`WebhookFanOut`] sends each event to every [`Endpoint`] (a client and a
//! topic filter) whose filter matches, each through its own layer stack.
//!
//! ```no_run
//! use watchtower::{Event, PublishExt};
//! use watchtower_webhook::{WebhookClient, WebhookConfig};
//!
//! # async fn run() -> Result<(), watchtower::Error> {
//! # let client = WebhookClient::connect(WebhookConfig::new("https://example.com/hooks").secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).await?;
//! let mut publisher = client.publisher();
//! let receipt = publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! println!("delivered {}", receipt.event_id);
//! # Ok(()) }
//! ```
//!
//! # Subscribe
//!
//! The receiving side is an HTTP service mounted in the application's own
//! server: [`WebhookVerifier`] (the receiver's configuration: keys,
//! timestamp tolerance, body limit and timeout, replay memory) checks a
//! request's signature and timestamp; [`WebhookReceiverLayer`] puts it in
//! front of a handler `Service<Event>`, giving a service to mount in axum.
//!
//! ```no_run
//! use tower::{service_fn, ServiceBuilder};
//! use watchtower::{Event, PublishExt};
//! use watchtower_webhook::{WebhookClient, WebhookConfig, WebhookReceiverLayer, WebhookVerifier};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
//!
//! // Receiving: verified requests become events for a handler service.
//! let receiver = ServiceBuilder::new()
//!     .layer(WebhookReceiverLayer::new(WebhookVerifier::new([SECRET])?))
//!     .service(service_fn(|event: Event| async move {
//!         println!("received {}", event.ty());
//!         Ok::<_, watchtower::Error>(())
//!     }));
//! let app = axum::Router::new().route_service("/hooks", receiver);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // Sending: 127.0.0.1 must be allowed through the SSRF guard.
//! let config = WebhookConfig::new(format!("http://{addr}/hooks")).secret(SECRET).allow("127.0.0.1");
//! let mut publisher = WebhookClient::connect(config).await?.publisher();
//! publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! * A call makes one attempt and answers what the endpoint said: `Ok`
//!   only for a 2xx; every other outcome is a typed error (retryable or
//!   not, with the endpoint's `Retry-After` as its hint, capped), so that
//!   with a retry and a dead-letter layer on top an event is delivered,
//!   dead-lettered, or its caller gets an error. The publisher has no
//!   retry loop of its own.
//! * Every attempt of one event carries the same `webhook-id` (the event
//!   id), so a receiver deduplicates retries; this crate's receiver does
//!   with [`reject_replays`](crate::WebhookVerifier::reject_replays), and forgets
//!   an id whose handler failed, panicked or was cancelled, so the retry is
//!   handled.
//! * A disabled endpoint fails each delivery with
//!   [`ErrorKind::Gone`](watchtower::ErrorKind::Gone) without a request
//!   until [`WebhookClient::enable`].
//! * The receiver answers `2xx` only after the handler succeeded.
//! * Each publisher call opens the core's publish span
//!   ([`watchtower::trace::PublishTrace`]) with `messaging.system =
//!   "webhook"`.
//!
//! # Signatures and the SSRF guard
//!
//! [`signature`] is the signing scheme itself (the key types are at the
//! crate root: [`Secret`], [`SigningKey`], [`PublicKey`]). Every client
//! runs an SSRF guard by default: private, loopback and link-local
//! addresses (IPv6 forms that embed an IPv4 address judged by it) are
//! refused unless an [`AllowList`] lets them through.
//!
//! # Fuzzing
//!
//! `fuzz/` holds `cargo fuzz` targets for what reads outside input: the
//! receiver's header, signature and body decoding (`receiver_request`),
//! `webhook-signature` parsing and checking (`signature_header`) and
//! `Retry-After` parsing (`retry_after`). On a stable toolchain, from
//! `services/webhook/fuzz`:
//!
//! ```text
//! CARGO_TARGET_DIR=/tmp/fuzz-target RUSTC_BOOTSTRAP=1 cargo fuzz run receiver_request -- -max_total_time=300
//! ```

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod fanout;
mod guard;
mod publisher;
mod rate;
mod receiver;
pub mod signature;
pub mod ssrf;

pub use fanout::{
    Endpoint, EndpointOutcome, FanOutReport, ResponseFuture as FanOutFuture, WebhookFanOut,
    WebhookFanOutBuilder, endpoint_of,
};
pub use guard::AllowList;
pub use publisher::{
    ContentMode, ENDPOINT_EXTENSION, ResponseFuture as PublishFuture, WEBHOOK_ID, WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP, WebhookClient, WebhookConfig, WebhookPublisher, parse_retry_after,
    parse_retry_after_bytes,
};
pub use receiver::{
    Claim, HttpResponse, ResponseFuture as ReceiveFuture, Verified, VerifyError, VerifyErrorKind,
    WebhookReceiver, WebhookReceiverLayer, WebhookVerifier, decode_event, verify,
};
pub use signature::keys::{PublicKey, Secret, Signer, SigningKey, VerifyKey};

/// Seconds since the Unix epoch, as the `webhook-timestamp` header carries
/// them (0 before the epoch, saturating far after it).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Everything a program using the webhook transport needs:
/// `use watchtower_webhook::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Endpoint, Secret, WebhookClient, WebhookConfig, WebhookFanOut, WebhookPublisher,
        WebhookReceiverLayer, WebhookVerifier,
    };
    pub use watchtower::prelude::*;
}
