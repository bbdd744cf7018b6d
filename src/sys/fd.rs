//! File descriptors: reading, non-blocking mode, the fds a forked child
//! inherited (pointed at `/dev/null` or closed), stdin, fds inherited
//! through exec by number, and the open-file limit.

use super::{cvt, cvt_size};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Puts an fd in non-blocking mode.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    set_nonblocking_raw(fd.as_raw_fd())
}

/// [`set_nonblocking`] for an fd this process holds by number (its own
/// stdout, say).
pub(crate) fn set_nonblocking_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments; on an fd that is not open it
    // fails with EBADF.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// `read(2)` into `buf`, retrying on `EINTR`. `Ok(0)` is end-of-file.
pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Empties a signalfd (or eventfd) that is in non-blocking mode.
pub(crate) fn drain(fd: RawFd) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = read(fd, &mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// In a freshly forked child: points every inherited fd from 3 up, except
/// those in `keep`, at `/dev/null` (close-on-exec).
///
/// The child's memory still holds the host's values that own those fds (a
/// `File` in a static, another pool's sockets): closing the fds would let
/// their numbers be reused for this process's own sockets and memory
/// blocks, and a task that wrote to the host's file would write into them.
/// Pointed at `/dev/null`, the numbers stay taken, harmlessly, and the
/// real files and sockets are released in this process (so another pool's
/// worker still sees end-of-file when its parent closes its end).
pub(crate) fn neuter_fds_except(keep: &[RawFd]) {
    let listed: Option<Vec<RawFd>> = std::fs::read_dir("/proc/self/fd").ok().map(|d| {
        d.flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect()
    });
    // SAFETY: a NUL-terminated static path and integer flags.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    let (Some(fds), true) = (listed, null >= 0) else {
        close_fds_except(keep);
        return;
    };
    for fd in fds {
        if fd < 3 || fd == null || keep.contains(&fd) {
            continue;
        }
        // SAFETY: dup3 atomically replaces what `fd` refers to; the fd was
        // listed as open a moment ago (the directory's own fd, now closed,
        // simply becomes a /dev/null too).
        unsafe { libc::dup3(null, fd, libc::O_CLOEXEC) };
    }
    close_fd(null);
}

/// Closes one fd that the caller owns by number only (in a forked child,
/// whose owning values are never dropped there).
pub(crate) fn close_fd(fd: RawFd) {
    // SAFETY: the caller owns `fd`; closing a closed fd is a harmless EBADF.
    unsafe { libc::close(fd) };
}

/// Closes every fd from 3 up, except those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&f| f >= 3).collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for k in keep {
        let k = k as u32;
        if k > from {
            close_range(from, k - 1);
        }
        from = k + 1;
    }
    close_range(from, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes fds. It is the fallback where
    // /proc/self/fd cannot be read, in a freshly forked child; values that
    // still own those numbers there are never used by the child's code
    // (see neuter_fds_except for what a task could still reach).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r == -1 {
        // Kernels before 5.9: close one by one up to the fd limit.
        // SAFETY: sysconf has no preconditions.
        let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
        let max = if max < 0 { 1024 } else { max as u64 };
        let last = (last as u64).min(max);
        for fd in first as u64..=last {
            // SAFETY: as above; closing a closed fd is a harmless EBADF.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

/// This process's open-file limit (the soft `RLIMIT_NOFILE`), for messages:
/// `None` where it is unlimited or cannot be read.
pub(crate) fn open_file_limit() -> Option<u64> {
    soft_nofile().filter(|&n| n != libc::RLIM_INFINITY)
}

/// This process's soft limit on open files (`RLIMIT_NOFILE`; 1024 where it
/// cannot be read).
pub(crate) fn fd_soft_limit() -> u64 {
    soft_nofile().unwrap_or(1024)
}

/// The soft `RLIMIT_NOFILE`, if `getrlimit` answers.
fn soft_nofile() -> Option<u64> {
    // SAFETY: rl is a plain-data out-parameter for getrlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid resource and out-pointer.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (r == 0).then_some(rl.rlim_cur)
}

/// Points fd 0 at `/dev/null`, as Python's pool does for its workers: a
/// task that reads stdin gets end-of-file instead of competing with the
/// host for the terminal (and, outside the terminal's foreground job,
/// instead of being stopped by SIGTTIN).
pub(crate) fn stdin_from_dev_null() {
    // SAFETY: a NUL-terminated static path and integer flags. The fd is not
    // close-on-exec, which is what fd 0 must be; this single-threaded
    // process execs nothing while it is open.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    if null > 0 {
        // SAFETY: dup2 onto fd 0, which this process owns as its stdin;
        // then close the fd that open returned, which we alone own.
        unsafe {
            libc::dup2(null, 0);
            libc::close(null);
        }
    }
}

/// Makes `out` and `err`, where given, this process's stdout and stderr
/// (fds 1 and 2, not close-on-exec); the caller then drops its own copies.
pub(crate) fn redirect_stdio(out: Option<&OwnedFd>, err: Option<&OwnedFd>) -> io::Result<()> {
    for (fd, to) in [(out, 1), (err, 2)] {
        if let Some(fd) = fd {
            // SAFETY: dup2 of an fd this process holds onto fd 1 or 2,
            // which this process owns as its stdout or stderr.
            super::cvt(unsafe { libc::dup2(fd.as_raw_fd(), to) })?;
        }
    }
    Ok(())
}

/// Takes ownership of an fd that this process inherited through exec by
/// number (named by its parent), after checking it is open; makes it
/// close-on-exec again.
pub(crate) fn adopt_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: fcntl on an integer fd: EBADF if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return None;
    }
    // SAFETY: the fd is open, and its number was handed to this process
    // (through the environment, by the parent that left it open across
    // exec) for it alone to own; nothing else in this fresh image uses it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of `fd` numbered 3 or above: for an fd that
/// must not be mistaken for stdin, stdout or stderr (a program started with
/// those closed gets its first sockets at 0-2).
pub(crate) fn dup_above_stdio(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open fd makes a new fd.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: a fresh fd that we alone own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_open_file_limits_read_the_same_soft_limit() {
        let soft = fd_soft_limit();
        assert!(soft > 3);
        match open_file_limit() {
            Some(n) => assert_eq!(n, soft),
            None => assert_eq!(soft, libc::RLIM_INFINITY),
        }
    }

    #[test]
    fn a_duplicate_above_stdio_reads_the_same_socket() {
        let (a, b) = crate::sys::stream_pair().unwrap();
        let dup = dup_above_stdio(&a).unwrap();
        assert!(dup.as_raw_fd() >= 3 && dup.as_raw_fd() != a.as_raw_fd());
        crate::sys::send_all(b.as_raw_fd(), b"ok").unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(read(dup.as_raw_fd(), &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"ok");
    }
}
