//! The worker's side of a task's panic report (see `traceback.rs` for
//! what the caller gets): the pool's panic hook (`worker::install_panic_hook`)
//! records, on the thread that serves tasks, where the task panicked and,
//! with backtraces on, the raw return addresses of its stack, walked with
//! `_Unwind_Backtrace` (the unwinder the panic itself is about to use) and
//! without std's backtrace lock, which another thread of the host may have
//! held when the worker's process was forked. Nothing is symbolised in the
//! worker: each address travels after the panic's message as a file offset
//! in the object it was mapped from (`/proc/self/maps`), which the parent
//! maps back into its own address space.

use crate::proto::codec;
use crate::traceback::{Maps, PanicLocation, RemoteBacktrace};
use serde::{Deserialize, Serialize};
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
struct Recorded {
    location: Option<(String, u32, u32)>,
    ips: Vec<usize>,
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

/// What travels after a panic's message in a PANIC body (see
/// [`put_report`]).
#[derive(Serialize, Deserialize, Default)]
struct Wire {
    location: Option<(String, u32, u32)>,
    /// The objects the frames are in (paths from `/proc/self/maps`).
    objects: Vec<String>,
    /// Each frame: an index into `objects` and a file offset in it.
    frames: Vec<(u32, u64)>,
}

/// In the worker, after a task's panic was caught: appends what the hook
/// recorded (the location, the frames as object offsets) to `out`, after
/// the panic's message.
pub(crate) fn put_report(out: &mut Vec<u8>) {
    let Some(rec) = LAST
        .try_with(|l| l.try_borrow_mut().ok().and_then(|mut l| l.take()))
        .ok()
        .flatten()
    else {
        return;
    };
    let mut wire = Wire {
        location: rec.location,
        ..Wire::default()
    };
    if !rec.ips.is_empty() {
        let maps = Maps::of_this_process();
        for ip in rec.ips {
            let (object, offset) = match maps.offset_of(ip) {
                Some((path, off)) => (path, off),
                None => ("?", ip as u64),
            };
            let i = match wire.objects.iter().position(|o| o == object) {
                Some(i) => i,
                None => {
                    wire.objects.push(object.to_string());
                    wire.objects.len() - 1
                }
            };
            wire.frames.push((i as u32, offset));
        }
    }
    // Encoding plain data into a Vec cannot fail.
    let _ = codec::encode_into(&wire, out);
}

/// In the parent: the location and backtrace that follow a panic's
/// message in a PANIC body (`rest` starts after the message), if any.
pub(crate) fn read_report(rest: &[u8]) -> (Option<PanicLocation>, Option<RemoteBacktrace>) {
    let Ok((wire, _)) = codec::decode_untrusted::<Wire>(rest) else {
        return (None, None);
    };
    let location = wire
        .location
        .map(|(file, line, column)| PanicLocation::new(file, line, column));
    let backtrace =
        (!wire.frames.is_empty()).then(|| RemoteBacktrace::new(wire.objects, wire.frames));
    (location, backtrace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_travels_after_the_message() {
        let sent = Wire {
            location: Some(("src/lib.rs".into(), 12, 5)),
            objects: vec!["/bin/app".into()],
            frames: vec![(0, 0x1234), (0, 0x5678)],
        };
        let mut body = Vec::new();
        codec::encode_into(&sent, &mut body).unwrap();
        let (location, backtrace) = read_report(&body);
        let l = location.unwrap();
        assert_eq!((l.file(), l.line(), l.column()), ("src/lib.rs", 12, 5));
        assert!(backtrace.is_some());
        // Without frames there is no backtrace; without a report, nothing.
        body.clear();
        codec::encode_into(&Wire::default(), &mut body).unwrap();
        assert!(matches!(read_report(&body), (None, None)));
        assert!(matches!(read_report(&[]), (None, None)));
    }

    #[test]
    fn nothing_recorded_adds_nothing() {
        // This thread has had no panic recorded.
        let mut out = vec![1, 2];
        put_report(&mut out);
        assert_eq!(out, [1, 2]);
    }
}
