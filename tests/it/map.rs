//! `map`, `map_with`, `map_async`: order, chunk sizes, empty input, the
//! `MapResult` state, the first error in input order, and callbacks.

use crate::common;

use crate::common::{Gate, pool};

use procpool::{Error, MapOptions};
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, mpsc};
use std::time::Duration;

fn square(x: u64) -> u64 {
    x * x
}

fn shout(s: String) -> String {
    s.to_uppercase()
}

fn add((a, b): (i64, i64)) -> i64 {
    a + b
}

fn with_pid(x: u64) -> (u64, u32) {
    (x, std::process::id())
}

fn blob(n: u32) -> Vec<u8> {
    (0..100_000u32)
        .map(|i| (i.wrapping_mul(n + 1) % 256) as u8)
        .collect()
}

/// Items 10 and 50 panic with their number; item 10 only after a while, so
/// that item 50's failure is in first.
fn fail_10_and_50(x: u64) -> u64 {
    if x == 10 {
        std::thread::sleep(Duration::from_millis(300));
        panic!("item {x} failed");
    }
    if x == 50 {
        panic!("item {x} failed");
    }
    x * 2
}

// ---- a gate: a task that waits for a file, opened by the test -------------

/// Item 0 waits (bounded) for the gate; every item returns its double.
fn gated_double((gate, x): (String, u64)) -> u64 {
    if x == 0 {
        common::wait_for_gate(&gate);
    }
    x * 2
}

#[test]
fn map_keeps_input_order() {
    common::bounded(|| {
        let pool = pool(2);
        assert_eq!(
            pool.map(square, 0..1000u64).unwrap(),
            (0..1000u64).map(|x| x * x).collect::<Vec<_>>()
        );
        assert_eq!(pool.map(square, 1..=4u64).unwrap(), vec![1, 4, 9, 16]);
        let words: Vec<String> = ["b", "a", "dd", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pool.map(shout, words).unwrap(), vec!["B", "A", "DD", "C"]);
        let set: BTreeSet<u64> = [9, 3, 7, 1].into_iter().collect();
        assert_eq!(pool.map(square, set).unwrap(), vec![1, 9, 49, 81]);
        let filtered = (0..50u64).filter(|x| x % 3 == 0).rev();
        assert_eq!(
            pool.map(square, filtered).unwrap(),
            (0..50u64)
                .filter(|x| x % 3 == 0)
                .rev()
                .map(|x| x * x)
                .collect::<Vec<_>>()
        );
        // starmap
        assert_eq!(
            pool.map(add, (0..20i64).map(|i| (i, -2 * i))).unwrap(),
            (0..20i64).map(|i| -i).collect::<Vec<_>>()
        );
        let many = pool.map(square, 0..20_000u64).unwrap();
        assert_eq!(many.len(), 20_000);
        assert!(many.iter().enumerate().all(|(i, &v)| v == (i * i) as u64));
    })
}

#[test]
fn map_with_chunk_sizes() {
    common::bounded(|| {
        let pool = pool(2);
        let want: Vec<u64> = (0..50u64).map(|x| x * x).collect();
        for chunksize in [0, 1, 2, 7, 49, 50, 51, 1000] {
            let got = pool
                .map_with(square, 0..50u64, MapOptions::new().chunksize(chunksize))
                .unwrap();
            assert_eq!(got, want, "chunksize {chunksize}");
            let r = pool
                .map_async_with(square, 0..50u64, MapOptions::new().chunksize(chunksize))
                .unwrap();
            assert_eq!(r.get().unwrap(), want, "map_async, chunksize {chunksize}");
        }
    })
}

#[test]
fn a_chunk_runs_in_one_worker() {
    common::bounded(|| {
        let pool = pool(2);
        for chunksize in [7usize, 50, 1000] {
            let got = pool
                .map_with(with_pid, 0..50u64, MapOptions::new().chunksize(chunksize))
                .unwrap();
            assert_eq!(
                got.iter().map(|r| r.0).collect::<Vec<_>>(),
                (0..50u64).collect::<Vec<_>>()
            );
            let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
            for chunk in got.chunks(chunksize) {
                let pids: HashSet<u32> = chunk.iter().map(|r| r.1).collect();
                assert_eq!(pids.len(), 1, "chunksize {chunksize}: one chunk, {pids:?}");
                assert!(pids.is_subset(&workers));
            }
        }
    })
}

