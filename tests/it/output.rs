//! Where the workers' output goes (`PoolBuilder::stdout`, `stderr`,
//! `Output`), and the crash report that comes back with a failed task's
//! error when stderr goes through the pool (`Error::last_words`).
//!
//! A test of what reaches the program's own stdout or stderr runs the pool
//! in a helper process (this binary again, one ignored test) whose stdout
//! and stderr it captures. Every test runs under a bound: a hang fails it.

use crate::common;

use procpool::{Error, Limit, Output, Pool, Sandbox, StartMethod};
use std::process::Command;
use std::time::Duration;

/// How long a test may take before it counts as hung.
const BOUND: Duration = Duration::from_secs(180);

fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    common::within(what, BOUND, f)
}

const HELPER: &str = "output_helper";

/// Runs the helper in `mode` (with `token` in its environment), its
/// stdout and stderr captured; asserts it passed.
fn run_mode(mode: &str, token: &str) -> common::HelperRun {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([&test_name!(HELPER), "--exact", "--ignored", "--nocapture"])
        .arg("--test-threads=1")
        .env(common::HELPER_ENV, mode)
        .env(TOKEN_ENV, token);
    let run = common::run_program_with_deadline(&mut cmd, BOUND);
    assert!(
        run.status.is_some_and(|s| s.success()) && run.stdout.contains("HELPER-DONE"),
        "the {mode} helper failed ({:?}):\n{}\n{}",
        run.status,
        tail(&run.stdout),
        tail(&run.stderr)
    );
    run
}

/// The end of a long output, for a message.
fn tail(s: &str) -> String {
    let from = s.len().saturating_sub(3000);
    let from = (from..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    s[from..].to_string()
}

const TOKEN_ENV: &str = "PROCPOOL_TEST_TOKEN";

/// A string no other run prints: this process's pid and a counter.
fn token() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("tok{}x{n}", std::process::id())
}

/// Not a test of its own: the body of the helper process of this file.
#[test]
#[ignore = "the helper process of the tests in this file"]
fn output_helper() {
    common::bounded(|| {
        let Some(mode) = common::helper_mode() else {
            return;
        };
        let token = std::env::var(TOKEN_ENV).expect("the token");
        // Past libtest's "test output_helper ... ", which has no newline.
        common::say("HELPER-START", "");
        match mode.as_str() {
            "long-lines" => long_lines(),
            "prefixed" => prefixed(&token),
            "null" => null(&token),
            "escapes" => escapes(&token),
            other => panic!("unknown helper mode {other}"),
        }
        common::say("HELPER-DONE", "");
    })
}

// ---- whole lines ----

/// The length of each long line's body.
const LONG: usize = 10 << 10;
const LINES_PER_TASK: usize = 40;
const TASKS: u32 = 8;

/// Prints `LINES_PER_TASK` lines of 10 KiB to stdout and to stderr, each
/// line in a few writes (so that, without the pool in between, two
/// workers' lines could mix), then a line without its newline.
fn print_long_lines(task: u32) -> u32 {
    use std::io::Write;
    let c = (b'a' + task as u8) as char;
    let body = c.to_string().repeat(LONG);
    for i in 0..LINES_PER_TASK {
        let line = format!("WL:{task}:{i}:{body}\n");
        for part in line.as_bytes().chunks(1000) {
            std::io::stdout().write_all(part).unwrap();
            std::io::stdout().flush().unwrap();
            std::io::stderr().write_all(part).unwrap();
        }
    }
    print!("PARTIAL:{task}");
    task
}

fn long_lines() {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(1)
        .stdout(Output::Lines)
        .stderr(Output::Lines)
        .build()
        .unwrap();
    let got = pool.map_with(
        print_long_lines,
        0..TASKS,
        procpool::MapOptions::new().chunksize(1),
    );
    assert_eq!(got.unwrap(), (0..TASKS).collect::<Vec<_>>());
    pool.close();
    pool.join().unwrap();
}

