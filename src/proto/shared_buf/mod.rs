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
//!
//! This file holds the public types; `region.rs` a buffer's memory file
//! and mapping; `transport.rs` the thread's encoder and decoder and the
//! serde impls.

use crate::error::{Error, Result};
use crate::sys;
use region::PAGE;
use std::cell::{Ref, RefCell};
use std::marker::PhantomData;

mod region;
mod transport;

pub(crate) use region::Region;
pub(crate) use transport::{
    Mode, Supply, decode_armed, encode_armed, encoded_len, encoding, frame, split_encoded,
    truncate_encoded,
};

const FORKED: &str = "this SharedBuf is a copy that fork() made of a value of the parent \
     process: its memory is not in this process";

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
    use std::os::fd::OwnedFd;

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
