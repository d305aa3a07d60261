//! The transport conformance suite, written once and run by every
//! transport (feature `conformance`).
//!
//! A transport implements [`Harness`] — how to make publishers and
//! subscribers in a fresh namespace, and how to clean up — and runs
//! [`run`]. Each case uses its own namespace: every topic it touches starts
//! with `<namespace>.`, where the namespace is one token of `[a-z0-9_]`,
//! unique per run, so cases run in parallel with other tests on a shared
//! broker.
//!
//! Cases a transport's [`Capabilities`] rule out are reported as skipped,
//! with the reason, never silently; [`Report::assert_passed`] fails a test
//! on any failed case and prints the table.
//!
//! | case | needs |
//! |---|---|
//! | `round_trip` — every attribute, extension and the payload intact (JSON and binary data) | — |
//! | `ordered_100` — 100 events on one topic arrive in order | `ordered` (else checked as a set) |
//! | `topic_isolation` — a subscription sees only its topic | — |
//! | `many_topics` — 20 topics × 100 events published concurrently | — |
//! | `concurrent_publishers` — 50 publishers × 100 events, received exactly as sent | — |
//! | `nack_redelivery` — nacked twice, delivered again with counts 1, 2, 3 | `redelivery` |
//! | `unacked_survives_drop` — an unacked event reaches the next group member | `persistent`, `consumer_groups` |
//! | `consumer_groups` — two groups each get every event; one group's members split them | `consumer_groups` |
//! | `wildcards` — `*` and `>` subscriptions get exactly their topics | `wildcards` |
//! | `close_with_events_in_flight` — shut down mid-stream, resubscribe, nothing lost | `persistent`, `consumer_groups` |
//! | `nack_with_delay` — a delayed nack is delivered again, count rising | `nack_delay` |
//! | `replay` — a subscription that asks to replay gets earlier events in order | `replay` |
//! | `poison` — an undecodable message reaches the poison path, the consumer goes on | [`Harness::publish_raw`] |
//! | `topic_carried` — an event published to a topic other than its type arrives carrying that topic | — |
//! | `spans` — each event has a publish span and a process span from the core, with the transport's `messaging.system`, the topic, and the operation | — |
//!
//! # Example
//!
//! ```no_run
//! # use watchtower::conformance::{run, Harness};
//! # async fn f<H: Harness>(harness: H) {
//! // In a transport's tests, with a Harness for it:
//! run(harness).await.assert_passed();
//! # }
//! ```
//!
//! [`unique`] makes the names: one implementation for the suite and for the
//! transports' own tests.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tower::{Service, service_fn};

use crate::dead_letter::MemoryDeadLetters;
use crate::error::Error;
use crate::event::Event;
use crate::publish::PublishExt as _;
use crate::serve::serve;
use crate::subscribe::{Capabilities, Receipt, SubscribeOptions, Subscriber};

mod spans;

/// How long a case waits for the events it expects: 30 s, generous for a
/// loaded CI machine; a passing case takes a fraction of it.
pub const WAIT: Duration = Duration::from_secs(30);

/// What the suite needs from a transport.
pub trait Harness: Send + Sync + 'static {
    /// The publisher type.
    type Publisher: Service<Event, Response = Receipt, Error = Error, Future: Send> + Clone + Send + 'static;
    /// The subscriber type.
    type Subscriber: Subscriber + 'static;

    /// The transport's name, for the report.
    fn name(&self) -> String;

    /// The transport's `messaging.system` name
    /// ([`Transport::SYSTEM`](crate::Transport::SYSTEM)), which its publish
    /// spans and deliveries must carry.
    fn system(&self) -> &'static str;

    /// The capabilities to test.
    fn capabilities(&self) -> Capabilities;

    /// Prepares the broker for topics under `namespace` (a JetStream
    /// stream for `<namespace>.>`, an exchange). The default does nothing.
    fn setup(&self, namespace: &str) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = namespace;
        async { Ok(()) }
    }

    /// Removes what the case created under `namespace`. The default does
    /// nothing.
    fn teardown(&self, namespace: &str) -> impl Future<Output = Result<(), Error>> + Send {
        let _ = namespace;
        async { Ok(()) }
    }

    /// A publisher for topics under `namespace`.
    fn publisher(&self, namespace: &str) -> impl Future<Output = Result<Self::Publisher, Error>> + Send;

    /// A subscriber for topics under `namespace`. Each call is a new
    /// consumer: a distinct member of any group it joins.
    fn subscriber(&self, namespace: &str) -> impl Future<Output = Result<Self::Subscriber, Error>> + Send;

    /// How long a case waits for what it expects before failing. Default
    /// [`WAIT`].
    fn patience(&self) -> Duration {
        WAIT
    }

    /// Puts `body` on the broker at `topic` as a foreign client would, with
    /// no CloudEvents attributes. Returns `false` if the transport cannot
    /// (the poison case is then skipped).
    fn publish_raw(
        &self,
        namespace: &str,
        topic: &str,
        body: Bytes,
    ) -> impl Future<Output = Result<bool, Error>> + Send {
        let _ = (namespace, topic, body);
        async { Ok(false) }
    }
}

