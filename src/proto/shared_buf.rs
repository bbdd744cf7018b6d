//! [`SharedBuf`] and [`SharedSlice`]: buffers in shared memory that travel
//! to a worker and back as a reference to their memory, never as bytes.
//!
//! A buffer is a memory file (`memfd`) and this process's mapping of it.
//! When the pool encodes a task's argument (or a worker its result), the
//! buffer's `Serialize` *moves* the file out of the value into the
//! encoder's list of fds, and writes only its index in that list and its
//! length; the fds travel beside the frame (`SCM_RIGHTS`). `Deserialize`
//! takes its fd back out of the list the frame brought and maps it. When a
//! buffer the caller sent comes back (the same file: its device and inode),
//! the caller gets its own mapping back, the same addresses as before.
//!
//! # Why this is sound
//!
//! A buffer's memory may be written by another process, so what must hold
//! is: while one process may write a buffer, no other process has a live
//! view of it (`&[u8]` or `&mut [u8]`), or any way to get one.
//!
//! - **One owner.** A `SharedBuf` owns its file and mapping, is not `Clone`
//!   and gives out no fd (no `AsFd`/`AsRawFd`): the only way to another
//!   process is through the pool's encoder, which takes the file *out* of
//!   the value. What stays behind is an empty shell whose accessors panic.
//! - **Encoding only by value, and never while borrowed.** `Serialize` sees
//!   only `&self`, so it cannot rely on ownership alone: a `&SharedBuf`
//!   reachable from elsewhere (a thread-local, say, that a hand-written
//!   `Serialize` of the argument reads) could be encoded while a slice of
//!   it is alive; that path makes the simplest design (`Deref` and an
//!   interior `take`) unsound. Hence: there is no `Deref`; the bytes are
//!   read through a guard ([`SharedBuf::as_slice`] returns a `Ref` of a
//!   `RefCell`) or written through `&mut self`, and `Serialize` takes the
//!   file only if it can borrow the cell mutably, so that no view of the
//!   memory is alive in this process when it leaves. A `&mut [u8]` from
//!   `as_mut_slice` holds `&mut SharedBuf`, so no `&SharedBuf` exists
//!   meanwhile. `SharedBuf` is `Send` but not `Sync`: no other thread can
//!   hold a `&SharedBuf`, so the cell's borrow flag is never raced. Every
//!   task argument is taken by value (`apply(f, arg: A)`,
//!   `map(f, items)`), so in the ordinary case the borrow checker alone
//!   rules out a view that outlives the send.
//! - **Outside the pool's encoder, an error.** Serializing a `SharedBuf`
//!   with any other serializer (or into an initializer's argument, which
//!   every worker gets a copy of) fails with an error that says so, and
//!   leaves the buffer as it was. Deserializing one outside the pool's
//!   decoder fails too: there is no fd to take. (A worker installs a
//!   frame's encoder and decoder once for the frame, a chunk's items
//!   included, but *arms* them only around the pool's own encoding and
//!   decoding: a task's own serializer, running in between, is outside.)
//! - **The caller's dormant mapping.** While a worker holds the buffer, the
//!   parent keeps its file and mapping with the job (to reuse the mapping,
//!   and to send it again on a retry) where no user code can reach them.
//!   They become reachable again only by decoding the task's result, which
//!   the worker sends after it has encoded (given up) its buffers; or they
//!   are unmapped, when the result does not bring that file back or the
//!   task fails.
//! - **Copies made by `fork()`.** A mapping of a buffer is marked
//!   `MADV_DONTFORK`, so a forked child (the fork server under
//!   `StartMethod::Fork`, a worker, any `fork()` of the program) does not
//!   share it; each buffer remembers the fork generation it was made in
//!   (counted by a `pthread_atfork` handler), and a copy of the value in a
//!   child refuses every access and unmaps and closes nothing when dropped
//!   (its address range may hold another mapping there).
//! - **Received files are checked.** A received fd must be a memory file
//!   sealed against any change of size (`F_SEAL_SHRINK | F_SEAL_GROW |
//!   F_SEAL_SEAL`), at least as long as the length that came with it, and
//!   the files of one message must be distinct, so a mapping never loses
//!   pages under a reader (SIGBUS) and no two buffers of a process alias.
//!
//! Code that uses `unsafe` (`/proc/self/mem`, `mmap` of a file it reopened
//! through `/proc/self/fd`, `dup` of a number it guessed) can break any of
//! this, as it can for any Rust value.

