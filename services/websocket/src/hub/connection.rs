//! One connection: its queues, and the tasks that read, process and write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt as _};
use watchtower::{Error, Event, Poison, RawMessage, TopicPattern};

use super::{Handler, Identity, Inner, SlowClient, bump, lock, write};
use crate::protocol::{Control, Frame, classify, code};

/// How long a closing connection waits for the peer's close frame, and for
/// its last frames to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Control replies queued for a client before the hub stops reading from it.
const MAX_PENDING_CONTROL: usize = 256;
/// Frames written per flush.
const BATCH: usize = 64;
/// The close code for "message too big" (RFC 6455 §7.4.1).
const CLOSE_TOO_BIG: u16 = 1009;
/// The longest subscription id a client may give, in bytes.
const MAX_SUBSCRIPTION_ID: usize = 128;
/// The id of the subscription made from the upgrade URL's `topic`s.
const URL_SUBSCRIPTION: &str = "url";

pub(super) enum Pushed {
    Queued,
    DroppedOldest,
    Disconnected,
    Closing,
}

struct Outbound {
    events: VecDeque<Message>,
    control: VecDeque<Message>,
    /// Events dropped since the client was last told.
    dropped: u64,
}

/// One client connection as the hub sees it.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) identity: Identity,
    /// Whether the client speaks `watchtower.v1` and so gets control
    /// messages; a `cloudevents.json` client gets events only.
    control: bool,
    pub(super) subs: Mutex<Vec<(String, Vec<TopicPattern>)>>,
    queue: Mutex<Outbound>,
    notify: Notify,
    /// Signalled when the writer takes queued frames.
    drained: Notify,
    /// Cancelled when the connection must close at once (hub shutdown, a
    /// slow or silent client); `close_code` says why.
    close: CancellationToken,
    /// Cancelled when the connection is to close once the replies queued so
    /// far are written (the client left, or sent too large a message).
    finish: CancellationToken,
    close_code: AtomicU16,
    writer_done: CancellationToken,
    acks: AtomicBool,
    /// Milliseconds since `started` when a frame last arrived.
    last_seen: AtomicU64,
    started: Instant,
}

impl Conn {
    pub(super) fn push(&self, message: Message, capacity: usize, policy: SlowClient) -> Pushed {
        if self.close.is_cancelled() {
            return Pushed::Closing;
        }
        let mut q = lock(&self.queue);
        let mut pushed = Pushed::Queued;
        if q.events.len() >= capacity {
            match policy {
                SlowClient::DropOldest => {
                    q.events.pop_front();
                    q.dropped += 1;
                    pushed = Pushed::DroppedOldest;
                }
                SlowClient::Disconnect => {
                    q.events.clear();
                    drop(q);
                    self.close_with(close_code::POLICY);
                    return Pushed::Disconnected;
                }
            }
        }
        q.events.push_back(message);
        drop(q);
        self.notify.notify_one();
        pushed
    }

    /// Queues a control reply, for a client that takes them. When a client
    /// lets too many pile up (it sends faster than it reads), this waits,
    /// so the hub stops reading from that client instead of growing its
    /// memory.
    async fn reply(&self, control: Control) {
        if !self.control {
            return;
        }
        let message = Message::Text(Utf8Bytes::from(control.to_text()));
        loop {
            let drained = self.drained.notified();
            {
                let mut q = lock(&self.queue);
                if q.control.len() < MAX_PENDING_CONTROL {
                    q.control.push_back(message);
                    drop(q);
                    self.notify.notify_one();
                    return;
                }
            }
            tokio::select! {
                () = drained => {}
                () = self.close.cancelled() => return,
                () = self.finish.cancelled() => return,
            }
        }
    }

    /// Refuses an event: a `nack` if the client asked for acknowledgements,
    /// an error message otherwise.
    async fn refuse_event(&self, event_id: String, code: &str, message: String) {
        if self.acks.load(Ordering::Relaxed) {
            self.reply(Control::Nack {
                id: event_id,
                message,
            })
            .await;
        } else {
            self.reply(Control::Error {
                code: code.to_owned(),
                message,
                re: Some(event_id),
                count: None,
            })
            .await;
        }
    }