/// How one case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// The transport's capabilities rule it out.
    Skipped(String),
    /// It failed, and why.
    Failed(String),
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case's name.
    pub name: &'static str,
    /// How it ended.
    pub outcome: Outcome,
}

/// The results of a suite run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The transport tested.
    pub transport: String,
    /// One result per case, in run order.
    pub results: Vec<CaseResult>,
}

impl Report {
    /// The names of the cases that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.with(|o| matches!(o, Outcome::Failed(_)))
    }

    /// The names of the cases that were skipped.
    pub fn skipped(&self) -> Vec<&'static str> {
        self.with(|o| matches!(o, Outcome::Skipped(_)))
    }

    /// The names of the cases that passed.
    pub fn passed(&self) -> Vec<&'static str> {
        self.with(|o| *o == Outcome::Passed)
    }

    fn with(&self, f: impl Fn(&Outcome) -> bool) -> Vec<&'static str> {
        self.results
            .iter()
            .filter(|r| f(&r.outcome))
            .map(|r| r.name)
            .collect()
    }

    /// Prints the report and panics if a case failed.
    ///
    /// # Panics
    ///
    /// If any case failed.
    pub fn assert_passed(&self) {
        println!("{self}");
        assert!(self.failed().is_empty(), "conformance failures:\n{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance suite on {}:", self.transport)?;
        for r in &self.results {
            match &r.outcome {
                Outcome::Passed => writeln!(f, "  passed   {}", r.name)?,
                Outcome::Skipped(why) => writeln!(f, "  skipped  {} ({why})", r.name)?,
                Outcome::Failed(why) => writeln!(f, "  FAILED   {}: {why}", r.name)?,
            }
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed().len(),
            self.failed().len(),
            self.skipped().len()
        )
    }
}

type CaseResultOf = Result<Outcome, String>;

/// Runs every case against `harness` and reports.
pub async fn run<H: Harness>(harness: H) -> Report {
    let h = Arc::new(harness);
    let mut results = Vec::new();
    macro_rules! case {
        ($name:ident) => {{
            let ns = namespace(stringify!($name));
            let outcome = match h.setup(&ns).await {
                Err(e) => Outcome::Failed(format!("setup failed: {e}")),
                Ok(()) => {
                    let outcome = match tokio::time::timeout(h.patience() * 4, $name(&*h, &ns)).await {
                        Ok(Ok(outcome)) => outcome,
                        Ok(Err(why)) => Outcome::Failed(why),
                        Err(_) => Outcome::Failed(format!("did not finish within {:?}", h.patience() * 4)),
                    };
                    if let Err(e) = h.teardown(&ns).await {
                        eprintln!("teardown of {ns} failed: {e}");
                    }
                    outcome
                }
            };
            results.push(CaseResult {
                name: stringify!($name),
                outcome,
            });
        }};
    }
    case!(round_trip);
    case!(ordered_100);
    case!(topic_isolation);
    case!(many_topics);
    case!(concurrent_publishers);
    case!(nack_redelivery);
    case!(unacked_survives_drop);
    case!(consumer_groups);
    case!(wildcards);
    case!(close_with_events_in_flight);
    case!(nack_with_delay);
    case!(replay);
    case!(poison);
    case!(topic_carried);
    case!(spans);
    Report {
        transport: h.name(),
        results,
    }
}

fn namespace(case: &str) -> String {
    unique(&format!("wtc_{case}"))
}

