//! The MPI backend (cargo feature `mpi`) under an MPI launcher: the
//! `mpi_*` examples, run with their ranks on this host, then spread over
//! two simulated hosts, then over four with one lost part-way; each case
//! passes by its exit status and what it prints (each example checks its
//! own results and prints `NAME: ok`). Every test runs under Open MPI
//! (`mpirun`) and again under MPICH (Hydra's `mpiexec`, the tests named
//! `mpich_*`), with the examples built against each (MPICH's in a target
//! directory of its own).
//!
//! Ignored in a plain run: they need the launcher (and, to build the
//! examples with the `mpi` feature, the MPI headers and libclang), and
//! across hosts root. CI runs them once (`.ci/mpi-tests.sh`, after the
//! `mpi` feature's build and lints), not under each start method:
//!
//! ```text
//! cargo test --test it -- --ignored --exact --nocapture mpi::on_one_host
//! cargo test --test it -- --ignored --exact --nocapture mpi::across_two_simulated_hosts
//! cargo test --test it -- --ignored --exact --nocapture mpi::across_four_simulated_hosts
//! cargo test --test it -- --ignored --exact --nocapture mpi::mpich_on_one_host
//! ...
//! ```
//!
//! Each test first builds the examples (nothing to do once built), then
//! runs its cases one at a time, each under `timeout` (a signal the
//! launcher passes on to its ranks), printing `PASS` or `FAIL` with the
//! case's output, and fails if any case did. Where the simulated hosts
//! cannot be made (not root, no namespaces) the tests across hosts skip,
//! unless PROCPOOL_MPI_REQUIRED is set, as CI sets it: there they fail.

use crate::common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long one case may run (`timeout`'s limit), unless it says.
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
    /// After the launcher (on one host), or `mpi-hosts.sh run` (across).
    Mpirun,
    /// As they are (an example started without a launcher, or a script).
    Alone,
    /// After the launcher, with the ranks' hostnames sorted, unique and
    /// joined by commas on one line.
    Hostnames,
    /// After `bash .ci/mpi-hostloss.sh`, with the `mpi_hostloss` example
    /// last.
    HostLoss,
}

/// One run of an example and what it must show. In `args`, `@NAME` is
/// the path of example NAME.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    launch: Launch,
    args: &'static [&'static str],
    /// A variable for the run, which the launcher passes on to the ranks.
    env: Option<(&'static str, &'static str)>,
    want: Want,
    /// A string its output (stdout and stderr) must hold.
    has: &'static str,
    /// A string its output must not hold.
    lacks: Option<&'static str>,
    /// Print the output of a passing run too (the benchmarks' figures).
    show: bool,
    /// How long it may run (`timeout`'s limit), in seconds.
    limit: u32,
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
    limit: CASE_LIMIT,
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
        args: &["-np", "3", "@mpi_crash"],
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
        args: &["-np", "3", "@mpi_crash"],
        env: STREAMS_MPI,
        has: "mpi_crash: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_timeout",
        args: &["-np", "3", "@mpi_timeout"],
        env: STREAMS_MPI,
        has: "mpi_timeout: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_cancel",
        args: &["-np", "3", "@mpi_cancel"],
        env: STREAMS_MPI,
        has: "mpi_cancel: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_chaos",
        args: &["-np", "3", "@mpi_chaos"],
        env: STREAMS_MPI,
        has: "mpi_chaos: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_shared",
        args: &["-np", "3", "@mpi_shared"],
        env: STREAMS_MPI,
        has: "mpi_shared: ok",
        ..CASE
    },
    Case {
        name: "streams in MPI messages: mpi_lifecycle",
        args: &["-np", "3", "@mpi_lifecycle"],
        env: STREAMS_MPI,
        has: "mpi_lifecycle: ok",
        ..CASE
    },
];

