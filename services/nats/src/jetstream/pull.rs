//! Pulling messages from a JetStream consumer.
//!
//! A pull consumer sends messages only against pull requests: each asks for
//! up to `batch` messages and waits on the server for `expires`. The stream
//! here keeps enough asked for to stay fed: it asks again once fewer than
//! half a batch are still owed. A request is counted as owed the moment it
//! is made, before it is sent, so the messages answering it can never
//! arrive before it is counted; what arrives, and what the server says it
//! will no longer send (a request that expired or was cut short carries
//! the count), is taken off.
//!
//! Counting late is what stalls a consumer: messages that arrive before
//! their request was counted are lost to the count, the stream believes
//! more is owed than the server will send, and asks for nothing until a
//! request expires. The same stall follows any request lost on its way
//! (a connection that dropped, a consumer leader that changed): so the
//! count restarts from nothing when the connection comes back, and when
//! the server's idle heartbeats stop while messages are owed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::{Message, StatusCode, Subject};
use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, Fuse};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use watchtower::{Error, ErrorKind};

/// How long the stream waits before asking again when a pull request
/// could not be sent or no consumer answered it.
const PAUSE: Duration = Duration::from_millis(250);

/// Heartbeat checks in a row with nothing received before the requests
/// are taken as lost.
const MISSED_HEARTBEATS: u8 = 2;

/// What a pull stream asks for.
#[derive(Debug, Clone)]
pub(crate) struct PullSettings {
    /// Messages asked for per request.
    pub(crate) batch: usize,
    /// How long a request waits on the server.
    pub(crate) expires: Duration,
    /// How often the server says it is there while a request waits with
    /// nothing to send.
    pub(crate) heartbeat: Duration,
}

impl PullSettings {
    /// The pull request's body, as the server reads it.
    fn request(&self) -> Bytes {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Bytes::from(format!(
            r#"{{"batch":{},"expires":{},"idle_heartbeat":{}}}"#,
            self.batch,
            nanos(self.expires),
            nanos(self.heartbeat)
        ))
    }
}

/// The messages of one pull consumer.
pub(crate) struct Pull {
    client: async_nats::Client,
    /// Where pull requests go.
    subject: Subject,
    inbox: Subject,
    messages: async_nats::Subscriber,
    request: Bytes,
    batch: usize,
    /// Messages asked for that the server may still send.
    owed: usize,
    /// A pull request on its way to the connection.
    sending: Option<BoxFuture<'static, Result<(), async_nats::PublishError>>>,
    heartbeat: Duration,
    /// Fires every `heartbeat`; see `seen` and `silent`.
    check: Pin<Box<Sleep>>,
    /// Something arrived since the last check.
    seen: bool,
    /// Checks in a row that found nothing arrived.
    silent: u8,
    /// No pull requests until it fires.
    pause: Option<Pin<Box<Sleep>>>,
    /// Yields each time the connection comes back.
    reconnected: Fuse<BoxStream<'static, ()>>,
    done: bool,
}

