//! [`Pool`] and [`PoolBuilder`]: the public API.

use crate::api::encode::{encode_arg, encode_chunk};
use crate::api::feed::{self, Auto, Bound, ChunkFeeder, Sizing};
use crate::api::join::{JoinFuture, SetOnDrop};
use crate::api::result::{
    AsyncResult, Imap, ImapUnordered, MapResult, Ready, assemble, decode_payload,
};
use crate::backend::local;
use crate::backend::local::output::{Output, Streams};
use crate::backend::local::server::{Init, Setup};
use crate::backend::local::start::StartMethod;
use crate::engine::completion::{Group, Hook, Hub, Outcome, Payload, Signal, Slot, complete};
use crate::engine::core::{Launch, Shared};
use crate::engine::job::{Config, JobOptions};
use crate::engine::lifecycle::Phase;
use crate::engine::size::SlotTable;
use crate::engine::supervisor;
use crate::error::{Error, Result};
use crate::proto::codec;
use crate::proto::shared_buf::Mode;
use crate::proto::task::{self, TaskFn};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Builder methods that store what they are given. Each entry is a
/// method's docs, its name and argument, and the fields it sets:
/// `fn timeout(t: Duration) { timeout = Some(t) }` becomes
/// `pub fn timeout(mut self, t: Duration) -> Self`.
macro_rules! setters {
    ($($(#[$doc:meta])* fn $name:ident($arg:ident: $t:ty) { $($field:ident = $val:expr),+ })*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, $arg: $t) -> Self {
                $(self.$field = $val;)+
                self
            }
        )*
    };
}

/// A value that can travel to a worker and back: anything serde can
/// serialize and deserialize into an owned value.
///
/// Arguments, map items and results must be **owned**: they are bytes in
/// another process, and a worker's value cannot borrow from the caller's
/// memory. So `String`, not `&str`; `Vec<u8>`, not `&[u8]`:
///
/// ```
/// fn shout(s: String) -> String { s.to_uppercase() }
/// let pool = procpool::Pool::builder().processes(1).build()?;
/// let words = ["a", "b"].map(String::from);          // owned items
/// assert_eq!(pool.map(shout, words)?, vec!["A", "B"]);
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// Borrowed items do not compile. The compiler says "implementation of
/// `Deserialize` is not general enough" (`&str` implements `Deserialize`
/// only for one lifetime, the bytes it borrows from, where an owned value
/// is `for<'de> Deserialize<'de>`); that error has no code:
///
/// ```compile_fail
/// fn len(s: &str) -> usize { s.len() }
/// let pool = procpool::Pool::builder().processes(1).build()?;
/// let n = pool.map(len, vec!["a", "b"]); // error: `Deserialize` is not general enough
/// # Ok::<(), procpool::Error>(())
/// ```
pub trait Data: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> Data for T {}

type OnSuccess<R> = Box<dyn FnOnce(&R) + Send>;
type OnError = Box<dyn FnOnce(&Error) + Send>;

/// Per-task settings for [`Pool::apply_async_with`]: a timeout, retries and
/// callbacks. Callbacks run on the pool's result-handler thread, one at a
/// time, in completion order, before the result becomes ready; a callback
/// that panics turns the task's result into [`Error::CallbackPanicked`].
///
/// ```
/// use procpool::{Pool, TaskOptions};
/// use std::sync::mpsc;
/// fn square(x: u64) -> u64 { x * x }
/// let pool = Pool::builder().processes(2).build()?;
/// let (tx, rx) = mpsc::channel();
/// let r = pool.apply_async_with(square, 9, TaskOptions::new().on_success(move |v: &u64| {
///     tx.send(*v).unwrap();
/// }))?;
/// assert_eq!(r.get()?, 81);
/// assert_eq!(rx.recv().unwrap(), 81);
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "options apply only once given to an _with method"]
pub struct TaskOptions<R> {
    timeout: Option<Duration>,
    soft_timeout: Option<Duration>,
    retries: Option<u32>,
    retry_shared: bool,
    on_success: Option<OnSuccess<R>>,
    on_error: Option<OnError>,
}

impl<R> Default for TaskOptions<R> {
    fn default() -> Self {
        TaskOptions {
            timeout: None,
            soft_timeout: None,
            retries: None,
            retry_shared: false,
            on_success: None,
            on_error: None,
        }
    }
}

impl<R> TaskOptions<R> {
    /// No timeout beyond the pool's, no retries beyond the pool's, no callbacks.
    pub fn new() -> Self {
        Self::default()
    }

    /// What goes with the task's job.
    fn job_options(&self) -> JobOptions {
        JobOptions {
            timeout: self.timeout,
            soft_timeout: self.soft_timeout,
            retries: self.retries,
            retry_shared: self.retry_shared,
        }
    }

