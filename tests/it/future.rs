//! `AsyncResult` and `MapResult` are futures, woken when their task
//! finishes, with no async runtime in the crate: a minimal executor (a
//! thread-parking waker) drives them here.

use crate::common;

use procpool::{Error, Pool};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::Duration;

struct Unpark {
    thread: Thread,
    wakes: AtomicUsize,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Polls every future until all are ready, parking between rounds; returns
/// their outputs in order and how many times the waker was called.
fn join_all<F: Future + Unpin>(mut futs: Vec<F>) -> (Vec<F::Output>, usize) {
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        wakes: AtomicUsize::new(0),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    loop {
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none()
                && let Poll::Ready(v) = Pin::new(f).poll(&mut cx)
            {
                out[i] = Some(v);
            }
        }
        if out.iter().all(Option::is_some) {
            let wakes = unpark.wakes.load(Ordering::SeqCst);
            return (out.into_iter().map(Option::unwrap).collect(), wakes);
        }
        // A spurious unpark only costs another round.
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(20 * (x % 4)));
    x * x
}

fn fails_on_three(x: u64) -> u64 {
    if x == 3 {
        panic!("three is not allowed");
    }
    x + 100
}

#[test]
fn several_results_awaited_at_once() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).build().unwrap();
        let futs: Vec<_> = (0..8)
            .map(|i| pool.apply_async(slow_square, i).unwrap())
            .collect();
        let (values, _) = join_all(futs);
        let values: Vec<u64> = values.into_iter().map(Result::unwrap).collect();
        assert_eq!(values, (0..8).map(|i| i * i).collect::<Vec<_>>());
    })
}

fn gated_value((gate, v): (String, u64)) -> u64 {
    common::wait_for_gate(&gate);
    v
}

/// A future that was pending when polled is woken when its task finishes
/// (the task cannot finish before the first poll: it waits for a gate that
/// the test opens only after that poll).
#[test]
fn a_pending_future_is_woken_when_its_task_finishes() {
    common::bounded(|| {
        let pool = Pool::builder().processes(1).build().unwrap();
        let gate = common::Gate::new("future");
        let mut fut = pool.apply_async(gated_value, (gate.key(), 5)).unwrap();
        let unpark = Arc::new(Unpark {
            thread: std::thread::current(),
            wakes: AtomicUsize::new(0),
        });
        let waker = Waker::from(unpark.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        gate.open();
        let v = loop {
            match Pin::new(&mut fut).poll(&mut cx) {
                Poll::Ready(v) => break v,
                Poll::Pending => std::thread::park_timeout(Duration::from_secs(1)),
            }
        };
        assert_eq!(v.unwrap(), 5);
        assert!(
            unpark.wakes.load(Ordering::SeqCst) >= 1,
            "the waker was never called"
        );
    })
}

#[test]
fn one_of_the_awaited_results_is_an_error() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).build().unwrap();
        let futs: Vec<_> = (0..6)
            .map(|i| pool.apply_async(fails_on_three, i).unwrap())
            .collect();
        let (values, _) = join_all(futs);
        for (i, v) in values.into_iter().enumerate() {
            if i == 3 {
                match v {
                    Err(Error::TaskPanicked { message, .. }) => {
                        assert!(message.contains("three is not allowed"), "{message}")
                    }
                    other => panic!("expected TaskPanicked, got {other:?}"),
                }
            } else {
                assert_eq!(v.unwrap(), i as u64 + 100);
            }
        }
    })
}

#[test]
fn a_map_result_is_a_future_too() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).build().unwrap();
        let futs = vec![
            pool.map_async(slow_square, 0..6).unwrap(),
            pool.map_async(slow_square, 6..9).unwrap(),
        ];
        let (values, _) = join_all(futs);
        assert_eq!(values[0].as_ref().unwrap(), &vec![0, 1, 4, 9, 16, 25]);
        assert_eq!(values[1].as_ref().unwrap(), &vec![36, 49, 64]);
    })
}

#[test]
fn a_future_resolves_when_the_pool_is_terminated() {
    common::bounded(|| {
        let pool = Pool::builder().processes(1).build().unwrap();
        let fut = pool.apply_async(slow_square, 3).unwrap();
        let queued = pool.apply_async(slow_square, 7).unwrap();
        pool.terminate();
        let (values, _) = join_all(vec![fut, queued]);
        for v in values {
            assert!(matches!(v, Err(Error::Terminated)), "{v:?}");
        }
    })
}
