//! [`RabbitRequester`]: request–reply over RabbitMQ's direct reply-to.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection};
use tokio::sync::oneshot;
use tower::Service;
use watchtower::request::{Correlator, NoResponders, from_reply};
use watchtower::trace::PublishTrace;
use watchtower::{Error, ErrorKind, Event, ext};

use crate::config::{ContentMode, PublishOptions, RabbitConfig, short};
use crate::connection::{self, map_lapin_error};
use crate::wire;

/// The pseudo-queue of direct reply-to: a requester consumes from it, and
/// names it as a request's `reply_to`; the broker rewrites that into an
/// address of the requester's channel.
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How the broker's direct reply-to addresses begin: an event whose topic
/// is one goes to the default exchange.
pub(crate) const REPLY_ADDRESS_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Sends requests to the exchange and waits for their replies over
/// RabbitMQ's direct reply-to: a `Service<Event, Response = Event>`, made
/// by [`RabbitClient::requester`](crate::RabbitClient::requester).
///
/// The requester has a connection and a channel of its own, consumes
/// `amq.rabbitmq.reply-to` on that channel without acks, and publishes each
/// request on it with `reply_to` set to that pseudo-queue and
/// `correlation_id` to the event id, `mandatory`, with publisher confirms.
/// The broker hands the responder an address of the requester's channel,
/// which the subscriber puts in the request's
/// [`replyto`](watchtower::ext::REPLY_TO) extension: a
/// `watchtower_toolkit::request::Responder` answers there through a
/// [`RabbitPublisher`](crate::RabbitPublisher) (which sends events for a
/// direct reply-to address to the default exchange), and so does any AMQP
/// client that answers to `reply_to`. Replies are matched by
/// `correlation_id` (or the reply's `correlationid` extension).
///
/// * A request no binding routes fails at once with a retryable
///   [`Rejected`](watchtower::ErrorKind::Rejected) whose source is a
///   [`NoResponders`] (the broker returned it). A request routed to a
///   queue that nobody consumes waits for its timeout: the queue keeps it.
/// * No reply within the [timeout](RabbitRequester::timeout):
///   [`Timeout`](watchtower::ErrorKind::Timeout), the caller's entry
///   removed; a reply that comes later is dropped and counted
///   ([`late_replies`](RabbitRequester::late_replies)).
/// * A responder's error reply: an error of its kind (see
///   [`watchtower::request`]).
///
/// Requests are not persistent (a reply goes to a channel, which does not
/// outlive a broker restart). The requester does not reconnect: when its
/// connection drops, the callers waiting get
/// [`Closed`](watchtower::ErrorKind::Closed), later calls too, and a new
/// requester is made. Cheap to clone; the connection closes with the last
/// clone.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{Service, ServiceExt};
/// use watchtower::Event;
/// use watchtower_rabbitmq::{RabbitClient, RabbitConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = RabbitClient::connect(RabbitConfig::local()).await?;
/// let mut requester = client.requester().await?.timeout(Duration::from_secs(2));
/// let reply = requester
///     .ready()
///     .await?
///     .call(Event::new("math.add", serde_json::json!([2, 3])))
///     .await?;
/// println!("{}", reply.json::<i64>()?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitRequester {
    shared: Arc<Shared>,
    timeout: Duration,
}

struct Shared {
    channel: Channel,
    exchange: ShortString,
    options: PublishOptions,
    mode: ContentMode,
    pending: Correlator,
    /// Dropped with the last requester, which closes the connection.
    _stop: oneshot::Sender<()>,
}

impl fmt::Debug for RabbitRequester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitRequester")
            .field("exchange", &self.shared.exchange.as_str())
            .field("timeout", &self.timeout)
            .field("in_flight", &self.shared.pending.in_flight())
            .finish_non_exhaustive()
    }
}

