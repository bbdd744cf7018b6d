//! What the engine moves around: the pool's settings ([`Config`]), a task
//! on its way ([`Job`]), a task a worker holds ([`InFlight`]), and why the
//! pool kills a worker ([`KillReason`]).

use crate::engine::completion::{Hook, Outcome, Slot};
use crate::error::Error;
use crate::proto::shared_buf::Region;
use crate::proto::shm::Body;
use crate::proto::task::TaskFn;
use crate::proto::wire::{self, Header};
use std::sync::Arc;
use std::time::Duration;

/// A finished task's outcome, with where it goes, to be stored once the
/// state lock is released.
pub(crate) struct Completion {
    pub(crate) slot: Arc<Slot>,
    pub(crate) hook: Hook,
    pub(crate) outcome: Outcome,
}

impl Completion {
    pub(crate) fn new(slot: Arc<Slot>, hook: Hook, outcome: Outcome) -> Completion {
        Completion {
            slot,
            hook,
            outcome,
        }
    }
}

/// The pool's settings, fixed at build time.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) processes: usize,
    pub(crate) max_tasks_per_child: Option<u64>,
    pub(crate) timeout: Option<Duration>,
    /// The default soft time limit of a task.
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: u32,
    /// Whether workers run an initializer before they are ready.
    pub(crate) has_init: bool,
    /// Whether each task's code must lie in the executable (workers that
    /// are not forks of the caller: an exec'd server, MPI ranks).
    pub(crate) check_task: Option<fn(TaskFn) -> Result<(), Error>>,
    /// Whether workers record a backtrace when a task panics.
    pub(crate) backtraces: bool,
    /// The level up to which workers send their log records to this
    /// process's logger (`proto::logs`).
    pub(crate) forward_logs: log::LevelFilter,
    /// A worker whose private memory grew by more than this is replaced
    /// after its task.
    pub(crate) max_memory_per_child: Option<u64>,
    /// A sandboxed pool's caps.
    pub(crate) sandbox: Option<crate::sandbox::Limits>,
    /// In a sandboxed pool, what a worker may hand back for one task, in
    /// bytes (frames, blocks and buffers together; `Sandbox::result_limit`):
    /// the supervisor believes no claim past it, and takes everything such
    /// a worker sends as untrusted (`proto/untrusted.rs`). `None` without a
    /// sandbox.
    pub(crate) result_limit: Option<u64>,
    /// Whether `SharedBuf`s travel as copies (MPI ranks, beyond shared
    /// memory) rather than by reference.
    pub(crate) inline_shared: bool,
    /// Whether arguments always travel inside the task's frame, never in a
    /// shared-memory block: the MPI backend's streams cross hosts, and no
    /// fd goes with them.
    pub(crate) inline_bodies: bool,
    /// Whether the backend keeps the tasks' timeouts itself, on the clock
    /// of the host that runs them (MPI ranks): each timed task's limit then
    /// goes to the backend with it (`Backend::keep_timeout`), and the engine kills nothing on
    /// its own clock.
    pub(crate) backend_keeps_timeouts: bool,
    /// Whether a worker running a long map chunk may be sent the next one
    /// to hold (one deep): for workers on other hosts, where a chunk's
    /// result and the next chunk take long enough on the way that the
    /// worker would otherwise wait for them.
    pub(crate) prefetch_chunks: bool,
    /// How long the supervisor polls without sleeping once it runs out of
    /// work (`proto::idle`): longer for workers on other hosts.
    pub(crate) spin: std::time::Duration,
    /// Whether the backend sees which item of a chunk a dead worker ran
    /// (`Progress::item`): then an `imap` may size its chunks itself, a
    /// crash failing only the item that ran. The local backend does; the
    /// MPI backend does not.
    pub(crate) item_progress: bool,
}

