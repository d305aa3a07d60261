//! A shared rate limit (GCRA): `n` requests per period, in bursts of up
//! to `n`, spaced evenly after that. Callers reserve a slot and wait for it,
//! so clones of one sender share one budget.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained schedule a burst may run.
    tolerance: Duration,
    /// The theoretical arrival time of the next request.
    tat: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub(crate) fn new(requests: u32, per: Duration) -> RateLimiter {
        let requests = requests.max(1);
        let interval = per / requests;
        RateLimiter {
            interval,
            tolerance: per.saturating_sub(interval),
            tat: Mutex::new(None),
        }
    }

    /// Reserves the next slot and returns when it starts.
    pub(crate) fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let next = tat.map_or(now, |t| t.max(now));
        let start = next.checked_sub(self.tolerance).map_or(now, |s| s.max(now));
        *tat = Some(next + self.interval);
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_spaces_evenly() {
        let limiter = RateLimiter::new(4, Duration::from_secs(1));
        let t0 = Instant::now();
        let starts: Vec<Duration> = (0..8).map(|_| limiter.reserve() - t0).collect();
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 0, 0, 0, 250, 500, 750, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_with_time() {
        let limiter = RateLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        limiter.reserve();
        limiter.reserve();
        assert_eq!(limiter.reserve() - t0, Duration::from_millis(500));
        tokio::time::advance(Duration::from_secs(5)).await;
        let t1 = Instant::now();
        assert_eq!(limiter.reserve(), t1);
        assert_eq!(limiter.reserve(), t1);
    }
}