#[test]
fn map_of_nothing() {
    common::bounded(|| {
        let pool = pool(2);
        assert_eq!(
            pool.map(square, Vec::<u64>::new()).unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(pool.map(square, 0..0u64).unwrap(), Vec::<u64>::new());
        assert_eq!(
            pool.map_with(square, 0..0u64, MapOptions::new().chunksize(5))
                .unwrap(),
            Vec::<u64>::new()
        );
        let r = pool.map_async(square, 0..0u64).unwrap();
        assert!(r.wait_timeout(Duration::from_secs(20)));
        assert!(r.ready());
        assert_eq!(r.successful(), Some(true));
        assert_eq!(r.progress(), (0, 0));
        assert_eq!(r.get().unwrap(), Vec::<u64>::new());
        // The pool is fine.
        assert_eq!(pool.map(square, 0..3u64).unwrap(), vec![0, 1, 4]);
    })
}

#[test]
fn map_of_large_results() {
    common::bounded(|| {
        let pool = pool(2);
        for chunksize in [1, 20] {
            let got = pool
                .map_with(blob, 0..20u32, MapOptions::new().chunksize(chunksize))
                .unwrap();
            assert_eq!(got.len(), 20);
            for (n, b) in (0..20u32).zip(&got) {
                assert_eq!(b, &blob(n), "item {n}, chunksize {chunksize}");
            }
        }
    })
}

#[test]
fn map_async_state_and_progress() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("map");
        let n = 20u64;
        let r = pool
            .map_async_with(
                gated_double,
                (0..n).map(|x| (gate.key(), x)),
                MapOptions::new().chunksize(1),
            )
            .unwrap();
        // Item 0 holds one worker; the other works through the rest.
        assert!(
            common::eventually(|| r.progress().0 > 0),
            "no progress: {:?}",
            r.progress()
        );
        let (done, total) = r.progress();
        assert_eq!(total, n as usize);
        assert!(done < total, "done before the gate opened: {done}");
        assert!(!r.ready());
        assert_eq!(r.successful(), None);
        assert!(!r.wait_timeout(Duration::from_millis(20)));
        gate.open();
        r.wait();
        assert!(r.ready());
        assert_eq!(r.progress(), (n as usize, n as usize));
        assert_eq!(r.successful(), Some(true));
        assert!(r.wait_timeout(Duration::ZERO));
        assert_eq!(r.get().unwrap(), (0..n).map(|x| x * 2).collect::<Vec<_>>());
    })
}

#[test]
fn map_async_progress_grows_to_the_total() {
    common::bounded(|| {
        let pool = pool(2);
        let r = pool
            .map_async_with(square, 0..500u64, MapOptions::new().chunksize(3))
            .unwrap();
        let mut last = 0;
        // Sample the progress while the map runs (the short wait is only the
        // sampling interval).
        while !r.wait_timeout(Duration::from_millis(1)) {
            let (done, total) = r.progress();
            assert_eq!(total, 500);
            assert!(done >= last && done <= total, "{last} then {done}");
            last = done;
        }
        assert_eq!(r.progress(), (500, 500));
        assert_eq!(r.get().unwrap()[499], 499 * 499);
    })
}

fn assert_item_10(e: &Error) {
    match e {
        Error::TaskPanicked { message, .. } => {
            assert!(message.contains("item 10"), "{message:?}");
            assert!(!message.contains("item 50"), "{message:?}");
        }
        other => panic!("expected TaskPanicked, got {other:?}"),
    }
}

#[test]
fn map_returns_the_first_error_in_input_order() {
    common::bounded(|| {
        let pool = pool(2);
        for opts in [
            MapOptions::new(),
            MapOptions::new().chunksize(1),
            MapOptions::new().chunksize(30),
        ] {
            let e = pool.map_with(fail_10_and_50, 0..100u64, opts).unwrap_err();
            assert_item_10(&e);
        }
        // The pool goes on.
        assert_eq!(pool.map(square, 0..5u64).unwrap(), vec![0, 1, 4, 9, 16]);
    })
}

#[test]
fn a_failed_map_async_finishes_every_chunk_and_is_not_successful() {
    common::bounded(|| {
        let pool = pool(2);
        let r = pool.map_async(fail_10_and_50, 0..100u64).unwrap();
        assert!(r.wait_timeout(Duration::from_secs(30)));
        assert!(r.ready());
        assert_eq!(r.progress(), (100, 100), "every chunk finished");
        assert_eq!(r.successful(), Some(false), "a map with failed items");
        assert_item_10(&r.get().unwrap_err());
    })
}

#[test]
fn map_async_on_success_receives_the_whole_list() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel();
        let r = pool
            .map_async_with(
                square,
                0..100u64,
                MapOptions::new()
                    .chunksize(9)
                    .on_success(move |v: &Vec<u64>| tx.send(v.clone()).unwrap())
                    .on_error(|e| panic!("on_error with {e:?}")),
            )
            .unwrap();
        r.wait();
        // The callback ran before the map became ready.
        let seen = rx.try_recv().expect("on_success ran before ready");
        let want: Vec<u64> = (0..100u64).map(|x| x * x).collect();
        assert_eq!(seen, want);
        assert_eq!(r.successful(), Some(true));
        assert_eq!(r.get().unwrap(), want, "get() still has the values");
        assert!(rx.try_recv().is_err(), "on_success ran once");
    })
}

#[test]
fn map_async_on_error_receives_the_first_error() {
    common::bounded(|| {
        let pool = pool(2);
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let e2 = errors.clone();
        let r = pool
            .map_async_with(
                fail_10_and_50,
                0..100u64,
                MapOptions::new()
                    .on_success(|v: &Vec<u64>| panic!("on_success with {} values", v.len()))
                    .on_error(move |e| e2.lock().unwrap().push(e.clone())),
            )
            .unwrap();
        r.wait();
        let seen = errors.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "on_error ran once: {seen:?}");
        assert_item_10(&seen[0]);
        assert_eq!(r.successful(), Some(false));
        assert_item_10(&r.get().unwrap_err());
    })
}

#[test]
fn map_async_of_nothing_runs_on_success_with_an_empty_list() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel();
        let r = pool
            .map_async_with(
                square,
                Vec::<u64>::new(),
                MapOptions::new().on_success(move |v: &Vec<u64>| tx.send(v.len()).unwrap()),
            )
            .unwrap();
        r.wait();
        assert_eq!(rx.try_recv(), Ok(0));
        assert_eq!(r.get().unwrap(), Vec::<u64>::new());
    })
}
