//! The dispatch plan, as pure rules: which workers take tasks, in what
//! order, and how many of the queued tasks each takes in one write.
//!
//! Workers report each task's run time; the engine keeps a moving average
//! per task function ([`Estimates`]). A busy worker is only given tasks
//! known to take under [`SHORT_TASK_NS`], up to about [`PIPELINE_NS`] of
//! them, so it never waits for its next batch; a long task, a task of
//! unknown length, one with a timeout (its clock starts when it does) or
//! one with `SharedBuf`s (a worker holds one task's fds at a time) goes to
//! an idle worker alone, so long tasks spread evenly. The least busy
//! workers are served first. (An estimate per worker would be wrong: a
//! worker that had run tiny tasks would take a batch of slow ones.)
//!
//! One exception: a worker on another host (MPI) that runs one long map
//! chunk may hold the next, one deep (`Candidate::prefetch`), since the
//! chunk's result and the next chunk take long enough on the network that
//! the worker would otherwise wait for them.
//!
//! The limit of it: a task that is short by its function's estimate but
//! blocks holds up to about [`PIPELINE_NS`] of estimated work queued behind
//! it on its worker. (While another worker is idle, a quick task goes
//! there instead: `tests/it/apply.rs`.)

use crate::proto::task::TaskFn;
use std::collections::HashMap;

/// The most tasks in one batch.
pub(crate) const MAX_BATCH: usize = 4096;
/// The most bytes of tasks in one batch.
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;
/// A task estimated to take less than this is short: a busy worker may
/// take it.
pub(crate) const SHORT_TASK_NS: u64 = 200_000;
/// About how much short work a worker may hold.
pub(crate) const PIPELINE_NS: u64 = 2_000_000;

/// How long each task function takes per item (a chunk of a map carries
/// many; any other task one): a moving average of the run times that
/// workers report.
#[derive(Default)]
pub(crate) struct Estimates(HashMap<TaskFn, u64>);

impl Estimates {
    /// The time one item of `f` takes.
    pub(crate) fn per_item(&self, f: TaskFn) -> Option<u64> {
        self.0.get(&f).copied()
    }

    /// The time a task of `f` with `items` items takes.
    pub(crate) fn get(&self, f: TaskFn, items: u32) -> Option<u64> {
        self.per_item(f)
            .map(|e| e.saturating_mul(u64::from(items.max(1))))
    }

    /// A task of `f` with `items` items ran for `ns`: the average per item
    /// moves a quarter of the way.
    pub(crate) fn learn(&mut self, f: TaskFn, ns: u64, items: u32) {
        let ns = ns / u64::from(items.max(1));
        self.0
            .entry(f)
            .and_modify(|e| *e = e.saturating_mul(3).saturating_add(ns) / 4)
            .or_insert(ns);
    }
}

/// What dispatch needs to know of a worker.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Load {
    /// It can take tasks (ready; not retiring, ended, being killed or
    /// running a timed task).
    pub(crate) open: bool,
    /// The estimated work (ns) of the tasks it holds.
    pub(crate) held_ns: u64,
    /// How many tasks it holds.
    pub(crate) held: usize,
    /// How many more tasks it may be sent (`max_tasks_per_child`).
    pub(crate) room: u64,
}

/// Whether a worker takes tasks now. A caller (`from_caller`) only hands
/// tasks to idle workers: topping up a busy worker is left to the
/// supervisor, which does it when results come back, with everything
/// queued by then in one write.
pub(crate) fn takes_tasks(w: &Load, from_caller: bool) -> bool {
    w.open && w.room > 0 && !(from_caller && w.held > 0)
}

/// The order in which workers are offered tasks: the least busy first, so
/// that a new task never waits behind another while a worker idles.
pub(crate) fn order(loads: &[Load], into: &mut Vec<usize>) {
    into.clear();
    into.extend(0..loads.len());
    into.sort_by_key(|&i| (loads[i].held_ns, loads[i].held));
}

