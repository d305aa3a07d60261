//! Request–reply over any transport: a [`Requester`] that is a
//! `Service<Event, Response = Event>`, and a [`Responder`] that turns a
//! handler returning an event into a consumer handler that answers.
//!
//! The requester opens one subscription to a reply topic of its own
//! (unique per requester unless set), and sends each request with two
//! extensions: `replyto` (that topic) and nothing else new; the request's
//! `id` is the correlation. The responder, served with
//! [`serve`](watchtower::serve()) on the request topic, calls its handler,
//! sets the reply's `correlationid` extension to the request's `id` and
//! publishes it to the request's `replyto`. The requester matches replies
//! to callers by `correlationid`, so any number of requests can be in
//! flight on one requester.
//!
//! Failures reach the caller as errors, never as silence:
//!
//! * no reply within the [timeout](RequestConfig::timeout) (no responder,
//!   a slow one, a lost message):
//!   [`ErrorKind::Timeout`];
//! * the responder's handler failed: the responder answers with an error
//!   reply (extensions `errorkind`, `errormessage`, `errorretryable`), and
//!   the caller gets an [`Error`] of that kind and message;
//! * the request could not be published: the publisher's error.
//!
//! The transport decides the delivery guarantee of requests and replies.
//! On core NATS or the memory transport a request with no responder is
//! simply not delivered and times out. A request is handled at least once
//! on a persistent transport; the requester takes the first reply and
//! ignores any later one.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceExt};
//! use watchtower::prelude::*;
//! use watchtower_memory::MemoryBroker;
//! use watchtower_toolkit::request::{RequestConfig, Requester, Responder};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let broker = MemoryBroker::new();
//!
//! // The replying side: a handler that returns an event.
//! let add = service_fn(|request: Event| async move {
//!     let [a, b]: [i64; 2] = request.json()?;
//!     Ok::<_, Error>(Event::new("sum", serde_json::json!(a + b)))
//! });
//! let responder = Responder::new(add, broker.publisher());
//! let handle = broker.subscriber().subscribe(["math.add"], responder).await?;
//!
//! // The asking side.
//! let config = RequestConfig::new().timeout(Duration::from_secs(5));
//! let mut requester = Requester::open(&broker.subscriber(), broker.publisher(), config).await?;
//! let reply = requester
//!     .ready()
//!     .await?
//!     .call(Event::new("math.add", serde_json::json!([2, 3])))
//!     .await?;
//! assert_eq!(reply.json::<i64>()?, 5);
//! handle.stop().await?;
//! # Ok(()) }
//! ```

mod responder;

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::oneshot;
use tower::Service;
use watchtower::{Acker as _, BoxError, Error, ErrorKind, Event, SubscribeOptions, Subscriber, ext};

pub use responder::Responder;

/// The extension naming the topic a reply goes to.
pub const REPLY_TO: &str = "replyto";
/// The extension of an error reply holding the error's kind
/// ([`ErrorKind::as_str`]).
pub const ERROR_KIND: &str = "errorkind";
/// The extension of an error reply holding the error's message.
pub const ERROR_MESSAGE: &str = "errormessage";
/// The extension of an error reply saying whether a retry can help
/// (`true` or `false`).
pub const ERROR_RETRYABLE: &str = "errorretryable";
/// The type of an error reply.
pub const ERROR_REPLY_TYPE: &str = "watchtower.reply.error";

/// How a [`Requester`] asks.
#[derive(Debug, Clone)]
pub struct RequestConfig {
    timeout: Duration,
    reply_topic: Option<String>,
}

impl Default for RequestConfig {
    fn default() -> Self {
        RequestConfig::new()
    }
}

impl RequestConfig {
    /// The defaults: see each setter.
    pub fn new() -> RequestConfig {
        RequestConfig {
            timeout: Duration::from_secs(10),
            reply_topic: None,
        }
    }

    /// How long a caller waits for its reply. Default 10 s, async-nats's
    /// request timeout, so requests time out alike on every transport.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The topic replies come back on. Default `_reply.` followed by a
    /// name unique to the requester. Two requesters must not share one.
    pub fn reply_topic(mut self, topic: impl Into<String>) -> Self {
        self.reply_topic = Some(topic.into());
        self
    }
}

type Pending = Arc<Mutex<HashMap<Arc<str>, oneshot::Sender<Event>>>>;

/// Sends requests and waits for their replies: a
/// `Service<Event, Response = Event>`. See the [module docs](self).
///
/// Cheap to clone: clones share the reply subscription; it closes when the
/// last clone is dropped.
pub struct Requester<P> {
    publisher: P,
    shared: Arc<Shared>,
}

struct Shared {
    pending: Pending,
    reply_topic: Arc<str>,
    timeout: Duration,
    /// Dropped with the last requester, which ends the reply task.
    _stop: oneshot::Sender<()>,
}

