//! Waiting for fds to become ready: `poll(2)`.

use super::cvt;
use std::io;
use std::os::fd::RawFd;

/// `poll(2)` on `fds`, retrying on `EINTR` (with the same timeout).
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: fds is a valid mutable slice of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => return Ok(n as usize),
        }
    }
}

/// Whether `fd` has data (or end-of-file) to read right now.
pub(crate) fn readable_now(fd: RawFd) -> bool {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(poll(&mut p, 0), Ok(n) if n > 0)
}

/// Waits until `fd` is readable (or hung up), at most `timeout`; returns
/// whether it is.
pub(crate) fn wait_readable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    Ok(poll(&mut p, ms)? > 0)
}
