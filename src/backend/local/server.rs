//! The fork server: a single-threaded child of the pool, one per pool,
//! that forks every worker: a fresh exec of the program, or a fork of the
//! caller (`start.rs`; `README.md` beside this file for what each leaves
//! in a worker).
//!
//! `fork()` in a process with threads copies only the calling thread; a lock
//! held by another thread stays locked forever in the child. The pool has
//! threads as soon as it runs, so it never forks again itself: it asks this
//! server, whose one thread holds no lock, and gets each worker's socket back
//! over `SCM_RIGHTS`. The server is also the only process that reaps the
//! workers, so it is the only one that may signal them: a pid it has not
//! reaped cannot have been reused.
//!
//! Protocol (24-byte datagrams on a `SOCK_SEQPACKET` pair):
//! parent → server: `SPAWN slot`, `KILL slot pid seq` (seq 0: whatever the
//! worker runs; else only while the worker's shared word says it runs task
//! `seq`, so a cancel never kills the task after the one it was for);
//! server → parent: `SPAWNED slot pid` (+ the worker's socket, then the
//! read ends of its stdout and stderr pipes where the pool pipes them:
//! `output.rs`),
//! `SPAWN_FAILED slot errno` (slot `u32::MAX`: the server could not set
//! itself up, and exits), `EXITED pid status`, `KILL_REFUSED pid`, and
//! first of all, from a server started by exec, `HELLO 0 pid ready`
//! (`ready` says whether its sandbox could be had: `start.rs`).
//! End-of-file from the parent (it closed the socket, or died) makes the
//! server SIGKILL every worker, reap them all, and exit.

use super::output::{Streams, WorkerPipes};
use crate::sys;
use crate::worker;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

const SPAWN: u32 = 1;
const KILL: u32 = 2;
const SPAWNED: u32 = 3;
const SPAWN_FAILED: u32 = 4;
const EXITED: u32 = 5;
const KILL_REFUSED: u32 = 6;
const HELLO: u32 = 7;

/// One message between the parent and the server. On the wire, 24 bytes:
/// `kind: u32 | slot: u32 | a: u64 | b: u64` (little-endian), where what
/// `slot`, `a` and `b` carry depends on the kind; only `to_bytes` and
/// `from_bytes` know where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Msg {
    /// Parent to server: fork a worker for `slot`.
    Spawn { slot: u32 },
    /// Parent to server: kill worker `pid` of `slot`: whatever it runs
    /// (`task` 0), or only while it runs `task`.
    Kill { slot: u32, pid: u32, task: u64 },
    /// Server to parent: worker `pid` runs in `slot` (its socket and pipes
    /// come with the message).
    Spawned { slot: u32, pid: u32 },
    /// Server to parent: no worker for `slot`, and why (an errno; 0 if
    /// none). Slot `u32::MAX`: the server could not set itself up, and
    /// exits.
    SpawnFailed { slot: u32, errno: i32 },
    /// Server to parent: worker `pid` exited (it is reaped), with this wait
    /// status.
    Exited { pid: u32, status: i32 },
    /// Server to parent: the kill of worker `pid` for `task` was refused
    /// (it runs that task no longer).
    KillRefused { slot: u32, pid: u32, task: u64 },
    /// Server to parent, its first message, from a server started by exec:
    /// its pid, and whether its sandbox could be had (`start.rs`).
    Hello { pid: u32, sandbox: u64 },
    /// A kind this side does not know: ignored.
    Other { kind: u32 },
}

