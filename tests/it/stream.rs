//! `imap` and `imap_unordered` as async streams: read on a current-thread
//! runtime whose thread stays free for other tasks, spawned (a `Send`
//! input makes them `Send`), and cancelled when dropped mid-way.

use crate::common;

use crate::common::{Gate, TempPath, pool};

use futures_core::Stream;
use procpool::MapOptions;
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(180);

/// The next item of a stream (what `futures::StreamExt::next` does).
async fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// Doubles; waits for the gate first if it has one.
fn double_after_gate((x, gate): (u64, Option<String>)) -> u64 {
    if let Some(g) = gate {
        common::wait_for_gate(&g);
    }
    x * 2
}

fn square(x: u64) -> u64 {
    x * x
}

/// Item 0 returns at once; any other sleeps 30 s (far longer than the
/// test takes if it is cancelled), then leaves a marker `{base}-{x}`.
fn marks_after_a_long_sleep((x, base): (u64, String)) -> u64 {
    if x > 0 {
        std::thread::sleep(Duration::from_secs(30));
        std::fs::write(format!("{base}-{x}"), b"ran to the end").expect("writing a marker");
    }
    x
}

/// A ticking task on the same thread opens the gate that the stream's
/// first item waits for: the stream can only end if the runtime's thread
/// was free while it waited.
#[test]
fn an_imap_stream_leaves_its_thread_to_other_tasks() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let gate = Arc::new(Gate::new("stream-ticker"));
        let key = gate.key();
        let items = (0..100_000u64).map(move |x| (x, (x == 0).then(|| key.clone())));
        let mut stream =
            pool.imap_with(double_after_gate, items, MapOptions::new().chunksize(1000));
        let ticks = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s, g) = (ticks.clone(), stop.clone(), gate.clone());
        let (count, ticker_thread) = runtime().block_on(async move {
            let ticker = tokio::spawn(async move {
                while !s.load(Ordering::SeqCst) {
                    if t.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                        g.open();
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                std::thread::current().id()
            });
            let mut count = 0u64;
            while let Some(r) = next(&mut stream).await {
                assert_eq!(r.unwrap(), 2 * count, "item {count}");
                count += 1;
            }
            // Stop the ticker and learn which thread it ran on.
            stop.store(true, Ordering::SeqCst);
            (count, ticker.await.unwrap())
        });
        assert_eq!(count, 100_000);
        assert!(
            ticks.load(Ordering::SeqCst) >= 3,
            "the ticker never opened the gate"
        );
        assert_eq!(ticker_thread, std::thread::current().id());
    })
}

/// `imap_unordered` as a stream, spawned: a `Send + 'static` input makes
/// the stream `Send + 'static`.
#[test]
fn an_imap_unordered_stream_can_be_spawned() {
    common::bounded_for(BOUND, || {
        let pool = pool(2);
        let mut stream =
            pool.imap_unordered_with(square, 0..2000u64, MapOptions::new().chunksize(7));
        let rt = runtime();
        let got = rt
            .block_on(rt.spawn(async move {
                let mut got = Vec::new();
                while let Some(r) = next(&mut stream).await {
                    got.push(r.unwrap());
                }
                // Done stays done.
                assert!(next(&mut stream).await.is_none());
                got
            }))
            .unwrap();
        assert_eq!(got.len(), 2000);
        let got: HashSet<u64> = got.into_iter().collect();
        assert_eq!(got, (0..2000u64).map(|x| x * x).collect());

        let mut ordered = pool.imap(square, vec![3u64, 4]);
        let got = rt
            .block_on(rt.spawn(async move { (next(&mut ordered).await, next(&mut ordered).await) }))
            .unwrap();
        assert_eq!((got.0.unwrap().unwrap(), got.1.unwrap().unwrap()), (9, 16));
    })
}

/// Takes the first item of a stream, drops it, then closes and joins the
/// pool: join lets every task that was not cancelled run to its end.
/// Returns how many were pulled and which of those left their marker.
fn drop_mid_stream(unordered: bool) -> (usize, Vec<u64>) {
    let pool = pool(2);
    let base = TempPath::new(if unordered { "drop-unordered" } else { "drop" });
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = pulled.clone();
    let b = base.string();
    let items = (0..1000u64).map(move |x| {
        p.fetch_add(1, Ordering::SeqCst);
        (x, b.clone())
    });
    let opts = || MapOptions::new().in_flight(4);
    runtime().block_on(async {
        if unordered {
            let mut s = pool.imap_unordered_with(marks_after_a_long_sleep, items, opts());
            assert_eq!(next(&mut s).await.unwrap().unwrap(), 0);
        } else {
            let mut s = pool.imap_with(marks_after_a_long_sleep, items, opts());
            assert_eq!(next(&mut s).await.unwrap().unwrap(), 0);
        }
    });
    pool.close();
    pool.join().unwrap();
    let n = pulled.load(Ordering::SeqCst);
    let ran = (1..n as u64)
        .filter(|x| std::path::Path::new(&format!("{}-{x}", base.string())).exists())
        .collect();
    for x in 1..n {
        let _ = std::fs::remove_file(format!("{}-{x}", base.string()));
    }
    (n, ran)
}

#[test]
fn dropping_a_stream_mid_way_cancels_what_is_in_flight() {
    common::bounded_for(BOUND, || {
        for unordered in [false, true] {
            let (pulled, ran) = drop_mid_stream(unordered);
            assert!(
                pulled >= 2,
                "unordered {unordered}: only {pulled} pulled, nothing was in flight"
            );
            assert!(
                ran.is_empty(),
                "unordered {unordered}: cancelled tasks ran to their end: {ran:?} of {pulled} pulled"
            );
        }
    })
}
