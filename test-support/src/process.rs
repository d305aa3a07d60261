//! Private broker processes: one implementation, a [`Broker`] per program.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::{PATIENCE, free_port, unique};

/// A broker program [`BrokerProcess`] can run: how to start it on a port
/// with a store directory, and how it says it is ready.
pub trait Broker {
    /// The program, found on `PATH`.
    const PROGRAM: &'static str;
    /// The URL scheme of [`BrokerProcess::url`].
    const SCHEME: &'static str;
    /// Part of the log line that says the broker accepts clients.
    const READY: &'static str;
    /// Whether the broker logs to stderr (else stdout).
    const LOGS_TO_STDERR: bool;
    /// How long it may take to get ready: [`PATIENCE`] unless the broker
    /// says.
    const STARTUP: Duration = PATIENCE;

    /// The arguments that make it listen on 127.0.0.1:`port` with its store
    /// in `dir`; the test's extra arguments follow them.
    fn args(port: u16, dir: &Path) -> Vec<String>;

    /// Environment variables it needs on top of the test's own: none
    /// unless the broker says.
    fn env(_port: u16, _dir: &Path) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Writes what it needs into `dir` before its first start
    /// (configuration files): nothing unless the broker says.
    fn prepare(_port: u16, _dir: &Path) {}
}

/// `nats-server` with JetStream, logging "Server is ready" on stderr.
#[derive(Debug)]
pub struct Nats;

impl Broker for Nats {
    const PROGRAM: &'static str = "nats-server";
    const SCHEME: &'static str = "nats";
    const READY: &'static str = "Server is ready";
    const LOGS_TO_STDERR: bool = true;

    fn args(port: u16, dir: &Path) -> Vec<String> {
        let dir = dir.display().to_string();
        ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd", &dir]
            .map(str::to_owned)
            .into()
    }
}

/// `redis-server` without persistence (no RDB snapshots, no AOF), logging
/// "Ready to accept connections" on stdout.
#[derive(Debug)]
pub struct Redis;

impl Broker for Redis {
    const PROGRAM: &'static str = "redis-server";
    const SCHEME: &'static str = "redis";
    const READY: &'static str = "Ready to accept connections";
    const LOGS_TO_STDERR: bool = false;

    fn args(port: u16, dir: &Path) -> Vec<String> {
        let dir = dir.display().to_string();
        let port = port.to_string();
        let args = ["--port", &port, "--bind", "127.0.0.1", "--dir", &dir];
        let no_persistence = ["--save", "", "--appendonly", "no"];
        args.into_iter()
            .chain(no_persistence)
            .map(str::to_owned)
            .collect()
    }
}

/// `rabbitmq-server` (RabbitMQ 3.x as Debian installs it) run directly,
/// not through the wrapper that switches to the `rabbitmq` user, with every
/// setting in `dir`: its own node name, ports, database, logs, cookie,
/// no plugins, and none of the machine's `/etc/rabbitmq` settings. It
/// registers its node name with the machine's `epmd`, as every Erlang node
/// does; the shared broker is not touched. It logs "startup complete" on
/// stdout. Starting one takes several seconds.
#[derive(Debug)]
pub struct Rabbit;

impl Broker for Rabbit {
    const PROGRAM: &'static str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
    const SCHEME: &'static str = "amqp";
    const READY: &'static str = "startup complete";
    const LOGS_TO_STDERR: bool = false;
    /// 90 s: an Erlang node boots in 5 to 15 s, several times that on a
    /// loaded machine.
    const STARTUP: Duration = Duration::from_secs(90);

    fn args(_port: u16, _dir: &Path) -> Vec<String> {
        Vec::new()
    }

    fn env(_port: u16, dir: &Path) -> Vec<(String, String)> {
        let env_file = dir.join("env.conf").display().to_string();
        [
            ("HOME", dir.display().to_string()),
            ("RABBITMQ_CONF_ENV_FILE", env_file),
            // The server replaces its shell, so that a kill reaches it.
            ("RUNNING_UNDER_SYSTEMD", "1".to_owned()),
            ("RABBITMQ_LOGS", "-".to_owned()),
        ]
        .map(|(name, value)| (name.to_owned(), value))
        .into()
    }

