//! JetStream publish acknowledgements, on one inbox per connection.
//!
//! A JetStream publish is a core publish with a reply subject: the stream
//! answers there with its PubAck. async-nats's JetStream context makes a
//! fresh inbox string, a timer and a boxed future per publish and parses
//! each answer into an untagged enum; here every publish of a connection
//! replies to `<inbox>.<token>` on one wildcard subscription, answers are
//! matched to callers by token (the index into a queue of waiting
//! callers), and one task reads them and expires the ones that waited past
//! the request timeout (tokens and deadlines grow together, so the oldest
//! entry expires first). When the connection drops, the answers on their
//! way are lost with it: whoever waits is told at once.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::{Message, StatusCode, Subject};
use futures_util::StreamExt as _;
use serde::Deserialize;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use watchtower::{Error, ErrorKind};

/// A stream's acknowledgement of one publish.
#[derive(Debug)]
pub(crate) struct PubAck {
    pub(crate) stream: Arc<str>,
    pub(crate) sequence: u64,
    pub(crate) duplicate: bool,
}

/// What a caller waits on: the acknowledgement, or why there is none.
pub(crate) type AckReceiver = oneshot::Receiver<Result<PubAck, Error>>;

/// The acknowledgement inbox of one connection: shared by its JetStream
/// publishers; the task reading it ends when this is dropped.
pub(crate) struct Acks {
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    /// `<inbox>.`, to which a publish's token is appended.
    prefix: String,
    timeout: Duration,
    _stop: oneshot::Sender<()>,
}

/// The callers waiting for an acknowledgement, by token: `slots[i]` is
/// token `base + i`, `None` once answered. The first slot, if any, is
/// always a waiting caller, the one whose deadline comes first.
#[derive(Default)]
struct Pending {
    base: u64,
    slots: VecDeque<Option<Waiter>>,
    /// The inbox's subscription ended: nothing will be answered.
    closed: bool,
}

impl Pending {
    /// Takes the caller waiting on `token`, if it still waits.
    fn take(&mut self, token: u64) -> Option<Waiter> {
        let at = usize::try_from(token.checked_sub(self.base)?).ok()?;
        let waiter = self.slots.get_mut(at)?.take()?;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(waiter)
    }

    /// Takes the first waiting caller if its deadline is past `now`.
    fn take_expired(&mut self, now: Instant) -> Option<Waiter> {
        match self.slots.front() {
            Some(Some(first)) if first.deadline <= now => {
                let token = self.base;
                self.take(token)
            }
            _ => None,
        }
    }

    fn oldest_deadline(&self) -> Option<Instant> {
        self.slots.front().and_then(|w| w.as_ref().map(|w| w.deadline))
    }
}

struct Waiter {
    deadline: Instant,
    answer: oneshot::Sender<Result<PubAck, Error>>,
}

fn lock(pending: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

impl Acks {
    /// Subscribes to a new inbox of `client` and starts the task that
    /// answers waiting publishes from it; an acknowledgement not in within
    /// `timeout` is a [`ErrorKind::Timeout`] error.
    /// `up` follows the connection: when it goes down, the callers waiting
    /// get a [`ErrorKind::Connection`] error.
    pub(crate) async fn open(
        client: &async_nats::Client,
        timeout: Duration,
        up: watch::Receiver<bool>,
    ) -> Result<Acks, Error> {
        let inbox = client.new_inbox();
        let subscription = client.subscribe(format!("{inbox}.*")).await.map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!("JetStream acknowledgement inbox: {e}"),
            )
        })?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let wake = Arc::new(Notify::new());
        let (stop, stopped) = oneshot::channel();
        let prefix = format!("{inbox}.");
        tokio::spawn(answer(
            subscription,
            pending.clone(),
            wake.clone(),
            prefix.len(),
            (up, stopped),
        ));
        Ok(Acks {
            pending,
            wake,
            prefix,
            timeout,
            _stop: stop,
        })
    }

    /// A new token, the reply subject that carries it, and where its
    /// acknowledgement will come.
    pub(crate) fn register(&self) -> Result<(u64, Subject, AckReceiver), Error> {
        let (answer, receiver) = oneshot::channel();
        let (token, first) = {
            let mut pending = lock(&self.pending);
            if pending.closed {
                return Err(Error::closed("NATS client is closed"));
            }
            let first = pending.slots.is_empty();
            let token = pending.base + pending.slots.len() as u64;
            pending.slots.push_back(Some(Waiter {
                deadline: Instant::now() + self.timeout,
                answer,
            }));
            (token, first)
        };
        if first {
            // The task waits on nothing else while no publish waits.
            self.wake.notify_one();
        }
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        // Writing to a `String` cannot fail.
        let _ = write!(reply, "{token}");
        Ok((token, Subject::from(reply), receiver))
    }

    /// Drops the entry of a publish that was never sent.
    pub(crate) fn forget(&self, token: u64) {
        lock(&self.pending).take(token);
    }

    /// Publishes waiting for their acknowledgement.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.pending).slots.iter().flatten().count()
    }
}

