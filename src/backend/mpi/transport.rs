//! How the MPI backend's ranks talk: message kinds, the [`Link`] (sending
//! without deadlock and without waiting on a lost rank, receiving what has
//! arrived from the ranks still live), the start-up exchanges, the stop
//! handshake, and reading a relayed stream.
//!
//! All messages use one tag of a duplicate of the world communicator, so
//! MPI's non-overtaking rule keeps them in order. The first byte of a
//! message is its kind. Waiting uses `Iprobe` and `Test` with a backoff
//! capped at 1 ms, because a blocking receive busy-spins a whole core.
//! While a send is pending, its sender keeps receiving, so two ranks that
//! send large messages to each other cannot deadlock.
//!
//! A rank may be lost as a whole (`peers`). So a receive probes each live
//! rank by name, never `MPI_ANY_SOURCE` (which an MPI library may keep
//! failing once one rank is gone), and a send gives up after a bound: its
//! buffer is then left to MPI for good (a few bytes per lost rank), and
//! the caller counts the rank as lost. The communicator returns errors
//! instead of aborting the job (`MPI_ERRORS_RETURN`).

use super::peers::Peers;
use crate::proto::conn::{Conn, Filled};
pub(super) use crate::proto::idle::Backoff;
use crate::proto::shm::Block;
use crate::proto::wire;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

// Message kinds. Every message but STOP and STOP_ACK names the engine's
// worker slot it is about (4 bytes after the kind: `header`).

/// Stream bytes of one worker, either way: tasks (rank 0 to the worker's
/// rank) or results (back).
pub(super) const M_DATA: u8 = 1;
/// Rank 0 to a worker rank: start a worker for this slot.
pub(super) const M_START: u8 = 2;
/// Rank 0 to a worker rank: the engine closed its side of the worker's
/// stream, so the worker finishes its tasks and ends.
pub(super) const M_EOF: u8 = 3;
/// Rank 0 to a worker rank: kill the worker (8 bytes: 0, or the task it
/// must be running for the kill to happen).
pub(super) const M_KILL: u8 = 4;
/// Rank 0 to a worker rank: the pool is finished; acknowledge and exit
/// (1 byte: [`FINALIZE`] if every rank is live, so MPI can be finalised;
/// else 0).
pub(super) const M_STOP: u8 = 5;
/// In a STOP message: finalise MPI after it.
pub(super) const FINALIZE: u8 = 1;
/// A worker rank to rank 0: the worker ended. 4 bytes: its wait status
/// (or [`SERVER_LOST`]); 8: the task it had started; 8: the task it was
/// killed for running past its timeout (0: none).
pub(super) const M_ENDED: u8 = 6;
/// A worker rank to rank 0: STOP received; nothing follows.
pub(super) const M_STOP_ACK: u8 = 7;
/// A worker rank to rank 0: the worker is up (4 bytes: its pid; 1 byte:
/// [`STREAM_TCP`] if it took the TCP stream the rank connected, else its
/// stream goes in MPI messages).
pub(super) const M_STARTED: u8 = 8;
/// In a STARTED message: the worker's stream is the TCP one.
pub(super) const STREAM_TCP: u8 = 1;
/// A worker rank to rank 0: the worker could not be started (the rest:
/// why, in UTF-8).
pub(super) const M_START_FAILED: u8 = 9;
/// A worker rank to rank 0: a kill for one task was not carried out (8
/// bytes: the task), as its fork server's KILL_REFUSED.
pub(super) const M_KILL_REFUSED: u8 = 10;

/// Rank 0 to a worker rank: a task's timeout, which the rank keeps on its
/// own clock from the task's start there (8 bytes: the task; 8: the limit
/// in ns).
pub(super) const M_TIMEOUT: u8 = 11;
/// Rank 0 to a worker rank: the worker must skip this task, cancelled
/// before it started (8 bytes: the task), through its skip word.
pub(super) const M_SKIP: u8 = 12;

/// Either way: I live (nothing follows). Sent several times within the
/// rank timeout (`peers`).
pub(super) const M_BEAT: u8 = 13;
/// Rank 0 to a rank it counts as lost: exit now (nothing follows). Never
/// waited for: the rank may never get it, and then exits when it has not
/// heard from rank 0 for its rank timeout.
pub(super) const M_FENCE: u8 = 14;

/// The status in an ENDED message when the rank's fork server itself was
/// lost: its workers died with it, and no wait status was seen.
pub(super) const SERVER_LOST: i32 = i32::MIN;

