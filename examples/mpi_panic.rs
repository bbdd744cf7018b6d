//! A task that panics on an MPI rank fails alone with `TaskPanicked`, and
//! the pool goes on (feature `mpi`).
//!
//! ```text
//! mpirun -n 3 target/release/examples/mpi_panic
//! ```
use procpool::{Error, Pool};

fn touchy(x: u32) -> u32 {
    if x % 5 == 3 {
        panic!("task {x} panics on purpose");
    }
    x * 2
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let pool = Pool::builder().mpi().build().map_err(|e| e.to_string())?;
    // A synchronous task that panics.
    match pool.apply(touchy, 3) {
        Err(Error::TaskPanicked { message, .. }) if message.contains("task 3 panics") => {}
        other => return Err(format!("apply(touchy, 3) gave {other:?}")),
    }
    // Asynchronous ones, some of which panic.
    let pending: Vec<_> = (0..20u32)
        .map(|x| pool.apply_async(touchy, x).map(|r| (x, r)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut panics = 1;
    for (x, r) in pending {
        match (x % 5 == 3, r.get()) {
            (false, Ok(v)) if v == x * 2 => {}
            (true, Err(Error::TaskPanicked { .. })) => panics += 1,
            (_, other) => return Err(format!("apply_async(touchy, {x}) gave {other:?}")),
        }
    }
    // imap gives each item its own outcome.
    for (x, r) in (0..10u32).zip(pool.imap(touchy, 0..10u32)) {
        match (x % 5 == 3, r) {
            (false, Ok(v)) if v == x * 2 => {}
            (true, Err(Error::TaskPanicked { .. })) => panics += 1,
            (_, other) => return Err(format!("imap item {x} gave {other:?}")),
        }
    }
    // The job goes on: the same workers still serve.
    let doubled = pool
        .map(touchy, (0..1000u32).filter(|x| x % 5 != 3))
        .map_err(|e| e.to_string())?;
    if doubled
        .iter()
        .zip((0..1000u32).filter(|x| x % 5 != 3))
        .any(|(v, x)| *v != x * 2)
    {
        return Err("map after the panics gave wrong values".into());
    }
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    println!("mpi_panic: ok ({panics} panicking tasks failed alone; the pool went on)");
    Ok(())
}

fn main() {
    // Keep the ranks' panic messages to one line each.
    std::panic::set_hook(Box::new(|info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("?");
        eprintln!("(pid {}: a task panicked: {msg})", std::process::id());
    }));
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mpi_panic: {e}");
            1
        }
    };
    std::process::exit(code)
}