    /// Whether the client has gone (or is being disconnected): work queued
    /// for it whose outcome it waits for is abandoned.
    fn is_gone(&self) -> bool {
        self.finish.is_cancelled() || self.close.is_cancelled()
    }

    fn close_with(&self, code: u16) {
        // The first reason given wins.
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.close.cancel();
    }

    fn finish_with(&self, code: u16) {
        let _ = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.finish.cancel();
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis();
        self.last_seen
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_seen.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has arrived from the client for `timeout`: a
    /// write blocked on a client that reads nothing ends there.
    async fn silent_for(&self, timeout: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout {
                return;
            }
            tokio::time::sleep(timeout - idle).await;
        }
    }

    /// Resolves once the writer has closed and the peer had its chance to
    /// answer.
    async fn closing(&self) {
        self.writer_done.cancelled().await;
        tokio::time::sleep(CLOSE_WAIT).await;
    }

    /// Up to [`BATCH`] frames: control replies first, then a note of
    /// dropped events, then events.
    fn take_batch(&self, out: &mut Vec<Message>) -> usize {
        let mut q = lock(&self.queue);
        out.extend(q.control.drain(..));
        if q.dropped > 0 {
            if self.control {
                let control = Control::Error {
                    code: code::DROPPED.to_owned(),
                    message: "events dropped because this client fell behind".to_owned(),
                    re: None,
                    count: Some(q.dropped),
                };
                out.push(Message::Text(Utf8Bytes::from(control.to_text())));
            }
            q.dropped = 0;
        }
        let n = q.events.len().min(BATCH);
        out.extend(q.events.drain(..n));
        drop(q);
        self.drained.notify_waiters();
        n
    }
}

/// Takes the connection out of the hub however its task ends.
struct Registration<'a> {
    inner: &'a Inner,
    conn: Arc<Conn>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        {
            let mut index = write(&self.inner.index);
            let mut subs = lock(&self.conn.subs);
            for (_, patterns) in subs.drain(..) {
                for pattern in &patterns {
                    index.remove(pattern, self.conn.id);
                }
            }
        }
        self.inner.open.fetch_sub(1, Ordering::AcqRel);
        self.inner.gone.notify_waiters();
    }
}

/// A token bucket: `rate` per second, bursts of `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_second: u32) -> Bucket {
        let rate = f64::from(per_second);
        Bucket {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(super) async fn serve_connection(
    inner: Arc<Inner>,
    socket: WebSocket,
    identity: Identity,
    control: bool,
    url_patterns: Vec<TopicPattern>,
) {
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn {
        id,
        identity,
        control,
        subs: Mutex::new(Vec::new()),
        queue: Mutex::new(Outbound {
            events: VecDeque::new(),
            control: VecDeque::new(),
            dropped: 0,
        }),
        notify: Notify::new(),
        drained: Notify::new(),
        close: inner.shutdown.child_token(),
        finish: CancellationToken::new(),
        close_code: AtomicU16::new(0),
        writer_done: CancellationToken::new(),
        acks: AtomicBool::new(false),
        last_seen: AtomicU64::new(0),
        started: Instant::now(),
    });
    inner.open.fetch_add(1, Ordering::AcqRel);
    let _registration = Registration {
        inner: &inner,
        conn: conn.clone(),
    };
    if !url_patterns.is_empty()
        && let Err(refusal) = inner.subscribe(&conn, URL_SUBSCRIPTION.to_owned(), url_patterns)
    {
        // Checked before the upgrade; only the limits could say no here.
        tracing::debug!(reason = %refusal.message, "subscription from the URL refused");
    }
    tracing::debug!(connection = id, control, "websocket client connected");

    let (mut sink, mut stream) = socket.split();
    let (work_tx, work_rx) = mpsc::channel(inner.settings.inbound_capacity);
    let services = Services {
        handler: inner.handler.clone(),
        poison: inner.poison.clone(),
    };
    tokio::join!(
        read_loop(&inner, &conn, &mut stream, work_tx),
        process(&inner, &conn, work_rx, services),
        write_loop(&inner, &conn, &mut sink),
    );
    tracing::debug!(connection = id, "websocket client disconnected");
}

