//! Callbacks: `on_success` and `on_error`, run one at a time on the pool's
//! result-handler thread, in completion order, before the result is ready;
//! a panicking callback turns the result into `CallbackPanicked` and the
//! handler thread goes on.

use crate::common;

use crate::common::{Gate, pool};

use procpool::{Error, MapOptions, TaskOptions};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::ThreadId;
use std::time::Duration;

/// Generous: only there so that a bug fails the test instead of hanging it.
const BOUND: Duration = Duration::from_secs(30);

fn square(x: u64) -> u64 {
    x * x
}

fn fail(x: u64) -> u64 {
    panic!("task {x} failed");
}

fn thread() -> (ThreadId, Option<String>) {
    let t = std::thread::current();
    (t.id(), t.name().map(str::to_owned))
}

fn assert_results_thread(threads: &[(ThreadId, Option<String>)]) {
    let ids: HashSet<ThreadId> = threads.iter().map(|t| t.0).collect();
    assert_eq!(ids.len(), 1, "callbacks on {} threads", ids.len());
    assert!(!ids.contains(&std::thread::current().id()));
    for (_, name) in threads {
        assert_eq!(name.as_deref(), Some("procpool-results"));
    }
}

// ---- a gate: a task that waits for a file, opened by the test -------------

/// In a worker: waits for the gate, then returns `v`.
fn gated((gate, v): (String, u64)) -> u64 {
    common::wait_for_gate(&gate);
    v
}

#[derive(Debug)]
enum Seen {
    Ok(u64),
    Err(Error),
}

fn reporting(tx: &mpsc::Sender<Seen>) -> TaskOptions<u64> {
    let (t1, t2) = (tx.clone(), tx.clone());
    TaskOptions::new()
        .on_success(move |v: &u64| t1.send(Seen::Ok(*v)).unwrap())
        .on_error(move |e: &Error| t2.send(Seen::Err(e.clone())).unwrap())
}

#[test]
fn on_success_or_on_error_runs_for_each_outcome() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel();

        let r = pool.apply_async_with(square, 7, reporting(&tx)).unwrap();
        r.wait();
        // The callback ran before the result became ready.
        assert!(matches!(rx.try_recv(), Ok(Seen::Ok(49))));
        assert!(rx.try_recv().is_err(), "only one callback ran");
        assert_eq!(r.successful(), Some(true));
        assert_eq!(r.get().unwrap(), 49);

        let r = pool.apply_async_with(fail, 3, reporting(&tx)).unwrap();
        r.wait();
        match rx.try_recv() {
            Ok(Seen::Err(Error::TaskPanicked { message, .. })) => {
                assert!(message.contains("task 3 failed"), "{message:?}")
            }
            other => panic!("expected on_error with TaskPanicked, got {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "only one callback ran");
        assert_eq!(r.successful(), Some(false));
        assert!(
            matches!(r.get(), Err(Error::TaskPanicked { message, .. }) if message.contains("task 3"))
        );

        // Only on_success given, and the task fails: nothing runs, the error stays.
        let (t2, r2) = mpsc::channel::<u64>();
        let r = pool
            .apply_async_with(
                fail,
                4,
                TaskOptions::new().on_success(move |v: &u64| t2.send(*v).unwrap()),
            )
            .unwrap();
        assert!(matches!(r.get(), Err(Error::TaskPanicked { .. })));
        assert!(r2.try_recv().is_err());
        // Only on_error given, and the task succeeds.
        let (t3, r3) = mpsc::channel::<Error>();
        let r = pool
            .apply_async_with(
                square,
                5,
                TaskOptions::new().on_error(move |e: &Error| t3.send(e.clone()).unwrap()),
            )
            .unwrap();
        assert_eq!(r.get().unwrap(), 25);
        assert!(r3.try_recv().is_err());
    })
}

#[test]
fn apply_with_runs_the_callback_and_returns_the_value() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel();
        assert_eq!(pool.apply_with(square, 9, reporting(&tx)).unwrap(), 81);
        assert!(matches!(rx.try_recv(), Ok(Seen::Ok(81))));
        let e = pool.apply_with(fail, 1, reporting(&tx)).unwrap_err();
        assert!(matches!(e, Error::TaskPanicked { .. }));
        assert!(matches!(
            rx.try_recv(),
            Ok(Seen::Err(Error::TaskPanicked { .. }))
        ));
    })
}

#[test]
fn callbacks_run_in_completion_order_not_submission_order() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel();
        let (a, b) = (Gate::new("callbacks"), Gate::new("callbacks"));
        let mk = |label: &'static str| {
            let tx = tx.clone();
            TaskOptions::new().on_success(move |v: &u64| tx.send((label, *v, thread())).unwrap())
        };
        let ra = pool.apply_async_with(gated, (a.key(), 1), mk("a")).unwrap();
        let rb = pool.apply_async_with(gated, (b.key(), 2), mk("b")).unwrap();
        b.open();
        let first = rx.recv_timeout(BOUND).expect("b's callback");
        assert_eq!((first.0, first.1), ("b", 2));
        assert!(!ra.ready(), "a cannot have finished: its gate is shut");
        a.open();
        let second = rx.recv_timeout(BOUND).expect("a's callback");
        assert_eq!((second.0, second.1), ("a", 1));
        assert_results_thread(&[first.2, second.2]);
        assert_eq!(ra.get().unwrap(), 1);
        assert_eq!(rb.get().unwrap(), 2);
    })
}

