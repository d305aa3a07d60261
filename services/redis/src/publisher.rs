//! The publishing side: `XADD` to one stream per topic.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use redis::aio::ConnectionManager;
use redis::{Cmd, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tower_service::Service;
use watchtower::topic::validate_topic;
use watchtower::trace::publish_span;
use watchtower::{Error, ErrorKind, Event, Receipt};

use crate::batch::{Request, batch_loop, server_error};
use crate::config::RedisConfig;
use crate::error::from_redis;
use crate::wire::{string_of, write_fields};

/// Trimming of a stream on every `XADD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxLen {
    /// `MAXLEN ~ n`: Redis trims whole macro nodes, so the stream keeps at
    /// least `n` entries and trimming stays cheap.
    Approx(u64),
    /// `MAXLEN = n`: exactly `n` entries, at a higher cost per `XADD`.
    Exact(u64),
}

/// Connection state shared by a publisher and its clones.
#[derive(Debug)]
pub(crate) struct Health {
    connected: AtomicBool,
}

impl Health {
    pub(crate) fn new() -> Arc<Health> {
        Arc::new(Health {
            connected: AtomicBool::new(true),
        })
    }

    pub(crate) fn observe(&self, result: &Result<impl Sized, Error>) {
        match result {
            Ok(_) => self.connected.store(true, Ordering::Relaxed),
            Err(e) if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout) => {
                self.connected.store(false, Ordering::Relaxed);
            }
            Err(_) => {}
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
/// The connection is one multiplexed connection that reconnects by itself.
/// Clones share it, and calls do not wait for each other: the `XADD`s of
/// concurrent callers (or of one caller with many calls in flight) are
/// gathered into pipelines, a few on the wire at once, so a busy publisher
/// pays one round trip per batch rather than per event.
/// [`publish_batch`](RedisPublisher::publish_batch) sends a caller's own
/// batch as one pipeline.
///
/// # Readiness
///
/// `poll_ready` is ready while the connection works. After a connection
/// failure it sends a `PING` (which reconnects) and stays pending until the
/// answer; if that fails too it returns the [`ErrorKind::Connection`]
/// error, and the next `poll_ready` tries again.
///
/// # Example
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_redis::{MaxLen, RedisConfig, RedisPublisher};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let mut publisher = RedisPublisher::builder(RedisConfig::new("redis://127.0.0.1:6379"))
///     .max_len(MaxLen::Approx(100_000))
///     .connect()
///     .await?;
/// let receipt = publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
/// println!("stored as {:?}", receipt.message_id);
/// # Ok(()) }
/// ```
pub struct RedisPublisher {
    conn: ConnectionManager,
    requests: mpsc::UnboundedSender<Request>,
    shared: Arc<PublisherShared>,
    probe: Option<JoinHandle<Result<(), Error>>>,
}

impl Clone for RedisPublisher {
    fn clone(&self) -> Self {
        RedisPublisher {
            conn: self.conn.clone(),
            requests: self.requests.clone(),
            shared: self.shared.clone(),
            probe: None,
        }
    }
}

struct PublisherShared {
    config: RedisConfig,
    max_len: Option<MaxLen>,
    health: Arc<Health>,
}

impl fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("config", &self.shared.config)
            .field("max_len", &self.shared.max_len)
            .field("connected", &self.shared.health.is_connected())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisPublisher`].
#[derive(Debug, Clone)]
pub struct RedisPublisherBuilder {
    config: RedisConfig,
    max_len: Option<MaxLen>,
}

impl RedisPublisherBuilder {
    /// Trims each stream on every `XADD`. Default: no trimming.
    pub fn max_len(mut self, max_len: MaxLen) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Checks the configuration and connects.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`] for a bad URL or setting;
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if Redis cannot be
    /// reached; [`ErrorKind::Rejected`] if it refuses the credentials.
    pub async fn connect(self) -> Result<RedisPublisher, Error> {
        if matches!(self.max_len, Some(MaxLen::Approx(0) | MaxLen::Exact(0))) {
            return Err(Error::config("max_len must be at least 1"));
        }
        let client = self.config.client()?;
        let conn = self.config.connect(&client, std::time::Duration::ZERO).await?;
        let health = Health::new();
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(conn.clone(), health.clone(), rx));
        Ok(RedisPublisher {
            conn,
            requests,
            shared: Arc::new(PublisherShared {
                config: self.config,
                max_len: self.max_len,
                health,
            }),
            probe: None,
        })
    }
}

impl RedisPublisher {
    /// A builder for a publisher with `config`.
    pub fn builder(config: RedisConfig) -> RedisPublisherBuilder {
        RedisPublisherBuilder {
            config,
            max_len: None,
        }
    }

