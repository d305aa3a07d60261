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
//!   [`ErrorKind::Timeout`](watchtower::ErrorKind::Timeout);
//! * the responder's handler failed: the responder answers with an
//!   [error reply](watchtower::request::error_reply), and the caller gets
//!   an [`Error`] of that kind and message;
//! * the request could not be published: the publisher's error.
//!
//! The transport decides the delivery guarantee of requests and replies.
//! On core NATS or the memory transport a request with no responder is
//! simply not delivered and times out. A request is handled at least once
//! on a persistent transport; the requester takes the first reply and
//! ignores any later one (counted in [`Requester::late_replies`]).
//!
//! NATS and RabbitMQ also answer natively, without a reply topic of the
//! requester's own: `watchtower_nats::NatsRequester` (one wildcard inbox
//! subscription per requester; a request nobody listens to fails at once
//! with [`NoResponders`](watchtower::request::NoResponders)) and
//! `watchtower_rabbitmq::RabbitRequester` (direct reply-to). The same
//! [`Responder`] answers all of them: the transports put the native reply
//! address in the request's [`replyto`](watchtower::ext::REPLY_TO)
//! extension. The waiting, timeouts and error replies are one mechanism,
//! [`watchtower::request`].
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

use std::fmt;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::oneshot;
use tower::Service;
use watchtower::request::{Correlator, from_reply};
use watchtower::{Acker as _, BoxError, Error, Event, SubscribeOptions, Subscriber, ext};

pub use responder::Responder;

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
    pending: Correlator,
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
    /// [`ErrorKind::InvalidTopic`](watchtower::ErrorKind::InvalidTopic) for
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
        let pending = Correlator::new();
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
                        match reply.extension(ext::CORRELATION_ID).map(str::to_owned) {
                            Some(correlation) => {
                                routes.answer(&correlation, from_reply(reply));
                            }
                            None => tracing::debug!(
                                id = reply.id(),
                                "a reply without a correlation id; dropping it"
                            ),
                        }
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
            routes.fail_all(&Error::closed(
                "the reply subscription closed before the reply came",
            ));
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
        self.shared.pending.in_flight()
    }

    /// Replies that came after their caller stopped waiting (timed out), or
    /// a second reply to one request: dropped, and counted here.
    pub fn late_replies(&self) -> u64 {
        self.shared.pending.late_replies()
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
        let waiter = match self.shared.pending.register(event.id()) {
            Ok(waiter) => waiter,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        if let Err(e) = event.set_extension(ext::REPLY_TO, self.shared.reply_topic.clone()) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let publish = self.publisher.call(event);
        let timeout = self.shared.timeout;
        Box::pin(waiter.wait(
            async move { publish.await.map(drop).map_err(|e| Error::from_boxed(e.into())) },
            timeout,
        ))
    }
}
