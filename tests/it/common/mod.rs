//! Helpers shared by the integration tests (the `it` binary and
//! `tests/logs.rs`).
#![allow(dead_code)]

use std::process::Command;

/// The name the test harness knows test `name` of module `module` (a
/// `module_path!()`) by, which `--exact` matches: the module path less
/// the crate's own name, then the test (`apply::my_test`). Use it through
/// [`test_name!`].
pub fn qualified(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{name}"),
        None => name.to_string(),
    }
}

/// `test_name!("my_test")`: the full name of test `my_test` of the module
/// this is written in (see [`qualified`]), for [`isolated`],
/// [`run_helper`] and [`Helper::start`], which run this binary again with
/// that one test.
#[allow(unused_macros)]
macro_rules! test_name {
    ($name:expr) => {
        $crate::common::qualified(module_path!(), $name)
    };
}

const ISOLATED: &str = "PROCPOOL_TEST_ISOLATED";

/// How long an isolated run may take before the test calls it hung.
const ISOLATED_BOUND: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs the calling test's body in a fresh process of this test binary, so
/// that it can count the process's children or open fds without the other
/// tests that `cargo test` runs on other threads of the same process.
///
/// Call it first thing in a test, with the test's own name:
/// `if common::isolated(&test_name!("my_test")) { return; }`. In the parent it re-runs
/// the binary with only that test and returns true (after asserting that the
/// child passed); in that child it returns false, and the body runs.
pub fn isolated(name: &str) -> bool {
    isolated_with_env(name, &[])
}

/// [`isolated`], with these variables set in the fresh process's
/// environment (for a test of what the environment changes).
pub fn isolated_with_env(name: &str, vars: &[(&str, &str)]) -> bool {
    if std::env::var(ISOLATED).as_deref() == Ok(name) {
        return false;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let run = run_program_with_deadline(
        Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(ISOLATED, name)
            .envs(vars.iter().copied()),
        ISOLATED_BOUND,
    );
    let (stdout, stderr) = (run.stdout, run.stderr);
    let Some(status) = run.status else {
        panic!("isolated run of {name} did not finish in {ISOLATED_BOUND:?}:\n{stdout}\n{stderr}");
    };
    assert!(
        status.success(),
        "isolated run of {name} failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "isolated run of {name} ran no test:\n{stdout}\n{stderr}"
    );
    true
}

/// The pids of this process's direct children (every thread's).
pub fn children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// How many fds this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Whether a process with this pid exists (a zombie counts).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits (polling, bounded) until `cond` holds; returns whether it did.
/// For waiting on an outside event such as a process disappearing, never
/// as a timing assertion: the bound is generous.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cond()
}

/// A file that a gated task waits for (with [`wait_for_gate`]); the test
/// creates it with [`Gate::open`] to let the task finish. Makes "not finished
/// yet" states deterministic. The file is removed on drop.
pub struct Gate(std::path::PathBuf);

