//! The task that keeps a client's connection up.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use watchtower::backoff::{Backoff, Jitter};
use watchtower::redact_url;
use watchtower::{Delivery, Error, ErrorKind, Event, Poison, RawMessage};

use super::{Command, ConnectionState, Outgoing, Shared, WsAcker, lock};
use crate::CONTROL_SUBPROTOCOL;
use crate::protocol::{Control, Frame, classify, code};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;

/// How long a closing connection waits for the peer's close frame and for
/// its last frames to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Events written per flush.
const BATCH: usize = 64;

/// Builds the upgrade request: the URL, the subprotocol, the user's headers.
pub(super) fn request(config: &super::WsConfig) -> Result<Request, Error> {
    config.validate()?;
    if cfg!(not(feature = "rustls-ring"))
        && config
            .url
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case("wss://"))
    {
        return Err(Error::config(
            "wss:// URLs need the rustls-ring feature of watchtower-websocket",
        ));
    }
    let mut request = config
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| Error::config(format!("invalid websocket URL {}: {e}", redact_url(&config.url))))?;
    let headers = request.headers_mut();
    headers.insert(
        SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(CONTROL_SUBPROTOCOL),
    );
    for (name, value) in &config.headers {
        headers.append(name.clone(), value.clone());
    }
    Ok(request)
}

async fn connect(shared: &Shared) -> Result<Ws, Error> {
    let config = &shared.config;
    let request = request(config)?;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(config.max_message_size))
        .max_frame_size(Some(config.max_message_size));
    let url = redact_url(&config.url);
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
    let (ws, _response) = tokio::time::timeout(config.connect_timeout, connecting)
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "connecting to {url} took longer than {:?}",
                    config.connect_timeout
                ),
            )
        })?
        .map_err(|e| connect_error(&url, e))?;
    Ok(ws)
}

fn connect_error(url: &str, e: WsError) -> Error {
    match e {
        WsError::Http(response) => {
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                Error::new(
                    ErrorKind::Rejected,
                    format!("{url} refused the connection: {status}"),
                )
                .with_retryable(false)
            } else {
                Error::new(
                    ErrorKind::Connection,
                    format!("{url} answered the upgrade with {status}"),
                )
            }
        }
        WsError::Url(e) => Error::config(format!("invalid websocket URL {url}: {e}")),
        other => Error::new(ErrorKind::Connection, format!("cannot connect to {url}: {other}")),
    }
}

/// Failures that reconnecting cannot fix.
fn is_fatal(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Rejected | ErrorKind::Config)
}

/// Runs until the client shuts down or gives up.
pub(super) async fn drive(
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    first: oneshot::Sender<Result<(), Error>>,
    fail_first: bool,
) {
    let backoff =
        Backoff::new(shared.config.reconnect_initial, shared.config.reconnect_max).jitter(Jitter::Full);
    let mut first = Some(first);
    let mut attempt: u32 = 0;
    let reason = loop {
        shared.set_state(ConnectionState::Connecting { attempt });
        let connected = tokio::select! {
            r = connect(&shared) => r,
            () = shared.shutdown.cancelled() => break None,
        };
        match connected {
            Ok(ws) => {
                attempt = 0;
                let ended = run_connection(&shared, ws, &mut commands, &mut first).await;
                shared.fail_inflight("the connection closed");
                if shared.shutdown.is_cancelled() {
                    break None;
                }
                tracing::warn!(reason = %ended, "websocket connection lost; reconnecting");
                shared.notify_subscriptions(|| {
                    Error::new(
                        ErrorKind::Connection,
                        format!("websocket connection lost ({ended}); reconnecting, events sent meanwhile are missed"),
                    )
                });
            }
            Err(e) => {
                if fail_first && let Some(first) = first.take() {
                    let _ = first.send(Err(Error::new(e.kind(), e.to_string())));
                    break Some(e);
                }
                if is_fatal(&e) {
                    tracing::error!(error = %e, "websocket client giving up");
                    break Some(e);
                }
                attempt = attempt.saturating_add(1);
                if shared
                    .config
                    .max_reconnect_attempts
                    .is_some_and(|max| attempt > max)
                {
                    tracing::error!(error = %e, attempt, "websocket client giving up after its reconnect attempts");
                    break Some(e);
                }
                tracing::debug!(error = %e, attempt, "websocket connection attempt failed");
            }
        }
        if attempt == 0 {
            attempt = 1;
        }
        let delay = backoff.delay(attempt);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.shutdown.cancelled() => break None,
        }
    };
    shared.finish(reason);
}

