//! Sliding windows of call outcomes: the last N calls, or the calls of the
//! last period split into buckets.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Aggregated outcomes in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        self.calls += 1;
        self.failures += u32::from(o.failure);
        self.slow += u32::from(o.slow);
    }

    fn sub(&mut self, other: Counts) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }

    pub(crate) fn failure_rate(&self) -> f64 {
        rate(self.failures, self.calls)
    }

    pub(crate) fn slow_rate(&self) -> f64 {
        rate(self.slow, self.calls)
    }
}

fn rate(part: u32, total: u32) -> f64 {
    if total == 0 {
        0.0
    } else {
        f64::from(part) * 100.0 / f64::from(total)
    }
}

/// One call's outcome as the breaker sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) failure: bool,
    pub(crate) slow: bool,
}

/// A rolling window of exactly the last `size` outcomes.
#[derive(Debug)]
pub(crate) struct CountWindow {
    ring: VecDeque<Outcome>,
    size: usize,
    counts: Counts,
}

impl CountWindow {
    pub(crate) fn new(size: usize) -> Self {
        let size = size.max(1);
        CountWindow {
            ring: VecDeque::with_capacity(size),
            size,
            counts: Counts::default(),
        }
    }

    pub(crate) fn record(&mut self, o: Outcome) {
        if self.ring.len() == self.size
            && let Some(old) = self.ring.pop_front()
        {
            let mut c = Counts::default();
            c.add(old);
            self.counts.sub(c);
        }
        self.ring.push_back(o);
        self.counts.add(o);
    }

    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    pub(crate) fn clear(&mut self) {
        self.ring.clear();
        self.counts = Counts::default();
    }
}

// The lock-free window keeps its three counters in one word, 21 bits each,
// so that one read (or the value one update returns) is a consistent
// snapshot. Bit 63 and the all-ones field value are never valid, which is
// how a snapshot torn by two updates racing for one slot is recognised.
const FIELD: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD) - 1;

/// The largest count window kept lock-free; larger ones use [`CountWindow`]
/// under the breaker's lock.
pub(crate) const ATOMIC_MAX: usize = (1 << FIELD) - 2;

const PRESENT: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

#[inline]
fn encode(o: Outcome) -> u8 {
    PRESENT | (u8::from(o.failure) * FAILED) | (u8::from(o.slow) * SLOW)
}

#[inline]
fn pack(code: u8) -> u64 {
    u64::from(code & PRESENT)
        | (u64::from((code & FAILED) >> 1) << FIELD)
        | (u64::from((code & SLOW) >> 2) << (2 * FIELD))
}

/// What [`AtomicCountWindow::record`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Neither the call count nor a rate can have gone up: nothing to check.
    Unchanged,
    /// The window just after this outcome went in.
    Raised(Counts),
    /// A rate may have gone up, but an update racing for the same slot
    /// left the snapshot torn: read the window again.
    Torn,
}

/// Exactly the last `size` outcomes, like [`CountWindow`], recorded without
/// a lock: a ring of one-byte slots written in turn, with the counters
/// adjusted by whoever swaps a slot, from the value it swapped out.
///
/// Each update is linearizable on its own; a reader may see an outcome in
/// the counters a moment before or after it is in the ring, and two calls
/// finishing at once may enter the window in either order.
#[derive(Debug)]
pub(crate) struct AtomicCountWindow {
    slots: Box<[AtomicU8]>,
    /// Index of the next write; never reset, so it also counts every
    /// outcome ever recorded here.
    next: AtomicU64,
    counts: AtomicU64,
}

impl AtomicCountWindow {
    /// A window of `size` calls, if it is small enough to be lock-free.
    pub(crate) fn new(size: usize) -> Option<Self> {
        let size = size.max(1);
        (size <= ATOMIC_MAX).then(|| AtomicCountWindow {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicU64::new(0),
            counts: AtomicU64::new(0),
        })
    }

    #[inline]
    pub(crate) fn record(&self, o: Outcome) -> Recorded {
        let code = encode(o);
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        // `usize` fits any slot index: the ring is at most ATOMIC_MAX long.
        let slot = &self.slots[(i % self.slots.len() as u64) as usize];
        // Rewriting the value a slot already holds changes nothing; skipping
        // the swap keeps the steady state (success after success) at one
        // read-modify-write.
        if slot.load(Ordering::Relaxed) == code {
            return Recorded::Unchanged;
        }
        let old = slot.swap(code, Ordering::Relaxed);
        let delta = pack(code).wrapping_sub(pack(old));
        if delta == 0 {
            return Recorded::Unchanged;
        }
        let after = self
            .counts
            .fetch_add(delta, Ordering::Relaxed)
            .wrapping_add(delta);
        // Only a bit the old slot lacked (a new call, failure or slow call)
        // can raise the count or a rate.
        if code & !old == 0 {
            return Recorded::Unchanged;
        }
        match self.unpack(after) {
            Some(c) => Recorded::Raised(c),
            None => Recorded::Torn,
        }
    }

