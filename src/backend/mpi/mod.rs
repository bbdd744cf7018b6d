//! The MPI backend (cargo feature `mpi`): workers live on MPI ranks.
//!
//! A program written once runs under `mpirun -n N ./prog` (or `srun -n N`).
//! Every rank runs `main`. When a rank reaches
//! [`PoolBuilder::mpi`](crate::PoolBuilder::mpi)`.build()`, it first (on
//! every rank but 0, as the launcher's variables tell) spawns its own fork
//! server by exec, without the launcher's variables (`OMPI_*`, `PMIX_*`,
//! `PMI_*`): MPI is not initialised in this process yet, and a fork after
//! `MPI_Init` is unsafe on RDMA transports. It then starts a thread named
//! "procpool-mpi", which initialises MPI and is the only thread of the
//! process that ever calls MPI (`Threading::Funneled`). The thread checks
//! that every rank runs the same executable (each rank hashes
//! `/proc/self/exe` and all exchange the hashes) and gathers how many
//! workers each rank hosts (`workers_per_rank`, by default the CPUs of its
//! affinity mask).
//!
//! **Rank 0** runs the engine, as a local pool does, and hosts no workers;
//! this backend is the engine's seam to the ranks (`root.rs`). A rank is a
//! remote local backend: a place where workers live, forked by its own
//! fork server, reached over MPI. The engine hears of them through the
//! same typed events as of local workers (started, could not start, ended
//! with a real wait status), plus `TimedOut`, since a rank keeps its tasks'
//! timeouts on its own clock. **Ranks >= 1** never return from `build`
//! (`rank.rs`). `transport.rs` is how the ranks talk over MPI.
//!
//! MPI carries the control messages (start, kill, a task's timeout,
//! ended, stop). Each worker's stream goes over TCP (`tcp.rs`): the
//! worker reads its tasks straight from the engine's stream (its rank
//! hands it over in an ADOPT frame), and writes each result to its rank,
//! which writes them on the stream in batches and keeps the stream open
//! past the worker's death, so that no result written is lost. MPI gives
//! no fd to sleep on, so a thread that waits for MPI messages must poll;
//! with the streams on sockets, no task waits for such a thread, and the
//! threads that poll MPI do so once a millisecond. A rank that cannot
//! reach rank 0 over TCP relays the stream in MPI messages instead (as
//! does every rank under `PROCPOOL_MPI_STREAMS=mpi`), through rank 0's
//! thread.
//!
//! Why the streams are not MPI messages: relaying every task and result
//! through threads that poll MPI costs an `apply` several times what a
//! TCP stream does, and results written on TCP by the worker itself (one
//! segment per result) cost `apply_async` more than the rank's batches do
//! (the figures are in `docs/performance.md`, "Figures behind the code's
//! choices").
//!
//! So a rank keeps a local pool's guarantees: a task that crashes ends
//! only its worker (`WorkerLost` names the rank), a timeout or a cancel
//! kills the worker on its rank, and the rank goes on.
//!
//! A rank lost as a whole (its process killed, its host down or cut off)
//! costs the tasks it held, when the launcher lets the others live on
//! (`peers.rs` and `root.rs`): rank 0 notices from the rank's silence
//! (BEATs both ways, several per rank timeout), from a message it does not
//! take, or from its workers' TCP streams shut with no word of their end;
//! the engine shrinks the pool and fails those tasks with `RankLost` (or
//! runs them again under retries); the rank is fenced off. A rank that
//! loses rank 0 ends its workers and exits. MPI is then not finalised
//! (finalising is collective, and would wait for the lost rank), and every
//! MPI call returns errors rather than aborting (`MPI_ERRORS_RETURN`).
//! Where no rank was lost, `MPI_Finalize` is bounded all the same: the
//! rank timeout after it starts, the process goes on without it
//! (`MpiThread::finish`; MPICH over UCX's TCP transport hangs there now
//! and then). What the launchers allow is measured in `docs/mpi.md`,
//! "Losing a host".
//!
//! Over MPI a worker running a long map chunk holds the next one
//! (`Config::prefetch_chunks`, `engine/plan.rs`): the result of one and the
//! next take long enough on the network that it would wait for them.
//!
//! Tasks travel as code offsets from an anchor (see `proto/task.rs`). These
//! are the same in every rank of one binary, which the hash check makes
//! sure of. Large bodies that travel in shared-memory blocks on one machine
//! are copied into the messages: rank 0 inlines a task's input block, and
//! a worker rank inlines a result's block. Task ids are in the frames, not
//! in MPI tags; every message names the engine's worker slot it is about.
//!
//! `SharedBuf`s are copied too, since shared memory ends at the machine: an
//! MPI pool's encoder writes their bytes inline (`Config::inline_shared`,
//! which a sandboxed pool sets as well), and the TASK frame's
//! `INLINE_SHARED` bit tells the rank's worker to do the same with its
//! result (rank 0 keeps that bit when it inlines an input block).

