//! The MPI backend (cargo feature `mpi`) under `mpirun`: the `mpi_*`
//! examples, run with their ranks on this host and then spread over two
//! simulated hosts, each case passing by its exit status and what it
//! prints (each example checks its own results and prints `NAME: ok`).
//!
//! Ignored in a plain run: they need Open MPI's `mpirun` (and, to build
//! the examples with the `mpi` feature, the MPI headers and libclang),
//! and across hosts root. CI runs them once (`.ci/run`), not under each
//! start method:
//!
//! ```text
//! cargo test --test it -- --ignored --exact --nocapture mpi::on_one_host
//! cargo test --test it -- --ignored --exact --nocapture mpi::across_two_simulated_hosts
//! ```
//!
//! (`.ci/mpi-tests.sh`, after the `mpi` feature's build and lints.)
//!
//! Each test first builds the examples (`cargo build --release --features
//! mpi --examples`, nothing to do once built), then runs its cases one at a
//! time, each under `timeout 120` (a signal mpirun passes on to its ranks),
//! printing `PASS` or `FAIL` with the case's output, and fails if any case
//! did.

use crate::common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long one case may run (`timeout`'s limit).
const CASE_LIMIT: u32 = 120;

/// What a case must exit with.
#[derive(Clone, Copy)]
enum Want {
    Code(i32),
    /// Any failure, but not a timeout.
    Failure,
}

/// How a case's arguments are run.
#[derive(Clone, Copy)]
enum Launch {
    /// After `mpirun` (on one host), or `mpi-hosts.sh run` (across).
    Mpirun,
    /// As they are (an example started without mpirun).
    Alone,
    /// After mpirun, with the ranks' hostnames sorted, unique and joined
    /// by commas on one line.
    Hostnames,
}

/// One run of an example and what it must show. In `args`, `@NAME` is
/// the path of example NAME.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    launch: Launch,
    args: &'static [&'static str],
    /// A variable for the run (which the args pass on to the ranks, `-x`).
    env: Option<(&'static str, &'static str)>,
    want: Want,
    /// A string its output (stdout and stderr) must hold.
    has: &'static str,
    /// A string its output must not hold.
    lacks: Option<&'static str>,
    /// Print the output of a passing run too (the benchmarks' figures).
    show: bool,
}

const CASE: Case = Case {
    name: "",
    launch: Launch::Mpirun,
    args: &[],
    env: None,
    want: Want::Code(0),
    has: "",
    lacks: None,
    show: false,
};

const STREAMS_MPI: Option<(&str, &str)> = Some(("PROCPOOL_MPI_STREAMS", "mpi"));
/// An address nobody answers on (TEST-NET-1) for rank 0.
const UNREACHABLE: Option<(&str, &str)> = Some(("PROCPOOL_MPI_ADDRS", "192.0.2.1"));

