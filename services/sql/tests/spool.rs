//! The local spool: a service keeps accepting events while its broker is
//! down, and they reach the broker in order when it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use watchtower::{ErrorKind, Event, PublishExt as _};
use watchtower_redis::{RedisClient, RedisConfig};
use watchtower_test_support::{RedisServer, unique, within};

use common::sqlite_path;

async fn stream_ids(url: &str, key: &str) -> Vec<String> {
    let mut conn = common::redis_conn(url).await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            let data: Vec<u8> = entry.get("data").unwrap();
            watchtower::codec::structured::from_slice(&data)
                .unwrap()
                .id()
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_keeps_accepting_while_the_broker_is_down_and_drains_in_order() {
    let mut server = RedisServer::start().await;
    let url = server.url();
    let name = unique("spool");
    let path = sqlite_path(&name);
    let redis = RedisClient::connect(RedisConfig::new(url.clone()).reconnect_retries(0))
        .await
        .unwrap();
    let mut spool = watchtower_sql::spool(&path, redis.publisher()).await.unwrap();
    let keys: Vec<String> = (0..4).map(|k| format!("{name}.k{k}")).collect();

    // Up: events go straight through.
    let before = Event::new(keys[0].clone(), serde_json::json!({ "phase": "up" }));
    spool.publish(before.clone()).await.unwrap();
    within("the first event in Redis", async {
        while stream_ids(&url, &keys[0]).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Down: every publish is still answered, from the spool file.
    server.kill().await;
    let mut sent: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..400 {
        let key = &keys[i % keys.len()];
        let event = Event::new(key.clone(), serde_json::json!({ "i": i }));
        spool.publish(event.clone()).await.unwrap();
        sent.entry(key.clone()).or_default().push(event.id().to_owned());
    }
    assert!(
        spool.pending().await.unwrap() >= 399,
        "held while the broker is down"
    );

    // Back (empty: no persistence): all 400 arrive, in order per key.
    server.restart().await;
    within("the spool to drain", async {
        while spool.pending().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    for key in &keys {
        assert_eq!(stream_ids(&url, key).await, sent[key], "order of {key}");
    }
    let stats = spool.shutdown().await.unwrap();
    assert_eq!(stats.acked, 401, "{stats}");
    assert_eq!(stats.dead_lettered, 0);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// What the spool held when its process stopped is forwarded when the
/// spool is opened again; an event the broker refuses for good is a
/// durable dead letter, and the spool goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_survives_a_restart_and_dead_letters_what_the_broker_refuses() {
    let name = unique("spoolre");
    let path = sqlite_path(&name);
    let key = format!("{name}.k");
    // A broker that refuses event 3 for good and is otherwise down.
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let broker = {
        let (up, received) = (up.clone(), received.clone());
        tower::service_fn(move |event: Event| {
            let (up, received) = (up.clone(), received.clone());
            async move {
                if event.json::<serde_json::Value>().unwrap()["i"] == 3 {
                    return Err(watchtower::Error::new(ErrorKind::Rejected, "no such stream"));
                }
                if !up.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(watchtower::Error::new(ErrorKind::Connection, "down").with_retryable(true));
                }
                received.lock().unwrap().push(event.id().to_owned());
                Ok::<_, watchtower::Error>(())
            }
        })
    };
    let events: Vec<Event> = (0..10)
        .map(|i| Event::new(key.clone(), serde_json::json!({ "i": i })))
        .collect();
    let mut spool = watchtower_sql::spool(&path, broker.clone()).await.unwrap();
    for event in &events {
        spool.publish(event.clone()).await.unwrap();
    }
    spool.shutdown().await.unwrap();

    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let spool = watchtower_sql::spool(&path, broker).await.unwrap();
    within("the spool to drain", async {
        while spool.pending().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let expected: Vec<String> = events
        .iter()
        .filter(|e| e.json::<serde_json::Value>().unwrap()["i"] != 3)
        .map(|e| e.id().to_owned())
        .collect();
    assert_eq!(*received.lock().unwrap(), expected, "in order, once each");
    let dead = spool.dead_letters().list(0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id(), events[3].id());
    assert_eq!(dead[0].event.extension("deadletterkind"), Some("rejected"));
    spool.shutdown().await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
