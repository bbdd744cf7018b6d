//! `as_completed` and `wait` over many `AsyncResult`s: completion order and
//! indices, each `WaitFor`, timeouts, and `as_completed` as a stream.
//! "Not finished yet" is made certain with gates (a task that waits for a
//! file the test creates), never with timing.

use crate::common;

use crate::common::{Gate, pool};

use futures_core::Stream;
use procpool::{AsyncResult, Error, Next, WaitFor, as_completed, wait};
use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(120);

fn triple(x: u64) -> u64 {
    x * 3
}

/// Waits for its gate, then triples.
fn gated((gate, x): (String, u64)) -> u64 {
    common::wait_for_gate(&gate);
    x * 3
}

fn fails(x: u64) -> u64 {
    panic!("item {x} failed")
}

#[test]
fn as_completed_yields_in_completion_order_with_indices() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let gate = Gate::new("as-completed");
        // The slow one goes first; it cannot finish before the gate opens.
        let mut results = vec![pool.apply_async(gated, (gate.key(), 100)).unwrap()];
        results.extend((1..6u64).map(|x| pool.apply_async(triple, x).unwrap()));
        let mut done = as_completed(results);
        assert_eq!(done.len(), 6);
        let first: Vec<(usize, u64)> = done
            .by_ref()
            .take(5)
            .map(|(i, r)| (i, r.unwrap()))
            .collect();
        let indices: HashSet<usize> = first.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, (1..6).collect(), "the gated task came early");
        for (i, v) in &first {
            assert_eq!(*v, 3 * *i as u64, "value at index {i}");
        }
        assert_eq!(done.len(), 1);
        gate.open();
        let (i, r) = done.next().expect("the slow one");
        assert_eq!((i, r.unwrap()), (0, 300));
        assert!(done.next().is_none());
    })
}

#[test]
fn as_completed_yields_errors_and_finished_results_in_place() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let ok = pool.apply_async(triple, 7).unwrap();
        ok.wait();
        let results = vec![
            ok,
            pool.apply_async(fails, 1).unwrap(),
            pool.apply_async(triple, 2).unwrap(),
        ];
        let mut got: Vec<(usize, Result<u64, Error>)> = as_completed(results).collect();
        // The one finished before the call comes first.
        assert_eq!(got[0].0, 0);
        assert_eq!(*got[0].1.as_ref().unwrap(), 21);
        got.sort_by_key(|(i, _)| *i);
        assert!(
            matches!(&got[1].1, Err(Error::TaskPanicked { message, .. }) if message.contains("item 1")),
            "{:?}",
            got[1]
        );
        assert_eq!(*got[2].1.as_ref().unwrap(), 6);
        assert_eq!(as_completed(Vec::<AsyncResult<u64>>::new()).count(), 0);
    })
}

#[test]
fn as_completed_next_timeout_tells_nothing_yet_from_done() {
    common::bounded_for(BOUND, || {
        let pool = pool(1);
        let gate = Gate::new("as-completed-timeout");
        let mut done = as_completed([pool.apply_async(gated, (gate.key(), 4)).unwrap()]);
        assert!(matches!(
            done.next_timeout(Duration::from_millis(20)),
            Next::TimedOut
        ));
        assert!(matches!(done.next_timeout(Duration::ZERO), Next::TimedOut));
        gate.open();
        match done.next_timeout(BOUND) {
            Next::Item((i, r)) => assert_eq!((i, r.unwrap()), (0, 12)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(done.next_timeout(Duration::ZERO), Next::Done));
    })
}

#[test]
fn wait_first_completed_returns_with_the_slow_one_pending() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let gate = Gate::new("first-completed");
        let results = [
            pool.apply_async(gated, (gate.key(), 1)).unwrap(),
            pool.apply_async(triple, 2).unwrap(),
        ];
        let d = wait(&results, WaitFor::FirstCompleted, Some(BOUND));
        assert_eq!(d.done, [1]);
        assert_eq!(d.pending, [0]);
        assert!(results[1].ready() && !results[0].ready());
        // The results are still there to take.
        gate.open();
        let [slow, quick] = results;
        assert_eq!(quick.get().unwrap(), 6);
        assert_eq!(slow.get().unwrap(), 3);
    })
}

