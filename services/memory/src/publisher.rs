//! The publisher: a `Service<Event>` that queues into the broker and never
//! waits.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;
use watchtower::trace::PublishTrace;
use watchtower::{Error, ErrorKind, Event, Receipt, Transport, ext};

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

impl MemoryPublisher {
    /// Holds `event` back if it asks for a later delivery time (and
    /// answers its receipt); otherwise removes a past time, so that it is
    /// published now without the mark.
    fn hold_if_delayed(&self, event: &mut Event) -> Result<Option<Receipt>, Error> {
        if event.extension(ext::DELIVER_AT).is_none() {
            return Ok(None);
        }
        match watchtower::delay::remaining(event)? {
            Some(delay) => self.schedule(event.clone(), delay).map(Some),
            None => {
                event.remove_extension(ext::DELIVER_AT);
                Ok(None)
            }
        }
    }

    /// Holds a delayed event in the broker until it is due. It counts as
    /// outstanding meanwhile, so `wait_idle` waits for it.
    fn schedule(&self, mut event: Event, delay: Duration) -> Result<Receipt, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::new(ErrorKind::Unsupported, "a delayed event needs a tokio runtime"))?;
        let receipt = Receipt::for_event(&event);
        // A placeholder, settled once the event is queued for delivery.
        self.shared.enqueued.0.fetch_add(1, Ordering::SeqCst);
        let shared = self.shared.clone();
        runtime.spawn(async move {
            tokio::time::sleep(delay).await;
            event.remove_extension(ext::DELIVER_AT);
            if let Err(e) = shared.publish(event.topic(), Message::Event(event.clone()), Some(&event), None) {
                tracing::warn!(error = %e, event_id = event.id(), "a delayed event could not be delivered");
            }
            shared.settle();
        });
        Ok(receipt)
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
            if let Some(receipt) = self.hold_if_delayed(&mut event)? {
                return Ok(receipt);
            }
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
