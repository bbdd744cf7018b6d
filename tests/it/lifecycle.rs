//! The pool's life: close, join, terminate, drop; what submitting does in
//! each state; that outstanding tasks resolve; that no process outlives the
//! pool.

use crate::common;

use crate::common::pool;

use procpool::{Error, MapOptions, Pool, TaskOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Generous: only there so that a bug fails the test instead of hanging it.
const BOUND: Duration = Duration::from_secs(20);

fn inc(x: u64) -> u64 {
    x + 1
}

fn nap_inc(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(30));
    x + 1
}

fn ten_seconds(x: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(10));
    x
}

fn is_closed<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Closed))
}

fn is_terminated<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Terminated))
}

#[test]
fn builder_rejects_zero_processes_and_zero_max_tasks() {
    common::bounded(|| {
        assert!(matches!(
            Pool::builder().processes(0).build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Pool::builder().processes(1).max_tasks_per_child(0).build(),
            Err(Error::Config(_))
        ));
    })
}

#[test]
fn new_pool_has_one_worker_per_cpu() {
    common::bounded(|| {
        let pool = Pool::new().unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(pool.processes(), cpus);
        assert_eq!(pool.worker_pids().len(), cpus);
        assert_eq!(pool.apply(inc, 1).unwrap(), 2);
    })
}

#[test]
fn submitting_after_close_is_closed() {
    common::bounded(|| {
        let pool = pool(2);
        assert_eq!(pool.apply(inc, 1).unwrap(), 2);
        pool.close();
        assert!(is_closed(pool.apply_async(inc, 1)));
        assert!(is_closed(pool.apply(inc, 1)));
        let called = Arc::new(AtomicUsize::new(0));
        let c = called.clone();
        let r = pool.apply_async_with(
            inc,
            1,
            TaskOptions::new()
                .on_success(|_: &u64| panic!("ran"))
                .on_error(move |_| {
                    c.fetch_add(1, Ordering::SeqCst);
                }),
        );
        assert!(is_closed(r));
        assert!(is_closed(pool.map(inc, 0..10)));
        assert!(is_closed(pool.map_async(inc, vec![1, 2, 3])));
        assert!(is_closed(pool.map_with(
            inc,
            0..10,
            MapOptions::new().chunksize(3)
        )));
        let items: Vec<_> = pool.imap(inc, 0..3).collect();
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(items.into_iter().all(is_closed));
        let items: Vec<_> = pool
            .imap_with(inc, 0..5, MapOptions::new().chunksize(2))
            .collect();
        assert_eq!(items.len(), 5, "{items:?}");
        assert!(items.into_iter().all(is_closed));
        let items: Vec<_> = pool.imap_unordered(inc, 0..4).collect();
        assert_eq!(items.len(), 4, "{items:?}");
        assert!(items.into_iter().all(is_closed));
        pool.join().unwrap();
        // Still closed after join.
        assert!(is_closed(pool.apply_async(inc, 1)));
        assert_eq!(
            called.load(Ordering::SeqCst),
            0,
            "no callback for a refused task"
        );
    })
}

#[test]
fn mapping_nothing_after_close_is_closed_too() {
    common::bounded(|| {
        // As in CPython (`_check_running` comes first): the state is checked
        // whatever the input.
        let pool = pool(2);
        pool.close();
        assert!(is_closed(pool.map(inc, Vec::<u64>::new())));
        assert!(is_closed(pool.map_async(inc, 0..0)));
        pool.join().unwrap();
        let pool2 = self::pool(2);
        pool2.terminate();
        assert!(is_terminated(pool2.map(inc, Vec::<u64>::new())));
    })
}

#[test]
fn submitting_after_terminate_is_terminated() {
    common::bounded(|| {
        let pool = pool(2);
        assert_eq!(pool.apply(inc, 1).unwrap(), 2);
        pool.terminate();
        assert!(is_terminated(pool.apply_async(inc, 1)));
        assert!(is_terminated(pool.apply(inc, 1)));
        assert!(is_terminated(pool.map(inc, 0..10)));
        assert!(is_terminated(pool.map_async(inc, 0..10)));
        let items: Vec<_> = pool.imap(inc, 0..3).collect();
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(items.into_iter().all(is_terminated));
        let items: Vec<_> = pool.imap_unordered(inc, 0..3).collect();
        assert_eq!(items.len(), 3, "{items:?}");
        assert!(items.into_iter().all(is_terminated));
        pool.join().unwrap();
        // close after terminate does not revive or change anything.
        pool.close();
        assert!(is_terminated(pool.apply_async(inc, 1)));
        assert!(pool.worker_pids().is_empty(), "{:?}", pool.worker_pids());
    })
}

