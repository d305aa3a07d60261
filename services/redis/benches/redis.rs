//! Redis Streams throughput: WatchTower against the raw `redis` crate doing
//! the same work with the same guarantee, in the same run.
//!
//! * publish: `N` events, 64 concurrent callers. Raw: `XADD` of the same
//!   fields on one multiplexed connection (the client pipelines concurrent
//!   commands). WatchTower: dead letter + retry + circuit breaker over
//!   [`RedisPublisher`].
//! * consume: `N` entries already in a stream, a fresh group each run.
//!   Raw: `XREADGROUP COUNT 256` + one `XACK` per batch, in a loop.
//!   WatchTower: [`RedisSubscriber`] through `watchtower::serve`, with
//!   default settings and tuned (concurrency 256).
//!
//! Run with `cargo bench -p watchtower-redis --bench redis` against the
//! local Redis (`REDIS_URL` to change it).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tower::{ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event, SubscribeOptions, Subscriber, serve};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::DeadLetterLayer;
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_redis::{RedisConfig, RedisPublisher, RedisSubscriber};

const N: usize = 50_000;
const CALLERS: usize = 64;
const ROUNDS: usize = 5;

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn key(name: &str) -> String {
    format!("wtbench_{name}_{}", uuid::Uuid::now_v7().simple())
}

fn events(topic: &str) -> Vec<Event> {
    (0..N)
        .map(|i| {
            Event::new(
                topic.to_owned(),
                serde_json::json!({"order_id": i, "amount": 1999, "currency": "EUR"}),
            )
        })
        .collect()
}

/// The fields a hand-written client would send for the same events.
fn raw_fields(events: &[Event]) -> Vec<Vec<(&'static str, Vec<u8>)>> {
    events
        .iter()
        .map(|e| {
            vec![
                ("specversion", b"1.0".to_vec()),
                ("id", e.id().as_bytes().to_vec()),
                ("type", e.ty().as_bytes().to_vec()),
                ("source", e.source().as_bytes().to_vec()),
                (
                    "time",
                    watchtower::codec::format_time(e.time().unwrap()).into_bytes(),
                ),
                ("datacontenttype", b"application/json".to_vec()),
                ("data", e.data().unwrap().to_vec()),
            ]
        })
        .collect()
}

async fn raw_conn() -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(10)))
        .set_pipeline_buffer_size(1024);
    redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

async fn del(key: &str) {
    let mut conn = raw_conn().await;
    let _: () = redis::cmd("DEL").arg(key).query_async(&mut conn).await.unwrap();
}

async fn publish_raw() -> f64 {
    let stream = key("pub_raw");
    let fields = raw_fields(&events(&stream));
    let conn = raw_conn().await;
    let start = Instant::now();
    let mut calls = futures_util::stream::iter(fields)
        .map(|fields| {
            let mut conn = conn.clone();
            let stream = &stream;
            async move {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream).arg("*");
                for (n, v) in &fields {
                    cmd.arg(*n).arg(&v[..]);
                }
                cmd.query_async::<String>(&mut conn).await.unwrap()
            }
        })
        .buffer_unordered(CALLERS);
    while calls.next().await.is_some() {}
    let rate = N as f64 / start.elapsed().as_secs_f64();
    del(&stream).await;
    rate
}

async fn publish_raw_pipelined() -> f64 {
    let stream = key("pub_pipe");
    let fields = raw_fields(&events(&stream));
    let conn = raw_conn().await;
    let start = Instant::now();
    let mut calls = futures_util::stream::iter(fields.chunks(CALLERS).map(<[_]>::to_vec))
        .map(|batch| {
            let mut conn = conn.clone();
            let stream = &stream;
            async move {
                let mut pipe = redis::pipe();
                for fields in &batch {
                    let cmd = pipe.cmd("XADD").arg(stream).arg("*");
                    for (n, v) in fields {
                        cmd.arg(*n).arg(&v[..]);
                    }
                }
                pipe.query_async::<Vec<String>>(&mut conn).await.unwrap()
            }
        })
        .buffer_unordered(4);
    while calls.next().await.is_some() {}
    let rate = N as f64 / start.elapsed().as_secs_f64();
    del(&stream).await;
    rate
}

async fn publish_bare() -> f64 {
    let stream = key("pub_bare");
    let sent = events(&stream);
    let publisher = RedisPublisher::connect(RedisConfig::new(url())).await.unwrap();
    let start = Instant::now();
    let mut calls = futures_util::stream::iter(sent)
        .map(|event| publisher.clone().oneshot(event))
        .buffer_unordered(CALLERS);
    while let Some(result) = calls.next().await {
        result.unwrap();
    }
    let rate = N as f64 / start.elapsed().as_secs_f64();
    del(&stream).await;
    rate
}

