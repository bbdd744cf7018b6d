//! Helpers that the MPI crash-isolation examples share (`mpi_crash`,
//! `mpi_timeout`, `mpi_cancel`, `mpi_chaos`), included with
//! `#[path = "support/mpi_ranks.rs"] mod ranks;`. Not an example itself:
//! this directory has no `main.rs`, so cargo does not build it as one.
//!
//! The central question these examples ask is "which rank ran that, and is
//! every rank still serving?". A task answers it from inside its worker
//! (`whoami`): the worker is a process forked on the rank's host, so it
//! walks up its ancestors to the rank's own process and reads the rank
//! from the launcher's variables in that process's environment (the
//! rank's fork server is started without them). Rank 0 then checks the
//! answers against what the pool says (`Pool::worker_pids`, the `rank` in
//! `Error::WorkerLost` and `Error::Timeout`).
#![allow(dead_code)] // each example uses a part of this

use procpool::Pool;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Workers each worker rank hosts in these examples: small, so that CI on
/// two cores stays light, and more than one, so that a lost worker is
/// replaced beside one that keeps serving.
pub const WORKERS_PER_RANK: usize = 2;

/// The launcher's variables that hold a process's rank: Open MPI's, PMI's
/// and PMIx's (as `srun --mpi=pmix` sets them), and Slurm's task id.
const RANK_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_RANK",
    "PMIX_RANK",
    "PMI_RANK",
    "SLURM_PROCID",
];
/// The same for the number of ranks.
const SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"];