/// Checks that `out` holds every task's long lines, each whole.
fn check_long_lines(out: &str, what: &str) {
    let mut seen = std::collections::HashSet::new();
    for line in out.lines() {
        let Some(at) = line.find("WL:") else {
            continue;
        };
        assert_eq!(at, 0, "{what}: a line mixed with another: {}", &line[..80]);
        let mut f = line.splitn(4, ':').skip(1);
        let task: u32 = f.next().unwrap().parse().unwrap();
        let i: usize = f.next().unwrap().parse().unwrap();
        let body = f.next().unwrap();
        let c = (b'a' + task as u8) as char;
        assert!(
            body.len() == LONG && body.chars().all(|x| x == c),
            "{what}: line {task}:{i} is not whole ({} bytes)",
            body.len()
        );
        assert!(seen.insert((task, i)), "{what}: line {task}:{i} twice");
    }
    assert_eq!(seen.len(), TASKS as usize * LINES_PER_TASK, "{what}");
}

#[test]
fn two_workers_printing_long_lines_at_once_never_mix_them() {
    within("the long lines test", || {
        let run = run_mode("long-lines", &token());
        check_long_lines(&run.stdout, "stdout");
        check_long_lines(&run.stderr, "stderr");
        // A line without its newline goes out, with one, when its worker
        // ends (each worker runs one task).
        for task in 0..TASKS {
            assert!(
                run.stdout.lines().any(|l| l == format!("PARTIAL:{task}")),
                "the partial line of task {task} is missing"
            );
        }
    });
}

// ---- prefixes ----

/// Writes `line` and a newline to stdout or stderr. Not with `println!`
/// and `eprintln!`, which libtest captures in its own threads: under
/// `StartMethod::Fork` a worker is a copy of such a thread, and its
/// prints would go to the copy of the capture buffer.
fn write_line(stderr: bool, line: &str) {
    use std::io::Write;
    let line = format!("{line}\n");
    if stderr {
        std::io::stderr().write_all(line.as_bytes()).unwrap();
    } else {
        let mut out = std::io::stdout();
        out.write_all(line.as_bytes()).unwrap();
        out.flush().unwrap();
    }
}

fn say_hello(token: String) -> u32 {
    write_line(false, &format!("hello {token}"));
    write_line(true, &format!("warning {token}"));
    std::process::id()
}

fn prefixed(token: &str) {
    let pool = Pool::builder()
        .processes(2)
        .stdout(Output::PrefixedLines)
        .stderr(Output::PrefixedLines)
        .build()
        .unwrap();
    let mut pids = Vec::new();
    for _ in 0..4 {
        pids.push(pool.apply(say_hello, token.to_string()).unwrap());
    }
    pool.close();
    pool.join().unwrap();
    pids.sort_unstable();
    pids.dedup();
    common::say("PIDS", format!("{pids:?}").replace([' ', '[', ']'], ""));
}

#[test]
fn prefixed_lines_name_their_worker() {
    within("the prefix test", || {
        let token = token();
        let run = run_mode("prefixed", &token);
        let pids: Vec<u32> = run
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("PIDS "))
            .expect("the helper's PIDS line")
            .split(',')
            .map(|p| p.parse().unwrap())
            .collect();
        for (out, what) in [(&run.stdout, "hello"), (&run.stderr, "warning")] {
            let lines: Vec<&str> = out.lines().filter(|l| l.contains(&token)).collect();
            assert_eq!(lines.len(), 4, "{out}");
            for line in lines {
                let named = pids
                    .iter()
                    .any(|p| line == format!("[worker {p}] {what} {token}"));
                assert!(named, "{line:?} does not name one of {pids:?}");
            }
        }
    });
}

// ---- nothing ----

fn print_secret(token: String) {
    write_line(false, &format!("SECRET-OUT {token}"));
    write_line(true, &format!("SECRET-ERR {token}"));
}

fn abort_after_words(words: String) {
    write_line(true, &words);
    std::process::abort();
}

