//! `SharedBuf`s over MPI (feature `mpi`): shared memory ends at the
//! machine, so a buffer is copied into the messages each way and arrives as
//! a new buffer; the task's writes come back all the same.
//!
//! ```text
//! mpirun -n 3 target/release/examples/mpi_shared
//! ```
use procpool::{Pool, SharedBuf, SharedSlice};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Job {
    id: u32,
    data: SharedSlice<u32>,
}

/// Adds the job's id to every element, in place, and makes a new buffer.
fn work(mut job: Job) -> (Job, SharedBuf) {
    for x in job.data.as_mut_slice() {
        *x += job.id;
    }
    let made = SharedBuf::from_slice(&[job.id as u8; 3]).expect("a new buffer on the rank");
    (job, made)
}

fn run() -> Result<(), String> {
    // Build first: ranks >= 1 serve from here on and never return.
    let pool = Pool::builder().mpi().build().map_err(|e| e.to_string())?;
    let jobs: Vec<Job> = (0..20u32)
        .map(|id| {
            let data = SharedSlice::from_slice(&vec![id; 100_000]).map_err(|e| e.to_string())?;
            Ok(Job { id, data })
        })
        .collect::<Result<_, String>>()?;
    let out = pool.map(work, jobs).map_err(|e| e.to_string())?;
    for (id, (job, made)) in (0..20u32).zip(&out) {
        if job.id != id || job.data.as_slice().iter().any(|&x| x != 2 * id) {
            return Err(format!("job {id} came back wrong"));
        }
        if made.to_vec() != [id as u8; 3] {
            return Err(format!("job {id}: the rank's new buffer came back wrong"));
        }
    }
    // A big one, through apply (its bytes go inline, past the block size).
    let big = SharedSlice::from_slice(&vec![1u32; 1 << 20]).map_err(|e| e.to_string())?;
    let (job, _) = pool
        .apply(work, Job { id: 5, data: big })
        .map_err(|e| e.to_string())?;
    if job.data.len() != 1 << 20 || job.data.as_slice().iter().any(|&x| x != 6) {
        return Err("the 4 MiB buffer came back wrong".into());
    }
    pool.close();
    pool.join().map_err(|e| e.to_string())?;
    println!("mpi_shared: ok (21 tasks' SharedBufs copied to the ranks and back)");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("mpi_shared: {e}");
        std::process::exit(1);
    }
}
