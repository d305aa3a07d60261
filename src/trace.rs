//! Tracing spans with the OpenTelemetry messaging attribute names.
//!
//! Transports open a [`publish_span`] around each publish; the consumer
//! runtime opens a [`process_span`] around each handler call. Their fields
//! follow the OpenTelemetry semantic conventions for messaging
//! (`messaging.system`, `messaging.destination.name`,
//! `messaging.operation.type`, `messaging.message.id`), and carry the
//! event's W3C `traceparent` extension, when it has one, as `traceparent`,
//! so that an OpenTelemetry bridge can link producer and consumer.
//!
//! The spans are at DEBUG level, as tower-http's are, so that an INFO
//! subscriber pays nothing per event; they cost nothing measurable when no
//! subscriber enables them.

use tracing::Span;

use crate::event::Event;

/// A span for publishing `event` to `destination` over `system`.
pub fn publish_span(system: &'static str, destination: &str, event: &Event) -> Span {
    let span = tracing::debug_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = system,
        messaging.destination.name = destination,
        messaging.operation.type = "send",
        messaging.message.id = event.id(),
        traceparent = tracing::field::Empty,
    );
    if let Some(tp) = event.traceparent() {
        span.record("traceparent", tp);
    }
    span
}

/// A span for processing `event`, received on `destination` over `system`.
pub fn process_span(system: &'static str, destination: &str, event: &Event, delivery_count: u32) -> Span {
    let span = tracing::debug_span!(
        "process",
        otel.kind = "consumer",
        messaging.system = system,
        messaging.destination.name = destination,
        messaging.operation.type = "process",
        messaging.message.id = event.id(),
        messaging.message.delivery_count = delivery_count,
        traceparent = tracing::field::Empty,
    );
    if let Some(tp) = event.traceparent() {
        span.record("traceparent", tp);
    }
    span
}
