//! How the MPI backend's ranks talk: message kinds, sending without
//! deadlock, receiving what has arrived, the hash exchange, the stop
//! handshake, and reading a relayed stream.
//!
//! All messages use one tag of a duplicate of the world communicator, so
//! MPI's non-overtaking rule keeps them in order. The first byte of a
//! message is its kind. Waiting uses `Iprobe` and `Test` with a backoff
//! capped at 1 ms, because a blocking receive busy-spins a whole core.
//! While a send is pending, its sender keeps receiving, so two ranks that
//! send large messages to each other cannot deadlock.

use crate::proto::conn::{Conn, Filled};
pub(super) use crate::proto::idle::Backoff;
use crate::proto::shm::Block;
use crate::proto::wire;
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
/// Rank 0 to a worker rank: the pool is finished; acknowledge and exit.
pub(super) const M_STOP: u8 = 5;
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
/// How long rank 0 waits for the ranks to acknowledge STOP before it aborts
/// the job (MPI finalisation would hang on a rank that never answers).
pub(super) const STOP_BOUND: Duration = Duration::from_secs(30);
/// Socket buffer size, as for local workers.
pub(super) const SOCK_BUF: usize = 1 << 20;

/// Received messages, with the rank each came from.
pub(super) type Inbox = VecDeque<(usize, Vec<u8>)>;

/// Receives every message that has arrived. Returns whether there was one.
pub(super) fn pump(comm: &SimpleCommunicator, inbox: &mut Inbox) -> bool {
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
pub(super) fn send(comm: &SimpleCommunicator, inbox: &mut Inbox, to: usize, msg: &[u8]) {
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
/// an `M_DATA` header (`header`) and then the bytes; the header stays.
pub(super) fn send_data(
    comm: &SimpleCommunicator,
    inbox: &mut Inbox,
    to: usize,
    msg: &mut Vec<u8>,
) {
    const HEAD: usize = 5;
    if msg.len() <= HEAD {
        return;
    }
    if msg.len() <= CHUNK + HEAD {
        send(comm, inbox, to, msg);
    } else {
        let mut part = Vec::with_capacity(CHUNK + HEAD);
        for piece in msg[HEAD..].chunks(CHUNK) {
            part.clear();
            part.extend_from_slice(&msg[..HEAD]);
            part.extend_from_slice(piece);
            send(comm, inbox, to, &part);
        }
    }
    msg.truncate(HEAD);
    if msg.capacity() > 4 * CHUNK {
        msg.shrink_to(HEAD);
    }
}

/// The hash exchange: a non-blocking all-gather, polled with backoff so
/// that ranks that wait for a late rank 0 do not spin.
pub(super) fn all_gather(comm: &SimpleCommunicator, mine: u64, all: &mut [u64]) {
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

/// Tells every worker rank to stop and waits for each to acknowledge, so
/// that MPI can be finalised.
pub(super) fn stop_ranks(comm: &SimpleCommunicator, inbox: &mut Inbox) {
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
            if msg.first() == Some(&M_STOP_ACK)
                && let Some(a) = acked.get_mut(from)
            {
                *a = true;
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
