//! One exponential backoff, used by every wait-and-try-again in WatchTower:
//! the retry layer, the consumer runtime's redelivery delays and each
//! transport's reconnect loop.
//!
//! The `n`th wait (1 for the first) is `initial · multiplier^(n-1)`, capped
//! at `max`; with [`Jitter::Full`] it is then drawn uniformly between
//! `initial` and that cap (in whole milliseconds, the timer's resolution),
//! so that clients that failed together do not come back together.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use watchtower::backoff::{Backoff, Jitter};
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! let waits: Vec<_> = (1..=5).map(|n| backoff.ceiling(n)).collect();
//! assert_eq!(waits, [100, 200, 400, 800, 1000].map(Duration::from_millis));
//!
//! let jittered = backoff.jitter(Jitter::Full).delay(3);
//! assert!(jittered >= Duration::from_millis(100) && jittered <= Duration::from_millis(400));
//! ```

use std::hash::{BuildHasher as _, RandomState};
use std::time::Duration;

/// How a [`Backoff`] spreads its waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly the capped exponential wait.
    #[default]
    None,
    /// Uniform between the initial wait and the capped exponential wait
    /// ("full jitter").
    Full,
}

/// Exponential backoff: waits that grow by a multiplier from `initial` up
/// to `max`, with optional [`Jitter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Backoff {
    /// Waits from `initial`, doubling up to `max` (which is raised to
    /// `initial` if smaller), without jitter.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            multiplier: 2.0,
            jitter: Jitter::None,
        }
    }

    /// The same backoff with another first and longest wait (`max` raised
    /// to `initial` if smaller).
    pub fn delays(mut self, initial: Duration, max: Duration) -> Backoff {
        self.initial = initial;
        self.max = max.max(initial);
        self
    }

    /// The growth factor between waits. Default 2; a factor below 1 (or
    /// not a number) is taken as 1: constant waits.
    pub fn multiplier(mut self, multiplier: f64) -> Backoff {
        self.multiplier = if multiplier >= 1.0 { multiplier } else { 1.0 };
        self
    }

    /// How the waits are spread. Default [`Jitter::None`].
    pub fn jitter(mut self, jitter: Jitter) -> Backoff {
        self.jitter = jitter;
        self
    }

    /// The first wait.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The `n`th wait before jitter (`n` = 1 for the first):
    /// `initial · multiplier^(n-1)`, capped at the maximum; saturating, so
    /// any `n` is safe.
    pub fn ceiling(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        Duration::try_from_secs_f64(self.initial.as_secs_f64() * self.multiplier.powi(exp))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The `n`th wait, with jitter drawn from a process-local random source.
    pub fn delay(&self, n: u32) -> Duration {
        let random = match self.jitter {
            Jitter::None => 0,
            Jitter::Full => RandomState::new().hash_one(n),
        };
        self.delay_with(n, random)
    }

    /// The `n`th wait, with jitter drawn from `random` (a uniformly random
    /// number the caller supplies, e.g. from a seeded generator for
    /// reproducible schedules).
    pub fn delay_with(&self, n: u32, random: u64) -> Duration {
        let cap = self.ceiling(n);
        match self.jitter {
            Jitter::None => cap,
            Jitter::Full if cap <= self.initial => self.initial,
            Jitter::Full => {
                let lo = u64::try_from(self.initial.as_millis()).unwrap_or(u64::MAX);
                let hi = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
                let span = hi.saturating_sub(lo).saturating_add(1);
                Duration::from_millis(lo.saturating_add(random % span)).max(self.initial)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_saturates() {
        let b = Backoff::new(100 * MS, 30 * 1000 * MS);
        assert_eq!(b.ceiling(0), 100 * MS);
        assert_eq!(b.ceiling(1), 100 * MS);
        assert_eq!(b.ceiling(2), 200 * MS);
        assert_eq!(b.ceiling(9), 25_600 * MS);
        assert_eq!(b.ceiling(10), 30_000 * MS);
        assert_eq!(b.ceiling(u32::MAX), 30_000 * MS);
        assert_eq!(b.delay(u32::MAX), 30_000 * MS);
    }

    #[test]
    fn a_small_multiplier_means_constant_waits() {
        let b = Backoff::new(50 * MS, 10 * MS).multiplier(0.5);
        assert_eq!(b.max(), 50 * MS);
        assert_eq!((1..5).map(|n| b.ceiling(n)).collect::<Vec<_>>(), [50 * MS; 4]);
        let b = Backoff::new(50 * MS, 500 * MS).multiplier(f64::NAN);
        assert_eq!(b.ceiling(4), 50 * MS);
    }

    #[test]
    fn full_jitter_stays_between_initial_and_the_ceiling() {
        let b = Backoff::new(100 * MS, 1000 * MS).jitter(Jitter::Full);
        for random in [0, 1, 299, 300, u64::MAX] {
            let d = b.delay_with(3, random);
            assert!(d >= 100 * MS && d <= 400 * MS, "{d:?}");
        }
        assert_eq!(b.delay_with(3, 0), 100 * MS);
        assert_eq!(b.delay_with(3, 300), 400 * MS);
        assert_eq!(b.delay_with(1, u64::MAX), 100 * MS);
        let huge = Backoff::new(Duration::MAX, Duration::MAX).jitter(Jitter::Full);
        assert_eq!(huge.delay_with(7, u64::MAX), Duration::MAX);
    }
}