#[test]
fn callbacks_of_one_worker_come_in_its_order() {
    common::bounded(|| {
        // One worker runs the tasks one after another: they complete, and so
        // their callbacks run, in submission order.
        let pool = pool(1);
        let (tx, rx) = mpsc::channel();
        let rs: Vec<_> = (0..50u64)
            .map(|i| {
                let tx = tx.clone();
                pool.apply_async_with(
                    square,
                    i,
                    TaskOptions::new().on_success(move |v: &u64| tx.send((i, *v)).unwrap()),
                )
                .unwrap()
            })
            .collect();
        for r in rs {
            r.get().unwrap();
        }
        let seen: Vec<(u64, u64)> = rx.try_iter().collect();
        assert_eq!(seen, (0..50u64).map(|i| (i, i * i)).collect::<Vec<_>>());
    })
}

#[test]
fn callbacks_run_one_at_a_time_on_one_thread() {
    common::bounded(|| {
        let pool = pool(3);
        let inside = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let rs: Vec<_> = (0..40u64)
            .map(|i| {
                let (inside, overlaps, tx) = (inside.clone(), overlaps.clone(), tx.clone());
                let f = if i % 4 == 0 { fail } else { square };
                let (inside2, overlaps2, tx2) = (inside.clone(), overlaps.clone(), tx.clone());
                pool.apply_async_with(
                    f,
                    i,
                    TaskOptions::new()
                        .on_success(move |_: &u64| {
                            if inside.swap(true, Ordering::SeqCst) {
                                overlaps.fetch_add(1, Ordering::SeqCst);
                            }
                            std::thread::sleep(Duration::from_millis(2));
                            tx.send(thread()).unwrap();
                            inside.store(false, Ordering::SeqCst);
                        })
                        .on_error(move |_: &Error| {
                            if inside2.swap(true, Ordering::SeqCst) {
                                overlaps2.fetch_add(1, Ordering::SeqCst);
                            }
                            std::thread::sleep(Duration::from_millis(2));
                            tx2.send(thread()).unwrap();
                            inside2.store(false, Ordering::SeqCst);
                        }),
                )
                .unwrap()
            })
            .collect();
        for r in rs {
            r.wait();
        }
        let threads: Vec<_> = rx.try_iter().collect();
        assert_eq!(threads.len(), 40);
        assert_results_thread(&threads);
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "callbacks overlapped");
    })
}

#[test]
fn a_panicking_callback_gives_callback_panicked_and_the_handler_goes_on() {
    common::bounded(|| {
        let pool = pool(2);
        let r = pool
            .apply_async_with(
                square,
                3,
                TaskOptions::new().on_success(|v: &u64| panic!("callback boom {v}")),
            )
            .unwrap();
        r.wait();
        assert_eq!(r.successful(), Some(false));
        match r.get() {
            Err(Error::CallbackPanicked { message, .. }) => {
                assert!(message.contains("callback boom 9"), "{message:?}")
            }
            other => panic!("expected CallbackPanicked, got {other:?}"),
        }
        // on_error panicking, for a failed task.
        let r = pool
            .apply_async_with(
                fail,
                1,
                TaskOptions::new().on_error(|e: &Error| panic!("error callback boom: {e}")),
            )
            .unwrap();
        match r.get() {
            Err(Error::CallbackPanicked { message, .. }) => {
                assert!(message.contains("error callback boom"), "{message:?}")
            }
            other => panic!("expected CallbackPanicked, got {other:?}"),
        }
        // Several panics in a row, then the handler thread still runs callbacks.
        for i in 0..5u64 {
            let r = pool
                .apply_async_with(
                    square,
                    i,
                    TaskOptions::new().on_success(|_: &u64| panic!("again")),
                )
                .unwrap();
            assert!(matches!(r.get(), Err(Error::CallbackPanicked { .. })));
        }
        let (tx, rx) = mpsc::channel();
        let rs: Vec<_> = (0..10u64)
            .map(|i| pool.apply_async_with(square, i, reporting(&tx)).unwrap())
            .collect();
        for (i, r) in rs.into_iter().enumerate() {
            assert_eq!(r.get().unwrap(), (i * i) as u64);
        }
        let mut seen: Vec<u64> = rx
            .try_iter()
            .map(|s| match s {
                Seen::Ok(v) => v,
                Seen::Err(e) => panic!("{e:?}"),
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10u64).map(|i| i * i).collect::<Vec<_>>());
        // And still one handler thread.
        let (t2, r2) = mpsc::channel();
        pool.apply_with(
            square,
            2,
            TaskOptions::new().on_success(move |_: &u64| t2.send(thread()).unwrap()),
        )
        .unwrap();
        assert_results_thread(&[r2.try_recv().unwrap()]);
    })
}

