//! [`RabbitPublisher`]: a `tower::Service<Event>` that publishes to an
//! exchange with publisher confirms.
//!
//! Each event goes to the configured exchange with its
//! [`topic`](Event::topic) as the routing key, in binary CloudEvents mode
//! (see the [crate docs](crate)), persistent, with the `mandatory` flag.
//! The call resolves when the broker confirms the event:
//!
//! * `Ok(Receipt)` once the broker has taken responsibility for it (for a
//!   persistent event on a durable queue: written to disk);
//! * [`ErrorKind::Rejected`] if no queue is bound for the routing key (the
//!   broker returned it), not retryable;
//! * [`ErrorKind::Rejected`], retryable, if the broker nacked it (a full
//!   queue with `reject-publish` overflow, an internal error);
//! * [`ErrorKind::Connection`] if the connection or channel failed before
//!   the confirm arrived: the event may or may not have been stored, so a
//!   retry can duplicate it (at-least-once).
//!
//! Confirms are pipelined: up to
//! [`max_in_flight`](PublishOptions::max_in_flight) events are unconfirmed
//! at once (on one channel by default, see [`PublishOptions::channels`]);
//! `poll_ready` is pending while that window is full and while the
//! connection is being re-established.
//!
//! # Example
//!
//! ```no_run
//! use watchtower::{Event, PublishExt};
//! use watchtower_rabbitmq::{RabbitConfig, RabbitPublisher};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let mut publisher = RabbitPublisher::connect(RabbitConfig::local()).await?;
//! let receipt = publisher.publish(Event::new("user.created", serde_json::json!({"id": 1}))).await?;
//! assert_eq!(&*receipt.topic, "user.created");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tower::Service;
use watchtower::{Error, ErrorKind, Event, Receipt};

use crate::config::{PublishOptions, RabbitConfig, short};
use crate::connection::{Health, Link, LinkGuard, LinkState, Setup, breaks_channel, map_lapin_error};
use crate::wire;

pub(crate) struct Channels {
    channels: Vec<Channel>,
}

struct Inner {
    link: Link<Channels>,
    exchange: ShortString,
    /// The exchange name as the receipts' `stream`, allocated once.
    stream: Arc<str>,
    options: PublishOptions,
    next: AtomicUsize,
    _guard: LinkGuard,
}

/// Publishes events to a RabbitMQ exchange. See the [module docs](self).
///
/// Cheap to clone: clones share the connection, its channels and the
/// in-flight window. The connection closes when the last clone drops.
pub struct RabbitPublisher {
    inner: Arc<Inner>,
    semaphore: PollSemaphore,
    permit: Option<OwnedSemaphorePermit>,
    reconnect: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Clone for RabbitPublisher {
    fn clone(&self) -> Self {
        RabbitPublisher {
            inner: self.inner.clone(),
            semaphore: self.semaphore.clone(),
            permit: None,
            reconnect: None,
        }
    }
}

impl fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitPublisher")
            .field("url", &self.inner.link.config().redacted_url())
            .field("exchange", &self.inner.exchange.as_str())
            .field("options", &self.inner.options)
            .field("ready", &self.permit.is_some())
            .finish()
    }
}

impl RabbitPublisher {
    /// Connects with the default [`PublishOptions`].
    ///
    /// # Errors
    ///
    /// As [`connect_with`](RabbitPublisher::connect_with).
    pub async fn connect(config: RabbitConfig) -> Result<RabbitPublisher, Error> {
        RabbitPublisher::connect_with(config, PublishOptions::default()).await
    }

    /// Connects, opens the channels and declares the exchange (or checks
    /// it, if [passive](RabbitConfig::passive_exchange)).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Connection`] or [`ErrorKind::Timeout`] if the broker
    /// cannot be reached, [`ErrorKind::Config`] if it refuses the
    /// credentials or the exchange exists with other settings,
    /// [`ErrorKind::Rejected`] if a passive exchange does not exist.
    pub async fn connect_with(
        config: RabbitConfig,
        options: PublishOptions,
    ) -> Result<RabbitPublisher, Error> {
        let exchange = short("exchange name", &config.exchange)?;
        let setup: Setup<Channels> = {
            let config = config.clone();
            let options = options.clone();
            Arc::new(move |connection: Arc<Connection>| {
                let config = config.clone();
                let options = options.clone();
                Box::pin(async move { open_channels(&connection, &config, &options).await })
            })
        };
        let (link, guard) = Link::connect(config, setup).await?;
        let semaphore = PollSemaphore::new(Arc::new(Semaphore::new(options.max_in_flight)));
        Ok(RabbitPublisher {
            inner: Arc::new(Inner {
                link,
                stream: exchange.as_str().into(),
                exchange,
                options,
                next: AtomicUsize::new(0),
                _guard: guard,
            }),
            semaphore,
            permit: None,
            reconnect: None,
        })
    }

    /// The connection's health: connected, reconnect attempts, last error.
    pub fn health(&self) -> Health {
        self.inner.link.health()
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.health().connected
    }

    /// The exchange events go to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// Closes the connection for every clone; later calls fail with
    /// [`ErrorKind::Closed`].
    pub fn close(&self) {
        self.inner.link.close();
    }
}

async fn open_channels(
    connection: &Connection,
    config: &RabbitConfig,
    options: &PublishOptions,
) -> Result<Channels, Error> {
    let mut channels = Vec::with_capacity(options.channels);
    for _ in 0..options.channels {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| map_lapin_error(&e, "open channel"))?;
        if options.confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| map_lapin_error(&e, "confirm.select"))?;
        }
        channels.push(channel);
    }
    if let Some(channel) = channels.first() {
        declare_exchange(channel, config).await?;
    }
    Ok(Channels { channels })
}

