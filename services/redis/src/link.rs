//! The publisher's own connection for `XADD`s, over plain TCP
//! (`redis://`).
//!
//! One task owns the socket. It takes batches from the [`Queue`] by the
//! same rules as the pipelined path, encodes each `XADD` straight into its
//! write buffer (through one command buffer reused for every event, so no
//! allocation per event), writes while it reads, and hands each reply to
//! the oldest command still unanswered: Redis answers a connection's
//! commands in the order it received them. The `redis` crate's multiplexed
//! connection would put a task of its own between this one and the socket,
//! with a channel message, a response slot and a timer per pipeline; on a
//! machine with few cores, that hand-over between threads is what a busy
//! publisher pays for most.
//!
//! Failures keep the batching path's promise: if the connection breaks,
//! times out or sends a malformed reply, every command written and not yet
//! answered fails with [`ErrorKind::Connection`] or [`ErrorKind::Timeout`]
//! (its event may or may not have been stored), the socket is dropped, and
//! the next request connects again. If connecting fails, every waiting
//! request gets that error.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use redis::{Client, Cmd, ConnectionAddr, RedisConnectionInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use watchtower::reply::Filled;
use watchtower::{Error, ErrorKind};

use crate::batch::{Answer, Idle, Queue, Request, Stopped, Take, Target, refused};
use crate::publisher::{LinkState, write_xadd};
use crate::resp::{Frame, MAX_REPLY, Reader};

/// The read buffer's size, and how much it grows by when one reply is
/// longer. A reply is at most this long, so the buffer stays below twice
/// this size.
const READ_CHUNK: usize = MAX_REPLY;

/// How the task reaches Redis.
pub(crate) struct Settings {
    pub(crate) client: Client,
    pub(crate) connection_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) target: Target,
}

/// Whether this connection can reach `addr`: plain TCP (TLS goes through
/// the `redis` crate's connection).
pub(crate) fn supports(addr: &ConnectionAddr) -> bool {
    matches!(addr, ConnectionAddr::Tcp(..))
}

/// Sends the queued requests until the queue is closed and empty and
/// every reply is in.
///
/// `stopped` is made by the spawner, so that a task dropped before its
/// first poll still lets its callers know.
pub(crate) async fn link_loop(settings: Settings, health: Arc<LinkState>, stopped: Stopped) {
    let mut task = Task {
        settings,
        health,
        queue: &stopped.0,
        link: None,
        connecting: None,
        scratch: Cmd::new(),
        filled: Vec::new(),
    };
    poll_fn(|cx| task.poll(cx)).await;
}

/// What [`Task::connect`] came to.
enum Connect {
    /// Connected.
    Open,
    /// Connecting, or nothing to connect for.
    Wait,
    /// Every publisher is gone and nothing is left.
    Done,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Link, Error>> + Send>>;

struct Task<'a> {
    settings: Settings,
    health: Arc<LinkState>,
    queue: &'a Arc<Queue>,
    link: Option<Link>,
    connecting: Option<Connecting>,
    /// Each `XADD` is written here, then packed into the write buffer.
    scratch: Cmd,
    /// Replies filled in this round: their callers are woken together,
    /// after their places are freed.
    filled: Vec<Filled<Answer>>,
}