    setters! {
        /// Kill the worker and fail the task with [`Error::Timeout`] if it runs
        /// longer than this (overrides the pool's default).
        fn timeout(timeout: Duration) { timeout = Some(timeout) }

        /// A soft time limit (overrides the pool's default): once the task has
        /// run this long, [`deadline_passed`](crate::deadline_passed) returns
        /// true in it, so that it can stop with a partial result or clean up.
        /// Nothing is killed at the soft limit; the hard
        /// [`timeout`](Self::timeout), if any, still kills the worker later.
        /// As billiard's (Celery's) `soft_time_limit`, but cooperative.
        fn soft_timeout(soft: Duration) { soft_timeout = Some(soft) }

        /// Run the task again, up to `n` times, if its worker dies under it
        /// (overrides the pool's default). Only for idempotent work. A task
        /// whose argument holds [`SharedBuf`](crate::SharedBuf)s is not run
        /// again (it fails with [`Error::WorkerLostShared`]) unless
        /// [`retries_with_shared`](Self::retries_with_shared) asks for it.
        fn retries(n: u32) { retries = Some(n) }

        /// As [`retries`](Self::retries), and also for a task whose argument
        /// holds [`SharedBuf`](crate::SharedBuf)s: the retry gets the same
        /// buffers as the dead worker left them, possibly half written. Only
        /// for work that copes with that (it rewrites them whole, say).
        fn retries_with_shared(n: u32) { retries = Some(n), retry_shared = true }

        /// Called with the value on the result-handler thread.
        fn on_success(f: impl FnOnce(&R) + Send + 'static) { on_success = Some(Box::new(f)) }

        /// Called with the error on the result-handler thread.
        fn on_error(f: impl FnOnce(&Error) + Send + 'static) { on_error = Some(Box::new(f)) }
    }
}

impl<R> std::fmt::Debug for TaskOptions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskOptions")
            .field("timeout", &self.timeout)
            .field("soft_timeout", &self.soft_timeout)
            .field("retries", &self.retries)
            .field("retry_shared", &self.retry_shared)
            .field("on_success", &self.on_success.is_some())
            .field("on_error", &self.on_error.is_some())
            .finish()
    }
}

/// Settings for the map family: chunk size, per-chunk timeout and retries,
/// how many chunks an `imap` keeps in flight, and (for `map_async_with`)
/// callbacks that receive the whole list.
///
/// ```
/// use procpool::{MapOptions, Pool};
/// fn inc(x: u32) -> u32 { x + 1 }
/// let pool = Pool::builder().processes(2).build()?;
/// let v = pool.map_with(inc, 0..10, MapOptions::new().chunksize(3))?;
/// assert_eq!(v, (1..11).collect::<Vec<_>>());
/// # Ok::<(), procpool::Error>(())
/// ```
#[must_use = "options apply only once given to an _with method"]
pub struct MapOptions<R> {
    chunksize: Option<usize>,
    timeout: Option<Duration>,
    soft_timeout: Option<Duration>,
    retries: Option<u32>,
    retry_shared: bool,
    in_flight: Option<usize>,
    on_success: Option<OnSuccess<Vec<R>>>,
    on_error: Option<OnError>,
}

impl<R> Default for MapOptions<R> {
    fn default() -> Self {
        MapOptions {
            chunksize: None,
            timeout: None,
            soft_timeout: None,
            retries: None,
            retry_shared: false,
            in_flight: None,
            on_success: None,
            on_error: None,
        }
    }
}

impl<R> MapOptions<R> {
    /// The defaults: CPython's chunk size for `map`, chunks the pool sizes
    /// itself for `imap` (see [`Pool::imap`]), the pool's timeout and
    /// retries.
    pub fn new() -> Self {
        Self::default()
    }

    /// What goes with each chunk's job.
    fn job_options(&self) -> JobOptions {
        JobOptions {
            timeout: self.timeout,
            soft_timeout: self.soft_timeout,
            retries: self.retries,
            retry_shared: self.retry_shared,
        }
    }

