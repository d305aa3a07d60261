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

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::{Layer, Service, ServiceExt};
use watchtower::codec::{self, Binding};
use watchtower::{BoxError, Error, ErrorKind, Event};

use crate::sender::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};
use crate::signature::{self, KeyRing, Secret, VerifyKey};

/// ±5 minutes, the Standard Webhooks recommendation: wide enough for clock
/// skew, narrow enough that a captured request soon stops working.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// 1 MiB, the sender's default payload limit.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Ids remembered for replay rejection when no capacity is given.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

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
    /// [`WebhookVerifier::binary_mode`]).
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
    kind: VerifyErrorKind,
    detail: String,
    retry_after: Option<Duration>,
}

impl VerifyError {
    fn new(kind: VerifyErrorKind, detail: impl Into<String>) -> VerifyError {
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
    ///   delivered (see the [module docs](self)).
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
    /// [decode](WebhookVerifier::decode) its event.
    pub fn new(id: impl Into<String>, timestamp: i64) -> Verified {
        Verified {
            id: id.into(),
            timestamp,
        }
    }
}

/// The `webhook-*` headers of a request whose timestamp is within the
/// tolerance; the signature is not checked yet.
struct SignedHeaders<'a> {
    id: &'a str,
    timestamp: i64,
    signatures: &'a str,
}

/// Checks requests against one or more keys. See the [module docs](self).
///
/// Cloning is cheap; clones share the keys (a [rotation](Self::rotate)
/// applies to all) and the replay memory.
#[derive(Clone)]
pub struct WebhookVerifier {
    keys: Arc<KeyRing<VerifyKey>>,
    tolerance: Duration,
    max_body: usize,
    body_timeout: Duration,
    binary_mode: bool,
    in_progress_retry_after: Duration,
    replay: Option<Arc<ReplayCache>>,
}

impl fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("keys", &self.keys.live_len())
            .field("tolerance", &self.tolerance)
            .field("max_body", &self.max_body)
            .field("body_timeout", &self.body_timeout)
            .field("binary_mode", &self.binary_mode)
            .field("reject_replays", &self.replay.is_some())
            .finish()
    }
}

impl WebhookVerifier {
    /// A verifier accepting signatures by any of `keys`: shared secrets
    /// `whsec_<base64>` (`v1` signatures) and Ed25519 public keys
    /// `whpk_<base64>` (`v1a`), in any mix.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if a key is malformed or there is none.
    pub fn new<I, S>(keys: I) -> Result<WebhookVerifier, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let keys = keys
            .into_iter()
            .map(|key| VerifyKey::new(key.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(Error::config("at least one webhook key is required"));
        }
        Ok(WebhookVerifier::from_keys(keys))
    }

    /// A verifier from parsed secrets.
    pub fn from_secrets(secrets: impl Into<Arc<[Secret]>>) -> WebhookVerifier {
        let secrets: Arc<[Secret]> = secrets.into();
        WebhookVerifier::from_keys(secrets.iter().cloned().map(VerifyKey::Symmetric))
    }