/// A message's first bytes: its kind and the slot it is about.
pub(super) fn header(kind: u8, slot: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.push(kind);
    m.extend_from_slice(&(slot as u32).to_le_bytes());
    m
}

/// The slot a message is about.
pub(super) fn slot_of(msg: &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(msg.get(1..5)?.try_into().ok()?) as usize)
}

/// The 8-byte number at `at` in a message.
pub(super) fn u64_at(msg: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(msg.get(at..at + 8)?.try_into().ok()?))
}

/// The 4-byte number at `at` in a message.
pub(super) fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(msg.get(at..at + 4)?.try_into().ok()?))
}

/// A message carries at most this many stream bytes (MPI counts are `int`).
pub(super) const CHUNK: usize = 64 << 20;
/// How much one socket read asks for.
pub(super) const READ_CHUNK: usize = 256 << 10;
/// An idle thread sleeps at most this long between polls.
pub(super) const MAX_IDLE: Duration = Duration::from_millis(1);
/// A thread waiting for a send sleeps at most this long between tests.
pub(super) const MAX_SEND_WAIT: Duration = Duration::from_micros(100);
/// Socket buffer size, as for local workers.
pub(super) const SOCK_BUF: usize = 1 << 20;

/// Received messages, with the rank each came from.
pub(super) type Inbox = VecDeque<(usize, Vec<u8>)>;

/// One rank's way to the others: the communicator, what has arrived, the
/// messages on their way, and which ranks live.
pub(super) struct Link<'c> {
    pub(super) comm: &'c SimpleCommunicator,
    pub(super) inbox: Inbox,
    pub(super) peers: Peers,
    /// Control messages on their way, never waited for: each with its
    /// request, its bytes, its rank and when it was posted.
    outbox: Vec<Posted>,
    /// Live ranks with a message posted more than the rank timeout ago and
    /// still not taken, for the caller to count as lost.
    stuck: Vec<usize>,
}

struct Posted {
    req: Request<'static, [u8]>,
    bytes: Owned,
    to: usize,
    at: Instant,
}

impl<'c> Link<'c> {
    pub(super) fn new(comm: &'c SimpleCommunicator, peers: Peers) -> Self {
        Link {
            comm,
            inbox: VecDeque::new(),
            peers,
            outbox: Vec::new(),
            stuck: Vec::new(),
        }
    }

    /// Receives every message that has arrived from a live rank, and
    /// notes that it was heard; moves the posted messages on. Returns
    /// whether a message arrived.
    pub(super) fn pump(&mut self) -> bool {
        let mut any = false;
        for i in 0..self.peers.live().len() {
            let from = self.peers.live()[i];
            let p = self.comm.process_at_rank(from as i32);
            let mut got = false;
            while let Some((msg, st)) = p.immediate_matched_probe() {
                let len = usize::try_from(st.count(u8::equivalent_datatype())).unwrap_or(0);
                let mut v = vec![0u8; len];
                msg.matched_receive_into(&mut v[..]);
                self.inbox.push_back((from, v));
                got = true;
            }
            if got {
                self.peers.heard(from);
            }
            any |= got;
        }
        self.progress();
        any
    }

    /// Frees the posted messages that went out; notes the ranks that have
    /// not taken one within the rank timeout.
    fn progress(&mut self) {
        let timeout = self.peers.timeout();
        for p in std::mem::take(&mut self.outbox) {
            match p.req.test() {
                Ok(_) => p.bytes.free(),
                Err(req) => {
                    if p.at.elapsed() > timeout && !self.stuck.contains(&p.to) {
                        self.stuck.push(p.to);
                    }
                    self.outbox.push(Posted { req, ..p });
                }
            }
        }
    }

    /// The live ranks that did not take a message within the rank timeout
    /// (since the last call).
    pub(super) fn take_stuck(&mut self) -> Vec<usize> {
        let mut stuck = std::mem::take(&mut self.stuck);
        stuck.retain(|&r| self.peers.is_live(r));
        stuck
    }

    /// Counts `rank` as lost: nothing more is received from or sent to
    /// it, and what was posted to it is left to MPI for good. Returns
    /// whether it was live until now.
    pub(super) fn lose(&mut self, rank: usize) -> bool {
        let mut i = 0;
        while i < self.outbox.len() {
            if self.outbox[i].to == rank {
                let p = self.outbox.swap_remove(i);
                // MPI may still read the bytes: the request and the copy
                // are left to it (`Owned` leaks the copy unless freed).
                std::mem::forget(p.req);
            } else {
                i += 1;
            }
        }
        self.peers.lose(rank)
    }

