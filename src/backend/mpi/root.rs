//! Rank 0's "procpool-mpi" thread: the far side of the engine's seam.
//!
//! The engine sends [`Command`]s (start a worker in a slot, kill one) on a
//! channel and wakes this thread through an eventfd; this thread answers
//! with the engine's typed events (`engine::seam::Event`) on another
//! channel, and wakes the engine through a second eventfd.
//! - Start(slot): the thread picks a free rank and tells it to START a
//!   worker. It keeps one end of a fresh stream socket pair and hands the
//!   other end to the engine (`Started`, with pid = the rank).
//! - While the worker runs, the thread moves bytes both ways between its end
//!   of the socket and MPI messages to and from the rank. It notes each task
//!   it hands to the rank ([`Handed`]): a task handed to a rank counts as
//!   started (so its timeout runs, and it is not silently run again if the
//!   rank is lost).
//! - Kill for whatever the worker runs (a timeout): a remote process cannot
//!   be killed. The thread closes its end, tells the rank to ABANDON the
//!   worker, and reports `Ended` with `End::Abandoned`. The rank serves no
//!   more tasks in this run. A spare rank, if there is one, replaces it; if
//!   there is none, the start fails and the pool goes on with fewer
//!   workers. A kill for one task (a cancel) is refused (`KillRefused`):
//!   the task runs to the end and its result is dropped.
//! - The engine drops its command channel (the pool is finished): the
//!   thread tells every rank to STOP, waits for each to acknowledge, and
//!   returns (MPI is finalised after it).

use super::transport::*;
use crate::engine::seam::{End, Event, Progress};
use crate::proto::conn::Conn;
use crate::proto::wire::{self, Frame};
use crate::sys::{self, PollSet};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

/// What the engine asks of rank 0's thread.
pub(super) enum Command {
    Start(usize),
    Kill { rank: u32, task: u64 },
}

/// The tasks handed to each slot's rank: the engine's view of how far an
/// MPI worker got. The remote worker's own progress stays on its rank.
pub(super) struct Handed {
    /// Per slot: the last task handed over, and when (monotonic ns).
    seq: Vec<AtomicU64>,
    at_ns: Vec<AtomicU64>,
    skip: Vec<AtomicU64>,
}

impl Handed {
    pub(super) fn new(slots: usize) -> Handed {
        let words = || (0..slots).map(|_| AtomicU64::new(0)).collect();
        Handed {
            seq: words(),
            at_ns: words(),
            skip: words(),
        }
    }

    fn reset(&self, slot: usize) {
        self.seq[slot].store(0, Ordering::SeqCst);
        self.at_ns[slot].store(0, Ordering::SeqCst);
        self.skip[slot].store(0, Ordering::SeqCst);
    }

    fn hand(&self, slot: usize, seq: u64) {
        self.at_ns[slot].store(sys::monotonic_ns(), Ordering::SeqCst);
        self.seq[slot].store(seq, Ordering::SeqCst);
    }
}

impl Progress for Handed {
    fn started(&self, slot: usize) -> u64 {
        self.seq[slot].load(Ordering::SeqCst)
    }
    fn started_at_ns(&self, slot: usize) -> u64 {
        self.at_ns[slot].load(Ordering::SeqCst)
    }
    /// A task handed over runs until its result comes back.
    fn running(&self, slot: usize, seq: u64) -> bool {
        self.started(slot) == seq
    }
    fn skip(&self, slot: usize) -> u64 {
        self.skip[slot].load(Ordering::SeqCst)
    }
    /// Noted, though a rank never sees it: every task is handed over as it
    /// is sent (the engine drops a cancelled task's result).
    fn set_skip(&self, slot: usize, seq: u64) {
        self.skip[slot].store(seq, Ordering::SeqCst);
    }
    fn item_cpu(&self, _slot: usize) -> u64 {
        0
    }
    fn died_of(&self, _slot: usize) -> u64 {
        0
    }
}

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
    slot: usize,
    /// Our end of the worker's stream (the engine has the other): tasks in,
    /// results out.
    conn: Conn,
    /// The engine closed its side (the worker retires).
    eof: bool,
    /// The rank said its worker ended, with this exit code.
    ended: Option<i32>,
}

