//! The engine's state and what callers do to it: submit (and dispatch to
//! idle workers on the way), cancel, close, terminate.
//!
//! Locking: one mutex guards [`State`]. Callers submit under it and, when a
//! worker is idle, write the tasks to its socket themselves (non-blocking),
//! so a synchronous `apply` costs no hop through another thread on the way
//! out. The supervisor thread (`supervisor.rs`) does the rest. Outcomes
//! are stored in their slots after the lock is released.

use crate::engine::completion::{Handler, Slot, complete};
use crate::engine::job::{Completion, Config, Job, JobSpec};
use crate::engine::lifecycle::{Phase, Starts};
use crate::engine::plan::{self, Batch, Candidate, Estimates, Load};
use crate::engine::seam::{Backend, Progress};
use crate::engine::size::{self, Member, SlotTable};
use crate::engine::stats::{Counters, Held};
use crate::engine::worker::{Worker, frame_bytes};
use crate::error::Error;
use crate::proto::shm::{BlockCache, Body};
use crate::sys;
use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub(crate) struct State {
    pub(crate) phase: Phase,
    pub(crate) queue: VecDeque<Job>,
    pub(crate) workers: Vec<Worker>,
    /// Slots whose worker the backend is starting, with the outcomes held
    /// back until it exists (so that once a lost task's error is seen, its
    /// replacement is already in `worker_pids`).
    pub(crate) spawning: Vec<(usize, Vec<Completion>)>,
    pub(crate) free_slots: Vec<usize>,
    /// How many workers the pool keeps (its `processes`; `resize` changes
    /// it) and its slot table (`engine/size.rs`).
    pub(crate) size: usize,
    pub(crate) table: SlotTable,
    /// What the pool counts under this lock (`stats.rs`).
    pub(crate) tally: Held,
    pub(crate) est: Estimates,
    pub(crate) broken: Option<Error>,
    /// Workers with an initializer that died before they were ready, since
    /// one last was (see `ledger::blames_initializer`).
    pub(crate) unready_deaths: u32,
    pub(crate) building: bool,
    pub(crate) init_error: Option<Error>,
    pub(crate) ready: usize,
    /// The backend, until it is closed and waited for.
    pub(crate) backend: Option<Box<dyn Backend>>,
    pub(crate) backend_pid: u32,
    pub(crate) starts: Starts,
    /// The backend ended on its own (its server closed its socket), and
    /// the pool with it.
    pub(crate) backend_lost: bool,
    pub(crate) finished: bool,
    /// Scratch space for dispatch (kept to save an allocation per call).
    loads: Vec<Load>,
    order: Vec<usize>,
}

/// Everything the pool's threads share.
pub(crate) struct Engine {
    state: Mutex<State>,
    pub(crate) cv: Condvar,
    pub(crate) wake: OwnedFd,
    pub(crate) progress: Arc<dyn Progress>,
    pub(crate) blocks: Arc<BlockCache>,
    next_id: AtomicU64,
    pub(crate) handler: Handler,
    pub(crate) cfg: Config,
    pub(crate) counters: Counters,
}

/// What the engine runs on: its settings, the backend, what the backend
/// reports of its workers' progress, and how many worker slots it has
/// room for (`SlotTable`).
pub(crate) struct Launch {
    pub(crate) cfg: Config,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) progress: Arc<dyn Progress>,
    pub(crate) table: SlotTable,
}

