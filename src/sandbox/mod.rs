//! The sandbox: what a worker may not do once its initializer has run.
//!
//! Three processes take part, each doing what only it can:
//!
//! - **The parent** (`PoolBuilder::build`) checks the settings, makes the
//!   listed paths absolute, and writes them into the exec'd server's
//!   config memfd (`backend/local/start.rs`). It execs the server with an
//!   environment of only the variables the sandbox names, stdin from
//!   `/dev/null`, and stdout and stderr to pipes it reads. A sandbox needs that exec'd
//!   server: a fork of the caller would carry the caller's memory, and its
//!   secrets, into every worker. While a task runs, the parent watches the
//!   worker's CPU clock (a per-task CPU cap), gives each worker
//!   shared-memory blocks of its own (never reused), seals its own input
//!   blocks, and maps a worker's result block only once it has checked the
//!   block's seals.
//! - **The server**, once, before it forks any worker: moves into a new
//!   network namespace (one per pool, not one per worker: creating one
//!   costs far more than a fork), compiles the seccomp filters, and checks
//!   what the kernel offers. What is missing fails `build()` unless the
//!   sandbox accepts a weaker one ([`Sandbox::allow_weaker`]).
//! - **Each worker**, after its initializer and before its first task
//!   ([`Prepared::apply`]): checks it has one thread (Landlock and seccomp
//!   bind only the calling thread), sets its rlimits, moves into its
//!   private root, takes an identity of its own (a non-root uid, a user
//!   namespace of its own, its thread cap), drops its capabilities,
//!   restricts itself with Landlock (filesystem, TCP, abstract UNIX
//!   sockets, signals), then installs the seccomp filters (which also set
//!   `no_new_privs`). None of it can be undone: rlimits are set hard,
//!   and the filters deny `setrlimit`, `capset`, `prctl` but for thread
//!   names, and every way to start a program.
//!
//! Mechanisms, and why each:
//!
//! | promise | mechanism | why |
//! |---|---|---|
//! | no network | a network namespace (server), seccomp denying `socket`, `socketpair`, `connect`, `bind`, `listen`, `accept`, `sendto` with an address; Landlock denying TCP and abstract UNIX sockets of other domains | each alone would do; together a kernel that lacks one is still covered. The worker's socket to the parent predates all three |
//! | filesystem | a private root per worker, made after its initializer: a mount namespace of its own whose `/` is a small read-only tmpfs holding only the listed paths (bind mounts, `nosuid`, `nodev`, read-only where listed so), its executable and `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random`; the host's tree detached (`sys::confine::enter_private_root`). Landlock (the `landlock` crate) as a second wall | Landlock governs opening, not looking: `stat`, `access`, `readlink` of any host path answered. In the private root nothing else exists, by any path, absolute or relative. Per worker, not per server, so that the initializer still sees the host (a model file it loads, say) |
//! | no programs, no privileges | seccomp allow-list (the `seccompiler` crate, rust-vmm's, used by Firecracker), `no_new_privs`, capabilities dropped, Landlock without `Execute` | an allow-list denies what it does not name, new syscalls included; `clone` is allowed only with `CLONE_THREAD`, and `clone3` answers `ENOSYS` so glibc falls back to `clone`, whose flags a filter can read |
//! | memory | `RLIMIT_DATA` (private memory: heap, anonymous mappings, stacks; not the pool's shared blocks), and `RLIMIT_AS` above it by twice the result limit and 1 GiB for threads (shared memory a task maps, memfds, `SharedBuf`s) | no cgroup needed; an allocation past it fails, Rust aborts, and a `SIGABRT` handler that sees `errno == ENOMEM` marks the worker's status word, so the parent can name the limit |
//! | CPU per task | the parent reads the worker's CPU clock | `RLIMIT_CPU` counts the whole process and cannot be raised again |
//! | open files | `RLIMIT_NOFILE`, set above what is open plus a reserve for the pool's blocks | |
//! | what comes back | the parent checks every length a worker claims against the result limit before it allocates or maps, closes fds no frame carries, and kills a worker that breaks the protocol | a task can write anything on its worker's socket: a 4 GiB claim, or fds by the hundred |
//! | file size | `RLIMIT_FSIZE` (`SIGXFSZ` names it); the worker never makes a block past it, and sends a result that big through its socket instead | `ftruncate` on a memfd past `RLIMIT_FSIZE` fails (and raises `SIGXFSZ`) |
//! | no set-user-ID or set-group-ID file | seccomp admits `open`, `openat`, `creat`, `mkdir`, `mkdirat`, `mknod`, `mknodat` and `fchmod` only with a mode free of `S_ISUID` and `S_ISGID` (`mknod` only for FIFOs and regular files); `openat2`, whose mode lies in memory where a filter cannot read it, answers `ENOSYS` (glibc falls back to `openat`); `chmod` by path is denied | a task of a program run as root would otherwise leave a root-owned set-user-ID program of its own making on the host |
//! | one task, one process | the parent kills a sandboxed worker (`KillReason::Retired`) once its last task's result is in, and starts its replacement at once; a map's items go alone by default; with `tasks_per_worker(n)` a worker takes one task at a time and is killed when it ends one with threads left over (`/proc/PID/status`, read by the parent) | the task owns its process: it can answer later tasks itself on the worker's socket, leave threads spinning, change globals; a worker asked to exit need not |
//! | not root | a root program's worker takes an unused uid and gid ([`SANDBOX_ID`](confine::SANDBOX_ID), after its private root is made); the listed paths are bound through idmapped mounts whose user namespace (made once per pool by the server) shows root's files as that uid's, so they work as before and what a task makes there is root's on disk. A path on a filesystem that cannot be idmapped is bound plainly if its mode lets others in as asked, else `build()` fails naming it. A non-root program's worker keeps its uid, the only one it may map | a task of a root program could otherwise use root's ownership of the host's files (`chmod` of its own, say) and count as root for the kernel's limits |
//! | threads | every worker moves into a user namespace of its own (its uid mapped to itself), in which `RLIMIT_NPROC` ([`Sandbox::max_threads`], default 64) counts its threads alone (ucounts are per user namespace and uid since Linux 5.14) | `RLIMIT_NPROC` counts per user; root's is never enforced, and one cap shared by all workers would let one starve the others |
//! | time | every task has a wall-clock limit (its timeout or the pool's, else ten times the CPU cap, else 60 s), counted by the parent from the task's start | a task that sleeps or stops itself uses no CPU |
//! | workers apart | status words a page per worker, each worker unmapping the others and closing their memfd; blocks never reused, sealed | Landlock's signal and ptrace scoping keeps a worker from signalling or tracing another |
//! | nothing of the host's environment | the parent execs the server with only the variables [`Sandbox::env`] and [`Sandbox::inherit_env`] name (and the crate's marker, fd numbers); the crate's own settings (`PROCPOOL_SPIN_US`) go in the config memfd | clearing `environ` in the server would not do: an exec's strings stay on its stack, in every worker it forks |
//! | output volume | each worker writes to pipes of its own, which the server makes at its fork and hands to the parent, whose output thread reads them, passes whole lines on (control characters escaped) and counts what each wrote; past [`Sandbox::output_limit`] it marks the worker's `died_of` word, has the server kill it and discards the rest (`backend/local/relay.rs`) | a pipe per worker tells whose bytes are whose without trusting the worker; the reader is a thread of the parent that never waits on one worker (its reads do not block) |
//! | nothing of the host's stdio | stdin is `/dev/null`; stdout and stderr are pipes whose read ends only the parent holds, copied by a thread of the parent to the program's own (`backend/local/output.rs`) | with the program's fd, a task could `ftruncate` and `pwrite` the program's log; with a pipe it can only add bytes |
//!
//! What the table leaves out:
//!
//! - **One network namespace per pool** also because the workers of one
//!   pool have nothing to hide from each other's loopback: they have no
//!   sockets at all.
//! - **A page of status words per worker**, not a memfd per worker: that
//!   would cost the server an fd per slot and a change to the spawn
//!   protocol, where unmapping the other pages costs two `munmap`s.
//! - **Capabilities are dropped** because a program run as root (CI runs
//!   so) would otherwise leave its workers every one.
//! - **Two seccomp filters**: `seccompiler` gives one action per filter,
//!   so the `ENOSYS` of `clone3` and `openat2` needs a filter of its own (the kernel takes the
//!   most restrictive action of all filters; between two errnos, the later
//!   filter's).
//! - **Each worker builds its own Landlock ruleset** (a few
//!   `open(O_PATH)`s): one made in the server would leave its fd in every
//!   worker, and the `landlock` crate does not expose it to close.
//! - **An rlimit for memory, not a cgroup.** A cgroup's `memory.events`
//!   would name an OOM kill precisely, but needs a writable, delegated
//!   hierarchy (root, or systemd delegation) and differs between cgroup v1
//!   and v2; an rlimit works everywhere, at the price of resting the verdict
//!   on `errno` ([`Prepared::apply`]; that a backtrace overwrites it was
//!   found with `examples/untrusted.rs`).
//! - **No environment variable weakens a sandbox**: a test pretends a
//!   mechanism is missing with the hidden builder method
//!   `Sandbox::pretend_missing`, carried in the spec; it once read an
//!   environment variable, in every build, so a user's environment could
//!   weaken a sandbox built with `allow_weaker()`.
//! - **A hostile worker and its parent**: everything a worker sends is
//!   data. bincode allocates a buffer of the length it reads before it
//!   reads the bytes, so a crafted frame made the parent abort (found while
//!   writing the sandbox's tests); results and messages from workers now
//!   decode with a limit (`codec::decode_untrusted`). A task cannot put off
//!   its timeout by writing its start word (`engine/README.md`, "Who may
//!   kill whom"). Nor can it spend the parent's memory or fds: every
//!   length it claims is checked against [`Sandbox::result_limit`] before
//!   the parent allocates or maps anything for it, fds that no frame of
//!   the protocol carries are closed as they arrive, and whatever breaks
//!   the protocol kills the worker and fails its task with
//!   [`Error::ProtocolViolation`](crate::Error::ProtocolViolation)
//!   (`proto/untrusted.rs`; `engine/README.md`, "What a sandboxed worker
//!   is believed").
//!
//! This file holds the builder ([`Sandbox`]), what it resolves to and the
//! limits the engine reads; `apply.rs` the server's and the worker's
//! phases; `seccomp.rs` the filters and their syscall table.