    /// A verifier from parsed keys, secrets and public keys alike.
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyKey>) -> WebhookVerifier {
        WebhookVerifier {
            keys: Arc::new(KeyRing::new(keys.into_iter().collect())),
            tolerance: DEFAULT_TOLERANCE,
            max_body: DEFAULT_MAX_BODY,
            body_timeout: Duration::from_secs(10),
            binary_mode: false,
            in_progress_retry_after: Duration::from_secs(5),
            replay: None,
        }
    }

    /// How far a timestamp may be from now, either way (default
    /// [`DEFAULT_TOLERANCE`]).
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The largest body accepted (default [`DEFAULT_MAX_BODY`]).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Accepts signatures by `key` from now on, and by the keys accepted
    /// until now for `grace` longer, so that requests the sender signed
    /// with the old key (or with both, during its own rotation) keep
    /// passing. Applies to every clone, the one inside a
    /// [`WebhookReceiverLayer`] included. `Duration::ZERO` retires the old
    /// keys at once.
    pub fn rotate(&self, key: impl Into<VerifyKey>, grace: Duration) {
        self.keys.rotate(key.into(), grace);
    }

    /// The largest body accepted.
    pub fn max_body_len(&self) -> usize {
        self.max_body
    }

    /// The time the whole body may take to arrive once the headers passed
    /// (default 10 s: a sender sends its body right after the headers, and
    /// Standard Webhooks senders give up on a request after 15–30 s, so a
    /// body slower than that is a stalled or hostile client holding a
    /// connection). A late body is answered `408 Request Timeout`.
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Accepts CloudEvents binary mode (default: refused with `415`).
    ///
    /// The trade-off: the signature does not cover the `ce-` headers, so
    /// with binary mode accepted, anyone holding one captured request can
    /// replay it within the tolerance with other `ce-type`, `ce-source`,
    /// `ce-subject`, … and the handler sees those forged attributes (only
    /// the data and the id are authenticated). The receiver does require
    /// `ce-id` to equal the signed `webhook-id` (else `401`), so a forged
    /// request is still a replay of the same id. Accept binary mode only
    /// from senders that cannot send structured mode, and let the handler
    /// trust nothing but the id and the data.
    pub fn binary_mode(mut self, accept: bool) -> Self {
        self.binary_mode = accept;
        self
    }

    /// The `Retry-After` sent with the `503` that answers a retry arriving
    /// while the same `webhook-id` is still being handled (default 5 s: a
    /// handler is expected to finish in a few seconds, and a sender that
    /// heeds the header then learns the outcome on its next attempt).
    pub fn in_progress_retry_after(mut self, after: Duration) -> Self {
        self.in_progress_retry_after = after;
        self
    }

    /// Refuses a verified `webhook-id` seen before within the tolerance
    /// window, remembering up to `capacity` ids (the oldest are forgotten
    /// first when full). Ids are keyed by the verified `webhook-id`; see
    /// the [module docs](self) for how in-progress, failed and handled ids
    /// are answered.
    pub fn reject_replays(mut self, capacity: usize) -> Self {
        self.replay = Some(Arc::new(ReplayCache::new(capacity)));
        self
    }

    /// Verifies a request now. With replay memory, the id counts as handled
    /// from here on: call [`forget`](Self::forget) if handling fails, or use
    /// [`claim`](Self::claim) instead, which does it on every path.
    ///
    /// # Errors
    ///
    /// A [`VerifyError`] saying why the request is refused.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
        self.verify_at(headers, body, unix_now())
    }

    /// Verifies a request as if the time were `now` (Unix seconds).
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify).
    pub fn verify_at(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        let signed = self.signed_headers(headers, now)?;
        self.check_signature(&signed, body)?;
        let claim = self.claim_id(&signed, now)?;
        claim.complete();
        Ok(Verified {
            id: signed.id.to_owned(),
            timestamp: signed.timestamp,
        })
    }

    /// Verifies a request now and, with replay memory, marks its id as in
    /// progress until the returned [`Claim`] is [completed](Claim::complete)
    /// (the id is then handled) or dropped (the id is forgotten, so the
    /// sender's retry is accepted). Without replay memory the claim does
    /// nothing.
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify); [`VerifyErrorKind::InProgress`] while
    /// another claim on the same id is alive.
    pub fn claim(&self, headers: &HeaderMap, body: &[u8]) -> Result<(Verified, Claim), VerifyError> {
        let now = unix_now();
        let signed = self.signed_headers(headers, now)?;
        self.check_signature(&signed, body)?;
        let claim = self.claim_id(&signed, now)?;
        let verified = Verified {
            id: signed.id.to_owned(),
            timestamp: signed.timestamp,
        };
        Ok((verified, claim))
    }

    /// The three `webhook-*` headers, present and text, with the timestamp
    /// within the tolerance: all that can be checked without the body.
    fn signed_headers<'a>(&self, headers: &'a HeaderMap, now: i64) -> Result<SignedHeaders<'a>, VerifyError> {
        let id = header(headers, WEBHOOK_ID)?;
        let timestamp = header(headers, WEBHOOK_TIMESTAMP)?;
        let signatures = header(headers, WEBHOOK_SIGNATURE)?;
        let timestamp: i64 = timestamp.trim().parse().map_err(|_| {
            VerifyError::new(
                VerifyErrorKind::InvalidHeader,
                "webhook-timestamp is not an integer",
            )
        })?;
        let tolerance = self.tolerance_secs();
        if now.saturating_sub(timestamp) > tolerance {
            return Err(VerifyError::new(
                VerifyErrorKind::TimestampTooOld,
                "webhook-timestamp is too old",
            ));
        }
        if timestamp.saturating_sub(now) > tolerance {
            return Err(VerifyError::new(
                VerifyErrorKind::TimestampTooNew,
                "webhook-timestamp is in the future",
            ));
        }
        Ok(SignedHeaders {
            id,
            timestamp,
            signatures,
        })
    }

    fn tolerance_secs(&self) -> i64 {
        i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX)
    }

    fn check_signature(&self, signed: &SignedHeaders<'_>, body: &[u8]) -> Result<(), VerifyError> {
        if body.len() > self.max_body {
            return Err(too_large(self.max_body));
        }
        let matched = self.keys.with_live(|keys| {
            signature::verify_any(keys, signed.id, signed.timestamp, body, signed.signatures)
        });
        if !matched {
            return Err(VerifyError::new(
                VerifyErrorKind::InvalidSignature,
                "no matching webhook signature",
            ));
        }
        Ok(())
    }

    /// Marks the verified id in progress in the replay memory.
    fn claim_id(&self, signed: &SignedHeaders<'_>, now: i64) -> Result<Claim, VerifyError> {
        let Some(replay) = &self.replay else {
            return Ok(Claim { held: None });
        };
        let expires = signed.timestamp.saturating_add(self.tolerance_secs());
        match replay.claim(signed.id, expires, now) {
            Ok(token) => Ok(Claim {
                held: Some(Held {
                    cache: replay.clone(),
                    id: signed.id.into(),
                    token,
                    expires,
                }),
            }),
            Err(Seen::Done) => Err(VerifyError::new(
                VerifyErrorKind::Replayed,
                "duplicate: webhook-id was already received and handled",
            )),
            Err(Seen::InProgress) => {
                let mut err = VerifyError::new(
                    VerifyErrorKind::InProgress,
                    "webhook-id is being handled by an earlier attempt; retry later",
                );
                err.retry_after = Some(self.in_progress_retry_after);
                Err(err)
            }
        }
    }

    /// Verifies a request and decodes its event. With replay memory the id
    /// counts as handled, as with [`verify`](Self::verify).
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify), and those of [`decode`](Self::decode)
    /// (the id is then forgotten for replay purposes, since nothing was
    /// accepted).
    pub fn event(&self, headers: &HeaderMap, body: Bytes) -> Result<Event, VerifyError> {
        let verified = self.verify(headers, &body)?;
        self.decode(headers, body, &verified)
            .inspect_err(|_| self.forget(&verified.id))
    }

    /// Decodes the event of a verified request: structured JSON, binary mode
    /// if [accepted](Self::binary_mode), or a plain webhook (see the
    /// [module docs](self)).
    ///
    /// # Errors
    ///
    /// [`VerifyErrorKind::InvalidEvent`] if the body or headers are not a
    /// valid event, [`VerifyErrorKind::BinaryMode`] for binary mode when it
    /// is not accepted, [`VerifyErrorKind::IdMismatch`] if its `ce-id` is
    /// not the `webhook-id`.
    pub fn decode(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        verified: &Verified,
    ) -> Result<Event, VerifyError> {
        decode_with(headers, body, verified, self.binary_mode)
    }

    /// Forgets a `webhook-id` for replay purposes, so the same id is accepted
    /// again (after its handler failed, so the sender's retry gets through).
    pub fn forget(&self, id: &str) {
        if let Some(replay) = &self.replay {
            replay.remove(id);
        }
    }
}

