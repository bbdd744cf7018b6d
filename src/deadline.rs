//! Soft time limits, as billiard's (Celery's pool) `soft_time_limit`: a
//! task can see that its soft limit has passed, and stop early with a
//! partial result or clean up, before its hard [`timeout`] kills its
//! worker. Rust has no exception to raise inside running code, so it is
//! cooperative: the task asks [`deadline_passed`] (or [`time_left`]) where
//! it can stop.
//!
//! The limit travels with the task (a SOFT_LIMIT frame before its TASK frame);
//! the worker sets the deadline from the moment it starts the task, in a
//! word that every thread of the worker process can read.
//!
//! [`timeout`]: crate::TaskOptions::timeout

use crate::sys;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The running task's soft deadline (CLOCK_MONOTONIC ns); 0: none.
static SOFT_DEADLINE_NS: AtomicU64 = AtomicU64::new(0);

/// In the worker, as a task starts at `start_ns`: its soft limit, if any.
pub(crate) fn begin_task(start_ns: u64, soft_ns: Option<u64>) {
    SOFT_DEADLINE_NS.store(soft_deadline(start_ns, soft_ns), Ordering::SeqCst);
}

/// The soft deadline of a task that starts at `start_ns` with the soft
/// limit `soft_ns`, as [`SOFT_DEADLINE_NS`] holds it: 0 for none, so a
/// real deadline is never 0, and one past the clock's end is its end.
fn soft_deadline(start_ns: u64, soft_ns: Option<u64>) -> u64 {
    soft_ns.map_or(0, |s| start_ns.saturating_add(s).max(1))
}

/// In a sandboxed worker: the status word where each task (each item of a
/// chunk) records the worker's CPU time as it starts.
static ITEM_CPU: std::sync::OnceLock<&'static AtomicU64> = std::sync::OnceLock::new();

/// In a new sandboxed worker: where to record each item's start.
pub(crate) fn record_item_cpu_in(word: &'static AtomicU64) {
    let _ = ITEM_CPU.set(word);
}

/// In the worker, as a task or an item of a chunk starts: its CPU time
/// then, for the parent's per-task CPU cap (a chunk's items are tasks).
pub(crate) fn item_starting() {
    if let Some(w) = ITEM_CPU.get()
        && let Some(ns) = crate::sys::clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
    {
        w.store(ns, Ordering::SeqCst);
    }
}

/// In the worker, once the task is done.
pub(crate) fn end_task() {
    SOFT_DEADLINE_NS.store(0, Ordering::SeqCst);
}

/// Whether the running task's soft time limit has passed: then it should
/// wind up, with a partial result if it has one, before its hard timeout
/// kills its worker. False when the task has no soft limit, and outside a
/// task (in your own process, say). Any thread of the worker may ask.
///
/// Set the limit with [`TaskOptions::soft_timeout`],
/// [`MapOptions::soft_timeout`] (per chunk) or
/// [`PoolBuilder::soft_timeout`] (a default for every task); it counts
/// from the moment the task starts, as the hard timeout does.
///
/// ```
/// use procpool::{Pool, TaskOptions};
/// use std::time::Duration;
///
/// // Sums as many terms as it has time for, and says whether it finished.
/// fn partial_sum(n: u64) -> (u64, bool) {
///     let mut sum = 0;
///     for i in 0..n {
///         if i % 1024 == 0 && procpool::deadline_passed() {
///             return (sum, false);         // out of time: what we have
///         }
///         sum = sum.wrapping_add(i);
///         if i % 1024 == 0 { std::thread::sleep(Duration::from_millis(1)); }
///     }
///     (sum, true)
/// }
///
/// let pool = Pool::builder().processes(1).build()?;
/// let opts = TaskOptions::new()
///     .soft_timeout(Duration::from_millis(50))  // asks the task to stop
///     .timeout(Duration::from_secs(60));        // kills it if it does not
/// let (sum, finished) = pool.apply_with(partial_sum, u64::MAX, opts)?;
/// assert!(!finished && sum > 0);
/// assert!(!procpool::deadline_passed());        // not in a task here
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// [`TaskOptions::soft_timeout`]: crate::TaskOptions::soft_timeout
/// [`MapOptions::soft_timeout`]: crate::MapOptions::soft_timeout
/// [`PoolBuilder::soft_timeout`]: crate::PoolBuilder::soft_timeout
pub fn deadline_passed() -> bool {
    let d = SOFT_DEADLINE_NS.load(Ordering::SeqCst);
    d != 0 && sys::monotonic_ns() >= d
}

/// How long the running task has until its soft time limit (zero once it
/// has passed); `None` when the task has no soft limit, and outside a task.
/// See [`deadline_passed`].
///
/// ```
/// use procpool::TaskOptions;
/// use std::time::Duration;
/// fn budget(_: ()) -> Option<Duration> { procpool::time_left() }
/// let pool = procpool::Pool::builder().processes(1).build()?;
/// let left = pool.apply_with(budget, (), TaskOptions::new().soft_timeout(Duration::from_secs(30)))?;
/// assert!(left.is_some_and(|d| d <= Duration::from_secs(30)));
/// assert_eq!(pool.apply(budget, ())?, None);
/// # Ok::<(), procpool::Error>(())
/// ```
pub fn time_left() -> Option<Duration> {
    let d = SOFT_DEADLINE_NS.load(Ordering::SeqCst);
    (d != 0).then(|| Duration::from_nanos(d.saturating_sub(sys::monotonic_ns())))
}

/// A duration as the nanoseconds a SOFT frame carries.
pub(crate) fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soft_deadline_counts_from_the_start_and_is_never_none_by_mistake() {
        assert_eq!(soft_deadline(1_000, None), 0);
        assert_eq!(soft_deadline(1_000, Some(500)), 1_500);
        // A zero limit at the clock's zero is still a deadline (not 0).
        assert_eq!(soft_deadline(0, Some(0)), 1);
        assert_eq!(soft_deadline(u64::MAX - 1, Some(10)), u64::MAX);
    }

    #[test]
    fn a_duration_travels_as_saturated_nanoseconds() {
        assert_eq!(nanos(Duration::from_millis(3)), 3_000_000);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
    }
}
