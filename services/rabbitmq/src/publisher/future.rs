//! The future a publish call returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use watchtower::trace::PublishTrace;
use watchtower::{Error, Receipt};

/// The future of [`RabbitPublisher::call`](crate::RabbitPublisher)'s `call`: resolves on the publisher
/// confirm.
///
/// # Cancel safety
///
/// Dropping it releases its in-flight slot; the event may still reach the
/// broker.
pub struct ResponseFuture {
    pub(super) inner: Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>,
}

impl ResponseFuture {
    pub(super) fn ready(result: Result<Receipt, Error>) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(std::future::ready(result)),
        }
    }

    /// A publish whose outcome is known: recorded on its trace now.
    pub(super) fn finished(trace: PublishTrace, result: Result<Receipt, Error>) -> ResponseFuture {
        trace.finish(&result);
        ResponseFuture::ready(result)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
