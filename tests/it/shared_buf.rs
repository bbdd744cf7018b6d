//! `SharedBuf` and `SharedSlice`: buffers that travel to a worker and back
//! as references to their memory. Each test runs under a watchdog, and
//! under either start method (CI runs the suite under both).

use crate::common;

use procpool::{Error, MapOptions, Pool, SharedBuf, SharedSlice, StartMethod, TaskOptions};
use serde::{Deserialize, Serialize, Serializer};
use std::cell::RefCell;
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on a thread of its own and fails the test if it has not
/// finished within two minutes (a hang is a failure, not a stuck run).
fn watchdog<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("the test did not finish within 120 s"),
    }
}

/// The inode of the mapping of this process that contains `addr`, from
/// `/proc/self/maps`, and the mapping's start address.
fn mapping_at(addr: usize) -> Option<(u64, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next()?;
        let (lo, hi) = range.split_once('-')?;
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        );
        if (lo..hi).contains(&addr) {
            let inode = f.nth(3)?.parse().ok()?;
            return Some((inode, lo));
        }
    }
    None
}

/// The lines of `/proc/self/maps` that map a procpool memory file.
fn block_mappings() -> Vec<String> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memfd:procpool"))
        .map(str::to_string)
        .collect()
}

/// This process's fds that point at a procpool memory file.
fn block_fds() -> Vec<String> {
    let names: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
                .collect()
        })
        .unwrap_or_default();
    names
        .into_iter()
        .filter_map(|n| {
            let t = std::fs::read_link(format!("/proc/self/fd/{n}")).ok()?;
            let t = t.to_string_lossy().into_owned();
            t.contains("memfd:procpool").then(|| format!("{n} -> {t}"))
        })
        .collect()
}

const MIB: usize = 1 << 20;

/// What a worker saw of the buffer it was given, and the buffer.
#[derive(Serialize, Deserialize)]
struct Seen {
    buf: SharedBuf,
    inode: u64,
    pattern_ok: bool,
}

/// Checks the caller's pattern, overwrites every byte, and reports the
/// inode of its own mapping of the buffer.
fn overwrite(mut buf: SharedBuf) -> Seen {
    let pattern_ok = buf
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 251) as u8);
    let inode = mapping_at(buf.as_slice().as_ptr() as usize).map_or(0, |m| m.0);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 13) as u8;
    }
    Seen {
        buf,
        inode,
        pattern_ok,
    }
}

#[test]
fn a_buffer_written_in_a_worker_comes_back_as_the_same_memory() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            for round in 0..3 {
                let mut buf = SharedBuf::new(4 * MIB + 17).unwrap();
                for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
                    *b = (i % 251) as u8;
                }
                let addr = buf.as_slice().as_ptr() as usize;
                let (inode, start) = mapping_at(addr).expect("the buffer is mapped here");
                let seen = pool.apply(overwrite, buf).unwrap();
                assert!(
                    seen.pattern_ok,
                    "round {round}: the worker saw the caller's bytes"
                );
                assert_eq!(seen.inode, inode, "the worker mapped the same file");
                let back = seen.buf;
                assert_eq!(back.len(), 4 * MIB + 17);
                assert_eq!(
                    back.as_slice().as_ptr() as usize,
                    addr,
                    "the same mapping in the caller, not a copy"
                );
                assert_eq!(
                    mapping_at(addr),
                    Some((inode, start)),
                    "the same file, still mapped"
                );
                assert!(
                    back.as_slice()
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == (i % 13) as u8),
                    "the worker's writes are in the caller's memory"
                );
            }
        });
    })
}

/// A frame of an image, with its pixels in shared memory.
#[derive(Serialize, Deserialize)]
struct Frame {
    id: u32,
    pixels: SharedSlice<u16>,
    tags: Vec<String>,
    mask: Option<SharedBuf>,
}

