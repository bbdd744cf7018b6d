//! The MPI backend (cargo feature `mpi`): workers are MPI ranks.
//!
//! A program written once runs under `mpirun -n N ./prog` (or `srun -n N`).
//! Every rank runs `main`. When a rank reaches
//! [`PoolBuilder::mpi`](crate::PoolBuilder::mpi)`.build()`, it starts a
//! thread named "procpool-mpi". That thread initialises MPI, and it is the
//! only thread of the process that ever calls MPI (`Threading::Funneled`).
//! The thread then checks that every rank runs the same executable: each
//! rank hashes `/proc/self/exe` and all ranks exchange the hashes.
//!
//! **Rank 0** reuses the whole pool engine through its seam. The supervisor
//! talks to a fork server over the protocol of `server.rs`; here the
//! "procpool-mpi" thread speaks that protocol instead, on a `SOCK_SEQPACKET`
//! pair:
//! - SPAWN(slot): the thread picks a free rank and tells it to START a
//!   worker. It keeps one end of a fresh stream socket pair and hands the
//!   other end to the supervisor with SPAWNED(slot, pid = rank).
//! - While the worker runs, the thread moves bytes both ways between its end
//!   of the socket and MPI messages to and from the rank.
//! - KILL(rank), sent when a task times out: a remote process cannot be
//!   killed. The thread marks the worker's tasks as started, closes its
//!   end, tells the rank to ABANDON the worker, and reports
//!   EXITED(rank, SIGKILL). The rank serves no more tasks in this run. A
//!   spare rank, if there is one, replaces it. If there is none, SPAWN
//!   fails and the pool goes on with fewer workers. The remote worker cannot
//!   write the supervisor's shared word (which task a worker started), so
//!   this thread stores each task's number there as it forwards the task: a
//!   task handed to a rank counts as started. A KILL for one task (a
//!   cancel) is refused: the task runs to the end and its result is dropped.
//! - End-of-file from the supervisor (the pool is finished): the thread tells
//!   every rank to STOP, waits for each to acknowledge, and finalises MPI.
//!
//! **Ranks >= 1** never return from `build`. Each START runs the worker loop
//! (`worker::serve`) on a thread of its own, over a stream socket pair. The
//! rank's "procpool-mpi" thread moves bytes between the other end of that
//! pair and rank 0. When the loop ends, the rank reports ENDED(code) and
//! can be started again, for instance after `max_tasks_per_child`. On STOP
//! the rank acknowledges, finalises MPI and exits with status 0.
//!
//! Tasks travel as code offsets from an anchor (see `task.rs`). These are
//! the same in every rank of one binary, which the hash check makes sure
//! of. Large bodies that travel in shared-memory blocks on one machine are
//! copied into the messages: rank 0 inlines a task's input block, and a
//! worker rank inlines a result's block.
//!
//! All messages use one tag of a duplicate of the world communicator, so
//! MPI's non-overtaking rule keeps them in order. The first byte of a
//! message is its kind. Waiting uses `Iprobe` and `Test` with a backoff
//! capped at 1 ms, because a blocking receive busy-spins a whole core.
//! While a send is pending, its sender keeps receiving, so two ranks that
//! send large messages to each other cannot deadlock. Task ids are in the
//! frames, not in MPI tags.

use crate::api::pool::Pool;
use crate::backend::local::server::{self, Init, Msg};
use crate::engine::supervisor::{Config, ServerHandle};
use crate::error::Error;
use crate::proto::shm::Block;
use crate::proto::status::{STATUS_WORDS, SharedWords};
use crate::proto::task::status;
use crate::proto::wire::{self, HDR, Header};
use crate::sys;
use crate::worker::{self, Stop};
use mpi::Threading;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// Stream bytes: tasks (rank 0 to a worker rank) or results (back).
const M_DATA: u8 = 1;
/// Rank 0 to a worker rank: start a worker, which runs the initializer.
const M_START: u8 = 2;
/// Rank 0 to a worker rank: the supervisor closed its side of the worker's
/// stream, so the worker finishes its tasks and ends.
const M_EOF: u8 = 3;
/// Rank 0 to a worker rank: drop the worker and serve no more tasks.
const M_ABANDON: u8 = 4;
/// Rank 0 to a worker rank: the pool is finished; acknowledge and exit.
const M_STOP: u8 = 5;
/// A worker rank to rank 0: its worker ended, with a 4-byte exit code.
const M_ENDED: u8 = 6;
/// A worker rank to rank 0: STOP received; nothing follows.
const M_STOP_ACK: u8 = 7;

