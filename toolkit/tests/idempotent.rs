//! The idempotent consumer on Redis and in memory: duplicates and forced
//! redeliveries handled once, failures handled again, marks of a crashed
//! holder expiring, a store that cannot be reached.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tower::{Layer, Service, ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::prelude::*;
use watchtower::{ServeStats, ext};
use watchtower_memory::MemoryBroker;
use watchtower_test_support::{free_port, unique, within};
use watchtower_toolkit::idempotent::{
    Begin, IdempotencyStore, IdempotentLayer, MemoryStore, PostgresStore, Recorded, RedisStore,
};

/// Side effects per event id.
type Effects = Arc<Mutex<HashMap<String, usize>>>;

fn effect_handler(
    effects: &Effects,
) -> impl Service<Event, Response = (), Error = Error, Future: Send + 'static> + Clone + Send + 'static {
    let effects = effects.clone();
    service_fn(move |event: Event| {
        let effects = effects.clone();
        async move {
            // Give a concurrent duplicate time to arrive while this one is
            // in progress.
            tokio::task::yield_now().await;
            *effects.lock().unwrap().entry(event.id().to_owned()).or_default() += 1;
            tokio::task::yield_now().await;
            Ok::<_, Error>(())
        }
    })
}

/// Fails the first delivery of every fourth event after the handler
/// succeeded, as if the ack had been lost: the broker redelivers it.
#[derive(Clone)]
struct LoseFirstAck<S> {
    inner: S,
    oks: watch::Sender<usize>,
}

impl<S> Service<Event> for LoseFirstAck<S>
where
    S: Service<Event, Response = (), Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let first = event.extension(ext::ATTEMPT).is_none();
        let lose = first
            && event
                .extension("n")
                .is_some_and(|n| n.parse::<u32>().unwrap() % 4 == 0);
        let fut = self.inner.call(event);
        let oks = self.oks.clone();
        Box::pin(async move {
            fut.await?;
            if lose {
                return Err(Error::new(ErrorKind::Handler, "ack lost"));
            }
            oks.send_modify(|n| *n += 1);
            Ok(())
        })
    }
}

const EVENTS: usize = 1000;

