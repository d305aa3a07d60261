//! Replaying dead letters.

use std::future::poll_fn;

use tower::Service;
use watchtower::dead_letter::MemoryDeadLetters;
use watchtower::ext;
use watchtower::{BoxError, Error, Event};

/// What a redrive did.
#[derive(Debug, Default)]
pub struct RedriveReport {
    /// Events the service accepted.
    pub redriven: usize,
    /// Events it did not, as they were in the dead-letter queue, with the
    /// error; put them back or look at them.
    pub failed: Vec<(Event, Error)>,
}

/// Strips the dead-letter annotations from an event and restores its
/// original topic, ready to be published again.
pub fn restore(mut event: Event) -> Event {
    if let Some(topic) = event.remove_extension(ext::DEAD_LETTER_TOPIC) {
        event.set_topic(topic);
    }
    for name in [
        ext::DEAD_LETTER_REASON,
        ext::DEAD_LETTER_KIND,
        ext::DEAD_LETTER_TIME,
        ext::ATTEMPT,
    ] {
        event.remove_extension(name);
    }
    event
}

/// Publishes `events` into `service` one at a time, each
/// [restored](restore) first, and reports which it refused.
///
/// ```
/// use watchtower::dead_letter::MemoryDeadLetters;
/// use watchtower::Event;
/// use watchtower_layers::dead_letter::redrive;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let target = MemoryDeadLetters::new(10); // any Service<Event>
/// let dead = Event::empty("order.placed").with_extension("deadletterkind", "timeout").unwrap();
/// let report = redrive(vec![dead], &mut target.clone()).await;
/// assert_eq!(report.redriven, 1);
/// assert_eq!(target.drain()[0].extension("deadletterkind"), None);
/// # }
/// ```
pub async fn redrive<S>(events: impl IntoIterator<Item = Event>, service: &mut S) -> RedriveReport
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
{
    let mut report = RedriveReport::default();
    for event in events {
        let result = match poll_fn(|cx| service.poll_ready(cx)).await {
            Ok(()) => service.call(restore(event.clone())).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => report.redriven += 1,
            Err(e) => {
                let mut err = Error::from_boxed(e.into());
                err.take_event();
                report.failed.push((event, err));
            }
        }
    }
    report
}

/// Drains `dlq` into `service` with [`redrive`]. Events the service
/// refuses are listed in the report and put back into `dlq`, as far as it
/// has room (the report then holds the only copy of the rest).
pub async fn redrive_memory<S>(dlq: &MemoryDeadLetters, service: &mut S) -> RedriveReport
where
    S: Service<Event>,
    S::Error: Into<BoxError>,
{
    let report = redrive(dlq.drain(), service).await;
    for (event, _) in &report.failed {
        let _ = dlq.push(event.clone());
    }
    report
}