mod peers;
mod rank;
mod root;
mod tcp;
mod transport;

use crate::backend::local::server::{Init, Setup};
use crate::backend::local::start::StartMethod;
use crate::backend::local::{self, Local};
use crate::engine::core::Launch;
use crate::engine::job::Config;
use crate::engine::seam::{Backend, Event};
use crate::engine::size::SlotTable;
use crate::error::Error;
use crate::proto::words::SharedWords;
use crate::sys;
use mpi::Threading;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use peers::Peers;
use rank::{Finish, WorkerRank};
use root::{Command, Handed, Root, Seam};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use transport::{Link, all_gather, stop_ranks};

const NEED_RANKS: &str = "the mpi backend needs at least 2 MPI ranks: start the program with \
     `mpirun -n N` or `srun -n N` (N >= 2); rank 0 gets the pool, the other ranks are its workers";
const ONCE: &str = "the mpi backend initialises MPI itself, and MPI can be initialised only once \
     per process: build at most one MPI pool per program run";
const MISMATCH: &str = "the MPI ranks do not all run the same executable (the hashes of their \
     /proc/self/exe differ): start the same binary on every rank";

/// How a worker rank exits when it lost rank 0 (`EX_TEMPFAIL`): its work
/// was cut short, not wrong.
const EXIT_ORPHANED: i32 = 75;

/// Set once an MPI pool was attempted in this process.
static USED: AtomicBool = AtomicBool::new(false);

/// What a rank does once MPI is up.
enum Role {
    /// Rank 0: the pool, with this many worker ranks.
    Root { caps: Vec<usize> },
    /// Any other rank: serve until rank 0 says STOP, then exit.
    Worker,
}

/// `PoolBuilder::build` with `.mpi()`. On rank 0 this returns what the
/// engine runs on (the pool's size is the number of worker ranks, or fewer
/// if asked). On the other ranks it serves tasks and then exits the
/// process.
pub(crate) fn start(
    requested: Option<usize>,
    per_rank: Option<usize>,
    rank_timeout: Option<Duration>,
    mut cfg: Config,
    init: Option<Init>,
) -> Result<Launch, Error> {
    check_launcher()?;
    if per_rank == Some(0) {
        return Err(Error::Config("workers_per_rank must be at least 1"));
    }
    let rank_timeout = rank_timeout.unwrap_or(peers::DEFAULT_TIMEOUT);
    if rank_timeout < peers::MIN_TIMEOUT {
        return Err(Error::Config("rank_timeout must be at least 1 s"));
    }
    if USED.swap(true, Ordering::SeqCst) {
        return Err(Error::Config(ONCE));
    }
    // Before MPI is initialised in this process: a fork after MPI_Init is
    // unsafe on RDMA transports, so the server is spawned (exec'd) now.
    let host = match launcher_rank() {
        Some(0) => None,
        _ => host(per_rank, init),
    };
    let (role_tx, role_rx) = mpsc::channel::<Result<Role, Error>>();
    let (seam_tx, seam_rx) = mpsc::channel::<Seam>();
    let (finishing_tx, finishing) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("procpool-mpi".into())
        .spawn(move || mpi_thread(role_tx, seam_rx, finishing_tx, host, rank_timeout))
        .map_err(|e| Error::io("starting the MPI thread", e))?;
    let thread = MpiThread {
        handle,
        finishing,
        bound: rank_timeout,
    };
    let caps = match role_rx.recv() {
        Ok(Ok(Role::Root { caps })) => caps,
        Ok(Ok(Role::Worker)) => serve_then_exit(thread),
        Ok(Err(e)) => {
            let _ = thread.finish();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.finish();
            return Err(Error::Broken {
                reason: "the MPI thread ended before MPI was up".into(),
            });
        }
    };
    // From here on, dropping `seam_tx` (on any error) or the backend's
    // command channel makes the MPI thread stop the ranks and finalise.
    let workers: usize = caps.iter().sum();
    cfg.processes = requested.unwrap_or(workers).min(workers);
    remote(&mut cfg);
    let table = SlotTable::new(cfg.processes, None);
    let (backend, handed) = connect(thread, seam_tx, table.in_use)?;
    Ok(Launch {
        cfg,
        backend: Box::new(backend),
        progress: handed,
        table,
    })
}