/// Doubles the pixels in place, and makes a new mask buffer in the worker.
fn process(mut f: Frame) -> Frame {
    for p in f.pixels.as_mut_slice() {
        *p *= 2;
    }
    let n = f.pixels.len();
    let mut mask = SharedBuf::new(n).unwrap();
    for (m, &p) in mask
        .as_mut_slice()
        .iter_mut()
        .zip(f.pixels.as_slice().iter())
    {
        *m = u8::from(p > 100);
    }
    f.mask = Some(mask);
    f.tags.push("processed".into());
    f
}

#[test]
fn buffers_inside_a_struct_and_a_new_buffer_from_the_worker() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            let pixels: Vec<u16> = (0..100_000u32).map(|i| (i % 200) as u16).collect();
            let frame = Frame {
                id: 7,
                pixels: SharedSlice::from_slice(&pixels).unwrap(),
                tags: vec!["raw".into()],
                mask: None,
            };
            let addr = frame.pixels.as_slice().as_ptr() as usize;
            let out = pool.apply(process, frame).unwrap();
            assert_eq!(out.id, 7);
            assert_eq!(out.tags, ["raw", "processed"]);
            assert_eq!(out.pixels.as_slice().as_ptr() as usize, addr);
            let doubled: Vec<u16> = pixels.iter().map(|p| p * 2).collect();
            assert_eq!(&*out.pixels.as_slice(), &doubled[..]);
            let mask = out.mask.expect("the worker's new buffer");
            assert_eq!(mask.len(), pixels.len());
            let want: Vec<u8> = doubled.iter().map(|&p| u8::from(p > 100)).collect();
            assert_eq!(mask.to_vec(), want);
            // The worker's buffer is a file of its own, mapped here now.
            assert!(mapping_at(mask.as_slice().as_ptr() as usize).is_some());
        });
    })
}

/// Adds 1 to every byte; returns the buffer and its first byte.
fn bump(mut b: SharedBuf) -> (u8, SharedBuf) {
    for x in b.as_mut_slice() {
        *x = x.wrapping_add(1);
    }
    let first = b.as_slice()[0];
    (first, b)
}

fn numbered(n: usize, len: usize) -> (Vec<SharedBuf>, Vec<usize>) {
    let bufs: Vec<SharedBuf> = (0..n)
        .map(|i| {
            let mut b = SharedBuf::new(len).unwrap();
            b.as_mut_slice().fill(i as u8);
            b
        })
        .collect();
    let addrs = bufs
        .iter()
        .map(|b| b.as_slice().as_ptr() as usize)
        .collect();
    (bufs, addrs)
}

#[test]
fn map_with_more_buffers_in_one_chunk_than_one_message_carries() {
    common::bounded(|| {
        // Holds hundreds of fds: in a process of its own, beside no other test.
        if common::isolated(&test_name!(
            "map_with_more_buffers_in_one_chunk_than_one_message_carries"
        )) {
            return;
        }
        watchdog(|| {
            let pool = common::pool(2);
            // 600 buffers in chunks of 300: more than the 253 fds one message
            // may carry, each way.
            let (bufs, addrs) = numbered(600, 3000);
            let out = pool
                .map_with(bump, bufs, MapOptions::new().chunksize(300))
                .unwrap();
            assert_eq!(out.len(), 600);
            for (i, ((first, b), addr)) in out.iter().zip(&addrs).enumerate() {
                assert_eq!(*first, (i as u8).wrapping_add(1), "item {i}");
                assert_eq!(
                    b.as_slice().as_ptr() as usize,
                    *addr,
                    "item {i}: the same memory"
                );
                assert!(b.as_slice().iter().all(|&x| x == (i as u8).wrapping_add(1)));
            }
            // The default chunk size too.
            let (bufs, addrs) = numbered(40, 10);
            let out = pool.map(bump, bufs).unwrap();
            for (i, (first, b)) in out.iter().enumerate() {
                assert_eq!(*first, (i as u8).wrapping_add(1));
                assert_eq!(b.as_slice().as_ptr() as usize, addrs[i]);
            }
        });
    })
}