    fn prepare(port: u16, dir: &Path) {
        let shown = dir.display();
        let env = format!(
            "NODENAME=wt{port}@localhost\n\
             NODE_IP_ADDRESS=127.0.0.1\n\
             NODE_PORT={port}\n\
             DIST_PORT={dist}\n\
             MNESIA_BASE={shown}/mnesia\n\
             LOG_BASE={shown}/log\n\
             ENABLED_PLUGINS_FILE={shown}/enabled_plugins\n\
             CONFIG_FILE={shown}/rabbitmq.conf\n\
             ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {{127,0,0,1}}\"\n",
            dist = free_port(),
        );
        let config = format!("listeners.tcp.1 = 127.0.0.1:{port}\ndisk_free_limit.absolute = 1MB\n");
        let files = [
            ("env.conf", env),
            ("rabbitmq.conf", config),
            ("enabled_plugins", "[].\n".to_owned()),
            // One cookie for every private node, so that they may cluster.
            (".erlang.cookie", "WATCHTOWERTESTNODES".to_owned()),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        }
        // Erlang refuses a cookie others may read.
        let _ = std::process::Command::new("chmod")
            .arg("400")
            .arg(dir.join(".erlang.cookie"))
            .status();
    }
}

/// A private RabbitMQ node on a free port with its own database and
/// logs, reached as `amqp://guest:guest@127.0.0.1:<port>/%2f`. Messages of
/// durable queues outlive a [`stop`](BrokerProcess::stop) and
/// [`restart`](BrokerProcess::restart).
pub type RabbitNode = BrokerProcess<Rabbit>;

/// The `rabbitmqctl` escript itself, not the wrapper that switches to the
/// `rabbitmq` user (whose home holds another cookie).
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

