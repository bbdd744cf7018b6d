//! The clocks the supervisor watches: task timeouts (from the moment a
//! worker started its task, as the backend reports it), cancelled tasks
//! that may yet start, and a sandboxed pool's per-task CPU cap.

use crate::engine::core::State;
use crate::engine::job::KillReason;
use crate::engine::seam::Progress;
use crate::sys;
use std::time::{Duration, Instant};

/// How often a task not yet started is looked at again (a timed task, to
/// start its clock; a cancelled one, to kill it if it starts).
pub(crate) const RECHECK: Duration = Duration::from_millis(1);

/// Timeouts and pending cancels. A timeout counts from the moment the
/// worker started the task (as its backend reports it); in a sandboxed
/// pool (`sandboxed`), from the moment it was sent, since a sandboxed task
/// owns the words that say when it started (it could rewind them, and
/// never be timed).
pub(crate) fn check_clocks(st: &mut State, p: &dyn Progress, sandboxed: bool) {
    let now = Instant::now();
    let now_ns = sys::monotonic_ns();
    for w in st.workers.iter_mut() {
        if w.kill().is_some() {
            continue;
        }
        if w.has_cancels() && w.check_cancels(p) {
            continue;
        }
        let Some(d) = w.deadline() else {
            continue;
        };
        if d > now {
            continue;
        }
        let Some((seq, id, timeout, wall_limit)) = w.in_flight().front().map(|f| {
            let t = f.job.timeout.unwrap_or_default();
            (f.seq, f.job.id, t, f.job.wall_limit.then_some(f.job.items))
        }) else {
            w.set_deadline(None);
            continue;
        };
        // A sandboxed task's clock started when it was sent (`push_task`):
        // its start words are the task's own to rewrite.
        let start = if sandboxed {
            w.seen_start_ns()
        } else {
            if p.started(w.slot()) < seq {
                // Not started yet: look again soon.
                w.set_deadline(Some(now + RECHECK));
                continue;
            }
            let seen = w.seen_start(seq, now_ns);
            p.started_at_ns(w.slot()).min(seen)
        };
        let ran = Duration::from_nanos(now_ns.saturating_sub(start));
        if ran < timeout {
            w.set_deadline(Some(now + (timeout - ran)));
            continue;
        }
        // A timed task is alone on its worker: whatever it runs is this task
        // (or it has just finished, and its result is read before the exit
        // is handled).
        let reason = match wall_limit {
            Some(items) => {
                let per_task = timeout / items.max(1);
                let limit = crate::limit::Limit::WallClock { per_task };
                KillReason::Limit { id, limit }
            }
            None => KillReason::Timeout { id, timeout },
        };
        w.set_kill(reason, 0);
        log::warn!(
            "procpool: task {id} ran past {timeout:?}; killing worker {}",
            w.pid()
        );
    }
}

/// What is left of the CPU cap of a worker whose clock reads `ns`: the
/// least of what the item it runs has left (counted from `item`, its start
/// as the worker recorded it, which counts only between `base` and now)
/// and what the whole task has left (`items` caps, counted from `base`,
/// when its last result came). `None` once either is used up.
fn cpu_left(ns: u64, base: u64, item: u64, cap: Duration, items: u32) -> Option<Duration> {
    let item_used = Duration::from_nanos(ns.saturating_sub(item.clamp(base, ns.max(base))));
    let task_used = Duration::from_nanos(ns.saturating_sub(base));
    let task_cap = cap.saturating_mul(items.max(1));
    let left = cap
        .checked_sub(item_used)?
        .min(task_cap.checked_sub(task_used)?);
    (!left.is_zero()).then_some(left)
}

/// How long the CPU clocks of busy workers may go unread, at most, under
/// a per-task CPU cap: the time in which the threads of a task, one per
/// CPU, could together use up the cap (at least a millisecond).
pub(crate) fn cpu_interval(cap: Duration) -> Duration {
    // Asked once: the answer reads the cgroup's files each time.
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let cpus =
        *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    (cap / cpus).max(Duration::from_millis(1))
}

/// The per-task CPU cap of a sandboxed pool: a worker whose CPU clock has
/// counted more than `cap` since the parent last learnt that one of its
/// tasks ended is killed, and its running task fails with the limit.
pub(crate) fn check_cpu(st: &mut State, p: &dyn Progress, cap: Duration) {
    let now = Instant::now();
    for w in st.workers.iter_mut() {
        if !w.cpu().is_on() {
            continue;
        }
        let due = w.cpu().next().is_none_or(|at| at <= now);
        if w.kill().is_some() || w.in_flight().is_empty() || !due {
            continue;
        }
        let Some(ns) = w.cpu().now_ns() else {
            // Gone: its exit report follows.
            w.cpu_mut().look_at(None);
            continue;
        };
        let started = p.started(w.slot());
        let job = &w
            .in_flight()
            .iter()
            .find(|f| f.seq == started)
            .unwrap_or(&w.in_flight()[0])
            .job;
        let (id, items) = (job.id, job.items);
        // The worker records the start of each chunk item (a word it
        // writes, so a hostile task could keep moving it): each item may
        // use the cap from its own start, and the task as a whole at most
        // the cap once per item since its last result came.
        let left = cpu_left(ns, w.cpu().base(), p.item_cpu(w.slot()), cap, items);
        if let Some(left) = left {
            // Its threads together cannot use more than one CPU each per
            // second of wall time.
            w.cpu_mut().look_at(Some(now + cpu_interval(left)));
            continue;
        }
        let limit = crate::sandbox::Limit::CpuTime { per_task: cap };
        log::warn!(
            "procpool: task {id} went past its {limit}; killing worker {}",
            w.pid()
        );
        w.set_kill(KillReason::Limit { id, limit }, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn an_item_may_use_the_cap_from_its_own_start() {
        let cap = Duration::from_millis(100);
        // Item 3 of a chunk of 5 started at 250 ms; 300 ms now.
        assert_eq!(
            cpu_left(300 * MS, 0, 250 * MS, cap, 5),
            Some(Duration::from_millis(50))
        );
        assert_eq!(cpu_left(350 * MS, 0, 250 * MS, cap, 5), None);
    }

    #[test]
    fn a_task_that_keeps_moving_its_item_start_is_capped_per_item() {
        let cap = Duration::from_millis(100);
        // It claims an item started just now, again and again: the task as
        // a whole still stops at one cap per item.
        assert!(cpu_left(99 * MS, 0, 99 * MS, cap, 1).is_some());
        assert_eq!(cpu_left(100 * MS, 0, 100 * MS, cap, 1), None);
        assert!(cpu_left(499 * MS, 0, 499 * MS, cap, 5).is_some());
        assert_eq!(cpu_left(500 * MS, 0, 500 * MS, cap, 5), None);
    }

    #[test]
    fn a_start_word_from_before_the_last_result_or_the_future_counts_nothing() {
        let cap = Duration::from_millis(100);
        // Before `base`: counted from `base`.
        assert_eq!(
            cpu_left(150 * MS, 100 * MS, 0, cap, 1),
            Some(Duration::from_millis(50))
        );
        // In the future: counted as now, so the task cap still holds.
        assert_eq!(cpu_left(150 * MS, 0, u64::MAX, cap, 1), None);
    }
}
