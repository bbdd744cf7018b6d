//! The pool's counters (`crate::stats::Stats` is their snapshot): atomic
//! adds where tasks are taken and where they end, so that counting takes
//! no lock on the way of a task; what a worker ends of, and how long each
//! slot was busy, under the engine's lock where those are decided.

use crate::engine::job::KillReason;
use crate::error::Error;
use crate::stats::{Failed, Stats, WorkersEnded};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What a pool counts as it goes.
#[derive(Default)]
pub(crate) struct Counters {
    submitted: AtomicU64,
    map_chunks: AtomicU64,
    map_items: AtomicU64,
    completed: AtomicU64,
    /// In the order of [`kind`]'s indices.
    failed: [AtomicU64; 8],
}

/// Which of `Failed`'s counters an error goes to.
fn kind(e: &Error) -> usize {
    match e {
        Error::TaskPanicked { .. } => 0,
        Error::WorkerLost { .. } | Error::WorkerLostShared { .. } | Error::RankLost { .. } => 1,
        Error::Timeout { .. } => 2,
        Error::Cancelled => 3,
        Error::LimitExceeded { .. } => 4,
        Error::Encode { .. } | Error::Decode { .. } | Error::TooLarge { .. } => 5,
        Error::Terminated => 6,
        _ => 7,
    }
}

impl Counters {
    /// A task taken; `items` is a map chunk's item count (0: an `apply`).
    pub(crate) fn submitted(&self, items: u32) {
        self.submitted.fetch_add(1, Relaxed);
        if items > 0 {
            self.map_chunks.fetch_add(1, Relaxed);
            self.map_items.fetch_add(u64::from(items), Relaxed);
        }
    }

    /// A task ended with this outcome.
    pub(crate) fn ended<T>(&self, outcome: &Result<T, Error>) {
        match outcome {
            Ok(_) => self.completed.fetch_add(1, Relaxed),
            Err(e) => self.failed[kind(e)].fetch_add(1, Relaxed),
        };
    }

    /// The counts so far, with what the engine's state adds.
    pub(crate) fn snapshot(&self, held: &Held) -> Stats {
        let f = |i: usize| self.failed[i].load(Relaxed);
        Stats {
            submitted: self.submitted.load(Relaxed),
            completed: self.completed.load(Relaxed),
            failed: Failed {
                panicked: f(0),
                worker_lost: f(1),
                timed_out: f(2),
                cancelled: f(3),
                limit_exceeded: f(4),
                codec: f(5),
                terminated: f(6),
                other: f(7),
            },
            retried: held.retried,
            map_chunks: self.map_chunks.load(Relaxed),
            map_items: self.map_items.load(Relaxed),
            workers_started: held.workers_started,
            workers_ended: held.ended.clone(),
            ..Stats::default()
        }
    }
}

/// The counts kept in the engine's state (changed under its lock).
#[derive(Default)]
pub(crate) struct Held {
    pub(crate) retried: u64,
    pub(crate) workers_started: u64,
    pub(crate) ended: WorkersEnded,
    /// Run time (ns) its workers reported, by slot, of the workers that
    /// have ended (a live worker keeps its own count).
    pub(crate) busy_ns: Vec<u64>,
}

/// Why a worker ended, as `WorkersEnded` counts it.
pub(crate) struct EndFacts<'a> {
    pub(crate) kill: Option<&'a KillReason>,
    /// It died of a sandbox limit (its word says so).
    pub(crate) limit: bool,
    /// It was asked to exit.
    pub(crate) retiring: bool,
}

impl Held {
    /// Counts a worker that ended, and its busy time.
    pub(crate) fn worker_ended(&mut self, why: EndFacts<'_>, slot: usize, busy_ns: u64) {
        let e = &mut self.ended;
        let counter = match (why.kill, why.limit, why.retiring) {
            (Some(KillReason::Timeout { .. }), ..) => &mut e.timed_out,
            (Some(KillReason::Cancel), ..) => &mut e.cancelled,
            (Some(KillReason::Limit { .. }), ..) | (None, true, _) => &mut e.limit_exceeded,
            (Some(KillReason::Retired), ..) => &mut e.sandbox_retired,
            (Some(KillReason::Error(_)), ..) => &mut e.broke_protocol,
            (None, false, true) => &mut e.retired,
            (None, false, false) => &mut e.crashed,
        };
        *counter += 1;
        self.add_busy(slot, busy_ns);
    }

    fn add_busy(&mut self, slot: usize, ns: u64) {
        if self.busy_ns.len() <= slot {
            self.busy_ns.resize(slot + 1, 0);
        }
        self.busy_ns[slot] += ns;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_counts_once_in_its_kind() {
        let c = Counters::default();
        c.submitted(0);
        c.submitted(3);
        c.ended(&Ok::<(), Error>(()));
        c.ended(&Err::<(), _>(Error::Cancelled));
        c.ended(&Err::<(), _>(Error::Terminated));
        c.ended(&Err::<(), _>(Error::Closed));
        let s = c.snapshot(&Held::default());
        assert_eq!((s.submitted, s.map_chunks, s.map_items), (2, 1, 3));
        assert_eq!(s.completed, 1);
        assert_eq!(
            (s.failed.cancelled, s.failed.terminated, s.failed.other),
            (1, 1, 1)
        );
        assert_eq!(s.failed.total(), 3);
    }

    #[test]
    fn a_worker_end_counts_under_its_cause_and_keeps_its_busy_time() {
        let mut h = Held::default();
        let facts = |kill, limit, retiring| EndFacts {
            kill,
            limit,
            retiring,
        };
        h.worker_ended(facts(None, false, false), 3, 5);
        h.worker_ended(facts(None, false, true), 3, 7);
        h.worker_ended(facts(None, true, false), 0, 1);
        h.worker_ended(facts(Some(&KillReason::Cancel), false, true), 1, 0);
        assert_eq!(h.busy_ns, vec![1, 0, 0, 12]);
        let e = &h.ended;
        assert_eq!(
            (e.crashed, e.retired, e.limit_exceeded, e.cancelled),
            (1, 1, 1, 1)
        );
    }
}
