//! JetStream publishing: [`JetStreamPublisher`].

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::PollSemaphore;
use tower_service::Service;
use watchtower::batch::Pipelined;
use watchtower::trace::PublishTrace;
use watchtower::{Error, ErrorKind, Event, Receipt, Transport};

use crate::client::NatsClient;
use crate::config::WhenDisconnected;
use crate::publisher::{ResponseFuture, Step, core_publish_error, poll_connection, poll_now};
use crate::subject::{SubjectCache, SubjectTemplate};
use crate::wire::{ContentMode, Encoded, Encoder};

/// Publishes awaiting their acknowledgement at once, unless set.
const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Publishes events to JetStream and awaits each PubAck; made by
/// [`NatsClient::jetstream_publisher`].
///
/// Each event goes, as a structured-mode CloudEvent (or binary mode, see
/// [`content_mode`](Self::content_mode)), to the subject its
/// [`SubjectTemplate`] gives; a stream must capture that subject. The
/// `Nats-Msg-Id` header carries the event id, so a retried publish within
/// the stream's duplicate window is stored once (the receipt then says
/// [`duplicate`](Receipt::duplicate)). The receipt carries the stream's
/// name and the sequence it stored the event at.
///
/// Concurrent callers pipeline: `call` hands the message to the connection
/// at once when the client's outgoing queue has room (so the stream stores
/// events in the order of the calls), without a flush or a lock, and each
/// call's future then awaits its own acknowledgement; up to
/// [`max_in_flight`](Self::max_in_flight) publishes wait at once.
/// `poll_ready` reserves one of those slots (and is pending while the
/// window is full or the connection is down). A future dropped before its
/// acknowledgement came gives the slot back; the event may still be stored.
///
/// # Duplicates
///
/// A caller told [`ErrorKind::Timeout`] or [`ErrorKind::Connection`] (or
/// whose own timeout fired while it waited for the PubAck) cannot know
/// whether the stream stored its event; a message handed to the client
/// while the connection was down goes out when it comes back. Retrying it
/// is safe within the stream's duplicate window (`duplicate_window`, two
/// minutes by default): the `Nats-Msg-Id` header carries the event id, the
/// server stores the event once and answers the retry with
/// [`duplicate`](Receipt::duplicate) set. A retry later than the window
/// stores it again; a consumer that must not act twice can then skip event
/// ids it has handled.
///
/// # Errors
///
/// [`ErrorKind::Timeout`] when no acknowledgement came within the request
/// timeout (the event may be stored: retry it, deduplication makes that
/// safe); [`ErrorKind::Connection`] when the connection dropped before the
/// acknowledgement came (callers waiting are told at once), or the answer
/// was not an acknowledgement;
/// [`ErrorKind::Rejected`] when no stream captures the subject or the
/// stream refused the event; [`ErrorKind::Encode`] and
/// [`ErrorKind::InvalidTopic`] for events that cannot be sent at all.
///
/// # Example
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_nats::{NatsClient, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// let mut publisher = client
///     .jetstream_publisher()
///     .expected_stream("ORDERS")
///     .max_in_flight(256);
/// let receipt = publisher.publish(Event::new("order.paid", serde_json::json!({"id": 7}))).await?;
/// assert_eq!(receipt.stream.as_deref(), Some("ORDERS"));
/// # Ok(()) }
/// ```
pub struct JetStreamPublisher {
    client: NatsClient,
    subject: SubjectTemplate,
    subjects: SubjectCache,
    encoder: Encoder,
    expected_stream: Option<Arc<str>>,
    deduplicate: bool,
    window: PollSemaphore,
    max_in_flight: usize,
    permit: Option<OwnedSemaphorePermit>,
    recheck: Option<Pin<Box<Sleep>>>,
    /// Opening the connection's acknowledgement inbox, by the first
    /// `poll_ready` that finds it closed.
    opening: Option<Step>,
}

impl JetStreamPublisher {
    /// A publisher on `client`'s connection, for
    /// [`NatsClient::jetstream_publisher`].
    pub(crate) fn new(client: NatsClient) -> JetStreamPublisher {
        JetStreamPublisher {
            client,
            subject: SubjectTemplate::topic(),
            subjects: SubjectCache::default(),
            encoder: Encoder::default(),
            expected_stream: None,
            deduplicate: true,
            window: PollSemaphore::new(Arc::new(Semaphore::new(DEFAULT_MAX_IN_FLIGHT))),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            permit: None,
            recheck: None,
            opening: None,
        }
    }

    /// Publishes to the subject `template` gives instead of the event's
    /// topic.
    pub fn subject_template(mut self, template: SubjectTemplate) -> Self {
        self.subject = template;
        self.subjects = SubjectCache::default();
        self
    }

    /// Writes events in `mode`. Default [`ContentMode::Structured`]: the
    /// event as one JSON object, with `Nats-Msg-Id` as the only header (see
    /// the [crate docs](crate#wire-format)).
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.encoder.mode = mode;
        self
    }

    /// Asks the server to store events only in the stream named `stream`
    /// (`Nats-Expected-Stream`), rejecting them otherwise.
    pub fn expected_stream(mut self, stream: impl Into<Arc<str>>) -> Self {
        self.expected_stream = Some(stream.into());
        self
    }

    /// Whether each event carries its id as `Nats-Msg-Id`, so that the
    /// stream stores a retried event once within its duplicate window.
    /// Default `true`.
    ///
    /// With `false`, a structured-mode event goes out with no header at all,
    /// as a raw publish of its body: the server skips its duplicate
    /// tracking and the client builds no header map, which is most of what
    /// JetStream publishing costs beyond the raw client (see the
    /// [crate docs](crate#wire-format)); a retry after a lost
    /// acknowledgement may then store the event twice. For a stream whose
    /// consumers deduplicate by event id themselves, or whose publishers
    /// never retry.
    pub fn deduplicate(mut self, on: bool) -> Self {
        self.deduplicate = on;
        self
    }

    /// At most `n` publishes (at least 1) await their acknowledgement at
    /// once, across this publisher and its clones. Default 1024: enough to
    /// keep a local server busy, without unbounded memory.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        self.window = PollSemaphore::new(Arc::new(Semaphore::new(n)));
        self.max_in_flight = n;
        self.permit = None;
        self
    }

    /// Publishes awaiting their acknowledgement now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.window.available_permits()
    }

    /// The connection.
    pub fn client(&self) -> &NatsClient {
        &self.client
    }

    /// This publisher as a batch publisher, a `Service<Vec<Event>>` (see
    /// [`watchtower::batch`]): every publish of a batch is handed to the
    /// connection at once, in order, and the PubAcks are awaited together.
    /// Each event takes a place in the [in-flight
    /// window](Self::max_in_flight) like a call of its own (a batch larger
    /// than the window waits for the acknowledgements of its first events)
    /// and is answered with its receipt or its own error (a subject no
    /// stream captures, a payload over the server's limit).
    ///
    /// ```no_run
    /// use watchtower::{Event, PublishBatchExt};
    /// use watchtower_nats::{NatsClient, NatsConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
    /// let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
    /// let mut batches = client.jetstream_publisher().batched();
    /// let events = (0..100).map(|n| Event::new("order.paid", serde_json::json!({"n": n}))).collect();
    /// for answer in batches.publish_batch(events).await? {
    ///     answer?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn batched(self) -> Pipelined<JetStreamPublisher> {
        Pipelined::new(self)
    }
}

