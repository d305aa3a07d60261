//! A group: the queue its members share (competing consumers), and the
//! items in it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use watchtower::{Event, RawMessage, SubscribeOptions};

/// Events a member of a group with several members takes in a row before
/// it lets the others have a turn.
pub(crate) const FAIR_SHARE: u32 = 16;

pub(crate) struct Group {
    pub(crate) key: Arc<str>,
    pub(crate) durable: bool,
    queue: Mutex<GroupQueue>,
    /// Connected members.
    pub(crate) members: AtomicUsize,
    /// Events members have taken into their own buffers and not yet
    /// delivered.
    pub(crate) taken: AtomicUsize,
}

/// A group's events, shared by its members (competing consumers).
///
/// One uncontended lock per event each way, and a waiting member costs a
/// waker in a list: no allocation per wait, unlike a general-purpose
/// channel.
#[derive(Default)]
struct GroupQueue {
    items: VecDeque<Item>,
    /// Members waiting for an event, by member id. Each new event wakes
    /// one of them.
    waiting: Vec<(u64, Waker)>,
    closed: bool,
}

impl GroupQueue {
    /// The member that has waited longest.
    fn pop_waiter(&mut self) -> Option<(u64, Waker)> {
        (!self.waiting.is_empty()).then(|| self.waiting.remove(0))
    }
}

impl Group {
    pub(crate) fn new(key: Arc<str>, durable: bool) -> Group {
        Group {
            key,
            durable,
            queue: Mutex::new(GroupQueue::default()),
            members: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupQueue> {
        // Every update leaves the queue consistent before it can panic.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` and wakes one waiting member; hands the item back if
    /// the group is closed.
    pub(crate) fn push(&self, item: Item) -> Result<(), Item> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(item);
        }
        queue.items.push_back(item);
        let waiter = queue.pop_waiter();
        drop(queue);
        if let Some((_, waker)) = waiter {
            waker.wake();
        }
        Ok(())
    }

    /// Moves queued events into member `member`'s empty `local` buffer:
    /// all of them for a lone member, a fair share otherwise. Ready with
    /// `false` once the group is closed and empty.
    pub(crate) fn poll_take(
        &self,
        member: u64,
        local: &mut VecDeque<Item>,
        cx: &mut Context<'_>,
    ) -> Poll<bool> {
        let mut queue = self.lock();
        if !queue.items.is_empty() {
            if self.members.load(Ordering::Relaxed) <= 1 {
                // O(1), and the buffers swap places for reuse.
                std::mem::swap(&mut queue.items, local);
            } else {
                let n = queue.items.len().min(FAIR_SHARE as usize);
                local.extend(queue.items.drain(..n));
            }
            self.taken.fetch_add(local.len(), Ordering::Relaxed);
            return Poll::Ready(true);
        }
        if queue.closed {
            return Poll::Ready(false);
        }
        match queue.waiting.iter_mut().find(|(id, _)| *id == member) {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => queue.waiting.push((member, cx.waker().clone())),
        }
        Poll::Pending
    }

    /// Events queued or taken by a member and not yet delivered.
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len() + self.taken.load(Ordering::Relaxed)
    }

    /// Puts events a member took and did not deliver back at the front.
    pub(crate) fn give_back(&self, local: &mut VecDeque<Item>) {
        if local.is_empty() {
            return;
        }
        let mut queue = self.lock();
        self.taken.fetch_sub(local.len(), Ordering::Relaxed);
        for item in local.drain(..).rev() {
            queue.items.push_front(item);
        }
    }

    /// Closes the group: members get what is queued, then the end.
    pub(crate) fn close(&self) {
        let waiting = {
            let mut queue = self.lock();
            queue.closed = true;
            std::mem::take(&mut queue.waiting)
        };
        for (_, waker) in waiting {
            waker.wake();
        }
    }

    /// Member `member` is gone. If it was woken for an event it will not
    /// take now, another waiting member is woken in its place.
    pub(crate) fn forget(&self, member: u64) {
        self.hand_on(Some(member));
    }

    /// Wakes a waiting member if events are queued: a member that stops
    /// taking them hands the turn on.
    pub(crate) fn pass_on(&self) {
        self.hand_on(None);
    }

    fn hand_on(&self, leaving: Option<u64>) {
        let waiter = {
            let mut queue = self.lock();
            if let Some(member) = leaving {
                queue.waiting.retain(|(id, _)| *id != member);
            }
            if queue.items.is_empty() {
                None
            } else {
                queue.pop_waiter()
            }
        };
        if let Some((_, waker)) = waiter {
            waker.wake();
        }
    }

    /// Takes every queued event out (the group is going away).
    pub(crate) fn drain(&self) -> VecDeque<Item> {
        std::mem::take(&mut self.lock().items)
    }
}

#[derive(Clone)]
pub(crate) struct Item {
    pub(crate) message: Message,
    pub(crate) topic: Arc<str>,
    pub(crate) count: u32,
    /// The broker-wide publish sequence, the order of replay.
    pub(crate) sequence: u64,
}

#[derive(Clone)]
pub(crate) enum Message {
    Event(Event),
    // Boxed: rare, and large next to an event.
    Raw(Box<RawMessage>),
}

impl Item {
    pub(crate) fn matches(&self, options: &SubscribeOptions) -> bool {
        options.matches(&self.topic)
    }
}
