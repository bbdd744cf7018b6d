//! Where a task panicked: the panic's location and, when asked for, the
//! worker's backtrace, as CPython's `RemoteTraceback` gives a worker's
//! traceback with its exception.
//!
//! In the worker, the pool's panic hook (`worker::install_panic_hook`)
//! records the location and, with backtraces on, the raw return addresses
//! of the stack, walked with `_Unwind_Backtrace` (the unwinder the panic
//! itself is about to use) and without std's backtrace lock, which another
//! thread of the host may have held when the worker's process was forked.
//! Nothing is symbolised in the worker. Each address is sent as a file
//! offset in the object it was mapped from (`/proc/self/maps`), so the
//! parent, which runs the same executable, can find the same code in its
//! own mappings whatever the address layout of the worker (a fork, or an
//! exec under another randomisation), and resolve it to function, file and
//! line there, lazily, the first time the backtrace is shown.

use crate::codec;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

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
    let Ok((wire, _)) = codec::decode::<Wire>(rest) else {
        return (None, None);
    };
    let location = wire
        .location
        .map(|(file, line, column)| PanicLocation { file, line, column });
    let backtrace = (!wire.frames.is_empty()).then(|| RemoteBacktrace {
        inner: Arc::new(Inner {
            objects: wire.objects,
            frames: wire.frames,
            resolved: OnceLock::new(),
        }),
    });
    (location, backtrace)
}

/// The executable mappings of a process, from `/proc/<pid>/maps`.
struct Maps {
    /// (start, end, file offset, path)
    maps: Vec<(usize, usize, u64, String)>,
}

impl Maps {
    fn of_this_process() -> Maps {
        let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        Maps::parse(&text)
    }

    fn parse(text: &str) -> Maps {
        let mut maps = Vec::new();
        for line in text.lines() {
            // start-end perms offset dev inode path
            let mut f = line.splitn(6, ' ');
            let (Some(range), Some(perms), Some(off), Some(_dev), Some(_inode)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let path = f.next().unwrap_or("").trim_start();
            if !perms.contains('x') || path.is_empty() {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b), Ok(off)) = (
                usize::from_str_radix(a, 16),
                usize::from_str_radix(b, 16),
                u64::from_str_radix(off, 16),
            ) else {
                continue;
            };
            maps.push((a, b, off, path.to_string()));
        }
        Maps { maps }
    }

    /// The object an address is in, and its offset in that object's file.
    fn offset_of(&self, ip: usize) -> Option<(&str, u64)> {
        self.maps
            .iter()
            .find(|(a, b, _, _)| (*a..*b).contains(&ip))
            .map(|(a, _, off, path)| (path.as_str(), off + (ip - a) as u64))
    }

    /// Where that offset of that object is mapped in this process.
    fn address_of(&self, object: &str, offset: u64) -> Option<usize> {
        self.maps.iter().find_map(|(a, b, off, path)| {
            let len = (b - a) as u64;
            (path == object && (*off..off + len).contains(&offset))
                .then(|| a + (offset - off) as usize)
        })
    }
}

/// Where a task panicked: the file, line and column of the `panic!` (or of
/// the call that panicked, such as an `unwrap`), as std's panic message
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanicLocation {
    file: String,
    line: u32,
    column: u32,
}

impl PanicLocation {
    /// The source file, as the compiler named it (`src/main.rs`).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The line, from 1.
    pub fn line(&self) -> u32 {
        self.line
    }

    /// The column, from 1.
    pub fn column(&self) -> u32 {
        self.column
    }
}

impl std::fmt::Display for PanicLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The backtrace of a task's panic in its worker, captured there and
/// resolved in this process, the first time it is shown or its frames are
/// asked for. Present when the pool was built with
/// [`backtraces(true)`](crate::PoolBuilder::backtraces), or with
/// `RUST_BACKTRACE` set (and not `0`).
///
/// `Display` shows the frames from the panic down to the task's function,
/// as std's short backtrace does; the alternate form (`{:#}`) shows every
/// frame, the pool's own included.
#[derive(Clone)]
pub struct RemoteBacktrace {
    inner: Arc<Inner>,
}

struct Inner {
    objects: Vec<String>,
    frames: Vec<(u32, u64)>,
    resolved: OnceLock<Resolved>,
}

struct Resolved {
    frames: Vec<BacktraceFrame>,
    /// The task's own frames: from the panic to the task's function.
    short: std::ops::Range<usize>,
}

/// One frame of a [`RemoteBacktrace`] (a function inlined into another has
/// a frame of its own, as in std's backtraces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacktraceFrame {
    function: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    column: Option<u32>,
    object: String,
    offset: u64,
}

impl BacktraceFrame {
    /// The function's name, demangled, if it could be resolved.
    pub fn function(&self) -> Option<&str> {
        self.function.as_deref()
    }

    /// Its source file, if the executable has debug information for it.
    pub fn file(&self) -> Option<&str> {
        self.file.as_deref()
    }

    /// The line in [`file`](Self::file).
    pub fn line(&self) -> Option<u32> {
        self.line
    }

