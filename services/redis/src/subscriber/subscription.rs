//! The stream of deliveries a subscription yields.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use tokio::sync::mpsc;
use watchtower::{Delivery, Error};

use super::settle::RedisAcker;

/// A subscription's deliveries. Dropping it stops reading; entries read
/// but not yet handed out are released for reclaiming.
pub struct RedisSubscription {
    pub(super) rx: mpsc::Receiver<Result<Vec<Delivery<RedisAcker>>, Error>>,
    pub(super) ready: VecDeque<Delivery<RedisAcker>>,
    pub(super) trimmed: Arc<AtomicU64>,
}

impl RedisSubscription {
    /// Entries this subscription found trimmed from their stream (by a
    /// publisher's [`MaxLen`](crate::MaxLen), or `XTRIM`) before they were
    /// delivered or settled. Each time some are found, the subscription
    /// also yields an [`ErrorKind::Dropped`](watchtower::ErrorKind::Dropped) item and logs a warning with
    /// their ids.
    ///
    /// What is found:
    ///
    /// * entries read but not acknowledged (this consumer's own, read again
    ///   when the subscription opens, or any consumer's, reclaimed after
    ///   the claim idle time, or nacked), trimmed before they could be
    ///   delivered again: Redis takes them off the pending list;
    /// * deliveries dropped unsettled (released for reclaiming) whose
    ///   entries were trimmed meanwhile (the item is left out if the
    ///   subscription is gone or its buffer full);
    /// * entries trimmed before any consumer of the group read them, when
    ///   the subscription opens and at every
    ///   [claim interval](crate::RedisSubscriberOptions::claim_interval), from the
    ///   group's read counter (Redis 7): counted, without their ids.
    ///
    /// What is not: entries trimmed unread while Redis does not know the
    /// group's read counter (a group created at the stream's end that has
    /// read nothing since, a stream with entries deleted by `XDEL`), and
    /// entries trimmed unread and gone past by the group between two
    /// checks (the group reads past the gap before the next claim
    /// interval). Size the trimming so that neither happens (see
    /// [`RedisPublisherOptions::max_len`](crate::RedisPublisherOptions::max_len)).
    pub fn trimmed(&self) -> u64 {
        self.trimmed.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RedisSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscription")
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl Stream for RedisSubscription {
    type Item = Result<Delivery<RedisAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(delivery) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(delivery)));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(batch)) => self.ready.extend(batch),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }
}