impl<P: Clone> Clone for Requester<P> {
    fn clone(&self) -> Self {
        Requester {
            publisher: self.publisher.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<P> fmt::Debug for Requester<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Requester")
            .field("reply_topic", &self.shared.reply_topic)
            .field("timeout", &self.shared.timeout)
            .finish_non_exhaustive()
    }
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{seed:016x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl<P> Requester<P> {
    /// Subscribes to the reply topic on `subscriber` and returns a
    /// requester that publishes with `publisher`. The reply subscription
    /// runs on a spawned task until the last clone is dropped.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidTopic`] for
    /// a bad reply topic, or the transport's error if it cannot subscribe.
    pub async fn open<Sub: Subscriber>(
        subscriber: &Sub,
        publisher: P,
        config: RequestConfig,
    ) -> Result<Requester<P>, Error> {
        let reply_topic = config
            .reply_topic
            .unwrap_or_else(|| format!("_reply.{}", unique_suffix()));
        let mut subscription = subscriber.open(SubscribeOptions::new([&reply_topic])?).await?;
        let pending = Pending::default();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let routes = pending.clone();
        tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    _ = &mut stopped => break,
                    next = subscription.next() => match next {
                        Some(Ok(delivery)) => delivery,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "reply subscription reported an error");
                            continue;
                        }
                        None => break,
                    },
                };
                let (content, acker) = delivery.into_parts();
                let settled = match content {
                    Ok(reply) => {
                        deliver(&routes, reply);
                        acker.ack().await
                    }
                    Err(poison) => {
                        tracing::warn!(error = %poison.error, "a reply did not decode; dropping it");
                        acker.reject().await
                    }
                };
                if let Err(e) = settled {
                    tracing::debug!(error = %e, "could not settle a reply");
                }
            }
            // Callers still waiting learn at once that no reply will come.
            routes.lock().unwrap_or_else(PoisonError::into_inner).clear();
        });
        Ok(Requester {
            publisher,
            shared: Arc::new(Shared {
                pending,
                reply_topic: reply_topic.into(),
                timeout: config.timeout,
                _stop: stop,
            }),
        })
    }

    /// The topic replies come back on.
    pub fn reply_topic(&self) -> &str {
        &self.shared.reply_topic
    }

    /// Requests waiting for their reply now.
    pub fn in_flight(&self) -> usize {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn deliver(pending: &Pending, reply: Event) {
    let Some(correlation) = reply.extension(ext::CORRELATION_ID) else {
        tracing::debug!(id = reply.id(), "a reply without a correlation id; dropping it");
        return;
    };
    let waiter = pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(correlation);
    match waiter {
        Some(waiter) => {
            let _ = waiter.send(reply);
        }
        // A late reply to a caller that timed out, or a duplicate.
        None => tracing::debug!(correlation, "a reply nobody waits for; dropping it"),
    }
}

/// Removes a request from the pending map when its caller stops waiting.
struct Waiting {
    pending: Pending,
    id: Arc<str>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl<P> Service<Event> for Requester<P>
where
    P: Service<Event> + Clone + Send + 'static,
    P::Error: Into<BoxError>,
    P::Future: Send + 'static,
{
    type Response = Event;
    type Error = Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Event, Error>> + Send + 'static>>;

    /// Ready when the publisher is.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.publisher
            .poll_ready(cx)
            .map_err(|e| Error::from_boxed(e.into()))
    }

    fn call(&mut self, mut event: Event) -> Self::Future {
        let shared = self.shared.clone();
        let id: Arc<str> = Arc::from(event.id());
        let (tx, rx) = oneshot::channel();
        let registered = {
            let mut pending = shared.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.contains_key(&id) {
                false
            } else {
                pending.insert(id.clone(), tx);
                true
            }
        };
        if !registered {
            return Box::pin(std::future::ready(Err(Error::new(
                ErrorKind::InvalidEvent,
                format!("a request with id `{id}` is already waiting for its reply"),
            )
            .with_retryable(false))));
        }
        let waiting = Waiting {
            pending: shared.pending.clone(),
            id,
        };
        if let Err(e) = event.set_extension(REPLY_TO, shared.reply_topic.clone()) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let publish = self.publisher.call(event);
        Box::pin(async move {
            let waiting = waiting;
            let deadline = tokio::time::Instant::now() + shared.timeout;
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(Error::from_boxed(e.into())),
                Err(_) => return Err(timed_out(&waiting.id, shared.timeout)),
            }
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(reply)) => from_reply(reply),
                Ok(Err(_)) => Err(Error::closed(
                    "the reply subscription closed before the reply came",
                )),
                Err(_) => Err(timed_out(&waiting.id, shared.timeout)),
            }
        })
    }
}

fn timed_out(id: &str, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("no reply to request `{id}` within {timeout:?}"),
    )
}

/// A reply, or the error an error reply carries.
fn from_reply(reply: Event) -> Result<Event, Error> {
    let Some(kind) = reply.extension(ERROR_KIND) else {
        return Ok(reply);
    };
    let kind = kind_from_str(kind);
    let message = reply.extension(ERROR_MESSAGE).unwrap_or_default();
    let mut error = Error::new(kind, format!("the responder failed: {message}"));
    if let Some(retryable) = reply.extension(ERROR_RETRYABLE) {
        error = error.with_retryable(retryable == "true");
    }
    Err(error)
}

fn kind_from_str(kind: &str) -> ErrorKind {
    const KINDS: [ErrorKind; 18] = [
        ErrorKind::Connection,
        ErrorKind::Timeout,
        ErrorKind::Rejected,
        ErrorKind::Throttled,
        ErrorKind::Gone,
        ErrorKind::Encode,
        ErrorKind::Decode,
        ErrorKind::InvalidEvent,
        ErrorKind::InvalidTopic,
        ErrorKind::Config,
        ErrorKind::CircuitOpen,
        ErrorKind::Overloaded,
        ErrorKind::Dropped,
        ErrorKind::Handler,
        ErrorKind::Closed,
        ErrorKind::DeadLettered,
        ErrorKind::Unsupported,
        ErrorKind::Other,
    ];
    KINDS
        .into_iter()
        .find(|k| k.as_str() == kind)
        .unwrap_or(ErrorKind::Other)
}
