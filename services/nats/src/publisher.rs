//! Core NATS publishing: [`NatsPublisher`].
//!
//! A [`NatsPublisher`] is a `tower::Service<Event>` that writes each event
//! as a binary-mode CloudEvent (`ce-` headers, data as the body) to the
//! subject its [`SubjectTemplate`] gives (by default the event's topic).
//!
//! Core NATS is **at-most-once**: the receipt says the client queued the
//! message for the server, not that anyone received it. Use
//! [`JetStreamPublisher`](crate::JetStreamPublisher) when events must
//! survive.
//!
//! `poll_ready` follows the connection: while it is down the publisher is
//! not ready (or, with [`WhenDisconnected::Fail`](crate::WhenDisconnected),
//! calls fail at once with a retryable connection error).
//!
//! # Example
//!
//! ```no_run
//! use watchtower::{Event, PublishExt};
//! use watchtower_nats::{NatsConfig, NatsPublisher};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), watchtower::Error> {
//! let mut publisher = NatsPublisher::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let receipt = publisher
//!     .publish(Event::new("user.created", serde_json::json!({"user_id": 1})))
//!     .await?;
//! assert_eq!(&*receipt.topic, "user.created");
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;
use tracing::Instrument as _;
use watchtower::{Error, ErrorKind, Event, Receipt};

use crate::client::NatsClient;
use crate::config::{NatsConfig, WhenDisconnected};
use crate::subject::{SubjectCache, SubjectTemplate};
use crate::wire;

/// How often a publisher waiting for the connection looks again, in case
/// the connection's "connected" notice was lost.
const RECHECK: Duration = Duration::from_millis(200);

/// Publishes events on core NATS. See the [module docs](self).
pub struct NatsPublisher {
    client: NatsClient,
    subject: SubjectTemplate,
    subjects: SubjectCache,
    recheck: Option<Pin<Box<Sleep>>>,
}

impl NatsPublisher {
    /// A publisher on an existing connection.
    pub fn new(client: NatsClient) -> NatsPublisher {
        NatsPublisher {
            client,
            subject: SubjectTemplate::topic(),
            subjects: SubjectCache::default(),
            recheck: None,
        }
    }

    /// Connects and makes a publisher.
    ///
    /// # Errors
    ///
    /// As [`NatsClient::connect`].
    pub async fn connect(config: NatsConfig) -> Result<NatsPublisher, Error> {
        Ok(NatsPublisher::new(NatsClient::connect(config).await?))
    }

    /// Publishes to the subject `template` gives instead of the event's
    /// topic.
    pub fn subject_template(mut self, template: SubjectTemplate) -> Self {
        self.subject = template;
        self.subjects = SubjectCache::default();
        self
    }

    /// The connection.
    pub fn client(&self) -> &NatsClient {
        &self.client
    }

    /// Checks the connection. See [`NatsClient::health`].
    ///
    /// # Errors
    ///
    /// As [`NatsClient::health`].
    pub async fn health(&self) -> Result<(), Error> {
        self.client.health().await
    }
}

impl Clone for NatsPublisher {
    fn clone(&self) -> Self {
        NatsPublisher {
            client: self.client.clone(),
            subject: self.subject.clone(),
            subjects: self.subjects.clone(),
            recheck: None,
        }
    }
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("client", &self.client)
            .field("subject", &self.subject)
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

    fn call(&mut self, event: Event) -> ResponseFuture {
        if !self.client.is_connected() && self.client.when_disconnected() == WhenDisconnected::Fail {
            return ResponseFuture::ready(Err(self.client.disconnected_error().with_event(event)));
        }
        let prepared = self.subjects.get(&self.subject, &event).and_then(|subject| {
            let headers = wire::headers(&event, false)?;
            Ok((subject, headers))
        });
        let ((topic, subject), headers) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return ResponseFuture::ready(Err(e)),
        };
        let span = watchtower::trace::publish_span("nats", &topic, &event);
        let client = self.client.clone();
        let payload = event.data().cloned().unwrap_or_default();
        let receipt = Receipt::new(topic, &event);
        let fut = async move {
            client
                .raw()
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| core_publish_error(&e))?;
            Ok(receipt)
        };
        ResponseFuture::boxed(Box::pin(fut.instrument(span)))
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

pin_project! {
    /// The future of a publish: resolves when the message is handed to the
    /// connection (core NATS) or acknowledged by the stream (JetStream).
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Ready { result: Option<Result<Receipt, Error>> },
        Running { fut: BoxFuture },
    }
}

impl ResponseFuture {
    pub(crate) fn ready(result: Result<Receipt, Error>) -> ResponseFuture {
        ResponseFuture {
            state: State::Ready { result: Some(result) },
        }
    }

    pub(crate) fn boxed(fut: BoxFuture) -> ResponseFuture {
        ResponseFuture {
            state: State::Running { fut },
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Receipt, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { result } => Poll::Ready(result.take().unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Other,
                    "publish future polled after completion",
                ))
            })),
            StateProj::Running { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
