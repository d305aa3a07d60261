//! Why a request was refused, and what a verified one said.

use std::fmt;
use std::time::Duration;

use http::StatusCode;
use watchtower::{Error, ErrorKind};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VerifyErrorKind {
    /// A `webhook-*` header is missing.
    MissingHeader,
    /// A `webhook-*` header is malformed (not text, timestamp not an
    /// integer).
    InvalidHeader,
    /// The timestamp is older than the tolerance.
    TimestampTooOld,
    /// The timestamp is further in the future than the tolerance.
    TimestampTooNew,
    /// No signature matches any secret.
    InvalidSignature,
    /// The body is larger than the limit.
    BodyTooLarge,
    /// The body did not arrive within the body timeout.
    BodyTimeout,
    /// The `webhook-id` was already received and handled within the
    /// tolerance window: a duplicate.
    Replayed,
    /// The `webhook-id` is being handled right now by an earlier attempt;
    /// a retry later will learn its outcome.
    InProgress,
    /// The request is in CloudEvents binary mode, whose `ce-` headers the
    /// signature does not cover, and binary mode is not accepted (see
    /// [`WebhookVerifier::binary_mode`](crate::WebhookVerifier::binary_mode)).
    BinaryMode,
    /// In binary mode, the `ce-id` header differs from the signed
    /// `webhook-id`.
    IdMismatch,
    /// The body is not a valid event.
    InvalidEvent,
}

/// A refused request: why, and the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    pub(super) kind: VerifyErrorKind,
    pub(super) detail: String,
    pub(super) retry_after: Option<Duration>,
}

impl VerifyError {
    pub(super) fn new(kind: VerifyErrorKind, detail: impl Into<String>) -> VerifyError {
        VerifyError {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Why the request was refused.
    pub fn kind(&self) -> VerifyErrorKind {
        self.kind
    }

    /// The status to answer with:
    ///
    /// * `400` for a missing or malformed header or event,
    /// * `401` for a bad signature, a timestamp outside the tolerance, or a
    ///   `ce-id` that is not the signed `webhook-id`,
    /// * `408` for a body that did not arrive in time,
    /// * `413` for a body over the limit,
    /// * `415` for binary mode when it is not accepted,
    /// * `503` (with [`retry_after`](Self::retry_after)) for an id still in
    ///   progress,
    /// * `200` for a duplicate of a delivery already handled: the sender
    ///   must stop retrying, and Standard Webhooks senders take a 2xx as
    ///   delivered (see the [receiver docs](crate::WebhookReceiverLayer)).
    pub fn status(&self) -> StatusCode {
        match self.kind {
            VerifyErrorKind::MissingHeader
            | VerifyErrorKind::InvalidHeader
            | VerifyErrorKind::InvalidEvent => StatusCode::BAD_REQUEST,
            VerifyErrorKind::TimestampTooOld
            | VerifyErrorKind::TimestampTooNew
            | VerifyErrorKind::InvalidSignature
            | VerifyErrorKind::IdMismatch => StatusCode::UNAUTHORIZED,
            VerifyErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            VerifyErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            VerifyErrorKind::BinaryMode => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            VerifyErrorKind::InProgress => StatusCode::SERVICE_UNAVAILABLE,
            VerifyErrorKind::Replayed => StatusCode::OK,
        }
    }

    /// How long the sender should wait before retrying, for
    /// [`VerifyErrorKind::InProgress`]; sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for VerifyError {}

impl From<VerifyError> for Error {
    fn from(err: VerifyError) -> Error {
        let kind = match err.kind {
            VerifyErrorKind::InvalidEvent => ErrorKind::Decode,
            VerifyErrorKind::InProgress => ErrorKind::Throttled,
            _ => ErrorKind::Rejected,
        };
        let retry_after = err.retry_after;
        let error = Error::new(kind, err.detail.clone()).with_source(err);
        match retry_after {
            Some(after) => error.with_retry_after(after),
            None => error,
        }
    }
}

/// What a verified request said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// The `webhook-id`.
    pub id: String,
    /// The `webhook-timestamp`, Unix seconds.
    pub timestamp: i64,
}

impl Verified {
    /// What a request verified elsewhere said about itself, to
    /// [decode](crate::WebhookVerifier::decode) its event.
    pub fn new(id: impl Into<String>, timestamp: i64) -> Verified {
        Verified {
            id: id.into(),
            timestamp,
        }
    }
}