/// Serves `subscriptions` (one per consumer, one group) with `layer` over
/// a handler that counts its side effects and loses the first ack of every
/// fourth event, publishes [`EVENTS`] events twice each, back to back (so
/// both copies are in flight at about the same time on the two consumers),
/// and checks that each was handled exactly once and every copy acked.
async fn each_of_a_thousand_twice_delivered_events_is_handled_once<Sub, A, St, P>(
    layer: &IdempotentLayer<St>,
    subscriptions: Vec<Sub>,
    mut publisher: P,
) where
    Sub: futures_core::Stream<Item = Result<Delivery<A>, Error>> + Unpin + Send + 'static,
    A: Acker,
    St: IdempotencyStore,
    P: Service<Event, Response = Receipt, Error = Error> + Send,
    P::Future: Send,
{
    let idempotent_stats = layer.stats();
    let effects = Effects::default();
    let (oks, mut oks_seen) = watch::channel(0usize);
    let dead = Arc::new(AtomicUsize::new(0));

    let mut servers = Vec::new();
    let mut stops = Vec::new();
    for subscription in subscriptions {
        let handler = LoseFirstAck {
            inner: layer.layer(effect_handler(&effects)),
            oks: oks.clone(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        // A dead letter answers its delivery too: counted, so that a test
        // that fails says so rather than waiting out its deadline.
        let dead_letters = {
            let oks = oks.clone();
            let dead = dead.clone();
            service_fn(move |_event: Event| {
                dead.fetch_add(1, Ordering::SeqCst);
                oks.send_modify(|n| *n += 1);
                async { Ok::<_, Error>(()) }
            })
        };
        servers.push(tokio::spawn(
            serve(subscription, handler)
                .poison(dead_letters)
                .concurrency(64)
                // Short, but growing: a copy held back while the other is
                // in progress must not run out of deliveries on a loaded
                // machine.
                .redelivery_backoff(Duration::from_millis(20), Duration::from_secs(1))
                .with_graceful_shutdown(async {
                    stopped.await.ok();
                })
                .into_future(),
        ));
    }

    let mut ids = Vec::new();
    for n in 0..EVENTS {
        let event = Event::new("pay", serde_json::json!({"n": n}))
            .with_extension("n", n.to_string())
            .unwrap();
        ids.push(event.id().to_owned());
        publisher.publish(event.clone()).await.unwrap();
        publisher.publish(event).await.unwrap();
    }

    within(
        "every delivery to be answered",
        oks_seen.wait_for(|n| *n == 2 * EVENTS),
    )
    .await
    .unwrap();
    for stop in stops {
        stop.send(()).unwrap();
    }
    let mut total = ServeStats::default();
    for server in servers {
        let stats = server.await.unwrap().unwrap();
        total.acked += stats.acked;
        total.dead_lettered += stats.dead_lettered;
        total.nacked += stats.nacked;
    }
    assert_eq!(dead.load(Ordering::SeqCst), 0, "events were dead-lettered");
    let effects = effects.lock().unwrap().clone();
    assert_eq!(effects.len(), EVENTS);
    let repeated: Vec<_> = effects.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "handled more than once: {repeated:?}");
    for id in &ids {
        assert_eq!(effects.get(id), Some(&1));
    }
    assert_eq!(total.acked, 2 * EVENTS as u64, "every copy acked once answered");
    assert_eq!(total.dead_lettered, 0);
    // 250 lost acks at least, and the busy copies.
    assert!(total.nacked >= EVENTS as u64 / 4, "{total:?}");
    assert_eq!(idempotent_stats.handled(), EVENTS as u64);
    assert!(
        idempotent_stats.skipped() >= EVENTS as u64,
        "skipped {}",
        idempotent_stats.skipped()
    );
    assert_eq!(idempotent_stats.store_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_each_delivered_twice_concurrently_on_redis_are_each_handled_once() {
    let prefix = format!("{}:", unique("tk_idem"));
    let client = common::redis_client(&prefix).await;
    let store = RedisStore::connect(common::REDIS)
        .await
        .unwrap()
        .prefix(format!("{prefix}seen:"));
    let layer = IdempotentLayer::new(store).lease(Duration::from_secs(30));
    let mut subscriptions = Vec::new();
    for consumer in ["c1", "c2"] {
        subscriptions.push(
            client
                .subscriber_with(common::quick().consumer(consumer).batch_size(50))
                .unwrap()
                .open(SubscribeOptions::new(["pay"]).unwrap().group("billing").unwrap())
                .await
                .unwrap(),
        );
    }
    each_of_a_thousand_twice_delivered_events_is_handled_once(&layer, subscriptions, client.publisher())
        .await;

    // Every key is marked done in Redis, with an expiry.
    let mut conn = common::raw(common::REDIS).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}seen:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), EVENTS);
    let value: String = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "done");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "{ttl}");
    common::cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_each_delivered_twice_concurrently_on_postgres_are_each_handled_once() {
    let name = unique("tk_idem_pg");
    let client = common::sql_client(&name).await;
    let store = common::postgres_store(&name).await;
    let layer = IdempotentLayer::new(store.clone()).lease(Duration::from_secs(30));
    let mut subscriptions = Vec::new();
    for _consumer in ["c1", "c2"] {
        subscriptions.push(
            client
                .subscriber()
                .open(SubscribeOptions::new(["pay"]).unwrap().group("billing").unwrap())
                .await
                .unwrap(),
        );
    }
    each_of_a_thousand_twice_delivered_events_is_handled_once(&layer, subscriptions, client.publisher())
        .await;

    // Every key is marked done in the table, with an expiry to come.
    let (done, live): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE done AND token IS NULL), \
         count(*) FILTER (WHERE expires_at > clock_timestamp()) FROM {name}"
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((done, live), (EVENTS as i64, EVENTS as i64));
    store.drop_table().await.unwrap();
    client.drop_tables().await.unwrap();
}