/// A worker rank: the thread serves until rank 0 says STOP (or is lost),
/// then finalises MPI if it may. Everything else in this process ends
/// with it.
fn serve_then_exit(thread: MpiThread) -> ! {
    match thread.finish() {
        // Cut off from the job (its workers are gone): exit without
        // anything that could wait on it (flushing output, MPI's exit
        // hooks).
        Some(EXIT_ORPHANED) => sys::exit_now(EXIT_ORPHANED),
        Some(code) => std::process::exit(code),
        // MPI_Finalize hung (the rank served to the end): MPI's exit hooks
        // could hang too.
        None => sys::exit_now(0),
    }
}

/// The engine's settings for workers on other hosts.
fn remote(cfg: &mut Config) {
    // Each rank times its own tasks: clocks of different hosts are not
    // comparable.
    cfg.backend_keeps_timeouts = true;
    // Tasks go to other hosts, where no fd (of a shared-memory block) can
    // go with them.
    cfg.inline_bodies = true;
    // A map chunk's result and the next chunk cross the network while
    // the worker would wait: it holds the next one.
    cfg.prefetch_chunks = true;
    cfg.spin = crate::proto::idle::remote_spin_budget();
    // A rank reports the task its dead worker started, not the item: an
    // imap keeps one item per chunk unless told otherwise.
    cfg.item_progress = false;
}

/// Rank 0: joins the engine's side of the seam to the MPI thread's (the
/// channels and the eventfds that wake either side).
fn connect(
    thread: MpiThread,
    seam_tx: mpsc::Sender<Seam>,
    slots: usize,
) -> Result<(Mpi, Arc<Handed>), Error> {
    let eventfd = || {
        sys::eventfd()
            .map(Arc::new)
            .map_err(|e| Error::io("creating an eventfd", e))
    };
    let (wake_root, wake_engine) = (eventfd()?, eventfd()?);
    let (cmd_tx, cmd_rx) = mpsc::channel();
    let (event_tx, event_rx) = mpsc::channel();
    let handed = Arc::new(Handed::new(slots));
    let seam = Seam {
        commands: cmd_rx,
        wake_me: wake_root.clone(),
        events: event_tx,
        wake_engine: wake_engine.clone(),
        handed: handed.clone(),
    };
    seam_tx.send(seam).map_err(|_| Error::Broken {
        reason: "the MPI thread ended early".into(),
    })?;
    let backend = Mpi {
        commands: Some(cmd_tx),
        events: event_rx,
        wake_root,
        wake_engine,
        thread: Some(thread),
        gone: false,
    };
    Ok((backend, handed))
}

/// The "procpool-mpi" thread, and word of when it starts to finalise MPI.
struct MpiThread {
    handle: std::thread::JoinHandle<i32>,
    /// A message (or the sender's end) once it is finishing.
    finishing: mpsc::Receiver<()>,
    /// How long finalising may take.
    bound: Duration,
}

