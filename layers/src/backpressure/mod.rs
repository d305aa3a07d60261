//! Backpressure: a bounded queue in front of a service, with a policy for
//! when it is full.
//!
//! [`BackpressureLayer`] puts a queue of `capacity` events in front of the
//! inner service and a [`Worker`] behind it that feeds the service in
//! order, at most [`concurrency`](BackpressureLayer::concurrency) calls at
//! once. When the queue is full, the [`Overflow`] policy decides:
//!
//! * [`Overflow::Block`]: `poll_ready` stays pending until there is room —
//!   the slot is reserved in `poll_ready`, consumed in `call`, and given
//!   back if the service is dropped unused;
//! * [`Overflow::DropNewest`]: the new event is refused;
//! * [`Overflow::DropOldest`]: the oldest queued event is evicted for it.
//!
//! With [`direct`](BackpressureLayer::direct) on, when nothing is queued,
//! fewer than `concurrency` calls run and the inner service is ready at
//! once, the caller calls it itself in `call` instead of handing the event
//! to the worker and waiting to be woken with the answer: no event is
//! overtaken (one waits in the queue only while another does) and the
//! concurrency bound counts these calls too, but an uncongested call costs
//! no hop between tasks. The worker takes over as soon as events queue up.
//! (A worker run by hand, from [`Backpressure::pair`], gets every call.)
//!
//! A queued event whose caller has stopped waiting — its response future
//! dropped by a timeout above, a retry layer that gave up, a cancelled
//! task — is **never started**: the worker checks that the caller is still
//! there just before it calls the inner service, skips the event if not,
//! and counts it as [`abandoned`](BackpressureStats::abandoned). The caller
//! has had its answer already (and may have retried or dead-lettered the
//! event), so the queue neither sends nor dead-letters it. A caller that
//! leaves after its call has started leaves an ambiguous call behind, like
//! any timeout. A caller's own call (with [`direct`](BackpressureLayer::direct))
//! starts inside its `call`, while it is there by definition.
//!
//! A refused or evicted event resolves **its own caller's** future with
//! [`ErrorKind::Dropped`], the event
//! attached ([`Error::event`](watchtower::Error::event)), so a dead-letter
//! layer above keeps it. [`BackpressureHandle`] reads the depth, the
//! high-water mark, the drop counts and the abandoned count.
//!
//! When every clone of the service is dropped, the worker drains the queue
//! and the calls in flight, then ends. If the worker itself is dropped
//! (its runtime shut down), queued callers get
//! [`ErrorKind::Closed`] with their event.
//!
//! # Example
//!
//! ```
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use watchtower::{Error, ErrorKind, Event};
//! use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let layer = BackpressureLayer::new(1024, Overflow::Block).concurrency(8);
//! let stats = layer.handle();
//! let mut svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|_: Event| async { Ok::<_, Error>(()) }));
//! svc.ready().await?.call(Event::empty("tick")).await?;
//! assert_eq!(stats.stats().dropped_newest, 0);
//! # Ok(()) }
//! ```
//!
//! # Panics
//!
//! [`Layer::layer`] and [`Backpressure::new`] spawn the worker with
//! [`tokio::spawn`], so they must run inside a tokio runtime; use
//! [`Backpressure::pair`] to run the worker yourself.

mod future;
mod shared;
mod worker;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tower::{Layer, Service};
use watchtower::reply::reply;
use watchtower::{BoxError, Error, ErrorKind, Event};

pub use future::ResponseFuture;
pub use shared::{BackpressureHandle, BackpressureStats};
pub use worker::Worker;

use crate::metrics::QueueMetrics;
use shared::{Counters, Direct, Job, Queue, Shared, Slots};

/// The default concurrency: 64 calls in flight, as the consumer runtime
/// uses, enough to hide a broker's round trip.
const DEFAULT_CONCURRENCY: usize = 64;

pub use watchtower::Overflow;

/// Puts a bounded queue with an [`Overflow`] policy in front of a service.
///
/// Each service the layer makes has its own queue and worker; they share
/// the layer's counters.
#[derive(Clone, Debug)]
pub struct BackpressureLayer {
    capacity: usize,
    overflow: Overflow,
    concurrency: usize,
    direct: bool,
    name: Arc<str>,
    counters: Arc<Counters>,
}

impl BackpressureLayer {
    /// A queue of `capacity` events (at least 1).
    pub fn new(capacity: usize, overflow: Overflow) -> Self {
        let capacity = capacity.max(1);
        BackpressureLayer {
            capacity,
            overflow,
            concurrency: DEFAULT_CONCURRENCY,
            direct: false,
            name: Arc::from(""),
            counters: Arc::new(Counters {
                capacity,
                ..Counters::default()
            }),
        }
    }