#[tokio::test]
async fn a_failed_handler_releases_its_mark_so_the_redelivery_is_handled_again() {
    let broker = MemoryBroker::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        service_fn(move |_event: Event| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if call == 0 {
                    Err(Error::new(ErrorKind::Handler, "database down"))
                } else {
                    Ok(())
                }
            }
        })
    };
    let layer = IdempotentLayer::new(MemoryStore::new(100));
    let stats = layer.stats();
    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["job"]).unwrap())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(subscription, layer.layer(handler))
            .nack_delay(Duration::from_millis(1))
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );
    let event = Event::new("job", serde_json::json!({}));
    let mut publisher = broker.publisher();
    publisher.publish(event.clone()).await.unwrap();
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    // The same event again, later: skipped.
    publisher.publish(event).await.unwrap();
    assert!(broker.wait_idle(Duration::from_secs(30)).await);
    stop.send(()).unwrap();
    let served = server.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "failed once, then handled once");
    assert_eq!((served.acked, served.nacked), (2, 1));
    assert_eq!((stats.handled(), stats.skipped(), stats.busy()), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holders_mark_holds_back_duplicates_until_its_lease_ends() {
    let store = MemoryStore::new(100);
    let event = Event::new("job", serde_json::json!({}));
    let layer = IdempotentLayer::new(store.clone()).lease(Duration::from_secs(10));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = layer.layer({
        let calls = calls.clone();
        service_fn(move |_event: Event| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Error>(()) }
        })
    });
    // A holder that crashed: it claimed the key and never finished.
    let key = format!("{} {}", event.source(), event.id());
    assert!(matches!(
        store.begin(&key, Duration::from_secs(10)).await.unwrap(),
        Begin::Claimed(_)
    ));
    let busy = service
        .ready()
        .await
        .unwrap()
        .call(event.clone())
        .await
        .unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::Handler);
    assert!(busy.is_retryable());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    tokio::time::advance(Duration::from_secs(10)).await;
    service.ready().await.unwrap().call(event.clone()).await.unwrap();
    service.ready().await.unwrap().call(event).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!((layer.stats().busy(), layer.stats().skipped()), (1, 1));
}

#[tokio::test]
async fn a_chosen_key_makes_different_events_one() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = ServiceBuilder::new()
        .layer(
            IdempotentLayer::new(MemoryStore::default())
                .key(|event: &Event| event.extension("orderid").unwrap_or_default().to_owned()),
        )
        .service({
            let calls = calls.clone();
            service_fn(move |_event: Event| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Error>(()) }
            })
        });
    for (order, ty) in [("1", "charge"), ("1", "charge.retry"), ("2", "charge")] {
        let event = Event::new(ty, serde_json::json!({}))
            .with_extension("orderid", order)
            .unwrap();
        service.ready().await.unwrap().call(event).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_store_that_cannot_be_reached_fails_retryably_and_the_handler_is_not_called() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let error = RedisStore::connect(&url).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection);
    let with_password = format!("redis://user:s3cret@127.0.0.1:{}", free_port());
    let error = RedisStore::connect(&with_password).await.unwrap_err();
    assert!(!error.to_string().contains("s3cret"), "{error}");

    // A store that goes away after connecting: a private Redis, stopped.
    let mut server = watchtower_test_support::RedisServer::start().await;
    let store = RedisStore::connect(&server.url()).await.unwrap();
    server.kill().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut service = IdempotentLayer::new(store).layer({
        let calls = calls.clone();
        service_fn(move |_event: Event| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Error>(()) }
        })
    });
    let error = within(
        "the store's failure",
        service
            .ready()
            .await
            .unwrap()
            .call(Event::new("job", serde_json::json!({}))),
    )
    .await
    .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// 50 concurrent `begin`s of one key on `store`: one claims it; a stranger
