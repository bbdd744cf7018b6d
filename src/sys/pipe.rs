//! Pipes and stdio: the pipes that carry a sandboxed pool's output to the
//! parent, a write to an fd that is not ours to own (the program's stdout
//! and stderr), and C's stdio buffers.

use super::{cvt, cvt_size};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A pipe, both ends close-on-exec: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid out-array of two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both fds are open and owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `write(2)` of `buf` to `fd`, once, retrying on `EINTR`: how many bytes
/// went. `fd` need not be ours (the program's stdout, say): it is only
/// written, never closed.
pub(crate) fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid readable region of buf.len() bytes; a
        // write to an fd that was closed or reused fails or writes bytes,
        // which is no memory-safety matter.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Writes out every buffer of C's stdio (`fflush(NULL)`): what C code a
/// task called (`printf`) left there, which `_exit` would lose.
pub(crate) fn flush_c_stdio() {
    // SAFETY: fflush(NULL) flushes every open stream; it takes the
    // streams' locks, which no other thread of a worker holds (a worker
    // has one thread when it exits, and a forked child's stdio locks are
    // reset by glibc's fork handlers).
    unsafe { libc::fflush(std::ptr::null_mut()) };
}
