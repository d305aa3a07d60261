//! The promise, under load: every event is delivered, dead-lettered, or
//! handed back to its caller in an error — never lost, never kept twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::{Error, ErrorKind, Event};
use watchtower_layers::ServiceBuilderExt;
use watchtower_layers::backpressure::{BackpressureLayer, Overflow};
use watchtower_layers::circuit_breaker::CircuitBreakerConfig;
use watchtower_layers::dead_letter::{DeadLetterFailed, Outcome};
use watchtower_layers::retry::RetryConfig;

const EVENTS: usize = 10_000;
const CALLERS: usize = 200;

type Ids = Arc<Mutex<HashSet<String>>>;

/// Fails a seeded 30 % of calls, and every call in the last 300 ms of each
/// second (an outage), taking a millisecond per call.
fn flaky_transport(
    delivered: Ids,
) -> impl Service<Event, Response = (), Error = Error, Future: Send> + Clone + Send {
    let rng = Arc::new(Mutex::new(SmallRng::seed_from_u64(30)));
    let start = tokio::time::Instant::now();
    service_fn(move |event: Event| {
        let fail = rng.lock().unwrap().random_bool(0.3);
        let delivered = delivered.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let down = start.elapsed().as_millis() % 1000 >= 700;
            if down {
                return Err(Error::new(ErrorKind::Connection, "broker down"));
            }
            if fail {
                return Err(Error::new(ErrorKind::Timeout, "no ack"));
            }
            assert!(
                delivered.lock().unwrap().insert(event.id().to_owned()),
                "delivered twice"
            );
            Ok(())
        }
    })
}

/// A dead-letter queue that refuses a seeded share of events.
#[derive(Clone)]
struct FlakyDlq {
    inner: MemoryDeadLetters,
    rng: Arc<Mutex<SmallRng>>,
    failure_rate: f64,
}

impl Service<Event> for FlakyDlq {
    type Response = ();
    type Error = Error;
    type Future = std::future::Ready<Result<(), Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        if self.rng.lock().unwrap().random_bool(self.failure_rate) {
            return std::future::ready(Err(Error::new(ErrorKind::Connection, "dlq unreachable")));
        }
        std::future::ready(self.inner.push(event))
    }
}

#[derive(Default)]
struct Tally {
    delivered: HashSet<String>,
    dead_lettered: HashSet<String>,
    returned: HashSet<String>,
    resolved: usize,
}

/// Runs `EVENTS` events through `svc`, arriving at 5,000 a second (of
/// paused time), at most `CALLERS` waiting at once.
async fn run<S>(svc: S) -> (Vec<String>, Tally)
where
    S: Service<Event, Response = Outcome<()>, Error = Error> + Clone,
{
    let mut sent = Vec::with_capacity(EVENTS);
    let mut tally = Tally::default();
    let mut in_flight = FuturesUnordered::new();
    let record = |tally: &mut Tally, (id, result): (String, Result<Outcome<()>, Error>)| {
        tally.resolved += 1;
        let fresh = match result {
            Ok(Outcome::Delivered(())) => tally.delivered.insert(id),
            Ok(Outcome::DeadLettered(d)) => {
                assert_eq!(d.event.id(), id);
                tally.dead_lettered.insert(id)
            }
            Err(mut e) => {
                assert!(
                    DeadLetterFailed::find(&e).is_some(),
                    "only a failing DLQ may return an error: {e}"
                );
                assert_eq!(
                    e.take_event().map(|e| e.id().to_owned()).as_deref(),
                    Some(id.as_str())
                );
                tally.returned.insert(id)
            }
        };
        assert!(fresh, "an event resolved twice");
    };
    // Arrivals spread over time, so that an open breaker sees a stream of
    // events rather than all of them at one instant.
    let mut arrivals = tokio::time::interval(Duration::from_micros(200));
    loop {
        tokio::select! {
            _ = arrivals.tick(), if sent.len() < EVENTS && in_flight.len() < CALLERS => {
                let event = Event::new("order.placed", serde_json::json!({ "n": sent.len() }));
                let id = event.id().to_owned();
                sent.push(id.clone());
                let call = svc.clone().oneshot(event);
                in_flight.push(async move { (id, call.await) });
            }
            Some(done) = in_flight.next() => record(&mut tally, done),
            else => break,
        }
    }
    (sent, tally)
}

fn stack<S>(
    inner: S,
    dlq: FlakyDlq,
) -> impl Service<Event, Response = Outcome<()>, Error = Error, Future: Send> + Clone
where
    S: Service<Event, Response = (), Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .dead_letter(dlq)
        .retries(
            RetryConfig::new()
                .max_attempts(3)
                .delays(Duration::from_millis(5), Duration::from_millis(100))
                .seed(3),
        )
        .circuit_breaker(
            CircuitBreakerConfig::new()
                .minimum_calls(20)
                .failure_rate_threshold(60.0)
                .open_wait(Duration::from_millis(500))
                .half_open_permits(3),
        )
        .backpressure(BackpressureLayer::new(16, Overflow::DropOldest).concurrency(4))
        .service(inner)
}