#[test]
fn wait_first_failed_returns_when_one_fails() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let gate = Gate::new("first-failed");
        let results = [
            pool.apply_async(gated, (gate.key(), 1)).unwrap(),
            pool.apply_async(fails, 2).unwrap(),
            pool.apply_async(gated, (gate.key(), 3)).unwrap(),
        ];
        let d = wait(&results, WaitFor::FirstFailed, Some(BOUND));
        assert_eq!(d.done, [1]);
        assert_eq!(d.pending, [0, 2]);
        assert_eq!(results[1].successful(), Some(false));

        // A cancelled result counts as failed.
        assert!(results[2].cancel());
        let d = wait(&results[2..], WaitFor::FirstFailed, Some(BOUND));
        assert_eq!(d.done, [0]);
        gate.open();

        // With no failure, FirstFailed waits for all.
        let ok = [
            pool.apply_async(triple, 1).unwrap(),
            pool.apply_async(triple, 2).unwrap(),
        ];
        let d = wait(&ok, WaitFor::FirstFailed, None);
        assert_eq!((d.done, d.pending), (vec![0, 1], vec![]));
    })
}

#[test]
fn wait_all_completed() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let results: Vec<_> = (0..8u64)
            .map(|x| {
                if x == 5 {
                    pool.apply_async(fails, x).unwrap()
                } else {
                    pool.apply_async(triple, x).unwrap()
                }
            })
            .collect();
        let d = wait(&results, WaitFor::AllCompleted, None);
        assert_eq!(d.done, (0..8).collect::<Vec<_>>());
        assert!(d.pending.is_empty());
        assert!(results.iter().all(AsyncResult::ready));
        let empty: [AsyncResult<u64>; 0] = [];
        let d = wait(&empty, WaitFor::FirstCompleted, None);
        assert!(d.done.is_empty() && d.pending.is_empty());
    })
}

#[test]
fn wait_timeout_returns_with_the_pending_ones_listed() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let gate = Gate::new("wait-timeout");
        let results = [
            pool.apply_async(gated, (gate.key(), 1)).unwrap(),
            pool.apply_async(triple, 2).unwrap(),
            pool.apply_async(gated, (gate.key(), 3)).unwrap(),
        ];
        // Once the quick one is in, the others stay pending whatever the bound.
        results[1].wait();
        for until in [
            WaitFor::FirstCompleted,
            WaitFor::FirstFailed,
            WaitFor::AllCompleted,
        ] {
            let d = wait(&results, until, Some(Duration::from_millis(30)));
            assert_eq!(d.done, [1], "{until:?}");
            assert_eq!(d.pending, [0, 2], "{until:?}");
        }
        let d = wait(&results, WaitFor::AllCompleted, Some(Duration::ZERO));
        assert_eq!(d.pending, [0, 2]);
        gate.open();
        let d = wait(&results, WaitFor::AllCompleted, Some(BOUND));
        assert_eq!(d.done, [0, 1, 2]);
    })
}

#[test]
fn as_completed_is_a_stream() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let gate = Gate::new("as-completed-stream");
        let mut results = vec![pool.apply_async(gated, (gate.key(), 10)).unwrap()];
        results.extend((1..4u64).map(|x| pool.apply_async(triple, x).unwrap()));
        let mut done = as_completed(results);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let order = rt.block_on(async {
            let mut order = Vec::new();
            while let Some((i, r)) =
                std::future::poll_fn(|cx| Pin::new(&mut done).poll_next(cx)).await
            {
                assert_eq!(r.unwrap(), if i == 0 { 30 } else { 3 * i as u64 });
                order.push(i);
                if order.len() == 3 {
                    gate.open();
                }
            }
            order
        });
        assert_eq!(order.len(), 4);
        assert_eq!(order[3], 0, "the gated one came before the gate opened");
    })
}
