//! Rank 0's "procpool-mpi" thread: the far side of the engine's seam.
//!
//! The engine sends [`Command`]s (start a worker in a slot, kill one, a
//! task's timeout) on a channel and wakes this thread through an eventfd; this thread answers
//! with the engine's typed events (`engine::seam::Event`) on another
//! channel, and wakes the engine through a second eventfd.
//! - Start(slot): the thread picks the worker rank that hosts the fewest
//!   workers (each hosts at most its share, `workers_per_rank`) and tells it
//!   to START a worker for the slot, with where to connect (`tcp`). The
//!   rank connects for that slot with the right token, and the thread
//!   keeps the stream. The rank's STARTED (the worker's pid on that host,
//!   and whether the worker took the stream) decides what the engine gets
//!   (`Started`): that TCP stream, over which tasks and results then pass
//!   with no hop through this thread; or, if the rank could not connect,
//!   the other end of a stream socket pair made at Start, between whose
//!   first end and MPI messages to and from the rank this thread moves the
//!   bytes while the worker runs.
//! - Kill, a task's timeout, and a skip (a cancel, through [`Handed`]):
//!   sent on to the rank, whose fork server kills the worker (for one
//!   task: only while it runs that task; else `KillRefused`) and which
//!   times and skips the worker's tasks.
//! - ENDED from the rank (a real wait status, the task the worker had
//!   started by its own status words, and the task it was killed for, if a
//!   timeout): once the worker's last output is in the engine's socket, the
//!   thread reports `TimedOut` if so, then `Ended`.
//! - A rank lost as a whole: silent for the rank timeout (`peers`), a
//!   message to it that does not go out within it, or one of its workers'
//!   TCP streams shut with no ENDED from the rank within [`SHUT_GRACE`]
//!   (its process died: the kernel closed its sockets). The thread
//!   reports `RankLost` (the engine shrinks to what the other ranks can
//!   host), then `Ended` with `End::RankLost` for each of the rank's
//!   workers, whose tasks the engine fails or runs again; it starts no
//!   worker there again, drops whatever the rank still sends (it no longer
//!   probes it, and its streams are closed), and sends it a FENCE.
//! - The engine drops its command channel (the pool is finished): the
//!   thread tells every live rank to STOP, waits (at most the rank
//!   timeout) for each to acknowledge, and returns; MPI is finalised after
//!   it only if no rank was lost.

use super::tcp::Listener;
use super::transport::*;
use crate::engine::seam::{End, Event, Progress};
use crate::proto::conn::{Conn, Flushed};
use crate::proto::wire::Frame;
use crate::sys::{self, PollSet};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// What the engine asks of rank 0's thread.
pub(super) enum Command {
    Start(usize),
    Kill {
        slot: usize,
        task: u64,
    },
    /// Task `task` of the worker in `slot` may run `ns` nanoseconds.
    Timeout {
        slot: usize,
        task: u64,
        ns: u64,
    },
}

/// How far each slot's worker got, as rank 0 knows it: nothing while it
/// runs (its status words are on its rank's host), then the worker's own
/// word when its rank reports its end. So while it runs, none of its tasks
/// counts as started and any may be running: a cancel does both what it
/// does for a task not started (the skip word, which this thread sends on
/// to the rank, which keeps a list of them and moves the worker's word on
/// as the worker passes each) and for one that runs (a kill, which the
/// rank's fork server carries out only if the worker runs that very
/// task).
pub(super) struct Handed {
    /// Per slot: the worker's started word, once it ended.
    seq: Vec<AtomicU64>,
    /// Whether the slot's worker runs (its tasks are out of sight).
    blind: Vec<AtomicBool>,
    /// Skips for running workers, for this thread to send on to their
    /// ranks.
    skips: Mutex<Vec<(usize, u64)>>,
}

impl Handed {
    pub(super) fn new(slots: usize) -> Handed {
        Handed {
            seq: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            blind: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            skips: Mutex::new(Vec::new()),
        }
    }