use crate::error::{Error, Result};
use crate::sys::{self, Mapping};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{self, SerializeTupleStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::{Cell, Ref, RefCell};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The name of a buffer's memory file, as `/proc/*/maps` and
/// `/proc/*/fd` show it (`/memfd:procpool-shared`).
const NAME: &std::ffi::CStr = c"procpool-shared";
/// A buffer's file is this many bytes at least, and a multiple of it.
const PAGE: usize = 4096;
/// The name under which a buffer travels through serde.
const SERDE_NAME: &str = "procpool::SharedBuf";
/// How a buffer is encoded: by reference (an fd) or inline (its bytes).
const BY_FD: u8 = 0;
const INLINE: u8 = 1;

const OUTSIDE_SER: &str = "a SharedBuf can only be sent by the pool, as (part of) a task's \
     argument or result: it moves its memory, it is not copied into bytes. Another serializer, \
     or an initializer's argument (which every worker gets a copy of), cannot carry one; use \
     serde_bytes::ByteBuf for bytes that are copied";
const OUTSIDE_DE: &str = "a SharedBuf can only be received by the pool, from a task's argument \
     or result: its memory travels beside the bytes";
const BORROWED: &str = "a SharedBuf cannot be sent while a view of it from as_slice() is alive";
const SENT: &str = "a SharedBuf was sent twice (or after it was sent): it moves to the worker";
const FORKED: &str = "this SharedBuf is a copy that fork() made of a value of the parent \
     process: its memory is not in this process";

/// One memory file and this process's mapping of it.
pub(crate) struct Region {
    /// Always `Some`, except while a copy made by fork is dropped.
    fd: Option<OwnedFd>,
    map: Mapping,
    /// The bytes in use (at most the mapping's length).
    len: usize,
    dev: u64,
    ino: u64,
    /// `sys::fork_generation()` where this value was made.
    generation: u64,
}

fn capacity(len: usize) -> usize {
    len.max(1).next_multiple_of(PAGE)
}

impl Region {
    /// A new zero-filled region of `len` bytes.
    fn new(len: usize) -> std::io::Result<Region> {
        let generation = sys::fork_generation();
        let cap = capacity(len);
        let fd = sys::sealed_memfd(NAME, cap)?;
        let map = Mapping::new(&fd, cap, false)?;
        map.dont_fork()?;
        let id = sys::file_id(&fd)?;
        Ok(Region::of(fd, map, len, &id, generation))
    }

    /// Maps a file that another process sent, of which `len` bytes are the
    /// buffer.
    fn receive(fd: OwnedFd, len: usize) -> std::result::Result<Region, String> {
        let generation = sys::fork_generation();
        let seals = sys::seals(&fd)
            .map_err(|e| format!("a SharedBuf's file is not a memory file ({e})"))?;
        if seals & sys::SIZE_SEALS != sys::SIZE_SEALS {
            return Err("a SharedBuf's file is not sealed at its size".into());
        }
        let id = sys::file_id(&fd).map_err(|e| format!("a SharedBuf's file: {e}"))?;
        if id.size < len || id.size == 0 {
            return Err(format!(
                "a SharedBuf's file has {} bytes, fewer than its length {len}",
                id.size
            ));
        }
        // Fault in its pages at once when they all exist (a buffer that was
        // written): one call instead of a fault per page. A sparse file is
        // left to fault, so as not to allocate pages nobody wrote.
        let populate = id.allocated >= id.size as u64;
        let map = Mapping::new(&fd, id.size, populate)
            .map_err(|e| format!("could not map a SharedBuf: {e}"))?;
        map.dont_fork()
            .map_err(|e| format!("could not map a SharedBuf: {e}"))?;
        Ok(Region::of(fd, map, len, &id, generation))
    }

    /// The region of file `fd` (whose `fstat` is `id`), mapped as `map`,
    /// made or received in fork generation `generation`.
    fn of(fd: OwnedFd, map: Mapping, len: usize, id: &sys::FileId, generation: u64) -> Region {
        Region {
            fd: Some(fd),
            map,
            len,
            dev: id.dev,
            ino: id.ino,
            generation,
        }
    }

    /// Whether this value was made in this process (not copied by fork).
    fn here(&self) -> bool {
        self.generation == sys::fork_generation()
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn bytes(&self) -> &[u8] {
        &self.map.as_slice()[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.map.as_mut_slice()[..len]
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.here() {
            // A copy made by fork: the mapping is not in this process
            // (MADV_DONTFORK; its range may hold another mapping now) and
            // the fd number is not this value's to close.
            std::mem::forget(std::mem::replace(&mut self.map, Mapping::empty()));
            std::mem::forget(self.fd.take());
        }
    }
}

/// A byte buffer in shared memory that a task can read and write in place:
/// it travels to a worker and back as a reference to its memory (a file
/// descriptor and a length), never as bytes, so sending 64 MiB costs the
/// same as sending 64 bytes.
///
/// Put it in a task's argument or result, alone or inside your own serde
/// types. Sending a buffer *moves* it: the caller has no access to it while
/// a worker has it, and gets it back (the same memory, at the same address)
/// when the task returns it. A task may also return buffers it made with
/// [`SharedBuf::new`].
///
/// ```
/// use procpool::{Pool, SharedBuf};
///
/// fn brighten(mut img: SharedBuf) -> SharedBuf {
///     for px in img.as_mut_slice() {
///         *px = px.saturating_add(10);
///     }
///     img
/// }
///
/// let pool = Pool::builder().processes(2).build()?;
/// let mut img = SharedBuf::new(1 << 20)?;          // 1 MiB, zero-filled
/// img.as_mut_slice()[0] = 250;
/// let img = pool.apply(brighten, img)?;             // written in the worker, in place
/// assert_eq!(img.as_slice()[..2], [255, 10]);
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// What happens when the task fails: the buffers it was given are released
/// with it (the caller gave them away), whatever the error. A task whose
/// worker dies while it runs fails with [`Error::WorkerLostShared`], and is
/// not run again even with [`TaskOptions::retries`]: its buffers may be
/// half written. [`TaskOptions::retries_with_shared`] runs it again anyway,
/// with the buffers as the dead worker left them.
///
/// Limits: each buffer is a file descriptor while it lives (see `ulimit
/// -n`); one task carries at most 4096 of them, and at most half the
/// process's limit on open files; a buffer's size is fixed when it is made.
/// Over MPI (the `mpi` feature) buffers are copied into the messages and
/// arrive as new buffers: shared memory ends at the machine. It works only
/// as a task's argument or result: any other serializer refuses it.
///
/// `SharedBuf` is `Send` but neither `Sync` nor `Clone`, and a view of its
/// bytes keeps it from being sent:
///
/// ```compile_fail,E0505
/// # fn id(b: procpool::SharedBuf) -> procpool::SharedBuf { b }
/// let pool = procpool::Pool::new()?;
/// let buf = procpool::SharedBuf::new(16)?;
/// let view = buf.as_slice();
/// let back = pool.apply(id, buf)?;    // error: `buf` is borrowed by `view`
/// drop(view);
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// ```compile_fail,E0599
/// let buf = procpool::SharedBuf::new(16).unwrap();
/// let copy = buf.clone();             // error: SharedBuf is not Clone
/// ```
///
/// ```compile_fail,E0277
/// fn shared<T: Sync>(_: &T) {}
/// shared(&procpool::SharedBuf::new(16).unwrap());   // error: not Sync
/// ```
///
/// [`Error::WorkerLostShared`]: crate::Error::WorkerLostShared
/// [`TaskOptions::retries`]: crate::TaskOptions::retries
/// [`TaskOptions::retries_with_shared`]: crate::TaskOptions::retries_with_shared
pub struct SharedBuf {
    /// `None` once sent (an empty shell, reachable only through a path
    /// that bypassed ownership).
    region: RefCell<Option<Region>>,
}

impl SharedBuf {
    /// A new buffer of `len` bytes, all zero. It costs a memory file and a
    /// mapping; its pages are allocated as they are first written.
    pub fn new(len: usize) -> Result<SharedBuf> {
        let r = Region::new(len).map_err(|e| Error::io("allocating a SharedBuf", e))?;
        Ok(SharedBuf::of(r))
    }

    /// A new buffer with a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Result<SharedBuf> {
        let mut b = SharedBuf::new(bytes.len())?;
        b.as_mut_slice().copy_from_slice(bytes);
        Ok(b)
    }

    fn of(r: Region) -> SharedBuf {
        SharedBuf {
            region: RefCell::new(Some(r)),
        }
    }

    /// Its length in bytes (0 for an empty shell left by a send).
    pub fn len(&self) -> usize {
        self.region
            .try_borrow()
            .ok()
            .and_then(|r| r.as_ref().map(|r| r.len))
            .unwrap_or(0)
    }

    /// Whether its length is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its bytes, to read. While the returned guard lives the buffer cannot
    /// be sent.
    ///
    /// # Panics
    /// If the buffer was sent (an empty shell reached through a thread-local
    /// or the like), or is a copy that `fork()` made in a child process.
    pub fn as_slice(&self) -> Ref<'_, [u8]> {
        Ref::map(self.region.borrow(), |r| match r {
            Some(r) if r.here() => r.bytes(),
            Some(_) => panic!("{FORKED}"),
            None => panic!("this SharedBuf was sent: it has no memory any more"),
        })
    }

    /// Its bytes, to read and write.
    ///
    /// # Panics
    /// As [`as_slice`](Self::as_slice).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.region.get_mut() {
            Some(r) if r.here() => r.bytes_mut(),
            Some(_) => panic!("{FORKED}"),
            None => panic!("this SharedBuf was sent: it has no memory any more"),
        }
    }

    /// A copy of its bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