/// Reads the inbox: answers each acknowledgement's caller, expires the
/// callers whose deadline passed and fails the waiting ones when the
/// connection goes down, until the inbox ends or `stopped` fires; then
/// fails whoever still waits.
async fn answer(
    mut inbox: async_nats::Subscriber,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    skip: usize,
    (mut up, mut stopped): (watch::Receiver<bool>, oneshot::Receiver<()>),
) {
    // The stream's name, shared by the acknowledgements that repeat it.
    let mut stream: Option<Arc<str>> = None;
    // Armed at the oldest caller's deadline, and armed again only once it
    // fires: deadlines only grow, so it never fires late, and answers in
    // order do not move it.
    let expiry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(expiry);
    let mut armed = false;
    loop {
        if !armed && let Some(deadline) = lock(&pending).oldest_deadline() {
            expiry.as_mut().reset(deadline);
            armed = true;
        }
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            () = &mut expiry, if armed => {
                armed = false;
                let now = Instant::now();
                let mut pending = lock(&pending);
                while let Some(waiter) = pending.take_expired(now) {
                    let _ = waiter.answer.send(Err(Error::new(
                        ErrorKind::Timeout,
                        "no JetStream acknowledgement in time",
                    )));
                }
            }
            message = inbox.next() => {
                let Some(message) = message else { break };
                let Some(token) = message.subject.get(skip..).and_then(|t| t.parse::<u64>().ok()) else {
                    continue;
                };
                // A late answer (its caller timed out) finds no entry.
                let Some(waiter) = lock(&pending).take(token) else {
                    continue;
                };
                let _ = waiter.answer.send(read(&message, &mut stream));
            }
            Ok(()) = up.changed() => {
                if !*up.borrow_and_update() {
                    fail_all(&pending, false);
                }
            }
            // A first caller while none waited: arm for it.
            () = wake.notified(), if !armed => {}
        }
    }
    fail_all(&pending, true);
}

/// Tells every waiting caller that its acknowledgement is lost with the
/// connection; `closed`: for good, nobody else may wait.
fn fail_all(pending: &Mutex<Pending>, closed: bool) {
    let waiting = {
        let mut pending = lock(pending);
        pending.closed |= closed;
        // Tokens go on from where they were: an answer still on its way
        // for an old one finds no caller.
        pending.base += pending.slots.len() as u64;
        std::mem::take(&mut pending.slots)
    };
    for waiter in waiting.into_iter().flatten() {
        let _ = waiter.answer.send(Err(Error::new(
            ErrorKind::Connection,
            "connection lost before the JetStream acknowledgement",
        )));
    }
}

/// A PubAck as the server writes it: the stream, the sequence, the
/// duplicate flag; or an API error.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    stream: Option<std::borrow::Cow<'a, str>>,
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(borrow)]
    error: Option<ApiError<'a>>,
}

#[derive(Deserialize)]
struct ApiError<'a> {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(borrow, default)]
    description: std::borrow::Cow<'a, str>,
}

