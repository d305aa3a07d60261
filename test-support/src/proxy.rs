//! A TCP proxy in front of a broker, for fault tests.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on 127.0.0.1 in front of a broker, for fault tests: it can
/// cut every connection, refuse new ones, or stall traffic, while the
/// broker itself is untouched.
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// use watchtower_test_support::TcpProxy;
///
/// let proxy = TcpProxy::start("127.0.0.1:4222".parse().unwrap()).await?;
/// let url = format!("nats://{}", proxy.addr()); // connect the client here
/// proxy.cut(); // every open connection is closed; new ones are accepted
/// proxy.set_down(true); // new connections are refused until set_down(false)
/// # Ok(()) }
/// ```
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// Bumped by `cut`: connections of an older generation close.
    generation: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
    down: AtomicBool,
    open: AtomicUsize,
    accepted: AtomicUsize,
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// If the listening socket cannot be bound.
    pub async fn start(upstream: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            generation: watch::Sender::new(0),
            stalled: watch::Sender::new(false),
            down: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accept_shared.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                accept_shared.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(forward(client, accept_shared.clone()));
            }
        });
        Ok(TcpProxy { addr, shared, task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection; new ones are still accepted.
    pub fn cut(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// While `down`, new connections are closed at once (and `set_down(true)`
    /// also cuts the open ones), as if the broker were unreachable.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// While `stalled`, bytes are held in both directions: connections stay
    /// open but nothing arrives, as with a hung peer.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Connections accepted since the start.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections have been accepted in total.
    pub async fn wait_accepted(&self, n: usize) {
        let mut generation = self.shared.generation.subscribe();
        while self.accepted_connections() < n {
            // Cheap polling on the proxy's own state; the proxy has no
            // event for "accepted", and this is test support code.
            tokio::select! {
                _ = generation.changed() => {}
                _ = tokio::task::yield_now() => {}
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("open", &self.open_connections())
            .finish()
    }
}

async fn forward(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.open.fetch_add(1, Ordering::SeqCst);
    let mut generation = shared.generation.subscribe();
    generation.mark_unchanged();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pipe(client_read, server_write, shared.stalled.subscribe()) => {}
        _ = pipe(server_read, client_write, shared.stalled.subscribe()) => {}
        _ = generation.changed() => {}
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