impl MpiThread {
    /// Waits for the thread to end, and returns its exit code; None if
    /// `MPI_Finalize` did not return within the bound. MPICH over UCX's
    /// TCP transport can hang there now and then (a rank waits for a peer
    /// that has moved on): then the process goes on, and ends, without it.
    fn finish(self) -> Option<i32> {
        let _ = self.finishing.recv();
        let deadline = std::time::Instant::now() + self.bound;
        while !self.handle.is_finished() {
            if std::time::Instant::now() > deadline {
                eprintln!(
                    "procpool: MPI_Finalize did not return within {:?}; this process ends without it",
                    self.bound
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(self.handle.join().unwrap_or(101))
    }
}

/// The engine's side of the MPI backend (rank 0's thread is the other).
struct Mpi {
    /// `None` once closed: the thread then stops the ranks.
    commands: Option<mpsc::Sender<Command>>,
    events: mpsc::Receiver<Event>,
    wake_root: Arc<OwnedFd>,
    wake_engine: Arc<OwnedFd>,
    thread: Option<MpiThread>,
    /// The thread ended (its channel closed).
    gone: bool,
}

impl Mpi {
    fn command(&mut self, c: Command) {
        if let Some(tx) = &self.commands {
            let _ = tx.send(c);
            sys::eventfd_signal(self.wake_root.as_raw_fd());
        }
    }
}

impl Backend for Mpi {
    fn what(&self) -> &'static str {
        "the pool's MPI thread"
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn start(&mut self, slot: usize) {
        self.command(Command::Start(slot));
    }

    /// The worker's rank kills it (its fork server does), by slot.
    fn kill(&mut self, slot: usize, _pid: u32, task: u64) {
        self.command(Command::Kill { slot, task });
    }

    /// The worker's rank times the task, from its start there.
    fn keep_timeout(&mut self, slot: usize, task: u64, limit: std::time::Duration) {
        let ns = crate::deadline::nanos(limit);
        self.command(Command::Timeout { slot, task, ns });
    }

    fn poll_fd(&self) -> Option<(RawFd, bool)> {
        self.is_open()
            .then(|| (self.wake_engine.as_raw_fd(), false))
    }

    fn flush(&mut self) {}

    fn events(&mut self, out: &mut Vec<Event>) {
        sys::drain(self.wake_engine.as_raw_fd());
        loop {
            match self.events.try_recv() {
                Ok(e) => out.push(e),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !self.gone {
                        self.gone = true;
                        out.push(Event::Gone);
                    }
                    return;
                }
            }
        }
    }

    fn is_open(&self) -> bool {
        self.commands.is_some() && !self.gone
    }

    fn close(&mut self) {
        self.commands = None;
        sys::eventfd_signal(self.wake_root.as_raw_fd());
    }

    fn wait(mut self: Box<Self>) -> String {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.finish();
        }
        format!("{} exited", self.what())
    }
}

/// Refuses early when no MPI launcher started this process, or when it
/// started just one rank. MPI is not touched in that case, so a program
/// can fall back to a local pool.
fn check_launcher() -> Result<(), Error> {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        if let Some(n) = std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            return if n >= 2 {
                Ok(())
            } else {
                Err(Error::Config(NEED_RANKS))
            };
        }
    }
    // Launchers that do not say the size (srun with PMIx, say): the size is
    // checked again once MPI is up.
    let launched = [
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "PMI_RANK",
        "PMI_FD",
        "MPI_LOCALRANKID",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some());
    if launched {
        Ok(())
    } else {
        Err(Error::Config(NEED_RANKS))
    }
}

/// A hash of this process's executable file.
fn exe_hash() -> std::io::Result<u64> {
    use std::hash::Hasher;
    let mut f = std::fs::File::open("/proc/self/exe")?;
    // `DefaultHasher::new` has fixed keys: every process of one binary
    // computes the same hash.
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
        total += n as u64;
    }
    h.write_u64(total);
    Ok(h.finish())
}

