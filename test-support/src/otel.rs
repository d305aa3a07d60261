//! Traces captured in memory, and the trace-propagation check every
//! transport runs (feature `otel`).
//!
//! [`Traces::capture`] makes a `tracing` subscriber with
//! `tracing-opentelemetry`'s layer the current thread's default, exporting
//! every finished span to memory. Run the test on a current-thread runtime,
//! so that every task it spawns (the consumer runtime, a local HTTP
//! server) records into it.
//!
//! [`check_propagation`] publishes through the retry and dead-letter
//! layers over a transport's [`Harness`] and consumes with
//! [`serve`](watchtower::serve()), then checks that one event's spans —
//! its publish, the retry of a failed attempt, its dead-lettering, its
//! processing and redelivery — form one trace each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::{Service, ServiceBuilder, ServiceExt as _, service_fn};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;
use watchtower::conformance::Harness;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::{Error, ErrorKind, Event, SubscribeOptions, Subscriber as _, serve};
use watchtower_layers::dead_letter::DeadLetterLayer;
use watchtower_layers::retry::{RetryConfig, RetryLayer};

/// Finished spans, exported to memory while the capture lives.
#[derive(Debug)]
pub struct Traces {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Traces {
    /// Records every span (DEBUG and above) of this thread from now on.
    pub fn capture() -> Traces {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let tracer = provider.tracer("watchtower-test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        let guard = tracing::subscriber::set_default(subscriber);
        Traces {
            exporter,
            _provider: provider,
            _guard: guard,
        }
    }

    /// Every span finished so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.exporter.get_finished_spans().unwrap_or_default()
    }

    /// The finished spans of the message with this id
    /// (`messaging.message.id`), in the order they ended.
    pub fn of_message(&self, id: &str) -> Vec<SpanData> {
        self.spans()
            .into_iter()
            .filter(|s| attribute(s, "messaging.message.id").as_deref() == Some(id))
            .collect()
    }
}

/// A span's attribute, as a string.
pub fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(s) => s.as_str().to_owned(),
            other => other.to_string(),
        })
}

/// The names of a span's events (the `tracing` events recorded in it).
pub fn event_names(span: &SpanData) -> Vec<String> {
    span.events.iter().map(|e| e.name.to_string()).collect()
}

fn fail(what: impl std::fmt::Display) -> String {
    what.to_string()
}

fn one<'a>(spans: &'a [SpanData], name: &str, what: &str) -> Result<&'a SpanData, String> {
    let found: Vec<_> = spans.iter().filter(|s| s.name.starts_with(name)).collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => Err(format!(
            "{what}: expected one `{name}` span, found {} among {:?}",
            found.len(),
            names(spans)
        )),
    }
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

fn same_trace(spans: &[&SpanData], what: &str) -> Result<TraceId, String> {
    let trace = spans
        .first()
        .map(|s| s.span_context.trace_id())
        .ok_or_else(|| format!("{what}: no spans"))?;
    if spans.iter().any(|s| s.span_context.trace_id() != trace) {
        return Err(format!(
            "{what}: spans in different traces: {:?}",
            spans
                .iter()
                .map(|s| (s.name.to_string(), s.span_context.trace_id()))
                .collect::<Vec<_>>()
        ));
    }
    Ok(trace)
}

fn child_of(child: &SpanData, parent: &SpanData, what: &str) -> Result<(), String> {
    if child.parent_span_id == parent.span_context.span_id()
        && child.span_context.trace_id() == parent.span_context.trace_id()
    {
        Ok(())
    } else {
        Err(format!(
            "{what}: `{}` is not a child of `{}` (its parent is {:?}, not {:?})",
            child.name,
            parent.name,
            child.parent_span_id,
            parent.span_context.span_id()
        ))
    }
}

fn expect_attr(span: &SpanData, key: &str, value: &str, what: &str) -> Result<(), String> {
    match attribute(span, key) {
        Some(v) if v == value => Ok(()),
        other => Err(format!(
            "{what}: `{}` has {key} = {other:?}, expected {value:?}",
            span.name
        )),
    }
}

/// How the events of [`check_propagation`] behave.
const OK: &str = "trace.ok";
const RETRIED: &str = "trace.retried";
const DEAD: &str = "trace.dead";
const REDELIVERED: &str = "trace.redelivered";
const GIVEN_UP: &str = "trace.given_up";

/// Publishes five events over `h`'s transport through a dead-letter and a
/// retry layer, consumes them with `serve`, and checks their traces:
///
/// * `ok`, published inside an application span: the publish span is its
///   child, and the process span the publish span's child, in its trace;
/// * `retried`: its first attempt fails below the retry layer; the
///   `create` span holds a `retrying` event and the successful attempt's
///   publish span, whose child is the process span;
/// * `dead`: every attempt fails; the `create` span holds the retries and
///   the dead-lettering, and the event reaches the dead-letter queue;
/// * `redelivered` (transports with redelivery): the handler fails its
///   first delivery; both process spans are children of the one publish
///   span, the first with `error.type` and a `nack` settle event;
/// * `given_up`: the handler refuses it for good; its process span has
///   `error.type` and a `reject` settle event, in the publish's trace.
///
/// On a transport with consumer groups the subscription joins one, and
/// every process span names it (`messaging.consumer.group.name`).
///
/// Returns a description of the first thing that is not so.
pub async fn check_propagation<H: Harness>(h: &H, traces: &Traces) -> Result<(), String> {
    let ns = watchtower::conformance::unique("trace");
    h.setup(&ns).await.map_err(fail)?;
    let result = propagation(h, traces, &ns).await;
    let torn_down = h.teardown(&ns).await;
    result?;
    torn_down.map_err(fail)
}