    setters! {
        /// Items per task, as in CPython: every chunk but the last holds
        /// exactly `n` items. Zero counts as 1. Without it, `map` uses
        /// ceil(n / (4 × workers)) as CPython does, and `imap` and
        /// `imap_unordered` size each chunk themselves, from what the pool
        /// learns of the task's run time and of the input's (see
        /// [`Pool::imap`]); `chunksize(1)` gives CPython's `imap`, one item
        /// per task.
        fn chunksize(n: usize) { chunksize = Some(n.max(1)) }

        /// A timeout for each chunk (see [`TaskOptions::timeout`]).
        fn timeout(timeout: Duration) { timeout = Some(timeout) }

        /// A soft time limit for each chunk (see [`TaskOptions::soft_timeout`]).
        fn soft_timeout(soft: Duration) { soft_timeout = Some(soft) }

        /// Retries for each chunk whose worker dies (see [`TaskOptions::retries`]).
        fn retries(n: u32) { retries = Some(n) }

        /// Retries for each chunk, also for chunks that hold
        /// [`SharedBuf`](crate::SharedBuf)s (see
        /// [`TaskOptions::retries_with_shared`]).
        fn retries_with_shared(n: u32) { retries = Some(n), retry_shared = true }

        /// For `imap`: at most this many chunks in flight (default: enough to
        /// keep every worker busy, at least 4 per worker). Where `imap`
        /// sizes its chunks itself (no [`chunksize`](Self::chunksize)), at
        /// most this many items, as with chunks of one item.
        fn in_flight(chunks: usize) { in_flight = Some(chunks.max(1)) }

        /// For `map_async_with`: called with every value, in input order.
        fn on_success(f: impl FnOnce(&Vec<R>) + Send + 'static) { on_success = Some(Box::new(f)) }

        /// For `map_async_with`: called with the first error in input order.
        fn on_error(f: impl FnOnce(&Error) + Send + 'static) { on_error = Some(Box::new(f)) }
    }
}

impl<R> std::fmt::Debug for MapOptions<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapOptions")
            .field("chunksize", &self.chunksize)
            .field("timeout", &self.timeout)
            .field("soft_timeout", &self.soft_timeout)
            .field("retries", &self.retries)
            .field("retry_shared", &self.retry_shared)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Builds a [`Pool`].
///
/// ```
/// fn setup(level: u32) { let _ = level; }
/// fn work(x: u32) -> u32 { x * 2 }
/// let pool = procpool::Pool::builder()
///     .processes(2)
///     .initializer(setup, 3)
///     .max_tasks_per_child(1000)
///     .build()?;
/// assert_eq!(pool.apply(work, 21)?, 42);
/// # Ok::<(), procpool::Error>(())
/// ```
#[derive(Debug, Default, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct PoolBuilder {
    processes: Option<usize>,
    init: Option<std::result::Result<Init, Error>>,
    max_tasks_per_child: Option<u64>,
    max_memory_per_child: Option<u64>,
    timeout: Option<Duration>,
    soft_timeout: Option<Duration>,
    retries: u32,
    start_method: Option<StartMethod>,
    backtraces: Option<bool>,
    forward_logs: Option<log::LevelFilter>,
    sandbox: Option<crate::sandbox::Sandbox>,
    stdout: Option<Output>,
    stderr: Option<Output>,
    // Also in docs.rs's build, which shows the MPI methods without the
    // feature (it has no MPI library to build it with).
    #[cfg(any(feature = "mpi", docsrs))]
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    mpi: bool,
    #[cfg(any(feature = "mpi", docsrs))]
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    workers_per_rank: Option<usize>,
}

impl std::fmt::Debug for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Init")
            .field("arg_bytes", &self.arg.len())
            .finish()
    }
}

impl PoolBuilder {
    setters! {
        /// The number of worker processes (default: the CPU count). Zero is an error.
        fn processes(n: usize) { processes = Some(n) }
    }

    /// A function that every worker runs once, with `arg`, before its first
    /// task (replacements too). If it panics or the worker dies in it,
    /// [`build`](Self::build) returns [`Error::InitializerFailed`]; a pool
    /// never respawns a worker whose initializer failed.
    pub fn initializer<A: Data>(mut self, f: fn(A), arg: A) -> Self {
        let mut bytes = Vec::new();
        self.init = Some(match codec::encode_into(&arg, &mut bytes) {
            Ok(()) => Ok(Init {
                f: TaskFn::single::<A, ()>(f),
                arg: bytes,
            }),
            Err(source) => Err(Error::Encode {
                what: "argument",
                source,
            }),
        });
        self
    }

