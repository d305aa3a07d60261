//! The queue between callers and the worker.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use serde::Serialize;
use tokio::sync::Notify;
use tower::Service;
use watchtower::reply::Replier;
use watchtower::{BoxError, Event};

use crate::metrics::QueueMetrics;

pub(crate) type Reply<R> = Replier<Result<R, watchtower::Error>>;

pub(crate) struct Job<R> {
    pub(crate) event: Event,
    pub(crate) reply: Reply<R>,
    /// The caller's span, entered when the worker calls the inner service,
    /// so that the transport's publish span is its child, as if the caller
    /// had called it.
    pub(crate) span: tracing::Span,
}

pub(crate) struct Queue<R> {
    pub(crate) jobs: VecDeque<Job<R>>,
    pub(crate) worker: Option<Waker>,
    /// Every handle is gone: drain and stop.
    pub(crate) closed: bool,
}

pub(crate) struct Shared<R> {
    pub(crate) queue: Mutex<Queue<R>>,
    /// The worker is gone: refuse new work. Set with the queue locked, so
    /// that a caller holding the lock sees it before pushing.
    pub(crate) stopped: AtomicBool,
    pub(crate) counters: Arc<Counters>,
    /// The counters' metrics, registered for this queue.
    pub(crate) metrics: QueueMetrics,
    /// Under `Overflow::Block`: slots reserved by callers (in `poll_ready`)
    /// or held by queued jobs, at most the capacity.
    pub(crate) slots: Option<Slots>,
    /// Jobs in this queue (the counters' depth is shared by every queue of
    /// a layer). Changed with the queue locked.
    pub(crate) queued: AtomicUsize,
    /// Calls of the inner service running now, the worker's and those
    /// callers made themselves; at most `concurrency`.
    pub(crate) running: AtomicUsize,
    pub(crate) concurrency: usize,
    /// The worker waits for a running call to finish.
    pub(crate) worker_waits: AtomicBool,
}

impl<R> Shared<R> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Queue<R>> {
        // Updates leave the queue consistent before anything can panic.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the worker gone and wakes callers waiting for a slot, so that
    /// they see it. Call with the queue locked.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(slots) = &self.slots {
            slots.room.notify_waiters();
        }
    }

    /// Counts a call starting if fewer than `concurrency` run.
    pub(crate) fn try_start(&self) -> bool {
        let started = self
            .running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.concurrency).then_some(n + 1)
            })
            .is_ok();
        if started {
            self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        started
    }

    /// Counts a call finished, and wakes the worker if it waits for one.
    pub(crate) fn finish(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.worker_waits.swap(false, Ordering::SeqCst) {
            let waker = self.lock().worker.take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }

    /// The queue holds `depth` jobs now.
    pub(crate) fn set_depth(&self, depth: usize) {
        self.counters.set_depth(depth);
        self.metrics.depth(depth);
    }

    /// A new event refused, the queue full.
    pub(crate) fn dropped_newest(&self) {
        self.counters.dropped_newest.fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped_newest();
    }

    /// A queued event evicted for a newer one, its caller still waiting.
    pub(crate) fn dropped_oldest(&self) {
        self.counters.dropped_oldest.fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped_oldest();
    }

    /// `n` queued events skipped, their callers gone.
    pub(crate) fn abandoned(&self, n: u64) {
        self.counters.abandoned.fetch_add(n, Ordering::Relaxed);
        self.metrics.abandoned(n);
    }

    /// Gives back the slot of a job taken off the queue.
    pub(crate) fn release_slot(&self) {
        if let Some(slots) = &self.slots {
            slots.release();
        }
    }
}

/// A call of the inner service that a caller made itself; counted in
/// [`Shared::running`] until it finishes or is dropped.
pub(crate) type DirectFuture<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

/// The inner service as callers see it: they call it themselves when
/// nothing is queued and a call may start, rather than hand the event to
/// the worker.
pub(crate) trait Direct<R>: Send {
    /// Calls the service if it is ready now; gives the event back if not.
    fn try_call(&mut self, event: Event) -> Result<DirectFuture<R>, Event>;
}

impl<S> Direct<S::Response> for S
where
    S: Service<Event> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn try_call(&mut self, event: Event) -> Result<DirectFuture<S::Response>, Event> {
        // `call` has no context: a service that is not ready at once is
        // left to the worker, which waits for it with its own.
        match self.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {
                let future = self.call(event);
                Ok(Box::pin(async move { future.await.map_err(Into::into) }))
            }
            Poll::Ready(Err(_)) | Poll::Pending => Err(event),
        }
    }
}

/// A counting semaphore for `Overflow::Block` whose uncontended path is
/// one compare-and-swap each way: a caller waits on `room` only when
/// every slot is taken.
pub(crate) struct Slots {
    pub(crate) taken: AtomicUsize,
    pub(crate) capacity: usize,
    pub(crate) room: Arc<Notify>,
}

impl Slots {
    pub(crate) fn try_reserve(&self) -> bool {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < self.capacity).then_some(taken + 1)
            })
            .is_ok()
    }

    pub(crate) fn release(&self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
        // Wakes one waiting caller, or lets the next one that starts
        // waiting through at once.
        self.room.notify_one();
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) capacity: usize,
    pub(crate) depth: AtomicUsize,
    pub(crate) high_water: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) dropped_newest: AtomicU64,
    pub(crate) dropped_oldest: AtomicU64,
    pub(crate) abandoned: AtomicU64,
}

impl Counters {
    pub(crate) fn set_depth(&self, depth: usize) {
        self.depth.store(depth, Ordering::Relaxed);
        if depth > self.high_water.load(Ordering::Relaxed) {
            self.high_water.store(depth, Ordering::Relaxed);
        }
    }
}

/// Counters of a backpressure queue, as of one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BackpressureStats {
    /// The queue's capacity.
    pub capacity: usize,
    /// Events waiting in the queue now.
    pub depth: usize,
    /// The most events ever waiting at once.
    pub high_water: usize,
    /// Events the inner service is working on now.
    pub in_flight: usize,
    /// New events refused because the queue was full (`DropNewest`).
    pub dropped_newest: u64,
    /// Queued events evicted for newer ones (`DropOldest`) while their
    /// callers still waited.
    pub dropped_oldest: u64,
    /// Queued events never sent because their caller stopped waiting
    /// before the worker reached them (a timeout above, a retry that gave
    /// up, a dropped future), evicted ones included. The caller has its answer already (an error
    /// it may retry or dead-letter), so the queue neither sends nor
    /// dead-letters these.
    pub abandoned: u64,
}

/// A cloneable handle on a backpressure layer's counters.
#[derive(Clone, Debug)]
pub struct BackpressureHandle {
    pub(crate) counters: Arc<Counters>,
}

impl BackpressureHandle {
    /// The counters now.
    pub fn stats(&self) -> BackpressureStats {
        let c = &self.counters;
        BackpressureStats {
            capacity: c.capacity,
            depth: c.depth.load(Ordering::Relaxed),
            high_water: c.high_water.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            dropped_newest: c.dropped_newest.load(Ordering::Relaxed),
            dropped_oldest: c.dropped_oldest.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
        }
    }
}