fn check(sent: &[String], tally: &Tally, dlq: &MemoryDeadLetters) -> Result<(), String> {
    if tally.resolved != sent.len() {
        return Err(format!("{} of {} callers resolved", tally.resolved, sent.len()));
    }
    let in_dlq = dlq.snapshot();
    let dlq_ids: HashSet<String> = in_dlq.iter().map(|e| e.id().to_owned()).collect();
    if dlq_ids.len() != in_dlq.len() {
        return Err("an event is in the DLQ twice".into());
    }
    if dlq_ids != tally.dead_lettered {
        return Err(format!(
            "{} callers were told dead-lettered, {} events are in the DLQ",
            tally.dead_lettered.len(),
            dlq_ids.len()
        ));
    }
    let accounted = tally.delivered.len() + tally.dead_lettered.len() + tally.returned.len();
    let all: HashSet<&String> = tally
        .delivered
        .iter()
        .chain(&tally.dead_lettered)
        .chain(&tally.returned)
        .collect();
    if accounted != sent.len() || all.len() != sent.len() || sent.iter().any(|id| !all.contains(id)) {
        return Err(format!(
            "delivered {} + dead-lettered {} + returned {} != sent {}",
            tally.delivered.len(),
            tally.dead_lettered.len(),
            tally.returned.len(),
            sent.len()
        ));
    }
    Ok(())
}

fn dlq(failure_rate: f64) -> (FlakyDlq, MemoryDeadLetters) {
    let memory = MemoryDeadLetters::new(EVENTS);
    let flaky = FlakyDlq {
        inner: memory.clone(),
        rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(5))),
        failure_rate,
    };
    (flaky, memory)
}

fn summary(tally: &Tally) -> String {
    format!(
        "delivered {}, dead-lettered {}, returned {}",
        tally.delivered.len(),
        tally.dead_lettered.len(),
        tally.returned.len()
    )
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_events_nothing_lost() {
    let delivered = Ids::default();
    let (reliable, memory) = dlq(0.0);
    let svc = stack(flaky_transport(delivered.clone()), reliable);
    let (sent, tally) = run(svc).await;
    check(&sent, &tally, &memory).unwrap();
    println!("{}", summary(&tally));
    assert!(tally.returned.is_empty(), "a working DLQ takes every failure");
    assert_eq!(tally.delivered.len() + tally.dead_lettered.len(), EVENTS);
    assert_eq!(
        *delivered.lock().unwrap(),
        tally.delivered,
        "what the transport took is what callers were told"
    );

    // Every path was exercised.
    assert!(tally.delivered.len() > 1000, "{}", summary(&tally));
    assert!(tally.dead_lettered.len() > 1000, "{}", summary(&tally));
    let kinds: HashSet<String> = memory
        .snapshot()
        .iter()
        .filter_map(|e| e.extension(ext::DEAD_LETTER_KIND).map(str::to_owned))
        .collect();
    for kind in ["timeout", "connection", "circuit_open", "dropped"] {
        assert!(kinds.contains(kind), "no {kind} dead letters: {kinds:?}");
    }
    assert!(
        memory
            .snapshot()
            .iter()
            .any(|e| e.extension(ext::ATTEMPT) == Some("3")),
        "attempt counts are recorded"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_dlq_hands_events_back_to_their_callers() {
    let (flaky, memory) = dlq(0.05);
    let svc = stack(flaky_transport(Ids::default()), flaky);
    let (sent, tally) = run(svc).await;
    check(&sent, &tally, &memory).unwrap();
    assert!(
        !tally.returned.is_empty(),
        "the DLQ never failed: {}",
        summary(&tally)
    );
}

/// A dead-letter layer that swallows a failing DLQ's error, as a broken one
/// would: the same run must then fail the check.
#[derive(Clone)]
struct SwallowingDeadLetter<S>(S);

impl<S> Service<Event> for SwallowingDeadLetter<S>
where
    S: Service<Event, Response = Outcome<()>, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Outcome<()>;
    type Error = Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Outcome<()>, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, event: Event) -> Self::Future {
        let fut = self.0.call(event);
        Box::pin(async move {
            match fut.await {
                Err(mut e) if DeadLetterFailed::find(&e).is_some() => {
                    let event = e
                        .take_event()
                        .ok_or_else(|| Error::from_boxed(BoxError::from("no event")))?;
                    Ok(Outcome::DeadLettered(
                        watchtower_layers::dead_letter::DeadLettered { event, error: e },
                    ))
                }
                other => other,
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_layer_that_drops_on_dlq_failure_is_caught() {
    let (flaky, memory) = dlq(0.05);
    let svc = SwallowingDeadLetter(stack(flaky_transport(Ids::default()), flaky));
    let (sent, tally) = run(svc).await;
    let err = check(&sent, &tally, &memory).unwrap_err();
    assert!(err.contains("callers were told dead-lettered"), "{err}");
}