/// One connection's lifetime; returns why it ended.
async fn run_connection(
    shared: &Shared,
    ws: Ws,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    first: &mut Option<oneshot::Sender<Result<(), Error>>>,
) -> String {
    let (mut sink, mut stream) = ws.split();
    let conn = Conn {
        started: Instant::now(),
        last_seen: AtomicU64::new(0),
        pending: std::sync::Mutex::new(HashSet::new()),
        writer_done: CancellationToken::new(),
        reader_done: CancellationToken::new(),
        abort: CancellationToken::new(),
    };
    // Every live subscription is sent below; commands queued while
    // disconnected are stale.
    while commands.try_recv().is_ok() {}
    let mut hello = Vec::new();
    if shared.config.acks {
        hello.push(control(&Control::Options { acks: true }));
    }
    {
        let subs = lock(&shared.subs);
        let mut pending = lock(&conn.pending);
        for (id, sub) in subs.iter() {
            pending.insert(*id);
            hello.push(control(&Control::Subscribe {
                id: id.to_string(),
                patterns: sub.patterns.iter().map(|p| p.as_str().to_owned()).collect(),
            }));
        }
        if pending.is_empty() {
            shared.set_state(ConnectionState::Connected);
        }
    }
    if let Err(e) = send_all(&mut sink, hello).await {
        return format!("sending subscriptions failed: {e}");
    }
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }
    let (read_end, write_end) = tokio::join!(
        read_loop(shared, &conn, &mut stream),
        write_loop(shared, &conn, &mut sink, commands),
    );
    match (read_end, write_end) {
        (_, Some(w)) => w,
        (r, None) => r,
    }
}

struct Conn {
    started: Instant,
    last_seen: AtomicU64,
    /// Subscriptions sent and not yet confirmed since connecting.
    pending: std::sync::Mutex<HashSet<u64>>,
    writer_done: CancellationToken,
    reader_done: CancellationToken,
    /// The connection is broken: stop reading at once.
    abort: CancellationToken,
}

impl Conn {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_seen.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_seen.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has arrived from the hub for `timeout`.
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
    /// answer, or the connection is broken.
    async fn closing(&self) {
        tokio::select! {
            () = async {
                self.writer_done.cancelled().await;
                tokio::time::sleep(CLOSE_WAIT).await;
            } => {}
            () = self.abort.cancelled() => {}
        }
    }
}

fn control(c: &Control) -> Message {
    Message::Text(Utf8Bytes::from(c.to_text()))
}

async fn send_all(sink: &mut Sink, messages: Vec<Message>) -> Result<(), WsError> {
    for m in messages {
        sink.feed(m).await?;
    }
    sink.flush().await
}

async fn read_loop(shared: &Shared, conn: &Conn, stream: &mut SplitStream<Ws>) -> String {
    let why = loop {
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            () = conn.closing() => break "closed".to_owned(),
        };
        let Some(next) = next else {
            break "the hub closed the connection".to_owned();
        };
        conn.touch();
        match next {
            Ok(Message::Text(text)) => {
                let handled = tokio::select! {
                    () = on_text(shared, conn, text) => true,
                    () = conn.closing() => false,
                };
                if !handled {
                    break "closed".to_owned();
                }
            }
            Ok(Message::Binary(body)) => {
                let raw_error = Error::decode("binary frame: the protocol sends events as text frames");
                let delivered = tokio::select! {
                    () = poison(shared, body, raw_error) => true,
                    () = conn.closing() => false,
                };
                if !delivered {
                    break "closed".to_owned();
                }
            }
            Ok(Message::Close(frame)) => {
                tracing::debug!(?frame, "the hub is closing the connection");
            }
            Ok(_) => {}
            Err(e) => break format!("read failed: {e}"),
        }
    };
    conn.reader_done.cancel();
    why
}

