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

use crate::sys::confine;
use crate::sys::{self, Mapping};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The largest block this process may make: a sandboxed worker under a
/// file-size cap (`RLIMIT_FSIZE`, which also bounds a memfd's size, and
/// whose `SIGXFSZ` would kill it) makes none past the cap; a body that
/// large stays in the socket's frame instead.
static BLOCK_MAX: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Makes no block larger than `bytes` in this process from now on.
pub(crate) fn limit_block_size(bytes: u64) {
    BLOCK_MAX.store(
        usize::try_from(bytes).unwrap_or(usize::MAX),
        Ordering::SeqCst,
    );
}

fn check_size(cap: usize) -> io::Result<()> {
    if cap > BLOCK_MAX.load(Ordering::Relaxed) {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    Ok(())
}

fn is_size_limit(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EFBIG)
}

/// A memory file and this process's mapping of it.
pub(crate) struct Block {
    fd: OwnedFd,
    map: Mapping,
    /// Sealed against writes, growth and shrinking (mapped read-only).
    sealed: bool,
}

impl Block {
    /// A new block of at least `len` bytes.
    pub(crate) fn new(len: usize) -> io::Result<Block> {
        let cap = round_up(len);
        check_size(cap)?;
        let fd = sys::memfd()?;
        sys::set_len(&fd, cap)?;
        let map = Mapping::new(&fd, cap, false)?;
        Ok(Block {
            fd,
            map,
            sealed: false,
        })
    }

    /// A block received from another process: map all of it (read-only if
    /// it is sealed against writes).
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Block> {
        let len = sys::file_len(&fd)?;
        let sealed = sys::seals(&fd).is_ok_and(|s| s & libc::F_SEAL_WRITE != 0);
        let map = if sealed {
            Mapping::read_only(&fd, len)?
        } else {
            Mapping::new(&fd, len, true)?
        };
        Ok(Block { fd, map, sealed })
    }

    /// A block from a worker that may be hostile: it must be sealed against
    /// writes, growth and shrinking before this process maps it, or the
    /// worker could truncate it under the mapping (a SIGBUS here) or change
    /// it while it is decoded. A file larger than `max` bytes is refused
    /// before it is mapped (`untrusted::block_max`).
    pub(crate) fn from_sealed_fd(fd: OwnedFd, max: u64) -> io::Result<Block> {
        let need = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
        let seals = sys::seals(&fd)?;
        if seals & need != need {
            return Err(io::Error::other(
                "a block from a sandboxed worker is not sealed",
            ));
        }
        // Sealed against growth: its size cannot change after this.
        let len = sys::file_len(&fd)?;
        if len as u64 > max {
            return Err(io::Error::other(format!(
                "a result block of {len} bytes is past the sandbox's result limit"
            )));
        }
        Block::from_fd(fd)
    }

    /// Seals the block against writes, growth and shrinking, and maps it
    /// read-only: from now on no process can change it.
    pub(crate) fn seal(&mut self) -> io::Result<()> {
        if self.sealed {
            return Ok(());
        }
        let len = self.map.len();
        // The writable mapping must go before F_SEAL_WRITE is allowed.
        self.map = Mapping::empty();
        // A child that another thread forked between the mapping and its
        // MADV_DONTFORK still holds a writable copy, until it execs or
        // exits (EBUSY until then): wait for it, a bounded while.
        let mut tries = 0;
        while let Err(e) = confine::seal(&self.fd) {
            if e.raw_os_error() != Some(libc::EBUSY) || tries == 200 {
                return Err(e);
            }
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.map = Mapping::read_only(&self.fd, len)?;
        self.sealed = true;
        Ok(())
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
        if self.sealed {
            return Err(io::Error::other("a sealed block cannot grow"));
        }
        let mut cap = round_up(len.max(self.map.len() * 2));
        if cap > BLOCK_MAX.load(Ordering::Relaxed) {
            cap = round_up(len);
        }
        check_size(cap)?;
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
            self.map = if self.sealed {
                Mapping::read_only(&self.fd, len)?
            } else {
                Mapping::new(&self.fd, len, false)?
            };
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
    /// A sandboxed pool's: keeps nothing (a block a worker has seen is
    /// never given to another), seals the blocks it sends, and takes only
    /// sealed blocks from workers.
    sandboxed: bool,
}

impl BlockCache {
    /// The cache of a sandboxed pool (see `sandboxed`).
    pub(crate) fn sandboxed() -> BlockCache {
        BlockCache {
            free: Mutex::new(Vec::new()),
            sandboxed: true,
        }
    }

    /// Whether this is a sandboxed pool's cache.
    pub(crate) fn is_sandboxed(&self) -> bool {
        self.sandboxed
    }

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
        if self.sandboxed || b.sealed || b.capacity() > CACHE_BYTES {
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
    /// A block would pass this process's size cap: the body stays in `out`.
    no_block: bool,
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
            no_block: false,
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
        if self.block.is_none()
            && !self.no_block
            && self.out.len() - self.start + buf.len() > SPILL_AT
        {
            match self.spill(buf.len()) {
                Ok(()) => {}
                Err(e) if is_size_limit(&e) => self.no_block = true,
                Err(e) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(msg));
                }
            }
        }
        match &mut self.block {
            None => self.out.extend_from_slice(buf),
            Some((b, len)) => {
                let end = *len + buf.len();
                if end > b.capacity() {
                    match b.reserve(end) {
                        Ok(()) => {}
                        Err(e) if is_size_limit(&e) => {
                            // Past the size cap: back into the frame.
                            let (b, len) = self.block.take().expect("a block");
                            self.out.extend_from_slice(b.bytes(len));
                            self.out.extend_from_slice(buf);
                            self.no_block = true;
                            if let Target::Reuse(r) = &mut self.target {
                                r.get_or_insert(b);
                            }
                            return Ok(buf.len());
                        }
                        Err(e) => return Err(e),
                    }
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
