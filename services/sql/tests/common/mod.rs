//! What the SQL transport's tests share: the databases, and clients on
//! tables of their own that are dropped afterwards.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use watchtower_sql::{SqlClient, SqlConfig};
use watchtower_test_support::unique;

/// The shared PostgreSQL (trust authentication, database `test`).
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Postgres,
    Sqlite,
}

/// A SQLite file of its own, in the temporary directory.
pub fn sqlite_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("watchtower-sql-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.db"))
}

/// The URL of `db` for a test named `name`.
pub fn url(db: Db, name: &str) -> String {
    match db {
        Db::Postgres => POSTGRES.to_owned(),
        Db::Sqlite => format!("sqlite://{}", sqlite_path(name).display()),
    }
}

/// A table prefix no other test uses: `t` and the unique tail of `name`.
pub fn prefix(name: &str) -> String {
    format!("t{}_", &name[name.len() - 18..])
}

/// Settings for tests: short timings, few connections.
pub fn config(db: Db, name: &str) -> SqlConfig {
    SqlConfig::new(url(db, name))
        .table_prefix(prefix(name))
        .poll_interval(Duration::from_millis(100))
        .visibility_timeout(Duration::from_secs(10))
        .batch_size(16)
        .max_connections(4)
}

/// Tables of their own on `db`, dropped when the returned guard's
/// `drop_all` runs.
pub struct Tables {
    pub name: String,
    pub db: Db,
    pub client: SqlClient,
}

impl Tables {
    pub async fn new(db: Db, what: &str) -> Tables {
        let name = unique(what);
        let client = SqlClient::connect(config(db, &name)).await.unwrap();
        Tables { name, db, client }
    }

    /// Another client on the same tables, with `config` changed by `f`.
    pub async fn another(&self, f: impl FnOnce(SqlConfig) -> SqlConfig) -> SqlClient {
        SqlClient::connect(f(config(self.db, &self.name))).await.unwrap()
    }

    pub async fn drop_all(self) {
        drop_tables(&self.client, self.db, &self.name).await;
    }
}

/// Drops the tables of `client` and, on SQLite, its files.
pub async fn drop_tables(client: &SqlClient, db: Db, name: &str) {
    client.drop_tables().await.unwrap();
    if db == Db::Sqlite {
        let path = sqlite_path(name);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}

/// Subscribes `subscriber` with `options` through `serve`, sending every
/// event the handler sees into the returned channel.
pub async fn collect<S: watchtower::Subscriber + 'static>(
    subscriber: &S,
    options: watchtower::SubscribeOptions,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<watchtower::Event>,
    watchtower::SubscriptionHandle,
) {
    use watchtower::SubscriberExt as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = subscriber
        .subscribe_with(
            options,
            tower::service_fn(move |event: watchtower::Event| {
                let sent = tx.send(event);
                async move { sent.map_err(|_| watchtower::Error::closed("test over")) }
            }),
        )
        .await
        .unwrap();
    (rx, handle)
}

/// The next `n` events from `rx`, within the test's patience.
pub async fn take(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<watchtower::Event>,
    n: usize,
) -> Vec<watchtower::Event> {
    let mut got = Vec::with_capacity(n);
    watchtower_test_support::within(&format!("{n} events"), async {
        while got.len() < n {
            got.push(rx.recv().await.expect("subscription open"));
        }
    })
    .await;
    got
}

/// The shared Redis.
pub const REDIS: &str = "redis://127.0.0.1:6379";
/// The shared NATS.
pub const NATS: &str = "nats://127.0.0.1:4222";

/// A connection to the Redis at `url` whose replies may take their time
/// on a loaded machine (the `redis` crate's default is 500 ms).
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// The event ids of every entry of the Redis stream `key`, in stream
/// order, duplicates included.
pub async fn redis_ids(key: &str) -> Vec<String> {
    let mut conn = redis_conn(REDIS).await;
    let mut ids = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some(last) = reply.ids.last() else { break };
        from = format!("({}", last.id);
        for entry in &reply.ids {
            let data: Vec<u8> = entry.get("data").unwrap();
            let event = watchtower::codec::structured::from_slice(&data).unwrap();
            ids.push(event.id().to_owned());
        }
    }
    ids
}

/// The length of the Redis stream `key`.
pub async fn redis_len(key: &str) -> usize {
    let mut conn = redis_conn(REDIS).await;
    redis::cmd("XLEN").arg(key).query_async(&mut conn).await.unwrap()
}

/// Deletes the Redis keys `keys`.
pub async fn redis_delete(keys: &[String]) {
    let mut conn = redis_conn(REDIS).await;
    let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.unwrap();
}