mod apply;
mod seccomp;

pub(crate) use crate::limit::Limit;
pub(crate) use apply::{Active, Prepared, Readiness, applied_here, isolate_words, prepare};
use serde::{Deserialize, Serialize};
use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

/// What a worker may do once its initializer has run, for pools that run
/// untrusted input. Give it to [`PoolBuilder::sandbox`].
///
/// A sandboxed worker cannot reach any network address (loopback and
/// abstract UNIX sockets included), cannot see a path but those listed
/// (read-only or read-write: its root is a private one that holds only
/// them, its executable and the harmless devices), cannot start a program or gain privileges,
/// cannot reach another worker's memory or signal another process, and
/// (if asked) cannot go past a memory cap, a CPU-time cap per task, a cap on
/// open files and on the size of files it writes. A task that goes past a
/// cap fails with [`Error::LimitExceeded`], naming it, and its worker is
/// replaced. The channel to the parent keeps working, and the parent
/// believes nothing on it that the pool's protocol does not allow: what a
/// worker hands back for one task is capped
/// ([`result_limit`](Sandbox::result_limit)), and a worker that breaks
/// the protocol is killed, its task failing with
/// [`Error::ProtocolViolation`](crate::Error::ProtocolViolation).
///
/// It needs [`StartMethod::ForkServer`] (the default) and Linux with
/// seccomp, Landlock ABI 6 or later, and network and mount namespaces (user
/// namespaces when not root); `build()` fails with [`Error::Sandbox`] where
/// one is missing, unless [`allow_weaker`](Sandbox::allow_weaker) says a
/// weaker sandbox will do. The sandbox applies after the initializer, which
/// must leave the worker with one thread.
///
/// Nothing of the host process reaches a task unless named: a worker's
/// environment holds only the variables that [`env`](Sandbox::env) and
/// [`inherit_env`](Sandbox::inherit_env) name (none by default), its stdin
/// is `/dev/null`, and its stdout and stderr are pipes that the parent
/// reads and copies to the program's own (a task can print, but cannot
/// truncate, rewrite or read back the program's log). A pool's output
/// reaches the program's stdout a moment after the task wrote it; `join`
/// waits (briefly) for the last of it.
///
/// The task is taken to own its process: it can take over the worker's
/// protocol loop, leave threads behind, change any global. So each task
/// runs in a process of its own, which the pool kills (SIGKILL) once the
/// task's result is in, and never asks to exit; a map's items go alone
/// unless a chunk size is set (a chunk is one task, and shares one
/// process); [`tasks_per_worker`](Sandbox::tasks_per_worker) opts into
/// reuse, as shared fate. Every task has a wall-clock limit: its own
/// timeout or the pool's if set, else ten times the CPU cap, else 60
/// seconds ([`Limit::WallClock`](crate::Limit::WallClock)).
///
/// What it does not protect against: kernel bugs (every mechanism here is
/// the kernel's), side channels (timing, caches, the CPU), what the
/// initializer did before the sandbox applied (a file or socket it opened
/// stays usable by tasks), and a task spoiling its own result (or, with
/// reuse or a chunk size, those of the tasks that share its process). The
/// memory cap is
/// `RLIMIT_DATA` for private memory, and `RLIMIT_AS` above it for the
/// address space as a whole (shared memory a task maps). Under a memory
/// cap, a task that aborts right after a failed `ENOMEM` call is taken for
/// one that went past the cap. A [`SharedBuf`](crate::SharedBuf) sent to a
/// sandboxed worker is copied, never shared.
///
/// [`PoolBuilder::sandbox`]: crate::PoolBuilder::sandbox
/// [`Error::LimitExceeded`]: crate::Error::LimitExceeded
/// [`Error::Sandbox`]: crate::Error::Sandbox
/// [`StartMethod::ForkServer`]: crate::StartMethod::ForkServer
///
/// ```
/// use procpool::{Error, Limit, Pool, Sandbox, StartMethod};
/// use std::time::Duration;
///
/// fn parse(input: Vec<u8>) -> usize { input.iter().filter(|&&b| b == b'\n').count() }
/// fn phone_home(_: ()) -> bool { std::net::TcpStream::connect("127.0.0.1:80").is_ok() }
/// fn spin(_: ()) { loop { std::hint::spin_loop() } }
///
/// let pool = Pool::builder()
///     .processes(2)
///     .start_method(StartMethod::ForkServer)
///     .sandbox(
///         Sandbox::new()
///             .memory_limit(256 << 20)
///             .cpu_time_per_task(Duration::from_millis(200)),
///     )
///     .build()?;
/// assert_eq!(pool.apply(parse, b"a\nb\n".to_vec())?, 2);
/// assert!(!pool.apply(phone_home, ())?);
/// assert!(matches!(
///     pool.apply(spin, ()),
///     Err(Error::LimitExceeded { limit: Limit::CpuTime { .. }, .. })
/// ));
/// # Ok::<(), procpool::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
#[must_use = "a Sandbox applies only once given to PoolBuilder::sandbox"]
pub struct Sandbox {
    spec: Spec,
}