#[test]
fn imap_and_imap_unordered_carry_buffers() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            for chunk in [1, 7] {
                let (bufs, addrs) = numbered(50, 100);
                let got: Vec<(u8, SharedBuf)> = pool
                    .imap_with(bump, bufs, MapOptions::new().chunksize(chunk))
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(got.len(), 50);
                for (i, (first, b)) in got.iter().enumerate() {
                    assert_eq!(*first, i as u8 + 1, "chunk {chunk}, item {i}");
                    assert_eq!(b.as_slice().as_ptr() as usize, addrs[i]);
                }
            }
            let (bufs, _) = numbered(50, 100);
            let mut firsts: Vec<u8> = pool
                .imap_unordered(bump, bufs)
                .map(|r| {
                    let (first, b) = r.unwrap();
                    assert!(b.as_slice().iter().all(|&x| x == first));
                    first
                })
                .collect();
            firsts.sort_unstable();
            assert_eq!(firsts, (1..=50).collect::<Vec<u8>>());
        });
    })
}

fn no_core_files() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// Counts its run in the file at `path`, writes a mark into the buffer,
/// and aborts its worker the first time: the buffer is then half written.
fn write_then_die((path, mut buf): (String, SharedBuf)) -> SharedBuf {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .unwrap();
    f.write_all(b"run\n").unwrap();
    drop(f);
    let first = buf.as_slice()[0] == 0;
    buf.as_mut_slice()[0] += 1;
    if first {
        no_core_files();
        std::process::abort();
    }
    buf
}

fn runs(path: &common::TempPath) -> usize {
    std::fs::read_to_string(&path.0).map_or(0, |s| s.lines().count())
}

#[test]
fn a_worker_that_dies_holding_a_buffer_fails_its_task_without_a_retry() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            let path = common::TempPath::new("shared-die");
            let buf = SharedBuf::new(MIB).unwrap();
            let r = pool.apply_with(
                write_then_die,
                (path.string(), buf),
                TaskOptions::new().retries(3),
            );
            match r {
                Err(Error::WorkerLostShared { buffers: 1, .. }) => {}
                other => panic!("expected WorkerLostShared, got {other:?}"),
            }
            let msg = r.err().unwrap().to_string();
            assert!(msg.contains("released"), "{msg}");
            assert!(msg.contains("not run again"), "{msg}");
            assert!(msg.contains("retries_with_shared"), "{msg}");
            assert_eq!(runs(&path), 1, "retries(3) did not run it again");
            // The pool goes on.
            let (first, _) = pool.apply(bump, SharedBuf::new(8).unwrap()).unwrap();
            assert_eq!(first, 1);
        });
    })
}

#[test]
fn retries_with_shared_runs_it_again_on_the_half_written_buffer() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            let path = common::TempPath::new("shared-retry");
            let buf = SharedBuf::new(MIB).unwrap();
            let addr = buf.as_slice().as_ptr() as usize;
            let back = pool
                .apply_with(
                    write_then_die,
                    (path.string(), buf),
                    TaskOptions::new().retries_with_shared(1),
                )
                .unwrap();
            assert_eq!(runs(&path), 2);
            // The dead worker's mark, then the retry's.
            assert_eq!(back.as_slice()[0], 2);
            assert_eq!(back.as_slice().as_ptr() as usize, addr);
            // A map's chunk likewise.
            let path = common::TempPath::new("shared-retry-map");
            let items = vec![(path.string(), SharedBuf::new(16).unwrap())];
            let out = pool
                .map_with(
                    write_then_die,
                    items,
                    MapOptions::new().retries_with_shared(1),
                )
                .unwrap();
            assert_eq!(out[0].as_slice()[0], 2);
        });
    })
}