    setters! {
        /// A worker exits after this many tasks (chunks, for the map family) and
        /// is replaced, as CPython's `maxtasksperchild`. Zero is an error.
        fn max_tasks_per_child(n: u64) { max_tasks_per_child = Some(n) }

        /// A worker whose private memory has grown by more than `bytes` since
        /// it started (after the initializer) is replaced once its current task
        /// is done; that task's result is kept, and tasks sent to it that had
        /// not started run elsewhere. For code that leaks (a C library, say):
        /// as billiard's `max_memory_per_child` and loky's leak detection, and
        /// less blunt than [`max_tasks_per_child`](Self::max_tasks_per_child).
        /// Zero is an error.
        ///
        /// What is measured is the worker's resident anonymous memory
        /// (`RssAnon`): memory it allocated *and wrote*. Pages it shares with
        /// your process since the fork, the executable and libraries, and the
        /// shared-memory blocks that large arguments travel in are not counted,
        /// nor is memory reserved but never touched. It is checked after each
        /// task (a read of `/proc/self/statm`, a few microseconds). Over MPI it
        /// holds the same way: each rank's workers are processes on its host.
        ///
        /// ```
        /// fn leak(mib: usize) -> u32 {
        ///     std::mem::forget(vec![1u8; mib << 20]);   // written, never freed
        ///     std::process::id()
        /// }
        /// let pool = procpool::Pool::builder()
        ///     .processes(1)
        ///     .max_memory_per_child(16 << 20)
        ///     .build()?;
        /// let first = pool.apply(leak, 32)?;       // its result is kept...
        /// let second = pool.apply(leak, 0)?;       // ...and its worker replaced
        /// assert_ne!(first, second);
        /// # Ok::<(), procpool::Error>(())
        /// ```
        fn max_memory_per_child(bytes: u64) { max_memory_per_child = Some(bytes) }

        /// A default timeout for every task (see [`TaskOptions::timeout`]).
        fn timeout(timeout: Duration) { timeout = Some(timeout) }

        /// A default soft time limit for every task (see
        /// [`TaskOptions::soft_timeout`] and [`deadline_passed`](crate::deadline_passed)).
        fn soft_timeout(soft: Duration) { soft_timeout = Some(soft) }

        /// Default retries for a task whose worker dies (see [`TaskOptions::retries`]).
        fn retries(n: u32) { retries = n }

        /// How the pool starts its fork server (see [`StartMethod`]). The
        /// default is [`StartMethod::ForkServer`], safe in any program, unless
        /// the environment variable `PROCPOOL_START_METHOD` says otherwise.
        ///
        /// With `ForkServer`, workers do not see the caller's memory: a
        /// `static` filled before `build()` is empty in them (build such data
        /// in the [`initializer`](Self::initializer), or pass it in the task's
        /// argument). With [`StartMethod::Fork`] they see the caller's memory
        /// as it was at `build()`, and a lock another thread held at that
        /// instant stays held in every worker: use it only before the program
        /// starts threads.
        fn start_method(method: StartMethod) { start_method = Some(method) }

        /// Whether a task that panics brings its worker's backtrace back with
        /// it, in [`Error::TaskPanicked`]'s `backtrace` (shown by its
        /// `Display`). Default: when `RUST_BACKTRACE` is set (and not `0`)
        /// in the environment when the pool is built, as std's own panic
        /// messages decide. The panic's location comes back either way.
        ///
        /// The worker records only raw frame addresses, without taking any
        /// lock; they are resolved to functions, files and lines in this
        /// process, the first time the backtrace is shown.
        ///
        /// ```
        /// use procpool::Error;
        /// fn check(x: i32) -> i32 {
        ///     if x < 0 { panic!("negative: {x}") }
        ///     x
        /// }
        /// let pool = procpool::Pool::builder().processes(1).backtraces(true).build()?;
        /// let e = pool.apply(check, -1).unwrap_err();
        /// // the task panicked at src/main.rs:4:19: negative: -1
        /// //
        /// // worker backtrace:
        /// //    0: ...
        /// //    2: demo::check
        /// //              at src/main.rs:4:19
        /// assert!(e.to_string().contains("worker backtrace:"));
        /// let Error::TaskPanicked { message, backtrace: Some(bt), .. } = e else { panic!("{e:?}") };
        /// assert_eq!(message, "negative: -1");
        /// assert!(bt.frames().iter().any(|f| f.function().is_some_and(|n| n.ends_with("::check"))));
        /// # Ok::<(), procpool::Error>(())
        /// ```
        fn backtraces(on: bool) { backtraces = Some(on) }

        /// Sends the workers' log records (the [`log`] crate's, from any
        /// thread of a task) to this program's logger, up to `level`.
        ///
        /// Each worker installs, after the initializer, a logger that
        /// writes each record to its socket, if no logger is set in it yet
        /// (`log` allows one per process: an initializer that installs its
        /// own keeps it). This process then logs each record with its
        /// level and target, on a thread of its own (`procpool-logs`), the
        /// message led by `[worker PID, task N]` (N counts that worker's
        /// tasks from 1). A logger slower than the workers drops records
        /// rather than stall the pool, and says how many.
        ///
        /// - Under [`StartMethod::ForkServer`] (the default) a worker has no
        ///   logger of its own, so every record is forwarded.
        /// - Under [`StartMethod::Fork`] a worker holds a copy of this
        ///   process's logger if one was set before `build()`: that copy
        ///   handles its records, in the worker (where it writes is where
        ///   the copy writes, such as the inherited stderr), and nothing is
        ///   forwarded.
        /// - Over MPI, the records of every rank's workers come to rank 0's
        ///   logger, the same way.
        /// - `tracing` users: records reach a `tracing` subscriber in this
        ///   process through `tracing-log`'s `LogTracer`; a task's own
        ///   `tracing::` events become `log` records (and are forwarded)
        ///   only with `tracing`'s `log` feature, and when no `tracing`
        ///   subscriber is set in the worker.
        /// - A sandboxed worker's records are capped (16 KiB each) like
        ///   everything it sends; a malformed one breaks the protocol.
        ///
        /// ```
        /// fn work(x: u32) -> u32 {
        ///     log::info!("working on {x}");
        ///     x + 1
        /// }
        /// let pool = procpool::Pool::builder()
        ///     .processes(1)
        ///     .forward_logs(log::LevelFilter::Info)
        ///     .build()?;
        /// // With a logger installed here (env_logger, say), this prints
        /// // "[worker 1234, task 1] working on 1" under the target of `work`.
        /// assert_eq!(pool.apply(work, 1)?, 2);
        /// # Ok::<(), procpool::Error>(())
        /// ```
        fn forward_logs(level: log::LevelFilter) { forward_logs = Some(level) }

        /// Runs every worker in a [`Sandbox`](crate::Sandbox), applied after
        /// its initializer and before its first task: no network, no path but
        /// those the sandbox lists, no program, no privilege, no way to reach
        /// another worker, and the resource caps it sets. For untrusted input.
        ///
        /// Needs [`StartMethod::ForkServer`] (a fork of the caller would carry
        /// the caller's memory into the sandbox): under [`StartMethod::Fork`],
        /// or with `mpi()`, [`build`](Self::build) fails with
        /// [`Error::Sandbox`]. So does a kernel that lacks a mechanism the
        /// sandbox needs (unless [`Sandbox::allow_weaker`](crate::Sandbox::allow_weaker)),
        /// and an initializer that leaves the worker with more than one thread.
        ///
        /// ```
        /// use procpool::{Pool, Sandbox, StartMethod};
        /// fn read(path: String) -> bool { std::fs::read(path).is_ok() }
        /// let pool = Pool::builder()
        ///     .processes(1)
        ///     .start_method(StartMethod::ForkServer)
        ///     .sandbox(Sandbox::new().read_only(std::env::temp_dir()).memory_limit(512 << 20))
        ///     .build()?;
        /// assert!(!pool.apply(read, "/etc/passwd".to_string())?);
        /// # Ok::<(), procpool::Error>(())
        /// ```
        fn sandbox(sandbox: crate::sandbox::Sandbox) { sandbox = Some(sandbox) }

        /// Where the workers' stdout goes (see [`Output`]): the program's
        /// own, shared ([`Output::Inherit`], the default without a
        /// sandbox), nowhere, or through the pool in whole lines (to the
        /// program's stdout, prefixed or not, or to the log). A sandboxed
        /// pool's default is [`Output::Lines`], and it refuses `Inherit`.
        ///
        /// ```
        /// use procpool::{Output, Pool};
        /// fn report(x: u32) -> u32 { println!("item {x} done"); x }
        /// // "[worker 1234] item 1 done": whole lines, never two workers'
        /// // mixed.
        /// let pool = Pool::builder().stdout(Output::PrefixedLines).build()?;
        /// assert_eq!(pool.map(report, 1..=3)?, vec![1, 2, 3]);
        /// # Ok::<(), procpool::Error>(())
        /// ```
        fn stdout(output: Output) { stdout = Some(output) }

        /// Where the workers' stderr goes (see [`Output`] and
        /// [`stdout`](Self::stdout)). Through the pool (any choice but
        /// [`Output::Inherit`], [`Output::Null`] included), each worker's
        /// last bytes of stderr come back with the error of a task it
        /// failed: its crash report ([`Error::last_words`]).
        ///
        /// ```
        /// use procpool::{Error, Output, Pool};
        /// fn die(_: ()) {
        ///     eprintln!("out of patience");
        ///     std::process::abort();
        /// }
        /// let pool = Pool::builder().processes(1).stderr(Output::Null).build()?;
        /// let e = pool.apply(die, ()).unwrap_err();
        /// assert!(matches!(e, Error::WorkerLost { .. }));
        /// assert_eq!(e.last_words(), Some("out of patience"));
        /// # Ok::<(), procpool::Error>(())
        /// ```
        fn stderr(output: Output) { stderr = Some(output) }
    }

