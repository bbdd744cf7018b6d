//! A sandboxed pool's worker output, in the fork server: each worker
//! writes its stdout and stderr to pipes of its own, which the server reads
//! and copies to its own stdout and stderr (the pool's pipes to the
//! parent, `output.rs`), counting what each worker wrote. Past the pool's
//! output cap the server marks the worker's `died_of` word, kills it, and
//! discards the rest: the task fails with `Limit::Output`.
//!
//! The server never blocks on a write: its own stdout and stderr are
//! non-blocking, and a worker's bytes that do not fit wait (at most one
//! read's worth per worker) until they do, while the server reads no more
//! from that worker, which then blocks on its full pipe.

use crate::proto::status::SharedWords;
use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// How much one read of a worker's pipe takes.
const CHUNK: usize = 64 << 10;

/// One stream of one worker: its pipe's read end, and what waits to go.
struct Stream {
    fd: OwnedFd,
    /// The server's fd this stream is copied to (1 or 2).
    to: RawFd,
    pending: Vec<u8>,
    open: bool,
}

/// One worker's output.
struct Relay {
    pid: libc::pid_t,
    slot: usize,
    streams: [Stream; 2],
    written: u64,
    over: bool,
}

/// The output of every worker of a sandboxed server.
pub(crate) struct Relays {
    cap: u64,
    relays: Vec<Relay>,
    buf: Vec<u8>,
}

/// The ends a new worker writes to, and the ends the server reads.
pub(crate) struct Pipes {
    pub(crate) child: [OwnedFd; 2],
    read: [OwnedFd; 2],
}

impl Pipes {
    /// Their four fds (for the new worker to close once its stdout and
    /// stderr are its ends).
    pub(crate) fn all_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.child
            .iter()
            .chain(self.read.iter())
            .map(AsRawFd::as_raw_fd)
    }
}

impl Relays {
    /// Relays for a server whose workers may write `cap` bytes each; makes
    /// the server's own stdout and stderr non-blocking.
    pub(crate) fn new(cap: u64) -> Relays {
        for fd in [1, 2] {
            // Not open (no stdout): its bytes are dropped as they come.
            let _ = sys::set_nonblocking_raw(fd);
        }
        Relays {
            cap,
            relays: Vec::new(),
            buf: vec![0; CHUNK],
        }
    }

    /// The read ends of every worker's pipes (for a new worker to close).
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        self.relays
            .iter()
            .flat_map(|r| r.streams.iter().map(|s| s.fd.as_raw_fd()))
            .collect()
    }

    /// Pipes for the next worker (before its fork).
    pub(crate) fn pipes() -> std::io::Result<Pipes> {
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        Ok(Pipes {
            child: [out_w, err_w],
            read: [out_r, err_r],
        })
    }

    /// The worker `pid` of `slot` was forked with `pipes`: its ends are
    /// dropped here, and its output relayed from now on.
    pub(crate) fn add(&mut self, pid: libc::pid_t, slot: usize, pipes: Pipes) {
        let Pipes { child, read } = pipes;
        drop(child);
        let [out, err] = read;
        let stream = |fd: OwnedFd, to: RawFd| {
            let _ = sys::set_nonblocking(&fd);
            Stream {
                fd,
                to,
                pending: Vec::new(),
                open: true,
            }
        };
        self.relays.push(Relay {
            pid,
            slot,
            streams: [stream(out, 1), stream(err, 2)],
            written: 0,
            over: false,
        });
    }

    /// Adds to `set` what the relays wait for: each stream's pipe while
    /// nothing of it waits to go, else the server's fd it goes to. Returns
    /// where they start in `set`.
    pub(crate) fn poll_on(&self, set: &mut sys::PollSet) -> usize {
        let first = set.len();
        for s in self.relays.iter().flat_map(|r| r.streams.iter()) {
            if s.pending.is_empty() {
                set.push(s.fd.as_raw_fd(), true, false);
            } else {
                set.push(s.to, false, true);
            }
        }
        first
    }

    /// Moves what `set` says is ready (from index `first`): copies each
    /// worker's output on, kills a worker past the cap (after marking its
    /// `died_of` word) while it is in `live`, and forgets a worker whose
    /// pipes have both ended.
    pub(crate) fn pump(
        &mut self,
        set: &sys::PollSet,
        first: usize,
        words: &SharedWords,
        live: &[libc::pid_t],
    ) {
        let mut i = first;
        for r in self.relays.iter_mut() {
            for k in 0..2 {
                if set.ready(i) {
                    let s = &mut r.streams[k];
                    if !s.pending.is_empty() {
                        flush(s);
                    } else {
                        read_one(s, &mut self.buf, &mut r.written, r.over);
                    }
                }
                i += 1;
            }
            if !r.over && r.written > self.cap {
                r.over = true;
                let status = words.status(r.slot);
                status.died_of.store(
                    crate::sandbox::cause::OUTPUT,
                    std::sync::atomic::Ordering::SeqCst,
                );
                for s in r.streams.iter_mut() {
                    s.pending.clear();
                }
                if live.contains(&r.pid) {
                    sys::kill(r.pid, libc::SIGKILL);
                }
            }
        }
        self.relays.retain(|r| r.streams.iter().any(|s| s.open));
    }
}

/// Reads what one stream has: on to its server fd, unless its worker is
/// past the cap (then dropped); end-of-file closes it.
fn read_one(s: &mut Stream, buf: &mut [u8], written: &mut u64, over: bool) {
    match sys::read(s.fd.as_raw_fd(), buf) {
        Ok(0) => s.open = false,
        Ok(n) => {
            *written = written.saturating_add(n as u64);
            if !over {
                s.pending.extend_from_slice(&buf[..n]);
                flush(s);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => s.open = false,
    }
}

/// Writes what waits of `s` to its server fd, as far as it takes without
/// blocking; a write that fails otherwise (nobody reads) drops it.
fn flush(s: &mut Stream) {
    while !s.pending.is_empty() {
        match sys::write(s.to, &s.pending) {
            Ok(n) => {
                s.pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => {
                s.pending.clear();
                return;
            }
        }
    }
}
