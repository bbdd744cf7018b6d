//! Tasks that carry state (`procpool::Task`, issue 23), and pools built
//! inside a task (nested pools). Every test body runs under a bound
//! (`common::within`), so a hang fails the test instead of hanging it.

use crate::common;

use procpool::{Error, MapOptions, Pool, Sandbox, SharedBuf, StartMethod, Task, TaskOptions};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a test may take before it counts as hung.
const BOUND: Duration = Duration::from_secs(180);

fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::within(what, BOUND, f)
}

/// A task carrying a `String` and a `Vec<f64>`: it reports what it saw,
/// and the pid of the process it ran in.
#[derive(Serialize, Deserialize, Clone)]
struct Probe {
    label: String,
    weights: Vec<f64>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Seen {
    label: String,
    weight: f64,
    sum: f64,
    pid: u32,
}

impl Task for Probe {
    type Arg = usize;
    type Output = Seen;
    fn run(&self, i: usize) -> Seen {
        Seen {
            label: self.label.clone(),
            weight: self.weights[i],
            sum: self.weights.iter().sum(),
            pid: std::process::id(),
        }
    }
}

fn probe() -> Probe {
    Probe {
        label: "a label with ünïcode".to_string(),
        weights: vec![0.5, 1.25, -3.0, 1e10],
    }
}

/// Whether `s` is what `probe().run(i)` gives in another process.
fn check_seen(s: &Seen, i: usize) {
    let p = probe();
    assert_eq!(s.label, p.label);
    assert_eq!(s.weight, p.weights[i]);
    assert_eq!(s.sum, p.weights.iter().sum::<f64>());
    assert_ne!(s.pid, std::process::id(), "the task ran in the caller");
}

/// apply, apply_async, map (in chunks of 1 and of 3), imap and
/// imap_unordered of a [`Probe`] on `pool`.
fn every_way(pool: &Pool) {
    let t = probe();
    check_seen(&pool.apply_task(&t, 1).unwrap(), 1);
    let r = pool.apply_task_async(&t, 3).unwrap();
    check_seen(&r.get().unwrap(), 3);
    let all = pool.map_task(&t, [0, 1, 2, 3]).unwrap();
    assert_eq!(all.len(), 4);
    for (i, s) in all.iter().enumerate() {
        check_seen(s, i);
    }
    let items: Vec<usize> = (0..10).map(|i| i % 4).collect();
    let opts = MapOptions::new().chunksize(3);
    let chunked = pool.map_task_with(&t, items.clone(), opts).unwrap();
    for (s, &i) in chunked.iter().zip(&items) {
        check_seen(s, i);
    }
    let lazy: Vec<Seen> = pool.imap_task(&t, [2, 0]).map(Result::unwrap).collect();
    check_seen(&lazy[0], 2);
    check_seen(&lazy[1], 0);
    let mut any: Vec<f64> = pool
        .imap_unordered_task(&t, [0, 1])
        .map(|s| s.unwrap().weight)
        .collect();
    any.sort_by(f64::total_cmp);
    assert_eq!(any, [0.5, 1.25]);
}

#[test]
fn a_task_sees_its_string_and_vec_in_a_worker() {
    common::bounded(|| {
        within("a task in a plain pool", || every_way(&common::pool(2)));
    })
}

#[test]
fn a_task_sees_its_state_under_either_start_method() {
    within("a task under each start method", || {
        for method in [StartMethod::ForkServer, StartMethod::Fork] {
            let pool = Pool::builder()
                .processes(2)
                .start_method(method)
                .build()
                .unwrap();
            every_way(&pool);
        }
    });
}

#[test]
fn a_task_sees_its_state_in_a_sandboxed_pool() {
    within("a task in a sandboxed pool", || {
        let pool = Pool::builder()
            .processes(2)
            .start_method(StartMethod::ForkServer)
            .sandbox(Sandbox::new())
            .build()
            .expect("building a sandboxed pool");
        every_way(&pool);
    });
}

/// A task that panics on some items: they fail alone.
#[derive(Serialize, Deserialize)]
struct Picky {
    refuse: Vec<u32>,
}

impl Task for Picky {
    type Arg = u32;
    type Output = u32;
    fn run(&self, x: u32) -> u32 {
        assert!(!self.refuse.contains(&x), "refused {x}");
        x * 10
    }
}

#[test]
fn a_task_that_panics_fails_alone_and_callbacks_see_its_value() {
    within("a panicking task", || {
        let pool = common::pool(2);
        let t = Picky { refuse: vec![3] };
        match pool.apply_task(&t, 3) {
            Err(Error::TaskPanicked { message, .. }) => assert_eq!(message, "refused 3"),
            other => panic!("not a panic: {other:?}"),
        }
        let got: Vec<_> = pool
            .imap_task_with(&t, 1..=4, MapOptions::new().chunksize(4))
            .collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].as_ref().unwrap(), &10);
        assert!(matches!(got[2], Err(Error::TaskPanicked { .. })));
        assert_eq!(got[3].as_ref().unwrap(), &40);
        let (tx, rx) = std::sync::mpsc::channel();
        let opts = TaskOptions::new().on_success(move |v: &u32| tx.send(*v).unwrap());
        let r = pool.apply_task_async_with(&t, 5, opts).unwrap();
        assert_eq!(r.get().unwrap(), 50);
        assert_eq!(rx.recv_timeout(BOUND).unwrap(), 50);
    });
}