    /// Sends a control message to a live rank without waiting: it goes
    /// out as MPI progresses (every `pump`), in order with every other
    /// message to that rank. Nothing is sent to a rank counted as lost.
    pub(super) fn post(&mut self, to: usize, msg: &[u8]) {
        if !self.peers.is_live(to) {
            return;
        }
        let bytes = Owned::new(msg);
        let req = self
            .comm
            .process_at_rank(to as i32)
            .immediate_send(StaticScope, bytes.bytes());
        self.outbox.push(Posted {
            req,
            bytes,
            to,
            at: Instant::now(),
        });
    }

    /// Sends a message to a rank counted as lost, never to be waited for
    /// (a fence): MPI keeps the copy for good.
    pub(super) fn post_to_lost(&mut self, to: usize, msg: &[u8]) {
        let bytes = Owned::new(msg);
        let req = self
            .comm
            .process_at_rank(to as i32)
            .immediate_send(StaticScope, bytes.bytes());
        std::mem::forget(req);
    }

    /// Says "I live" to every live rank, when it is time.
    pub(super) fn beat(&mut self) {
        if self.peers.beat_due() {
            for i in 0..self.peers.live().len() {
                let r = self.peers.live()[i];
                self.post(r, &[M_BEAT]);
            }
        }
    }

    /// Waits, at most `bound`, until every posted message went out.
    pub(super) fn flush(&mut self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut wait = Backoff::new(MAX_SEND_WAIT);
        while !self.outbox.is_empty() && Instant::now() < deadline {
            self.progress();
            wait.sleep();
        }
    }

    /// Sends one message to a live rank and waits until MPI is done with
    /// it (a stream's bytes: the wait holds the stream back while the
    /// rank is slow), receiving meanwhile, so that a peer that is itself
    /// sending to us is never blocked, and saying "I live" to the others.
    /// Returns false if the send did not complete within the rank timeout
    /// (the rank is lost, or the way to it): MPI then keeps the copy it
    /// was given for good, and the caller counts the rank as lost.
    pub(super) fn send(&mut self, to: usize, msg: &[u8]) -> bool {
        if !self.peers.is_live(to) {
            return false;
        }
        let owned = Owned::new(msg);
        let mut req = self
            .comm
            .process_at_rank(to as i32)
            .immediate_send(StaticScope, owned.bytes());
        let mut wait = Backoff::new(MAX_SEND_WAIT);
        let deadline = Instant::now() + self.peers.timeout();
        loop {
            match req.test() {
                Ok(_) => {
                    owned.free();
                    return true;
                }
                Err(r) => req = r,
            }
            if Instant::now() > deadline {
                // MPI may still read the buffer: the request and the copy
                // are left to it.
                std::mem::forget(req);
                return false;
            }
            self.beat();
            if self.pump() {
                wait.reset();
            } else {
                wait.sleep();
            }
        }
    }

    /// Sends stream bytes in messages of at most `CHUNK` bytes. `msg`
    /// holds an `M_DATA` header (`header`) and then the bytes; the header
    /// stays. Returns false as [`send`](Self::send) does.
    pub(super) fn send_data(&mut self, to: usize, msg: &mut Vec<u8>) -> bool {
        const HEAD: usize = 5;
        if msg.len() <= HEAD {
            return true;
        }
        let mut sent = true;
        if msg.len() <= CHUNK + HEAD {
            sent = self.send(to, msg);
        } else {
            let mut part = Vec::with_capacity(CHUNK + HEAD);
            for piece in msg[HEAD..].chunks(CHUNK) {
                part.clear();
                part.extend_from_slice(&msg[..HEAD]);
                part.extend_from_slice(piece);
                sent &= self.send(to, &part);
            }
        }
        msg.truncate(HEAD);
        if msg.capacity() > 4 * CHUNK {
            msg.shrink_to(HEAD);
        }
        sent
    }
}

impl Drop for Link<'_> {
    /// What is still on its way is left to MPI (a request dropped before
    /// it completed would panic): the process is about to end, or MPI to
    /// be finalised, which completes it.
    fn drop(&mut self) {
        for p in self.outbox.drain(..) {
            std::mem::forget(p.req);
        }
    }
}

/// A copy of a message that MPI reads while a send is pending: it must
/// outlive the send, which a lost rank may never complete. It is freed once
/// the send completed, and otherwise leaked (left to MPI).
struct Owned {
    raw: *mut [u8],
}