/// A name unique per process and call: `prefix`, `_`, 48 random bits drawn
/// once per process and a counter of the calls, all as lowercase hex.
///
/// The part after `prefix` has one width (until the counter passes 16^6),
/// so the name is one NATS subject token, a Redis key and a RabbitMQ queue
/// or exchange name when `prefix` is, and of two names with one prefix
/// neither starts with the other (a `SCAN MATCH name*` clean-up touches only
/// its own keys).
///
/// ```
/// # use watchtower::conformance::unique;
/// let a = unique("orders");
/// assert!(a.starts_with("orders_"));
/// assert_ne!(a, unique("orders"));
/// ```
pub fn unique(prefix: &str) -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU64;
    static PROCESS: OnceLock<String> = OnceLock::new();
    static CALLS: AtomicU64 = AtomicU64::new(0);
    // The random tail of a v7 UUID (its head is the clock): 48 random bits
    // tell this process's names from any other's.
    let process = PROCESS.get_or_init(|| uuid::Uuid::now_v7().simple().to_string()[20..].to_owned());
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{process}{call:06x}")
}

fn err(context: &str, e: impl fmt::Display) -> String {
    format!("{context}: {e}")
}

/// Subscribes and forwards every event the handler sees into a channel.
struct Collector {
    rx: mpsc::UnboundedReceiver<Event>,
    wait: Duration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<crate::ServeStats, Error>>,
}

impl Collector {
    async fn start<S: Subscriber + 'static>(
        subscriber: &S,
        options: SubscribeOptions,
        wait: Duration,
    ) -> Result<Collector, String> {
        Collector::spawn(subscriber, options, wait, None, None).await
    }

    /// A new subscriber of `h` and a collector of its subscription to
    /// `topic`; the subscriber is kept alive beside it.
    async fn on_topic<H: Harness>(
        h: &H,
        ns: &str,
        topic: &str,
    ) -> Result<(H::Subscriber, Collector), String> {
        let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
        let options = SubscribeOptions::new([topic]).map_err(|e| err("options", e))?;
        let collector = Collector::start(&subscriber, options, h.patience()).await?;
        Ok((subscriber, collector))
    }

    /// A collector; with a `gate`, it handles one event at a time and
    /// holds its first event until `gate` is notified (or `wait` passes);
    /// with `started`, it notifies `started` for every event it receives.
    async fn spawn<S: Subscriber + 'static>(
        subscriber: &S,
        options: SubscribeOptions,
        wait: Duration,
        gate: Option<Arc<tokio::sync::Notify>>,
        started: Option<Arc<tokio::sync::Notify>>,
    ) -> Result<Collector, String> {
        let subscription = subscriber.open(options).await.map_err(|e| err("open", e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let concurrency = if gate.is_some() {
            1
        } else {
            crate::serve::DEFAULT_CONCURRENCY
        };
        let gate = Arc::new(tokio::sync::Mutex::new(gate));
        let handler = service_fn(move |event: Event| {
            let (tx, gate, started) = (tx.clone(), gate.clone(), started.clone());
            async move {
                // Says it has an event before it waits, so that two
                // members gated on each other both go on.
                if let Some(started) = started {
                    started.notify_one();
                }
                if let Some(gate) = gate.lock().await.take() {
                    let _ = tokio::time::timeout(wait, gate.notified()).await;
                }
                tx.send(event).map_err(|_| Error::closed("collector closed"))
            }
        });
        let task = tokio::spawn(
            serve(subscription, handler)
                .concurrency(concurrency)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .into_future(),
        );
        Ok(Collector {
            rx,
            wait,
            stop: Some(stop),
            task,
        })
    }

    async fn take(&mut self, n: usize) -> Result<Vec<Event>, String> {
        let mut got = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + self.wait;
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => got.push(event),
                Ok(None) => return Err(format!("subscription ended after {} of {n} events", got.len())),
                Err(_) => {
                    return Err(format!(
                        "received {} of {n} events within {:?}",
                        got.len(),
                        self.wait
                    ));
                }
            }
        }
        Ok(got)
    }

    fn drain_now(&mut self) -> Vec<Event> {
        let mut got = Vec::new();
        while let Ok(event) = self.rx.try_recv() {
            got.push(event);
        }
        got
    }

    async fn stop(mut self) -> Result<crate::ServeStats, String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(stats) => stats.map_err(|e| err("serve", e)),
            Err(e) => Err(err("serve task", e)),
        }
    }
}

async fn publish_all<P>(publisher: &mut P, events: impl IntoIterator<Item = Event>) -> Result<(), String>
where
    P: Service<Event, Response = Receipt, Error = Error, Future: Send> + Send,
{
    for event in events {
        publisher.publish(event).await.map_err(|e| err("publish", e))?;
    }
    Ok(())
}

