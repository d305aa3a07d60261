//! Faults between the transport and PostgreSQL, through a TCP proxy:
//! connections cut while events flow, and a database that stops
//! answering. The shared database itself is never touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use watchtower::health::Status;
use watchtower::{ErrorKind, Event, PublishExt as _, SubscribeOptions, Transport as _};
use watchtower_sql::{SqlClient, SqlConfig};
use watchtower_test_support::{TcpProxy, unique};

use common::{Db, Tables, collect, take};

async fn through(proxy: &TcpProxy, name: &str) -> SqlConfig {
    SqlConfig::new(format!("postgres://postgres@{}/test", proxy.addr()))
        .table_prefix(common::prefix(name))
        .poll_interval(Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(1))
        .statement_timeout(Duration::from_secs(1))
        .visibility_timeout(Duration::from_secs(2))
        .max_connections(4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_connections_cut_while_events_flow_lose_nothing() {
    let tables = Tables::new(Db::Postgres, "cut").await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await.unwrap();
    let consumer = SqlClient::connect(through(&proxy, &tables.name).await)
        .await
        .unwrap();
    let topic = format!("{}.cut", tables.name);
    let (mut rx, handle) = collect(
        &consumer.subscriber(),
        SubscribeOptions::new([&topic]).unwrap().group("g").unwrap(),
    )
    .await;
    let mut publisher = tables.client.publisher();
    let mut sent = Vec::new();
    for round in 0..5 {
        for i in 0..100 {
            let event = Event::new(topic.clone(), serde_json::json!({ "round": round, "i": i }));
            publisher.publish(event.clone()).await.unwrap();
            sent.push(event);
        }
        proxy.cut();
    }
    // A claim whose commit was cut may have been stored: its events come
    // back after the visibility timeout; a cut acknowledgement is
    // delivered again. At least once: wait until every event is in.
    let expected: HashSet<&str> = sent.iter().map(Event::id).collect();
    let mut got = Vec::new();
    watchtower_test_support::within("every event", async {
        while got.iter().map(Event::id).collect::<HashSet<_>>() != expected {
            got.push(rx.recv().await.unwrap());
        }
    })
    .await;
    let stats = handle.stop().await.unwrap();
    got.extend(std::iter::from_fn(|| rx.try_recv().ok()));
    let unique_ids: HashSet<&str> = got.iter().map(Event::id).collect();
    assert_eq!(unique_ids.len(), sent.len());
    println!(
        "{} duplicates after 5 cuts; {stats}",
        got.len() - unique_ids.len()
    );
    assert!(consumer.health().await.is_up());
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_stalled_database_is_down_and_publishing_times_out() {
    let tables = Tables::new(Db::Postgres, "stall").await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await.unwrap();
    let client = SqlClient::connect(through(&proxy, &tables.name).await)
        .await
        .unwrap();
    let mut publisher = client.publisher();
    publisher
        .publish(Event::new("a.b", serde_json::json!({})))
        .await
        .unwrap();
    proxy.set_stalled(true);
    let health = client.health().await;
    assert_eq!(health.status(), Status::Down);
    assert!(health.reason().unwrap().contains("127.0.0.1"), "{health}");
    let err = publisher
        .publish(Event::new("a.b", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.is_retryable());
    assert!(err.event().is_some(), "the caller gets its event back");
    proxy.set_stalled(false);
    proxy.cut();
    watchtower_test_support::within("publishing to work again", async {
        while publisher
            .publish(Event::new("a.b", serde_json::json!({})))
            .await
            .is_err()
        {}
    })
    .await;
    tables.drop_all().await;
}

#[tokio::test]
async fn faults_bad_configuration_fails_at_connect() {
    let name = unique("badcfg");
    let err = SqlClient::connect(
        SqlConfig::new("postgres://postgres:hunter2@127.0.0.1:1/test")
            .connect_timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err}"
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");
    let err = SqlClient::connect(common::config(Db::Sqlite, &name).table_prefix("x; DROP TABLE y"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// The largest and strangest input: a 4 MiB binary payload, a topic at
/// the longest allowed, unicode everywhere an attribute allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_large_and_strange_events_round_trip() {
    for db in [Db::Postgres, Db::Sqlite] {
        let tables = Tables::new(db, "large").await;
        let long_topic = format!(
            "{}.{}",
            tables.name,
            "x".repeat(watchtower::MAX_TOPIC_LEN - tables.name.len() - 1)
        );
        let (mut rx, handle) = collect(
            &tables.client.subscriber(),
            SubscribeOptions::new([&long_topic]).unwrap(),
        )
        .await;
        let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let event = Event::builder(long_topic.clone())
            .subject("ünïcødé ✓ 'quoted'; DROP TABLE x; --")
            .extension("tenant", "\u{0}nul and \"quotes\"")
            .data("application/octet-stream", payload)
            .build()
            .unwrap();
        tables.client.publisher().publish(event.clone()).await.unwrap();
        let got = take(&mut rx, 1).await;
        assert_eq!(got[0], event);
        handle.stop().await.unwrap();
        tables.drop_all().await;
    }
}