/// A message carries at most this many stream bytes (MPI counts are `int`).
const CHUNK: usize = 64 << 20;
/// How much one socket read asks for.
const READ_CHUNK: usize = 256 << 10;
/// An idle thread sleeps at most this long between polls.
const MAX_IDLE: Duration = Duration::from_millis(1);
/// A thread waiting for a send sleeps at most this long between tests.
const MAX_SEND_WAIT: Duration = Duration::from_micros(100);
/// How long rank 0 waits for the ranks to acknowledge STOP before it aborts
/// the job (MPI finalisation would hang on a rank that never answers).
const STOP_BOUND: Duration = Duration::from_secs(30);
/// How long a stopping rank lets its worker thread finish.
const JOIN_BOUND: Duration = Duration::from_millis(50);
/// Socket buffer size, as for local workers.
const SOCK_BUF: usize = 1 << 20;

const NEED_RANKS: &str = "the mpi backend needs at least 2 MPI ranks: start the program with \
     `mpirun -n N` or `srun -n N` (N >= 2); rank 0 gets the pool, the other ranks are its workers";
const ONCE: &str = "the mpi backend initialises MPI itself, and MPI can be initialised only once \
     per process: build at most one MPI pool per program run";
const MISMATCH: &str = "the MPI ranks do not all run the same executable (the hashes of their \
     /proc/self/exe differ): start the same binary on every rank";

/// Set once an MPI pool was attempted in this process.
static USED: AtomicBool = AtomicBool::new(false);

/// What a rank does once MPI is up.
enum Role {
    /// Rank 0: the pool, with this many worker ranks.
    Root { workers: usize },
    /// Any other rank: serve until rank 0 says STOP, then exit.
    Worker,
}

/// What rank 0's builder hands its MPI thread once the pool exists.
struct Setup {
    sock: OwnedFd,
    words: Arc<SharedWords>,
}

/// `PoolBuilder::build` with `.mpi()`. On rank 0 this returns the pool. On
/// the other ranks it serves tasks and then exits the process.
pub(crate) fn build_pool(
    requested: Option<usize>,
    mut cfg: Config,
    init: Option<Init>,
) -> Result<Pool, Error> {
    check_launcher()?;
    if USED.swap(true, Ordering::SeqCst) {
        return Err(Error::Config(ONCE));
    }
    let (role_tx, role_rx) = mpsc::channel::<Result<Role, Error>>();
    let (setup_tx, setup_rx) = mpsc::channel::<Setup>();
    let thread = std::thread::Builder::new()
        .name("procpool-mpi".into())
        .spawn(move || mpi_thread(role_tx, setup_rx, init))
        .map_err(|e| Error::io("starting the MPI thread", e))?;
    let workers = match role_rx.recv() {
        Ok(Ok(Role::Root { workers })) => workers,
        Ok(Ok(Role::Worker)) => {
            // A worker rank: the thread serves until rank 0 says STOP, then
            // finalises MPI. Everything else in this process ends with it.
            let code = if thread.join().is_ok() { 0 } else { 101 };
            std::process::exit(code)
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(Error::Broken {
                reason: "the MPI thread ended before MPI was up".into(),
            });
        }
    };
    // From here on, dropping `setup_tx` (on any error) or the supervisor's
    // end of the socket makes the MPI thread stop the ranks and finalise.
    cfg.processes = requested.unwrap_or(workers).min(workers);
    let slots = cfg.processes * 2;
    let words = Arc::new(
        SharedWords::new(slots * STATUS_WORDS)
            .map_err(|e| Error::io("mapping shared memory", e))?,
    );
    let (parent_end, server_end) =
        sys::seqpacket_pair().map_err(|e| Error::io("creating the MPI server socket", e))?;
    setup_tx
        .send(Setup {
            sock: server_end,
            words: words.clone(),
        })
        .map_err(|_| Error::Broken {
            reason: "the MPI thread ended early".into(),
        })?;
    Pool::start(cfg, parent_end, ServerHandle::Thread(thread), words, slots)
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
/// rank 0's server or a worker rank's loop, and finalises MPI.
fn mpi_thread(
    role_tx: mpsc::Sender<Result<Role, Error>>,
    setup_rx: mpsc::Receiver<Setup>,
    init: Option<Init>,
) {
    let Some((universe, provided)) = mpi::initialize_with_threading(Threading::Funneled) else {
        let _ = role_tx.send(Err(Error::Config(ONCE)));
        return;
    };
    if provided < Threading::Funneled {
        log::warn!("procpool: the MPI library gives only {provided:?} threading support");
    }
    {
        let world = universe.world();
        let comm = world.duplicate();
        run_rank(&comm, role_tx, setup_rx, init);
    }
    // MPI_Finalize: every worker rank has stopped by now.
    drop(universe);
}

fn run_rank(
    comm: &SimpleCommunicator,
    role_tx: mpsc::Sender<Result<Role, Error>>,
    setup_rx: mpsc::Receiver<Setup>,
    init: Option<Init>,
) {
    let size = comm.size() as usize;
    let rank = comm.rank() as usize;
    if size < 2 {
        let _ = role_tx.send(Err(Error::Config(NEED_RANKS)));
        return;
    }
    let mine = exe_hash().unwrap_or_else(|e| {
        log::error!("procpool: MPI rank {rank} cannot read /proc/self/exe: {e}");
        // A value no real hash is expected to be: it fails the check.
        rank as u64 ^ 0x9e37_79b9_7f4a_7c15
    });
    let mut all = vec![0u64; size];
    all_gather(comm, mine, &mut all);
    let differ: Vec<usize> = (1..size).filter(|&r| all[r] != all[0]).collect();
    if !differ.is_empty() {
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
        return;
    }
    if rank == 0 {
        if role_tx.send(Ok(Role::Root { workers: size - 1 })).is_err() {
            stop_ranks(comm, &mut VecDeque::new());
            return;
        }
        drop(role_tx);
        match setup_rx.recv() {
            Ok(setup) => Root::new(comm, setup).run(),
            // The builder failed after MPI was up: stop the ranks.
            Err(_) => stop_ranks(comm, &mut VecDeque::new()),
        }
    } else {
        let _ = role_tx.send(Ok(Role::Worker));
        drop(role_tx);
        WorkerRank::new(comm, init).run();
    }
}

/// The hash exchange: a non-blocking all-gather, polled with backoff so
/// that ranks that wait for a late rank 0 do not spin.
fn all_gather(comm: &SimpleCommunicator, mine: u64, all: &mut [u64]) {
    mpi::request::scope(|scope| {
        let mut req = comm.immediate_all_gather_into(scope, &mine, all);
        let mut idle = Backoff::new(MAX_IDLE);
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            idle.sleep();
        }
    });
}

