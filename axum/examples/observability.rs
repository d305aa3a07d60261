//! An axum service with WatchTower's observability: a publisher stack and
//! a consumer on the local NATS server (127.0.0.1:4222), every event's
//! trace printed when its spans end (publish → process, one trace id,
//! through `tracing-opentelemetry`, the process span with its `settle`
//! event), and `/metrics`, `/health` and
//! `/ready` on 127.0.0.1:3000, with a `POST /orders` that publishes.
//!
//! ```text
//! cargo run -p watchtower-axum --example observability
//! curl -X POST localhost:3000/orders
//! curl localhost:3000/metrics
//! curl -i localhost:3000/ready
//! curl -X POST localhost:3000/breaker/open    # /ready answers 503
//! curl -X POST localhost:3000/breaker/reset
//! ```

use std::future::IntoFuture as _;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt as _, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, Event, SubscribeOptions, Subscriber as _, serve};
use watchtower_layers::ServiceBuilderExt as _;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use watchtower_layers::dead_letter::{DeadLetterLayer, Outcome};
use watchtower_layers::health::HealthView;
use watchtower_layers::retry::{RetryConfig, RetryLayer};
use watchtower_nats::{NatsClient, NatsConfig};

/// Prints each finished span: its trace, its parent and its name.
#[derive(Debug)]
struct Print;

impl opentelemetry_sdk::trace::SpanExporter for Print {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        for span in batch {
            let events: Vec<&str> = span.events.iter().map(|e| e.name.as_ref()).collect();
            println!(
                "trace {} span {} parent {} {} {events:?}",
                span.span_context.trace_id(),
                span.span_context.span_id(),
                span.parent_span_id,
                span.name
            );
        }
        Ok(())
    }
}

/// The application's own `tracing` subscriber, with the OpenTelemetry layer
/// recording WatchTower's spans (DEBUG, target `watchtower`).
fn install_tracing() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(Print)
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("observability-example"))
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target("watchtower", tracing::Level::DEBUG),
        );
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otel))
        .unwrap_or_else(|e| eprintln!("a tracing subscriber was installed already: {e}"));
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First: every layer and publisher built after this records into it.
    let prometheus = watchtower_axum::install_prometheus()?;
    install_tracing();

    let client = NatsClient::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
    let dlq = MemoryDeadLetters::new(10_000);
    let dead_letter = DeadLetterLayer::new(dlq.clone()).name("orders");
    let retry = RetryLayer::new(RetryConfig::new().name("orders"));
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("orders"));
    let queue = BackpressureLayer::new(1024, Overflow::Block).name("orders");
    let health = HealthView::new()
        .transport("nats", client.clone())
        .breaker("orders", breaker.handle())
        .queue("orders", queue.handle())
        .retry("orders", retry.handle())
        .dead_letter_layer("orders", dead_letter.handle())
        .memory_dead_letters("dlq", dlq);
    let publisher: BoxCloneSyncService<Event, Outcome<_>, Error> = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .dead_letter(dead_letter)
            .retries(retry)
            .circuit_breaker(breaker.clone())
            .backpressure(queue)
            .service(client.publisher()),
    );

    let subscription = client
        .subscriber()
        .open(SubscribeOptions::new(["orders.>"])?)
        .await?;
    let consumer = serve(subscription, service_fn(|_: Event| async { Ok::<_, Error>(()) }));
    let health = health.consumer("orders", consumer.stats());
    tokio::spawn(consumer.into_future());

    let (open, reset) = (breaker.handle(), breaker.handle());
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let mut publisher = publisher.clone();
                async move {
                    match publisher.ready().await {
                        Ok(svc) => match svc.call(Event::empty("orders.placed")).await {
                            Ok(Outcome::Delivered(_)) => StatusCode::ACCEPTED,
                            Ok(Outcome::DeadLettered(_)) => StatusCode::SERVICE_UNAVAILABLE,
                            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
                        },
                        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                    }
                }
            }),
        )
        .route("/breaker/open", post(move || async move { open.force_open() }))
        .route("/breaker/reset", post(move || async move { reset.reset() }))
        .merge(watchtower_axum::observability(health, prometheus));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
