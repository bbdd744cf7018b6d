//! max_memory_per_child: a worker whose private memory grows past the limit
//! is replaced after its task, and the task's result is kept. Memory that
//! is reserved but never written, and the shared blocks that large
//! arguments travel in, do not count.

use crate::common;

use procpool::{Error, Pool};
use serde_bytes::ByteBuf;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// Leaks `mib` MiB that it has written to (so they are resident).
fn leak(mib: usize) -> u32 {
    std::mem::forget(vec![0x5au8; mib * MIB]);
    std::process::id()
}

/// Leaks `mib` MiB of address space that it never touches.
fn reserve(mib: usize) -> u32 {
    std::mem::forget(Vec::<u8>::with_capacity(mib * MIB));
    std::process::id()
}

fn pid(_: ()) -> u32 {
    std::process::id()
}

/// A large argument and result: both travel in a shared-memory block.
fn echo(b: ByteBuf) -> (ByteBuf, u32) {
    (b, std::process::id())
}

/// Maps `mib` MiB of memory shared with other processes (as the pool's
/// blocks are), writes all of it, and leaves it mapped.
fn leak_shared(mib: usize) -> u32 {
    let len = mib * MIB;
    // SAFETY: a fresh anonymous shared mapping with no address hint; it is
    // written within its length and never unmapped (leaked on purpose).
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::write_bytes(p.cast::<u8>(), 0x5a, len);
    }
    std::process::id()
}

fn limited(mib: usize) -> Pool {
    Pool::builder()
        .processes(1)
        .max_memory_per_child((mib * MIB) as u64)
        .build()
        .expect("building the pool")
}

#[test]
fn a_worker_that_grows_past_the_limit_is_replaced_and_its_result_kept() {
    common::bounded(|| {
        let pool = limited(48);
        let first = pool.worker_pids();
        // Under the limit: the same worker goes on.
        let a = pool.apply(leak, 8).unwrap();
        let b = pool.apply(leak, 8).unwrap();
        assert_eq!(vec![a], first);
        assert_eq!(b, a, "replaced below the limit");
        // Past it (16 + 40 > 48): the result still comes back...
        let c = pool.apply(leak, 40).unwrap();
        assert_eq!(c, a);
        // ...and the next task runs in a fresh worker.
        let d = pool.apply(pid, ()).unwrap();
        assert_ne!(d, a, "the leaking worker was kept");
        assert_eq!(pool.worker_pids(), vec![d]);
        // The fresh one starts from its own baseline.
        assert_eq!(pool.apply(leak, 8).unwrap(), d);
    })
}

#[test]
fn tasks_queued_behind_a_retiring_worker_run_elsewhere() {
    common::bounded_for(Duration::from_secs(120), || {
        let pool = limited(16);
        // Many tasks at once (some are sent in batches behind the leaking
        // one): every one resolves with its value.
        let leaky: Vec<_> = (0..6)
            .map(|_| pool.apply_async(leak, 24).unwrap())
            .collect();
        let quick: Vec<_> = (0..300)
            .map(|_| pool.apply_async(pid, ()).unwrap())
            .collect();
        let leak_pids: Vec<u32> = leaky.into_iter().map(|r| r.get().unwrap()).collect();
        for r in quick {
            r.get().unwrap();
        }
        let distinct: std::collections::HashSet<u32> = leak_pids.iter().copied().collect();
        assert_eq!(distinct.len(), 6, "each leak of 24 MiB retires its worker");
    })
}

#[test]
fn untouched_allocations_do_not_count() {
    common::bounded(|| {
        let pool = limited(32);
        let a = pool.apply(reserve, 512).unwrap();
        let b = pool.apply(reserve, 512).unwrap();
        assert_eq!(a, b, "a worker was replaced for memory it never wrote");
    })
}

#[test]
fn shared_memory_blocks_do_not_count() {
    common::bounded(|| {
        let pool = limited(32);
        let big = ByteBuf::from(vec![7u8; 96 * MIB]);
        let (back, a) = pool.apply(echo, big.clone()).unwrap();
        assert_eq!(back.len(), big.len());
        let (_, b) = pool.apply(echo, big).unwrap();
        assert_eq!(a, b, "a worker was replaced for the pool's own blocks");
    })
}

#[test]
fn shared_memory_does_not_count() {
    common::bounded(|| {
        // Resident, but shared (RssShmem), like the pool's own blocks: only
        // private memory (RssAnon) counts.
        let pool = limited(32);
        let a = pool.apply(leak_shared, 64).unwrap();
        let b = pool.apply(leak_shared, 64).unwrap();
        assert_eq!(a, b, "a worker was replaced for shared memory");
    })
}

#[test]
fn a_map_chunk_that_leaks_keeps_its_results() {
    common::bounded_for(Duration::from_secs(120), || {
        let pool = limited(16);
        let pids = pool.map(leak, vec![24, 24, 24]).unwrap();
        assert_eq!(pids.len(), 3);
        let distinct: std::collections::HashSet<u32> = pids.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            3,
            "each leaking chunk retires its worker: {pids:?}"
        );
    })
}

#[test]
fn zero_is_an_error() {
    common::bounded(|| {
        let r = Pool::builder().processes(1).max_memory_per_child(0).build();
        assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    })
}