/// The "procpool-mpi" thread: initialises MPI, checks the binaries, runs
/// rank 0's server or a worker rank's loop, and finalises MPI if no rank
/// was lost (finalising is collective: it would wait for a lost rank).
/// Returns the exit status for a worker rank's process.
fn mpi_thread(
    role_tx: mpsc::Sender<Result<Role, Error>>,
    setup_rx: mpsc::Receiver<Seam>,
    finishing: mpsc::Sender<()>,
    host: Option<Host>,
    timeout: Duration,
) -> i32 {
    let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Funneled) else {
        let _ = role_tx.send(Err(Error::Config(ONCE)));
        return 0;
    };
    if provided < Threading::Funneled {
        log::warn!("procpool: the MPI library gives only {provided:?} threading support");
    }
    let world = universe.world();
    return_errors(&world);
    let comm = world.duplicate();
    return_errors(&comm);
    let (finalize, code) = run_rank(&comm, role_tx, setup_rx, host, timeout);
    let _ = finishing.send(());
    if finalize {
        drop(comm);
        // MPI_Finalize: every worker rank has stopped by now.
        drop(universe);
    } else {
        // A rank was lost: freeing the communicator or finalising could
        // wait for it forever. The process ends without.
        std::mem::forget(comm);
        std::mem::forget(universe);
    }
    code
}

/// Makes MPI calls on `comm` return errors rather than abort the job, so
/// that a lost rank does not take the survivors with it.
fn return_errors(comm: &SimpleCommunicator) {
    // SAFETY: `comm.as_raw()` is a valid communicator handle while `comm`
    // lives (it is borrowed for the call), and RSMPI_ERRORS_RETURN is one
    // of MPI's predefined error handlers, valid after MPI_Init, which has
    // run (the universe exists). The call has no other precondition.
    unsafe {
        mpi::ffi::MPI_Comm_set_errhandler(comm.as_raw(), mpi::ffi::RSMPI_ERRORS_RETURN);
    }
}

/// Runs this rank's part. Returns whether MPI may be finalised, and the
/// exit status for a worker rank's process.
fn run_rank(
    comm: &SimpleCommunicator,
    role_tx: mpsc::Sender<Result<Role, Error>>,
    setup_rx: mpsc::Receiver<Seam>,
    mut host: Option<Host>,
    timeout: Duration,
) -> (bool, i32) {
    let size = comm.size() as usize;
    let rank = comm.rank() as usize;
    if size < 2 {
        let _ = role_tx.send(Err(Error::Config(NEED_RANKS)));
        return (true, 0);
    }
    if !same_binaries(comm, &role_tx) {
        return (true, 0);
    }
    if rank == 0 {
        // Rank 0 hosts no workers (a server started before the rank was
        // known is closed).
        if let Some(h) = host.take() {
            let _ = Box::new(h.server).wait();
        }
    }
    // Each rank's capacity and rank timeout (ms).
    let mut all = vec![0u64; 2 * size];
    let cap = host.as_ref().map_or(0, |h| h.cap as u64);
    let mine = [cap, timeout.as_millis() as u64];
    all_gather(comm, &mine[..], &mut all[..]);
    let caps: Vec<usize> = all.chunks(2).map(|c| c[0] as usize).collect();
    let shortest = all.chunks(2).map(|c| c[1]).min().unwrap_or(0);
    let mut peers = Peers::new(rank, size, timeout);
    peers.set_shortest(Duration::from_millis(shortest));
    peers.set_hosts(host_names(comm));
    let mut link = Link::new(comm, peers);
    if rank != 0 {
        let _ = role_tx.send(Ok(Role::Worker));
        drop(role_tx);
        let finish = match host {
            Some(h) => WorkerRank::new(link, h.server, h.words, h.cap).run(),
            None => wait_for_stop(link),
        };
        return match finish {
            Finish::Stopped { finalize } => (finalize, 0),
            Finish::Orphaned => (false, EXIT_ORPHANED),
        };
    }
    let role = if caps.iter().sum::<usize>() == 0 {
        Err(Error::Broken {
            reason: "no MPI rank could start its fork server to host workers".into(),
        })
    } else {
        Ok(Role::Root { caps: caps.clone() })
    };
    if role_tx.send(role).is_err() || caps.iter().sum::<usize>() == 0 {
        return (stop_ranks(&mut link), 0);
    }
    drop(role_tx);
    let finalize = match setup_rx.recv() {
        Ok(seam) => Root::new(link, seam, caps).run(),
        // The builder failed after MPI was up: stop the ranks.
        Err(_) => stop_ranks(&mut link),
    };
    (finalize, 0)
}

