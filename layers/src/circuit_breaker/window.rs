//! Sliding windows of call outcomes: the last N calls, or the calls of the
//! last period split into buckets.

use std::collections::VecDeque;
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
    pub(crate) fn is_time(&self) -> bool {
        matches!(self, Window::Time(_))
    }

    pub(crate) fn record(&mut self, o: Outcome, now: Option<Instant>) {
        match self {
            Window::Count(w) => w.record(o),
            Window::Time(w) => w.record(o, now.unwrap_or_else(Instant::now)),
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
