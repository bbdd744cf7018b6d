//! `procpool::global()`: one process-wide pool, built on first use,
//! configurable once before that, and an error inside a worker.
//!
//! The global pool lives as long as the test process, so the tests that
//! depend on what happened before them (first use, configuration) run in a
//! fresh process of their own (`common::isolated`).

use crate::common;

use procpool::{Error, Pool};

fn square(x: u64) -> u64 {
    x * x
}

/// In a worker: what `global()` and `configure_global()` say there.
fn global_in_a_worker(_: ()) -> (bool, bool) {
    (
        matches!(procpool::global(), Err(Error::InWorker)),
        matches!(
            procpool::configure_global(Pool::builder()),
            Err(Error::InWorker)
        ),
    )
}

#[test]
fn global_is_one_pool_with_a_worker_per_cpu() {
    common::bounded(|| {
        let a = procpool::global().unwrap();
        let b = procpool::global().unwrap();
        assert!(std::ptr::eq(a, b), "two global pools");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(a.processes(), cpus);
        assert_eq!(a.apply(square, 12).unwrap(), 144);
        assert_eq!(a.map(square, 1..=4u64).unwrap(), vec![1, 4, 9, 16]);
    })
}

#[test]
fn first_use_from_many_threads_builds_one_pool() {
    common::bounded(|| {
        if common::isolated(&test_name!("first_use_from_many_threads_builds_one_pool")) {
            return;
        }
        assert!(
            common::children().is_empty(),
            "a child before the first use"
        );
        let pools: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| procpool::global().unwrap() as *const Pool as usize))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(pools.iter().all(|&p| p == pools[0]), "{pools:?}");
        // One pool: one child process (its fork server).
        let server = procpool::global().unwrap().server_pid();
        assert_eq!(common::children(), vec![server]);
    })
}

#[test]
fn configure_before_first_use() {
    common::bounded(|| {
        if common::isolated(&test_name!("configure_before_first_use")) {
            return;
        }
        procpool::configure_global(Pool::builder().processes(1)).unwrap();
        let again = procpool::configure_global(Pool::builder().processes(3));
        assert!(matches!(again, Err(Error::Config(_))), "{again:?}");
        let pool = procpool::global().unwrap();
        assert_eq!(pool.processes(), 1);
        assert_eq!(pool.worker_pids().len(), 1);
        assert_eq!(pool.apply(square, 5).unwrap(), 25);
    })
}

#[test]
fn configure_after_first_use_is_an_error() {
    common::bounded(|| {
        procpool::global().unwrap();
        let r = procpool::configure_global(Pool::builder().processes(1));
        match r {
            Err(Error::Config(msg)) => assert!(msg.contains("already built"), "{msg}"),
            other => panic!("expected Config, got {other:?}"),
        }
    })
}

#[test]
fn a_failed_build_is_returned_and_tried_again() {
    common::bounded(|| {
        if common::isolated(&test_name!("a_failed_build_is_returned_and_tried_again")) {
            return;
        }
        procpool::configure_global(Pool::builder().processes(0)).unwrap();
        for _ in 0..2 {
            let r = procpool::global();
            assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
        }
        assert!(common::children().is_empty());
    })
}

#[test]
fn global_inside_a_worker_is_an_error() {
    common::bounded(|| {
        // In a worker of a pool of one's own...
        let pool = common::pool(1);
        assert_eq!(pool.apply(global_in_a_worker, ()).unwrap(), (true, true));
        // ...and of the global pool itself: no pool per worker.
        let g = procpool::global().unwrap();
        assert_eq!(g.apply(global_in_a_worker, ()).unwrap(), (true, true));
    })
}

#[test]
fn the_global_pool_uses_the_exec_server_even_when_the_default_is_fork() {
    common::bounded(|| {
        if common::isolated_with_env(
            &test_name!("the_global_pool_uses_the_exec_server_even_when_the_default_is_fork"),
            &[("PROCPOOL_START_METHOD", "fork")],
        ) {
            return;
        }
        let pool = procpool::global().unwrap();
        assert_eq!(pool.apply(square, 3).unwrap(), 9);
        // An exec'd server's command line is a fresh one: the test harness's
        // arguments (the test name) are not in it, while a fork's would be.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pool.server_pid())).unwrap();
        let mine = std::fs::read("/proc/self/cmdline").unwrap();
        assert_ne!(
            cmdline, mine,
            "the global pool's server is a fork of the host"
        );
    })
}