async fn publish_watchtower() -> f64 {
    let stream = key("pub_wt");
    let sent = events(&stream);
    let publisher = RedisPublisher::connect(RedisConfig::new(url())).await.unwrap();
    let stack = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(MemoryDeadLetters::new(N)))
        .layer(RetryLayer::new(RetryConfig::new()))
        .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new()))
        .service(publisher);
    let start = Instant::now();
    let mut calls = futures_util::stream::iter(sent)
        .map(|event| stack.clone().oneshot(event))
        .buffer_unordered(CALLERS);
    while let Some(result) = calls.next().await {
        assert!(result.unwrap().is_delivered());
    }
    let rate = N as f64 / start.elapsed().as_secs_f64();
    del(&stream).await;
    rate
}

/// A stream holding `N` events, written by WatchTower.
async fn filled_stream() -> String {
    let stream = key("consume");
    let publisher = RedisPublisher::connect(RedisConfig::new(url())).await.unwrap();
    let sent = events(&stream);
    for chunk in sent.chunks(1000) {
        for r in publisher.publish_batch(chunk.to_vec()).await.unwrap() {
            r.unwrap();
        }
    }
    stream
}

async fn create_group(stream: &str, group: &str) {
    let mut conn = raw_conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn consume_raw(stream: &str, round: usize) -> f64 {
    let group = format!("raw{round}");
    create_group(stream, &group).await;
    let mut conn = raw_conn().await;
    let start = Instant::now();
    let mut got = 0;
    while got < N {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&group)
            .arg("c")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(&group);
        let mut n = 0;
        for key in &reply.keys {
            for entry in &key.ids {
                // Touch the payload as a handler would.
                std::hint::black_box(entry.map.get("data"));
                ack.arg(&entry.id);
                n += 1;
            }
        }
        if n > 0 {
            let _: i64 = ack.query_async(&mut conn).await.unwrap();
        }
        got += n;
    }
    N as f64 / start.elapsed().as_secs_f64()
}

async fn consume_watchtower(stream: &str, round: usize, concurrency: Option<usize>) -> f64 {
    let group = format!("wt{round}_{}", concurrency.unwrap_or(0));
    create_group(stream, &group).await;
    let subscriber = RedisSubscriber::builder(RedisConfig::new(url()))
        .batch_size(256)
        .connect()
        .await
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let (counter, notify) = (handled.clone(), all.clone());
    let start = Instant::now();
    let subscription = subscriber
        .open(SubscribeOptions::new([stream]).unwrap().group(&group).unwrap())
        .await
        .unwrap();
    let handler = service_fn(move |event: Event| {
        std::hint::black_box(event.data());
        if counter.fetch_add(1, Ordering::Relaxed) + 1 == N {
            notify.notify_one();
        }
        async { Ok::<_, Error>(()) }
    });
    let mut runtime = serve(subscription, handler);
    if let Some(n) = concurrency {
        runtime = runtime.concurrency(n);
    }
    let waiter = all.clone();
    let stats = runtime
        .with_graceful_shutdown(async move { waiter.notified().await })
        .await
        .unwrap();
    let rate = N as f64 / start.elapsed().as_secs_f64();
    assert_eq!(stats.acked as usize, N, "{stats}");
    rate
}

fn best(rates: &[f64]) -> f64 {
    rates.iter().copied().fold(0.0, f64::max)
}

/// The median of the per-round ratios `a[i] / b[i]`: rounds run back to
/// back, so a ratio compares runs under the same machine load.
fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    ratios.sort_by(f64::total_cmp);
    ratios[ratios.len() / 2]
}

fn row(name: &str, rates: &[f64], base: Option<(&str, &[f64])>) {
    match base {
        None => println!("  {name:<52} {:>9.0}", best(rates)),
        Some((base_name, base)) => println!(
            "  {name:<52} {:>9.0}   {:.2}x {base_name} (median of per-round ratios {:.2}x)",
            best(rates),
            best(rates) / best(base),
            median_ratio(rates, base)
        ),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut raw, mut pipe, mut wt, mut bare) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            raw.push(publish_raw().await);
            wt.push(publish_watchtower().await);
            bare.push(publish_bare().await);
            pipe.push(publish_raw_pipelined().await);
        }
        let stream = filled_stream().await;
        let (mut craw, mut cdef, mut ctuned) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            craw.push(consume_raw(&stream, round).await);
            cdef.push(consume_watchtower(&stream, round, None).await);
            ctuned.push(consume_watchtower(&stream, round, Some(256)).await);
        }
        del(&stream).await;

        println!("redis streams, {N} events per run, {ROUNDS} rounds, best run in events/s");
        println!("publish, {CALLERS} concurrent callers:");
        row("raw XADD, concurrent on one multiplexed connection", &raw, None);
        row("raw XADD, explicit pipelines of 64", &pipe, None);
        row(
            "watchtower dead letter + retry + breaker + publisher",
            &wt,
            Some(("raw", &raw)),
        );
        row("watchtower publisher alone", &bare, Some(("raw", &raw)));
        println!("consume:");
        row("raw XREADGROUP COUNT 256 + XACK per batch", &craw, None);
        row(
            "watchtower serve, default concurrency (64)",
            &cdef,
            Some(("raw", &craw)),
        );
        row("watchtower serve, concurrency 256", &ctuned, Some(("raw", &craw)));
    });
}