/// What the reader hands to the connection's processing task.
enum Work {
    /// An event for the handler; `acks` if the client waits for the outcome.
    Event { event: Event, acks: bool },
    /// A frame that is not an event, for the poison service.
    Poison { body: Bytes, error: Error },
}

/// A connection's own clones of the hub's services.
struct Services {
    handler: Option<Handler>,
    poison: Option<Handler>,
}

impl Services {
    async fn poison(&mut self, body: Bytes, error: Error) {
        let Some(poison) = &mut self.poison else { return };
        let raw = RawMessage {
            topic: Arc::from(""),
            headers: Vec::new(),
            body,
        };
        let event = Poison::new(raw, error).into_event();
        let result = match poison.ready().await {
            Ok(poison) => poison.call(event).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "the poison service failed on an invalid frame");
        }
    }
}

/// Hands the events a client sent to the handler, one at a time, in order,
/// and answers for them; runs beside the reader, so a slow handler does not
/// stop the connection from being read (pings answered, control messages
/// served) until the inbound queue is full.
async fn process(inner: &Inner, conn: &Conn, mut work: mpsc::Receiver<Work>, mut services: Services) {
    while let Some(item) = work.recv().await {
        match item {
            Work::Poison { body, error } => services.poison(body, error).await,
            Work::Event { event, acks } => {
                if acks && conn.is_gone() {
                    // The client cannot learn the outcome any more; it will
                    // send the event again or dead-letter it itself.
                    bump(&inner.counters.abandoned);
                    continue;
                }
                let id = event.id().to_owned();
                let result = match &mut services.handler {
                    Some(handler) => match handler.ready().await {
                        Ok(handler) => handler.call(event).await,
                        Err(e) => Err(e),
                    },
                    None => Ok(()),
                };
                match result {
                    Ok(()) if acks => conn.reply(Control::Ack { id }).await,
                    Ok(()) => {}
                    Err(e) => {
                        bump(&inner.counters.handler_errors);
                        tracing::debug!(error = %e, event_id = %id, "handler failed on a client's event");
                        if acks {
                            conn.reply(Control::Nack {
                                id,
                                message: e.to_string(),
                            })
                            .await;
                        } else {
                            conn.reply(Control::Error {
                                code: code::HANDLER.to_owned(),
                                message: e.to_string(),
                                re: Some(id),
                                count: None,
                            })
                            .await;
                        }
                    }
                }
            }
        }
    }
}

/// The reader's own state.
struct Reader<'a> {
    inner: &'a Inner,
    conn: &'a Arc<Conn>,
    work: mpsc::Sender<Work>,
    control_rate: Bucket,
    event_rate: Option<Bucket>,
}

