//! A worker rank (rank >= 1): it never returns from `build`. Each START
//! runs the worker loop (`worker::serve`) on a thread of its own, over a
//! stream socket pair; the rank's "procpool-mpi" thread moves bytes
//! between the other end of that pair and rank 0, inlining a result that
//! the worker put in a shared-memory block. When the loop ends, the rank
//! reports ENDED(code) and can be started again (after
//! `max_tasks_per_child`, say). On STOP it acknowledges and returns.

use super::transport::*;
use crate::backend::local::server::Init;
use crate::proto::conn::{Conn, Flushed};
use crate::proto::task::status;
use crate::proto::wire::{self, Frame, Header};
use crate::sys::{self, PollSet};
use crate::worker::{self, Stop};
use mpi::topology::SimpleCommunicator;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// The worker running on this rank.
struct Local {
    /// Our end of its stream: tasks from rank 0 in, results out.
    conn: Conn,
    thread: std::thread::JoinHandle<i32>,
    /// Rank 0 said end-of-file: shut our write side once all is out.
    eof: bool,
    shut: bool,
}

pub(super) struct WorkerRank<'c> {
    comm: &'c SimpleCommunicator,
    init: Option<Init>,
    local: Option<Local>,
    /// Its worker was abandoned: it only waits for STOP.
    lost: bool,
    inbox: Inbox,
    msg: Vec<u8>,
}

impl<'c> WorkerRank<'c> {
    pub(super) fn new(comm: &'c SimpleCommunicator, init: Option<Init>) -> Self {
        WorkerRank {
            comm,
            init,
            local: None,
            lost: false,
            inbox: VecDeque::new(),
            msg: vec![M_DATA],
        }
    }

    pub(super) fn run(mut self) {
        let mut idle = Backoff::new(MAX_IDLE);
        let mut polled = PollSet::default();
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
                            l.conn.write(&msg[1..]);
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
                polled.clear();
                if let Some(l) = &self.local {
                    polled.push(l.conn.raw(), true, l.conn.has_pending());
                }
                idle.wait(&mut polled);
            }
        }
        // STOP: close the worker's stream and give its thread a moment to
        // finish. A thread still busy with a task ends with the process.
        if let Some(l) = self.local.take() {
            drop(l.conn);
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
        let had = l.conn.has_pending();
        if l.conn.flush() != Flushed::Pending && l.eof && !l.shut {
            l.conn.shutdown_write();
            l.shut = true;
        }
        let (got, eof) = read_some(&mut l.conn);
        let mut pos = 0;
        while let Some(f) = Frame::parse(&l.conn.inbuf, pos) {
            let h = f.header;
            let frame = &l.conn.inbuf[f.at..f.end];
            if h.kind == wire::DONE && (h.a == wire::OUT_NEW_BLOCK || h.a == wire::OUT_SAME_BLOCK) {
                inline_result(h, f.body(&l.conn.inbuf), &mut l.conn.in_fds, &mut self.msg);
            } else {
                self.msg.extend_from_slice(frame);
            }
            pos = f.end;
            if self.msg.len() >= CHUNK {
                send_data(self.comm, &mut self.inbox, 0, &mut self.msg);
            }
        }
        l.conn.consume(pos);
        send_data(self.comm, &mut self.inbox, 0, &mut self.msg);
        if eof {
            // The worker closed its end: serve() returned.
            let l = self.local.take().expect("checked above");
            drop(l.conn);
            let code = l.thread.join().unwrap_or(101);
            send(self.comm, &mut self.inbox, 0, &ended(code));
        }
        had || got || eof
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
    sys::set_socket_buffers(&mine, SOCK_BUF);
    sys::set_socket_buffers(&theirs, SOCK_BUF);
    let thread = std::thread::Builder::new()
        .name("procpool-worker".into())
        .spawn(move || {
            // This rank's own status words (rank 0 keeps its own copy).
            let Ok(words) =
                crate::proto::status::SharedWords::new(crate::proto::status::STATUS_WORDS)
            else {
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
        conn: Conn::new(mine, Vec::new()),
        thread,
        eof: false,
        shut: false,
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
    let nh = Header::new(wire::DONE, h.seq, 0, h.b);
    match block {
        Ok(b) => {
            let frame = nh.open(msg);
            msg.extend_from_slice(b.bytes(len));
            frame.close(msg, h.status);
        }
        Err(e) => {
            nh.push_message(
                msg,
                status::ENCODE,
                &format!("a result could not be read: {e}"),
            );
        }
    }
}
