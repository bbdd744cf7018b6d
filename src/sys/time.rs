//! The monotonic clock, as nanoseconds that other processes can compare,
//! and a process's CPU clock.

/// CLOCK_MONOTONIC in nanoseconds (the clock `Instant` reads on Linux).
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: ts is a plain-data out-parameter for clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A clock id of `clock_gettime` (a process's CPU clock, say).
pub(crate) type CpuClock = libc::clockid_t;

/// The clock that counts the CPU time of every thread of process `pid`.
pub(crate) fn process_cpu_clock(pid: u32) -> Option<CpuClock> {
    let mut clk: libc::clockid_t = 0;
    // SAFETY: clk is a valid out-pointer.
    let r = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clk) };
    (r == 0).then_some(clk)
}

/// Reads a clock, in nanoseconds (`None` once its process is gone).
pub(crate) fn clock_ns(clk: CpuClock) -> Option<u64> {
    // SAFETY: ts is a plain-data out-parameter for clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a clock id and a valid out-pointer.
    let r = unsafe { libc::clock_gettime(clk, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}
