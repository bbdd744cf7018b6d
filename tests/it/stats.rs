//! `Pool::stats`: its counters match, exactly, a run with a known mix of
//! outcomes.

use crate::common;

use procpool::{Error, MapOptions, Pool, TaskOptions};
use std::time::Duration;

const BOUND: Duration = Duration::from_secs(180);

fn double(x: u64) -> u64 {
    2 * x
}

fn panics(_: ()) -> u64 {
    panic!("on purpose")
}

fn aborts(_: ()) -> u64 {
    std::process::abort()
}

fn naps(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Says it started (a file), then waits long.
fn starts_then_waits(path: String) -> u64 {
    common::write_pid(&path);
    std::thread::sleep(Duration::from_secs(60));
    0
}

/// Aborts the first time (no marker yet), succeeds the second.
fn aborts_once(path: String) -> u64 {
    if std::fs::metadata(&path).is_err() {
        std::fs::write(&path, b"x").unwrap();
        std::process::abort();
    }
    1
}

#[test]
fn the_counters_match_a_known_mix_of_outcomes() {
    common::within("the stats test", BOUND, || {
        let pool = Pool::builder().processes(2).build().unwrap();
        for i in 0..5 {
            assert_eq!(pool.apply(double, i).unwrap(), 2 * i);
        }
        for _ in 0..2 {
            assert!(matches!(
                pool.apply(panics, ()),
                Err(Error::TaskPanicked { .. })
            ));
        }
        assert!(matches!(
            pool.apply(aborts, ()),
            Err(Error::WorkerLost { .. })
        ));
        let timed = TaskOptions::new().timeout(Duration::from_millis(200));
        assert!(matches!(
            pool.apply_with(naps, 20_000, timed),
            Err(Error::Timeout { .. })
        ));
        let started = common::TempPath::new("stats-started");
        let r = pool
            .apply_async(starts_then_waits, started.string())
            .unwrap();
        assert!(common::eventually(|| started.exists()));
        assert!(r.cancel());
        assert!(matches!(r.get(), Err(Error::Cancelled)));
        let marker = common::TempPath::new("stats-retry");
        let once = TaskOptions::new().retries(1);
        assert_eq!(
            pool.apply_with(aborts_once, marker.string(), once).unwrap(),
            1
        );
        let items: Vec<u64> = (0..10).collect();
        let chunks = MapOptions::new().chunksize(3);
        assert_eq!(pool.map_with(double, items, chunks).unwrap().len(), 10);

        // The killed workers' ends are reported after the cancel's answer.
        assert!(common::eventually(|| pool.stats().workers_ended.cancelled
            == 1
            && pool.stats().workers_started == 6));
        let s = pool.stats();
        assert_eq!(s.submitted, 5 + 2 + 1 + 1 + 1 + 1 + 4);
        assert_eq!(s.completed, 5 + 1 + 4);
        let f = &s.failed;
        assert_eq!(
            (
                f.panicked,
                f.worker_lost,
                f.timed_out,
                f.cancelled,
                f.total()
            ),
            (2, 1, 1, 1, 5)
        );
        assert_eq!(s.retried, 1);
        assert_eq!((s.map_chunks, s.map_items), (4, 10));
        let e = &s.workers_ended;
        assert_eq!(
            (
                e.crashed,
                e.timed_out,
                e.cancelled,
                e.retired,
                e.limit_exceeded
            ),
            (2, 1, 1, 0, 0)
        );
        assert_eq!((s.queued, s.in_flight), (0, 0));
        assert!(s.busy.len() >= 4);
        // The timed-out and cancelled tasks' time is not reported; the
        // naps that finished are.
        assert!(s.busy.iter().any(|d| !d.is_zero()));
        pool.close();
        pool.join().unwrap();
        let after = pool.stats();
        assert_eq!(after.workers_ended.retired, 2, "close retires both");
        assert_eq!(after.submitted, after.completed + after.failed.total());
    });
}

#[test]
fn terminate_counts_what_it_fails() {
    common::within("stats after terminate", BOUND, || {
        let pool = Pool::builder().processes(1).build().unwrap();
        let rs: Vec<_> = (0..3)
            .map(|_| pool.apply_async(naps, 20_000).unwrap())
            .collect();
        pool.terminate();
        for r in rs {
            assert!(matches!(r.get(), Err(Error::Terminated)));
        }
        let s = pool.stats();
        assert_eq!((s.submitted, s.failed.terminated, s.completed), (3, 3, 0));
    });
}
