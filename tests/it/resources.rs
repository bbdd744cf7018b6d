//! Running out of resources: file descriptors while the pool starts its
//! workers or replaces one (a clear error, never a hang, nothing left
//! behind), and the shared memory the pool keeps after large values.
//!
//! The fd cases lower RLIMIT_NOFILE in a helper process (see
//! `common::Helper`), never in the test process.

use crate::common;

use crate::common::{Helper, say};
use procpool::{Error, Pool};
use std::time::Duration;

const HELPER: &str = "resources_helper";

fn inc(x: u64) -> u64 {
    x + 1
}

fn exit_with(code: i32) {
    std::process::exit(code)
}

/// Leaves this process exactly `free` fd numbers to open: fills the gaps
/// below its highest open fd with /dev/null, then sets the soft
/// RLIMIT_NOFILE just above, `free` numbers further.
fn limit_fds(free: u64) {
    // SAFETY: fcntl(F_GETFD) only asks whether a number is open.
    let is_open = |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    let highest = (0..4096).rev().find(|&fd| is_open(fd)).unwrap_or(2);
    let null = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsRawFd;
    for fd in 0..highest {
        if !is_open(fd) {
            // SAFETY: dup2 onto a number that is not open; the new fd is
            // never closed (this helper process exits soon).
            assert_eq!(unsafe { libc::dup2(null.as_raw_fd(), fd) }, fd);
        }
    }
    if null.as_raw_fd() < highest {
        // It fills a gap itself.
        std::mem::forget(null);
    }
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a live struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = highest as u64 + 1 + free;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set"))
        .parse()
        .unwrap()
}

/// build() with `PROCPOOL_WORKERS` workers under an open-file limit of the
/// fds open now plus `PROCPOOL_FDS_FREE`.
fn build_under_fd_limit() {
    let workers = env_u64("PROCPOOL_WORKERS") as usize;
    limit_fds(env_u64("PROCPOOL_FDS_FREE"));
    match Pool::builder().processes(workers).build() {
        Ok(pool) => {
            say_pids_of(&pool);
            let v = pool.map(inc, 0..100).unwrap();
            assert_eq!(v, (1..101).collect::<Vec<_>>());
            pool.close();
            pool.join().unwrap();
            say("BUILD", format!("ok {}", pool.worker_pids().len()));
        }
        Err(e) => say("BUILD", format!("err {e}")),
    }
    say("CHILDREN", format!("{:?}", common::children()));
}

fn say_pids_of(pool: &Pool) {
    common::say_pids(pool);
}