    fn reset(&self, slot: usize) {
        self.seq[slot].store(0, Ordering::SeqCst);
        self.blind[slot].store(false, Ordering::SeqCst);
    }

    /// The worker is up: what it runs is out of sight until it ends.
    fn started_up(&self, slot: usize) {
        self.blind[slot].store(true, Ordering::SeqCst);
    }

    /// The skips set since the last call.
    fn take_skips(&self) -> Vec<(usize, u64)> {
        std::mem::take(&mut *self.skips.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The worker's own word, from its rank, once it ended.
    fn ended_at(&self, slot: usize, started: u64) {
        self.seq[slot].store(started, Ordering::SeqCst);
        self.blind[slot].store(false, Ordering::SeqCst);
    }
}

impl Progress for Handed {
    fn started(&self, slot: usize) -> u64 {
        self.seq[slot].load(Ordering::SeqCst)
    }
    /// Not known here (the engine keeps no deadline of an MPI pool's
    /// tasks: their ranks do).
    fn started_at_ns(&self, _slot: usize) -> u64 {
        0
    }
    fn running(&self, slot: usize, seq: u64) -> bool {
        self.blind[slot].load(Ordering::SeqCst) || self.started(slot) == seq
    }
    /// Always free: the rank keeps a list.
    fn skip(&self, _slot: usize) -> u64 {
        0
    }
    fn set_skip(&self, slot: usize, seq: u64) {
        if self.blind[slot].load(Ordering::SeqCst) {
            let mut skips = self.skips.lock().unwrap_or_else(|e| e.into_inner());
            skips.push((slot, seq));
        }
    }
    fn item_cpu(&self, _slot: usize) -> u64 {
        0
    }
    fn died_of(&self, _slot: usize) -> u64 {
        0
    }
}

/// How long rank 0 waits, after a rank said a worker ended, for the rank to
/// shut the worker's TCP stream (after its last bytes) before it reports
/// the end anyway.
const LAST_BYTES_WAIT: Duration = Duration::from_secs(60);

/// How long after one of a rank's workers' TCP streams shut, with no ENDED
/// for it, the rank counts as lost: a live rank sends the ENDED before it
/// shuts the stream, so only a rank whose process died (or is dying) takes
/// longer.
const SHUT_GRACE: Duration = Duration::from_millis(500);

/// Rank 0's ends of the seam.
pub(super) struct Seam {
    pub(super) commands: mpsc::Receiver<Command>,
    /// Signalled by the engine after each command.
    pub(super) wake_me: Arc<OwnedFd>,
    pub(super) events: mpsc::Sender<Event>,
    /// Signalled after each event (and when this thread ends).
    pub(super) wake_engine: Arc<OwnedFd>,
    pub(super) handed: Arc<Handed>,
}

impl Drop for Seam {
    fn drop(&mut self) {
        // The engine sees the channel closed: the backend is gone.
        sys::eventfd_signal(self.wake_engine.as_raw_fd());
    }
}

/// A worker on a rank, as rank 0's thread sees it.
struct Session {
    rank: usize,
    /// Our end of the worker's stream (the engine has the other): tasks in,
    /// results out.
    conn: Conn,
    /// The engine's end, until the rank says the worker is up.
    theirs: Option<OwnedFd>,
    /// The engine closed its side (the worker retires), or has the TCP
    /// stream itself: nothing to read from `conn`.
    eof: bool,
    /// When the engine has the worker's TCP stream (and no bytes pass this
    /// thread), a duplicate of it, to see the rank shut it after the
    /// worker's last bytes (it is never read here).
    stream: Option<OwnedFd>,
    /// The TCP stream the rank connected for the worker, and its
    /// duplicate, until the rank's STARTED says whether the worker took it.
    tcp: Option<(OwnedFd, OwnedFd)>,
    /// The rank said the worker ended: its wait status, the task it was
    /// killed for running past its timeout (0: none), and when it said so.
    ended: Option<(i32, u64, Instant)>,
    /// When its TCP stream was seen shut before the rank said it ended.
    shut_early: Option<Instant>,
}

pub(super) struct Root<'c> {
    link: Link<'c>,
    seam: Seam,
    /// How many workers each rank may host, and hosts now (rank 0: none).
    caps: Vec<usize>,
    hosted: Vec<usize>,
    sessions: HashMap<usize, Session>,
    /// Ranks to count as lost, and why (found where a session is borrowed).
    doomed: Vec<(usize, String)>,
    /// Reused buffer for outgoing stream bytes.
    msg: Vec<u8>,
    /// Where ranks connect the workers' streams (`None`: they go over MPI).
    listener: Option<Listener>,
}

impl<'c> Root<'c> {
    pub(super) fn new(link: Link<'c>, seam: Seam, caps: Vec<usize>) -> Self {
        let hosted = vec![0; caps.len()];
        let listener = if std::env::var("PROCPOOL_MPI_STREAMS").is_ok_and(|v| v == "mpi") {
            None
        } else {
            Listener::open()
                .inspect_err(|e| {
                    eprintln!(
                        "procpool: rank 0 cannot listen for the workers' streams ({e}); \
                         they go over MPI"
                    )
                })
                .ok()
        };
        Root {
            listener,
            link,
            seam,
            caps,
            hosted,
            sessions: HashMap::new(),
            doomed: Vec::new(),
            msg: Vec::new(),
        }
    }