impl BrokerProcess<Rabbit> {
    /// Its Erlang node name, `wt<port>@localhost`: unique on the machine,
    /// so it never meets the shared broker's node in `epmd`.
    pub fn node_name(&self) -> String {
        format!("wt{}@localhost", self.port)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`, the URL a client
    /// connects to.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n <this node> args...` with the private nodes'
    /// cookie and returns what it printed, or what it printed on stderr
    /// if it failed.
    ///
    /// # Errors
    ///
    /// The command's stderr (or why it could not run) if it did not
    /// succeed: the node is down, or refused the command.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new(RABBITMQCTL)
            .arg("-n")
            .arg(self.node_name())
            .args(args)
            // The cookie is read from $HOME/.erlang.cookie.
            .env("HOME", &self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("{RABBITMQCTL}: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

/// A private `nats-server -js` on a free port with its own store.
pub type NatsServer = BrokerProcess<Nats>;

/// A private `redis-server` on a free port, without persistence: after a
/// restart it is empty.
pub type RedisServer = BrokerProcess<Redis>;

/// A private broker process on a free port of 127.0.0.1 with a store
/// directory of its own, that a test may kill, stop, restart (same port,
/// same store, same arguments) or freeze. Killed, and its directory removed,
/// on drop.
pub struct BrokerProcess<B> {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    log: watch::Receiver<Log>,
    broker: PhantomData<B>,
}

/// What the running process has logged since it was last started.
#[derive(Debug, Default)]
struct Log {
    lines: Vec<String>,
    ended: bool,
}

impl<B: Broker> BrokerProcess<B> {
    /// Starts the broker and waits until it accepts clients.
    ///
    /// # Panics
    ///
    /// If the program is missing or does not get ready within
    /// [`PATIENCE`].
    pub async fn start() -> Self {
        Self::with_args(&[]).await
    }

    /// Starts the broker with `extra` arguments after its own (`--auth
    /// token`, `--requirepass secret`) and waits until it accepts clients.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn with_args(extra: &[&str]) -> Self {
        let program = Path::new(B::PROGRAM)
            .file_name()
            .map_or(B::PROGRAM.into(), |name| name.to_string_lossy());
        let dir = std::env::temp_dir().join(unique(&format!("wt_{program}")));
        std::fs::create_dir_all(&dir).expect("a temporary store directory");
        let port = free_port();
        B::prepare(port, &dir);
        let mut process = BrokerProcess {
            port,
            dir,
            extra: extra.iter().map(|&arg| arg.to_owned()).collect(),
            child: None,
            log: watch::channel(Log::default()).1,
            broker: PhantomData,
        };
        process.spawn().await;
        process
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on, for a [`TcpProxy`](crate::TcpProxy).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its URL, `nats://127.0.0.1:<port>` or `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", B::SCHEME, self.port)
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(B::PROGRAM);
        command
            .args(B::args(self.port, &self.dir))
            .args(&self.extra)
            .envs(B::env(self.port, &self.dir))
            // Whatever it leaves behind (an Erlang crash dump) goes there.
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if B::LOGS_TO_STDERR {
            command.stdout(Stdio::null()).stderr(Stdio::piped());
        } else {
            command.stdout(Stdio::piped()).stderr(Stdio::null());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{} could not start: {e}", B::PROGRAM));
        let (tx, rx) = watch::channel(Log::default());
        if B::LOGS_TO_STDERR {
            tokio::spawn(record(child.stderr.take().expect("piped stderr"), tx));
        } else {
            tokio::spawn(record(child.stdout.take().expect("piped stdout"), tx));
        }
        self.child = Some(child);
        self.log = rx;
        self.wait_for_log_within(B::READY, B::STARTUP).await;
    }

    /// Waits until the process, since it was last started, has logged a
    /// line containing `needle` ("JetStream cluster new metadata leader").
    ///
    /// # Panics
    ///
    /// If it exits first, or has not logged it within [`PATIENCE`].
    pub async fn wait_for_log(&self, needle: &str) {
        self.wait_for_log_within(needle, PATIENCE).await;
    }

    /// [`wait_for_log`](Self::wait_for_log), with a patience of its own.
    pub(crate) async fn wait_for_log_within(&self, needle: &str, patience: Duration) {
        let mut log = self.log.clone();
        let found = tokio::time::timeout(
            patience,
            log.wait_for(|log| log.ended || log.lines.iter().any(|line| line.contains(needle))),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} did not log {needle:?} within {patience:?}; it logged:\n{}",
                B::PROGRAM,
                self.last_lines()
            )
        })
        .is_ok_and(|log| log.lines.iter().any(|line| line.contains(needle)));
        assert!(
            found,
            "{} exited before it logged {needle:?}; it logged:\n{}",
            B::PROGRAM,
            self.last_lines()
        );
    }

    /// The last lines it logged, for a failure's message.
    fn last_lines(&self) -> String {
        let log = self.log.borrow();
        let skip = log.lines.len().saturating_sub(30);
        log.lines[skip..].join("\n")
    }

    /// How many lines logged since it was last started contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .borrow()
            .lines
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Whether it runs (it was started and neither killed nor stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills it (SIGKILL) and waits until it is gone; a no-op if it is not
    /// running. [`restart`](Self::restart) starts it again.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .unwrap_or_else(|e| panic!("kill {}: {e}", B::PROGRAM));
        }
    }

    /// Stops it the way an operator would (SIGTERM), letting it flush its
    /// store, and waits until it is gone; a no-op if it is not running.
    ///
    /// # Panics
    ///
    /// If it has not exited within [`PATIENCE`].
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // It may have exited already; the wait below tells.
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            tokio::time::timeout(PATIENCE, child.wait())
                .await
                .unwrap_or_else(|_| panic!("{} did not stop within {PATIENCE:?}", B::PROGRAM))
                .unwrap_or_else(|e| panic!("wait for {}: {e}", B::PROGRAM));
        }
    }

    /// Kills it (SIGKILL) if it runs, and starts it again on the same port
    /// with the same store and arguments.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Stops it gracefully (SIGTERM) if it runs, and starts it again on the
    /// same port with the same store and arguments.
    pub async fn restart_gracefully(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    /// Freezes it (SIGSTOP): its connections stay open but it answers
    /// nothing until [`resume`](Self::resume). Returns once every thread
    /// of the process is stopped.
    ///
    /// # Panics
    ///
    /// If it is not running, or not stopped within [`PATIENCE`].
    pub async fn freeze(&self) {
        let pid = self.pid();
        signal(pid, "-STOP");
        // The signal is sent, not yet acted on: a thread of the server may
        // still be running. Wait until every thread is stopped.
        tokio::time::timeout(PATIENCE, async {
            while !all_threads_stopped(pid) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} was not stopped within {PATIENCE:?}", B::PROGRAM));
    }

    /// Lets a frozen process run again (SIGCONT).
    ///
    /// # Panics
    ///
    /// If it is not running.
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("a running {}", B::PROGRAM))
    }
}

impl<B> Drop for BrokerProcess<B> {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // A frozen process does not die of SIGKILL until it runs again
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

impl<B: Broker> fmt::Debug for BrokerProcess<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerProcess")
            .field("program", &B::PROGRAM)
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("extra", &self.extra)
            .field("pid", &self.child.as_ref().and_then(Child::id))
            .finish()
    }
}

/// Records every line of `log` until the process closes it, so that the
/// pipe never fills up and tests can wait on what the broker said.
async fn record(log: impl AsyncRead + Unpin + Send + 'static, tx: watch::Sender<Log>) {
    let mut lines = BufReader::new(log).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tx.send_modify(|log| log.lines.push(line));
    }
    tx.send_modify(|log| log.ended = true);
}

/// Sends `signal` to process `pid` with kill(1) (the crate forbids the
/// unsafe code a direct call would take).
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("the kill command");
    assert!(status.success(), "kill {signal} {pid} failed");
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
