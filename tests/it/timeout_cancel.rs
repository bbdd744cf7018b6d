//! Timeouts (per task, pool default, map chunks), cancellation (queued,
//! running, finished) and retries of tasks whose worker dies.

use crate::common;

use crate::common::{TempPath, pool, write_pid};

use procpool::{Error, MapOptions, Pool, TaskOptions};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

/// Long enough that a fast task never reaches it, even on a loaded machine.
const SHORT: Duration = Duration::from_millis(1000);
/// A timeout no task here comes near: it must not fire.
const LONG: Duration = Duration::from_secs(30);

fn no_core_files() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

// ---- tasks ----

fn double(x: u64) -> u64 {
    x * 2
}

fn triple(x: u64) -> u64 {
    x * 3
}

fn my_pid(_: ()) -> u32 {
    std::process::id()
}

/// Writes its pid to `marker`, then hangs (30 s stands for work that never ends).
fn hang(marker: String) -> u32 {
    write_pid(&marker);
    std::thread::sleep(Duration::from_secs(30));
    std::process::id()
}

fn nap_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn hang_on_3(x: u64) -> u64 {
    if x == 3 {
        std::thread::sleep(Duration::from_secs(30));
    }
    x * 2
}

/// Holds its worker until the test creates `gate` (bounded: 30 s).
fn wait_for_gate(gate: String) -> u64 {
    for _ in 0..15_000 {
        if std::path::Path::new(&gate).exists() {
            return 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    0
}

/// Aborts its worker the first time (leaving its pid in `marker`); returns
/// its pid when run again.
fn abort_first_time(marker: String) -> u32 {
    if !std::path::Path::new(&marker).exists() {
        write_pid(&marker);
        no_core_files();
        std::process::abort();
    }
    std::process::id()
}

/// Appends a line to `log`, then aborts its worker, every time.
fn abort_always(log: String) -> u32 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .expect("opening the attempt log");
    writeln!(f, "{}", std::process::id()).expect("logging an attempt");
    drop(f);
    no_core_files();
    std::process::abort();
}

// ---- helpers ----

/// The worker `pid` is replaced: out of the list, the count restored, the
/// process gone.
fn replaced(pool: &Pool, pid: u32) {
    let n = pool.processes();
    assert!(
        common::eventually(|| {
            let now = pool.worker_pids();
            now.len() == n && !now.contains(&pid)
        }),
        "worker {pid} was not replaced: {:?}",
        pool.worker_pids()
    );
    assert!(
        common::eventually(|| !common::exists(pid)),
        "worker {pid} is still there"
    );
}

fn serves(pool: &Pool) {
    assert_eq!(
        pool.map(double, 0..50u64).unwrap(),
        (0..50u64).map(|x| 2 * x).collect::<Vec<_>>()
    );
}

// ---- timeouts ----

#[test]
fn task_timeout_kills_and_replaces_the_worker() {
    common::bounded(|| {
        let pool = pool(2);
        let before = pool.worker_pids();
        let marker = TempPath::new("hang");
        let r = pool.apply_with(hang, marker.string(), TaskOptions::new().timeout(SHORT));
        let killed = match r {
            Err(Error::Timeout { timeout, pid, .. }) => {
                assert_eq!(timeout, SHORT);
                assert!(before.contains(&pid), "{pid} not among {before:?}");
                pid
            }
            other => panic!("expected Timeout, got {other:?}"),
        };
        // (The task may not have got as far as writing its pid in 200 ms on a
        // loaded machine; if it did, it ran in the worker that was killed.)
        if let Some(ran_in) = marker.read_pid() {
            assert_eq!(killed, ran_in, "the killed worker is the one that ran it");
        }
        replaced(&pool, killed);
        serves(&pool);
        // A fast task with a timeout succeeds.
        assert_eq!(
            pool.apply_with(double, 21, TaskOptions::new().timeout(LONG))
                .unwrap(),
            42
        );
    })
}

#[test]
fn timeout_of_an_async_task_and_its_callback() {
    common::bounded(|| {
        let pool = pool(2);
        let marker = TempPath::new("hang-async");
        let (tx, rx) = std::sync::mpsc::channel();
        let r = pool
            .apply_async_with(
                hang,
                marker.string(),
                TaskOptions::new()
                    .timeout(SHORT)
                    .on_error(move |e: &Error| tx.send(format!("{e:?}")).unwrap()),
            )
            .unwrap();
        let killed = match r.get() {
            Err(Error::Timeout { timeout, pid, .. }) if timeout == SHORT => pid,
            other => panic!("expected Timeout, got {other:?}"),
        };
        let seen = rx.recv().expect("on_error ran");
        assert!(seen.starts_with("Timeout"), "on_error saw {seen}");
        replaced(&pool, killed);
        serves(&pool);
    })
}

#[test]
fn builder_timeout_applies_to_every_task() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).timeout(SHORT).build().unwrap();
        let marker = TempPath::new("hang-default");
        let killed = match pool.apply(hang, marker.string()) {
            Err(Error::Timeout { timeout, pid, .. }) => {
                assert_eq!(timeout, SHORT);
                pid
            }
            other => panic!("expected Timeout, got {other:?}"),
        };
        if let Some(ran_in) = marker.read_pid() {
            assert_eq!(killed, ran_in);
        }
        replaced(&pool, killed);
        // Fast tasks are unaffected.
        serves(&pool);
        assert_eq!(pool.apply(double, 4).unwrap(), 8);
        // A task's own timeout overrides the pool's: this one sleeps longer than
        // the pool's timeout and must succeed.
        assert_eq!(
            pool.apply_with(nap_ms, 500, TaskOptions::new().timeout(LONG))
                .unwrap(),
            500
        );
    })
}

