//! The in-memory WatchTower transport: the embedded default.
//!
//! A [`MemoryBroker`] lives in the process. Its [`MemoryPublisher`] is a
//! `Service<Event>`; its [`MemorySubscriber`] opens subscriptions with
//! wildcards (`user.*`, `user.>`), consumer groups (competing consumers),
//! acknowledgements with redelivery and delivery counts, delayed nacks, and
//! optional per-topic retention so a late subscriber can replay earlier
//! events. No external service is needed, which makes it the transport of
//! the quick start and of users' own tests.
//!
//! # Semantics
//!
//! * A subscription **without a group** is ephemeral: it receives events
//!   published while it is open; events it holds unsettled when it closes
//!   are gone with it (like core NATS).
//! * A **group** is durable for the broker's lifetime: its members share
//!   the events, and events published or nacked while no member is
//!   connected wait for the next one. Members of a group should subscribe
//!   to the same patterns (the group receives the union).
//! * An event published to a topic no subscription matches is not stored
//!   (unless retention is on). A subscription that asks to replay gets the
//!   retained events in publish order; a group joined with replay re-queues
//!   them for the whole group.
//! * `max_pending` is checked when an event is published, not in
//!   `poll_ready` (which cannot know the event's topic): a full queue makes
//!   the publish fail with [`ErrorKind::Overloaded`], the event attached.
//! * Dropping a delivery unsettled redelivers it at once.
//! * Order: one consumer sees a topic's events in publish order;
//!   redelivered events go to the back of the queue.
//! * Members of a group share its queue: a member takes at most 16 events
//!   in a row while others are connected, then hands the turn on; a member
//!   that closes gives back, in order, the events it took and had not yet
//!   delivered.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::service_fn;
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let broker = MemoryBroker::new();
//! let handle = broker
//!     .subscriber()
//!     .subscribe(["order.>"], service_fn(|event: Event| async move {
//!         println!("{} {}", event.ty(), event.id());
//!         Ok::<_, Error>(())
//!     }))
//!     .await?;
//! let receipt = broker.publisher().publish(Event::new("order.placed", serde_json::json!({"id": 1}))).await?;
//! assert_eq!(&*receipt.topic, "order.placed");
//! assert!(broker.wait_idle(Duration::from_secs(5)).await);
//! assert_eq!(handle.stop().await?.acked, 1);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::Notify;
use tower_service::Service;
use watchtower::codec::structured;
use watchtower::validate_topic;
use watchtower::{
    Acker, Capabilities, Delivery, Error, ErrorKind, Event, Poison, RawMessage, Receipt, SubscribeOptions,
    Subscriber, TopicPattern,
};

/// The `messaging.system` name of this transport.
pub const SYSTEM: &str = "memory";

/// Routes cached before the cache is reset: 10,000 topics, so that a
/// publisher inventing topics cannot grow memory without bound.
const ROUTE_CACHE_MAX: usize = 10_000;

/// Events a member of a group with several members takes in a row before
/// it lets the others have a turn.
const FAIR_SHARE: u32 = 16;

/// An in-process broker. Cheap to clone; clones share the broker.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
}

/// Configures a [`MemoryBroker`].
#[derive(Debug, Clone, Default)]
pub struct MemoryBrokerBuilder {
    retention: usize,
    max_pending: Option<usize>,
}

impl MemoryBrokerBuilder {
    /// Keeps the last `events` events of each topic for subscriptions that
    /// ask to [replay](SubscribeOptions::replay). Default 0: nothing kept.
    pub fn retention(mut self, events: usize) -> Self {
        self.retention = events;
        self
    }

    /// Refuses a publish with [`ErrorKind::Overloaded`] when a matching
    /// subscription already holds `events` unconsumed events. Default:
    /// unbounded.
    pub fn max_pending(mut self, events: usize) -> Self {
        self.max_pending = Some(events);
        self
    }

    /// Builds the broker.
    pub fn build(self) -> MemoryBroker {
        MemoryBroker {
            shared: Arc::new(Shared {
                state: RwLock::new(State::default()),
                retained: Mutex::new(HashMap::new()),
                retention: self.retention,
                max_pending: self.max_pending,
                sequence: AtomicU64::new(1),
                enqueued: Padded(AtomicU64::new(0)),
                settled: Padded(AtomicU64::new(0)),
                idle_waiters: Padded(AtomicUsize::new(0)),
                idle: Notify::new(),
                closed: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                generation: AtomicU64::new(0),
            }),
        }
    }
}

