//! The seam between the engine and a backend: what the engine asks of the
//! place where its workers live, and what it hears back.
//!
//! A backend starts workers in slots, kills them, and reports, as typed
//! [`Event`]s, that a worker started (with the parent's end of its stream
//! socket), could not be started, or ended, and how. The engine then talks
//! to each worker over its socket itself (`proto::conn`), the same way for
//! every backend: the local one hands over the socket of a forked process;
//! the MPI one hands over one end of a socket pair whose other end it
//! relays to a rank. The engine reads how far each worker got (the task it
//! started, when) through [`Progress`]; a backend that cannot see its
//! workers' memory reports what it knows (the MPI backend: the tasks it
//! handed to a rank).
//!
//! Backends import the engine (this seam, `Config`); the engine never
//! imports a backend.

use std::os::fd::{OwnedFd, RawFd};
use std::process::ExitStatus;

/// How a worker ended, as its backend saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Its process ended with this wait status.
    Exited(ExitStatus),
    /// The backend lost sight of the worker without seeing its end (an MPI
    /// rank whose fork server was lost: its workers died with it).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    Abandoned,
    /// Its MPI rank was lost as a whole (`host`: the rank's host name).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    RankLost { rank: usize, host: &'static str },
}

impl End {
    /// Its wait status, for `Error::WorkerLost`; `None` for an abandoned
    /// worker, whose end was not seen.
    pub(crate) fn status(self) -> Option<ExitStatus> {
        match self {
            End::Exited(s) => Some(s),
            End::Abandoned | End::RankLost { .. } => None,
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(s) => write!(f, "{s}"),
            End::Abandoned => write!(f, "abandoned"),
            End::RankLost { rank, host } => write!(f, "lost with MPI rank {rank} on {host}"),
        }
    }
}

/// What a backend reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// The worker for `slot` exists: `pid` names it (on its rank's host,
    /// over MPI: `rank` says which), and `conn` is the parent's end of its
    /// stream.
    Started {
        slot: usize,
        pid: u32,
        rank: Option<usize>,
        conn: OwnedFd,
    },
    /// The worker for `slot` could not be started; `cause` says why.
    StartFailed { slot: usize, cause: String },
    /// A kill for task `task` only was not carried out: the worker had
    /// finished that task (or the backend cannot kill one task).
    KillRefused { slot: usize, task: u64 },
    /// The backend killed the worker in `slot` because task `task` ran past
    /// its timeout (a backend that keeps the tasks' clocks itself: MPI
    /// ranks). Its `Ended` follows.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    TimedOut { slot: usize, task: u64 },
    /// The worker in `slot` ended.
    Ended { slot: usize, end: End },
    /// An MPI rank was lost as a whole (`why`): it hosts no workers from
    /// now on, and the backend can host at most `capacity` workers. Its
    /// workers' `Ended` (`End::RankLost`) follow.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    RankLost {
        rank: usize,
        host: &'static str,
        why: String,
        capacity: usize,
    },
    /// The backend itself ended: nothing more can be started or reaped.
    Gone,
}

/// How far the worker in each slot got, as the backend can see it.
pub(crate) trait Progress: Send + Sync {
    /// The sequence number of the last task it started (0: none).
    fn started(&self, slot: usize) -> u64;
    /// When it started that task (monotonic ns).
    fn started_at_ns(&self, slot: usize) -> u64;
    /// Whether it is running task `seq` now.
    fn running(&self, slot: usize, seq: u64) -> bool;
    /// The task it was told to skip (0: none).
    fn skip(&self, slot: usize) -> u64;
    /// Tells it to skip task `seq` if it has not started it.
    fn set_skip(&self, slot: usize, seq: u64);
    /// Its CPU clock at the start of the item it runs (sandboxed workers).
    fn item_cpu(&self, slot: usize) -> u64;
    /// Which item of the task it started last it ran (1 + the item's place
    /// in its chunk; 0: none yet), read once it has ended. Only where
    /// `Config::item_progress` says the backend sees it.
    fn item(&self, _slot: usize) -> u64 {
        0
    }
    /// The limit it said it died of, if any (sandboxed workers).
    fn died_of(&self, slot: usize) -> u64;
}

/// Where workers live.
pub(crate) trait Backend: Send {
    /// What it is, for messages ("the fork server").
    fn what(&self) -> &'static str;
    /// The pid of the process that starts workers (this process, if a
    /// thread of it does).
    fn pid(&self) -> u32;
    /// Asks for a worker in `slot`; answered by `Started` or `StartFailed`.
    fn start(&mut self, slot: usize);
    /// Asks for worker `pid` (in `slot`) to be killed: whatever it runs
    /// (`task` 0) or only while it runs task `task`.
    fn kill(&mut self, slot: usize, pid: u32, task: u64);
    /// Task `task`, just sent to the worker in `slot`, may run for at most
    /// `limit`: a backend that keeps timeouts itself (on the clock of the
    /// host that runs the task) kills the worker past it and reports
    /// `TimedOut`. Others are not told (the engine keeps their timeouts).
    fn keep_timeout(&mut self, _slot: usize, _task: u64, _limit: std::time::Duration) {}
    /// The fd to poll for its events, and whether it has requests waiting
    /// to be sent (poll for writing too). `None` once it is closed.
    fn poll_fd(&self) -> Option<(RawFd, bool)>;
    /// Sends waiting requests.
    fn flush(&mut self);
    /// Appends what it has to report (without waiting).
    fn events(&mut self, out: &mut Vec<Event>);
    /// The crash report of the worker in `slot` (the last bytes it wrote
    /// to its stderr), when its stderr goes through the pool: after what
    /// its pipe holds now was read (never waiting for more). Asked for a
    /// live worker after it reported a panic, and for an ended one right
    /// after its `Ended`.
    fn last_words(&mut self, _slot: usize) -> Option<std::sync::Arc<str>> {
        None
    }
    /// Whether it can still start workers.
    fn is_open(&self) -> bool;
    /// Stops it: it ends its workers and itself.
    fn close(&mut self);
    /// Closes it and waits for it to end; says how it ended if that is
    /// more than "it exited" ("the fork server exited (killed by signal
    /// 9, SIGKILL)").
    fn wait(self: Box<Self>) -> String;
}