/// A verified `webhook-id` held in progress in the replay memory; from
/// [`WebhookVerifier::claim`].
///
/// [`complete`](Claim::complete) it once the event is handled; dropping it
/// otherwise (the handler failed, panicked, or its future was cancelled)
/// forgets the id so that the sender's retry is accepted.
#[must_use = "dropping a claim forgets the id; complete it once the event is handled"]
pub struct Claim {
    held: Option<Held>,
}

struct Held {
    cache: Arc<ReplayCache>,
    id: Box<str>,
    token: u64,
    expires: i64,
}

impl Claim {
    /// The event was handled: later duplicates of the id are answered as
    /// such until it leaves the window.
    pub fn complete(mut self) {
        if let Some(held) = self.held.take() {
            held.cache.complete(&held.id, held.token, held.expires);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.cache.release(&held.id, held.token);
        }
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("id", &self.held.as_ref().map(|h| &*h.id))
            .finish()
    }
}

/// Verifies a request against `secrets` with the default tolerance and body
/// limit and no replay memory.
///
/// # Errors
///
/// As [`WebhookVerifier::verify`].
pub fn verify(secrets: &[Secret], headers: &HeaderMap, body: &[u8]) -> Result<Verified, VerifyError> {
    WebhookVerifier::from_secrets(secrets.to_vec()).verify(headers, body)
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    let value = headers
        .get(name)
        .ok_or_else(|| VerifyError::new(VerifyErrorKind::MissingHeader, format!("missing {name} header")))?;
    value
        .to_str()
        .map_err(|_| VerifyError::new(VerifyErrorKind::InvalidHeader, format!("{name} is not text")))
}

