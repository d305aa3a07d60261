//! The layers on the consume side: a handler wrapped in timeout → retry →
//! circuit breaker → dead letter, driven by the consumer runtime.
//!
//! Events whose handler keeps failing end up in the dead-letter queue,
//! annotated, and are acknowledged, so the broker does not redeliver them
//! forever; the rest are handled and acknowledged.
//!
//! ```text
//! cargo run -p watchtower-layers --example consume_with_layers
//! ```

use std::future::IntoFuture as _;
use std::time::Duration;

use tower::{ServiceBuilder, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event, PublishExt, SubscribeOptions, Subscriber, serve};
use watchtower_layers::ServiceBuilderExt;
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::health::HealthView;
use watchtower_layers::retry::RetryConfig;
use watchtower_memory::MemoryBroker;

/// The business logic: orders over 1,000 fail (a downstream refuses them),
/// the rest succeed.
async fn handle(event: Event) -> Result<(), Error> {
    let order: serde_json::Value = event.json()?;
    let amount = order["amount"].as_u64().unwrap_or_default();
    if amount > 1_000 {
        return Err(Error::new(
            ErrorKind::Handler,
            format!("payment service refused amount {amount}"),
        ));
    }
    println!("handled order {}", order["id"]);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let broker = MemoryBroker::new();
    let dlq = MemoryDeadLetters::new(1_000);
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("payments").minimum_calls(10));
    let health = HealthView::new()
        .breaker("payments", breaker.handle())
        .memory_dead_letters("dlq", dlq.clone());

    // Outermost first: dead letter sees only final failures; retry asks the
    // breaker before each attempt; the timeout bounds each attempt.
    let handler = ServiceBuilder::new()
        .dead_letter(dlq.clone())
        .retries(
            RetryConfig::new()
                .max_attempts(3)
                .delays(Duration::from_millis(10), Duration::from_millis(100)),
        )
        .circuit_breaker(breaker)
        .timeout(Duration::from_secs(5))
        .service(service_fn(handle));

    let subscription = broker
        .subscriber()
        .open(SubscribeOptions::new(["orders.*"])?)
        .await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(subscription, handler)
            .concurrency(8)
            // Messages that do not decode go to the same queue.
            .poison(dlq.clone())
            .with_graceful_shutdown(async {
                stopped.await.ok();
            })
            .into_future(),
    );

    let mut publisher = broker.publisher();
    for (id, amount) in [(1, 20), (2, 5_000), (3, 300), (4, 1_200), (5, 80)] {
        let event = Event::new("orders.placed", serde_json::json!({ "id": id, "amount": amount }));
        publisher.publish(event).await?;
    }
    broker.publish_raw("orders.placed", "not an event")?;

    broker.wait_idle(Duration::from_secs(10)).await;
    stop.send(()).ok();
    let stats = server
        .await
        .map_err(|e| Error::new(ErrorKind::Other, e.to_string()))??;
    println!("runtime: {stats}");

    for event in dlq.snapshot() {
        println!(
            "dead letter {} kind={} attempts={} reason={}",
            event.id(),
            event.extension(ext::DEAD_LETTER_KIND).unwrap_or("-"),
            event.extension(ext::ATTEMPT).unwrap_or("-"),
            event.extension(ext::DEAD_LETTER_REASON).unwrap_or("-"),
        );
    }
    let report = health.report().await;
    println!("health: {}", serde_json::to_string(&report).unwrap_or_default());
    assert_eq!(dlq.len(), 3, "two refused orders and one poison message");
    Ok(())
}
