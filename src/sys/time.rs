//! The monotonic clock, as nanoseconds that other processes can compare.

/// CLOCK_MONOTONIC in nanoseconds (the clock `Instant` reads on Linux).
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: ts is a plain-data out-parameter for clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
