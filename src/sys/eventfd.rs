//! The eventfd that wakes the supervisor thread.

use super::cvt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd, used to wake the supervisor thread.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd with integer flags.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a fresh fd that we alone own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Increments an eventfd (wakes whoever polls it).
pub(crate) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of a live u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}
