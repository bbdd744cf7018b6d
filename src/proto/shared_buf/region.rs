//! A buffer's memory: a sealed memory file and this process's mapping of
//! it ([`Region`]), made here or received from another process, and what
//! a copy made by `fork()` must not touch.

use crate::sys::{self, Mapping};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The name of a buffer's memory file, as `/proc/*/maps` and
/// `/proc/*/fd` show it (`/memfd:procpool-shared`).
const NAME: &std::ffi::CStr = c"procpool-shared";
/// A buffer's file is this many bytes at least, and a multiple of it.
pub(super) const PAGE: usize = 4096;

/// One memory file and this process's mapping of it.
pub(crate) struct Region {
    /// Always `Some`, except while a copy made by fork is dropped.
    pub(super) fd: Option<OwnedFd>,
    pub(super) map: Mapping,
    /// The bytes in use (at most the mapping's length).
    pub(super) len: usize,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// `sys::fork_generation()` where this value was made.
    pub(super) generation: u64,
}

fn capacity(len: usize) -> usize {
    len.max(1).next_multiple_of(PAGE)
}

impl Region {
    /// A new zero-filled region of `len` bytes.
    pub(super) fn new(len: usize) -> std::io::Result<Region> {
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
    pub(super) fn receive(fd: OwnedFd, len: usize) -> std::result::Result<Region, String> {
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
    pub(super) fn of(
        fd: OwnedFd,
        map: Mapping,
        len: usize,
        id: &sys::FileId,
        generation: u64,
    ) -> Region {
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
    pub(super) fn here(&self) -> bool {
        self.generation == sys::fork_generation()
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.map.as_slice()[..self.len]
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
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