enum RankState {
    Free,
    Busy(Box<Session>),
    /// Its worker was abandoned (a kill): it serves no more tasks.
    Lost,
}

pub(super) struct Root<'c> {
    comm: &'c SimpleCommunicator,
    seam: Seam,
    /// Indexed by rank; rank 0 (this one) is never a worker.
    ranks: Vec<RankState>,
    inbox: Inbox,
    /// Reused buffer for outgoing stream bytes.
    msg: Vec<u8>,
}

impl<'c> Root<'c> {
    pub(super) fn new(comm: &'c SimpleCommunicator, seam: Seam) -> Self {
        let size = comm.size() as usize;
        let mut ranks = Vec::with_capacity(size);
        ranks.push(RankState::Lost);
        ranks.extend((1..size).map(|_| RankState::Free));
        Root {
            comm,
            seam,
            ranks,
            inbox: VecDeque::new(),
            msg: vec![M_DATA],
        }
    }

    pub(super) fn run(mut self) {
        let mut idle = Backoff::new(MAX_IDLE);
        let mut polled = PollSet::default();
        // The rank of each worker socket in `polled` (after the wake fd).
        let mut who: Vec<usize> = Vec::new();
        loop {
            // One poll tells which sockets to read: no syscall per idle rank.
            polled.clear();
            who.clear();
            polled.push(self.seam.wake_me.as_raw_fd(), true, false);
            for (r, st) in self.ranks.iter().enumerate() {
                if let RankState::Busy(s) = st {
                    let (read, write) = (!s.eof, s.conn.has_pending());
                    // A socket polled for nothing would still wake the poll
                    // on a hang-up, again and again.
                    if read || write {
                        polled.push(s.conn.raw(), read, write);
                        who.push(r);
                    }
                }
            }
            let _ = polled.poll(0);
            if polled.ready(0) {
                sys::drain(self.seam.wake_me.as_raw_fd());
            }
            let Some(mut active) = self.commands() else {
                break;
            };
            for (k, &r) in who.iter().enumerate() {
                if polled.readable(k + 1) {
                    active |= self.forward_tasks(r);
                }
            }
            active |= self.receive();
            for r in 1..self.ranks.len() {
                active |= self.flush_results(r);
            }
            if active {
                idle.reset();
            } else {
                idle.wait(&mut polled);
            }
        }
        for st in self.ranks.iter_mut() {
            if matches!(st, RankState::Busy(_)) {
                *st = RankState::Lost;
            }
        }
        stop_ranks(self.comm, &mut self.inbox);
    }

    fn report(&self, e: Event) {
        let _ = self.seam.events.send(e);
        sys::eventfd_signal(self.seam.wake_engine.as_raw_fd());
    }

