//! Groups and clean-up: events stay until every group settled them; a
//! subscription without a group leaves nothing behind; a group deleted
//! under a running member is created again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use watchtower::{Event, PublishExt as _, SubscribeOptions, Subscriber as _};
use watchtower_test_support::within;

use common::{Db, Tables, collect, take};

async fn groups(tables: &Tables) -> i64 {
    let count = format!("SELECT COUNT(*) FROM {}groups", common::prefix(&tables.name));
    match (tables.client.pg_pool(), tables.client.sqlite_pool()) {
        (Some(pool), _) => sqlx::query_scalar(&count).fetch_one(pool).await.unwrap(),
        (_, Some(pool)) => sqlx::query_scalar(&count).fetch_one(pool).await.unwrap(),
        _ => unreachable!(),
    }
}

async fn cleanup_keeps_what_a_group_has_not_settled(db: Db) {
    let tables = Tables::new(db, "cleanup").await;
    let topic = format!("{}.t", tables.name);
    let options = |group: &str| SubscribeOptions::new([&topic]).unwrap().group(group).unwrap();
    let (mut rx, handle) = collect(&tables.client.subscriber(), options("a")).await;
    // Group "b" exists, and has taken nothing.
    drop(tables.client.subscriber().open(options("b")).await.unwrap());
    let mut publisher = tables.client.publisher();
    for i in 0..10 {
        publisher
            .publish(Event::new(topic.clone(), serde_json::json!({ "i": i })))
            .await
            .unwrap();
    }
    take(&mut rx, 10).await;
    let stats = handle.stop().await.unwrap();
    assert_eq!(stats.acked, 10);
    assert_eq!(
        tables.client.cleanup().await.unwrap(),
        0,
        "group b has not settled them"
    );
    tables.client.delete_group("b").await.unwrap();
    assert_eq!(tables.client.cleanup().await.unwrap(), 10);

    // A subscription without a group removes its group when it ends.
    assert_eq!(groups(&tables).await, 1);
    let ephemeral = tables
        .client
        .subscriber()
        .open(SubscribeOptions::new([&topic]).unwrap())
        .await
        .unwrap();
    assert_eq!(groups(&tables).await, 2);
    drop(ephemeral);
    within("the subscription's group to go", async {
        while groups(&tables).await != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_cleanup_keeps_what_a_group_has_not_settled_postgres() {
    cleanup_keeps_what_a_group_has_not_settled(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_cleanup_keeps_what_a_group_has_not_settled_sqlite() {
    cleanup_keeps_what_a_group_has_not_settled(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_a_deleted_group_is_created_again_by_its_member() {
    for db in [Db::Postgres, Db::Sqlite] {
        let tables = Tables::new(db, "regroup").await;
        let topic = format!("{}.t", tables.name);
        let (mut rx, handle) = collect(
            &tables.client.subscriber(),
            SubscribeOptions::new([&topic]).unwrap().group("g").unwrap(),
        )
        .await;
        let mut publisher = tables.client.publisher();
        let first = Event::new(topic.clone(), serde_json::json!({ "i": 1 }));
        publisher.publish(first.clone()).await.unwrap();
        assert_eq!(take(&mut rx, 1).await[0].id(), first.id());
        tables.client.delete_group("g").await.unwrap();
        let second = Event::new(topic.clone(), serde_json::json!({ "i": 2 }));
        publisher.publish(second.clone()).await.unwrap();
        // Created again at the start of the table: what is still stored
        // comes again, then the new event.
        let got = take(&mut rx, 2).await;
        assert_eq!(
            got.iter().map(Event::id).collect::<Vec<_>>(),
            [first.id(), second.id()],
            "{db:?}"
        );
        handle.stop().await.unwrap();
        tables.drop_all().await;
    }
}
