//! The retry layer's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;
use tracing::Span;
use watchtower::ext;
use watchtower::{BoxError, Error, Event};

use super::config::{RetryAttempt, Shared};
use super::stats::Count;

pin_project! {
    /// Response future of [`Retry`](super::Retry): runs the first attempt,
    /// then waits and tries again on a clone of the service while the
    /// error is retryable and the limits allow.
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<F>,
        service: S,
        event: Event,
        shared: Arc<Shared>,
        attempt: u32,
        first_failure: Option<Instant>,
        // Every attempt runs in it (see `watchtower::trace::create_span`).
        span: Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Refused { error: Option<Error> },
        Called { #[pin] future: F },
        // Boxed: a timer is large, and the first attempt (the hot path)
        // should not carry its space around.
        Waiting { sleep: Pin<Box<Sleep>> },
        Checking,
    }
}

impl<S, F> ResponseFuture<S, F> {
    /// A call whose first attempt was the inner service refusing
    /// readiness with `error`.
    pub(crate) fn refused(error: Error, service: S, event: Event, shared: Arc<Shared>, span: Span) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
            service,
            event,
            shared,
            attempt: 1,
            first_failure: None,
            span,
        }
    }

    pub(crate) fn new(future: F, service: S, event: Event, shared: Arc<Shared>, span: Span) -> Self {
        ResponseFuture {
            state: State::Called { future },
            service,
            event,
            shared,
            attempt: 1,
            first_failure: None,
            span,
        }
    }
}

impl<S, F> std::fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.attempt)
            .field("event_id", &self.event.id())
            .finish_non_exhaustive()
    }
}

impl<S> ResponseFuture<S, S::Future>
where
    S: Service<Event>,
{
    /// What to do after attempt `attempt` failed with `err`: wait this
    /// long, or give up with the error (carrying the event).
    fn decide(
        shared: &Shared,
        attempt: u32,
        first_failure: &mut Option<Instant>,
        event: &Event,
        err: Error,
    ) -> Result<std::time::Duration, Error> {
        let config = &shared.config;
        let give_up = |mut err: Error, count| {
            shared.count(count);
            if err.event().is_none() {
                err = err.with_event(event.clone());
            }
            Err(err)
        };
        if !config.is_retryable(&err) {
            return give_up(err, Count::NotRetryable);
        }
        if attempt >= config.max_attempts {
            return give_up(err, Count::Exhausted);
        }
        let mut delay = shared.delay_before(attempt + 1);
        if let Some(after) = err.retry_after() {
            // The hint comes from outside (a server's `Retry-After`): capped.
            delay = delay.max(after.min(config.max_retry_after));
        }
        let first = *first_failure.get_or_insert_with(Instant::now);
        if let Some(limit) = config.max_elapsed
            && first.elapsed().saturating_add(delay) > limit
        {
            return give_up(err, Count::Exhausted);
        }
        if let Some(budget) = &config.budget
            && !budget.withdraw()
        {
            return give_up(err, Count::BudgetExhausted);
        }
        shared.count(Count::Retry);
        if let Some(hook) = &config.on_retry {
            hook(&RetryAttempt {
                attempt: attempt + 1,
                delay,
                error: &err,
            });
        }
        tracing::debug!(attempt = attempt + 1, ?delay, error = %err, "retrying");
        Ok(delay)
    }
}

impl<S> Future for ResponseFuture<S, S::Future>
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            let failure = match this.state.as_mut().project() {
                StateProj::Refused { error } => match error.take() {
                    Some(error) => error,
                    None => Error::new(
                        watchtower::ErrorKind::Other,
                        "retry future polled after completion",
                    ),
                },
                StateProj::Called { future } => match ready!(future.poll(cx)) {
                    Ok(response) => {
                        if *this.attempt > 1 {
                            this.shared.count(Count::SucceededAfterRetry);
                        }
                        return Poll::Ready(Ok(response));
                    }
                    Err(e) => Error::from_boxed(e.into()),
                },
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Checking);
                    continue;
                }
                StateProj::Checking => {
                    let ready = ready!(this.service.poll_ready(cx));
                    *this.attempt += 1;
                    // Set on this attempt's copy only, so the first attempt
                    // (the hot path) never copies the event.
                    let _ = this.event.set_extension(ext::ATTEMPT, this.attempt.to_string());
                    match ready {
                        Ok(()) => {
                            let future = this.service.call(this.event.clone());
                            this.state.set(State::Called { future });
                            continue;
                        }
                        Err(e) => Error::from_boxed(e.into()),
                    }
                }
            };
            match Self::decide(
                this.shared,
                *this.attempt,
                this.first_failure,
                this.event,
                failure,
            ) {
                Ok(delay) => this.state.set(State::Waiting {
                    sleep: Box::pin(tokio::time::sleep(delay)),
                }),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}