impl Clone for JetStreamPublisher {
    fn clone(&self) -> Self {
        JetStreamPublisher {
            client: self.client.clone(),
            subject: self.subject.clone(),
            subjects: self.subjects.clone(),
            encoder: self.encoder.clone(),
            expected_stream: self.expected_stream.clone(),
            deduplicate: self.deduplicate,
            window: self.window.clone(),
            max_in_flight: self.max_in_flight,
            permit: None,
            recheck: None,
            opening: None,
        }
    }
}

impl fmt::Debug for JetStreamPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamPublisher")
            .field("client", &self.client)
            .field("subject", &self.subject)
            .field("content_mode", &self.encoder.mode)
            .field("expected_stream", &self.expected_stream)
            .field("max_in_flight", &self.max_in_flight)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Service<Event> for JetStreamPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.permit.is_none() {
            match self.window.poll_acquire(cx) {
                Poll::Ready(Some(permit)) => self.permit = Some(permit),
                Poll::Ready(None) => return Poll::Ready(Err(Error::closed("publisher window closed"))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.client.opened_acks().is_none() {
            let opening = self.opening.get_or_insert_with(|| {
                let client = self.client.clone();
                Box::pin(async move { client.acks().await.map(drop) })
            });
            let opened = std::task::ready!(opening.as_mut().poll(cx));
            self.opening = None;
            opened?;
        }
        poll_connection(&self.client, &mut self.recheck, cx)
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        let Some(permit) = self
            .permit
            .take()
            .or_else(|| self.window.clone_inner().try_acquire_owned().ok())
        else {
            return ResponseFuture::ready(Err(Error::new(
                ErrorKind::Overloaded,
                "JetStream publish window is full (call without poll_ready)",
            )));
        };
        let Some(acks) = self.client.opened_acks() else {
            return ResponseFuture::ready(Err(Error::new(
                ErrorKind::Other,
                "JetStream publisher called before poll_ready",
            )));
        };
        if self.client.when_disconnected() == WhenDisconnected::Fail && !self.client.is_connected() {
            return ResponseFuture::ready(Err(self.client.disconnected_error()));
        }
        let expected_stream = self.expected_stream.as_deref();
        let (topic, subject) = match self.subjects.get(&self.subject, &event) {
            Ok(subject) => subject,
            Err(e) => return ResponseFuture::ready(Err(e)),
        };
        let trace = PublishTrace::start(NatsClient::SYSTEM, &topic, &mut event);
        let Encoded { headers, body } = match self.encoder.encode(&event, self.deduplicate, expected_stream) {
            Ok(encoded) => encoded,
            Err(e) => return ResponseFuture::finished(trace, Err(e)),
        };
        // Registered before it is sent, so that no acknowledgement can
        // come before its caller waits for it.
        let (token, reply, ack) = match acks.register() {
            Ok(registered) => registered,
            Err(e) => return ResponseFuture::finished(trace, Err(e)),
        };
        let receipt = Receipt::new(topic, &event);
        let raw = self.client.raw();
        // The usual case first, without a boxed future: the client's queue
        // has room and the message is handed over now, in place. When it
        // would have to wait, the attempt is dropped, which gives its place
        // in the queue up (nothing was sent), and the publish starts again
        // as an owned future below, before any later call can take a place.
        let sent = {
            let _entered = trace.span().enter();
            let (subject, reply) = (subject.clone(), reply.clone());
            match headers {
                Some(headers) => poll_now(std::pin::pin!(
                    raw.publish_with_reply_and_headers(subject, reply, headers, body)
                )),
                None => poll_now(std::pin::pin!(raw.publish_with_reply(subject, reply, body))),
            }
        };
        match sent {
            Poll::Ready(Ok(())) => return ResponseFuture::jetstream(None, ack, receipt, permit, trace),
            Poll::Ready(Err(e)) => {
                acks.forget(token);
                return ResponseFuture::finished(trace, Err(core_publish_error(&e)));
            }
            Poll::Pending => {}
        }
        // The message went with the attempt (a copy of its body handle
        // would cost a structured body another allocation): encoded again,
        // on this rare path, when the client's queue is full.
        let Encoded { headers, body } = match self.encoder.encode(&event, self.deduplicate, expected_stream) {
            Ok(encoded) => encoded,
            Err(e) => {
                acks.forget(token);
                return ResponseFuture::finished(trace, Err(e));
            }
        };
        drop(event);
        let client = self.client.clone();
        let send: Step = Box::pin(async move {
            let raw = client.raw();
            let sent = match headers {
                Some(headers) => {
                    raw.publish_with_reply_and_headers(subject, reply, headers, body)
                        .await
                }
                None => raw.publish_with_reply(subject, reply, body).await,
            };
            if sent.is_err()
                && let Some(acks) = client.opened_acks()
            {
                acks.forget(token);
            }
            sent.map_err(|e| core_publish_error(&e))
        });
        ResponseFuture::jetstream(Some(send), ack, receipt, permit, trace)
    }
}
