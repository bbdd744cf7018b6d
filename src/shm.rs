//! Large messages through shared memory.
//!
//! A pipe or socket carries about 1 GB/s here and costs a copy on each side;
//! a message body larger than [`SPILL_AT`] instead lives in a *block*: a
//! memory file (`memfd`) mapped by the sender, whose fd travels with the
//! frame (`SCM_RIGHTS`) and which the receiver maps too. Blocks are reused,
//! so their pages are already faulted in: a task's argument block goes to
//! the worker, the worker writes the result into the same block (it has
//! decoded the argument by then), and the block comes back with the result
//! and returns to the pool's cache once the caller has decoded the value.

use crate::sys::{self, Mapping};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

/// Bodies above this size go through a block.
pub(crate) const SPILL_AT: usize = 512 << 10;
/// The cache keeps at most this many bytes of free blocks (the sum of
/// their sizes) ...
///
/// A warm block saves its pages' first-touch faults (about 35 ms per 64 MiB
/// here) each time it is reused, but the memory stays with the pool for
/// its lifetime: without a bound, a program that once received a few
/// 200 MB results kept a gigabyte. 128 MiB keeps warm the block of a
/// 64 MiB argument that goes to a worker and comes back as the result (66
/// MiB, rounded up; the largest case the benchmarks measure) and a few
/// smaller ones. A block that would not fit is freed (unmapped and closed)
/// as soon as its value is decoded.
const CACHE_BYTES: usize = 128 << 20;
/// ... in at most this many blocks.
const CACHE_BLOCKS: usize = 4;

/// A memory file and this process's mapping of it.
pub(crate) struct Block {
    fd: OwnedFd,
    map: Mapping,
}

impl Block {
    /// A new block of at least `len` bytes.
    pub(crate) fn new(len: usize) -> io::Result<Block> {
        let fd = sys::memfd()?;
        let cap = round_up(len);
        sys::set_len(&fd, cap)?;
        let map = Mapping::new(&fd, cap, false)?;
        Ok(Block { fd, map })
    }

    /// A block received from another process: map all of it.
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Block> {
        let len = sys::file_len(&fd)?;
        let map = Mapping::new(&fd, len, true)?;
        Ok(Block { fd, map })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Makes the block hold at least `len` bytes (growing the file and the
    /// mapping if needed, keeping the contents).
    pub(crate) fn reserve(&mut self, len: usize) -> io::Result<()> {
        if len <= self.map.len() {
            return Ok(());
        }
        let cap = round_up(len.max(self.map.len() * 2));
        if sys::file_len(&self.fd)? < cap {
            sys::set_len(&self.fd, cap)?;
        }
        self.map = Mapping::new(&self.fd, cap, false)?;
        Ok(())
    }

    /// Re-maps the block if another process grew its file.
    pub(crate) fn refresh(&mut self) -> io::Result<()> {
        let len = sys::file_len(&self.fd)?;
        if len > self.map.len() {
            self.map = Mapping::new(&self.fd, len, false)?;
        }
        Ok(())
    }

    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        &self.map.as_slice()[..len.min(self.map.len())]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }
}

fn round_up(len: usize) -> usize {
    len.max(1).next_multiple_of(2 << 20)
}

/// Free blocks, kept warm for the next large message: at most
/// [`CACHE_BLOCKS`] of them, [`CACHE_BYTES`] in all.
#[derive(Default)]
pub(crate) struct BlockCache {
    /// Largest first.
    free: Mutex<Vec<Block>>,
}

impl BlockCache {
    /// The smallest free block of at least `len` bytes; else the largest,
    /// grown; else a new one.
    pub(crate) fn take(&self, len: usize) -> io::Result<Block> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            match free.iter().rposition(|b| b.capacity() >= len) {
                Some(i) => Some(free.remove(i)),
                None if free.is_empty() => None,
                None => Some(free.remove(0)),
            }
        };
        match found {
            Some(mut b) => {
                b.reserve(len)?;
                Ok(b)
            }
            None => Block::new(len),
        }
    }

    /// Keeps a block for reuse, within the bounds: the largest blocks stay
    /// (they serve any smaller message too); the others are freed.
    pub(crate) fn put(&self, b: Block) {
        if b.capacity() > CACHE_BYTES {
            return;
        }
        let dropped = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let at = free.partition_point(|x| x.capacity() >= b.capacity());
            free.insert(at, b);
            let mut total = 0;
            let keep = free
                .iter()
                .take(CACHE_BLOCKS)
                .take_while(|x| {
                    total += x.capacity();
                    total <= CACHE_BYTES
                })
                .count();
            free.split_off(keep)
        };
        // Unmapped and closed outside the lock.
        drop(dropped);
    }
}

