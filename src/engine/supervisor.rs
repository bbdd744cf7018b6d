//! The parent's side of the pool: the task queue, dispatch to workers, the
//! supervisor thread that collects results, sees deaths, enforces timeouts
//! and replaces workers.
//!
//! Locking: one mutex guards [`State`]. Callers submit under it and, when a
//! worker is idle, write the tasks to its socket themselves (non-blocking),
//! so a synchronous `apply` costs no hop through another thread on the way
//! out. The supervisor thread polls every worker socket, the fork server's
//! socket and an eventfd; it reads results without ever waiting behind a
//! write (every parent-side socket is non-blocking and unsent bytes wait in
//! a per-worker buffer until the socket is writable). Outcomes are stored
//! in their slots after the lock is released.

use crate::api::result::{Buf, Handler, Hook, Outcome, Payload, Slot, complete};
use crate::backend::local::server::{self, Msg};
use crate::error::Error;
use crate::proto::shared_buf::{Region, Supply};
use crate::proto::shm::{BlockCache, Body, Lent};
use crate::proto::status::SharedWords;
use crate::proto::task::{self, TaskFn, status};
use crate::proto::wire::{self, HDR, Header};
use crate::sys;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// At most this many tasks go to one worker in one write.
const MAX_BATCH: usize = 4096;
/// ... and at most about this many bytes.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// A task shorter than this (as its worker measured the last ones) may be
/// sent while the worker is still busy with others.
const SHORT_TASK_NS: u64 = 200_000;
/// How much work, in nanoseconds, a worker with short tasks may hold.
const PIPELINE_NS: u64 = 2_000_000;
/// A result body at least this large is handed over without a copy.
const HAND_OVER: usize = 1 << 20;
const READ_CHUNK: usize = 256 << 10;

/// What answers the supervisor's SPAWN and KILL requests and reports exits
/// (the protocol in `server.rs`): the fork server, a child process; or a
/// thread of this process that speaks the same protocol for another
/// transport (MPI ranks).
pub(crate) enum ServerHandle {
    Process(libc::pid_t),
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    Thread(std::thread::JoinHandle<()>),
}

impl ServerHandle {
    /// Waits for the server to end (reaps the process, joins the thread);
    /// returns the process's exit status, if it could be had. Never waits
    /// for a server that has ended: one reaped by another (the kernel, when
    /// this process ignores SIGCHLD) is `ECHILD`, and counts as gone.
    fn wait(self) -> Option<ExitStatus> {
        match self {
            ServerHandle::Process(pid) => sys::reap(pid).ok().map(ExitStatus::from_raw),
            ServerHandle::Thread(h) => {
                let _ = h.join();
                None
            }
        }
    }

    /// What the server is, for an error message.
    fn what(&self) -> &'static str {
        match self {
            ServerHandle::Process(_) => "the fork server",
            ServerHandle::Thread(_) => "the pool's server thread",
        }
    }
}

/// Why the pool broke when its server ended on its own: "the fork server
/// exited (killed by signal 9, SIGKILL)".
fn server_exit_reason(what: &str, status: Option<ExitStatus>) -> String {
    let how = match status {
        Some(s) => match (s.signal(), s.code()) {
            (Some(sig), _) => {
                let name = match sig {
                    libc::SIGHUP => ", SIGHUP",
                    libc::SIGINT => ", SIGINT",
                    libc::SIGQUIT => ", SIGQUIT",
                    libc::SIGABRT => ", SIGABRT",
                    libc::SIGKILL => ", SIGKILL",
                    libc::SIGSEGV => ", SIGSEGV",
                    libc::SIGTERM => ", SIGTERM",
                    _ => "",
                };
                format!(" (killed by signal {sig}{name})")
            }
            (None, Some(code)) => format!(" (exit status {code})"),
            (None, None) => String::new(),
        },
        None => String::new(),
    };
    format!("{what} exited{how}")
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
    pub(crate) check_tasks: bool,
    /// Whether workers record a backtrace when a task panics.
    pub(crate) backtraces: bool,
    /// A worker whose private memory grew by more than this is replaced
    /// after its task.
    pub(crate) max_memory_per_child: Option<u64>,
    /// A sandboxed pool's caps.
    pub(crate) sandbox: Option<crate::sandbox::Limits>,
    /// Whether `SharedBuf`s travel as copies (MPI ranks, beyond shared
    /// memory) rather than by reference.
    pub(crate) inline_shared: bool,
}

impl Config {
    /// The CONFIG frame that a new worker reads before its first task, if
    /// anything differs from a worker's defaults.
    fn worker_frame(&self) -> Vec<u8> {
        let mut flags = 0;
        if self.backtraces {
            flags |= wire::CONFIG_BACKTRACES;
        }
        let memory = self.max_memory_per_child.unwrap_or(0);
        let mut out = Vec::new();
        if flags != 0 || memory != 0 {
            let at = Header::new(wire::CONFIG, 0, flags, memory).begin(&mut out);
            wire::finish(&mut out, at, 0);
        }
        out
    }
}

/// RUNNING → CLOSED → (all work done, workers exited) finished;
/// RUNNING or CLOSED → TERMINATED → (workers killed and reaped) finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Closed,
    Terminated,
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
}

/// What a caller hands to `submit`.
pub(crate) struct JobSpec {
    pub(crate) f: TaskFn,
    pub(crate) payload: Body,
    pub(crate) hook: Hook,
    pub(crate) timeout: Option<Duration>,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
    pub(crate) shared: Vec<Region>,
    pub(crate) retry_shared: bool,
}

struct InFlight {
    seq: u64,
    job: Job,
    /// The work, in estimated nanoseconds, this task counts for while held.
    charge: u64,
}

/// Why the pool itself killed a worker.
enum KillReason {
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
}

struct Worker {
    slot: usize,
    pid: u32,
    fd: OwnedFd,
    ready: bool,
    /// Its write side is shut: it exits once its tasks are done.
    retiring: bool,
    eof: bool,
    out: Vec<u8>,
    out_pos: usize,
    /// fds to send with the byte at each offset of `out` (blocks that the
    /// jobs in flight own).
    out_fds: VecDeque<(usize, i32)>,
    inbuf: Vec<u8>,
    /// fds received, in order, for the frames that name a block.
    in_fds: VecDeque<OwnedFd>,
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    sent: u64,
    deadline: Option<Instant>,
    /// The task whose start this thread first saw, and when (monotonic ns):
    /// the task started by then, whatever its start word says (a hostile
    /// task could write a later start there, to stay clear of its timeout).
    seen_start: (u64, u64),
    kill: Option<KillReason>,
    /// The task the kill is for (the server kills only while the worker
    /// runs it; 0: whatever it runs), and whether the server was asked.
    kill_seq: u64,
    kill_sent: bool,
    /// Cancelled tasks it holds that had not started when cancelled: each
    /// is killed if it starts before it would finish (checked every ms).
    cancels: Vec<u64>,
    init_msg: Option<String>,
    /// `init_msg` is the sandbox's failure, not the initializer's.
    sandbox_failed: bool,
    /// The estimated work (ns) of the tasks it holds.
    held_ns: u64,
    /// Under a per-task CPU cap: the worker's CPU clock, its reading when
    /// the parent last learnt that a task had ended (no task after it can
    /// have used less than what the clock has counted since), and when to
    /// look at it next.
    cpu_clock: Option<libc::clockid_t>,
    cpu_base: u64,
    cpu_next: Option<Instant>,
}

