//! Resource leaks: fds and child processes across many pool lifecycles, and
//! the fds that the pool's own processes hold.

use crate::common;

use procpool::Pool;

fn double(x: u64) -> u64 {
    x * 2
}

fn abort_now(_: ()) {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct (no core file, please).
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    std::process::abort();
}

/// The open fds of `dir` (a /proc/<pid>/fd directory) from 3 up, with what
/// each points at. An fd that closes between listing and readlink is left
/// out, and so is every fd that points at /dev/null: the fork server keeps
/// the numbers of the fds it inherited from the host taken that way (see
/// `a_task_writing_to_a_host_file_cannot_reach_the_pools_fds`).
fn fds_from_3(dir: &str) -> Vec<(i32, String)> {
    // Collect the names first: the listing's own fd is then closed again,
    // and its readlink below fails, so it is left out.
    let names: Vec<i32> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {dir}: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut out: Vec<(i32, String)> = names
        .into_iter()
        .filter(|&fd| fd >= 3)
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("{dir}/{fd}")).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .filter(|(_, target)| target != "/dev/null")
        .collect();
    out.sort();
    out
}

/// A task: the worker's own fds from 3 up.
fn my_fds(_: ()) -> Vec<(i32, String)> {
    fds_from_3("/proc/self/fd")
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// One pool from build to end; `how` picks the end.
fn lifecycle(i: u64) {
    lifecycle_of(i, Pool::builder().processes(2).build().unwrap());
}

/// [`lifecycle`] of a pool already built.
fn lifecycle_of(i: u64, pool: Pool) {
    assert_eq!(pool.apply(double, i).unwrap(), 2 * i);
    let workers = pool.worker_pids();
    let server = pool.server_pid();
    match i % 3 {
        0 => {
            pool.close();
            pool.join().unwrap();
            drop(pool);
        }
        1 => {
            pool.terminate();
            drop(pool);
        }
        _ => drop(pool),
    }
    // Every one of them is reaped by now: the server by this process, the
    // workers by the server before it exited.
    assert!(
        common::children().is_empty(),
        "lifecycle {i}: children left: {:?}",
        common::children()
    );
    for p in std::iter::once(server).chain(workers) {
        assert!(!common::exists(p), "lifecycle {i}: process {p} is left");
    }
}

#[test]
fn no_fd_or_child_left_after_200_pools() {
    common::bounded(|| {
        if common::isolated(&test_name!("no_fd_or_child_left_after_200_pools")) {
            return;
        }
        // One lifecycle first, so that whatever the standard library opens once
        // and keeps is already open when counting starts.
        lifecycle(0);
        let fds = common::open_fds();
        let fd_list = fds_from_3("/proc/self/fd");
        let nthreads = threads();
        for i in 1..=200 {
            lifecycle(i);
        }
        assert_eq!(
            common::open_fds(),
            fds,
            "open fds before: {fd_list:?}, after: {:?}",
            fds_from_3("/proc/self/fd")
        );
        assert!(common::children().is_empty());
        // Threads are not fds, but a pool's threads must not pile up either (the
        // result-handler thread may end just after its pool, hence the wait).
        assert!(
            common::eventually(|| threads() <= nthreads),
            "threads: {nthreads} before, {} after",
            threads()
        );
    })
}

/// A sandboxed pool also holds the read ends of its output pipes, and a
/// thread that copies them (`backend/local/output.rs`): both are gone once
/// its processes are, however the pool ended.
#[test]
fn no_fd_or_thread_left_after_sandboxed_pools() {
    common::bounded(|| {
        if common::isolated(&test_name!("no_fd_or_thread_left_after_sandboxed_pools")) {
            return;
        }
        let sandboxed = || {
            Pool::builder()
                .processes(2)
                .start_method(procpool::StartMethod::ForkServer)
                .sandbox(procpool::Sandbox::new())
                .build()
                .unwrap()
        };
        lifecycle_of(0, sandboxed());
        let fds = common::open_fds();
        let nthreads = threads();
        for i in 1..=30 {
            lifecycle_of(i, sandboxed());
        }
        // After a drop, the pump may end a moment after the pool.
        assert!(
            common::eventually(|| common::open_fds() == fds),
            "open fds: {fds} before, {} after: {:?}",
            common::open_fds(),
            fds_from_3("/proc/self/fd")
        );
        assert!(
            common::eventually(|| threads() <= nthreads),
            "threads: {nthreads} before, {} after",
            threads()
        );
    })
}

/// Each worker holds exactly one fd besides stdio: its own socket to the
/// parent (none of another worker's, nor the server's).
#[test]
fn a_worker_holds_only_its_own_socket() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).build().unwrap();
        let check = |pool: &Pool, when: &str| {
            for _ in 0..4 {
                let fds = pool.apply(my_fds, ()).unwrap();
                assert_eq!(fds.len(), 1, "{when}: a worker's fds from 3 up: {fds:?}");
                assert!(fds[0].1.starts_with("socket:"), "{when}: {fds:?}");
            }
        };
        check(&pool, "first workers");
        // A replacement worker too.
        let _ = pool.apply(abort_now, ());
        assert_eq!(pool.worker_pids().len(), 2);
        check(&pool, "after a replacement");
    })
}

