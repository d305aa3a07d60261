//! Core NATS publishing: [`NatsPublisher`], and the [`ResponseFuture`]
//! of every publisher of this crate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;
use tower_service::Service;
use watchtower::trace::PublishTrace;
use watchtower::{Error, ErrorKind, Event, Receipt, Transport};

use crate::client::NatsClient;
use crate::config::WhenDisconnected;
use crate::jetstream::AckReceiver;
use crate::subject::{SubjectCache, SubjectTemplate};
use crate::wire::{ContentMode, Encoded, Encoder};

/// How often a publisher waiting for the connection looks again, in case
/// the connection's "connected" notice was lost.
const RECHECK: Duration = Duration::from_millis(200);

/// Publishes events on core NATS; made by
/// [`NatsClient::publisher`].
///
/// A `tower::Service<Event>` that writes each event to the subject its
/// [`SubjectTemplate`] gives (by default the event's topic), as a
/// structured-mode CloudEvent (one JSON object, no header) or, with
/// [`content_mode`](NatsPublisher::content_mode)`(`[`ContentMode::Binary`]`)`,
/// as `ce-` headers with the data as the body.
///
/// Core NATS is **at-most-once**: the receipt says the client queued the
/// message for the server, not that anyone received it. Use a
/// [`JetStreamPublisher`](crate::JetStreamPublisher) when events must
/// survive.
///
/// `poll_ready` follows the connection: while it is down the publisher is
/// not ready (or, with [`WhenDisconnected::Fail`](crate::WhenDisconnected),
/// calls fail at once with a retryable connection error).
///
/// `call` hands the message to the connection at once when the client's
/// outgoing queue has room (the usual case), so events leave in the order
/// of the calls and the returned future is already resolved; when the
/// queue is full, the future waits for room. A resolved future still takes
/// its unit of tokio's cooperative budget when awaited, as the client's own
/// `publish` does, so that a task publishing in a loop lets the
/// connection's writer run beside it.
///
/// # Example
///
/// ```no_run
/// use watchtower::{Event, PublishExt};
/// use watchtower_nats::{ContentMode, NatsClient, NatsConfig};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
/// let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
/// let mut publisher = client.publisher();
/// let receipt = publisher
///     .publish(Event::new("user.created", serde_json::json!({"user_id": 1})))
///     .await?;
/// assert_eq!(&*receipt.topic, "user.created");
///
/// // Attributes as `ce-` headers, for consumers that route on them.
/// let mut binary = client.publisher().content_mode(ContentMode::Binary);
/// binary.publish(Event::new("user.deleted", serde_json::json!({"user_id": 1}))).await?;
/// # Ok(()) }
/// ```
pub struct NatsPublisher {
    client: NatsClient,
    subject: SubjectTemplate,
    subjects: SubjectCache,
    encoder: Encoder,
    recheck: Option<Pin<Box<Sleep>>>,
}