impl Gate {
    /// A fresh gate, shut, under the temp dir: its name holds `label`, this
    /// process's pid and a counter, so that no two gates share a file.
    pub fn new(label: &str) -> Gate {
        static GATES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = GATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("procpool-{label}-gate-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Gate(p)
    }

    /// The gate's path, to send to a task.
    pub fn key(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    /// Opens the gate: creates the file that the gated tasks wait for.
    pub fn open(&self) {
        std::fs::write(&self.0, b"open").expect("opening the gate");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// In a worker: waits until the gate at `path` (a [`Gate::key`]) is open,
/// polling every 2 ms; bounded (60 s) in case the test failed.
pub fn wait_for_gate(path: &str) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::path::Path::new(path).exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A pool of `n` worker processes with the default settings.
pub fn pool(n: usize) -> procpool::Pool {
    procpool::Pool::builder()
        .processes(n)
        .build()
        .expect("building the pool")
}

/// A path under the temp dir, unique to this process and call (its name holds
/// `tag`, this process's pid and a counter); it and its `.tmp` sibling (see
/// [`write_pid`]) are removed on creation and on drop.
pub struct TempPath(pub std::path::PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> TempPath {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("procpool-tmp-{tag}-{}-{n}", std::process::id()));
        let t = TempPath(p);
        t.clean();
        t
    }

    /// The path, to send to a task.
    pub fn string(&self) -> String {
        self.0.to_str().expect("utf-8 temp path").to_string()
    }

    pub fn exists(&self) -> bool {
        self.0.exists()
    }

    /// The pid that [`write_pid`] left in the file, once it has.
    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }

    /// Creates the file, empty (for a task polling for it).
    pub fn create(&self) {
        std::fs::write(&self.0, b"").expect("creating a gate file");
    }

    fn clean(&self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(format!("{}.tmp", self.0.display()));
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        self.clean();
    }
}

/// In a worker: writes this process's pid into `path` atomically (write,
/// then rename), for [`TempPath::read_pid`].
pub fn write_pid(path: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).expect("writing a marker");
    std::fs::rename(&tmp, path).expect("renaming a marker");
}

/// What a helper run of this test binary ended with.
pub struct HelperRun {
    /// The exit status; `None` if the run passed its deadline and was killed.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs this test binary again with only test `name` (a [`test_name!`]: an
/// `#[ignore]`d helper test, which a plain run of the suite skips), `envs`
/// added to its environment, and a deadline: a run still going at the
/// deadline is killed (it is our own child) and reported with `status:
/// None`. For tests that need a fresh process (its own environment or
/// threads) or that must show a hang without hanging.
pub fn run_helper(name: &str, envs: &[(&str, &str)], deadline: std::time::Duration) -> HelperRun {
    let exe = std::env::current_exe().expect("current_exe");
    run_program_with_deadline(
        Command::new(exe)
            .args([name, "--exact", "--ignored", "--nocapture"])
            .arg("--test-threads=1")
            .envs(envs.iter().copied()),
        deadline,
    )
}

/// Runs a prepared command to its end, or kills it at `deadline`.
pub fn run_program_with_deadline(cmd: &mut Command, deadline: std::time::Duration) -> HelperRun {
    use std::io::Read;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // A program file just written may be busy for a moment (ETXTBSY): a
    // process forked by another thread meanwhile holds it open for writing
    // until it execs.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.expect("starting a helper run"),
        }
    };
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let end = std::time::Instant::now() + deadline;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for a helper run") {
            break Some(st);
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    HelperRun {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// What /proc/<pid>/stat says of a process: its state letter, parent and
/// process group (None once it is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

pub fn stat(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse
    // after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgrp })
}

/// Dead: gone, or a zombie (dead, waiting for a reaper; once its parent is
/// gone, that is init or a subreaper, which a test does not control).
pub fn dead(pid: u32) -> bool {
    !exists(pid)
        || matches!(
            stat(pid),
            None | Some(Stat {
                state: 'Z' | 'X',
                ..
            })
        )
}

/// How long a helper process may take before the test calls it hung.
pub const HELPER_BOUND: std::time::Duration = std::time::Duration::from_secs(90);

/// A helper process: this test binary run again with one `#[ignore]`d test
/// (`test`) and `PROCPOOL_HELPER=mode` in its environment, so that a test
/// can give a program a real process of its own (a process group, signal
/// dispositions set before exec, resource limits, captured stdout).
///
/// The helper reports on stdout, one `TAG rest` line at a time ([`say`]).
/// Every wait on it is bounded ([`HELPER_BOUND`]): a hung helper is killed
/// (it is this test's own child) and fails the test. Dropping it kills it
/// if it still runs.
pub struct Helper {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Lines received but not yet asked for.
    pending: Vec<String>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

pub const HELPER_ENV: &str = "PROCPOOL_HELPER";

/// In a helper test: the mode it was started in, or None when the test
/// harness runs it as a test (it then has nothing to do).
pub fn helper_mode() -> Option<String> {
    std::env::var(HELPER_ENV).ok()
}

/// In a helper: prints one report line for the test and flushes it.
pub fn say(tag: &str, rest: impl std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // On a line of its own: libtest may have printed "test name ... " before.
    writeln!(out, "\n{tag} {rest}").unwrap();
    out.flush().unwrap();
}

impl Helper {
    /// Starts helper test `test` (a [`test_name!`]) of this binary in `mode`; `configure` may
    /// set more of the command (a process group, stdin, a pre_exec hook).
    pub fn start(test: &str, mode: &str, configure: impl FnOnce(&mut Command)) -> Helper {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, mode)
        .env_remove(ISOLATED)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("starting the helper");
        let stdout = child.stdout.take().expect("the helper's stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                seen2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Helper {
            child,
            lines,
            pending: Vec::new(),
            seen,
            reader: Some(reader),
        }
    }

    /// Everything the helper printed so far.
    pub fn output(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    /// Kills the helper (our own child) and panics with `why` and its output.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("{why}; the helper printed:\n{}", self.output());
    }

    /// Waits (bounded) for the helper's next line `TAG rest` not yet taken;
    /// returns `rest`. Lines with other tags stay for later calls.
    pub fn expect(&mut self, tag: &str) -> String {
        let end = std::time::Instant::now() + HELPER_BOUND;
        let prefix = format!("{tag} ");
        if let Some(i) = self.pending.iter().position(|l| l.starts_with(&prefix)) {
            return self.pending.remove(i)[prefix.len()..].to_string();
        }
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(&prefix) {
                        return rest.to_string();
                    }
                    self.pending.push(line);
                }
                Err(e) => self.fail(&format!("no `{tag}` line from the helper ({e})")),
            }
        }
    }

    /// Waits (bounded) for the helper to exit; returns its status and
    /// everything it printed.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let end = std::time::Instant::now() + HELPER_BOUND;
        loop {
            match self.child.try_wait().expect("waiting for the helper") {
                Some(status) => {
                    if let Some(r) = self.reader.take() {
                        // Its stdout is closed once it and its children
                        // are gone; pool processes hold it too, so a
                        // process of the pool left behind fails here.
                        let until = std::time::Instant::now() + HELPER_BOUND;
                        while !r.is_finished() && std::time::Instant::now() < until {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        if !r.is_finished() {
                            panic!(
                                "the helper exited ({status}) but its stdout stayed open: \
                                 a process it started is left; it printed:\n{}",
                                self.output()
                            );
                        }
                        r.join().unwrap();
                    }
                    return (status, self.output());
                }
                None if std::time::Instant::now() >= end => {
                    self.fail("the helper did not exit in time")
                }
                None => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses a helper's `PIDS server w1 w2 ...` line.
pub fn parse_pids(line: &str) -> (u32, Vec<u32>) {
    let pids: Vec<u32> = line
        .split_whitespace()
        .map(|p| p.parse().expect("a pid"))
        .collect();
    assert!(pids.len() >= 2, "server and workers: {line}");
    (pids[0], pids[1..].to_vec())
}

/// In a helper: reports a pool's pids as a `PIDS` line.
pub fn say_pids(pool: &procpool::Pool) {
    let pids: Vec<String> = std::iter::once(pool.server_pid())
        .chain(pool.worker_pids())
        .map(|p| p.to_string())
        .collect();
    say("PIDS", pids.join(" "));
}

/// Asserts that every one of `pids` is dead within a bounded wait.
pub fn assert_dead(pids: &[u32], what: &str) {
    let all = eventually(|| pids.iter().all(|&p| dead(p)));
    let alive: Vec<(u32, Option<Stat>)> = pids
        .iter()
        .filter(|&&p| !dead(p))
        .map(|&p| (p, stat(p)))
        .collect();
    assert!(all, "{what}: still alive (pid, stat): {alive:?}");
}

/// How long a test body under [`bounded`] may run: far more than any test
/// takes on a loaded two-core machine, and short enough that a hang is
/// named within a couple of minutes.
pub const TEST_BOUND: std::time::Duration = std::time::Duration::from_secs(120);

/// The name of the test this thread runs (the harness names each test's
/// thread after it: `apply::my_test`), for a message.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a test on an unnamed thread")
        .to_string()
}

/// Runs a test's body under [`TEST_BOUND`]: `#[test] fn t() {
/// common::bounded(|| { ... }) }`. See [`bounded_for`].
pub fn bounded<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    bounded_for(TEST_BOUND, body)
}

/// Runs a test's body on a thread of its own, named as the test, and
/// waits at most `bound` for it. A body that panics fails the test with
/// its own panic; one still running at `bound` fails it with a message
/// that names the test (its thread is left behind, and the other tests
/// of the process go on). For a test that may take long by design (a
/// helper with a long deadline of its own), with a bound above that.
pub fn bounded_for<T: Send + 'static>(
    bound: std::time::Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let name = current_test();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let _ = tx.send(body());
        })
        .expect("starting a test's thread");
    match rx.recv_timeout(bound) {
        Ok(v) => {
            let _ = thread.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body ended without a value or a panic"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("test {name} did not finish within {bound:?}: hung")
        }
    }
}

/// A watchdog for a test whose calls could hang: if the guard is still alive
/// after `bound`, the test process prints why (and the test's name) and
/// aborts, so a hang fails the run instead of eating it. Drop the guard when
/// the risky part is done. [`bounded`] fails only the test; this is for a
/// bound on a part of one, where the whole process may end.
pub struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

pub fn watchdog(what: &'static str, bound: std::time::Duration) -> Watchdog {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let test = current_test();
    std::thread::spawn(move || {
        let end = std::time::Instant::now() + bound;
        while std::time::Instant::now() < end {
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !d.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("watchdog: {what} ({test}) did not finish within {bound:?}; aborting");
            std::process::abort();
        }
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Runs `f` on another thread; fails (rather than hangs) if it does not end
/// within `bound`, naming `what` and the test.
pub fn within<T: Send + 'static>(
    what: &str,
    bound: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let test = current_test();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(test.clone())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("starting a thread");
    rx.recv_timeout(bound)
        .unwrap_or_else(|e| panic!("{what} ({test}) did not finish: {e}"))
}
