//! The quick start: publish and consume on the in-memory transport.
//!
//! A publisher stack built with `ServiceBuilder` (dead letter, retry,
//! circuit breaker, backpressure over the transport), a subscriber whose
//! handler fails one event on its first delivery and succeeds on the
//! redelivery, and the consumer's final statistics.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{ServiceBuilder, service_fn};
use watchtower::prelude::*;
use watchtower_layers::ServiceBuilderExt;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
use watchtower_layers::dead_letter::Outcome;
use watchtower_layers::retry::RetryConfig;
use watchtower_memory::MemoryBroker;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();

    // Consume: any `Service<Event>` is a handler. This one fails the first
    // delivery of `user.deleted`; the transport redelivers it.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let handler = service_fn(move |event: Event| {
        let first_time = seen
            .lock()
            .map(|mut s| s.insert(event.id().to_owned()))
            .unwrap_or(false);
        async move {
            if event.ty() == "user.deleted" && first_time {
                println!("handler: failing {} once, it will come back", event.ty());
                return Err(Error::new(ErrorKind::Handler, "database busy"));
            }
            let user: serde_json::Value = event.json()?;
            println!("handler: {} {user}", event.ty());
            Ok(())
        }
    });
    let subscription = broker.subscriber().subscribe(["user.*"], handler).await?;

    // Publish: the transport is a `Service<Event>`; the fault-tolerance
    // layers stack on it, outermost first. Whatever finally fails lands in
    // the dead-letter queue instead of vanishing.
    let dead_letters = MemoryDeadLetters::default();
    let mut publisher = ServiceBuilder::new()
        .dead_letter(dead_letters.clone())
        .retries(RetryConfig::new().max_attempts(3))
        .circuit_breaker(CircuitBreakerConfig::new().name("memory"))
        .timeout(Duration::from_secs(5))
        .backpressure(BackpressureLayer::new(1024, Overflow::Block))
        .service(broker.publisher());
    for (ty, id) in [
        ("user.created", 123),
        ("user.updated", 123),
        ("user.deleted", 123),
    ] {
        match publisher
            .publish(Event::new(ty, serde_json::json!({ "user_id": id })))
            .await?
        {
            Outcome::Delivered(receipt) => {
                println!(
                    "published {} as #{}",
                    receipt.topic,
                    receipt.sequence.unwrap_or_default()
                )
            }
            Outcome::DeadLettered(dead) => println!("dead-lettered {}: {}", dead.event.id(), dead.error),
        }
    }

    // Wait until every event is settled, then shut the consumer down gracefully.
    if !broker.wait_idle(Duration::from_secs(5)).await {
        return Err("events were not all handled within 5 s".into());
    }
    let stats = subscription.stop().await?;
    println!("consumer statistics: {stats}");
    println!("dead letters: {}", dead_letters.len());
    assert_eq!((stats.acked, stats.nacked, dead_letters.len()), (3, 1, 0));
    Ok(())
}
