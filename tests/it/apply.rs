//! `apply` and `apply_async`: argument and result types, many threads sharing
//! one pool, and the `AsyncResult` state machine.

use crate::common;

use crate::common::{Gate, pool};

use procpool::{AsyncResult, Error, MapResult, Pool};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

// ---- a gate: a task that waits for a file, opened by the test -------------

/// In a worker: waits (bounded, in case the test failed) for the gate, then
/// returns `v`.
fn gated((gate, v): (String, u64)) -> u64 {
    common::wait_for_gate(&gate);
    v
}

/// In a worker: waits for the gate, then panics.
fn gated_panic(gate: String) -> u64 {
    gated((gate, 0));
    panic!("gated failure");
}

// ---- tasks of various types ------------------------------------------------

fn shout(s: String) -> String {
    s.to_uppercase()
}

fn reverse(v: Vec<i32>) -> Vec<i32> {
    v.into_iter().rev().collect()
}

fn bytes_len(v: Vec<u8>) -> (usize, u64) {
    (v.len(), v.iter().map(|&b| u64::from(b)).sum())
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Order {
    id: u64,
    customer: String,
    lines: Vec<Line>,
    note: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Line {
    sku: String,
    qty: u32,
    price_cents: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Verdict {
    Empty,
    Total { cents: i64, lines: usize },
    Rejected(String),
}

fn price(o: Order) -> Verdict {
    if o.customer.is_empty() {
        return Verdict::Rejected(format!("order {} has no customer", o.id));
    }
    if o.lines.is_empty() {
        return Verdict::Empty;
    }
    Verdict::Total {
        cents: o
            .lines
            .iter()
            .map(|l| i64::from(l.qty) * l.price_cents)
            .sum(),
        lines: o.lines.len(),
    }
}

fn add((a, b): (i64, i64)) -> i64 {
    a + b
}

fn describe((name, n, flag): (String, u32, bool)) -> String {
    format!("{name}:{n}:{flag}")
}

fn unit_to_unit(_: ()) {}

fn unit_to_string(_: ()) -> String {
    "from a worker".to_string()
}

fn count_keys(m: BTreeMap<String, u32>) -> (usize, u32) {
    (m.len(), m.values().sum())
}

fn maybe_half(x: i64) -> Option<i64> {
    (x % 2 == 0).then_some(x / 2)
}

fn checked(x: i64) -> Result<i64, String> {
    if x < 0 {
        Err(format!("{x} is negative"))
    } else {
        Ok(x * 10)
    }
}

fn square(x: u64) -> u64 {
    x * x
}

fn sleep_then_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    x * x
}

fn boom(x: u64) -> u64 {
    panic!("boom {x}");
}

#[test]
fn apply_strings_vecs_and_bytes() {
    common::bounded(|| {
        let pool = pool(2);
        assert_eq!(pool.apply(shout, "hello".to_string()).unwrap(), "HELLO");
        assert_eq!(pool.apply(shout, String::new()).unwrap(), "");
        assert_eq!(
            pool.apply(shout, "ünïcödé ß".to_string()).unwrap(),
            "ünïcödé ß".to_uppercase()
        );
        assert_eq!(pool.apply(reverse, vec![1, 2, 3]).unwrap(), vec![3, 2, 1]);
        assert_eq!(pool.apply(reverse, vec![]).unwrap(), Vec::<i32>::new());
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let want = (big.len(), big.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(pool.apply(bytes_len, big).unwrap(), want);
        let m: BTreeMap<String, u32> = [("a", 1), ("b", 2), ("c", 39)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(pool.apply(count_keys, m).unwrap(), (3, 42));
        assert_eq!(pool.apply(maybe_half, 42).unwrap(), Some(21));
        assert_eq!(pool.apply(maybe_half, 41).unwrap(), None);
        assert_eq!(pool.apply(checked, 4).unwrap(), Ok(40));
        assert_eq!(
            pool.apply(checked, -4).unwrap(),
            Err("-4 is negative".to_string())
        );
    })
}

#[test]
fn apply_structs_and_enums_with_serde_derive() {
    common::bounded(|| {
        let pool = pool(2);
        let order = Order {
            id: 7,
            customer: "ada".into(),
            lines: vec![
                Line {
                    sku: "tea".into(),
                    qty: 3,
                    price_cents: 250,
                },
                Line {
                    sku: "cake".into(),
                    qty: 1,
                    price_cents: -100,
                },
            ],
            note: Some("ring twice".into()),
        };
        assert_eq!(
            pool.apply(price, order.clone()).unwrap(),
            Verdict::Total {
                cents: 650,
                lines: 2
            }
        );
        let empty = Order {
            lines: vec![],
            note: None,
            ..order.clone()
        };
        assert_eq!(pool.apply(price, empty).unwrap(), Verdict::Empty);
        let anonymous = Order {
            customer: String::new(),
            ..order
        };
        assert_eq!(
            pool.apply(price, anonymous).unwrap(),
            Verdict::Rejected("order 7 has no customer".into())
        );
    })
}

#[test]
fn apply_tuples_as_starmap() {
    common::bounded(|| {
        let pool = pool(2);
        assert_eq!(pool.apply(add, (40, 2)).unwrap(), 42);
        assert_eq!(pool.apply(add, (i64::MIN + 1, -1)).unwrap(), i64::MIN);
        assert_eq!(
            pool.apply(describe, ("x".to_string(), 3, true)).unwrap(),
            "x:3:true"
        );
        // The same through map: a starmap.
        assert_eq!(
            pool.map(add, vec![(1, 2), (3, 4), (-5, 5)]).unwrap(),
            vec![3, 7, 0]
        );
    })
}

#[test]
fn apply_unit_arguments_and_results() {
    common::bounded(|| {
        let pool = pool(2);
        pool.apply(unit_to_unit, ()).unwrap();
        assert_eq!(pool.apply(unit_to_string, ()).unwrap(), "from a worker");
        let r = pool.apply_async(unit_to_unit, ()).unwrap();
        r.wait();
        assert_eq!(r.successful(), Some(true));
        r.get().unwrap();
        assert_eq!(pool.map(unit_to_unit, vec![(); 5]).unwrap(), vec![(); 5]);
    })
}

#[test]
fn apply_from_eight_threads_at_once() {
    common::bounded(|| {
        let pool = pool(3);
        let calls = 40u64;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    let pool = &pool;
                    s.spawn(move || {
                        let mut got = Vec::new();
                        for i in 0..calls {
                            let x = t * 1000 + i;
                            got.push((x, pool.apply(square, x).unwrap()));
                            let s = format!("t{t}-{i}");
                            assert_eq!(pool.apply(shout, s.clone()).unwrap(), s.to_uppercase());
                        }
                        got
                    })
                })
                .collect();
            let mut total = 0;
            for h in handles {
                for (x, y) in h.join().expect("a thread panicked") {
                    assert_eq!(y, x * x, "apply(square, {x})");
                    total += 1;
                }
            }
            assert_eq!(total, 8 * calls);
        });
    })
}