fn too_large(limit: usize) -> VerifyError {
    VerifyError::new(
        VerifyErrorKind::BodyTooLarge,
        format!("body is larger than {limit} bytes"),
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Decodes the event of a verified request with the default policy:
/// structured JSON or a plain webhook; binary mode is refused (see the
/// [module docs](self) and [`WebhookVerifier::decode`]).
///
/// # Errors
///
/// As [`WebhookVerifier::decode`].
pub fn decode_event(headers: &HeaderMap, body: Bytes, verified: &Verified) -> Result<Event, VerifyError> {
    decode_with(headers, body, verified, false)
}

fn decode_with(
    headers: &HeaderMap,
    body: Bytes,
    verified: &Verified,
    binary: bool,
) -> Result<Event, VerifyError> {
    let invalid = |e: Error| VerifyError::new(VerifyErrorKind::InvalidEvent, e.to_string());
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type.is_some_and(codec::is_structured) {
        return codec::structured::from_bytes(&body).map_err(invalid);
    }
    if headers.contains_key("ce-specversion") {
        if !binary {
            return Err(VerifyError::new(
                VerifyErrorKind::BinaryMode,
                "CloudEvents binary mode is not accepted: its ce- headers are not signed; \
                 send structured mode",
            ));
        }
        if headers.get("ce-id").map(HeaderValue::as_bytes) != Some(verified.id.as_bytes()) {
            return Err(VerifyError::new(
                VerifyErrorKind::IdMismatch,
                "ce-id is not the signed webhook-id",
            ));
        }
        let pairs = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes()));
        return Binding::HTTP.decode(pairs, Some(body)).map_err(invalid);
    }
    let content_type = content_type.unwrap_or("application/octet-stream").to_owned();
    let ty = plain_type(&content_type, &body).unwrap_or_else(|| "webhook".to_owned());
    let mut event = Event::binary(ty, content_type, body);
    event.set_id(verified.id.as_str());
    event.set_source("/webhook");
    event.set_time(time::OffsetDateTime::from_unix_timestamp(verified.timestamp).ok());
    event.validate().map_err(invalid)?;
    Ok(event)
}

/// The `type` of a Standard Webhooks JSON payload, `{"type": "...", ...}`.
fn plain_type(content_type: &str, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        r#type: Option<String>,
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if !(essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")) {
        return None;
    }
    serde_json::from_slice::<Typed>(body)
        .ok()?
        .r#type
        .filter(|t| !t.is_empty())
}

/// Remembered `webhook-id`s, each until its timestamp leaves the window.
struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayInner>,
}

/// Why an id cannot be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Handled.
    Done,
    /// Claimed and not yet released or completed.
    InProgress,
}

struct Entry {
    /// Tells this claim from a later one on the same id, so that an old
    /// claim's release never forgets a newer one.
    token: u64,
    done: bool,
}

#[derive(Default)]
struct ReplayInner {
    entries: HashMap<Box<str>, Entry>,
    order: VecDeque<(i64, u64, Box<str>)>,
    next_token: u64,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity: capacity.max(1),
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `id` in progress; its token, or why it cannot be claimed.
    fn claim(&self, id: &str, expires: i64, now: i64) -> Result<u64, Seen> {
        let mut inner = self.lock();
        let ReplayInner {
            entries,
            order,
            next_token,
        } = &mut *inner;
        while let Some((at, _, _)) = order.front() {
            if *at > now && entries.len() < self.capacity {
                break;
            }
            if let Some((_, token, old)) = order.pop_front()
                && entries.get(&old).is_some_and(|e| e.token == token)
            {
                entries.remove(&old);
            }
        }
        if let Some(entry) = entries.get(id) {
            return Err(if entry.done { Seen::Done } else { Seen::InProgress });
        }
        let token = *next_token;
        *next_token = next_token.wrapping_add(1);
        entries.insert(id.into(), Entry { token, done: false });
        order.push_back((expires, token, id.into()));
        Ok(token)
    }

