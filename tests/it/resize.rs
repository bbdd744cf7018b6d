//! `Pool::resize`: a live pool grows and shrinks, loses no task, and its
//! pids follow; idle workers go first; bad sizes get a clear error.

use crate::common;

use procpool::{Error, Pool, Sandbox, StartMethod};
use std::time::Duration;

/// How long a test may take before it counts as hung.
const BOUND: Duration = Duration::from_secs(180);

fn nap_then_pid((i, ms): (u64, u64)) -> (u64, u32) {
    std::thread::sleep(Duration::from_millis(ms));
    (i, std::process::id())
}

fn pid(_: ()) -> u32 {
    std::process::id()
}

/// Waits (bounded) until the pool has `n` live workers; returns them.
fn settles_at(pool: &Pool, n: usize) -> Vec<u32> {
    assert!(
        common::eventually(|| pool.worker_pids().len() == n),
        "the pool never settled at {n} workers: {:?}",
        pool.worker_pids()
    );
    pool.worker_pids()
}

#[test]
fn growing_and_shrinking_with_tasks_in_flight_loses_none() {
    common::within("resize 2 -> 6 -> 1", BOUND, || {
        let pool = Pool::builder().processes(2).build().unwrap();
        let first: Vec<_> = (0..40)
            .map(|i| pool.apply_async(nap_then_pid, (i, 20)).unwrap())
            .collect();
        pool.resize(6).unwrap();
        assert_eq!(pool.processes(), 6);
        let grown = settles_at(&pool, 6);
        let second: Vec<_> = (40..80)
            .map(|i| pool.apply_async(nap_then_pid, (i, 20)).unwrap())
            .collect();
        pool.resize(1).unwrap();
        assert_eq!(pool.processes(), 1);
        for (i, r) in first.into_iter().chain(second).enumerate() {
            let (got, worker) = r.get().expect("a task of a resized pool");
            assert_eq!(got, i as u64);
            assert_ne!(worker, std::process::id());
        }
        let shrunk = settles_at(&pool, 1);
        assert!(
            grown.contains(&shrunk[0]),
            "the worker left is one of the six"
        );
        // The one worker left runs what comes next.
        assert_eq!(pool.map(pid, vec![(); 8]).unwrap(), vec![shrunk[0]; 8]);
        pool.close();
        pool.join().unwrap();
    });
}

#[test]
fn shrinking_retires_idle_workers_before_busy_ones() {
    common::within("shrink with one busy worker", BOUND, || {
        let pool = Pool::builder().processes(3).build().unwrap();
        settles_at(&pool, 3);
        // Sent at once to an idle worker, which holds it from then on.
        let busy = pool.apply_async(nap_then_pid, (0, 500)).unwrap();
        pool.resize(1).unwrap();
        let (_, ran_on) = busy.get().expect("the busy task finishes");
        let left = settles_at(&pool, 1);
        assert_eq!(left, vec![ran_on], "the busy worker stays, the idle go");
    });
}

#[test]
fn a_pool_grows_again_after_shrinking() {
    common::within("grow after shrink", BOUND, || {
        let pool = Pool::builder().processes(4).build().unwrap();
        pool.resize(1).unwrap();
        settles_at(&pool, 1);
        pool.resize(3).unwrap();
        let pids = settles_at(&pool, 3);
        let ran = pool.map(pid, vec![(); 30]).unwrap();
        assert!(ran.iter().all(|p| pids.contains(p)));
        assert_eq!(pool.processes(), 3);
    });
}

#[test]
fn bad_sizes_and_closed_pools_get_clear_errors() {
    common::within("resize errors", BOUND, || {
        let pool = Pool::builder().processes(1).build().unwrap();
        assert!(matches!(pool.resize(0), Err(Error::Config(_))));
        assert!(matches!(pool.resize(1 << 20), Err(Error::Config(_))));
        assert_eq!(pool.processes(), 1);
        pool.close();
        assert!(pool.resize(2).is_err(), "a closed pool does not resize");
        pool.join().unwrap();
        assert_eq!(pool.worker_pids().len(), 0);
    });
}

#[test]
fn a_sandboxed_pool_resizes_and_still_runs_each_task_alone() {
    common::within("sandboxed resize", BOUND, || {
        let pool = Pool::builder()
            .processes(1)
            .start_method(StartMethod::ForkServer)
            .sandbox(Sandbox::new())
            .build()
            .expect("a sandboxed pool");
        pool.resize(3).unwrap();
        settles_at(&pool, 3);
        let pids = pool.map(pid, vec![(); 12]).unwrap();
        let mut distinct = pids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 12, "a process per task: {pids:?}");
        pool.resize(1).unwrap();
        settles_at(&pool, 1);
        assert_eq!(pool.apply(pid, ()).ok().map(|p| p > 0), Some(true));
        pool.close();
        pool.join().unwrap();
    });
}
