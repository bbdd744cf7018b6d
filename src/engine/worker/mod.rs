//! The engine's view of one worker: its connection, the tasks it holds,
//! and what the pool knows and has decided about it. Its state changes
//! only through its methods: dispatch writes its tasks (`send.rs`), the
//! supervisor reads its frames (`recv.rs`), and the rest of the engine
//! asks it to retire, be killed, or cancel a task (this file).

mod recv;
mod send;

pub(crate) use recv::READ_BUDGET;
pub(crate) use send::frame_bytes;

use crate::engine::completion::Hook;
use crate::engine::job::{Completion, Config, InFlight, KillReason};
use crate::engine::plan::Load;
use crate::engine::seam::Progress;
use crate::error::Error;
use crate::proto::conn::{Conn, Flushed};
use crate::sys::{CpuClock, clock_ns, process_cpu_clock};
use std::collections::{HashSet, VecDeque};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Instant;

pub(crate) struct Worker {
    slot: usize,
    pid: u32,
    /// The MPI rank it runs on, if it does.
    rank: Option<usize>,
    conn: Conn,
    ready: bool,
    /// Its write side is shut (or will be once its bytes are out): it
    /// exits once its tasks are done.
    retiring: bool,
    eof: bool,
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    sent: u64,
    deadline: Option<Instant>,
    seen_start: SeenStart,
    kill: Kill,
    /// Cancelled tasks it holds that had not started when cancelled: each
    /// is killed if it starts before it would finish (checked every ms).
    cancels: Vec<u64>,
    init_msg: Option<String>,
    /// `init_msg` is the sandbox's failure, not the initializer's.
    sandbox_failed: bool,
    /// The estimated work (ns) of the tasks it holds.
    held_ns: u64,
    cpu: CpuWatch,
    /// How many tasks it had been sent when a sandboxed worker was last
    /// found idle and looked at (for threads left over by its task).
    idle_checked: u64,
    /// In a sandboxed pool, what it may hand back for one task
    /// (`Config::result_limit`): everything it sends is checked as
    /// untrusted (`proto/untrusted.rs`). `None` without a sandbox.
    result_limit: Option<u64>,
    /// It broke the protocol: it is being killed, and nothing more it sends
    /// is read.
    violated: bool,
    /// The run time (ns) of the tasks it answered, as it reported them.
    busy_ns: u64,
}

/// The task whose start the supervisor first saw, and when (monotonic
/// ns): the task started by then, whatever its start word says (a hostile
/// task could write a later start there, to stay clear of its timeout).
#[derive(Clone, Copy, Default)]
struct SeenStart {
    seq: u64,
    ns: u64,
}

impl SeenStart {
    /// Task `seq` is seen started at `ns`, unless it was seen earlier;
    /// returns when it was first seen.
    fn note(&mut self, seq: u64, ns: u64) -> u64 {
        if self.seq != seq {
            *self = SeenStart { seq, ns };
        }
        self.ns
    }
}

/// The pool's kill of a worker: why, the task it is for (the backend kills
/// only while the worker runs it; 0: whatever it runs), and whether the
/// backend was asked.
#[derive(Default)]
struct Kill {
    reason: Option<KillReason>,
    seq: u64,
    sent: bool,
}

impl Kill {
    fn set(&mut self, reason: KillReason, seq: u64) {
        *self = Kill {
            reason: Some(reason),
            seq,
            sent: false,
        };
    }
}

/// Under a per-task CPU cap: the worker's CPU clock, its reading when the
/// parent last learnt that a task had ended (no task after it can have
/// used less than what the clock has counted since), and when to look at
/// it next.
pub(crate) struct CpuWatch {
    clock: Option<CpuClock>,
    base: u64,
    next: Option<Instant>,
}

impl CpuWatch {
    /// What the worker's CPU clock reads now; `None` without a clock, or
    /// once the worker is gone.
    pub(crate) fn now_ns(&self) -> Option<u64> {
        clock_ns(self.clock?)
    }

    /// Whether it has a clock to watch.
    pub(crate) fn is_on(&self) -> bool {
        self.clock.is_some()
    }