impl std::fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.region.try_borrow() {
            Ok(r) => match &*r {
                Some(r) if r.here() => "here",
                Some(_) => "copied by fork",
                None => "sent",
            },
            Err(_) => "borrowed",
        };
        f.debug_struct("SharedBuf")
            .field("len", &self.len())
            .field("state", &state)
            .finish()
    }
}

/// How the pool's encoder carries buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// By reference: the file moves to the encoder's list (local workers).
    Fds,
    /// As a copy of the bytes (MPI: shared memory ends at the machine).
    Inline,
}

struct Encoder {
    mode: Mode,
    regions: Vec<Region>,
}

thread_local! {
    /// Set while the pool encodes arguments or results on this thread (in
    /// a worker, for a whole frame).
    static ENCODER: RefCell<Option<Encoder>> = const { RefCell::new(None) };
    /// Set while the pool decodes them on this thread.
    static DECODER: RefCell<Option<Supply>> = const { RefCell::new(None) };
    /// How many more buffers an inline decode may make (`None`: no cap):
    /// set while a sandboxed worker's result is decoded
    /// ([`Supply::cap_inline`]).
    static INLINE_LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Which of the two is *armed*: used by `SharedBuf`'s serde impls only
    /// while the pool itself encodes or decodes (not while a task runs
    /// between the two, with the frame's encoder and decoder installed).
    static ARMED: Cell<u8> = const { Cell::new(0) };
}

