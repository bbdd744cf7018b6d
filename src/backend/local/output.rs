//! Where the output of a pool's processes goes: the fork server's and its
//! workers' stdout and stderr.
//!
//! Each stream has a [`Sink`], shaped like [`std::process::Stdio`]:
//!
//! - [`Sink::Inherit`] (the program's fd, shared): the process writes to the program's own fd, as any
//!   child does. An unsandboxed pool's default: a task's `println!` is the
//!   program's, with nothing in between.
//! - [`Sink::Null`] (nothing): `/dev/null`.
//! - [`Sink::Forward`] (through the parent): the process writes to a pipe whose read end only
//!   the parent holds, and an [`OutputPump`] in the parent copies what
//!   arrives to the program's own fd. A sandboxed pool's (both streams):
//!   a task owns its worker, and with the program's fd it could do more
//!   than write to it (`ftruncate` and `pwrite` a log file, `fcntl` its
//!   flags, read it back); with the pipe it can only add bytes.
//!
//! The server gets its stdio when it is exec'd ([`Streams::prepare`]); a
//! sandboxed server gives each worker pipes of its own and relays them to
//! its stdio, counting what each wrote (`relay.rs`), so one pipe per
//! stream from the server serves the whole pool, and its write ends close
//! when the server has gone: that end-of-file is how the pump ends. The pump is one
//! thread of the parent per pool (named `procpool-output`), polling both
//! read ends (non-blocking, close-on-exec); it holds nothing of the pool
//! but those fds, so it keeps no pool alive, and dropping the pool never
//! waits for it. `join` waits a moment (at most [`DRAIN_WAIT`]) for it to
//! copy what the pool's processes wrote before they ended, so that output
//! printed before `join` returns is not lost when the program exits right
//! after. A write to the program's fd that fails (a closed pipe, a full
//! disk) drops those bytes, and the pump reads on, so a worker never
//! blocks on a full pipe.
//!
//! What this is shaped for: an option for every pool saying where worker
//! output goes, per stream, as `Stdio` does for `Command`. The pump would
//! then also be where output is prefixed per worker line (a `Forward` that
//! names the worker: one pipe per worker, which the server would make at
//! each fork and hand over with the worker's socket), and where a crash
//! report is appended. Today only a sandboxed pool uses it, with
//! `Forward` for both.

use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::time::Duration;

/// Where one output stream of the pool's processes goes (see the module
/// doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // Null: for the per-pool option this module is shaped for.
pub(crate) enum Sink {
    /// The program's own fd, shared with the process.
    Inherit,
    /// `/dev/null`.
    Null,
    /// A pipe, copied by the parent's [`OutputPump`] to the program's fd.
    Forward,
}

/// The sinks of the server's (and so its workers') stdout and stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Streams {
    pub(crate) stdout: Sink,
    pub(crate) stderr: Sink,
}

impl Streams {
    /// Both streams the program's own: an unsandboxed pool's.
    pub(crate) const INHERIT: Streams = Streams {
        stdout: Sink::Inherit,
        stderr: Sink::Inherit,
    };
    /// Both streams through the parent: a sandboxed pool's.
    pub(crate) const FORWARD: Streams = Streams {
        stdout: Sink::Forward,
        stderr: Sink::Forward,
    };

    /// The child's `Stdio` for each stream, and the read ends the parent
    /// will pump (each with the program's fd it is copied to).
    pub(crate) fn prepare(self) -> std::io::Result<Prepared> {
        let (stdout, out) = one(self.stdout, libc::STDOUT_FILENO)?;
        let (stderr, err) = one(self.stderr, libc::STDERR_FILENO)?;
        Ok(Prepared {
            stdio: Some((stdout, stderr)),
            pumped: out.into_iter().chain(err).collect(),
        })
    }
}

/// What [`Streams::prepare`] made: [`give_to`](Prepared::give_to) the
/// child's `Command`, spawn it, drop the command, then
/// [`start`](Prepared::start) the pump.
pub(crate) struct Prepared {
    /// The child's stdout and stderr, until given to its command.
    stdio: Option<(Stdio, Stdio)>,
    pumped: Vec<(OwnedFd, RawFd)>,
}

impl Prepared {
    /// Sets the child's stdout and stderr in `cmd` (once).
    pub(crate) fn give_to(&mut self, cmd: &mut std::process::Command) {
        if let Some((out, err)) = self.stdio.take() {
            cmd.stdout(out).stderr(err);
        }
    }

    /// Starts the pump, if a stream is forwarded. Call once the child is
    /// spawned: the `Command` (which holds the write ends) must be gone
    /// first, or the pump would never see end-of-file.
    pub(crate) fn start(self) -> std::io::Result<Option<OutputPump>> {
        if self.pumped.is_empty() {
            return Ok(None);
        }
        for (fd, _) in &self.pumped {
            sys::set_nonblocking(fd)?;
        }
        let pumped = self.pumped;
        let thread = std::thread::Builder::new()
            .name("procpool-output".into())
            .spawn(move || pump(pumped))?;
        Ok(Some(OutputPump { thread }))
    }
}

/// The sink's `Stdio` for a child, and the read end to pump to `to`.
fn one(sink: Sink, to: RawFd) -> std::io::Result<(Stdio, Option<(OwnedFd, RawFd)>)> {
    Ok(match sink {
        Sink::Inherit => (Stdio::inherit(), None),
        Sink::Null => (Stdio::null(), None),
        Sink::Forward => {
            let (read, write) = sys::pipe()?;
            (Stdio::from(write), Some((read, to)))
        }
    })
}

/// How long `join` waits for the pump to copy the last output of a pool
/// whose processes have all ended.
pub(crate) const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The parent's thread that copies a pool's forwarded output (see the
/// module doc). Dropping it leaves the thread to end at end-of-file.
pub(crate) struct OutputPump {
    thread: std::thread::JoinHandle<()>,
}

impl OutputPump {
    /// Waits, at most `bound`, for the pump to reach end-of-file on every
    /// stream (the pool's processes have all ended); returns whether it
    /// did.
    pub(crate) fn wait_drained(self, bound: Duration) -> bool {
        let until = std::time::Instant::now() + bound;
        while !self.thread.is_finished() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.thread.join();
        true
    }
}

/// The pump's loop: copies each read end to its fd until every read end
/// is at end-of-file (or fails).
fn pump(mut open: Vec<(OwnedFd, RawFd)>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut set = sys::PollSet::default();
    while !open.is_empty() {
        set.clear();
        for (fd, _) in &open {
            set.push(fd.as_raw_fd(), true, false);
        }
        if set.poll(-1).is_err() {
            return;
        }
        let ended: Vec<usize> = (0..open.len())
            .filter(|&i| {
                set.ready(i) && !copy_available(open[i].0.as_raw_fd(), open[i].1, &mut buf)
            })
            .collect();
        // Dropping a stream at end-of-file closes its read end.
        for i in ended.into_iter().rev() {
            open.remove(i);
        }
    }
}

/// Copies what `from` holds now to `to`; returns false at end-of-file (or
/// on a read error, which ends the stream too).
fn copy_available(from: RawFd, to: RawFd, buf: &mut [u8]) -> bool {
    loop {
        match sys::read(from, buf) {
            Ok(0) => return false,
            Ok(n) => write_all_or_drop(to, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Writes `bytes` to `to`, waiting while it is full (a non-blocking fd of
/// the program's); drops them if it fails.
fn write_all_or_drop(to: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match sys::write(to, bytes) {
            Ok(0) => return,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = sys::wait_writable(to, Duration::from_millis(100));
            }
            Err(_) => return,
        }
    }
}