type Completion = (Arc<Slot>, Hook, Outcome);

pub(crate) struct State {
    pub(crate) phase: Phase,
    queue: VecDeque<Job>,
    workers: Vec<Worker>,
    /// Slots whose worker the server is forking, with the outcomes held
    /// back until it exists (so that once a lost task's error is seen, its
    /// replacement is already in `worker_pids`).
    spawning: Vec<(usize, Vec<Completion>)>,
    free_slots: Vec<usize>,
    /// How long each task function takes: a moving average of the run times
    /// that workers report.
    est: std::collections::HashMap<TaskFn, u64>,
    broken: Option<Error>,
    /// Workers with an initializer that died before they were ready, since
    /// one last was (see `worker_exited`).
    unready_deaths: u32,
    building: bool,
    init_error: Option<Error>,
    ready: usize,
    server: Link,
    server_pid: u32,
    server_handle: Option<ServerHandle>,
    /// Failed worker starts in a row (see `start_failed`), and when the
    /// next retry is due.
    start_failures: u32,
    respawn_at: Option<Instant>,
    /// The server closed its socket: it is ending on its own (it never
    /// closes it otherwise), and the pool with it.
    server_lost: bool,
    pub(crate) finished: bool,
}

/// Everything the pool's threads share.
pub(crate) struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    wake: OwnedFd,
    words: Arc<SharedWords>,
    pub(crate) blocks: Arc<BlockCache>,
    next_id: std::sync::atomic::AtomicU64,
    pub(crate) handler: Handler,
    pub(crate) cfg: Config,
}