const ARM_ENCODER: u8 = 1;
const ARM_DECODER: u8 = 2;

fn armed(which: u8) -> bool {
    ARMED.try_with(|a| a.get() & which != 0).unwrap_or(false)
}

/// Runs `f` with at most `cap` buffers to be made from inline bytes (then
/// as before, even on a panic).
fn with_inline_cap<T>(cap: Option<usize>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = INLINE_LEFT.try_with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(INLINE_LEFT.with(|c| c.replace(cap)));
    f()
}

/// Runs `f` with exactly `which` armed (then as before, even on a panic).
fn arm<T>(which: u8, f: impl FnOnce() -> T) -> T {
    struct Restore(u8);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = ARMED.try_with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ARMED.with(|a| a.replace(which)));
    f()
}

/// Runs `f` with this thread's encoder holding `regions` (moved in, and
/// back out afterwards, even on a panic), not armed.
fn with_encoder<T>(mode: Mode, regions: &mut Vec<Region>, f: impl FnOnce() -> T) -> T {
    struct Restore<'a> {
        regions: &'a mut Vec<Region>,
        prev: Option<Encoder>,
    }
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let prev = self.prev.take();
            let cur = ENCODER.try_with(|e| e.replace(prev)).ok().flatten();
            if let Some(c) = cur {
                *self.regions = c.regions;
            }
        }
    }
    let now = Encoder {
        mode,
        regions: std::mem::take(regions),
    };
    let prev = ENCODER.with(|e| e.replace(Some(now)));
    let _restore = Restore { regions, prev };
    f()
}

/// Runs `f` (which encodes one value, or the items of one chunk) with this
/// thread's encoder set and armed: the buffers it meets move into
/// `regions` (in [`Mode::Fds`]), after those already there.
pub(crate) fn encoding<T>(mode: Mode, regions: &mut Vec<Region>, f: impl FnOnce() -> T) -> T {
    with_encoder(mode, regions, || arm(ARM_ENCODER, f))
}

/// In a worker: runs `f` (a whole frame: its argument or items, the task,
/// its result) with the frame's encoder and decoder installed but not
/// armed; [`encode_armed`] and [`decode_armed`] arm them around the pool's
/// own encoding and decoding. (Installing them once per frame, not once per
/// item of a chunk, keeps a map of a million small items as fast as before.)
pub(crate) fn frame<T>(
    mode: Mode,
    regions: &mut Vec<Region>,
    supply: &mut Supply,
    f: impl FnOnce() -> T,
) -> T {
    with_encoder(mode, regions, || supply.with_decoder(f))
}

/// Arms the installed encoder for `f` (see [`frame`]).
pub(crate) fn encode_armed<T>(f: impl FnOnce() -> T) -> T {
    arm(ARM_ENCODER, f)
}

/// Arms the installed decoder for `f` (see [`frame`]).
pub(crate) fn decode_armed<T>(f: impl FnOnce() -> T) -> T {
    arm(ARM_DECODER, f)
}

/// How many buffers the installed encoder holds (a mark to roll back to).
pub(crate) fn encoded_len() -> usize {
    ENCODER
        .try_with(|e| e.borrow().as_ref().map_or(0, |e| e.regions.len()))
        .unwrap_or(0)
}

/// Drops the buffers the installed encoder took after `mark` (an item
/// whose result failed part-way).
pub(crate) fn truncate_encoded(mark: usize) {
    drop(split_encoded(mark));
}