/// A task whose state holds a `SharedBuf`: it belongs in the argument.
#[derive(Serialize, Deserialize)]
struct HoldsBuf {
    buf: SharedBuf,
}

impl Task for HoldsBuf {
    type Arg = u8;
    type Output = u8;
    fn run(&self, x: u8) -> u8 {
        x
    }
}

#[test]
fn a_state_that_cannot_be_encoded_fails_the_map_with_encode() {
    common::bounded(|| {
        within("a state that cannot be encoded", || {
            let pool = common::pool(1);
            let t = HoldsBuf {
                buf: SharedBuf::new(16).unwrap(),
            };
            let is_task_encode = |e: &Error| matches!(e, Error::Encode { what: "task", .. });
            let e = pool.map_task(&t, [1, 2]).unwrap_err();
            assert!(is_task_encode(&e), "{e:?}");
            let got: Vec<_> = pool.imap_task(&t, [1, 2, 3]).collect();
            assert_eq!(got.len(), 3);
            assert!(got.iter().all(|r| r.as_ref().is_err_and(is_task_encode)));
            // The pool is unharmed.
            assert_eq!(pool.map_task(&Picky { refuse: vec![] }, [1])?, vec![10]);
            Ok::<(), Error>(())
        })
        .unwrap();
    })
}

// ---- nested pools ----

/// Which start method a nested pool uses (StartMethod is not serde).
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
enum Method {
    ForkServer,
    Fork,
}

/// A task that builds a pool of its own and maps over it: the sum of
/// the squares of `items`, with the pids of the inner workers.
#[derive(Serialize, Deserialize)]
struct Nested {
    method: Method,
    items: Vec<u64>,
}

fn square(x: u64) -> u64 {
    x * x
}

impl Task for Nested {
    type Arg = u64;
    type Output = Result<(u64, Vec<u32>), String>;
    fn run(&self, offset: u64) -> Self::Output {
        let method = match self.method {
            Method::ForkServer => StartMethod::ForkServer,
            Method::Fork => StartMethod::Fork,
        };
        let pool = Pool::builder()
            .processes(2)
            .start_method(method)
            .build()
            .map_err(|e| e.to_string())?;
        let squares = pool
            .map(square, self.items.clone())
            .map_err(|e| e.to_string())?;
        let shifted = pool
            .map_task(&Picky { refuse: vec![] }, [offset as u32])
            .map_err(|e| e.to_string())?;
        let pids = pool.worker_pids();
        Ok((squares.iter().sum::<u64>() + shifted[0] as u64, pids))
    }
}

fn nested_in(outer: &Pool, method: Method) {
    let t = Nested {
        method,
        items: (1..=10).collect(),
    };
    let (sum, inner) = outer.apply_task(&t, 1).unwrap().unwrap_or_else(|e| {
        panic!("a nested pool ({method:?}) failed: {e}");
    });
    assert_eq!(sum, 385 + 10, "{method:?}");
    assert_eq!(inner.len(), 2);
    let outer_pids = outer.worker_pids();
    assert!(inner.iter().all(|p| !outer_pids.contains(p)), "{method:?}");
}

#[test]
fn a_nested_pool_under_forkserver_computes_the_right_answer() {
    within("a nested ForkServer pool", || {
        for outer in [StartMethod::ForkServer, StartMethod::Fork] {
            let pool = Pool::builder()
                .processes(1)
                .start_method(outer)
                .build()
                .unwrap();
            nested_in(&pool, Method::ForkServer);
        }
    });
}

#[test]
fn a_nested_pool_under_fork_computes_the_right_answer() {
    within("a nested Fork pool", || {
        for outer in [StartMethod::ForkServer, StartMethod::Fork] {
            let pool = Pool::builder()
                .processes(1)
                .start_method(outer)
                .build()
                .unwrap();
            nested_in(&pool, Method::Fork);
        }
    });
}

#[test]
fn the_global_pool_stays_refused_in_a_worker() {
    common::bounded(|| {
        fn try_global(_: ()) -> bool {
            matches!(procpool::global(), Err(Error::InWorker))
        }
        within("global() in a worker", || {
            assert!(common::pool(1).apply(try_global, ()).unwrap());
        });
    })
}

#[test]
fn a_nested_pool_in_a_sandboxed_worker_names_the_sandbox() {
    within("a nested pool in a sandbox", || {
        let pool = Pool::builder()
            .processes(1)
            .start_method(StartMethod::ForkServer)
            .sandbox(Sandbox::new())
            .build()
            .expect("building a sandboxed pool");
        for method in [Method::ForkServer, Method::Fork] {
            let t = Nested {
                method,
                items: vec![1],
            };
            let e = pool.apply_task(&t, 0).unwrap().unwrap_err();
            assert!(e.contains("sandbox"), "{method:?}: {e}");
            assert!(!e.contains("constructor"), "{method:?}: {e}");
        }
    });
}
