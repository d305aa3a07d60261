//! A process-wide recorder of the publish and process spans, for the
//! conformance case that checks every transport traces the same way.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event as TraceEvent, Metadata};

/// One recorded span: its name and messaging attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Recorded {
    pub(super) name: &'static str,
    pub(super) system: String,
    pub(super) destination: String,
    pub(super) operation: String,
    pub(super) message_id: String,
}

#[derive(Default)]
struct State {
    watched: HashSet<String>,
    recorded: Vec<Recorded>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();
static INSTALLED: OnceLock<bool> = OnceLock::new();

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Installs the recorder as the process's global subscriber, once. `false`
/// if another global subscriber was installed first.
pub(super) fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        tracing::subscriber::set_global_default(Recorder {
            next: AtomicU64::new(1),
        })
        .is_ok()
    })
}

/// Records spans of messages with these ids from now on.
pub(super) fn watch<'a>(ids: impl IntoIterator<Item = &'a str>) {
    state().watched.extend(ids.into_iter().map(str::to_owned));
}

/// The spans recorded for message `id`, forgetting them and the id.
pub(super) fn take(id: &str) -> Vec<Recorded> {
    let mut state = state();
    state.watched.remove(id);
    let (mine, rest) = std::mem::take(&mut state.recorded)
        .into_iter()
        .partition(|r| r.message_id == id);
    state.recorded = rest;
    mine
}

struct Recorder {
    next: AtomicU64,
}

impl Visit for Recorded {
    fn record_str(&mut self, field: &Field, value: &str) {
        let slot = match field.name() {
            "messaging.system" => &mut self.system,
            "messaging.destination.name" => &mut self.destination,
            "messaging.operation.type" => &mut self.operation,
            "messaging.message.id" => &mut self.message_id,
            _ => return,
        };
        value.clone_into(slot);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name().starts_with("messaging.") {
            let text = format!("{value:?}");
            self.record_str(field, text.trim_matches('"'));
        }
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let name = attrs.metadata().name();
        if name == "publish" || name == "process" {
            let mut span = Recorded {
                name,
                ..Recorded::default()
            };
            attrs.record(&mut span);
            let mut state = state();
            if state.watched.contains(&span.message_id) {
                state.recorded.push(span);
            }
        }
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &TraceEvent<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}