    /// Runs the workers on MPI ranks, possibly on other machines (cargo
    /// feature `mpi`). See `src/backend/mpi/mod.rs` for details.
    ///
    /// Start the program with an MPI launcher: `mpirun -n N ./prog`, or
    /// `srun -n N ./prog` on a Slurm cluster. On rank 0, `build` returns the
    /// pool; it hosts no workers. Ranks 1 to N-1 host them:
    /// [`processes`](Self::processes) is the total across the ranks, at
    /// most the sum of their [`workers_per_rank`](Self::workers_per_rank)
    /// (the default: all of them). On every other rank `build` never returns. The rank
    /// serves tasks, then exits with status 0 when rank 0's pool closes or
    /// is dropped. `main` runs on every rank, so build the pool before any
    /// other work. The [`initializer`](Self::initializer) runs on each
    /// worker process of every rank.
    ///
    /// Every rank must run the same executable. This is checked by hashing
    /// `/proc/self/exe` on each rank; if they differ, `build` returns
    /// [`Error::Config`] on rank 0 and the other ranks exit. If the program
    /// was not started by a launcher, or has a single rank, `build` returns
    /// [`Error::Config`] without touching MPI. To fall back to local
    /// workers, build again without `mpi()`. MPI can be initialised only
    /// once per process, so a program builds at most one MPI pool.
    ///
    /// Each worker rank hosts its own fork server, started (by exec, as
    /// with `StartMethod::ForkServer`) before MPI is initialised in that
    /// process and without the launcher's variables, and runs tasks in
    /// worker processes it forks: [`workers_per_rank`](Self::workers_per_rank)
    /// of them. So a rank keeps the local pool's guarantees:
    /// - A task that crashes (abort, segfault, `exit`, a kill) fails alone
    ///   with [`Error::WorkerLost`], which names the rank; its worker is
    ///   replaced on that rank, and the job goes on.
    /// - A timeout is kept on the rank that runs the task, on its own clock
    ///   (clocks of different hosts are not comparable): the worker is
    ///   killed there and the rank keeps serving.
    /// - [`AsyncResult::cancel`] on a running task kills its worker there.
    /// - [`Pool::worker_pids`] gives the workers' pids on their hosts.
    ///
    /// A rank that dies as a whole (its host lost, or the rank killed)
    /// ends the job: Open MPI aborts every rank when one of them dies.
    ///
    /// ```no_run
    /// fn square(x: u64) -> u64 { x * x }
    /// // Under `mpirun -n 3`, ranks 1 and 2 never return from build().
    /// let pool = procpool::Pool::builder().mpi().build()?;
    /// assert_eq!(pool.map(square, 1..=4)?, vec![1, 4, 9, 16]);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    #[cfg(any(feature = "mpi", docsrs))]
    #[cfg_attr(docsrs, doc(cfg(feature = "mpi")))]
    pub fn mpi(mut self) -> Self {
        self.mpi = true;
        self
    }