/// Received messages, with the rank each came from.
type Inbox = VecDeque<(usize, Vec<u8>)>;

/// Receives every message that has arrived. Returns whether there was one.
fn pump(comm: &SimpleCommunicator, inbox: &mut Inbox) -> bool {
    let mut any = false;
    while let Some((msg, st)) = comm.any_process().immediate_matched_probe() {
        let len = usize::try_from(st.count(u8::equivalent_datatype())).unwrap_or(0);
        let mut v = vec![0u8; len];
        msg.matched_receive_into(&mut v[..]);
        inbox.push_back((st.source_rank() as usize, v));
        any = true;
    }
    any
}

/// Sends one message and waits until its buffer is free again. Meanwhile
/// it receives whatever arrives, so a peer that is itself sending to us is
/// never blocked.
fn send(comm: &SimpleCommunicator, inbox: &mut Inbox, to: usize, msg: &[u8]) {
    mpi::request::scope(|scope| {
        let mut req = comm.process_at_rank(to as i32).immediate_send(scope, msg);
        let mut wait = Backoff::new(MAX_SEND_WAIT);
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if pump(comm, inbox) {
                wait.reset();
            } else {
                wait.sleep();
            }
        }
    });
}

/// Sends stream bytes in messages of at most `CHUNK` bytes. `msg` holds
/// the `M_DATA` byte and then the bytes.
fn send_data(comm: &SimpleCommunicator, inbox: &mut Inbox, to: usize, msg: &mut Vec<u8>) {
    if msg.len() <= 1 {
        return;
    }
    if msg.len() <= CHUNK + 1 {
        send(comm, inbox, to, msg);
    } else {
        let mut part = Vec::with_capacity(CHUNK + 1);
        for piece in msg[1..].chunks(CHUNK) {
            part.clear();
            part.push(M_DATA);
            part.extend_from_slice(piece);
            send(comm, inbox, to, &part);
        }
    }
    msg.truncate(1);
    if msg.capacity() > 4 * CHUNK {
        *msg = vec![M_DATA];
    }
}

/// Backoff for polling, by the time since the last activity: yields at
/// first, then short sleeps while messages are likely to follow soon (a
/// stream of `apply` calls, say), then sleeps doubling up to a cap.
struct Backoff {
    since: Option<Instant>,
    n: u32,
    cap: Duration,
}

/// Yield (spin) this long after the last activity...
const SPIN: Duration = Duration::from_millis(1);
/// ... then sleep briefly until this long after it...
const HOT: Duration = Duration::from_millis(5);
/// ... this long at a time (about the kernel's timer slack).
const HOT_SLEEP: Duration = Duration::from_micros(50);

