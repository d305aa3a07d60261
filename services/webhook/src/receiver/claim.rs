//! The replay memory: claims on verified `webhook-id`s.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::unix_now;

/// A verified `webhook-id` held in progress in the replay memory; from
/// [`WebhookVerifier::claim`](crate::WebhookVerifier::claim).
///
/// [`complete`](Claim::complete) it once the event is handled; dropping it
/// otherwise (the handler failed, panicked, or its future was cancelled)
/// forgets the id so that the sender's retry is accepted.
#[must_use = "dropping a claim forgets the id; complete it once the event is handled"]
pub struct Claim {
    pub(super) held: Option<Held>,
}

pub(super) struct Held {
    pub(super) cache: Arc<ReplayCache>,
    pub(super) id: Box<str>,
    pub(super) token: u64,
    pub(super) expires: i64,
}

impl Claim {
    /// The event was handled: later duplicates of the id are answered as
    /// such until it leaves the window.
    pub fn complete(mut self) {
        if let Some(held) = self.held.take() {
            held.cache.complete(&held.id, held.token, held.expires);
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.cache.release(&held.id, held.token);
        }
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("id", &self.held.as_ref().map(|h| &*h.id))
            .finish()
    }
}

/// Remembered `webhook-id`s, each until its timestamp leaves the window.
pub(super) struct ReplayCache {
    pub(super) capacity: usize,
    pub(super) inner: Mutex<ReplayInner>,
}

/// Why an id cannot be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Handled.
    Done,
    /// Claimed and not yet released or completed.
    InProgress,
}

pub(super) struct Entry {
    /// Tells this claim from a later one on the same id, so that an old
    /// claim's release never forgets a newer one.
    pub(super) token: u64,
    pub(super) done: bool,
}

#[derive(Default)]
pub(super) struct ReplayInner {
    pub(super) entries: HashMap<Box<str>, Entry>,
    pub(super) order: VecDeque<(i64, u64, Box<str>)>,
    pub(super) next_token: u64,
}

impl ReplayCache {
    pub(super) fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity: capacity.max(1),
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, ReplayInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `id` in progress; its token, or why it cannot be claimed.
    pub(super) fn claim(&self, id: &str, expires: i64, now: i64) -> Result<u64, Seen> {
        let mut inner = self.lock();
        let ReplayInner {
            entries,
            order,
            next_token,
        } = &mut *inner;
        while let Some((at, _, _)) = order.front() {
            if *at > now && entries.len() < self.capacity {
                break;
            }
            if let Some((_, token, old)) = order.pop_front()
                && entries.get(&old).is_some_and(|e| e.token == token)
            {
                entries.remove(&old);
            }
        }
        if let Some(entry) = entries.get(id) {
            return Err(if entry.done { Seen::Done } else { Seen::InProgress });
        }
        let token = *next_token;
        *next_token = next_token.wrapping_add(1);
        entries.insert(id.into(), Entry { token, done: false });
        order.push_back((expires, token, id.into()));
        Ok(token)
    }

    /// The claim's event was handled.
    pub(super) fn complete(&self, id: &str, token: u64, expires: i64) {
        let mut inner = self.lock();
        match inner.entries.get_mut(id) {
            Some(entry) if entry.token == token => entry.done = true,
            Some(_) => {}
            None => {
                // Pushed out by newer ids while in progress: remember it
                // again, as handled.
                drop(inner);
                if let Ok(token) = self.claim(id, expires, unix_now()) {
                    self.complete(id, token, expires);
                }
            }
        }
    }

    /// The claim ended without the event being handled.
    pub(super) fn release(&self, id: &str, token: u64) {
        let mut inner = self.lock();
        if inner.entries.get(id).is_some_and(|e| e.token == token) {
            inner.entries.remove(id);
        }
    }

    pub(super) fn remove(&self, id: &str) {
        self.lock().entries.remove(id);
    }
}
