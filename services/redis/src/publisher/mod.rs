//! The publishing side: `XADD` to one stream per topic.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};

use crate::conn::Conn;
use redis::{Cmd, RedisWrite as _, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::PollSemaphore;
use tower_service::Service;
use watchtower::batch::{BatchFuture, BatchReceipts};
use watchtower::reply::reply;
use watchtower::trace::PublishTrace;
use watchtower::validate_topic;
use watchtower::{Error, ErrorKind, Event, Receipt, Transport};

use crate::batch::{Queue, Request, Stopped, Target, answer_waited, batch_loop, wait_slot, with_waits};
use crate::client::{RedisClient, ping};
use crate::config::RedisConfig;
use crate::conn::Backend;
use crate::error::from_redis;
use crate::link;
use crate::wire::{fields_size, write_fields};

mod delay;
mod future;
mod options;

pub use future::ResponseFuture;
use future::State;
pub(crate) use options::ReplicaAcks;
pub use options::{MaxLen, RedisPublisherOptions};

/// Stream keys remembered per topic, so that a busy topic's key is not
/// built again for every event.
const KEY_CACHE: usize = 256;

/// Connection state shared by a publisher and its clones.
#[derive(Debug)]
pub(crate) struct LinkState {
    connected: AtomicBool,
}

impl LinkState {
    pub(crate) fn new() -> Arc<LinkState> {
        Arc::new(LinkState {
            connected: AtomicBool::new(true),
        })
    }

    pub(crate) fn observe(&self, result: &Result<impl Sized, Error>) {
        match result {
            Ok(_) => self.connected.store(true, Ordering::Relaxed),
            Err(e) => self.failed(e),
        }
    }

    /// Marks the connection down if `error` says it is.
    pub(crate) fn failed(&self, error: &Error) {
        if matches!(error.kind(), ErrorKind::Connection | ErrorKind::Timeout) {
            self.connected.store(false, Ordering::Relaxed);
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Publishes events to Redis Streams: a `tower::Service<Event>` that
/// `XADD`s each event to the stream of its [topic](Event::topic) and
/// answers with a [`Receipt`] carrying the stream key and the entry id.
///
/// Made by [`RedisClient::publisher`] or
/// [`RedisClient::publisher_with`]. Clones share the publisher's
/// connections, and calls do not wait for each other. The `XADD`s of
/// `call` travel on a connection of the publisher's own, which one task
/// writes and reads (over `rediss://`, on the client's multiplexed
/// connection instead); `PING` and the [batches](RedisPublisher::batched)
/// use the client's multiplexed connection, which reconnects by itself.
///
/// # Batching
///
/// `call` checks the event and queues it for the publisher's connection
/// task, which sends what has queued up as **one batch** of up to 512
/// `XADD`s:
///
/// * with no batch on the wire, at once: a lone `XADD` after a quiet
///   spell waits for nobody;
/// * with batches on the wire (at most four), once 32 `XADD`s have
///   gathered, or else when a batch is fully answered, whatever has
///   gathered by then.
///
/// So the `XADD`s of concurrent callers (or of one caller with many calls
/// in flight) travel together: 64 callers keep about two batches of 32
/// going, and a busy publisher pays one write, one server read and one
/// wake-up per batch rather than per event. The task encodes each `XADD`
/// straight into its write buffer (no allocation per event), and fills in
/// all the replies that one read brings before it wakes any caller. There
/// is no timer: an `XADD` waits at most for the batches already on the
/// wire. While the connection holds, calls from one task reach the stream
/// in the order they were made.
///
/// Each caller gets its own result: the entry id of its own `XADD`, or the
/// server's error for that command alone (a `WRONGTYPE` for one stream
/// fails only the event that went there, as [`ErrorKind::Rejected`]; a
/// server that is loading its data, busy with a script or a read-only
/// replica answers [`ErrorKind::Throttled`], and `OOM` is a retryable
/// `Rejected`, so that a retry layer tries again). If
/// the connection fails, times out (no reply for
/// [`response_timeout`](RedisConfig::response_timeout)) or sends a reply
/// that is not RESP while `XADD`s are on the wire, every caller waiting on
/// it gets the [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] error
/// (with its event attached, for a retry or dead-letter layer); their
/// events may or may not have been stored. The next call connects again;
/// if that fails, the calls waiting for it get the error.
///
/// # Callers that stop waiting
///
/// A call whose caller has stopped waiting by the time its batch is
/// encoded (its future dropped: a `tower::timeout` above that fired, a
/// cancelled task) is not sent: its event is not stored, and
/// [`abandoned`](RedisPublisher::abandoned) counts it. Sending it would
/// store an event its caller has already been told failed, and may have
/// retried or dead-lettered. Once its `XADD` is on the wire, dropping the
/// future cannot withdraw it: the event may be stored all the same.
///
/// # Duplicates
///
/// A caller told [`ErrorKind::Timeout`] or [`ErrorKind::Connection`] (or
/// whose own timeout fired) cannot know whether its `XADD` was stored, and
/// Redis Streams has no deduplication: retrying it (a retry layer, a
/// dead-letter path replayed later) can store the event twice, under two
/// entry ids. Both entries carry the same event [`id`](Event::id), so a
/// consumer that must not act twice keeps the ids it has handled (for as
/// long as a retry can come) and skips one it has seen, or makes its
/// handler idempotent.
///
/// [`batched`](RedisPublisher::batched) sends a caller's own batch as one
/// pipeline, outside the queue.
///
/// # Readiness
///
/// `poll_ready` is ready while the connection works and the queue has
/// room. After a connection failure it sends a `PING` (a second one if the
/// first finds the multiplexed connection broken: that one reconnects) and
/// stays pending until the answer; if that fails too it returns the
/// [`ErrorKind::Connection`] error, and the next `poll_ready` tries again.
/// The queue holds [`max_pending`](RedisPublisherOptions::max_pending)
/// `XADD`s, counting those on the wire: when it is full, `poll_ready` waits
/// for replies to free a place.
///
/// # Example
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_redis::{MaxLen, RedisClient, RedisConfig, RedisPublisherOptions};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RedisClient::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// let mut publisher =
///     client.publisher_with(RedisPublisherOptions::new().max_len(MaxLen::Approx(100_000)))?;
/// let receipt = publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
/// println!("stored as {:?}", receipt.message_id);
/// # Ok(()) }
/// ```
pub struct RedisPublisher {
    /// Everything clones share, behind one reference count: a clone per
    /// call (as `tower`'s `oneshot` and retries make) costs one increment.
    shared: Arc<PublisherShared>,
    probe: Option<JoinHandle<Result<(), Error>>>,
    /// Waits for a place in the queue once none is free; made on first
    /// need, since most calls find a place at once.
    room: Option<PollSemaphore>,
    /// `poll_ready` took a place in the queue for the next `call`.
    reserved: bool,
}

impl Clone for RedisPublisher {
    fn clone(&self) -> Self {
        RedisPublisher {
            shared: self.shared.clone(),
            probe: None,
            room: None,
            reserved: false,
        }
    }
}

impl Drop for RedisPublisher {
    fn drop(&mut self) {
        if self.reserved {
            self.shared.queue.release(1);
        }
    }
}

struct PublisherShared {
    /// The commands waiting for the connection task; closed when the last
    /// publisher goes.
    queue: Arc<Queue>,
    /// The shared connection, for `PING` and
    /// [`RedisBatchPublisher`], and the configuration.
    client: RedisClient,
    /// Where and how events are written.
    target: Target,
    health: Arc<LinkState>,
    /// Stream keys by topic.
    keys: RwLock<HashMap<Box<str>, Arc<str>>>,
    /// Delayed events and their mover.
    delays: delay::Delays,
}

impl Drop for PublisherShared {
    fn drop(&mut self) {
        self.queue.close();
    }
}

impl fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("config", self.shared.client.config())
            .field("max_len", &self.shared.target.max_len)
            .field("content_mode", &self.shared.target.mode)
            .field("connected", &self.shared.health.is_connected())
            .finish_non_exhaustive()
    }
}

impl RedisPublisher {
    /// Passes an event on unless it asks for a later delivery time: then
    /// it goes to the sorted set of delayed events (see `delay.rs`), and
    /// the returned future answers when it is there. A time that has come
    /// is removed, and the event is published now.
    fn hold_if_delayed(
        &mut self,
        mut event: Event,
        trace: PublishTrace,
    ) -> Result<(Event, PublishTrace), ResponseFuture> {
        if event.extension(watchtower::ext::DELIVER_AT).is_none() {
            return Ok((event, trace));
        }
        let due = event
            .validate()
            .and_then(|()| watchtower::delay::deliver_at(&event))
            .and_then(|at| Ok((at, self.shared.stream_key(event.topic())?)));
        let (at, key) = match due {
            Ok((Some(at), key)) if at > time::OffsetDateTime::now_utc() => (at, key),
            Ok(_) => {
                event.remove_extension(watchtower::ext::DELIVER_AT);
                return Ok((event, trace));
            }
            Err(e) => {
                return Err(ResponseFuture {
                    state: State::Failed(Some(e.with_event(event))),
                    trace: Some(trace),
                });
            }
        };
        // The queue's place, if `poll_ready` took one, is not needed.
        if std::mem::take(&mut self.reserved) {
            self.shared.queue.release(1);
        }
        let shared = self.shared.clone();
        let held = async move {
            let receipt = Receipt::new(key.clone(), &event);
            let conn = shared.client.conn().clone();
            match shared
                .delays
                .schedule(conn, shared.client.runtime(), &key, event.clone(), at)
                .await
            {
                Ok(()) => Ok(receipt),
                Err(e) => Err(e.with_event(event)),
            }
        };
        Err(ResponseFuture {
            state: State::Held(Box::pin(held)),
            trace: Some(trace),
        })
    }

    /// A publisher on `client`'s connections with `options` (checked).
    pub(crate) fn new(client: RedisClient, options: RedisPublisherOptions) -> RedisPublisher {
        let queue = Queue::new(options.max_pending);
        let config = client.config();
        let target = Target {
            prefix: config.prefix().clone(),
            hash_tag: config.is_cluster(),
            max_len: options.max_len,
            mode: options.mode,
            replicas: options.replicas,
        };
        let health = LinkState::new();
        let stopped = Stopped(queue.clone());
        // The publisher's own connection speaks to one plain-TCP Redis; a
        // cluster (or TLS, or waiting for replicas) goes through the `redis`
        // crate's connection.
        let own = match client.backend() {
            Backend::Single(redis)
                if target.replicas.is_none() && link::supports(redis.get_connection_info().addr()) =>
            {
                Some(redis.clone())
            }
            _ => None,
        };
        if let Some(redis) = own {
            let (connection_timeout, response_timeout) = config.timeouts();
            let settings = link::Settings {
                client: redis,
                connection_timeout,
                response_timeout,
                target: target.clone(),
            };
            client
                .runtime()
                .spawn(link::link_loop(settings, health.clone(), stopped));
        } else {
            client.runtime().spawn(batch_loop(
                client.conn().clone(),
                health.clone(),
                stopped,
                target.clone(),
            ));
        }
        let delays = delay::Delays::new(client.config());
        RedisPublisher {
            shared: Arc::new(PublisherShared {
                queue,
                client,
                target,
                health,
                keys: RwLock::new(HashMap::new()),
                delays,
            }),
            probe: None,
            room: None,
            reserved: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        self.shared.client.config()
    }

    /// Whether the last command on the connection got an answer.
    pub fn is_connected(&self) -> bool {
        self.shared.health.is_connected()
    }

    /// Calls not sent because their caller had stopped waiting when their
    /// batch was encoded (see
    /// [Callers that stop waiting](RedisPublisher#callers-that-stop-waiting)),
    /// since the publisher was made, over all its clones.
    pub fn abandoned(&self) -> u64 {
        self.shared.queue.abandoned()
    }

    /// A batch publisher on this publisher's settings (stream prefix,
    /// `MAXLEN`, content mode): each batch is one pipeline of `XADD`s on
    /// the client's multiplexed connection. See [`RedisBatchPublisher`].
    pub fn batched(&self) -> RedisBatchPublisher {
        RedisBatchPublisher {
            shared: self.shared.clone(),
        }
    }
}

/// Publishes batches of events to Redis Streams, each batch as **one
/// pipeline** of `XADD`s (one write, one round trip), answering each event
/// with its own receipt or error, in the batch's order (see
/// [`watchtower::batch`]). Made by [`RedisPublisher::batched`]; shares the
/// publisher's settings and the client's multiplexed connection, which
/// reconnects by itself.
///
/// * An event that cannot be sent (invalid, a bad topic) is answered with
///   its error and left out of the pipeline; the others go.
/// * The server's error for one `XADD` (a `WRONGTYPE` for one stream)
///   fails that event alone.
/// * A pipeline the connection loses or that times out answers every
///   event with the [`ErrorKind::Connection`] or [`ErrorKind::Timeout`]
///   error, with its event attached: none, some or all may be stored.
/// * An event with a delivery time ([`watchtower::delay`]) is answered
///   with [`ErrorKind::Unsupported`]: publish it with the publisher, which
///   keeps it in the sorted set of delayed events.
///
/// Events of one batch reach their streams in the batch's order. The
/// publisher's queue (and its readiness) is not involved: `poll_ready` is
/// always ready, and a batch sent while Redis is down is answered with
/// the connection's error.
///
/// ```no_run
/// use watchtower::{Event, PublishBatchExt};
/// use watchtower_redis::{RedisClient, RedisConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RedisClient::connect(RedisConfig::new("redis://127.0.0.1:6379")).await?;
/// let mut batches = client.publisher().batched();
/// let events = (0..100).map(|n| Event::new("order.paid", serde_json::json!({"n": n}))).collect();
/// for answer in batches.publish_batch(events).await? {
///     answer?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisBatchPublisher {
    shared: Arc<PublisherShared>,
}

impl fmt::Debug for RedisBatchPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBatchPublisher")
            .field("config", self.shared.client.config())
            .field("max_len", &self.shared.target.max_len)
            .field("content_mode", &self.shared.target.mode)
            .finish_non_exhaustive()
    }
}

