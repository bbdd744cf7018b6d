//! `imap` and `imap_unordered` against an input iterator that panics (the
//! panic comes in its place, after the items before it), and
//! `next_timeout` (a bounded wait, with "nothing yet" told apart from
//! "done").

use crate::common;

use crate::common::{Gate, pool, wait_for_gate};
use procpool::{MapOptions, Next};
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(60);

fn triple(x: u64) -> u64 {
    x * 3
}

fn slow_triple(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(30));
    x * 3
}

fn gated((gate, x): (String, u64)) -> u64 {
    wait_for_gate(&gate);
    x * 3
}

/// 0, 1, ... and a panic at `at`.
fn panics_at(at: u64) -> impl Iterator<Item = u64> {
    (0..).inspect(move |&i| {
        if i == at {
            panic!("the input failed at {at}")
        }
    })
}

/// Pulls `next()` until it panics; returns the items before and the panic's
/// message. Fails if the iterator ends without panicking.
fn until_panic<R: std::fmt::Debug>(
    mut next: impl FnMut() -> Option<Result<R, procpool::Error>>,
) -> (Vec<R>, String) {
    let _dog = common::watchdog("an imap up to its input's panic", Duration::from_secs(120));
    let mut got = Vec::new();
    loop {
        match catch_unwind(AssertUnwindSafe(&mut next)) {
            Ok(Some(r)) => got.push(r.expect("an item failed")),
            Ok(None) => panic!("the iterator ended without the input's panic; got {got:?}"),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return (got, msg);
            }
        }
    }
}

#[test]
fn imap_yields_the_items_before_an_input_panic_then_resumes_it() {
    common::bounded(|| {
        let pool = pool(2);
        for at in [0u64, 1, 7, 30] {
            for chunksize in [1usize, 3] {
                for in_flight in [None, Some(1), Some(4)] {
                    let mut opts = MapOptions::new().chunksize(chunksize);
                    if let Some(k) = in_flight {
                        opts = opts.in_flight(k);
                    }
                    let mut it = pool.imap_with(triple, panics_at(at), opts);
                    let (got, msg) = until_panic(|| it.next());
                    let case = format!("at {at}, chunksize {chunksize}, in_flight {in_flight:?}");
                    assert_eq!(got, (0..at).map(|x| x * 3).collect::<Vec<_>>(), "{case}");
                    assert_eq!(msg, format!("the input failed at {at}"), "{case}");
                }
            }
        }
    })
}

#[test]
fn imap_unordered_yields_everything_pulled_before_an_input_panic() {
    common::bounded(|| {
        let pool = pool(2);
        for at in [0u64, 1, 7, 30] {
            for chunksize in [1usize, 3] {
                let opts = MapOptions::new().chunksize(chunksize);
                let mut it = pool.imap_unordered_with(triple, panics_at(at), opts);
                let (got, msg) = until_panic(|| it.next());
                let case = format!("at {at}, chunksize {chunksize}");
                assert_eq!(got.len() as u64, at, "{case}: {got:?}");
                let got: HashSet<u64> = got.into_iter().collect();
                assert_eq!(got, (0..at).map(|x| x * 3).collect(), "{case}");
                assert_eq!(msg, format!("the input failed at {at}"), "{case}");
            }
        }
    })
}

#[test]
fn an_input_panic_stops_no_worker_and_loses_no_result() {
    common::bounded_for(Duration::from_secs(120), || {
        let pool = pool(2);
        let pids: HashSet<u32> = pool.worker_pids().into_iter().collect();
        // Slow tasks: the earlier items are still running when the input
        // panics (it is pulled at the first next()).
        let mut it = pool.imap(slow_triple, panics_at(5));
        let (got, _) = until_panic(|| it.next());
        assert_eq!(got, vec![0, 3, 6, 9, 12]);
        drop(it);
        let mut it = pool.imap_unordered(slow_triple, panics_at(5));
        let (got, _) = until_panic(|| it.next());
        assert_eq!(got.len(), 5);
        drop(it);
        let now: HashSet<u32> = pool.worker_pids().into_iter().collect();
        assert_eq!(now, pids, "a worker was replaced");
        assert_eq!(pool.apply(triple, 14).unwrap(), 42);
    })
}

#[test]
fn imap_next_timeout_tells_nothing_yet_from_done() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("next-timeout");
        let items: Vec<(String, u64)> = (0..4).map(|x| (gate.key(), x)).collect();
        let mut it = pool.imap(gated, items);
        for _ in 0..2 {
            assert!(
                matches!(it.next_timeout(Duration::from_millis(20)), Next::TimedOut),
                "an item came through a shut gate"
            );
        }
        assert!(matches!(it.next_timeout(Duration::ZERO), Next::TimedOut));
        gate.open();
        for x in 0..4u64 {
            match it.next_timeout(BOUND) {
                Next::Item(r) => assert_eq!(r.unwrap(), x * 3),
                other => panic!("item {x}: {other:?}"),
            }
        }
        assert!(matches!(it.next_timeout(BOUND), Next::Done));
        assert!(matches!(it.next_timeout(Duration::ZERO), Next::Done));
        assert!(it.next().is_none());
        // Nothing in: done at once.
        assert!(matches!(
            pool.imap(triple, 0..0u64).next_timeout(BOUND),
            Next::Done
        ));
    })
}

#[test]
fn imap_unordered_next_timeout_tells_nothing_yet_from_done() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("next-timeout-unordered");
        let items: Vec<(String, u64)> = (0..4).map(|x| (gate.key(), x)).collect();
        let mut it = pool.imap_unordered(gated, items);
        assert!(matches!(
            it.next_timeout(Duration::from_millis(20)),
            Next::TimedOut
        ));
        gate.open();
        let mut got = HashSet::new();
        for _ in 0..4 {
            match it.next_timeout(BOUND) {
                Next::Item(r) => assert!(got.insert(r.unwrap())),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, [0, 3, 6, 9].into_iter().collect());
        assert!(matches!(it.next_timeout(BOUND), Next::Done));
        assert!(matches!(
            pool.imap_unordered(triple, 0..0u64).next_timeout(BOUND),
            Next::Done
        ));
    })
}

#[test]
fn next_timeout_after_a_timeout_loses_nothing_and_meets_the_input_panic() {
    common::bounded(|| {
        let pool = pool(2);
        let mut it = pool.imap_with(slow_triple, panics_at(6), MapOptions::new().in_flight(2));
        let mut got = Vec::new();
        let panicked = catch_unwind(AssertUnwindSafe(|| {
            loop {
                match it.next_timeout(Duration::from_millis(1)) {
                    Next::Item(r) => got.push(r.unwrap()),
                    Next::TimedOut => {}
                    Next::Done => break,
                }
            }
        }));
        assert!(panicked.is_err(), "the input's panic did not come");
        assert_eq!(got, vec![0, 3, 6, 9, 12, 15]);
    })
}