/// What one answer on the inbox says.
fn read(message: &Message, stream: &mut Option<Arc<str>>) -> Result<PubAck, Error> {
    match message.status {
        None | Some(StatusCode::OK) => {}
        // The server had no responder for the subject: no stream captures
        // it, or (on a cluster) the stream's leader is gone and its
        // replicas are electing a new one, for a second or two. The two
        // look the same, so a retry layer may try again: on a cluster that
        // is what keeps the event.
        Some(StatusCode::NO_RESPONDERS) => {
            return Err(Error::new(
                ErrorKind::Rejected,
                "no JetStream stream answered for the subject (none captures it, or its leader is being elected)",
            )
            .with_retryable(true));
        }
        Some(status) => {
            return Err(Error::new(
                ErrorKind::Connection,
                format!("JetStream publish failed: status {status}"),
            ));
        }
    }
    let body: Body<'_> = serde_json::from_slice(&message.payload).map_err(|e| {
        Error::new(
            ErrorKind::Connection,
            format!("JetStream publish failed: invalid acknowledgement: {e}"),
        )
    })?;
    if let Some(error) = body.error {
        let text = format!(
            "{} (code {}, error code {})",
            error.description, error.code, error.err_code
        );
        return Err(if error.code == 503 {
            // JetStream not ready yet (a restarting server), worth retrying.
            Error::new(ErrorKind::Connection, format!("JetStream unavailable: {text}"))
        } else {
            // A failed expectation (wrong last sequence or message id, an
            // expected stream that is another) or any other refusal.
            Error::new(
                ErrorKind::Rejected,
                format!("JetStream refused the event: {text}"),
            )
        });
    }
    let (Some(name), Some(sequence)) = (body.stream, body.seq) else {
        return Err(Error::new(
            ErrorKind::Connection,
            "JetStream publish failed: an acknowledgement without stream or sequence",
        ));
    };
    let shared = match stream.take() {
        Some(last) if *last == *name => last,
        _ => Arc::from(&*name),
    };
    *stream = Some(shared.clone());
    Ok(PubAck {
        stream: shared,
        sequence,
        duplicate: body.duplicate,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn message(status: Option<StatusCode>, payload: &'static str) -> Message {
        Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: payload.into(),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn acknowledgements_and_errors_are_read_as_the_server_writes_them() {
        let mut stream = None;
        let ack = read(&message(None, r#"{"stream":"ORDERS","seq":7}"#), &mut stream).unwrap();
        assert_eq!((&*ack.stream, ack.sequence, ack.duplicate), ("ORDERS", 7, false));
        let again = read(
            &message(
                None,
                r#"{"stream":"ORDERS","seq":8,"duplicate":true,"domain":"d"}"#,
            ),
            &mut stream,
        )
        .unwrap();
        assert!(again.duplicate);
        assert!(Arc::ptr_eq(&ack.stream, &again.stream), "one name shared");
        let other = read(&message(None, r#"{"stream":"OTHER","seq":1}"#), &mut stream).unwrap();
        assert_eq!(&*other.stream, "OTHER");

        let cases = [
            (
                message(Some(StatusCode::NO_RESPONDERS), ""),
                ErrorKind::Rejected,
                true,
            ),
            (
                message(
                    None,
                    r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#,
                ),
                ErrorKind::Rejected,
                false,
            ),
            (
                message(
                    None,
                    r#"{"error":{"code":503,"description":"JetStream system temporarily unavailable"}}"#,
                ),
                ErrorKind::Connection,
                true,
            ),
            (
                message(None, r#"{"error":{"code":500}}"#),
                ErrorKind::Rejected,
                false,
            ),
            (message(None, "not json"), ErrorKind::Connection, true),
            (message(None, r#"{"stream":"S"}"#), ErrorKind::Connection, true),
            (message(None, r#"{"seq":-1}"#), ErrorKind::Connection, true),
            (
                message(Some(StatusCode::TIMEOUT), ""),
                ErrorKind::Connection,
                true,
            ),
        ];
        for (message, kind, retryable) in cases {
            let e = read(&message, &mut stream).unwrap_err();
            assert_eq!((e.kind(), e.is_retryable()), (kind, retryable), "{e}");
        }
    }

    /// An inbox on a new connection, and the sender standing for the
    /// connection's up/down state.
    async fn acks(timeout: Duration) -> (async_nats::Client, Acks, watch::Sender<bool>) {
        let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
        let (up, watch) = watch::channel(true);
        let acks = Acks::open(&client, timeout, watch).await.unwrap();
        (client, acks, up)
    }

    /// A new caller, answered with its own token as the sequence, gets
    /// that answer: the inbox still matches answers to callers.
    async fn a_new_caller_is_answered(client: &async_nats::Client, acks: &Acks) {
        let (token, reply, receiver) = acks.register().unwrap();
        client
            .publish(reply, format!(r#"{{"stream":"S","seq":{token}}}"#).into())
            .await
            .unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ack.sequence, token);
    }

    /// Answers reach their own callers whatever their order; an answer
    /// that comes after its caller's deadline finds no one; nobody waits
    /// past the deadline.
    #[tokio::test]
    async fn answers_reach_their_callers_in_any_order_and_late_ones_nobody() {
        let (client, acks, _up) = acks(Duration::from_millis(300)).await;
        let mut waiting = Vec::new();
        for _ in 0..100 {
            waiting.push(acks.register().unwrap());
        }
        for (token, reply, _) in waiting.iter().rev() {
            let body = format!(r#"{{"stream":"S","seq":{token}}}"#);
            client.publish(reply.clone(), body.into()).await.unwrap();
        }
        client.flush().await.unwrap();
        for (token, _, receiver) in waiting {
            let ack = tokio::time::timeout(Duration::from_secs(5), receiver)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(ack.sequence, token);
        }
        assert_eq!(acks.waiting(), 0);

        let started = Instant::now();
        let (_, reply, receiver) = acks.register().unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(acks.waiting(), 0);
        // Its answer, now late, is dropped; the next caller is answered.
        client
            .publish(reply, r#"{"stream":"S","seq":1}"#.into())
            .await
            .unwrap();
        a_new_caller_is_answered(&client, &acks).await;
    }

    /// A forgotten entry is gone; strange subjects on the inbox are
    /// ignored.
    #[tokio::test]
    async fn forgotten_entries_and_stray_answers_leave_nothing_behind() {
        let (client, acks, _up) = acks(Duration::from_secs(30)).await;
        let (token, reply, receiver) = acks.register().unwrap();
        acks.forget(token);
        assert_eq!(acks.waiting(), 0);
        let prefix = reply.as_str().rsplit_once('.').unwrap().0.to_owned();
        for stray in ["x", "18446744073709551616", "-1", ""] {
            client
                .publish(format!("{prefix}.{stray}z"), "{}".into())
                .await
                .unwrap();
        }
        client.publish(reply, "{}".into()).await.unwrap();
        client.flush().await.unwrap();
        a_new_caller_is_answered(&client, &acks).await;
        assert!(receiver.await.is_err(), "the forgotten caller gets nothing");
    }

    /// The connection going down fails every waiting caller at once (their
    /// answers are lost with it); callers after that are answered, and an
    /// answer for an old token finds no one.
    #[tokio::test]
    async fn a_dropped_connection_fails_the_waiting_callers_at_once() {
        let (client, acks, up) = acks(Duration::from_secs(30)).await;
        let waiting: Vec<_> = (0..10).map(|_| acks.register().unwrap()).collect();
        up.send_replace(false);
        let mut replies = Vec::new();
        for (_, reply, receiver) in waiting {
            let e = tokio::time::timeout(Duration::from_secs(5), receiver)
                .await
                .unwrap()
                .unwrap()
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Connection);
            replies.push(reply);
        }
        assert_eq!(acks.waiting(), 0);
        up.send_replace(true);
        let (token, reply, receiver) = acks.register().unwrap();
        assert_eq!(token, 10, "tokens go on");
        for old in replies {
            client
                .publish(old, r#"{"stream":"S","seq":0}"#.into())
                .await
                .unwrap();
        }
        client
            .publish(reply, format!(r#"{{"stream":"S","seq":{token}}}"#).into())
            .await
            .unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ack.sequence, token);
    }

    /// When the inbox is dropped its task ends and fails whoever waits.
    #[tokio::test]
    async fn dropping_the_inbox_fails_the_waiting_callers() {
        let (_client, acks, _up) = acks(Duration::from_secs(30)).await;
        let (_, _, receiver) = acks.register().unwrap();
        let pending = acks.pending.clone();
        drop(acks);
        let e = tokio::time::timeout(Duration::from_secs(5), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Connection);
        assert!(lock(&pending).closed);
    }
}