/// The sandbox as it travels to the exec'd server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Spec {
    read_only: Vec<PathBuf>,
    read_write: Vec<PathBuf>,
    memory: Option<u64>,
    cpu_per_task: Option<Duration>,
    open_files: Option<u64>,
    file_size: Option<u64>,
    tasks_per_worker: Option<u64>,
    scratch: Option<u64>,
    max_threads: Option<u64>,
    output: Option<u64>,
    result: Option<u64>,
    allow_weaker: bool,
    /// The mechanisms the server pretends are missing (for tests):
    /// `seccomp`, `netns`, `landlock`.
    pretend_missing: Vec<String>,
    /// The server's environment, in the order the builder named it:
    /// `(key, Some(value))` sets one, `(key, None)` passes the parent's
    /// value through. The parent applies it to the server's exec; it does
    /// not travel in the config (the server's environment carries it).
    #[serde(skip)]
    env: EnvVars,
}

/// The variables a sandbox names; their `Debug` shows the keys only, so
/// that printing a `Sandbox` never prints a value (a token) it carries.
#[derive(Clone, Default)]
struct EnvVars(Vec<(OsString, Option<OsString>)>);

impl std::fmt::Debug for EnvVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Sandbox {
    /// The strictest sandbox: no network, no path, no program; no resource
    /// caps until they are set.
    pub fn new() -> Sandbox {
        Sandbox::default()
    }

