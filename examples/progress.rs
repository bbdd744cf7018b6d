//! Progress bars for long maps.
//!
//! A `map_async` over thousands of items, with an [indicatif] bar that the
//! main thread moves from [`MapResult::progress`] while the pool works;
//! then an `imap`, which is an ordinary iterator, so indicatif's
//! `ProgressIterator` wraps it as it would any other.
//!
//! indicatif draws on stderr, and only when stderr is a terminal; each bar
//! is cleared when it is done, and a summary line goes to stdout.
//!
//!     cargo run --release --example progress
//!
//! [indicatif]: https://docs.rs/indicatif
use indicatif::{ProgressBar, ProgressFinish, ProgressIterator, ProgressStyle};
use procpool::{MapOptions, Pool};
use std::time::{Duration, Instant};

const ITEMS: u64 = 4_000;

/// A small piece of work: about a millisecond of sleeping and some arithmetic.
fn simulate(seed: u64) -> u64 {
    std::thread::sleep(Duration::from_micros(800));
    (0..1_000u64).fold(seed, |h, i| h.rotate_left(5) ^ i.wrapping_mul(0x9E37_79B9))
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{msg:>5} [{bar:40}] {pos}/{len} ({percent}%) eta {eta}")
        .expect("a valid template")
        .progress_chars("=> ")
}

fn main() -> Result<(), procpool::Error> {
    let pool = Pool::builder().processes(4).build()?;

    // map_async: the map runs while this thread polls its progress. Chunks
    // of 20 items: progress() counts finished items, a chunk at a time.
    let t = Instant::now();
    let r = pool.map_async_with(simulate, 0..ITEMS, MapOptions::new().chunksize(20))?;
    let bar = ProgressBar::new(ITEMS)
        .with_style(style())
        .with_message("map");
    while !r.wait_timeout(Duration::from_millis(50)) {
        bar.set_position(r.progress().0 as u64);
    }
    let (done, total) = r.progress();
    bar.set_position(done as u64);
    bar.finish_and_clear();
    let values = r.get()?;
    println!(
        "map_async: {} values in {:.2?} (progress() at the end: {done} of {total})",
        values.len(),
        t.elapsed(),
    );

    // imap: lazy, in input order; the bar advances as each result is taken.
    let t = Instant::now();
    let bar = ProgressBar::new(ITEMS)
        .with_style(style())
        .with_message("imap")
        .with_finish(ProgressFinish::AndClear);
    let again: Vec<u64> = pool
        .imap(simulate, 0..ITEMS)
        .progress_with(bar)
        .collect::<Result<_, _>>()?;
    println!("imap:      {} values in {:.2?}", again.len(), t.elapsed());
    assert_eq!(values, again);

    pool.close();
    pool.join()
}
