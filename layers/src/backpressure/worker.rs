//! The task that feeds queued events to the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use futures_util::StreamExt as _;
use futures_util::future::OptionFuture;
use futures_util::stream::FuturesUnordered;
use pin_project_lite::pin_project;
use tower::Service;
use watchtower::reply::Filled;
use watchtower::{BoxError, Error, Event};

use super::shared::{Reply, Shared};

pin_project! {
    /// Drives the inner service of a [`Backpressure`](super::Backpressure):
    /// takes queued events in order, at most `concurrency` in flight, and
    /// answers each caller. Resolves when every handle is dropped and the
    /// queue and in-flight calls are drained.
    ///
    /// [`Backpressure::new`](super::Backpressure::new) spawns it; run it
    /// yourself with [`Backpressure::pair`](super::Backpressure::pair).
    #[must_use = "the worker does nothing unless polled"]
    #[project = WorkerProjection]
    pub struct Worker<S>
    where
        S: Service<Event>,
    {
        // Shared with callers that call it themselves; locked from
        // `poll_ready` to `call`.
        inner: Arc<Mutex<S>>,
        shared: Arc<Shared<S::Response>>,
        in_flight: FuturesUnordered<Slot<S::Future, S::Response>>,
        // The allocation of the last call that finished at once, reused for
        // the next one.
        spare: Option<Slot<S::Future, S::Response>>,
        // Answers given in this poll, whose callers are woken at its end.
        filled: Vec<Filled<Result<S::Response, Error>>>,
    }

    impl<S> PinnedDrop for Worker<S>
    where
        S: Service<Event>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Whatever is still queued gets an answer carrying its event.
            let jobs: Vec<_> = {
                let mut queue = this.shared.lock();
                this.shared.stop();
                this.shared.queued.store(0, Ordering::Release);
                queue.jobs.drain(..).collect()
            };
            // Calls still in flight are dropped with the worker.
            for _ in 0..this.in_flight.len() {
                this.shared.finish();
            }
            this.shared.set_depth(0);
            for job in jobs {
                this.shared.release_slot();
                let err = Error::closed("backpressure worker stopped").with_event(job.event);
                job.reply.send(Err(err));
            }
        }
    }
}

impl<S: Service<Event>> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("in_flight", &self.in_flight.len())
            .field("concurrency", &self.shared.concurrency)
            .finish_non_exhaustive()
    }
}

impl<S: Service<Event>> Worker<S> {
    pub(crate) fn new(inner: Arc<Mutex<S>>, shared: Arc<Shared<S::Response>>) -> Self {
        Worker {
            inner,
            shared,
            in_flight: FuturesUnordered::new(),
            spare: None,
            filled: Vec::new(),
        }
    }
}

/// Answers the worker gathers before it wakes their callers within one
/// long poll.
const WAKE_BATCH: usize = 64;

/// A call in a reusable allocation.
type Slot<F, R> = Pin<Box<OptionFuture<Call<F, R>>>>;

pin_project! {
    struct Call<F, R> {
        #[pin]
        future: F,
        reply: Option<Reply<R>>,
    }
}

impl<F, R, E> Future for Call<F, R>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    /// The answer, filled in; its caller is woken when it is dropped.
    type Output = Option<Filled<Result<R, Error>>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx)).map_err(|e| Error::from_boxed(e.into()));
        // A caller that stopped waiting has chosen not to know.
        Poll::Ready(this.reply.take().map(|reply| reply.fill(result)))
    }
}

impl<S> Future for Worker<S>
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let result = drive(&mut this, cx);
        // Every answer of this poll is in: now wake their callers, once
        // each, rather than one at a time while the rest are filled in.
        this.filled.clear();
        result
    }
}

