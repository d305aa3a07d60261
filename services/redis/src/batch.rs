//! Gathers concurrent `XADD`s into batches.
//!
//! Each command sent on its own costs the connection a write and a
//! wake-up, and the server a read and a write; a batch of many costs about
//! as much as one. Callers put their checked event in a [`Queue`]; one task
//! per publisher takes what has gathered and sends it as one batch, on the
//! publisher's own connection ([`crate::link`]) or, over TLS, as one
//! pipeline on the `redis` crate's multiplexed connection
//! ([`batch_loop`]). Both take batches by the same rules:
//!
//! * with nothing on the wire, what is queued goes out at once (a lone
//!   `XADD` after a quiet spell waits for nobody);
//! * while batches are on the wire, the next one goes out once
//!   [`GATHER`] commands have queued up (so a steady stream of callers
//!   keeps two or more batches of a useful size in flight), or when a
//!   batch on the wire is fully answered, whatever has gathered by then;
//! * what has gathered is shared out over the batches that may still go
//!   on the wire (at least [`GATHER`] commands each, at most
//!   [`MAX_BATCH`]): 256 queued callers make four batches of 64, not one
//!   of 256, so that Redis works on one batch while the client reads the
//!   replies of another and fills the next.
//!
//! No timer is involved: a command waits at most for the batches already
//! on the wire. Callers wake the task only when their command is the first
//! in the queue or brings it to [`GATHER`], not for every command.
//! Concurrency is bounded by the queue's room: a caller reserves a place
//! before it queues a command, and the task frees the places of answered
//! commands at once.
//!
//! Replies go back through a [`watchtower::reply`] per command. The task fills in all
//! the replies it has before it wakes any caller, so that callers polled
//! together (a `FuturesUnordered`, a `buffer_unordered`) are woken once per
//! batch and find all their replies, rather than once per reply.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use crate::conn::Conn;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use redis::Value;
use redis::cluster_routing::Slot;
use tokio::sync::{Semaphore, SemaphorePermit};
use watchtower::reply::Replier;
use watchtower::{Error, ErrorKind, Event};

use crate::error::{ReplicasNotAcknowledged, from_redis};
use crate::publisher::{LinkState, MaxLen, ReplicaAcks, xadd};
use crate::wire::{ContentMode, shared_string};

/// Pipelines on the wire at once.
const MAX_IN_FLIGHT: usize = 4;

/// Commands in one pipeline at most.
const MAX_BATCH: usize = 512;

/// Commands that make a new pipeline worth sending while others are still
/// on the wire.
const GATHER: usize = 32;

/// One event to `XADD` (checked) and where the reply goes. Its place in
/// the queue is freed by the task once the reply is in.
///
/// The task writes the stream key from the prefix and the event's topic
/// itself: a key shared with the callers would have its reference count
/// passed between threads for every event.
pub(crate) struct Request {
    pub(crate) event: Event,
    pub(crate) reply: Replier<Answer>,
}

/// What a caller is told: the entry id of its `XADD`, or why there is none.
pub(crate) type Answer = Result<Arc<str>, Error>;

/// What [`Queue::without_connection`] found.
pub(crate) enum Idle {
    /// Requests wait.
    Requests,
    /// None yet.
    Empty,
    /// None, and every publisher is gone.
    Closed,
}

/// What [`Queue::take`] found.
pub(crate) enum Take {
    /// A batch to send now.
    Batch(Vec<Request>),
    /// Nothing to send yet.
    Wait,
    /// Every publisher is gone and nothing is left: the task may end.
    Done,
}

