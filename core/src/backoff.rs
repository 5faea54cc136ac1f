//! Capped exponential backoff shared by every retry loop (broker, database).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays start at 100 ms and double up to this cap, with jitter so that a fleet of agents
/// does not reconnect in lock step after a broker restart.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// An endless iterator of delays between attempts.
pub fn delays() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let d: Vec<Duration> = delays().take(40).collect();
        assert_eq!(d.len(), 40, "backoff must never run out");
        // Jitter adds up to one more delay on top of the base.
        assert!(d.iter().all(|x| *x <= MAX_DELAY * 2), "{d:?}");
        assert!(d[10] >= Duration::from_secs(1), "{d:?}");
    }
}
