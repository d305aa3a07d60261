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
use super::state::{Breaker, CircuitBreakerHandle, Grant, Permit, Ticket};

/// A circuit breaker in front of `S`. See the [module docs](super).
///
/// Clones share the breaker but not a reserved permit.
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
    /// The grant held between `poll_ready` and `call`: a plain ticket in
    /// the common case, a probe permit (given back on drop) in half-open.
    ticket: Option<Ticket>,
    probe: Option<Permit>,
    wait: Option<Wait>,
}

/// Waiting for the breaker to let a call through (`wait_when_open`): until
/// the time the rejection named, or a change of state or a probe slot
/// given back, whichever comes first.
struct Wait {
    sleep: Pin<Box<Sleep>>,
    notified: Pin<Box<OwnedNotified>>,
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
            ticket: None,
            probe: None,
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

    fn hold(&mut self, grant: Grant) {
        match grant {
            Grant::Free(ticket) => self.ticket = Some(ticket),
            Grant::Probe(permit) => self.probe = Some(permit),
        }
    }

    /// The held grant, taken.
    fn take_grant(&mut self) -> Option<Grant> {
        match self.ticket.take() {
            Some(ticket) => Some(Grant::Free(ticket)),
            None => self.probe.take().map(Grant::Probe),
        }
    }

    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if let Some(wait) = &mut self.wait {
                if wait.notified.as_mut().poll(cx).is_pending() {
                    ready!(wait.sleep.as_mut().poll(cx));
                }
                self.wait = None;
            }
            let rejection = match self.breaker.acquire() {
                Ok(grant) => {
                    self.hold(grant);
                    return Poll::Ready(Ok(()));
                }
                Err(rejection) => rejection,
            };
            if !self.breaker.config.wait_when_open {
                self.breaker.rejected();
                return Poll::Ready(Err(self.breaker.open_error(&rejection)));
            }
            // Registered before trying again, so a release between the two
            // is not missed.
            let mut notified = Box::pin(self.breaker.notify.clone().notified_owned());
            notified.as_mut().enable();
            let rejection = match self.breaker.acquire() {
                Ok(grant) => {
                    self.hold(grant);
                    return Poll::Ready(Ok(()));
                }
                Err(rejection) => rejection,
            };
            self.wait = Some(Wait {
                sleep: Box::pin(tokio::time::sleep(rejection.retry_after)),
                notified,
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
        if self.ticket.is_none() && self.probe.is_none() {
            ready!(self.poll_permit(cx))?;
        }
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                let err = Error::from_boxed(e.into());
                let result: Result<(), Error> = Err(err);
                if let Some(grant) = self.take_grant() {
                    self.breaker.start(grant).complete(&result);
                }
                Poll::Ready(result)
            }
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        match self.take_grant() {
            Some(grant) => {
                let permit = self.breaker.start(grant);
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
            .field("ticket", &self.ticket)
            .field("probe", &self.probe)
            .finish()
    }
}