impl RabbitRequester {
    /// Connects and starts consuming replies; see
    /// [`RabbitClient::requester`](crate::RabbitClient::requester).
    pub(crate) async fn open(config: RabbitConfig) -> Result<RabbitRequester, Error> {
        config.validate()?;
        let exchange = short("exchange name", &config.exchange)?;
        let options = PublishOptions::new().persistent(false);
        let mode = options.content_mode_for(config.exchange_kind)?;
        let connection = connection::open(&config).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| map_lapin_error(&e, "open channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| map_lapin_error(&e, "confirm.select"))?;
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                format!("watchtower-requester-{}", uuid::Uuid::now_v7()).into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_lapin_error(&e, "consume direct reply-to"))?;
        let pending = Correlator::new();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let answers = pending.clone();
        tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    _ = &mut stopped => break,
                    next = replies.next() => match next {
                        Some(Ok(delivery)) => delivery,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "the direct reply-to consumer failed");
                            break;
                        }
                        None => break,
                    },
                };
                let key = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|k| k.to_string());
                let (decoded, _) = wire::decode(
                    delivery.routing_key.as_str(),
                    &delivery.properties,
                    Bytes::from(delivery.data),
                );
                let key = key.or_else(|| {
                    decoded
                        .event
                        .as_ref()
                        .ok()
                        .and_then(|e| e.extension(ext::CORRELATION_ID).map(str::to_owned))
                });
                match key {
                    Some(key) => {
                        answers.answer(&key, decoded.event.and_then(from_reply));
                    }
                    None => tracing::debug!("a reply without a correlation id; dropping it"),
                }
            }
            answers.fail_all(&Error::closed("the RabbitMQ requester's connection closed"));
            close(&connection).await;
        });
        Ok(RabbitRequester {
            shared: Arc::new(Shared {
                channel,
                exchange,
                options,
                mode,
                pending,
                _stop: stop,
            }),
            timeout: Duration::from_secs(10),
        })
    }

    /// How long a caller waits for its reply. Default 10 s, as the other
    /// requesters.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Requests waiting for their reply now.
    pub fn in_flight(&self) -> usize {
        self.shared.pending.in_flight()
    }

    /// Replies that came after their caller stopped waiting: dropped, and
    /// counted here.
    pub fn late_replies(&self) -> u64 {
        self.shared.pending.late_replies()
    }
}

async fn close(connection: &Connection) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "closing".into())).await;
    }
}

/// What the broker said of one request: a returned request (whichever
/// caller's it is: lapin may hand it to another publish's confirm) fails
/// its caller with [`NoResponders`]; a nack or a failed confirm fails this
/// one.
fn settle(pending: &Correlator, id: &str, confirmed: Result<Confirmation, lapin::Error>) {
    let (returned, failure) = match confirmed {
        Ok(Confirmation::Ack(returned)) => (returned, None),
        Ok(Confirmation::Nack(returned)) => (
            returned,
            Some(Error::new(ErrorKind::Rejected, "the broker nacked the request").with_retryable(true)),
        ),
        Ok(Confirmation::NotRequested) => (None, None),
        Err(e) => (None, Some(map_lapin_error(&e, "request confirm"))),
    };
    if let Some(returned) = returned
        && let Some(key) = returned.delivery.properties.correlation_id()
    {
        pending.answer(
            key.as_str(),
            Err(NoResponders::error(returned.delivery.routing_key.as_str())),
        );
    }
    if let Some(failure) = failure {
        pending.answer(id, Err(failure));
    }
}

impl Service<Event> for RabbitRequester {
    type Response = Event;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Event, Error>> + Send + 'static>>;

    /// Ready while the requester's channel is open.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.shared.channel.status().connected() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err(Error::closed("the RabbitMQ requester's channel is closed")))
        }
    }

    fn call(&mut self, mut event: Event) -> Self::Future {
        let trace = PublishTrace::start(
            <crate::RabbitClient as watchtower::Transport>::SYSTEM,
            &event.shared_topic(),
            &mut event,
        );
        let shared = self.shared.clone();
        let prepared = wire::encode(&event, &shared.options, shared.mode).and_then(|(properties, body)| {
            let id = short("correlation id", event.id())?;
            let properties = properties
                .with_reply_to(DIRECT_REPLY_TO.into())
                .with_correlation_id(id);
            Ok((
                properties,
                body,
                short("routing key", event.topic())?,
                shared.pending.register(event.id())?,
            ))
        });
        let (properties, body, routing_key, waiter) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                let failed = Err(e);
                trace.finish::<Event>(&failed);
                return Box::pin(std::future::ready(failed));
            }
        };
        let timeout = self.timeout;
        Box::pin(async move {
            let id = waiter.key().to_owned();
            let sent = async {
                let options = BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                };
                let sent = shared
                    .channel
                    .basic_publish(shared.exchange.clone(), routing_key, options, &body, properties)
                    .await
                    .map_err(|e| map_lapin_error(&e, "publish the request"));
                trace.finish(&sent);
                // The confirm is awaited apart from the caller, so that a
                // returned request reaches its own caller whichever confirm
                // carries it, and even when this caller stopped waiting.
                let confirm = sent?;
                let pending = shared.pending.clone();
                tokio::spawn(async move { settle(&pending, &id, confirm.await) });
                Ok(())
            };
            waiter.wait(sent, timeout).await
        })
    }
}