fn numbered(topic: &str, i: usize) -> Event {
    Event::new(topic.to_owned(), serde_json::json!({ "n": i }))
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id().to_owned()).collect()
}

fn same_set(got: &[Event], sent: &[Event]) -> Result<(), String> {
    let got_ids: HashSet<_> = got.iter().map(Event::id).collect();
    if got_ids.len() != got.len() {
        return Err(format!("{} duplicates received", got.len() - got_ids.len()));
    }
    let sent_ids: HashSet<_> = sent.iter().map(Event::id).collect();
    if got_ids != sent_ids {
        let missing = sent_ids.difference(&got_ids).count();
        let extra = got_ids.difference(&sent_ids).count();
        return Err(format!("{missing} events missing, {extra} unexpected"));
    }
    Ok(())
}

async fn round_trip<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let topic = format!("{ns}.round_trip");
    let mut collector = Collector::start(
        &subscriber,
        SubscribeOptions::new([&topic]).map_err(|e| err("options", e))?,
        h.patience(),
    )
    .await?;
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789)
        .map_err(|e| err("time", e))?;
    let json = Event::builder(topic.clone())
        .source("https://example.com/conformance")
        .subject("subject-1")
        .dataschema("https://example.com/schema.json")
        .time(time)
        .extension(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .extension("tenant", "acme")
        .extension("unicode", "héllo wörld ✓")
        .json(&serde_json::json!({"user_id": 123, "name": "Zoë", "tags": ["a", "b"]}))
        .map_err(|e| err("json", e))?
        .build()
        .map_err(|e| err("build", e))?;
    let binary = Event::builder(topic.clone())
        .data(
            "application/octet-stream",
            Bytes::from_static(b"\x00\x01\xfe\xffbinary"),
        )
        .build()
        .map_err(|e| err("build", e))?;
    let bare = Event::builder(topic.clone())
        .no_time()
        .build()
        .map_err(|e| err("build", e))?;
    let sent = vec![json, binary, bare];
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.clone()).await?;
    let mut got = collector.take(sent.len()).await?;
    collector.stop().await?;
    got.sort_by(|a, b| a.id().cmp(b.id()));
    let mut expected = sent;
    expected.sort_by(|a, b| a.id().cmp(b.id()));
    for (got, sent) in got.iter().zip(&expected) {
        if got != sent {
            return Err(format!("sent {sent:?}\nreceived {got:?}"));
        }
    }
    Ok(Outcome::Passed)
}

async fn ordered_100<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let topic = format!("{ns}.ordered");
    let mut collector = Collector::start(
        &subscriber,
        SubscribeOptions::new([&topic]).map_err(|e| err("options", e))?,
        h.patience(),
    )
    .await?;
    let sent: Vec<Event> = (0..100).map(|i| numbered(&topic, i)).collect();
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.clone()).await?;
    let got = collector.take(100).await?;
    collector.stop().await?;
    if h.capabilities().ordered {
        if ids(&got) != ids(&sent) {
            return Err("events arrived out of order".into());
        }
    } else {
        same_set(&got, &sent)?;
    }
    Ok(Outcome::Passed)
}

async fn topic_isolation<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let (a, b) = (format!("{ns}.a"), format!("{ns}.b"));
    let sub_a = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let sub_b = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let mut only_a = Collector::start(
        &sub_a,
        SubscribeOptions::new([&a]).map_err(|e| err("options", e))?,
        h.patience(),
    )
    .await?;
    let mut only_b = Collector::start(
        &sub_b,
        SubscribeOptions::new([&b]).map_err(|e| err("options", e))?,
        h.patience(),
    )
    .await?;
    let to_b: Vec<Event> = (0..10).map(|i| numbered(&b, i)).collect();
    let to_a: Vec<Event> = (0..10).map(|i| numbered(&a, i)).collect();
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, to_b.iter().cloned().chain(to_a.iter().cloned())).await?;
    let got_b = only_b.take(10).await?;
    let mut got_a = only_a.take(10).await?;
    got_a.extend(only_a.drain_now());
    only_a.stop().await?;
    let extra_b = only_b.drain_now();
    only_b.stop().await?;
    same_set(&got_a, &to_a).map_err(|e| format!("subscription to {a}: {e}"))?;
    let mut all_b = got_b;
    all_b.extend(extra_b);
    same_set(&all_b, &to_b).map_err(|e| format!("subscription to {b}: {e}"))?;
    Ok(Outcome::Passed)
}

