//! The idempotent consumer: skip events already handled.
//!
//! Every broker transport delivers at least once: an event whose ack was
//! lost, whose consumer crashed after its work, or that a publisher sent
//! twice (a retry after a timeout) comes back. [`IdempotentLayer`] wraps a
//! handler so that its work happens once per key, the event's CloudEvents
//! `source` and `id` by default (two events with the same source and id are
//! the same event, the spec says) or a key the program chooses:
//!
//! 1. before the handler, it asks the [`IdempotencyStore`] to
//!    [`begin`](IdempotencyStore::begin) the key, which atomically leaves
//!    an *in-progress* mark that expires after the
//!    [lease](IdempotentLayer::lease);
//! 2. a key already **done** is skipped: the layer answers `Ok` without
//!    calling the handler, so [`serve`](watchtower::serve()) acks it;
//! 3. a key **in progress** elsewhere (a concurrent redelivery, a
//!    duplicate on another consumer) fails with a retryable
//!    [`ErrorKind::Handler`] error, so `serve` nacks it and it comes back
//!    after the redelivery delay, by when the other holder has usually
//!    finished (then it is skipped) or failed (then it is handled);
//! 4. the key is marked done only **after the handler succeeds**, for the
//!    [keep time](IdempotentLayer::keep); when the handler fails, the mark
//!    is released at once, so the redelivery is handled again.
//!
//! A consumer that crashes mid-handler leaves its mark until the lease
//! expires; the redelivery is handled after that. Choose a lease longer
//! than the handler takes (a handler still running when its lease ends can
//! run beside a redelivery), and a keep time longer than a duplicate can
//! arrive late (the broker's redelivery window, a publisher's retries).
//!
//! What "once" covers: the handler's work is not repeated after it
//! succeeded. A handler that fails after part of its work (or crashes) runs
//! again; make the parts idempotent themselves or do them in one
//! transaction.
//!
//! Stores: [`MemoryStore`] (one process, bounded, with expiry); with the
//! feature `redis`, `RedisStore` (shared by every consumer, `SET` with
//! `PX` expiries); with the feature `postgres`, `PostgresStore` (a table
//! of the application's database, `INSERT ... ON CONFLICT`).
//!
//! # Exactly-once effects in one database
//!
//! When the handler's work is writes to the PostgreSQL database that holds
//! the marks, `PostgresStore::record_in` writes the done mark inside the
//! handler's own transaction: the work and the mark commit together, so a
//! crash between the commit and the ack (which the layer alone cannot
//! cover: the work is done, the mark is not) finds the key done on
//! redelivery. Used under the layer, the layer still keeps concurrent
//! duplicates from opening transactions at all.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, ServiceBuilder};
//! use watchtower::{Error, Event};
//! use watchtower_toolkit::idempotent::{IdempotentLayer, MemoryStore};
//!
//! let handler = ServiceBuilder::new()
//!     .layer(
//!         IdempotentLayer::new(MemoryStore::new(100_000))
//!             .lease(Duration::from_secs(60))
//!             .keep(Duration::from_secs(24 * 3600))
//!             .key(|event: &Event| event.extension("orderid").unwrap_or(event.id()).to_owned()),
//!     )
//!     .service(service_fn(|event: Event| async move {
//!         println!("charging for {}", event.id());
//!         Ok::<_, Error>(())
//!     }));
//! // serve(subscription, handler).await
//! # drop(handler);
//! ```
//!
//! [`ErrorKind::Handler`]: watchtower::ErrorKind::Handler

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod store;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};
use watchtower::{BoxError, Error, ErrorKind, Event};

pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresStore, Recorded};
#[cfg(feature = "redis")]
pub use redis::RedisStore;
pub use store::{Begin, Claim, IdempotencyStore};

type KeyFn = Arc<dyn Fn(&Event) -> String + Send + Sync>;

/// Wraps a handler so that events already handled are skipped. See the
/// [module docs](self).
pub struct IdempotentLayer<St> {
    store: Arc<St>,
    key: KeyFn,
    lease: Duration,
    keep: Duration,
    stats: Arc<Counters>,
}

impl<St> Clone for IdempotentLayer<St> {
    fn clone(&self) -> Self {
        IdempotentLayer {
            store: self.store.clone(),
            key: self.key.clone(),
            lease: self.lease,
            keep: self.keep,
            stats: self.stats.clone(),
        }
    }
}

impl<St> fmt::Debug for IdempotentLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentLayer")
            .field("lease", &self.lease)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

