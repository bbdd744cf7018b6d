//! Regressions for failures found in review: many workers at once, a
//! result the caller cannot hold, a panicking `Deserialize` on the
//! result-handler thread.

use crate::common;

use procpool::{Error, MapOptions, Pool, TaskOptions};
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::mpsc;
use std::time::Duration;

fn inc(x: u64) -> u64 {
    x + 1
}

/// Hundreds of workers: more spawn requests than the fork server's socket
/// holds at once (they used to be dropped, and build() hung).
#[test]
fn hundreds_of_workers_start_and_serve() {
    common::bounded(|| {
        let pool = Pool::builder().processes(400).build().unwrap();
        assert_eq!(pool.worker_pids().len(), 400);
        let v = pool
            .map_with(inc, 0..4000u64, MapOptions::new().chunksize(1))
            .unwrap();
        assert_eq!(v, (1..4001).collect::<Vec<_>>());
        pool.close();
        pool.join().unwrap();
    })
}

/// A result type whose `Deserialize` panics on 13 (in the caller's process).
#[derive(Debug, Serialize)]
struct Touchy(u64);

impl<'de> Deserialize<'de> for Touchy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if v == 13 {
            panic!("thirteen cannot be decoded");
        }
        Ok(Touchy(v))
    }
}

fn touchy(x: u64) -> Touchy {
    Touchy(x)
}

/// With callbacks, the result is decoded on the result-handler thread; a
/// panic there resolves that result with an error and the thread goes on.
#[test]
fn a_panicking_deserialize_on_the_handler_thread_resolves_the_result() {
    common::bounded(|| {
        let pool = Pool::builder().processes(1).build().unwrap();
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        let r = pool
            .apply_async_with(
                touchy,
                13,
                TaskOptions::new().on_success(move |_: &Touchy| tx2.send("ok").unwrap()),
            )
            .unwrap();
        assert!(
            r.wait_timeout(Duration::from_secs(30)),
            "the result never resolved"
        );
        match r.get() {
            Err(Error::CallbackPanicked { message, .. }) => {
                assert!(message.contains("thirteen"), "{message}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        // The handler thread still runs callbacks, and on itself.
        let r = pool
            .apply_async_with(
                touchy,
                7,
                TaskOptions::new().on_success(move |t: &Touchy| {
                    assert_eq!(t.0, 7);
                    let name = std::thread::current().name().map(str::to_owned);
                    assert_eq!(name.as_deref(), Some("procpool-results"));
                    tx.send("second").unwrap();
                }),
            )
            .unwrap();
        assert_eq!(r.get().unwrap().0, 7);
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), "second");
    })
}

fn big(n: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![1u8; n])
}

fn vm_size_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A result larger than the caller can allocate resolves with an error
/// (the worker is killed and replaced) instead of leaving the map, and
/// join(), waiting forever. Isolated: it limits this process's memory.
#[test]
fn a_result_too_large_for_the_caller_fails_and_the_pool_goes_on() {
    common::bounded(|| {
        if common::isolated(&test_name!(
            "a_result_too_large_for_the_caller_fails_and_the_pool_goes_on"
        )) {
            return;
        }
        let pool = Pool::builder().processes(1).build().unwrap();
        // Only this process is limited: the workers and the fork server were
        // forked before.
        let limit = vm_size_bytes() + (128 << 20);
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid, initialised struct.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
        let r = pool
            .map_async_with(big, vec![256usize << 20], MapOptions::new().chunksize(1))
            .unwrap();
        assert!(
            r.wait_timeout(Duration::from_secs(60)),
            "the map never resolved"
        );
        assert!(r.get().is_err(), "a 256 MiB result fit under the limit");
        assert_eq!(pool.apply(inc, 1).unwrap(), 2);
        pool.close();
        pool.join().unwrap();
    })
}