impl Shared {
    pub(crate) fn new(
        cfg: Config,
        server: OwnedFd,
        handle: ServerHandle,
        words: Arc<SharedWords>,
        slots: usize,
    ) -> Result<Arc<Shared>, Error> {
        let ready = sys::set_nonblocking(&server)
            .map_err(|e| Error::io("configuring the fork server socket", e))
            .and_then(|()| sys::eventfd().map_err(|e| Error::io("creating an eventfd", e)));
        let wake = match ready {
            Ok(fd) => fd,
            Err(e) => {
                // Closing its socket makes the server exit; reap it.
                drop(server);
                handle.wait();
                return Err(e);
            }
        };
        Ok(Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::Running,
                queue: VecDeque::new(),
                workers: Vec::new(),
                spawning: Vec::new(),
                free_slots: (0..slots).rev().collect(),
                est: std::collections::HashMap::new(),
                broken: None,
                unready_deaths: 0,
                building: true,
                init_error: None,
                ready: 0,
                server: Link {
                    fd: Some(server),
                    out: VecDeque::new(),
                },
                server_pid: match &handle {
                    ServerHandle::Process(pid) => *pid as u32,
                    ServerHandle::Thread(_) => std::process::id(),
                },
                server_handle: Some(handle),
                start_failures: 0,
                respawn_at: None,
                server_lost: false,
                finished: false,
            }),
            cv: Condvar::new(),
            wake,
            words,
            blocks: Arc::new(if cfg.sandbox.is_some() {
                BlockCache::sandboxed()
            } else {
                BlockCache::default()
            }),
            next_id: std::sync::atomic::AtomicU64::new(1),
            handler: Handler::new(),
            cfg,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        sys::eventfd_signal(self.wake.as_raw_fd());
    }

    fn run_completions(&self, done: Vec<Completion>) {
        for (slot, hook, outcome) in done {
            complete(slot, hook, outcome, &self.handler);
        }
    }

    /// Asks the server for the first workers and waits until all are ready.
    pub(crate) fn start_workers(&self) -> Result<(), Error> {
        let mut st = self.lock();
        for _ in 0..self.cfg.processes {
            let _ = st.request_spawn(Vec::new());
        }
        drop(st);
        self.wake();
        let mut st = self.lock();
        loop {
            if let Some(e) = st.init_error.clone().or_else(|| st.broken.clone()) {
                st.building = false;
                return Err(e);
            }
            if st.ready >= self.cfg.processes {
                st.building = false;
                return Ok(());
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A fresh slot for a task (its id is the job's).
    pub(crate) fn new_slot(&self) -> Arc<Slot> {
        Slot::new(self.reserve_ids(1))
    }

    /// Reserves `n` consecutive job ids.
    pub(crate) fn reserve_ids(&self, n: u64) -> u64 {
        self.next_id.fetch_add(n, Ordering::Relaxed)
    }

    /// Queues jobs (all or none) and dispatches what idle workers can take.
    pub(crate) fn submit(&self, jobs: Vec<(Arc<Slot>, JobSpec)>) -> Result<(), Error> {
        if self.cfg.check_tasks {
            for (_, s) in &jobs {
                crate::backend::local::start::check_task(s.f)?;
            }
        }
        let mut jobs = jobs;
        if self.blocks.is_sandboxed() {
            // A sandboxed worker gets its input sealed: it can neither change
            // it (for a retry on another worker) nor truncate it.
            for (_, s) in jobs.iter_mut() {
                if let Body::Shm(b, _) = &mut s.payload {
                    b.seal()
                        .map_err(|e| Error::io("sealing a shared-memory block", e))?;
                }
            }
        }
        let mut st = self.lock();
        if let Some(e) = st.refusal() {
            return Err(e);
        }
        for (slot, s) in jobs {
            st.queue.push_back(Job {
                id: slot.id,
                f: s.f,
                payload: s.payload,
                slot,
                hook: s.hook,
                timeout: s.timeout.or(self.cfg.timeout),
                soft_timeout: s.soft_timeout.or(self.cfg.soft_timeout),
                retries: s.retries.unwrap_or(self.cfg.retries),
                cancelled: false,
                shared: s.shared,
                retry_shared: s.retry_shared,
            });
        }
        let pending = st.dispatch(&self.cfg, true);
        drop(st);
        if pending {
            self.wake();
        }
        Ok(())
    }

    /// Cancels the jobs with these ids; returns whether any was cancelled.
    pub(crate) fn cancel(&self, ids: &[u64]) -> bool {
        let ids: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let mut done = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let mut kept = VecDeque::with_capacity(st.queue.len());
            for j in st.queue.drain(..) {
                if ids.contains(&j.id) {
                    done.push((j.slot, j.hook, Err(Error::Cancelled)));
                } else {
                    kept.push_back(j);
                }
            }
            st.queue = kept;
            for w in st.workers.iter_mut() {
                let status = self.words.status(w.slot);
                let mut run = None;
                for f in w.in_flight.iter_mut() {
                    if f.job.cancelled || !ids.contains(&f.job.id) {
                        continue;
                    }
                    f.job.cancelled = true;
                    let hook = std::mem::replace(&mut f.job.hook, Hook::None);
                    done.push((f.job.slot.clone(), hook, Err(Error::Cancelled)));
                    // Not started yet: tell the worker to skip it, through
                    // the one `skip` word if it is free (the worker stores
                    // `started` then reads `skip`; this thread stores `skip`
                    // then reads `started`: if it reads an earlier task, the
                    // worker will see the skip). Else watch for its start.
                    // Running now: kill its worker (the server checks, with
                    // the worker stopped, that it still runs this task).
                    // Finished: its result is dropped when it arrives.
                    let started = status.started.load(Ordering::SeqCst);
                    if started < f.seq && status.skip.load(Ordering::SeqCst) <= started {
                        status.skip.store(f.seq, Ordering::SeqCst);
                    } else if started < f.seq {
                        w.cancels.push(f.seq);
                        continue;
                    }
                    if status.running(f.seq) {
                        run = Some(f.seq);
                    }
                }
                if let (Some(seq), None) = (run, &w.kill) {
                    set_kill(w, KillReason::Cancel, seq);
                }
            }
            send_kills(st);
            if !st.server.out.is_empty() || st.workers.iter().any(|w| !w.cancels.is_empty()) {
                // The supervisor must send what is queued, and watch the
                // pending cancels.
                self.wake();
            }
        }
        let any = !done.is_empty();
        self.run_completions(done);
        any
    }

    pub(crate) fn server_pid(&self) -> u32 {
        self.lock().server_pid
    }

    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.lock().workers.iter().map(|w| w.pid).collect()
    }

    pub(crate) fn close(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Running {
            st.phase = Phase::Closed;
        }
        drop(st);
        self.wake();
    }

    /// Marks the pool terminated and resolves every outstanding task with
    /// `Terminated`; the supervisor thread then kills and reaps the processes.
    pub(crate) fn terminate(&self) {
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            if st.phase != Phase::Terminated {
                st.phase = Phase::Terminated;
            }
            st.fail_all(Error::Terminated, &mut done);
        }
        self.cv.notify_all();
        self.run_completions(done);
        self.wake();
    }

    /// Gives up on a pool whose supervisor thread could not start: fails
    /// everything, closes the server's socket and reaps the server.
    pub(crate) fn abandon(&self) {
        let mut done = Vec::new();
        let handle = {
            let mut st = self.lock();
            st.phase = Phase::Terminated;
            st.fail_all(Error::Terminated, &mut done);
            st.workers.clear();
            st.server.fd = None;
            st.finished = true;
            st.server_handle.take()
        };
        self.run_completions(done);
        if let Some(h) = handle {
            h.wait();
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// `Ok` while the pool takes tasks.
    pub(crate) fn check_running(&self) -> Result<(), Error> {
        match self.lock().refusal() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// What broke the pool, if something did (its server died, no worker
    /// could be started, the initializer keeps failing).
    pub(crate) fn broken(&self) -> Option<Error> {
        self.lock().broken.clone()
    }
}

/// The parent's end of the server's socket, with the requests that did
/// not fit in it yet (the socket is non-blocking: the supervisor must never
/// wait on the server, which may itself be waiting to hand it an exit).
struct Link {
    fd: Option<OwnedFd>,
    out: VecDeque<[u8; 24]>,
}

impl Link {
    fn raw(&self) -> Option<i32> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Queues a request and sends what the socket takes.
    fn send(&mut self, kind: u32, slot: u32, a: u64, b: u64) {
        self.out.push_back(Msg { kind, slot, a, b }.to_bytes());
        self.flush();
    }

    /// Sends queued requests until the socket is full; returns whether
    /// some are still waiting.
    fn flush(&mut self) -> bool {
        let Some(fd) = self.raw() else {
            self.out.clear();
            return false;
        };
        while let Some(m) = self.out.front() {
            match sys::send_with_fds(fd, m, &[]) {
                Ok(()) => {
                    self.out.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    // The server is gone; its end-of-file will be seen.
                    self.out.clear();
                    return false;
                }
            }
        }
        false
    }
}

/// Marks a worker for a kill (sent by `send_kills`). A kill for a reason
/// other than a cancel is unconditional and replaces a cancel's, which the
/// server may refuse.
fn set_kill(w: &mut Worker, reason: KillReason, seq: u64) {
    w.kill = Some(reason);
    w.kill_seq = seq;
    w.kill_sent = false;
}

/// Asks the server to SIGKILL every worker the pool has marked for a kill
/// and not yet asked about.
fn send_kills(st: &mut State) {
    for w in st.workers.iter_mut() {
        if w.kill.is_some() && !w.kill_sent {
            w.kill_sent = true;
            st.server
                .send(server::KILL, w.slot as u32, w.pid as u64, w.kill_seq);
        }
    }
}

impl State {
    /// Why a submission is refused now, if it is: `Closed` after `close()`;
    /// else what broke the pool, once no worker is left to run anything
    /// (also after the pool ended because of it); else `Terminated` after
    /// `terminate()`.
    fn refusal(&self) -> Option<Error> {
        match (&self.phase, &self.broken) {
            (Phase::Closed, _) => Some(Error::Closed),
            (_, Some(e)) if self.workers.is_empty() && self.spawning.is_empty() => Some(e.clone()),
            (Phase::Terminated, _) => Some(Error::Terminated),
            _ => None,
        }
    }

    /// Asks the server for a worker; `held` outcomes wait for it. Returns
    /// them at once if no spawn could be asked for.
    #[must_use]
    fn request_spawn(&mut self, held: Vec<Completion>) -> Vec<Completion> {
        if self.server.fd.is_none() {
            return held;
        }
        let Some(slot) = self.free_slots.pop() else {
            return held;
        };
        self.server.send(server::SPAWN, slot as u32, 0, 0);
        self.spawning.push((slot, held));
        Vec::new()
    }

    fn fail_all(&mut self, e: Error, done: &mut Vec<Completion>) {
        for j in self.queue.drain(..) {
            done.push((j.slot, j.hook, Err(e.clone())));
        }
        for w in self.workers.iter_mut() {
            // Unsent bytes may name blocks of the jobs dropped below.
            w.out.clear();
            w.out_fds.clear();
            w.out_pos = 0;
            for f in w.in_flight.drain(..) {
                if !f.job.cancelled {
                    done.push((f.job.slot, f.job.hook, Err(e.clone())));
                }
            }
        }
        for (_, held) in self.spawning.iter_mut() {
            done.append(held);
        }
    }

    /// Sends queued jobs to idle workers. Returns true if some bytes are
    /// still waiting for a socket to become writable.
    /// A caller (`from_caller`) only hands tasks to idle workers: topping up
    /// a busy worker is left to the supervisor, which does it when results
    /// come back, with everything queued by then in one write.
    fn dispatch(&mut self, cfg: &Config, from_caller: bool) -> bool {
        let mut pending = false;
        let live = self.workers.iter().filter(|w| w.ready).count().max(1);
        let now = Instant::now();
        // The least busy workers first, so that a new task never waits
        // behind another while a worker idles.
        let mut order: Vec<usize> = (0..self.workers.len()).collect();
        order.sort_by_key(|&i| (self.workers[i].held_ns, self.workers[i].in_flight.len()));
        for i in order {
            let w = &mut self.workers[i];
            if self.queue.is_empty() {
                break;
            }
            if !w.ready
                || w.retiring
                || w.eof
                || w.kill.is_some()
                || w.deadline.is_some()
                || (from_caller && !w.in_flight.is_empty())
            {
                pending |= w.out_pos < w.out.len();
                continue;
            }
            let room = cfg
                .max_tasks_per_child
                .map(|m| m.saturating_sub(w.sent))
                .unwrap_or(u64::MAX);
            let mut take = self
                .queue
                .len()
                .div_ceil(2 * live)
                .clamp(1, MAX_BATCH)
                .min(usize::try_from(room).unwrap_or(usize::MAX));
            let mut bytes = 0usize;
            while take > 0 {
                let Some(front) = self.queue.front() else {
                    break;
                };
                // A worker holds one long task (or one of unknown length, or
                // one with a timeout) alone, so that long tasks spread evenly
                // over the workers; it may hold about PIPELINE_NS of short
                // ones, so that it never waits for the next batch.
                let est = self.est.get(&front.f).copied();
                // A task with SharedBufs goes alone too: a worker then holds
                // the fds of one task at a time.
                let short = est.is_some_and(|e| e < SHORT_TASK_NS)
                    && front.timeout.is_none()
                    && front.shared.is_empty();
                if !w.in_flight.is_empty() && (!short || w.held_ns >= PIPELINE_NS) {
                    break;
                }
                let charge = if short {
                    est.unwrap_or(0).max(1)
                } else {
                    PIPELINE_NS
                };
                let job = self.queue.pop_front().expect("front exists");
                let seq = w.next_seq;
                w.next_seq += 1;
                w.sent += 1;
                if let Some(soft) = job.soft_timeout {
                    // Its soft limit, in the frame just before it.
                    let ns = crate::deadline::nanos(soft);
                    let at = Header::new(wire::SOFT_LIMIT, seq, ns, 0).begin(&mut w.out);
                    wire::finish(&mut w.out, at, 0);
                    bytes += HDR;
                }
                let mut h = Header::new(wire::TASK, seq, job.f.tramp, job.f.func);
                if cfg.inline_shared {
                    h.status |= wire::INLINE_SHARED;
                }
                // The fds go on the frame's first bytes (wire::fd_offset):
                // the input block's, then the SharedBufs'.
                let at = w.out.len();
                let mut nfds = 0;
                let prefix = if job.shared.is_empty() {
                    0
                } else {
                    h.status |= wire::SHARED_FDS;
                    4
                };
                match &job.payload {
                    Body::Heap(p) => {
                        h.len = (prefix + p.len()) as u64;
                    }
                    Body::Shm(b, _) => {
                        h.len = prefix as u64 + 8;
                        h.status |= wire::IN_BLOCK;
                        if job.retries > 0 {
                            h.status |= wire::KEEP_INPUT;
                        }
                        w.out_fds.push_back((wire::fd_offset(at, nfds), b.raw_fd()));
                        nfds += 1;
                    }
                }
                for r in &job.shared {
                    w.out_fds.push_back((wire::fd_offset(at, nfds), r.raw_fd()));
                    nfds += 1;
                }
                h.begin(&mut w.out);
                if prefix > 0 {
                    w.out
                        .extend_from_slice(&(job.shared.len() as u32).to_le_bytes());
                }
                match &job.payload {
                    Body::Heap(p) => {
                        w.out.extend_from_slice(p);
                        bytes += p.len() + HDR;
                    }
                    Body::Shm(_, n) => {
                        w.out.extend_from_slice(&(*n as u64).to_le_bytes());
                        bytes += HDR + 8;
                    }
                }
                let timed = job.timeout;
                w.held_ns += charge;
                w.in_flight.push_back(InFlight { seq, job, charge });
                if let Some(t) = timed {
                    w.deadline = Some(now + t);
                    // The supervisor's poll must learn the new deadline.
                    pending = true;
                    break;
                }
                take -= 1;
                if !short || bytes >= MAX_BATCH_BYTES {
                    break;
                }
            }
            if cfg.max_tasks_per_child.is_some_and(|m| w.sent >= m) {
                w.retiring = true;
            }
            pending |= flush_out(w);
        }
        pending
    }
}

/// Writes what the socket takes of a worker's pending bytes; shuts the write
/// side of a retiring worker once everything is out. Returns true if bytes
/// remain.
fn flush_out(w: &mut Worker) -> bool {
    while w.out_pos < w.out.len() {
        let sock = w.fd.as_raw_fd();
        let sent = match w.out_fds.front() {
            Some(&(at, _)) if at == w.out_pos => {
                // Every fd on this byte goes in one message (at most
                // MAX_FDS_PER_MSG of them: wire::fd_offset).
                let mut group = [0 as std::os::fd::RawFd; sys::MAX_FDS_PER_MSG];
                let mut k = 0;
                for &(o, fd) in w.out_fds.iter() {
                    if o != at || k == group.len() {
                        break;
                    }
                    group[k] = fd;
                    k += 1;
                }
                let end = w.out_fds.get(k).map_or(w.out.len(), |x| x.0);
                let r = sys::send_fds(sock, &w.out[w.out_pos..end], &group[..k]);
                if matches!(r, Ok(n) if n > 0) {
                    w.out_fds.drain(..k);
                }
                r
            }
            Some(&(at, _)) => sys::send(sock, &w.out[w.out_pos..at]),
            None => sys::send(sock, &w.out[w.out_pos..]),
        };
        match sent {
            Ok(n) => w.out_pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => {
                // The worker is gone; its exit report will follow.
                w.out.clear();
                w.out_fds.clear();
                w.out_pos = 0;
                w.eof = true;
                return false;
            }
        }
    }
    w.out.clear();
    w.out_fds.clear();
    w.out_pos = 0;
    if w.out.capacity() > (8 << 20) {
        w.out = Vec::new();
    }
    if w.retiring {
        sys::shutdown_write(&w.fd);
    }
    false
}

/// Reads everything a worker has sent and turns whole frames into outcomes.
fn read_worker(
    w: &mut Worker,
    st_ready: &mut usize,
    est: &mut std::collections::HashMap<TaskFn, u64>,
    cache: &Arc<BlockCache>,
    done: &mut Vec<Completion>,
) {
    let before = (w.ready, w.in_flight.len());
    read_frames(w, st_ready, est, cache, done);
    if let Some(clk) = w.cpu_clock {
        if (w.ready, w.in_flight.len()) != before {
            // Read after the frames that said a task ended: the tasks
            // after it started later than this reading.
            if let Some(ns) = crate::sys::sandbox::clock_ns(clk) {
                w.cpu_base = ns;
            }
        }
        if w.in_flight.is_empty() {
            w.cpu_next = None;
        }
    }
}

fn read_frames(
    w: &mut Worker,
    st_ready: &mut usize,
    est: &mut std::collections::HashMap<TaskFn, u64>,
    cache: &Arc<BlockCache>,
    done: &mut Vec<Completion>,
) {
    loop {
        let need = wire::missing(&w.inbuf);
        let want = if need > 0 {
            usize::try_from(need).unwrap_or(usize::MAX)
        } else {
            READ_CHUNK
        };
        match sys::recv_append(w.fd.as_raw_fd(), &mut w.inbuf, want, &mut w.in_fds) {
            Ok(0) => {
                w.eof = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
                // A result larger than this process can hold.
                set_kill(w, KillReason::Error(Error::TooLarge { len: need }), 0);
                w.eof = true;
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                // It died (with bytes of ours unread); its exit report follows.
                w.eof = true;
                break;
            }
            Err(e) => {
                // Its stream can no longer be trusted (fds lost, say): make
                // sure it dies.
                let e = Error::io("reading from a worker", e);
                set_kill(w, KillReason::Error(e), 0);
                w.eof = true;
                break;
            }
        }
        parse_frames(w, st_ready, est, cache, done);
    }
}

/// The outcome of a DONE frame whose output is in a block.
fn block_outcome(
    w: &mut Worker,
    tag: u64,
    body: &[u8],
    cache: &Arc<BlockCache>,
) -> Result<Payload, Error> {
    let broken = |what: &str| Error::Broken {
        reason: format!("worker {}: {what}", w.pid),
    };
    let len = body
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .ok_or_else(|| broken("a block length is missing"))?;
    let mut block = if tag == wire::OUT_SAME_BLOCK && cache.is_sandboxed() {
        // Its input was sealed: it cannot have written its result there.
        return Err(broken(
            "a sandboxed worker named its input block for its result",
        ));
    } else if tag == wire::OUT_SAME_BLOCK {
        match w.in_flight.front_mut().map(|f| &mut f.job.payload) {
            Some(p @ Body::Shm(..)) => match std::mem::replace(p, Body::Heap(Vec::new())) {
                Body::Shm(b, _) => b,
                Body::Heap(_) => unreachable!(),
            },
            _ => return Err(broken("a result named an input block that it had not")),
        }
    } else {
        let fd = w
            .in_fds
            .pop_front()
            .ok_or_else(|| broken("a result's block did not arrive"))?;
        if cache.is_sandboxed() {
            crate::proto::shm::Block::from_sealed_fd(fd)
        } else {
            crate::proto::shm::Block::from_fd(fd)
        }
        .map_err(|e| Error::io("mapping a result's block", e))?
    };
    block
        .refresh()
        .map_err(|e| Error::io("mapping a result's block", e))?;
    if block.capacity() < len {
        return Err(broken("a result's block is shorter than the result"));
    }
    Ok(Payload::Bytes(
        Buf::Block(Lent {
            block: Some(block),
            len,
            cache: cache.clone(),
        }),
        Supply::default(),
    ))
}

fn parse_frames(
    w: &mut Worker,
    st_ready: &mut usize,
    est: &mut std::collections::HashMap<TaskFn, u64>,
    cache: &Arc<BlockCache>,
    done: &mut Vec<Completion>,
) {
    let mut pos = 0usize;
    while let Some((h, total)) = wire::complete(&w.inbuf[pos..]) {
        let mut body_at = pos + HDR;
        let end = pos + total;
        match h.kind {
            wire::READY if !w.ready => {
                w.ready = true;
                *st_ready += 1;
            }
            wire::RETIRING => {
                // Its memory grew past the limit: it exits after this task.
                log::debug!(
                    "procpool: worker {} grew by {} bytes, past max_memory_per_child; replacing it",
                    w.pid,
                    h.a
                );
                w.retiring = true;
            }
            wire::INIT_FAILED => {
                w.init_msg = Some(task::init_failure_message(h.status, &w.inbuf[body_at..end]));
            }
            wire::SANDBOX_FAILED => {
                w.init_msg = Some(task::take_message(&w.inbuf[body_at..end]));
                w.sandbox_failed = true;
            }
            wire::DONE => {
                // The count of the SharedBufs that came with it, if any.
                let Some((nshared, _)) = wire::shared_prefix(h.status, &w.inbuf[body_at..end])
                else {
                    let e = Error::Broken {
                        reason: format!("worker {} sent a malformed result", w.pid),
                    };
                    set_kill(w, KillReason::Error(e), 0);
                    pos = end;
                    continue;
                };
                if h.status & wire::SHARED_FDS != 0 {
                    body_at += 4;
                }
                let st = h.status & !wire::SHARED_FDS;
                let outcome = if h.a == wire::OUT_SAME_BLOCK || h.a == wire::OUT_NEW_BLOCK {
                    pos = end;
                    let body = w.inbuf[body_at..end].to_vec();
                    block_outcome(w, h.a, &body, cache)
                } else if st == status::OK {
                    if h.len as usize >= HAND_OVER {
                        let rest = w.inbuf[end..].to_vec();
                        let mut v = std::mem::replace(&mut w.inbuf, rest);
                        v.truncate(end);
                        pos = 0;
                        Ok(Payload::Bytes(
                            Buf::Heap {
                                vec: v,
                                start: body_at,
                            },
                            Supply::default(),
                        ))
                    } else {
                        pos = end;
                        Ok(Payload::Bytes(
                            Buf::Heap {
                                vec: w.inbuf[body_at..end].to_vec(),
                                start: 0,
                            },
                            Supply::default(),
                        ))
                    }
                } else {
                    pos = end;
                    Err(task::outcome_error(st, &w.inbuf[body_at..end]))
                };
                // Its SharedBufs' fds came after its block's (if any).
                let shared_fds: Vec<OwnedFd> =
                    w.in_fds.drain(..nshared.min(w.in_fds.len())).collect();
                let shared_missing = shared_fds.len() < nshared;
                match w.in_flight.front() {
                    Some(f) if f.seq == h.seq => {
                        let mut f = w.in_flight.pop_front().expect("front exists");
                        // The caller's own buffers come back as they were
                        // lent (the same mapping); the others are mapped
                        // where the value is decoded.
                        let lent = std::mem::take(&mut f.job.shared);
                        let outcome = match outcome {
                            Ok(Payload::Bytes(b, _)) if shared_missing => {
                                drop(b);
                                Err(Error::Broken {
                                    reason: format!(
                                        "worker {}: a result's SharedBufs did not arrive",
                                        w.pid
                                    ),
                                })
                            }
                            Ok(Payload::Bytes(b, _)) => match Supply::resolve(shared_fds, lent) {
                                Ok(s) => Ok(Payload::Bytes(b, s)),
                                Err(reason) => Err(Error::Broken {
                                    reason: format!("worker {}: {reason}", w.pid),
                                }),
                            },
                            other => other,
                        };
                        w.held_ns = w.held_ns.saturating_sub(f.charge);
                        // The worker reports each task's run time in `b`.
                        est.entry(f.job.f)
                            .and_modify(|e| *e = e.saturating_mul(3).saturating_add(h.b) / 4)
                            .or_insert(h.b);
                        if !f.job.cancelled {
                            done.push((f.job.slot, f.job.hook, outcome));
                        }
                        if let Body::Shm(b, _) = f.job.payload {
                            cache.put(b);
                        }
                    }
                    _ => {
                        let e = Error::Broken {
                            reason: format!("worker {} answered a task it was not given", w.pid),
                        };
                        set_kill(w, KillReason::Error(e), 0);
                    }
                }
                if w.in_flight.is_empty() {
                    w.deadline = None;
                }
                continue;
            }
            _ => {}
        }
        pos = end;
    }
    w.inbuf.drain(..pos);
    if w.inbuf.is_empty() && w.inbuf.capacity() > (8 << 20) {
        w.inbuf = Vec::new();
    }
}

/// The supervisor thread. A panic in it (a bug) fails every outstanding
/// task and kills the workers rather than leave callers waiting forever.
pub(crate) fn run(shared: Arc<Shared>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(&shared)));
    if let Err(p) = outcome {
        let reason = format!(
            "the pool's supervisor thread panicked: {}",
            task::panic_message(&*p)
        );
        log::error!("procpool: {reason}");
        let e = Error::Broken { reason };
        let mut done = Vec::new();
        let handle = {
            let mut st = shared.lock();
            st.broken = Some(e.clone());
            st.phase = Phase::Terminated;
            st.fail_all(e, &mut done);
            st.workers.clear();
            st.spawning.clear();
            st.server.fd = None;
            st.finished = true;
            st.server_handle.take()
        };
        shared.cv.notify_all();
        shared.run_completions(done);
        if let Some(h) = handle {
            h.wait();
        }
    }
}

fn run_loop(shared: &Shared) {
    let cpu_watch = shared
        .cfg
        .sandbox
        .as_ref()
        .and_then(|l| l.cpu_per_task)
        .map(cpu_interval);
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    let mut who: Vec<usize> = Vec::new();
    loop {
        let timeout_ms;
        let wf;
        {
            let st = shared.lock();
            if st.finished {
                break;
            }
            pfds.clear();
            who.clear();
            pfds.push(libc::pollfd {
                fd: shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            if let Some(fd) = st.server.raw() {
                let out = if st.server.out.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                };
                pfds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN | out,
                    revents: 0,
                });
            }
            wf = pfds.len();
            let now = Instant::now();
            let mut next: Option<Instant> = st.respawn_at;
            for w in st.workers.iter() {
                let mut ev = 0;
                if !w.eof {
                    ev |= libc::POLLIN;
                }
                if w.out_pos < w.out.len() {
                    ev |= libc::POLLOUT;
                }
                if ev != 0 {
                    pfds.push(libc::pollfd {
                        fd: w.fd.as_raw_fd(),
                        events: ev,
                        revents: 0,
                    });
                    who.push(w.slot);
                }
                if let (Some(d), None) = (w.deadline, &w.kill) {
                    next = Some(next.map_or(d, |n: Instant| n.min(d)));
                }
                if !w.cancels.is_empty() && w.kill.is_none() {
                    let d = now + RECHECK;
                    next = Some(next.map_or(d, |n: Instant| n.min(d)));
                }
                if let (Some(d), None) = (w.cpu_next, &w.kill) {
                    next = Some(next.map_or(d, |n: Instant| n.min(d)));
                }
            }
            if let Some(every) = cpu_watch {
                // A task sent by a caller is not announced to this thread
                // (that would cost a wake-up per task): under a CPU cap it
                // looks at least this often, so it sees every task within
                // a fraction of the cap.
                let d = now + every;
                next = Some(next.map_or(d, |n: Instant| n.min(d)));
            }
            timeout_ms = match next {
                None => -1,
                Some(d) if d <= now => 0,
                Some(d) => ((d - now).as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32,
            };
        }
        // Poll without sleeping for a moment first: results often follow
        // within microseconds, and waking from sleep costs more.
        let mut n = 0;
        if timeout_ms != 0 {
            crate::proto::idle::spin_until(|| {
                n = sys::poll(&mut pfds, 0).unwrap_or(0);
                n > 0
            });
        }
        if n == 0 && sys::poll(&mut pfds, timeout_ms).is_err() {
            std::thread::yield_now();
        }
        let mut done: Vec<Completion> = Vec::new();
        let mut reap_server = None;
        let mut lost_server = None;
        {
            let mut guard = shared.lock();
            let st = &mut *guard;
            if pfds[0].revents != 0 {
                sys::drain(shared.wake.as_raw_fd());
            }
            let ready_before = st.ready;
            for (i, p) in pfds.iter().enumerate().skip(wf) {
                if p.revents == 0 {
                    continue;
                }
                let slot = who[i - wf];
                let Some(w) = st.workers.iter_mut().find(|w| w.slot == slot) else {
                    continue;
                };
                if p.revents & libc::POLLOUT != 0 {
                    flush_out(w);
                }
                if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    read_worker(w, &mut st.ready, &mut st.est, &shared.blocks, &mut done);
                }
            }
            if st.ready != ready_before {
                st.unready_deaths = 0;
                shared.cv.notify_all();
            }
            if wf == 2 && pfds[1].revents & libc::POLLOUT != 0 {
                st.server.flush();
            }
            if wf == 2 && pfds[1].revents & !libc::POLLOUT != 0 {
                server_messages(shared, st, &mut done);
            }
            if st.server_lost {
                lost_server = Some(st.server_handle.take());
            } else {
                if st.respawn_at.is_some_and(|t| t <= Instant::now()) {
                    st.respawn_at = None;
                    if wants_workers(st) && st.broken.is_none() {
                        make_up_workers(shared, st, &mut done);
                    }
                }
                check_clocks(st, &shared.words);
                if let Some(cap) = shared.cfg.sandbox.as_ref().and_then(|l| l.cpu_per_task) {
                    check_cpu(st, &shared.words, cap);
                }
                send_kills(st);
                match st.phase {
                    Phase::Terminated => {
                        st.fail_all(Error::Terminated, &mut done);
                        st.workers.clear();
                        st.spawning.clear();
                        st.server.fd = None;
                        reap_server = st.server_handle.take();
                        st.finished = true;
                    }
                    Phase::Closed => {
                        if st.queue.is_empty() {
                            for w in st.workers.iter_mut() {
                                if w.ready && !w.retiring && w.in_flight.is_empty() {
                                    w.retiring = true;
                                    flush_out(w);
                                }
                            }
                        }
                        if st.queue.is_empty() && st.workers.is_empty() && st.spawning.is_empty() {
                            st.server.fd = None;
                            reap_server = st.server_handle.take();
                            st.finished = true;
                        }
                    }
                    Phase::Running => {}
                }
                if !st.finished {
                    st.dispatch(&shared.cfg, false);
                }
            }
        }
        shared.run_completions(done);
        if let Some(h) = lost_server {
            let (what, status) = match h {
                Some(h) => (h.what(), h.wait()),
                None => ("the fork server", None),
            };
            server_lost(shared, server_exit_reason(what, status));
            break;
        }
        if let Some(h) = reap_server {
            h.wait();
            shared.cv.notify_all();
            break;
        }
    }
}