impl Msg {
    pub(crate) fn to_bytes(self) -> [u8; 24] {
        let (kind, slot, a, b) = match self {
            Msg::Spawn { slot } => (SPAWN, slot, 0, 0),
            Msg::Kill { slot, pid, task } => (KILL, slot, pid as u64, task),
            Msg::Spawned { slot, pid } => (SPAWNED, slot, pid as u64, 0),
            Msg::SpawnFailed { slot, errno } => (SPAWN_FAILED, slot, errno as u64, 0),
            Msg::Exited { pid, status } => (EXITED, 0, pid as u64, status as u32 as u64),
            Msg::KillRefused { slot, pid, task } => (KILL_REFUSED, slot, pid as u64, task),
            Msg::Hello { pid, sandbox } => (HELLO, 0, pid as u64, sandbox),
            Msg::Other { kind } => (kind, 0, 0, 0),
        };
        let mut bytes = [0u8; 24];
        bytes[0..4].copy_from_slice(&kind.to_le_bytes());
        bytes[4..8].copy_from_slice(&slot.to_le_bytes());
        bytes[8..16].copy_from_slice(&a.to_le_bytes());
        bytes[16..24].copy_from_slice(&b.to_le_bytes());
        bytes
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Msg> {
        if bytes.len() != 24 {
            return None;
        }
        let kind = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
        let slot = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        let a = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let b = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        // A pid and a wait status travel as their 32 bits.
        let pid = a as u32;
        Some(match kind {
            SPAWN => Msg::Spawn { slot },
            KILL => Msg::Kill { slot, pid, task: b },
            SPAWNED => Msg::Spawned { slot, pid },
            SPAWN_FAILED => Msg::SpawnFailed {
                slot,
                errno: a as i32,
            },
            EXITED => Msg::Exited {
                pid,
                status: b as u32 as i32,
            },
            KILL_REFUSED => Msg::KillRefused { slot, pid, task: b },
            HELLO => Msg::Hello { pid, sandbox: b },
            kind => Msg::Other { kind },
        })
    }
}

pub(crate) use crate::proto::task::Init;

/// What the server needs to start workers; it is in the server's memory from
/// the fork on.
pub(crate) struct Setup {
    pub(crate) init: Option<Init>,
    pub(crate) words: std::sync::Arc<crate::proto::words::SharedWords>,
    pub(crate) sock_buf: usize,
    /// The sandbox asked for (in the parent, and in the config it writes).
    pub(crate) sandbox: Option<crate::sandbox::Spec>,
    /// The sandbox as this server prepared it, for every worker.
    pub(crate) prepared: Option<crate::sandbox::Prepared>,
    /// Leave the MPI launcher's variables (`OMPI_*`, `PMIX_*`, `PMI_*`)
    /// out of an exec'd server's environment: a server on an MPI rank must
    /// not look like a rank to the MPI library that a task may load.
    pub(crate) without_mpi_env: bool,
    /// Where the workers' stdout and stderr go: the server gives each
    /// worker pipes of its own for the streams that go through the pool.
    pub(crate) output: Streams,
}

/// The server's main loop; runs in the forked child and never returns.
///
/// First it leaves the terminal's foreground job and sets its signals and
/// stdin, for itself and every worker it will fork, whatever started it
/// (`README.md` beside this file, "The terminal, signals and stdio").
pub(crate) fn run(sock: OwnedFd, setup: &Setup) -> ! {
    let fd = sock.as_raw_fd();
    // The sandbox's own fds (made while the server prepared it) stay.
    let mut keep = vec![fd];
    keep.extend(setup.prepared.as_ref().and_then(|p| p.own_fd()));
    let sigfd = set_up(&keep);
    let mut server = Server {
        fd,
        sigfd: sigfd.as_raw_fd(),
        me: std::process::id() as libc::pid_t,
        setup,
        live: Vec::with_capacity(64),
    };
    loop {
        let set = server.wait();
        if set.ready(1) {
            server.report_exits();
        }
        if set.ready(0) {
            server.serve_message();
        }
    }
}

/// The program's name, as the pool's processes carry it: the last part of
/// its argv[0] (which an exec'd server keeps), else of its executable's
/// path. Set once, by the server.
static PROGRAM: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn program_name() -> String {
    let last = |p: std::path::PathBuf| Some(p.file_name()?.to_string_lossy().into_owned());
    std::env::args_os()
        .next()
        .and_then(|a| last(a.into()))
        .or_else(|| last(std::env::current_exe().ok()?))
        .unwrap_or_else(|| "procpool".into())
}

/// The name (`comm`) of one of the pool's processes: the program's name,
/// cut so that `suffix` (`:srv`, `:w3`) fits in the kernel's 15 bytes.
/// The suffix keeps an exact match of the program's name (`pgrep -x`, a
/// kill by name) from taking in the pool's processes.
pub(crate) fn process_name(program: &str, suffix: &str) -> String {
    let mut cut = program.len().min(15usize.saturating_sub(suffix.len()));
    while !program.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &program[..cut])
}

/// Names the calling process (its one thread) `<program><suffix>`.
fn take_name(suffix: &str) {
    let program = PROGRAM.get_or_init(program_name);
    sys::set_thread_name(&process_name(program, suffix));
}

