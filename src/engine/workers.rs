//! The engine's view of one worker: its connection, the tasks it holds,
//! and what the pool knows and has decided about it. Dispatch writes its
//! tasks (`core.rs`); the supervisor reads its frames (`supervisor.rs`).

use crate::engine::job::{Config, InFlight, KillReason};
use crate::engine::plan::Load;
use crate::proto::conn::{Conn, Flushed};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::Instant;

pub(crate) struct Worker {
    pub(crate) slot: usize,
    pub(crate) pid: u32,
    /// The MPI rank it runs on, if it does.
    pub(crate) rank: Option<usize>,
    pub(crate) conn: Conn,
    pub(crate) ready: bool,
    /// Its write side is shut (or will be once its bytes are out): it
    /// exits once its tasks are done.
    pub(crate) retiring: bool,
    pub(crate) eof: bool,
    pub(crate) in_flight: VecDeque<InFlight>,
    pub(crate) next_seq: u64,
    pub(crate) sent: u64,
    pub(crate) deadline: Option<Instant>,
    /// The task whose start the supervisor first saw, and when (monotonic
    /// ns): the task started by then, whatever its start word says (a
    /// hostile task could write a later start there, to stay clear of its
    /// timeout).
    pub(crate) seen_start: (u64, u64),
    pub(crate) kill: Option<KillReason>,
    /// The task the kill is for (the backend kills only while the worker
    /// runs it; 0: whatever it runs), and whether the backend was asked.
    pub(crate) kill_seq: u64,
    pub(crate) kill_sent: bool,
    /// Cancelled tasks it holds that had not started when cancelled: each
    /// is killed if it starts before it would finish (checked every ms).
    pub(crate) cancels: Vec<u64>,
    pub(crate) init_msg: Option<String>,
    /// `init_msg` is the sandbox's failure, not the initializer's.
    pub(crate) sandbox_failed: bool,
    /// The estimated work (ns) of the tasks it holds.
    pub(crate) held_ns: u64,
    /// Under a per-task CPU cap: the worker's CPU clock, its reading when
    /// the parent last learnt that a task had ended (no task after it can
    /// have used less than what the clock has counted since), and when to
    /// look at it next.
    pub(crate) cpu_clock: Option<crate::sys::sandbox::CpuClock>,
    pub(crate) cpu_base: u64,
    pub(crate) cpu_next: Option<Instant>,
    /// How many tasks it had been sent when a sandboxed worker was last
    /// found idle and looked at (for threads left over by its task).
    pub(crate) idle_checked: u64,
    /// In a sandboxed pool, what it may hand back for one task
    /// (`Config::result_limit`): everything it sends is checked as
    /// untrusted (`proto/untrusted.rs`). `None` without a sandbox.
    pub(crate) result_limit: Option<u64>,
    /// It broke the protocol: it is being killed, and nothing more it sends
    /// is read.
    pub(crate) violated: bool,
    /// The run time (ns) of the tasks it answered, as it reported them.
    pub(crate) busy_ns: u64,
}

/// CPU time (ns) an idle worker may use between its result and its next
/// task: far above its spin (`proto::idle`, at most a few hundred
/// microseconds) and the write of its result.
const IDLE_CPU_NS: u64 = 5_000_000;

impl Worker {
    /// A worker that just started, with its settings queued first.
    pub(crate) fn new(
        slot: usize,
        pid: u32,
        rank: Option<usize>,
        fd: OwnedFd,
        cfg: &Config,
    ) -> Worker {
        Worker {
            slot,
            pid,
            rank,
            conn: Conn::new(fd, cfg.worker_frame()),
            ready: false,
            retiring: false,
            eof: false,
            in_flight: VecDeque::new(),
            next_seq: 1,
            sent: 0,
            deadline: None,
            seen_start: (0, 0),
            kill: None,
            kill_seq: 0,
            kill_sent: false,
            cancels: Vec::new(),
            init_msg: None,
            sandbox_failed: false,
            held_ns: 0,
            // Every sandboxed worker's: the per-task CPU cap reads it, and
            // so does the check of a reused worker's idle time.
            cpu_clock: cfg
                .sandbox
                .as_ref()
                .and_then(|_| crate::sys::sandbox::process_cpu_clock(pid)),
            cpu_base: 0,
            cpu_next: None,
            idle_checked: 0,
            result_limit: cfg.result_limit,
            violated: false,
            busy_ns: 0,
        }
    }

    /// What dispatch needs to know of it.
    pub(crate) fn load(&self, max_tasks: Option<u64>) -> Load {
        Load {
            open: self.ready
                && !self.retiring
                && !self.eof
                && self.kill.is_none()
                && self.deadline.is_none(),
            held_ns: self.held_ns,
            held: self.in_flight.len(),
            room: max_tasks.map_or(u64::MAX, |m| m.saturating_sub(self.sent)),
        }
    }

    /// Whether it counts towards a sandboxed pool's size: not ended nor
    /// being killed (a worker running its last task still counts, so that
    /// its replacement does not compete with that task for the CPU).
    pub(crate) fn counts(&self) -> bool {
        !self.eof && self.kill.is_none()
    }

    /// Whether a sandboxed worker that ran tasks used more CPU since its
    /// last result came than an idle worker can (its spin before it sleeps,
    /// and a margin): something of a task's still runs there, in its one
    /// thread (a task that took over the worker's loop, say).
    pub(crate) fn busy_while_idle(&self) -> bool {
        let Some(clk) = self.cpu_clock else {
            return false;
        };
        let Some(ns) = crate::sys::sandbox::clock_ns(clk) else {
            return false;
        };
        self.sent > 0 && ns.saturating_sub(self.cpu_base) > IDLE_CPU_NS
    }

    /// Retires a sandboxed worker by a kill: it takes no more tasks, and is
    /// never waited for (`KillReason::Retired`).
    pub(crate) fn retire_now(&mut self) {
        self.retiring = true;
        self.set_kill(KillReason::Retired, 0);
    }

    /// Marks it for a kill (the supervisor asks the backend). A kill for a
    /// reason other than a cancel is unconditional and replaces a
    /// cancel's, which the backend may refuse.
    pub(crate) fn set_kill(&mut self, reason: KillReason, seq: u64) {
        self.kill = Some(reason);
        self.kill_seq = seq;
        self.kill_sent = false;
    }

    /// Writes what the socket takes of its pending bytes; shuts the write
    /// side of a retiring worker once everything is out. Returns true if
    /// bytes remain.
    pub(crate) fn flush(&mut self) -> bool {
        match self.conn.flush() {
            Flushed::Pending => true,
            Flushed::Gone => {
                // The worker is gone; its exit report will follow.
                self.eof = true;
                false
            }
            Flushed::All => {
                if self.retiring {
                    self.conn.shutdown_write();
                }
                false
            }
        }
    }

    /// Drops the bytes not yet sent (they may name blocks of jobs that are
    /// being dropped) and returns the tasks it holds.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = InFlight> + '_ {
        self.conn.clear_out();
        self.in_flight.drain(..)
    }
}
