//! Memory shared between processes: memory files (`memfd_create`), their
//! size and seals, mappings of them, and this process's private memory.

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

/// A shared, read-write mapping of a memory file seen as an array of
/// `AtomicU64`, which (unlike a [`Mapping`]) the children of a `fork()`
/// inherit: the memory behind the status words (`proto::words`).
pub(crate) struct SharedAtomics {
    ptr: *mut AtomicU64,
    bytes: usize,
}

// SAFETY: the region is only ever accessed through &AtomicU64, which is Sync.
unsafe impl Send for SharedAtomics {}
// SAFETY: as above.
unsafe impl Sync for SharedAtomics {}

impl SharedAtomics {
    /// Maps the first `bytes` bytes of `fd` (a multiple of the page size,
    /// at most the file's length; the file must be sealed against
    /// shrinking, as [`memfd`]'s are).
    pub(crate) fn new(fd: &OwnedFd, bytes: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of an open memfd with no address
        // hint, of at most the file's length (the caller's promise, which
        // a sealed memfd keeps: it cannot shrink).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedAtomics {
            ptr: p.cast(),
            bytes,
        })
    }

    /// Word `i`.
    pub(crate) fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.bytes / 8);
        // SAFETY: i is within the mapping, which holds zero-initialised,
        // 8-aligned u64s (page aligned); AtomicU64 has u64's layout, and the
        // mapping lives as long as &self.
        unsafe { &*self.ptr.add(i) }
    }

    /// Unmaps every page of the region but the page-aligned byte range
    /// `keep`. No reference to a word outside `keep` may be used in this
    /// process afterwards (the caller's promise: see
    /// `SharedWords::keep_only`).
    pub(crate) fn unmap_except(&self, keep: std::ops::Range<usize>) {
        assert!(keep.start <= keep.end && keep.end <= self.bytes);
        // SAFETY: both ranges lie within the mapping made in new() (keep.end
        // <= bytes by the assertion above), page aligned; no reference into
        // them is used in this process again (the caller's promise).
        unsafe {
            if keep.start > 0 {
                libc::munmap(self.ptr.cast(), keep.start);
            }
            if keep.end < self.bytes {
                libc::munmap(
                    self.ptr.cast::<u8>().add(keep.end).cast(),
                    self.bytes - keep.end,
                );
            }
        }
    }
}

impl Drop for SharedAtomics {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes are exactly the mapping made in new(), and no
        // reference into it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// A new anonymous memory file (`memfd_create`), close-on-exec, sealed
/// against shrinking: a mapping of it can never lose pages under it (which
/// would turn reads into SIGBUS).
pub(crate) fn memfd() -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated static string.
    let fd = cvt(unsafe {
        libc::memfd_create(
            c"procpool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    })?;
    // SAFETY: a fresh fd that we alone own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on an open fd with integer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) })?;
    Ok(fd)
}

/// Sets a file's size.
pub(crate) fn set_len(fd: &OwnedFd, len: usize) -> io::Result<()> {
    // SAFETY: ftruncate on an open fd with an integer length.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    Ok(())
}

/// A file's size.
pub(crate) fn file_len(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: st is a plain-data out-parameter for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and st is valid for writes.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_size as usize)
}

/// A shared, read-write mapping of the first `len` bytes of a file.
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory. It is shared with another process,
// and handed out as &[u8]/&mut [u8]: that is sound because the pool's
// protocol gives a block to one side at a time (the parent writes an
// argument and does not touch the block until the worker's DONE; the worker
// writes nothing to it once it has sent DONE), and &/&mut on Mapping order the
// accesses within this process.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (which must be at least that long);
    /// `populate` pre-faults the pages.
    pub(crate) fn new(fd: &OwnedFd, len: usize, populate: bool) -> io::Result<Mapping> {
        Self::map(fd, len, populate, true)
    }

    /// Maps `len` bytes of `fd` for reading only (a sealed block).
    pub(crate) fn read_only(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        Self::map(fd, len, false, false)
    }

    /// An empty mapping (maps nothing).
    pub(crate) fn empty() -> Mapping {
        Mapping {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
            writable: true,
        }
    }

    fn map(fd: &OwnedFd, len: usize, populate: bool, write: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping::empty());
        }
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of an open fd with no address hint.
        // The callers map at most the file's length (fstat, or the length
        // they just set), and every block file is sealed against shrinking
        // (memfd), so no page of the mapping can vanish under a reader.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Large blocks: ask for huge pages where the kernel offers them on request.
        // SAFETY: advice on a range we just mapped; failure is harmless.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        // Not inherited by a process another thread forks: it would hold a
        // writable mapping of the block until it execs, and sealing the
        // block against writes (a sandboxed pool) fails while one exists.
        // No child of this process uses a block through this mapping.
        // SAFETY: advice on a range we just mapped; failure leaves the
        // mapping inherited, as before.
        unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        Ok(Mapping {
            ptr: p.cast(),
            len,
            writable: write,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the mapping's lifetime
        // (dangling but unused when len is 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "a read-only mapping written to");
        // SAFETY: as in as_slice; &mut self makes this the only view here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: exactly the region mapped in new(); no view outlives self.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

impl Mapping {
    /// Leaves this mapping out of the children of a later `fork()`
    /// (`MADV_DONTFORK`): in a child its range is not mapped at all.
    pub(crate) fn dont_fork(&self) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        // SAFETY: advice on exactly the range this mapping owns; it changes
        // nothing in this process, only what a child of fork() inherits.
        cvt(unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTFORK) })?;
        Ok(())
    }
}

/// The seals that fix a `SharedBuf`'s file at its size for good: it can
/// neither shrink (a mapping would lose pages under a reader: SIGBUS) nor
/// grow, and no seal can be added or removed after these.
pub(crate) const SIZE_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new memory file of `len` bytes (zero-filled), close-on-exec, named
/// `name` (as `/proc/*/maps` shows it), sealed with [`SIZE_SEALS`].
pub(crate) fn sealed_memfd(name: &std::ffi::CStr, len: usize) -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated string that outlives the call.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: a fresh fd that we alone own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_len(&fd, len)?;
    // SAFETY: fcntl on an open fd with integer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) })?;
    Ok(fd)
}

/// A memory file's seals (`F_GET_SEALS`); an error for a file that is not
/// a memory file.
pub(crate) fn seals(fd: &OwnedFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on an open fd with no pointer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// What `fstat` says of a file: its identity (device and inode, unique
/// among the files that exist), its size, and how many of its bytes have
/// storage (pages of a memory file that were written or faulted in).
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: usize,
    pub(crate) allocated: u64,
}

/// `fstat` of an open file.
pub(crate) fn file_id(fd: &OwnedFd) -> io::Result<FileId> {
    // SAFETY: st is a plain-data out-parameter for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and st is valid for writes.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(FileId {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as usize,
        allocated: (st.st_blocks as u64).saturating_mul(512),
    })
}

/// This process's private resident memory in bytes: its resident anonymous
/// pages (`RssAnon`), which is `resident - shared` in `/proc/self/statm`
/// (shared counts file and shared-memory pages: the executable, libraries
/// and the pool's memfd blocks). Pages still shared with the parent since
/// the fork are counted, but do not change as a task runs, so a growth
/// over a baseline is memory the worker allocated and wrote.
pub(crate) fn private_memory() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/statm")?;
    let mut f = text.split_ascii_whitespace().skip(1);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/statm");
    let resident: u64 = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let shared: u64 = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    Ok(resident.saturating_sub(shared) * page_size())
}

/// The size of a memory page.
pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}