    /// The claim's event was handled.
    fn complete(&self, id: &str, token: u64, expires: i64) {
        let mut inner = self.lock();
        match inner.entries.get_mut(id) {
            Some(entry) if entry.token == token => entry.done = true,
            Some(_) => {}
            None => {
                // Pushed out by newer ids while in progress: remember it
                // again, as handled.
                drop(inner);
                if let Ok(token) = self.claim(id, expires, unix_now()) {
                    self.complete(id, token, expires);
                }
            }
        }
    }

    /// The claim ended without the event being handled.
    fn release(&self, id: &str, token: u64) {
        let mut inner = self.lock();
        if inner.entries.get(id).is_some_and(|e| e.token == token) {
            inner.entries.remove(id);
        }
    }

    fn remove(&self, id: &str) {
        self.lock().entries.remove(id);
    }
}

/// Wraps a handler `Service<Event>` into a verifying HTTP service. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct WebhookReceiverLayer {
    verifier: WebhookVerifier,
}

impl WebhookReceiverLayer {
    /// A layer verifying with `verifier`.
    pub fn new(verifier: WebhookVerifier) -> WebhookReceiverLayer {
        WebhookReceiverLayer { verifier }
    }
}

impl<H> Layer<H> for WebhookReceiverLayer {
    type Service = WebhookReceiver<H>;

    fn layer(&self, handler: H) -> WebhookReceiver<H> {
        WebhookReceiver::new(self.verifier.clone(), handler)
    }
}

/// An HTTP service that verifies webhook requests and hands their events to
/// a handler. From [`WebhookReceiverLayer`].
#[derive(Debug, Clone)]
pub struct WebhookReceiver<H> {
    verifier: WebhookVerifier,
    inner: H,
}

impl<H> WebhookReceiver<H> {
    /// A receiver verifying with `verifier` in front of `handler`.
    pub fn new(verifier: WebhookVerifier, handler: H) -> WebhookReceiver<H> {
        WebhookReceiver {
            verifier,
            inner: handler,
        }
    }

    /// The handler.
    pub fn get_ref(&self) -> &H {
        &self.inner
    }

    /// The handler, mutably.
    pub fn get_mut(&mut self) -> &mut H {
        &mut self.inner
    }

    /// The handler.
    pub fn into_inner(self) -> H {
        self.inner
    }
}

/// The response of [`WebhookReceiver`].
pub type HttpResponse = Response<Full<Bytes>>;

/// The response future of [`WebhookReceiver`].
///
/// Boxed: it reads a request body and runs the handler.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<H, B> Service<Request<B>> for WebhookReceiver<H>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    H: Service<Event> + Clone + Send + 'static,
    H::Future: Send,
    H::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ResponseFuture;

    /// Always ready: the handler's readiness is awaited once the request is
    /// verified, so that a busy handler delays requests rather than the
    /// server refusing connections.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        let handler = self.inner.clone();
        let verifier = self.verifier.clone();
        ResponseFuture {
            inner: Box::pin(async move { Ok(receive(verifier, handler, request).await) }),
        }
    }
}

