//! Helpers shared by the integration tests: unique names, raw Redis
//! access, cleanup, and private `redis-server` processes for fault tests.

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::process::Stdio;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const URL: &str = "redis://127.0.0.1:6379";

/// A unique topic namespace for one test.
pub fn namespace(test: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("wtr_{test}_{}", &id[20..])
}

pub async fn raw(url: &str) -> MultiplexedConnection {
    // The client's 500 ms default is too short on a loaded test machine.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(20)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Deletes every key starting with `prefix`.
pub async fn cleanup(url: &str, prefix: &str) {
    let mut conn = raw(url).await;
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Entries pending in `group` on `key`.
pub async fn pending(conn: &mut MultiplexedConnection, key: &str, group: &str) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query_async(conn)
        .await
        .unwrap();
    match summary {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => panic!("unexpected XPENDING reply {items:?}"),
        },
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

/// Waits (with Redis blocking, not sleeping) until `key` has an entry after
/// `after`, and returns the entries' fields.
pub async fn wait_entries(
    conn: &mut MultiplexedConnection,
    key: &str,
    after: &str,
) -> Vec<(String, Vec<(String, Vec<u8>)>)> {
    let reply: redis::Value = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(20_000)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .query_async(conn)
        .await
        .unwrap();
    let redis::Value::Array(streams) = reply else {
        panic!("no entries in {key} within 20 s: {reply:?}")
    };
    let mut out = Vec::new();
    for stream in streams {
        let redis::Value::Array(parts) = stream else {
            panic!()
        };
        let redis::Value::Array(entries) = &parts[1] else {
            panic!()
        };
        for entry in entries {
            let redis::Value::Array(e) = entry else { panic!() };
            let id: String = redis::from_redis_value_ref(&e[0]).unwrap();
            let flat: Vec<Vec<u8>> = redis::from_redis_value_ref(&e[1]).unwrap();
            let fields = flat
                .chunks(2)
                .map(|c| (String::from_utf8(c[0].clone()).unwrap(), c[1].clone()))
                .collect();
            out.push((id, fields));
        }
    }
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` without persistence, killed on drop.
pub struct RedisProcess {
    pub port: u16,
    child: Child,
}

impl RedisProcess {
    pub async fn start(port: u16, extra: &[&str]) -> RedisProcess {
        let mut child = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("Ready to accept connections") {
                    return;
                }
            }
            panic!("redis-server exited before it was ready");
        })
        .await
        .expect("redis-server ready within 20 s");
        // Keep reading so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        RedisProcess { port, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open and commands
    /// wait, unanswered, until [`resume`](Self::resume).
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
        self.child.id().expect("a running redis-server")
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill command");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

/// `n` events to `topic`, each carrying its number.
pub fn numbered(topic: &str, n: usize) -> Vec<watchtower::Event> {
    (0..n)
        .map(|i| watchtower::Event::new(topic.to_owned(), serde_json::json!({"i": i})))
        .collect()
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

/// The event id of an entry's fields, in either content mode: the `id`
/// field (binary), or the `id` of the document in `data` (structured).
#[allow(dead_code)]
pub fn event_id<N: AsRef<[u8]>, V: AsRef<[u8]>>(fields: impl IntoIterator<Item = (N, V)>) -> Vec<u8> {
    let mut data = None;
    for (name, value) in fields {
        match name.as_ref() {
            b"id" => return value.as_ref().to_vec(),
            b"data" => data = Some(value.as_ref().to_vec()),
            _ => {}
        }
    }
    let document: serde_json::Value = serde_json::from_slice(&data.expect("an id or a data field")).unwrap();
    document["id"]
        .as_str()
        .expect("a document with an id")
        .as_bytes()
        .to_vec()
}