/// The commands waiting for the next pipeline.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    /// The sending task.
    task: AtomicWaker,
    /// One permit per place for a command: a caller takes one (and
    /// forgets it) before it queues a command; the task adds a pipeline's
    /// permits back at once when its replies are in.
    pub(crate) room: Arc<Semaphore>,
    /// Requests dropped unsent because their caller stopped waiting.
    abandoned: AtomicU64,
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
    /// A queue with `room` places (at least one).
    pub(crate) fn new(room: usize) -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::new(QueueState {
                requests: Vec::new(),
                in_flight: 0,
                closed: false,
                stopped: false,
            }),
            task: AtomicWaker::new(),
            room: Arc::new(Semaphore::new(room.max(1))),
            abandoned: AtomicU64::new(0),
        })
    }

    /// Requests dropped unsent so far because their caller had stopped
    /// waiting.
    pub(crate) fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::Relaxed)
    }

    /// Drops the requests of `batch` whose caller has stopped waiting (its
    /// future dropped: a timeout above, a cancelled task), counting them:
    /// sending them would store an event its caller may already have
    /// retried or dead-lettered. Returns how many it dropped; their places
    /// are the caller's to free.
    pub(crate) fn drop_abandoned(&self, batch: &mut Vec<Request>) -> usize {
        let before = batch.len();
        batch.retain(|request| !request.reply.is_closed());
        let dropped = before - batch.len();
        if dropped > 0 {
            self.abandoned.fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::debug!(dropped, "XADDs not sent: their callers stopped waiting");
        }
        dropped
    }

    /// Takes a place for one command if there is one.
    pub(crate) fn try_reserve(&self) -> bool {
        self.room.try_acquire().map(SemaphorePermit::forget).is_ok()
    }

    /// Frees `n` places.
    pub(crate) fn release(&self, n: usize) {
        self.room.add_permits(n);
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

    /// The next batch to send, by the rules above, while `in_flight`
    /// batches await their replies.
    pub(crate) fn take(&self, in_flight: usize) -> Take {
        let mut state = self.lock();
        state.in_flight = in_flight;
        let queued = state.requests.len();
        let send = queued > 0 && (in_flight == 0 || (in_flight < MAX_IN_FLIGHT && queued >= GATHER));
        if !send {
            return if state.closed && queued == 0 && in_flight == 0 {
                Take::Done
            } else {
                Take::Wait
            };
        }
        // What has gathered is shared out over the free places on the
        // wire, so that the server works on one batch while the replies of
        // another come back and the next one fills.
        let free = MAX_IN_FLIGHT - in_flight;
        let size = queued.div_ceil(free).clamp(GATHER.min(queued), MAX_BATCH);
        state.in_flight += 1;
        Take::Batch(if size >= queued {
            std::mem::replace(&mut state.requests, Vec::with_capacity(GATHER))
        } else {
            state.requests.drain(..size).collect()
        })
    }

    /// With no connection (so nothing on the wire): whether requests wait
    /// for one. The next request wakes the task.
    pub(crate) fn without_connection(&self) -> Idle {
        let mut state = self.lock();
        state.in_flight = 0;
        if !state.requests.is_empty() {
            Idle::Requests
        } else if state.closed {
            Idle::Closed
        } else {
            Idle::Empty
        }
    }

    /// Takes every waiting request, to answer them all at once.
    pub(crate) fn take_all(&self) -> Vec<Request> {
        std::mem::take(&mut self.lock().requests)
    }

    /// The sending task is to be woken at `cx` when requests come.
    pub(crate) fn register(&self, cx: &std::task::Context<'_>) {
        self.task.register(cx.waker());
    }

    /// No more requests will come: the task sends what is queued and ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.task.wake();
    }
}

/// Marks the queue stopped when the sending task ends or is dropped (its
/// runtime shut down, even before the task first ran), so that queued
/// callers and later ones get an error rather than wait forever.
pub(crate) struct Stopped(pub(crate) Arc<Queue>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let left = {
            let mut state = self.0.lock();
            state.stopped = true;
            std::mem::take(&mut state.requests)
        };
        // Dropping a request's replier tells its caller; a publisher
        // waiting for room learns that the queue is closed.
        drop(left);
        self.0.room.close();
    }
}

/// The places of a pipeline's commands, freed when it is done or dropped.
struct Places {
    queue: Arc<Queue>,
    n: usize,
}

impl Drop for Places {
    fn drop(&mut self) {
        self.queue.release(self.n);
    }
}

