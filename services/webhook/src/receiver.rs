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
//! service for axum or hyper: it reads the body up to the limit, verifies
//! the request, decodes the event and calls the handler, answering
//!
//! | outcome | status |
//! |---|---|
//! | handled | `204 No Content` |
//! | missing or malformed `webhook-*` header, body not an event | `400 Bad Request` |
//! | bad signature, timestamp outside the tolerance | `401 Unauthorized` |
//! | `webhook-id` replayed (with [`WebhookVerifier::reject_replays`]) | `409 Conflict` |
//! | body over the limit | `413 Payload Too Large` |
//! | not a `POST` | `405 Method Not Allowed` |
//! | handler failed, retryable | `500` (or `503` with `Retry-After` when the error has a hint) |
//! | handler failed, not retryable | `422 Unprocessable Entity` |
//!
//! A body is decoded as structured CloudEvents JSON when its content type
//! says so, as binary mode when `ce-specversion` is present, and otherwise
//! as a plain webhook: an event whose id is the `webhook-id`, whose type is
//! the JSON body's `type` field (or `webhook`), and whose data is the body.
//!
//! # Example
//!
//! ```
//! use tower::{service_fn, ServiceBuilder};
//! use watchtower::Event;
//! use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};
//!
//! # fn main() -> Result<(), watchtower::Error> {
//! let verifier = WebhookVerifier::new(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])?
//!     .max_body(256 * 1024)
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
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::{Layer, Service, ServiceExt};
use watchtower::codec::{self, Binding};
use watchtower::{BoxError, Error, ErrorKind, Event};

use crate::sender::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};
use crate::signature::{self, Secret};

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
    /// The `webhook-id` was already received within the tolerance window.
    Replayed,
    /// The body is not a valid event.
    InvalidEvent,
}

/// A refused request: why, and the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    kind: VerifyErrorKind,
    detail: String,
}

impl VerifyError {
    fn new(kind: VerifyErrorKind, detail: impl Into<String>) -> VerifyError {
        VerifyError {
            kind,
            detail: detail.into(),
        }
    }

    /// Why the request was refused.
    pub fn kind(&self) -> VerifyErrorKind {
        self.kind
    }

    /// The status to answer with: 400, 401, 409 or 413.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            VerifyErrorKind::MissingHeader
            | VerifyErrorKind::InvalidHeader
            | VerifyErrorKind::InvalidEvent => StatusCode::BAD_REQUEST,
            VerifyErrorKind::TimestampTooOld
            | VerifyErrorKind::TimestampTooNew
            | VerifyErrorKind::InvalidSignature => StatusCode::UNAUTHORIZED,
            VerifyErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            VerifyErrorKind::Replayed => StatusCode::CONFLICT,
        }
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
            _ => ErrorKind::Rejected,
        };
        Error::new(kind, err.detail.clone()).with_source(err)
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

/// Checks requests against one or more secrets. See the [module docs](self).
///
/// Cloning is cheap; clones share the replay memory.
#[derive(Clone)]
pub struct WebhookVerifier {
    secrets: Arc<[Secret]>,
    tolerance: Duration,
    max_body: usize,
    replay: Option<Arc<ReplayCache>>,
}

impl fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("secrets", &self.secrets.len())
            .field("tolerance", &self.tolerance)
            .field("max_body", &self.max_body)
            .field("reject_replays", &self.replay.is_some())
            .finish()
    }
}