async fn many_topics<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let topics: Vec<String> = (0..20).map(|t| format!("{ns}.t{t}")).collect();
    let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let mut collector = Collector::start(
        &subscriber,
        SubscribeOptions::new(&topics).map_err(|e| err("options", e))?,
        h.patience(),
    )
    .await?;
    let publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    let mut tasks = Vec::new();
    let mut sent = Vec::new();
    for topic in &topics {
        let events: Vec<Event> = (0..100).map(|i| numbered(topic, i)).collect();
        sent.extend(events.iter().cloned());
        let mut publisher = publisher.clone();
        tasks.push(tokio::spawn(
            async move { publish_all(&mut publisher, events).await },
        ));
    }
    for task in tasks {
        task.await.map_err(|e| err("publish task", e))??;
    }
    let mut got = collector.take(sent.len()).await?;
    got.extend(collector.drain_now());
    collector.stop().await?;
    same_set(&got, &sent)?;
    let mut per_topic: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &got {
        *per_topic.entry(event.ty()).or_default() += 1;
    }
    if per_topic.len() != 20 || per_topic.values().any(|&n| n != 100) {
        return Err(format!("per-topic counts wrong: {per_topic:?}"));
    }
    Ok(Outcome::Passed)
}

async fn concurrent_publishers<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let topic = format!("{ns}.concurrent");
    let (_subscriber, mut collector) = Collector::on_topic(h, ns, &topic).await?;
    let publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    let mut tasks = Vec::new();
    let mut sent = Vec::new();
    for p in 0..50 {
        let events: Vec<Event> = (0..100).map(|i| numbered(&topic, p * 100 + i)).collect();
        sent.extend(events.iter().cloned());
        let mut publisher = publisher.clone();
        tasks.push(tokio::spawn(
            async move { publish_all(&mut publisher, events).await },
        ));
    }
    for task in tasks {
        task.await.map_err(|e| err("publish task", e))??;
    }
    let mut got = collector.take(sent.len()).await?;
    got.extend(collector.drain_now());
    collector.stop().await?;
    if got.len() != 5000 {
        return Err(format!("received {} events, expected 5000", got.len()));
    }
    same_set(&got, &sent)?;
    Ok(Outcome::Passed)
}

async fn nack_redelivery<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    if !h.capabilities().redelivery {
        return Ok(Outcome::Skipped("transport does not redeliver".into()));
    }
    nack_then_ack(h, ns, "nack", 2, None).await
}

/// Publishes one event, nacks it `nacks` times (after `delay`), acks the
/// last delivery, and checks the delivery counts rose 1, 2, 3, ...
async fn nack_then_ack<H: Harness>(
    h: &H,
    ns: &str,
    name: &str,
    nacks: u32,
    delay: Option<Duration>,
) -> CaseResultOf {
    let topic = format!("{ns}.{name}");
    let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let mut options = SubscribeOptions::new([&topic]).map_err(|e| err("options", e))?;
    if h.capabilities().consumer_groups {
        options = options.group(name).map_err(|e| err("group", e))?;
    }
    let mut subscription = subscriber.open(options).await.map_err(|e| err("open", e))?;
    let sent = numbered(&topic, 1);
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, [sent.clone()]).await?;
    let mut counts = Vec::new();
    for round in 0..=nacks {
        let delivery = next_delivery(&mut subscription, h.patience(), &sent, "delivery").await?;
        counts.push(delivery.delivery_count());
        if round < nacks {
            delivery.nack(delay).await.map_err(|e| err("nack", e))?;
        } else {
            delivery.ack().await.map_err(|e| err("ack", e))?;
        }
    }
    let expected: Vec<u32> = (1..=nacks + 1).collect();
    if counts != expected {
        return Err(format!("delivery counts {counts:?}, expected {expected:?}"));
    }
    Ok(Outcome::Passed)
}

/// The next delivery from `subscription`, which must carry `expected`.
async fn next_delivery<St, A>(
    subscription: &mut St,
    patience: Duration,
    expected: &Event,
    what: &str,
) -> Result<crate::Delivery<A>, String>
where
    St: futures_core::Stream<Item = Result<crate::Delivery<A>, Error>> + Unpin,
    A: crate::Acker,
{
    let delivery = match tokio::time::timeout(patience, subscription.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => return Err(err(what, e)),
        Ok(None) => return Err(format!("{what}: subscription ended")),
        Err(_) => return Err(format!("{what} did not arrive within {patience:?}")),
    };
    if delivery.event() != Some(expected) {
        return Err(format!("{what}: unexpected {delivery:?}"));
    }
    Ok(delivery)
}