async fn propagation<H: Harness>(h: &H, traces: &Traces, ns: &str) -> Result<(), String> {
    let topic = format!("{ns}.orders");
    let redelivery = h.capabilities().redelivery;
    // A consumer group where the transport has them, for
    // `messaging.consumer.group.name`.
    let group = h.capabilities().consumer_groups.then_some("traced");
    let subscriber = h.subscriber(ns).await.map_err(fail)?;
    let mut options = SubscribeOptions::new([topic.as_str()]).map_err(fail)?;
    if let Some(group) = group {
        options = options.group(group).map_err(fail)?;
    }
    let subscription = subscriber.open(options).await.map_err(fail)?;

    // The handler: what each event does, and every delivery it saw.
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handler = {
        let seen = seen.clone();
        service_fn(move |event: Event| {
            let (seen, done) = (seen.clone(), done_tx.clone());
            async move {
                let n = {
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    let n = seen.entry(event.ty().to_owned()).or_insert(0);
                    *n += 1;
                    *n
                };
                let outcome = match event.ty() {
                    REDELIVERED if redelivery && n == 1 => {
                        Err(Error::new(ErrorKind::Handler, "first delivery fails"))
                    }
                    GIVEN_UP => Err(Error::new(ErrorKind::Handler, "refused for good").with_retryable(false)),
                    _ => Ok(()),
                };
                let _ = done.send(event.ty().to_owned());
                outcome
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(
        serve(subscription, handler)
            .redelivery_backoff(Duration::from_millis(10), Duration::from_millis(10))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .into_future(),
    );

    // The publisher stack: dead letter over retry over a fault that fails
    // `retried` once and `dead` always, over the transport.
    let dlq = MemoryDeadLetters::new(16);
    let failures: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let transport = h.publisher(ns).await.map_err(fail)?;
    let faulty = {
        let failures = failures.clone();
        service_fn(move |event: Event| {
            let mut transport = transport.clone();
            let failures = failures.clone();
            async move {
                let n = {
                    let mut f = failures.lock().unwrap_or_else(PoisonError::into_inner);
                    let n = f.entry(event.ty().to_owned()).or_insert(0);
                    *n += 1;
                    *n
                };
                if (event.ty() == RETRIED && n == 1) || event.ty() == DEAD {
                    return Err(Error::new(ErrorKind::Connection, "injected failure").with_retryable(true));
                }
                transport.ready().await?.call(event).await
            }
        })
    };
    let mut publisher = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(dlq.clone()))
        .layer(RetryLayer::new(
            RetryConfig::new()
                .max_attempts(3)
                .delays(Duration::from_millis(1), Duration::from_millis(1)),
        ))
        .service(faulty);

    let events: Vec<Event> = [OK, RETRIED, DEAD, REDELIVERED, GIVEN_UP]
        .into_iter()
        .map(|ty| Event::new(ty, serde_json::Value::Null).with_topic(topic.as_str()))
        .collect();
    let ids: HashMap<String, String> = events
        .iter()
        .map(|e| (e.ty().to_owned(), e.id().to_owned()))
        .collect();
    for event in events {
        let ty = event.ty().to_owned();
        let ready = publisher.ready().await.map_err(fail)?;
        // `ok` is published as an application would inside a request.
        let request = if ty == OK {
            tracing::info_span!("request")
        } else {
            tracing::Span::none()
        };
        let call = {
            let _entered = request.enter();
            ready.call(event)
        };
        let outcome = call.instrument(request).await;
        let outcome = outcome.map_err(|e| format!("publishing {ty}: {e}"))?;
        if (ty == DEAD) == outcome.is_delivered() {
            return Err(format!("{ty}: unexpected outcome {outcome:?}"));
        }
    }

    // Every delivery the handler must see: one each, and the redelivery.
    let mut expected = 4 + usize::from(redelivery);
    while expected > 0 {
        match tokio::time::timeout(h.patience(), done_rx.recv()).await {
            Ok(Some(_)) => expected -= 1,
            _ => {
                return Err(format!(
                    "the handler saw {:?}",
                    seen.lock().unwrap_or_else(PoisonError::into_inner)
                ));
            }
        }
    }
    let _ = stop_tx.send(());
    let stats = consumer.await.map_err(fail)?.map_err(fail)?;
    if stats.dead_lettered != 1 {
        return Err(format!(
            "the consumer dead-lettered {} events, expected 1 ({stats})",
            stats.dead_lettered
        ));
    }
    if dlq.len() != 1 {
        return Err(format!(
            "the dead-letter queue holds {} events, expected 1",
            dlq.len()
        ));
    }
    drop(publisher);
    drop(subscriber);

    let system = h.system();
    let publish_of = |spans: &[SpanData], what: &str| -> Result<SpanData, String> {
        let publish = one(spans, "publish", what)?.clone();
        if publish.span_kind != SpanKind::Producer {
            return Err(format!("{what}: publish span kind {:?}", publish.span_kind));
        }
        expect_attr(&publish, "messaging.system", system, what)?;
        expect_attr(&publish, "messaging.destination.name", &topic, what)?;
        expect_attr(&publish, "messaging.operation.type", "send", what)?;
        Ok(publish)
    };
    let check_process = |process: &SpanData, what: &str| -> Result<(), String> {
        if process.span_kind != SpanKind::Consumer {
            return Err(format!("{what}: process span kind {:?}", process.span_kind));
        }
        expect_attr(process, "messaging.system", system, what)?;
        expect_attr(process, "messaging.destination.name", &topic, what)?;
        expect_attr(process, "messaging.operation.type", "process", what)?;
        match group {
            Some(group) => expect_attr(process, "messaging.consumer.group.name", group, what),
            None => Ok(()),
        }
    };
    let settle_of = |process: &SpanData, op: &str, what: &str| -> Result<(), String> {
        let settles: Vec<_> = process.events.iter().filter(|e| e.name == "settle").collect();
        let [settle] = settles.as_slice() else {
            return Err(format!(
                "{what}: expected one settle event in the process span, found {:?}",
                event_names(process)
            ));
        };
        let attr = |key: &str| {
            settle
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        for (key, value) in [
            ("messaging.operation.type", "settle"),
            ("messaging.operation.name", op),
        ] {
            if attr(key).as_deref() != Some(value) {
                return Err(format!(
                    "{what}: the settle event has {key} = {:?}, expected {value:?}",
                    attr(key)
                ));
            }
        }
        Ok(())
    };

    // ok: request → publish → process.
    let spans = traces.of_message(&ids[OK]);
    let publish = publish_of(&spans, OK)?;
    let process = one(&spans, "process", OK)?;
    check_process(process, OK)?;
    child_of(process, &publish, OK)?;
    let request = traces
        .spans()
        .into_iter()
        .find(|s| s.name == "request")
        .ok_or("no request span")?;
    child_of(&publish, &request, OK)?;
    settle_of(process, "ack", OK)?;

    // retried: create (retrying) → publish → process.
    let spans = traces.of_message(&ids[RETRIED]);
    let create = one(&spans, "create", RETRIED)?;
    if !event_names(create).iter().any(|e| e == "retrying") {
        return Err(format!(
            "{RETRIED}: the create span has events {:?}",
            event_names(create)
        ));
    }
    let publish = publish_of(&spans, RETRIED)?;
    let process = one(&spans, "process", RETRIED)?;
    check_process(process, RETRIED)?;
    child_of(&publish, create, RETRIED)?;
    child_of(process, &publish, RETRIED)?;

    // dead: create (retrying ×2, dead-lettering), nothing published.
    let spans = traces.of_message(&ids[DEAD]);
    let create = one(&spans, "create", DEAD)?;
    let events = event_names(create);
    if events.iter().filter(|e| *e == "retrying").count() != 2
        || !events.iter().any(|e| e == "dead-lettering event")
    {
        return Err(format!("{DEAD}: the create span has events {events:?}"));
    }
    if spans
        .iter()
        .any(|s| s.name.starts_with("publish") || s.name.starts_with("process"))
    {
        return Err(format!("{DEAD}: spans {:?}", names(&spans)));
    }

    // redelivered: publish → process (failed, nack), process (ack).
    let spans = traces.of_message(&ids[REDELIVERED]);
    let publish = publish_of(&spans, REDELIVERED)?;
    let processes: Vec<&SpanData> = spans.iter().filter(|s| s.name.starts_with("process")).collect();
    if processes.len() != 1 + usize::from(redelivery) {
        return Err(format!("{REDELIVERED}: {} process spans", processes.len()));
    }
    for process in &processes {
        check_process(process, REDELIVERED)?;
        child_of(process, &publish, REDELIVERED)?;
    }
    if redelivery {
        let failed = processes
            .iter()
            .find(|p| attribute(p, "messaging.message.delivery_count").as_deref() == Some("1"))
            .ok_or("no first delivery")?;
        expect_attr(failed, "error.type", "handler", REDELIVERED)?;
        settle_of(failed, "nack", REDELIVERED)?;
    }
    let all: Vec<&SpanData> = spans.iter().collect();
    same_trace(&all, REDELIVERED)?;

    // given_up: publish → process (failed, reject).
    let spans = traces.of_message(&ids[GIVEN_UP]);
    let publish = publish_of(&spans, GIVEN_UP)?;
    let process = one(&spans, "process", GIVEN_UP)?;
    check_process(process, GIVEN_UP)?;
    child_of(process, &publish, GIVEN_UP)?;
    expect_attr(process, "error.type", "handler", GIVEN_UP)?;
    settle_of(process, "reject", GIVEN_UP)?;
    Ok(())
}
