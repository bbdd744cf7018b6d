//! The worker initializer: it runs exactly once in every worker (replacements
//! included), before the first task, with its argument; if it fails,
//! `build()` fails with `InitializerFailed`, without a respawn loop and
//! without leaving a process behind.

use crate::common;

use crate::common::Gate;

use procpool::{Error, Pool};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

/// How many times the initializer ran in this process (a worker).
static INIT_RUNS: AtomicU32 = AtomicU32::new(0);
/// What it was given.
static INIT_ARG: Mutex<Option<Setup>> = Mutex::new(None);

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Setup {
    tag: String,
    level: u32,
}

fn setup() -> Setup {
    Setup {
        tag: "warm".to_string(),
        level: 3,
    }
}

fn init(arg: Setup) {
    INIT_RUNS.fetch_add(1, Ordering::SeqCst);
    *INIT_ARG.lock().unwrap() = Some(arg);
}

/// What a worker knows: its pid, how often its initializer ran, its argument.
type Report = (u32, u32, Option<Setup>);

fn report(_: ()) -> Report {
    (
        std::process::id(),
        INIT_RUNS.load(Ordering::SeqCst),
        INIT_ARG.lock().unwrap().clone(),
    )
}

fn report_slowly(_: ()) -> Report {
    std::thread::sleep(Duration::from_millis(5));
    report(())
}

fn die(_: ()) -> Report {
    std::process::abort();
}

// ---- a gate, so that tasks are held in every worker at once ----------------

static TEMP_PATHS: AtomicUsize = AtomicUsize::new(0);

/// A path under the temp dir, unique to this process and call; the caller
/// removes the file.
fn temp_path(what: &str) -> PathBuf {
    let n = TEMP_PATHS.fetch_add(1, Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("procpool-init-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Notes its arrival (its pid, appended to `<gate>.arrived`), waits
/// (bounded) for the gate, then reports.
fn gated_report(gate: String) -> Report {
    note_attempt(&format!("{gate}.arrived"));
    common::wait_for_gate(&gate);
    report(())
}

/// Has every worker report: one gated task per worker, and the gate opens
/// only once all of them have started. A worker running a gated task runs
/// no other meanwhile, so they started in as many different workers. (Call
/// it on a pool whose workers have run no very short task: the pool may
/// queue such tasks to a busy worker.)
fn report_from_every_worker(pool: &Pool) -> Vec<Report> {
    let n = pool.processes();
    let gate = Gate::new("init");
    let arrived = PathBuf::from(format!("{}.arrived", gate.key()));
    let rs: Vec<_> = (0..n)
        .map(|_| pool.apply_async(gated_report, gate.key()).unwrap())
        .collect();
    let all_started = common::eventually(|| attempts(&arrived) == n);
    gate.open();
    let _ = std::fs::remove_file(&arrived);
    assert!(all_started, "the {n} gated tasks never all started");
    let reports: Vec<Report> = rs.into_iter().map(|r| r.get().unwrap()).collect();
    let pids: HashSet<u32> = reports.iter().map(|r| r.0).collect();
    assert_eq!(pids.len(), n, "reports from {pids:?}");
    reports
}

fn check(r: &Report) {
    let (pid, runs, arg) = r;
    assert_eq!(*runs, 1, "worker {pid} ran its initializer {runs} times");
    assert_eq!(arg.as_ref(), Some(&setup()), "worker {pid}'s argument");
}

#[test]
fn initializer_runs_once_in_every_worker() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(3)
            .initializer(init, setup())
            .build()
            .unwrap();
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        assert_eq!(workers.len(), 3);

        let reports = report_from_every_worker(&pool);
        let seen: HashSet<u32> = reports.iter().map(|r| r.0).collect();
        assert_eq!(seen, workers, "one report from each worker");
        reports.iter().for_each(check);

        // Many more tasks: still once per worker, never again.
        let rs: Vec<_> = (0..60)
            .map(|_| pool.apply_async(report_slowly, ()).unwrap())
            .collect();
        for r in rs {
            let r = r.get().unwrap();
            check(&r);
            assert!(workers.contains(&r.0), "{} is not a worker", r.0);
        }
        for r in pool.map(report, vec![(); 30]).unwrap() {
            check(&r);
        }
        // The initializer never ran in the caller.
        assert_eq!(INIT_RUNS.load(Ordering::SeqCst), 0);
        assert!(INIT_ARG.lock().unwrap().is_none());
    })
}

#[test]
fn initializer_runs_in_workers_replaced_after_max_tasks() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(2)
            .initializer(init, setup())
            .max_tasks_per_child(2)
            .build()
            .unwrap();
        let mut per_pid: HashMap<u32, usize> = HashMap::new();
        // Tasks of a few ms: the pool sends them one at a time (it may pipeline
        // tasks it has measured as very short), which `report_from_every_worker`
        // below relies on.
        for _ in 0..20 {
            let r = pool.apply(report_slowly, ()).unwrap();
            check(&r);
            *per_pid.entry(r.0).or_default() += 1;
        }
        for (pid, n) in &per_pid {
            assert!(
                *n <= 2,
                "worker {pid} ran {n} tasks with max_tasks_per_child(2)"
            );
        }
        assert!(
            per_pid.len() >= 10,
            "{} workers for 20 tasks",
            per_pid.len()
        );
        // The current workers are replacements too, and initialized (a retired
        // worker's replacement may still be starting: wait for it).
        assert!(common::eventually(|| pool.worker_pids().len() == 2));
        for r in report_from_every_worker(&pool) {
            check(&r);
        }
    })
}