    /// How many calls the worker runs at once (at least 1). Default:
    /// 64; 1 keeps the inner service's order strict.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Lets callers call the inner service themselves, in `call`, when
    /// nothing is queued, fewer than `concurrency` calls run and the
    /// service is ready at once (see the [module docs](self)). Default:
    /// off, every call goes through the worker.
    ///
    /// Worth it when the inner service hands its work to a task of its own
    /// anyway (a publisher that gathers pipelines, a connection task): the
    /// hop to the worker and back then buys nothing. Leave it off when the
    /// worker is what takes the work off the callers' task (a publisher
    /// whose `call` does the encoding and the send), so that callers and
    /// worker run side by side.
    pub fn direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// The `name` label of the queue's [metrics](crate::metrics), set
    /// before the layer wraps a service. Default: empty, labelled
    /// `default`.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// A handle on the counters.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            counters: self.counters.clone(),
        }
    }
}

impl<S> Layer<S> for BackpressureLayer
where
    S: Service<Event> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Service = Backpressure<S::Response>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = Arc::new(Mutex::new(inner));
        let direct = self
            .direct
            .then(|| -> Arc<Mutex<dyn Direct<S::Response>>> { inner.clone() });
        let (svc, worker) = Backpressure::build(inner, direct, self);
        tokio::spawn(worker);
        svc
    }
}

/// The caller side of a backpressure queue; `R` is the inner service's
/// response. Clones share the queue. See the [module docs](self).
pub struct Backpressure<R> {
    handle: Arc<Handle<R>>,
    /// A slot reserved in `poll_ready` under `Overflow::Block`.
    reserved: bool,
    /// Waiting for a slot to free up.
    waiting: Option<Pin<Box<OwnedNotified>>>,
}

/// Closes the queue when the last caller-side clone goes.
struct Handle<R> {
    shared: Arc<Shared<R>>,
    overflow: Overflow,
    /// The inner service, for callers to call themselves when nothing is
    /// queued and a call may start (not with a worker run by hand).
    direct: Option<Arc<Mutex<dyn Direct<R>>>>,
}

impl<R> Drop for Handle<R> {
    fn drop(&mut self) {
        let waker = {
            let mut queue = self.shared.lock();
            queue.closed = true;
            queue.worker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<R> Backpressure<R> {
    /// A queue configured by `layer` in front of `inner`, its worker
    /// spawned on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn new<S>(inner: S, layer: &BackpressureLayer) -> Self
    where
        S: Service<Event, Response = R> + Send + 'static,
        S::Future: Send + 'static,
        R: Send + 'static,
        S::Error: Into<BoxError>,
    {
        layer.layer(inner)
    }

    /// A queue configured by `layer` in front of `inner`, and the worker
    /// to run (spawn it, or poll it yourself).
    ///
    /// Every call then goes through the worker: callers do not call the
    /// inner service themselves, so it need not be `Send`.
    pub fn pair<S>(inner: S, layer: &BackpressureLayer) -> (Self, Worker<S>)
    where
        S: Service<Event, Response = R>,
        S::Error: Into<BoxError>,
    {
        Backpressure::build(Arc::new(Mutex::new(inner)), None, layer)
    }

    fn build<S>(
        inner: Arc<Mutex<S>>,
        direct: Option<Arc<Mutex<dyn Direct<R>>>>,
        layer: &BackpressureLayer,
    ) -> (Self, Worker<S>)
    where
        S: Service<Event, Response = R>,
    {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::with_capacity(layer.capacity.min(1024)),
                worker: None,
                closed: false,
            }),
            stopped: AtomicBool::new(false),
            counters: layer.counters.clone(),
            metrics: QueueMetrics::new(&layer.name, layer.capacity),
            slots: (layer.overflow == Overflow::Block).then(|| Slots {
                taken: AtomicUsize::new(0),
                capacity: layer.capacity,
                room: Arc::new(Notify::new()),
            }),
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            concurrency: layer.concurrency,
            worker_waits: AtomicBool::new(false),
        });
        let worker = Worker::new(inner, shared.clone());
        let svc = Backpressure {
            handle: Arc::new(Handle {
                shared,
                overflow: layer.overflow,
                direct,
            }),
            reserved: false,
            waiting: None,
        };
        (svc, worker)
    }

    /// A handle on the counters.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            counters: self.handle.shared.counters.clone(),
        }
    }
}

impl<R> Clone for Backpressure<R> {
    fn clone(&self) -> Self {
        Backpressure {
            handle: self.handle.clone(),
            reserved: false,
            waiting: None,
        }
    }
}

impl<R> Drop for Backpressure<R> {
    fn drop(&mut self) {
        if self.reserved {
            self.handle.shared.release_slot();
        }
    }
}

