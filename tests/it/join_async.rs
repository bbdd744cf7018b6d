//! `Pool::join_async`: the future that resolves once a closed (or
//! terminated) pool is joined, without blocking the thread that awaits it.

use crate::common;

use crate::common::{Gate, wait_for_gate};
use procpool::{Error, TaskOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead. Shorter
/// than the gate's own bound (60 s), so that a thread blocked until the
/// gate gives up still fails the test.
const BOUND: Duration = Duration::from_secs(30);

fn gated((gate, x): (String, u64)) -> u64 {
    wait_for_gate(&gate);
    x
}

fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Runs `f` on another thread; fails (rather than hangs) if it does not end.
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::within(what, BOUND, f)
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

#[test]
fn join_async_waits_for_the_queue_and_the_callbacks() {
    common::bounded(|| {
        let called = within_bound("joining", || {
            let pool = common::pool(2);
            let called = Arc::new(AtomicUsize::new(0));
            let rs: Vec<_> = (0..6)
                .map(|i| {
                    let c = called.clone();
                    let opts = TaskOptions::new().on_success(move |_: &u64| {
                        std::thread::sleep(Duration::from_millis(5));
                        c.fetch_add(1, Ordering::SeqCst);
                    });
                    pool.apply_async_with(nap, 10 + i, opts).unwrap()
                })
                .collect();
            pool.close();
            current_thread_runtime()
                .block_on(pool.join_async())
                .unwrap();
            // Every task ran, every callback too, every process is gone.
            assert!(rs.iter().all(|r| r.ready()));
            let seen = called.load(Ordering::SeqCst);
            for (i, r) in rs.into_iter().enumerate() {
                assert_eq!(r.get().unwrap(), 10 + i as u64);
            }
            assert!(pool.worker_pids().is_empty());
            seen
        });
        assert_eq!(called, 6, "join_async resolved before every callback ran");
    })
}

#[test]
fn join_async_leaves_its_thread_free() {
    // One thread runs both the join and the task that lets the pool's work
    // finish: if awaiting the join blocked that thread, the gate would
    // never open (until its own bound, past ours).
    within_bound("joining while the same thread opens the gate", || {
        let pool = common::pool(2);
        let gate = Gate::new("join-async");
        let rs: Vec<_> = (0..4)
            .map(|i| pool.apply_async(gated, (gate.key(), i)).unwrap())
            .collect();
        pool.close();
        let rt = current_thread_runtime();
        rt.block_on(async {
            let opener = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                gate.open();
                gate
            });
            pool.join_async().await.unwrap();
            drop(opener.await.unwrap());
        });
        for (i, r) in rs.into_iter().enumerate() {
            assert_eq!(r.get().unwrap(), i as u64);
        }
    });
}

#[test]
fn join_async_on_a_running_pool_is_still_running() {
    common::bounded(|| {
        let pool = common::pool(1);
        let r = current_thread_runtime().block_on(pool.join_async());
        assert!(matches!(r, Err(Error::StillRunning)), "{r:?}");
        // The pool is unharmed.
        assert_eq!(pool.apply(nap, 1).unwrap(), 1);
    })
}

#[test]
fn join_async_after_terminate_and_from_a_spawned_task() {
    within_bound("joining a terminated pool", || {
        let pool = common::pool(2);
        let r = pool.apply_async(nap, 60_000).unwrap();
        pool.terminate();
        // The future is Send + 'static: it may run on another thread,
        // after the &Pool it came from is out of reach.
        let fut = pool.join_async();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(async move { tokio::spawn(fut).await.unwrap() })
            .unwrap();
        assert!(matches!(r.get(), Err(Error::Terminated)));
        assert!(pool.worker_pids().is_empty());
    });
}

#[test]
fn many_futures_wait_for_one_join() {
    within_bound("joining twice at once", || {
        let pool = common::pool(1);
        let r = pool.apply_async(nap, 30).unwrap();
        pool.close();
        let (a, b) = (pool.join_async(), pool.join_async());
        let rt = current_thread_runtime();
        let (a, b) = rt.block_on(async { tokio::join!(a, b) });
        a.unwrap();
        b.unwrap();
        assert_eq!(r.get().unwrap(), 30);
        // And the blocking join agrees.
        pool.join().unwrap();
    });
}