/// Takes back the buffers the installed encoder took after `mark` (an
/// item that moves to a frame of its own).
pub(crate) fn split_encoded(mark: usize) -> Vec<Region> {
    ENCODER
        .try_with(|e| {
            e.borrow_mut()
                .as_mut()
                .map(|e| e.regions.split_off(mark.min(e.regions.len())))
        })
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// What comes with one received frame: for each buffer it names, in
/// order, its file (or, in the parent, the caller's own region of the
/// same file); and regions to drop once it is decoded.
#[derive(Default)]
pub(crate) struct Supply {
    items: Vec<Option<Incoming>>,
    /// Held only to be dropped (unmapped) by whoever decodes the value, not
    /// by the supervisor thread.
    _spare: Vec<Region>,
    /// The most buffers the value may make from inline bytes (a sandboxed
    /// worker's result: each is a memory file, an fd of this process).
    inline_cap: Option<usize>,
}

enum Incoming {
    Fd(OwnedFd),
    Region(Region),
}

impl Supply {
    /// The files that came with a frame, in order.
    pub(crate) fn from_fds(fds: Vec<OwnedFd>) -> Supply {
        Supply {
            items: fds.into_iter().map(|f| Some(Incoming::Fd(f))).collect(),
            _spare: Vec::new(),
            inline_cap: None,
        }
    }

    /// The files that came with a result, matched against the regions the
    /// caller lent to its task: a file that is one of them (the same device
    /// and inode) is that region again, mapping and all, and the duplicate
    /// fd is closed. The regions not sent back are dropped with the supply.
    pub(crate) fn resolve(
        fds: Vec<OwnedFd>,
        mut lent: Vec<Region>,
    ) -> std::result::Result<Supply, String> {
        if fds.is_empty() {
            // Most results: no buffer came back (any lent one is dropped
            // where the value is decoded).
            return Ok(Supply {
                items: Vec::new(),
                _spare: lent,
                inline_cap: None,
            });
        }
        let mut items = Vec::with_capacity(fds.len());
        let mut seen = std::collections::HashSet::with_capacity(fds.len());
        for fd in fds {
            let id = sys::file_id(&fd).map_err(|e| format!("a result's SharedBuf: {e}"))?;
            if !seen.insert((id.dev, id.ino)) {
                return Err("a result named the same SharedBuf twice".into());
            }
            match lent.iter().position(|r| (r.dev, r.ino) == (id.dev, id.ino)) {
                Some(i) => items.push(Some(Incoming::Region(lent.swap_remove(i)))),
                None => items.push(Some(Incoming::Fd(fd))),
            }
        }
        Ok(Supply {
            items,
            _spare: lent,
            inline_cap: None,
        })
    }

    /// Runs `f` (which decodes one value, or a chunk's items) with this
    /// supply as this thread's source of buffers, armed.
    pub(crate) fn decoding<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let cap = self.inline_cap;
        let f = || with_inline_cap(cap, f);
        if self.items.is_empty() {
            // Nothing to take (most results): armed, nothing installed.
            return arm(ARM_DECODER, f);
        }
        self.with_decoder(|| arm(ARM_DECODER, f))
    }

    /// The value decoded with this supply may make at most `n` buffers from
    /// inline bytes (a sandboxed worker's result, which copies its
    /// buffers: an honest one sends at most `max_per_task`); past it, the
    /// decode fails rather than give this process an fd per buffer.
    pub(crate) fn cap_inline(mut self, n: usize) -> Supply {
        self.inline_cap = Some(n);
        self
    }

    /// Runs `f` with this supply installed (moved in, and back out
    /// afterwards, even on a panic), not armed.
    fn with_decoder<T>(&mut self, f: impl FnOnce() -> T) -> T {
        struct Restore<'a> {
            supply: &'a mut Supply,
            prev: Option<Supply>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let prev = self.prev.take();
                let cur = DECODER.try_with(|d| d.replace(prev)).ok().flatten();
                if let Some(c) = cur {
                    *self.supply = c;
                }
            }
        }
        let now = std::mem::take(self);
        let prev = DECODER.with(|d| d.replace(Some(now)));
        let _restore = Restore { supply: self, prev };
        f()
    }
}

/// Takes buffer `index` of the frame being decoded.
fn take(index: u32, len: u64) -> std::result::Result<SharedBuf, String> {
    if !armed(ARM_DECODER) {
        return Err(OUTSIDE_DE.to_string());
    }
    let item = DECODER
        .try_with(|d| {
            let mut d = d.borrow_mut();
            let Some(s) = d.as_mut() else {
                return Err(format!(
                    "SharedBuf {index} did not arrive (the message brought none)"
                ));
            };
            let n = s.items.len();
            match s.items.get_mut(index as usize) {
                Some(slot) => slot
                    .take()
                    .ok_or_else(|| format!("SharedBuf {index} was named twice")),
                None => Err(format!(
                    "SharedBuf {index} did not arrive (the message brought {n})"
                )),
            }
        })
        .map_err(|_| OUTSIDE_DE.to_string())??;
    let len = usize::try_from(len).map_err(|_| "a SharedBuf's length is too large".to_string())?;
    let region = match item {
        Incoming::Fd(fd) => Region::receive(fd, len)?,
        Incoming::Region(mut r) => {
            if r.map.len() < len {
                return Err("a SharedBuf came back longer than its memory".into());
            }
            r.len = len;
            r
        }
    };
    Ok(SharedBuf::of(region))
}

struct AsBytes<'a>(&'a [u8]);