impl Backoff {
    fn new(cap: Duration) -> Self {
        Backoff {
            since: None,
            n: 0,
            cap,
        }
    }

    /// Something happened: poll eagerly again.
    fn reset(&mut self) {
        self.since = None;
        self.n = 0;
    }

    fn next(&mut self) -> Duration {
        let now = Instant::now();
        let idle = now - *self.since.get_or_insert(now);
        if idle < SPIN {
            Duration::ZERO
        } else if idle < HOT {
            HOT_SLEEP.min(self.cap)
        } else {
            let shift = self.n.min(10);
            self.n += 1;
            Duration::from_micros(100u64 << shift).min(self.cap)
        }
    }

    /// Waits for the next delay.
    fn sleep(&mut self) {
        let d = self.next();
        if d.is_zero() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(d);
        }
    }

    /// Waits for the next delay, or until one of `fds` is ready once the
    /// delay has reached a millisecond.
    fn wait(&mut self, fds: &mut [libc::pollfd]) {
        let d = self.next();
        if d >= Duration::from_millis(1) && !fds.is_empty() {
            let _ = sys::poll(fds, d.as_millis().min(1000) as i32);
        } else if d.is_zero() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(d);
        }
    }
}

/// Writes what the socket takes of `out[*pos..]`. Returns true if it is all
/// out. A failed socket (its peer is gone) discards the bytes.
fn flush(sock: &OwnedFd, out: &mut Vec<u8>, pos: &mut usize) -> bool {
    while *pos < out.len() {
        match sys::send(sock.as_raw_fd(), &out[*pos..]) {
            Ok(n) => *pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => {
                *pos = out.len();
            }
        }
    }
    out.clear();
    *pos = 0;
    if out.capacity() > (8 << 20) {
        *out = Vec::new();
    }
    true
}

/// Queues bytes for a socket, writing at once what it takes.
fn write_or_queue(sock: &OwnedFd, out: &mut Vec<u8>, pos: &mut usize, bytes: &[u8]) {
    let mut from = 0;
    if *pos == out.len() {
        while from < bytes.len() {
            match sys::send(sock.as_raw_fd(), &bytes[from..]) {
                Ok(n) => from += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // The peer is gone: nobody reads these bytes.
                Err(_) => return,
            }
        }
    }
    out.extend_from_slice(&bytes[from..]);
}