async fn on_text(shared: &Shared, conn: &Conn, text: Utf8Bytes) {
    match classify(text.as_str()) {
        Frame::Event(event) => dispatch(shared, event).await,
        Frame::Invalid(e) => poison(shared, Bytes::from(text), e).await,
        Frame::Control(Control::Subscribed { id }) => {
            let Ok(id) = id.parse::<u64>() else { return };
            if let Some(sub) = lock(&shared.subs).get_mut(&id)
                && let Some(confirmed) = sub.confirmed.take()
            {
                let _ = confirmed.send(Ok(()));
            }
            let mut pending = lock(&conn.pending);
            if pending.remove(&id) && pending.is_empty() {
                shared.set_state(ConnectionState::Connected);
            }
        }
        Frame::Control(Control::Ack { id }) => settle(shared, &id, None),
        Frame::Control(Control::Nack { id, message }) => settle(shared, &id, Some(message)),
        Frame::Control(Control::Error {
            code,
            message,
            re,
            count,
        }) => match code.as_str() {
            code::DROPPED => {
                let n = count.unwrap_or(0);
                tracing::warn!(dropped = n, "the hub dropped events for this client");
                shared.notify_subscriptions(|| {
                    Error::new(
                        ErrorKind::Dropped,
                        format!("the hub dropped {n} events because this client fell behind"),
                    )
                });
            }
            code::INVALID_PATTERN | code::FORBIDDEN | code::LIMIT | code::RATE_LIMITED => {
                let id = re.as_deref().and_then(|r| r.parse::<u64>().ok());
                let confirmed =
                    id.and_then(|id| lock(&shared.subs).get_mut(&id).and_then(|s| s.confirmed.take()));
                match confirmed {
                    Some(confirmed) => {
                        let error = match code.as_str() {
                            code::INVALID_PATTERN => Error::new(ErrorKind::InvalidTopic, message),
                            code::RATE_LIMITED => Error::new(ErrorKind::Throttled, message),
                            _ => Error::new(ErrorKind::Rejected, message).with_retryable(false),
                        };
                        let _ = confirmed.send(Err(error));
                    }
                    None => tracing::warn!(code, message, re, "the hub refused a subscription or event"),
                }
            }
            _ => tracing::warn!(code, message, re, "the hub reported an error"),
        },
        Frame::Control(_) => {}
    }
}

/// Resolves an event the hub acknowledged (`nack` = `Some(why)`).
fn settle(shared: &Shared, id: &str, nack: Option<String>) {
    let outgoing = {
        let mut inflight = lock(&shared.inflight);
        let Some(queue) = inflight.get_mut(id) else { return };
        let outgoing = queue.pop_front();
        if queue.is_empty() {
            inflight.remove(id);
        }
        outgoing
    };
    shared.inflight_changed.notify_waiters();
    if let Some(outgoing) = outgoing {
        match nack {
            None => outgoing.succeed(),
            Some(why) => outgoing.fail(
                Error::new(
                    ErrorKind::Rejected,
                    format!("the hub did not handle the event: {why}"),
                )
                .with_retryable(true),
            ),
        }
    }
}

async fn dispatch(shared: &Shared, event: Event) {
    let topic: Arc<str> = event.topic().into();
    let targets: Vec<_> = lock(&shared.subs)
        .values()
        .filter(|s| s.matches(&topic))
        .map(|s| s.tx.clone())
        .collect();
    for tx in targets {
        let delivery = Delivery::new(event.clone(), topic.clone(), WsAcker).with_system(crate::SYSTEM);
        // Waiting here is the backpressure: the hub's queue for this client
        // fills and its slow-client policy applies.
        let _ = tx.send(Ok(delivery)).await;
    }
}

/// A frame that is not an event goes to every subscription as a poison
/// delivery: nothing in it says which subscription it was meant for.
async fn poison(shared: &Shared, body: Bytes, error: Error) {
    let targets: Vec<_> = lock(&shared.subs).values().map(|s| s.tx.clone()).collect();
    for tx in targets {
        let raw = RawMessage {
            topic: Arc::from(""),
            headers: Vec::new(),
            body: body.clone(),
        };
        let error = Error::new(error.kind(), error.to_string());
        let delivery = Delivery::poison(Poison::new(raw, error), WsAcker).with_system(crate::SYSTEM);
        let _ = tx.send(Ok(delivery)).await;
    }
}