async fn receive<H, B>(verifier: WebhookVerifier, handler: H, request: Request<B>) -> Response<Full<Bytes>>
where
    B: Body,
    B::Error: Into<BoxError>,
    H: Service<Event>,
    H::Error: Into<BoxError>,
{
    if request.method() != Method::POST {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "webhooks are POSTed");
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let (parts, body) = request.into_parts();
    // Everything that can be checked without the body is, before a byte
    // of it is read.
    let now = unix_now();
    let signed = match verifier.signed_headers(&parts.headers, now) {
        Ok(signed) => signed,
        Err(err) => return refuse(&err),
    };
    let limit = verifier.max_body_len();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return refuse(&too_large(limit));
    }
    let read = tokio::time::timeout(verifier.body_timeout, Limited::new(body, limit).collect());
    let body = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<LengthLimitError>() => return refuse(&too_large(limit)),
        Ok(Err(_)) => return text(StatusCode::BAD_REQUEST, "request body could not be read"),
        Err(_) => {
            return refuse(&VerifyError::new(
                VerifyErrorKind::BodyTimeout,
                "request body did not arrive in time",
            ));
        }
    };
    if let Err(err) = verifier.check_signature(&signed, &body) {
        return refuse(&err);
    }
    // From here until the handler succeeds the id is in progress; the
    // claim forgets it on every other path, a panic or a dropped future
    // included.
    let claim = match verifier.claim_id(&signed, now) {
        Ok(claim) => claim,
        Err(err) => return refuse(&err),
    };
    let verified = Verified {
        id: signed.id.to_owned(),
        timestamp: signed.timestamp,
    };
    let event = match verifier.decode(&parts.headers, body, &verified) {
        Ok(event) => event,
        Err(err) => return refuse(&err),
    };
    let into_error = |err: H::Error| Error::from_boxed(err.into());
    let handled = async {
        let handler = handler.ready_oneshot().await.map_err(into_error)?;
        handler.oneshot(event).await.map(drop).map_err(into_error)
    };
    match AssertUnwindSafe(handled).catch_unwind().await {
        Ok(Ok(())) => {
            claim.complete();
            let mut response = Response::new(Full::default());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Ok(Err(err)) => {
            drop(claim);
            tracing::debug!(error = %err, webhook_id = %verified.id, "webhook handler failed");
            handler_failed(&err)
        }
        Err(_) => {
            drop(claim);
            tracing::error!(webhook_id = %verified.id, "webhook handler panicked");
            text(StatusCode::INTERNAL_SERVER_ERROR, "handler failed")
        }
    }
}

fn handler_failed(err: &Error) -> Response<Full<Bytes>> {
    if !err.is_retryable() {
        return text(StatusCode::UNPROCESSABLE_ENTITY, err.kind().as_str());
    }
    match err.retry_after() {
        Some(after) => {
            let mut response = text(StatusCode::SERVICE_UNAVAILABLE, err.kind().as_str());
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
            response
        }
        None => text(StatusCode::INTERNAL_SERVER_ERROR, err.kind().as_str()),
    }
}