/// Reads what a non-blocking socket has (up to a bound per call). Returns
/// (bytes read, end-of-file).
fn read_some(sock: &OwnedFd, buf: &mut Vec<u8>, fds: &mut VecDeque<OwnedFd>) -> (usize, bool) {
    let mut got = 0;
    while got < 4 * CHUNK {
        let need = wire::missing(buf);
        let want = if need > 0 {
            usize::try_from(need).unwrap_or(usize::MAX).min(CHUNK)
        } else {
            READ_CHUNK
        };
        match sys::recv_append(sock.as_raw_fd(), buf, want, fds) {
            Ok(0) => return (got, true),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

fn pollfd(sock: &OwnedFd, read: bool, write: bool) -> libc::pollfd {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// The 8-byte length at the start of a frame body that names a block.
fn block_len(body: &[u8]) -> Option<usize> {
    body.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
}

/// Maps a block that came with a frame, checking that it holds `len` bytes.
fn map_block(fd: Option<OwnedFd>, len: usize) -> Result<Block, String> {
    let fd = fd.ok_or("its block did not arrive")?;
    let b = Block::from_fd(fd).map_err(|e| format!("its block could not be mapped: {e}"))?;
    if b.capacity() < len {
        return Err("its block is shorter than its body".into());
    }
    Ok(b)
}

// ---------------------------------------------------------------------------
// Rank 0

/// A worker on a rank, as rank 0's thread sees it.
struct Session {
    slot: usize,
    /// Our end of the worker's stream; the supervisor has the other.
    sock: OwnedFd,
    /// Bytes from the supervisor (tasks), not yet whole frames.
    inbuf: Vec<u8>,
    in_fds: VecDeque<OwnedFd>,
    /// The supervisor closed its side (the worker retires).
    eof: bool,
    /// Bytes from the rank (results), not yet taken by the socket.
    out: Vec<u8>,
    out_pos: usize,
    /// The rank said its worker ended, with this exit code.
    ended: Option<i32>,
}

enum RankState {
    Free,
    Busy(Box<Session>),
    /// Its worker was abandoned (KILL): it serves no more tasks.
    Lost,
}

struct Root<'c> {
    comm: &'c SimpleCommunicator,
    server: OwnedFd,
    words: Arc<SharedWords>,
    /// Indexed by rank; rank 0 (this one) is never a worker.
    ranks: Vec<RankState>,
    inbox: Inbox,
    /// Reused buffer for outgoing stream bytes.
    msg: Vec<u8>,
}

impl<'c> Root<'c> {
    fn new(comm: &'c SimpleCommunicator, setup: Setup) -> Self {
        let _ = sys::set_nonblocking(&setup.sock);
        let size = comm.size() as usize;
        let mut ranks = Vec::with_capacity(size);
        ranks.push(RankState::Lost);
        ranks.extend((1..size).map(|_| RankState::Free));
        Root {
            comm,
            server: setup.sock,
            words: setup.words,
            ranks,
            inbox: VecDeque::new(),
            msg: vec![M_DATA],
        }
    }

    fn run(mut self) {
        let mut idle = Backoff::new(MAX_IDLE);
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        // The rank of each worker socket in `pfds` (after the server's).
        let mut who: Vec<usize> = Vec::new();
        loop {
            // One poll tells which sockets to read: no syscall per idle rank.
            pfds.clear();
            who.clear();
            pfds.push(pollfd(&self.server, true, false));
            for (r, st) in self.ranks.iter().enumerate() {
                if let RankState::Busy(s) = st {
                    let (read, write) = (!s.eof, s.out_pos < s.out.len());
                    // A socket polled for nothing would still wake the poll
                    // on a hang-up, again and again.
                    if read || write {
                        pfds.push(pollfd(&s.sock, read, write));
                        who.push(r);
                    }
                }
            }
            let _ = sys::poll(&mut pfds, 0);
            let mut active = false;
            if pfds[0].revents != 0 {
                match self.server_messages() {
                    None => break,
                    Some(a) => active |= a,
                }
            }
            for (p, &r) in pfds[1..].iter().zip(&who) {
                if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    active |= self.forward_tasks(r);
                }
            }
            active |= pump(self.comm, &mut self.inbox);
            while let Some((from, msg)) = self.inbox.pop_front() {
                self.on_message(from, msg);
                active = true;
            }
            for r in 1..self.ranks.len() {
                active |= self.flush_results(r);
            }
            if active {
                idle.reset();
            } else {
                idle.wait(&mut pfds);
            }
        }
        for st in self.ranks.iter_mut() {
            if matches!(st, RankState::Busy(_)) {
                *st = RankState::Lost;
            }
        }
        stop_ranks(self.comm, &mut self.inbox);
    }

    fn reply(&self, kind: u32, slot: u32, a: u64, b: u64, fds: &[i32]) {
        let m = Msg { kind, slot, a, b };
        // The socket is non-blocking; when it is full, wait for the
        // supervisor to drain it (it never waits on this thread: its own
        // requests queue). Another failure means the supervisor is gone;
        // its end-of-file follows.
        loop {
            match sys::send_with_fds(self.server.as_raw_fd(), &m.to_bytes(), fds) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                _ => break,
            }
        }
    }

    /// Handles the supervisor's requests. None: it closed the socket.
    fn server_messages(&mut self) -> Option<bool> {
        let mut buf = [0u8; 64];
        let mut active = false;
        loop {
            let n = match sys::recv_with_fds(self.server.as_raw_fd(), &mut buf) {
                Ok((0, _)) => return None,
                Ok((n, _)) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(active),
                Err(_) => return None,
            };
            active = true;
            let Some(m) = Msg::from_bytes(&buf[..n]) else {
                continue;
            };
            match m.kind {
                server::SPAWN => self.spawn(m.slot),
                // A KILL for one task (a cancel) would cost the whole rank:
                // refuse it, and the task runs to its end (its result is
                // dropped). A KILL for whatever the rank runs (a timeout)
                // abandons the rank.
                server::KILL if m.b != 0 => {
                    self.reply(server::KILL_REFUSED, m.slot, m.a, m.b, &[]);
                }
                server::KILL => self.kill(m.a),
                _ => {}
            }
        }
    }

    fn spawn(&mut self, slot: u32) {
        let Some(rank) = (1..self.ranks.len()).find(|&r| matches!(self.ranks[r], RankState::Free))
        else {
            log::warn!("procpool: no MPI rank is free to start a worker on");
            self.reply(server::SPAWN_FAILED, slot, libc::EAGAIN as u64, 0, &[]);
            return;
        };
        let pair = sys::stream_pair().and_then(|(mine, theirs)| {
            sys::set_nonblocking(&mine)?;
            sys::set_socket_buffers(&mine, SOCK_BUF);
            sys::set_socket_buffers(&theirs, SOCK_BUF);
            Ok((mine, theirs))
        });
        let (mine, theirs) = match pair {
            Ok(p) => p,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0) as u64;
                self.reply(server::SPAWN_FAILED, slot, errno, 0, &[]);
                return;
            }
        };
        self.words.status(slot as usize).reset();
        send(self.comm, &mut self.inbox, rank, &[M_START]);
        self.ranks[rank] = RankState::Busy(Box::new(Session {
            slot: slot as usize,
            sock: mine,
            inbuf: Vec::new(),
            in_fds: VecDeque::new(),
            eof: false,
            out: Vec::new(),
            out_pos: 0,
            ended: None,
        }));
        self.reply(server::SPAWNED, slot, rank as u64, 0, &[theirs.as_raw_fd()]);
    }

    /// A remote rank cannot be killed: abandon its worker instead.
    fn kill(&mut self, rank: u64) {
        let Ok(rank) = usize::try_from(rank) else {
            return;
        };
        let Some(RankState::Busy(s)) = self.ranks.get_mut(rank) else {
            return;
        };
        if s.ended.is_some() {
            // It ended by itself; its exit report follows.
            return;
        }
        // The tasks it holds count as started: the one that timed out gets
        // its Timeout, the others go back to the queue.
        self.words
            .status(s.slot)
            .started
            .store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
        flush(&s.sock, &mut s.out, &mut s.out_pos);
        self.ranks[rank] = RankState::Lost;
        send(self.comm, &mut self.inbox, rank, &[M_ABANDON]);
        log::warn!(
            "procpool: MPI rank {rank} abandoned its task (a timeout); \
             it serves no more tasks in this run"
        );
        self.reply(server::EXITED, 0, rank as u64, libc::SIGKILL as u64, &[]);
    }

    /// Reads tasks from the supervisor and sends them on to the rank, with
    /// the contents of input blocks inlined.
    fn forward_tasks(&mut self, rank: usize) -> bool {
        let RankState::Busy(s) = &mut self.ranks[rank] else {
            return false;
        };
        if s.eof {
            return false;
        }
        let (got, eof) = read_some(&s.sock, &mut s.inbuf, &mut s.in_fds);
        let mut pos = 0;
        while let Some((h, total)) = wire::complete(&s.inbuf[pos..]) {
            let frame = &s.inbuf[pos..pos + total];
            if h.kind == wire::TASK {
                // The remote worker cannot write the shared word: a task
                // handed to its rank counts as started (so its timeout runs,
                // and it is not silently run again if the rank is lost).
                let status = self.words.status(s.slot);
                status
                    .start_ns
                    .store(sys::monotonic_ns(), std::sync::atomic::Ordering::SeqCst);
                status
                    .started
                    .store(h.seq, std::sync::atomic::Ordering::SeqCst);
            }
            if h.kind == wire::TASK && h.status & wire::IN_BLOCK != 0 {
                let len = block_len(&frame[HDR..]).unwrap_or(0);
                match map_block(s.in_fds.pop_front(), len) {
                    Ok(block) => {
                        let mut nh = h;
                        // Inline now; other flags (INLINE_SHARED) stay.
                        nh.status = h.status & !(wire::IN_BLOCK | wire::KEEP_INPUT);
                        nh.len = len as u64;
                        nh.begin(&mut self.msg);
                        self.msg.extend_from_slice(block.bytes(len));
                    }
                    Err(e) => {
                        // The worker answers this frame (it has no block
                        // either) with a decode error.
                        log::warn!("procpool: a task for MPI rank {rank} is lost: {e}");
                        self.msg.extend_from_slice(frame);
                    }
                }
            } else {
                self.msg.extend_from_slice(frame);
            }
            pos += total;
            if self.msg.len() >= CHUNK {
                send_data(self.comm, &mut self.inbox, rank, &mut self.msg);
            }
        }
        s.inbuf.drain(..pos);
        send_data(self.comm, &mut self.inbox, rank, &mut self.msg);
        if eof {
            s.eof = true;
            send(self.comm, &mut self.inbox, rank, &[M_EOF]);
        }
        got > 0 || eof
    }

    fn on_message(&mut self, from: usize, msg: Vec<u8>) {
        let Some(RankState::Busy(s)) = self.ranks.get_mut(from) else {
            // An abandoned worker's late output, or a stray message.
            return;
        };
        match msg.first() {
            Some(&M_DATA) => write_or_queue(&s.sock, &mut s.out, &mut s.out_pos, &msg[1..]),
            Some(&M_ENDED) => {
                let code = msg
                    .get(1..5)
                    .map_or(1, |b| i32::from_le_bytes(b.try_into().unwrap()));
                s.ended = Some(code);
            }
            _ => {}
        }
    }

    /// Writes results to the supervisor. Reports the exit of a worker that
    /// ended once all its output is in the socket. Returns whether anything
    /// happened.
    fn flush_results(&mut self, rank: usize) -> bool {
        let RankState::Busy(s) = &mut self.ranks[rank] else {
            return false;
        };
        let had = s.out_pos < s.out.len();
        let all_out = flush(&s.sock, &mut s.out, &mut s.out_pos);
        let Some(code) = s.ended else {
            return had;
        };
        if !all_out {
            return had;
        }
        // Closing our end after the last byte: the supervisor reads it all,
        // then end-of-file.
        self.ranks[rank] = RankState::Free;
        let status = ((code & 0xff) << 8) as u32 as u64;
        self.reply(server::EXITED, 0, rank as u64, status, &[]);
        true
    }
}

