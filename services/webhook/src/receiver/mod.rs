//! The receiving side: verify Standard Webhooks requests and turn them into
//! events.

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