    /// The column in [`file`](Self::file).
    pub fn column(&self) -> Option<u32> {
        self.column
    }
}

impl RemoteBacktrace {
    /// The task's frames, innermost first: from the panic down to the
    /// task's function (the frames `Display` shows).
    pub fn frames(&self) -> &[BacktraceFrame] {
        let r = self.resolved();
        &r.frames[r.short.clone()]
    }

    /// Every frame that was captured, innermost first: the panic machinery
    /// above the task's frames and the worker's own frames below them too.
    pub fn all_frames(&self) -> &[BacktraceFrame] {
        &self.resolved().frames
    }

    fn resolved(&self) -> &Resolved {
        self.inner.resolved.get_or_init(|| resolve(&self.inner))
    }
}

fn resolve(inner: &Inner) -> Resolved {
    let maps = Maps::of_this_process();
    let mut frames = Vec::new();
    for &(obj, offset) in &inner.frames {
        let object = inner.objects.get(obj as usize).cloned().unwrap_or_default();
        let unresolved = BacktraceFrame {
            function: None,
            file: None,
            line: None,
            column: None,
            object: object.clone(),
            offset,
        };
        let Some(addr) = maps.address_of(&object, offset) else {
            frames.push(unresolved);
            continue;
        };
        let before = frames.len();
        backtrace::resolve(addr as *mut std::ffi::c_void, |s| {
            frames.push(BacktraceFrame {
                function: s.name().map(|n| format!("{n:#}")),
                file: s.filename().map(|p| p.display().to_string()),
                line: s.lineno(),
                column: s.colno(),
                object: object.clone(),
                offset,
            });
        });
        if frames.len() == before {
            frames.push(unresolved);
        }
    }
    let named =
        |f: &BacktraceFrame, what: &str| f.function.as_deref().is_some_and(|n| n.contains(what));
    // As std's short backtraces: from below the panic machinery
    // (`__rust_end_short_backtrace`) down to the task's function (called
    // from `__procpool_begin_task`).
    let start = frames
        .iter()
        .rposition(|f| named(f, "__rust_end_short_backtrace"))
        .map_or(0, |i| i + 1);
    let end = frames[start..]
        .iter()
        .position(|f| named(f, "__procpool_begin_task"))
        .map_or(frames.len(), |i| start + i);
    Resolved {
        frames,
        short: start..end,
    }
}

impl std::fmt::Display for RemoteBacktrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let frames = if f.alternate() {
            self.all_frames()
        } else {
            self.frames()
        };
        for (i, fr) in frames.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match &fr.function {
                Some(name) => write!(f, "{i:4}: {name}")?,
                None => write!(f, "{i:4}: <unknown> ({}+{:#x})", fr.object, fr.offset)?,
            }
            if let Some(file) = &fr.file {
                write!(f, "\n             at {file}")?;
                if let Some(line) = fr.line {
                    write!(f, ":{line}")?;
                    if let Some(col) = fr.column {
                        write!(f, ":{col}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for RemoteBacktrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBacktrace")
            .field("frames", &self.inner.frames.len())
            .finish()
    }
}

/// " at file:line:col", for the error's message.
pub(crate) fn at(location: &Option<PanicLocation>) -> String {
    location
        .as_ref()
        .map_or_else(String::new, |l| format!(" at {l}"))
}

/// The backtrace after the message, as CPython shows a worker's traceback.
pub(crate) fn shown(backtrace: &Option<RemoteBacktrace>) -> String {
    backtrace
        .as_ref()
        .map_or_else(String::new, |b| format!("\n\nworker backtrace:\n{b}"))
}

/// Calls the task's function. A frame of its own, never inlined nor
/// tail-called, so that a backtrace can end at the task's function (as
/// std's `__rust_begin_short_backtrace` does for a thread's).
#[inline(never)]
pub(crate) fn __procpool_begin_task<A, R>(f: fn(A) -> R, a: A) -> R {
    let r = f(a);
    std::hint::black_box(());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_translate_offsets_both_ways() {
        let text = "\
55d0c1a00000-55d0c1a45000 r--p 00000000 fd:01 1234    /usr/bin/prog
55d0c1a45000-55d0c1b00000 r-xp 00045000 fd:01 1234    /usr/bin/prog
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 
7f0000100000-7f0000200000 r-xp 00028000 fd:01 99      /lib/libc.so.6
";
        let m = Maps::parse(text);
        assert_eq!(m.maps.len(), 2, "only executable, file-backed mappings");
        assert_eq!(
            m.offset_of(0x55d0c1a45010),
            Some(("/usr/bin/prog", 0x45010))
        );
        assert_eq!(
            m.offset_of(0x7f0000100008),
            Some(("/lib/libc.so.6", 0x28008))
        );
        assert_eq!(m.offset_of(0x7f0000000008), None);
        assert_eq!(m.address_of("/usr/bin/prog", 0x45010), Some(0x55d0c1a45010));
        assert_eq!(m.address_of("/usr/bin/prog", 0x10), None);
        assert_eq!(m.address_of("/lib/other.so", 0x28008), None);
    }
}