fn null(token: &str) {
    let pool = Pool::builder()
        .processes(1)
        .stdout(Output::Null)
        .stderr(Output::Null)
        .build()
        .unwrap();
    pool.apply(print_secret, token.to_string()).unwrap();
    // What it wrote to stderr still makes its crash report.
    let e = pool
        .apply(abort_after_words, format!("LAST-WORDS {token}"))
        .unwrap_err();
    assert!(matches!(e, Error::WorkerLost { .. }), "{e:?}");
    let words = e.last_words().expect("a crash report");
    assert!(words.ends_with(&format!("LAST-WORDS {token}")), "{words:?}");
    pool.close();
    pool.join().unwrap();
    common::say("REPORT-OK", "");
}

#[test]
fn with_null_nothing_reaches_the_programs_fds_but_the_crash_report_comes() {
    within("the null test", || {
        let token = token();
        let run = run_mode("null", &token);
        assert!(run.stdout.contains("REPORT-OK"), "{}", run.stdout);
        for out in [&run.stdout, &run.stderr] {
            assert!(
                !out.contains(&token),
                "the workers' output came out:\n{out}"
            );
        }
    });
}

// ---- crash reports ----

fn quiet(n: usize) -> Pool {
    Pool::builder()
        .processes(n)
        .stderr(Output::Null)
        .build()
        .expect("building a pool")
}

fn panic_after_words(words: String) {
    write_line(true, &words);
    panic!("the task gives up");
}