/// The worker's loop: answers completed calls and starts queued ones until
/// it has to wait. Answers go into `filled`, for the caller to wake.
fn drive<S>(this: &mut WorkerProjection<'_, S>, cx: &mut Context<'_>) -> Poll<()>
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
{
    loop {
        // A long poll does not keep its first callers waiting for all the
        // rest.
        if this.filled.len() >= WAKE_BATCH {
            this.filled.clear();
        }
        // An empty set has nothing to poll (and polling it would register
        // the waker for nothing).
        while !this.in_flight.is_empty() {
            match this.in_flight.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => {
                    this.shared.finish();
                    this.filled.extend(done.flatten());
                }
                _ => break,
            }
        }
        {
            let mut queue = this.shared.lock();
            if queue.jobs.is_empty() {
                if queue.closed && this.in_flight.is_empty() {
                    this.shared.stop();
                    return Poll::Ready(());
                }
                queue.worker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        if !this.shared.try_start() {
            // Every call that may run is running. The worker's own calls
            // wake it through the in-flight set, callers' own through
            // `finish`.
            this.shared.lock().worker = Some(cx.waker().clone());
            this.shared.worker_waits.store(true, Ordering::SeqCst);
            if !this.shared.try_start() {
                return Poll::Pending;
            }
            this.shared.worker_waits.store(false, Ordering::SeqCst);
        }
        let step = {
            let mut inner = this.inner.lock().unwrap_or_else(|e| e.into_inner());
            // Wait for the service before taking a job, so that jobs stay
            // queued (and can be evicted under `DropOldest`) meanwhile.
            let ready = match inner.poll_ready(cx) {
                Poll::Pending => {
                    drop(inner);
                    this.shared.finish();
                    return Poll::Pending;
                }
                Poll::Ready(r) => r,
            };
            let job = {
                let mut queue = this.shared.lock();
                // A job whose caller has stopped waiting is never started:
                // the caller has been answered already (a timeout above, a
                // retry that gave up), and sending the event now would
                // deliver what it may have retried or dead-lettered. A
                // caller that leaves after this check leaves a call that
                // has started, which is as ambiguous as any timeout.
                let mut abandoned = 0;
                let job = loop {
                    match queue.jobs.pop_front() {
                        Some(job) if job.reply.is_closed() => abandoned += 1,
                        job => break job,
                    }
                };
                this.shared.queued.store(queue.jobs.len(), Ordering::Release);
                this.shared.set_depth(queue.jobs.len());
                drop(queue);
                if abandoned > 0 {
                    this.shared.abandoned(abandoned);
                    for _ in 0..abandoned {
                        this.shared.release_slot();
                    }
                }
                job
            };
            match (job, ready) {
                // Evicted meanwhile: the readiness stays for the next job.
                (None, _) => None,
                (Some(job), Ok(())) => {
                    let _entered = job.span.enter();
                    Some(Ok((inner.call(job.event), job.reply)))
                }
                (Some(job), Err(e)) => {
                    let err = Error::from_boxed(e.into()).with_event(job.event);
                    Some(Err((err, job.reply)))
                }
            }
        };
        let (future, reply) = match step {
            None => {
                this.shared.finish();
                continue;
            }
            Some(Err((err, reply))) => {
                this.shared.release_slot();
                this.shared.finish();
                this.filled.push(reply.fill(Err(err)));
                continue;
            }
            Some(Ok(call)) => call,
        };
        this.shared.release_slot();
        let mut call = this
            .spare
            .take()
            .unwrap_or_else(|| Box::pin(OptionFuture::from(None)));
        call.as_mut().set(
            Some(Call {
                future,
                reply: Some(reply),
            })
            .into(),
        );
        // Many calls finish at once (an in-memory publish, a buffered
        // write): answer those here, and keep only the rest in the
        // in-flight set.
        match call.as_mut().poll(cx) {
            Poll::Pending => this.in_flight.push(call),
            Poll::Ready(done) => {
                this.shared.finish();
                this.filled.extend(done.flatten());
                call.as_mut().set(None.into());
                *this.spare = Some(call);
            }
        }
    }
}
