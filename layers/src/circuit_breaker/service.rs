use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;
use tower::Service;
use watchtower::{BoxError, Error, ErrorKind, Event};

use super::config::CircuitBreakerConfig;
use super::future::ResponseFuture;
use super::state::{Breaker, CircuitBreakerHandle, Permit};

/// A circuit breaker in front of `S`. See the [module docs](super).
///
/// Clones share the breaker but not a reserved permit.
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
    permit: Option<Permit>,
    wait: Option<Wait>,
}

enum Wait {
    Sleep(Pin<Box<Sleep>>),
    Notified(Pin<Box<OwnedNotified>>),
}

impl<S> CircuitBreaker<S> {
    /// A breaker of its own in front of `inner`.
    pub fn new(inner: S, config: CircuitBreakerConfig) -> Self {
        CircuitBreaker::with_breaker(inner, Breaker::new(config))
    }

    pub(crate) fn with_breaker(inner: S, breaker: Arc<Breaker>) -> Self {
        CircuitBreaker {
            inner,
            breaker,
            permit: None,
            wait: None,
        }
    }

    /// A handle on the breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            breaker: self.breaker.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if let Some(wait) = &mut self.wait {
                match wait {
                    Wait::Sleep(s) => ready!(s.as_mut().poll(cx)),
                    Wait::Notified(n) => ready!(n.as_mut().poll(cx)),
                }
                self.wait = None;
            }
            let rejection = match self.breaker.acquire() {
                Ok(permit) => {
                    self.permit = Some(permit);
                    return Poll::Ready(Ok(()));
                }
                Err(rejection) => rejection,
            };
            if !self.breaker.config.wait_when_open {
                self.breaker.rejected();
                return Poll::Ready(Err(self.breaker.open_error(&rejection)));
            }
            self.wait = Some(match rejection.retry_after {
                Some(after) => Wait::Sleep(Box::pin(tokio::time::sleep(after))),
                None => {
                    // Registered before trying again, so a release between
                    // the two is not missed.
                    let mut notified = Box::pin(self.breaker.notify.clone().notified_owned());
                    notified.as_mut().enable();
                    if let Ok(permit) = self.breaker.acquire() {
                        self.permit = Some(permit);
                        return Poll::Ready(Ok(()));
                    }
                    Wait::Notified(notified)
                }
            });
        }
    }
}

impl<S> Service<Event> for CircuitBreaker<S>
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.permit.is_none() {
            ready!(self.poll_permit(cx))?;
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                let err = Error::from_boxed(e.into());
                let result: Result<(), Error> = Err(err);
                if let Some(permit) = self.permit.take() {
                    permit.start().complete(&result);
                }
                Poll::Ready(result)
            }
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        match self.permit.take() {
            Some(permit) => {
                let permit = permit.start();
                ResponseFuture::called(self.inner.call(event), permit)
            }
            None => ResponseFuture::failed(
                Error::new(ErrorKind::Other, "circuit breaker called before poll_ready").with_event(event),
            ),
        }
    }
}

impl<S: Clone> Clone for CircuitBreaker<S> {
    fn clone(&self) -> Self {
        CircuitBreaker::with_breaker(self.inner.clone(), self.breaker.clone())
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("name", &&*self.breaker.config.name)
            .field("permit", &self.permit)
            .finish()
    }
}