/// The server ended on its own (killed from outside, say): the pool is
/// broken. Every outstanding task fails with the error that says why, and
/// so do later submissions and `join`.
fn server_lost(shared: &Shared, reason: String) {
    log::error!("procpool: {reason}; the pool is broken");
    let mut done = Vec::new();
    {
        let mut st = shared.lock();
        // What broke it first, if something did (the server could not
        // start, say), says more than its exit.
        let e = st.broken.get_or_insert(Error::Broken { reason }).clone();
        st.fail_all(e, &mut done);
        st.workers.clear();
        st.spawning.clear();
        st.phase = Phase::Terminated;
        st.finished = true;
    }
    shared.cv.notify_all();
    shared.run_completions(done);
}

/// How often a task not yet started is looked at again (a timed task, to
/// start its clock; a cancelled one, to kill it if it starts).
const RECHECK: Duration = Duration::from_millis(1);

/// Timeouts and pending cancels. A timeout counts from the moment the
/// worker started the task (the start time it stored in shared memory).
fn check_clocks(st: &mut State, words: &SharedWords) {
    let now = Instant::now();
    let now_ns = sys::monotonic_ns();
    for w in st.workers.iter_mut() {
        if w.kill.is_some() {
            continue;
        }
        let status = words.status(w.slot);
        if !w.cancels.is_empty() {
            let started = status.started.load(Ordering::SeqCst);
            let mut run = None;
            w.cancels.retain(|&seq| {
                if status.running(seq) {
                    run = Some(seq);
                    false
                } else {
                    // Still waiting to start (past it: it ran and finished).
                    started < seq
                }
            });
            if let Some(seq) = run {
                set_kill(w, KillReason::Cancel, seq);
                continue;
            }
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
        if status.started.load(Ordering::SeqCst) < seq {
            // Not started yet: look again soon.
            w.deadline = Some(now + RECHECK);
            continue;
        }
        if w.seen_start.0 != seq {
            w.seen_start = (seq, now_ns);
        }
        let start = status.start_ns.load(Ordering::SeqCst).min(w.seen_start.1);
        let ran = Duration::from_nanos(now_ns.saturating_sub(start));
        if ran < timeout {
            w.deadline = Some(now + (timeout - ran));
            continue;
        }
        // A timed task is alone on its worker: whatever it runs is this task
        // (or it has just finished, and its result is read before the exit
        // is handled).
        set_kill(w, KillReason::Timeout { id, timeout }, 0);
        log::warn!(
            "procpool: task {id} timed out after {timeout:?}; killing worker {}",
            w.pid
        );
    }
}

/// How long the CPU clocks of busy workers may go unread, at most, under
/// a per-task CPU cap: the time in which the threads of a task, one per
/// CPU, could together use up the cap (at least a millisecond).
fn cpu_interval(cap: Duration) -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (cap / cpus).max(Duration::from_millis(1))
}