impl Pull {
    /// Pulls from `consumer` of `stream` into a new inbox of `client`;
    /// `up` follows the connection.
    pub(crate) async fn start(
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
        settings: &PullSettings,
        up: watch::Receiver<bool>,
    ) -> Result<Pull, Error> {
        let subject = Subject::from(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
        Pull::on_subject(client, subject, settings, up).await
    }

    /// Pulls by sending requests to `subject`.
    async fn on_subject(
        client: &async_nats::Client,
        subject: Subject,
        settings: &PullSettings,
        up: watch::Receiver<bool>,
    ) -> Result<Pull, Error> {
        let inbox = Subject::from(client.new_inbox());
        let messages = client.subscribe(inbox.clone()).await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("cannot start pulling from JetStream: {e}"),
            )
        })?;
        let reconnected = futures_util::stream::unfold(up, |mut up| async move {
            loop {
                up.changed().await.ok()?;
                if *up.borrow_and_update() {
                    return Some(((), up));
                }
            }
        })
        .boxed()
        .fuse();
        Ok(Pull {
            client: client.clone(),
            subject,
            inbox,
            messages,
            request: settings.request(),
            batch: settings.batch,
            owed: 0,
            sending: None,
            heartbeat: settings.heartbeat,
            check: Box::pin(tokio::time::sleep(settings.heartbeat)),
            seen: false,
            silent: 0,
            pause: None,
            reconnected,
            done: false,
        })
    }

    /// Messages asked for that the server may still send.
    #[cfg(test)]
    fn owed(&self) -> usize {
        self.owed
    }

    /// Starts a pull request if fewer than half a batch are owed, counting
    /// it as owed at once.
    fn ask(&mut self) {
        if self.sending.is_some() || self.pause.is_some() || self.owed > self.batch / 2 {
            return;
        }
        self.owed = self.owed.saturating_add(self.batch);
        let client = self.client.clone();
        let (subject, inbox, request) = (self.subject.clone(), self.inbox.clone(), self.request.clone());
        self.sending = Some(Box::pin(async move {
            client.publish_with_reply(subject, inbox, request).await
        }));
    }

    /// Reads the end of a pull request: the messages it will not send are
    /// no longer owed. Some ends end the stream.
    fn request_ended(&mut self, message: &Message, status: StatusCode) -> Option<Error> {
        let unsent = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Pending-Messages"))
            .and_then(|v| v.as_str().parse::<usize>().ok())
            .unwrap_or(self.batch);
        self.owed = self.owed.saturating_sub(unsent);
        let description = message.description.as_deref().unwrap_or_default();
        let (kind, why) = if description.eq_ignore_ascii_case("consumer deleted") {
            (ErrorKind::Closed, "the JetStream consumer was deleted")
        } else if description.eq_ignore_ascii_case("consumer is push based") {
            (ErrorKind::Config, "the JetStream consumer is push based")
        } else if description.starts_with("Exceeded MaxRequest") {
            (
                ErrorKind::Config,
                "the pull request exceeds the consumer's limits",
            )
        } else {
            tracing::debug!(%status, description, "JetStream pull request ended");
            return None;
        };
        self.done = true;
        Some(Error::new(kind, format!("JetStream pull: {why} ({description})")))
    }

    /// Asks for nothing until [`PAUSE`] has passed.
    fn pause_asking(&mut self, cx: &mut Context<'_>) {
        self.pause = Some(Box::pin(tokio::time::sleep(PAUSE)));
        // Polled again at once, which registers the pause's timer.
        cx.waker().wake_by_ref();
    }

    /// Polls the timers; an error when the heartbeats stopped while
    /// messages were owed.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Option<Error> {
        if let Some(pause) = &mut self.pause
            && pause.as_mut().poll(cx).is_ready()
        {
            self.pause = None;
            cx.waker().wake_by_ref();
        }
        while self.check.as_mut().poll(cx).is_ready() {
            let deadline = Instant::now() + self.heartbeat;
            self.check.as_mut().reset(deadline);
            // Silence is news only while requests wait on the server.
            if std::mem::take(&mut self.seen) || self.owed == 0 {
                self.silent = 0;
                continue;
            }
            self.silent += 1;
            if self.silent >= MISSED_HEARTBEATS {
                self.silent = 0;
                self.owed = 0;
                cx.waker().wake_by_ref();
                return Some(Error::new(
                    ErrorKind::Connection,
                    "JetStream heartbeats stopped; asking for messages again",
                ));
            }
        }
        None
    }
}

