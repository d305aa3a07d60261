//! The backpressure layer's response future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use watchtower::reply::Reply;
use watchtower::{Error, ErrorKind, Event};

/// Response future of [`Backpressure`](super::Backpressure): the worker's
/// answer, or the error that refused or evicted the event (with the event
/// attached).
#[derive(Debug)]
pub struct ResponseFuture<R> {
    state: State<R>,
}

#[derive(Debug)]
enum State<R> {
    Queued(Reply<Result<R, Error>>, Option<Event>),
    Failed(Option<Error>),
}

impl<R> ResponseFuture<R> {
    pub(crate) fn queued(rx: Reply<Result<R, Error>>, event: Event) -> Self {
        ResponseFuture {
            state: State::Queued(rx, Some(event)),
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
            State::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Other, "polled after completion")))),
        }
    }
}