struct Shared {
    state: RwLock<State>,
    retained: Mutex<HashMap<Arc<str>, VecDeque<Item>>>,
    retention: usize,
    max_pending: Option<usize>,
    sequence: AtomicU64,
    /// Events handed to groups, and events settled; their difference is
    /// what is outstanding. Two counters on their own cache lines, so that
    /// publishers and consumers on different cores do not contend for one.
    enqueued: Padded<AtomicU64>,
    settled: Padded<AtomicU64>,
    /// Tasks in `wait_idle`; settling notifies only when there are some.
    idle_waiters: Padded<AtomicUsize>,
    idle: Notify,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Bumped whenever routes may have changed, to invalidate publishers'
    /// cached routes.
    generation: AtomicU64,
}

/// Keeps a counter on a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

type RouteCache = Option<CachedRoute>;
type Targets = Arc<[Arc<Group>]>;

#[derive(Clone)]
struct CachedRoute {
    topic: Arc<str>,
    generation: u64,
    targets: Arc<[Arc<Group>]>,
}

#[derive(Default)]
struct State {
    groups: HashMap<Arc<str>, GroupEntry>,
    routes: HashMap<Arc<str>, Arc<[Arc<Group>]>>,
}

struct GroupEntry {
    group: Arc<Group>,
    patterns: Vec<TopicPattern>,
    members: usize,
}