#[test]
fn map_with_a_timeout_where_one_chunk_hangs() {
    common::bounded(|| {
        let pool = pool(2);
        let opts = || MapOptions::new().chunksize(1).timeout(SHORT);
        match pool.map_with(hang_on_3, 0..8u64, opts()) {
            Err(Error::Timeout { timeout, .. }) => assert_eq!(timeout, SHORT),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(common::eventually(|| pool.worker_pids().len() == 2));
        // Item by item: only the hanging one fails.
        let out: Vec<_> = pool.imap_with(hang_on_3, 0..8u64, opts()).collect();
        assert_eq!(out.len(), 8);
        for (i, r) in out.into_iter().enumerate() {
            if i == 3 {
                assert!(
                    matches!(r, Err(Error::Timeout { timeout, .. }) if timeout == SHORT),
                    "item 3: {r:?}"
                );
            } else {
                assert_eq!(r.unwrap(), 2 * i as u64, "item {i}");
            }
        }
        assert!(common::eventually(|| pool.worker_pids().len() == 2));
        serves(&pool);
    })
}

// ---- cancel ----

#[test]
fn cancel_a_queued_task() {
    common::bounded(|| {
        let pool = pool(1);
        let workers = pool.worker_pids();
        let gate = TempPath::new("gate");
        let first = pool.apply_async(wait_for_gate, gate.string()).unwrap();
        // The only worker is busy: this one waits in the queue.
        let second = pool.apply_async(triple, 21).unwrap();
        assert!(second.cancel(), "cancelling a queued task");
        assert!(
            !second.cancel(),
            "a cancelled task cannot be cancelled again"
        );
        assert!(second.ready());
        gate.create();
        assert!(matches!(second.get(), Err(Error::Cancelled)));
        assert_eq!(first.get().unwrap(), 1, "the running task is unaffected");
        // No worker was killed for it.
        assert_eq!(pool.worker_pids(), workers);
        assert_eq!(pool.apply(triple, 5).unwrap(), 15);
    })
}

#[test]
fn cancel_a_running_task() {
    common::bounded(|| {
        let pool = pool(2);
        let marker = TempPath::new("cancel-running");
        let r = pool.apply_async(hang, marker.string()).unwrap();
        assert!(
            common::eventually(|| marker.read_pid().is_some()),
            "the task never started"
        );
        let pid = marker.read_pid().unwrap();
        assert!(pool.worker_pids().contains(&pid));
        assert!(r.cancel(), "cancelling a running task");
        assert!(matches!(r.get(), Err(Error::Cancelled)));
        replaced(&pool, pid);
        serves(&pool);
    })
}

#[test]
fn cancel_a_finished_task() {
    common::bounded(|| {
        let pool = pool(1);
        let r = pool.apply_async(double, 5).unwrap();
        r.wait();
        assert!(!r.cancel(), "cancelling a finished task");
        assert_eq!(r.get().unwrap(), 10);
        assert_eq!(pool.apply(my_pid, ()).unwrap(), pool.worker_pids()[0]);
    })
}

// ---- retries ----

#[test]
fn retries_rerun_a_task_whose_worker_died() {
    common::bounded(|| {
        let pool = pool(2);
        let marker = TempPath::new("retry");
        let pid = pool
            .apply_with(
                abort_first_time,
                marker.string(),
                TaskOptions::new().retries(2),
            )
            .expect("the retry succeeds");
        let first = marker
            .read_pid()
            .expect("the first attempt ran and aborted");
        assert_ne!(pid, first, "the retry ran in another worker");
        replaced(&pool, first);
        serves(&pool);
    })
}

#[test]
fn without_retries_the_task_is_lost() {
    common::bounded(|| {
        let pool = pool(2);
        let marker = TempPath::new("no-retry");
        match pool.apply(abort_first_time, marker.string()) {
            Err(Error::WorkerLost { pid, status, .. }) => {
                assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");
                assert_eq!(Some(pid), marker.read_pid());
            }
            other => panic!("expected WorkerLost, got {other:?}"),
        }
        assert_eq!(pool.worker_pids().len(), 2);
        serves(&pool);
    })
}

#[test]
fn retries_run_a_task_at_most_one_plus_retries_times() {
    common::bounded(|| {
        let pool = pool(2);
        let log = TempPath::new("attempts");
        match pool.apply_with(abort_always, log.string(), TaskOptions::new().retries(2)) {
            Err(Error::WorkerLost { status, .. }) => {
                assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}")
            }
            other => panic!("expected WorkerLost, got {other:?}"),
        }
        assert!(log.exists());
        let attempts = std::fs::read_to_string(&log.0).unwrap();
        let pids: Vec<&str> = attempts.lines().collect();
        assert_eq!(pids.len(), 3, "attempts (one per line, by pid): {pids:?}");
        assert_eq!(pool.worker_pids().len(), 2);
        serves(&pool);
    })
}

