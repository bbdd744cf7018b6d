//! What a pool has done since it was built: [`Stats`], from
//! [`Pool::stats`](crate::Pool::stats).

use std::time::Duration;

/// A snapshot of what a pool has done since it was built, and what it
/// holds now.
///
/// Units, exactly:
/// - a **task** is one `apply`/`apply_async` call (one argument), or one
///   chunk of the map family (`map`, `map_async`, `starmap`, `imap`,
///   `imap_unordered`): a map of 10 items in chunks of 3 is 4 tasks;
/// - every task submitted ends exactly once, counted once in
///   [`completed`](Self::completed) or in one kind of
///   [`failed`](Self::failed), with its final outcome: a task cancelled
///   after its value arrived counts as completed, a task that was retried
///   counts once (and once per retry in [`retried`](Self::retried));
/// - a map chunk whose worker answered counts as completed even if some
///   of its items panicked (each item's error is in the map's results);
/// - a task counts once it is taken by the pool: one refused at submission
///   (a closed pool, an argument that cannot be encoded) is not counted.
///
/// Counting costs an atomic add per task, and nothing per item.
///
/// ```
/// fn half(x: u32) -> u32 {
///     assert!(x % 2 == 0, "odd");
///     x / 2
/// }
///
/// let pool = procpool::Pool::builder().processes(2).build()?;
/// assert_eq!(pool.apply(half, 4)?, 2);
/// assert!(pool.apply(half, 3).is_err());
/// let s = pool.stats();
/// assert_eq!((s.submitted, s.completed, s.failed.panicked), (2, 1, 1));
/// assert_eq!(s.workers_started, 2);
/// # Ok::<(), procpool::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Tasks the pool took.
    pub submitted: u64,
    /// Tasks that ended with a value.
    pub completed: u64,
    /// Tasks that ended with an error, by kind.
    pub failed: Failed,
    /// Runs of a task again after its worker was lost while running it
    /// (`retries`): one per retry.
    pub retried: u64,
    /// Chunks of the map family among [`submitted`](Self::submitted).
    pub map_chunks: u64,
    /// Items in those chunks.
    pub map_items: u64,
    /// Workers started: the first ones, replacements, and those a
    /// [`resize`](crate::Pool::resize) added.
    pub workers_started: u64,
    /// Workers that ended while the pool ran, by why. Workers killed by
    /// `terminate` (or dropping the pool) are not counted.
    pub workers_ended: WorkersEnded,
    /// Tasks waiting in the queue now.
    pub queued: usize,
    /// Tasks held by workers now (running, or sent and waiting their turn).
    pub in_flight: usize,
    /// For each worker slot, the time its workers spent running tasks, as
    /// they reported it for each task they answered (a task whose worker
    /// was lost adds nothing). Index: the slot, as in a worker's name
    /// (`myprog:w3` is slot 3).
    pub busy: Vec<Duration>,
}

/// Tasks that ended with an error, by the error's kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failed {
    /// [`Error::TaskPanicked`](crate::Error::TaskPanicked).
    pub panicked: u64,
    /// [`Error::WorkerLost`](crate::Error::WorkerLost),
    /// [`Error::WorkerLostShared`](crate::Error::WorkerLostShared) and,
    /// over MPI, [`Error::RankLost`](crate::Error::RankLost).
    pub worker_lost: u64,
    /// [`Error::Timeout`](crate::Error::Timeout).
    pub timed_out: u64,
    /// [`Error::Cancelled`](crate::Error::Cancelled).
    pub cancelled: u64,
    /// [`Error::LimitExceeded`](crate::Error::LimitExceeded).
    pub limit_exceeded: u64,
    /// [`Error::Encode`](crate::Error::Encode),
    /// [`Error::Decode`](crate::Error::Decode) and
    /// [`Error::TooLarge`](crate::Error::TooLarge).
    pub codec: u64,
    /// [`Error::Terminated`](crate::Error::Terminated).
    pub terminated: u64,
    /// Any other error (a broken pool, a protocol violation, I/O).
    pub other: u64,
}

impl Failed {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.panicked
            + self.worker_lost
            + self.timed_out
            + self.cancelled
            + self.limit_exceeded
            + self.codec
            + self.terminated
            + self.other
    }
}

/// Workers that ended while the pool ran, by why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkersEnded {
    /// Asked to exit, and did: `max_tasks_per_child`,
    /// `max_memory_per_child`, `close`, a shrink.
    pub retired: u64,
    /// Ended unasked: a crash, an `exit`, a signal from outside.
    pub crashed: u64,
    /// Killed by the pool for a task's timeout.
    pub timed_out: u64,
    /// Killed by the pool for a cancel of the task it ran.
    pub cancelled: u64,
    /// Killed for, or died of, a sandbox limit.
    pub limit_exceeded: u64,
    /// Killed by the pool after its task in a sandboxed pool (a process
    /// per task), or before its next one (shared fate).
    pub sandbox_retired: u64,
    /// Killed for breaking the protocol, or for an error reading it.
    pub broke_protocol: u64,
}