    /// Over MPI ([`mpi`](Self::mpi)): how many worker processes each worker
    /// rank hosts, forked by a fork server of its own on the rank's host.
    /// The default is the number of CPUs in the rank's affinity mask (as
    /// `mpirun` or `srun` bound it). [`processes`](Self::processes) is then
    /// the total across the ranks, at most the sum of what they host.
    #[cfg(any(feature = "mpi", docsrs))]
    #[cfg_attr(docsrs, doc(cfg(feature = "mpi")))]
    pub fn workers_per_rank(mut self, n: usize) -> Self {
        self.workers_per_rank = Some(n);
        self
    }

    /// Starts the fork server (see [`start_method`](Self::start_method)),
    /// starts the workers (running the initializer in each) and returns
    /// once every worker is ready.
    ///
    /// If a worker cannot be started (this process or the fork server is out
    /// of file descriptors, processes or memory), it returns
    /// [`Error::Broken`] at once, saying how many had started and why, after
    /// killing and reaping those. The fork server, and so every worker, runs
    /// in a session of its own: a terminal's Ctrl-C reaches this
    /// program only (see the crate documentation, "Ctrl-C and other signals").
    pub fn build(mut self) -> Result<Pool> {
        refuse_in_a_sandbox()?;
        let processes = self.checked_processes()?;
        let init = self.init.take().transpose()?;
        let method = match self.start_method {
            Some(m) => m,
            None => StartMethod::from_env()?,
        };
        #[cfg(feature = "mpi")]
        let mpi = self.mpi;
        #[cfg(not(feature = "mpi"))]
        let mpi = false;
        // Workers that are not forks of the caller (an exec'd server, MPI
        // ranks) can run only code of the executable.
        let check_task = (method != StartMethod::Fork || mpi)
            .then_some(local::start::check_task as fn(TaskFn) -> Result<()>);
        if let (Some(init), Some(check)) = (&init, check_task) {
            check(init.f)?;
        }
        let sandbox = self.resolve_sandbox(method, mpi)?;
        let output = self.resolve_output(sandbox.as_ref(), mpi)?;
        let cfg = Config {
            processes,
            // A sandboxed worker runs as many tasks as its sandbox allows
            // (one, unless reuse is asked for), then is killed.
            max_tasks_per_child: match (&sandbox, self.max_tasks_per_child) {
                (Some(s), m) => Some(m.map_or(s.limits().tasks_per_worker, |m| {
                    m.min(s.limits().tasks_per_worker)
                })),
                (None, m) => m,
            },
            timeout: self.timeout,
            soft_timeout: self.soft_timeout,
            retries: self.retries,
            has_init: init.is_some(),
            check_task,
            backtraces: self
                .backtraces
                .unwrap_or_else(crate::capture::env_wants_backtraces),
            max_memory_per_child: self.max_memory_per_child,
            forward_logs: self.forward_logs.unwrap_or(log::LevelFilter::Off),
            sandbox: sandbox.as_ref().map(|s| s.limits()),
            result_limit: sandbox.as_ref().map(|s| s.limits().result),
            // Over MPI, and into a sandbox, SharedBufs are copied: shared
            // memory ends at the machine, and a sandboxed worker must hold
            // no fd of the caller's memory (it could keep a duplicate and
            // write after it gave the buffer back).
            inline_shared: mpi || sandbox.is_some(),
            // The MPI backend sets it: its streams cross hosts.
            inline_bodies: false,
            // The MPI backend sets it: its ranks keep their own clocks.
            backend_keeps_timeouts: false,
            spin: crate::proto::idle::spin_budget(),
            item_progress: true,
        };
        #[cfg(feature = "mpi")]
        if mpi {
            return Pool::start(crate::backend::mpi::start(
                self.processes,
                self.workers_per_rank,
                cfg,
                init,
            )?);
        }
        start_local(method, cfg, init, sandbox, output)
    }

