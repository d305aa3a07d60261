//! Typed handlers behind a router, on Redis Streams.
//!
//! Three handlers take their payloads as Rust types, a fallback takes what
//! no route matches, and an event whose payload does not fit its type goes
//! to the dead-letter path with serde's message.
//!
//! ```text
//! cargo run -p watchtower-toolkit --example router
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p watchtower-toolkit --example router
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::prelude::*;
use watchtower_redis::{RedisClient, RedisConfig, RedisSubscriberOptions};
use watchtower_toolkit::router::{Data, DeliveryCount, Router, State};

#[derive(Debug, Deserialize)]
struct OrderPlaced {
    id: u64,
    total_cents: u64,
}

#[derive(Debug, Deserialize)]
struct OrderCancelled {
    id: u64,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct OrderShipped {
    id: u64,
    carrier: String,
}

/// What the handlers share.
#[derive(Clone, Default)]
struct Shop {
    revenue_cents: Arc<AtomicU64>,
    handled: Arc<AtomicU64>,
}

async fn placed(Data(order): Data<OrderPlaced>, State(shop): State<Shop>) {
    shop.revenue_cents.fetch_add(order.total_cents, Ordering::Relaxed);
    shop.handled.fetch_add(1, Ordering::Relaxed);
    println!("placed    order {} for {} cents", order.id, order.total_cents);
}

async fn cancelled(Data(order): Data<OrderCancelled>, State(shop): State<Shop>) {
    shop.handled.fetch_add(1, Ordering::Relaxed);
    println!("cancelled order {}: {}", order.id, order.reason);
}

async fn shipped(
    Data(order): Data<OrderShipped>,
    DeliveryCount(count): DeliveryCount,
    State(shop): State<Shop>,
) -> Result<(), Error> {
    shop.handled.fetch_add(1, Ordering::Relaxed);
    println!(
        "shipped   order {} with {} (delivery {count})",
        order.id, order.carrier
    );
    Ok(())
}

async fn anything_else(event: Event, State(shop): State<Shop>) {
    shop.handled.fetch_add(1, Ordering::Relaxed);
    println!("fallback  {} ({})", event.ty(), event.id());
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("example:router:{}:", std::process::id());
    let client = RedisClient::connect(RedisConfig::new(&url).stream_prefix(prefix.as_str())).await?;

    let shop = Shop::default();
    let router = Router::with_state(shop.clone())
        .route("order.placed", placed)
        .route("order.cancelled", cancelled)
        .route("order.shipped", shipped)
        .fallback(anything_else);
    router.check()?;

    let subscription = client
        .subscriber_with(RedisSubscriberOptions::new().block(Duration::from_millis(100)))?
        .open(
            SubscribeOptions::new([
                "order.placed",
                "order.cancelled",
                "order.shipped",
                "order.refunded",
            ])?
            .group("shop")?,
        )
        .await?;
    let dead_letters = MemoryDeadLetters::new(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(subscription, router)
            .poison(dead_letters.clone())
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );

    let mut publisher = client.publisher();
    for event in [
        Event::new("order.placed", serde_json::json!({"id": 1, "total_cents": 1250})),
        Event::new("order.placed", serde_json::json!({"id": 2, "total_cents": 990})),
        Event::new("order.shipped", serde_json::json!({"id": 1, "carrier": "post"})),
        Event::new(
            "order.cancelled",
            serde_json::json!({"id": 2, "reason": "changed mind"}),
        ),
        Event::new("order.refunded", serde_json::json!({"id": 2})),
        // Not an OrderPlaced: `id` is a string.
        Event::new(
            "order.placed",
            serde_json::json!({"id": "three", "total_cents": 5}),
        ),
    ] {
        publisher.publish(event).await?;
    }

    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while shop.handled.load(Ordering::Relaxed) < 5 || dead_letters.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.send(()).ok();
    let stats = server
        .await
        .map_err(|e| Error::closed(format!("serve task: {e}")))??;
    for letter in dead_letters.drain() {
        println!(
            "dead letter {}: {}",
            letter.ty(),
            letter.extension("deadletterreason").unwrap_or_default()
        );
    }
    println!(
        "revenue {} cents; {stats}",
        shop.revenue_cents.load(Ordering::Relaxed)
    );

    // Remove this run's streams.
    let mut conn = redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection())
        .map_err(|e| Error::from_source(ErrorKind::Connection, e))?;
    for topic in [
        "order.placed",
        "order.cancelled",
        "order.shipped",
        "order.refunded",
    ] {
        let _: Result<(), _> = redis::cmd("DEL").arg(format!("{prefix}{topic}")).query(&mut conn);
    }
    if waited.is_err() {
        return Err(Error::new(
            ErrorKind::Timeout,
            "events were not all handled within 30 s",
        ));
    }
    Ok(())
}