async fn unacked_survives_drop<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let caps = h.capabilities();
    if !(caps.persistent && caps.consumer_groups) {
        return Ok(Outcome::Skipped(
            "transport is not persistent with consumer groups".into(),
        ));
    }
    let topic = format!("{ns}.survive");
    let options = SubscribeOptions::new([&topic])
        .and_then(|o| o.group("survivors"))
        .map_err(|e| err("options", e))?;
    let first = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let mut subscription = first.open(options.clone()).await.map_err(|e| err("open", e))?;
    let sent = numbered(&topic, 1);
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, [sent.clone()]).await?;
    let delivery = next_delivery(&mut subscription, h.patience(), &sent, "first delivery").await?;
    // The consumer goes away without settling: subscription and delivery.
    drop(subscription);
    drop(delivery);
    drop(first);
    let second = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let mut subscription = second.open(options).await.map_err(|e| err("open", e))?;
    let delivery = next_delivery(&mut subscription, h.patience(), &sent, "redelivery to the group").await?;
    if delivery.delivery_count() < 2 {
        return Err(format!(
            "delivery count {} after a redelivery",
            delivery.delivery_count()
        ));
    }
    delivery.ack().await.map_err(|e| err("ack", e))?;
    Ok(Outcome::Passed)
}

async fn consumer_groups<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    if !h.capabilities().consumer_groups {
        return Ok(Outcome::Skipped("transport has no consumer groups".into()));
    }
    let topic = format!("{ns}.groups");
    let group = |name: &str| {
        SubscribeOptions::new([&topic])
            .and_then(|o| o.group(name))
            .map_err(|e| err("options", e))
    };
    let (s1, s2, s3) = (
        h.subscriber(ns).await.map_err(|e| err("subscriber", e))?,
        h.subscriber(ns).await.map_err(|e| err("subscriber", e))?,
        h.subscriber(ns).await.map_err(|e| err("subscriber", e))?,
    );
    // Each member handles one event at a time and holds its first event
    // until the other member has received one, so the test does not depend
    // on which member the scheduler lets poll first: whichever gets the
    // first event stops pulling, and the rest can only go to the other.
    let (first_started, second_started) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let mut a1 = Collector::spawn(
        &s1,
        group("alpha")?,
        h.patience(),
        Some(second_started.clone()),
        Some(first_started.clone()),
    )
    .await?;
    let mut a2 = Collector::spawn(
        &s2,
        group("alpha")?,
        h.patience(),
        Some(first_started),
        Some(second_started),
    )
    .await?;
    let mut b = Collector::start(&s3, group("beta")?, h.patience()).await?;
    let sent: Vec<Event> = (0..100).map(|i| numbered(&topic, i)).collect();
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.clone()).await?;
    let got_b = b.take(100).await?;
    same_set(&got_b, &sent).map_err(|e| format!("group beta: {e}"))?;
    // Members of alpha together receive the 100 events, each once.
    let mut got_a = Vec::new();
    let deadline = tokio::time::Instant::now() + h.patience();
    let (mut n1, mut n2) = (0, 0);
    while got_a.len() < 100 {
        tokio::select! {
            Some(e) = a1.rx.recv() => { n1 += 1; got_a.push(e) }
            Some(e) = a2.rx.recv() => { n2 += 1; got_a.push(e) }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!("group alpha received {} of 100 events", got_a.len()));
            }
        }
    }
    got_a.extend(a1.drain_now());
    got_a.extend(a2.drain_now());
    for c in [a1, a2, b] {
        c.stop().await?;
    }
    same_set(&got_a, &sent).map_err(|e| format!("group alpha: {e}"))?;
    if n1 == 0 || n2 == 0 {
        return Err(format!(
            "group alpha's members did not share the work ({n1} and {n2})"
        ));
    }
    Ok(Outcome::Passed)
}

