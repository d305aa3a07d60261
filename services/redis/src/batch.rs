//! Gathers concurrent `XADD`s into pipelines.
//!
//! Each command sent on its own costs the multiplexed connection a message,
//! a response slot and a wake-up, and the server a read and a write; a
//! pipeline of many costs about as much as one. Callers put their encoded
//! command in a [`Queue`]; one task per publisher takes what has gathered
//! and sends it as one pipeline:
//!
//! * with nothing on the wire, whatever is queued goes out at once (a lone
//!   `XADD` after a quiet spell waits for nobody);
//! * while pipelines are on the wire, the next one goes out once
//!   [`GATHER`] commands have queued up (so a steady stream of callers
//!   keeps two or more batches of a useful size in flight), or when a
//!   pipeline on the wire completes, whatever has gathered by then.
//!
//! No timer is involved: a command waits at most for the pipelines already
//! on the wire. Callers wake the task only when their command is the first
//! in the queue or brings it to [`GATHER`], not for every command.
//! Concurrency is bounded by the publisher's slots (one per command queued
//! or on the wire).

use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use redis::aio::ConnectionManager;
use redis::{Cmd, Value};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use watchtower::{Error, ErrorKind};

use crate::error::from_redis;
use crate::publisher::Health;

/// Pipelines on the wire at once.
const MAX_IN_FLIGHT: usize = 4;

/// Commands in one pipeline at most.
const MAX_BATCH: usize = 512;

/// Commands that make a new pipeline worth sending while others are still
/// on the wire.
const GATHER: usize = 32;

/// One command, where its reply goes, and its slot in the publisher's
/// queue, given back once the reply is in.
pub(crate) struct Request {
    pub(crate) cmd: Cmd,
    pub(crate) done: oneshot::Sender<Result<Value, Error>>,
    pub(crate) slot: OwnedSemaphorePermit,
}

/// The commands waiting for the next pipeline.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    /// The sending task.
    task: AtomicWaker,
}

struct QueueState {
    requests: Vec<Request>,
    /// Pipelines on the wire, as the sending task last counted them.
    in_flight: usize,
    /// Every publisher is gone: send what is left, then stop.
    closed: bool,
    /// The sending task is gone: nothing more can be sent.
    stopped: bool,
}

impl Queue {
    pub(crate) fn new() -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::new(QueueState {
                requests: Vec::new(),
                in_flight: 0,
                closed: false,
                stopped: false,
            }),
            task: AtomicWaker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding the lock cannot leave the state half
        // updated: every change is a single push, take or flag.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `request`, or gives it back if the sending task is gone.
    pub(crate) fn push(&self, request: Request) -> Result<(), Request> {
        let wake = {
            let mut state = self.lock();
            if state.stopped {
                return Err(request);
            }
            state.requests.push(request);
            let queued = state.requests.len();
            // Only when the task has something to send: a pipeline on the
            // wire wakes it anyway when it completes.
            (queued == 1 && state.in_flight == 0) || (queued == GATHER && state.in_flight < MAX_IN_FLIGHT)
        };
        if wake {
            self.task.wake();
        }
        Ok(())
    }

    /// No more requests will come: the task sends what is queued and ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.task.wake();
    }
}

/// Marks the queue stopped when the sending task ends or is dropped (its
/// runtime shut down), so that queued callers and later ones get an error
/// rather than wait forever.
struct Stopped(Arc<Queue>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let left = {
            let mut state = self.0.lock();
            state.stopped = true;
            std::mem::take(&mut state.requests)
        };
        // Dropping a request's reply sender tells its caller.
        drop(left);
    }
}

/// Sends the queued requests in pipelines until the queue is closed and
/// empty and nothing is on the wire.
pub(crate) async fn batch_loop(conn: ConnectionManager, health: Arc<Health>, queue: Arc<Queue>) {
    let stopped = Stopped(queue);
    let queue = &stopped.0;
    let mut in_flight = FuturesUnordered::new();
    poll_fn(|cx| {
        loop {
            // Completed pipelines first: they free room on the wire.
            while let Poll::Ready(Some(())) = in_flight.poll_next_unpin(cx) {}
            queue.task.register(cx.waker());
            let batch = {
                let mut state = queue.lock();
                state.in_flight = in_flight.len();
                let queued = state.requests.len();
                let send = queued > 0
                    && (in_flight.is_empty() || (in_flight.len() < MAX_IN_FLIGHT && queued >= GATHER));
                if !send {
                    if state.closed && queued == 0 && in_flight.is_empty() {
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
                state.in_flight += 1;
                if queued <= MAX_BATCH {
                    std::mem::replace(&mut state.requests, Vec::with_capacity(GATHER))
                } else {
                    state.requests.drain(..MAX_BATCH).collect()
                }
            };
            in_flight.push(send(conn.clone(), health.clone(), batch));
        }
    })
    .await;
}

async fn send(mut conn: ConnectionManager, health: Arc<Health>, batch: Vec<Request>) {
    if batch.len() == 1 {
        let Some(Request { cmd, done, slot }) = batch.into_iter().next() else {
            return;
        };
        let result = cmd
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| from_redis(e, "XADD"));
        health.observe(&result);
        drop(slot);
        let _ = done.send(result);
        return;
    }
    let mut pipe = redis::Pipeline::with_capacity(batch.len());
    // Each command's server error becomes its own reply, for its caller.
    pipe.ignore_errors();
    let mut waiters = Vec::with_capacity(batch.len());
    for Request { cmd, done, slot } in batch {
        pipe.add_command(cmd);
        waiters.push((done, slot));
    }
    let result = pipe
        .query_async::<Vec<Value>>(&mut conn)
        .await
        .map_err(|e| from_redis(e, "XADD pipeline"));
    health.observe(&result);
    match result {
        Ok(replies) => {
            let mut replies = replies.into_iter();
            for (done, slot) in waiters {
                drop(slot);
                let reply = replies
                    .next()
                    .ok_or_else(|| Error::decode("XADD pipeline: missing reply"));
                let _ = done.send(reply);
            }
        }
        Err(e) => {
            for (done, slot) in waiters {
                drop(slot);
                let _ = done.send(Err(Error::new(e.kind(), e.message())));
            }
        }
    }
}

/// A reply that is a server error becomes a [`ErrorKind::Rejected`] error.
pub(crate) fn server_error(reply: Value, key: &str) -> Result<Value, Error> {
    match reply {
        Value::ServerError(e) => Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "XADD to {key:?}: {} {}",
                e.code(),
                e.details().unwrap_or_default()
            ),
        )),
        other => Ok(other),
    }
}
