//! The future of a publish call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use watchtower::reply::Reply;
use watchtower::trace::PublishTrace;
use watchtower::{Error, Event, Receipt};

use crate::batch::Answer;

use super::receipt;

pub(super) enum State {
    Failed(Option<Error>),
    Waiting {
        reply: Reply<Answer>,
        key: Arc<str>,
        event: Option<Event>,
    },
}

/// The future of [`RedisPublisher::call`](super::RedisPublisher): the `XADD` is queued for the
/// next pipeline when `call` returns, and this waits for its reply.
///
/// # Cancel safety
///
/// Dropping the future before the `XADD` is sent withdraws it (see
/// [`RedisPublisher::abandoned`](super::RedisPublisher::abandoned)); once it is on the wire, the event may
/// be stored all the same.
pub struct ResponseFuture {
    pub(super) state: State,
    pub(super) trace: Option<PublishTrace>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let entered = this.trace.as_ref().map(|t| t.span().enter());
        let result = match &mut this.state {
            State::Failed(err) => Err(err
                .take()
                .unwrap_or_else(|| Error::closed("the publish future was polled after it finished"))),
            State::Waiting { reply, key, event } => {
                let result = ready!(reply.poll_reply(cx))
                    .unwrap_or_else(|| Err(Error::closed("the publisher's connection task has stopped")));
                match event.take() {
                    Some(event) => result
                        .map(|id| receipt(&event, key.clone(), id))
                        .map_err(|e| e.with_event(event)),
                    None => Err(Error::closed("the publish future was polled after it finished")),
                }
            }
        };
        drop(entered);
        if let Some(trace) = this.trace.take() {
            trace.finish(&result);
        }
        Poll::Ready(result)
    }
}
