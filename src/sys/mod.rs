//! The only module that makes raw libc calls. Each function is a safe wrapper;
//! each `unsafe` block says why it holds. One file per mechanism; every
//! item is re-exported here, so callers name it `sys::name`. Nothing here
//! knows the pool's protocol: what the bytes and words mean is `proto`'s.

mod eventfd;
mod fd;
mod image;
mod memory;
mod poll;
mod process;
pub(crate) mod sandbox;
mod signal;
mod socket;
mod stack;
mod time;

pub(crate) use eventfd::*;
pub(crate) use fd::*;
pub(crate) use image::*;
pub(crate) use memory::*;
pub(crate) use poll::*;
pub(crate) use process::*;
pub(crate) use signal::*;
pub(crate) use socket::*;
pub(crate) use stack::*;
pub(crate) use time::*;

use std::io;

/// `Err(last_os_error)` for a libc call that returned -1.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// As [`cvt`], for a call that returns a byte count.
fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// How long the supervisor thread and an idle worker poll without sleeping
/// before they block: a result or the next task often comes within
/// microseconds, while waking a thread that sleeps on an idle CPU costs
/// tens of microseconds on a virtual machine (measured here: a synchronous
/// `apply` took 70-80 us with no spin, 8-15 us with a 50 us spin). The spin
/// happens only at the moment a thread runs out of work, so an idle pool
/// uses no CPU. `PROCPOOL_SPIN_US` overrides it (0 turns it off); on a
/// machine with one CPU there is none.
pub(crate) fn spin_budget() -> std::time::Duration {
    static US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    std::time::Duration::from_micros(*US.get_or_init(|| {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return 0;
        }
        std::env::var("PROCPOOL_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50)
    }))
}

/// Spins (for at most [`spin_budget`]) until `ready()` holds; returns it.
pub(crate) fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    let budget = spin_budget();
    if budget.is_zero() {
        return false;
    }
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        // Yield rather than hog the CPU: a thread just woken on this CPU
        // (the caller of a synchronous apply, say) runs at once.
        std::thread::yield_now();
    }
}
