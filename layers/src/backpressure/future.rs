//! The backpressure layer's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use watchtower::reply::Reply;
use watchtower::{Error, ErrorKind, Event};

use super::Running;
use super::shared::DirectFuture;

/// Response future of [`Backpressure`](super::Backpressure): the inner
/// service's answer (from the worker, or from a call the caller made
/// itself), or the error that refused or evicted the event (with the event
/// attached).
pub struct ResponseFuture<R> {
    state: State<R>,
}

enum State<R> {
    Queued(Reply<Result<R, Error>>, Option<Event>),
    Direct(DirectFuture<R>, Option<Running<R>>),
    Failed(Option<Error>),
}

impl<R> std::fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Queued(..) => "queued",
            State::Direct(..) => "direct",
            State::Failed(..) => "failed",
        };
        f.debug_struct("ResponseFuture").field("state", &state).finish()
    }
}

impl<R> ResponseFuture<R> {
    pub(crate) fn queued(rx: Reply<Result<R, Error>>, event: Event) -> Self {
        ResponseFuture {
            state: State::Queued(rx, Some(event)),
        }
    }

    pub(crate) fn direct(future: DirectFuture<R>, running: Running<R>) -> Self {
        ResponseFuture {
            state: State::Direct(future, Some(running)),
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed(Some(error)),
        }
    }
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<R, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Queued(rx, event) => Poll::Ready(match ready!(rx.poll_reply(cx)) {
                Some(result) => result,
                None => {
                    let err = Error::closed("backpressure worker stopped");
                    match event.take() {
                        Some(e) => Err(err.with_event(e)),
                        None => Err(err),
                    }
                }
            }),
            State::Direct(future, running) => {
                let result = ready!(future.as_mut().poll(cx));
                // Finished: another call may start.
                drop(running.take());
                Poll::Ready(result.map_err(Error::from_boxed))
            }
            State::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Other, "polled after completion")))),
        }
    }
}