    /// Serves the engine until it closes; returns whether MPI may be
    /// finalised (no rank was lost).
    pub(super) fn run(mut self) -> bool {
        let mut idle = Backoff::new(MAX_IDLE);
        let mut polled = PollSet::default();
        // The slot of each worker socket in `polled` (after the wake fd).
        let mut who: Vec<usize> = Vec::new();
        loop {
            // One poll tells which sockets to read: no syscall per idle worker.
            polled.clear();
            who.clear();
            polled.push(self.seam.wake_me.as_raw_fd(), true, false);
            let mut relaying = false;
            for (&slot, s) in self.sessions.iter() {
                relaying |= s.stream.is_none() && s.theirs.is_none();
                let (read, write) = (!s.eof && s.theirs.is_none(), s.conn.has_pending());
                // A socket polled for nothing would still wake the poll on a
                // hang-up, again and again.
                if read || write {
                    polled.push(s.conn.raw(), read, write);
                    who.push(slot);
                }
            }
            // A stream's shut: after the rank's ENDED, its last bytes are
            // in; before it, the rank may be gone.
            let first_shut = polled.len();
            let mut shut_who = Vec::new();
            for (&slot, s) in self.sessions.iter() {
                if let Some(fd) = s.stream.as_ref().filter(|_| s.shut_early.is_none()) {
                    polled.push_peer_shut(fd.as_raw_fd());
                    shut_who.push(slot);
                }
            }
            let first_tcp = polled.len();
            if let Some(l) = &self.listener {
                l.watch(&mut polled);
            }
            let _ = polled.poll(0);
            if polled.ready(0) {
                sys::drain(self.seam.wake_me.as_raw_fd());
            }
            for (k, slot) in shut_who.iter().enumerate() {
                if polled.ready(first_shut + k)
                    && let Some(s) = self.sessions.get_mut(slot)
                    && s.ended.is_none()
                {
                    s.shut_early = Some(Instant::now());
                }
            }
            let Some(mut active) = self.commands() else {
                break;
            };
            for (k, &slot) in who.iter().enumerate() {
                if polled.readable(k + 1) {
                    active |= self.forward_tasks(slot);
                }
            }
            let waiting = self.listener.as_ref().is_some_and(Listener::waiting);
            if waiting || (first_tcp..polled.len()).any(|i| polled.ready(i)) {
                active |= self.accept_streams();
            }
            active |= self.receive();
            active |= self.watch();
            who.clear();
            who.extend(self.sessions.keys());
            for &slot in who.iter() {
                active |= self.flush_results(slot);
            }
            if active {
                idle.reset();
            } else if relaying {
                idle.wait(&mut polled);
            } else {
                // Only control messages come over MPI: no need to poll it
                // eagerly. Commands and connections wake the poll.
                let _ = polled.poll(1);
            }
        }
        stop_ranks(&mut self.link)
    }

