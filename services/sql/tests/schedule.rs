//! A durable retry schedule with an attempts log: failures are nacked with
//! the schedule's wait, kept in the table; after the last wait the event
//! is a durable dead letter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower::{ServiceBuilder, service_fn};
use watchtower::{Error, ErrorKind, Event, PublishExt as _, SubscribeOptions, Subscriber as _, serve};
use watchtower_sql::{RetrySchedule, RetryScheduleLayer};
use watchtower_test_support::within;

use common::{Db, Tables};

/// Serves the group `webhooks` into a handler that fails its first
/// `failures` calls with `kind`; returns the event and a stop handle.
async fn run(
    tables: &Tables,
    schedule: RetrySchedule,
    failures: u32,
    kind: ErrorKind,
) -> (
    Event,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<watchtower::ServeStats, Error>>,
    Arc<AtomicU32>,
) {
    let topic = format!("{}.webhook", tables.name);
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let sender = service_fn(move |_: Event| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n <= failures {
                Err(Error::new(kind, format!("endpoint answered 503 (call {n})"))
                    .with_retryable(kind != ErrorKind::Rejected))
            } else {
                Ok(())
            }
        }
    });
    let handler = ServiceBuilder::new()
        .layer(RetryScheduleLayer::new(&tables.client, schedule))
        .service(sender);
    let subscription = tables
        .client
        .subscriber()
        .open(
            SubscribeOptions::new([&topic])
                .unwrap()
                .group("webhooks")
                .unwrap(),
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        serve(subscription, handler)
            .poison(tables.client.dead_letters())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let event = Event::new(topic, serde_json::json!({ "hook": 1 }));
    tables.client.publisher().publish(event.clone()).await.unwrap();
    (event, stop, task, calls)
}

async fn exhausted_schedule_dead_letters(db: Db) {
    let tables = Tables::new(db, "sched").await;
    let delays = [50, 100, 150].map(Duration::from_millis);
    let (event, stop, task, calls) = run(
        &tables,
        RetrySchedule::new(delays),
        u32::MAX,
        ErrorKind::Connection,
    )
    .await;
    let dlq = tables.client.dead_letters();
    within("the event to be dead-lettered", async {
        while dlq.len().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = stop.send(());
    let stats = task.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one attempt and three retries");
    assert_eq!(stats.dead_lettered, 1, "{stats}");
    let log = tables.client.attempts(event.id()).await.unwrap();
    assert_eq!(log.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(
        log.iter()
            .all(|a| a.error.as_deref().is_some_and(|e| e.contains("503"))),
        "{log:?}"
    );
    for (pair, wait) in log.windows(2).zip(delays) {
        let waited = Duration::from_millis((pair[1].at_ms - pair[0].at_ms) as u64);
        assert!(
            waited >= wait,
            "attempt {} came {waited:?} after the one before, the schedule says {wait:?}",
            pair[1].attempt
        );
    }
    let dead = dlq.list(0, 10).await.unwrap();
    assert_eq!(dead[0].event.id(), event.id());
    assert_eq!(dead[0].event.extension("deadletterkind"), Some("connection"));
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_exhausted_dead_letters_postgres() {
    exhausted_schedule_dead_letters(Db::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_exhausted_dead_letters_sqlite() {
    exhausted_schedule_dead_letters(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_stops_at_the_first_success() {
    let tables = Tables::new(Db::Sqlite, "schedok").await;
    let delays = [20, 20, 20, 20].map(Duration::from_millis);
    let (event, stop, task, calls) = run(&tables, RetrySchedule::new(delays), 2, ErrorKind::Timeout).await;
    within("three attempts", async {
        while tables.client.attempts(event.id()).await.unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = stop.send(());
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.acked, 1, "{stats}");
    let log = tables.client.attempts(event.id()).await.unwrap();
    assert_eq!(
        log.iter().map(|a| a.error.is_some()).collect::<Vec<_>>(),
        [true, true, false]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(tables.client.dead_letters().is_empty().await.unwrap());
    tables.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_final_errors_are_dead_lettered_at_once() {
    let tables = Tables::new(Db::Sqlite, "schedno").await;
    let (event, stop, task, calls) =
        run(&tables, RetrySchedule::webhook(), u32::MAX, ErrorKind::Rejected).await;
    let dlq = tables.client.dead_letters();
    within("the event to be dead-lettered", async {
        while dlq.len().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(tables.client.attempts(event.id()).await.unwrap().len(), 1);
    tables.drop_all().await;
}

/// The wait is kept by the database: after a failure, the event's lease is
/// invisible for the schedule's first wait (an hour here), whatever
/// process looks, and a restarted consumer does not get it sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_waits_are_kept_in_the_table() {
    let tables = Tables::new(Db::Postgres, "schedwait").await;
    let (event, stop, task, _calls) = run(
        &tables,
        RetrySchedule::new([Duration::from_secs(3600)]),
        u32::MAX,
        ErrorKind::Connection,
    )
    .await;
    within("the first attempt", async {
        while tables.client.attempts(event.id()).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let pool = tables.client.pg_pool().unwrap();
    let leases = format!("{}leases", common::prefix(&tables.name));
    let hidden_for: i64 = within("the nack to be written", async {
        loop {
            let ms: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT visible_ms - (extract(epoch from clock_timestamp()) * 1000)::bigint FROM {leases}"
            ))
            .fetch_optional(pool)
            .await
            .unwrap();
            if let Some(ms) = ms.filter(|&ms| ms > 60_000) {
                break ms;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        (3_500_000..=3_600_000).contains(&hidden_for),
        "hidden for {hidden_for} ms"
    );
    tables.drop_all().await;
}