/// Tells every worker rank to stop and waits for each to acknowledge, so
/// that MPI can be finalised.
fn stop_ranks(comm: &SimpleCommunicator, inbox: &mut Inbox) {
    let size = comm.size() as usize;
    for r in 1..size {
        send(comm, inbox, r, &[M_STOP]);
    }
    let mut acked = vec![false; size];
    acked[0] = true;
    let deadline = Instant::now() + STOP_BOUND;
    let mut idle = Backoff::new(MAX_IDLE);
    loop {
        while let Some((from, msg)) = inbox.pop_front() {
            if msg.first() == Some(&M_STOP_ACK) {
                if let Some(a) = acked.get_mut(from) {
                    *a = true;
                }
            }
        }
        if acked.iter().all(|&a| a) {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<usize> = (0..size).filter(|&r| !acked[r]).collect();
            eprintln!(
                "procpool: MPI ranks {missing:?} did not stop within {STOP_BOUND:?}; aborting the MPI job"
            );
            comm.abort(70);
        }
        if pump(comm, inbox) {
            idle.reset();
        } else {
            idle.sleep();
        }
    }
}

// ---------------------------------------------------------------------------
// Ranks >= 1

/// The worker running on this rank.
struct Local {
    /// Our end of its stream.
    sock: OwnedFd,
    thread: std::thread::JoinHandle<i32>,
    /// Tasks from rank 0 not yet taken by the socket.
    out: Vec<u8>,
    out_pos: usize,
    /// Rank 0 said end-of-file: shut our write side once `out` is empty.
    eof: bool,
    shut: bool,
    /// Results, not yet whole frames.
    inbuf: Vec<u8>,
    in_fds: VecDeque<OwnedFd>,
}