impl Serialize for AsBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Serialize for SharedBuf {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mode = ENCODER
            .try_with(|e| e.borrow().as_ref().map(|e| e.mode))
            .ok()
            .flatten()
            .filter(|_| armed(ARM_ENCODER))
            .ok_or_else(|| ser::Error::custom(OUTSIDE_SER))?;
        let mut cell = self
            .region
            .try_borrow_mut()
            .map_err(|_| ser::Error::custom(BORROWED))?;
        match &*cell {
            None => return Err(ser::Error::custom(SENT)),
            Some(r) if !r.here() => return Err(ser::Error::custom(FORKED)),
            Some(_) => {}
        }
        let mut t = s.serialize_tuple_struct(SERDE_NAME, 2)?;
        match mode {
            Mode::Inline => {
                let r = cell.as_ref().expect("checked above");
                t.serialize_field(&INLINE)?;
                t.serialize_field(&AsBytes(r.bytes()))?;
            }
            Mode::Fds => {
                let r = cell.take().expect("checked above");
                let len = r.len as u64;
                let index = ENCODER.with(|e| {
                    let mut e = e.borrow_mut();
                    let e = e.as_mut().expect("the encoder was set above");
                    e.regions.push(r);
                    e.regions.len() - 1
                });
                let index = u32::try_from(index)
                    .map_err(|_| ser::Error::custom("too many SharedBufs in one message"))?;
                t.serialize_field(&BY_FD)?;
                t.serialize_field(&(index, len))?;
            }
        }
        t.end()
    }
}

struct BufVisitor;

impl<'de> Visitor<'de> for BufVisitor {
    type Value = SharedBuf;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a SharedBuf sent by procpool")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<SharedBuf, A::Error> {
        let kind: u8 = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        match kind {
            BY_FD => {
                let (index, len): (u32, u64) = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                take(index, len).map_err(de::Error::custom)
            }
            INLINE => seq
                .next_element_seed(InlineSeed)?
                .ok_or_else(|| de::Error::invalid_length(1, &self)),
            k => Err(de::Error::custom(format!("unknown SharedBuf encoding {k}"))),
        }
    }
}

/// Reads inline bytes straight into a new buffer.
struct InlineSeed;

impl<'de> DeserializeSeed<'de> for InlineSeed {
    type Value = SharedBuf;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<SharedBuf, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for InlineSeed {
    type Value = SharedBuf;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the bytes of a SharedBuf")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<SharedBuf, E> {
        let left = INLINE_LEFT.try_with(Cell::get).ok().flatten();
        if let Some(n) = left {
            if n == 0 {
                return Err(E::custom(
                    "the result carries more SharedBufs than one task may",
                ));
            }
            let _ = INLINE_LEFT.try_with(|c| c.set(Some(n - 1)));
        }
        SharedBuf::from_slice(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for SharedBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<SharedBuf, D::Error> {
        d.deserialize_tuple_struct(SERDE_NAME, 2, BufVisitor)
    }
}

/// A typed [`SharedBuf`]: a slice of plain-old-data values (`u8`, `f32`,
/// `[u16; 3]`, your own `#[repr(C)]` structs that derive
/// [`bytemuck::Pod`]) in shared memory, read and written in place by a
/// task, sent by reference like a `SharedBuf`.
///
/// ```
/// use procpool::{Pool, SharedSlice};
///
/// fn scale(mut v: SharedSlice<f32>) -> SharedSlice<f32> {
///     for x in v.as_mut_slice() {
///         *x *= 2.0;
///     }
///     v
/// }
///
/// let pool = Pool::builder().processes(2).build()?;
/// let v = SharedSlice::from_slice(&[1.0f32, 2.5, -3.0])?;
/// let v = pool.apply(scale, v)?;
/// assert_eq!(&*v.as_slice(), &[2.0, 5.0, -6.0]);
/// # Ok::<(), procpool::Error>(())
/// ```
pub struct SharedSlice<T: bytemuck::Pod> {
    buf: SharedBuf,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> SharedSlice<T> {
    const CHECK: () = {
        assert!(
            size_of::<T>() > 0,
            "SharedSlice needs an element type with a size"
        );
        assert!(
            align_of::<T>() <= PAGE,
            "SharedSlice aligns its elements to at most 4096 bytes"
        );
    };

    /// A new slice of `len` zeroed elements.
    pub fn new(len: usize) -> Result<SharedSlice<T>> {
        let () = Self::CHECK;
        let bytes = len.checked_mul(size_of::<T>()).ok_or(Error::Config(
            "a SharedSlice of that many elements is too large",
        ))?;
        Ok(SharedSlice {
            buf: SharedBuf::new(bytes)?,
            _t: PhantomData,
        })
    }

    /// A new slice with a copy of `items`.
    pub fn from_slice(items: &[T]) -> Result<SharedSlice<T>> {
        let mut s = SharedSlice::new(items.len())?;
        s.as_mut_slice().copy_from_slice(items);
        Ok(s)
    }

    /// A typed view of a buffer; `Err` gives the buffer back if its length
    /// is not a multiple of the element's size.
    pub fn from_buf(buf: SharedBuf) -> std::result::Result<SharedSlice<T>, SharedBuf> {
        let () = Self::CHECK;
        if !buf.len().is_multiple_of(size_of::<T>()) {
            return Err(buf);
        }
        Ok(SharedSlice {
            buf,
            _t: PhantomData,
        })
    }

    /// The untyped buffer.
    pub fn into_buf(self) -> SharedBuf {
        self.buf
    }

    /// Its length in elements.
    pub fn len(&self) -> usize {
        self.buf.len() / size_of::<T>()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its elements, to read (see [`SharedBuf::as_slice`]).
    ///
    /// # Panics
    /// As [`SharedBuf::as_slice`].
    pub fn as_slice(&self) -> Ref<'_, [T]> {
        // The mapping is page-aligned and the length a multiple of T's size.
        Ref::map(self.buf.as_slice(), bytemuck::cast_slice)
    }

    /// Its elements, to read and write.
    ///
    /// # Panics
    /// As [`SharedBuf::as_slice`].
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.buf.as_mut_slice())
    }

    /// A copy of its elements.
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }
}

