//! Tracing spans and metrics with the OpenTelemetry messaging names.
//!
//! Every transport opens a [`PublishTrace`] around each publish; the
//! consumer runtime opens a process span around each handler call and
//! records each acknowledgement in it as a `settle` event. Their fields follow the
//! OpenTelemetry semantic conventions for messaging
//! (`messaging.system`, `messaging.destination.name`,
//! `messaging.operation.type` = `send` / `process` / `settle`,
//! `messaging.operation.name`, `messaging.message.id`, `error.type`), so
//! that a `tracing-opentelemetry` layer exports them as the conventions
//! name them.
//!
//! # Trace context across the wire
//!
//! With the feature `opentelemetry`, publishing writes the publish span's
//! OpenTelemetry context into the event as the CloudEvents
//! distributed-tracing extension (`traceparent`, `tracestate`, W3C Trace
//! Context), on every transport, before the event is encoded; the consumer
//! runtime reads it back and makes it the parent of the process span, so
//! that a trace shows an event from its publisher, through the retries
//! and the dead-letter path of the layers above the transport, to its
//! handler, across any broker. It works through `tracing` and
//! `tracing-opentelemetry`: keep your subscriber and add its
//! `OpenTelemetryLayer`. The W3C format is written and read here, not by
//! the global text-map propagator, whose default propagates nothing: the
//! CloudEvents extension is W3C Trace Context by definition.
//!
//! Without the feature, an event's own `traceparent` (one the application
//! set) is recorded on both spans as the field `traceparent`, so that logs
//! can still link a consumer to its producer.
//!
//! # Metrics
//!
//! With the feature `metrics`, the same places record, through the
//! [`metrics`](https://docs.rs/metrics) facade:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `messaging.client.sent.messages` | counter | system, destination, `messaging.operation.name` = `publish`, `error.type` on failure |
//! | `messaging.client.operation.duration` | histogram, seconds | the same |
//! | `messaging.client.consumed.messages` | counter | system, destination, `messaging.operation.name` = `process` |
//! | `messaging.process.duration` | histogram, seconds | system, destination, `error.type` on failure |
//! | `watchtower.consumer.acks`, `.nacks`, `.rejects` | counter | system, destination |
//! | `watchtower.consumer.redeliveries` | counter | system, destination (deliveries after the first) |
//! | `watchtower.consumer.poison` | counter | system, destination (undecodable messages) |
//! | `watchtower.consumer.dead_letters` | counter | system, destination (events the handler gave up on) |
//! | `watchtower.consumer.in_flight` | gauge | system, destination |
//!
//! Labels are `messaging.system` and `messaging.destination.name`. A
//! Prometheus exporter writes the dots as underscores
//! (`messaging_client_sent_messages_total`). Handles are registered once
//! per thread, destination and recorder, so a publish costs one short
//! lookup and, when no recorder is installed, calls nothing but no-op
//! handles.
//!
//! # Filtering
//!
//! The spans are at DEBUG level with the target `watchtower::trace`, as
//! tower-http's are, so that an INFO subscriber pays nothing per event;
//! enable them for the OpenTelemetry layer alone with a per-layer filter
//! such as `Targets::new().with_target("watchtower::trace", Level::DEBUG)`.
//!
//! # Cost, and sampling
//!
//! Without the features nothing of this is compiled. With them and
//! nothing installed, a publish and a delivery cost a few branches: a
//! span nobody enables is never built, its `otel.name` never formatted,
//! and with no metrics recorder nothing is looked up or timed (no clock
//! read). `scripts/bench-observability` measures it.
//!
//! Installed, the cost is the `tracing` layer's, per span: an event
//! sent and handled makes two spans (publish, process) and one `settle`
//! event. `tracing-opentelemetry` builds each span's attributes, ids and
//! timestamps whether or not the trace is sampled, and by default adds
//! attributes a messaging span does not need (source location, thread,
//! busy and idle times). For production:
//!
//! * sample in the OpenTelemetry SDK with a **parent-based ratio
//!   sampler**, `Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.01)))`:
//!   a trace is kept or dropped whole, by its trace id, at its root (the
//!   publisher, or the application's span above it), and every consumer
//!   follows the decision carried in `traceparent`'s flags. Dropped spans
//!   are never exported, so the exporter's cost falls with the ratio; the
//!   layer's own per-span work stays (it decides before it knows).
//! * turn off what a messaging span does not need:
//!   `tracing_opentelemetry::layer().with_location(false)
//!   .with_threads(false).with_tracked_inactivity(false)`.
//!
//! A span that is not recorded at all (the target disabled) costs
//! nothing, but then there is no context to propagate either: a consumer
//! can only join traces whose publisher recorded its span.
//!
//! One run of `scripts/bench-observability 5` (2 shared cores, load
//! average 14 to 18; CPU time per event, median of five processes per
//! mode, since the rates swing with the other processes):
//!
//! | case | off | idle | installed, every span | sampled, 1 % |
//! |---|--:|--:|--:|--:|
//! | NATS core publish | 2,007 ns | 2,061 ns (+2.7 %) | 7,012 ns (3.5×) | 5,252 ns (2.6×) |
//! | memory publish → `serve` → handler | 1,551 ns | 1,636 ns (+5.5 %) | 16,167 ns (10×) | 8,016 ns (5.2×) |
//!
//! Idle is within the spread of the rounds without the features (1,490
//! to 1,928 ns for the memory round trip). Installed, each span costs
//! about 5 µs with the layer's defaults and every span exported, and
//! about 3 µs with the lean layer and 1 % sampled (the layer works on
//! every span before the sampler drops it). A 5 % budget fits idle, not a
//! layer that records spans: with `tracing-opentelemetry` one recorded
//! span costs more than a whole event does without it.

