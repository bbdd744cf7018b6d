//! Where a task panicked, as the caller gets it: the panic's location and
//! the worker's backtrace, as CPython gives a worker's traceback with its
//! exception (`RemoteTraceback`).
//!
//! The worker records raw return addresses (`capture.rs`) and sends each as
//! a file offset in the object it was mapped from. This process, which runs
//! the same executable, finds the same code in its own mappings, whatever
//! the address layout of the worker (a fork, or an exec under another
//! randomisation), and resolves it to function, file and line, lazily, the
//! first time the backtrace is shown.

use std::sync::{Arc, OnceLock};

/// The executable mappings of a process, from `/proc/<pid>/maps`.
pub(crate) struct Maps {
    /// (start, end, file offset, path)
    maps: Vec<(usize, usize, u64, String)>,
}

impl Maps {
    pub(crate) fn of_this_process() -> Maps {
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
    pub(crate) fn offset_of(&self, ip: usize) -> Option<(&str, u64)> {
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
    pub(crate) fn new(file: String, line: u32, column: u32) -> PanicLocation {
        PanicLocation { file, line, column }
    }

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
    /// A backtrace of `frames` (an index into `objects` and a file offset
    /// in that object each), resolved when first shown.
    pub(crate) fn new(objects: Vec<String>, frames: Vec<(u32, u64)>) -> RemoteBacktrace {
        RemoteBacktrace {
            inner: Arc::new(Inner {
                objects,
                frames,
                resolved: OnceLock::new(),
            }),
        }
    }

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