fn panics(_: SharedBuf) -> SharedBuf {
    panic!("deliberate")
}

fn sleeps(b: SharedBuf) -> SharedBuf {
    std::thread::sleep(Duration::from_secs(30));
    b
}

fn fresh(len: usize) -> SharedBuf {
    let mut b = SharedBuf::new(len).unwrap();
    b.as_mut_slice().fill(9);
    b
}

fn abort_holding(_: SharedBuf) -> SharedBuf {
    no_core_files();
    std::process::abort()
}

#[test]
fn no_mapping_or_fd_of_a_block_is_left_after_the_pool_and_buffers_go() {
    common::bounded(|| {
        if common::isolated(&test_name!(
            "no_mapping_or_fd_of_a_block_is_left_after_the_pool_and_buffers_go"
        )) {
            return;
        }
        watchdog(|| {
            let before = (block_mappings(), block_fds());
            {
                let pool = common::pool(2);
                let kept = pool.apply(overwrite, SharedBuf::new(MIB).unwrap()).unwrap();
                let (bufs, _) = numbered(300, 100);
                let mapped = pool
                    .map_with(bump, bufs, MapOptions::new().chunksize(260))
                    .unwrap();
                let made = pool.apply(fresh, 3 * MIB).unwrap();
                assert!(made.as_slice().iter().all(|&x| x == 9));
                assert!(matches!(
                    pool.apply(panics, SharedBuf::new(10).unwrap()),
                    Err(Error::TaskPanicked { .. })
                ));
                assert!(matches!(
                    pool.apply(abort_holding, SharedBuf::new(10).unwrap()),
                    Err(Error::WorkerLostShared { .. })
                ));
                let r = pool
                    .apply_with(
                        sleeps,
                        SharedBuf::new(10).unwrap(),
                        TaskOptions::new().timeout(Duration::from_millis(50)),
                    )
                    .map(|_| ());
                assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
                let r = pool
                    .apply_async(sleeps, SharedBuf::new(10).unwrap())
                    .unwrap();
                assert!(r.cancel());
                // A result never taken, and a big buffer through a spilled
                // argument (the argument's other bytes go in a block).
                let big = (vec![1u8; 2 * MIB], SharedBuf::new(10).unwrap());
                let _untaken = pool.apply_async(|x: (Vec<u8>, SharedBuf)| x, big).unwrap();
                assert!(
                    !block_mappings().is_empty(),
                    "buffers are mapped while alive"
                );
                drop((kept, mapped, made));
                pool.close();
                pool.join().unwrap();
            }
            assert_eq!(block_mappings(), before.0, "no mapping of a block is left");
            assert_eq!(block_fds(), before.1, "no fd of a block is left");
        });
    })
}

fn len_of(b: SharedBuf) -> usize {
    b.len()
}

#[test]
fn a_buffer_in_an_initializer_is_a_clear_error() {
    common::bounded(|| {
        fn init(_: SharedBuf) {}
        let r = Pool::builder()
            .processes(1)
            .initializer(init, SharedBuf::new(4).unwrap())
            .build();
        match r {
            Err(Error::Encode { source, .. }) => {
                assert!(source.message().contains("SharedBuf"), "{source}");
                assert!(source.message().contains("initializer"), "{source}");
            }
            other => panic!("expected Encode, got {other:?}"),
        }
    })
}

/// An argument whose `Serialize` writes its buffer twice.
struct Twice(SharedBuf);

impl Serialize for Twice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.0, &self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Twice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Twice, D::Error> {
        SharedBuf::deserialize(d).map(Twice)
    }
}

fn twice_len(t: Twice) -> usize {
    t.0.len()
}

thread_local! {
    static STASH: RefCell<Option<SharedBuf>> = const { RefCell::new(None) };
}

/// An argument whose `Serialize` sends the thread-local buffer, which is
/// not its own: the pool must not take it while a view of it is alive.
struct Sneaky;