    fn report(&self, e: Event) {
        let _ = self.seam.events.send(e);
        sys::eventfd_signal(self.seam.wake_engine.as_raw_fd());
    }

    /// Sends a control message to a rank, without waiting (`watch`
    /// dooms a rank that does not take one within the rank timeout).
    fn tell(&mut self, rank: usize, msg: &[u8]) {
        self.link.post(rank, msg);
    }

    /// Carries out the engine's commands. `None`: the engine closed its
    /// channel (the pool is finished).
    fn commands(&mut self) -> Option<bool> {
        let mut active = false;
        // Skips first: a kill for the same task may follow, and the rank
        // should have the skip by then.
        for (slot, task) in self.seam.handed.take_skips() {
            if let Some(rank) = self.sessions.get(&slot).map(|s| s.rank) {
                let mut m = header(M_SKIP, slot);
                m.extend_from_slice(&task.to_le_bytes());
                self.tell(rank, &m);
                active = true;
            }
        }
        loop {
            match self.seam.commands.try_recv() {
                Ok(Command::Start(slot)) => self.spawn(slot),
                Ok(Command::Kill { slot, task }) => {
                    if let Some(rank) = self.sessions.get(&slot).map(|s| s.rank) {
                        let mut m = header(M_KILL, slot);
                        m.extend_from_slice(&task.to_le_bytes());
                        self.tell(rank, &m);
                    }
                }
                Ok(Command::Timeout { slot, task, ns }) => {
                    // Sent before the task's own bytes, if they go over MPI
                    // too (this loop forwards tasks after the commands).
                    if let Some(rank) = self.sessions.get(&slot).map(|s| s.rank) {
                        let mut m = header(M_TIMEOUT, slot);
                        m.extend_from_slice(&task.to_le_bytes());
                        m.extend_from_slice(&ns.to_le_bytes());
                        self.tell(rank, &m);
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return Some(active),
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
            active = true;
        }
    }

    /// Receives what the ranks sent and handles it.
    fn receive(&mut self) -> bool {
        let mut active = self.link.pump();
        while let Some((from, msg)) = self.link.inbox.pop_front() {
            // A rank counted as lost is fenced off: nothing it sends counts.
            if self.link.peers.is_live(from) {
                self.on_message(from, msg);
            }
            active = true;
        }
        active
    }

    /// Says "I live" to the ranks when it is time, and counts as lost a
    /// rank that is silent past the rank timeout or whose worker's stream
    /// shut with no word of the worker's end. Returns whether one was lost.
    fn watch(&mut self) -> bool {
        self.link.beat();
        for r in self.link.take_stuck() {
            let why = format!("it took no message for {:?}", self.link.peers.timeout());
            self.doomed.push((r, why));
        }
        if let Some(r) = self.link.peers.silent() {
            let why = format!("silent for {:?}", self.link.peers.timeout());
            self.doomed.push((r, why));
        }
        for s in self.sessions.values() {
            if s.ended.is_none() && s.shut_early.is_some_and(|t| t.elapsed() > SHUT_GRACE) {
                let why = "a worker's stream closed and the rank said nothing".to_string();
                self.doomed.push((s.rank, why));
            }
        }
        let doomed = std::mem::take(&mut self.doomed);
        let any = !doomed.is_empty();
        for (rank, why) in doomed {
            self.lose(rank, why);
        }
        any
    }

    /// Counts `rank` as lost: the engine hears of it and of its workers'
    /// ends, nothing is started there again, and the rank is fenced off.
    fn lose(&mut self, rank: usize, why: String) {
        if !self.link.lose(rank) {
            return;
        }
        let host = self.link.peers.host(rank);
        eprintln!("procpool: MPI rank {rank} on {host} is lost ({why})");
        self.caps[rank] = 0;
        let capacity = self.caps.iter().sum();
        self.report(Event::RankLost {
            rank,
            host,
            why,
            capacity,
        });
        let slots: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.rank == rank)
            .map(|(&slot, _)| slot)
            .collect();
        for slot in slots {
            let s = self.sessions.remove(&slot);
            self.hosted[rank] -= 1;
            if s.is_some_and(|s| s.theirs.is_some()) {
                let cause = format!("MPI rank {rank} on {host} was lost before the worker started");
                self.report(Event::StartFailed { slot, cause });
            } else {
                let end = End::RankLost { rank, host };
                self.report(Event::Ended { slot, end });
            }
        }
        // If it lives and hears this, it ends its workers and exits.
        self.link.post_to_lost(rank, &[M_FENCE]);
    }

    fn spawn(&mut self, slot: usize) {
        let rank = (1..self.caps.len())
            .filter(|&r| self.hosted[r] < self.caps[r])
            .min_by_key(|&r| self.hosted[r]);
        let Some(rank) = rank else {
            self.report(Event::StartFailed {
                slot,
                cause: "every worker rank hosts as many workers as it may (workers_per_rank)"
                    .into(),
            });
            return;
        };
        let pair = sys::stream_pair().inspect(|(mine, theirs)| {
            sys::set_socket_buffers(mine, SOCK_BUF);
            sys::set_socket_buffers(theirs, SOCK_BUF);
        });
        let (mine, theirs) = match pair {
            Ok(p) => p,
            Err(e) => {
                let cause = format!("could not make a socket pair for an MPI worker: {e}");
                self.report(Event::StartFailed { slot, cause });
                return;
            }
        };
        self.seam.handed.reset(slot);
        self.hosted[rank] += 1;
        self.sessions.insert(
            slot,
            Session {
                rank,
                conn: Conn::new(mine, Vec::new()),
                theirs: Some(theirs),
                eof: false,
                stream: None,
                tcp: None,
                ended: None,
                shut_early: None,
            },
        );
        let mut m = header(M_START, slot);
        if let Some(l) = &self.listener {
            l.dial().encode(&mut m);
        }
        self.tell(rank, &m);
    }

    /// Takes the TCP streams that ranks connected for their workers, each
    /// kept until its rank's STARTED. Returns whether one came.
    fn accept_streams(&mut self) -> bool {
        let Some(l) = self.listener.as_mut() else {
            return false;
        };
        let sessions = &self.sessions;
        let hellos = l.hellos(|slot, rank| {
            sessions
                .get(&slot)
                .is_some_and(|s| s.rank == rank && s.theirs.is_some() && s.tcp.is_none())
        });
        let any = !hellos.is_empty();
        for h in hellos {
            // Kept until the rank says, over MPI, that its worker took it.
            if let Some(s) = self.sessions.get_mut(&h.slot) {
                s.tcp = Some((h.stream, h.watch));
            }
        }
        any
    }

    /// Reads tasks from the engine and sends them on to the worker's rank
    /// (an MPI pool's arguments are never in shared-memory blocks:
    /// `Config::inline_bodies`).
    fn forward_tasks(&mut self, slot: usize) -> bool {
        let Some(s) = self.sessions.get_mut(&slot) else {
            return false;
        };
        if s.eof {
            return false;
        }
        let rank = s.rank;
        let (got, eof) = read_some(&mut s.conn);
        self.msg.clear();
        self.msg.extend_from_slice(&header(M_DATA, slot));
        let mut pos = 0;
        while let Some(f) = Frame::parse(&s.conn.inbuf, pos) {
            self.msg.extend_from_slice(&s.conn.inbuf[f.at..f.end]);
            pos = f.end;
            if self.msg.len() >= CHUNK {
                self.link.send_data(rank, &mut self.msg);
            }
        }
        s.conn.consume(pos);
        if !self.link.send_data(rank, &mut self.msg) && self.link.peers.is_live(rank) {
            let why = "stream bytes to it did not go out within the rank timeout".to_string();
            self.doomed.push((rank, why));
        }
        if eof {
            s.eof = true;
            self.tell(rank, &header(M_EOF, slot));
        }
        got || eof
    }

    fn on_message(&mut self, from: usize, msg: Vec<u8>) {
        let (Some(&kind), Some(slot)) = (msg.first(), slot_of(&msg)) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&slot).filter(|s| s.rank == from) else {
            // A stray message (a slot already ended).
            return;
        };
        match kind {
            M_DATA => {
                s.conn.write(&msg[5..]);
            }
            M_STARTED => {
                let pid = u32_at(&msg, 5).unwrap_or(0);
                let over_tcp = msg.get(9) == Some(&STREAM_TCP);
                let conn = match (over_tcp, s.tcp.take()) {
                    (true, Some((stream, watch))) => {
                        // The relay's socket pair is not needed.
                        s.theirs = None;
                        s.eof = true;
                        s.stream = Some(watch);
                        Some(stream)
                    }
                    // Its worker reads a stream this side does not have
                    // (cannot happen: the rank says TCP only once it was
                    // acknowledged, and it was kept): end the worker.
                    (true, None) => {
                        let rank = s.rank;
                        self.sessions.remove(&slot);
                        self.hosted[rank] -= 1;
                        let mut m = header(M_KILL, slot);
                        m.extend_from_slice(&0u64.to_le_bytes());
                        self.tell(rank, &m);
                        let cause = format!("MPI rank {from}: its worker's stream was lost");
                        self.report(Event::StartFailed { slot, cause });
                        None
                    }
                    // Over MPI: a stream it connected, if any, goes.
                    (false, _) => s.theirs.take(),
                };
                if let Some(conn) = conn {
                    self.seam.handed.started_up(slot);
                    self.report(Event::Started {
                        slot,
                        pid,
                        rank: Some(from),
                        conn,
                    });
                }
            }
            M_START_FAILED => {
                let cause = String::from_utf8_lossy(&msg[5..]).into_owned();
                self.sessions.remove(&slot);
                self.hosted[from] -= 1;
                let cause = format!("MPI rank {from}: {cause}");
                self.report(Event::StartFailed { slot, cause });
            }
            M_KILL_REFUSED => {
                let task = u64_at(&msg, 5).unwrap_or(0);
                self.report(Event::KillRefused { slot, task });
            }
            M_ENDED => {
                let status = u32_at(&msg, 5).map_or(SERVER_LOST, |s| s as i32);
                let started = u64_at(&msg, 9).unwrap_or(u64::MAX);
                let timed_out = u64_at(&msg, 17).unwrap_or(0);
                self.seam.handed.ended_at(slot, started);
                s.ended = Some((status, timed_out, Instant::now()));
            }
            _ => {}
        }
    }

    /// Writes results to the engine. Reports the end of a worker that ended
    /// once all its output is in the socket. Returns whether anything
    /// happened.
    fn flush_results(&mut self, slot: usize) -> bool {
        let Some(s) = self.sessions.get_mut(&slot) else {
            return false;
        };
        let (flushed, had) = s.conn.flush_some();
        let all_out = flushed != Flushed::Pending;
        let Some((status, timed_out, when)) = s.ended else {
            return had;
        };
        // A TCP stream: its last bytes are in once the rank's shut is.
        let shut = |fd: &OwnedFd| sys::peer_shut_now(fd.as_raw_fd());
        let all_in = s.stream.as_ref().is_none_or(shut) || when.elapsed() > LAST_BYTES_WAIT;
        if !all_out || !all_in {
            return had;
        }
        // Closing our end after the last byte: the engine reads it all, then
        // end-of-file.
        let rank = s.rank;
        self.sessions.remove(&slot);
        self.hosted[rank] -= 1;
        if timed_out != 0 {
            self.report(Event::TimedOut {
                slot,
                task: timed_out,
            });
        }
        let end = if status == SERVER_LOST {
            End::Abandoned
        } else {
            End::Exited(ExitStatus::from_raw(status))
        };
        self.report(Event::Ended { slot, end });
        true
    }
}