/// What a queued task brings to the decision.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub(crate) estimate: Option<u64>,
    pub(crate) timed: bool,
    pub(crate) has_shared: bool,
    /// A map chunk that may wait behind one long task on a remote worker
    /// (`Config::prefetch_chunks`).
    pub(crate) prefetch: bool,
}

/// One worker's batch, built one task at a time from the front of the
/// queue: [`Batch::admit`] says whether the next task goes in, and what it
/// counts for.
#[derive(Debug)]
pub(crate) struct Batch {
    left: usize,
    held_ns: u64,
    holds_any: bool,
    /// The worker holds exactly one task, and nothing joined it yet.
    holds_one: bool,
    bytes: usize,
    closed: bool,
}

impl Batch {
    /// A batch for worker `w`, with `queued` tasks waiting and `live` ready
    /// workers to share them: about half a fair share, so that late
    /// workers get some.
    pub(crate) fn new(w: &Load, queued: usize, live: usize) -> Batch {
        let left = queued
            .div_ceil(2 * live.max(1))
            .clamp(1, MAX_BATCH)
            .min(usize::try_from(w.room).unwrap_or(usize::MAX));
        Batch {
            left,
            held_ns: w.held_ns,
            holds_any: w.held > 0,
            holds_one: w.held == 1,
            bytes: 0,
            closed: false,
        }
    }

