//! The circuit breaker's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use watchtower::{BoxError, Error};

use super::state::Permit;

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker) and
    /// [`KeyedCircuitBreaker`](super::KeyedCircuitBreaker): records the
    /// call's outcome when it resolves. Dropped early, it gives its probe
    /// slot back without recording anything.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = Proj]
    #[derive(Debug)]
    enum Kind<F> {
        Called {
            #[pin]
            inner: F,
            permit: Option<Permit>,
        },
        Failed {
            error: Option<Error>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(inner: F, permit: Permit) -> Self {
        ResponseFuture {
            kind: Kind::Called {
                inner,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            Proj::Called { inner, permit } => {
                let result = ready!(inner.poll(cx)).map_err(|e| Error::from_boxed(e.into()));
                if let Some(permit) = permit.take() {
                    permit.complete(&result);
                }
                Poll::Ready(result)
            }
            Proj::Failed { error } => Poll::Ready(Err(error.take().unwrap_or_else(|| {
                Error::new(watchtower::ErrorKind::Other, "future polled after completion")
            }))),
        }
    }
}
