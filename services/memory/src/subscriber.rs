//! The subscriber, and the subscription: a member of a group that takes
//! events from the group's queue and delivers them one by one.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_core::Stream;
use watchtower::codec::structured;
use watchtower::{Capabilities, Delivery, Error, Poison, SubscribeOptions, Subscriber, Transport};

use crate::group::{FAIR_SHARE, Group, Item, Message};
use crate::state::Shared;
use crate::{MemoryAcker, MemoryBroker};

/// Opens subscriptions on a [`MemoryBroker`].
#[derive(Clone)]
pub struct MemorySubscriber {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for MemorySubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscriber").finish_non_exhaustive()
    }
}

impl MemorySubscriber {
    /// What the memory transport can do: everything, within one process;
    /// replay too when the broker retains events.
    pub const CAPABILITIES: Capabilities = Capabilities::NONE
        .persistent(true)
        .consumer_groups(true)
        .ordered(true)
        .wildcards(true)
        .redelivery(true)
        .nack_delay(true);
}

impl Subscriber for MemorySubscriber {
    type Acker = MemoryAcker;
    type Subscription = MemorySubscription;

    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES.replay(self.shared.retention > 0)
    }

    fn open(
        &self,
        options: SubscribeOptions,
    ) -> impl Future<Output = Result<MemorySubscription, Error>> + Send {
        let opened = self.shared.join(&options).map(|group| MemorySubscription {
            member: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            streak: 0,
            local: VecDeque::new(),
            group,
            shared: self.shared.clone(),
        });
        ready(opened)
    }
}

/// A subscription on a [`MemoryBroker`]: a stream of deliveries.
pub struct MemorySubscription {
    /// This member's id within its group.
    member: u64,
    /// Events taken since this member last waited or gave way.
    streak: u32,
    /// Events taken from the group in one go, delivered one by one.
    local: VecDeque<Item>,
    group: Arc<Group>,
    shared: Arc<Shared>,
}

impl fmt::Debug for MemorySubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscription")
            .field("durable", &self.group.durable)
            .field("queued", &self.group.len())
            .finish()
    }
}

impl Stream for MemorySubscription {
    type Item = Result<Delivery<MemoryAcker>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // A member that keeps finding events gives the group's other
        // members a turn now and then (competing consumers share the work).
        if self.streak >= FAIR_SHARE && self.group.members.load(Ordering::Relaxed) > 1 {
            self.streak = 0;
            self.group.pass_on();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.local.is_empty() {
            let this = &mut *self;
            match this.group.poll_take(this.member, &mut this.local, cx) {
                Poll::Pending => {
                    this.streak = 0;
                    return Poll::Pending;
                }
                Poll::Ready(false) => return Poll::Ready(None),
                Poll::Ready(true) => {}
            }
        }
        let Some(item) = self.local.pop_front() else {
            return Poll::Ready(None);
        };
        self.group.taken.fetch_sub(1, Ordering::Relaxed);
        self.streak += 1;
        let acker = MemoryAcker::new(item.clone(), self.group.clone(), self.shared.clone());
        let delivery = match item.message {
            Message::Event(event) => Delivery::new(event, item.topic, acker),
            Message::Raw(raw) => match structured::from_bytes(&raw.body) {
                Ok(event) => Delivery::new(event, item.topic, acker),
                Err(error) => Delivery::poison(Poison::new(*raw, error), acker),
            },
        };
        let group = self.group.durable.then(|| self.group.key.clone());
        Poll::Ready(Some(Ok(delivery
            .with_delivery_count(item.count)
            .with_system(MemoryBroker::SYSTEM)
            .with_group(group))))
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.group.give_back(&mut self.local);
        self.group.forget(self.member);
        self.shared.leave(&self.group);
    }
}