impl Reader<'_> {
    /// Queues work for the processing task, waiting while its queue is
    /// full; false if the connection closed meanwhile.
    async fn queue(&self, work: Work) -> bool {
        tokio::select! {
            sent = self.work.send(work) => sent.is_ok(),
            () = self.conn.closing() => false,
            () = self.conn.close.cancelled() => false,
        }
    }

    async fn invalid(&self, body: Bytes, code: &str, error: Error) -> bool {
        bump(&self.inner.counters.invalid_frames);
        self.conn.reply(Control::error(code, error.to_string())).await;
        self.queue(Work::Poison { body, error }).await
    }

    /// Handles a text frame; false if the connection closed meanwhile.
    async fn on_text(&mut self, text: Utf8Bytes) -> bool {
        let (inner, conn) = (self.inner, self.conn);
        let frame = classify(text.as_str());
        if let Frame::Control(_) = &frame
            && !conn.control
        {
            let error = Error::decode(
                "a control message on the cloudevents.json subprotocol, which carries CloudEvents only",
            );
            return self.invalid(Bytes::from(text), code::MALFORMED, error).await;
        }
        match frame {
            Frame::Event(event) => {
                bump(&inner.counters.received);
                if let Some(bucket) = &mut self.event_rate
                    && !bucket.take()
                {
                    bump(&inner.counters.limited);
                    let why = format!(
                        "more than {} events per second",
                        inner.settings.max_event_rate.unwrap_or_default()
                    );
                    conn.refuse_event(event.id().to_owned(), code::RATE_LIMITED, why)
                        .await;
                    return true;
                }
                if !inner.authorized_publish(conn, &event) {
                    bump(&inner.counters.forbidden);
                    let why = format!("not allowed to publish to {}", event.topic());
                    conn.refuse_event(event.id().to_owned(), code::FORBIDDEN, why)
                        .await;
                    return true;
                }
                if inner.settings.relay {
                    bump(&inner.counters.published);
                    inner.fan_out(event.topic(), &Message::Text(text));
                }
                let acks = conn.control && conn.acks.load(Ordering::Relaxed);
                if inner.handler.is_some() {
                    return self.queue(Work::Event { event, acks }).await;
                }
                if acks {
                    conn.reply(Control::Ack {
                        id: event.id().to_owned(),
                    })
                    .await;
                }
                true
            }
            Frame::Control(control) => {
                let re = match &control {
                    Control::Subscribe { id, .. } | Control::Unsubscribe { id } => Some(id.clone()),
                    _ => None,
                };
                let client_sends = matches!(
                    control,
                    Control::Subscribe { .. } | Control::Unsubscribe { .. } | Control::Options { .. }
                );
                if client_sends && !self.control_rate.take() {
                    bump(&inner.counters.limited);
                    conn.reply(Control::Error {
                        code: code::RATE_LIMITED.to_owned(),
                        message: format!(
                            "more than {} control messages per second",
                            inner.settings.max_control_rate
                        ),
                        re,
                        count: None,
                    })
                    .await;
                    return true;
                }
                self.on_control(control).await;
                true
            }
            Frame::Invalid(e) => self.invalid(Bytes::from(text), code::MALFORMED, e).await,
        }
    }

    async fn on_control(&mut self, control: Control) {
        let (inner, conn) = (self.inner, self.conn);
        match control {
            Control::Subscribe { id, patterns } => {
                if id.len() > MAX_SUBSCRIPTION_ID {
                    // Kept as long as the subscription, so bounded; not
                    // echoed back.
                    bump(&inner.counters.limited);
                    let why = format!("a subscription id longer than {MAX_SUBSCRIPTION_ID} bytes");
                    conn.reply(Control::error(code::LIMIT, why)).await;
                    return;
                }
                let done = inner
                    .check_patterns(&conn.identity, &patterns)
                    .and_then(|parsed| inner.subscribe(conn, id.clone(), parsed));
                match done {
                    Ok(()) => conn.reply(Control::Subscribed { id }).await,
                    Err(refusal) => {
                        conn.reply(Control::Error {
                            code: refusal.code.to_owned(),
                            message: refusal.message,
                            re: Some(id),
                            count: None,
                        })
                        .await
                    }
                }
            }
            Control::Unsubscribe { id } => {
                inner.unsubscribe(conn, &id);
                conn.reply(Control::Unsubscribed { id }).await;
            }
            Control::Options { acks } => conn.acks.store(acks, Ordering::Relaxed),
            other => {
                bump(&inner.counters.invalid_frames);
                conn.reply(Control::error(
                    code::UNSUPPORTED,
                    format!("a client cannot send {}", other.to_text()),
                ))
                .await;
            }
        }
    }
}