#[test]
fn initializer_runs_in_a_worker_replaced_after_a_crash() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(2)
            .initializer(init, setup())
            .build()
            .unwrap();
        let before: HashSet<u32> = pool.worker_pids().into_iter().collect();
        match pool.apply(die, ()) {
            Err(Error::WorkerLost { pid, .. }) => assert!(before.contains(&pid)),
            other => panic!("expected WorkerLost, got {other:?}"),
        }
        let after: HashSet<u32> = pool.worker_pids().into_iter().collect();
        assert_eq!(after.len(), 2);
        assert_ne!(after, before, "the lost worker was replaced");
        let reports = report_from_every_worker(&pool);
        let seen: HashSet<u32> = reports.iter().map(|r| r.0).collect();
        assert_eq!(seen, after);
        reports.iter().for_each(check);
    })
}

// ---- failing initializers ----------------------------------------------------

/// Appends this process's pid to the file, then panics.
fn init_panics(log: String) {
    note_attempt(&log);
    panic!("init boom in {}", std::process::id());
}

/// Appends this process's pid to the file, then exits with status 7.
fn init_exits(log: String) {
    note_attempt(&log);
    std::process::exit(7);
}

fn note_attempt(log: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    // One write, so that concurrent appends do not interleave.
    f.write_all(format!("{}\n", std::process::id()).as_bytes())
        .unwrap();
}

fn attempts(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |s| s.lines().count())
}

fn build_failing(f: fn(String), log: &Path) -> Result<Pool, Error> {
    Pool::builder()
        .processes(2)
        .initializer(f, log.to_string_lossy().into_owned())
        .build()
}

fn expect_init_failed(r: Result<Pool, Error>) -> String {
    match r {
        Err(Error::InitializerFailed { message, .. }) => message,
        Err(e) => panic!("expected InitializerFailed, got {e:?}"),
        Ok(p) => panic!("build succeeded with workers {:?}", p.worker_pids()),
    }
}

#[test]
fn panicking_initializer_fails_build_without_respawning() {
    common::bounded(|| {
        let log = temp_path("log");
        let message = expect_init_failed(build_failing(init_panics, &log));
        assert!(message.contains("init boom"), "message: {message:?}");
        // Every attempt has finished (the pool is gone): at most one per worker
        // slot, at least one. A respawn loop would have made more.
        let n = attempts(&log);
        assert!((1..=2).contains(&n), "the initializer ran {n} times");
        let _ = std::fs::remove_file(&log);
        // Another pool still builds.
        let pool = Pool::builder()
            .processes(2)
            .initializer(init, setup())
            .build()
            .unwrap();
        check(&pool.apply(report, ()).unwrap());
    })
}

#[test]
fn exiting_initializer_fails_build() {
    common::bounded(|| {
        let log = temp_path("log");
        let message = expect_init_failed(build_failing(init_exits, &log));
        assert!(message.contains('7'), "message: {message:?}");
        let n = attempts(&log);
        assert!((1..=2).contains(&n), "the initializer ran {n} times");
        let _ = std::fs::remove_file(&log);
    })
}

#[test]
fn failing_initializer_leaves_no_child_process() {
    common::bounded(|| {
        if common::isolated(&test_name!("failing_initializer_leaves_no_child_process")) {
            return;
        }
        assert_eq!(common::children(), Vec::<u32>::new());
        let fds = common::open_fds();
        for f in [init_panics as fn(String), init_exits] {
            let log = temp_path("log");
            let e = build_failing(f, &log);
            assert!(matches!(e, Err(Error::InitializerFailed { .. })), "{e:?}");
            assert_eq!(common::children(), Vec::<u32>::new(), "a child is left");
            let pids: Vec<u32> = std::fs::read_to_string(&log)
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            assert!(!pids.is_empty());
            for pid in pids {
                assert!(!common::exists(pid), "worker {pid} still exists");
            }
            let _ = std::fs::remove_file(&log);
        }
        assert_eq!(common::open_fds(), fds, "fds leaked by failed builds");
    })
}

#[test]
fn initializer_argument_that_cannot_be_encoded_fails_build() {
    common::bounded(|| {
        struct Unencodable;
        impl Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no init arg"))
            }
        }
        impl<'de> Deserialize<'de> for Unencodable {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <()>::deserialize(d).map(|()| Unencodable)
            }
        }
        fn init_u(_: Unencodable) {}
        match Pool::builder()
            .processes(2)
            .initializer(init_u, Unencodable)
            .build()
        {
            Err(Error::Encode { what, source, .. }) => {
                assert_eq!(what, "argument");
                assert!(source.message().contains("no init arg"), "{source}");
            }
            other => panic!("expected Encode, got {other:?}"),
        }
    })
}
