//! [`Responder`]: a handler that answers requests.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Service, ServiceExt as _};
use watchtower::ext::REPLY_TO;
use watchtower::request::error_reply;
use watchtower::{BoxError, Error, ErrorKind, Event, ext};

/// Answers requests: wraps a handler that returns an event (any
/// `Service<Event, Response = Event>`) and a publisher, and is itself a
/// consumer handler for [`serve`](watchtower::serve()).
///
/// For each request it calls the handler and publishes the reply to the
/// request's [`replyto`](watchtower::ext::REPLY_TO) topic (which the NATS
/// and RabbitMQ transports set from a native request's reply address) with `correlationid` set to the request's id.
/// When the handler fails it publishes an
/// [error reply](watchtower::request::error_reply) instead, and the request
/// counts as handled: the caller learns of the failure at once and decides
/// whether to ask again, rather than waiting out redeliveries it would not
/// see.
///
/// # Errors
///
/// A request without `replyto` fails with a non-retryable
/// [`ErrorKind::Rejected`], so `serve` dead-letters it; a reply that cannot
/// be published fails with the publisher's error, so `serve` redelivers the
/// request (and the handler runs again).
pub struct Responder<S, P> {
    inner: S,
    publisher: P,
}

impl<S: Clone, P: Clone> Clone for Responder<S, P> {
    fn clone(&self) -> Self {
        Responder {
            inner: self.inner.clone(),
            publisher: self.publisher.clone(),
        }
    }
}

impl<S, P> fmt::Debug for Responder<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder").finish_non_exhaustive()
    }
}

impl<S, P> Responder<S, P> {
    /// Answers with `handler`'s replies, published with `publisher`.
    pub fn new(handler: S, publisher: P) -> Responder<S, P> {
        Responder {
            inner: handler,
            publisher,
        }
    }
}

impl<S, P> Service<Event> for Responder<S, P>
where
    S: Service<Event, Response = Event> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: Service<Event> + Clone + Send + 'static,
    P::Error: Into<BoxError>,
    P::Future: Send + 'static,
{
    type Response = ();
    type Error = Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(|e| Error::from_boxed(e.into()))
    }

    fn call(&mut self, request: Event) -> Self::Future {
        let Some(reply_to) = request.extension(REPLY_TO).map(str::to_owned) else {
            return Box::pin(std::future::ready(Err(Error::new(
                ErrorKind::Rejected,
                format!("request `{}` has no `{REPLY_TO}` extension", request.id()),
            )
            .with_retryable(false))));
        };
        let id = request.id().to_owned();
        let handled = self.inner.call(request);
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let mut reply = match handled.await {
                Ok(reply) => reply,
                Err(e) => {
                    let e = Error::from_boxed(e.into());
                    tracing::debug!(request = id, error = %e, "handler failed; sending an error reply");
                    error_reply(&e)
                }
            };
            // An echoed request must not look like a request.
            reply.remove_extension(REPLY_TO);
            reply.set_extension(ext::CORRELATION_ID, id)?;
            reply.set_topic(reply_to);
            publisher
                .oneshot(reply)
                .await
                .map(drop)
                .map_err(|e| Error::from_boxed(e.into()))
        })
    }
}