/// The runs on this host (and [`STREAMS_IN_MPI_MESSAGES`]).
const ONE_HOST: &[Case] = &[
    Case {
        name: "primes over 3 ranks match a sequential count",
        args: &["-np", "3", "@mpi_primes"],
        has: "mpi_primes: ok",
        ..CASE
    },
    Case {
        name: "a task that panics on a rank fails alone; the job goes on",
        args: &["-np", "3", "@mpi_panic"],
        has: "mpi_panic: ok",
        ..CASE
    },
    // Crash isolation on every rank: 2 worker ranks, each hosting 2
    // workers (the examples ask for workers_per_rank(2)), so 5 processes
    // of the examples and 2 fork servers on 2 cores.
    Case {
        name: "a task that aborts, segfaults, exits or SIGKILLs its worker on a rank fails alone",
        args: &["-np", "3", "@mpi_crash"],
        has: "mpi_crash: ok",
        ..CASE
    },
    Case {
        name: "a timeout kills the remote worker; the same rank serves on",
        args: &["-np", "3", "@mpi_timeout"],
        has: "mpi_timeout: ok",
        ..CASE
    },
    Case {
        name: "cancel() kills a task running on a rank; the rank serves on",
        args: &["-np", "3", "@mpi_cancel"],
        has: "mpi_cancel: ok",
        ..CASE
    },
    Case {
        name: "2,000 tasks, 5% SIGKILL their worker: exact losses, then all right with retries",
        args: &["-np", "3", "@mpi_chaos"],
        has: "mpi_chaos: ok",
        lacks: Some("go over MPI"),
        ..CASE
    },
    // A rank that cannot connect says so and relays in MPI messages; the
    // job is as right.
    Case {
        name: "a rank that cannot reach rank 0 over TCP relays over MPI (mpi_crash exits 0)",
        args: &["-x", "PROCPOOL_MPI_ADDRS", "-np", "3", "@mpi_crash"],
        env: UNREACHABLE,
        has: "cannot connect to rank 0",
        ..CASE
    },
    Case {
        name: "SharedBufs are copied to the ranks and back",
        args: &["-np", "3", "@mpi_shared"],
        has: "mpi_shared: ok",
        ..CASE
    },
    Case {
        name: "max_tasks_per_child recycles workers on their ranks; imap streams; terminate",
        args: &["-np", "3", "@mpi_lifecycle"],
        has: "mpi_lifecycle: ok",
        ..CASE
    },
    Case {
        name: "ranks that run different binaries are refused",
        args: &["-np", "1", "@mpi_primes", ":", "-np", "2", "@mpi_panic"],
        want: Want::Failure,
        has: "do not all run the same executable",
        ..CASE
    },
    Case {
        name: "without mpirun: a clear error, no hang",
        launch: Launch::Alone,
        args: &["@mpi_primes"],
        want: Want::Code(2),
        has: "needs at least 2 MPI ranks",
        ..CASE
    },
    Case {
        name: "one rank: a clear error, no hang",
        args: &["-np", "1", "@mpi_primes"],
        want: Want::Failure,
        has: "needs at least 2 MPI ranks",
        ..CASE
    },
    Case {
        name: "the benchmark runs (MPI beside local)",
        args: &["-np", "3", "@mpi_bench"],
        has: "MPI, 2 worker ranks",
        show: true,
        ..CASE
    },
    Case {
        name: "a bare MPI ping-pong, for beside the benchmark",
        args: &["-np", "2", "@mpi_pingpong"],
        has: "mpi_pingpong: ok",
        show: true,
        ..CASE
    },
];

/// The workers' streams go over TCP unless a rank cannot connect to rank
/// 0; PROCPOOL_MPI_STREAMS=mpi makes them go in MPI messages, as they do
/// then: these examples again, so (on one host, after the chaos run).
const STREAMS_IN_MPI_MESSAGES: &[Case] = &[
    Case {
        name: "streams in MPI messages: mpi_crash",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_crash"],
        env: STREAMS_MPI,
        has: "mpi_crash: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_timeout",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_timeout"],
        env: STREAMS_MPI,
        has: "mpi_timeout: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_cancel",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_cancel"],
        env: STREAMS_MPI,
        has: "mpi_cancel: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_chaos",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_chaos"],
        env: STREAMS_MPI,
        has: "mpi_chaos: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_shared",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_shared"],
        env: STREAMS_MPI,
        has: "mpi_shared: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_lifecycle",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_lifecycle"],
        env: STREAMS_MPI,
        has: "mpi_lifecycle: ok",
        ..CASE
    },
];

