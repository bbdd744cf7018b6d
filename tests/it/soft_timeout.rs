//! Soft time limits (billiard's soft_time_limit): a cooperative task sees
//! its limit pass and returns a partial result; one that ignores it is
//! killed at the hard timeout; the limit is per task and counts from the
//! task's start.

use crate::common;

use procpool::{Error, MapOptions, Pool, TaskOptions};
use std::time::{Duration, Instant};

/// Generous: a task that never sees its soft limit stops itself here, so
/// that a broken limit fails the test rather than hangs it.
const GIVE_UP: Duration = Duration::from_secs(30);

/// Works in small steps until its soft limit passes. Returns the steps it
/// did and whether it stopped because of the limit.
fn cooperative(_: ()) -> (u64, bool) {
    let start = Instant::now();
    let mut steps = 0;
    while start.elapsed() < GIVE_UP {
        if procpool::deadline_passed() {
            return (steps, true);
        }
        steps += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    (steps, false)
}

/// Ignores any soft limit.
fn stubborn(_: ()) -> u64 {
    std::thread::sleep(Duration::from_secs(60));
    1
}

/// What the task sees of its limit: (deadline_passed, time_left).
fn look(_: ()) -> (bool, Option<Duration>) {
    (procpool::deadline_passed(), procpool::time_left())
}

fn cooperative_item(x: u64) -> (u64, bool) {
    let (_, stopped) = cooperative(());
    (x, stopped)
}

#[test]
fn a_cooperative_task_returns_a_partial_result_at_its_soft_limit() {
    common::bounded(|| {
        let pool = common::pool(1);
        let opts = TaskOptions::new()
            .soft_timeout(Duration::from_millis(50))
            .timeout(Duration::from_secs(120));
        let (steps, stopped) = pool.apply_with(cooperative, (), opts).unwrap();
        assert!(stopped, "the task never saw its soft limit pass");
        assert!(steps > 0, "it did no work before the limit");
        // Nothing was killed: the same worker runs the next task.
        assert_eq!(pool.worker_pids().len(), 1);
    })
}

#[test]
fn a_task_that_ignores_its_soft_limit_is_killed_at_the_hard_one() {
    common::bounded(|| {
        let pool = common::pool(1);
        let before = pool.worker_pids();
        let hard = Duration::from_millis(300);
        let opts = TaskOptions::new()
            .soft_timeout(Duration::from_millis(50))
            .timeout(hard);
        match pool.apply_with(stubborn, (), opts) {
            Err(Error::Timeout { timeout, pid, .. }) => {
                assert_eq!(timeout, hard, "killed by the hard limit");
                assert_eq!(vec![pid], before);
            }
            other => panic!("expected a Timeout, got {other:?}"),
        }
        assert!(common::eventually(|| {
            let now = pool.worker_pids();
            now.len() == 1 && now != before
        }));
    })
}

#[test]
fn the_pool_default_applies_and_a_task_option_overrides_it() {
    common::bounded(|| {
        let pool = Pool::builder()
            .processes(1)
            .soft_timeout(Duration::from_millis(40))
            .build()
            .unwrap();
        let (_, stopped) = pool.apply(cooperative, ()).unwrap();
        assert!(stopped, "the pool's default soft limit did not apply");
        let (passed, left) = pool
            .apply_with(
                look,
                (),
                TaskOptions::new().soft_timeout(Duration::from_secs(3600)),
            )
            .unwrap();
        assert!(!passed);
        let left = left.expect("a soft limit");
        assert!(left <= Duration::from_secs(3600) && !left.is_zero());
    })
}

#[test]
fn without_a_soft_limit_nothing_passes() {
    common::bounded(|| {
        let pool = common::pool(1);
        assert_eq!(pool.apply(look, ()).unwrap(), (false, None));
        // Nor in the caller's own process.
        assert!(!procpool::deadline_passed());
        assert_eq!(procpool::time_left(), None);
    })
}

#[test]
fn a_soft_limit_ends_with_its_task() {
    common::bounded(|| {
        // One worker: the tasks after a limited one run where it ran.
        let pool = common::pool(1);
        let limited = TaskOptions::new().soft_timeout(Duration::ZERO);
        let (passed, left) = pool.apply_with(look, (), limited).unwrap();
        assert!(passed, "a zero soft limit has passed at once");
        assert_eq!(left, Some(Duration::ZERO));
        // Next, many short tasks in batches, some limited, some not.
        let rs: Vec<_> = (0..200)
            .map(|i| {
                let opts = if i % 3 == 0 {
                    TaskOptions::new().soft_timeout(Duration::ZERO)
                } else {
                    TaskOptions::new()
                };
                pool.apply_async_with(look, (), opts).unwrap()
            })
            .collect();
        for (i, r) in rs.into_iter().enumerate() {
            let (passed, left) = r.get().unwrap();
            if i % 3 == 0 {
                assert!(passed && left == Some(Duration::ZERO), "task {i}");
            } else {
                assert!(!passed && left.is_none(), "task {i} saw another's limit");
            }
        }
    })
}

#[test]
fn a_map_chunk_has_its_own_soft_limit() {
    common::bounded(|| {
        let pool = common::pool(2);
        let got = pool
            .map_with(
                cooperative_item,
                0..4u64,
                MapOptions::new()
                    .chunksize(1)
                    .soft_timeout(Duration::from_millis(30)),
            )
            .unwrap();
        assert_eq!(got, (0..4u64).map(|x| (x, true)).collect::<Vec<_>>());
    })
}