impl WebhookVerifier {
    /// A verifier accepting signatures by any of `secrets` (`whsec_<base64>`).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] if a secret is malformed or there is none.
    pub fn new<I, S>(secrets: I) -> Result<WebhookVerifier, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(WebhookVerifier::from_secrets(signature::parse_secrets(secrets)?))
    }

    /// A verifier from parsed secrets.
    pub fn from_secrets(secrets: impl Into<Arc<[Secret]>>) -> WebhookVerifier {
        WebhookVerifier {
            secrets: secrets.into(),
            tolerance: DEFAULT_TOLERANCE,
            max_body: DEFAULT_MAX_BODY,
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

    /// The largest body accepted.
    pub fn max_body_len(&self) -> usize {
        self.max_body
    }

    /// Refuses a verified `webhook-id` seen before within the tolerance
    /// window, remembering up to `capacity` ids (the oldest are forgotten
    /// first when full). An id whose handler failed is forgotten, so that
    /// the sender's retry is accepted.
    pub fn reject_replays(mut self, capacity: usize) -> Self {
        self.replay = Some(Arc::new(ReplayCache::new(capacity)));
        self
    }

    /// Verifies a request now.
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
        let id = header(headers, WEBHOOK_ID)?;
        let timestamp = header(headers, WEBHOOK_TIMESTAMP)?;
        let signatures = header(headers, WEBHOOK_SIGNATURE)?;
        if body.len() > self.max_body {
            return Err(too_large(self.max_body));
        }
        let timestamp: i64 = timestamp.trim().parse().map_err(|_| {
            VerifyError::new(
                VerifyErrorKind::InvalidHeader,
                "webhook-timestamp is not an integer",
            )
        })?;
        let tolerance = i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX);
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
        if !signature::matches(&self.secrets, id, timestamp, body, signatures) {
            return Err(VerifyError::new(
                VerifyErrorKind::InvalidSignature,
                "no matching webhook signature",
            ));
        }
        if let Some(replay) = &self.replay
            && !replay.insert(id, timestamp.saturating_add(tolerance), now)
        {
            {
                return Err(VerifyError::new(
                    VerifyErrorKind::Replayed,
                    "webhook-id was already received",
                ));
            }
        }
        Ok(Verified {
            id: id.to_owned(),
            timestamp,
        })
    }

    /// Verifies a request and decodes its event.
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify), and [`VerifyErrorKind::InvalidEvent`] if
    /// the body does not decode (the id is then forgotten for replay
    /// purposes, since nothing was accepted).
    pub fn event(&self, headers: &HeaderMap, body: Bytes) -> Result<Event, VerifyError> {
        let verified = self.verify(headers, &body)?;
        decode_event(headers, body, &verified).inspect_err(|_| self.forget(&verified.id))
    }

    /// Forgets a `webhook-id` for replay purposes, so the same id is accepted
    /// again (after its handler failed, so the sender's retry gets through).
    pub fn forget(&self, id: &str) {
        if let Some(replay) = &self.replay {
            replay.remove(id);
        }
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

/// Decodes the event of a verified request: structured JSON, binary mode,
/// or a plain webhook (see the [module docs](self)).
///
/// # Errors
///
/// [`VerifyErrorKind::InvalidEvent`] if the body or headers are not a
/// valid event.
pub fn decode_event(headers: &HeaderMap, body: Bytes, verified: &Verified) -> Result<Event, VerifyError> {
    let invalid = |e: Error| VerifyError::new(VerifyErrorKind::InvalidEvent, e.to_string());
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if content_type.is_some_and(codec::is_structured) {
        return codec::structured::from_bytes(&body).map_err(invalid);
    }
    if headers.contains_key("ce-specversion") {
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

#[derive(Default)]
struct ReplayInner {
    expires: HashMap<Box<str>, i64>,
    order: VecDeque<(i64, Box<str>)>,
}

impl ReplayCache {
    fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity: capacity.max(1),
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    /// Records `id`; false if it is already known.
    fn insert(&self, id: &str, expires: i64, now: i64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let ReplayInner { expires: map, order } = &mut *inner;
        while let Some((at, _)) = order.front() {
            if *at > now && map.len() < self.capacity {
                break;
            }
            if let Some((at, old)) = order.pop_front()
                && map.get(&old) == Some(&at)
            {
                map.remove(&old);
            }
        }
        if map.contains_key(id) {
            return false;
        }
        map.insert(id.into(), expires);
        order.push_back((expires, id.into()));
        true
    }

    fn remove(&self, id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.expires.remove(id);
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
    let limit = verifier.max_body_len();
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return refuse(&too_large(limit));
    }
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => return refuse(&too_large(limit)),
        Err(_) => return text(StatusCode::BAD_REQUEST, "request body could not be read"),
    };
    let event = match verifier.event(&parts.headers, body) {
        Ok(event) => event,
        Err(err) => return refuse(&err),
    };
    let id = event.id().to_owned();
    let into_error = |err: H::Error| Error::from_boxed(err.into());
    let result = match handler.ready_oneshot().await.map_err(into_error) {
        Ok(handler) => handler.oneshot(event).await.map(drop).map_err(into_error),
        Err(err) => Err(err),
    };
    match result {
        Ok(_) => {
            let mut response = Response::new(Full::default());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        Err(err) => {
            verifier.forget(&id);
            tracing::debug!(error = %err, webhook_id = %id, "webhook handler failed");
            handler_failed(&err)
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
    text(err.status(), &err.to_string())
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
        assert_eq!(replay.status(), StatusCode::CONFLICT);
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
        assert_eq!(v.replay.as_ref().unwrap().inner.lock().unwrap().expires.len(), 1);
    }

    #[test]
    fn replay_memory_is_bounded() {
        let cache = ReplayCache::new(2);
        assert!(cache.insert("a", 100, 0));
        assert!(cache.insert("b", 100, 0));
        assert!(cache.insert("c", 100, 0));
        assert_eq!(cache.inner.lock().unwrap().expires.len(), 2);
        assert!(!cache.insert("c", 100, 0));
        // Expired ids are dropped.
        assert!(cache.insert("c", 300, 200));
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