/// The runs with the ranks spread over two simulated hosts (after
/// `mpi-hosts.sh run`, oversubscribed): rank 0 on h1, rank 1 on h2, rank 2
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
        args: &["-np", "3", "@mpi_chaos"],
        env: STREAMS_MPI,
        has: "mpi_chaos: ok",
        ..CASE
    },
    Case {
        name: "across hosts: ranks that cannot reach rank 0 over TCP relay over MPI (mpi_chaos exits 0)",
        args: &["-np", "3", "@mpi_chaos"],
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

/// The program ends its pool with `terminate()` (`.ci/mpi-hostloss.sh`).
const END_TERMINATE: Option<(&str, &str)> = Some(("END", "terminate"));

/// How long a host-loss case may run: the loss waits for a quarter of
/// the tasks, a cut lasts 15 s, and the launcher gets 30 s to end.
const LOSS_LIMIT: u32 = 240;

/// A run of `.ci/mpi-hostloss.sh` with `args` (HOW RETRIES LAUNCHER) on
/// `mpi_hostloss`, which passes if its output has `has`.
const fn loss(name: &'static str, args: &'static [&'static str], has: &'static str) -> Case {
    Case {
        name,
        launch: Launch::HostLoss,
        args,
        has,
        limit: LOSS_LIMIT,
        ..CASE
    }
}

/// The runs over four simulated hosts, one rank a host (rank 2 on h3), on
/// both implementations: the ranks land, the job of `mpi_hostloss`
/// without a loss, and the benchmark. Then the losses each implementation survives
/// ([`LOSSES_OPEN_MPI`], [`LOSSES_MPICH`]).
const FOUR_HOSTS: &[Case] = &[
    Case {
        name: "four hosts: 4 ranks land on every host",
        launch: Launch::Hostnames,
        args: &["-np", "4"],
        has: "h1,h2,h3,h4",
        ..CASE
    },
    loss(
        "four hosts: 2,000 tasks, nothing lost",
        &["none", "0", "exit=0"],
        "mpi-hostloss.sh: none h3, retries 0, join: passed",
    ),
    Case {
        name: "four hosts: the benchmark runs (MPI beside local)",
        args: &["-np", "4", "@mpi_bench"],
        has: "MPI, 3 worker ranks",
        show: true,
        ..CASE
    },
];

/// Losing h3 part-way through 2,000 tasks (`.ci/mpi-hostloss.sh`, which
/// checks the launcher's end and that nothing is left on any host; the
/// program checks every task). Under Open MPI 4.1 with its recovery
/// settings the survivors go on after either loss; after a killed host
/// `mpirun` does not exit by itself (the script ends it with SIGTERM once
/// the program is done), after a cut it exits 0 once the link is back.
/// With retries the program ends its pool with `terminate()`, without
/// with `close()` and `join()`. Last, a rank that outlives rank 0's
/// verdict is fenced off when its link comes back.
const LOSSES_OPEN_MPI: &[Case] = &[
    Case {
        show: true,
        ..loss(
            "four hosts: h3's processes killed, no retries: only its tasks fail, RankLost",
            &["kill", "0", "may-stay"],
            "mpi-hostloss.sh: kill h3, retries 0, join: passed",
        )
    },
    Case {
        env: END_TERMINATE,
        ..loss(
            "four hosts: h3's processes killed, retries(1): all 2,000 succeed; terminate() returns",
            &["kill", "1", "may-stay"],
            "mpi-hostloss.sh: kill h3, retries 1, terminate: passed",
        )
    },
    Case {
        show: true,
        ..loss(
            "four hosts: h3's link cut, no retries: only its tasks fail; its rank exits by itself",
            &["cut", "0", "exit=0"],
            "mpi-hostloss.sh: cut h3, retries 0, join: passed",
        )
    },
    Case {
        env: END_TERMINATE,
        ..loss(
            "four hosts: h3's link cut, retries(1): all 2,000 succeed; terminate() returns",
            &["cut", "1", "exit=0"],
            "mpi-hostloss.sh: cut h3, retries 1, terminate: passed",
        )
    },
    loss(
        "four hosts: h3 cut off for 8 s but its rank waits 60 s: once back, it is fenced off",
        &["fence", "0", "exit=0"],
        "mpi-hostloss.sh: fence h3, retries 0, join: passed",
    ),
];

/// The same under MPICH 4.0 (Hydra, `-disable-auto-cleanup`): a cut link
/// only. A killed host ends the whole job there (Hydra's mpiexec fails
/// when a host's proxy dies), so that case does not apply. After a cut
/// mpiexec exits with the cut-off rank's status, 75, once the link is
/// back, or now and then fails itself on the cut host's connection: dies
/// of SIGPIPE (141) as it writes to it, or stops on an assertion (255).
/// The program's own checks decide the case.
const LOSSES_MPICH: &[Case] = &[
    Case {
        show: true,
        ..loss(
            "four hosts: h3's link cut, no retries: only its tasks fail; its rank exits by itself",
            &["cut", "0", "exit=75,141,255"],
            "mpi-hostloss.sh: cut h3, retries 0, join: passed",
        )
    },
    Case {
        env: END_TERMINATE,
        ..loss(
            "four hosts: h3's link cut, retries(1): all 2,000 succeed; terminate() returns",
            &["cut", "1", "exit=75,141,255"],
            "mpi-hostloss.sh: cut h3, retries 1, terminate: passed",
        )
    },
    loss(
        "four hosts: h3 cut off for 8 s but its rank waits 60 s: once back, it is fenced off",
        &["fence", "0", "exit=75,141,255"],
        "mpi-hostloss.sh: fence h3, retries 0, join: passed",
    ),
];

/// An MPI implementation, and how this file launches with it.
#[derive(Clone, Copy, PartialEq)]
enum Mpi {
    /// Open MPI: `mpirun`.
    OpenMpi,
    /// MPICH: Hydra's `mpiexec`.
    Mpich,
}

impl Mpi {
    /// Its name for `.ci/mpi-hosts.sh` (`MPI_IMPL`).
    fn name(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "openmpi",
            Mpi::Mpich => "mpich",
        }
    }

    /// Its launcher: the implementation's own name where both are
    /// installed (the plain one is whichever the alternatives chose), and
    /// what `--version` says of it.
    fn launcher(self) -> String {
        let (names, says): (&[&str], &str) = match self {
            Mpi::OpenMpi => (&["mpirun.openmpi", "mpirun"], "Open MPI"),
            Mpi::Mpich => (&["mpiexec.mpich", "mpiexec.hydra", "mpiexec"], "HYDRA"),
        };
        names
            .iter()
            .find(|n| {
                Command::new(n).arg("--version").output().is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains(says)
                        || String::from_utf8_lossy(&o.stderr).contains(says)
                })
            })
            .map(|n| n.to_string())
            .unwrap_or_else(|| panic!("no {} launcher (tried {names:?})", self.name()))
    }

    /// Its compiler wrapper, which the `mpi` crate builds against (found
    /// through `MPICC`); None: the plain `mpicc`.
    fn mpicc(self) -> Option<&'static str> {
        let name = match self {
            Mpi::OpenMpi => "mpicc.openmpi",
            Mpi::Mpich => "mpicc.mpich",
        };
        std::env::split_paths(&std::env::var_os("PATH")?)
            .any(|d| d.join(name).exists())
            .then_some(name)
    }

    /// Where its build of the examples goes: a target directory of its
    /// own for MPICH (the `mpi` crate's build does not notice a change of
    /// implementation).
    fn target(self, base: &Path) -> PathBuf {
        match self {
            Mpi::OpenMpi => base.to_path_buf(),
            Mpi::Mpich => base.join("mpich"),
        }
    }
}