/// The same, seen from outside for every worker at once: each holds one
/// socket, and no two workers share one; the fork server holds its socket
/// to the parent and its signalfd.
#[test]
fn every_worker_and_the_server_hold_only_their_own_fds() {
    common::bounded(|| {
        let pool = Pool::builder().processes(3).build().unwrap();
        // The workers are idle (all ready once build returns).
        let mut sockets = Vec::new();
        for w in pool.worker_pids() {
            let fds = fds_from_3(&format!("/proc/{w}/fd"));
            assert_eq!(fds.len(), 1, "worker {w}'s fds from 3 up: {fds:?}");
            assert!(fds[0].1.starts_with("socket:"), "worker {w}: {fds:?}");
            sockets.push(fds[0].1.clone());
        }
        sockets.sort();
        sockets.dedup();
        assert_eq!(sockets.len(), 3, "workers share a socket: {sockets:?}");
        let server = pool.server_pid();
        // The server sends each worker's socket, then closes its copy: just
        // after build() it may not have closed the last one yet.
        common::eventually(|| fds_from_3(&format!("/proc/{server}/fd")).len() <= 2);
        let fds = fds_from_3(&format!("/proc/{server}/fd"));
        let mut kinds: Vec<&str> = fds
            .iter()
            .map(|(_, t)| {
                if t.starts_with("socket:") {
                    "socket"
                } else {
                    t.as_str()
                }
            })
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            vec!["anon_inode:[signalfd]", "socket"],
            "the fork server's fds from 3 up: {fds:?}"
        );
        // Still serving.
        assert_eq!(pool.apply(double, 4).unwrap(), 8);
    })
}

static HOST_LOG: std::sync::OnceLock<std::sync::Mutex<std::fs::File>> = std::sync::OnceLock::new();

/// A task that writes to a file the host opened before the pool was built.
fn write_host_log(x: u64) -> u64 {
    use std::io::Write;
    if let Some(f) = HOST_LOG.get() {
        let mut f = f.lock().unwrap();
        // 64 bytes that would read as a huge frame header if they reached a
        // pool socket.
        let _ = f.write_all(&[0xff; 64]);
    }
    x + 1
}

/// The host's own files are still values in a worker's memory; what their
/// fds refer to there must not be one of the pool's sockets or blocks, or a
/// task writing to them would corrupt the pool's traffic.
#[test]
fn a_task_writing_to_a_host_file_cannot_reach_the_pools_fds() {
    common::bounded(|| {
        let path = std::env::temp_dir().join(format!("procpool-host-log-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let _ = HOST_LOG.set(std::sync::Mutex::new(file));
        let pool = Pool::builder().processes(2).build().unwrap();
        for i in 0..50 {
            assert_eq!(pool.apply(write_host_log, i).unwrap(), i + 1);
        }
        // A large result goes through a shared-memory block: still intact.
        let big = pool.apply(write_then_big, 3 << 20).unwrap();
        assert_eq!(big.len(), 3 << 20);
        assert!(big.iter().all(|&b| b == 7));
        drop(pool);
        let _ = std::fs::remove_file(&path);
    })
}

fn write_then_big(n: usize) -> Vec<u8> {
    write_host_log(0);
    vec![7u8; n]
}
