//! Durable dead letters: the dead-letter layer points at the SQL table in
//! one line; what is stored survives the client, can be inspected, and is
//! redriven to where it was going.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use tower::{ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::{Error, ErrorKind, Event, PublishExt as _};
use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome, restore};

use common::{Db, Tables};

async fn dead_letters_survive_and_redrive(db: Db) {
    let tables = Tables::new(db, "dlq").await;
    let topic = format!("{}.orders", tables.name);
    // A broker that refuses everything.
    let mut publisher = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(tables.client.dead_letters()))
        .service(service_fn(|_: Event| async {
            Err::<(), _>(Error::new(ErrorKind::Rejected, "no such stream"))
        }));
    let sent: Vec<Event> = (0..5)
        .map(|i| Event::new(topic.clone(), serde_json::json!({ "i": i })))
        .collect();
    for event in &sent {
        let outcome = publisher.publish(event.clone()).await.unwrap();
        assert!(matches!(outcome, Outcome::DeadLettered(_)));
    }

    // Another client (another process, after a restart) sees them.
    let later = tables.another(|c| c).await;
    let dlq = later.dead_letters();
    assert_eq!(dlq.len().await.unwrap(), 5);
    let stored = dlq.list(0, 100).await.unwrap();
    assert_eq!(
        stored.iter().map(|d| d.event.id()).collect::<Vec<_>>(),
        sent.iter().map(Event::id).collect::<Vec<_>>()
    );
    assert_eq!(stored[0].event.extension("deadletterkind"), Some("rejected"));
    assert_eq!(stored[0].event.extension("deadlettertopic"), Some(topic.as_str()));
    assert_eq!(stored[0].event.data(), sent[0].data());
    // Pages.
    let page = dlq.list(stored[1].id, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|d| d.id).collect::<Vec<_>>(),
        [stored[2].id, stored[3].id]
    );

    // Redrive to a target that takes all but the third: the taken ones are
    // removed, restored to their topic without annotations; the third stays.
    let received = Arc::new(Mutex::new(Vec::<Event>::new()));
    let sink = received.clone();
    let refused = sent[2].id().to_owned();
    let target = service_fn(move |event: Event| {
        let sink = sink.clone();
        let refuse = event.id() == refused;
        async move {
            if refuse {
                return Err(Error::new(ErrorKind::Connection, "down"));
            }
            sink.lock().unwrap().push(event);
            Ok::<_, Error>(())
        }
    });
    let report = dlq.redrive(100, &mut target.map_request(restore)).await.unwrap();
    assert_eq!(report.redriven, 4);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, stored[2].id);
    assert_eq!(report.failed[0].1.kind(), ErrorKind::Connection);
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 4);
    for event in &got {
        assert_eq!(event.topic(), topic);
        assert_eq!(event.extension("deadletterreason"), None);
        assert!(sent.contains(event), "restored exactly: {event:?}");
    }
    assert_eq!(dlq.len().await.unwrap(), 1);
    assert!(dlq.remove(stored[2].id).await.unwrap());
    assert!(!dlq.remove(stored[2].id).await.unwrap());
    assert!(dlq.is_empty().await.unwrap());
    tables.drop_all().await;
}

#[tokio::test]
async fn dead_letters_survive_and_redrive_postgres() {
    dead_letters_survive_and_redrive(Db::Postgres).await;
}

#[tokio::test]
async fn dead_letters_survive_and_redrive_sqlite() {
    dead_letters_survive_and_redrive(Db::Sqlite).await;
}

/// A row that something else wrote into the table and that does not
/// decode is listed as a poison event with its bytes, not an error.
#[tokio::test]
async fn dead_letters_list_garbage_as_poison() {
    let tables = Tables::new(Db::Sqlite, "dlqbad").await;
    let insert = format!(
        "INSERT INTO {}dead_letters (event_id, topic, reason, body) VALUES ('x', 't', 'r', $1)",
        common::prefix(&tables.name)
    );
    sqlx::query(&insert)
        .bind(&b"\xff not json"[..])
        .execute(tables.client.sqlite_pool().unwrap())
        .await
        .unwrap();
    let stored = tables.client.dead_letters().list(0, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event.ty(), watchtower::POISON_EVENT_TYPE);
    assert_eq!(
        stored[0].event.data().map(|d| &d[..]),
        Some(&b"\xff not json"[..])
    );
    tables.drop_all().await;
}
