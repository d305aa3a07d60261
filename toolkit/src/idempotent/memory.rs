//! [`MemoryStore`]: a bounded in-process store with expiry.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use watchtower::{Error, ErrorKind};

use super::store::{Begin, Claim, IdempotencyStore};

/// An in-process [`IdempotencyStore`]: marks in a map, each with its
/// expiry, at most `capacity` of them. Clones share the map.
///
/// It recognises duplicates that reach **this process** only; consumers in
/// several processes need a shared store (`RedisStore`, feature `redis`).
/// It is lost when the process exits.
///
/// When full, it forgets expired marks first, then the done marks that
/// would expire soonest, so the window in which duplicates are recognised
/// is the shorter of the layer's `keep` time and `capacity` events. It
/// never forgets an in-progress mark before its lease ends: if every mark
/// is in progress, `begin` fails with [`ErrorKind::Overloaded`] (retryable).
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Mutex<Marks>>,
}

struct Marks {
    entries: HashMap<Arc<str>, Mark>,
    /// Every mark by (expiry, sequence), to drop expired ones in order.
    by_expiry: BTreeMap<(Instant, u64), Arc<str>>,
    seq: u64,
    capacity: usize,
}

struct Mark {
    token: Option<Arc<str>>,
    expires: Instant,
    seq: u64,
}

impl MemoryStore {
    /// A store of at most `capacity` marks (at least 1).
    pub fn new(capacity: usize) -> MemoryStore {
        MemoryStore {
            shared: Arc::new(Mutex::new(Marks {
                entries: HashMap::new(),
                by_expiry: BTreeMap::new(),
                seq: 0,
                capacity: capacity.max(1),
            })),
        }
    }

    /// How many marks are held, expired ones included until they are
    /// swept.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no marks are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Marks> {
        // Every update leaves the maps consistent before anything can panic.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryStore {
    /// A store of 100,000 marks: a few megabytes, minutes of duplicates at
    /// a few hundred events a second.
    fn default() -> Self {
        MemoryStore::new(100_000)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let marks = self.lock();
        f.debug_struct("MemoryStore")
            .field("len", &marks.entries.len())
            .field("capacity", &marks.capacity)
            .finish()
    }
}

impl Marks {
    fn sweep(&mut self, now: Instant) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
        }
    }

    fn set(&mut self, key: Arc<str>, token: Option<Arc<str>>, expires: Instant) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(old) = self.entries.insert(key.clone(), Mark { token, expires, seq }) {
            self.by_expiry.remove(&(old.expires, old.seq));
        }
        self.by_expiry.insert((expires, seq), key);
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.by_expiry.remove(&(old.expires, old.seq));
        }
    }

    /// Makes room for one more mark: forgets the done mark that expires
    /// soonest. Fails if every mark is in progress.
    fn make_room(&mut self) -> Result<(), Error> {
        if self.entries.len() < self.capacity {
            return Ok(());
        }
        let victim = self
            .by_expiry
            .iter()
            .find(|(_, key)| self.entries.get(*key).is_some_and(|m| m.token.is_none()))
            .map(|(_, key)| key.clone());
        match victim {
            Some(key) => {
                self.remove(&key);
                Ok(())
            }
            None => Err(Error::new(
                ErrorKind::Overloaded,
                format!(
                    "idempotency store is full of {} events in progress",
                    self.capacity
                ),
            )),
        }
    }
}

impl IdempotencyStore for MemoryStore {
    fn begin(&self, key: &str, lease: Duration) -> impl Future<Output = Result<Begin, Error>> + Send {
        let now = Instant::now();
        let mut marks = self.lock();
        marks.sweep(now);
        let result = match marks.entries.get(key) {
            Some(mark) if mark.token.is_none() => Ok(Begin::Done),
            Some(_) => Ok(Begin::InProgress),
            None => marks.make_room().map(|()| {
                let claim = Claim::new(key);
                let token: Arc<str> = claim.token().into();
                marks.set(key.into(), Some(token), deadline(now, lease));
                Begin::Claimed(claim)
            }),
        };
        ready(result)
    }