/// The per-task CPU cap of a sandboxed pool: a worker whose CPU clock has
/// counted more than `cap` since the parent last learnt that one of its
/// tasks ended is killed, and its running task fails with the limit.
fn check_cpu(st: &mut State, words: &SharedWords, cap: Duration) {
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
        let item = words.status(w.slot).item_cpu.load(Ordering::SeqCst);
        let used = Duration::from_nanos(ns.saturating_sub(w.cpu_base.max(item)));
        if used < cap {
            // Its threads together cannot use more than one CPU each per
            // second of wall time.
            w.cpu_next = Some(now + cpu_interval(cap - used));
            continue;
        }
        let started = words.status(w.slot).started.load(Ordering::SeqCst);
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
        set_kill(w, KillReason::Limit { id, limit }, 0);
    }
}

fn server_messages(shared: &Shared, st: &mut State, done: &mut Vec<Completion>) {
    let mut buf = [0u8; 64];
    loop {
        let Some(fd) = st.server.raw() else {
            return;
        };
        let (n, mut fds) = match sys::recv_with_fds(fd, &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => (0, Vec::new()),
        };
        if n == 0 {
            // The fork server is gone: nothing can be spawned or reaped.
            // The supervisor reaps it (outside the lock), to say how it
            // ended, and then breaks the pool (`server_lost`).
            st.server.fd = None;
            st.server_lost = true;
            return;
        }
        let Some(m) = Msg::from_bytes(&buf[..n]) else {
            continue;
        };
        match m.kind {
            server::SPAWNED => {
                let slot = m.slot as usize;
                let held = match st.spawning.iter().position(|s| s.0 == slot) {
                    Some(i) => st.spawning.swap_remove(i).1,
                    None => Vec::new(),
                };
                let Some(fd) = fds.pop() else {
                    // Its socket did not arrive: this process is out of fds
                    // (the kernel closed it instead), and that worker reads
                    // end-of-file and exits.
                    st.free_slots.push(slot);
                    done.extend(held);
                    let cause = format!(
                        "this process has no file descriptor free for a new worker's socket{}",
                        fd_limit_hint()
                    );
                    start_failed(shared, st, cause, done);
                    continue;
                };
                done.extend(held);
                st.start_failures = 0;
                let _ = sys::set_nonblocking(&fd);
                log::debug!("procpool: worker {} started", m.a);
                st.workers.push(Worker {
                    slot,
                    pid: m.a as u32,
                    fd,
                    ready: false,
                    retiring: false,
                    eof: false,
                    // Its settings go first, before any task.
                    out: shared.cfg.worker_frame(),
                    out_pos: 0,
                    out_fds: VecDeque::new(),
                    inbuf: Vec::new(),
                    in_fds: VecDeque::new(),
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
                    cpu_clock: shared
                        .cfg
                        .sandbox
                        .as_ref()
                        .and_then(|l| l.cpu_per_task)
                        .and_then(|_| crate::sys::sandbox::process_cpu_clock(m.a as libc::pid_t)),
                    cpu_base: 0,
                    cpu_next: None,
                });
            }
            server::KILL_REFUSED => {
                // The cancelled task had finished before the kill: the
                // worker goes on.
                let pid = m.a as u32;
                if let Some(w) = st.workers.iter_mut().find(|w| w.pid == pid) {
                    if matches!(w.kill, Some(KillReason::Cancel)) && w.kill_seq == m.b {
                        w.kill = None;
                        w.kill_sent = false;
                        w.kill_seq = 0;
                    }
                }
            }
            server::SPAWN_FAILED => {
                let slot = m.slot as usize;
                if let Some(i) = st.spawning.iter().position(|s| s.0 == slot) {
                    let (slot, held) = st.spawning.swap_remove(i);
                    st.free_slots.push(slot);
                    done.extend(held);
                }
                let errno = m.a as i32;
                let err = std::io::Error::from_raw_os_error(errno);
                let hint = match errno {
                    libc::EMFILE | libc::ENFILE => " (see the open-file limit, `ulimit -n`)".into(),
                    libc::EAGAIN => " (the limit on processes, `ulimit -u`, or memory)".into(),
                    _ => String::new(),
                };
                let cause = format!("the fork server could not start a worker: {err}{hint}");
                start_failed(shared, st, cause, done);
            }
            server::EXITED => {
                let pid = m.a as u32;
                let status = ExitStatus::from_raw(m.b as u32 as i32);
                if let Some(i) = st.workers.iter().position(|w| w.pid == pid) {
                    let w = st.workers.swap_remove(i);
                    worker_exited(shared, st, w, status, done);
                }
            }
            _ => {}
        }
    }
}

