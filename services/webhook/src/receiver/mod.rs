//! The receiving side: verify Standard Webhooks requests and turn them into
//! events.
//!
//! [`WebhookVerifier`] checks one request: the three `webhook-*` headers are
//! present, the body is within the size limit, the timestamp is within the
//! tolerance (±5 minutes by default, too old and too new alike), one of the
//! signatures was made by one of the secrets (compared in constant time)
//! and, by option, the `webhook-id` was not seen before within the window.
//! [`verify`] is the same with the defaults, for code that has the headers
//! and body at hand.
//!
//! [`WebhookReceiverLayer`] wraps a handler `Service<Event>` into an HTTP
//! service for axum or hyper. It checks the `webhook-*` headers (present,
//! timestamp within the tolerance) *before* reading the body, so a request
//! that cannot be genuine costs no body read; then it reads the body up to
//! the limit and within the [body timeout](WebhookVerifier::body_timeout),
//! verifies the signature, decodes the event and calls the handler,
//! answering
//!
//! | outcome | status |
//! |---|---|
//! | handled | `204 No Content` |
//! | duplicate of a delivery already handled (with [`WebhookVerifier::reject_replays`]) | `200 OK`, handler not called |
//! | same `webhook-id` still being handled (with [`WebhookVerifier::reject_replays`]) | `503 Service Unavailable` with `Retry-After` |
//! | missing or malformed `webhook-*` header, body not an event | `400 Bad Request` |
//! | bad signature, timestamp outside the tolerance, `webhook-id` ≠ `ce-id` | `401 Unauthorized` |
//! | body not sent within the body timeout | `408 Request Timeout` |
//! | body over the limit | `413 Payload Too Large` |
//! | CloudEvents binary mode, not accepted (the default) | `415 Unsupported Media Type` |
//! | not a `POST` | `405 Method Not Allowed` |
//! | handler failed, retryable, or panicked | `500` (or `503` with `Retry-After` when the error has a hint) |
//! | handler failed, not retryable | `422 Unprocessable Entity` |
//!
//! # Duplicates and retries
//!
//! With [`reject_replays`](WebhookVerifier::reject_replays) the replay
//! memory is keyed by the verified `webhook-id` (never by the event's own
//! id, which a sender may choose differently, as Svix's `msg_…` ids are).
//! An id is *in progress* from verification until its handler finishes:
//! only a handler that succeeded makes the id *done*. A handler that fails,
//! panics, or is cancelled (the client disconnected and the server dropped
//! the request) forgets the id — a drop guard does it on every path — so
//! the sender's retry is handled. A retry that arrives while the first
//! attempt still runs gets a retryable `503` with `Retry-After`, never a
//! final answer. A duplicate of a delivery that was handled is answered
//! `200 OK` without calling the handler: the sender evidently did not hear
//! the first answer, and Standard Webhooks senders take any 2xx as
//! delivered, whereas many take `409` as a final failure and would report
//! (or dead-letter) an event that was in fact handled.
//!
//! # Binary mode is unsigned
//!
//! The signature covers `webhook-id`, `webhook-timestamp` and the body,
//! nothing else. A CloudEvents *binary-mode* request carries the event's
//! attributes (`ce-type`, `ce-source`, …) in headers, which anyone who
//! captured a request can change without breaking the signature. The
//! receiver therefore refuses binary mode unless
//! [`binary_mode`](WebhookVerifier::binary_mode) accepts it; then the
//! `ce-id` must equal the signed `webhook-id`, and every other `ce-`
//! attribute is unauthenticated: the handler must not trust it. Structured
//! mode (the sender's default) signs the whole event.
//!
//! A body is decoded as structured CloudEvents JSON when its content type
//! says so, as binary mode when `ce-specversion` is present (and accepted),
//! and otherwise as a plain webhook: an event whose id is the `webhook-id`,
//! whose type is the JSON body's `type` field (or `webhook`), and whose
//! data is the body.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder};
//! use watchtower::Event;
//! use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};
//!
//! # fn main() -> Result<(), watchtower::Error> {
//! let verifier = WebhookVerifier::new(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])?
//!     .max_body(256 * 1024)
//!     .body_timeout(Duration::from_secs(5))
//!     .reject_replays(100_000);
//! let hooks = ServiceBuilder::new()
//!     .layer(WebhookReceiverLayer::new(verifier))
//!     .service(service_fn(|event: Event| async move {
//!         println!("{} {}", event.id(), event.ty());
//!         Ok::<_, watchtower::Error>(())
//!     }));
//! let app: axum::Router = axum::Router::new().route_service("/hooks", hooks);
//! # let _ = app; Ok(()) }
//! ```

mod claim;
mod decode;
mod error;
mod service;
#[cfg(test)]
mod tests;
mod verifier;

pub use claim::Claim;
pub use decode::decode_event;
pub use error::{Verified, VerifyError, VerifyErrorKind};
pub use service::{HttpResponse, ResponseFuture, WebhookReceiver, WebhookReceiverLayer};
pub use verifier::{WebhookVerifier, verify};

#[allow(unused_imports)]
use claim::*;
#[allow(unused_imports)]
use decode::*;
#[allow(unused_imports)]
use service::*;
#[allow(unused_imports)]
use verifier::*;