#[test]
fn apply_async_from_eight_threads_at_once() {
    common::bounded(|| {
        let pool = pool(2);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let pool = &pool;
                s.spawn(move || {
                    let rs: Vec<_> = (0..50u64)
                        .map(|i| (t * 100 + i, pool.apply_async(square, t * 100 + i).unwrap()))
                        .collect();
                    for (x, r) in rs {
                        assert_eq!(r.get().unwrap(), x * x);
                    }
                });
            }
        });
    })
}

#[test]
fn apply_async_is_not_ready_until_its_task_finishes() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("apply");
        let r = pool.apply_async(gated, (gate.key(), 9)).unwrap();
        assert!(!r.ready());
        assert_eq!(r.successful(), None, "successful() is None before ready");
        assert!(!r.wait_timeout(Duration::from_millis(50)));
        assert!(!r.ready());
        assert_eq!(r.successful(), None);
        // Other tasks still run meanwhile (on the other worker).
        assert_eq!(pool.apply(square, 5).unwrap(), 25);
        assert!(!r.ready());
        gate.open();
        assert!(r.wait_timeout(Duration::from_secs(30)));
        assert!(r.ready());
        assert_eq!(r.successful(), Some(true));
        // Once ready, it stays ready, and waiting again returns at once.
        r.wait();
        assert!(r.wait_timeout(Duration::ZERO));
        assert!(r.ready());
        assert_eq!(r.get().unwrap(), 9);
    })
}

#[test]
fn apply_async_failure_is_not_successful() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("apply");
        let r = pool.apply_async(gated_panic, gate.key()).unwrap();
        assert_eq!(r.successful(), None);
        assert!(!r.ready());
        gate.open();
        r.wait();
        assert!(r.ready());
        assert_eq!(r.successful(), Some(false));
        match r.get() {
            Err(Error::TaskPanicked { message, .. }) => assert!(message.contains("gated failure")),
            other => panic!("expected TaskPanicked, got {other:?}"),
        }
        let r = pool.apply_async(boom, 3).unwrap();
        assert!(r.wait_timeout(Duration::from_secs(30)));
        assert_eq!(r.successful(), Some(false));
        assert!(
            matches!(r.get(), Err(Error::TaskPanicked { message, .. }) if message.contains("boom 3"))
        );
    })
}

