//! Webhooks for WatchTower: signed delivery to HTTP endpoints, and a
//! verifying receiver for axum and hyper applications.
//!
//! * [`WebhookSender`] is a `Service<Event>` that POSTs each event to one
//!   endpoint, signed per Standard Webhooks 1.0, and turns the answer into a
//!   typed [`Error`](watchtower::Error) the retry, circuit-breaker and
//!   dead-letter layers understand.
//! * [`WebhookFanOut`] sends each event to every endpoint whose filter
//!   matches, each through its own layer stack (its own breaker), and
//!   reports each endpoint's outcome.
//! * [`WebhookVerifier`] checks a request's signature and timestamp;
//!   [`WebhookReceiverLayer`] puts it in front of a handler
//!   `Service<Event>`, giving an HTTP service to mount in axum.
//! * [`signature`] is the signing scheme itself, [`ssrf`] the address
//!   guard every sender runs by default.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder};
//! use watchtower::{Event, PublishExt};
//! use watchtower_webhook::{WebhookReceiverLayer, WebhookSender, WebhookVerifier};
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
//! let mut sender = WebhookSender::builder(format!("http://{addr}/hooks"))
//!     .secret(SECRET)
//!     .allow("127.0.0.1")
//!     .timeout(Duration::from_secs(20))
//!     .build()?;
//! sender.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! # Ok(()) }
//! ```

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
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod fanout;
mod rate;
pub mod receiver;
pub mod sender;
pub mod signature;
pub mod ssrf;

pub use fanout::{Endpoint, EndpointOutcome, FanOutReport, WebhookFanOut, WebhookFanOutBuilder, endpoint_of};
pub use receiver::{
    VerifyError, VerifyErrorKind, WebhookReceiver, WebhookReceiverLayer, WebhookVerifier, verify,
};
pub use sender::{ContentMode, Health, WebhookSender, WebhookSenderBuilder};
pub use signature::{PublicKey, Secret, SigningKey};

/// Everything a program using the webhook transport needs:
/// `use watchtower_webhook::prelude::*;`.
pub mod prelude {
    pub use crate::{
        ContentMode, Endpoint, Secret, WebhookFanOut, WebhookReceiverLayer, WebhookSender, WebhookVerifier,
    };
    pub use watchtower::prelude::*;
}
