//! The store contract: [`IdempotencyStore`], [`Begin`], [`Claim`].

use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use watchtower::Error;

/// Where the [`Idempotent`](super::Idempotent) layer keeps what it has
/// handled: one mark per key, either *in progress* (with an owner token and
/// an expiry, so that a crashed handler's mark goes away) or *done* (kept
/// for a while so that duplicates are recognised).
///
/// Every operation must be atomic with respect to concurrent callers on
/// the same key, across processes when the store is shared: of two callers
/// that `begin` the same key at once, exactly one gets
/// [`Begin::Claimed`].
///
/// Implemented by [`MemoryStore`](super::MemoryStore) and, with the
/// feature `redis`, `RedisStore`. A SQL store maps it
/// to one table `(key primary key, token, done, expires_at)`: `begin` is an
/// `INSERT ... ON CONFLICT DO UPDATE ... WHERE expires_at < now()`
/// returning the row, `complete` an `UPDATE` setting `done` and the new
/// expiry, `release` a `DELETE ... WHERE key = $1 AND token = $2 AND NOT
/// done`.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Tries to claim `key` for `lease`: [`Begin::Claimed`] if there was no
    /// mark or only an expired one (the caller now holds an in-progress
    /// mark that expires after `lease`), [`Begin::InProgress`] if another
    /// caller holds a live one, [`Begin::Done`] if the key was completed.
    ///
    /// # Errors
    ///
    /// If the store cannot be reached; the event is then not handled.
    fn begin(&self, key: &str, lease: Duration) -> impl Future<Output = Result<Begin, Error>> + Send;

    /// Marks the claimed key done, to be remembered for `keep`, whoever
    /// holds it now (the handler's work is done either way).
    ///
    /// # Errors
    ///
    /// If the store cannot be reached.
    fn complete(&self, claim: &Claim, keep: Duration) -> impl Future<Output = Result<(), Error>> + Send;

    /// Removes the in-progress mark of `claim`, if it still holds it, so
    /// that a redelivery can claim the key at once.
    ///
    /// # Errors
    ///
    /// If the store cannot be reached; the mark then expires with its
    /// lease.
    fn release(&self, claim: &Claim) -> impl Future<Output = Result<(), Error>> + Send;
}

impl<T: IdempotencyStore> IdempotencyStore for Arc<T> {
    fn begin(&self, key: &str, lease: Duration) -> impl Future<Output = Result<Begin, Error>> + Send {
        (**self).begin(key, lease)
    }

    fn complete(&self, claim: &Claim, keep: Duration) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).complete(claim, keep)
    }

    fn release(&self, claim: &Claim) -> impl Future<Output = Result<(), Error>> + Send {
        (**self).release(claim)
    }
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The caller holds the key now: handle the event, then
    /// [`complete`](IdempotencyStore::complete) or
    /// [`release`](IdempotencyStore::release).
    Claimed(Claim),
    /// Another caller is handling the same key.
    InProgress,
    /// The key was handled: skip the event.
    Done,
}

/// An in-progress mark held by one caller: the key and the token that
/// tells this holder from a later one.
#[derive(Clone, PartialEq, Eq)]
pub struct Claim {
    key: Arc<str>,
    token: Arc<str>,
}

impl Claim {
    /// A claim of `key` with a token unique to this process and call.
    pub fn new(key: impl Into<Arc<str>>) -> Claim {
        Claim {
            key: key.into(),
            token: next_token().into(),
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner token.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish()
    }
}

/// A token unique to this process (a random seed) and call (a counter).
fn next_token() -> String {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed =
        *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(std::process::id()));
    format!("{seed:016x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}