impl<R> fmt::Debug for Backpressure<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backpressure")
            .field("overflow", &self.handle.overflow)
            .field("stats", &self.handle().stats())
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl<R> Service<Event> for Backpressure<R> {
    type Response = R;
    type Error = Error;
    type Future = ResponseFuture<R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.handle.shared.stopped.load(Ordering::Acquire) {
            return Poll::Ready(Err(Error::closed("backpressure worker stopped")));
        }
        if let Some(slots) = &self.handle.shared.slots
            && !self.reserved
        {
            loop {
                if let Some(waiting) = &mut self.waiting {
                    ready!(waiting.as_mut().poll(cx));
                    self.waiting = None;
                }
                if self.handle.shared.stopped.load(Ordering::Acquire) {
                    return Poll::Ready(Err(Error::closed("backpressure worker stopped")));
                }
                if slots.try_reserve() {
                    break;
                }
                // Registered before trying again, so that a slot freed in
                // between is not missed.
                let mut waiting = Box::pin(slots.room.clone().notified_owned());
                waiting.as_mut().enable();
                if slots.try_reserve() {
                    break;
                }
                self.waiting = Some(waiting);
            }
            self.reserved = true;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let shared = &self.handle.shared;
        let counters = &shared.counters;
        let reserved = std::mem::take(&mut self.reserved);
        if shared.slots.is_some() && !reserved {
            return ResponseFuture::failed(
                Error::new(ErrorKind::Other, "backpressure called before poll_ready").with_event(event),
            );
        }
        // Nothing queued ahead and room to run: the caller calls the
        // service itself, without the hop to the worker and back.
        let event = match self.call_direct(event) {
            Ok(future) => {
                if reserved {
                    shared.release_slot();
                }
                return future;
            }
            Err(event) => event,
        };
        let (tx, rx) = reply();
        let job = Job {
            event: event.clone(),
            reply: tx,
            span: tracing::Span::current(),
        };
        let mut queue = shared.lock();
        if shared.stopped.load(Ordering::Acquire) {
            drop(queue);
            if reserved {
                shared.release_slot();
            }
            return ResponseFuture::failed(Error::closed("backpressure worker stopped").with_event(event));
        }
        let mut evicted = None;
        if queue.jobs.len() >= counters.capacity {
            match self.handle.overflow {
                // The semaphore bounds the queue; this is unreachable in
                // practice, and refusing is the safe answer.
                Overflow::Block | Overflow::DropNewest => {
                    drop(queue);
                    if reserved {
                        shared.release_slot();
                    }
                    shared.dropped_newest();
                    return ResponseFuture::failed(
                        dropped("queue full, newest event dropped").with_event(event),
                    );
                }
                Overflow::DropOldest => evicted = queue.jobs.pop_front(),
            }
        }
        queue.jobs.push_back(job);
        shared.queued.store(queue.jobs.len(), Ordering::Release);
        shared.set_depth(queue.jobs.len());
        let waker = queue.worker.take();
        drop(queue);
        if let Some(old) = evicted {
            if old.reply.is_closed() {
                // No one to tell: it would never have been sent anyway.
                shared.abandoned(1);
            } else {
                shared.dropped_oldest();
                old.reply.send(Err(
                    dropped("queue full, oldest event evicted").with_event(old.event)
                ));
            }
        }
        if let Some(w) = waker {
            w.wake();
        }
        ResponseFuture::queued(rx, event)
    }
}

impl<R> Backpressure<R> {
    /// Calls the inner service from the caller's task if nothing is queued
    /// (so no event is overtaken), fewer than `concurrency` calls run and
    /// the service is ready now; gives the event back otherwise.
    fn call_direct(&self, event: Event) -> Result<ResponseFuture<R>, Event> {
        let shared = &self.handle.shared;
        let Some(direct) = &self.handle.direct else {
            return Err(event);
        };
        if shared.queued.load(Ordering::Acquire) != 0 || !shared.try_start() {
            return Err(event);
        }
        // The worker holds the lock from `poll_ready` to `call`: a caller
        // cannot take the readiness it waited for.
        let called = direct.lock().unwrap_or_else(|e| e.into_inner()).try_call(event);
        match called {
            Ok(future) => Ok(ResponseFuture::direct(future, Running(shared.clone()))),
            Err(event) => {
                shared.finish();
                Err(event)
            }
        }
    }
}

/// Counts a caller's own call as running until its future finishes or is
/// dropped.
pub(crate) struct Running<R>(Arc<Shared<R>>);

impl<R> Drop for Running<R> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

fn dropped(message: &'static str) -> Error {
    Error::new(ErrorKind::Dropped, message)
}