async fn wildcards<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    if !h.capabilities().wildcards {
        return Ok(Outcome::Skipped("transport has no wildcard subscriptions".into()));
    }
    let (s1, s2) = (
        h.subscriber(ns).await.map_err(|e| err("subscriber", e))?,
        h.subscriber(ns).await.map_err(|e| err("subscriber", e))?,
    );
    let options = SubscribeOptions::new([format!("{ns}.user.*"), format!("{ns}.order.>")])
        .map_err(|e| err("options", e))?;
    let mut wild = Collector::start(&s1, options, h.patience()).await?;
    let all = SubscribeOptions::new([format!("{ns}.>")]).map_err(|e| err("options", e))?;
    let mut everything = Collector::start(&s2, all, h.patience()).await?;
    let topics = [
        "user.created",
        "user.profile.updated",
        "order.a",
        "order.a.b",
        "order",
        "other",
    ];
    let matching = ["user.created", "order.a", "order.a.b"];
    let sent: Vec<Event> = topics
        .iter()
        .map(|t| Event::new(format!("{ns}.{t}"), serde_json::json!({})))
        .collect();
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.clone()).await?;
    let got_all = everything.take(sent.len()).await?;
    same_set(&got_all, &sent).map_err(|e| format!("subscription to {ns}.>: {e}"))?;
    let mut got = wild.take(matching.len()).await?;
    got.extend(wild.drain_now());
    wild.stop().await?;
    everything.stop().await?;
    let expected: Vec<Event> = sent
        .iter()
        .filter(|e| matching.iter().any(|m| e.ty() == format!("{ns}.{m}")))
        .cloned()
        .collect();
    same_set(&got, &expected).map_err(|e| format!("wildcard subscription: {e}"))?;
    Ok(Outcome::Passed)
}

async fn close_with_events_in_flight<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let caps = h.capabilities();
    if !(caps.persistent && caps.consumer_groups) {
        return Ok(Outcome::Skipped(
            "transport is not persistent with consumer groups".into(),
        ));
    }
    let topic = format!("{ns}.inflight");
    let options = SubscribeOptions::new([&topic])
        .and_then(|o| o.group("workers"))
        .map_err(|e| err("options", e))?;
    let sent: Vec<Event> = (0..50).map(|i| numbered(&topic, i)).collect();
    let first = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let subscription = first.open(options.clone()).await.map_err(|e| err("open", e))?;
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.clone()).await?;

    // The first consumer handles 20 events, then hangs on the rest, and is
    // shut down with events in flight.
    let handled = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Event>();
    let (hung_tx, mut hung_rx) = mpsc::unbounded_channel::<()>();
    let counter = handled.clone();
    let handler = service_fn(move |event: Event| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let (done_tx, hung_tx) = (done_tx.clone(), hung_tx.clone());
        async move {
            if n < 20 {
                let _ = done_tx.send(event);
                Ok(())
            } else {
                let _ = hung_tx.send(());
                std::future::pending::<Result<(), Error>>().await
            }
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first_run = tokio::spawn(
        serve(subscription, handler)
            .concurrency(8)
            .shutdown_timeout(Duration::from_millis(200))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let mut acked_first = Vec::new();
    while acked_first.len() < 20 {
        match tokio::time::timeout(h.patience(), done_rx.recv()).await {
            Ok(Some(e)) => acked_first.push(e),
            _ => return Err(format!("first consumer handled {} of 20", acked_first.len())),
        }
    }
    if tokio::time::timeout(h.patience(), hung_rx.recv()).await.is_err() {
        return Err("no event was in flight at shutdown".into());
    }
    let _ = stop.send(());
    let stats = first_run
        .await
        .map_err(|e| err("first run", e))?
        .map_err(|e| err("first run", e))?;
    if stats.acked != 20 || stats.in_flight == 0 {
        return Err(format!("first run: {stats}"));
    }
    drop(first);

    // A new member of the group gets the other 30 — and nothing already acked.
    let second = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let mut collector = Collector::start(&second, options, h.patience()).await?;
    let mut got = collector.take(30).await?;
    got.extend(collector.drain_now());
    collector.stop().await?;
    let mut all = acked_first;
    all.extend(got);
    same_set(&all, &sent)?;
    Ok(Outcome::Passed)
}

async fn nack_with_delay<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    if !h.capabilities().nack_delay {
        return Ok(Outcome::Skipped("transport does not delay nacks".into()));
    }
    nack_then_ack(h, ns, "delayed", 1, Some(Duration::from_millis(200))).await
}

async fn replay<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    if !h.capabilities().replay {
        return Ok(Outcome::Skipped("transport cannot replay earlier events".into()));
    }
    let topic = format!("{ns}.history");
    let sent: Vec<Event> = (0..10).map(|i| numbered(&topic, i)).collect();
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.clone()).await?;
    let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let options = SubscribeOptions::new([&topic])
        .map_err(|e| err("options", e))?
        .replay(true);
    let mut collector = Collector::start(&subscriber, options, h.patience()).await?;
    let mut got = collector.take(sent.len()).await?;
    got.extend(collector.drain_now());
    collector.stop().await?;
    if ids(&got) != ids(&sent) {
        return Err("replayed events are not the published ones, in order".into());
    }
    Ok(Outcome::Passed)
}