impl<T: bytemuck::Pod> std::fmt::Debug for SharedSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlice")
            .field("len", &self.len())
            .field("buf", &self.buf)
            .finish()
    }
}

impl<T: bytemuck::Pod> Serialize for SharedSlice<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.buf.serialize(s)
    }
}

impl<'de, T: bytemuck::Pod> Deserialize<'de> for SharedSlice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<SharedSlice<T>, D::Error> {
        let buf = SharedBuf::deserialize(d)?;
        SharedSlice::from_buf(buf).map_err(|b| {
            de::Error::custom(format!(
                "a SharedSlice of {} bytes is not a whole number of {}-byte elements",
                b.len(),
                size_of::<T>()
            ))
        })
    }
}

/// The most buffers one task may carry: bounded by what one frame can
/// attach (groups of `MAX_FDS_PER_MSG` on its first bytes, at least 34 of
/// them) and by what a worker, with this process's limit on open files,
/// can receive beside its own.
pub(crate) fn max_per_task() -> usize {
    let half = usize::try_from(sys::fd_soft_limit() / 2).unwrap_or(usize::MAX);
    half.clamp(16, 4096)
}

/// Why a task's argument or result (`what`) with `n` buffers, more than
/// [`max_per_task`], cannot travel.
pub(crate) fn too_many_message(n: usize, what: &str) -> String {
    format!(
        "the task's {what} carries {n} SharedBufs, more than one task may ({}: each is a file \
         descriptor, and the receiving process must be able to hold them all); use a smaller \
         chunksize, or raise the limit on open files (ulimit -n)",
        max_per_task()
    )
}