#[test]
fn join_before_close_is_still_running() {
    common::bounded(|| {
        let pool = pool(2);
        assert!(matches!(pool.join(), Err(Error::StillRunning)));
        // That did not hurt the pool.
        assert_eq!(pool.apply(inc, 41).unwrap(), 42);
        assert_eq!(pool.map(inc, 0..5).unwrap(), vec![1, 2, 3, 4, 5]);
        assert!(matches!(pool.join(), Err(Error::StillRunning)));
        pool.close();
        pool.join().unwrap();
        // Joining again, and closing again, are fine.
        pool.join().unwrap();
        pool.close();
        pool.join().unwrap();
        pool.terminate();
        pool.join().unwrap();
    })
}

#[test]
fn close_then_join_waits_for_every_queued_task() {
    common::bounded(|| {
        let pool = pool(2);
        let rs: Vec<_> = (0..16u64)
            .map(|i| (i, pool.apply_async(nap_inc, i).unwrap()))
            .collect();
        let m = pool
            .map_async_with(nap_inc, 100..120u64, MapOptions::new().chunksize(2))
            .unwrap();
        pool.close();
        pool.join().unwrap();
        assert!(pool.worker_pids().is_empty(), "{:?}", pool.worker_pids());
        // join returned: every task has finished, so every result is ready.
        for (i, r) in &rs {
            assert!(r.ready(), "task {i} not ready after join");
            assert_eq!(r.successful(), Some(true));
        }
        assert!(m.ready());
        assert_eq!(m.progress(), (20, 20));
        for (i, r) in rs {
            assert_eq!(r.get().unwrap(), i + 1);
        }
        assert_eq!(m.get().unwrap(), (101..121u64).collect::<Vec<_>>());
    })
}

#[test]
fn close_then_join_waits_for_callbacks_too() {
    common::bounded(|| {
        // As in CPython, whose join() also joins the result handler: once join
        // returns, the queued tasks' callbacks have run.
        let pool = pool(2);
        let called = Arc::new(AtomicUsize::new(0));
        let rs: Vec<_> = (0..10u64)
            .map(|i| {
                let c = called.clone();
                pool.apply_async_with(
                    nap_inc,
                    i,
                    TaskOptions::new().on_success(move |_: &u64| {
                        std::thread::sleep(Duration::from_millis(20));
                        c.fetch_add(1, Ordering::SeqCst);
                    }),
                )
                .unwrap()
            })
            .collect();
        pool.close();
        pool.join().unwrap();
        assert_eq!(called.load(Ordering::SeqCst), 10, "callbacks still pending");
        for r in &rs {
            assert!(r.ready());
        }
        for (i, r) in rs.into_iter().enumerate() {
            assert_eq!(r.get().unwrap(), i as u64 + 1);
        }
    })
}

#[test]
fn terminate_resolves_running_and_queued_tasks_with_terminated() {
    common::bounded(|| {
        let pool = pool(2);
        // More tasks than workers: two run, the rest wait.
        let rs: Vec<_> = (0..5u64)
            .map(|i| pool.apply_async(ten_seconds, i).unwrap())
            .collect();
        let m = pool.map_async(ten_seconds, 0..4u64).unwrap();
        let errors = Arc::new(AtomicUsize::new(0));
        let e2 = errors.clone();
        let with_cb = pool
            .apply_async_with(
                ten_seconds,
                9,
                TaskOptions::new().on_error(move |e| {
                    if matches!(e, Error::Terminated) {
                        e2.fetch_add(1, Ordering::SeqCst);
                    }
                }),
            )
            .unwrap();
        pool.terminate();
        for (i, r) in rs.into_iter().enumerate() {
            assert!(r.wait_timeout(BOUND), "task {i} never resolved");
            assert_eq!(r.successful(), Some(false));
            let got = r.get();
            assert!(is_terminated(got.clone()), "task {i}: {got:?}");
        }
        assert!(m.wait_timeout(BOUND), "the map never resolved");
        assert_eq!(m.successful(), Some(false));
        let got = m.get();
        assert!(is_terminated(got.clone()), "map: {got:?}");
        assert!(with_cb.wait_timeout(BOUND));
        assert!(is_terminated(with_cb.get()));
        assert_eq!(errors.load(Ordering::SeqCst), 1, "on_error saw Terminated");
        pool.join().unwrap();
        assert!(pool.worker_pids().is_empty());
    })
}

