//! The pool's lifecycle as pure rules: its phase, what a submission gets
//! in each, whether it still wants workers, when it has finished, and the
//! retry policy for workers that could not be started. No I/O: the
//! supervisor applies these.

use crate::error::Error;
use std::time::{Duration, Instant};

/// RUNNING → CLOSED → (all work done, workers exited) finished;
/// RUNNING or CLOSED → TERMINATED → (workers killed and reaped) finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Closed,
    Terminated,
}

impl Phase {
    /// `close()`: a running pool stops taking tasks; a terminated one
    /// stays terminated.
    pub(crate) fn closed(self) -> Phase {
        match self {
            Phase::Running => Phase::Closed,
            other => other,
        }
    }

    /// Why a submission is refused now, if it is: `Closed` after `close()`;
    /// else what broke the pool, once no worker is left to run anything
    /// (also after the pool ended because of it); else `Terminated` after
    /// `terminate()`.
    pub(crate) fn refusal(self, broken: Option<&Error>, has_workers: bool) -> Option<Error> {
        match (self, broken) {
            (Phase::Closed, _) => Some(Error::Closed),
            (_, Some(e)) if !has_workers => Some(e.clone()),
            (Phase::Terminated, _) => Some(Error::Terminated),
            _ => None,
        }
    }

    /// Whether the pool still needs workers: running, or closed with work
    /// queued.
    pub(crate) fn wants_workers(self, queue_empty: bool) -> bool {
        match self {
            Phase::Running => true,
            Phase::Closed => !queue_empty,
            Phase::Terminated => false,
        }
    }

    /// Whether idle workers should be told to retire (closed, nothing
    /// queued).
    pub(crate) fn retire_idle(self, queue_empty: bool) -> bool {
        self == Phase::Closed && queue_empty
    }

    /// Whether a closed pool is done: nothing queued, no worker left or on
    /// its way.
    pub(crate) fn drained(self, queue_empty: bool, no_workers: bool) -> bool {
        self == Phase::Closed && queue_empty && no_workers
    }
}

/// After a failed start, how many retries in a row the pool makes (with
/// [`START_BACKOFF`], doubled each time) before it gives up on a
/// replacement; with no worker left it is then broken. The whole series
/// takes about 0.3 s: long enough for a moment's shortage (a process limit
/// reached while other programs exit), short enough that queued tasks fail
/// promptly when the shortage lasts.
pub(crate) const START_RETRIES: u32 = 5;
/// The delay before the first retry of a failed start.
pub(crate) const START_BACKOFF: Duration = Duration::from_millis(10);

/// Failed worker starts in a row, and when the next retry is due.
#[derive(Debug, Default)]
pub(crate) struct Starts {
    pub(crate) failures: u32,
    pub(crate) retry_at: Option<Instant>,
}

/// What to do after a failed start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A retry is due then (or already was).
    Later,
    /// No more retries: the failures in a row used them up.
    GiveUp,
}

impl Starts {
    /// A worker started: the count starts again.
    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// A start failed at `now`. Starts that fail while a retry is already
    /// due count as one; each new failure doubles the delay, up to
    /// [`START_RETRIES`] in a row.
    pub(crate) fn failed(&mut self, now: Instant) -> Retry {
        if self.retry_at.is_some() {
            return Retry::Later;
        }
        self.failures += 1;
        if self.failures > START_RETRIES {
            return Retry::GiveUp;
        }
        self.retry_at = Some(now + START_BACKOFF * 2u32.pow(self.failures - 1));
        Retry::Later
    }

    /// Whether the failures in a row used the retries up (until a start
    /// succeeds): only a worker's end tries again then.
    pub(crate) fn gave_up(&self) -> bool {
        self.failures > START_RETRIES
    }

    /// Whether the retry is due at `now` (it is then no longer pending).
    pub(crate) fn take_due(&mut self, now: Instant) -> bool {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_refuse_as_documented() {
        let broken = Error::Broken { reason: "x".into() };
        assert!(Phase::Running.refusal(None, true).is_none());
        assert!(matches!(
            Phase::Closed.refusal(None, true),
            Some(Error::Closed)
        ));
        assert!(matches!(
            Phase::Terminated.refusal(None, true),
            Some(Error::Terminated)
        ));
        // A broken pool refuses only once no worker is left to run anything.
        assert!(Phase::Running.refusal(Some(&broken), true).is_none());
        assert!(matches!(
            Phase::Running.refusal(Some(&broken), false),
            Some(Error::Broken { .. })
        ));
        assert!(matches!(
            Phase::Terminated.refusal(Some(&broken), false),
            Some(Error::Broken { .. })
        ));
        // `close()` wins over what broke it.
        assert!(matches!(
            Phase::Closed.refusal(Some(&broken), false),
            Some(Error::Closed)
        ));
    }

    #[test]
    fn close_never_undoes_terminate() {
        assert_eq!(Phase::Running.closed(), Phase::Closed);
        assert_eq!(Phase::Closed.closed(), Phase::Closed);
        assert_eq!(Phase::Terminated.closed(), Phase::Terminated);
    }

    #[test]
    fn workers_are_wanted_while_there_is_work() {
        assert!(Phase::Running.wants_workers(true));
        assert!(Phase::Closed.wants_workers(false));
        assert!(!Phase::Closed.wants_workers(true));
        assert!(!Phase::Terminated.wants_workers(false));
        assert!(Phase::Closed.retire_idle(true));
        assert!(!Phase::Running.retire_idle(true));
        assert!(Phase::Closed.drained(true, true));
        assert!(!Phase::Closed.drained(false, true));
        assert!(!Phase::Running.drained(true, true));
    }

    #[test]
    fn failed_starts_back_off_doubling_then_give_up() {
        let t0 = Instant::now();
        let mut s = Starts::default();
        let mut delays = Vec::new();
        for _ in 0..START_RETRIES {
            assert_eq!(s.failed(t0), Retry::Later);
            delays.push(s.retry_at.expect("a retry is due") - t0);
            // A second failure while the retry is pending counts as one.
            assert_eq!(s.failed(t0), Retry::Later);
            assert!(s.take_due(t0 + Duration::from_secs(10)));
            assert!(!s.take_due(t0 + Duration::from_secs(10)));
        }
        assert_eq!(delays[0], START_BACKOFF);
        for w in delays.windows(2) {
            assert_eq!(w[1], w[0] * 2);
        }
        assert!(!s.gave_up());
        assert_eq!(s.failed(t0), Retry::GiveUp);
        // Given up: no replacement is asked for until a worker ends.
        assert!(s.gave_up() && s.retry_at.is_none());
        s.succeeded();
        assert_eq!(s.failures, 0);
        assert!(!s.gave_up());
    }
}
