//! How a thread that has run out of work waits for more: the one policy for
//! the supervisor thread, an idle worker, the fork server and the MPI
//! backend. First a short spin (results and tasks often follow within
//! microseconds, and waking a sleeping thread costs more), then, for a loop
//! that polls rather than blocks (the MPI backend), a [`Backoff`]: short
//! sleeps while more is likely to come soon, then sleeps doubling up to a
//! cap.

use crate::sys::PollSet;
use std::time::{Duration, Instant};

/// How long the supervisor thread and an idle worker poll without sleeping
/// before they block: a result or the next task often comes within
/// microseconds, while waking a thread that sleeps on an idle CPU costs
/// tens of microseconds on a virtual machine (the figures that chose 50 us
/// are in `docs/performance.md`, "Figures behind the code's choices"). The spin
/// happens only at the moment a thread runs out of work, so an idle pool
/// uses no CPU. `PROCPOOL_SPIN_US` overrides it (0 turns it off); on a
/// machine with one CPU there is none.
pub(crate) fn spin_budget() -> Duration {
    static US: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *US.get_or_init(|| spin_or(50))
}

/// The spin of a pool whose workers are on other hosts (the MPI backend),
/// for its supervisor, its ranks' relays and their workers: a round trip
/// there takes tens of microseconds more than on one machine, and a thread
/// that has gone to sleep in the meantime costs more again to wake (the
/// figures that chose 250 us are in `docs/performance.md`).
/// `PROCPOOL_SPIN_US` overrides it too.
pub(crate) fn remote_spin_budget() -> Duration {
    static US: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *US.get_or_init(|| spin_or(250))
}

/// `PROCPOOL_SPIN_US` if set (or the value a sandboxed server was given
/// in its config, [`set_spin_override`]), else `default_us`; none on one
/// CPU.
fn spin_or(default_us: u64) -> Duration {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return Duration::ZERO;
    }
    let us = SPIN_OVERRIDE
        .get()
        .copied()
        .or_else(spin_from_env)
        .unwrap_or(default_us);
    Duration::from_micros(us)
}

/// The variable that sets the spin.
pub(crate) const SPIN_ENV: &str = "PROCPOOL_SPIN_US";

/// The spin a sandboxed server was given in its config, in place of
/// [`SPIN_ENV`], which its empty environment lacks.
static SPIN_OVERRIDE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// [`SPIN_ENV`] in this process's environment, if it is set to a number.
pub(crate) fn spin_from_env() -> Option<u64> {
    std::env::var(SPIN_ENV).ok().and_then(|v| v.parse().ok())
}

/// Sets the spin for this process, as [`SPIN_ENV`] would: in a sandboxed
/// server, before it reads the spin or forks a worker.
pub(crate) fn set_spin_override(us: u64) {
    let _ = SPIN_OVERRIDE.set(us);
}

/// Spins (for at most [`spin_budget`]) until `ready()` holds; returns it.
pub(crate) fn spin_until(ready: impl FnMut() -> bool) -> bool {
    spin_for(spin_budget(), ready)
}

/// Spins for at most `budget` until `ready()` holds; returns it.
pub(crate) fn spin_for(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if budget.is_zero() {
        return false;
    }
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        // Yield rather than hog the CPU: a thread just woken on this CPU
        // (the caller of a synchronous apply, say) runs at once.
        std::thread::yield_now();
    }
}

/// Yield (spin) this long after the last activity...
const SPIN: Duration = Duration::from_millis(1);
/// ... then sleep briefly until this long after it...
const HOT: Duration = Duration::from_millis(5);
/// ... this long at a time (about the kernel's timer slack)...
const HOT_SLEEP: Duration = Duration::from_micros(50);
/// ... then sleep this long, doubling with each sleep...
const FIRST_SLEEP: Duration = Duration::from_micros(100);
/// ... at most this many times (and never past the cap).
const MAX_DOUBLINGS: u32 = 10;

/// Backoff for a loop that polls, by the time since the last activity:
/// yields at first, then short sleeps while messages are likely to follow
/// soon (a stream of `apply` calls, say), then sleeps doubling up to a cap.
pub(crate) struct Backoff {
    since: Option<Instant>,
    doublings: u32,
    cap: Duration,
}

#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
impl Backoff {
    /// A backoff whose delays never exceed `cap`.
    pub(crate) fn new(cap: Duration) -> Self {
        Backoff {
            since: None,
            doublings: 0,
            cap,
        }
    }

