//! The transactional outbox: an event written in the caller's own
//! transaction commits with the caller's other writes, or not at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::StreamExt as _;
use watchtower::{ErrorKind, Event, SubscribeOptions, Subscriber as _};

use common::{Db, Tables, collect, take};

fn event(topic: &str, n: u32) -> Event {
    Event::new(topic.to_owned(), serde_json::json!({ "n": n }))
}

/// Commits one business row with its event, rolls back another with its
/// event, then checks the subscriber got exactly the committed event and
/// the table holds exactly the committed row.
async fn commit_and_rollback(db: Db) {
    let tables = Tables::new(db, "outbox").await;
    let client = &tables.client;
    let accounts = format!("{}accounts", common::prefix(&tables.name));
    let create = format!("CREATE TABLE {accounts} (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL)");
    let insert = format!("INSERT INTO {accounts} (id, balance) VALUES ($1, $2)");
    let count = format!("SELECT COUNT(*) FROM {accounts}");
    let topic = format!("{}.account", tables.name);
    let (mut rx, handle) = collect(
        &client.subscriber(),
        SubscribeOptions::new([&topic]).unwrap().group("relay").unwrap(),
    )
    .await;
    let publisher = client.publisher();
    let (rolled_back, committed, marker) = (event(&topic, 1), event(&topic, 2), event(&topic, 3));

    macro_rules! scenario {
        ($pool:expr) => {{
            let pool = $pool;
            sqlx::query(&create).execute(pool).await.unwrap();
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(&insert)
                .bind(1_i64)
                .bind(100_i64)
                .execute(&mut *tx)
                .await
                .unwrap();
            publisher.publish_in(&mut *tx, rolled_back.clone()).await.unwrap();
            tx.rollback().await.unwrap();

            let mut tx = pool.begin().await.unwrap();
            sqlx::query(&insert)
                .bind(2_i64)
                .bind(200_i64)
                .execute(&mut *tx)
                .await
                .unwrap();
            let receipt = publisher.publish_in(&mut tx, committed.clone()).await.unwrap();
            assert_eq!(receipt.event_id.as_ref(), committed.id());
            assert!(receipt.sequence.is_some());
            tx.commit().await.unwrap();
            let rows: i64 = sqlx::query_scalar(&count).fetch_one(pool).await.unwrap();
            assert_eq!(rows, 1, "only the committed business row is stored");
            sqlx::query(&format!("DROP TABLE {accounts}"))
                .execute(pool)
                .await
                .unwrap();
        }};
    }
    match db {
        Db::Postgres => scenario!(client.pg_pool().unwrap()),
        Db::Sqlite => scenario!(client.sqlite_pool().unwrap()),
    }
    // Published after both: once it is in, anything committed before it
    // is in too (a group receives events in commit order).
    let mut plain = publisher.clone();
    watchtower::PublishExt::publish(&mut plain, marker.clone())
        .await
        .unwrap();
    let got = take(&mut rx, 2).await;
    assert_eq!(
        got.iter().map(Event::id).collect::<Vec<_>>(),
        [committed.id(), marker.id()],
        "the rolled-back event must never be delivered"
    );
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 2);
    assert!(rx.try_recv().is_err());
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commit_delivers_rollback_does_not_postgres() {
    commit_and_rollback(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commit_delivers_rollback_does_not_sqlite() {
    commit_and_rollback(Db::Sqlite).await;
}

/// On PostgreSQL, a transaction that wrote an event (and so holds a lower
/// sequence number) and commits after a later one must not be skipped: the
/// group waits for it, then delivers both in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_late_commit_is_not_skipped_postgres() {
    let tables = Tables::new(Db::Postgres, "late").await;
    let client = &tables.client;
    let pool = client.pg_pool().unwrap();
    let topic = format!("{}.late", tables.name);
    let subscriber = client.subscriber();
    let mut subscription = subscriber
        .open(SubscribeOptions::new([&topic]).unwrap().group("relay").unwrap())
        .await
        .unwrap();
    let publisher = client.publisher();
    let (early, late) = (event(&topic, 1), event(&topic, 2));

    let mut slow = pool.begin().await.unwrap();
    let first = publisher.publish_in(&mut *slow, early.clone()).await.unwrap();
    let mut fast = pool.begin().await.unwrap();
    let second = publisher.publish_in(&mut *fast, late.clone()).await.unwrap();
    assert!(first.sequence < second.sequence);
    fast.commit().await.unwrap();
    // While the slow transaction is open, nothing may be delivered: the
    // later event would move the group past the earlier one's number.
    let early_delivery = tokio::time::timeout(Duration::from_millis(600), subscription.next()).await;
    assert!(
        early_delivery.is_err(),
        "delivered before the older transaction ended: {early_delivery:?}"
    );
    slow.commit().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let delivery = watchtower_test_support::within("a delivery", subscription.next())
            .await
            .unwrap()
            .unwrap();
        got.push(delivery.event().unwrap().id().to_owned());
        delivery.ack().await.unwrap();
    }
    got.sort();
    let mut expected = vec![early.id().to_owned(), late.id().to_owned()];
    expected.sort();
    assert_eq!(got, expected);
    drop(subscription);
    tables.drop_all().await;
}

#[tokio::test]
async fn outbox_refuses_a_connection_of_the_other_database() {
    let sqlite = Tables::new(Db::Sqlite, "wrongdb").await;
    let postgres = Tables::new(Db::Postgres, "wrongdb").await;
    let pg_pool = postgres.client.pg_pool().unwrap();
    let mut tx = pg_pool.begin().await.unwrap();
    let err = sqlite
        .client
        .publisher()
        .publish_in(&mut *tx, event("x.y", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    tx.rollback().await.unwrap();
    // An invalid event is refused before anything is written.
    let mut tx = pg_pool.begin().await.unwrap();
    let bad = Event::new("bad topic with spaces", serde_json::json!({}));
    let err = postgres
        .client
        .publisher()
        .publish_in(&mut *tx, bad)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTopic, "{err}");
    tx.commit().await.unwrap();
    sqlite.drop_all().await;
    postgres.drop_all().await;
}

/// An axum handler or a spawned task awaits `publish_in`: its future is
/// `Send`, with a transaction, a connection or a pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_publish_in_runs_in_spawned_tasks() {
    let tables = Tables::new(Db::Postgres, "spawned").await;
    let (client, topic) = (tables.client.clone(), format!("{}.spawned", tables.name));
    let task = tokio::spawn(async move {
        let pool = client.pg_pool().unwrap();
        let publisher = client.publisher();
        let mut tx = pool.begin().await.unwrap();
        publisher.publish_in(&mut tx, event(&topic, 1)).await.unwrap();
        publisher.publish_in(&mut *tx, event(&topic, 2)).await.unwrap();
        tx.commit().await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        publisher
            .publish_in(&mut conn, event(&topic, 3))
            .await
            .unwrap()
            .sequence
            .unwrap()
    });
    let last = task.await.unwrap();
    assert!(last >= 3);
    tables.drop_all().await;
}