    /// The reading when the parent last learnt that a task had ended.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// When the clock is to be looked at next, if it is.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.next
    }

    /// Looks at the clock again at `at` (`None`: not until a task is sent).
    pub(crate) fn look_at(&mut self, at: Option<Instant>) {
        self.next = at;
    }

    /// A task ended, or the worker became ready: what the clock counts from
    /// now on is the next task's (read after the frames that said so).
    fn task_ended(&mut self) {
        if let Some(ns) = self.now_ns() {
            self.base = ns;
        }
    }
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
            seen_start: SeenStart::default(),
            kill: Kill::default(),
            cancels: Vec::new(),
            init_msg: None,
            sandbox_failed: false,
            held_ns: 0,
            cpu: CpuWatch {
                // Every sandboxed worker's: the per-task CPU cap reads it,
                // and so does the check of a reused worker's idle time.
                clock: cfg.sandbox.as_ref().and_then(|_| process_cpu_clock(pid)),
                base: 0,
                next: None,
            },
            idle_checked: 0,
            result_limit: cfg.result_limit,
            violated: false,
            busy_ns: 0,
        }
    }

    pub(crate) fn slot(&self) -> usize {
        self.slot
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The MPI rank it runs on, if it does.
    pub(crate) fn rank(&self) -> Option<usize> {
        self.rank
    }

    /// Whether it said it was ready (its initializer ran).
    pub(crate) fn ready(&self) -> bool {
        self.ready
    }

    /// Whether it takes no more tasks (it exits, or is killed, once those
    /// it holds are done).
    pub(crate) fn retiring(&self) -> bool {
        self.retiring
    }

    /// Whether its socket reached end-of-file (it died, or shut its side).
    pub(crate) fn eof(&self) -> bool {
        self.eof
    }

    /// The tasks it holds, oldest first.
    pub(crate) fn in_flight(&self) -> &VecDeque<InFlight> {
        &self.in_flight
    }

    /// How many tasks it has been sent.
    pub(crate) fn sent(&self) -> u64 {
        self.sent
    }

    /// When its timed task's clock is to be looked at next.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub(crate) fn set_deadline(&mut self, d: Option<Instant>) {
        self.deadline = d;
    }

    /// When task `seq` was first seen started: `ns` (monotonic), unless it
    /// was seen earlier.
    pub(crate) fn seen_start(&mut self, seq: u64, ns: u64) -> u64 {
        self.seen_start.note(seq, ns)
    }

    /// When the task last seen started was first seen so (a sandboxed
    /// task's: when it was sent).
    pub(crate) fn seen_start_ns(&self) -> u64 {
        self.seen_start.ns
    }

    /// Why the pool kills it, if it does.
    pub(crate) fn kill(&self) -> Option<&KillReason> {
        self.kill.reason.as_ref()
    }

    /// Whether it holds cancelled tasks that may yet start.
    pub(crate) fn has_cancels(&self) -> bool {
        !self.cancels.is_empty()
    }

    /// The run time (ns) of the tasks it answered, as it reported them.
    pub(crate) fn busy_ns(&self) -> u64 {
        self.busy_ns
    }

    /// Its CPU clock, under a sandbox.
    pub(crate) fn cpu(&self) -> &CpuWatch {
        &self.cpu
    }

    pub(crate) fn cpu_mut(&mut self) -> &mut CpuWatch {
        &mut self.cpu
    }

    /// Its socket, and whether bytes wait to go out on it.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.conn.raw()
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.conn.has_pending()
    }

    /// Whether it said why it could not start.
    pub(crate) fn said_why_start_failed(&self) -> bool {
        self.init_msg.is_some()
    }

    /// Why it could not start, as it said, and whether that was the
    /// sandbox (not the initializer).
    pub(crate) fn take_start_failure(&mut self) -> (Option<String>, bool) {
        (self.init_msg.take(), self.sandbox_failed)
    }

    /// What dispatch needs to know of it.
    pub(crate) fn load(&self, max_tasks: Option<u64>) -> Load {
        Load {
            open: self.ready
                && !self.retiring
                && !self.eof
                && self.kill.reason.is_none()
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
        !self.eof && self.kill.reason.is_none()
    }

    /// Whether a sandboxed worker that ran tasks used more CPU since its
    /// last result came than an idle worker can (its spin before it sleeps,
    /// and a margin): something of a task's still runs there, in its one
    /// thread (a task that took over the worker's loop, say).
    pub(crate) fn busy_while_idle(&self) -> bool {
        let Some(ns) = self.cpu.now_ns() else {
            return false;
        };
        self.sent > 0 && ns.saturating_sub(self.cpu.base) > IDLE_CPU_NS
    }

    /// Whether it answered tasks since a sandboxed worker was last found
    /// idle and looked at; it is looked at now.
    pub(crate) fn answered_since_idle_check(&mut self) -> bool {
        let fresh = self.sent > self.idle_checked;
        self.idle_checked = self.sent;
        fresh
    }

    /// Retires it: it takes no more tasks, and its side of the socket is
    /// shut once its bytes are out, so it exits once its tasks are done.
    /// Returns true if bytes remain.
    pub(crate) fn retire(&mut self) -> bool {
        self.retiring = true;
        self.flush()
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
        self.kill.set(reason, seq);
    }

    /// Its backend killed it on its own (for a task's timeout): the kill
    /// is not to be asked for.
    pub(crate) fn killed_by_backend(&mut self, reason: KillReason) {
        self.kill.set(reason, 0);
        self.kill.sent = true;
    }

    /// The backend refused the kill for task `seq` (the cancelled task had
    /// finished before it): the worker goes on.
    pub(crate) fn kill_refused(&mut self, seq: u64) {
        if matches!(self.kill.reason, Some(KillReason::Cancel)) && self.kill.seq == seq {
            self.kill = Kill::default();
        }
    }

    /// The task to ask the backend to kill it for (0: whatever it runs), if
    /// it is marked for a kill not yet asked for; it is asked for now.
    pub(crate) fn kill_to_send(&mut self) -> Option<u64> {
        if self.kill.reason.is_none() || self.kill.sent {
            return None;
        }
        self.kill.sent = true;
        Some(self.kill.seq)
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

    /// The tasks it holds, taken out, once it ended.
    pub(crate) fn take_held(&mut self) -> Vec<InFlight> {
        self.in_flight.drain(..).collect()
    }

    /// Cancels the tasks among `ids` that it holds.
    ///
    /// Not started yet: the worker is told to skip it, through the one
    /// `skip` word if it is free (the worker stores `started` then reads
    /// `skip`; the parent stores `skip` then reads `started`: if it reads
    /// an earlier task, the worker will see the skip). Else the supervisor
    /// watches for its start (`check_cancels`). Running now: the worker is
    /// killed (the backend checks, with the worker stopped, that it still
    /// runs this task). Finished: its result is dropped when it arrives.
    pub(crate) fn cancel(
        &mut self,
        ids: &HashSet<u64>,
        p: &dyn Progress,
        done: &mut Vec<Completion>,
    ) {
        let mut run = None;
        for f in self.in_flight.iter_mut() {
            if f.job.cancelled || !ids.contains(&f.job.id) {
                continue;
            }
            f.job.cancelled = true;
            let hook = std::mem::replace(&mut f.job.hook, Hook::None);
            done.push(Completion::new(
                f.job.slot.clone(),
                hook,
                Err(Error::Cancelled),
            ));
            let started = p.started(self.slot);
            if started < f.seq && p.skip(self.slot) <= started {
                p.set_skip(self.slot, f.seq);
            } else if started < f.seq {
                self.cancels.push(f.seq);
                continue;
            }
            if p.running(self.slot, f.seq) {
                run = Some(f.seq);
            }
        }
        if let (Some(seq), None) = (run, &self.kill.reason) {
            self.set_kill(KillReason::Cancel, seq);
        }
    }

    /// Cancelled tasks that had not started: kills the worker if one has
    /// started (returns true), forgets those that ran and finished.
    pub(crate) fn check_cancels(&mut self, p: &dyn Progress) -> bool {
        let started = p.started(self.slot);
        let mut run = None;
        let slot = self.slot;
        self.cancels.retain(|&seq| {
            if p.running(slot, seq) {
                run = Some(seq);
                false
            } else {
                // Still waiting to start (past it: it ran and finished).
                started < seq
            }
        });
        if let Some(seq) = run {
            self.set_kill(KillReason::Cancel, seq);
            return true;
        }
        false
    }
}