impl Service<Vec<Event>> for RedisBatchPublisher {
    type Response = BatchReceipts;
    type Error = Error;
    type Future = BatchFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, events: Vec<Event>) -> BatchFuture {
        let shared = self.shared.clone();
        let mut commands = Vec::with_capacity(events.len());
        let mut prepared = Vec::with_capacity(events.len());
        for mut event in events {
            let trace = PublishTrace::start(RedisClient::SYSTEM, &event.shared_topic(), &mut event);
            let checked = if event.extension(watchtower::ext::DELIVER_AT).is_some() {
                Err(Error::new(
                    ErrorKind::Unsupported,
                    "a delayed event cannot go in a batch: publish it with the publisher",
                ))
            } else {
                shared.xadd(&event)
            };
            match checked {
                Ok((key, cmd)) => {
                    commands.push((cmd, wait_slot(&shared.target, &event)));
                    prepared.push((trace, Ok(key), event));
                }
                Err(e) => prepared.push((trace, Err(e), event)),
            }
        }
        // With replicas to wait for, a `WAIT` follows each slot's last `XADD`.
        let (mut pipe, places) = with_waits(commands.into_iter(), &shared.target);
        pipe.ignore_errors();
        Box::pin(async move {
            let replies: Result<Vec<Value>, Error> = if places.is_empty() {
                Ok(Vec::new())
            } else {
                let mut conn = shared.client.conn().clone();
                let result = pipe
                    .query_async::<Vec<Value>>(&mut conn)
                    .await
                    .map_err(|e| from_redis(e, "XADD pipeline"));
                shared.health.observe(&result);
                result
            };
            let (replies, failed) = match replies {
                Ok(replies) => (replies, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            let mut places = places.into_iter();
            Ok(prepared
                .into_iter()
                .map(|(trace, key, event)| {
                    let answer = key.and_then(|key| {
                        let id = match (&failed, places.next()) {
                            (Some(e), _) => {
                                Err(Error::new(e.kind(), e.message()).with_retryable(e.is_retryable()))
                            }
                            (None, Some(places)) => answer_waited(&replies, places, &shared.target, &event),
                            (None, None) => Err(Error::decode("XADD pipeline: missing reply")),
                        };
                        Ok(receipt(&event, key, id?))
                    });
                    let answer = answer.map_err(|e| e.with_event(event));
                    trace.finish(&answer);
                    answer
                })
                .collect())
        })
    }
}

impl PublisherShared {
    /// The `XADD` for `event`, encoded into a command allocated once.
    fn xadd(&self, event: &Event) -> Result<(Arc<str>, Cmd), Error> {
        let key = self.prepare(event)?;
        let cmd = xadd(&self.target, event);
        Ok((key, cmd))
    }

    /// Checks `event` and finds its stream key.
    fn prepare(&self, event: &Event) -> Result<Arc<str>, Error> {
        event.validate()?;
        self.stream_key(event.topic())
    }

    /// The stream key of `topic`, from the cache when it is there (a
    /// cached topic has been validated).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`] for a topic that is not valid.
    fn stream_key(&self, topic: &str) -> Result<Arc<str>, Error> {
        if let Some(key) = self.keys.read().ok().and_then(|keys| keys.get(topic).cloned()) {
            return Ok(key);
        }
        validate_topic(topic)?;
        let key: Arc<str> = self.client.config().stream_key(topic).into();
        if let Ok(mut keys) = self.keys.write() {
            if keys.len() >= KEY_CACHE {
                keys.clear();
            }
            keys.insert(topic.into(), key.clone());
        }
        Ok(key)
    }
}

/// The `XADD` of `event` to the stream `prefix` + its topic, encoded into
/// a command allocated once.
pub(crate) fn xadd(target: &Target, event: &Event) -> Cmd {
    let (field_args, field_bytes) = fields_size(event, target.mode);
    let topic = event.topic();
    // XADD key [MAXLEN ~ n] * fields...
    let mut cmd = Cmd::with_capacity(
        6 + field_args,
        34 + target.prefix.len() + topic.len() + field_bytes,
    );
    write_xadd(&mut cmd, target, event);
    cmd
}

/// Writes the arguments of the `XADD` of `event` to the stream `prefix` +
/// its topic into `cmd`.
pub(crate) fn write_xadd(cmd: &mut Cmd, target: &Target, event: &Event) {
    let Target {
        prefix,
        hash_tag,
        max_len,
        mode,
        ..
    } = target;
    let topic = event.topic();
    cmd.arg("XADD");
    {
        let mut key = cmd.writer_for_next_arg();
        // Writing to the command's buffer cannot fail.
        let _ = key.write_all(prefix.as_bytes());
        if *hash_tag {
            let _ = key.write_all(b"{");
            let _ = key.write_all(topic.as_bytes());
            let _ = key.write_all(b"}");
        } else {
            let _ = key.write_all(topic.as_bytes());
        }
    }
    match max_len {
        Some(MaxLen::Approx(n)) => {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        Some(MaxLen::Exact(n)) => {
            cmd.arg("MAXLEN").arg("=").arg(n);
        }
        None => {}
    }
    cmd.arg("*");
    write_fields(cmd, event, *mode);
}

fn receipt(event: &Event, key: Arc<str>, id: Arc<str>) -> Receipt {
    Receipt::new(event.shared_topic(), event)
        .with_stream(key)
        .with_message_id(id)
}

/// Checks the connection after a failure: `PING`, and `PING` again if the
/// first finds the connection broken. The `XADD`s travel on a connection
/// of their own, so the multiplexed connection may learn of a cut only
/// from this `PING`; it connects again for the second.
async fn probe(conn: Conn, health: Arc<LinkState>) -> Result<(), Error> {
    let mut result = ping(conn.clone()).await;
    if matches!(&result, Err(e) if e.kind() == ErrorKind::Connection) {
        result = ping(conn).await;
    }
    health.observe(&result);
    result
}

impl Service<Event> for RedisPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // On a cluster, one master's outage is not the publisher's: its
        // `XADD`s fail (and are retried above) while the cluster
        // connection learns the new master from the others.
        if self.probe.is_none() && !self.shared.health.is_connected() && !self.shared.target.hash_tag {
            // A task rather than a stored future keeps the publisher `Sync`.
            self.probe = Some(self.shared.client.runtime().spawn(probe(
                self.shared.client.conn().clone(),
                self.shared.health.clone(),
            )));
        }
        if let Some(probe) = self.probe.as_mut() {
            let result = ready!(Pin::new(probe).poll(cx));
            self.probe = None;
            result.unwrap_or_else(|e| Err(Error::closed(format!("connection probe failed: {e}"))))?;
        }
        if !self.reserved {
            // A wait under way is finished first: its future may already
            // hold places meant for it.
            if self.room.is_none() && self.shared.queue.try_reserve() {
                self.reserved = true;
                return Poll::Ready(Ok(()));
            }
            let queue = &self.shared.queue;
            let room = self
                .room
                .get_or_insert_with(|| PollSemaphore::new(queue.room.clone()));
            let place = ready!(room.poll_acquire(cx));
            self.room = None;
            match place {
                // The queue's task adds it back with its pipeline's.
                Some(place) => place.forget(),
                None => return Poll::Ready(Err(Error::closed("the publisher's queue is closed"))),
            }
            self.reserved = true;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        let trace = PublishTrace::start(RedisClient::SYSTEM, &event.shared_topic(), &mut event);
        let (event, trace) = match self.hold_if_delayed(event, trace) {
            Ok(pair) => pair,
            Err(held) => return held,
        };
        let queue = &self.shared.queue;
        // A call without `poll_ready` takes a free place if there is one.
        let reserved = std::mem::take(&mut self.reserved) || queue.try_reserve();
        let state = match (reserved, self.shared.prepare(&event)) {
            (true, Err(e)) => {
                queue.release(1);
                State::Failed(Some(e.with_event(event)))
            }
            (false, Err(e)) => State::Failed(Some(e.with_event(event))),
            (false, Ok(_)) => State::Failed(Some(
                Error::new(
                    ErrorKind::Overloaded,
                    "the publisher's queue is full: call poll_ready before call",
                )
                .with_event(event),
            )),
            (true, Ok(key)) => {
                let (replier, reply) = reply();
                // The connection task encodes the command: allocated and
                // freed on one thread, and off the caller's.
                let request = Request {
                    event: event.clone(),
                    reply: replier,
                };
                match queue.push(request) {
                    Ok(()) => State::Waiting {
                        reply,
                        key,
                        event: Some(event),
                    },
                    Err(request) => {
                        drop(request);
                        queue.release(1);
                        State::Failed(Some(
                            Error::closed("the publisher's connection task has stopped").with_event(event),
                        ))
                    }
                }
            }
        };
        ResponseFuture {
            state,
            trace: Some(trace),
        }
    }
}