/// The default key of [`IdempotentLayer`]: the event's `source` and `id`,
/// which together name a CloudEvent, separated by a space.
pub fn default_key(event: &Event) -> String {
    let mut key = String::with_capacity(event.source().len() + 1 + event.id().len());
    key.push_str(event.source());
    key.push(' ');
    key.push_str(event.id());
    key
}

impl<St: IdempotencyStore> IdempotentLayer<St> {
    /// A layer keeping its marks in `store`.
    pub fn new(store: St) -> IdempotentLayer<St> {
        IdempotentLayer {
            store: Arc::new(store),
            key: Arc::new(default_key),
            lease: Duration::from_secs(30),
            keep: Duration::from_secs(24 * 60 * 60),
            stats: Arc::default(),
        }
    }

    /// The key that names an event. Default: its `source` and `id`,
    /// separated by a space.
    pub fn key<F>(mut self, key: F) -> Self
    where
        F: Fn(&Event) -> String + Send + Sync + 'static,
    {
        self.key = Arc::new(key);
        self
    }

    /// How long an in-progress mark holds the key. Default 30 s, the
    /// JetStream ack-wait default: about when the broker would redeliver
    /// an event whose consumer went silent anyway.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long a done mark is kept. Default 24 h, longer than any
    /// broker's redelivery window and a publisher's retries.
    pub fn keep(mut self, keep: Duration) -> Self {
        self.keep = keep;
        self
    }

    /// The layer's counters, shared by every service it makes.
    pub fn stats(&self) -> IdempotentStats {
        IdempotentStats(self.stats.clone())
    }
}

impl<S, St> Layer<S> for IdempotentLayer<St> {
    type Service = Idempotent<S, St>;

    fn layer(&self, inner: S) -> Idempotent<S, St> {
        Idempotent {
            inner,
            layer: self.clone(),
        }
    }
}

/// A handler that skips events already handled; made by
/// [`IdempotentLayer`].
pub struct Idempotent<S, St> {
    inner: S,
    layer: IdempotentLayer<St>,
}

impl<S: Clone, St> Clone for Idempotent<S, St> {
    fn clone(&self) -> Self {
        Idempotent {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotent<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, St> Idempotent<S, St> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped handler, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped handler.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St> Service<Event> for Idempotent<S, St>
where
    S: Service<Event> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    St: IdempotencyStore,
{
    type Response = ();
    type Error = Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(|e| Error::from_boxed(e.into()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        // The service made ready goes into the future; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let key = (layer.key)(&event);
        Box::pin(async move {
            let stats = &layer.stats;
            let claim = match layer.store.begin(&key, layer.lease).await? {
                Begin::Done => {
                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key, "event already handled; skipping");
                    return Ok(());
                }
                Begin::InProgress => {
                    stats.busy.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::new(
                        ErrorKind::Handler,
                        format!("event `{key}` is being handled elsewhere"),
                    ));
                }
                Begin::Claimed(claim) => claim,
            };
            // Reduce the handler's result to `Send` types before awaiting
            // the store.
            let handled = inner
                .call(event)
                .await
                .map(drop)
                .map_err(|e| Error::from_boxed(e.into()));
            match handled {
                Ok(()) => {
                    stats.handled.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = layer.store.complete(&claim, layer.keep).await {
                        // The work is done: acknowledging is right. Until
                        // its lease ends the key stays in progress, so a
                        // duplicate within it is held back, not repeated.
                        stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key, error = %e, "could not mark an event done; a late duplicate may be handled again");
                    }
                    Ok(())
                }
                Err(e) => {
                    if let Err(release) = layer.store.release(&claim).await {
                        stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key, error = %release, "could not release an event's mark; it expires with its lease");
                    }
                    Err(e)
                }
            }
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    skipped: AtomicU64,
    busy: AtomicU64,
    store_errors: AtomicU64,
}

/// Reads an [`IdempotentLayer`]'s counters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IdempotentStats(Arc<Counters>);

impl IdempotentStats {
    /// Events the handler handled successfully.
    pub fn handled(&self) -> u64 {
        self.0.handled.load(Ordering::Relaxed)
    }

    /// Events skipped as already handled.
    pub fn skipped(&self) -> u64 {
        self.0.skipped.load(Ordering::Relaxed)
    }

    /// Events sent back because another holder had them in progress.
    pub fn busy(&self) -> u64 {
        self.0.busy.load(Ordering::Relaxed)
    }

    /// Marks the store failed to complete or release.
    pub fn store_errors(&self) -> u64 {
        self.0.store_errors.load(Ordering::Relaxed)
    }
}