/// How the cases of a test are launched.
struct Launcher {
    mpi: Mpi,
    /// The launcher's command line, before a case's arguments.
    argv: Vec<String>,
    /// Through `.ci/mpi-hosts.sh run`, which passes the variables named in
    /// `MPI_HOSTS_PASS` on to the ranks.
    hosts: bool,
}

impl Launcher {
    /// The launcher on this host: Open MPI's oversubscribed (two cores
    /// here, up to four ranks); MPICH's as it is.
    fn one_host(mpi: Mpi) -> Launcher {
        let mut argv = vec![mpi.launcher()];
        if mpi == Mpi::OpenMpi {
            argv.push("--oversubscribe".into());
        }
        Launcher {
            mpi,
            argv,
            hosts: false,
        }
    }

    /// `.ci/mpi-hosts.sh run`, on the hosts that `Hosts::up` made.
    fn across(mpi: Mpi) -> Launcher {
        let mut argv = vec!["bash".to_string(), hosts_script(), "run".into()];
        if mpi == Mpi::OpenMpi {
            argv.push("--oversubscribe".into());
        }
        Launcher {
            mpi,
            argv,
            hosts: true,
        }
    }

    /// The arguments that pass variable `name` on to every rank, after
    /// the launcher's own (Hydra passes its whole environment).
    fn pass(&self, name: &str) -> Vec<String> {
        match (self.mpi, self.hosts) {
            (Mpi::OpenMpi, false) => vec!["-x".into(), name.into()],
            _ => Vec::new(),
        }
    }
}