struct WorkerRank<'c> {
    comm: &'c SimpleCommunicator,
    init: Option<Init>,
    local: Option<Local>,
    /// Its worker was abandoned: it only waits for STOP.
    lost: bool,
    inbox: Inbox,
    msg: Vec<u8>,
}

impl<'c> WorkerRank<'c> {
    fn new(comm: &'c SimpleCommunicator, init: Option<Init>) -> Self {
        WorkerRank {
            comm,
            init,
            local: None,
            lost: false,
            inbox: VecDeque::new(),
            msg: vec![M_DATA],
        }
    }

    fn run(mut self) {
        let mut idle = Backoff::new(MAX_IDLE);
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        'outer: loop {
            let mut active = pump(self.comm, &mut self.inbox);
            while let Some((from, msg)) = self.inbox.pop_front() {
                if from != 0 {
                    continue;
                }
                active = true;
                match msg.first() {
                    Some(&M_STOP) => break 'outer,
                    Some(&M_START) => self.start(),
                    Some(&M_DATA) => {
                        if let Some(l) = &mut self.local {
                            write_or_queue(&l.sock, &mut l.out, &mut l.out_pos, &msg[1..]);
                        }
                    }
                    Some(&M_EOF) => {
                        if let Some(l) = &mut self.local {
                            l.eof = true;
                        }
                    }
                    Some(&M_ABANDON) => {
                        // Closing our end makes the worker thread stop at its
                        // next read or write; it is not waited for.
                        self.local = None;
                        self.lost = true;
                    }
                    _ => {}
                }
            }
            active |= self.serve_local();
            if active {
                idle.reset();
            } else {
                pfds.clear();
                if let Some(l) = &self.local {
                    pfds.push(pollfd(&l.sock, true, l.out_pos < l.out.len()));
                }
                idle.wait(&mut pfds);
            }
        }
        // STOP: close the worker's stream and give its thread a moment to
        // finish. A thread still busy with a task ends with the process.
        if let Some(l) = self.local.take() {
            drop(l.sock);
            let deadline = Instant::now() + JOIN_BOUND;
            while !l.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        send(self.comm, &mut self.inbox, 0, &[M_STOP_ACK]);
    }

