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
use watchtower::{BoxError, Error, Event};

use super::*;
use crate::unix_now;

/// Wraps a handler `Service<Event>` into a verifying HTTP service. See the
/// [module docs](self).
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