    /// The number of workers, after the settings' checks.
    fn checked_processes(&self) -> Result<usize> {
        if self.max_tasks_per_child == Some(0) {
            return Err(Error::Config("max_tasks_per_child must be at least 1"));
        }
        if self.max_memory_per_child == Some(0) {
            return Err(Error::Config(
                "max_memory_per_child must be at least 1 byte",
            ));
        }
        match self.processes {
            Some(0) => Err(Error::Config("processes must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }

    /// Where the workers' output goes: as asked, or by default the
    /// program's own (a sandboxed pool's: whole lines through the pool).
    /// A sandboxed pool refuses `Inherit`, and MPI anything else.
    fn resolve_output(&self, sandbox: Option<&crate::sandbox::Spec>, mpi: bool) -> Result<Streams> {
        let asked = [self.stdout, self.stderr];
        if mpi && asked.iter().flatten().any(|&o| o != Output::Inherit) {
            return Err(Error::Config(
                "over MPI, a pool's workers write to their rank's stdout and stderr, which the \
                 launcher forwards: only Output::Inherit is accepted",
            ));
        }
        let Some(sb) = sandbox else {
            return Ok(Streams {
                stdout: self.stdout.unwrap_or(Output::Inherit),
                stderr: self.stderr.unwrap_or(Output::Inherit),
                cap: None,
            });
        };
        if asked.contains(&Some(Output::Inherit)) {
            return Err(Error::Sandbox {
                reason: "a sandboxed worker cannot share the program's stdout or stderr \
                         (Output::Inherit): it could truncate, rewrite or read what the fd \
                         is open on; use Output::Lines (the default), PrefixedLines, Log or Null"
                    .into(),
            });
        }
        Ok(Streams {
            stdout: self.stdout.unwrap_or(Output::Lines),
            stderr: self.stderr.unwrap_or(Output::Lines),
            cap: Some(sb.limits().output),
        })
    }

    /// The sandbox, resolved (its paths checked), if one was asked for.
    fn resolve_sandbox(
        &mut self,
        method: StartMethod,
        mpi: bool,
    ) -> Result<Option<crate::sandbox::Spec>> {
        match self.sandbox.take() {
            None => Ok(None),
            Some(_) if method == StartMethod::Fork || mpi => Err(Error::Sandbox {
                reason: "a sandbox needs StartMethod::ForkServer (a fork of the caller, or an \
                         MPI rank, would carry the caller's memory into the sandbox); use \
                         .start_method(StartMethod::ForkServer)"
                    .into(),
            }),
            Some(s) => Ok(Some(s.resolve()?)),
        }
    }
}

/// Starts a pool whose workers are processes on this machine.
fn start_local(
    method: StartMethod,
    cfg: Config,
    init: Option<Init>,
    sandbox: Option<crate::sandbox::Spec>,
    output: Streams,
) -> Result<Pool> {
    // Room for every slot the pool may use if it grows (`Pool::resize`):
    // status words it never uses are never touched.
    let capacity = local::slot_capacity(cfg.processes);
    let words = local::words(capacity, sandbox.is_some())?;
    let setup = Setup {
        init,
        words: words.clone(),
        sock_buf: 1 << 20,
        sandbox,
        prepared: None,
        without_mpi_env: false,
        output,
    };
    crate::worker::install_panic_hook();
    let backend = local::start(method, setup)?;
    let table = SlotTable::new(cfg.processes, Some(capacity));
    Pool::start(Launch {
        cfg,
        backend: Box::new(backend),
        progress: words,
        table,
    })
}

/// In a sandboxed worker (a task there building a pool), an error that
/// says why no pool can start: its filters would refuse the first socket
/// or fork with an `EPERM` that does not.
fn refuse_in_a_sandbox() -> Result<()> {
    if !crate::sandbox::applied_here() {
        return Ok(());
    }
    Err(Error::ServerStart {
        reason: "this process is a sandboxed worker, and its sandbox forbids starting processes: \
                 a task in a sandboxed pool cannot build a pool of its own (build it in an \
                 unsandboxed pool, or outside the pool)"
            .into(),
    })
}

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
    shared: Arc<Shared>,
    /// The supervisor thread, until it is joined.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Set when the supervisor thread ends (for `join_async`).
    exited: Arc<Signal>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.shared.size())
            .field("phase", &self.shared.phase())
            .finish()
    }
}

impl Pool {
    /// Starts the supervisor thread over a backend, asks for the workers
    /// and waits until they are ready.
    pub(crate) fn start(launch: Launch) -> Result<Pool> {
        let shared = Shared::new(launch)?;
        let s2 = shared.clone();
        let exited = Signal::new();
        let on_exit = SetOnDrop(exited.clone());
        let thread = std::thread::Builder::new()
            .name("procpool-supervisor".into())
            .spawn(move || {
                let _on_exit = on_exit;
                supervisor::run(s2)
            })
            .map_err(|e| {
                shared.abandon(Error::Terminated);
                Error::io("starting the supervisor thread", e)
            })?;
        let pool = Pool {
            shared,
            supervisor: Mutex::new(Some(thread)),
            exited,
        };
        pool.shared.start_workers()?;
        Ok(pool)
    }