impl Engine {
    pub(crate) fn new(launch: Launch) -> Result<Arc<Engine>, Error> {
        let Launch {
            cfg,
            backend,
            progress,
            table,
        } = launch;
        let wake = match sys::eventfd() {
            Ok(fd) => fd,
            Err(e) => {
                backend.wait();
                return Err(Error::io("creating an eventfd", e));
            }
        };
        let sandboxed = cfg.sandbox.is_some();
        Ok(Arc::new(Engine {
            state: Mutex::new(State {
                phase: Phase::Running,
                queue: VecDeque::new(),
                workers: Vec::new(),
                spawning: Vec::new(),
                free_slots: (0..table.in_use).rev().collect(),
                size: cfg.processes,
                table,
                tally: Held::default(),
                est: Estimates::default(),
                broken: None,
                unready_deaths: 0,
                building: true,
                init_error: None,
                ready: 0,
                backend_pid: backend.pid(),
                backend: Some(backend),
                starts: Starts::default(),
                backend_lost: false,
                finished: false,
                loads: Vec::new(),
                order: Vec::new(),
            }),
            cv: Condvar::new(),
            wake,
            progress,
            blocks: Arc::new(if sandboxed {
                BlockCache::sandboxed()
            } else {
                BlockCache::default()
            }),
            next_id: AtomicU64::new(1),
            handler: Handler::new(),
            cfg,
            counters: Counters::default(),
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the supervisor thread.
    pub(crate) fn wake(&self) {
        sys::eventfd_signal(self.wake.as_raw_fd());
    }

    pub(crate) fn run_completions(&self, done: Vec<Completion>) {
        for c in done {
            self.counters.ended(&c.outcome);
            complete(c.slot, c.hook, c.outcome, &self.handler);
        }
    }

    /// Asks the backend for the first workers and waits until all are ready.
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

    /// The estimated run time of one item of `f` (see `plan::Estimates`).
    pub(crate) fn item_estimate(&self, f: crate::proto::task::TaskFn) -> Option<u64> {
        self.lock().est.per_item(f)
    }

    /// A fresh slot for a task (its id is the job's).
    pub(crate) fn new_slot(&self) -> Arc<Slot> {
        Slot::new(self.reserve_ids(1))
    }

    /// Reserves `n` consecutive job ids.
    pub(crate) fn reserve_ids(&self, n: u64) -> u64 {
        self.next_id.fetch_add(n, Ordering::Relaxed)
    }

    /// Queues a job, its outcome to go to `slot`, and dispatches what idle
    /// workers can take.
    pub(crate) fn submit(&self, slot: Arc<Slot>, s: JobSpec) -> Result<(), Error> {
        if let Some(check) = self.cfg.check_task {
            check(s.f)?;
        }
        let mut s = s;
        if self.blocks.is_sandboxed() {
            // A sandboxed worker gets its input sealed: it can neither change
            // it (for a retry on another worker) nor truncate it.
            if let Body::Shm(b, _) = &mut s.payload {
                b.seal()
                    .map_err(|e| Error::io("sealing a shared-memory block", e))?;
            }
        }
        let mut st = self.lock();
        if let Some(e) = st.refusal() {
            return Err(e);
        }
        self.counters.submitted(s.items);
        let (timeout, wall_limit) = self.cfg.timeout_of(s.opts.timeout, s.items);
        st.queue.push_back(Job {
            id: slot.id,
            f: s.f,
            payload: s.payload,
            slot,
            hook: s.hook,
            timeout,
            soft_timeout: s.opts.soft_timeout.or(self.cfg.soft_timeout),
            retries: s.opts.retries.unwrap_or(self.cfg.retries),
            cancelled: false,
            shared: s.shared,
            retry_shared: s.opts.retry_shared,
            items: s.items.max(1),
            wall_limit,
            split: s.split,
            lost: Vec::new(),
        });
        let pending = st.dispatch(&self.cfg, true);
        drop(st);
        if pending {
            self.wake();
        }
        Ok(())
    }

    /// Cancels the jobs with these ids; returns whether any was cancelled.
    pub(crate) fn cancel(&self, ids: &[u64]) -> bool {
        let ids: HashSet<u64> = ids.iter().copied().collect();
        let mut done = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            let mut kept = VecDeque::with_capacity(st.queue.len());
            for j in st.queue.drain(..) {
                if ids.contains(&j.id) {
                    done.push(Completion::new(j.slot, j.hook, Err(Error::Cancelled)));
                } else {
                    kept.push_back(j);
                }
            }
            st.queue = kept;
            for w in st.workers.iter_mut() {
                w.cancel(&ids, &*self.progress, &mut done);
            }
            st.send_kills();
            let watching = st.workers.iter().any(|w| w.has_cancels());
            if st
                .backend
                .as_ref()
                .is_some_and(|b| b.poll_fd().is_some_and(|p| p.1))
                || watching
            {
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
        self.lock().backend_pid
    }

    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.lock().workers.iter().map(|w| w.pid()).collect()
    }

    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.phase = st.phase.closed();
        drop(st);
        self.wake();
    }

    /// Grows or shrinks the pool to `n` workers.
    pub(crate) fn resize(&self, n: usize) -> Result<(), Error> {
        if n == 0 {
            return Err(Error::Config("processes must be at least 1"));
        }
        let mut done = Vec::new();
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            if let Some(e) = st.refusal() {
                return Err(e);
            }
            match st.table.max_workers() {
                None => {
                    return Err(Error::Config(
                        "resize is not available over MPI: a pool's ranks, and the workers \
                         each rank hosts, are fixed when it is launched",
                    ));
                }
                Some(max) if n > max => {
                    return Err(Error::Config(
                        "resize: more workers than the pool made room for (see Pool::resize)",
                    ));
                }
                Some(_) => {}
            }
            st.size = n;
            st.table.grow(n, &mut st.free_slots);
            st.trim(self.cfg.sandbox.is_some());
            if st.broken.is_none() && st.starts.retry_at.is_none() {
                st.make_up_workers(&self.cfg, &mut done);
            }
            st.send_kills();
            // The queue may now go to the new workers, or wait for them.
            st.dispatch(&self.cfg, true);
        }
        self.wake();
        self.run_completions(done);
        Ok(())
    }

    /// How many workers the pool keeps.
    pub(crate) fn size(&self) -> usize {
        self.lock().size
    }

    /// What the pool has done, and holds now.
    pub(crate) fn stats(&self) -> crate::stats::Stats {
        let st = self.lock();
        let mut s = self.counters.snapshot(&st.tally);
        s.queued = st.queue.len();
        let mut busy = st.tally.busy_ns.clone();
        busy.resize(busy.len().max(st.table.in_use), 0);
        for w in &st.workers {
            s.in_flight += w.in_flight().len();
            busy[w.slot()] += w.busy_ns();
        }
        s.busy = busy
            .into_iter()
            .map(std::time::Duration::from_nanos)
            .collect();
        s
    }

    /// Marks the pool terminated and resolves every outstanding task with
    /// `Terminated`; the supervisor thread then kills and reaps the processes.
    pub(crate) fn terminate(&self) {
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            st.phase = Phase::Terminated;
            st.fail_all(Error::Terminated, &mut done);
        }
        self.cv.notify_all();
        self.run_completions(done);
        self.wake();
    }

    /// Gives up on a pool whose supervisor thread could not start (or
    /// panicked): fails everything with `e`, closes the backend and waits
    /// for it.
    pub(crate) fn abandon(&self, e: Error) {
        let mut done = Vec::new();
        let backend = {
            let mut st = self.lock();
            st.phase = Phase::Terminated;
            st.fail_all(e, &mut done);
            st.workers.clear();
            st.spawning.clear();
            st.finished = true;
            st.backend.take()
        };
        self.cv.notify_all();
        self.run_completions(done);
        if let Some(b) = backend {
            b.wait();
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

impl State {
    /// Why a submission is refused now, if it is (see `Phase::refusal`).
    pub(crate) fn refusal(&self) -> Option<Error> {
        let has_workers = !self.workers.is_empty() || !self.spawning.is_empty();
        self.phase.refusal(self.broken.as_ref(), has_workers)
    }

    /// Whether the pool has fewer workers than its size. A sandboxed
    /// pool does not count a worker it is killing (its task done): the
    /// replacement starts at once, not once the kill is reported.
    pub(crate) fn short_of_workers(&self, cfg: &Config) -> bool {
        let have = match cfg.sandbox {
            Some(_) => self.workers.iter().filter(|w| w.counts()).count(),
            None => self.workers.len(),
        };
        have + self.spawning.len() < self.size
    }

    /// Workers that count towards the pool's size, started or starting.
    fn active(&self) -> usize {
        let started = self
            .workers
            .iter()
            .filter(|w| !w.retiring() && w.counts())
            .count();
        started + self.spawning.len()
    }

    /// Retires the workers beyond the pool's size, idle ones first.
    pub(crate) fn trim(&mut self, sandboxed: bool) {
        let excess = self.active().saturating_sub(self.size);
        if excess == 0 {
            return;
        }
        let members: Vec<Member> = self
            .workers
            .iter()
            .map(|w| Member {
                active: !w.retiring() && w.counts(),
                held: w.in_flight().len(),
            })
            .collect();
        for i in size::retirees(&members, excess) {
            let w = &mut self.workers[i];
            if sandboxed && w.in_flight().is_empty() {
                w.retire_now();
            } else {
                // It takes no more tasks; an unsandboxed one exits once
                // its tasks are done (its side of the socket is shut), a
                // sandboxed one is killed then (`retire_sandboxed`).
                w.retire();
            }
        }
    }

    /// Asks for workers up to the pool's size (after failed starts, or a
    /// resize).
    pub(crate) fn make_up_workers(&mut self, cfg: &Config, done: &mut Vec<Completion>) {
        while self.short_of_workers(cfg)
            && !self.free_slots.is_empty()
            && self.backend.as_ref().is_some_and(|b| b.is_open())
        {
            let back = self.request_spawn(Vec::new());
            if !back.is_empty() {
                done.extend(back);
                break;
            }
        }
    }

    /// In a sandboxed pool: starts the workers the pool is short of, if it
    /// still wants workers.
    fn start_replacements(&mut self, cfg: &Config) {
        if cfg.sandbox.is_none()
            || !self.phase.wants_workers(self.queue.is_empty())
            || self.broken.is_some()
            || self.starts.retry_at.is_some()
            || self.starts.gave_up()
        {
            return;
        }
        while self.short_of_workers(cfg) && !self.free_slots.is_empty() {
            let back = self.request_spawn(Vec::new());
            debug_assert!(back.is_empty());
            if self.backend.as_ref().is_none_or(|b| !b.is_open()) {
                break;
            }
        }
    }

    /// Asks the backend for a worker; `held` outcomes wait for it. Returns
    /// them at once if no start could be asked for.
    #[must_use]
    pub(crate) fn request_spawn(&mut self, held: Vec<Completion>) -> Vec<Completion> {
        let Some(backend) = self.backend.as_mut().filter(|b| b.is_open()) else {
            return held;
        };
        let Some(slot) = self.free_slots.pop() else {
            return held;
        };
        backend.start(slot);
        self.spawning.push((slot, held));
        Vec::new()
    }

    /// Asks the backend to kill every worker the pool has marked for a
    /// kill and not yet asked about.
    pub(crate) fn send_kills(&mut self) {
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        for w in self.workers.iter_mut() {
            if let Some(seq) = w.kill_to_send() {
                backend.kill(w.slot(), w.pid(), seq);
            }
        }
    }

    /// Fails every task the pool has, queued or held, with `e`.
    pub(crate) fn fail_all(&mut self, e: Error, done: &mut Vec<Completion>) {
        for j in self.queue.drain(..) {
            done.push(Completion::new(j.slot, j.hook, Err(e.clone())));
        }
        for w in self.workers.iter_mut() {
            for f in w.take_all() {
                if !f.job.cancelled {
                    done.push(Completion::new(f.job.slot, f.job.hook, Err(e.clone())));
                }
            }
        }
        for (_, held) in self.spawning.iter_mut() {
            done.append(held);
        }
    }

    /// Sends queued jobs to the workers that take them, as the plan says
    /// (`plan.rs`). Returns true if some bytes are still waiting for a
    /// socket to become writable, or a new deadline must be watched.
    pub(crate) fn dispatch(&mut self, cfg: &Config, from_caller: bool) -> bool {
        let mut pending = false;
        let live = self.workers.iter().filter(|w| w.ready()).count().max(1);
        let now = Instant::now();
        self.loads.clear();
        let max = cfg.max_tasks_per_child;
        self.loads.extend(self.workers.iter().map(|w| w.load(max)));
        plan::order(&self.loads, &mut self.order);
        // A sandboxed pool may hold more workers than its size for a
        // moment (replacements start before the kill is reported): no more
        // than its size run tasks at once.
        let (mut running, limit) = match cfg.sandbox {
            Some(_) => {
                let busy = self.workers.iter().filter(|w| !w.in_flight().is_empty());
                (busy.count(), self.size)
            }
            // Never more workers than its size: nothing to count.
            None => (0, usize::MAX),
        };
        let reused_sandbox = cfg.sandbox.as_ref().is_some_and(|l| l.tasks_per_worker > 1);
        for k in 0..self.order.len() {
            if self.queue.is_empty() {
                break;
            }
            let i = self.order[k];
            let load = self.loads[i];
            let w = &mut self.workers[i];
            if !plan::takes_tasks(&load, from_caller) || (load.held == 0 && running >= limit) {
                pending |= w.has_pending();
                continue;
            }
            if reused_sandbox && load.held == 0 && w.busy_while_idle() {
                // Killed before its next task, which runs elsewhere.
                w.retire_now();
                pending = true;
                continue;
            }
            if load.held == 0 {
                running += 1;
            }
            let mut batch = Batch::new(&load, self.queue.len(), live);
            while let Some(front) = self.queue.front() {
                let c = Candidate {
                    estimate: self.est.get(front.f, front.items),
                    timed: front.timeout.is_some(),
                    has_shared: !front.shared.is_empty(),
                    prefetch: cfg.prefetch_chunks && front.items > 1,
                };
                let Some(charge) = batch.admit(c, frame_bytes(front)) else {
                    break;
                };
                let job = self.queue.pop_front().expect("front exists");
                let timed = job.timeout;
                let seq = w.push_task(job, charge, cfg);
                match (timed, self.backend.as_mut()) {
                    (Some(t), Some(b)) if cfg.backend_keeps_timeouts => {
                        b.keep_timeout(w.slot(), seq, t);
                    }
                    (Some(t), _) => {
                        w.set_deadline(Some(now + t));
                        // The supervisor's poll must learn the new deadline.
                        pending = true;
                    }
                    (None, _) => {}
                }
            }
            // A worker sent its last task retires once it is out.
            pending |= match max.is_some_and(|m| w.sent() >= m) {
                true => w.retire(),
                false => w.flush(),
            };
        }
        self.start_replacements(cfg);
        pending
    }
}
