//! How a [`SharedBuf`] travels: the thread's encoder and decoder that the
//! pool installs and arms around its own encoding and decoding (the
//! buffers a value gives up go to the encoder's list; those a frame
//! brought are taken from the decoder's [`Supply`]), and the serde impls
//! that use them.

use super::region::Region;
use super::{FORKED, SharedBuf, SharedSlice};
use crate::sys;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{self, SerializeTupleStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;

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
