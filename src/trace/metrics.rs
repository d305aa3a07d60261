//! The messaging metrics, through the `metrics` facade.
//!
//! Handles are registered once per thread, recorder, system and
//! destination, and kept in a small thread-local table: a publish looks its
//! handles up by the destination's name and never builds a metric key. A
//! recorder installed later (or a thread-local one, as tests use) is a
//! different recorder, so the table registers new handles for it.
//!
//! With no recorder installed (the facade answers with its `NoopRecorder`)
//! nothing is looked up, counted or timed: no table, no clock read. The
//! facade does not say whether a recorder is installed; a recorder of zero
//! size is taken for none, as only a recorder without state can be one.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Label, Unit};

use super::Settlement;

const SYSTEM: &str = "messaging.system";
const DESTINATION: &str = "messaging.destination.name";
const OPERATION: &str = "messaging.operation.name";
const ERROR_TYPE: &str = "error.type";

const SENT: &str = "messaging.client.sent.messages";
const OPERATION_DURATION: &str = "messaging.client.operation.duration";
const CONSUMED: &str = "messaging.client.consumed.messages";
const PROCESS_DURATION: &str = "messaging.process.duration";

/// Destinations remembered per thread; beyond them the oldest is
/// forgotten (and registered again when it comes back).
const REMEMBERED: usize = 64;

/// Identifies the recorder in use on this thread (its address), or `None`
/// when there is none: the facade's `NoopRecorder`, which has no state
/// and so no size.
fn recorder_id() -> Option<usize> {
    metrics::with_recorder(|recorder| {
        (std::mem::size_of_val(recorder) != 0).then(|| std::ptr::from_ref(recorder).cast::<()>() as usize)
    })
}

fn labels(system: &'static str, destination: &Arc<str>) -> [Label; 2] {
    [
        Label::new(SYSTEM, system),
        Label::new(DESTINATION, Arc::clone(destination)),
    ]
}

struct Entry<T> {
    recorder: usize,
    system: &'static str,
    destination: Arc<str>,
    instruments: Arc<T>,
}

struct Table<T>(Vec<Entry<T>>);

impl<T> Table<T> {
    const fn new() -> Self {
        Table(Vec::new())
    }

    fn get(
        &mut self,
        recorder: usize,
        system: &'static str,
        destination: &Arc<str>,
        register: impl FnOnce(&'static str, &Arc<str>) -> T,
    ) -> Arc<T> {
        let found = self.0.iter().rev().find(|e| {
            e.recorder == recorder
                && std::ptr::eq(e.system, system)
                && (Arc::ptr_eq(&e.destination, destination) || *e.destination == **destination)
        });
        if let Some(entry) = found {
            return Arc::clone(&entry.instruments);
        }
        if self.0.len() >= REMEMBERED {
            self.0.remove(0);
        }
        let instruments = Arc::new(register(system, destination));
        self.0.push(Entry {
            recorder,
            system,
            destination: Arc::clone(destination),
            instruments: Arc::clone(&instruments),
        });
        instruments
    }
}

struct PublishInstruments {
    system: &'static str,
    destination: Arc<str>,
    sent: Counter,
    duration: Histogram,
}

thread_local! {
    static PUBLISH: RefCell<Table<PublishInstruments>> = const { RefCell::new(Table::new()) };
    static CONSUME: RefCell<Table<ConsumerInstruments>> = const { RefCell::new(Table::new()) };
}

fn describe() {
    metrics::describe_counter!(SENT, "Messages a publisher sent (or failed to send)");
    metrics::describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Duration of a publish, until the broker's answer"
    );
    metrics::describe_counter!(CONSUMED, "Messages a consumer received");
    metrics::describe_histogram!(PROCESS_DURATION, Unit::Seconds, "Duration of a handler call");
}

/// The metrics of one publish: its destination's handles and its start;
/// nothing when no recorder is installed.
pub(crate) struct PublishMeter(Option<(Arc<PublishInstruments>, Instant)>);

impl std::fmt::Debug for PublishMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishMeter").finish_non_exhaustive()
    }
}

impl PublishMeter {
    pub(crate) fn start(system: &'static str, destination: &Arc<str>) -> Self {
        let Some(recorder) = recorder_id() else {
            return PublishMeter(None);
        };
        let instruments = PUBLISH.with_borrow_mut(|table| {
            table.get(recorder, system, destination, |system, destination| {
                describe();
                let [s, d] = labels(system, destination);
                let op = Label::from_static_parts(OPERATION, "publish");
                let labels = vec![s, d, op];
                PublishInstruments {
                    system,
                    destination: Arc::clone(destination),
                    sent: metrics::counter!(SENT, labels.clone()),
                    duration: metrics::histogram!(OPERATION_DURATION, labels.clone()),
                }
            })
        });
        PublishMeter(Some((instruments, Instant::now())))
    }

