//! An axum app whose handlers publish through a full layer stack held in
//! the router's state, with a `/health` route reporting the stack.
//!
//! ```text
//! cargo run -p watchtower-layers --example axum_app
//! curl -X POST localhost:3000/orders -H 'content-type: application/json' -d '{"id": 1}'
//! curl localhost:3000/health
//! ```
//!
//! The stack is `Clone`; each request takes a clone and drives it with
//! `oneshot`, which waits for readiness and then calls, as tower services
//! in axum state are meant to be used. The dead-letter layer on top never
//! fails readiness, so a tripped breaker turns into dead letters and a 202
//! that says so, not a 500.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::health::Status;
use watchtower::{Error, Event, Receipt};
use watchtower_layers::ServiceBuilderExt;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::Outcome;
use watchtower_layers::health::HealthView;
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_memory::MemoryBroker;

type Publisher = BoxCloneSyncService<Event, Outcome<Receipt>, Error>;

#[derive(Clone)]
struct AppState {
    publisher: Publisher,
    health: HealthView,
}

async fn place_order(State(state): State<AppState>, Json(order): Json<Value>) -> (StatusCode, Json<Value>) {
    let event = Event::new("orders.placed", order);
    let id = event.id().to_owned();
    match state.publisher.oneshot(event).await {
        Ok(Outcome::Delivered(receipt)) => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "published", "topic": &*receipt.topic })),
        ),
        Ok(Outcome::DeadLettered(dead)) => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "dead_lettered", "reason": dead.error.to_string() })),
        ),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "id": id, "status": "failed", "error": err.to_string() })),
        ),
    }
}

async fn health_report(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let report = state.health.report().await;
    let code = match report.status {
        Status::Up | Status::Degraded => StatusCode::OK,
        Status::Down => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(serde_json::to_value(&report).unwrap_or_default()))
}

fn app(broker: &MemoryBroker) -> Router {
    let dlq = MemoryDeadLetters::new(10_000);
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("broker"));
    let retry = RetryLayer::new(
        RetryConfig::new()
            .max_attempts(3)
            .delays(Duration::from_millis(50), Duration::from_secs(1)),
    );
    let queue = BackpressureLayer::new(1_024, Overflow::Block);
    let health = HealthView::new()
        .breaker("broker", breaker.handle())
        .retry("publish", retry.handle())
        .queue("outbox", queue.handle())
        .memory_dead_letters("dlq", dlq.clone());

    let publisher = ServiceBuilder::new()
        .dead_letter(dlq)
        .retries(retry)
        .circuit_breaker(breaker)
        .timeout(Duration::from_secs(5))
        .backpressure(queue)
        .service(broker.publisher());

    Router::new()
        .route("/orders", post(place_order))
        .route("/health", get(health_report))
        .with_state(AppState {
            publisher: BoxCloneSyncService::new(publisher),
            health,
        })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = MemoryBroker::new();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(&broker)).await?;
    Ok(())
}