use std::sync::Arc;

use tracing::Span;
use tracing::field::Empty;

use crate::error::Error;
use crate::event::Event;

#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "opentelemetry")]
mod otel;

/// One publish, traced: its span and, with the feature `metrics`, when it
/// started. A transport opens one with [`PublishTrace::start`] before it
/// encodes the event, keeps it in its response future, enters its
/// [`span`](PublishTrace::span) while it works, and calls
/// [`finish`](PublishTrace::finish) with the outcome.
#[derive(Debug)]
pub struct PublishTrace {
    span: Span,
    #[cfg(feature = "metrics")]
    meter: metrics::PublishMeter,
}

impl PublishTrace {
    /// Opens the publish span for `event`, bound for `destination` over
    /// `system`, as a child of the current span; with the feature
    /// `opentelemetry`, writes the span's context into `event`'s
    /// `traceparent` and `tracestate` (an event that already carries one
    /// keeps it when no OpenTelemetry layer records the span).
    pub fn start(system: &'static str, destination: &Arc<str>, event: &mut Event) -> PublishTrace {
        let span = tracing::debug_span!(
            "publish",
            otel.name = %format_args!("publish {destination}"),
            otel.kind = "producer",
            otel.status_code = Empty,
            messaging.system = system,
            messaging.destination.name = &**destination,
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.message.id = event.id(),
            traceparent = Empty,
            error.type = Empty,
        );
        if !span.is_disabled() {
            // An OpenTelemetry layer's span carries its context itself: the
            // field is for other subscribers (logs).
            #[cfg(feature = "opentelemetry")]
            let injected = otel::inject(&span, event);
            #[cfg(not(feature = "opentelemetry"))]
            let injected = false;
            if !injected && let Some(tp) = event.traceparent() {
                span.record("traceparent", tp);
            }
        }
        PublishTrace {
            #[cfg(feature = "metrics")]
            meter: metrics::PublishMeter::start(system, destination),
            span,
        }
    }

    /// The publish span, to enter while the transport works on the event.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Records the outcome: `error.type` on the span for a failure, and
    /// the sent-message count and operation duration.
    pub fn finish<T>(self, outcome: &Result<T, Error>) {
        let failure = outcome.as_ref().err().map(|e| e.kind().as_str());
        if let Some(kind) = failure {
            record_error_kind(&self.span, kind);
        }
        #[cfg(feature = "metrics")]
        self.meter.finish(failure);
    }
}

fn record_error_kind(span: &Span, kind: &'static str) {
    if !span.is_disabled() {
        span.record("error.type", kind);
        span.record("otel.status_code", "ERROR");
    }
}