    /// Tasks may read files and list directories under `path` (a file or
    /// a directory, which must exist when the pool is built).
    pub fn read_only(mut self, path: impl AsRef<Path>) -> Sandbox {
        self.spec.read_only.push(path.as_ref().to_path_buf());
        self
    }

    /// Tasks may read, write, create, rename and remove files and
    /// directories under `path` (which must exist when the pool is built).
    /// Nothing there may be executed.
    pub fn read_write(mut self, path: impl AsRef<Path>) -> Sandbox {
        self.spec.read_write.push(path.as_ref().to_path_buf());
        self
    }

    /// Caps each worker's private memory (heap, stacks, anonymous mappings:
    /// `RLIMIT_DATA`) at `bytes`, what the initializer allocated included.
    /// A task whose allocation fails past it gets
    /// [`Error::LimitExceeded`](crate::Error::LimitExceeded) with
    /// [`Limit::Memory`]. Shared memory a task maps (shared anonymous
    /// mappings, memfds, new `SharedBuf`s) counts against the worker's
    /// address space (`RLIMIT_AS`), capped at what it maps when the
    /// sandbox applies, plus `bytes`, plus twice the
    /// [`result_limit`](Sandbox::result_limit) (for the pool's blocks),
    /// plus 1 GiB for threads' stacks and allocator arenas: a map past it
    /// fails with `ENOMEM`, and a task that aborts then gets the memory
    /// limit too.
    pub fn memory_limit(mut self, bytes: u64) -> Sandbox {
        self.spec.memory = Some(bytes);
        self
    }

