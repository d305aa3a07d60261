//! SQL transport throughput, in one run:
//!
//! * **outbox**: `N` transactions, each writing one event, from `CALLERS`
//!   concurrent tasks: `publish_in(&mut tx, event)` against raw `sqlx`
//!   inserting the same row (topic, id, the same CloudEvents JSON body,
//!   encoded beforehand) into the same table, on PostgreSQL and on SQLite,
//!   as per-round ratios (target ≥ 0.9×);
//! * **publish**: `N` events through `SqlPublisher` from `CALLERS`
//!   concurrent callers (batched into multi-row `INSERT`s);
//! * **forward**: `N` events already in the table, forwarded by
//!   `serve(subscription, publisher)` (concurrency 64) to NATS core and to
//!   Redis Streams, timed until the runtime acknowledged them all; beside
//!   it, in the same round, the broker's raw client sending the same rows'
//!   bodies (the CloudEvents JSON in the table) to the same subject or
//!   stream: async-nats `publish` of each, then a flush; redis-rs `XADD`s
//!   in pipelines of 512, the Redis publisher's largest batch.
//!
//! Run with `cargo bench -p watchtower-sql --bench sql` against the local
//! PostgreSQL, NATS and Redis (`SQL_BENCH_ROUNDS`, default 3;
//! `SQL_BENCH_N`, default 5,000; `SQL_BENCH=outbox,publish,forward` for
//! some of the cases).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tower::ServiceExt as _;
use watchtower::{Event, SubscribeOptions, Subscriber as _, serve};
use watchtower_nats::{NatsClient, NatsConfig};
use watchtower_redis::{RedisClient, RedisConfig};
use watchtower_sql::{SqlClient, SqlConfig};

const CALLERS: usize = 32;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn events(topic: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::new(
                topic.to_owned(),
                serde_json::json!({ "order": i, "total": 990, "currency": "EUR" }),
            )
        })
        .collect()
}

/// Runs `per_caller` over `events` split between `CALLERS` tasks; events per second.
async fn timed<F, Fut>(events: Vec<Event>, per_event: F) -> f64
where
    F: Fn(Event) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let n = events.len();
    let mut chunks: Vec<Vec<Event>> = (0..CALLERS).map(|_| Vec::new()).collect();
    for (i, event) in events.into_iter().enumerate() {
        chunks[i % CALLERS].push(event);
    }
    let start = Instant::now();
    let tasks = chunks.into_iter().map(|chunk| {
        let f = per_event.clone();
        tokio::spawn(async move {
            for event in chunk {
                f(event).await;
            }
        })
    });
    for task in join_all(tasks).await {
        task.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn outbox(name: &str, client: &SqlClient, n: usize, rounds: usize) {
    let table = client.config().events_table();
    let insert = format!("INSERT INTO {table} (topic, event_id, body) VALUES ($1, $2, $3) RETURNING seq");
    let (mut raw_rates, mut wt_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let raw_events = events("bench.raw", n);
        let raw = {
            let (client, insert) = (client.clone(), insert.clone());
            timed(raw_events, move |event| {
                let (client, insert) = (client.clone(), insert.clone());
                async move {
                    let body = watchtower::codec::structured::to_vec(&event).unwrap();
                    macro_rules! one {
                        ($pool:expr) => {{
                            let mut tx = $pool.begin().await.unwrap();
                            let _: i64 = sqlx::query_scalar(&insert)
                                .bind(event.topic())
                                .bind(event.id())
                                .bind(&body[..])
                                .fetch_one(&mut *tx)
                                .await
                                .unwrap();
                            tx.commit().await.unwrap();
                        }};
                    }
                    match (client.pg_pool(), client.sqlite_pool()) {
                        (Some(pool), _) => one!(pool),
                        (_, Some(pool)) => one!(pool),
                        _ => unreachable!(),
                    }
                }
            })
            .await
        };
        let wt = {
            let client = client.clone();
            timed(events("bench.outbox", n), move |event| {
                let client = client.clone();
                async move {
                    let publisher = client.publisher();
                    macro_rules! one {
                        ($pool:expr) => {{
                            let mut tx = $pool.begin().await.unwrap();
                            publisher.publish_in(&mut tx, event).await.unwrap();
                            tx.commit().await.unwrap();
                        }};
                    }
                    match (client.pg_pool(), client.sqlite_pool()) {
                        (Some(pool), _) => one!(pool),
                        (_, Some(pool)) => one!(pool),
                        _ => unreachable!(),
                    }
                }
            })
            .await
        };
        raw_rates.push(raw);
        wt_rates.push(wt);
        ratios.push(wt / raw);
    }
    println!(
        "{name:<9} outbox, {n} transactions x {rounds}: raw sqlx {:>8.0}/s  publish_in {:>8.0}/s  ratio median {:.2}x  per round {:?}",
        median(raw_rates),
        median(wt_rates),
        median(ratios.clone()),
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>()
    );
}

async fn publish(name: &str, client: &SqlClient, n: usize, rounds: usize) {
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let publisher = client.publisher();
        rates.push(
            timed(events("bench.publish", n), move |event| {
                let publisher = publisher.clone();
                async move {
                    publisher.oneshot(event).await.unwrap();
                }
            })
            .await,
        );
    }
    println!(
        "{name:<9} publish, {n} events, {CALLERS} callers x {rounds}: median {:>8.0}/s",
        median(rates)
    );
}