    fn start(&mut self) {
        if self.lost || self.local.is_some() {
            return;
        }
        match start_worker(self.init.clone()) {
            Ok(l) => self.local = Some(l),
            Err(e) => {
                log::error!("procpool: MPI rank could not start its worker: {e}");
                send(self.comm, &mut self.inbox, 0, &ended(2));
            }
        }
    }

    /// Moves tasks into the worker's socket and results out of it. Returns
    /// whether anything happened.
    fn serve_local(&mut self) -> bool {
        let Some(l) = &mut self.local else {
            return false;
        };
        let had = l.out_pos < l.out.len();
        if flush(&l.sock, &mut l.out, &mut l.out_pos) && l.eof && !l.shut {
            sys::shutdown_write(&l.sock);
            l.shut = true;
        }
        let (got, eof) = read_some(&l.sock, &mut l.inbuf, &mut l.in_fds);
        let mut pos = 0;
        while let Some((h, total)) = wire::complete(&l.inbuf[pos..]) {
            let frame = &l.inbuf[pos..pos + total];
            if h.kind == wire::DONE && (h.a == wire::OUT_NEW_BLOCK || h.a == wire::OUT_SAME_BLOCK) {
                inline_result(h, &frame[HDR..], &mut l.in_fds, &mut self.msg);
            } else {
                self.msg.extend_from_slice(frame);
            }
            pos += total;
            if self.msg.len() >= CHUNK {
                send_data(self.comm, &mut self.inbox, 0, &mut self.msg);
            }
        }
        l.inbuf.drain(..pos);
        send_data(self.comm, &mut self.inbox, 0, &mut self.msg);
        if eof {
            // The worker closed its end: serve() returned.
            let l = self.local.take().expect("checked above");
            drop(l.sock);
            let code = l.thread.join().unwrap_or(101);
            send(self.comm, &mut self.inbox, 0, &ended(code));
        }
        had || got > 0 || eof
    }
}

fn ended(code: i32) -> [u8; 5] {
    let mut m = [M_ENDED, 0, 0, 0, 0];
    m[1..].copy_from_slice(&code.to_le_bytes());
    m
}

/// Starts a worker thread on this rank: the worker loop of a forked worker,
/// over a stream pair whose other end this rank bridges to rank 0.
fn start_worker(init: Option<Init>) -> std::io::Result<Local> {
    let (mine, theirs) = sys::stream_pair()?;
    sys::set_nonblocking(&mine)?;
    sys::set_socket_buffers(&mine, SOCK_BUF);
    sys::set_socket_buffers(&theirs, SOCK_BUF);
    let thread = std::thread::Builder::new()
        .name("procpool-worker".into())
        .spawn(move || {
            // This rank's own status words (rank 0 keeps its own copy).
            let Ok(words) = SharedWords::new(STATUS_WORDS) else {
                return 1;
            };
            // Tasks run under catch_unwind already; this catches a panic of
            // the loop itself, which must not unwind into MPI.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                worker::serve(theirs, words.status(0), init.as_ref(), None)
            }));
            match r {
                Ok(Ok(())) | Ok(Err(Stop::Gone)) => 0,
                Ok(Err(Stop::InitFailed)) => 1,
                // No sandbox on an MPI rank, so no limit to stop at.
                Ok(Err(Stop::Limit)) => 3,
                Err(_) => 101,
            }
        })?;
    Ok(Local {
        sock: mine,
        thread,
        out: Vec::new(),
        out_pos: 0,
        eof: false,
        shut: false,
        inbuf: Vec::new(),
        in_fds: VecDeque::new(),
    })
}

/// Appends a DONE frame whose output was in a block as a frame with the
/// output inline (or, if the block cannot be read, an encode error).
fn inline_result(h: Header, body: &[u8], fds: &mut VecDeque<OwnedFd>, msg: &mut Vec<u8>) {
    let len = block_len(body).unwrap_or(0);
    // This rank never sends an input block to its worker, so the output can
    // only be in a new block (OUT_SAME_BLOCK would be a bug).
    let block = if h.a == wire::OUT_NEW_BLOCK {
        map_block(fds.pop_front(), len)
    } else {
        Err("it named an input block that the worker was not given".into())
    };
    let mut nh = Header::new(wire::DONE, h.seq, 0, h.b);
    match block {
        Ok(b) => {
            nh.len = len as u64;
            nh.status = h.status;
            nh.begin(msg);
            msg.extend_from_slice(b.bytes(len));
        }
        Err(e) => {
            let at = nh.begin(msg);
            let _ =
                crate::proto::codec::encode_into(&format!("a result could not be read: {e}"), msg);
            wire::finish(msg, at, status::ENCODE);
        }
    }
}