    /// Whether the next task `c`, whose frame takes `bytes`, joins the
    /// batch; if so, the work it counts for while held.
    pub(crate) fn admit(&mut self, c: Candidate, bytes: usize) -> Option<u64> {
        if self.closed || self.left == 0 {
            return None;
        }
        let short = c.estimate.is_some_and(|e| e < SHORT_TASK_NS) && !c.timed && !c.has_shared;
        // A long map chunk may wait, alone, behind the one task a remote
        // worker runs.
        let prefetch = !short && c.prefetch && !c.timed && !c.has_shared && self.holds_one;
        if self.holds_any && !prefetch && (!short || self.held_ns >= PIPELINE_NS) {
            return None;
        }
        let charge = if short {
            c.estimate.unwrap_or(0).max(1)
        } else {
            PIPELINE_NS
        };
        self.left -= 1;
        self.held_ns += charge;
        self.holds_any = true;
        self.holds_one = false;
        self.bytes += bytes;
        // A long or timed task goes alone; so do the tasks past the size cap.
        if !short || self.bytes >= MAX_BATCH_BYTES {
            self.closed = true;
        }
        Some(charge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(room: u64) -> Load {
        Load {
            open: true,
            held_ns: 0,
            held: 0,
            room,
        }
    }

    fn short() -> Candidate {
        Candidate {
            estimate: Some(1_000),
            timed: false,
            has_shared: false,
            prefetch: false,
        }
    }

    fn count(mut b: Batch, c: Candidate, n: usize) -> usize {
        (0..n).take_while(|_| b.admit(c, 100).is_some()).count()
    }

    #[test]
    fn short_tasks_batch_up_to_half_a_fair_share() {
        // 100 queued over 2 live workers: 25 each.
        assert_eq!(count(Batch::new(&idle(u64::MAX), 100, 2), short(), 100), 25);
        // Never more than MAX_BATCH, never fewer than one.
        let tiny = Candidate {
            estimate: Some(1),
            ..short()
        };
        assert_eq!(
            count(Batch::new(&idle(u64::MAX), 1 << 20, 1), tiny, 1 << 20),
            MAX_BATCH
        );
        // And no more than PIPELINE_NS of estimated work.
        assert_eq!(
            count(Batch::new(&idle(u64::MAX), 1 << 20, 1), short(), 1 << 20),
            (PIPELINE_NS / 1_000) as usize
        );
        assert_eq!(count(Batch::new(&idle(u64::MAX), 1, 8), short(), 1), 1);
    }

    #[test]
    fn unknown_timed_and_shared_tasks_go_alone() {
        for c in [
            Candidate {
                estimate: None,
                ..short()
            },
            Candidate {
                timed: true,
                ..short()
            },
            Candidate {
                has_shared: true,
                ..short()
            },
            Candidate {
                estimate: Some(SHORT_TASK_NS),
                ..short()
            },
        ] {
            let mut b = Batch::new(&idle(u64::MAX), 100, 1);
            assert_eq!(b.admit(c, 100), Some(PIPELINE_NS));
            assert_eq!(b.admit(short(), 100), None, "{c:?} must go alone");
        }
    }

    #[test]
    fn a_busy_worker_takes_only_short_work_up_to_the_pipeline() {
        let busy = Load {
            held_ns: PIPELINE_NS - 2_500,
            held: 3,
            ..idle(u64::MAX)
        };
        let long = Candidate {
            estimate: None,
            ..short()
        };
        assert_eq!(Batch::new(&busy, 100, 1).admit(long, 100), None);
        // 1,000 ns each: three fit before the pipeline is full.
        assert_eq!(count(Batch::new(&busy, 100, 1), short(), 100), 3);
    }

    #[test]
    fn a_remote_worker_running_a_long_chunk_holds_the_next_one() {
        let chunk = Candidate {
            estimate: Some(10 * PIPELINE_NS),
            prefetch: true,
            ..short()
        };
        let one = Load {
            held: 1,
            held_ns: PIPELINE_NS,
            ..idle(u64::MAX)
        };
        let mut b = Batch::new(&one, 100, 1);
        assert_eq!(b.admit(chunk, 100), Some(PIPELINE_NS));
        assert_eq!(b.admit(chunk, 100), None, "one deep only");
        // Not behind two tasks, not a timed one, not where the pool does
        // not prefetch.
        let two = Load { held: 2, ..one };
        assert_eq!(Batch::new(&two, 100, 1).admit(chunk, 100), None);
        for c in [
            Candidate {
                timed: true,
                ..chunk
            },
            Candidate {
                prefetch: false,
                ..chunk
            },
        ] {
            assert_eq!(Batch::new(&one, 100, 1).admit(c, 100), None, "{c:?}");
        }
    }

    #[test]
    fn room_and_bytes_cap_a_batch() {
        assert_eq!(count(Batch::new(&idle(2), 100, 1), short(), 100), 2);
        let mut b = Batch::new(&idle(u64::MAX), 100, 1);
        assert!(b.admit(short(), MAX_BATCH_BYTES).is_some());
        assert!(b.admit(short(), 1).is_none());
    }

    #[test]
    fn who_takes_tasks_and_in_what_order() {
        let busy = Load {
            held: 1,
            held_ns: 5,
            ..idle(9)
        };
        assert!(takes_tasks(&idle(1), true));
        assert!(!takes_tasks(&busy, true));
        assert!(takes_tasks(&busy, false));
        assert!(!takes_tasks(&idle(0), false));
        assert!(!takes_tasks(
            &Load {
                open: false,
                ..idle(1)
            },
            false
        ));
        let mut o = Vec::new();
        order(&[busy, idle(1), busy], &mut o);
        assert_eq!(o[0], 1);
    }

    #[test]
    fn estimates_move_a_quarter_of_the_way() {
        let f = TaskFn { tramp: 1, func: 2 };
        let mut e = Estimates::default();
        assert_eq!(e.get(f, 1), None);
        e.learn(f, 400, 1);
        assert_eq!(e.get(f, 1), Some(400));
        e.learn(f, 0, 1);
        assert_eq!(e.get(f, 1), Some(300));
        // Per item: a chunk of 100 that took 100 x 300 ns leaves it there,
        // and a task of 10 items is estimated at 10 of them.
        e.learn(f, 30_000, 100);
        assert_eq!(e.per_item(f), Some(300));
        assert_eq!(e.get(f, 10), Some(3_000));
    }
}