/// A task that waits (bounded) for a gate file, then writes a marker.
fn finish_after_gate((gate, marker): (String, String)) -> u64 {
    let end = std::time::Instant::now() + LONG;
    while !std::path::Path::new(&gate).exists() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::write(&marker, b"ran to the end").unwrap();
    1
}

/// A task cancelled right after it was handed to an idle worker (sent, not
/// yet started) must not run to its end: the worker skips it, or, if it had
/// just started it, is killed.
#[test]
fn cancel_a_task_sent_but_not_yet_started() {
    common::bounded(|| {
        let pool = pool(1);
        serves(&pool);
        let gate = TempPath::new("sent-gate");
        let marker = TempPath::new("sent-marker");
        let r = pool
            .apply_async(finish_after_gate, (gate.string(), marker.string()))
            .unwrap();
        assert!(r.cancel());
        assert!(matches!(r.get(), Err(Error::Cancelled)));
        // The one worker (or its replacement) serves the next task only once
        // the cancelled one is out of the way: skipped, or killed. Were it still
        // running, this would wait for its gate.
        assert_eq!(pool.apply(double, 21).unwrap(), 42);
        gate.create();
        assert_eq!(pool.apply(double, 2).unwrap(), 4);
        assert!(!marker.exists(), "the cancelled task ran to its end");
    })
}

/// A timeout counts from the task's start, not from when it was sent: a
/// task that waits for its worker longer than its timeout, then runs well
/// within it, succeeds.
#[test]
fn a_timeout_counts_from_the_start_of_the_task() {
    common::bounded(|| {
        let pool = pool(1);
        serves(&pool);
        let pid = pool.worker_pids()[0];
        // SAFETY: kill with a pid of this pool's own worker.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let r = pool
            .apply_async_with(nap_ms, 100, TaskOptions::new().timeout(SHORT))
            .unwrap();
        // The worker cannot start it while stopped: longer than the timeout.
        std::thread::sleep(SHORT + Duration::from_millis(500));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGCONT) }, 0);
        assert_eq!(r.get().unwrap(), 100);
        serves(&pool);
    })
}
