//! Real processes killed with SIGKILL: a forwarder in the middle of its
//! batches, and an application between its business write and its
//! publish. Nothing is lost; the forwarder's duplicates are counted and
//! come only from what it had in flight.
//!
//! The processes are this test binary run again with `WT_SQL_CHILD` set,
//! which makes the ignored test `child` play the part.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::process::{Child, Command};
use tower::ServiceExt as _;
use watchtower::{Event, SubscribeOptions, serve};
use watchtower_redis::{RedisClient, RedisConfig};
use watchtower_test_support::within;

use common::{Db, POSTGRES, REDIS, Tables, collect, redis_delete, redis_ids, redis_len, take};

/// How many deliveries one forwarder process holds at most: its handler
/// concurrency, its buffer, and the batch it is claiming.
const CONCURRENCY: usize = 32;
const BATCH: usize = 64;

fn spawn_child(role: &str, name: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("WT_SQL_CHILD", role)
        .env("WT_SQL_NAME", name)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The part a child process plays, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the crash tests as a child process"]
async fn child() {
    let (Ok(role), Ok(name)) = (std::env::var("WT_SQL_CHILD"), std::env::var("WT_SQL_NAME")) else {
        return;
    };
    let client = watchtower_sql::SqlClient::connect(
        watchtower_sql::SqlConfig::new(format!("{POSTGRES}?application_name={}", app_name(&name)))
            .table_prefix(common::prefix(&name))
            .poll_interval(Duration::from_millis(100))
            .max_connections(4)
            .batch_size(BATCH)
            .visibility_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    match role.as_str() {
        "forwarder" => {
            let redis = RedisClient::connect(RedisConfig::new(REDIS)).await.unwrap();
            let subscription = watchtower::Subscriber::open(
                &client.subscriber(),
                SubscribeOptions::new([format!("{name}.>")])
                    .unwrap()
                    .group("forwarder")
                    .unwrap(),
            )
            .await
            .unwrap();
            serve(subscription, redis.publisher())
                .concurrency(CONCURRENCY)
                .await
                .unwrap();
        }
        "app" => {
            let pool = client.pg_pool().unwrap();
            let publisher = client.publisher();
            let orders = format!("{}orders", common::prefix(&name));
            for n in 0_i64.. {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(&format!("INSERT INTO {orders} (id) VALUES ($1)"))
                    .bind(n)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                let event = Event::new(format!("{name}.order"), serde_json::json!({ "n": n }));
                publisher.publish_in(&mut *tx, event).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// The PostgreSQL `application_name` of the child processes of test `name`.
fn app_name(name: &str) -> String {
    format!("wtchild_{}", common::prefix(name))
}

/// Waits until PostgreSQL has closed every connection of the killed
/// children of test `name`: a transaction whose `COMMIT` was on the wire
/// when its process died is then committed, any other rolled back.
async fn children_gone(pool: &sqlx::PgPool, name: &str) {
    within("the killed process's connections to close", async {
        loop {
            let open: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1")
                    .bind(app_name(name))
                    .fetch_one(pool)
                    .await
                    .unwrap();
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn total_in_redis(keys: &[String]) -> usize {
    let mut total = 0;
    for key in keys {
        total += redis_len(key).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_forwarder_killed_mid_batch_loses_nothing() {
    let tables = Tables::new(Db::Postgres, "crashfwd").await;
    let ns = tables.name.clone();
    let keys: Vec<String> = (0..8).map(|k| format!("{ns}.k{k}")).collect();
    let events: Vec<Event> = (0..10_000)
        .map(|i| Event::new(keys[i % keys.len()].clone(), serde_json::json!({ "i": i })))
        .collect();
    let publisher = tables.client.publisher();
    for receipt in join_all(events.iter().cloned().map(|e| publisher.clone().oneshot(e))).await {
        receipt.unwrap();
    }

    let mut first = spawn_child("forwarder", &ns);
    within("the first forwarder to hand over 3000 events", async {
        while total_in_redis(&keys).await < 3000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    first.kill().await.unwrap();
    let at_kill = total_in_redis(&keys).await;
    assert!(at_kill < events.len(), "killed after it had finished: {at_kill}");

    let mut second = spawn_child("forwarder", &ns);
    let mut got = Vec::new();
    within("every event in Redis", async {
        loop {
            got.clear();
            for key in &keys {
                got.extend(redis_ids(key).await);
            }
            if got.iter().collect::<HashSet<_>>().len() == events.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    second.kill().await.unwrap();
    let unique: HashSet<&String> = got.iter().collect();
    let sent: HashSet<String> = events.iter().map(|e| e.id().to_owned()).collect();
    assert_eq!(unique.len(), sent.len());
    assert!(
        unique.iter().all(|id| sent.contains(*id)),
        "only published events"
    );
    let duplicates = got.len() - unique.len();
    println!("forwarder killed at {at_kill} of 10000 events: {duplicates} duplicates");
    assert!(
        duplicates <= CONCURRENCY + 2 * BATCH,
        "{duplicates} duplicates, more than one process holds in flight"
    );
    redis_delete(&keys).await;
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_app_killed_between_write_and_publish_loses_nothing() {
    let tables = Tables::new(Db::Postgres, "crashapp").await;
    let ns = tables.name.clone();
    let pool = tables.client.pg_pool().unwrap();
    let orders = format!("{}orders", common::prefix(&ns));
    sqlx::query(&format!("CREATE TABLE {orders} (id BIGINT PRIMARY KEY)"))
        .execute(pool)
        .await
        .unwrap();
    let count = format!("SELECT COUNT(*) FROM {orders}");
    let mut app = spawn_child("app", &ns);
    within("the application to commit 300 orders", async {
        loop {
            let n: i64 = sqlx::query_scalar(&count).fetch_one(pool).await.unwrap();
            if n >= 300 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    app.kill().await.unwrap();
    children_gone(pool, &ns).await;
    let orders_stored: Vec<i64> = sqlx::query_scalar(&format!("SELECT id FROM {orders} ORDER BY id"))
        .fetch_all(pool)
        .await
        .unwrap();
    let n = orders_stored.len();
    assert_eq!(orders_stored, (0..n as i64).collect::<Vec<_>>());

    let (mut rx, handle) = collect(
        &tables.client.subscriber(),
        SubscribeOptions::new([format!("{ns}.order")])
            .unwrap()
            .group("relay")
            .unwrap(),
    )
    .await;
    let got = take(&mut rx, n).await;
    let numbers: Vec<i64> = got
        .iter()
        .map(|e| e.json::<serde_json::Value>().unwrap()["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        numbers, orders_stored,
        "one event per committed order, in commit order"
    );
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked as usize, n);
    assert!(rx.try_recv().is_err(), "no event without its order");
    sqlx::query(&format!("DROP TABLE {orders}"))
        .execute(pool)
        .await
        .unwrap();
    tables.drop_all().await;
}