    pub(crate) fn finish(self, failure: Option<&'static str>) {
        let Some((i, started)) = self.0 else {
            return;
        };
        let elapsed = started.elapsed();
        match failure {
            None => {
                i.sent.increment(1);
                i.duration.record(elapsed.as_secs_f64());
            }
            Some(kind) => {
                // Failures are rare: their series are looked up per call.
                let [s, d] = labels(i.system, &i.destination);
                let labels = vec![
                    s,
                    d,
                    Label::from_static_parts(OPERATION, "publish"),
                    Label::new(ERROR_TYPE, kind),
                ];
                metrics::counter!(SENT, labels.clone()).increment(1);
                metrics::histogram!(OPERATION_DURATION, labels.clone()).record(elapsed.as_secs_f64());
            }
        }
    }
}

/// The consumer runtime's handles for one destination.
pub(crate) struct ConsumerInstruments {
    system: &'static str,
    destination: Arc<str>,
    consumed: Counter,
    duration: Histogram,
    acks: Counter,
    nacks: Counter,
    rejects: Counter,
    dead_letters: Counter,
    redeliveries: Counter,
    poison: Counter,
    in_flight: Gauge,
}

/// The metrics of one delivery in the consumer runtime; in flight until
/// dropped. Nothing when no recorder is installed.
pub(crate) struct ConsumerMeter(Option<(Arc<ConsumerInstruments>, Instant)>);

impl std::fmt::Debug for ConsumerMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerMeter").finish_non_exhaustive()
    }
}

impl ConsumerMeter {
    /// Counts a delivery taken from a subscription, now in flight.
    pub(crate) fn received(system: &'static str, destination: &Arc<str>, delivery_count: u32) -> Self {
        let Some(recorder) = recorder_id() else {
            return ConsumerMeter(None);
        };
        let instruments = CONSUME.with_borrow_mut(|table| {
            table.get(recorder, system, destination, |system, destination| {
                describe();
                let [s, d] = labels(system, destination);
                let base = vec![s, d];
                let with_op = {
                    let mut l = base.clone();
                    l.push(Label::from_static_parts(OPERATION, "process"));
                    l
                };
                ConsumerInstruments {
                    system,
                    destination: Arc::clone(destination),
                    consumed: metrics::counter!(CONSUMED, with_op.clone()),
                    duration: metrics::histogram!(PROCESS_DURATION, base.clone()),
                    acks: metrics::counter!("watchtower.consumer.acks", base.clone()),
                    nacks: metrics::counter!("watchtower.consumer.nacks", base.clone()),
                    rejects: metrics::counter!("watchtower.consumer.rejects", base.clone()),
                    dead_letters: metrics::counter!("watchtower.consumer.dead_letters", base.clone()),
                    redeliveries: metrics::counter!("watchtower.consumer.redeliveries", base.clone()),
                    poison: metrics::counter!("watchtower.consumer.poison", base.clone()),
                    in_flight: metrics::gauge!("watchtower.consumer.in_flight", base.clone()),
                }
            })
        });
        instruments.consumed.increment(1);
        if delivery_count > 1 {
            instruments.redeliveries.increment(1);
        }
        instruments.in_flight.increment(1.0);
        ConsumerMeter(Some((instruments, Instant::now())))
    }

    /// The delivery did not decode.
    pub(crate) fn poison(&self) {
        if let Some((i, _)) = &self.0 {
            i.poison.increment(1);
        }
    }

    /// The handler finished, with an error of this kind or none.
    pub(crate) fn processed(&self, failure: Option<&'static str>) {
        let Some((i, started)) = &self.0 else {
            return;
        };
        let elapsed = started.elapsed();
        match failure {
            None => i.duration.record(elapsed.as_secs_f64()),
            Some(kind) => {
                let [s, d] = labels(i.system, &i.destination);
                let labels = vec![s, d, Label::new(ERROR_TYPE, kind)];
                metrics::histogram!(PROCESS_DURATION, labels.clone()).record(elapsed.as_secs_f64());
            }
        }
    }

    /// The delivery was settled so.
    pub(crate) fn settled(&self, settlement: Settlement) {
        let Some((i, _)) = &self.0 else {
            return;
        };
        match settlement {
            Settlement::Ack => i.acks.increment(1),
            Settlement::Nack => i.nacks.increment(1),
            Settlement::Reject => i.rejects.increment(1),
            Settlement::DeadLetter => {
                i.dead_letters.increment(1);
                i.rejects.increment(1);
            }
        }
    }
}

impl Drop for ConsumerMeter {
    /// The delivery is no longer in flight: settled, or abandoned at the
    /// shutdown deadline.
    fn drop(&mut self) {
        if let Some((i, _)) = &self.0 {
            i.in_flight.decrement(1.0);
        }
    }
}