/// The broker's own client, for the raw side of a forward.
enum Raw {
    Nats(NatsClient),
    Redis(redis::aio::MultiplexedConnection),
}

impl Raw {
    fn target(&self) -> &'static str {
        match self {
            Raw::Nats(_) => "nats",
            Raw::Redis(_) => "redis",
        }
    }

    /// Sends `bodies` to `topic`; events per second.
    async fn send(&mut self, topic: &str, bodies: Vec<bytes::Bytes>) -> f64 {
        let n = bodies.len();
        let start = Instant::now();
        match self {
            Raw::Nats(nats) => {
                for body in bodies {
                    nats.raw().publish(topic.to_owned(), body).await.unwrap();
                }
                nats.raw().flush().await.unwrap();
            }
            Raw::Redis(conn) => {
                for chunk in bodies.chunks(512) {
                    let mut pipe = redis::pipe();
                    for body in chunk {
                        pipe.cmd("XADD")
                            .arg(topic)
                            .arg("*")
                            .arg("data")
                            .arg(&body[..])
                            .ignore();
                    }
                    let () = pipe.query_async(conn).await.unwrap();
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    }
}

async fn forward<P>(name: &str, client: &SqlClient, publisher: P, mut raw: Raw, n: usize, rounds: usize)
where
    P: tower::Service<Event> + Clone + Send + 'static,
    P::Error: Into<watchtower::BoxError>,
    P::Future: Send + 'static,
{
    let target = raw.target();
    let (mut rates, mut raw_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let topic = format!("bench.forward.{target}.{round}.{}", std::process::id());
        let sent = events(&topic, n);
        let bodies: Vec<bytes::Bytes> = sent
            .iter()
            .map(|e| watchtower::codec::structured::to_vec(e).unwrap().into())
            .collect();
        let sql = client.publisher();
        for receipt in join_all(sent.into_iter().map(|e| sql.clone().oneshot(e))).await {
            receipt.unwrap();
        }
        let subscription = client
            .subscriber()
            .open(
                SubscribeOptions::new([&topic])
                    .unwrap()
                    .group("forwarder")
                    .unwrap(),
            )
            .await
            .unwrap();
        let start = Instant::now();
        let runtime = serve(subscription, publisher.clone()).concurrency(64);
        let stats = runtime.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            runtime
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        while (stats.snapshot().acked as usize) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let _ = stop.send(());
        task.await.unwrap().unwrap();
        client.delete_group("forwarder").await.unwrap();
        client.cleanup().await.unwrap();
        let raw_rate = raw.send(&topic, bodies).await;
        rates.push(rate);
        raw_rates.push(raw_rate);
        ratios.push(rate / raw_rate);
    }
    println!(
        "{name:<9} forward to {target:<5}, {n} events x {rounds}: raw {target} {:>8.0}/s  forwarder {:>8.0}/s  ratio median {:.3}x  per round {:?}",
        median(raw_rates),
        median(rates),
        median(ratios.clone()),
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>()
    );
}

#[tokio::main]
async fn main() {
    let rounds = env("SQL_BENCH_ROUNDS", 3);
    let n = env("SQL_BENCH_N", 5_000);
    let prefix = format!("bench_{}_", std::process::id());
    let dir = std::env::temp_dir().join(format!("wt-sql-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nats = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222"))
        .await
        .unwrap();
    let redis = RedisClient::connect(RedisConfig::new("redis://127.0.0.1:6379"))
        .await
        .unwrap();
    for (name, url) in [
        ("postgres", "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        ("sqlite", format!("sqlite://{}", dir.join("bench.db").display())),
    ] {
        let client = SqlClient::connect(
            SqlConfig::new(url)
                .table_prefix(&prefix)
                .max_connections(CALLERS as u32),
        )
        .await
        .unwrap();
        let only = std::env::var("SQL_BENCH").unwrap_or_default();
        let run = |case: &str| only.is_empty() || only.split(',').any(|c| c == case);
        if run("outbox") {
            let outbox_n = if name == "sqlite" { n / 5 } else { n };
            outbox(name, &client, outbox_n, rounds).await;
        }
        if run("publish") {
            publish(name, &client, n, rounds).await;
        }
        if run("forward") {
            forward(
                name,
                &client,
                nats.publisher(),
                Raw::Nats(nats.clone()),
                n,
                rounds,
            )
            .await;
            let config =
                redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
            let conn = redis::Client::open("redis://127.0.0.1:6379")
                .unwrap()
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .unwrap();
            forward(name, &client, redis.publisher(), Raw::Redis(conn), n, rounds).await;
        }
        client.drop_tables().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = (0..rounds)
        .map(|round| format!("bench.forward.redis.{round}.{}", std::process::id()))
        .collect();
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
}