    /// A pool with one worker per CPU (`std::thread::available_parallelism`).
    pub fn new() -> Result<Pool> {
        Pool::builder().build()
    }

    /// A builder for a pool with other settings.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of worker processes the pool keeps (as built, or as
    /// [`resize`](Self::resize) last set it).
    pub fn processes(&self) -> usize {
        self.shared.size()
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
        self.shared.resize(n)
    }

    /// What the pool has done since it was built (tasks by outcome,
    /// retries, workers started and ended by cause, busy time per slot),
    /// and what it holds now: see [`Stats`](crate::Stats) for each
    /// counter's unit.
    pub fn stats(&self) -> crate::Stats {
        self.shared.stats()
    }

    /// The pids of the live workers.
    ///
    /// ```
    /// let pool = procpool::Pool::builder().processes(3).build()?;
    /// assert_eq!(pool.worker_pids().len(), 3);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared.worker_pids()
    }

    /// How this pool's tasks carry `SharedBuf`s.
    fn shared_mode(&self) -> Mode {
        if self.shared.cfg.inline_shared {
            Mode::Inline
        } else {
            Mode::Fds
        }
    }

    /// The pid of the pool's fork server: the parent of every worker, and
    /// the pool's one child process. It exits (and is reaped) when the pool
    /// is joined, terminated or dropped.
    pub fn server_pid(&self) -> u32 {
        self.shared.server_pid()
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
        let cache = (!self.shared.cfg.inline_bodies).then_some(&*self.shared.blocks);
        let input = encode_arg(input, cache, self.shared_mode())?;
        let job_opts = opts.job_options();
        let hook = match (opts.on_success, opts.on_error) {
            (None, None) => Hook::None,
            (ok, err) => Hook::Handler(Box::new(move |o: Outcome| {
                let r = decode_payload::<R>(o);
                run_callbacks(r, ok, err)
            })),
        };
        let slot = self.shared.new_slot();
        let job = input.job(tf, hook, 0, None, job_opts);
        self.shared.submit(slot.clone(), job)?;
        Ok(AsyncResult {
            slot,
            pool: Arc::downgrade(&self.shared),
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
        self.shared.check_running()?;
        let items: Vec<A> = items.into_iter().collect();
        let total = items.len();
        // In a sandboxed pool each item is alone (a chunk shares one
        // process, and its fate) unless the caller sets a chunk size.
        let chunksize = opts
            .chunksize
            .unwrap_or_else(|| match self.shared.cfg.sandbox {
                Some(_) => 1,
                None => total.div_ceil(4 * self.processes()).max(1),
            });
        let nchunks = total.div_ceil(chunksize);
        let first = self.shared.reserve_ids(nchunks as u64);
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
            pool: Arc::downgrade(&self.shared),
            early: None,
            callbacks,
            _r: PhantomData,
        };
        if nchunks == 0 {
            // Nothing to run: the map is done now (callbacks still run on the
            // result-handler thread).
            result.group.finish(&self.shared.handler);
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
                    complete(slot.clone(), hook, Err(e), &self.shared.handler);
                    continue;
                }
            };
            let job = input.job(tf, hook, chunk.len(), None, job_opts);
            if let Err(e) = self.shared.submit(slot.clone(), job) {
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
        let cfg = &self.shared.cfg;
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
            shared: self.shared.clone(),
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
            pool: Arc::downgrade(&self.shared),
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
            pool: Arc::downgrade(&self.shared),
        }
    }

    /// Stops taking tasks; queued tasks still run. Then [`join`](Self::join)
    /// waits for them and for the workers to exit.
    pub fn close(&self) {
        self.shared.close();
    }

    /// Kills the workers at once and resolves every outstanding result with
    /// [`Error::Terminated`]; returns once every process of the pool is reaped.
    pub fn terminate(&self) {
        self.shared.terminate();
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
        if self.shared.phase() == Phase::Running {
            return Err(Error::StillRunning);
        }
        self.join_supervisor();
        // As in CPython, the callbacks of finished tasks have run by now.
        self.shared.handler.drain();
        match self.shared.broken() {
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
        if self.shared.phase() == Phase::Running {
            return JoinFuture::failed(Error::StillRunning);
        }
        JoinFuture::new(self.exited.clone(), self.shared.clone())
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