async fn read_loop(
    inner: &Inner,
    conn: &Arc<Conn>,
    stream: &mut SplitStream<WebSocket>,
    work: mpsc::Sender<Work>,
) {
    let mut reader = Reader {
        inner,
        conn,
        work,
        control_rate: Bucket::new(inner.settings.max_control_rate),
        event_rate: inner.settings.max_event_rate.map(Bucket::new),
    };
    loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            () = conn.closing() => break,
        };
        let Some(next) = next else { break };
        conn.touch();
        let open = match next {
            Ok(Message::Text(text)) => reader.on_text(text).await,
            Ok(Message::Binary(body)) => {
                let why = "binary frames are not supported; send CloudEvents JSON in text frames";
                reader.invalid(body, code::BINARY, Error::decode(why)).await
            }
            Ok(_) => true,
            Err(e) => {
                if is_too_large(&e) {
                    bump(&inner.counters.invalid_frames);
                    conn.reply(Control::error(
                        code::TOO_LARGE,
                        format!("message larger than {} bytes", inner.settings.max_message_size),
                    ))
                    .await;
                    conn.finish_with(CLOSE_TOO_BIG);
                }
                false
            }
        };
        if !open {
            break;
        }
    }
    conn.finish_with(close_code::NORMAL);
}

fn is_too_large(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(WsError::Capacity(_)) = s.downcast_ref::<WsError>() {
            return true;
        }
        source = s.source();
    }
    false
}

async fn write_loop(inner: &Inner, conn: &Conn, sink: &mut SplitSink<WebSocket, Message>) {
    let mut ping = tokio::time::interval_at(
        Instant::now() + inner.settings.ping_interval,
        inner.settings.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH + 2);
    loop {
        if conn.finish.is_cancelled() {
            break;
        }
        batch.clear();
        let events = conn.take_batch(&mut batch);
        if !batch.is_empty() {
            let written = tokio::select! {
                r = send_all(sink, &mut batch) => r,
                () = conn.close.cancelled() => break,
                () = conn.silent_for(inner.settings.idle_timeout) => {
                    conn.close_with(close_code::AWAY);
                    break;
                }
            };
            match written {
                Ok(()) => {
                    inner.counters.sent.fetch_add(events as u64, Ordering::Relaxed);
                    continue;
                }
                Err(_) => {
                    conn.close_with(close_code::ABNORMAL);
                    break;
                }
            }
        }
        tokio::select! {
            () = conn.notify.notified() => {}
            _ = ping.tick() => {
                if conn.idle_for() >= inner.settings.idle_timeout {
                    tracing::debug!("websocket client missed its pings; disconnecting");
                    conn.close_with(close_code::AWAY);
                    break;
                }
                let pinged = tokio::select! {
                    r = sink.send(Message::Ping(Bytes::new())) => r.is_ok(),
                    () = conn.close.cancelled() => break,
                    () = conn.silent_for(inner.settings.idle_timeout) => {
                        conn.close_with(close_code::AWAY);
                        break;
                    }
                };
                if !pinged {
                    conn.close_with(close_code::ABNORMAL);
                    break;
                }
            }
            () = conn.close.cancelled() => break,
            () = conn.finish.cancelled() => break,
        }
    }
    // The close handshake: outstanding replies (an error saying why), then
    // the close frame; the reader waits a little for the client's answer.
    let code = match conn.close_code.load(Ordering::Acquire) {
        0 => close_code::AWAY,
        code => code,
    };
    if code != close_code::ABNORMAL {
        let mut last: Vec<Message> = lock(&conn.queue).control.drain(..).collect();
        last.push(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(match code {
                close_code::POLICY => "client fell behind or broke the protocol",
                close_code::NORMAL => "",
                CLOSE_TOO_BIG => "message too big",
                _ => "going away",
            }),
        })));
        let _ = tokio::time::timeout(CLOSE_WAIT, send_all(sink, &mut last)).await;
    }
    conn.writer_done.cancel();
}

async fn send_all(
    sink: &mut SplitSink<WebSocket, Message>,
    batch: &mut Vec<Message>,
) -> Result<(), axum::Error> {
    for message in batch.drain(..) {
        sink.feed(message).await?;
    }
    sink.flush().await
}
