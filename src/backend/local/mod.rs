//! The local backend: workers are processes on this machine, forked by a
//! fork server that is either a fresh exec of this program
//! ([`StartMethod::ForkServer`](start::StartMethod), `start.rs`) or a fork
//! of the caller ([`StartMethod::Fork`](start::StartMethod)). The server's
//! protocol is in `server.rs`; this file is the parent's side of it,
//! turned into the engine's typed events (`engine::seam`).
//!
//! Each worker stores, in a page of shared memory made before the server
//! (`proto::words`), the task it has started and when, which is how the
//! engine's [`Progress`] sees it.
//!
//! `README.md` beside this file says what is particular to forking workers
//! here: the invariant the start methods keep, what a worker inherits, the
//! terminal, signals and stdio, and why a stream socket per worker.

pub(crate) mod output;
mod pump;
mod relay;
pub(crate) mod server;
pub(crate) mod start;

use crate::engine::seam::{Backend, End, Event, Progress};
use crate::error::Error;
use crate::proto::words::{STATUS_WORDS, SharedWords};
use crate::sys;
use server::{Msg, Setup};
use start::StartMethod;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The parent's side of a fork server.
pub(crate) struct Local {
    /// The server's socket, with the requests that did not fit in it yet
    /// (it is non-blocking: the supervisor must never wait on the server,
    /// which may itself be waiting to hand it an exit). `None` once closed.
    fd: Option<OwnedFd>,
    out: VecDeque<[u8; 24]>,
    pid: libc::pid_t,
    /// The slot of each live worker, by pid (the server names workers by
    /// pid; the engine, by slot).
    slots: HashMap<u32, usize>,
    /// Which of the workers' streams (stdout, stderr) come through the
    /// pool: a `SPAWNED` brings their pipes after the worker's socket.
    piped: [bool; 2],
    /// The pump of the workers' output, where it goes through the pool
    /// (`output.rs`).
    output: Option<pump::Pump>,
    /// The crash report of each worker whose end was reported, by slot,
    /// until the engine takes it (`last_words`).
    ended_words: HashMap<usize, Arc<str>>,
}

/// Starts a fork server by `method`, with `setup` (the initializer, the
/// shared words, the sandbox, where output goes).
pub(crate) fn start_server(method: StartMethod, setup: Setup) -> Result<Local, Error> {
    let (streams, words) = (setup.output, setup.words.clone());
    let (fd, pid) = match method {
        StartMethod::ForkServer => start::exec_server(&setup)?,
        StartMethod::Fork => fork_server(setup)?,
    };
    let mut local = Local {
        fd: Some(fd),
        out: VecDeque::new(),
        pid,
        slots: HashMap::new(),
        piped: streams.piped(),
        output: None,
        ended_words: HashMap::new(),
    };
    let fd = local.fd.as_ref().expect("just set");
    let ready = sys::set_nonblocking(fd)
        .map_err(|e| Error::io("configuring the fork server socket", e))
        .and_then(|()| {
            if !local.piped.contains(&true) {
                return Ok(None);
            }
            let copy = sys::dup_above_stdio(fd)
                .map_err(|e| Error::io("copying the fork server socket", e))?;
            pump::Pump::start(streams, words, copy)
                .map(Some)
                .map_err(|e| Error::io("starting the pool's output thread", e))
        });
    match ready {
        Ok(pump) => {
            local.output = pump;
            Ok(local)
        }
        Err(e) => {
            // Closing its socket makes the server exit; reap it.
            local.close();
            let _ = sys::reap(pid);
            Err(e)
        }
    }
}

impl Local {
    fn send(&mut self, m: Msg) {
        self.out.push_back(m.to_bytes());
        self.flush();
    }

    /// One message from the server, as an event.
    fn event(&mut self, m: Msg, mut fds: Vec<OwnedFd>) -> Option<Event> {
        Some(match m {
            Msg::Spawned { slot, pid } => {
                let slot = slot as usize;
                self.spawned(slot, pid, &mut fds)
            }
            Msg::SpawnFailed { slot, errno } => Event::StartFailed {
                slot: slot as usize,
                cause: spawn_failure(errno),
            },
            Msg::KillRefused { pid, task, .. } => Event::KillRefused {
                slot: *self.slots.get(&pid)?,
                task,
            },
            Msg::Exited { pid, status } => {
                let slot = self.slots.remove(&pid)?;
                // The server reaped it: all it wrote is in its pipes.
                if let Some(words) = self.output.as_ref().and_then(|o| o.ended(slot, pid)) {
                    self.ended_words.insert(slot, words);
                }
                Event::Ended {
                    slot,
                    end: End::Exited(ExitStatus::from_raw(status)),
                }
            }
            _ => return None,
        })
    }