    /// Caps the CPU time of each task (all its threads together). The
    /// parent watches the worker's CPU clock and kills the worker past it:
    /// the task gets [`Limit::CpuTime`]. Unlike a timeout, time spent
    /// waiting does not count. The parent's supervisor thread looks at
    /// least every `cpu` / CPUs (at least every millisecond), even while
    /// the pool is idle, and kills within about that much past the cap.
    pub fn cpu_time_per_task(mut self, cpu: Duration) -> Sandbox {
        self.spec.cpu_per_task = Some(cpu);
        self
    }

    /// Lets a task hold about `n` open files of its own (`RLIMIT_NOFILE`,
    /// set above the fds the worker holds plus a reserve for the pool's
    /// blocks). Past it, `open` fails with `EMFILE`; a task that ends
    /// holding fds in the reserve, or panics with `EMFILE`, gets
    /// [`Limit::OpenFiles`] and its worker is replaced.
    pub fn open_files(mut self, n: u64) -> Sandbox {
        self.spec.open_files = Some(n);
        self
    }

    /// Caps the size of any file a task writes (`RLIMIT_FSIZE`): a write
    /// past it kills the worker with `SIGXFSZ`, and the task gets
    /// [`Limit::FileSize`]. A result larger than the cap still comes back
    /// (through the worker's socket rather than a shared-memory block).
    ///
    /// The cap applies to every file the worker writes. Its standard
    /// output and error are pipes to the parent (which copies what comes
    /// to the program's own), never the program's log file, so a log
    /// longer than the cap does not count.
    pub fn file_size_limit(mut self, bytes: u64) -> Sandbox {
        self.spec.file_size = Some(bytes);
        self
    }

    /// Lets a worker run up to `n` tasks, one at a time, before the pool
    /// kills it (default 1: each task in a process of its own, which no
    /// earlier task ran in).
    ///
    /// Reuse is shared fate: a task owns its process, so it can leave
    /// behind whatever it likes (a thread, a changed global, a forged
    /// answer to the next task on its socket) for the tasks after it on
    /// that worker. The pool sends such a worker one task at a time, and
    /// kills it before its next task when it ends a task with more
    /// threads than it started with, uses CPU while idle, or shuts its side
    /// of its socket (the next task is not blamed: it runs on another
    /// worker). A task sent to a worker an earlier task took over in some
    /// other way fails with its limit. A map's chunk is one task either
    /// way.
    ///
    /// ```
    /// use procpool::{Pool, Sandbox, StartMethod};
    ///
    /// fn double(x: u64) -> u64 { x * 2 }
    ///
    /// let pool = Pool::builder()
    ///     .processes(2)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().tasks_per_worker(100))
    ///     .build()?;
    /// assert_eq!(pool.map(double, 0..10u64)?, (0..10).map(|x| x * 2).collect::<Vec<_>>());
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn tasks_per_worker(mut self, n: u64) -> Sandbox {
        self.spec.tasks_per_worker = Some(n);
        self
    }

    /// Caps what each worker writes to its stdout and stderr together, in
    /// bytes (default 64 MiB). Each worker writes to pipes of its own,
    /// which the pool reads and passes on as
    /// [`PoolBuilder::stdout`](crate::PoolBuilder::stdout) and
    /// [`stderr`](crate::PoolBuilder::stderr) say (by default whole lines
    /// to the program's stdout and stderr); past the cap it discards the
    /// rest, kills the worker, and the task fails with [`Limit::Output`]. A worker runs one task unless
    /// [`tasks_per_worker`](Sandbox::tasks_per_worker) says otherwise: the
    /// cap is then its tasks' together.
    ///
    /// ```
    /// use procpool::{Error, Limit, Pool, Sandbox, StartMethod};
    ///
    /// fn chatty(n: usize) { eprint!("{}", ".".repeat(n)) }
    ///
    /// let pool = Pool::builder()
    ///     .processes(1)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().output_limit(1 << 16))
    ///     .build()?;
    /// pool.apply(chatty, 10)?;
    /// assert!(matches!(
    ///     pool.apply(chatty, 1 << 20),
    ///     Err(Error::LimitExceeded { limit: Limit::Output { .. }, .. })
    /// ));
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn output_limit(mut self, bytes: u64) -> Sandbox {
        self.spec.output = Some(bytes);
        self
    }

