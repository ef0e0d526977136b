//! The protocol's clock.
//!
//! Every deadline in holdfast is measured on CLOCK_BOOTTIME: it is monotonic (no NTP
//! steps) and, unlike CLOCK_MONOTONIC, it keeps counting while the process is stopped or
//! the machine is suspended. A holder paused past its deadline therefore sees the
//! deadline as passed the instant it wakes, which is what self-fencing relies on.

use std::time::Duration;

/// A point on this machine's boot-time clock. Only comparable with other `Mono`s read on
/// the same machine during the same boot; never sent to another machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mono(pub Duration);

impl Mono {
    pub const ZERO: Mono = Mono(Duration::ZERO);

    /// Reads CLOCK_BOOTTIME.
    pub fn now() -> Mono {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Mono(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    pub fn from_nanos(nanos: u64) -> Mono {
        Mono(Duration::from_nanos(nanos))
    }

    pub fn as_nanos(self) -> u64 {
        self.0.as_nanos() as u64
    }

    /// `self - earlier`, or zero if `earlier` is later.
    pub fn since(self, earlier: Mono) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Mono {
    type Output = Mono;
    fn add(self, d: Duration) -> Mono {
        Mono(self.0 + d)
    }
}

impl std::ops::Sub<Duration> for Mono {
    type Output = Mono;
    fn sub(self, d: Duration) -> Mono {
        Mono(self.0.saturating_sub(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_is_monotonic() {
        let a = Mono::now();
        let b = Mono::now();
        assert!(b >= a);
        assert!(a > Mono::ZERO);
    }
}