    /// A worker the server forked, as an event: started, or (its fds did
    /// not all arrive) a failed start.
    fn spawned(&mut self, slot: usize, pid: u32, fds: &mut Vec<OwnedFd>) -> Event {
        match self.take_spawned(slot, pid, fds) {
            Some(conn) => {
                self.slots.insert(pid, slot);
                Event::Started {
                    slot,
                    pid,
                    rank: None,
                    conn,
                }
            }
            // Its socket or a pipe did not arrive: this process is out
            // of fds (the kernel closed them instead), and that worker
            // reads end-of-file (what came is dropped) and exits.
            None => Event::StartFailed {
                slot,
                cause: format!(
                    "this process has no file descriptor free for a new worker's socket{}",
                    fd_limit_hint()
                ),
            },
        }
    }

    /// The fds of a `SPAWNED` for the worker `pid` in `slot`: its socket
    /// (returned), then the read ends of its piped streams (given to the
    /// pump). `None` if any is missing.
    fn take_spawned(&mut self, slot: usize, pid: u32, fds: &mut Vec<OwnedFd>) -> Option<OwnedFd> {
        let want = 1 + self.piped.iter().filter(|&&p| p).count();
        if fds.len() != want {
            return None;
        }
        let mut fds = std::mem::take(fds).into_iter();
        let conn = fds.next()?;
        let pipes = self.piped.map(|p| if p { fds.next() } else { None });
        self.ended_words.remove(&slot);
        if let Some(o) = &self.output {
            o.add(slot, pid, pipes);
        }
        Some(conn)
    }
}

/// Why the server could not fork a worker, from its errno.
fn spawn_failure(errno: i32) -> String {
    let err = std::io::Error::from_raw_os_error(errno);
    let hint = match errno {
        libc::EMFILE | libc::ENFILE => " (see the open-file limit, `ulimit -n`)",
        libc::EAGAIN => " (the limit on processes, `ulimit -u`, or memory)",
        _ => "",
    };
    format!("the fork server could not start a worker: {err}{hint}")
}

/// " (the open-file limit, `ulimit -n`, is N)", or "" if there is none.
fn fd_limit_hint() -> String {
    match sys::open_file_limit() {
        Some(n) => format!(" (the open-file limit, `ulimit -n`, is {n})"),
        None => String::new(),
    }
}

impl Backend for Local {
    fn what(&self) -> &'static str {
        "the fork server"
    }

    fn pid(&self) -> u32 {
        self.pid as u32
    }

    fn start(&mut self, slot: usize) {
        self.send(Msg::Spawn { slot: slot as u32 });
    }

    fn kill(&mut self, slot: usize, pid: u32, task: u64) {
        let slot = slot as u32;
        self.send(Msg::Kill { slot, pid, task });
    }

    fn poll_fd(&self) -> Option<(RawFd, bool)> {
        self.fd
            .as_ref()
            .map(|f| (f.as_raw_fd(), !self.out.is_empty()))
    }

    /// Sends queued requests until the socket is full.
    fn flush(&mut self) {
        let Some(fd) = self.fd.as_ref().map(|f| f.as_raw_fd()) else {
            self.out.clear();
            return;
        };
        while let Some(m) = self.out.front() {
            match sys::send_with_fds(fd, m, &[]) {
                Ok(()) => {
                    self.out.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The server is gone; its end-of-file will be seen.
                    self.out.clear();
                    return;
                }
            }
        }
    }

    fn events(&mut self, out: &mut Vec<Event>) {
        let mut buf = [0u8; 64];
        while let Some(fd) = self.fd.as_ref().map(|f| f.as_raw_fd()) {
            let (n, fds) = match sys::recv_with_fds(fd, &mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => (0, Vec::new()),
            };
            if n == 0 {
                // The fork server is gone: nothing can be spawned or
                // reaped. The engine waits for it (to say how it ended)
                // and breaks the pool.
                self.fd = None;
                out.push(Event::Gone);
                return;
            }
            if let Some(e) = Msg::from_bytes(&buf[..n]).and_then(|m| self.event(m, fds)) {
                out.push(e);
            }
        }
    }

    fn last_words(&mut self, slot: usize) -> Option<Arc<str>> {
        if let Some(words) = self.ended_words.remove(&slot) {
            return Some(words);
        }
        // A live worker's (after a panic): its pipe holds what it wrote
        // before it sent the result.
        self.output.as_ref()?.last_words(slot)
    }

    fn is_open(&self) -> bool {
        self.fd.is_some()
    }

    fn close(&mut self) {
        // Closing its socket makes the server kill its workers and exit:
        // the output pump's copy of it goes first.
        if let Some(o) = &self.output {
            o.forget_server();
        }
        self.fd = None;
        self.out.clear();
    }

    /// Waits for the server to end. Never waits for a server that has
    /// ended: one reaped by another (the kernel, when this process ignores
    /// SIGCHLD) is `ECHILD`, and counts as gone. The kernel wakes the
    /// waiter of such a child a moment before it drops it from this
    /// process's children, so then this waits (briefly, and at most a
    /// second) until it is gone from them too: once `join` returns, no
    /// process of the pool's is left.
    fn wait(mut self: Box<Self>) -> String {
        self.close();
        let status = sys::reap(self.pid).ok().map(ExitStatus::from_raw);
        if status.is_none() {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while sys::is_our_child(self.pid) && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        // The server reaped its workers before it exited: what they wrote
        // is in their pipes, and the pump passes it on within a moment
        // (bounded: a write end that a task's child kept must not hold up
        // the join).
        if let Some(pump) = self.output.take() {
            pump.finish(pump::DRAIN_WAIT);
        }
        exit_reason(self.what(), status)
    }
}

