//! The worker's record of a task's panic (see `proto/report.rs` for how
//! it travels and `traceback.rs` for what the caller gets): the pool's
//! panic hook (`worker::install_panic_hook`) records, on the thread that
//! serves tasks, where the task panicked and, with backtraces on, the raw
//! return addresses of its stack, walked with `_Unwind_Backtrace` (the
//! unwinder the panic itself is about to use) and without std's backtrace
//! lock, which another thread of the host may have held when the worker's
//! process was forked. Also which thread serves tasks, and whether this
//! worker records stacks at all.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};

/// At most this many frames are recorded.
const MAX_FRAMES: usize = 128;

/// Whether this worker records backtraces (the parent says so in its
/// CONFIG frame).
static CAPTURE_FRAMES: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread serves tasks (the worker loop's thread).
    static SERVING: Cell<bool> = const { Cell::new(false) };
    /// What the hook recorded of this thread's last panic.
    static LAST: RefCell<Option<Recorded>> = const { RefCell::new(None) };
}

/// What the hook records of a panic, in the worker.
pub(crate) struct Recorded {
    /// Where it panicked: file, line, column.
    pub(crate) location: Option<(String, u32, u32)>,
    /// The return addresses of its stack (none with backtraces off).
    pub(crate) ips: Vec<usize>,
}

/// Marks the calling thread as the one that runs tasks: its panics are
/// recorded.
pub(crate) fn serve_on_this_thread() {
    SERVING.with(|s| s.set(true));
}

/// Whether the calling thread serves a worker's tasks.
pub(crate) fn serving() -> bool {
    SERVING.try_with(|s| s.get()).unwrap_or(false)
}

/// Turns backtrace capture on or off in this worker.
pub(crate) fn capture_frames(on: bool) {
    CAPTURE_FRAMES.store(on, Ordering::Relaxed);
}

/// Whether a pool built now should capture backtraces unless told:
/// `RUST_BACKTRACE` is set, and not to `0`, as std reads it.
pub(crate) fn env_wants_backtraces() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

/// Called by the panic hook on a thread that serves tasks: records the
/// panic's location and, if asked for, its stack. Takes no lock.
pub(crate) fn record(info: &std::panic::PanicHookInfo<'_>) {
    let location = info
        .location()
        .map(|l| (l.file().to_string(), l.line(), l.column()));
    let ips = if CAPTURE_FRAMES.load(Ordering::Relaxed) {
        crate::sys::return_addresses(MAX_FRAMES)
    } else {
        Vec::new()
    };
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            *l = Some(Recorded { location, ips });
        }
    });
}

/// In the worker, after a task's panic was caught: what the hook recorded
/// of it on this thread, if anything (taken: the next panic starts afresh).
pub(crate) fn take_recorded() -> Option<Recorded> {
    LAST.try_with(|l| l.try_borrow_mut().ok().and_then(|mut l| l.take()))
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_with_no_panic_has_nothing_recorded() {
        assert!(take_recorded().is_none());
    }

    #[test]
    fn only_the_thread_marked_serves() {
        let marked = std::thread::spawn(|| {
            let before = serving();
            serve_on_this_thread();
            (before, serving())
        });
        assert_eq!(marked.join().unwrap(), (false, true));
        assert!(!std::thread::spawn(serving).join().unwrap());
    }
}
