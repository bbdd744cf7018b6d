//! `imap` and `imap_unordered`: order, completeness, chunk sizes, endless
//! and lazily pulled input, per-item errors, and dropping an iterator early.

use crate::common;

use crate::common::pool;

use procpool::{Error, MapOptions};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(30);

fn square(x: u64) -> u64 {
    x * x
}

fn inc(x: u64) -> u64 {
    x + 1
}

/// Later items are quicker: completion order differs from input order.
fn slower_first(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20u64.saturating_sub(x)));
    x * 3
}

fn nap(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20));
    x
}

fn fail_7_and_19(x: u64) -> u64 {
    if x == 7 || x == 19 {
        panic!("item {x} failed");
    }
    x + 100
}

#[test]
fn imap_yields_in_input_order() {
    common::bounded(|| {
        let pool = pool(2);
        let got: Vec<u64> = pool
            .imap(square, 0..500u64)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, (0..500u64).map(|x| x * x).collect::<Vec<_>>());
        // Even when later items finish first.
        let got: Vec<u64> = pool
            .imap(slower_first, 0..30u64)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, (0..30u64).map(|x| x * 3).collect::<Vec<_>>());
        // Nothing in, nothing out.
        assert_eq!(pool.imap(square, 0..0u64).count(), 0);
        assert_eq!(pool.imap_unordered(square, 0..0u64).count(), 0);
    })
}

#[test]
fn imap_unordered_yields_every_item_exactly_once() {
    common::bounded(|| {
        let pool = pool(2);
        let mut got: Vec<u64> = pool
            .imap_unordered(square, 0..500u64)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 500);
        got.sort_unstable();
        assert_eq!(got, (0..500u64).map(|x| x * x).collect::<Vec<_>>());
        let mut got: Vec<u64> = pool
            .imap_unordered(slower_first, 0..30u64)
            .collect::<Result<_, _>>()
            .unwrap();
        got.sort_unstable();
        assert_eq!(got, (0..30u64).map(|x| x * 3).collect::<Vec<_>>());
    })
}

#[test]
fn imap_chunk_sizes_and_in_flight_bounds() {
    common::bounded(|| {
        let pool = pool(2);
        let want: Vec<u64> = (0..200u64).map(|x| x + 1).collect();
        for chunksize in [0, 1, 7, 64, 199, 200, 1000] {
            for in_flight in [None, Some(1), Some(3)] {
                let opts = || {
                    let o = MapOptions::new().chunksize(chunksize);
                    match in_flight {
                        Some(k) => o.in_flight(k),
                        None => o,
                    }
                };
                let got: Vec<u64> = pool
                    .imap_with(inc, 0..200u64, opts())
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(
                    got, want,
                    "imap, chunksize {chunksize}, in_flight {in_flight:?}"
                );
                let mut got: Vec<u64> = pool
                    .imap_unordered_with(inc, 0..200u64, opts())
                    .collect::<Result<_, _>>()
                    .unwrap();
                got.sort_unstable();
                assert_eq!(
                    got, want,
                    "imap_unordered, chunksize {chunksize}, in_flight {in_flight:?}"
                );
            }
        }
    })
}

#[test]
fn imap_of_an_endless_input() {
    common::bounded(|| {
        let pool = pool(2);
        let got: Vec<u64> = pool
            .imap(square, 0u64..)
            .take(1000)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
        let got: Vec<u64> = pool
            .imap_with(square, 0u64.., MapOptions::new().chunksize(16))
            .take(1000)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
        // Unordered: 1000 distinct squares.
        let got: Vec<u64> = pool
            .imap_unordered(square, 0u64..)
            .take(1000)
            .collect::<Result<_, _>>()
            .unwrap();
        let distinct: HashSet<u64> = got.iter().copied().collect();
        assert_eq!(distinct.len(), 1000);
        for v in got {
            let r = (v as f64).sqrt() as u64;
            assert_eq!(r * r, v, "{v} is not a square");
        }
        // The pool is fine after the abandoned rest.
        assert_eq!(
            pool.map(inc, 0..10u64).unwrap(),
            (1..11u64).collect::<Vec<_>>()
        );
    })
}

#[test]
fn imap_pulls_its_input_lazily() {
    common::bounded(|| {
        let pool = pool(2);
        let pulled = AtomicUsize::new(0);
        let counted = (0u64..).inspect(|_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        });
        let mut it = pool.imap(square, counted);
        assert_eq!(pulled.load(Ordering::SeqCst), 0, "pulled before iterating");
        let first: Vec<u64> = it.by_ref().take(10).collect::<Result<_, _>>().unwrap();
        assert_eq!(first, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
        let n = pulled.load(Ordering::SeqCst);
        assert!(
            (10..100_000).contains(&n),
            "pulled {n} items for 10 results"
        );
        drop(it);

        // With an explicit bound: at most the results taken plus the window.
        let pulled = AtomicUsize::new(0);
        let counted = (0u64..).inspect(|_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        });
        let got: Vec<u64> = pool
            .imap_with(square, counted, MapOptions::new().in_flight(4))
            .take(10)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
        let n = pulled.load(Ordering::SeqCst);
        assert!((10..=14).contains(&n), "pulled {n} items with in_flight(4)");

        // Chunks: the window counts chunks.
        let pulled = AtomicUsize::new(0);
        let counted = (0u64..).inspect(|_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        });
        let got: Vec<u64> = pool
            .imap_with(square, counted, MapOptions::new().chunksize(5).in_flight(2))
            .take(10)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 10);
        let n = pulled.load(Ordering::SeqCst);
        assert!(
            (10..=20).contains(&n),
            "pulled {n} items, chunks of 5, in_flight(2)"
        );
    })
}

