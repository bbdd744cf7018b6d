//! Callbacks: handle each result in the parent as soon as it arrives.
//!
//! Twelve blocking "downloads" (each sleeps, standing in for I/O) run in a
//! pool of four. Each task carries an `on_success` callback, and one that
//! fails carries an `on_error` too. The callbacks run in the parent, on the
//! pool's result-handler thread (`procpool-results`), one at a time, in the
//! order the tasks finish, while the main thread goes on with other work.
//!
//!     cargo run --release --example callback
use procpool::{Error, Pool, TaskOptions};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A pretend download: takes a while, returns the page's size.
fn fetch(page: u32) -> usize {
    // Later pages answer sooner, so completion order differs from submission order.
    std::thread::sleep(Duration::from_millis(100 + 40 * u64::from(12 - page)));
    if page == 7 {
        panic!("connection reset while fetching page {page}");
    }
    1000 + page as usize * 17
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

fn main() -> Result<(), Error> {
    // A task's panic is not printed by its worker: it comes back to the
    // parent as Error::TaskPanicked, and the on_error callback prints it.
    let t = Instant::now();
    let pool = Pool::builder().processes(4).build()?;
    // The callbacks send their findings here; the main thread sums them up.
    let (tx, rx) = mpsc::channel::<usize>();

    let mut pending = Vec::new();
    for page in 1..=12 {
        let tx = tx.clone();
        let opts = TaskOptions::new()
            .on_success(move |size: &usize| {
                println!(
                    "{:>5} ms  [{}] page {page:>2}: {size} bytes",
                    t.elapsed().as_millis(),
                    thread_name()
                );
                tx.send(*size).unwrap();
            })
            .on_error(move |e: &Error| {
                println!(
                    "{:>5} ms  [{}] page {page:>2} failed: {e}",
                    t.elapsed().as_millis(),
                    thread_name()
                );
            });
        pending.push(pool.apply_async_with(fetch, page, opts)?);
    }
    drop(tx);
    println!(
        "{:>5} ms  [{}] twelve fetches submitted; the main thread is free",
        t.elapsed().as_millis(),
        thread_name()
    );

    // The callbacks have already handled every result; the main thread only
    // totals what they sent. The loop ends once every callback (and so every
    // sender) is gone.
    let total: usize = rx.iter().sum();
    // A callback runs before its result becomes ready: wait for each.
    let failed = pending
        .iter()
        .filter(|r| {
            r.wait();
            r.successful() == Some(false)
        })
        .count();
    println!(
        "{:>5} ms  [{}] {total} bytes in all, {failed} page(s) failed",
        t.elapsed().as_millis(),
        thread_name()
    );
    pool.close();
    pool.join()
}
