//! [`NatsRequester`]: request–reply over NATS inboxes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::StatusCode;
use futures_util::StreamExt as _;
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tower_service::Service;
use watchtower::request::{Correlator, NoResponders, from_reply};
use watchtower::trace::PublishTrace;
use watchtower::{Error, Event, Transport as _, ext};

use crate::client::NatsClient;
use crate::publisher::{core_publish_error, poll_connection};
use crate::subject::{SubjectCache, SubjectTemplate};
use crate::wire::{self, ContentMode, Encoded, Encoder};

/// Sends requests over core NATS and waits for their replies: a
/// `Service<Event, Response = Event>`, made by [`NatsClient::requester`].
///
/// The requester holds one wildcard subscription, `_INBOX.<unique>.*`, on
/// the client's connection (as async-nats's own request muxer does), and
/// sends each request with a reply subject of its own under it,
/// `_INBOX.<unique>.<n>`, both as the NATS reply subject and in the
/// event's [`replyto`](watchtower::ext::REPLY_TO) extension. The reply is
/// a CloudEvent published to that subject: by a
/// `watchtower_toolkit::request::Responder` served on the request's
/// topic, or by any NATS client that answers with `msg.respond`. The
/// subject's last token is the correlation; the reply's `correlationid`
/// (the request's id) is not needed to match it.
///
/// * A request nobody subscribes to fails at once: the server answers with
///   a no-responders status, and the caller gets a retryable
///   [`Rejected`](watchtower::ErrorKind::Rejected) whose source is a
///   [`NoResponders`].
/// * No reply within the [timeout](NatsRequester::timeout):
///   [`Timeout`](watchtower::ErrorKind::Timeout), the caller's entry
///   removed; a reply that comes later is dropped and counted
///   ([`late_replies`](NatsRequester::late_replies)).
/// * A responder's error reply: an error of its kind (see
///   [`watchtower::request`]).
///
/// Cheap to clone: clones share the inbox subscription, which ends when
/// the last clone is dropped. Events with a delivery time are refused, as
/// by the [`NatsPublisher`](crate::NatsPublisher).
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use tower::{Service, ServiceExt};
/// use watchtower::Event;
/// use watchtower_nats::{NatsClient, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// let mut requester = client.requester().await?.timeout(Duration::from_secs(2));
/// let reply = requester
///     .ready()
///     .await?
///     .call(Event::new("math.add", serde_json::json!([2, 3])))
///     .await?;
/// println!("{}", reply.json::<i64>()?);
/// # Ok(()) }
/// ```
pub struct NatsRequester {
    client: NatsClient,
    shared: Arc<Shared>,
    timeout: Duration,
    subjects: SubjectCache,
    encoder: Encoder,
    recheck: Option<Pin<Box<Sleep>>>,
}

struct Shared {
    pending: Correlator,
    /// `_INBOX.<unique>`; a request's reply subject adds `.<n>`.
    prefix: String,
    next: AtomicU64,
    /// Dropped with the last requester, which ends the inbox task.
    _stop: oneshot::Sender<()>,
}

impl Clone for NatsRequester {
    fn clone(&self) -> Self {
        NatsRequester {
            client: self.client.clone(),
            shared: self.shared.clone(),
            timeout: self.timeout,
            subjects: self.subjects.clone(),
            encoder: self.encoder.clone(),
            recheck: None,
        }
    }
}

impl fmt::Debug for NatsRequester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsRequester")
            .field("inbox", &self.shared.prefix)
            .field("timeout", &self.timeout)
            .field("in_flight", &self.shared.pending.in_flight())
            .finish_non_exhaustive()
    }
}

impl NatsRequester {
    /// Subscribes to the requester's inbox; see [`NatsClient::requester`].
    pub(crate) async fn open(client: NatsClient) -> Result<NatsRequester, Error> {
        let prefix = client.raw().new_inbox();
        let mut inbox =
            client.raw().subscribe(format!("{prefix}.*")).await.map_err(|e| {
                Error::new(watchtower::ErrorKind::Connection, format!("inbox subscribe: {e}"))
            })?;
        let pending = Correlator::new();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let answers = pending.clone();
        let skip = prefix.len() + 1;
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = &mut stopped => break,
                    next = inbox.next() => match next {
                        Some(message) => message,
                        None => break,
                    },
                };
                let Some(token) = message.subject.get(skip..) else {
                    continue;
                };
                let answer = if message.status == Some(StatusCode::NO_RESPONDERS) {
                    // The server does not say which subject had none; the
                    // caller's error names it (see `call`).
                    Err(NoResponders::error(""))
                } else {
                    match wire::decode(&message.subject, message.headers.as_ref(), message.payload) {
                        Ok(reply) => from_reply(reply),
                        Err(poison) => Err(poison.error),
                    }
                };
                answers.answer(token, answer);
            }
            answers.fail_all(&Error::closed("the NATS inbox subscription ended"));
        });
        Ok(NatsRequester {
            client,
            shared: Arc::new(Shared {
                pending,
                prefix,
                next: AtomicU64::new(0),
                _stop: stop,
            }),
            timeout: Duration::from_secs(10),
            subjects: SubjectCache::default(),
            encoder: Encoder::default(),
            recheck: None,
        })
    }

    /// How long a caller waits for its reply. Default 10 s, async-nats's
    /// request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Writes requests in `mode`. Default [`ContentMode::Structured`], as
    /// the publisher.
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.encoder.mode = mode;
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

impl Service<Event> for NatsRequester {
    type Response = Event;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Event, Error>> + Send + 'static>>;

    /// Ready while connected, as the publisher.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        poll_connection(&self.client, &mut self.recheck, cx)
    }

    fn call(&mut self, mut event: Event) -> Self::Future {
        let token = self.shared.next.fetch_add(1, Ordering::Relaxed).to_string();
        let inbox = format!("{}.{token}", self.shared.prefix);
        let prepared = self
            .subjects
            .get(&SubjectTemplate::topic(), &event)
            .and_then(|subject| {
                event.set_extension(ext::REPLY_TO, inbox.as_str())?;
                Ok(subject)
            });
        let (topic, subject) = match prepared {
            Ok(subject) => subject,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let trace = PublishTrace::start(NatsClient::SYSTEM, &topic, &mut event);
        let encoded = self.encoder.encode(&event, false, None);
        let waiter = match encoded.and_then(|encoded| Ok((encoded, self.shared.pending.register(token)?))) {
            Ok(ready) => ready,
            Err(e) => {
                let failed = Err(e);
                trace.finish::<Event>(&failed);
                return Box::pin(std::future::ready(failed));
            }
        };
        let (Encoded { headers, body }, waiter) = waiter;
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let sent = async {
                let raw = client.raw();
                let sent = match headers {
                    None => raw.publish_with_reply(subject, inbox, body).await,
                    Some(headers) => {
                        raw.publish_with_reply_and_headers(subject, inbox, headers, body)
                            .await
                    }
                }
                .map_err(|e| core_publish_error(&e));
                trace.finish(&sent);
                sent
            };
            waiter.wait(sent, timeout).await.map_err(|e| {
                if NoResponders::is(&e) {
                    NoResponders::error(&topic)
                } else {
                    e
                }
            })
        })
    }
}