    /// Caps the threads of each worker, its own included (default 64):
    /// past it, starting a thread fails with `EAGAIN` (`std::thread::spawn`
    /// panics; `Builder::spawn` returns the error). Each worker is in a user
    /// namespace of its own, in which the kernel's `RLIMIT_NPROC` counts
    /// its threads alone, so one worker's threads never count against
    /// another's.
    ///
    /// ```
    /// use procpool::{Pool, Sandbox, StartMethod};
    ///
    /// fn start(n: usize) -> usize {
    ///     let hs: Vec<_> = (0..n)
    ///         .map_while(|_| std::thread::Builder::new().spawn(|| {
    ///             std::thread::sleep(std::time::Duration::from_millis(100))
    ///         }).ok())
    ///         .collect();
    ///     let started = hs.len();
    ///     hs.into_iter().for_each(|h| h.join().unwrap());
    ///     started
    /// }
    ///
    /// let pool = Pool::builder()
    ///     .processes(1)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().max_threads(8))
    ///     .build()?;
    /// assert_eq!(pool.apply(start, 4)?, 4);
    /// assert_eq!(pool.apply(start, 100)?, 7); // 8 with the worker's own
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn max_threads(mut self, n: u64) -> Sandbox {
        self.spec.max_threads = Some(n);
        self
    }

    /// Gives each worker a private, writable `/tmp` of at most `bytes` (a
    /// tmpfs in its private root, so `std::env::temp_dir()` works in a
    /// task), gone with the worker: what a task writes there never
    /// reaches the host's disk, and past `bytes` a write fails with
    /// `ENOSPC`. Paths listed under `/tmp` are still there, bound on top.
    /// Its pages are memory of the host's, outside the worker's memory cap
    /// (but bounded by `bytes`). Without it a sandboxed task has no `/tmp`.
    ///
    /// ```
    /// use procpool::{Pool, Sandbox, StartMethod};
    ///
    /// fn scratch(n: usize) -> Result<usize, String> {
    ///     let path = std::env::temp_dir().join("work");
    ///     std::fs::write(&path, vec![0u8; n]).map_err(|e| e.to_string())?;
    ///     Ok(std::fs::read(&path).map_err(|e| e.to_string())?.len())
    /// }
    ///
    /// let pool = Pool::builder()
    ///     .processes(1)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().scratch_size(1 << 20))
    ///     .build()?;
    /// assert_eq!(pool.apply(scratch, 1000)?.ok(), Some(1000));
    /// assert!(pool.apply(scratch, 2 << 20)?.is_err()); // past 1 MiB
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn scratch_size(mut self, bytes: u64) -> Sandbox {
        self.spec.scratch = Some(bytes);
        self
    }

