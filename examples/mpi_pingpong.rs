//! A bare MPI ping-pong between ranks 0 and 1, with the `mpi` crate and no
//! procpool (feature `mpi`): what the MPI transport itself costs, to put
//! beside `mpi_bench`'s figures for a pool on the same ranks.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_pingpong
//! mpirun -n 2 target/release/examples/mpi_pingpong
//! ```
//!
//! Rank 0 sends a message, rank 1 sends it back, and rank 0 checks it.
//! It prints, as `name: value` lines:
//!
//! - `round trip 64 B µs`: one 64-byte message there and back, the floor
//!   under `mpi_bench`'s `apply µs` (a task and its result).
//! - `there and back 1 MiB MiB/s`: 1 MiB messages there and back, counting
//!   both ways, as `mpi_bench`'s `map MiB/s` for 1 MiB items does.
//!
//! Each figure is the median of several timed batches, after a warm-up.
//! Ranks past 1 take no part.
use mpi::traits::*;
use std::process::ExitCode;

/// Timed batches per figure; the median is printed.
const BATCHES: usize = 7;

/// `rounds` round trips of `buf` with `peer`; rank 0 starts each and checks
/// the echo. Returns the seconds it took (rank 0's clock).
fn pingpong<P: Destination + Source>(rank: i32, peer: &P, buf: &mut [u8], rounds: usize) -> f64 {
    let t = mpi::time();
    for round in 0..rounds {
        if rank == 0 {
            let mark = round as u8;
            buf[0] = mark;
            let last = buf.len() - 1;
            buf[last] = mark ^ 0xff;
            peer.send(&buf[..]);
            buf[0] = !mark;
            peer.receive_into(&mut buf[..]);
            assert!(
                buf[0] == mark && buf[last] == mark ^ 0xff,
                "round {round}: the echo differs from the message"
            );
        } else {
            peer.receive_into(&mut buf[..]);
            peer.send(&buf[..]);
        }
    }
    mpi::time() - t
}

/// The median seconds per round trip over `BATCHES` batches of `rounds`,
/// after `warmup` untimed round trips.
fn median_round_trip<P: Destination + Source>(
    rank: i32,
    peer: &P,
    bytes: usize,
    warmup: usize,
    rounds: usize,
) -> f64 {
    let mut buf = vec![0x5au8; bytes];
    pingpong(rank, peer, &mut buf, warmup);
    let mut per_round: Vec<f64> = (0..BATCHES)
        .map(|_| pingpong(rank, peer, &mut buf, rounds) / rounds as f64)
        .collect();
    per_round.sort_by(f64::total_cmp);
    per_round[BATCHES / 2]
}

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("mpi_pingpong: MPI is already initialised");
        return ExitCode::FAILURE;
    };
    let world = universe.world();
    let (rank, size) = (world.rank(), world.size());
    if size < 2 {
        eprintln!(
            "mpi_pingpong needs at least 2 MPI ranks: run it as `mpirun -n 2 {}`",
            std::env::args().next().unwrap_or_default()
        );
        return ExitCode::from(2);
    }
    if rank > 1 {
        return ExitCode::SUCCESS;
    }
    let peer = world.process_at_rank(1 - rank);

    // Where each rank runs: rank 1 sends its host's name to rank 0.
    let here = mpi::environment::processor_name().unwrap_or_else(|_| "?".into());
    let there = if rank == 0 {
        let (name, _) = peer.receive_vec::<u8>();
        String::from_utf8_lossy(&name).into_owned()
    } else {
        peer.send(here.as_bytes());
        String::new()
    };

    let small = median_round_trip(rank, &peer, 64, 2000, 5000);
    let mib = median_round_trip(rank, &peer, 1 << 20, 20, 40);

    if rank == 0 {
        println!("ranks: 0 on {here}, 1 on {there}");
        println!("round trip 64 B µs: {:.1}", small * 1e6);
        println!("one way 64 B µs: {:.1}", small * 1e6 / 2.0);
        // Each round trip moves 1 MiB there and 1 MiB back.
        println!("there and back 1 MiB MiB/s: {:.0}", 2.0 / mib);
        println!("mpi_pingpong: ok");
    }
    ExitCode::SUCCESS
}