async fn poison<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let topic = format!("{ns}.poison");
    let subscriber = h.subscriber(ns).await.map_err(|e| err("subscriber", e))?;
    let subscription = subscriber
        .open(SubscribeOptions::new([&topic]).map_err(|e| err("options", e))?)
        .await
        .map_err(|e| err("open", e))?;
    let garbage = Bytes::from_static(b"\xff\x00 this is not a CloudEvent {");
    if !h
        .publish_raw(ns, &topic, garbage.clone())
        .await
        .map_err(|e| err("publish_raw", e))?
    {
        return Ok(Outcome::Skipped("harness cannot publish raw bytes".into()));
    }
    let good = numbered(&topic, 1);
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, [good.clone()]).await?;
    let dlq = MemoryDeadLetters::new(16);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = service_fn(move |event: Event| {
        let sent = tx.send(event);
        async move { sent.map_err(|_| Error::closed("closed")) }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        serve(subscription, handler)
            .poison(dlq.clone())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let received = tokio::time::timeout(h.patience(), rx.recv()).await;
    if tokio::time::timeout(h.patience(), dlq.wait_for(1)).await.is_err() {
        return Err("the poison message did not reach the poison path".into());
    }
    let _ = stop.send(());
    let stats = run
        .await
        .map_err(|e| err("serve", e))?
        .map_err(|e| err("serve", e))?;
    match received {
        Ok(Some(event)) if event == good => {}
        other => {
            return Err(format!(
                "the consumer did not go on after the poison message: {other:?}"
            ));
        }
    }
    let dead = dlq.drain();
    if dead.len() != 1 || dead[0].data().map(|d| &d[..]) != Some(&garbage[..]) {
        return Err(format!("poison path holds {dead:?}"));
    }
    if stats.poisoned != 1 || stats.acked != 1 {
        return Err(format!("stats: {stats}"));
    }
    Ok(Outcome::Passed)
}

async fn topic_carried<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    let topic = format!("{ns}.routed");
    let (_subscriber, mut collector) = Collector::on_topic(h, ns, &topic).await?;
    let sent: Vec<Event> = (0..3)
        .map(|i| Event::new(format!("{ns}.kind{i}"), serde_json::json!({ "n": i })).with_topic(topic.clone()))
        .collect();
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.iter().cloned()).await?;
    let got = collector.take(sent.len()).await?;
    collector.stop().await?;
    same_set(&got, &sent)?;
    for event in &got {
        if event.topic() != topic {
            return Err(format!(
                "event {} of type {} arrived with topic {:?}, published to {topic:?}",
                event.id(),
                event.ty(),
                event.topic()
            ));
        }
    }
    Ok(Outcome::Passed)
}

async fn spans<H: Harness>(h: &H, ns: &str) -> CaseResultOf {
    if !spans::install() {
        return Err("a global tracing subscriber was installed before the suite's span recorder".into());
    }
    let topic = format!("{ns}.traced");
    let (_subscriber, mut collector) = Collector::on_topic(h, ns, &topic).await?;
    let sent: Vec<Event> = (0..3).map(|i| numbered(&topic, i)).collect();
    spans::watch(sent.iter().map(Event::id));
    let mut publisher = h.publisher(ns).await.map_err(|e| err("publisher", e))?;
    publish_all(&mut publisher, sent.iter().cloned()).await?;
    let got = collector.take(sent.len()).await?;
    collector.stop().await?;
    same_set(&got, &sent)?;
    for event in &sent {
        let recorded = spans::take(event.id());
        for (name, operation) in [("publish", "send"), ("process", "process")] {
            let found: Vec<_> = recorded.iter().filter(|r| r.name == name).collect();
            let [span] = found.as_slice() else {
                return Err(format!(
                    "event {}: {} {name} spans, expected exactly one (recorded: {recorded:?})",
                    event.id(),
                    found.len()
                ));
            };
            let expected = spans::Recorded {
                name,
                system: h.system().to_owned(),
                destination: topic.clone(),
                operation: operation.to_owned(),
                message_id: event.id().to_owned(),
            };
            if **span != expected {
                return Err(format!("{name} span {span:?}, expected {expected:?}"));
            }
        }
    }
    Ok(Outcome::Passed)
}
