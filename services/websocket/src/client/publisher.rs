use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::PollSemaphore;
use tower::Service;
use watchtower::trace::PublishTrace;
use watchtower::{Error, Event, Receipt};

use super::{ConnectionState, Handle, Outgoing, Overflow};
use crate::protocol::encode;

/// Publishes events to the hub: a `Service<Event>`.
///
/// `call` queues the event; the response resolves when the frame is
/// written to the connection (or, with [`acks`](crate::WsConfig::acks),
/// when the hub acknowledges it), or with an error that carries the event:
/// [`ErrorKind::Dropped`](watchtower::ErrorKind::Dropped) if the queue's
/// [`Overflow`](watchtower::Overflow) policy dropped it, [`ErrorKind::Connection`](watchtower::ErrorKind::Connection)
/// (retryable) if the connection broke while it was being written,
/// [`ErrorKind::Closed`](watchtower::ErrorKind::Closed) if the client closed
/// first. No event is dropped silently.
///
/// # Cancel safety
///
/// Dropping the response future before the event is written (a timeout
/// layer above, a cancelled task) withdraws the event: it is taken out of
/// the queue unsent and counted in [`WsClient::abandoned`](crate::WsClient::abandoned),
/// so that a caller that retries or dead-letters it after its timeout does
/// not also have it delivered late. Once written it cannot be withdrawn.
///
/// # Readiness
///
/// `poll_ready` is ready when the event will be accepted: sent at once if
/// connected, held in the queue for the reconnect if not. With
/// [`Overflow::Block`] it stays pending while the queue is full, which is
/// what happens when the hub is away long enough; it fails once the client
/// is closed or has given up reconnecting.
pub struct WsPublisher {
    handle: Arc<Handle>,
    semaphore: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
}

impl fmt::Debug for WsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsPublisher")
            .field("state", &*self.handle.shared.state.borrow())
            .field("reserved", &self.permit.is_some())
            .finish()
    }
}

impl Clone for WsPublisher {
    fn clone(&self) -> Self {
        // A clone has its own readiness; the reserved slot stays here.
        WsPublisher::new(self.handle.clone())
    }
}

impl WsPublisher {
    pub(crate) fn new(handle: Arc<Handle>) -> WsPublisher {
        let semaphore = PollSemaphore::new(handle.shared.permits.clone());
        WsPublisher {
            handle,
            semaphore,
            permit: None,
        }
    }

    /// Events waiting in the queue now.
    pub fn queued(&self) -> usize {
        super::lock(&self.handle.shared.outbox).len()
    }

    fn closed_error(&self) -> Error {
        match &*self.handle.shared.state.borrow() {
            ConnectionState::Closed(Some(why)) => Error::closed(format!("websocket client gave up: {why}")),
            _ => Error::closed("websocket client is closed"),
        }
    }
}

impl Service<Event> for WsPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.handle.shared.shutdown.is_cancelled() {
            return Poll::Ready(Err(self.closed_error()));
        }
        if self.handle.shared.config.overflow == Overflow::Block && self.permit.is_none() {
            if self.handle.shared.permits.available_permits() == 0 {
                // Slots held by events whose callers gave up are freed.
                self.handle.shared.purge_abandoned();
            }
            match ready!(self.semaphore.poll_acquire(cx)) {
                Some(permit) => self.permit = Some(permit),
                None => return Poll::Ready(Err(self.closed_error())),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        let trace = PublishTrace::start(crate::SYSTEM, &event.shared_topic(), &mut event);
        let entered = trace.span().enter();
        let text = match encode(&event) {
            Ok(text) => Utf8Bytes::from(text),
            Err(e) => {
                drop(entered);
                return ResponseFuture::failed(trace, e.with_event(event));
            }
        };
        let (tx, rx) = oneshot::channel();
        self.handle.shared.enqueue(Outgoing {
            event,
            text,
            done: Some(tx),
            _permit: self.permit.take(),
        });
        drop(entered);
        ResponseFuture {
            rx: Ok(rx),
            trace: Some(trace),
        }
    }
}

/// The response future of [`WsPublisher`].
#[derive(Debug)]
pub struct ResponseFuture {
    rx: Result<oneshot::Receiver<Result<Receipt, Error>>, Option<Error>>,
    trace: Option<PublishTrace>,
}

impl ResponseFuture {
    fn failed(trace: PublishTrace, error: Error) -> ResponseFuture {
        ResponseFuture {
            rx: Err(Some(error)),
            trace: Some(trace),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match &mut self.rx {
            // Every queued event is resolved, even when dropped unsent, so
            // a closed channel means the runtime is shutting down.
            Ok(rx) => ready!(Pin::new(rx).poll(cx))
                .unwrap_or_else(|_| Err(Error::closed("websocket client stopped"))),
            Err(e) => Err(e
                .take()
                .unwrap_or_else(|| Error::closed("response polled after completion"))),
        };
        if let Some(trace) = self.trace.take() {
            trace.finish(&result);
        }
        Poll::Ready(result)
    }
}