impl Case {
    /// Its command line: the launcher, then the arguments, with the
    /// examples of `dir`.
    fn argv(&self, launcher: &Launcher, dir: &Path) -> Vec<String> {
        let example = |ex: &str| dir.join(ex).to_string_lossy().into_owned();
        let args = self.args.iter().map(|a| match a.strip_prefix('@') {
            Some(ex) => example(ex),
            None => a.to_string(),
        });
        let launch = launcher
            .argv
            .iter()
            .cloned()
            .chain(self.env.into_iter().flat_map(|(k, _)| launcher.pass(k)));
        match self.launch {
            Launch::Alone => args.collect(),
            Launch::HostLoss => {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/mpi-hostloss.sh");
                ["bash", script]
                    .into_iter()
                    .map(String::from)
                    .chain(args)
                    .chain(std::iter::once(example("mpi_hostloss")))
                    .collect()
            }
            Launch::Mpirun => launch.chain(args).collect(),
            Launch::Hostnames => ["bash", "-c", HOSTNAMES, "_"]
                .into_iter()
                .map(String::from)
                .chain(launch)
                .chain(args)
                .chain(std::iter::once("hostname".to_string()))
                .collect(),
        }
    }

    /// Runs it under `timeout`; returns its output, or why it failed and
    /// its output.
    fn run(&self, launcher: &Launcher, dir: &Path) -> Result<String, (String, String)> {
        let mut cmd = Command::new("timeout");
        cmd.arg(self.limit.to_string())
            .args(self.argv(launcher, dir))
            .env("MPI_IMPL", launcher.mpi.name())
            .envs(self.env);
        if let Some((name, _)) = self.env {
            cmd.env("MPI_HOSTS_PASS", name);
        }
        if is_root() {
            // Open MPI refuses to run as root without these.
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        let limit = Duration::from_secs(u64::from(self.limit) + 30);
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

/// Runs its arguments (the launcher's command line, less the program,
/// which it adds) and prints the ranks' hostnames, sorted and unique, on
/// one line.
const HOSTNAMES: &str = r#"set -o pipefail; "$@" | sort -u | paste -sd, -"#;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs the cases one after another, printing each outcome; panics with
/// the failed ones' names.
fn run_all(cases: &[Case], launcher: &Launcher, dir: &Path) {
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

/// The examples, built with the `mpi` feature against `mpi` (in release,
/// in this binary's target directory, or MPICH's beside it); built here
/// if need be.
fn examples(mpi: Mpi) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let base = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    let target = mpi.target(base);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--features", "mpi", "--examples"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target);
    if let Some(mpicc) = mpi.mpicc() {
        cmd.env("MPICC", mpicc);
    }
    let run = common::run_program_with_deadline(&mut cmd, BUILD_LIMIT);
    assert!(
        run.status.is_some_and(|s| s.success()),
        "building the examples with the mpi feature against {} (needs its headers and libclang):\n{}",
        mpi.name(),
        run.stderr
    );
    target.join("release").join("examples")
}

const BUILD_LIMIT: Duration = Duration::from_secs(1200);

/// `.ci/mpi-hosts.sh`, which makes (`up`), uses (`run`), breaks (`kill`,
/// `cut`) and removes (`down`) the simulated hosts.
fn hosts_script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/mpi-hosts.sh").to_string()
}

/// The simulated hosts while it lives: `down` on drop, even after a
/// failed case.
struct Hosts;

impl Hosts {
    /// `up` with `n` hosts for `mpi`; None where they cannot be made here
    /// (the script says why and exits with 77: not root, a tool missing,
    /// no namespaces) and PROCPOOL_MPI_REQUIRED is not set (CI sets it:
    /// there, what cannot run fails).
    fn up(n: usize, mpi: Mpi) -> Option<Hosts> {
        let run = common::run_program_with_deadline(
            Command::new("bash")
                .arg(hosts_script())
                .arg("up")
                .env("MPI_HOSTS", n.to_string())
                .env("MPI_IMPL", mpi.name()),
            Duration::from_secs(120),
        );
        print!("{}{}", run.stdout, run.stderr);
        match run.status.and_then(|s| s.code()) {
            Some(0) => Some(Hosts),
            Some(77) if std::env::var_os("PROCPOOL_MPI_REQUIRED").is_none() => None,
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
fn bound_for(cases: &[Case]) -> Duration {
    // The build (if the examples are not built yet), then every case.
    let each: u64 = cases.iter().map(|c| u64::from(c.limit) + 30).sum();
    BUILD_LIMIT + Duration::from_secs(each)
}

/// On this host: [`ONE_HOST`], with [`STREAMS_IN_MPI_MESSAGES`] after the
/// chaos run.
fn one_host_cases() -> Vec<Case> {
    let mut cases = ONE_HOST.to_vec();
    cases.splice(6..6, STREAMS_IN_MPI_MESSAGES.iter().copied());
    cases
}

/// Over four hosts: [`FOUR_HOSTS`], then the losses `mpi` survives.
fn four_host_cases(mpi: Mpi) -> Vec<Case> {
    let losses = match mpi {
        Mpi::OpenMpi => LOSSES_OPEN_MPI,
        Mpi::Mpich => LOSSES_MPICH,
    };
    [FOUR_HOSTS, losses].concat()
}

/// The cases on this host.
fn one_host(mpi: Mpi) {
    let dir = examples(mpi);
    run_all(&one_host_cases(), &Launcher::one_host(mpi), &dir);
}

/// `cases` over `n` simulated hosts: network namespaces on a bridge, each
/// with its own hostname, reaching each other over TCP only. Where they
/// cannot be made here the script says SKIP, and this fails nothing
/// (unless PROCPOOL_MPI_REQUIRED is set).
fn across(n: usize, mpi: Mpi, cases: &[Case]) {
    let dir = examples(mpi);
    let Some(_hosts) = Hosts::up(n, mpi) else {
        println!("skipped: the runs across {n} hosts; see the SKIP line above");
        return;
    };
    run_all(cases, &Launcher::across(mpi), &dir);
}

#[test]
#[ignore = "needs Open MPI's mpirun and the mpi feature's build tools; .ci/run runs it"]
fn on_one_host() {
    common::bounded_for(bound_for(&one_host_cases()), || one_host(Mpi::OpenMpi))
}

#[test]
#[ignore = "needs Open MPI's mpirun, root, and the mpi feature's build tools; .ci/run runs it"]
fn across_two_simulated_hosts() {
    common::bounded_for(bound_for(ACROSS), || across(2, Mpi::OpenMpi, ACROSS))
}

#[test]
#[ignore = "needs Open MPI's mpirun, root, and the mpi feature's build tools; .ci/run runs it"]
fn across_four_simulated_hosts() {
    common::bounded_for(bound_for(&four_host_cases(Mpi::OpenMpi)), || {
        across(4, Mpi::OpenMpi, &four_host_cases(Mpi::OpenMpi))
    })
}

#[test]
#[ignore = "needs MPICH's mpiexec and the mpi feature's build tools; .ci/run runs it"]
fn mpich_on_one_host() {
    common::bounded_for(bound_for(&one_host_cases()), || one_host(Mpi::Mpich))
}

#[test]
#[ignore = "needs MPICH's mpiexec, root, and the mpi feature's build tools; .ci/run runs it"]
fn mpich_across_two_simulated_hosts() {
    common::bounded_for(bound_for(ACROSS), || across(2, Mpi::Mpich, ACROSS))
}

#[test]
#[ignore = "needs MPICH's mpiexec, root, and the mpi feature's build tools; .ci/run runs it"]
fn mpich_across_four_simulated_hosts() {
    common::bounded_for(bound_for(&four_host_cases(Mpi::Mpich)), || {
        across(4, Mpi::Mpich, &four_host_cases(Mpi::Mpich))
    })
}