/// After a failed start, how many retries in a row the pool makes (with
/// [`START_BACKOFF`], doubled each time) before it gives up on a
/// replacement; with no worker left it is then broken. The whole series
/// takes about 0.3 s: long enough for a moment's shortage (a process limit
/// reached while other programs exit), short enough that queued tasks fail
/// promptly when the shortage lasts.
const START_RETRIES: u32 = 5;
/// The delay before the first retry of a failed start.
const START_BACKOFF: Duration = Duration::from_millis(10);

/// " (the open-file limit, `ulimit -n`, is N)", or "" if there is none.
fn fd_limit_hint() -> String {
    match sys::open_file_limit() {
        Some(n) => format!(" (the open-file limit, `ulimit -n`, is {n})"),
        None => String::new(),
    }
}

/// A worker could not be started (the server could not fork it or make
/// its socket, or its socket could not be received here): out of fds, out
/// of processes, out of memory. The slot is free again and the outcomes
/// held for it are released by the caller.
///
/// While the pool is being built, `build()` fails with this error (and
/// the pool, dropped, kills and reaps what was started). Later, the pool
/// tries again after a delay that doubles each time, up to
/// [`START_RETRIES`] times in a row (a successful start resets the count);
/// then, if no worker is left, the pool is broken: every queued task fails
/// with this error, and so do later submissions. With workers left it goes
/// on with fewer, and tries again when the next one exits.
fn start_failed(shared: &Shared, st: &mut State, cause: String, done: &mut Vec<Completion>) {
    log::warn!("procpool: could not start a worker: {cause}");
    if st.building {
        let e = Error::Broken {
            reason: format!(
                "could not start all {} workers ({} started): {cause}",
                shared.cfg.processes,
                st.workers.len()
            ),
        };
        st.init_error.get_or_insert(e.clone());
        st.broken.get_or_insert(e);
        shared.cv.notify_all();
        return;
    }
    // Starts that fail while a retry is already due count as one.
    if st.respawn_at.is_none() {
        st.start_failures += 1;
        if st.start_failures <= START_RETRIES {
            let delay = START_BACKOFF * 2u32.pow(st.start_failures - 1);
            st.respawn_at = Some(Instant::now() + delay);
            return;
        }
    }
    if st.respawn_at.is_none() && st.workers.is_empty() && st.spawning.is_empty() {
        st.broken = Some(Error::Broken {
            reason: format!(
                "no worker is left and {} attempts in a row to start one failed: {cause}",
                st.start_failures
            ),
        });
        fail_if_no_workers(st, done);
        shared.cv.notify_all();
    }
}