impl Task<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.queue.register(cx);
        let done = self.work(cx);
        // Room first, so that woken callers find it; then every caller.
        self.queue.release(self.filled.len());
        self.filled.clear();
        done
    }

    fn work(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(link) = self.link.as_mut() else {
                match self.connect(cx) {
                    Connect::Open => continue,
                    Connect::Wait => return Poll::Pending,
                    Connect::Done => return Poll::Ready(()),
                }
            };
            if let Err(e) = link.poll_replies(cx, &self.settings.target.prefix, &mut self.filled) {
                self.broken(e);
                continue;
            }
            let last = loop {
                match self.queue.take(link.batches.len()) {
                    Take::Batch(mut batch) => {
                        let dropped = self.queue.drop_abandoned(&mut batch);
                        self.queue.release(dropped);
                        link.push(batch, &self.settings, &mut self.scratch);
                    }
                    other => break other,
                }
            };
            if let Poll::Ready(Err(e)) = link.poll_write(cx) {
                self.broken(e);
                continue;
            }
            if let Err(e) = link.poll_deadline(cx, self.settings.response_timeout) {
                self.broken(e);
                continue;
            }
            // Every source of work is watched: the queue, the socket both
            // ways and the deadline.
            return match last {
                Take::Done => Poll::Ready(()),
                _ => Poll::Pending,
            };
        }
    }

    /// Without a connection: connects while requests wait.
    fn connect(&mut self, cx: &mut Context<'_>) -> Connect {
        if self.connecting.is_none() {
            match self.queue.without_connection() {
                Idle::Requests => {}
                Idle::Empty => return Connect::Wait,
                Idle::Closed => return Connect::Done,
            }
            let client = self.settings.client.clone();
            let timeout = self.settings.connection_timeout;
            self.connecting = Some(Box::pin(async move { Link::open(&client, timeout).await }));
        }
        let Some(connecting) = self.connecting.as_mut() else {
            return Connect::Wait;
        };
        let Poll::Ready(result) = connecting.as_mut().poll(cx) else {
            return Connect::Wait;
        };
        self.connecting = None;
        self.health.observe(&result);
        match result {
            Ok(link) => {
                self.link = Some(link);
                Connect::Open
            }
            Err(e) => {
                // Nothing was sent: every waiting request learns why.
                for request in self.queue.take_all() {
                    self.filled
                        .push(request.reply.fill(Err(Error::new(e.kind(), e.message()))));
                }
                Connect::Wait
            }
        }
    }

    /// Drops a broken connection; every command on it gets the error.
    fn broken(&mut self, err: Error) {
        let Some(link) = self.link.take() else {
            return;
        };
        self.health.failed(&err);
        let message = format!("{}; the event may or may not have been stored", err.message());
        for request in link.waiting {
            self.filled
                .push(request.reply.fill(Err(Error::new(err.kind(), message.as_str()))));
        }
    }
}

/// An open connection and the commands on it.
struct Link {
    socket: TcpStream,
    /// Encoded commands; those before `written` are on the wire.
    out: Vec<u8>,
    written: usize,
    /// Bytes read; those from `start` to `end` are not parsed yet.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Where the reply at `start` was left.
    reader: Reader,
    /// Commands written or being written, oldest first, awaiting replies.
    waiting: VecDeque<Request>,
    /// Unanswered commands per batch, oldest first.
    batches: VecDeque<usize>,
    /// When the oldest unanswered command times out.
    deadline: Pin<Box<Sleep>>,
    /// A reply came since the deadline was last set.
    deadline_moved: bool,
}

