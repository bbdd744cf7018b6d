//! The fork server: a single-threaded child that the pool forks once, before
//! it starts any thread, and that forks every worker after that.
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
//! server → parent: `SPAWNED slot pid` (+ the worker's socket),
//! `SPAWN_FAILED slot errno` (slot `u32::MAX`: the server could not set
//! itself up, and exits), `EXITED pid status`, `KILL_REFUSED pid`, and
//! first of all, from a server started by exec, `HELLO 0 pid`.
//! End-of-file from the parent (it closed the socket, or died) makes the
//! server SIGKILL every worker, reap them all, and exit.

use crate::proto::status::{SharedWords, Status};
use crate::sys;
use crate::worker;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) const SPAWN: u32 = 1;
pub(crate) const KILL: u32 = 2;
pub(crate) const SPAWNED: u32 = 3;
pub(crate) const SPAWN_FAILED: u32 = 4;
pub(crate) const EXITED: u32 = 5;
pub(crate) const KILL_REFUSED: u32 = 6;
/// The first message of a server started by exec: `HELLO 0 pid`.
pub(crate) const HELLO: u32 = 7;

/// One message between the parent and the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Msg {
    pub(crate) kind: u32,
    pub(crate) slot: u32,
    pub(crate) a: u64,
    pub(crate) b: u64,
}

