//! A pool against a process per task.
//!
//! `map` of an increment over 100 numbers through a pool of 5 workers (the
//! time includes starting the pool), against 100 processes started one per
//! task and then joined, as with Python's `Process(target=...)`. Each of
//! those processes is this very program, run again with `--one N`: it
//! computes one increment, prints it and exits.
//!
//!     cargo run --release --example pool_vs_process
use procpool::Pool;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const N: u64 = 100;

fn increment(x: u64) -> u64 {
    x + 1
}

/// The child's side of the comparison: one increment, printed.
fn one(arg: &str) {
    let x: u64 = arg.parse().expect("--one takes a number");
    println!("{}", increment(x));
}

fn with_pool() -> Result<(Vec<u64>, Duration), procpool::Error> {
    let t = Instant::now();
    let pool = Pool::builder().processes(5).build()?;
    let values = pool.map(increment, 0..N)?;
    pool.close();
    pool.join()?;
    Ok((values, t.elapsed()))
}

fn with_processes() -> std::io::Result<(Vec<u64>, Duration)> {
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    // Start them all, then join them all.
    let children = (0..N)
        .map(|x| {
            Command::new(&exe)
                .arg("--one")
                .arg(x.to_string())
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut values = Vec::with_capacity(N as usize);
    for child in children {
        let out = child.wait_with_output()?;
        assert!(out.status.success(), "a child failed: {}", out.status);
        let text = String::from_utf8_lossy(&out.stdout);
        values.push(text.trim().parse().expect("a child printed a number"));
    }
    Ok((values, t.elapsed()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, x] = args.as_slice()
        && flag == "--one"
    {
        one(x);
        return Ok(());
    }

    let (a, pool_time) = with_pool()?;
    let (b, proc_time) = with_processes()?;
    assert_eq!(a, b);
    assert_eq!(a, (1..=N).collect::<Vec<_>>());

    println!("{N} increments, the same values both ways");
    println!("  Pool of 5, map (start-up included): {pool_time:>10.3?}");
    println!("  {N} processes, one per task:        {proc_time:>10.3?}");
    println!(
        "  the processes took {:.1}x as long",
        proc_time.as_secs_f64() / pool_time.as_secs_f64()
    );
    Ok(())
}