/// cannot release it, its holder can; once complete it is done.
async fn claims_once_among_many_concurrent_callers<St: IdempotencyStore + Clone>(store: St) {
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.begin("k", Duration::from_secs(30)).await.unwrap()
        }));
    }
    let mut claims = Vec::new();
    for task in tasks {
        if let Begin::Claimed(claim) = task.await.unwrap() {
            claims.push(claim);
        }
    }
    assert_eq!(claims.len(), 1);
    // Someone else's token cannot release it; the holder's can.
    let stranger = watchtower_toolkit::idempotent::Claim::new("k");
    store.release(&stranger).await.unwrap();
    assert_eq!(
        store.begin("k", Duration::from_secs(30)).await.unwrap(),
        Begin::InProgress
    );
    store.release(&claims[0]).await.unwrap();
    let again = store.begin("k", Duration::from_secs(30)).await.unwrap();
    let Begin::Claimed(again) = again else {
        panic!("expected a claim, got {again:?}")
    };
    store.complete(&again, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        store.begin("k", Duration::from_secs(30)).await.unwrap(),
        Begin::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_claims_once_among_many_concurrent_callers() {
    let prefix = format!("{}:", unique("tk_idem_race"));
    let store = RedisStore::connect(common::REDIS)
        .await
        .unwrap()
        .prefix(prefix.as_str());
    claims_once_among_many_concurrent_callers(store).await;
    common::cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_claims_once_among_many_concurrent_callers() {
    let store = common::postgres_store(&unique("tk_idem_pg_race")).await;
    claims_once_among_many_concurrent_callers(store.clone()).await;
    store.drop_table().await.unwrap();
}

#[tokio::test]
async fn a_postgres_mark_whose_lease_ended_is_taken_over_and_expired_rows_are_purged() {
    let table = unique("tk_idem_pg_lease");
    let store = common::postgres_store(&table).await;
    // Time passes on the database's clock: every mark's end moved back.
    let age = format!("UPDATE {table} SET expires_at = expires_at - INTERVAL '1 hour'");
    // A holder that crashed, and its lease ends.
    let Begin::Claimed(_) = store.begin("k", Duration::from_secs(30)).await.unwrap() else {
        panic!("the first claim")
    };
    assert_eq!(
        store.begin("k", Duration::from_secs(30)).await.unwrap(),
        Begin::InProgress
    );
    sqlx::query(&age).execute(store.pool()).await.unwrap();
    let Begin::Claimed(claim) = store.begin("k", Duration::from_secs(30)).await.unwrap() else {
        panic!("the lease ended: the key is claimed again")
    };
    store.complete(&claim, Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.purge().await.unwrap(), 0, "a live mark stays");
    sqlx::query(&age).execute(store.pool()).await.unwrap();
    assert_eq!(
        store.purge().await.unwrap(),
        1,
        "a done mark past its keep time goes"
    );
    store.drop_table().await.unwrap();
}

#[tokio::test]
async fn a_bad_postgres_table_name_or_url_is_refused_without_the_password() {
    let store = common::postgres_store(&unique("tk_idem_pg_cfg")).await;
    for bad in ["a b", "x; DROP TABLE y", "1abc", "a.b.c", ""] {
        let error = store.clone().table(bad).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Config, "{bad}");
    }
    store.drop_table().await.unwrap();
    let url = format!("postgres://user:s3cret@127.0.0.1:{}/test", free_port());
    let error = PostgresStore::connect(&url).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(!error.to_string().contains("s3cret"), "{error}");
    let error = PostgresStore::connect("postgres://user:s3cret@[::1/x")
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(!error.to_string().contains("s3cret"), "{error}");
}

/// Two transactions record one key: the second waits for the first, and
/// is told `Duplicate` if it committed, `New` if it rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_recorded_in_a_transaction_is_a_duplicate_once_committed_and_new_after_a_rollback() {
    let store = common::postgres_store(&unique("tk_idem_pg_tx")).await;
    let keep = Duration::from_secs(60);
    for commit in [false, true] {
        let key = format!("k-{commit}");
        let mut first = store.pool().begin().await.unwrap();
        assert_eq!(
            store.record_in(&mut first, &key, keep).await.unwrap(),
            Recorded::New
        );
        let second = tokio::spawn({
            let store = store.clone();
            async move {
                let mut tx = store.pool().begin().await.unwrap();
                let recorded = store.record_in(&mut tx, &key, keep).await.unwrap();
                tx.commit().await.unwrap();
                recorded
            }
        });
        if commit {
            first.commit().await.unwrap();
        } else {
            first.rollback().await.unwrap();
        }
        let expected = if commit {
            Recorded::Duplicate
        } else {
            Recorded::New
        };
        assert_eq!(second.await.unwrap(), expected, "first committed: {commit}");
    }
    store.drop_table().await.unwrap();
}