    /// Connects with `config` and default options.
    ///
    /// # Errors
    ///
    /// As [`RedisPublisherBuilder::connect`].
    pub async fn connect(config: RedisConfig) -> Result<RedisPublisher, Error> {
        RedisPublisher::builder(config).connect().await
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// Whether the last command on the connection got an answer.
    pub fn is_connected(&self) -> bool {
        self.shared.health.is_connected()
    }

    /// Sends a `PING` and waits for the answer.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if Redis does not
    /// answer.
    pub async fn health(&self) -> Result<(), Error> {
        ping(self.conn.clone(), self.shared.health.clone()).await
    }

    /// Publishes several events in one pipeline (one round trip), in order.
    /// Each event gets its own result.
    ///
    /// # Errors
    ///
    /// The outer error is a failure of the whole pipeline (connection,
    /// timeout): then none, some or all events may have been stored.
    pub async fn publish_batch(&self, events: Vec<Event>) -> Result<Vec<Result<Receipt, Error>>, Error> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut prepared = Vec::with_capacity(events.len());
        for event in events {
            match self.shared.xadd(&event) {
                Ok((key, cmd)) => {
                    pipe.add_command(cmd);
                    prepared.push(Ok((key, event)));
                }
                Err(e) => prepared.push(Err(e)),
            }
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Value> = if pipe.cmd_iter().next().is_none() {
            Vec::new()
        } else {
            let result = pipe
                .query_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(|e| from_redis(e, "XADD pipeline"));
            self.shared.health.observe(&result);
            result?
        };
        let mut replies = replies.into_iter();
        Ok(prepared
            .into_iter()
            .map(|item| {
                let (key, event) = item?;
                match replies.next() {
                    Some(reply) => receipt(&event, &key, &server_error(reply, &key)?),
                    None => Err(Error::decode("XADD pipeline: missing reply")),
                }
            })
            .collect())
    }
}

impl PublisherShared {
    fn xadd(&self, event: &Event) -> Result<(String, Cmd), Error> {
        let topic = event.topic();
        validate_topic(topic)?;
        event.validate()?;
        let key = self.config.stream_key(topic);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&key);
        match self.max_len {
            Some(MaxLen::Approx(n)) => {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            Some(MaxLen::Exact(n)) => {
                cmd.arg("MAXLEN").arg("=").arg(n);
            }
            None => {}
        }
        cmd.arg("*");
        write_fields(&mut cmd, event);
        Ok((key, cmd))
    }
}

fn receipt(event: &Event, key: &str, reply: &Value) -> Result<Receipt, Error> {
    let id = string_of(reply).ok_or_else(|| Error::decode("XADD did not answer with an entry id"))?;
    Ok(Receipt::new(event.topic(), event)
        .with_stream(key)
        .with_message_id(id))
}

async fn ping(mut conn: ConnectionManager, health: Arc<Health>) -> Result<(), Error> {
    let result = redis::cmd("PING")
        .query_async::<Value>(&mut conn)
        .await
        .map(drop)
        .map_err(|e| from_redis(e, "PING"));
    health.observe(&result);
    result
}

impl Service<Event> for RedisPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.probe.is_none() {
            if self.shared.health.is_connected() {
                return Poll::Ready(Ok(()));
            }
            // A task rather than a stored future keeps the publisher `Sync`.
            self.probe = Some(tokio::spawn(ping(self.conn.clone(), self.shared.health.clone())));
        }
        let Some(probe) = self.probe.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let result = ready!(Pin::new(probe).poll(cx));
        self.probe = None;
        Poll::Ready(result.unwrap_or_else(|e| Err(Error::closed(format!("connection probe failed: {e}")))))
    }

    fn call(&mut self, event: Event) -> ResponseFuture {
        let span = publish_span("redis", event.topic(), &event);
        let state = match self.shared.xadd(&event) {
            Err(e) => State::Failed(Some(e.with_event(event))),
            Ok((key, cmd)) => {
                let (done, reply) = oneshot::channel();
                match self.requests.send(Request { cmd, done }) {
                    Ok(()) => State::Waiting {
                        reply,
                        key,
                        event: Some(event),
                    },
                    Err(_) => State::Failed(Some(
                        Error::closed("the publisher's connection task has stopped").with_event(event),
                    )),
                }
            }
        };
        ResponseFuture { state, span }
    }
}

enum State {
    Failed(Option<Error>),
    Waiting {
        reply: oneshot::Receiver<Result<Value, Error>>,
        key: String,
        event: Option<Event>,
    },
}

/// The future of [`RedisPublisher::call`]: the `XADD` is queued for the
/// next pipeline when `call` returns, and this waits for its reply.
///
/// # Cancel safety
///
/// Dropping the future does not withdraw the `XADD`: the event may be
/// stored all the same.
pub struct ResponseFuture {
    state: State,
    span: tracing::Span,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let _entered = this.span.enter();
        match &mut this.state {
            State::Failed(err) => Poll::Ready(Err(err
                .take()
                .unwrap_or_else(|| Error::closed("the publish future was polled after it finished")))),
            State::Waiting { reply, key, event } => {
                let result = ready!(Pin::new(reply).poll(cx));
                let Some(event) = event.take() else {
                    return Poll::Ready(Err(Error::closed(
                        "the publish future was polled after it finished",
                    )));
                };
                let result = result
                    .unwrap_or_else(|_| Err(Error::closed("the publisher's connection task has stopped")))
                    .and_then(|reply| server_error(reply, key))
                    .and_then(|reply| receipt(&event, key, &reply));
                Poll::Ready(result.map_err(|e| e.with_event(event)))
            }
        }
    }
}