    /// Caps what a worker may hand back to the parent for one task, in
    /// bytes: its result frame on the socket, its result's shared-memory
    /// block, and any buffers with them, all together. The default is the
    /// [`memory_limit`](Sandbox::memory_limit) if one is set, else 1 GiB.
    ///
    /// A task in a sandbox is taken to be hostile: it can find its worker's
    /// socket to the parent and write anything there. The parent checks
    /// every length a worker claims against this cap before it allocates
    /// or maps anything for it, so one worker can make the parent's memory
    /// grow by at most about this much, whatever it sends. A worker that
    /// claims more, or sends anything else the protocol does not allow, is
    /// killed and replaced, and its task fails with
    /// [`Error::ProtocolViolation`](crate::Error::ProtocolViolation). A
    /// task whose honest result is larger than the cap fails the same way:
    /// raise the cap for such results.
    ///
    /// ```
    /// use procpool::{Error, Pool, Sandbox, StartMethod};
    /// use serde_bytes::ByteBuf;
    ///
    /// fn make(n: usize) -> ByteBuf { ByteBuf::from(vec![1u8; n]) }
    ///
    /// let pool = Pool::builder()
    ///     .processes(1)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().result_limit(4 << 20))
    ///     .build()?;
    /// assert_eq!(pool.apply(make, 1 << 20)?.len(), 1 << 20);
    /// assert!(matches!(
    ///     pool.apply(make, 8 << 20),
    ///     Err(Error::ProtocolViolation { .. })
    /// ));
    /// // The pool goes on with a new worker.
    /// assert_eq!(pool.apply(make, 10)?.len(), 10);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn result_limit(mut self, bytes: u64) -> Sandbox {
        self.spec.result = Some(bytes);
        self
    }

    /// Accepts a weaker sandbox where the kernel lacks a mechanism (no
    /// seccomp, Landlock older than ABI 6 or absent, no network
    /// namespace): the pool applies what there is, and logs what is
    /// missing. Without it, `build()` fails with
    /// [`Error::Sandbox`](crate::Error::Sandbox) naming what is missing.
    pub fn allow_weaker(mut self) -> Sandbox {
        self.spec.allow_weaker = true;
        self
    }

    /// Sets the environment variable `key` to `value` in the pool's
    /// workers (and their fork server).
    ///
    /// A sandboxed worker's environment is empty but for what this and
    /// [`inherit_env`](Sandbox::inherit_env) name: none of the parent's
    /// variables (its tokens, its paths) reaches a task unless named here.
    /// The server is exec'd with only these, so no byte of the parent's
    /// environment is in a worker's memory. A program that needs a
    /// variable to start (`LD_LIBRARY_PATH` for a library outside the
    /// system's paths, say) must name it. The crate's own settings
    /// (`PROCPOOL_SPIN_US`) reach the server another way.
    ///
    /// ```
    /// use procpool::{Pool, Sandbox, StartMethod};
    /// fn lang(_: ()) -> Option<String> { std::env::var("LANG").ok() }
    /// fn home(_: ()) -> Option<String> { std::env::var("HOME").ok() }
    /// let pool = Pool::builder()
    ///     .processes(1)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().env("LANG", "C.UTF-8"))
    ///     .build()?;
    /// assert_eq!(pool.apply(lang, ())?.as_deref(), Some("C.UTF-8"));
    /// assert_eq!(pool.apply(home, ())?, None);
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Sandbox {
        let value = value.as_ref().to_os_string();
        self.spec
            .env
            .0
            .push((key.as_ref().to_os_string(), Some(value)));
        self
    }

    /// Passes the parent's value of the environment variable `key` to the
    /// pool's workers, if it is set when the pool is built (see
    /// [`env`](Sandbox::env): nothing else of the parent's environment
    /// reaches them).
    ///
    /// ```
    /// use procpool::{Pool, Sandbox, StartMethod};
    /// fn path_is_set(_: ()) -> bool { std::env::var_os("PATH").is_some() }
    /// let pool = Pool::builder()
    ///     .processes(1)
    ///     .start_method(StartMethod::ForkServer)
    ///     .sandbox(Sandbox::new().inherit_env("PATH"))
    ///     .build()?;
    /// assert_eq!(pool.apply(path_is_set, ())?, std::env::var_os("PATH").is_some());
    /// # Ok::<(), procpool::Error>(())
    /// ```
    pub fn inherit_env(mut self, key: impl AsRef<OsStr>) -> Sandbox {
        self.spec.env.0.push((key.as_ref().to_os_string(), None));
        self
    }

    /// For tests of a kernel that lacks a mechanism: the server pretends
    /// that `mechanism` (`seccomp`, `netns` or `landlock`) is missing.
    /// Only a builder can ask for it; no environment variable can.
    #[doc(hidden)]
    pub fn pretend_missing(mut self, mechanism: &str) -> Sandbox {
        self.spec.pretend_missing.push(mechanism.trim().to_string());
        self
    }

    /// Checks the settings and resolves the paths, in the parent.
    pub(crate) fn resolve(self) -> Result<Spec, crate::Error> {
        let mut spec = self.spec;
        let zero = spec.memory == Some(0)
            || spec.open_files == Some(0)
            || spec.file_size == Some(0)
            || spec.tasks_per_worker == Some(0)
            || spec.scratch == Some(0)
            || spec.max_threads == Some(0)
            || spec.output == Some(0)
            || spec.result == Some(0)
            || spec.cpu_per_task.is_some_and(|d| d.is_zero());
        if zero {
            return Err(crate::Error::Config(
                "a sandbox's limits must be above zero",
            ));
        }
        for p in spec.read_only.iter_mut().chain(spec.read_write.iter_mut()) {
            *p = std::fs::canonicalize(&*p).map_err(|e| crate::Error::Sandbox {
                reason: format!("the sandbox's path {} cannot be used: {e}", p.display()),
            })?;
            if p.parent().is_none() {
                // The whole host would be the task's, and its private root
                // the host's own.
                return Err(crate::Error::Sandbox {
                    reason: "the sandbox cannot list /: name the paths a task needs".into(),
                });
            }
        }
        spec.env = EnvVars(resolve_env(std::mem::take(&mut spec.env.0)));
        Ok(spec)
    }
}