impl Stream for Pull {
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // Requests made before the connection dropped are gone with it.
        while let Poll::Ready(Some(())) = this.reconnected.poll_next_unpin(cx) {
            this.owed = 0;
        }
        loop {
            this.ask();
            if let Some(sending) = &mut this.sending
                && let Poll::Ready(sent) = sending.as_mut().poll(cx)
            {
                this.sending = None;
                if let Err(e) = sent {
                    // Not sent: not owed. Asking again at once would fail
                    // the same way, and keep the messages unread.
                    this.owed = this.owed.saturating_sub(this.batch);
                    this.pause_asking(cx);
                    return Poll::Ready(Some(Err(Error::new(
                        ErrorKind::Connection,
                        format!("cannot ask JetStream for messages: {e}"),
                    ))));
                }
            }
            let message = match this.messages.poll_next_unpin(cx) {
                Poll::Ready(Some(message)) => message,
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => break,
            };
            this.seen = true;
            match message.status {
                None | Some(StatusCode::OK) => {
                    this.owed = this.owed.saturating_sub(1);
                    return Poll::Ready(Some(Ok(message)));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::NO_RESPONDERS) => {
                    // No consumer answers the request: it is gone, or (on a
                    // cluster) its leader is being elected. Ask again later.
                    this.owed = this.owed.saturating_sub(this.batch);
                    this.pause_asking(cx);
                    return Poll::Ready(Some(Err(Error::new(
                        ErrorKind::Connection,
                        "no JetStream consumer answered the pull request",
                    ))));
                }
                Some(status) => {
                    if let Some(end) = this.request_ended(&message, status) {
                        return Poll::Ready(Some(Err(end)));
                    }
                }
            }
        }
        match this.poll_timers(cx) {
            Some(e) => Poll::Ready(Some(Err(e))),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const LOCAL: &str = "nats://127.0.0.1:4222";
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A stream pulling with requests to `subject`, and the sender of its
    /// connection's state.
    async fn pull_on(subject: Subject, batch: usize, heartbeat: Duration) -> (Pull, watch::Sender<bool>) {
        let client = async_nats::connect(LOCAL).await.unwrap();
        let (up, watching) = watch::channel(true);
        let settings = PullSettings {
            batch,
            expires: Duration::from_secs(30),
            heartbeat,
        };
        let pull = Pull::on_subject(&client, subject, &settings, watching)
            .await
            .unwrap();
        (pull, up)
    }

    /// A peer answering pull requests on a subject of its own, in place of
    /// a consumer: what it reads, and how to answer.
    struct Peer {
        client: async_nats::Client,
        requests: async_nats::Subscriber,
        subject: Subject,
    }

    impl Peer {
        async fn new() -> Peer {
            let client = async_nats::connect(LOCAL).await.unwrap();
            let subject = Subject::from(format!("pull-peer.{}", client.new_inbox()));
            let requests = client.subscribe(subject.clone()).await.unwrap();
            client.flush().await.unwrap();
            Peer {
                client,
                requests,
                subject,
            }
        }

        async fn pull(&self, batch: usize, heartbeat: Duration) -> (Pull, watch::Sender<bool>) {
            pull_on(self.subject.clone(), batch, heartbeat).await
        }

        /// The next pull request: its reply subject and its batch.
        async fn request(&mut self) -> (Subject, usize) {
            let request = tokio::time::timeout(PATIENCE, self.requests.next())
                .await
                .expect("a pull request")
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
            let batch = usize::try_from(body["batch"].as_u64().unwrap()).unwrap();
            (request.reply.unwrap(), batch)
        }

        async fn send(&self, to: &Subject, n: usize) {
            for i in 0..n {
                self.client
                    .publish(to.clone(), Bytes::from(format!("{i}")))
                    .await
                    .unwrap();
            }
            self.client.flush().await.unwrap();
        }

        /// Sends a status message, as the server ends a request, through a
        /// connection of its own: a client cannot write a status line.
        async fn status(&self, to: &Subject, status: &str, pending: Option<usize>) {
            use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
            let stream = tokio::net::TcpStream::connect("127.0.0.1:4222").await.unwrap();
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert!(line.starts_with("INFO"), "{line}");
            let mut headers = format!("NATS/1.0 {status}\r\n");
            if let Some(n) = pending {
                headers.push_str(&format!("Nats-Pending-Messages: {n}\r\n"));
            }
            headers.push_str("\r\n");
            let len = headers.len();
            let command = format!(
                "CONNECT {{\"verbose\":false,\"headers\":true,\"protocol\":1}}\r\nHPUB {to} {len} {len}\r\n{headers}\r\nPING\r\n"
            );
            stream.get_mut().write_all(command.as_bytes()).await.unwrap();
            loop {
                line.clear();
                stream.read_line(&mut line).await.unwrap();
                assert!(!line.starts_with("-ERR"), "{line}");
                if line.starts_with("PONG") {
                    break;
                }
            }
        }
    }

    async fn next(pull: &mut Pull) -> Result<Message, Error> {
        tokio::time::timeout(PATIENCE, pull.next())
            .await
            .expect("an item in time")
            .expect("the stream goes on")
    }

    /// A peer answering each request at once with its whole batch: the
    /// answers may arrive before the request is seen as sent, and every
    /// message is still counted, so the stream never stops asking.
    #[tokio::test]
    async fn answers_at_once_are_counted_and_the_stream_keeps_asking() {
        let mut peer = Peer::new().await;
        let (mut pull, _up) = peer.pull(10, Duration::from_secs(15)).await;
        let reader = tokio::spawn(async move {
            for _ in 0..1000 {
                next(&mut pull).await.unwrap();
            }
            pull
        });
        let mut requests = 0;
        let mut answered = 0;
        while answered < 1000 {
            let (reply, batch) = peer.request().await;
            assert_eq!(batch, 10);
            requests += 1;
            peer.send(&reply, batch).await;
            answered += batch;
        }
        let pull = reader.await.unwrap();
        assert_eq!(requests, 100);
        // Everything asked for arrived: at most the one request made after
        // the last answer is owed.
        assert!(pull.owed() <= 10, "owed {}", pull.owed());
    }

    /// A request that ended with some of its batch unsent owes no more than
    /// the server says; falling under half a batch owed asks again.
    #[tokio::test]
    async fn an_ended_request_owes_what_the_server_says() {
        let mut peer = Peer::new().await;
        let (mut pull, _up) = peer.pull(10, Duration::from_secs(15)).await;
        let reader = tokio::spawn(async move {
            for _ in 0..4 {
                next(&mut pull).await.unwrap();
            }
            pull
        });
        let (reply, _) = peer.request().await;
        peer.send(&reply, 3).await;
        // 7 owed; the server ends the request with 2 of them unsent: 5 owed,
        // half a batch, so the stream asks for 10 more.
        peer.status(&reply, "408 Request Timeout", Some(2)).await;
        let (again, batch) = peer.request().await;
        assert_eq!(batch, 10);
        peer.send(&again, 1).await;
        let pull = reader.await.unwrap();
        assert_eq!(pull.owed(), 14);
    }

    /// A status without a count ends the whole batch.
    #[tokio::test]
    async fn an_ended_request_without_a_count_owes_nothing() {
        let mut peer = Peer::new().await;
        let (mut pull, _up) = peer.pull(10, Duration::from_secs(15)).await;
        let reader = tokio::spawn(async move {
            next(&mut pull).await.unwrap();
            pull
        });
        let (reply, _) = peer.request().await;
        peer.status(&reply, "409 Exceeded MaxWaiting", None).await;
        let (again, _) = peer.request().await;
        peer.send(&again, 1).await;
        let pull = reader.await.unwrap();
        assert_eq!(pull.owed(), 9);
    }

    /// When the heartbeats stop while messages are owed, the requests are
    /// taken as lost: an error says so and the stream asks again.
    #[tokio::test]
    async fn missed_heartbeats_give_an_error_and_a_new_request() {
        let mut peer = Peer::new().await;
        let (mut pull, _up) = peer.pull(10, Duration::from_millis(50)).await;
        let reader = tokio::spawn(async move {
            let error = next(&mut pull).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Connection);
            assert!(error.to_string().contains("heartbeats"), "{error}");
            next(&mut pull).await.unwrap();
            pull
        });
        let (first, _) = peer.request().await;
        let (second, _) = peer.request().await;
        assert_eq!(first, second, "one inbox for every request");
        peer.send(&second, 1).await;
        let pull = reader.await.unwrap();
        assert_eq!(pull.owed(), 9);
    }

