//! [`Pool`]: what a caller does with a pool (its tasks, maps and imaps,
//! its size, its end). How it is built (`Pool::new`, `Pool::builder`) is
//! `builder.rs`'s, the options of a call `options.rs`'s.

use crate::api::encode::{encode_arg, encode_chunk};
use crate::api::feed::{self, Auto, Bound, ChunkFeeder, Sizing};
use crate::api::join::{JoinFuture, SetOnDrop};
use crate::api::options::{Data, MapOptions, OnError, OnSuccess, TaskOptions};
use crate::api::result::{
    AsyncResult, Imap, ImapUnordered, MapResult, Ready, assemble, decode_payload,
};
use crate::engine::completion::{Group, Hook, Hub, Outcome, Payload, Signal, Slot, complete};
use crate::engine::core::{Engine, Launch};
use crate::engine::lifecycle::Phase;
use crate::engine::supervisor;
use crate::error::{Error, Result};
use crate::proto::shared_buf::Mode;
use crate::proto::task::{self, TaskFn};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A pool of worker processes.
///
/// Tasks are plain functions `fn(A) -> R` whose argument and result travel
/// serialized, or [`Task`](crate::Task)s, which carry state of their own. A task that panics fails alone; a worker that dies fails
/// only the task it held and is replaced. Dropping the pool terminates it:
/// workers are killed and reaped, outstanding results resolve with
/// [`Error::Terminated`]. `Pool` is `Send + Sync`: share it between threads
/// by reference or in an `Arc`.
///
/// ```
/// use procpool::Pool;
/// fn square(x: u64) -> u64 { x * x }
/// fn add((a, b): (i64, i64)) -> i64 { a + b }
///
/// let pool = Pool::builder().processes(2).build()?;
/// assert_eq!(pool.apply(square, 12)?, 144);
/// assert_eq!(pool.map(square, 1..=4)?, vec![1, 4, 9, 16]);
/// assert_eq!(pool.map(add, vec![(1, 2), (3, 4)])?, vec![3, 7]);   // starmap
/// let r = pool.apply_async(square, 5)?;
/// assert_eq!(r.get()?, 25);
/// pool.close();
/// pool.join()?;
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// A capturing closure cannot be a task, since what it captures could not
/// travel (error E0308: closures can only be coerced to `fn` types if they
/// do not capture any variables); put what it captures in a
/// [`Task`](crate::Task) instead ([`apply_task`](Self::apply_task)):
///
/// ```compile_fail,E0308
/// let pool = procpool::Pool::new().unwrap();
/// let k = 3;
/// pool.apply(move |x: i32| x + k, 1);
/// ```
pub struct Pool {
    engine: Arc<Engine>,
    /// The supervisor thread, until it is joined.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Set when the supervisor thread ends (for `join_async`).
    exited: Arc<Signal>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.engine.size())
            .field("phase", &self.engine.phase())
            .finish()
    }
}

impl Pool {
    /// Starts the supervisor thread over a backend, asks for the workers
    /// and waits until they are ready.
    pub(crate) fn start(launch: Launch) -> Result<Pool> {
        let engine = Engine::new(launch)?;
        let s2 = engine.clone();
        let exited = Signal::new();
        let on_exit = SetOnDrop(exited.clone());
        let thread = std::thread::Builder::new()
            .name("procpool-supervisor".into())
            .spawn(move || {
                let _on_exit = on_exit;
                supervisor::run(s2)
            })
            .map_err(|e| {
                engine.abandon(Error::Terminated);
                Error::io("starting the supervisor thread", e)
            })?;
        let pool = Pool {
            engine,
            supervisor: Mutex::new(Some(thread)),
            exited,
        };
        pool.engine.start_workers()?;
        Ok(pool)
    }

    /// The number of worker processes the pool keeps (as built, or as
    /// [`resize`](Self::resize) last set it).
    pub fn processes(&self) -> usize {
        self.engine.size()
    }