/// Exactly-once effects without the layer: each handler records the key in
/// the transaction that writes its effect row. Every event is published
/// twice, and the first ack of every fourth event is lost after its commit:
/// the effects table holds each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_written_in_the_transaction_that_records_the_key_happen_once_per_event() {
    let name = unique("tk_idem_pg_once");
    let client = common::sql_client(&name).await;
    let store = common::postgres_store(&format!("{name}_seen")).await;
    let effects = format!("{name}_effects");
    sqlx::raw_sql(&format!("CREATE TABLE {effects} (event_id TEXT NOT NULL)"))
        .execute(store.pool())
        .await
        .unwrap();
    let duplicates = Arc::new(AtomicUsize::new(0));
    let (oks, mut oks_seen) = watch::channel(0usize);
    let handler = {
        let store = store.clone();
        let duplicates = duplicates.clone();
        let insert = format!("INSERT INTO {effects} (event_id) VALUES ($1)");
        service_fn(move |event: Event| {
            let (store, duplicates, insert) = (store.clone(), duplicates.clone(), insert.clone());
            async move {
                let mut tx = store
                    .pool()
                    .begin()
                    .await
                    .map_err(|e| Error::new(ErrorKind::Handler, e.to_string()))?;
                let key = watchtower_toolkit::idempotent::default_key(&event);
                if store.record_in(&mut tx, &key, Duration::from_secs(60)).await? == Recorded::Duplicate {
                    duplicates.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                sqlx::query(&insert)
                    .bind(event.id())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| Error::new(ErrorKind::Handler, e.to_string()))?;
                tx.commit()
                    .await
                    .map_err(|e| Error::new(ErrorKind::Handler, e.to_string()))?;
                Ok::<_, Error>(())
            }
        })
    };
    let mut servers = Vec::new();
    let mut stops = Vec::new();
    for _consumer in ["c1", "c2"] {
        let subscription = client
            .subscriber()
            .open(SubscribeOptions::new(["pay"]).unwrap().group("billing").unwrap())
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        let handler = LoseFirstAck {
            inner: handler.clone(),
            oks: oks.clone(),
        };
        servers.push(tokio::spawn(
            serve(subscription, handler)
                .concurrency(32)
                .redelivery_backoff(Duration::from_millis(20), Duration::from_secs(1))
                .with_graceful_shutdown(async {
                    stopped.await.ok();
                })
                .into_future(),
        ));
    }
    let mut publisher = client.publisher();
    for n in 0..EVENTS {
        let event = Event::new("pay", serde_json::json!({"n": n}))
            .with_extension("n", n.to_string())
            .unwrap();
        publisher.publish(event.clone()).await.unwrap();
        publisher.publish(event).await.unwrap();
    }
    within("every copy handled", oks_seen.wait_for(|n| *n == 2 * EVENTS))
        .await
        .unwrap();
    for stop in stops {
        stop.send(()).unwrap();
    }
    let mut acked = 0;
    for server in servers {
        acked += server.await.unwrap().unwrap().acked;
    }
    assert_eq!(acked, 2 * EVENTS as u64);
    let (rows, distinct): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT event_id) FROM {effects}"
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((rows, distinct), (EVENTS as i64, EVENTS as i64));
    // Every second copy, and the redeliveries of lost acks (both copies of
    // every fourth event lose their first ack, if their first try succeeds).
    let duplicates = duplicates.load(Ordering::SeqCst);
    assert!(
        (EVENTS..=EVENTS + EVENTS / 2).contains(&duplicates),
        "{duplicates}"
    );
    sqlx::raw_sql(&format!("DROP TABLE {effects}"))
        .execute(store.pool())
        .await
        .unwrap();
    store.drop_table().await.unwrap();
    client.drop_tables().await.unwrap();
}