#[test]
fn on_error_sees_cancellation() {
    common::bounded(|| {
        let pool = pool(2);
        let gate = Gate::new("callbacks");
        // Both workers held, so the third task waits in the queue.
        let held: Vec<_> = (0..2u64)
            .map(|i| pool.apply_async(gated, (gate.key(), i)).unwrap())
            .collect();
        let (tx, rx) = mpsc::channel();
        let r = pool.apply_async_with(square, 4, reporting(&tx)).unwrap();
        assert!(r.cancel());
        r.wait();
        assert!(matches!(rx.try_recv(), Ok(Seen::Err(Error::Cancelled))));
        assert!(matches!(r.get(), Err(Error::Cancelled)));
        gate.open();
        for (i, h) in held.into_iter().enumerate() {
            assert_eq!(h.get().unwrap(), i as u64);
        }
        assert!(rx.try_recv().is_err(), "one callback only");
    })
}

#[test]
fn map_async_callbacks() {
    common::bounded(|| {
        let pool = pool(2);
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        let r = pool
            .map_async_with(
                square,
                0..60u64,
                MapOptions::new()
                    .chunksize(7)
                    .on_success(move |v: &Vec<u64>| tx.send(Ok((v.clone(), thread()))).unwrap())
                    .on_error(move |e: &Error| tx2.send(Err(e.clone())).unwrap()),
            )
            .unwrap();
        r.wait();
        let want: Vec<u64> = (0..60u64).map(|x| x * x).collect();
        match rx.try_recv() {
            Ok(Ok((v, t))) => {
                assert_eq!(v, want);
                assert_results_thread(&[t]);
            }
            other => panic!("expected on_success, got {other:?}"),
        }
        assert_eq!(r.get().unwrap(), want);
        assert!(rx.try_recv().is_err());

        // on_error with the first error.
        let (tx, rx) = mpsc::channel();
        let r = pool
            .map_async_with(
                fail,
                5..9u64,
                MapOptions::new()
                    .chunksize(1)
                    .on_success(|_: &Vec<u64>| panic!("on_success for a failed map"))
                    .on_error(move |e: &Error| tx.send(e.clone()).unwrap()),
            )
            .unwrap();
        r.wait();
        match rx.try_recv() {
            Ok(Error::TaskPanicked { message, .. }) => {
                assert!(message.contains("task 5"), "{message:?}")
            }
            other => panic!("expected on_error with TaskPanicked, got {other:?}"),
        }
        assert!(
            matches!(r.get(), Err(Error::TaskPanicked { message, .. }) if message.contains("task 5"))
        );

        // A panicking map callback.
        let r = pool
            .map_async_with(
                square,
                0..10u64,
                MapOptions::new().on_success(|v: &Vec<u64>| panic!("map callback saw {}", v.len())),
            )
            .unwrap();
        r.wait();
        assert_eq!(r.successful(), Some(false));
        match r.get() {
            Err(Error::CallbackPanicked { message, .. }) => {
                assert!(message.contains("map callback saw 10"), "{message:?}")
            }
            other => panic!("expected CallbackPanicked, got {other:?}"),
        }
        // The handler goes on.
        let (tx, rx) = mpsc::channel();
        let v = pool
            .map_async_with(
                square,
                0..3u64,
                MapOptions::new().on_success(move |v: &Vec<u64>| tx.send(v.clone()).unwrap()),
            )
            .unwrap()
            .get()
            .unwrap();
        assert_eq!(v, vec![0, 1, 4]);
        assert_eq!(rx.try_recv().unwrap(), vec![0, 1, 4]);
    })
}

#[test]
fn callbacks_of_many_pools_and_threads() {
    common::bounded(|| {
        // Two pools, each with its own handler thread, used from four threads.
        let p1 = pool(2);
        let p2 = pool(2);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let pool = if t % 2 == 0 { &p1 } else { &p2 };
                let tx = tx.clone();
                s.spawn(move || {
                    for i in 0..25u64 {
                        let tx = tx.clone();
                        let x = t * 100 + i;
                        let r = pool
                            .apply_async_with(
                                square,
                                x,
                                TaskOptions::new().on_success(move |v: &u64| {
                                    tx.send((t % 2, x, *v, thread())).unwrap()
                                }),
                            )
                            .unwrap();
                        assert_eq!(r.get().unwrap(), x * x);
                    }
                });
            }
        });
        let seen: Vec<_> = rx.try_iter().collect();
        assert_eq!(seen.len(), 100);
        for (_, x, v, _) in &seen {
            assert_eq!(*v, x * x);
        }
        for which in 0..2 {
            let threads: Vec<_> = seen
                .iter()
                .filter(|s| s.0 == which)
                .map(|s| s.3.clone())
                .collect();
            assert_eq!(threads.len(), 50);
            assert_results_thread(&threads);
        }
        let a: HashSet<ThreadId> = seen.iter().filter(|s| s.0 == 0).map(|s| s.3.0).collect();
        let b: HashSet<ThreadId> = seen.iter().filter(|s| s.0 == 1).map(|s| s.3.0).collect();
        assert!(a.is_disjoint(&b), "each pool has its own handler thread");
    })
}