fn refuse(err: &VerifyError) -> Response<Full<Bytes>> {
    let mut response = text(err.status(), &err.to_string());
    if let Some(after) = err.retry_after() {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    response
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers(id: &str, ts: i64, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(WEBHOOK_ID, id.parse().unwrap());
        h.insert(WEBHOOK_TIMESTAMP, ts.to_string().parse().unwrap());
        h.insert(WEBHOOK_SIGNATURE, sig.parse().unwrap());
        h
    }

    fn verifier() -> WebhookVerifier {
        WebhookVerifier::new([SECRET]).unwrap()
    }

    fn kind(r: Result<Verified, VerifyError>) -> VerifyErrorKind {
        r.unwrap_err().kind()
    }

    #[test]
    fn spec_vector_passes_within_tolerance() {
        let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        let ok = verifier().verify_at(&h, PAYLOAD, TIMESTAMP + 299).unwrap();
        assert_eq!(ok.id, MSG_ID);
        assert_eq!(ok.timestamp, TIMESTAMP);
        assert!(verifier().verify_at(&h, PAYLOAD, TIMESTAMP - 299).is_ok());
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        let old = verifier().verify_at(&h, PAYLOAD, TIMESTAMP + 301).unwrap_err();
        assert_eq!(old.kind(), VerifyErrorKind::TimestampTooOld);
        assert_eq!(old.status(), StatusCode::UNAUTHORIZED);
        let new = verifier().verify_at(&h, PAYLOAD, TIMESTAMP - 301).unwrap_err();
        assert_eq!(new.kind(), VerifyErrorKind::TimestampTooNew);
        assert_eq!(new.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn tampering_and_wrong_secrets_are_refused() {
        let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        let tampered = verifier()
            .verify_at(&h, br#"{"test": 2432232315}"#, TIMESTAMP)
            .unwrap_err();
        assert_eq!(tampered.kind(), VerifyErrorKind::InvalidSignature);
        assert_eq!(tampered.status(), StatusCode::UNAUTHORIZED);
        let wrong = WebhookVerifier::from_secrets(vec![Secret::from_bytes(&[9; 32]).unwrap()]);
        assert_eq!(
            kind(wrong.verify_at(&h, PAYLOAD, TIMESTAMP)),
            VerifyErrorKind::InvalidSignature
        );
        // One of several secrets is enough (rotation).
        let both = WebhookVerifier::from_secrets(vec![
            Secret::from_bytes(&[9; 32]).unwrap(),
            Secret::new(SECRET).unwrap(),
        ]);
        assert!(both.verify_at(&h, PAYLOAD, TIMESTAMP).is_ok());
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let v = verifier();
        let mut h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        h.remove(WEBHOOK_SIGNATURE);
        let missing = v.verify_at(&h, PAYLOAD, TIMESTAMP).unwrap_err();
        assert_eq!(missing.kind(), VerifyErrorKind::MissingHeader);
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        let mut h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        h.insert(WEBHOOK_TIMESTAMP, HeaderValue::from_static("yesterday"));
        assert_eq!(
            kind(v.verify_at(&h, PAYLOAD, TIMESTAMP)),
            VerifyErrorKind::InvalidHeader
        );
        let err: Error = v.verify_at(&h, PAYLOAD, TIMESTAMP).unwrap_err().into();
        assert_eq!(err.kind(), ErrorKind::Rejected);
    }

    #[test]
    fn oversized_bodies_are_refused() {
        let v = verifier().max_body(PAYLOAD.len() - 1);
        let err = v
            .verify_at(&headers(MSG_ID, TIMESTAMP, EXPECTED), PAYLOAD, TIMESTAMP)
            .unwrap_err();
        assert_eq!(err.kind(), VerifyErrorKind::BodyTooLarge);
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn replays_are_refused_until_forgotten_or_expired() {
        let v = verifier().reject_replays(10);
        let h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        assert!(v.verify_at(&h, PAYLOAD, TIMESTAMP).is_ok());
        let replay = v.verify_at(&h, PAYLOAD, TIMESTAMP + 1).unwrap_err();
        assert_eq!(replay.kind(), VerifyErrorKind::Replayed);
        assert_eq!(replay.status(), StatusCode::OK);
        // Clones share the memory.
        assert_eq!(
            kind(v.clone().verify_at(&h, PAYLOAD, TIMESTAMP)),
            VerifyErrorKind::Replayed
        );
        v.forget(MSG_ID);
        assert!(v.verify_at(&h, PAYLOAD, TIMESTAMP).is_ok());
        // A bad signature does not record the id.
        let forged = headers("msg_forged", TIMESTAMP, "v1,AAAA");
        assert_eq!(
            kind(v.verify_at(&forged, PAYLOAD, TIMESTAMP)),
            VerifyErrorKind::InvalidSignature
        );
        assert_eq!(v.replay.as_ref().unwrap().lock().entries.len(), 1);
    }

    #[test]
    fn replay_memory_is_bounded() {
        let cache = ReplayCache::new(2);
        assert!(cache.claim("a", 100, 0).is_ok());
        assert!(cache.claim("b", 100, 0).is_ok());
        let c = cache.claim("c", 100, 0).unwrap();
        assert_eq!(cache.lock().entries.len(), 2);
        assert_eq!(cache.claim("c", 100, 0), Err(Seen::InProgress));
        cache.complete("c", c, 100);
        assert_eq!(cache.claim("c", 100, 0), Err(Seen::Done));
        // Expired ids are dropped.
        assert!(cache.claim("c", 300, 200).is_ok());
    }

    #[test]
    fn a_stale_release_never_forgets_a_newer_claim() {
        let cache = ReplayCache::new(10);
        let first = cache.claim("a", 100, 0).unwrap();
        cache.remove("a");
        let second = cache.claim("a", 100, 0).unwrap();
        cache.release("a", first);
        assert_eq!(cache.claim("a", 100, 0), Err(Seen::InProgress));
        cache.release("a", second);
        assert!(cache.claim("a", 100, 0).is_ok());
    }

    #[test]
    fn plain_webhooks_become_events() {
        let mut h = headers(MSG_ID, TIMESTAMP, EXPECTED);
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let verified = Verified {
            id: MSG_ID.into(),
            timestamp: TIMESTAMP,
        };
        let body = Bytes::from_static(br#"{"type":"invoice.paid","data":{"n":1}}"#);
        let event = decode_event(&h, body.clone(), &verified).unwrap();
        assert_eq!(event.id(), MSG_ID);
        assert_eq!(event.ty(), "invoice.paid");
        assert_eq!(event.data(), Some(&body));
        let untyped = decode_event(&h, Bytes::from_static(PAYLOAD), &verified).unwrap();
        assert_eq!(untyped.ty(), "webhook");
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        let err = decode_event(&h, Bytes::from_static(b"{not json"), &verified).unwrap_err();
        assert_eq!(err.kind(), VerifyErrorKind::InvalidEvent);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
}
