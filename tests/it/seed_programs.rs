//! The seed tutorial's programs, as tests: a map of an increment, synchronous
//! `apply` of a task that reports its worker, many `apply_async` then `get`,
//! and a callback that sees every result on the result-handler thread.

use crate::common;

use crate::common::pool;

use procpool::TaskOptions;
use std::collections::HashSet;
use std::sync::mpsc;
use std::thread::ThreadId;

fn inc(x: u64) -> u64 {
    x + 1
}

fn square(x: u64) -> u64 {
    x * x
}

fn whoami(_: ()) -> u32 {
    std::process::id()
}

#[test]
fn map_of_an_increment_over_100_numbers() {
    common::bounded(|| {
        let pool = pool(2);
        let out = pool.map(inc, 0..100u64).unwrap();
        assert_eq!(out.len(), 100);
        assert_eq!(out, (1..=100u64).collect::<Vec<_>>());
        // The same from a Vec, which is what the tutorial hands over.
        let input: Vec<u64> = (0..100).collect();
        let out = pool.map(inc, input.clone()).unwrap();
        for (x, y) in input.iter().zip(&out) {
            assert_eq!(*y, x + 1);
        }
    })
}

#[test]
fn ten_synchronous_applies_run_in_the_pools_workers() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        assert_eq!(workers.len(), 2, "two distinct workers: {workers:?}");
        let me = std::process::id();
        assert!(!workers.contains(&me), "a worker is not the caller");
        assert!(!workers.contains(&pool.server_pid()));
        for i in 0..10 {
            let pid = pool.apply(whoami, ()).unwrap();
            assert_ne!(pid, me, "apply #{i} ran in the caller's process");
            assert!(
                workers.contains(&pid),
                "apply #{i} ran in {pid}, not one of the workers {workers:?}"
            );
        }
        // Nothing died, so the workers are the same ones.
        let after: HashSet<u32> = pool.worker_pids().into_iter().collect();
        assert_eq!(after, workers);
    })
}

#[test]
fn a_hundred_apply_async_then_get() {
    common::bounded(|| {
        let pool = pool(2);
        let pending: Vec<_> = (0..100u64)
            .map(|i| pool.apply_async(square, i).unwrap())
            .collect();
        let values: Vec<u64> = pending.into_iter().map(|r| r.get().unwrap()).collect();
        assert_eq!(values, (0..100u64).map(|i| i * i).collect::<Vec<_>>());
    })
}

#[test]
fn a_callback_sees_every_result_on_the_results_thread() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel::<(u64, ThreadId, Option<String>)>();
        let n = 100u64;
        let pending: Vec<_> = (0..n)
            .map(|i| {
                let tx = tx.clone();
                pool.apply_async_with(
                    square,
                    i,
                    TaskOptions::new().on_success(move |v: &u64| {
                        let t = std::thread::current();
                        tx.send((*v, t.id(), t.name().map(str::to_owned))).unwrap();
                    }),
                )
                .unwrap()
            })
            .collect();
        drop(tx);
        for (i, r) in pending.into_iter().enumerate() {
            assert_eq!(r.get().unwrap(), (i * i) as u64);
        }
        // Every callback ran before its result became ready, so all of their
        // messages are already in the channel.
        let seen: Vec<_> = rx.try_iter().collect();
        assert_eq!(seen.len(), n as usize, "one callback per task");
        let mut values: Vec<u64> = seen.iter().map(|s| s.0).collect();
        values.sort_unstable();
        assert_eq!(values, (0..n).map(|i| i * i).collect::<Vec<_>>());
        let threads: HashSet<ThreadId> = seen.iter().map(|s| s.1).collect();
        assert_eq!(threads.len(), 1, "all callbacks on one thread");
        assert!(
            !threads.contains(&std::thread::current().id()),
            "callbacks ran on the caller's thread"
        );
        for (_, _, name) in &seen {
            assert_eq!(name.as_deref(), Some("procpool-results"));
        }
    })
}