/// The runs with the ranks spread over two simulated hosts (after
/// `mpi-hosts.sh run --oversubscribe`): rank 0 on h1, rank 1 on h2, rank 2
/// on h1, and so on.
const ACROSS: &[Case] = &[
    Case {
        name: "across hosts: 3 ranks land on both hosts",
        launch: Launch::Hostnames,
        args: &["-np", "3"],
        has: "h1,h2",
        ..CASE
    },
    Case {
        name: "across hosts: primes over 3 ranks match a sequential count",
        args: &["-np", "3", "@mpi_primes"],
        has: "mpi_primes: ok",
        ..CASE
    },
    Case {
        name: "across hosts: a task that panics on a rank fails alone",
        args: &["-np", "3", "@mpi_panic"],
        has: "mpi_panic: ok",
        ..CASE
    },
    Case {
        name: "across hosts: a task that crashes its worker on a rank fails alone",
        args: &["-np", "3", "@mpi_crash"],
        has: "mpi_crash: ok",
        ..CASE
    },
    Case {
        name: "across hosts: a timeout kills the remote worker; the rank serves on",
        args: &["-np", "3", "@mpi_timeout"],
        has: "mpi_timeout: ok",
        ..CASE
    },
    Case {
        name: "across hosts: cancel() kills a task running on a rank",
        args: &["-np", "3", "@mpi_cancel"],
        has: "mpi_cancel: ok",
        ..CASE
    },
    Case {
        name: "across hosts: 2,000 tasks, 5% SIGKILL their worker",
        args: &["-np", "3", "@mpi_chaos"],
        has: "mpi_chaos: ok",
        lacks: Some("go over MPI"),
        ..CASE
    },
    Case {
        name: "across hosts, streams in MPI messages: 2,000 tasks, 5% SIGKILL their worker",
        args: &["-x", "PROCPOOL_MPI_STREAMS", "-np", "3", "@mpi_chaos"],
        env: STREAMS_MPI,
        has: "mpi_chaos: ok",
        ..CASE
    },
    Case {
        name: "across hosts: ranks that cannot reach rank 0 over TCP relay over MPI (mpi_chaos exits 0)",
        args: &["-x", "PROCPOOL_MPI_ADDRS", "-np", "3", "@mpi_chaos"],
        env: UNREACHABLE,
        has: "cannot connect to rank 0",
        ..CASE
    },
    Case {
        name: "across hosts: SharedBufs are copied to the ranks and back",
        args: &["-np", "3", "@mpi_shared"],
        has: "mpi_shared: ok",
        ..CASE
    },
    Case {
        name: "across hosts: max_tasks_per_child, imap streams, terminate",
        args: &["-np", "3", "@mpi_lifecycle"],
        has: "mpi_lifecycle: ok",
        ..CASE
    },
    Case {
        name: "across hosts: ranks that run different binaries are refused",
        args: &["-np", "1", "@mpi_primes", ":", "-np", "2", "@mpi_panic"],
        want: Want::Failure,
        has: "do not all run the same executable",
        ..CASE
    },
    Case {
        name: "across hosts: the benchmark runs",
        args: &["-np", "3", "@mpi_bench"],
        has: "MPI, 2 worker ranks",
        show: true,
        ..CASE
    },
    Case {
        name: "across hosts: a bare MPI ping-pong between h1 and h2",
        args: &["-np", "2", "@mpi_pingpong"],
        has: "ranks: 0 on h1, 1 on h2",
        show: true,
        ..CASE
    },
];

impl Case {
    /// Its command line: `launcher` (mpirun's, or mpi-hosts.sh's) then
    /// the arguments, with the examples of `dir`.
    fn argv(&self, launcher: &[String], dir: &Path) -> Vec<String> {
        let args = self.args.iter().map(|a| match a.strip_prefix('@') {
            Some(ex) => dir.join(ex).to_string_lossy().into_owned(),
            None => a.to_string(),
        });
        match self.launch {
            Launch::Alone => args.collect(),
            Launch::Mpirun => launcher.iter().cloned().chain(args).collect(),
            Launch::Hostnames => ["bash", "-c", HOSTNAMES, "_"]
                .into_iter()
                .map(String::from)
                .chain(launcher.iter().cloned())
                .chain(args)
                .chain(std::iter::once("hostname".to_string()))
                .collect(),
        }
    }