    /// Grows or shrinks the pool to `n` workers, while it runs.
    ///
    /// Growing starts the new workers at once (the call does not wait for
    /// them; queued tasks go to them as they are ready). Shrinking retires
    /// the workers the pool no longer needs, idle ones first: an idle
    /// worker at once, a busy one once the tasks it holds are done, so no
    /// task is lost or run twice (a sandboxed worker is killed then, never
    /// waited for). [`processes`](Self::processes) says `n` from now on;
    /// [`worker_pids`](Self::worker_pids) follows as workers start and
    /// exit.
    ///
    /// A pool grows to at most `max(2 × its first size, 1024)` workers.
    /// Errors: `n` is 0 or beyond that bound ([`Error::Config`]); the pool
    /// is closed, terminated or broken (the error a submission would get);
    /// the pool's workers are MPI ranks, fixed at launch ([`Error::Config`]).
    ///
    /// ```
    /// fn pid(_: ()) -> u32 { std::process::id() }
    ///
    /// let pool = procpool::Pool::builder().processes(1).build()?;
    /// pool.resize(3)?;
    /// assert_eq!(pool.processes(), 3);
    /// let pids = pool.map(pid, vec![(); 30])?;
    /// assert!(pids.iter().all(|p| *p != std::process::id()));
    /// pool.resize(1)?;
    /// assert_eq!(pool.processes(), 1);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn resize(&self, n: usize) -> Result<()> {
        self.engine.resize(n)
    }

    /// What the pool has done since it was built (tasks by outcome,
    /// retries, workers started and ended by cause, busy time per slot),
    /// and what it holds now: see [`Stats`](crate::Stats) for each
    /// counter's unit.
    pub fn stats(&self) -> crate::Stats {
        self.engine.stats()
    }

    /// The pids of the live workers.
    ///
    /// ```
    /// let pool = procpool::Pool::builder().processes(3).build()?;
    /// assert_eq!(pool.worker_pids().len(), 3);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn worker_pids(&self) -> Vec<u32> {
        self.engine.worker_pids()
    }

    /// How this pool's tasks carry `SharedBuf`s.
    fn shared_mode(&self) -> Mode {
        if self.engine.cfg.inline_shared {
            Mode::Inline
        } else {
            Mode::Fds
        }
    }

    /// The pid of the process that starts this pool's workers. For a local
    /// pool, the fork server: the parent of every worker, and the pool's one
    /// child process, which exits (and is reaped) when the pool is joined,
    /// terminated or dropped. Over MPI (`PoolBuilder::mpi`), this process's
    /// own pid (rank 0's): each worker rank has a fork server of its own, on
    /// its own host.
    pub fn server_pid(&self) -> u32 {
        self.engine.server_pid()
    }

    /// Runs `f(arg)` in a worker and waits for its value.
    pub fn apply<A: Data, R: Data>(&self, f: fn(A) -> R, arg: A) -> Result<R> {
        self.apply_async(f, arg)?.get()
    }

    /// [`apply`](Self::apply) with per-task options.
    pub fn apply_with<A: Data, R: Data>(
        &self,
        f: fn(A) -> R,
        arg: A,
        opts: TaskOptions<R>,
    ) -> Result<R> {
        self.apply_async_with(f, arg, opts)?.get()
    }

    /// Queues `f(arg)` and returns at once. Fails with [`Error::Closed`]
    /// after [`close`](Self::close), [`Error::Terminated`] after
    /// [`terminate`](Self::terminate), and [`Error::Encode`] if `arg`
    /// cannot be serialized.
    pub fn apply_async<A: Data, R: Data>(&self, f: fn(A) -> R, arg: A) -> Result<AsyncResult<R>> {
        self.apply_async_with(f, arg, TaskOptions::default())
    }

    /// [`apply_async`](Self::apply_async) with a timeout, retries and callbacks.
    pub fn apply_async_with<A: Data, R: Data>(
        &self,
        f: fn(A) -> R,
        arg: A,
        opts: TaskOptions<R>,
    ) -> Result<AsyncResult<R>> {
        self.submit_one(TaskFn::single(f), &arg, opts)
    }

    /// Queues one task: `tf` run on `input` (an argument, or a
    /// [`Task`](crate::Task) with its argument).
    pub(crate) fn submit_one<P: Serialize, R: Data>(
        &self,
        tf: TaskFn,
        input: &P,
        opts: TaskOptions<R>,
    ) -> Result<AsyncResult<R>> {
        let cache = (!self.engine.cfg.inline_bodies).then_some(&*self.engine.blocks);
        let input = encode_arg(input, cache, self.shared_mode())?;
        let job_opts = opts.job_options();
        let hook = match (opts.on_success, opts.on_error) {
            (None, None) => Hook::None,
            (ok, err) => Hook::Handler(Box::new(move |o: Outcome| {
                let r = decode_payload::<R>(o);
                run_callbacks(r, ok, err)
            })),
        };
        let slot = self.engine.new_slot();
        let job = input.job(tf, hook, 0, None, job_opts);
        self.engine.submit(slot.clone(), job)?;
        Ok(AsyncResult {
            slot,
            pool: Arc::downgrade(&self.engine),
            _r: PhantomData,
        })
    }

    /// Applies `f` to every item, in chunks, and returns the values in input
    /// order. On failure, returns the first error in input order, once every
    /// chunk has finished.
    pub fn map<A: Data, R: Data>(
        &self,
        f: fn(A) -> R,
        items: impl IntoIterator<Item = A>,
    ) -> Result<Vec<R>> {
        self.map_async(f, items)?.get()
    }

    /// [`map`](Self::map) with options (chunk size, timeout, retries).
    pub fn map_with<A: Data, R: Data>(
        &self,
        f: fn(A) -> R,
        items: impl IntoIterator<Item = A>,
        opts: MapOptions<R>,
    ) -> Result<Vec<R>> {
        self.map_async_with(f, items, opts)?.get()
    }

    /// Queues a map and returns at once; see [`MapResult`].
    pub fn map_async<A: Data, R: Data>(
        &self,
        f: fn(A) -> R,
        items: impl IntoIterator<Item = A>,
    ) -> Result<MapResult<R>> {
        self.map_async_with(f, items, MapOptions::default())
    }

    /// [`map_async`](Self::map_async) with options and callbacks (which
    /// receive the whole list, or the first error).
    pub fn map_async_with<A: Data, R: Data>(
        &self,
        f: fn(A) -> R,
        items: impl IntoIterator<Item = A>,
        opts: MapOptions<R>,
    ) -> Result<MapResult<R>> {
        self.map_chunks(TaskFn::chunk(f), &[], items, opts)
    }

    /// Queues a map of `tf` over `items`, each chunk's input led by
    /// `prefix` (a [`Task`](crate::Task)'s state, or nothing).
    pub(crate) fn map_chunks<A: Data, R: Data>(
        &self,
        tf: TaskFn,
        prefix: &[u8],
        items: impl IntoIterator<Item = A>,
        opts: MapOptions<R>,
    ) -> Result<MapResult<R>> {
        self.engine.check_running()?;
        let items: Vec<A> = items.into_iter().collect();
        let total = items.len();
        // In a sandboxed pool each item is alone (a chunk shares one
        // process, and its fate) unless the caller sets a chunk size.
        // Workers on other hosts hold their next chunk while they run one
        // (`Config::prefetch_chunks`): smaller chunks there, so that less
        // of the first and last chunks' way is waited for.
        let per_worker = if self.engine.cfg.prefetch_chunks {
            16
        } else {
            4
        };
        let chunksize = opts
            .chunksize
            .unwrap_or_else(|| match self.engine.cfg.sandbox {
                Some(_) => 1,
                None => total.div_ceil(per_worker * self.processes()).max(1),
            });
        let nchunks = total.div_ceil(chunksize);
        let first = self.engine.reserve_ids(nchunks as u64);
        let done = Slot::new(0);
        let group = Group::new(nchunks, done.clone());
        let chunks: Vec<Arc<Slot>> = (0..nchunks).map(|i| Slot::new(first + i as u64)).collect();
        let job_opts = opts.job_options();
        let callbacks = opts.on_success.is_some() || opts.on_error.is_some();
        if callbacks {
            let (ok, err) = (opts.on_success, opts.on_error);
            let cs = chunks.clone();
            group.set_on_done(Box::new(move || {
                run_callbacks(assemble::<R>(&cs, total), ok, err)
            }));
        }
        let result = MapResult {
            chunks,
            group,
            total,
            pool: Arc::downgrade(&self.engine),
            early: None,
            callbacks,
            _r: PhantomData,
        };
        if nchunks == 0 {
            // Nothing to run: the map is done now (callbacks still run on the
            // result-handler thread).
            result.group.finish(&self.engine.handler);
            return Ok(result);
        }
        // Submit each chunk as soon as it is encoded, so the workers start
        // while the rest is being encoded. A chunk that cannot be encoded
        // fails as a whole, in its place in the input order.
        let mode = self.shared_mode();
        for (chunk, slot) in items.chunks(chunksize).zip(result.chunks.iter()) {
            let hook = Hook::Group(result.group.clone(), chunk.len());
            let input = match encode_chunk(prefix, chunk, mode) {
                Ok(x) => x,
                Err(e) => {
                    complete(slot.clone(), hook, Err(e), &self.engine.handler);
                    continue;
                }
            };
            let job = input.job(tf, hook, chunk.len(), None, job_opts);
            if let Err(e) = self.engine.submit(slot.clone(), job) {
                // Closed or terminated: nothing of this map may run.
                result.cancel();
                return Err(e);
            }
        }
        Ok(result)
    }

    /// Whether an imap without a chunk size sizes its chunks itself: not
    /// with a timeout, a soft timeout or retries (they apply per chunk, so
    /// each item keeps its own), nor in a sandboxed pool (a chunk shares
    /// one process, and its fate), nor where the backend cannot say which
    /// item of a chunk a dead worker ran (MPI ranks).
    fn sizes_chunks<R>(&self, opts: &MapOptions<R>) -> bool {
        let cfg = &self.engine.cfg;
        opts.chunksize.is_none()
            && cfg.item_progress
            && cfg.sandbox.is_none()
            && opts.timeout.or(cfg.timeout).is_none()
            && opts.soft_timeout.or(cfg.soft_timeout).is_none()
            && opts.retries.unwrap_or(cfg.retries) == 0
    }

    /// An imap's feeder, and how much it may have in flight.
    fn feeder<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        tf: TaskFn,
        prefix: Result<Vec<u8>>,
        items: I,
        opts: &MapOptions<R>,
    ) -> (ChunkFeeder<I::IntoIter>, Bound) {
        let auto = self.sizes_chunks(opts);
        let chunksize = opts.chunksize.unwrap_or(1);
        // Auto-sized chunks: two per worker in flight keep the workers
        // busy while a result that is in is yielded.
        let keep = 2 * self.processes();
        let (sizing, bound) = match (auto, opts.in_flight) {
            // The caller's bound counts items, as it did with chunks of 1.
            (true, Some(k)) => (
                Sizing::Auto(Auto::default()),
                Bound::new(k, k, usize::MAX, keep),
            ),
            (true, None) => (
                Sizing::Auto(Auto::default()),
                Bound::new(
                    (4 * self.processes()).max(4096),
                    feed::ITEMS_IN_FLIGHT,
                    feed::BYTES_IN_FLIGHT,
                    keep,
                ),
            ),
            // A chunk size: the window is topped up first, as it was.
            (false, k) => {
                let chunks =
                    k.unwrap_or_else(|| (4 * self.processes()).max(4096usize.div_ceil(chunksize)));
                let bound = Bound::new(chunks, usize::MAX, usize::MAX, usize::MAX);
                (Sizing::Fixed(chunksize), bound)
            }
        };
        let feeder = ChunkFeeder {
            it: items.into_iter(),
            f: tf,
            prefix,
            sizing,
            engine: self.engine.clone(),
            opts: opts.job_options(),
            mode: self.shared_mode(),
            ended: false,
            panicked: None,
        };
        (feeder, bound)
    }

    /// A lazy iterator of `f(item)` for every item, in input order. It
    /// pulls input only as results are consumed and keeps a bounded number
    /// of items in flight, so an endless input is fine.
    ///
    /// The pool sizes the chunks (where CPython's `imap` sends one item per
    /// task): the first items go alone; then, as the pool learns how long
    /// one item takes to run (in the workers) and to pull from the input
    /// (here), chunks grow, at most doubling each time, towards about a
    /// millisecond of work each. Tiny items go thousands to a chunk, so an
    /// `imap` of them keeps pace with [`map`](Self::map), and slow ones
    /// alone. A chunk is sent as soon as pulling it takes longer than that,
    /// so the items of a slow input are not held back to fill one; and
    /// while the input is slow, a result expected soon is yielded before
    /// the next item is pulled.
    ///
    /// Each item keeps its own fate. A panic fails only its item; so does
    /// an item that cannot be encoded; so does a crash of its worker (an
    /// abort, a segfault, a kill): that item fails with
    /// [`Error::WorkerLost`], the items after it in its chunk run on another
    /// worker, and those before it, whose results died with the worker, run
    /// again. For work that must not run twice, give a chunk size:
    /// [`MapOptions::chunksize`] keeps CPython's meaning exactly (`1` is
    /// CPython's `imap`). Items stay alone anyway with a timeout, a soft
    /// timeout or retries (which apply per task), in a sandboxed pool, and
    /// over MPI.
    ///
    /// ```
    /// fn square(x: u64) -> u64 { x * x }
    /// let pool = procpool::Pool::builder().processes(2).build()?;
    /// let mut sum = 0;
    /// for r in pool.imap(square, 0..100_000) {
    ///     sum += r?;
    /// }
    /// assert_eq!(sum, (0..100_000u64).map(square).sum::<u64>());
    /// # Ok::<(), procpool::Error>(())
    /// ```
    ///
    /// It is also an async [`Stream`](futures_core::Stream) of the same
    /// items (see [`Imap`]).
    pub fn imap<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        f: fn(A) -> R,
        items: I,
    ) -> Imap<R, I::IntoIter> {
        self.imap_with(f, items, MapOptions::default())
    }

    /// [`imap`](Self::imap) with options (chunk size, in-flight bound, ...).
    pub fn imap_with<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        f: fn(A) -> R,
        items: I,
        opts: MapOptions<R>,
    ) -> Imap<R, I::IntoIter> {
        self.imap_chunks(TaskFn::chunk(f), Ok(Vec::new()), items, opts)
    }

    /// An `imap` of `tf` over `items`, each chunk's input led by `prefix`
    /// (a [`Task`](crate::Task)'s state, or nothing; if it could not be
    /// encoded, every chunk fails with that error).
    pub(crate) fn imap_chunks<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        tf: TaskFn,
        prefix: Result<Vec<u8>>,
        items: I,
        opts: MapOptions<R>,
    ) -> Imap<R, I::IntoIter> {
        let (feeder, bound) = self.feeder(tf, prefix, items, &opts);
        Imap {
            feeder,
            window: VecDeque::new(),
            ready: Ready::default(),
            bound,
            waited: false,
            exhausted: false,
            pool: Arc::downgrade(&self.engine),
        }
    }

    /// Like [`imap`](Self::imap), but yields results in the order they
    /// finish (of chunks: the items of one chunk come in input order).
    /// Without a chunk size, the pool sizes the chunks as `imap` does.
    /// Also an async [`Stream`](futures_core::Stream).
    ///
    /// ```
    /// use std::collections::HashSet;
    /// fn square(x: u64) -> u64 { x * x }
    /// let pool = procpool::Pool::builder().processes(2).build()?;
    /// let got: HashSet<u64> = pool.imap_unordered(square, 0..10_000).collect::<Result<_, _>>()?;
    /// assert_eq!(got.len(), 10_000);
    /// assert!(got.contains(&(9_999 * 9_999)));
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn imap_unordered<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        f: fn(A) -> R,
        items: I,
    ) -> ImapUnordered<R, I::IntoIter> {
        self.imap_unordered_with(f, items, MapOptions::default())
    }

    /// [`imap_unordered`](Self::imap_unordered) with options.
    pub fn imap_unordered_with<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        f: fn(A) -> R,
        items: I,
        opts: MapOptions<R>,
    ) -> ImapUnordered<R, I::IntoIter> {
        self.imap_unordered_chunks(TaskFn::chunk(f), Ok(Vec::new()), items, opts)
    }

    /// An `imap_unordered` of `tf` over `items`, as [`imap_chunks`](Self::imap_chunks).
    pub(crate) fn imap_unordered_chunks<A: Data, R: Data, I: IntoIterator<Item = A>>(
        &self,
        tf: TaskFn,
        prefix: Result<Vec<u8>>,
        items: I,
        opts: MapOptions<R>,
    ) -> ImapUnordered<R, I::IntoIter> {
        let (feeder, bound) = self.feeder(tf, prefix, items, &opts);
        ImapUnordered {
            feeder,
            input_panic: None,
            in_flight: HashMap::new(),
            ready: Ready::default(),
            bound,
            waited: false,
            exhausted: false,
            next_index: 0,
            hub: Hub::new(),
            pool: Arc::downgrade(&self.engine),
        }
    }

    /// Stops taking tasks; queued tasks still run. Then [`join`](Self::join)
    /// waits for them and for the workers to exit.
    pub fn close(&self) {
        self.engine.close();
    }

    /// Kills the workers at once and resolves every outstanding result with
    /// [`Error::Terminated`]; returns once every process of the pool is reaped.
    pub fn terminate(&self) {
        self.engine.terminate();
        self.join_supervisor();
    }

    /// Waits for the workers to finish and exit, and reaps them. Allowed only
    /// after [`close`](Self::close) or [`terminate`](Self::terminate), as in
    /// CPython: otherwise [`Error::StillRunning`].
    ///
    /// It blocks the calling thread until the queue is done and every
    /// process has exited, and the callbacks of finished tasks have run. In
    /// async code, await [`join_async`](Self::join_async) instead.
    ///
    /// If the pool broke meanwhile (its fork server was killed, no worker
    /// could be started, the initializer kept failing), it returns that
    /// error ([`Error::Broken`], [`Error::InitializerFailed`]) once
    /// everything is reaped: the tasks that were waiting did not run.
    pub fn join(&self) -> Result<()> {
        if self.engine.phase() == Phase::Running {
            return Err(Error::StillRunning);
        }
        self.join_supervisor();
        // As in CPython, the callbacks of finished tasks have run by now.
        self.engine.handler.drain();
        match self.engine.broken() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// [`join`](Self::join) as a future, for async code: it resolves (with
    /// what `join` would return) once the pool is joined, without blocking
    /// a thread meanwhile. The future is `Send + 'static`; it works in any
    /// runtime (the crate depends on none). On a running pool it resolves
    /// at once with [`Error::StillRunning`].
    ///
    /// ```
    /// use std::time::Duration;
    /// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
    /// let pool = procpool::Pool::builder().processes(2).build()?;
    /// let r = pool.apply_async(nap, 50)?;
    /// pool.close();
    /// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// rt.block_on(pool.join_async())?;      // the runtime's thread is free meanwhile
    /// assert!(r.ready());
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn join_async(&self) -> JoinFuture {
        if self.engine.phase() == Phase::Running {
            return JoinFuture::failed(Error::StillRunning);
        }
        JoinFuture::new(self.exited.clone(), self.engine.clone())
    }

    fn join_supervisor(&self) {
        let h = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Runs the user's callbacks on the result-handler thread and returns what
/// the result then holds.
fn run_callbacks<R: Send + 'static>(
    r: Result<R>,
    ok: Option<OnSuccess<R>>,
    err: Option<OnError>,
) -> Outcome {
    let called = catch_unwind(AssertUnwindSafe(|| match &r {
        Ok(v) => {
            if let Some(f) = ok {
                f(v)
            }
        }
        Err(e) => {
            if let Some(f) = err {
                f(e)
            }
        }
    }));
    match called {
        Err(p) => Err(Error::CallbackPanicked {
            message: task::panic_message(&*p),
        }),
        Ok(()) => r.map(|v| Payload::Value(Box::new(v))),
    }
}
