//! Awaiting results: `AsyncResult` and `MapResult` are futures.
//!
//! The pool is built first, in plain `main`, and the tokio runtime after it:
//! the pool forks its fork server when it is built, and a fork is simplest
//! while the program has one thread. Inside the runtime, several results
//! are awaited at once with `tokio::join!` (one of them a task that panics),
//! results are handed to spawned tokio tasks through a `JoinSet` (an
//! `AsyncResult` is `Send`), and a slow task is given up on with
//! `tokio::time::timeout` and then cancelled.
//!
//!     cargo run --release --example async_await
use procpool::{Error, Pool};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    x * x
}

fn checked_div((a, b): (i64, i64)) -> i64 {
    if b == 0 {
        panic!("division of {a} by zero");
    }
    a / b
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A task's panic is not printed by its worker; the error is printed below.
    let pool = Pool::builder().processes(4).build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()?;
    runtime.block_on(run(&pool))?;
    pool.close();
    pool.join()?;
    Ok(())
}

async fn run(pool: &Pool) -> Result<(), Error> {
    let t = Instant::now();

    // Three tasks at once; the second one panics in its worker.
    let (a, b, c) = tokio::join!(
        pool.apply_async(slow_square, 7)?,
        pool.apply_async(checked_div, (1, 0))?,
        pool.map_async(slow_square, 1..=4)?,
    );
    println!("tokio::join! of three results after {:.2?}:", t.elapsed());
    println!("  slow_square(7)             = {a:?}");
    println!("  checked_div((1, 0))        = {b:?}");
    println!("  map_async(slow_square, ..) = {c:?}");
    assert!(matches!(b, Err(Error::TaskPanicked { .. })));

    // An AsyncResult is a Send future: it can be spawned as a tokio task.
    let t = Instant::now();
    let mut set = JoinSet::new();
    for ms in [300, 100, 200] {
        set.spawn(pool.apply_async(sleep_ms, ms)?);
    }
    print!("JoinSet, in the order they finish:");
    while let Some(joined) = set.join_next().await {
        let ms = joined.expect("the tokio task ran")?;
        print!(" {ms} ms task at {:.0?};", t.elapsed());
    }
    println!();

    // Give up on a slow task after 100 ms, then cancel it: its worker is
    // killed and replaced, and the result resolves with Error::Cancelled.
    let mut r = pool.apply_async(sleep_ms, 10_000)?;
    match tokio::time::timeout(Duration::from_millis(100), &mut r).await {
        Ok(v) => println!("unexpected: {v:?}"),
        Err(_) => {
            let cancelled = r.cancel();
            println!(
                "gave up after 100 ms; cancel() = {cancelled}; the result: {:?}",
                r.await
            );
        }
    }
    Ok(())
}