impl Msg {
    pub(crate) fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.a.to_le_bytes());
        b[16..24].copy_from_slice(&self.b.to_le_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<Msg> {
        if b.len() != 24 {
            return None;
        }
        Some(Msg {
            kind: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            slot: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            a: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            b: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }
}

pub(crate) use crate::proto::task::Init;

/// What the server needs to start workers; it is in the server's memory from
/// the fork on.
pub(crate) struct Spec {
    pub(crate) init: Option<Init>,
    pub(crate) words: std::sync::Arc<SharedWords>,
    pub(crate) sock_buf: usize,
    /// The sandbox asked for (in the parent, and in the config it writes).
    pub(crate) sandbox: Option<crate::sandbox::Spec>,
    /// The sandbox as this server prepared it, for every worker.
    pub(crate) prepared: Option<crate::sandbox::Prepared>,
}

/// The server's main loop; runs in the forked child and never returns.
///
/// First it leaves the terminal's foreground job and sets its signals, for
/// itself and every worker it will fork (whatever starts it): a process
/// group of its own, so that the terminal's Ctrl-C (SIGINT to that job)
/// reaches the host program, which decides what becomes of its pool, and
/// never the pool's processes; every disposition back to a Rust program's
/// defaults, so that neither a handler of the host nor a disposition
/// inherited as ignored reaches a task (SIGCHLD ignored would also make the
/// kernel reap the workers and lose their exit status); and stdin from
/// `/dev/null`. Signals stay blocked until that is done (the parent blocks
/// them across the fork), and one sent to the old group meanwhile is
/// discarded.
pub(crate) fn run(sock: OwnedFd, spec: &Spec) -> ! {
    sys::block_all_signals();
    sys::own_process_group();
    sys::default_dispositions();
    worker::mark_worker_process();
    let fd = sock.as_raw_fd();
    sys::neuter_fds_except(&[fd]);
    if fd != 0 {
        sys::stdin_from_dev_null();
    }
    // SIGCHLD stays blocked (it is read from the signalfd); every other
    // signal is unblocked.
    let sigfd = match sys::sigchld_fd() {
        Ok(s) => s,
        Err(e) => {
            // Out of fds, say: tell the parent why no worker will start.
            let m = Msg {
                kind: SPAWN_FAILED,
                slot: u32::MAX,
                a: e.raw_os_error().unwrap_or(0) as u64,
                b: 0,
            };
            let _ = sys::send_with_fds(fd, &m.to_bytes(), &[]);
            sys::exit_now(2)
        }
    };
    let me = std::process::id() as libc::pid_t;
    // Workers inherit the spin budget computed here: computing it reads
    // /proc/self/cgroup, which a worker would otherwise do (an fd open for
    // a moment) right after it says READY, and which a sandboxed worker
    // may not open.
    let _ = crate::proto::idle::spin_budget();
    let mut live: Vec<libc::pid_t> = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if sys::poll(&mut fds, -1).is_err() {
            shut_down(&live);
        }
        if fds[1].revents != 0 {
            sys::drain(sigfd.as_raw_fd());
            while let Some((pid, status)) = sys::try_reap_any() {
                live.retain(|&p| p != pid);
                let m = Msg {
                    kind: EXITED,
                    slot: 0,
                    a: pid as u64,
                    b: status as u32 as u64,
                };
                if sys::send_with_fds(fd, &m.to_bytes(), &[]).is_err() {
                    shut_down(&live);
                }
            }
        }
        if fds[0].revents != 0 {
            let (n, _) = match sys::recv_with_fds(fd, &mut buf) {
                Ok(r) => r,
                Err(_) => shut_down(&live),
            };
            if n == 0 {
                shut_down(&live);
            }
            let Some(m) = Msg::from_bytes(&buf[..n]) else {
                continue;
            };
            match m.kind {
                SPAWN => match spawn(m.slot, fd, sigfd.as_raw_fd(), me, spec) {
                    Ok((pid, parent_end)) => {
                        live.push(pid);
                        let reply = Msg {
                            kind: SPAWNED,
                            slot: m.slot,
                            a: pid as u64,
                            b: 0,
                        };
                        if sys::send_with_fds(fd, &reply.to_bytes(), &[parent_end.as_raw_fd()])
                            .is_err()
                        {
                            shut_down(&live);
                        }
                    }
                    Err(e) => {
                        let reply = Msg {
                            kind: SPAWN_FAILED,
                            slot: m.slot,
                            a: e.raw_os_error().unwrap_or(0) as u64,
                            b: 0,
                        };
                        if sys::send_with_fds(fd, &reply.to_bytes(), &[]).is_err() {
                            shut_down(&live);
                        }
                    }
                },
                KILL => {
                    let pid = m.a as libc::pid_t;
                    if !live.contains(&pid) {
                        continue;
                    }
                    if m.b == 0 || still_running(pid, spec.words.status(m.slot as usize), m.b) {
                        sys::kill(pid, libc::SIGKILL);
                    } else {
                        let reply = Msg {
                            kind: KILL_REFUSED,
                            slot: m.slot,
                            a: m.a,
                            b: m.b,
                        };
                        if sys::send_with_fds(fd, &reply.to_bytes(), &[]).is_err() {
                            shut_down(&live);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Forks one worker; returns its pid and the parent's end of its socket.
fn spawn(
    slot: u32,
    server_fd: i32,
    sigfd: i32,
    me: libc::pid_t,
    spec: &Spec,
) -> std::io::Result<(libc::pid_t, OwnedFd)> {
    let (parent_end, worker_end) = sys::stream_pair()?;
    sys::set_socket_buffers(&parent_end, spec.sock_buf);
    sys::set_socket_buffers(&worker_end, spec.sock_buf);
    spec.words.status(slot as usize).reset();
    match sys::fork()? {
        sys::Forked::Child => {
            // Of the server's own fds, keep only this worker's end (the
            // host's inherited fds already point at /dev/null).
            sys::close_fd(server_fd);
            sys::close_fd(sigfd);
            drop(parent_end);
            sys::reset_signals();
            if sys::die_with_parent() != me {
                sys::exit_now(1);
            }
            // This process never returns from here: its words live as
            // long as it does.
            let words: &'static SharedWords = Box::leak(Box::new(spec.words.clone()));
            let status = if spec.prepared.is_some() {
                // Only this worker's own page stays mapped.
                crate::sandbox::isolate_words(words, slot as usize)
            } else {
                words.status(slot as usize)
            };
            if spec.prepared.is_some() {
                // Each task (each item of a chunk) records where its CPU
                // time starts, for the per-task CPU cap.
                crate::deadline::record_item_cpu_in(status.item_cpu);
            }
            worker::run(
                worker_end,
                status,
                spec.init.as_ref(),
                spec.prepared.as_ref(),
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
fn still_running(pid: libc::pid_t, status: Status<'_>, seq: u64) -> bool {
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