/// Sets this process up as the server (see [`run`]), keeping the fds in
/// `keep` (its socket to the parent first); returns the signalfd
/// that reports its workers' exits. Exits if it cannot have one.
fn set_up(keep: &[RawFd]) -> OwnedFd {
    let fd = keep[0];
    sys::block_all_signals();
    sys::own_process_group();
    sys::default_dispositions();
    worker::mark_pool_child();
    take_name(":srv");
    sys::neuter_fds_except(keep);
    if fd != 0 {
        sys::stdin_from_dev_null();
    }
    // SIGCHLD stays blocked (it is read from the signalfd); every other
    // signal is unblocked.
    let sigfd = match sys::sigchld_fd() {
        Ok(s) => s,
        Err(e) => {
            // Out of fds, say: tell the parent why no worker will start.
            let m = Msg::SpawnFailed {
                slot: u32::MAX,
                errno: errno(&e),
            };
            let _ = sys::send_with_fds(fd, &m.to_bytes(), &[]);
            sys::exit_now(2)
        }
    };
    // Workers inherit the spin budget computed here: computing it reads
    // /proc/self/cgroup, which a worker would otherwise do (an fd open for
    // a moment) right after it says READY, and which a sandboxed worker
    // may not open.
    let _ = crate::proto::idle::spin_budget();
    sigfd
}

/// An error's errno, as a message carries it.
fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The server's state: its socket to the parent, and its live workers.
struct Server<'a> {
    /// The socket to the parent.
    fd: RawFd,
    /// The signalfd that reports SIGCHLD.
    sigfd: RawFd,
    /// This process's pid (each worker checks that it is still its parent).
    me: libc::pid_t,
    setup: &'a Setup,
    /// The workers forked and not reaped yet: the only pids it may signal.
    live: Vec<libc::pid_t>,
}

impl Server<'_> {
    /// Waits for a message from the parent (index 0 of the set it
    /// returns) or a worker's exit (index 1).
    fn wait(&self) -> sys::PollSet {
        let mut set = sys::PollSet::default();
        set.push(self.fd, true, false);
        set.push(self.sigfd, true, false);
        if set.poll(-1).is_err() {
            shut_down(&self.live);
        }
        set
    }

    /// Sends `m` (with `fds`) to the parent; if it is gone, shuts down.
    fn send(&self, m: Msg, fds: &[RawFd]) {
        if sys::send_with_fds(self.fd, &m.to_bytes(), fds).is_err() {
            shut_down(&self.live);
        }
    }

    /// Reaps every worker that exited and tells the parent of each.
    fn report_exits(&mut self) {
        sys::drain(self.sigfd);
        while let Some((pid, status)) = sys::try_reap_any() {
            self.live.retain(|&p| p != pid);
            let pid = pid as u32;
            self.send(Msg::Exited { pid, status }, &[]);
        }
    }

    /// Reads one message from the parent and does what it asks.
    /// End-of-file (or an error) shuts the server down.
    fn serve_message(&mut self) {
        let mut buf = [0u8; 64];
        let n = match sys::recv_with_fds(self.fd, &mut buf) {
            Ok((n, _)) if n > 0 => n,
            _ => shut_down(&self.live),
        };
        let Some(m) = Msg::from_bytes(&buf[..n]) else {
            return;
        };
        match m {
            Msg::Spawn { slot } => self.spawn(slot),
            Msg::Kill { slot, pid, task } => self.kill(slot, pid, task),
            _ => {}
        }
    }

    /// Forks a worker for `slot` and sends the parent its socket and the
    /// read ends of its output pipes (or why it could not). The server
    /// keeps no end of any worker's pipes.
    fn spawn(&mut self, slot: u32) {
        let pipes = match WorkerPipes::new(self.setup.output.piped()) {
            Ok(p) => p,
            Err(e) => return self.spawn_failed(slot, &e),
        };
        match spawn(slot, self.fd, self.sigfd, self.me, self.setup, &pipes) {
            Ok((pid, parent_end)) => {
                self.live.push(pid);
                let mut fds = vec![parent_end.as_raw_fd()];
                fds.extend(pipes.read_fds());
                let reply = Msg::Spawned {
                    slot,
                    pid: pid as u32,
                };
                self.send(reply, &fds);
            }
            Err(e) => self.spawn_failed(slot, &e),
        }
    }

    /// Tells the parent that no worker could be forked for `slot`.
    fn spawn_failed(&self, slot: u32, e: &std::io::Error) {
        let errno = errno(e);
        self.send(Msg::SpawnFailed { slot, errno }, &[]);
    }

    /// Kills worker `pid` of `slot`: whatever it runs (`task` 0), or only
    /// while it runs `task`; else says the kill was refused.
    fn kill(&self, slot: u32, pid: u32, task: u64) {
        let target = pid as libc::pid_t;
        if !self.live.contains(&target) {
            return;
        }
        if task == 0 || still_running(target, self.setup.words.status(slot as usize), task) {
            sys::kill(target, libc::SIGKILL);
        } else {
            self.send(Msg::KillRefused { slot, pid, task }, &[]);
        }
    }
}