    #[inline]
    fn unpack(&self, v: u64) -> Option<Counts> {
        let field = |i: u32| u32::try_from((v >> (i * FIELD)) & FIELD_MASK).unwrap_or(u32::MAX);
        let c = Counts {
            calls: field(0),
            failures: field(1),
            slow: field(2),
        };
        let consistent = v >> 63 == 0
            && c.calls as usize <= self.slots.len()
            && c.failures <= c.calls
            && c.slow <= c.calls;
        consistent.then_some(c)
    }

    /// The window's counts. A snapshot torn by racing updates is read again
    /// a few times, then clamped into range.
    pub(crate) fn counts(&self) -> Counts {
        let mut v = self.counts.load(Ordering::Relaxed);
        for _ in 0..64 {
            if let Some(c) = self.unpack(v) {
                return c;
            }
            std::hint::spin_loop();
            v = self.counts.load(Ordering::Relaxed);
        }
        let field = |i: u32| u32::try_from((v >> (i * FIELD)) & FIELD_MASK).unwrap_or(u32::MAX);
        let calls = field(0).min(u32::try_from(self.slots.len()).unwrap_or(u32::MAX));
        Counts {
            calls,
            failures: field(1).min(calls),
            slow: field(2).min(calls),
        }
    }

    /// Every outcome ever recorded here, cleared or not.
    pub(crate) fn recorded(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Empties the window. Each slot is swapped out and its counts taken
    /// back by the same rule as a write, so a write racing the clear stays
    /// counted exactly as long as it stays in the ring.
    pub(crate) fn clear(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(0, Ordering::Relaxed);
            if old != 0 {
                self.counts.fetch_sub(pack(old), Ordering::Relaxed);
            }
        }
    }
}

/// The outcomes of the last `buckets` whole buckets of `size / buckets`
/// each, the current (partial) bucket included.
///
/// Bucket `i` covers `[origin + i·len, origin + (i+1)·len)`; at time `t` in
/// bucket `c` the window holds buckets `c - buckets + 1 ..= c`.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Vec<Counts>,
    bucket_len: u128,
    origin: Instant,
    current: u64,
    counts: Counts,
}

impl TimeWindow {
    pub(crate) fn new(size: Duration, buckets: u32, now: Instant) -> Self {
        let n = buckets.max(1);
        let bucket_len = (size.as_nanos() / u128::from(n)).max(1);
        TimeWindow {
            buckets: vec![Counts::default(); n as usize],
            bucket_len,
            origin: now,
            current: 0,
            counts: Counts::default(),
        }
    }

    fn advance(&mut self, now: Instant) {
        let idx = u64::try_from(now.saturating_duration_since(self.origin).as_nanos() / self.bucket_len)
            .unwrap_or(u64::MAX);
        if idx <= self.current {
            return;
        }
        let n = self.buckets.len() as u64;
        let stale = (idx - self.current).min(n);
        for i in 1..=stale {
            let slot = ((self.current + i) % n) as usize;
            let old = std::mem::take(&mut self.buckets[slot]);
            self.counts.sub(old);
        }
        self.current = idx;
    }

    pub(crate) fn record(&mut self, o: Outcome, now: Instant) {
        self.advance(now);
        let slot = (self.current % self.buckets.len() as u64) as usize;
        self.buckets[slot].add(o);
        self.counts.add(o);
    }

    pub(crate) fn counts(&mut self, now: Instant) -> Counts {
        self.advance(now);
        self.counts
    }

    pub(crate) fn clear(&mut self, now: Instant) {
        self.buckets.iter_mut().for_each(|b| *b = Counts::default());
        self.counts = Counts::default();
        self.origin = now;
        self.current = 0;
    }
}