    fn complete(&self, claim: &Claim, keep: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        let now = Instant::now();
        let mut marks = self.lock();
        let result = if marks.entries.contains_key(claim.key()) {
            marks.set(claim.key().into(), None, deadline(now, keep));
            Ok(())
        } else {
            marks
                .make_room()
                .map(|()| marks.set(claim.key().into(), None, deadline(now, keep)))
        };
        ready(result)
    }

    fn release(&self, claim: &Claim) -> impl Future<Output = Result<(), Error>> + Send {
        let mut marks = self.lock();
        let ours = marks
            .entries
            .get(claim.key())
            .is_some_and(|m| m.token.as_deref() == Some(claim.token()));
        if ours {
            marks.remove(claim.key());
        }
        ready(Ok(()))
    }
}

/// `now + d`, saturating far in the future rather than overflowing.
fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(begin: Begin) -> Claim {
        match begin {
            Begin::Claimed(claim) => claim,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    const LEASE: Duration = Duration::from_secs(10);
    const KEEP: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn begin_claims_once_then_reports_in_progress_then_done() {
        let store = MemoryStore::new(10);
        let claim = claimed(store.begin("a", LEASE).await.unwrap());
        assert_eq!(store.begin("a", LEASE).await.unwrap(), Begin::InProgress);
        store.complete(&claim, KEEP).await.unwrap();
        assert_eq!(store.begin("a", LEASE).await.unwrap(), Begin::Done);
        tokio::time::advance(KEEP).await;
        claimed(store.begin("a", LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_can_be_claimed_again_and_the_old_holder_cannot_release_it() {
        let store = MemoryStore::new(10);
        let first = claimed(store.begin("a", LEASE).await.unwrap());
        tokio::time::advance(LEASE).await;
        let second = claimed(store.begin("a", LEASE).await.unwrap());
        assert_ne!(first.token(), second.token());
        store.release(&first).await.unwrap();
        assert_eq!(store.begin("a", LEASE).await.unwrap(), Begin::InProgress);
        store.release(&second).await.unwrap();
        claimed(store.begin("a", LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_it_forgets_done_marks_soonest_expiring_first_never_one_in_progress() {
        let store = MemoryStore::new(3);
        let a = claimed(store.begin("a", LEASE).await.unwrap());
        store.complete(&a, KEEP).await.unwrap();
        let b = claimed(store.begin("b", LEASE).await.unwrap());
        store.complete(&b, KEEP * 2).await.unwrap();
        let _c = claimed(store.begin("c", LEASE).await.unwrap());
        // Full: `a` (done, soonest) goes.
        let _d = claimed(store.begin("d", LEASE).await.unwrap());
        assert_eq!(store.len(), 3);
        claimed(store.begin("a", LEASE).await.unwrap()); // `b` goes
        assert_eq!(store.begin("c", LEASE).await.unwrap(), Begin::InProgress);
        // Now a, c, d are all in progress: no room.
        let full = store.begin("e", LEASE).await.unwrap_err();
        assert_eq!(full.kind(), ErrorKind::Overloaded);
        assert!(full.is_retryable());
        // Leases end: room again.
        tokio::time::advance(LEASE).await;
        claimed(store.begin("e", LEASE).await.unwrap());
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn huge_durations_saturate_instead_of_panicking() {
        let store = MemoryStore::new(2);
        let claim = claimed(store.begin("a", Duration::MAX).await.unwrap());
        store.complete(&claim, Duration::MAX).await.unwrap();
        assert_eq!(store.begin("a", Duration::ZERO).await.unwrap(), Begin::Done);
        // A zero lease expires at once.
        claimed(store.begin("b", Duration::ZERO).await.unwrap());
        claimed(store.begin("b", Duration::ZERO).await.unwrap());
    }
}