/// Sets the soft open-file limit of process `pid` (the pool's fork server,
/// a pid from its API) to its lowest unused fd number: it can open nothing
/// more (a new fd must be below the limit).
fn limit_fds_of(pid: u32) {
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a valid resource and live structs; only the soft
    // limit of the fork server of this process's own pool goes down.
    unsafe {
        assert_eq!(
            libc::prlimit(
                pid as libc::pid_t,
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut rl
            ),
            0
        );
        rl.rlim_cur = lowest_free;
        assert_eq!(
            libc::prlimit(
                pid as libc::pid_t,
                libc::RLIMIT_NOFILE,
                &rl,
                std::ptr::null_mut()
            ),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A pool whose fork server can no longer make a worker's socket (its
/// open-file limit lowered after build): a lost worker is not replaced,
/// the other goes on; once none is left, queued tasks fail with the start
/// error.
fn replacement_fails() {
    let pool = Pool::builder().processes(2).build().unwrap();
    say_pids_of(&pool);
    limit_fds_of(pool.server_pid());
    // The first worker dies; its replacement cannot be received.
    match pool.apply(exit_with, 7) {
        Err(Error::WorkerLost { status, .. }) => say("FIRST", format!("{:?}", status.code())),
        other => say("FIRST", format!("unexpected {other:?}")),
    }
    say("OTHER", pool.apply(inc, 1).unwrap());
    // The last one dies with tasks queued behind it.
    let last = pool.apply_async(exit_with, 7).unwrap();
    let queued: Vec<_> = (0..5).map(|i| pool.apply_async(inc, i).unwrap()).collect();
    let bound = Duration::from_secs(60);
    assert!(
        last.wait_timeout(bound),
        "the last worker's task never resolved"
    );
    say(
        "LAST",
        format!("{:?}", last.get().map_err(|e| e.to_string())),
    );
    for (i, r) in queued.into_iter().enumerate() {
        assert!(r.wait_timeout(bound), "queued task {i} never resolved");
        say("QUEUED", format!("{:?}", r.get()));
    }
    say("LATER", format!("{:?}", pool.apply(inc, 1)));
    pool.close();
    say("JOIN", format!("{:?}", pool.join()));
    say("CHILDREN", format!("{:?}", common::children()));
}

/// Not a test of its own: the body of the helper processes of this file.
#[test]
#[ignore = "the helper process of the tests in this file"]
fn resources_helper() {
    common::bounded(|| match common::helper_mode().as_deref() {
        None => {}
        Some("build") => build_under_fd_limit(),
        Some("replace") => replacement_fails(),
        Some(other) => panic!("unknown helper mode {other}"),
    })
}

/// Runs build() in a helper under an fd limit; returns its BUILD line and
/// the pids it reported, after checking that it left no process.
fn build_with(workers: usize, free: u64) -> (String, Vec<u32>) {
    let mut h = Helper::start(&test_name!(HELPER), "build", |c| {
        c.env("PROCPOOL_WORKERS", workers.to_string())
            .env("PROCPOOL_FDS_FREE", free.to_string());
    });
    let build = h.expect("BUILD");
    let children = h.expect("CHILDREN");
    let (status, out) = h.finish();
    assert!(status.success(), "{status}: {out}");
    assert_eq!(children, "[]", "processes left after build(): {out}");
    let pids = out
        .lines()
        .find_map(|l| l.strip_prefix("PIDS "))
        .map(|l| {
            let (s, w) = common::parse_pids(l);
            std::iter::once(s).chain(w).collect()
        })
        .unwrap_or_default();
    (build, pids)
}

/// The number in "(N started)" of a start error.
fn started(msg: &str) -> usize {
    let at = msg
        .find(" started)")
        .unwrap_or_else(|| panic!("no count in: {msg}"));
    let from = msg[..at].rfind('(').unwrap() + 1;
    msg[from..at].parse().unwrap()
}

/// No fd free for the first worker's socket (under Fork the two free fds
/// go to the server's socket and an eventfd; the exec'd server needs a few
/// more to start, so there the server itself cannot start): a clear error
/// at once.
#[test]
fn build_fails_cleanly_when_no_worker_can_start() {
    common::bounded(|| {
        let (build, _) = build_with(8, 2);
        assert!(build.starts_with("err "), "{build}");
        assert!(build.contains("Too many open files"), "{build}");
        if build.contains("fork server") && !build.contains("could not start all") {
            return;
        }
        assert!(build.contains("could not start all 8 workers"), "{build}");
        assert_eq!(started(&build), 0, "{build}");
    })
}

/// Room for some workers' sockets but not all: build() returned a clear
/// error instead of waiting forever for the rest, and every worker that
/// had started is gone.
#[test]
fn build_fails_cleanly_when_fds_run_out_part_way() {
    common::bounded(|| {
        let (build, _) = build_with(20, 2 + 10);
        assert!(build.starts_with("err "), "{build}");
        assert!(build.contains("could not start all 20 workers"), "{build}");
        assert!(build.contains("file descriptor"), "{build}");
        assert!(build.contains("ulimit -n"), "{build}");
        let n = started(&build);
        assert!(n > 0 && n < 20, "{build}");
    })
}

/// Room for every worker: a working pool.
#[test]
fn build_succeeds_when_every_worker_fits_under_the_fd_limit() {
    common::bounded(|| {
        let (build, pids) = build_with(20, 2 + 20 + 8);
        assert_eq!(build, "ok 0", "the pool's workers after join");
        assert_eq!(pids.len(), 21, "the server and 20 workers");
        common::assert_dead(&pids, "the pool's processes after close() and join()");
    })
}

/// Replacements that cannot start: the task of a dead worker still gets
/// WorkerLost at once, the other worker goes on; when the last one dies,
/// after the retries, every queued task, every later call and join()
/// fail with the start error.
#[test]
fn failed_replacements_fail_queued_tasks_once_no_worker_is_left() {
    common::bounded(|| {
        let mut h = Helper::start(&test_name!(HELPER), "replace", |_| {});
        let (server, workers) = common::parse_pids(&h.expect("PIDS"));
        assert_eq!(h.expect("FIRST"), "Some(7)");
        assert_eq!(h.expect("OTHER"), "2");
        let last = h.expect("LAST");
        assert!(last.contains("was lost"), "the last worker's task: {last}");
        for i in 0..5 {
            let q = h.expect("QUEUED");
            assert!(
                q.contains("Broken")
                    && q.contains("no worker is left")
                    && q.contains("Too many open files"),
                "queued task {i}: {q}"
            );
        }
        let later = h.expect("LATER");
        assert!(later.contains("no worker is left"), "{later}");
        // The pool tried again (with backoff) before it gave up.
        let attempts: u32 = later
            .split(" attempts in a row")
            .next()
            .and_then(|head| head.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no attempt count in: {later}"));
        assert!(attempts > 1, "no retry before giving up: {later}");
        let join = h.expect("JOIN");
        assert!(join.contains("no worker is left"), "{join}");
        assert_eq!(h.expect("CHILDREN"), "[]");
        let (status, out) = h.finish();
        assert!(status.success(), "{status}: {out}");
        let all: Vec<u32> = std::iter::once(server).chain(workers).collect();
        common::assert_dead(&all, "the pool's processes after join()");
    })
}

// ---- shared memory held after large values ---------------------------------

/// The bound on the free blocks the pool keeps (src/proto/shm.rs, CACHE_BYTES).
const CACHE_BOUND: u64 = 128 << 20;

fn big_result(n: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![7u8; n])
}

fn echo(b: serde_bytes::ByteBuf) -> serde_bytes::ByteBuf {
    b
}

/// The pool's shared-memory blocks that this process holds: their count
/// and the sum of their sizes (memfds among /proc/self/fd, sized by fstat).
fn memfd_bytes() -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy().starts_with("/memfd:procpool")
            && let Ok(m) = std::fs::metadata(e.path())
        {
            count += 1;
            bytes += m.len();
        }
    }
    (count, bytes)
}

/// RssShmem of this process, in bytes: the shared memory it has mapped
/// and touched.
fn rss_shmem() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("RssShmem:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// After 10 round trips of 200 MB results, the shared memory this process
/// still holds is at most the cache's bound; a block that fits (a 40 MB
/// argument echoed back) is kept warm. Isolated: it counts this process's
/// memfds.
#[test]
fn shared_memory_held_after_big_results_stays_under_the_cache_bound() {
    common::bounded(|| {
        if common::isolated(&test_name!(
            "shared_memory_held_after_big_results_stays_under_the_cache_bound"
        )) {
            return;
        }
        let pool = common::pool(1);
        let arg = serde_bytes::ByteBuf::from(vec![3u8; 40_000_000]);
        for _ in 0..3 {
            let back = pool.apply(echo, arg.clone()).unwrap();
            assert!(back == arg, "the echo came back changed");
        }
        let (warm, _) = memfd_bytes();
        assert!(
            warm >= 1,
            "no block was kept warm for the next large message"
        );
        const N: usize = 200_000_000;
        for i in 0..10 {
            let v = pool.apply(big_result, N).unwrap();
            assert_eq!(v.len(), N, "round trip {i}");
            assert!(v[0] == 7 && v[N - 1] == 7, "round trip {i}");
        }
        let (count, bytes) = memfd_bytes();
        let shmem = rss_shmem();
        assert!(
            bytes <= CACHE_BOUND,
            "{count} blocks of {bytes} bytes held after 10 results of 200 MB"
        );
        assert!(
            shmem <= CACHE_BOUND,
            "RssShmem {shmem} bytes after 10 results of 200 MB ({count} blocks of {bytes} bytes)"
        );
        pool.close();
        pool.join().unwrap();
    })
}
