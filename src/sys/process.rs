//! Processes: `fork` and `_exit`, signals to children and waits for them,
//! a session of one's own and death with one's parent, spawning a program
//! that keeps some fds across its exec, and the count of forks that tells
//! a copy in a child from the value it was made from.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;

/// What `fork` returned.
pub(crate) enum Forked {
    /// In the child.
    Child,
    /// In the parent, with the child's pid.
    Parent(libc::pid_t),
}

/// `fork(2)`. The child must keep to async-signal-safe work until it has
/// made sure that no lock it needs was held by another thread of the parent
/// (`ARCHITECTURE.md`, invariant 2); in this crate it only ever runs the fork
/// server or a worker.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions; the callers keep the
    // child's work to the fork server and the worker loop (ARCHITECTURE.md).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p)),
    }
}

/// Ends the calling process at once, without running atexit handlers or
/// flushing stdio buffers that a forked child shares with its parent.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// Sends `sig` to `pid`. Only the fork server calls this, and only for
/// children it has not yet reaped (so the pid cannot have been reused).
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Waits until child `pid` has stopped (after a SIGSTOP), without reaping
/// it if it exits instead; returns whether it stopped.
pub(crate) fn wait_stopped(pid: libc::pid_t) -> bool {
    loop {
        // SAFETY: info is a plain-data out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid id type, pid and out-pointer. WNOWAIT leaves the
        // child waitable: an exit is still reaped by the SIGCHLD loop.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == -1 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        return info.si_code == libc::CLD_STOPPED;
    }
}

/// Reaps any exited child without blocking: `(pid, raw wait status)`.
pub(crate) fn try_reap_any() -> Option<(libc::pid_t, i32)> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid > 0 { Some((pid, status)) } else { None }
}

/// Waits for (and reaps) one specific child; returns its raw wait status.
/// Whether process `pid` exists and is a child of this process (a child
/// that has exited but is not yet released by the kernel counts): its
/// `/proc` entry names this process as its parent.
pub(crate) fn is_our_child(pid: libc::pid_t) -> bool {
    stat_number(pid as u32, 4) == Some(u64::from(std::process::id()))
}

/// Field `n` (numbered from 1, as in proc(5)) of `/proc/PID/stat`, a
/// number from field 3 on.
fn stat_number(pid: u32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses,
    // so the fields are counted from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

pub(crate) fn reap(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(status);
    }
}

/// Kills and reaps a child that this process spawned and has not reaped.
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    kill(pid, libc::SIGKILL);
    let _ = reap(pid);
}

/// Moves the calling process into a new session of its own (`setsid`),
/// and so a new process group, with no controlling terminal: the SIGINT,
/// SIGQUIT and SIGTSTP that a terminal sends to its foreground job
/// (Ctrl-C, Ctrl-\, Ctrl-Z) no longer reach it, nor the children it forks
/// after; and a task that opens the terminal (`/dev/tty`) gets an error
/// (ENXIO) instead of being stopped by SIGTTIN or SIGTTOU forever, as a
/// background job of the terminal would be. Where `setsid` is refused (the
/// process already leads a group: the exec'd server, which became a session
/// leader before its exec), a process group of its own.
pub(crate) fn own_process_group() {
    // SAFETY: setsid and setpgid take no pointers. setsid fails only for a
    // group leader, which setpgid(0, 0) leaves as it is.
    unsafe {
        if libc::setsid() == -1 {
            libc::setpgid(0, 0);
        }
    }
}

/// Sets the calling thread's name (`comm`, which `ps -o comm`, `top`,
/// `pgrep` and crash logs show of a process whose only thread it is), cut
/// to the kernel's 15 bytes.
pub(crate) fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: buf is a live array of 16 bytes whose last is NUL;
    // PR_SET_NAME reads at most 16 bytes from it.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Asks the kernel to SIGKILL this process when its parent (the fork
/// server, which has one thread) exits; returns the parent pid to check
/// against, since the parent may already have gone.
pub(crate) fn die_with_parent() -> libc::pid_t {
    // SAFETY: prctl with integer arguments; getppid has no preconditions.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::getppid()
    }
}

/// Spawns `cmd` in a session of its own, with the fds in `keep` left open
/// across its exec (they are close-on-exec here, and stay so: only the
/// child clears the flag, after the fork, so no other thread's spawn can
/// inherit them).
pub(crate) fn spawn_keeping(
    cmd: &mut std::process::Command,
    keep: [RawFd; 3],
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and
    // makes only setsid and fcntl calls, which are async-signal-safe, on
    // itself and on fds that it inherited from this process; it touches no
    // lock and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own from before the exec (see
            // own_process_group): no terminal's signal can reach the
            // server while it starts.
            libc::setsid();
            for fd in keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Removes a variable from the environment of this single-threaded
/// process (the exec'd fork server, before it starts any worker).
pub(crate) fn remove_env_single_threaded(key: &str) {
    // SAFETY: the exec'd fork server has one thread (it never ran `main`,
    // and the constructors it ran do not leave threads that read the
    // environment), so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(key) };
}

static FORKS: AtomicU64 = AtomicU64::new(0);
static FORKS_WATCHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn count_fork_in_child() {
    // An atomic add: async-signal-safe, as work in a fork child must be.
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A number that differs in the child of every `fork()` of this process
/// from what it was in the parent at the fork (from the first call on): a
/// value made in one process can tell that it is a copy in a child.
pub(crate) fn fork_generation() -> u64 {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that glibc calls in the child after
        // each fork(); the handler only increments an atomic, which is
        // async-signal-safe, and is a plain function that lives as long
        // as the process.
        let r = unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
        FORKS_WATCHED.store(r == 0, std::sync::atomic::Ordering::SeqCst);
    });
    if FORKS_WATCHED.load(std::sync::atomic::Ordering::Relaxed) {
        FORKS.load(std::sync::atomic::Ordering::Relaxed)
    } else {
        // No handler (pthread_atfork failed): the pid tells a child apart.
        // SAFETY: getpid has no preconditions.
        u64::from(unsafe { libc::getpid() } as u32) << 32
    }
}

/// How many threads process `pid` has (its `/proc/PID/stat`), if it can
/// be read.
pub(crate) fn thread_count(pid: u32) -> Option<usize> {
    // `stat` (field 20, num_threads) costs the kernel less than `status`.
    stat_number(pid, 20).map(|n| n as usize)
}

/// The size of process `pid`'s address space in bytes (`VmSize` in its
/// `/proc/PID/status`), if it can be read.
pub(crate) fn address_space(pid: u32) -> Option<u64> {
    status_number(pid, "VmSize:")?.checked_mul(1024)
}

/// The number after `key` in `/proc/PID/status` (its unit dropped).
fn status_number(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_ours_until_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        assert!(is_our_child(pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_our_child(pid), "reaped: gone");
        assert!(!is_our_child(1), "init is nobody's child here");
    }

    #[test]
    fn threads_and_address_space_are_read_from_proc() {
        let me = std::process::id();
        let before = thread_count(me).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            ready_tx.send(()).unwrap();
            rx.recv().ok();
        });
        ready_rx.recv().unwrap();
        assert!(thread_count(me).unwrap() > before.min(1));
        assert!(thread_count(me).unwrap() >= 2);
        tx.send(()).unwrap();
        t.join().unwrap();
        assert!(address_space(me).unwrap() > 1 << 20);
        assert_eq!(thread_count(u32::MAX), None);
    }
}