impl Config {
    /// The timeout of a task whose own is `own` and that carries `items`
    /// items, and whether it is the sandbox's wall-clock limit.
    pub(crate) fn timeout_of(&self, own: Option<Duration>, items: u32) -> (Option<Duration>, bool) {
        match (own.or(self.timeout), &self.sandbox) {
            (Some(t), _) => (Some(t), false),
            (None, Some(l)) => (Some(l.wall_clock.saturating_mul(items.max(1))), true),
            (None, None) => (None, false),
        }
    }

    /// The CONFIG frame that a new worker reads before its first task, if
    /// anything differs from a worker's defaults.
    pub(crate) fn worker_frame(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.backtraces {
            flags |= wire::CONFIG_BACKTRACES;
        }
        flags |= crate::proto::logs::config_flags(self.forward_logs);
        let memory = self.max_memory_per_child.unwrap_or(0);
        let mut out = Vec::new();
        if flags != 0 || memory != 0 {
            Header::config(flags, memory).push(&mut out);
        }
        out
    }
}

/// One task on its way through the pool.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) f: TaskFn,
    pub(crate) payload: Body,
    pub(crate) slot: Arc<Slot>,
    pub(crate) hook: Hook,
    pub(crate) timeout: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: u32,
    pub(crate) cancelled: bool,
    /// The `SharedBuf`s its argument moved out of the caller's hands: sent
    /// with it, and kept here (where nothing else can reach them) until
    /// its result brings them back or it fails.
    pub(crate) shared: Vec<Region>,
    /// Whether it runs again after its worker died part-way even though it
    /// holds `SharedBuf`s (which that worker may have half written).
    pub(crate) retry_shared: bool,
    /// How many items it carries (a map chunk's; 1 for `apply`): under a
    /// per-task CPU cap it may use the cap once per item.
    pub(crate) items: u32,
    /// Its timeout is the sandbox's wall-clock limit (it had none of its
    /// own): past it, it fails with `LimitExceeded`, not `Timeout`.
    pub(crate) wall_limit: bool,
    /// `Some(lead)`: a chunk the pool sized itself (an `imap` without a
    /// chunk size), whose input starts with `lead` bytes that are not its
    /// items (a [`Task`](crate::Task)'s state; 0 for a plain `fn`). If its
    /// worker dies, only the item that ran fails; the others run again.
    pub(crate) split: Option<usize>,
    /// The items of a split chunk that failed already, by their place in
    /// the chunk as it was submitted (ascending), with their errors: they
    /// are no longer in its payload, and join its result in their places.
    pub(crate) lost: Vec<(u32, Error)>,
}

/// What a caller hands to `submit`.
pub(crate) struct JobSpec {
    pub(crate) f: TaskFn,
    pub(crate) payload: Body,
    /// The `SharedBuf`s its input moved out of the caller's hands.
    pub(crate) shared: Vec<Region>,
    pub(crate) hook: Hook,
    /// How many items it carries: a map chunk's, or 0 for `apply` (which
    /// counts as one item: under a per-task CPU cap a task may use the cap
    /// once per item).
    pub(crate) items: u32,
    /// See [`Job::split`].
    pub(crate) split: Option<usize>,
    pub(crate) opts: JobOptions,
}

/// What the caller asked for each job of one call (its `TaskOptions` or
/// `MapOptions`); `None`: the pool's setting.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct JobOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
    pub(crate) retry_shared: bool,
}

/// A job sent to a worker, under the number the worker knows it by.
pub(crate) struct InFlight {
    pub(crate) seq: u64,
    pub(crate) job: Job,
    /// The work, in estimated nanoseconds, this task counts for while held.
    pub(crate) charge: u64,
}

/// Why the pool itself killed a worker.
pub(crate) enum KillReason {
    Timeout {
        id: u64,
        timeout: Duration,
    },
    /// Task `id` went past a limit of the sandbox (its CPU time).
    Limit {
        id: u64,
        limit: crate::sandbox::Limit,
    },
    Cancel,
    Error(Error),
    /// Its tasks are done and it is not trusted to exit by itself (a
    /// sandboxed worker, which its task owns): it is killed, never waited
    /// for.
    Retired,
}