/// Whether the pool still needs workers: running, or closed with work queued.
fn wants_workers(st: &State) -> bool {
    match st.phase {
        Phase::Running => true,
        Phase::Closed => !st.queue.is_empty(),
        Phase::Terminated => false,
    }
}

/// Asks for workers up to the pool's size (after failed starts).
fn make_up_workers(shared: &Shared, st: &mut State, done: &mut Vec<Completion>) {
    while st.workers.len() + st.spawning.len() < shared.cfg.processes
        && !st.free_slots.is_empty()
        && st.server.fd.is_some()
    {
        let back = st.request_spawn(Vec::new());
        if !back.is_empty() {
            done.extend(back);
            break;
        }
    }
}

fn fail_if_no_workers(st: &mut State, done: &mut Vec<Completion>) {
    if let Some(e) = st.broken.clone() {
        if st.workers.is_empty() && st.spawning.is_empty() {
            for j in st.queue.drain(..) {
                done.push((j.slot, j.hook, Err(e.clone())));
            }
        }
    }
}

fn worker_exited(
    shared: &Shared,
    st: &mut State,
    mut w: Worker,
    status: ExitStatus,
    done: &mut Vec<Completion>,
) {
    // Everything it wrote before dying is in its socket: take it first.
    let mut ready = st.ready;
    read_worker(&mut w, &mut ready, &mut st.est, &shared.blocks, done);
    st.ready = ready;
    let words = shared.words.status(w.slot);
    let started = words.started.load(Ordering::SeqCst);
    // A sandboxed worker that died of one of its limits.
    let limit = shared
        .cfg
        .sandbox
        .as_ref()
        .and_then(|l| l.cause(words.died_of.load(Ordering::SeqCst), status));
    // Only tasks it had started are lost; the others run elsewhere (a
    // worker that retires may leave some behind).
    let lost_any = w
        .in_flight
        .iter()
        .any(|f| f.seq <= started && !f.job.cancelled);
    if !lost_any && w.kill.is_none() {
        log::debug!("procpool: worker {} exited ({status})", w.pid);
    } else if w.kill.is_none() {
        log::warn!(
            "procpool: worker {} lost ({status}) with {} task(s) in flight",
            w.pid,
            w.in_flight.len()
        );
    }
    let mut lost = Vec::new();
    let mut requeue = Vec::new();
    for f in w.in_flight.drain(..) {
        if f.job.cancelled {
            continue;
        }
        if f.seq > started {
            // Never started: run it elsewhere.
            requeue.push(f.job);
            continue;
        }
        let mut job = f.job;
        let err = match &w.kill {
            Some(KillReason::Timeout { id, timeout }) if *id == job.id => Some(Error::Timeout {
                timeout: *timeout,
                pid: w.pid,
            }),
            Some(KillReason::Limit { id, limit }) if *id == job.id => Some(Error::LimitExceeded {
                limit: *limit,
                pid: w.pid,
            }),
            Some(KillReason::Error(e)) => Some(e.clone()),
            _ if limit.is_some() => Some(Error::LimitExceeded {
                limit: limit.expect("checked"),
                pid: w.pid,
            }),
            // A task that started runs again only if it may (its input was
            // kept for that: KEEP_INPUT), and, if it holds SharedBufs, only
            // if the caller accepts that they may be half written.
            _ if job.retries > 0 && (job.shared.is_empty() || job.retry_shared) => {
                job.retries -= 1;
                None
            }
            _ if !job.shared.is_empty() => Some(Error::WorkerLostShared {
                pid: w.pid,
                status,
                buffers: job.shared.len(),
            }),
            _ => Some(Error::WorkerLost { pid: w.pid, status }),
        };
        match err {
            Some(e) => lost.push((job.slot, job.hook, Err(e))),
            None => requeue.push(job),
        }
    }
    for job in requeue.into_iter().rev() {
        st.queue.push_front(job);
    }
    st.free_slots.push(w.slot);
    if !w.ready {
        // Died before it was ready. With an initializer that said it failed,
        // or that the worker died in while the pool was being built, or in
        // three replacements in a row, the initializer is at fault: stop
        // (never respawn a failing initializer). Otherwise (no initializer,
        // or a kill from outside while it ran) just replace the worker.
        st.unready_deaths += u32::from(shared.cfg.has_init);
        let init_failed = w.init_msg.is_some()
            || (shared.cfg.has_init && (st.building || st.unready_deaths >= 3));
        if init_failed {
            let message = w
                .init_msg
                .take()
                .unwrap_or_else(|| format!("worker {} died in its initializer ({status})", w.pid));
            let e = if w.sandbox_failed {
                Error::Sandbox { reason: message }
            } else {
                Error::InitializerFailed { message }
            };
            if st.building {
                st.init_error = Some(e.clone());
            }
            st.broken = Some(e);
            shared.cv.notify_all();
        }
    }
    // A retry of failed starts that is due makes up the count (then, not
    // now: the delay is the point).
    if wants_workers(st)
        && st.broken.is_none()
        && st.respawn_at.is_none()
        && st.workers.len() + st.spawning.len() < shared.cfg.processes
    {
        log::debug!("procpool: replacing worker {}", w.pid);
        let back = st.request_spawn(lost);
        done.extend(back);
        // Also make up for spawns that failed earlier.
        make_up_workers(shared, st, done);
    } else {
        done.extend(lost);
        fail_if_no_workers(st, done);
    }
}