/// Writes commands, queued events and pings; returns why it stopped, or
/// `None` if the reader stopped first.
async fn write_loop(
    shared: &Shared,
    conn: &Conn,
    sink: &mut Sink,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Option<String> {
    let interval = shared.config.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    let why = loop {
        if shared.shutdown.is_cancelled() {
            let why = close_gracefully(shared, sink, &mut batch).await;
            conn.writer_done.cancel();
            return Some(why);
        }
        if conn.reader_done.is_cancelled() {
            break None;
        }
        batch.clear();
        shared.take_outgoing(BATCH, &mut batch);
        if !batch.is_empty() {
            let idle_timeout = shared.config.idle_timeout;
            let stalled = tokio::select! {
                r = write_events(shared, sink, &mut batch) => match r {
                    Ok(()) => continue,
                    Err(e) => format!("write failed: {e}"),
                },
                () = conn.silent_for(idle_timeout) => format!("no frame from the hub for {idle_timeout:?}"),
                () = conn.reader_done.cancelled() => "the connection closed".to_owned(),
            };
            // Cut short mid-write: whether the hub got these is unknown.
            for outgoing in batch.drain(..) {
                outgoing.fail(Error::new(
                    ErrorKind::Connection,
                    format!("websocket connection broke while sending: {stalled}"),
                ));
            }
            break Some(stalled);
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => {}
            () = conn.reader_done.cancelled() => {}
            () = shared.outbox_ready.notified() => {}
            command = commands.recv() => {
                let message = match command {
                    Some(Command::Subscribe(id)) => lock(&shared.subs).get(&id).map(|sub| Control::Subscribe {
                        id: id.to_string(),
                        patterns: sub.patterns.iter().map(|p| p.as_str().to_owned()).collect(),
                    }),
                    Some(Command::Unsubscribe(id)) => Some(Control::Unsubscribe { id: id.to_string() }),
                    None => None,
                };
                if let Some(message) = message
                    && let Err(e) = sink.send(control(&message)).await
                {
                    break Some(format!("write failed: {e}"));
                }
            }
            _ = ping.tick() => {
                if conn.idle_for() >= shared.config.idle_timeout {
                    break Some(format!("no frame from the hub for {:?}", shared.config.idle_timeout));
                }
                let idle_timeout = shared.config.idle_timeout;
                tokio::select! {
                    r = sink.send(Message::Ping(Bytes::new())) => if let Err(e) = r {
                        break Some(format!("ping failed: {e}"));
                    },
                    () = conn.silent_for(idle_timeout) => {
                        break Some(format!("no frame from the hub for {idle_timeout:?}"));
                    }
                }
            }
        }
    };
    // A broken connection: no handshake to wait for.
    conn.abort.cancel();
    conn.writer_done.cancel();
    let _ = tokio::time::timeout(Duration::from_millis(100), sink.close()).await;
    why
}

async fn write_events(shared: &Shared, sink: &mut Sink, batch: &mut Vec<Outgoing>) -> Result<(), WsError> {
    let mut result = Ok(());
    for outgoing in batch.iter() {
        if let Err(e) = sink.feed(Message::Text(outgoing.text.clone())).await {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        result = sink.flush().await;
    }
    match &result {
        Ok(()) if shared.config.acks => {
            let mut inflight = lock(&shared.inflight);
            for outgoing in batch.drain(..) {
                inflight
                    .entry(Arc::from(outgoing.event.id()))
                    .or_default()
                    .push_back(outgoing);
            }
        }
        Ok(()) => batch.drain(..).for_each(Outgoing::succeed),
        Err(e) => {
            // Whether the hub got any of these is unknown: the caller
            // decides whether to send again.
            let message = format!("websocket connection broke while sending: {e}");
            for outgoing in batch.drain(..) {
                outgoing.fail(Error::new(ErrorKind::Connection, message.clone()));
            }
        }
    }
    result
}

/// Sends what is queued, waits for outstanding acknowledgements, and
/// starts the close handshake.
async fn close_gracefully(shared: &Shared, sink: &mut Sink, batch: &mut Vec<Outgoing>) -> String {
    let flushed = tokio::time::timeout(shared.config.request_timeout, async {
        loop {
            batch.clear();
            shared.take_outgoing(BATCH, batch);
            if batch.is_empty() {
                break;
            }
            if write_events(shared, sink, batch).await.is_err() {
                return;
            }
        }
        loop {
            let changed = shared.inflight_changed.notified();
            if lock(&shared.inflight).is_empty() {
                break;
            }
            changed.await;
        }
    })
    .await;
    if flushed.is_err() {
        tracing::warn!("websocket client closing with events unsent or unacknowledged");
    }
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: Utf8Bytes::from_static("client closing"),
    }));
    let _ = tokio::time::timeout(CLOSE_WAIT, sink.send(close)).await;
    "client closed".to_owned()
}