/// The error for a task whose argument carries more buffers than
/// [`max_per_task`].
pub(crate) fn too_many(n: usize) -> Error {
    Error::Encode {
        what: "argument",
        source: crate::error::CodecError::new(too_many_message(n, "argument")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codec;

    #[test]
    fn outside_the_pool_is_an_error_and_leaves_the_buffer() {
        let mut b = SharedBuf::from_slice(b"abc").unwrap();
        let mut out = Vec::new();
        let e = codec::encode_into(&b, &mut out).unwrap_err();
        assert!(e.message().contains("can only be sent by the pool"), "{e}");
        assert_eq!(b.as_mut_slice(), b"abc");
        let e = codec::decode::<SharedBuf>(&[0, 0, 3]).unwrap_err();
        assert!(
            e.message().contains("can only be received by the pool"),
            "{e}"
        );
    }

    #[test]
    fn round_trip_by_fd_moves_the_region() {
        let b = SharedBuf::from_slice(b"hello").unwrap();
        let ptr = b.as_slice().as_ptr();
        let mut regions = Vec::new();
        let mut out = Vec::new();
        encoding(Mode::Fds, &mut regions, || codec::encode_into(&b, &mut out)).unwrap();
        assert_eq!(regions.len(), 1);
        assert_eq!(b.len(), 0, "the value is an empty shell once sent");
        assert!(format!("{b:?}").contains("sent"));
        // Sending it again is an error.
        let mut again = Vec::new();
        let e = encoding(Mode::Fds, &mut regions, || {
            codec::encode_into(&b, &mut again)
        })
        .unwrap_err();
        assert!(e.message().contains("sent twice"), "{e}");
        // As the parent sees its own buffer come back: the same region.
        let fd = regions[0].fd.as_ref().unwrap().try_clone().unwrap();
        let mut s = Supply::resolve(vec![fd], regions).unwrap();
        let back: SharedBuf = s.decoding(|| codec::decode(&out)).unwrap().0;
        assert_eq!(back.as_slice().as_ptr(), ptr, "the same mapping");
        assert_eq!(&*back.as_slice(), b"hello");
    }

    #[test]
    fn a_fresh_fd_is_mapped_and_checked() {
        let b = SharedBuf::from_slice(&[7u8; 5000]).unwrap();
        let mut regions = Vec::new();
        let mut out = Vec::new();
        encoding(Mode::Fds, &mut regions, || codec::encode_into(&b, &mut out)).unwrap();
        let fd = regions[0].fd.as_ref().unwrap().try_clone().unwrap();
        let mut s = Supply::from_fds(vec![fd]);
        let back: SharedBuf = s.decoding(|| codec::decode(&out)).unwrap().0;
        assert_eq!(back.len(), 5000);
        assert!(back.as_slice().iter().all(|&x| x == 7));
        assert_ne!(back.as_slice().as_ptr(), regions[0].bytes().as_ptr());
        // Named twice, or missing: errors.
        let e = s.decoding(|| codec::decode::<SharedBuf>(&out)).unwrap_err();
        assert!(e.message().contains("named twice"), "{e}");
        let mut none = Supply::default();
        let e = none
            .decoding(|| codec::decode::<SharedBuf>(&out))
            .unwrap_err();
        assert!(e.message().contains("did not arrive"), "{e}");
        // A file that is not a sealed memfd is refused.
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let mut s = Supply::from_fds(vec![OwnedFd::from(f)]);
        let e = s.decoding(|| codec::decode::<SharedBuf>(&out)).unwrap_err();
        assert!(e.message().contains("not a memory file"), "{e}");
    }

    #[test]
    fn inline_copies_and_works_anywhere() {
        let b = SharedSlice::from_slice(&[1u32, 2, 3]).unwrap();
        let mut regions = Vec::new();
        let mut out = Vec::new();
        encoding(Mode::Inline, &mut regions, || {
            codec::encode_into(&b, &mut out)
        })
        .unwrap();
        assert!(regions.is_empty());
        assert_eq!(b.len(), 3, "an inline send copies");
        let back: SharedSlice<u32> = codec::decode(&out).unwrap().0;
        assert_eq!(back.to_vec(), vec![1, 2, 3]);
        assert_ne!(back.as_slice().as_ptr(), b.as_slice().as_ptr());
    }

    #[test]
    fn a_capped_supply_makes_no_more_inline_buffers_than_its_cap() {
        let bufs: Vec<SharedBuf> = (0..3)
            .map(|_| SharedBuf::from_slice(b"ab").unwrap())
            .collect();
        let (mut regions, mut out) = (Vec::new(), Vec::new());
        encoding(Mode::Inline, &mut regions, || {
            codec::encode_into(&bufs, &mut out)
        })
        .unwrap();
        let decode = |cap: usize| {
            let mut s = Supply::default().cap_inline(cap);
            s.decoding(|| codec::decode_untrusted::<Vec<SharedBuf>>(&out))
        };
        assert_eq!(decode(3).unwrap().0.len(), 3);
        let e = decode(2).unwrap_err();
        assert!(e.message().contains("more SharedBufs"), "{e}");
        // Uncapped, as before.
        assert_eq!(
            Supply::default()
                .decoding(|| codec::decode::<Vec<SharedBuf>>(&out))
                .unwrap()
                .0
                .len(),
            3
        );
    }

    #[test]
    fn a_live_view_blocks_the_send() {
        let b = SharedBuf::new(10).unwrap();
        let view = b.as_slice();
        let mut regions = Vec::new();
        let mut out = Vec::new();
        let e = encoding(Mode::Fds, &mut regions, || codec::encode_into(&b, &mut out)).unwrap_err();
        assert!(e.message().contains("view"), "{e}");
        assert_eq!(view.len(), 10);
        assert!(regions.is_empty());
    }

    #[test]
    fn a_frame_takes_buffers_only_while_armed() {
        // As in a worker: the frame's encoder and decoder are installed for
        // the whole task, but a task's own serializing is not the pool's.
        let b = SharedBuf::from_slice(b"xyz").unwrap();
        let mut regions = Vec::new();
        let mut supply = Supply::default();
        let mut out = Vec::new();
        frame(Mode::Fds, &mut regions, &mut supply, || {
            let e = codec::encode_into(&b, &mut out).unwrap_err();
            assert!(e.message().contains("can only be sent by the pool"), "{e}");
            assert_eq!(encoded_len(), 0);
            encode_armed(|| codec::encode_into(&b, &mut out)).unwrap();
            assert_eq!(encoded_len(), 1);
            truncate_encoded(0);
            assert_eq!(encoded_len(), 0);
        });
        assert!(regions.is_empty(), "rolled back");
        assert_eq!(b.len(), 0, "sent");
    }

    #[test]
    fn typed_slices_check_their_length() {
        let b = SharedBuf::new(7).unwrap();
        let b = SharedSlice::<u32>::from_buf(b).unwrap_err();
        assert_eq!(b.len(), 7);
        let s = SharedSlice::<u32>::new(0).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.as_slice().len(), 0);
    }
}