fn hang_after_words(words: String) {
    write_line(true, &words);
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn an_abort_after_a_message_reports_the_message() {
    within("the abort test", || {
        let pool = quiet(1);
        let e = pool
            .apply(abort_after_words, "assertion failed: x > 0".into())
            .unwrap_err();
        let Error::WorkerLost {
            last_words: Some(words),
            ..
        } = &e
        else {
            panic!("expected WorkerLost with a report, got {e:?}");
        };
        assert_eq!(&**words, "assertion failed: x > 0");
        // Display shows it after the cause.
        let shown = e.to_string();
        assert!(shown.starts_with("worker "), "{shown}");
        assert!(shown.ends_with("\n    assertion failed: x > 0"), "{shown}");
        // The pool goes on, and a task that writes nothing to stderr
        // before its worker dies has no report of its own.
        assert_eq!(pool.apply(double, 4).unwrap(), 8);
        let e = pool.apply(abort_after_words, String::new()).unwrap_err();
        assert!(matches!(e, Error::WorkerLost { .. }), "{e:?}");
        assert_eq!(e.last_words(), None, "{e:?}");
    });
}

fn double(x: u64) -> u64 {
    x * 2
}

#[test]
fn a_panic_after_a_message_reports_the_message() {
    within("the panic test", || {
        let pool = quiet(1);
        let e = pool
            .apply(panic_after_words, "about to give up".into())
            .unwrap_err();
        assert!(
            matches!(&e, Error::TaskPanicked { message, .. } if message == "the task gives up"),
            "{e:?}"
        );
        assert_eq!(e.last_words(), Some("about to give up"), "{e:?}");
        // The same worker goes on; its report grows with what it writes.
        let e = pool
            .apply(panic_after_words, "a second time".into())
            .unwrap_err();
        assert_eq!(
            e.last_words(),
            Some("about to give up\na second time"),
            "{e:?}"
        );
    });
}

#[test]
fn a_timeout_reports_what_the_task_wrote() {
    within("the timeout test", || {
        let pool = quiet(1);
        let opts = procpool::TaskOptions::new().timeout(Duration::from_secs(1));
        let e = pool
            .apply_with(hang_after_words, "waiting for the network".into(), opts)
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!(e.last_words(), Some("waiting for the network"), "{e:?}");
    });
}

/// Starts a child that keeps the worker's stderr open (`sleep 600`),
/// writes its pid to `path`, says so, and aborts.
fn leave_a_child_then_abort(path: String) {
    let child = Command::new("sleep")
        .arg("600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting sleep");
    std::fs::write(format!("{path}.tmp"), child.id().to_string()).unwrap();
    std::fs::rename(format!("{path}.tmp"), &path).unwrap();
    write_line(true, "leaving a child behind");
    std::process::abort();
}

/// Kills the process whose pid a task left in the file, when dropped.
struct KillLeftChild(common::TempPath);

impl Drop for KillLeftChild {
    fn drop(&mut self) {
        if let Some(pid) = self.0.read_pid() {
            // SAFETY: a signal to the `sleep` this test's task started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[test]
fn a_child_holding_the_workers_stderr_holds_up_neither_the_report_nor_join() {
    common::bounded(|| {
        let left = KillLeftChild(common::TempPath::new("output-child"));
        let path = left.0.string();
        // The child holds the pipe for 600 s: waiting for its end-of-file
        // would pass this bound.
        common::within("the held pipe test", Duration::from_secs(120), move || {
            let pool = quiet(1);
            let e = pool.apply(leave_a_child_then_abort, path).unwrap_err();
            assert!(matches!(e, Error::WorkerLost { .. }), "{e:?}");
            assert_eq!(e.last_words(), Some("leaving a child behind"), "{e:?}");
            assert_eq!(pool.apply(double, 21).unwrap(), 42);
            pool.close();
            pool.join().unwrap();
        });
        assert!(left.0.read_pid().is_some(), "the task left no child");
    })
}

fn spin_after_words(words: String) {
    write_line(true, &words);
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn sandboxed(sandbox: Sandbox, out: Output) -> Pool {
    Pool::builder()
        .processes(1)
        .start_method(StartMethod::ForkServer)
        .sandbox(sandbox)
        .stdout(out)
        .stderr(out)
        .build()
        .expect("building a sandboxed pool")
}

#[test]
fn a_sandbox_limit_reports_what_the_task_wrote() {
    within("the sandbox limit test", || {
        let cap = Duration::from_millis(200);
        let pool = sandboxed(Sandbox::new().cpu_time_per_task(cap), Output::Null);
        let e = pool
            .apply(spin_after_words, "crunching \x1b[31mnumbers".into())
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::LimitExceeded {
                    limit: Limit::CpuTime { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        // A sandboxed worker's report is untrusted: its escapes are shown.
        assert_eq!(e.last_words(), Some("crunching \\x1b[31mnumbers"), "{e:?}");
    });
}

// ---- a sandboxed worker's lines ----

fn print_escapes(token: String) {
    write_line(
        false,
        &format!("\x1b[2J\x1b]0;pwned\x07{token}\rclean \u{9b}31m"),
    );
}

fn escapes(token: &str) {
    let pool = sandboxed(Sandbox::new(), Output::Lines);
    pool.apply(print_escapes, token.to_string()).unwrap();
    pool.close();
    pool.join().unwrap();
}

#[test]
fn a_sandboxed_workers_escape_sequences_are_neutralised() {
    within("the escapes test", || {
        let token = token();
        let run = run_mode("escapes", &token);
        let line = run
            .stdout
            .lines()
            .find(|l| l.contains(&token))
            .expect("the task's line");
        let want = format!("\\x1b[2J\\x1b]0;pwned\\x07{token}\\x0dclean \\u{{9b}}31m");
        assert_eq!(line, want);
        assert!(!run.stdout.contains('\x1b'), "an escape came through");
    });
}

#[test]
fn a_sandboxed_pool_refuses_to_share_the_programs_fds() {
    within("the refusal test", || {
        for (out, err) in [(Some(Output::Inherit), None), (None, Some(Output::Inherit))] {
            let mut b = Pool::builder()
                .processes(1)
                .start_method(StartMethod::ForkServer)
                .sandbox(Sandbox::new());
            if let Some(o) = out {
                b = b.stdout(o);
            }
            if let Some(o) = err {
                b = b.stderr(o);
            }
            match b.build() {
                Err(Error::Sandbox { reason, .. }) => {
                    assert!(reason.contains("Output::Inherit"), "{reason}")
                }
                other => panic!("expected Error::Sandbox, got {:?}", other.map(|_| ())),
            }
        }
    });
}
