//! A stream of publishes with a fault injected part-way: the loop every
//! kill-a-node test runs, written once.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::{Service, ServiceExt as _};
use watchtower::{Event, Receipt};
use watchtower_layers::dead_letter::Outcome;
use watchtower_layers::retry::RetryConfig;

use crate::PATIENCE;

/// Retries for a stack under faults: up to 1,000 attempts, 20 ms to
/// 500 ms apart, for at most `max_elapsed`, so that a call outlives the
/// fault (a failover, a reconnection) or ends dead-lettered.
pub fn patient_retries(max_elapsed: Duration) -> RetryConfig {
    RetryConfig::new()
        .max_attempts(1_000)
        .delays(Duration::from_millis(20), Duration::from_millis(500))
        .max_elapsed(max_elapsed)
}

/// What [`publish_through_faults`] saw.
#[derive(Debug)]
pub struct FaultRun {
    /// The receipts of the calls that ended delivered.
    pub delivered: Vec<Receipt>,
    /// How many calls ended dead-lettered.
    pub dead: usize,
    /// From the first call to the last answer.
    pub published_in: Duration,
    /// The longest time no call ended (the time a fault took excluded).
    pub longest_stall: Duration,
    /// From the first fault to the first delivery of a call made after it.
    pub recovered_in: Option<Duration>,
}

impl FaultRun {
    /// The ids of the delivered events.
    pub fn delivered_ids(&self) -> HashSet<String> {
        self.delivered.iter().map(|r| r.event_id.to_string()).collect()
    }

    /// Checks what a consumer saw (`seen`: how many times each event id
    /// was consumed) against what was `sent`: every delivered event
    /// consumed, none that nobody sent. Returns how many were consumed
    /// more than once.
    ///
    /// # Panics
    ///
    /// If a delivered event was not consumed, or one nobody sent was.
    pub fn check_consumed(&self, sent: &[Event], seen: &HashMap<String, u32>) -> usize {
        for receipt in &self.delivered {
            assert!(
                seen.contains_key(&*receipt.event_id),
                "delivered event {} was not consumed",
                receipt.event_id
            );
        }
        let all: HashSet<&str> = sent.iter().map(Event::id).collect();
        assert!(
            seen.keys().all(|id| all.contains(id.as_str())),
            "an event nobody sent"
        );
        seen.values().filter(|&&n| n > 1).count()
    }
}

/// Publishes `events` through `publisher` (a stack ending in a
/// dead-letter layer, so that every call ends delivered or
/// dead-lettered), `concurrency` calls at once. After each call ends,
/// `fault` is given the number of calls ended so far; it kills, stops or
/// restarts what it likes, and says whether it did.
///
/// # Panics
///
/// If a call fails (nothing may reach the caller through a dead-letter
/// layer), or no call ends within [`PATIENCE`].
pub async fn publish_through_faults<S>(
    publisher: S,
    events: impl IntoIterator<Item = Event>,
    concurrency: usize,
    mut fault: impl AsyncFnMut(usize) -> bool,
) -> FaultRun
where
    S: Service<Event, Response = Outcome<Receipt>> + Clone,
    S::Error: fmt::Debug,
{
    let started = Instant::now();
    let mut calls = FuturesUnordered::new();
    let mut pending = events.into_iter();
    let mut run = FaultRun {
        delivered: Vec::new(),
        dead: 0,
        published_in: Duration::ZERO,
        longest_stall: Duration::ZERO,
        recovered_in: None,
    };
    let (mut done, mut last, mut faulted_at) = (0usize, Instant::now(), None::<Instant>);
    loop {
        while calls.len() < concurrency {
            let Some(event) = pending.next() else { break };
            let (call, called_at) = (publisher.clone().oneshot(event), Instant::now());
            calls.push(async move { (called_at, call.await) });
        }
        let next = tokio::time::timeout(PATIENCE, calls.next()).await;
        let Some((called_at, result)) = next.unwrap_or_else(|_| {
            panic!(
                "no publish ended within {PATIENCE:?}: {done} ended, {} in flight, the first fault {:?} ago",
                calls.len(),
                faulted_at.map(|at| at.elapsed())
            )
        }) else {
            break;
        };
        run.longest_stall = run.longest_stall.max(last.elapsed());
        match result.expect("nothing reaches the caller: delivered or dead-lettered") {
            Outcome::Delivered(receipt) => {
                if let (Some(at), None) = (faulted_at, run.recovered_in)
                    && called_at > at
                {
                    run.recovered_in = Some(at.elapsed());
                }
                run.delivered.push(receipt);
            }
            Outcome::DeadLettered(_) => run.dead += 1,
        }
        done += 1;
        if fault(done).await && faulted_at.is_none() {
            faulted_at = Some(Instant::now());
        }
        last = Instant::now();
    }
    run.published_in = started.elapsed();
    run
}