struct Group {
    key: Arc<str>,
    durable: bool,
    queue: Mutex<GroupQueue>,
    /// Connected members.
    members: AtomicUsize,
    /// Events members have taken into their own buffers and not yet
    /// delivered.
    taken: AtomicUsize,
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
    fn new(key: Arc<str>, durable: bool) -> Group {
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
    fn push(&self, item: Item) -> Result<(), Item> {
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
    fn poll_take(&self, member: u64, local: &mut VecDeque<Item>, cx: &mut Context<'_>) -> Poll<bool> {
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
    fn len(&self) -> usize {
        self.lock().items.len() + self.taken.load(Ordering::Relaxed)
    }

    /// Puts events a member took and did not deliver back at the front.
    fn give_back(&self, local: &mut VecDeque<Item>) {
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
    fn close(&self) {
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
    fn forget(&self, member: u64) {
        self.hand_on(Some(member));
    }

    /// Wakes a waiting member if events are queued: a member that stops
    /// taking them hands the turn on.
    fn pass_on(&self) {
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
    fn drain(&self) -> VecDeque<Item> {
        std::mem::take(&mut self.lock().items)
    }
}

#[derive(Clone)]
struct Item {
    message: Message,
    topic: Arc<str>,
    count: u32,
    /// The broker-wide publish sequence, the order of replay.
    sequence: u64,
}

#[derive(Clone)]
enum Message {
    Event(Event),
    // Boxed: rare, and large next to an event.
    Raw(Box<RawMessage>),
}

impl Item {
    fn matches(&self, options: &SubscribeOptions) -> bool {
        options.matches(&self.topic)
    }
}

impl MemoryBroker {
    /// A broker with no retention and unbounded queues.
    pub fn new() -> MemoryBroker {
        MemoryBroker::builder().build()
    }

    /// A builder for a configured broker.
    pub fn builder() -> MemoryBrokerBuilder {
        MemoryBrokerBuilder::default()
    }

    /// A publisher into this broker.
    pub fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher {
            shared: self.shared.clone(),
            route: None,
        }
    }

    /// A subscriber of this broker.
    pub fn subscriber(&self) -> MemorySubscriber {
        MemorySubscriber {
            shared: self.shared.clone(),
        }
    }

    /// Publishes raw bytes as if a foreign client had sent them: the body
    /// is decoded as CloudEvents JSON on delivery, and a body that does not
    /// decode reaches subscribers as a [`Poison`] delivery.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`] for a bad topic, [`ErrorKind::Closed`]
    /// after [`close`](MemoryBroker::close).
    pub fn publish_raw(&self, topic: &str, body: impl Into<Bytes>) -> Result<(), Error> {
        let raw = RawMessage {
            topic: topic.into(),
            headers: Vec::new(),
            body: body.into(),
        };
        self.shared
            .publish(topic, Message::Raw(Box::new(raw)), None, None)
            .map(|_| ())
    }

    /// Events published and not yet settled by every group they went to.
    pub fn outstanding(&self) -> u64 {
        // Settled first: every settlement follows its enqueue, so this
        // never reads more settled than enqueued events.
        let settled = self.shared.settled.0.load(Ordering::SeqCst);
        self.shared
            .enqueued
            .0
            .load(Ordering::SeqCst)
            .saturating_sub(settled)
    }

    /// Waits until every published event has been settled (acked or
    /// rejected) by every subscription it went to, or `timeout` passes.
    /// Returns whether the broker became idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.shared.idle_waiters.0.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.shared.idle_waiters.0);
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.shared.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.outstanding() == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    /// Closes the broker: publishers fail with [`ErrorKind::Closed`], and
    /// subscriptions end once they have delivered what they hold.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        let state = self.shared.state.read().unwrap_or_else(PoisonError::into_inner);
        for entry in state.groups.values() {
            entry.group.close();
        }
    }

    /// Whether [`close`](MemoryBroker::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("retention", &self.shared.retention)
            .field("max_pending", &self.shared.max_pending)
            .field("outstanding", &self.outstanding())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Shared {
    fn publish(
        &self,
        topic: &str,
        message: Message,
        event: Option<&Event>,
        cache: Option<&mut RouteCache>,
    ) -> Result<u64, Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("memory broker is closed"));
        }
        let generation = self.generation.load(Ordering::Acquire);
        // Retention needs the state lock held while queueing (see below);
        // without it, a publisher's cached route saves the lock and the
        // lookup.
        let cached = match &cache {
            Some(Some(c)) if self.retention == 0 && c.generation == generation && *c.topic == *topic => {
                Some(c.targets.clone())
            }
            _ => None,
        };
        let (targets, state) = match cached {
            Some(targets) => (targets, None),
            None => {
                let (targets, state) = self.route(topic)?;
                if let Some(cache) = cache {
                    *cache = Some(CachedRoute {
                        topic: topic.into(),
                        generation,
                        targets: targets.clone(),
                    });
                }
                (targets, Some(state))
            }
        };
        if let Some(max) = self.max_pending
            && targets.iter().any(|g| g.len() >= max)
        {
            let err = Error::new(ErrorKind::Overloaded, "a subscription's queue is full");
            return Err(match event {
                Some(event) => err.with_event(event.clone()),
                None => err,
            });
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let topic: Arc<str> = match event {
            Some(event) => event.shared_topic(),
            None => topic.into(),
        };
        let item = Item {
            message,
            topic,
            count: 1,
            sequence,
        };
        if self.retention > 0 {
            let mut retained = self.retained.lock().unwrap_or_else(PoisonError::into_inner);
            let queue = retained.entry(item.topic.clone()).or_default();
            if queue.len() >= self.retention {
                queue.pop_front();
            }
            queue.push_back(item.clone());
        }
        // The state lock, when taken, is held until the events are queued,
        // so that a subscription that replays retained events cannot miss
        // one published meanwhile.
        let _state = state;
        if let Some((last, rest)) = targets.split_last() {
            for group in rest {
                self.enqueue(group, item.clone());
            }
            self.enqueue(last, item);
        }
        Ok(sequence)
    }

    fn route(&self, topic: &str) -> Result<(Targets, RwLockReadGuard<'_, State>), Error> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(targets) = state.routes.get(topic) {
            return Ok((targets.clone(), state));
        }
        validate_topic(topic)?;
        drop(state);
        self.compute_route(topic);
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        // The cache entry may already be gone again (a subscription came or
        // went); then compute the route under this lock, uncached.
        let targets = match state.routes.get(topic) {
            Some(targets) => targets.clone(),
            None => matching_groups(&state, topic),
        };
        Ok((targets, state))
    }

    fn compute_route(&self, topic: &str) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let targets = matching_groups(&state, topic);
        if state.routes.len() >= ROUTE_CACHE_MAX {
            state.routes.clear();
        }
        state.routes.insert(topic.into(), targets);
    }

    fn enqueue(&self, group: &Group, item: Item) {
        self.enqueued.0.fetch_add(1, Ordering::SeqCst);
        if group.push(item).is_err() {
            // The group closed while the event was on its way: nobody is
            // left to deliver it to.
            self.settle();
        }
    }

    fn settle(&self) {
        self.settled.0.fetch_add(1, Ordering::SeqCst);
        if self.idle_waiters.0.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    fn requeue(self: &Arc<Self>, group: Arc<Group>, mut item: Item, delay: Option<Duration>) {
        item.count = item.count.saturating_add(1);
        let send = move |shared: &Shared| {
            if group.push(item).is_err() {
                shared.settle();
            }
        };
        match (delay, tokio::runtime::Handle::try_current()) {
            (Some(delay), Ok(runtime)) if !delay.is_zero() => {
                let shared = self.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    send(&shared);
                });
            }
            _ => send(self),
        }
    }