/// The binary check: every rank hashes its executable and all exchange
/// the hashes. On a mismatch, rank 0's builder gets `Error::Config` and
/// the other ranks exit. Returns whether they match.
fn same_binaries(comm: &SimpleCommunicator, role_tx: &mpsc::Sender<Result<Role, Error>>) -> bool {
    let size = comm.size() as usize;
    let rank = comm.rank() as usize;
    let mine = exe_hash().unwrap_or_else(|e| {
        log::error!("procpool: MPI rank {rank} cannot read /proc/self/exe: {e}");
        // A value no real hash is expected to be: it fails the check.
        rank as u64 ^ 0x9e37_79b9_7f4a_7c15
    });
    let mut all = vec![0u64; size];
    all_gather(comm, &mine, &mut all[..]);
    let differ: Vec<usize> = (1..size).filter(|&r| all[r] != all[0]).collect();
    if differ.is_empty() {
        return true;
    }
    if rank == 0 {
        log::error!("procpool: MPI ranks {differ:?} run a different executable than rank 0");
        let _ = role_tx.send(Err(Error::Config(MISMATCH)));
    } else {
        if differ.contains(&rank) {
            eprintln!(
                "procpool: MPI rank {rank} runs a different executable than rank 0; \
                 it serves no pool and exits"
            );
        }
        let _ = role_tx.send(Ok(Role::Worker));
    }
    false
}

/// Every rank's host name (this host's as its UTS namespace has it), for
/// the errors that name a lost rank's host.
fn host_names(comm: &SimpleCommunicator) -> Vec<String> {
    const LEN: usize = 64;
    let size = comm.size() as usize;
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut mine = [0u8; LEN];
    let name = name.trim().as_bytes();
    let n = name.len().min(LEN);
    mine[..n].copy_from_slice(&name[..n]);
    let mut all = vec![0u8; LEN * size];
    all_gather(comm, &mine[..], &mut all[..]);
    all.chunks(LEN)
        .map(|c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(LEN);
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect()
}

/// What a worker rank hosts its workers with: its fork server, the
/// server's status words, and how many workers it may host at once.
struct Host {
    server: Local,
    words: Arc<SharedWords>,
    cap: usize,
}

/// This process's rank, as its launcher says before MPI is up.
fn launcher_rank() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_RANK",
        "PMIX_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Starts this rank's fork server by exec, without the launcher's
/// variables, for `per_rank` workers (default: the CPUs of this process's
/// affinity mask). `None` if it cannot start: the rank then hosts none.
fn host(per_rank: Option<usize>, init: Option<Init>) -> Option<Host> {
    let cap =
        per_rank.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let started = local::words(2 * cap, false).and_then(|words| {
        let setup = Setup {
            init,
            words: words.clone(),
            sock_buf: 1 << 20,
            sandbox: None,
            prepared: None,
            without_mpi_env: true,
            // A rank's workers write to the rank's stdout and stderr, which
            // the launcher forwards (the builder accepts no other output).
            output: local::output::Streams::INHERIT,
        };
        let server = local::start_server(StartMethod::ForkServer, setup)?;
        Ok(Host { server, words, cap })
    });
    match started {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("procpool: this MPI rank cannot host workers: {e}");
            None
        }
    }
}

/// A rank that hosts no workers waits for STOP and acknowledges it, or
/// for rank 0's loss.
fn wait_for_stop(mut link: Link<'_>) -> Finish {
    let mut idle = transport::Backoff::new(transport::MAX_IDLE);
    loop {
        if link.pump() {
            idle.reset();
        } else {
            idle.sleep();
        }
        while let Some((from, msg)) = link.inbox.pop_front() {
            match (from, msg.first()) {
                (0, Some(&transport::M_STOP)) => {
                    link.post(0, &[transport::M_STOP_ACK]);
                    link.flush(link.peers.timeout());
                    let finalize = msg.get(1) == Some(&transport::FINALIZE);
                    return Finish::Stopped { finalize };
                }
                (0, Some(&transport::M_FENCE)) => return Finish::Orphaned,
                _ => {}
            }
        }
        link.beat();
        if !link.take_stuck().is_empty() || link.peers.silent().is_some() {
            return Finish::Orphaned;
        }
    }
}