/// Either kind of window.
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn record(&mut self, o: Outcome) {
        match self {
            Window::Count(w) => w.record(o),
            Window::Time(w) => w.record(o, Instant::now()),
        }
    }

    pub(crate) fn counts(&mut self) -> Counts {
        match self {
            Window::Count(w) => w.counts(),
            Window::Time(w) => w.counts(Instant::now()),
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Window::Count(w) => w.clear(),
            Window::Time(w) => w.clear(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn outcome() -> impl Strategy<Value = Outcome> {
        (any::<bool>(), any::<bool>()).prop_map(|(failure, slow)| Outcome { failure, slow })
    }

    fn model(outcomes: &[Outcome]) -> Counts {
        let mut c = Counts::default();
        outcomes.iter().for_each(|o| c.add(*o));
        c
    }

    proptest! {
        #[test]
        fn count_window_holds_exactly_the_last_n(size in 1usize..40, outcomes in proptest::collection::vec(outcome(), 0..200)) {
            let mut w = CountWindow::new(size);
            for (i, o) in outcomes.iter().enumerate() {
                w.record(*o);
                let start = (i + 1).saturating_sub(size);
                prop_assert_eq!(w.counts(), model(&outcomes[start..=i]));
            }
        }

        #[test]
        fn atomic_count_window_matches_the_locked_one(
            size in 1usize..40,
            steps in proptest::collection::vec(proptest::option::weighted(0.97, outcome()), 0..300),
        ) {
            let atomic = AtomicCountWindow::new(size).unwrap();
            let mut locked = CountWindow::new(size);
            for step in steps {
                let Some(o) = step else {
                    atomic.clear();
                    locked.clear();
                    prop_assert_eq!(atomic.counts(), Counts::default());
                    continue;
                };
                let before = locked.counts();
                locked.record(o);
                let after = locked.counts();
                match atomic.record(o) {
                    Recorded::Raised(c) => prop_assert_eq!(c, after),
                    // Only what cannot trip a breaker may go unreported.
                    Recorded::Unchanged => prop_assert!(
                        after.calls == before.calls
                            && after.failures <= before.failures
                            && after.slow <= before.slow,
                        "{:?} -> {:?} unreported", before, after
                    ),
                    Recorded::Torn => prop_assert!(false, "torn without concurrency"),
                }
                prop_assert_eq!(atomic.counts(), after);
            }
        }

        #[test]
        fn time_window_holds_the_last_buckets(
            buckets in 1u32..12,
            bucket_ms in 1u64..50,
            steps in proptest::collection::vec((0u64..200, outcome()), 0..200),
        ) {
            let origin = Instant::now();
            let size = Duration::from_millis(bucket_ms * u64::from(buckets));
            let mut w = TimeWindow::new(size, buckets, origin);
            let mut seen: Vec<(u64, Outcome)> = Vec::new();
            let mut t = 0u64;
            for (dt, o) in steps {
                t += dt;
                let now = origin + Duration::from_millis(t);
                w.record(o, now);
                let bucket = t / bucket_ms;
                seen.push((bucket, o));
                let oldest = bucket.saturating_sub(u64::from(buckets) - 1);
                let live: Vec<Outcome> = seen.iter().filter(|(b, _)| *b >= oldest).map(|(_, o)| *o).collect();
                prop_assert_eq!(w.counts(now), model(&live));
            }
            // Long after the last call, everything has expired.
            let later = origin + Duration::from_millis(t + bucket_ms * u64::from(buckets) + 1);
            prop_assert_eq!(w.counts(later), Counts::default());
        }
    }

    #[test]
    fn atomic_count_window_stays_exact_under_concurrent_writers() {
        for size in [1, 3, 64] {
            let w = AtomicCountWindow::new(size).unwrap();
            std::thread::scope(|s| {
                for t in 0..4u32 {
                    let w = &w;
                    s.spawn(move || {
                        for i in 0..2_000u32 {
                            let o = Outcome {
                                failure: (i + t) % 3 == 0,
                                slow: (i * 7 + t) % 5 == 0,
                            };
                            w.record(o);
                            if t == 0 && i % 500 == 0 {
                                w.clear();
                            }
                        }
                    });
                }
            });
            // Quiescent: the counters are exactly what the ring holds.
            let mut held = Counts::default();
            for slot in w.slots.iter() {
                let code = slot.load(Ordering::Relaxed);
                if code != 0 {
                    held.add(Outcome {
                        failure: code & FAILED != 0,
                        slow: code & SLOW != 0,
                    });
                }
            }
            assert_eq!(w.counts(), held, "window of {size}");
            assert_eq!(w.recorded(), 8_000);
        }
    }

    #[test]
    fn huge_count_windows_are_not_lock_free() {
        assert!(AtomicCountWindow::new(ATOMIC_MAX).is_some());
        assert!(AtomicCountWindow::new(ATOMIC_MAX + 1).is_none());
    }

    #[test]
    fn rates_are_percentages() {
        let mut w = CountWindow::new(4);
        for failure in [true, false, false, false, true] {
            w.record(Outcome { failure, slow: false });
        }
        // The first failure has rolled out: 1 of the last 4.
        assert_eq!(w.counts().failures, 1);
        assert_eq!(w.counts().failure_rate(), 25.0);
    }
}