pub(crate) async fn declare_exchange(channel: &Channel, config: &RabbitConfig) -> Result<(), Error> {
    let options = ExchangeDeclareOptions {
        passive: config.exchange_passive,
        durable: config.exchange_durable,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short("exchange name", &config.exchange)?,
            config.exchange_kind.to_lapin(),
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| map_lapin_error(&e, &format!("declare exchange {:?}", &*config.exchange)))
}

fn usable(channels: &Channels) -> bool {
    channels.channels.iter().all(|c| c.status().connected())
}

impl Service<Event> for RabbitPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if let Some(wait) = self.reconnect.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.reconnect = None;
            }
            let stale = match self.inner.link.state() {
                LinkState::Up(session)
                    if session.connection.status().connected() && usable(&session.value) =>
                {
                    break;
                }
                // Dead under us but not yet replaced: report it, and wait
                // for the replacement instead of failing fast in a loop.
                LinkState::Up(session) => {
                    self.inner.link.invalidate(session.generation);
                    Some(session.generation)
                }
                LinkState::Closed => {
                    return Poll::Ready(Err(Error::closed("the RabbitMQ publisher is closed")));
                }
                LinkState::Connecting => None,
            };
            let mut rx = self.inner.link.watch();
            self.reconnect = Some(Box::pin(async move {
                let _ = rx
                    .wait_for(|s| match s {
                        LinkState::Connecting => false,
                        LinkState::Up(session) => Some(session.generation) != stale,
                        LinkState::Closed => true,
                    })
                    .await;
            }));
        }
        if self.permit.is_none() {
            match ready!(self.semaphore.poll_acquire(cx)) {
                Some(permit) => self.permit = Some(permit),
                None => return Poll::Ready(Err(Error::closed("the RabbitMQ publisher is closed"))),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> ResponseFuture {
        let Some(permit) = self.permit.take() else {
            return ResponseFuture::ready(Err(Error::new(
                ErrorKind::Other,
                "RabbitPublisher::call without poll_ready",
            )));
        };
        let prepared = wire::properties(&event, &self.inner.options)
            .and_then(|props| Ok((props, short("routing key", event.topic())?)));
        let (properties, routing_key) = match prepared {
            Ok(p) => p,
            Err(e) => return ResponseFuture::ready(Err(e)),
        };
        let session = match self.inner.link.state() {
            LinkState::Up(session) => session,
            LinkState::Connecting => {
                return ResponseFuture::ready(Err(Error::new(
                    ErrorKind::Connection,
                    "the RabbitMQ connection is being re-established",
                )));
            }
            LinkState::Closed => {
                return ResponseFuture::ready(Err(Error::closed("the RabbitMQ publisher is closed")));
            }
        };
        let inner = self.inner.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let _permit = permit;
                let lost = session.lost.clone();
                let work = async {
                    let channels = &session.value.channels;
                    let channel = &channels[inner.next.fetch_add(1, Ordering::Relaxed) % channels.len()];
                    let options = BasicPublishOptions {
                        mandatory: inner.options.mandatory,
                        immediate: false,
                    };
                    let body: &[u8] = event.data().map_or(&[], |b| b.as_ref());
                    let failed = |e: lapin::Error, what: &str| {
                        if breaks_channel(&e) && !channel.status().connected() {
                            inner.link.invalidate(session.generation);
                        }
                        map_lapin_error(&e, what)
                    };
                    let confirm = channel
                        .basic_publish(
                            inner.exchange.clone(),
                            routing_key.clone(),
                            options,
                            body,
                            properties,
                        )
                        .await
                        .map_err(|e| failed(e, "publish"))?;
                    let receipt =
                        Receipt::new(routing_key.as_str(), &event).with_stream(inner.stream.clone());
                    if !inner.options.confirms {
                        return Ok(receipt);
                    }
                    match confirm.await.map_err(|e| failed(e, "publisher confirm"))? {
                    Confirmation::Ack(None) | Confirmation::NotRequested => Ok(receipt),
                    Confirmation::Ack(Some(returned)) => Err(Error::new(
                        ErrorKind::Rejected,
                        format!(
                            "no queue is bound for routing key {:?} on exchange {:?} ({} {})",
                            routing_key.as_str(),
                            inner.exchange.as_str(),
                            returned.reply_code,
                            returned.reply_text
                        ),
                    )
                    .with_event(event)),
                    Confirmation::Nack(_) => Err(Error::new(
                        ErrorKind::Rejected,
                        "the broker nacked the event (a full queue refusing publishes, or an internal error)",
                    )
                    .with_retryable(true)),
                }
                };
                tokio::select! {
                    biased;
                    result = work => result,
                    () = lost.cancelled() => Err(Error::new(
                        ErrorKind::Connection,
                        "the connection was lost before the broker confirmed the event",
                    )),
                }
            }),
        }
    }
}

/// The future of [`RabbitPublisher::call`]: resolves on the publisher
/// confirm.
///
/// # Cancel safety
///
/// Dropping it releases its in-flight slot; the event may still reach the
/// broker.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>,
}

impl ResponseFuture {
    fn ready(result: Result<Receipt, Error>) -> ResponseFuture {
        ResponseFuture {
            inner: Box::pin(std::future::ready(result)),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
