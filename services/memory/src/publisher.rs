//! The publisher: a `Service<Event>` that queues into the broker and never
//! waits.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tower_service::Service;
use watchtower::trace::PublishTrace;
use watchtower::{Error, Event, Receipt, Transport};

use crate::MemoryBroker;
use crate::group::Message;
use crate::state::{RouteCache, Shared};

/// Publishes into a [`MemoryBroker`]. Cheap to clone.
///
/// The receipt's `sequence` is the broker-wide publish sequence. Events are
/// validated ([`Event::validate`]) and their topic checked; publishing
/// never waits.
#[derive(Clone)]
pub struct MemoryPublisher {
    pub(crate) shared: Arc<Shared>,
    pub(crate) route: RouteCache,
}

impl fmt::Debug for MemoryPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPublisher").finish_non_exhaustive()
    }
}

impl Service<Event> for MemoryPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = Ready<Result<Receipt, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.shared.closed.load(Ordering::Acquire) {
            Poll::Ready(Err(Error::closed("memory broker is closed")))
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, mut event: Event) -> Self::Future {
        let trace = PublishTrace::start(MemoryBroker::SYSTEM, &event.shared_topic(), &mut event);
        let entered = trace.span().enter();
        let result = event.validate().and_then(|()| {
            let sequence = self.shared.publish(
                event.topic(),
                Message::Event(event.clone()),
                Some(&event),
                Some(&mut self.route),
            )?;
            Ok(Receipt::for_event(&event).with_sequence(sequence))
        });
        drop(entered);
        trace.finish(&result);
        ready(result)
    }
}