/// One of `vars` in the environment `environ` (NUL-separated `KEY=VALUE`,
/// as in `/proc/PID/environ`), parsed as a number.
fn lookup(environ: &[u8], vars: &[&str]) -> Option<usize> {
    vars.iter().find_map(|var| {
        environ.split(|&b| b == 0).find_map(|entry| {
            let value = entry.strip_prefix(var.as_bytes())?.strip_prefix(b"=")?;
            std::str::from_utf8(value).ok()?.parse().ok()
        })
    })
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the
/// command name, which is in parentheses and may hold anything).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The MPI rank this process belongs to: its own, or that of the nearest
/// ancestor that the launcher started as a rank (a worker is a grandchild
/// of its rank's process, through the rank's fork server). `None` if no
/// ancestor up to init has a rank variable.
pub fn my_rank() -> Option<usize> {
    let mut pid = std::process::id();
    for _ in 0..16 {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if let Some(rank) = lookup(&env, &RANK_VARS) {
            return Some(rank);
        }
        pid = parent_of(pid)?;
        if pid <= 1 {
            return None;
        }
    }
    None
}

/// This host's name (each simulated host of `.ci/mpi-hosts.sh` has its own).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Who ran a task: the rank (if it could be told), the worker's pid on
/// its host, and the host's name.
pub type Who = (Option<usize>, u32, String);

/// The task behind every census: sleeps `ms` (so that one worker cannot
/// take a whole round), then says who ran it.
pub fn whoami(ms: u64) -> Who {
    std::thread::sleep(Duration::from_millis(ms));
    (my_rank(), std::process::id(), hostname())
}

/// The number of ranks in the job, from rank 0's launcher variables.
pub fn world_size() -> Result<usize, String> {
    let env =
        std::fs::read("/proc/self/environ").map_err(|e| format!("/proc/self/environ: {e}"))?;
    lookup(&env, &SIZE_VARS).ok_or_else(|| {
        format!(
            "cannot tell the number of ranks: none of {} is set",
            SIZE_VARS.join(", ")
        )
    })
}

/// What a census found: each worker pid that answered and the rank it
/// answered from (a pid could repeat on several hosts, hence a set), and
/// each rank's pids.
#[derive(Debug, Default)]
pub struct Census {
    pub rank_of: HashMap<u32, BTreeSet<usize>>,
    pub pids_of: BTreeMap<usize, BTreeSet<u32>>,
    pub hosts_of: BTreeMap<usize, BTreeSet<String>>,
}

impl Census {
    /// Whether `pid` answered from `rank`.
    pub fn ran_on(&self, pid: u32, rank: usize) -> bool {
        self.rank_of.get(&pid).is_some_and(|r| r.contains(&rank))
    }

    /// `Err` unless every worker rank (1 to `ranks - 1`) hosts `per_rank`
    /// workers; `after` says after what, for the message.
    pub fn expect_full(&self, ranks: usize, per_rank: usize, after: &str) -> Result<(), String> {
        for r in 1..ranks {
            let k = self.pids_of.get(&r).map_or(0, |p| p.len());
            if k != per_rank {
                return Err(format!(
                    "after {after} rank {r} serves with {k} workers, not {per_rank}: {}",
                    self.describe()
                ));
            }
        }
        Ok(())
    }

    /// `Err` unless `rank` hosts `per_rank` workers again, `gone` no more
    /// (it was replaced on the same rank).
    pub fn expect_replaced(
        &self,
        rank: usize,
        per_rank: usize,
        gone: u32,
        after: &str,
    ) -> Result<(), String> {
        let on_rank = self.pids_of.get(&rank).cloned().unwrap_or_default();
        if on_rank.len() != per_rank || on_rank.contains(&gone) {
            return Err(format!(
                "after {after} rank {rank} should serve with {per_rank} workers, {gone} no \
                 more: {}",
                self.describe()
            ));
        }
        Ok(())
    }

    /// "rank 1 on h2: [pids], ..." for messages.
    pub fn describe(&self) -> String {
        self.pids_of
            .iter()
            .map(|(r, pids)| {
                let hosts: Vec<_> = self.hosts_of[r].iter().cloned().collect();
                format!("rank {r} on {}: {pids:?}", hosts.join("+"))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Runs rounds of `whoami` tasks (twice as many as the pool has workers,
/// 20 ms each) until every worker rank 1..`ranks` has answered and every
/// pid in `pool.worker_pids()` has answered too, or fails after `within`.
/// This is how the examples see that every rank still serves, and learn
/// which rank each worker is on.
pub fn census(pool: &Pool, ranks: usize, within: Duration) -> Result<Census, String> {
    let deadline = Instant::now() + within;
    let mut c = Census::default();
    let want_ranks: BTreeSet<usize> = (1..ranks).collect();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let pending: Vec<_> = (0..pool.processes().max(1) * 2)
            .map(|_| pool.apply_async(whoami, 20))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("census: submitting: {e}"))?;
        for r in pending {
            let left = deadline.saturating_duration_since(Instant::now());
            if !r.wait_timeout(left) {
                return Err(format!(
                    "census: a 20 ms task did not finish within {within:?} ({rounds} rounds; \
                     answered so far: {})",
                    c.describe()
                ));
            }
            let (rank, pid, host) = r.get().map_err(|e| format!("census: a task failed: {e}"))?;
            let rank = rank.ok_or_else(|| {
                format!(
                    "census: worker {pid} on {host} cannot tell its rank (no ancestor has any of {})",
                    RANK_VARS.join(", ")
                )
            })?;
            if rank == 0 || rank >= ranks {
                return Err(format!(
                    "census: worker {pid} on {host} says it runs on rank {rank}; \
                     the worker ranks are 1..{ranks}"
                ));
            }
            c.rank_of.entry(pid).or_default().insert(rank);
            c.pids_of.entry(rank).or_default().insert(pid);
            c.hosts_of.entry(rank).or_default().insert(host);
        }
        let seen: BTreeSet<usize> = c.pids_of.keys().copied().collect();
        let listed = pool.worker_pids();
        let all_pids = listed.iter().all(|p| c.rank_of.contains_key(p));
        if seen == want_ranks && all_pids {
            return Ok(c);
        }
        if Instant::now() >= deadline {
            let silent: Vec<_> = want_ranks.difference(&seen).collect();
            let unheard: Vec<_> = listed
                .iter()
                .filter(|p| !c.rank_of.contains_key(p))
                .collect();
            return Err(format!(
                "census: after {rounds} rounds in {within:?}, ranks {silent:?} never answered and \
                 workers {unheard:?} (of worker_pids() = {listed:?}) never ran a task; \
                 answered: {}",
                c.describe()
            ));
        }
    }
}

/// Polls `cond` every 10 ms until it holds, or fails with `what` (and the
/// last state `cond` described) after `within`.
pub fn wait_until(
    within: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        match cond() {
            Ok(()) => return Ok(()),
            Err(state) if Instant::now() >= deadline => {
                return Err(format!("{what}: not so after {within:?}: {state}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Waits until none of `lost` is among `pool.worker_pids()` and the pool
/// has all its workers again: the lost workers were replaced.
pub fn wait_replaced(pool: &Pool, lost: &[u32], within: Duration) -> Result<(), String> {
    wait_until(within, &format!("workers {lost:?} replaced"), || {
        let now = pool.worker_pids();
        let still: Vec<_> = lost.iter().filter(|p| now.contains(p)).collect();
        if still.is_empty() && now.len() == pool.processes() {
            Ok(())
        } else {
            Err(format!(
                "worker_pids() = {now:?} ({} of {}), still listed: {still:?}",
                now.len(),
                pool.processes()
            ))
        }
    })
}

/// Whether process `pid` is gone from this machine (for a worker on rank
/// 0's own host): `kill(pid, 0)` fails with ESRCH once it has been reaped.
pub fn is_gone(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn double(x: u64) -> u64 {
    x * 2
}

/// A map of 500 items comes back right.
pub fn check_map(pool: &Pool) -> Result<(), String> {
    let v = pool
        .map(double, 0..500u64)
        .map_err(|e| format!("map: {e}"))?;
    if v != (0..500u64).map(|x| x * 2).collect::<Vec<_>>() {
        return Err("map gave wrong values".into());
    }
    Ok(())
}

/// No core dump for a task that aborts or segfaults on purpose.
pub fn no_core_files() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// A directory that rank 0 makes after `build()` (so only rank 0 makes
/// it) and that tasks write markers into, removed when dropped. The ranks
/// must see the same filesystem there: true on one host and on the
/// simulated hosts of `.ci/mpi-hosts.sh`. On a cluster whose /tmp is
/// local to each node, set PROCPOOL_MARKER_DIR to a shared directory on
/// rank 0 (only rank 0 reads it; the path travels in the tasks).
pub struct MarkerDir(pub PathBuf);

impl MarkerDir {
    pub fn new(example: &str) -> Result<Self, String> {
        let base = std::env::var_os("PROCPOOL_MARKER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("procpool-{example}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(MarkerDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a string, to send in a task's argument.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for MarkerDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes "RANK PID HOST" to `path`, made new: Ok(false) if it already
/// existed (how a task tells its first attempt from a retry).
pub fn write_marker(path: &str) -> std::io::Result<bool> {
    use std::io::Write;
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    let rank = my_rank().map_or_else(|| "?".to_string(), |r| r.to_string());
    writeln!(f, "{rank} {} {}", std::process::id(), hostname())?;
    f.sync_all()?;
    Ok(true)
}

/// As [`write_marker`], panicking (so the task fails with
/// `TaskPanicked` and this message) if the marker cannot be written.
pub fn mark(path: &str) -> bool {
    write_marker(path).unwrap_or_else(|e| {
        panic!(
            "cannot write the marker {path} on {}: {e} (do all ranks see rank 0's filesystem \
             there? see PROCPOOL_MARKER_DIR)",
            hostname()
        )
    })
}

/// A marker's contents: (rank, pid, host), once it has all been written.
pub fn read_marker(path: &str) -> Option<(usize, u32, String)> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.strip_suffix('\n')?;
    let mut it = line.split(' ');
    let rank = it.next()?.parse().ok()?;
    let pid = it.next()?.parse().ok()?;
    let host = it.next()?.to_string();
    Some((rank, pid, host))
}

/// An example's `main`: runs it (its pool is dropped inside, so MPI is
/// finalised before the exit), says why if it failed, and exits 0 or 1.
pub fn exit_with(example: &str, run: fn() -> Result<(), String>) -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{example}: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// The examples' pool: over MPI, `WORKERS_PER_RANK` workers on each rank;
/// with the number of ranks. Ranks >= 1 serve from here on and never
/// return.
pub fn mpi_pool() -> Result<(Pool, usize), String> {
    let pool = Pool::builder()
        .mpi()
        .workers_per_rank(WORKERS_PER_RANK)
        .build()
        .map_err(|e| e.to_string())?;
    Ok((pool, world_size()?))
}

/// Waits until process `pid` (of this host) is gone: killed, not left
/// running.
pub fn wait_gone(pid: u32, within: Duration) -> Result<(), String> {
    wait_until(within, &format!("worker {pid} killed"), || {
        if is_gone(pid) {
            Ok(())
        } else {
            Err(format!("process {pid} still exists"))
        }
    })
}