/// The span that every attempt to send `event` runs in: the current span,
/// or, when there is none, a new `create` span for it (OpenTelemetry's
/// creation context of a message sent more than once).
///
/// The retry and dead-letter layers run their calls in it, so that the
/// publish span of each attempt, the retries and the dead-letter publish
/// all land in one trace, the caller's when it has one.
pub fn create_span(event: &Event) -> Span {
    let current = Span::current();
    if !current.is_none() {
        return current;
    }
    tracing::debug_span!(
        "create",
        otel.name = %format_args!("create {}", event.topic()),
        otel.kind = "producer",
        messaging.destination.name = event.topic(),
        messaging.operation.type = "create",
        messaging.operation.name = "create",
        messaging.message.id = event.id(),
    )
}

/// A span for processing `event`, received on `destination` over `system`.
///
/// With the feature `opentelemetry`, its parent is the context the event
/// carries (its `traceparent`), so that the process span joins the trace
/// of the publish that sent it.
pub fn process_span(system: &'static str, destination: &str, event: &Event, delivery_count: u32) -> Span {
    process_span_in(system, destination, event, delivery_count, None)
}

/// [`process_span`], for a consumer in `group`.
pub(crate) fn process_span_in(
    system: &'static str,
    destination: &str,
    event: &Event,
    delivery_count: u32,
    group: Option<&str>,
) -> Span {
    let span = tracing::debug_span!(
        "process",
        otel.name = %format_args!("process {destination}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.destination.name = destination,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.message.id = event.id(),
        messaging.message.delivery_count = delivery_count,
        messaging.consumer.group.name = group,
        traceparent = Empty,
        error.type = Empty,
    );
    if !span.is_disabled() {
        // A parent in the trace says it all to an OpenTelemetry layer: the
        // field is for other subscribers (logs).
        #[cfg(feature = "opentelemetry")]
        let parented = otel::set_parent(&span, event);
        #[cfg(not(feature = "opentelemetry"))]
        let parented = false;
        if !parented && let Some(tp) = event.traceparent() {
            span.record("traceparent", tp);
        }
    }
    span
}

/// Records a failure on a publish or process span: its `error.type` (the
/// [`ErrorKind`](crate::ErrorKind)) and an error status.
pub fn record_error(span: &Span, error: &Error) {
    record_error_kind(span, error.kind().as_str());
}

/// Records the settlement of a delivery, `operation` being `ack`, `nack`
/// or `reject`, as a `settle` event in the current span (the process
/// span): the messaging conventions ask for a settle span *or event*, and
/// an event costs a fraction of a span. It carries
/// `messaging.operation.type` = `settle`, `messaging.operation.name` and,
/// when the broker refused it, `error.type`.
pub(crate) fn settled(operation: &'static str, outcome: &Result<(), Error>) {
    match outcome {
        Ok(()) => tracing::debug!(
            messaging.operation.type = "settle",
            messaging.operation.name = operation,
            "settle"
        ),
        Err(e) => tracing::debug!(
            messaging.operation.type = "settle",
            messaging.operation.name = operation,
            error.type = e.kind().as_str(),
            "settle"
        ),
    }
}

/// The consumer runtime's metrics for one destination.
#[cfg(feature = "metrics")]
pub(crate) use metrics::ConsumerMeter;

/// Without the feature `metrics`: nothing recorded, nothing stored.
#[cfg(not(feature = "metrics"))]
#[derive(Debug)]
pub(crate) struct ConsumerMeter;

#[cfg(not(feature = "metrics"))]
#[allow(clippy::unused_self)]
impl ConsumerMeter {
    pub(crate) fn received(_system: &'static str, _destination: &Arc<str>, _delivery_count: u32) -> Self {
        ConsumerMeter
    }
    pub(crate) fn poison(&self) {}
    pub(crate) fn processed(&self, _failure: Option<&'static str>) {}
    pub(crate) fn settled(&self, _settlement: Settlement) {}
}

/// How a delivery was settled, for the consumer runtime's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settlement {
    Ack,
    Nack,
    Reject,
    DeadLetter,
}
