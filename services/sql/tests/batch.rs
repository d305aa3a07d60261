//! Batch publishing into the events table: one multi-row `INSERT` per
//! chunk, one answer per event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use watchtower::{ErrorKind, Event, PublishBatchExt, SubscribeOptions};

use common::{Db, Tables, collect, take};

fn numbered(topic: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event::new(topic.to_owned(), serde_json::json!({ "i": i })))
        .collect()
}

/// Rows in the events table of `client`.
async fn rows(client: &watchtower_sql::SqlClient) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {}", client.config().events_table());
    match (client.pg_pool(), client.sqlite_pool()) {
        (Some(pool), _) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
        (_, Some(pool)) => sqlx::query_scalar(&sql).fetch_one(pool).await.unwrap(),
        _ => unreachable!("a PostgreSQL or SQLite client"),
    }
}

/// 2,500 events in chunks of 1,000: every answer Ok with a sequence number
/// growing in the batch's order, every row in the table, and a
/// subscription receives them in that order.
async fn complete_and_in_order(db: Db) {
    let tables = Tables::new(db, "batch").await;
    let client = tables.another(|c| c.publish_batch(1000)).await;
    let topic = format!("{}.b", tables.name);
    let (mut rx, handle) = collect(
        &client.subscriber(),
        SubscribeOptions::new([&topic]).unwrap().group("g").unwrap(),
    )
    .await;
    let events = numbered(&topic, 2500);
    let answers = client
        .publisher()
        .batched()
        .publish_batch(events.clone())
        .await
        .unwrap();
    assert_eq!(answers.len(), 2500);
    let mut last = 0;
    for (answer, event) in answers.iter().zip(&events) {
        let receipt = answer.as_ref().unwrap();
        assert_eq!(&*receipt.event_id, event.id());
        let seq = receipt.sequence.unwrap();
        assert!(seq > last, "{seq} after {last}");
        last = seq;
    }
    assert_eq!(rows(&client).await, 2500);
    let got = take(&mut rx, 2500).await;
    let got: Vec<&str> = got.iter().map(Event::id).collect();
    let sent: Vec<&str> = events.iter().map(Event::id).collect();
    assert_eq!(got, sent);
    handle.stop().await.unwrap();
    tables.drop_all().await;
}

/// An event that cannot be stored is answered with its error; the others
/// are stored.
async fn a_bad_event_fails_alone(db: Db) {
    let tables = Tables::new(db, "batch_bad").await;
    let client = &tables.client;
    let topic = format!("{}.b", tables.name);
    let mut events = numbered(&topic, 20);
    events[6] = Event::new("x", serde_json::json!({})).with_topic("bad topic");
    let mut answers = client
        .publisher()
        .batched()
        .publish_batch(events.clone())
        .await
        .unwrap();
    assert_eq!(answers.len(), 20);
    let error = answers[6].as_mut().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidTopic);
    assert_eq!(
        error.take_event().map(|e| e.id().to_owned()).as_deref(),
        Some(events[6].id())
    );
    for (i, answer) in answers.iter().enumerate() {
        if i != 6 {
            assert_eq!(&*answer.as_ref().unwrap().event_id, events[i].id(), "{i}");
        }
    }
    assert_eq!(rows(client).await, 19);
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_complete_and_in_order_on_postgres() {
    complete_and_in_order(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_complete_and_in_order_on_sqlite() {
    complete_and_in_order(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_in_a_batch_fails_alone_on_postgres() {
    a_bad_event_fails_alone(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_event_in_a_batch_fails_alone_on_sqlite() {
    a_bad_event_fails_alone(Db::Sqlite).await;
}