#[test]
fn imap_unordered_pulls_its_input_lazily() {
    common::bounded(|| {
        let pool = pool(2);
        let pulled = AtomicUsize::new(0);
        let counted = (0u64..).inspect(|_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        });
        let it = pool.imap_unordered(square, counted);
        assert_eq!(pulled.load(Ordering::SeqCst), 0, "pulled before iterating");
        let got: Vec<u64> = it.take(10).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 10);
        let n = pulled.load(Ordering::SeqCst);
        assert!(
            (10..100_000).contains(&n),
            "pulled {n} items for 10 results"
        );

        let pulled = AtomicUsize::new(0);
        let counted = (0u64..).inspect(|_| {
            pulled.fetch_add(1, Ordering::SeqCst);
        });
        let got: Vec<u64> = pool
            .imap_unordered_with(square, counted, MapOptions::new().in_flight(3))
            .take(10)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 10);
        let n = pulled.load(Ordering::SeqCst);
        assert!((10..=13).contains(&n), "pulled {n} items with in_flight(3)");
    })
}

fn check_item_errors(items: &[(u64, Result<u64, Error>)]) {
    for (x, r) in items {
        match (x, r) {
            (7 | 19, Err(Error::TaskPanicked { message, .. })) => {
                assert!(message.contains(&format!("item {x} failed")), "{message:?}")
            }
            (7 | 19, other) => panic!("item {x}: expected TaskPanicked, got {other:?}"),
            (x, Ok(v)) => assert_eq!(*v, x + 100),
            (x, Err(e)) => panic!("item {x} failed: {e:?}"),
        }
    }
}

#[test]
fn imap_fails_only_the_items_that_panic() {
    common::bounded(|| {
        let pool = pool(2);
        for chunksize in [1, 4, 30] {
            let got: Vec<_> = pool
                .imap_with(
                    fail_7_and_19,
                    0..30u64,
                    MapOptions::new().chunksize(chunksize),
                )
                .collect();
            assert_eq!(got.len(), 30, "chunksize {chunksize}");
            let items: Vec<_> = (0..30u64).zip(got).collect();
            check_item_errors(&items);
            assert_eq!(items.iter().filter(|(_, r)| r.is_err()).count(), 2);
        }
    })
}

#[test]
fn imap_unordered_fails_only_the_items_that_panic() {
    common::bounded(|| {
        let pool = pool(2);
        for chunksize in [1, 4] {
            let got: Vec<_> = pool
                .imap_unordered_with(
                    fail_7_and_19,
                    0..30u64,
                    MapOptions::new().chunksize(chunksize),
                )
                .collect();
            assert_eq!(got.len(), 30);
            let mut ok: Vec<u64> = got
                .iter()
                .filter_map(|r| r.as_ref().ok().copied())
                .collect();
            ok.sort_unstable();
            assert_eq!(
                ok,
                (0..30u64)
                    .filter(|x| *x != 7 && *x != 19)
                    .map(|x| x + 100)
                    .collect::<Vec<_>>()
            );
            let mut failed: Vec<String> = got
                .into_iter()
                .filter_map(|r| match r {
                    Err(Error::TaskPanicked { message, .. }) => Some(message),
                    Err(e) => panic!("unexpected {e:?}"),
                    Ok(_) => None,
                })
                .collect();
            failed.sort();
            assert_eq!(failed.len(), 2);
            assert!(
                failed[0].contains("item 19") && failed[1].contains("item 7"),
                "{failed:?}"
            );
        }
    })
}

/// Runs `f` on another thread; fails (rather than hangs) if it does not end.
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::within(what, BOUND, f)
}

#[test]
fn dropping_imap_early_does_not_hang_and_the_pool_goes_on() {
    common::bounded(|| {
        let pool = Arc::new(pool(2));
        let p = pool.clone();
        let first = within_bound("taking 3 then dropping an imap", move || {
            let mut it = p.imap(nap, 0..10_000u64);
            let first: Vec<u64> = it.by_ref().take(3).map(Result::unwrap).collect();
            drop(it);
            first
        });
        assert_eq!(first, vec![0, 1, 2]);
        let p = pool.clone();
        within_bound("dropping an imap never iterated", move || {
            drop(p.imap(nap, 0..10_000u64));
        });
        let p = pool.clone();
        let n = within_bound("taking 3 then dropping an imap_unordered", move || {
            let mut it = p.imap_unordered_with(nap, 0..10_000u64, MapOptions::new().chunksize(2));
            it.by_ref().take(3).map(Result::unwrap).count()
        });
        assert_eq!(n, 3);
        let p = pool.clone();
        let got = within_bound("using the pool afterwards", move || {
            (p.apply(inc, 41).unwrap(), p.map(inc, 0..100u64).unwrap())
        });
        assert_eq!(got.0, 42);
        assert_eq!(got.1, (1..101u64).collect::<Vec<_>>());
        assert!(common::eventually(|| pool.worker_pids().len() == 2));
    })
}
