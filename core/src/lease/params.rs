//! Lease timing: the session duration D, the clock-rate bound ε and the safety margin,
//! and the one check that makes the holder's and the acquirer's windows disjoint.
//!
//! Two machines never compare clock readings. Each measures its own window on its own
//! CLOCK_BOOTTIME, whose rate (against real time) is assumed to lie in [1 − ε, 1 + ε]:
//!
//! - the holder may write until `send + (D − margin)` on its clock, where `send` is when
//!   it sent its last successful renewal. In real time that window lasts at most
//!   `(D − margin) / (1 − ε)` after the send;
//! - an acquirer waits `W = D·(1 + ε) + margin` on its clock, counted from the moment it
//!   first saw the session version that renewal wrote (which is after the send). In real
//!   time that wait lasts at least `W / (1 + ε)`.
//!
//! So the acquirer's wait ends strictly after the holder's window if
//! `W / (1 + ε) > (D − margin) / (1 − ε)`, which [`LeaseParams::validate`] checks exactly
//! (it reduces to `2·margin > ε·(1 + ε)·D`). The acquirer then deletes exactly the
//! session version it timed (a compare-and-swap), so the holder's next renewal — which
//! names that version — fails and can never open a new window.

use std::time::Duration;

/// Why a [`LeaseParams`] was rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid lease parameters: {0}")]
pub struct InvalidParams(pub String);

/// The protocol's timing. Build with [`LeaseParams::new`], which validates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeaseParams {
    /// D: the session duration a holder promises to self-fence within.
    pub duration: Duration,
    /// ε: bound on how far any clock's rate may stray from real time (0.01 = 1 %).
    pub epsilon: f64,
    /// Slack subtracted from the holder's window and added to the acquirer's wait.
    pub margin: Duration,
}

impl Default for LeaseParams {
    /// D = 15 s, ε = 1 %, margin = 2 s: a holder self-fences 13 s after its last
    /// renewal was sent; an acquirer takes over a silent session after 17.15 s.
    fn default() -> Self {
        LeaseParams {
            duration: Duration::from_secs(15),
            epsilon: 0.01,
            margin: Duration::from_secs(2),
        }
    }
}

impl LeaseParams {
    pub fn new(duration: Duration, epsilon: f64, margin: Duration) -> Result<Self, InvalidParams> {
        let params = LeaseParams {
            duration,
            epsilon,
            margin,
        };
        params.validate()?;
        Ok(params)
    }

    /// Builds parameters without checking them. Only for demonstrating, in simulation,
    /// what goes wrong when the windows overlap; never use it in a product path.
    #[doc(hidden)]
    pub fn unchecked(duration: Duration, epsilon: f64, margin: Duration) -> Self {
        LeaseParams {
            duration,
            epsilon,
            margin,
        }
    }

    pub fn validate(&self) -> Result<(), InvalidParams> {
        let bad = |why: String| Err(InvalidParams(why));
        if self.duration < Duration::from_millis(10) || self.duration > Duration::from_secs(3600) {
            return bad(format!(
                "duration {:?} must lie between 10ms and 1h",
                self.duration
            ));
        }
        if !(self.epsilon >= 0.0 && self.epsilon < 0.5) {
            return bad(format!("epsilon {} must lie in [0, 0.5)", self.epsilon));
        }
        // A zero margin leaves no room for the instants at which the holder sends and
        // the acquirer first observes a renewal; the proof needs it strictly positive.
        if self.margin.is_zero() {
            return bad("margin must be greater than zero".into());
        }
        // The holder must get at least one renewal in before its own window closes,
        // or a healthy holder would self-fence between two renewals.
        if self.margin >= self.duration || self.renew_interval() >= self.self_fence_after() {
            return bad(format!(
                "renew interval D/3 = {:?} must be shorter than D - margin = {:?}",
                self.renew_interval(),
                self.duration.saturating_sub(self.margin)
            ));
        }
        // The safety condition (see the module doc): the shortest real time the
        // acquirer can wait exceeds the longest real time the holder can keep writing.
        let eps = self.epsilon;
        let acquirer_min_real = self.takeover_wait().as_secs_f64() / (1.0 + eps);
        let holder_max_real = self.self_fence_after().as_secs_f64() / (1.0 - eps);
        if acquirer_min_real <= holder_max_real {
            return bad(format!(
                "windows overlap: an acquirer may take over after {acquirer_min_real:.6}s of \
                 real time while the holder may still write for {holder_max_real:.6}s; \
                 raise margin above epsilon*(1+epsilon)*D/2 = {:.6}s",
                eps * (1.0 + eps) * self.duration.as_secs_f64() / 2.0
            ));
        }
        Ok(())
    }

    /// How often a session is renewed: D/3.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// The holder's window, on its own clock, after sending a renewal: D − margin.
    pub fn self_fence_after(&self) -> Duration {
        self.duration.saturating_sub(self.margin)
    }

    /// W: how long an acquirer must see one session version unchanged, on its own
    /// clock, before it may take the session's claims: D·(1 + ε) + margin.
    pub fn takeover_wait(&self) -> Duration {
        self.duration.mul_f64(1.0 + self.epsilon) + self.margin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn default_is_valid() {
        LeaseParams::default().validate().unwrap();
    }

    #[test]
    fn rejects_zero_margin() {
        assert!(LeaseParams::new(ms(3000), 0.0, ms(0)).is_err());
    }

    #[test]
    fn rejects_overlapping_windows() {
        // 2·margin must exceed ε(1+ε)D = 0.1·1.1·10s = 1.1s, so margin 0.5s overlaps
        // and 0.6s just does not.
        assert!(LeaseParams::new(ms(10_000), 0.1, ms(500)).is_err());
        assert!(LeaseParams::new(ms(10_000), 0.1, ms(551)).is_ok());
    }

    #[test]
    fn rejects_margin_that_swallows_renewals() {
        // D − margin must exceed D/3, or the holder fences before its first renewal.
        assert!(LeaseParams::new(ms(3000), 0.0, ms(2000)).is_err());
        assert!(LeaseParams::new(ms(3000), 0.0, ms(1999)).is_ok());
    }

    #[test]
    fn rejects_absurd_epsilon_and_duration() {
        assert!(LeaseParams::new(ms(3000), 0.5, ms(100)).is_err());
        assert!(LeaseParams::new(ms(3000), -0.1, ms(100)).is_err());
        assert!(LeaseParams::new(ms(3000), f64::NAN, ms(100)).is_err());
        assert!(LeaseParams::new(ms(1), 0.0, Duration::from_micros(1)).is_err());
    }

    #[test]
    fn derived_windows() {
        let p = LeaseParams::new(ms(3000), 0.01, ms(300)).unwrap();
        assert_eq!(p.renew_interval(), ms(1000));
        assert_eq!(p.self_fence_after(), ms(2700));
        assert_eq!(p.takeover_wait(), ms(3330));
    }
}
