//! [`PoolBuilder`]: a pool's settings, checked and resolved, and the
//! backend they start (the local fork server, or MPI ranks).

use crate::api::options::{Data, setters};
use crate::api::pool::Pool;
use crate::backend::local;
use crate::backend::local::output::{Output, Streams};
use crate::backend::local::server::{Init, Setup};
use crate::backend::local::start::StartMethod;
use crate::engine::core::Launch;
use crate::engine::job::Config;
use crate::engine::size::SlotTable;
use crate::error::{Error, Result};
use crate::proto::codec;
use crate::proto::task::TaskFn;
use std::time::Duration;

impl Pool {
    /// A pool with one worker per CPU (`std::thread::available_parallelism`).
    pub fn new() -> Result<Pool> {
        Pool::builder().build()
    }

    /// A builder for a pool with other settings.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
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
    #[cfg(any(feature = "mpi", docsrs))]
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    rank_timeout: Option<std::time::Duration>,
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

        /// A default timeout for every task (see [`TaskOptions::timeout`](crate::TaskOptions::timeout)).
        fn timeout(timeout: Duration) { timeout = Some(timeout) }

        /// A default soft time limit for every task (see
        /// [`TaskOptions::soft_timeout`](crate::TaskOptions::soft_timeout) and [`deadline_passed`](crate::deadline_passed)).
        fn soft_timeout(soft: Duration) { soft_timeout = Some(soft) }

        /// Default retries for a task whose worker dies (see [`TaskOptions::retries`](crate::TaskOptions::retries)).
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
    /// A rank lost as a whole (its process killed, its host down or cut
    /// off) costs only the tasks it held, when the launcher lets the
    /// other ranks live on (Open MPI: `--mca orte_enable_recovery 1 --mca
    /// orte_abort_on_non_zero_status 0`; MPICH: `-disable-auto-cleanup`):
    /// rank 0 notices within [`rank_timeout`](Self::rank_timeout), those
    /// tasks fail with [`Error::RankLost`] (or run again elsewhere under
    /// retries), and the pool goes on with the other ranks. Losing rank 0
    /// ends the job: every other rank exits by itself within its
    /// `rank_timeout`. `docs/mpi.md` ("Losing a host") says what each
    /// MPI implementation allows.
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

    /// Over MPI ([`mpi`](Self::mpi)): how long a rank may stay silent
    /// before it counts as lost (default 4 s). Ranks and rank 0 tell each
    /// other they live several times within it, so a rank whose host is
    /// cut off is noticed within about this long; one whose process dies
    /// is noticed within half a second, from its workers' streams.
    ///
    /// Rank 0 then stops sending it tasks and fails (or runs again, under
    /// retries) the tasks it held, with [`Error::RankLost`]. The same
    /// bound works the other way: a rank that hears nothing from rank 0
    /// for this long kills its workers and exits, so nothing is left on a
    /// host cut off from the job. Set it longer where a rank may stall
    /// (a loaded host, a slow network); less than 1 s is an error. It
    /// also bounds `MPI_Finalize` at the pool's end, which some MPI
    /// builds can hang in (`docs/mpi.md`).
    #[cfg(any(feature = "mpi", docsrs))]
    #[cfg_attr(docsrs, doc(cfg(feature = "mpi")))]
    pub fn rank_timeout(mut self, limit: std::time::Duration) -> Self {
        self.rank_timeout = Some(limit);
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
            prefetch_chunks: false,
            spin: crate::proto::idle::spin_budget(),
            item_progress: true,
        };
        #[cfg(feature = "mpi")]
        if mpi {
            return Pool::start(crate::backend::mpi::start(
                self.processes,
                self.workers_per_rank,
                self.rank_timeout,
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
    let backend = local::start_server(method, setup)?;
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
