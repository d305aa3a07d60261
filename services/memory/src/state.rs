//! The broker's shared state: routing topics to groups, publishing,
//! joining and leaving groups, and the counters behind `wait_idle`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use tokio::sync::Notify;
use watchtower::{Error, ErrorKind, Event, SubscribeOptions, TopicPattern, validate_topic};

use crate::MemoryConfig;
use crate::group::{Group, Item, Message};

/// Routes cached before the cache is reset: 10,000 topics, so that a
/// publisher inventing topics cannot grow memory without bound.
const ROUTE_CACHE_MAX: usize = 10_000;

pub(crate) struct Shared {
    pub(crate) state: RwLock<State>,
    pub(crate) retained: Mutex<HashMap<Arc<str>, VecDeque<Item>>>,
    pub(crate) retention: usize,
    pub(crate) max_pending: Option<usize>,
    pub(crate) sequence: AtomicU64,
    /// Events handed to groups, and events settled; their difference is
    /// what is outstanding. Two counters on their own cache lines, so that
    /// publishers and consumers on different cores do not contend for one.
    pub(crate) enqueued: Padded<AtomicU64>,
    pub(crate) settled: Padded<AtomicU64>,
    /// Tasks in `wait_idle`; settling notifies only when there are some.
    pub(crate) idle_waiters: Padded<AtomicUsize>,
    pub(crate) idle: Notify,
    pub(crate) closed: AtomicBool,
    pub(crate) next_id: AtomicU64,
    /// Bumped whenever routes may have changed, to invalidate publishers'
    /// cached routes.
    pub(crate) generation: AtomicU64,
}

/// Keeps a counter on a cache line of its own.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

pub(crate) type RouteCache = Option<CachedRoute>;
pub(crate) type Targets = Arc<[Arc<Group>]>;

#[derive(Clone)]
pub(crate) struct CachedRoute {
    topic: Arc<str>,
    generation: u64,
    targets: Arc<[Arc<Group>]>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) groups: HashMap<Arc<str>, GroupEntry>,
    pub(crate) routes: HashMap<Arc<str>, Arc<[Arc<Group>]>>,
}

pub(crate) struct GroupEntry {
    pub(crate) group: Arc<Group>,
    pub(crate) patterns: Vec<TopicPattern>,
    pub(crate) members: usize,
}

impl Shared {
    pub(crate) fn new(config: &MemoryConfig) -> Shared {
        Shared {
            state: RwLock::new(State::default()),
            retained: Mutex::new(HashMap::new()),
            retention: config.retention,
            max_pending: config.max_pending,
            sequence: AtomicU64::new(1),
            enqueued: Padded(AtomicU64::new(0)),
            settled: Padded(AtomicU64::new(0)),
            idle_waiters: Padded(AtomicUsize::new(0)),
            idle: Notify::new(),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn publish(
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

    pub(crate) fn settle(&self) {
        self.settled.0.fetch_add(1, Ordering::SeqCst);
        if self.idle_waiters.0.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn requeue(self: &Arc<Self>, group: Arc<Group>, mut item: Item, delay: Option<Duration>) {
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

    pub(crate) fn join(self: &Arc<Self>, options: &SubscribeOptions) -> Result<Arc<Group>, Error> {
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

    pub(crate) fn leave(&self, group: &Group) {
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