/// Sends the queued requests in pipelines until the queue is closed and
/// empty and nothing is on the wire.
///
/// `stopped` is made by the spawner, so that a task dropped before its
/// first poll still lets its callers know.
pub(crate) async fn batch_loop(conn: Conn, health: Arc<LinkState>, stopped: Stopped, target: Target) {
    let queue = &stopped.0;
    let mut in_flight = FuturesUnordered::new();
    poll_fn(|cx| {
        loop {
            // Completed pipelines first: they free room on the wire.
            while let Poll::Ready(Some(())) = in_flight.poll_next_unpin(cx) {}
            queue.register(cx);
            let batch = match queue.take(in_flight.len()) {
                Take::Batch(batch) => batch,
                Take::Wait => return Poll::Pending,
                Take::Done => return Poll::Ready(()),
            };
            let places = Places {
                queue: queue.clone(),
                n: batch.len(),
            };
            in_flight.push(send(conn.clone(), health.clone(), batch, target.clone(), places));
        }
    })
    .await;
}

/// Where a publisher's `XADD`s go: the stream `prefix` + the event's
/// topic, trimmed as `max_len` says, written in `mode`.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) prefix: Arc<str>,
    /// Whether the topic is the key's hash tag (`prefix{topic}`, on a
    /// Redis Cluster).
    pub(crate) hash_tag: bool,
    pub(crate) max_len: Option<MaxLen>,
    pub(crate) mode: ContentMode,
    /// `WAIT` for replicas after each master's share of a batch.
    pub(crate) replicas: Option<ReplicaAcks>,
}

async fn send(
    mut conn: Conn,
    health: Arc<LinkState>,
    mut batch: Vec<Request>,
    target: Target,
    places: Places,
) {
    places.queue.drop_abandoned(&mut batch);
    if batch.is_empty() {
        return;
    }
    let keyed = batch
        .iter()
        .map(|request| (xadd(&target, &request.event), wait_slot(&target, &request.event)));
    let (mut pipe, places_of) = with_waits(keyed, &target);
    // Each command's server error becomes its own reply, for its caller.
    pipe.ignore_errors();
    let result = pipe
        .query_async::<Vec<Value>>(&mut conn)
        .await
        .map_err(|e| from_redis(e, "XADD pipeline"));
    health.observe(&result);
    let filled: Vec<_> = match result {
        Ok(replies) => batch
            .into_iter()
            .zip(places_of)
            .map(|(Request { event, reply }, places)| {
                reply.fill(answer_waited(&replies, places, &target, &event))
            })
            .collect(),
        Err(e) => batch
            .into_iter()
            .map(|request| request.reply.fill(Err(Error::new(e.kind(), e.message()))))
            .collect(),
    };
    // Room first, so that woken callers find it; then every caller.
    drop(places);
    drop(filled);
}

/// Where the replies of one `XADD` of a pipeline are: its own, and that
/// of the `WAIT` after it, if the publisher waits for replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyPlaces {
    xadd: usize,
    wait: Option<usize>,
}

/// The slot whose `WAIT` covers the `XADD` of `event`: its stream's on a
/// cluster when the publisher waits for replicas, else none (one `WAIT`,
/// if any, for the whole pipeline).
pub(crate) fn wait_slot(target: &Target, event: &Event) -> Option<Slot> {
    (target.replicas.is_some() && target.hash_tag).then(|| Slot::for_key(stream_of(target, event)))
}