/// Where a spilled body went.
pub(crate) enum Target<'a> {
    /// Take blocks from this cache.
    Cache(&'a BlockCache),
    /// Reuse this block first (a worker writing its result where its
    /// argument was), else make a new one.
    Reuse(Option<Block>),
}

/// What [`Spill::finish`] returns: the spilled body (block and length), if
/// any, and the reusable block if it went unused.
pub(crate) type Finished = (Option<(Block, usize)>, Option<Block>);

/// A writer that appends to `out` until the body (everything after
/// `start`) exceeds [`SPILL_AT`], then moves the body into a block and
/// goes on there.
pub(crate) struct Spill<'a, 'b> {
    out: &'a mut Vec<u8>,
    start: usize,
    target: Target<'b>,
    block: Option<(Block, usize)>,
    error: Option<io::Error>,
}

impl<'a, 'b> Spill<'a, 'b> {
    pub(crate) fn new(out: &'a mut Vec<u8>, target: Target<'b>) -> Self {
        let start = out.len();
        Spill {
            out,
            start,
            target,
            block: None,
            error: None,
        }
    }

    /// Finishes: `Some((block, len))` if the body spilled, else None (it is
    /// in `out`). Also returns the reusable block if it was not used.
    pub(crate) fn finish(self) -> io::Result<Finished> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let unused = match self.target {
            Target::Reuse(b) => b,
            Target::Cache(_) => None,
        };
        Ok((self.block, unused))
    }

    /// Drops whatever was written (after an encode error).
    pub(crate) fn discard(self) -> Option<Block> {
        self.out.truncate(self.start);
        let mut back = match self.target {
            Target::Reuse(b) => b,
            Target::Cache(_) => None,
        };
        if let Some((b, _)) = self.block {
            back.get_or_insert(b);
        }
        back
    }

    fn spill(&mut self, extra: usize) -> io::Result<()> {
        let body = self.out.len() - self.start;
        let need = body + extra;
        let mut b = match &mut self.target {
            Target::Cache(c) => c.take(need)?,
            Target::Reuse(r) => match r.take() {
                Some(mut b) => {
                    b.reserve(need)?;
                    b
                }
                None => Block::new(need)?,
            },
        };
        b.bytes_mut()[..body].copy_from_slice(&self.out[self.start..]);
        self.out.truncate(self.start);
        self.block = Some((b, body));
        Ok(())
    }
}

impl Write for Spill<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.block.is_none() && self.out.len() - self.start + buf.len() > SPILL_AT {
            if let Err(e) = self.spill(buf.len()) {
                let msg = e.to_string();
                self.error = Some(e);
                return Err(io::Error::other(msg));
            }
        }
        match &mut self.block {
            None => self.out.extend_from_slice(buf),
            Some((b, len)) => {
                let end = *len + buf.len();
                if end > b.capacity() {
                    b.reserve(end)?;
                }
                b.bytes_mut()[*len..end].copy_from_slice(buf);
                *len = end;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A task's body as the parent keeps it.
pub(crate) enum Body {
    Heap(Vec<u8>),
    Shm(Block, usize),
}

/// A block lent to a result; it goes back to the cache when dropped.
pub(crate) struct Lent {
    pub(crate) block: Option<Block>,
    pub(crate) len: usize,
    pub(crate) cache: Arc<BlockCache>,
}

impl Lent {
    pub(crate) fn bytes(&self) -> &[u8] {
        self.block.as_ref().map_or(&[], |b| b.bytes(self.len))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.cache.put(b);
        }
    }
}
