//! The pool in one screen: apply, apply_async, map, imap, a callback, a
//! panicking task, a crashing worker, close and join.
use procpool::{Error, Pool, TaskOptions};
use std::time::Instant;

fn square(x: u64) -> u64 {
    x * x
}

fn add((a, b): (i64, i64)) -> i64 {
    a + b
}

fn whoami(_: ()) -> u32 {
    std::process::id()
}

fn fails(x: u32) -> u32 {
    if x == 3 {
        panic!("three is right out");
    }
    x
}

fn crash(_: ()) {
    std::process::abort();
}

fn main() -> Result<(), Error> {
    let t = Instant::now();
    let pool = Pool::new()?;
    println!(
        "started {} workers in {:?}: {:?}",
        pool.processes(),
        t.elapsed(),
        pool.worker_pids()
    );

    println!("apply(square, 12) = {}", pool.apply(square, 12)?);

    let pending: Vec<_> = (0..10)
        .map(|i| pool.apply_async(square, i))
        .collect::<Result<_, _>>()?;
    let values: Vec<u64> = pending
        .into_iter()
        .map(|r| r.get())
        .collect::<Result<_, _>>()?;
    println!("10 x apply_async then get: {values:?}");

    println!("map(square, 1..=10) = {:?}", pool.map(square, 1..=10)?);
    println!(
        "starmap via a tuple: {:?}",
        pool.map(add, vec![(1, 2), (3, 4), (5, 6)])?
    );

    let first: Vec<u64> = pool.imap(square, 0..).take(5).collect::<Result<_, _>>()?;
    println!("imap over an endless input, first 5: {first:?}");

    let r = pool.apply_async_with(
        whoami,
        (),
        TaskOptions::new().on_success(|pid: &u32| {
            println!(
                "  callback on thread {:?}: the task ran in worker {pid}",
                std::thread::current().name().unwrap_or("?")
            )
        }),
    )?;
    r.get()?;

    match pool.apply(fails, 3) {
        Err(e) => println!("a panicking task: {e}"),
        Ok(v) => println!("unexpected: {v}"),
    }
    let before = pool.worker_pids();
    match pool.apply(crash, ()) {
        Err(e) => println!("a task that aborts its worker: {e}"),
        Ok(()) => println!("unexpected success"),
    }
    println!("workers before {before:?}, after {:?}", pool.worker_pids());
    println!(
        "the pool goes on: apply(square, 7) = {}",
        pool.apply(square, 7)?
    );

    pool.close();
    pool.join()?;
    println!("closed and joined in {:?} overall", t.elapsed());
    Ok(())
}