impl Serialize for Sneaky {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        STASH.with(|st| st.borrow().as_ref().unwrap().serialize(s))
    }
}

impl<'de> Deserialize<'de> for Sneaky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sneaky, D::Error> {
        SharedBuf::deserialize(d).map(|_| Sneaky)
    }
}

fn sneaky_task(_: Sneaky) -> u8 {
    1
}

#[test]
fn misuse_gives_clear_errors() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(1);
            // Sent twice in one argument.
            match pool.apply(twice_len, Twice(SharedBuf::new(4).unwrap())) {
                Err(Error::Encode { source, .. }) => {
                    assert!(source.message().contains("sent twice"), "{source}")
                }
                other => panic!("expected Encode, got {other:?}"),
            }
            // A buffer reached through a thread-local while a view of it lives.
            STASH.with(|st| *st.borrow_mut() = Some(SharedBuf::from_slice(b"abc").unwrap()));
            STASH.with(|st| {
                let st = st.borrow();
                let view = st.as_ref().unwrap().as_slice();
                match pool.apply(sneaky_task, Sneaky) {
                    Err(Error::Encode { source, .. }) => {
                        assert!(source.message().contains("view"), "{source}")
                    }
                    other => panic!("expected Encode, got {other:?}"),
                }
                assert_eq!(&*view, b"abc", "the view is intact");
            });
            // Without a view it moves, and what stays behind is an empty shell.
            assert_eq!(pool.apply(sneaky_task, Sneaky).unwrap(), 1);
            STASH.with(|st| {
                let st = st.borrow();
                let shell = st.as_ref().unwrap();
                assert_eq!(shell.len(), 0);
                assert!(format!("{shell:?}").contains("sent"));
            });
            // The pool is fine after all of that.
            assert_eq!(pool.apply(len_of, SharedBuf::new(5).unwrap()).unwrap(), 5);
        });
    })
}

/// The fd limit's share for one task, as the pool computes it.
fn max_per_task() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is valid for writes.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    ((r.rlim_cur / 2) as usize).clamp(16, 4096)
}

fn count(v: Vec<SharedBuf>) -> usize {
    v.len()
}

#[test]
fn too_many_buffers_for_one_task_is_a_clear_error() {
    common::bounded(|| {
        // Holds hundreds of fds: in a process of its own, beside no other test.
        if common::isolated(&test_name!(
            "too_many_buffers_for_one_task_is_a_clear_error"
        )) {
            return;
        }
        watchdog(|| {
            let pool = common::pool(1);
            let max = max_per_task();
            let bufs: Vec<SharedBuf> = (0..=max).map(|_| SharedBuf::new(1).unwrap()).collect();
            match pool.apply(count, bufs) {
                Err(Error::Encode { source, .. }) => {
                    assert!(source.message().contains("chunksize"), "{source}")
                }
                other => panic!("expected Encode, got {other:?}"),
            }
            // A chunk of a map likewise: its items fail, the map says why.
            let bufs: Vec<SharedBuf> = (0..=max).map(|_| SharedBuf::new(1).unwrap()).collect();
            match pool.map_with(len_of, bufs, MapOptions::new().chunksize(max + 1)) {
                Err(Error::Encode { source, .. }) => {
                    assert!(source.message().contains("SharedBufs"), "{source}")
                }
                other => panic!("expected Encode, got {:?}", other.map(|v| v.len())),
            }
            // A result with too many, made in the worker.
            match pool.apply(make, max + 1) {
                Err(Error::Encode { what, source, .. }) => {
                    assert_eq!(what, "result");
                    assert!(source.message().contains("ulimit -n"), "{source}")
                }
                other => panic!("expected Encode, got {:?}", other.map(|v| v.len())),
            }
            let bufs: Vec<SharedBuf> = (0..300).map(|_| SharedBuf::new(1).unwrap()).collect();
            assert_eq!(pool.apply(count, bufs).unwrap(), 300);
            assert_eq!(pool.apply(make, 300).unwrap().len(), 300);
        });
    })
}

