//! Shared test support: the local broker, unique names, private servers.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tower::Service;
use watchtower::Event;
use watchtower_nats::jetstream::{StorageType, StreamConfig};
use watchtower_nats::{NatsClient, NatsConfig};

/// The shared broker every machine runs.
pub const LOCAL: &str = "nats://127.0.0.1:4222";

/// The longest any single wait in these tests may take.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A name no other test uses: `prefix` plus a random token.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

pub async fn local() -> NatsClient {
    NatsClient::connect(NatsConfig::new(LOCAL).name("watchtower-nats-tests"))
        .await
        .expect("the local NATS broker at 127.0.0.1:4222")
}

/// A memory stream named `name` capturing `name.>`.
pub async fn stream(client: &NatsClient, name: &str) {
    client
        .create_or_update_stream(StreamConfig {
            name: name.to_owned(),
            subjects: vec![format!("{name}.>")],
            storage: StorageType::Memory,
            max_age: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("create stream");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private `nats-server -js` on a free port with its own store, that a
/// test can kill and restart. Killed on drop.
pub struct PrivateServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl PrivateServer {
    pub async fn start() -> PrivateServer {
        let dir = std::env::temp_dir().join(unique("wt-nats-"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = PrivateServer {
            port: free_port(),
            dir,
            child: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server binary");
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        // The server logs "Server is ready" once it accepts clients.
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        tokio::time::timeout(PATIENCE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Server is ready") {
                    return;
                }
            }
            panic!("private nats-server exited before it was ready");
        })
        .await
        .expect("private nats-server did not start");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    }

    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill nats-server");
        }
    }

    /// Stops the server the way an operator would (SIGTERM), letting it
    /// flush its store.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            tokio::time::timeout(PATIENCE, child.wait())
                .await
                .expect("nats-server did not stop")
                .expect("wait for nats-server");
        }
    }

    /// Freezes the server (SIGSTOP): its connections stay open but it
    /// answers nothing until [`resume`](Self::resume).
    pub async fn freeze(&self) {
        self.signal("-STOP");
        // The signal is sent, not yet acted on: a thread of the server may
        // still be running. Wait until every thread is stopped.
        let pid = self.pid();
        tokio::time::timeout(Duration::from_secs(20), async {
            while !all_threads_stopped(pid) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the server stopped");
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("a running nats-server")
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill command");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// store.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Stops the server gracefully and starts it again.
    pub async fn restart_gracefully(&mut self) {
        self.stop().await;
        self.spawn().await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // A frozen server does not die of SIGKILL until it runs again
            // on some systems; make sure it can.
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` events to `topic`, each carrying its number.
pub fn numbered(topic: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new(topic.to_owned(), serde_json::json!({ "i": i })))
        .collect()
}

/// Calls `publisher` with every event, each after its `poll_ready`, and
/// returns the futures unawaited.
pub async fn call_all<S>(publisher: &mut S, events: &[Event]) -> Vec<S::Future>
where
    S: Service<Event>,
    S::Error: std::fmt::Debug,
{
    let mut futures = Vec::with_capacity(events.len());
    for event in events {
        std::future::poll_fn(|cx| publisher.poll_ready(cx)).await.unwrap();
        futures.push(publisher.call(event.clone()));
    }
    futures
}

/// Whether every thread of process `pid` is stopped (state `T`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}