    fn join(self: &Arc<Self>, options: &SubscribeOptions) -> Result<Arc<Group>, Error> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock: `close` closes every group it can see
        // after setting the flag.
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("memory broker is closed"));
        }
        state.routes.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let key: Arc<str> = match options.group_name() {
            Some(name) => name.into(),
            None => format!("\0ephemeral-{}", self.next_id.fetch_add(1, Ordering::Relaxed)).into(),
        };
        let entry = state.groups.entry(key.clone()).or_insert_with(|| GroupEntry {
            group: Arc::new(Group::new(key, options.group_name().is_some())),
            patterns: Vec::new(),
            members: 0,
        });
        entry.members += 1;
        entry.group.members.fetch_add(1, Ordering::Relaxed);
        for pattern in options.patterns() {
            if !entry.patterns.contains(pattern) {
                entry.patterns.push(pattern.clone());
            }
        }
        let group = entry.group.clone();
        if options.is_replay() && self.retention > 0 {
            let retained = self.retained.lock().unwrap_or_else(PoisonError::into_inner);
            let mut replay: Vec<&Item> = retained
                .values()
                .flat_map(|q| q.iter())
                .filter(|item| item.matches(options))
                .collect();
            replay.sort_by_key(|item| item.sequence);
            for item in replay {
                self.enqueue(&group, item.clone());
            }
        }
        Ok(group)
    }

    fn leave(&self, group: &Group) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = state.groups.get_mut(&group.key) else {
            return;
        };
        entry.members -= 1;
        group.members.fetch_sub(1, Ordering::Relaxed);
        if entry.members == 0 && !group.durable {
            state.groups.remove(&group.key);
            state.routes.clear();
            self.generation.fetch_add(1, Ordering::AcqRel);
            drop(state);
            group.close();
            for _ in group.drain() {
                self.settle();
            }
        }
    }
}

fn matching_groups(state: &State, topic: &str) -> Targets {
    state
        .groups
        .values()
        .filter(|e| e.patterns.iter().any(|p| p.matches(topic)))
        .map(|e| e.group.clone())
        .collect()
}

/// Publishes into a [`MemoryBroker`]. Cheap to clone.
///
/// The receipt's `sequence` is the broker-wide publish sequence. Events are
/// validated ([`Event::validate`]) and their topic checked; publishing
/// never waits.
#[derive(Clone)]
pub struct MemoryPublisher {
    shared: Arc<Shared>,
    route: RouteCache,
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

    fn call(&mut self, event: Event) -> Self::Future {
        let span = watchtower::trace::publish_span(SYSTEM, event.topic(), &event);
        let _entered = span.enter();
        let result = event.validate().and_then(|()| {
            let sequence = self.shared.publish(
                event.topic(),
                Message::Event(event.clone()),
                Some(&event),
                Some(&mut self.route),
            )?;
            Ok(Receipt::for_event(&event).with_sequence(sequence))
        });
        ready(result)
    }
}

/// Opens subscriptions on a [`MemoryBroker`].
#[derive(Clone)]
pub struct MemorySubscriber {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemorySubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscriber").finish_non_exhaustive()
    }
}

/// What the memory transport can do: everything, within one process.
pub const CAPABILITIES: Capabilities = Capabilities::NONE
    .persistent(true)
    .consumer_groups(true)
    .ordered(true)
    .wildcards(true)
    .redelivery(true)
    .nack_delay(true);

impl Subscriber for MemorySubscriber {
    type Acker = MemoryAcker;
    type Subscription = MemorySubscription;

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES.replay(self.shared.retention > 0)
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
        let acker = MemoryAcker {
            item: Some(item.clone()),
            group: self.group.clone(),
            shared: self.shared.clone(),
        };
        let delivery = match item.message {
            Message::Event(event) => Delivery::new(event, item.topic, acker),
            Message::Raw(raw) => match structured::from_bytes(&raw.body) {
                Ok(event) => Delivery::new(event, item.topic, acker),
                Err(error) => Delivery::poison(Poison::new(*raw, error), acker),
            },
        };
        Poll::Ready(Some(Ok(delivery
            .with_delivery_count(item.count)
            .with_system(SYSTEM))))
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.group.give_back(&mut self.local);
        self.group.forget(self.member);
        self.shared.leave(&self.group);
    }
}

/// Settles a memory delivery. Dropped unsettled, it redelivers at once.
pub struct MemoryAcker {
    item: Option<Item>,
    group: Arc<Group>,
    shared: Arc<Shared>,
}

impl fmt::Debug for MemoryAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAcker")
            .field("settled", &self.item.is_none())
            .finish()
    }
}

impl MemoryAcker {
    fn settle(mut self) {
        if self.item.take().is_some() {
            self.shared.settle();
        }
    }
}

impl Acker for MemoryAcker {
    fn ack(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.settle();
        ready(Ok(()))
    }

    fn nack(mut self, delay: Option<Duration>) -> impl Future<Output = Result<(), Error>> + Send {
        if let Some(item) = self.item.take() {
            self.shared.requeue(self.group.clone(), item, delay);
        }
        ready(Ok(()))
    }

    fn reject(self) -> impl Future<Output = Result<(), Error>> + Send {
        self.settle();
        ready(Ok(()))
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.shared.requeue(self.group.clone(), item, None);
        }
    }
}

/// Everything a program using the memory transport needs:
/// `use watchtower_memory::prelude::*;`.
pub mod prelude {
    pub use crate::{MemoryAcker, MemoryBroker, MemoryPublisher, MemorySubscriber, MemorySubscription};
    pub use watchtower::prelude::*;
}