    /// Something happened: poll eagerly again.
    pub(crate) fn reset(&mut self) {
        self.since = None;
        self.doublings = 0;
    }

    /// The next delay (zero: just yield). The first call after a reset
    /// starts the idle time.
    pub(crate) fn next(&mut self) -> Duration {
        let now = Instant::now();
        let idle = now - *self.since.get_or_insert(now);
        self.after(idle)
    }

    /// The next delay, `idle` after the last activity.
    fn after(&mut self, idle: Duration) -> Duration {
        if idle < SPIN {
            Duration::ZERO
        } else if idle < HOT {
            HOT_SLEEP.min(self.cap)
        } else {
            let d = FIRST_SLEEP * (1 << self.doublings.min(MAX_DOUBLINGS));
            self.doublings += 1;
            d.min(self.cap)
        }
    }

    /// Waits for the next delay.
    pub(crate) fn sleep(&mut self) {
        pause(self.next());
    }

    /// Waits for the next delay, or until one of `fds` is ready once the
    /// delay has reached a millisecond.
    pub(crate) fn wait(&mut self, fds: &mut PollSet) {
        let d = self.next();
        if d >= Duration::from_millis(1) && !fds.is_empty() {
            let _ = fds.poll(d.as_millis().min(1000) as i32);
        } else {
            pause(d);
        }
    }
}

/// Sleeps for `d`, or yields if it is zero.
fn pause(d: Duration) {
    if d.is_zero() {
        std::thread::yield_now();
    } else {
        std::thread::sleep(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const US: Duration = Duration::from_micros(1);

    #[test]
    fn backoff_yields_then_sleeps_briefly_then_doubles_up_to_its_cap() {
        let mut b = Backoff::new(50 * MS);
        assert_eq!(
            b.next(),
            Duration::ZERO,
            "the first call starts the idle time"
        );
        assert_eq!(b.after(SPIN / 2), Duration::ZERO);
        assert_eq!(b.after(SPIN), HOT_SLEEP);
        assert_eq!(b.after(HOT - US), HOT_SLEEP);
        let seq: Vec<Duration> = (0..12).map(|_| b.after(HOT)).collect();
        let us = |n: u64| Duration::from_micros(n);
        let expected = [
            us(100),
            us(200),
            us(400),
            us(800),
            us(1600),
            us(3200),
            us(6400),
            us(12800),
            us(25600),
            50 * MS,
            50 * MS,
            50 * MS,
        ];
        assert_eq!(seq, expected);
    }

    #[test]
    fn backoff_doubling_stops_at_ten_even_without_a_cap() {
        let mut b = Backoff::new(Duration::MAX);
        let last = (0..15).map(|_| b.after(10 * MS)).last().unwrap();
        assert_eq!(last, FIRST_SLEEP * 1024);
    }

    #[test]
    fn reset_starts_over_and_the_cap_bounds_the_short_sleeps_too() {
        let mut b = Backoff::new(30 * US);
        assert_eq!(b.after(2 * MS), 30 * US);
        for _ in 0..5 {
            b.after(HOT);
        }
        b.reset();
        assert_eq!(b.next(), Duration::ZERO);
        let mut b2 = Backoff::new(MS);
        b2.after(HOT);
        b2.after(HOT);
        b2.reset();
        assert_eq!(b2.after(HOT), FIRST_SLEEP);
    }

    #[test]
    fn wait_polls_the_fds_only_once_the_delay_reaches_a_millisecond() {
        let efd = crate::sys::eventfd().unwrap();
        crate::sys::eventfd_signal(std::os::fd::AsRawFd::as_raw_fd(&efd));
        let mut set = PollSet::default();
        let i = set.push(std::os::fd::AsRawFd::as_raw_fd(&efd), true, false);
        let mut b = Backoff::new(Duration::MAX);
        b.since = Some(Instant::now() - HOT);
        b.wait(&mut set);
        assert!(!set.ready(i), "a 100 us delay is slept, not polled");
        b.doublings = 4;
        b.wait(&mut set);
        assert!(
            set.readable(i),
            "a 1.6 ms delay polls (and the eventfd is ready)"
        );
        assert_eq!(b.doublings, 5);
        b.sleep();
        assert_eq!(b.doublings, 6);
    }

    #[test]
    fn spin_until_spins_only_with_a_budget() {
        assert_eq!(spin_until(|| true), !spin_budget().is_zero());
        assert!(!spin_until(|| false));
    }
}
