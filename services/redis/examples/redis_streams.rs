//! Redis Streams end to end against the local Redis: publish through the
//! fault-tolerance layers, consume through a consumer group with the
//! consumer runtime, and look at the stream as any other client would.
//!
//! ```text
//! cargo run -p watchtower-redis --example redis_streams
//! REDIS_URL=rediss://user:pass@host:6380 cargo run -p watchtower-redis --example redis_streams
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower::{ServiceBuilder, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event, PublishExt, SubscribeOptions, SubscriberExt};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome};
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_redis::{MaxLen, RedisClient, RedisConfig, RedisPublisherOptions, RedisSubscriberOptions};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // A prefix keeps the example's streams apart from everything else.
    let prefix = format!("example:{}:", uuid::Uuid::now_v7().simple());
    let config = RedisConfig::new(url)
        .stream_prefix(prefix.clone())
        .response_timeout(Duration::from_secs(5));
    println!("connecting with {config:?}");

    // One client: its connection is shared by the publisher and the subscriber.
    let client = RedisClient::connect(config).await?;

    // Consumers: a consumer group on every `order.*` stream.
    let subscriber = client.subscriber_with(
        RedisSubscriberOptions::new()
            .consumer("example-worker-1")
            .rescan_interval(Duration::from_millis(200)),
    )?;
    let handled = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let (counter, done) = (handled.clone(), all_done.clone());
    let handle = subscriber
        .subscribe_with(
            SubscribeOptions::new(["order.*"])?.group("fulfilment")?,
            service_fn(move |event: Event| {
                let (counter, done) = (counter.clone(), done.clone());
                async move {
                    println!(
                        "handled {} {} {}",
                        event.ty(),
                        event.id(),
                        String::from_utf8_lossy(event.data().map_or(&[][..], |d| &d[..]))
                    );
                    if counter.fetch_add(1, Ordering::SeqCst) + 1 == 6 {
                        done.notify_one();
                    }
                    Ok::<_, Error>(())
                }
            }),
        )
        .await?;

    // Publishers: dead letter + retry + circuit breaker over XADD.
    let dead_letters = MemoryDeadLetters::new(1000);
    let mut publisher = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(dead_letters.clone()))
        .layer(RetryLayer::new(RetryConfig::new()))
        .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new()))
        .service(client.publisher_with(RedisPublisherOptions::new().max_len(MaxLen::Approx(10_000)))?);
    for (i, ty) in ["order.placed", "order.paid", "order.shipped"]
        .iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        match publisher
            .publish(Event::new(*ty, serde_json::json!({"order_id": i})))
            .await?
        {
            Outcome::Delivered(receipt) => println!(
                "published {} to {:?} as entry {:?}",
                receipt.event_id,
                receipt.stream.as_deref().unwrap_or_default(),
                receipt.message_id.as_deref().unwrap_or_default()
            ),
            Outcome::DeadLettered(dead) => println!("dead-lettered {}: {}", dead.event.id(), dead.error),
        }
    }

    // New streams are found by the subscriber's next scan.
    tokio::time::timeout(Duration::from_secs(10), all_done.notified())
        .await
        .map_err(|_| Error::closed("not every event was handled within 10 s"))?;
    let stats = handle.stop().await?;
    println!("consumer: {stats}");

    // What any other client sees: the CloudEvents JSON document in `data`,
    // marked by `content-type: application/cloudevents+json` (structured
    // mode, the default).
    let client = redis::Client::open(config_url()).map_err(|e| Error::config(e.to_string()))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| Error::closed(e.to_string()))?;
    let key = format!("{prefix}order.placed");
    let entries: redis::Value = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::closed(e.to_string()))?;
    println!("XRANGE {key} - + COUNT 1 -> {entries:?}");

    // Clean up the example's streams.
    for ty in ["order.placed", "order.paid", "order.shipped"] {
        let _: redis::Value = redis::cmd("DEL")
            .arg(format!("{prefix}{ty}"))
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::closed(e.to_string()))?;
    }
    Ok(())
}

fn config_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}