/// The pipeline of `commands` (each with its [`wait_slot`]) and where
/// each one's replies will be. If `target` waits for replicas, a `WAIT`
/// follows the last command of each slot (the only one on a single
/// Redis): on a cluster the pipeline is split by slot, a `WAIT` going with
/// the command before it, so each master is asked about the writes it
/// took, on the connection that sent them. The commands keep their order.
pub(crate) fn with_waits(
    commands: impl Iterator<Item = (redis::Cmd, Option<Slot>)>,
    target: &Target,
) -> (redis::Pipeline, Vec<ReplyPlaces>) {
    let commands: Vec<(redis::Cmd, Option<Slot>)> = commands.collect();
    let mut last: HashMap<Option<Slot>, usize> = HashMap::new();
    if target.replicas.is_some() {
        for (i, (_, slot)) in commands.iter().enumerate() {
            last.insert(*slot, i);
        }
    }
    let mut pipe = redis::Pipeline::with_capacity(commands.len() + last.len());
    let mut places = Vec::with_capacity(commands.len());
    let mut waits: HashMap<Option<Slot>, usize> = HashMap::new();
    let mut at = 0;
    for (i, (cmd, slot)) in commands.into_iter().enumerate() {
        pipe.add_command(cmd);
        places.push((at, slot));
        at += 1;
        if let Some(acks) = target.replicas
            && last.get(&slot) == Some(&i)
        {
            pipe.add_command(acks.command());
            waits.insert(slot, at);
            at += 1;
        }
    }
    let places = places
        .into_iter()
        .map(|(xadd, slot)| ReplyPlaces {
            xadd,
            wait: waits.get(&slot).copied(),
        })
        .collect();
    (pipe, places)
}

/// What the caller of the `XADD` of `event` is told, from the replies of
/// a pipeline made by [`with_waits`].
pub(crate) fn answer_waited(
    replies: &[Value],
    places: ReplyPlaces,
    target: &Target,
    event: &Event,
) -> Answer {
    let id = match replies.get(places.xadd) {
        Some(value) => answer(value, &target.prefix, event)?,
        None => return Err(Error::decode("XADD pipeline: missing reply")),
    };
    match (target.replicas, places.wait) {
        (Some(acks), Some(wait)) => replicated(target, event, id, acks.replicas, replies.get(wait)),
        _ => Ok(id),
    }
}

/// What the caller of an `XADD` stored as `id` is told once its master
/// answered the `WAIT` after it with `acknowledged`.
fn replicated(
    target: &Target,
    event: &Event,
    id: Arc<str>,
    wanted: u32,
    acknowledged: Option<&Value>,
) -> Answer {
    match acknowledged {
        Some(Value::Int(n)) if *n >= i64::from(wanted) => Ok(id),
        Some(Value::Int(n)) => Err(ReplicasNotAcknowledged {
            stream: stream_of(target, event).into(),
            entry_id: id,
            acknowledged: u32::try_from(*n).unwrap_or(0),
            wanted,
        }
        .into_error()),
        Some(Value::ServerError(e)) => Err(Error::new(
            ErrorKind::Rejected,
            format!(
                "WAIT after the XADD to {:?}: {} {}",
                stream_of(target, event),
                e.code(),
                e.details().unwrap_or_default()
            ),
        )),
        _ => Err(Error::decode("WAIT did not answer with a count of replicas")),
    }
}

/// The stream key of `event` under `target`.
fn stream_of(target: &Target, event: &Event) -> String {
    if target.hash_tag {
        format!("{}{{{}}}", target.prefix, event.topic())
    } else {
        format!("{}{}", target.prefix, event.topic())
    }
}

/// What the caller of the `XADD` of `event` to the stream `prefix` + its
/// topic is told for `reply`.
pub(crate) fn answer(reply: &Value, prefix: &str, event: &Event) -> Answer {
    match reply {
        Value::ServerError(e) => Err(refused(
            prefix,
            event,
            &format!("{} {}", e.code(), e.details().unwrap_or_default()),
        )),
        other => shared_string(other).ok_or_else(|| Error::decode("XADD did not answer with an entry id")),
    }
}

/// The server's refusal of one `XADD`: an error for its caller alone,
/// naming the stream. What passes ([`ErrorKind::Throttled`]: a server
/// still loading its data, busy with a script, or a replica that cannot
/// take writes during a failover) is retryable, and so is `OOM` (a full
/// server, as a broker's full queue); the rest (`WRONGTYPE`, `ERR`, ...)
/// is [`ErrorKind::Rejected`] and not retryable.
pub(crate) fn refused(prefix: &str, event: &Event, line: &str) -> Error {
    let message = format!("XADD to \"{prefix}{}\": {line}", event.topic());
    match line.split(' ').next().unwrap_or_default() {
        "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN" | "READONLY" => {
            Error::new(ErrorKind::Throttled, message)
        }
        "OOM" => Error::new(ErrorKind::Rejected, message).with_retryable(true),
        _ => Error::new(ErrorKind::Rejected, message),
    }
}

