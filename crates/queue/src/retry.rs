//! Retry limits and exponential backoff with jitter.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::time::Duration;

/// How often a task is tried and how long to wait between tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Deliveries a task gets before it moves to the dead-letter list (at least 1).
    pub max_attempts: u32,
    /// The delay after the first failed attempt, before jitter.
    pub base: Duration,
    /// The longest delay, before jitter.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_secs(1),
            max: Duration::from_secs(5 * 60),
        }
    }
}

impl RetryPolicy {
    /// The attempt limit, never less than 1.
    pub(crate) fn attempt_limit(&self) -> u32 {
        self.max_attempts.max(1)
    }

    /// The upper bound of [`RetryPolicy::delay`]: `base * 2^(attempt - 1)`, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The delay before retrying after failed attempt `attempt` (1-based): uniformly random
    /// in `[ceiling / 2, ceiling]` ("equal jitter"), so that tasks failing together do not
    /// retry together, while the delay still grows with every attempt.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        if spread == 0 {
            return ceiling;
        }
        half + Duration::from_nanos(random_u64() % spread.saturating_add(1))
    }
}

/// A random number from the standard library's per-hasher random keys (no RNG dependency;
/// jitter needs no cryptographic quality).
fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x6b6c_696f);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_matches_the_documented_values() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 8);
        assert_eq!(p.base, Duration::from_secs(1));
        assert_eq!(p.max, Duration::from_secs(300));
    }

    #[test]
    fn ceiling_doubles_per_attempt_until_the_maximum() {
        let p = RetryPolicy::default();
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(5), Duration::from_secs(16));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
        // Attempt 0 (never delivered) is treated like the first.
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
    }

    #[test]
    fn delay_stays_within_half_and_full_ceiling() {
        let p = RetryPolicy::default();
        for attempt in 1..=12 {
            let ceiling = p.ceiling(attempt);
            for _ in 0..200 {
                let d = p.delay(attempt);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn delay_is_jittered() {
        let p = RetryPolicy::default();
        let delays: std::collections::HashSet<Duration> = (0..50).map(|_| p.delay(3)).collect();
        assert!(delays.len() > 10, "only {} distinct delays", delays.len());
    }

    #[test]
    fn delay_with_zero_base_is_zero() {
        let p = RetryPolicy {
            max_attempts: 3,
            base: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(p.delay(1), Duration::ZERO);
        assert_eq!(p.delay(7), Duration::ZERO);
    }

    #[test]
    fn attempt_limit_is_at_least_one() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.attempt_limit(), 1);
    }
}