impl NatsPublisher {
    /// A publisher on `client`'s connection, for [`NatsClient::publisher`].
    pub(crate) fn new(client: NatsClient) -> NatsPublisher {
        NatsPublisher {
            client,
            subject: SubjectTemplate::topic(),
            subjects: SubjectCache::default(),
            encoder: Encoder::default(),
            recheck: None,
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
    /// event as one JSON object and no header, several times faster than
    /// [`ContentMode::Binary`] (see the [crate docs](crate#wire-format)).
    pub fn content_mode(mut self, mode: ContentMode) -> Self {
        self.encoder.mode = mode;
        self
    }

    /// The connection.
    pub fn client(&self) -> &NatsClient {
        &self.client
    }
}

impl Clone for NatsPublisher {
    fn clone(&self) -> Self {
        NatsPublisher {
            client: self.client.clone(),
            subject: self.subject.clone(),
            subjects: self.subjects.clone(),
            encoder: self.encoder.clone(),
            recheck: None,
        }
    }
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("client", &self.client)
            .field("subject", &self.subject)
            .field("content_mode", &self.encoder.mode)
            .finish()
    }
}

/// Readiness shared by the publishers: ready while connected, else pending
/// until the connection is back (woken by the connection's event, or by a
/// periodic recheck).
pub(crate) fn poll_connection(
    client: &NatsClient,
    recheck: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Error>> {
    if client.is_closed() {
        return Poll::Ready(Err(Error::closed("NATS connection closed")));
    }
    if client.when_disconnected() == WhenDisconnected::Fail || client.poll_connected(cx) {
        *recheck = None;
        return Poll::Ready(Ok(()));
    }
    let sleep = recheck.get_or_insert_with(|| Box::pin(tokio::time::sleep(RECHECK)));
    if sleep.as_mut().poll(cx).is_ready() {
        sleep.as_mut().reset(tokio::time::Instant::now() + RECHECK);
        // Registers the waker for the new deadline.
        let _ = sleep.as_mut().poll(cx);
    }
    Poll::Pending
}

impl Service<Event> for NatsPublisher {
    type Response = Receipt;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        poll_connection(&self.client, &mut self.recheck, cx)
    }

    fn call(&mut self, mut event: Event) -> ResponseFuture {
        if self.client.when_disconnected() == WhenDisconnected::Fail && !self.client.is_connected() {
            return ResponseFuture::ready(Err(self.client.disconnected_error().with_event(event)));
        }
        let (topic, subject) = match self.subjects.get(&self.subject, &event) {
            Ok(subject) => subject,
            Err(e) => return ResponseFuture::ready(Err(e)),
        };
        let trace = PublishTrace::start(NatsClient::SYSTEM, &topic, &mut event);
        let Encoded { headers, mut body } = match self.encoder.encode(&event, false, None) {
            Ok(encoded) => encoded,
            Err(e) => return ResponseFuture::finished(trace, Err(e)),
        };
        let receipt = Receipt::new(topic, &event);
        // The usual case first, without a task of its own: the client's
        // queue has room, and the message is handed over now. The future is
        // polled in place, borrowing the connection; when it would have to
        // wait, it is dropped, which gives its place in the queue up (nothing
        // was sent), and the publish starts again as an owned future below,
        // before any later call can take a place. The body goes with the
        // attempt (a structured body is one allocation that a copy of the
        // handle would make two): the rare retry encodes it again.
        // (With a header block, which the client takes by value too, the
        // owned future is the only attempt.)
        if headers.is_none() {
            let sent = {
                let _entered = trace.span().enter();
                poll_now(std::pin::pin!(self.client.raw().publish(subject.clone(), body)))
            };
            if let Poll::Ready(result) = sent {
                return ResponseFuture::finished(
                    trace,
                    match result {
                        Ok(()) => Ok(receipt),
                        Err(e) => Err(core_publish_error(&e)),
                    },
                );
            }
            body = match self.encoder.encode(&event, false, None) {
                Ok(encoded) => encoded.body,
                Err(e) => return ResponseFuture::finished(trace, Err(e)),
            };
        }
        drop(event);
        let client = self.client.clone();
        let fut = Box::pin(async move {
            let raw = client.raw();
            match headers {
                // No header block at all: the client writes a plain PUB.
                None => raw.publish(subject, body).await,
                Some(headers) => raw.publish_with_headers(subject, headers, body).await,
            }
            .map_err(|e| core_publish_error(&e))?;
            Ok(receipt)
        });
        ResponseFuture::start(fut, trace)
    }
}

pub(crate) fn core_publish_error(e: &async_nats::PublishError) -> Error {
    match e.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => Error::new(
            ErrorKind::Rejected,
            "event is larger than the server's max payload",
        ),
        async_nats::client::PublishErrorKind::InvalidSubject => {
            Error::new(ErrorKind::InvalidTopic, "subject rejected by the NATS client")
        }
        async_nats::client::PublishErrorKind::Send => Error::closed("NATS client is closed"),
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Receipt, Error>> + Send>>;
/// A boxed step of a JetStream publish that succeeds or fails: handing it
/// to the connection when its queue was full, opening the acknowledgement
/// inbox.
pub(crate) type Step = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Polls `fut` once with a waker that does nothing: the eager start of a
/// publish in `call`. The tokio primitives a publish waits on (the client's
/// queue, timers) take the waker of every poll, so the caller's first poll
/// of a future left pending registers the real one.
///
/// The poll is outside tokio's cooperative budget: a caller that has used
/// its budget up would otherwise see every later publish of the same task
/// poll left pending, and handed over out of call order.
pub(crate) fn poll_now<F: Future + ?Sized>(fut: Pin<&mut F>) -> Poll<F::Output> {
    let mut fut = std::pin::pin!(tokio::task::unconstrained(fut));
    fut.as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
}

/// The future of a publish: resolves when the message is handed to the
/// connection (core NATS) or acknowledged by the stream (JetStream).
pub struct ResponseFuture {
    state: State,
}

enum State {
    Done(Option<Result<Receipt, Error>>),
    /// A core publish waiting for room in the client's queue.
    Queued {
        fut: BoxFuture,
        trace: Option<PublishTrace>,
    },
    /// A JetStream publish: being sent (when the connection's queue was
    /// full), then awaiting its PubAck.
    JetStream {
        send: Option<Step>,
        ack: AckReceiver,
        receipt: Option<Receipt>,
        trace: Option<PublishTrace>,
        _permit: Option<OwnedSemaphorePermit>,
    },
}

impl ResponseFuture {
    pub(crate) fn ready(result: Result<Receipt, Error>) -> ResponseFuture {
        ResponseFuture {
            state: State::Done(Some(result)),
        }
    }

    /// A publish whose outcome is known: recorded on its trace now.
    pub(crate) fn finished(trace: PublishTrace, result: Result<Receipt, Error>) -> ResponseFuture {
        trace.finish(&result);
        ResponseFuture::ready(result)
    }

    /// Starts `fut` now; resolved at once unless it has to wait.
    fn start(mut fut: BoxFuture, trace: PublishTrace) -> ResponseFuture {
        let first = {
            let _entered = trace.span().enter();
            poll_now(fut.as_mut())
        };
        match first {
            Poll::Ready(result) => ResponseFuture::finished(trace, result),
            Poll::Pending => ResponseFuture {
                state: State::Queued {
                    fut,
                    trace: Some(trace),
                },
            },
        }
    }

    /// A JetStream publish: `send`, if it is still to be handed to the
    /// connection, then its acknowledgement on `ack`, which completes
    /// `receipt`; holds `permit` until then.
    pub(crate) fn jetstream(
        send: Option<Step>,
        ack: AckReceiver,
        receipt: Receipt,
        permit: OwnedSemaphorePermit,
        trace: PublishTrace,
    ) -> ResponseFuture {
        let mut future = ResponseFuture {
            state: State::JetStream {
                send,
                ack,
                receipt: Some(receipt),
                trace: Some(trace),
                _permit: Some(permit),
            },
        };
        // Started now, as a publish handed over in `call` is.
        if let State::JetStream {
            send: send @ Some(_),
            trace,
            ..
        } = &mut future.state
        {
            let sent = {
                let _entered = trace.as_ref().map(|t| t.span().enter());
                send.as_mut().map(|s| poll_now(s.as_mut()))
            };
            match sent {
                Some(Poll::Ready(Ok(()))) => *send = None,
                Some(Poll::Ready(Err(e))) => {
                    let failed = Err(e);
                    if let Some(trace) = trace.take() {
                        trace.finish(&failed);
                    }
                    return ResponseFuture::ready(failed);
                }
                _ => {}
            }
        }
        future
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Done(result) => {
                // A publish handed over in `call` counts against the task's
                // cooperative budget, as the client's own `publish` does:
                // a task publishing in a loop then yields now and then, and
                // the connection task it woke gets to write (on another
                // worker) while it goes on, instead of only once the queue
                // is full. The message went already; only the answer waits.
                std::task::ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
                Poll::Ready(result.take().unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Other,
                        "publish future polled after completion",
                    ))
                }))
            }
            State::Queued { fut, trace } => {
                let result = {
                    let _entered = trace.as_ref().map(|t| t.span().enter());
                    std::task::ready!(fut.as_mut().poll(cx))
                };
                if let Some(trace) = trace.take() {
                    trace.finish(&result);
                }
                Poll::Ready(result)
            }
            State::JetStream {
                send,
                ack,
                receipt,
                trace,
                ..
            } => {
                let entered = trace.as_ref().map(|t| t.span().enter());
                if let Some(sending) = send {
                    match std::task::ready!(sending.as_mut().poll(cx)) {
                        Ok(()) => *send = None,
                        Err(e) => {
                            let result = Err(e);
                            drop(entered);
                            if let Some(trace) = trace.take() {
                                trace.finish(&result);
                            }
                            self.state = State::Done(None);
                            return Poll::Ready(result);
                        }
                    }
                }
                let result = match std::task::ready!(Pin::new(ack).poll(cx)) {
                    Ok(Ok(ack)) => match receipt.take() {
                        Some(receipt) => Ok(receipt
                            .with_stream(ack.stream)
                            .with_sequence(ack.sequence)
                            .with_duplicate(ack.duplicate)),
                        None => Err(Error::new(
                            ErrorKind::Other,
                            "publish future polled after completion",
                        )),
                    },
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(Error::new(
                        ErrorKind::Connection,
                        "connection lost before the JetStream acknowledgement",
                    )),
                };
                drop(entered);
                if let Some(trace) = trace.take() {
                    trace.finish(&result);
                }
                // Releases the in-flight slot now, not when the future is
                // dropped.
                self.state = State::Done(None);
                Poll::Ready(result)
            }
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