impl Owned {
    fn new(msg: &[u8]) -> Self {
        Owned {
            raw: Box::into_raw(msg.to_vec().into_boxed_slice()),
        }
    }

    fn bytes(&self) -> &'static [u8] {
        // SAFETY: `raw` came from `Box::into_raw`, so it is valid and
        // aligned; the box is only freed by `free`, which takes `self` and
        // is called once the one send that borrows these bytes completed
        // (MPI reads them no more); never freed, it lives for the rest of
        // the process, hence 'static. Nothing writes through `raw`.
        unsafe { &*self.raw }
    }

    /// The send completed: the copy can go.
    fn free(self) {
        // SAFETY: `raw` came from `Box::into_raw` and is freed only here,
        // once; the send that read it completed, and the `&'static` given
        // to it went with its request, so nothing refers to it any more.
        drop(unsafe { Box::from_raw(self.raw) });
    }
}

/// The start-up exchanges (hashes, capacities, host names): a non-blocking all-gather, polled with backoff so
/// that ranks that wait for a late rank 0 do not spin.
pub(super) fn all_gather<S, R>(comm: &SimpleCommunicator, mine: &S, all: &mut R)
where
    S: mpi::datatype::Buffer + ?Sized,
    R: mpi::datatype::BufferMut + ?Sized,
{
    mpi::request::scope(|scope| {
        let mut req = comm.immediate_all_gather_into(scope, mine, all);
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

/// Tells every live worker rank to stop and waits, at most the rank
/// timeout, for each to acknowledge. Returns whether MPI may be finalised:
/// no rank was lost, ever, and every one acknowledged (finalising is
/// collective, and would wait for a lost rank forever). The ranks are told
/// the same in the STOP message.
pub(super) fn stop_ranks(link: &mut Link<'_>) -> bool {
    let size = link.comm.size() as usize;
    let finalize = !link.peers.any_lost();
    let stop = [M_STOP, if finalize { FINALIZE } else { 0 }];
    let mut acked: Vec<bool> = (0..size)
        .map(|r| r == 0 || !link.peers.is_live(r))
        .collect();
    for r in 1..size {
        link.post(r, &stop);
    }
    let deadline = Instant::now() + link.peers.timeout();
    let mut idle = Backoff::new(MAX_IDLE);
    loop {
        while let Some((from, msg)) = link.inbox.pop_front() {
            if msg.first() == Some(&M_STOP_ACK)
                && let Some(a) = acked.get_mut(from)
            {
                *a = true;
            }
        }
        if acked.iter().all(|&a| a) {
            // The STOPs went out (they were taken: acknowledged).
            link.flush(link.peers.timeout());
            return finalize;
        }
        if Instant::now() > deadline {
            let missing: Vec<usize> = (0..size).filter(|&r| !acked[r]).collect();
            eprintln!(
                "procpool: MPI ranks {missing:?} did not acknowledge the pool's end within {:?}; \
                 MPI is not finalised",
                link.peers.timeout()
            );
            return false;
        }
        if link.pump() {
            idle.reset();
        } else {
            idle.sleep();
        }
    }
}

/// The 8-byte length at the start of a frame body that names a block.
pub(super) fn block_len(body: &[u8]) -> Option<usize> {
    body.get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
}

/// Maps a block that came with a frame, checking that it holds `len` bytes.
pub(super) fn map_block(fd: Option<OwnedFd>, len: usize) -> Result<Block, String> {
    let fd = fd.ok_or("its block did not arrive")?;
    let b = Block::from_fd(fd).map_err(|e| format!("its block could not be mapped: {e}"))?;
    if b.capacity() < len {
        return Err("its block is shorter than its body".into());
    }
    Ok(b)
}

/// Reads what a relayed stream has (up to a bound per call, so one busy
/// stream does not starve the others). Returns (whether bytes came,
/// end-of-file).
pub(super) fn read_some(conn: &mut Conn) -> (bool, bool) {
    let mut got = 0;
    while got < 4 * CHUNK {
        let before = conn.inbuf.len();
        let want = wire::read_size(wire::missing(&conn.inbuf), READ_CHUNK).min(CHUNK);
        match conn.fill(want) {
            Filled::Some => got += conn.inbuf.len() - before,
            Filled::Nothing => break,
            Filled::Eof | Filled::Failed(_) => return (got > 0, true),
        }
    }
    (got > 0, false)
}