impl Link {
    /// Connects, authenticates and selects the database, within `timeout`.
    async fn open(client: &Client, timeout: Duration) -> Result<Link, Error> {
        let info = client.get_connection_info();
        let open = async {
            let ConnectionAddr::Tcp(host, port) = info.addr() else {
                return Err(Error::config("TLS goes through the redis crate's connection"));
            };
            let connecting =
                |e: std::io::Error| Error::new(ErrorKind::Connection, format!("connecting to Redis: {e}"));
            let socket = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connecting)?;
            socket.set_nodelay(true).map_err(connecting)?;
            let mut link = Link {
                socket,
                out: Vec::new(),
                written: 0,
                input: vec![0; READ_CHUNK],
                start: 0,
                end: 0,
                reader: Reader::new(),
                waiting: VecDeque::new(),
                batches: VecDeque::new(),
                deadline: Box::pin(tokio::time::sleep(timeout)),
                deadline_moved: false,
            };
            link.handshake(info.redis_settings()).await?;
            Ok(link)
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "connecting to Redis timed out"))?
    }

    /// `AUTH` and `SELECT` as the settings ask, each answered with `OK`.
    async fn handshake(&mut self, settings: &RedisConnectionInfo) -> Result<(), Error> {
        let mut commands = Vec::new();
        if let Some(password) = settings.password() {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = settings.username() {
                auth.arg(user);
            }
            auth.arg(password);
            commands.push(("AUTH", auth));
        }
        if settings.db() != 0 {
            let mut select = redis::cmd("SELECT");
            select.arg(settings.db());
            commands.push(("SELECT", select));
        }
        for (_, cmd) in &commands {
            cmd.write_packed_command(&mut self.out);
        }
        poll_fn(|cx| self.poll_write(cx)).await?;
        for (name, _) in commands {
            let (frame, end) = poll_fn(|cx| self.poll_frame(cx)).await?;
            let text =
                |range: std::ops::Range<usize>| String::from_utf8_lossy(&self.input[range]).into_owned();
            match frame {
                Frame::Status(_) => {}
                // The server's words name the failure, never the password
                // ("WRONGPASS invalid username-password pair").
                Frame::Error(line) => {
                    return Err(Error::new(
                        ErrorKind::Rejected,
                        format!("Redis refused {name}: {}", text(line)),
                    ));
                }
                _ => return Err(Error::decode(format!("unexpected reply to {name}"))),
            }
            self.start = end;
        }
        Ok(())
    }

    /// Encodes `batch` into the write buffer; its requests await replies.
    fn push(&mut self, batch: Vec<Request>, settings: &Settings, scratch: &mut Cmd) {
        if batch.is_empty() {
            return;
        }
        if self.waiting.is_empty() {
            self.restart_deadline(settings.response_timeout);
        }
        self.batches.push_back(batch.len());
        for request in batch {
            scratch.clear();
            write_xadd(scratch, &settings.target, &request.event);
            scratch.write_packed_command(&mut self.out);
            self.waiting.push_back(request);
        }
    }

    /// Writes what it can of the write buffer.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while self.written < self.out.len() {
            match Pin::new(&mut self.socket).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(lost("Redis stopped taking commands"))),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(lost(&format!("writing to Redis: {e}")))),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// The next whole reply, reading as needed: its frame (with ranges
    /// into `input`) and where it ends. `start` is left for the caller to
    /// move on.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<(Frame, usize), Error>> {
        loop {
            if let Some(parsed) = self.reader.parse(&self.input[..self.end], self.start)? {
                return Poll::Ready(Ok(parsed));
            }
            ready!(self.poll_read(cx))?;
        }
    }

    /// Reads more bytes after `end`, making room first.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.input.len() - self.end < READ_CHUNK / 4 {
            // Move what is left to the front, or grow for a long reply.
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.input.len() - self.end < READ_CHUNK / 4 {
                self.input.resize(self.input.len() + READ_CHUNK, 0);
            }
        }
        let mut buf = ReadBuf::new(&mut self.input[self.end..]);
        match ready!(Pin::new(&mut self.socket).poll_read(cx, &mut buf)) {
            Ok(()) if buf.filled().is_empty() => Poll::Ready(Err(lost("Redis closed the connection"))),
            Ok(()) => {
                self.end += buf.filled().len();
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(lost(&format!("reading from Redis: {e}")))),
        }
    }

    /// Fills in the replies that have come, each for the oldest waiting
    /// command, until the socket has no more.
    fn poll_replies(
        &mut self,
        cx: &mut Context<'_>,
        prefix: &str,
        filled: &mut Vec<Filled<Answer>>,
    ) -> Result<(), Error> {
        loop {
            let (frame, end) = match self.poll_frame(cx) {
                Poll::Ready(Ok(parsed)) => parsed,
                Poll::Ready(Err(e)) if e.kind() == ErrorKind::Decode => {
                    return Err(lost(&format!("{}; connection dropped", e.message())));
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            };
            let Some(request) = self.waiting.pop_front() else {
                return Err(lost("Redis sent a reply no command asked for"));
            };
            let answer = match frame {
                Frame::Bulk(id) | Frame::Status(id) => std::str::from_utf8(&self.input[id])
                    .map(Arc::from)
                    .map_err(|_| Error::decode("XADD answered with an entry id that is not UTF-8")),
                Frame::Error(line) => Err(refused(
                    prefix,
                    &request.event,
                    &String::from_utf8_lossy(&self.input[line]),
                )),
                _ => Err(Error::decode("XADD did not answer with an entry id")),
            };
            self.start = end;
            filled.push(request.reply.fill(answer));
            if let Some(first) = self.batches.front_mut() {
                *first -= 1;
                if *first == 0 {
                    self.batches.pop_front();
                }
            }
            // Progress: the next reply gets a full response timeout.
            self.deadline_moved = true;
        }
    }

    fn restart_deadline(&mut self, timeout: Duration) {
        self.deadline.as_mut().reset(Instant::now() + timeout);
    }

    /// Fails once no reply has come for a whole response timeout while
    /// commands wait.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, timeout: Duration) -> Result<(), Error> {
        if self.waiting.is_empty() {
            return Ok(());
        }
        if std::mem::take(&mut self.deadline_moved) {
            self.restart_deadline(timeout);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Err(Error::new(
                ErrorKind::Timeout,
                format!("Redis did not answer within {timeout:?}; connection dropped"),
            )),
            Poll::Pending => Ok(()),
        }
    }
}

/// The connection is gone or cannot be trusted.
fn lost(message: &str) -> Error {
    Error::new(ErrorKind::Connection, message)
}