    /// Carries out the engine's commands. `None`: the engine closed its
    /// channel (the pool is finished).
    fn commands(&mut self) -> Option<bool> {
        let mut active = false;
        loop {
            match self.seam.commands.try_recv() {
                Ok(Command::Start(slot)) => self.spawn(slot),
                // A kill for one task (a cancel) would cost the whole rank:
                // refuse it, and the task runs to its end (its result is
                // dropped). A kill for whatever the rank runs (a timeout)
                // abandons the rank.
                Ok(Command::Kill { rank, task }) if task != 0 => {
                    self.report(Event::KillRefused { pid: rank, task });
                }
                Ok(Command::Kill { rank, .. }) => self.abandon(rank as usize),
                Err(mpsc::TryRecvError::Empty) => return Some(active),
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
            active = true;
        }
    }

    /// Receives what the ranks sent and handles it.
    fn receive(&mut self) -> bool {
        let mut active = pump(self.comm, &mut self.inbox);
        while let Some((from, msg)) = self.inbox.pop_front() {
            self.on_message(from, msg);
            active = true;
        }
        active
    }

    fn spawn(&mut self, slot: usize) {
        let Some(rank) = (1..self.ranks.len()).find(|&r| matches!(self.ranks[r], RankState::Free))
        else {
            log::warn!("procpool: no MPI rank is free to start a worker on");
            self.report(Event::StartFailed {
                slot,
                cause: "no MPI rank is free to start a worker on (each rank runs one \
                        worker, and a rank whose task timed out serves no more)"
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
        send(self.comm, &mut self.inbox, rank, &[M_START]);
        self.ranks[rank] = RankState::Busy(Box::new(Session {
            slot,
            conn: Conn::new(mine, Vec::new()),
            eof: false,
            ended: None,
        }));
        self.report(Event::Started {
            slot,
            pid: rank as u32,
            conn: theirs,
        });
    }

    /// A remote rank cannot be killed: abandon its worker instead.
    fn abandon(&mut self, rank: usize) {
        let Some(RankState::Busy(s)) = self.ranks.get_mut(rank) else {
            return;
        };
        if s.ended.is_some() {
            // It ended by itself; its end is reported once its output is in.
            return;
        }
        s.conn.flush();
        self.ranks[rank] = RankState::Lost;
        send(self.comm, &mut self.inbox, rank, &[M_ABANDON]);
        log::warn!(
            "procpool: MPI rank {rank} abandoned its task (a timeout); \
             it serves no more tasks in this run"
        );
        self.report(Event::Ended {
            pid: rank as u32,
            end: End::Abandoned,
        });
    }

    /// Reads tasks from the engine and sends them on to the rank, with the
    /// contents of input blocks inlined.
    fn forward_tasks(&mut self, rank: usize) -> bool {
        let RankState::Busy(s) = &mut self.ranks[rank] else {
            return false;
        };
        if s.eof {
            return false;
        }
        let (got, eof) = read_some(&mut s.conn);
        let mut pos = 0;
        while let Some(f) = Frame::parse(&s.conn.inbuf, pos) {
            let h = f.header;
            if h.kind == wire::TASK {
                self.seam.handed.hand(s.slot, h.seq);
            }
            let frame = &s.conn.inbuf[f.at..f.end];
            if h.kind == wire::TASK && h.status & wire::IN_BLOCK != 0 {
                let len = block_len(f.body(&s.conn.inbuf)).unwrap_or(0);
                match map_block(s.conn.in_fds.pop_front(), len) {
                    Ok(block) => {
                        let mut nh = h;
                        // Inline now; other flags (INLINE_SHARED) stay.
                        nh.status = h.status & !(wire::IN_BLOCK | wire::KEEP_INPUT);
                        let inlined = nh.open(&mut self.msg);
                        self.msg.extend_from_slice(block.bytes(len));
                        inlined.close(&mut self.msg, 0);
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
            pos = f.end;
            if self.msg.len() >= CHUNK {
                send_data(self.comm, &mut self.inbox, rank, &mut self.msg);
            }
        }
        s.conn.consume(pos);
        send_data(self.comm, &mut self.inbox, rank, &mut self.msg);
        if eof {
            s.eof = true;
            send(self.comm, &mut self.inbox, rank, &[M_EOF]);
        }
        got || eof
    }

    fn on_message(&mut self, from: usize, msg: Vec<u8>) {
        let Some(RankState::Busy(s)) = self.ranks.get_mut(from) else {
            // An abandoned worker's late output, or a stray message.
            return;
        };
        match msg.first() {
            Some(&M_DATA) => {
                s.conn.write(&msg[1..]);
            }
            Some(&M_ENDED) => {
                let code = msg
                    .get(1..5)
                    .map_or(1, |b| i32::from_le_bytes(b.try_into().unwrap()));
                s.ended = Some(code);
            }
            _ => {}
        }
    }

    /// Writes results to the engine. Reports the end of a worker that ended
    /// once all its output is in the socket. Returns whether anything
    /// happened.
    fn flush_results(&mut self, rank: usize) -> bool {
        let RankState::Busy(s) = &mut self.ranks[rank] else {
            return false;
        };
        let had = s.conn.has_pending();
        let all_out = s.conn.flush() != crate::proto::conn::Flushed::Pending;
        let Some(code) = s.ended else {
            return had;
        };
        if !all_out {
            return had;
        }
        // Closing our end after the last byte: the engine reads it all, then
        // end-of-file.
        self.ranks[rank] = RankState::Free;
        self.report(Event::Ended {
            pid: rank as u32,
            end: End::Returned(code),
        });
        true
    }
}