#[test]
fn apply_async_wait_blocks_until_a_sleeping_task_is_done() {
    common::bounded(|| {
        let pool = pool(2);
        let r = pool.apply_async(sleep_then_square, 12).unwrap();
        r.wait();
        assert!(r.ready());
        assert_eq!(r.successful(), Some(true));
        assert_eq!(r.get().unwrap(), 144);

        let r = pool.apply_async(sleep_then_square, 3).unwrap();
        assert!(r.wait_timeout(Duration::from_secs(30)));
        assert!(r.ready());
        assert_eq!(r.get().unwrap(), 9);

        // get() waits by itself.
        let r = pool.apply_async(sleep_then_square, 4).unwrap();
        assert_eq!(r.get().unwrap(), 16);
    })
}

#[test]
fn async_result_can_be_waited_on_and_got_from_another_thread() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("apply");
        let r = pool.apply_async(gated, (gate.key(), 77)).unwrap();
        let quick = pool.apply_async(square, 11).unwrap();
        let h = std::thread::spawn(move || {
            r.wait();
            (r.successful(), r.get())
        });
        let h2 = std::thread::spawn(move || quick.get());
        gate.open();
        let (ok, v) = h.join().unwrap();
        assert_eq!(ok, Some(true));
        assert_eq!(v.unwrap(), 77);
        assert_eq!(h2.join().unwrap().unwrap(), 121);
    })
}

#[test]
fn pool_and_results_are_send_and_sync() {
    common::bounded(|| {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Pool>();
        send::<AsyncResult<u64>>();
        send::<AsyncResult<String>>();
        send::<MapResult<u64>>();
        send::<Error>();
        // And, used that way: a pool in an Arc, shared by threads.
        let pool = Arc::new(pool(2));
        let hs: Vec<_> = (0..3u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || pool.apply(square, t).unwrap())
            })
            .collect();
        let got: Vec<u64> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 4]);
    })
}

// ---- AsyncResult as a Future, driven by a minimal executor ----------------

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls a future on this thread, parking between polls (bounded overall).
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(Instant::now() < end, "the future was never woken");
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

#[test]
fn async_result_is_a_future() {
    common::bounded(|| {
        let pool = pool(2);
        let r = pool.apply_async(sleep_then_square, 6).unwrap();
        assert_eq!(block_on(r).unwrap(), 36);
        let r = pool.apply_async(boom, 1).unwrap();
        assert!(matches!(block_on(r), Err(Error::TaskPanicked { .. })));
        let gate = Gate::new("apply");
        let r = pool.apply_async(gated, (gate.key(), 5)).unwrap();
        let opener = std::thread::spawn({
            let key = gate.key();
            move || std::fs::write(key, b"open").unwrap()
        });
        assert_eq!(block_on(r).unwrap(), 5);
        opener.join().unwrap();
    })
}

#[test]
fn a_quick_task_does_not_wait_behind_a_blocked_one_while_a_worker_is_idle() {
    common::bounded(|| {
        let pool = pool(2);
        // Warm up with many quick tasks: the pool now knows its tasks as short.
        for _ in 0..5 {
            assert_eq!(pool.map(square, 0..200u64).unwrap()[199], 199 * 199);
            for i in 0..20 {
                assert_eq!(pool.apply(square, i).unwrap(), i * i);
            }
        }
        let gate = Gate::new("apply");
        let blocked = pool.apply_async(gated, (gate.key(), 1)).unwrap();
        // One worker holds the blocked task and the other is idle: quick tasks
        // submitted now must not wait for the gate (as in CPython, where an
        // idle worker takes the next task from the shared queue).
        let quick: Vec<_> = (0..10u64)
            .map(|i| pool.apply_async(square, i).unwrap())
            .collect();
        let bound = Duration::from_secs(10);
        let all_done = quick.iter().all(|r| r.wait_timeout(bound));
        let still_blocked = !blocked.ready();
        gate.open();
        assert!(
            still_blocked,
            "the gated task finished before its gate opened"
        );
        assert!(all_done, "a quick task waited behind the blocked one");
        for (i, r) in quick.into_iter().enumerate() {
            assert_eq!(r.get().unwrap(), (i * i) as u64);
        }
        assert_eq!(blocked.get().unwrap(), 1);
    })
}