#[cfg(test)]
mod tests {
    use tokio_test::task::spawn;
    use tokio_test::{assert_pending, assert_ready};
    use tokio_util::sync::PollSemaphore;
    use watchtower::{ErrorKind, Event};

    use super::{Queue, refused};

    #[test]
    fn passing_refusals_are_retryable_and_the_rest_are_not() {
        let event = Event::new("orders.created", serde_json::json!({}));
        for (line, kind, retryable) in [
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value",
                ErrorKind::Rejected,
                false,
            ),
            ("ERR Invalid stream ID", ErrorKind::Rejected, false),
            (
                "LOADING Redis is loading the dataset in memory",
                ErrorKind::Throttled,
                true,
            ),
            ("BUSY Redis is busy running a script", ErrorKind::Throttled, true),
            (
                "READONLY You can't write against a read only replica.",
                ErrorKind::Throttled,
                true,
            ),
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                ErrorKind::Rejected,
                true,
            ),
        ] {
            let err = refused("wt:", &event, line);
            assert_eq!((err.kind(), err.is_retryable()), (kind, retryable), "{line}");
            assert_eq!(err.message(), format!("XADD to \"wt:orders.created\": {line}"));
        }
    }

    #[test]
    fn a_wait_follows_the_last_xadd_of_each_slot_and_the_order_holds() {
        use std::time::Duration;

        use redis::cluster_routing::Slot;

        use super::{ReplyPlaces, Target, wait_slot, with_waits};
        use crate::publisher::{ReplicaAcks, xadd};
        use crate::wire::ContentMode;

        let target = Target {
            prefix: "p:".into(),
            hash_tag: true,
            max_len: None,
            mode: ContentMode::Structured,
            replicas: Some(ReplicaAcks {
                replicas: 1,
                timeout: Duration::from_millis(100),
            }),
        };
        let events = ["a", "b", "a"].map(|topic| Event::new(topic, serde_json::json!({})));
        assert_ne!(wait_slot(&target, &events[0]), wait_slot(&target, &events[1]));
        assert_eq!(wait_slot(&target, &events[0]), Some(Slot::for_key("p:{a}")));
        let (pipe, places) = with_waits(
            events.iter().map(|e| (xadd(&target, e), wait_slot(&target, e))),
            &target,
        );
        let names: Vec<String> = pipe
            .cmd_iter()
            .map(|cmd| match cmd.args_iter().next() {
                Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(names, ["XADD", "XADD", "WAIT", "XADD", "WAIT"]);
        let place = |xadd, wait| ReplyPlaces {
            xadd,
            wait: Some(wait),
        };
        assert_eq!(places, [place(0, 4), place(1, 2), place(3, 4)]);

        // Without waiting, the pipeline is the XADDs alone.
        let plain = Target {
            replicas: None,
            ..target
        };
        let (pipe, places) = with_waits(
            events.iter().map(|e| (xadd(&plain, e), wait_slot(&plain, e))),
            &plain,
        );
        assert_eq!(pipe.cmd_iter().count(), 3);
        assert!(places.iter().all(|p| p.wait.is_none()));
    }

    #[test]
    fn a_full_queue_wakes_its_waiters_when_places_are_freed() {
        let queue = Queue::new(2);
        assert!(queue.try_reserve());
        assert!(queue.try_reserve());
        assert!(!queue.try_reserve());
        let mut room = PollSemaphore::new(queue.room.clone());
        let mut waiter = spawn(std::future::poll_fn(|cx| room.poll_acquire(cx)));
        assert_pending!(waiter.poll());
        queue.release(2);
        assert!(waiter.is_woken());
        assert_ready!(waiter.poll()).expect("a place").forget();
        assert!(queue.try_reserve());
        assert!(!queue.try_reserve());
    }
}