/// How a server ended: "the fork server exited (killed by signal 9,
/// SIGKILL)".
fn exit_reason(what: &str, status: Option<ExitStatus>) -> String {
    let how = match status.map(|s| (s.signal(), s.code())) {
        Some((Some(sig), _)) => format!(" (killed by signal {sig}{})", signal_name(sig)),
        Some((None, Some(code))) => format!(" (exit status {code})"),
        _ => String::new(),
    };
    format!("{what} exited{how}")
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => ", SIGHUP",
        libc::SIGINT => ", SIGINT",
        libc::SIGQUIT => ", SIGQUIT",
        libc::SIGABRT => ", SIGABRT",
        libc::SIGKILL => ", SIGKILL",
        libc::SIGSEGV => ", SIGSEGV",
        libc::SIGTERM => ", SIGTERM",
        _ => "",
    }
}

/// The engine reads a local worker's progress from its status words.
impl Progress for SharedWords {
    fn started(&self, slot: usize) -> u64 {
        self.status(slot).started.load(Ordering::SeqCst)
    }
    fn started_at_ns(&self, slot: usize) -> u64 {
        self.status(slot).start_ns.load(Ordering::SeqCst)
    }
    fn running(&self, slot: usize, seq: u64) -> bool {
        self.status(slot).running(seq)
    }
    fn skip(&self, slot: usize) -> u64 {
        self.status(slot).skip.load(Ordering::SeqCst)
    }
    fn set_skip(&self, slot: usize, seq: u64) {
        self.status(slot).skip.store(seq, Ordering::SeqCst);
    }
    fn item_cpu(&self, slot: usize) -> u64 {
        self.status(slot).item_cpu.load(Ordering::SeqCst)
    }
    fn item(&self, slot: usize) -> u64 {
        self.status(slot).item.load(Ordering::SeqCst)
    }
    fn died_of(&self, slot: usize) -> u64 {
        self.status(slot).died_of.load(Ordering::SeqCst)
    }
}

/// How many slots a local pool of `processes` workers makes room for: as
/// many as a pool of `max(2 × processes, 1024)` workers uses (the status
/// words of a slot never used are never touched: 48 bytes each, or a page
/// each in a sandboxed pool, of a sparse memfd).
pub(crate) fn slot_capacity(processes: usize) -> usize {
    crate::engine::size::slots_for((2 * processes).max(1024))
}

/// The words of a pool of `slots` workers (a page each when sandboxed:
/// all of the words a sandboxed worker keeps mapped).
pub(crate) fn words(slots: usize, sandboxed: bool) -> Result<Arc<SharedWords>, Error> {
    let words = if sandboxed {
        SharedWords::paged(slots)
    } else {
        SharedWords::new(slots * STATUS_WORDS)
    };
    Ok(Arc::new(
        words.map_err(|e| Error::io("mapping shared memory", e))?,
    ))
}

/// Starts the fork server as a fork of the caller ([`StartMethod::Fork`]).
fn fork_server(setup: Setup) -> Result<(OwnedFd, libc::pid_t), Error> {
    let (parent_end, server_end) =
        sys::seqpacket_pair().map_err(|e| Error::io("creating the fork server socket", e))?;
    // Hold the stdio locks across the fork: no other thread is then in
    // the middle of printing, and the children (whose one thread is a
    // copy of this one) own the locks and can print. Flush so buffered
    // output is not printed twice.
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let _ = out.flush();
    let _ = err.flush();
    // Settled here, before the fork: a OnceLock that another thread was
    // initialising at the fork would stay "being initialised" in the
    // children forever, and a worker's first wait would hang on it.
    crate::proto::idle::spin_budget();
    // Every signal stays blocked across the fork, until the server has
    // left the terminal's job and set its own dispositions (server::run):
    // a Ctrl-C meanwhile must not kill it with the host's dispositions.
    let mask = sys::block_all_signals();
    let forked = sys::fork().map_err(|e| Error::io("forking the fork server", e));
    if !matches!(forked, Ok(sys::Forked::Child)) {
        sys::restore_signal_mask(&mask);
    }
    let server_pid = match forked? {
        sys::Forked::Child => {
            drop(parent_end);
            server::run(server_end, &setup)
        }
        sys::Forked::Parent(pid) => pid,
    };
    drop(err);
    drop(out);
    drop(server_end);
    Ok((parent_end, server_pid))
}