#[test]
fn dropping_a_pool_resolves_its_tasks_with_terminated() {
    common::bounded(|| {
        let pool = pool(2);
        let rs: Vec<_> = (0..4u64)
            .map(|i| pool.apply_async(ten_seconds, i).unwrap())
            .collect();
        let m = pool.map_async(ten_seconds, 0..3u64).unwrap();
        drop(pool);
        for (i, r) in rs.into_iter().enumerate() {
            assert!(r.wait_timeout(BOUND), "task {i} never resolved");
            let got = r.get();
            assert!(is_terminated(got.clone()), "task {i}: {got:?}");
            // cancel on a result whose pool is gone is a harmless false.
        }
        assert!(m.wait_timeout(BOUND));
        assert!(!m.cancel(), "nothing to cancel once the pool is gone");
        assert!(is_terminated(m.get()));
    })
}

#[test]
fn a_closed_pool_dropped_before_join_still_resolves_everything() {
    common::bounded(|| {
        let pool = pool(2);
        let rs: Vec<_> = (0..3u64)
            .map(|i| pool.apply_async(ten_seconds, i).unwrap())
            .collect();
        pool.close();
        drop(pool);
        for r in rs {
            assert!(r.wait_timeout(BOUND));
            assert!(is_terminated(r.get()));
        }
    })
}

// ---- no process outlives the pool (isolated: these count children) --------

/// Starts a pool, checks that its server is this process's one new child and
/// that its workers run tasks; returns it with the pids to check later.
fn started_pool() -> (Pool, u32, Vec<u32>) {
    assert_eq!(common::children(), Vec::<u32>::new(), "children before");
    let pool = pool(3);
    let server = pool.server_pid();
    let workers = pool.worker_pids();
    assert_eq!(workers.len(), 3);
    assert_eq!(
        common::children(),
        vec![server],
        "the server is the one child"
    );
    for w in &workers {
        assert!(common::exists(*w));
    }
    assert_eq!(pool.map(inc, 0..50).unwrap()[49], 50);
    (pool, server, workers)
}

fn assert_all_gone(server: u32, workers: &[u32]) {
    assert_eq!(common::children(), Vec::<u32>::new(), "a child is left");
    assert!(!common::exists(server), "server {server} still exists");
    for w in workers {
        assert!(!common::exists(*w), "worker {w} still exists");
    }
}

#[test]
fn no_process_left_after_drop() {
    common::bounded(|| {
        if common::isolated(&test_name!("no_process_left_after_drop")) {
            return;
        }
        let fds = common::open_fds();
        let (pool, server, workers) = started_pool();
        // Busy workers too.
        let r = pool.apply_async(ten_seconds, 1).unwrap();
        drop(pool);
        assert_all_gone(server, &workers);
        assert!(is_terminated(r.get()));
        assert_eq!(common::open_fds(), fds, "fds left open by the pool");
    })
}

#[test]
fn no_process_left_after_close_and_join() {
    common::bounded(|| {
        if common::isolated(&test_name!("no_process_left_after_close_and_join")) {
            return;
        }
        let fds = common::open_fds();
        let (pool, server, workers) = started_pool();
        let r = pool.apply_async(nap_inc, 1).unwrap();
        pool.close();
        pool.join().unwrap();
        assert_all_gone(server, &workers);
        assert_eq!(r.get().unwrap(), 2);
        drop(pool);
        assert_all_gone(server, &workers);
        assert_eq!(common::open_fds(), fds, "fds left open by the pool");
    })
}

#[test]
fn no_process_left_after_terminate_and_join() {
    common::bounded(|| {
        if common::isolated(&test_name!("no_process_left_after_terminate_and_join")) {
            return;
        }
        let fds = common::open_fds();
        let (pool, server, workers) = started_pool();
        let r = pool.apply_async(ten_seconds, 1).unwrap();
        pool.terminate();
        assert_all_gone(server, &workers);
        pool.join().unwrap();
        assert_all_gone(server, &workers);
        assert!(is_terminated(r.get()));
        drop(pool);
        assert_eq!(common::open_fds(), fds, "fds left open by the pool");
    })
}

#[test]
fn no_process_left_after_many_pools() {
    common::bounded(|| {
        if common::isolated(&test_name!("no_process_left_after_many_pools")) {
            return;
        }
        let fds = common::open_fds();
        for i in 0..5u64 {
            let (pool, server, workers) = started_pool();
            assert_eq!(pool.apply(inc, i).unwrap(), i + 1);
            if i % 2 == 0 {
                pool.close();
                pool.join().unwrap();
            }
            drop(pool);
            assert_all_gone(server, &workers);
        }
        assert_eq!(common::open_fds(), fds, "fds left open by the pools");
    })
}