/// Forks one worker; returns its pid and the parent's end of its socket.
fn spawn(
    slot: u32,
    server_fd: i32,
    sigfd: i32,
    me: libc::pid_t,
    setup: &Setup,
    stdio: &WorkerPipes,
) -> std::io::Result<(libc::pid_t, OwnedFd)> {
    let (parent_end, worker_end) = sys::stream_pair()?;
    sys::set_socket_buffers(&parent_end, setup.sock_buf);
    sys::set_socket_buffers(&worker_end, setup.sock_buf);
    setup.words.status(slot as usize).reset();
    // The worker has its name from its first instant (its pid reaches the
    // parent before it could set one itself); the server takes its own
    // back at once.
    take_name(&format!(":w{slot}"));
    let forked = sys::fork();
    if !matches!(forked, Ok(sys::Forked::Child)) {
        take_name(":srv");
    }
    match forked? {
        sys::Forked::Child => {
            // Of the server's own fds, keep only this worker's end (the
            // host's inherited fds already point at /dev/null).
            sys::close_fd(server_fd);
            sys::close_fd(sigfd);
            drop(parent_end);
            // Its own pipes for the streams that go through the pool
            // (`output.rs`); no other fd of them stays open here.
            if stdio.install().is_err() {
                sys::exit_now(1);
            }
            if setup.output.piped()[0] {
                // Its stdout is a pipe, which C's stdio buffers whole:
                // what a task's C code printed goes out after each task.
                worker::flush_c_stdio_after_each_task();
            }
            sys::reset_signals();
            if sys::die_with_parent() != me {
                sys::exit_now(1);
            }
            // This process never returns from here: its words live as
            // long as it does.
            let words: &'static crate::proto::words::SharedWords =
                Box::leak(Box::new(setup.words.clone()));
            let status = if setup.prepared.is_some() {
                // Only this worker's own page stays mapped.
                crate::sandbox::isolate_words(words, slot as usize)
            } else {
                words.status(slot as usize)
            };
            if setup.prepared.is_some() {
                // Each task (each item of a chunk) records where its CPU
                // time starts, for the per-task CPU cap.
                crate::deadline::record_item_cpu_in(status.item_cpu);
            }
            worker::run(
                worker_end,
                status,
                setup.init.as_ref(),
                setup.prepared.as_ref(),
            )
        }
        sys::Forked::Parent(pid) => Ok((pid, parent_end)),
    }
}

/// Whether worker `pid` runs task `seq`, checked with the worker stopped
/// (SIGSTOP, then wait until it has stopped), so that it cannot move on to
/// its next task between the check and the kill. Resumes it (SIGCONT) if
/// it does not run that task. A worker that exits meanwhile is left for the
/// SIGCHLD loop to reap (waitid with WNOWAIT leaves it unreaped).
fn still_running(pid: libc::pid_t, status: crate::proto::words::Status<'_>, seq: u64) -> bool {
    if !status.running(seq) {
        return false;
    }
    sys::kill(pid, libc::SIGSTOP);
    if !sys::wait_stopped(pid) {
        return false;
    }
    let running = status.running(seq);
    if !running {
        sys::kill(pid, libc::SIGCONT);
    }
    running
}

/// The parent is gone or asked us to stop: kill and reap every worker, exit.
fn shut_down(live: &[libc::pid_t]) -> ! {
    for &pid in live {
        sys::kill(pid, libc::SIGKILL);
    }
    for &pid in live {
        let _ = sys::reap(pid);
    }
    sys::exit_now(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_name_keeps_its_suffix_within_15_bytes() {
        assert_eq!(process_name("myprog", ":srv"), "myprog:srv");
        assert_eq!(
            process_name("averyveryverylongname", ":w12"),
            "averyveryve:w12"
        );
        assert_eq!(process_name("ééééééééé", ":w1"), "éééééé:w1");
        assert!(process_name("ééééééééé", ":w10").len() <= 15);
    }

    #[test]
    fn a_message_travels_as_24_bytes() {
        let m = Msg::Kill {
            slot: 7,
            pid: u32::MAX - 1,
            task: 42,
        };
        let b = m.to_bytes();
        assert_eq!(&b[..4], &KILL.to_le_bytes());
        assert_eq!(&b[4..8], &7u32.to_le_bytes());
        assert_eq!(Msg::from_bytes(&b), Some(m));
        // A datagram of another size is no message.
        assert_eq!(Msg::from_bytes(&b[..23]), None);
        assert_eq!(Msg::from_bytes(&[b.as_slice(), &[0]].concat()), None);
    }

    #[test]
    fn an_error_without_an_errno_is_sent_as_0() {
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(errno(&e), libc::EMFILE);
        assert_eq!(errno(&std::io::Error::other("no errno")), 0);
    }
}
