//! [`WebhookReceiverLayer`]: the verifier in front of a handler, as an
//! HTTP service for axum or hyper.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument as _;
use watchtower::{BoxError, Error, Event};

use super::verifier::too_large;
use super::{Verified, VerifyError, VerifyErrorKind, WebhookVerifier};
use crate::unix_now;

/// Wraps a handler `Service<Event>` into a verifying HTTP service: the
/// receiving side, which verifies Standard Webhooks requests and turns them
/// into events.
///
/// [`WebhookVerifier`] checks one request: the three `webhook-*` headers are
/// present, the body is within the size limit, the timestamp is within the
/// tolerance (±5 minutes by default, too old and too new alike), one of the
/// signatures was made by one of the secrets (compared in constant time)
/// and, by option, the `webhook-id` was not seen before within the window.
/// [`verify`](crate::verify) is the same with the defaults, for code that has the headers
/// and body at hand.
///
/// [`WebhookReceiverLayer`] wraps a handler `Service<Event>` into an HTTP
/// service for axum or hyper. It checks the `webhook-*` headers (present,
/// timestamp within the tolerance) *before* reading the body, so a request
/// that cannot be genuine costs no body read; then it reads the body up to
/// the limit and within the [body timeout](crate::WebhookVerifier::body_timeout),
/// verifies the signature, decodes the event and calls the handler,
/// answering
///
/// | outcome | status |
/// |---|---|
/// | handled | `204 No Content` |
/// | duplicate of a delivery already handled (with [`WebhookVerifier::reject_replays`](crate::WebhookVerifier::reject_replays)) | `200 OK`, handler not called |
/// | same `webhook-id` still being handled (with [`WebhookVerifier::reject_replays`](crate::WebhookVerifier::reject_replays)) | `503 Service Unavailable` with `Retry-After` |
/// | missing or malformed `webhook-*` header, body not an event | `400 Bad Request` |
/// | bad signature, timestamp outside the tolerance, `webhook-id` ≠ `ce-id` | `401 Unauthorized` |
/// | body not sent within the body timeout | `408 Request Timeout` |
/// | body over the limit | `413 Payload Too Large` |
/// | CloudEvents binary mode, not accepted (the default) | `415 Unsupported Media Type` |
/// | not a `POST` | `405 Method Not Allowed` |
/// | handler failed, retryable, or panicked | `500` (or `503` with `Retry-After` when the error has a hint) |
/// | handler failed, not retryable | `422 Unprocessable Entity` |
///
/// # Duplicates and retries
///
/// With [`reject_replays`](crate::WebhookVerifier::reject_replays) the replay
/// memory is keyed by the verified `webhook-id` (never by the event's own
/// id, which a sender may choose differently, as Svix's `msg_…` ids are).
/// An id is *in progress* from verification until its handler finishes:
/// only a handler that succeeded makes the id *done*. A handler that fails,
/// panics, or is cancelled (the client disconnected and the server dropped
/// the request) forgets the id — a drop guard does it on every path — so
/// the sender's retry is handled. A retry that arrives while the first
/// attempt still runs gets a retryable `503` with `Retry-After`, never a
/// final answer. A duplicate of a delivery that was handled is answered
/// `200 OK` without calling the handler: the sender evidently did not hear
/// the first answer, and Standard Webhooks senders take any 2xx as
/// delivered, whereas many take `409` as a final failure and would report
/// (or dead-letter) an event that was in fact handled.
///
/// # Binary mode is unsigned
///
/// The signature covers `webhook-id`, `webhook-timestamp` and the body,
/// nothing else. A CloudEvents *binary-mode* request carries the event's
/// attributes (`ce-type`, `ce-source`, …) in headers, which anyone who
/// captured a request can change without breaking the signature. The
/// receiver therefore refuses binary mode unless
/// [`binary_mode`](crate::WebhookVerifier::binary_mode) accepts it; then the
/// `ce-id` must equal the signed `webhook-id`, and every other `ce-`
/// attribute is unauthenticated: the handler must not trust it. Structured
/// mode (the sender's default) signs the whole event.
///
/// A body is decoded as structured CloudEvents JSON when its content type
/// says so, as binary mode when `ce-specversion` is present (and accepted),
/// and otherwise as a plain webhook: an event whose id is the `webhook-id`,
/// whose type is the JSON body's `type` field (or `webhook`), and whose
/// data is the body.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder};
/// use watchtower::Event;
/// use watchtower_webhook::{WebhookReceiverLayer, WebhookVerifier};
///
/// # fn main() -> Result<(), watchtower::Error> {
/// let verifier = WebhookVerifier::new(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])?
///     .max_body(256 * 1024)
///     .body_timeout(Duration::from_secs(5))
///     .reject_replays(100_000);
/// let hooks = ServiceBuilder::new()
///     .layer(WebhookReceiverLayer::new(verifier))
///     .service(service_fn(|event: Event| async move {
///         println!("{} {}", event.id(), event.ty());
///         Ok::<_, watchtower::Error>(())
///     }));
/// let app: axum::Router = axum::Router::new().route_service("/hooks", hooks);
/// # let _ = app; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct WebhookReceiverLayer {
    pub(super) verifier: WebhookVerifier,
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
    pub(super) verifier: WebhookVerifier,
    pub(super) inner: H,
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
    pub(super) inner: Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>,
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

pub(super) async fn receive<H, B>(
    verifier: WebhookVerifier,
    handler: H,
    request: Request<B>,
) -> Response<Full<Bytes>>
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
    // The sender's attempt number, when it says (WatchTower senders do).
    let attempt = event
        .extension(watchtower::ext::ATTEMPT)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let span = watchtower::trace::process_span(
        <crate::WebhookClient as watchtower::Transport>::SYSTEM,
        event.topic(),
        &event,
        attempt,
    );
    let into_error = |err: H::Error| Error::from_boxed(err.into());
    let handled = async {
        let handler = handler.ready_oneshot().await.map_err(into_error)?;
        let result = handler.oneshot(event).await.map(drop).map_err(into_error);
        if let Err(e) = &result {
            watchtower::trace::record_error(&tracing::Span::current(), e);
        }
        result
    }
    .instrument(span);
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

pub(super) fn handler_failed(err: &Error) -> Response<Full<Bytes>> {
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

pub(super) fn refuse(err: &VerifyError) -> Response<Full<Bytes>> {
    let mut response = text(err.status(), &err.to_string());
    if let Some(after) = err.retry_after() {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(after.as_secs().max(1)),
        );
    }
    response
}

pub(super) fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
