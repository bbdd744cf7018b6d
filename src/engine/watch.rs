//! The clocks the supervisor watches: task timeouts (from the moment a
//! worker started its task, as the backend reports it), cancelled tasks
//! that may yet start, and a sandboxed pool's per-task CPU cap.

use crate::engine::core::State;
use crate::engine::job::KillReason;
use crate::engine::seam::Progress;
use crate::engine::workers::Worker;
use crate::sys;
use std::time::{Duration, Instant};

/// How often a task not yet started is looked at again (a timed task, to
/// start its clock; a cancelled one, to kill it if it starts).
pub(crate) const RECHECK: Duration = Duration::from_millis(1);

/// Timeouts and pending cancels. A timeout counts from the moment the
/// worker started the task (as its backend reports it).
pub(crate) fn check_clocks(st: &mut State, p: &dyn Progress) {
    let now = Instant::now();
    let now_ns = sys::monotonic_ns();
    for w in st.workers.iter_mut() {
        if w.kill.is_some() {
            continue;
        }
        if !w.cancels.is_empty() && check_cancels(w, p) {
            continue;
        }
        let Some(d) = w.deadline else {
            continue;
        };
        if d > now {
            continue;
        }
        let Some((seq, id, timeout)) = w
            .in_flight
            .front()
            .map(|f| (f.seq, f.job.id, f.job.timeout.unwrap_or_default()))
        else {
            w.deadline = None;
            continue;
        };
        if p.started(w.slot) < seq {
            // Not started yet: look again soon.
            w.deadline = Some(now + RECHECK);
            continue;
        }
        if w.seen_start.0 != seq {
            w.seen_start = (seq, now_ns);
        }
        let start = p.started_at_ns(w.slot).min(w.seen_start.1);
        let ran = Duration::from_nanos(now_ns.saturating_sub(start));
        if ran < timeout {
            w.deadline = Some(now + (timeout - ran));
            continue;
        }
        // A timed task is alone on its worker: whatever it runs is this task
        // (or it has just finished, and its result is read before the exit
        // is handled).
        w.set_kill(KillReason::Timeout { id, timeout }, 0);
        log::warn!(
            "procpool: task {id} timed out after {timeout:?}; killing worker {}",
            w.pid
        );
    }
}

/// Cancelled tasks that had not started: kills the worker if one has
/// started (returns true), forgets those that ran and finished.
fn check_cancels(w: &mut Worker, p: &dyn Progress) -> bool {
    let started = p.started(w.slot);
    let mut run = None;
    w.cancels.retain(|&seq| {
        if p.running(w.slot, seq) {
            run = Some(seq);
            false
        } else {
            // Still waiting to start (past it: it ran and finished).
            started < seq
        }
    });
    if let Some(seq) = run {
        w.set_kill(KillReason::Cancel, seq);
        return true;
    }
    false
}

/// How long the CPU clocks of busy workers may go unread, at most, under
/// a per-task CPU cap: the time in which the threads of a task, one per
/// CPU, could together use up the cap (at least a millisecond).
pub(crate) fn cpu_interval(cap: Duration) -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (cap / cpus).max(Duration::from_millis(1))
}

/// The per-task CPU cap of a sandboxed pool: a worker whose CPU clock has
/// counted more than `cap` since the parent last learnt that one of its
/// tasks ended is killed, and its running task fails with the limit.
pub(crate) fn check_cpu(st: &mut State, p: &dyn Progress, cap: Duration) {
    let now = Instant::now();
    for w in st.workers.iter_mut() {
        let Some(clk) = w.cpu_clock else {
            continue;
        };
        if w.kill.is_some() || w.in_flight.is_empty() || w.cpu_next.is_some_and(|at| at > now) {
            continue;
        }
        let Some(ns) = crate::sys::sandbox::clock_ns(clk) else {
            // Gone: its exit report follows.
            w.cpu_next = None;
            continue;
        };
        // From the start of the task or chunk item it runs now, as the
        // worker recorded it, or else from when its last result came.
        let item = p.item_cpu(w.slot);
        let used = Duration::from_nanos(ns.saturating_sub(w.cpu_base.max(item)));
        if used < cap {
            // Its threads together cannot use more than one CPU each per
            // second of wall time.
            w.cpu_next = Some(now + cpu_interval(cap - used));
            continue;
        }
        let started = p.started(w.slot);
        let id = w
            .in_flight
            .iter()
            .find(|f| f.seq == started)
            .unwrap_or(&w.in_flight[0])
            .job
            .id;
        let limit = crate::sandbox::Limit::CpuTime { per_task: cap };
        log::warn!(
            "procpool: task {id} went past its {limit}; killing worker {}",
            w.pid
        );
        w.set_kill(KillReason::Limit { id, limit }, 0);
    }
}