/// The server's environment as the builder named it: each inherited
/// variable replaced by the parent's value now, or left out if unset; a
/// key named twice keeps its last value.
fn resolve_env(named: Vec<(OsString, Option<OsString>)>) -> Vec<(OsString, Option<OsString>)> {
    let mut out: Vec<(OsString, Option<OsString>)> = Vec::new();
    for (key, value) in named {
        let Some(value) = value.or_else(|| std::env::var_os(&key)) else {
            continue;
        };
        out.retain(|(k, _)| *k != key);
        out.push((key, Some(value)));
    }
    out
}

impl Spec {
    /// The variables of a sandboxed server's environment (after
    /// [`Sandbox::resolve`]), besides the crate's own marker.
    pub(crate) fn env(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> {
        self.env
            .0
            .iter()
            .filter_map(|(k, v)| Some((k.as_os_str(), v.as_deref()?)))
    }
}

/// What a sandboxed worker writes in its `died_of` status word as it dies
/// of a limit.
pub(crate) mod cause {
    /// It aborted right after an allocation failed (`ENOMEM`).
    pub(crate) const MEMORY: u64 = 1;
    /// Its task went past the open-files cap.
    pub(crate) const OPEN_FILES: u64 = 2;
    /// It wrote more than the output cap (the fork server marks it, and
    /// kills it).
    pub(crate) const OUTPUT: u64 = 3;
}

/// The caps, as the parent needs them.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) memory: Option<u64>,
    pub(crate) cpu_per_task: Option<Duration>,
    pub(crate) open_files: Option<u64>,
    pub(crate) file_size: Option<u64>,
    /// How many tasks a worker runs before the pool kills it.
    pub(crate) tasks_per_worker: u64,
    /// The wall-clock limit of a task that has no timeout of its own (nor
    /// the pool's): ten times the CPU cap, else [`DEFAULT_WALL_CLOCK`].
    pub(crate) wall_clock: Duration,
    /// What a worker may hand back for one task, in bytes
    /// ([`Sandbox::result_limit`]).
    pub(crate) result: u64,
    /// What a worker may write to its stdout and stderr, in bytes
    /// ([`Sandbox::output_limit`]).
    pub(crate) output: u64,
}

/// The output cap of a sandboxed worker when [`Sandbox::output_limit`]
/// does not set one.
pub(crate) const DEFAULT_OUTPUT_LIMIT: u64 = 64 << 20;

/// The wall-clock limit of a sandboxed task when neither a timeout nor a
/// CPU cap is set.
pub(crate) const DEFAULT_WALL_CLOCK: Duration = Duration::from_secs(60);

/// The cap on what a worker hands back for one task when neither
/// [`Sandbox::result_limit`] nor [`Sandbox::memory_limit`] sets one.
pub(crate) const DEFAULT_RESULT_LIMIT: u64 = 1 << 30;

impl Spec {
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            memory: self.memory,
            cpu_per_task: self.cpu_per_task,
            open_files: self.open_files,
            file_size: self.file_size,
            tasks_per_worker: self.tasks_per_worker.unwrap_or(1),
            wall_clock: self
                .cpu_per_task
                .map_or(DEFAULT_WALL_CLOCK, |c| c.saturating_mul(10)),
            result: self.result.or(self.memory).unwrap_or(DEFAULT_RESULT_LIMIT),
            output: self.output.unwrap_or(DEFAULT_OUTPUT_LIMIT),
        }
    }
}

impl Limits {
    /// The limit a worker that ended with `status`, its `died_of` word
    /// saying `died_of`, went past, if the evidence says one.
    pub(crate) fn cause(&self, died_of: u64, status: ExitStatus) -> Option<Limit> {
        let signal = status.signal();
        if let (Some(bytes), Some(libc::SIGXFSZ)) = (self.file_size, signal) {
            return Some(Limit::FileSize { bytes });
        }
        match (died_of, signal) {
            (cause::MEMORY, Some(libc::SIGABRT)) => {
                self.memory.map(|bytes| Limit::Memory { bytes })
            }
            (cause::OPEN_FILES, _) => self.open_files.map(|max| Limit::OpenFiles { max }),
            (cause::OUTPUT, _) => Some(Limit::Output { bytes: self.output }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_variables_resolve_and_debug_shows_only_keys() {
        let sb = Sandbox::new()
            .env("A", "secret-one")
            .env("A", "secret-two")
            .inherit_env("PROCPOOL_UNIT_SURELY_UNSET");
        let shown = format!("{sb:?}");
        assert!(
            shown.contains("\"A\"") && !shown.contains("secret"),
            "{shown}"
        );
        let spec = sb.resolve().unwrap();
        let env: Vec<_> = spec.env().collect();
        assert_eq!(env, vec![(OsStr::new("A"), OsStr::new("secret-two"))]);
    }
}
