//! Signals: `SIGCHLD` as a signalfd, the signal mask, and the dispositions
//! the pool's processes start with, whatever the host set (issue 11: the
//! host's signals and terminal do not reach the pool's processes).

use super::cvt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Makes `SIGCHLD` the one signal blocked in the calling (single) thread
/// and returns a signalfd that becomes readable when a child changes state.
/// (The fork server calls it with every signal blocked, once its
/// dispositions are set: see [`default_dispositions`].)
pub(crate) fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: set is a local sigset_t that the calls initialise and read.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        cvt(libc::pthread_sigmask(
            libc::SIG_SETMASK,
            &set,
            std::ptr::null_mut(),
        ))?;
        Ok(fd)
    }
}

/// Unblocks every signal and restores the default `SIGCHLD` disposition, in
/// a new worker (the fork server blocks `SIGCHLD`; its other dispositions,
/// which the worker inherits, are already those of [`default_dispositions`]).
pub(crate) fn reset_signals() {
    // SAFETY: set is a local sigset_t; signal() with SIG_DFL has no preconditions.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    }
}

/// A signal mask, as [`block_all_signals`] found it.
pub(crate) struct SigMask(libc::sigset_t);

/// Blocks every signal (but SIGKILL and SIGSTOP, which cannot be) in the
/// calling thread; returns the mask it replaced, for [`restore_signal_mask`].
pub(crate) fn block_all_signals() -> SigMask {
    // SAFETY: both sets are local sigset_t values: sigfillset initialises
    // `all`, pthread_sigmask fills `old` (all-zero is a valid empty set if
    // the call fails, which it cannot with SIG_SETMASK and valid pointers).
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        SigMask(old)
    }
}

/// Sets the calling thread's signal mask back to `mask`.
pub(crate) fn restore_signal_mask(mask: &SigMask) {
    // SAFETY: mask holds a set that pthread_sigmask filled in.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask.0, std::ptr::null_mut()) };
}

/// Gives every signal the disposition it has in a freshly started Rust
/// program: the default action, except SIGPIPE, ignored (as the standard
/// library sets it up, so that a write to a closed pipe is an `EPIPE`
/// error), and SIGSEGV and SIGBUS, left alone (the handlers the standard
/// library installs to report a stack overflow). Whatever the process
/// inherited (a SIGINT handler of the host, SIGCHLD or SIGINT ignored by
/// whoever started the program) is gone.
///
/// Each signal is set to "ignored" first: that discards one of it that is
/// pending (sent to the terminal's job while this process was still in it
/// and had every signal blocked), which would otherwise be delivered, with
/// its default action, once the signals are unblocked.
pub(crate) fn default_dispositions() {
    // Not the numbers between 31 and SIGRTMIN: the C library keeps them
    // for itself (thread cancellation, set*id across threads).
    for sig in (1..32).chain(libc::SIGRTMIN()..=libc::SIGRTMAX()) {
        if matches!(
            sig,
            libc::SIGKILL | libc::SIGSTOP | libc::SIGSEGV | libc::SIGBUS
        ) {
            continue;
        }
        set_disposition(sig, libc::SIG_IGN);
        if sig != libc::SIGPIPE {
            set_disposition(sig, libc::SIG_DFL);
        }
    }
}

fn set_disposition(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: sa is a local sigaction, zeroed (no flags, no mask) and given
    // SIG_IGN or SIG_DFL, which run no code of ours.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Ignores `SIGPIPE`, as std does before `main` in a Rust program (the
/// exec'd fork server never gets there): a write to a closed pipe in a
/// task is then an `EPIPE` error, as it would be in the host.
pub(crate) fn ignore_sigpipe() {
    // SAFETY: signal() with SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