    /// No consumer answering a request: an error, a pause, a new request.
    #[tokio::test]
    async fn no_responders_give_an_error_and_the_stream_asks_again() {
        let (mut pull, _up) = pull_on(
            Subject::from("pull-peer.nobody-reads-this"),
            10,
            Duration::from_secs(15),
        )
        .await;
        for _ in 0..2 {
            let error = next(&mut pull).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Connection);
            assert!(error.to_string().contains("no JetStream consumer"), "{error}");
        }
        assert!(!pull.done);
    }

    /// The connection coming back: requests made before are gone, the
    /// stream asks again.
    #[tokio::test]
    async fn a_new_connection_asks_again() {
        let mut peer = Peer::new().await;
        let (mut pull, up) = peer.pull(10, Duration::from_secs(15)).await;
        let reader = tokio::spawn(async move {
            next(&mut pull).await.unwrap();
            pull
        });
        let (first, _) = peer.request().await;
        up.send_replace(false);
        up.send_replace(true);
        let (second, _) = peer.request().await;
        assert_eq!(first, second);
        peer.send(&second, 1).await;
        let pull = reader.await.unwrap();
        assert_eq!(pull.owed(), 9);
    }

    /// A connection closed for good ends the stream: errors at most, never
    /// a loop of them.
    #[tokio::test]
    async fn a_closed_connection_ends_the_stream() {
        let client = async_nats::connect(LOCAL).await.unwrap();
        let (_up, watching) = watch::channel(true);
        let settings = PullSettings {
            batch: 10,
            expires: Duration::from_secs(30),
            heartbeat: Duration::from_secs(15),
        };
        let subject = Subject::from(format!("pull-peer.{}", client.new_inbox()));
        let mut pull = Pull::on_subject(&client, subject, &settings, watching)
            .await
            .unwrap();
        client.drain().await.unwrap();
        // Until the connection is gone, and a publish fails.
        let deadline = Instant::now() + PATIENCE;
        while client.publish("pull-peer.closed", Bytes::new()).await.is_ok() {
            assert!(Instant::now() < deadline, "the connection did not close");
            tokio::task::yield_now().await;
        }
        let mut errors = 0;
        while let Some(item) = tokio::time::timeout(PATIENCE, pull.next())
            .await
            .expect("the end in time")
        {
            let error = item.map(|m| m.payload).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Connection);
            errors += 1;
            assert!(errors <= 2, "{error}");
        }
    }
}