fn make(n: usize) -> Vec<SharedBuf> {
    (0..n).map(|_| SharedBuf::new(1).unwrap()).collect()
}

/// Set before a `Fork` pool is built: its workers get a copy of this value
/// in their memory, but not the memory it maps.
static HELD: std::sync::Mutex<Option<SharedBuf>> = std::sync::Mutex::new(None);

fn touch_held(_: ()) -> u8 {
    let held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    match held.as_ref() {
        Some(b) => b.as_slice()[0],
        None => 0,
    }
}

#[test]
fn a_copy_made_by_fork_refuses_access() {
    common::bounded(|| {
        watchdog(|| {
            *HELD.lock().unwrap() = Some(SharedBuf::from_slice(&[42]).unwrap());
            let pool = Pool::builder()
                .processes(1)
                .start_method(StartMethod::Fork)
                .build()
                .unwrap();
            match pool.apply(touch_held, ()) {
                Err(Error::TaskPanicked { message, .. }) => {
                    assert!(message.contains("fork()"), "{message}")
                }
                other => panic!("expected TaskPanicked, got {other:?}"),
            }
            // The caller's own value is untouched.
            let held = HELD.lock().unwrap();
            assert_eq!(held.as_ref().unwrap().as_slice()[0], 42);
        });
    })
}

/// Fails to serialize for odd numbers.
struct OddFails(u32);

impl Serialize for OddFails {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % 2 == 1 {
            return Err(serde::ser::Error::custom("odd numbers do not serialize"));
        }
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for OddFails {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OddFails, D::Error> {
        u32::deserialize(d).map(OddFails)
    }
}

/// A new buffer holding `x`, then a field that fails for odd `x`: the
/// buffer's encoding is then undone, and the items after it keep theirs.
fn buffer_then_maybe_fail(x: u32) -> (SharedBuf, OddFails) {
    (SharedBuf::from_slice(&[x as u8; 100]).unwrap(), OddFails(x))
}

#[test]
fn an_item_whose_result_fails_half_encoded_leaves_the_others_their_buffers() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            let mut ok = 0;
            for (x, r) in (0..8u32).zip(pool.imap_with(
                buffer_then_maybe_fail,
                0..8u32,
                MapOptions::new().chunksize(8),
            )) {
                match r {
                    Ok((b, v)) => {
                        assert_eq!(x % 2, 0);
                        assert_eq!(v.0, x);
                        assert_eq!(
                            b.to_vec(),
                            vec![x as u8; 100],
                            "item {x} got its own buffer"
                        );
                        ok += 1;
                    }
                    Err(Error::Encode { what, source, .. }) => {
                        assert_eq!(x % 2, 1);
                        assert_eq!(what, "result");
                        assert!(source.message().contains("odd"), "{source}");
                    }
                    Err(e) => panic!("item {x}: {e}"),
                }
            }
            assert_eq!(ok, 4);
        });
    })
}

#[test]
fn callbacks_and_await_see_the_buffers() {
    common::bounded(|| {
        watchdog(|| {
            let pool = common::pool(2);
            let (tx, rx) = mpsc::channel();
            let mut b = SharedBuf::new(1000).unwrap();
            b.as_mut_slice()[999] = 41;
            let r = pool
                .apply_async_with(
                    bump,
                    b,
                    TaskOptions::new().on_success(move |(_, b): &(u8, SharedBuf)| {
                        tx.send(b.as_slice()[999]).unwrap();
                    }),
                )
                .unwrap();
            let (first, b) = r.get().unwrap();
            assert_eq!((first, b.as_slice()[999]), (1, 42));
            assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), 42);
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let (_, b) = rt.block_on(pool.apply_async(bump, b).unwrap()).unwrap();
            assert_eq!(b.as_slice()[999], 43);
        });
    })
}