    /// Runs it under `timeout`; returns its output, or why it failed and
    /// its output.
    fn run(&self, launcher: &[String], dir: &Path) -> Result<String, (String, String)> {
        let mut cmd = Command::new("timeout");
        cmd.arg(CASE_LIMIT.to_string())
            .args(self.argv(launcher, dir))
            .envs(self.env);
        if is_root() {
            // Open MPI refuses to run as root without these.
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        let limit = Duration::from_secs(u64::from(CASE_LIMIT) + 30);
        let run = common::run_program_with_deadline(&mut cmd, limit);
        let out = format!("{}{}", run.stdout, run.stderr);
        // As a shell reports it: a process killed by a signal as 128 + it.
        let code = run
            .status
            .map(|s| s.code().unwrap_or(128 + s.signal().unwrap_or(0)));
        let why = match (code, self.want) {
            // timeout's own statuses, or our deadline.
            (None | Some(124 | 137), _) => Some("timed out".to_string()),
            (Some(0), Want::Failure) => Some("exited 0; a failure was expected".into()),
            (Some(c), Want::Code(w)) if c != w => Some(format!("exited {c}; {w} was expected")),
            _ if !out.contains(self.has) => Some(format!("its output lacks: {}", self.has)),
            _ => self
                .lacks
                .filter(|s| out.contains(s))
                .map(|s| format!("its output has: {s}")),
        };
        match why {
            None => Ok(out),
            Some(why) => Err((why, out)),
        }
    }
}

/// Runs its arguments (mpirun's command line, less the program, which it
/// adds) and prints the ranks' hostnames, sorted and unique, on one line.
const HOSTNAMES: &str = r#"set -o pipefail; "$@" | sort -u | paste -sd, -"#;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the cases one after another, printing each outcome; panics with
/// the failed ones' names.
fn run_all(cases: &[Case], launcher: &[String], dir: &Path) {
    let mut failed = Vec::new();
    for case in cases {
        let t0 = std::time::Instant::now();
        match case.run(launcher, dir) {
            Ok(out) => {
                println!("PASS {} ({} s)", case.name, t0.elapsed().as_secs());
                if case.show {
                    print!("{}", indent(&out));
                }
            }
            Err((why, out)) => {
                println!("FAIL {}: {why}\n{}", case.name, indent(&out));
                failed.push(format!("{}: {why}", case.name));
            }
        }
    }
    println!(
        "{} passed, {} failed",
        cases.len() - failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}

fn indent(out: &str) -> String {
    out.lines().map(|l| format!("    | {l}\n")).collect()
}

/// The examples, built with the `mpi` feature (in release, in this
/// binary's target directory); built here if need be.
fn examples() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--features", "mpi", "--examples"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .env("CARGO_TARGET_DIR", target);
    let run = common::run_program_with_deadline(&mut cmd, BUILD_LIMIT);
    assert!(
        run.status.is_some_and(|s| s.success()),
        "building the examples with the mpi feature (needs the MPI headers and libclang):\n{}",
        run.stderr
    );
    target.join("release").join("examples")
}

const BUILD_LIMIT: Duration = Duration::from_secs(1200);

/// `mpirun` as this host runs it: with Open MPI, oversubscribed (two
/// cores here, up to four ranks).
fn mpirun() -> Vec<String> {
    let version = Command::new("mpirun").arg("--version").output();
    let open_mpi = version.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).contains("Open MPI")
            || String::from_utf8_lossy(&o.stderr).contains("Open MPI")
    });
    let mut v = vec!["mpirun".to_string()];
    if open_mpi {
        v.push("--oversubscribe".into());
    }
    v
}

/// `.ci/mpi-hosts.sh`, which makes (`up`), uses (`run`) and removes
/// (`down`) the two simulated hosts.
fn hosts_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/mpi-hosts.sh").to_string()
}

/// The two simulated hosts while it lives: `down` on drop, even after a
/// failed case.
struct Hosts;

impl Hosts {
    /// `up`; None where they cannot be made here (the script says why and
    /// exits with 77: not root, a tool missing, no namespaces).
    fn up() -> Option<Hosts> {
        let run = common::run_program_with_deadline(
            Command::new("bash").arg(hosts_script()).arg("up"),
            Duration::from_secs(120),
        );
        print!("{}{}", run.stdout, run.stderr);
        match run.status.and_then(|s| s.code()) {
            Some(0) => Some(Hosts),
            Some(77) => None,
            other => {
                // It removes what it made when it fails half-way.
                panic!("mpi-hosts.sh up exited {other:?}")
            }
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = common::run_program_with_deadline(
            Command::new("bash").arg(hosts_script()).arg("down"),
            Duration::from_secs(120),
        );
    }
}

/// A bound for a whole list of cases: each has its own limit.
fn bound_for(cases: usize) -> Duration {
    // The build (if the examples are not built yet), then every case.
    BUILD_LIMIT + Duration::from_secs(cases as u64 * (u64::from(CASE_LIMIT) + 30))
}

#[test]
#[ignore = "needs Open MPI's mpirun and the mpi feature's build tools; .ci/run runs it"]
fn on_one_host() {
    common::bounded_for(
        bound_for(ONE_HOST.len() + STREAMS_IN_MPI_MESSAGES.len()),
        || {
            let dir = examples();
            let mut cases = ONE_HOST.to_vec();
            cases.splice(6..6, STREAMS_IN_MPI_MESSAGES.iter().copied());
            run_all(&cases, &mpirun(), &dir);
        },
    )
}

#[test]
#[ignore = "needs Open MPI's mpirun, root, and the mpi feature's build tools; .ci/run runs it"]
fn across_two_simulated_hosts() {
    common::bounded_for(bound_for(ACROSS.len()), || {
        let dir = examples();
        // Network namespaces on a bridge, each with its own hostname,
        // reaching each other over TCP only. Where they cannot be made here
        // the script says SKIP, and this test fails nothing.
        let Some(_hosts) = Hosts::up() else {
            println!("skipped: the runs across two hosts; see the SKIP line above");
            return;
        };
        let launcher = ["bash", &hosts_script(), "run", "--oversubscribe"].map(String::from);
        run_all(ACROSS, &launcher, &dir);
    })
}
