//! The dead-letter layer's response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::Service;
use tower::util::{Oneshot, ServiceExt as _};
use tracing::Span;
use watchtower::{BoxError, Error, Event};

use super::outcome::{DeadLetterFailed, DeadLettered, Outcome};
use super::{Shared, annotate};

pin_project! {
    /// Response future of [`DeadLetter`](super::DeadLetter): the inner
    /// call, then, on failure, the dead-letter call.
    pub struct ResponseFuture<F, D>
    where
        D: Service<Event>,
    {
        #[pin]
        state: State<F, Pin<Box<Oneshot<D, Event>>>>,
        event: Option<Event>,
        failure: Option<Error>,
        shared: Arc<Shared<D>>,
        // The inner call and the dead-letter call run in it (see
        // `watchtower::trace::create_span`).
        span: Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, O> {
        Called { #[pin] future: F },
        NotReady,
        // Boxed by the caller: the dead-letter call is the rare path, and
        // the common one should not carry its space around.
        DeadLettering { #[pin] future: O },
    }
}

impl<F, D: Service<Event>> ResponseFuture<F, D> {
    pub(crate) fn called(future: F, event: Event, shared: Arc<Shared<D>>, span: Span) -> Self {
        ResponseFuture {
            state: State::Called { future },
            event: Some(event),
            failure: None,
            shared,
            span,
        }
    }

    pub(crate) fn not_ready(error: Error, event: Event, shared: Arc<Shared<D>>, span: Span) -> Self {
        ResponseFuture {
            state: State::NotReady,
            event: Some(event),
            failure: Some(error),
            shared,
            span,
        }
    }
}

impl<F, D: Service<Event>> std::fmt::Debug for ResponseFuture<F, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("event_id", &self.event.as_ref().map(Event::id))
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl<F, R, E, D> Future for ResponseFuture<F, D>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    D: Service<Event> + Clone,
    D::Error: Into<BoxError>,
{
    type Output = Result<Outcome<R>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => match ready!(future.poll(cx)) {
                    Ok(response) => return Poll::Ready(Ok(Outcome::Delivered(response))),
                    Err(e) => {
                        *this.failure = Some(Error::from_boxed(e.into()));
                        this.state.set(State::NotReady);
                    }
                },
                StateProj::NotReady => {
                    let Some(mut failure) = this.failure.take() else {
                        return Poll::Ready(Err(Error::new(
                            watchtower::ErrorKind::Other,
                            "polled after completion",
                        )));
                    };
                    // The event as the layers below last saw it (with its
                    // attempt count) if they handed it back; else ours.
                    let event = failure.take_event().or_else(|| this.event.take());
                    let Some(event) = event else {
                        return Poll::Ready(Err(failure));
                    };
                    let event = annotate(event, &failure, this.shared.topic.as_deref());
                    tracing::warn!(event_id = event.id(), error = %failure, "dead-lettering event");
                    *this.event = Some(event.clone());
                    *this.failure = Some(failure);
                    let future = Box::pin(this.shared.dlq.clone().oneshot(event));
                    this.state.set(State::DeadLettering { future });
                }
                StateProj::DeadLettering { future } => {
                    let result = ready!(future.poll(cx));
                    let (Some(event), Some(failure)) = (this.event.take(), this.failure.take()) else {
                        return Poll::Ready(Err(Error::new(
                            watchtower::ErrorKind::Other,
                            "polled after completion",
                        )));
                    };
                    return Poll::Ready(match result {
                        Ok(_) => {
                            this.shared.dead_lettered(failure.kind());
                            Ok(Outcome::DeadLettered(DeadLettered {
                                event,
                                error: failure,
                            }))
                        }
                        Err(e) => {
                            this.shared.failed(failure.kind());
                            let dead_letter_error = Error::from_boxed(e.into());
                            tracing::error!(event_id = event.id(), error = %failure, dead_letter_error = %dead_letter_error, "dead-letter service failed; returning the event to the caller");
                            Err(DeadLetterFailed {
                                failure,
                                dead_letter_error,
                            }
                            .into_error(event))
                        }
                    });
                }
            }
        }
    }
}
