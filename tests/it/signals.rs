//! The host's signals and the pool's processes: a terminal's Ctrl-C (SIGINT
//! to the whole foreground process group) is the program's to handle, never
//! the death of its pool; tasks run with a fresh program's signal state,
//! whatever the host inherited or installed; SIGCHLD ignored by the host
//! loses no worker's exit status.
//!
//! Each case runs in a helper process of its own (this binary again, one
//! `#[ignore]`d test in a mode; see `common::Helper`), started in a process
//! group of its own or with dispositions set before exec, and bounded.

use crate::common;

use crate::common::{Helper, say, say_pids};
use procpool::{Error, Pool};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

const HELPER: &str = "signals_helper";
const TASKS: u64 = 20;

// ---- the helper's side -----------------------------------------------------

/// The write end of the helper's self-pipe: its SIGINT handler writes a
/// byte there, as `ctrlc` or `signal-hook` do; the main thread reads it.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigint(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    // SAFETY: write is async-signal-safe; the buffer is a live byte.
    unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
}

/// A self-pipe and a SIGINT handler that writes to it; returns the read end.
fn install_sigint_handler() -> libc::c_int {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    // SAFETY: a zeroed sigaction given a handler that only calls write.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut()), 0);
    }
    fds[0]
}

/// Waits (bounded) until the self-pipe has a byte: the SIGINT arrived.
fn wait_for_sigint(fd: libc::c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < end {
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 100) } > 0 {
            return true;
        }
    }
    false
}

fn set_disposition(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: signal with SIG_DFL or SIG_IGN runs no code of ours.
    unsafe { libc::signal(sig, handler) };
}

/// One line of /proc/<who>/status as a signal bit mask (SigBlk, SigIgn, SigCgt).
fn sig_mask(who: &str, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{who}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{who}/status"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

fn bit(sig: libc::c_int) -> u64 {
    1 << (sig - 1)
}

/// Signals 32 and 33, which the C library keeps for itself (and which its
/// posix_spawn leaves ignored in the programs it starts): not the pool's.
const LIBC_OWN: u64 = (1 << 31) | (1 << 32);

/// A task that waits for its gate (the helper opens it once the SIGINT has
/// arrived) after saying that it started; returns its argument squared.
fn gated_square((gate, i): (String, u64)) -> u64 {
    std::fs::write(format!("{gate}.started.{i}"), b"").unwrap();
    common::wait_for_gate(&gate);
    std::thread::sleep(Duration::from_millis(10));
    i * i
}

/// 20 gated tasks on 2 workers, once two of them run.
fn start_tasks(pool: &Pool, gate: &common::Gate) -> Vec<procpool::AsyncResult<u64>> {
    let rs: Vec<_> = (0..TASKS)
        .map(|i| pool.apply_async(gated_square, (gate.key(), i)).unwrap())
        .collect();
    let started = || {
        (0..TASKS)
            .filter(|i| std::path::Path::new(&format!("{}.started.{i}", gate.key())).exists())
            .count()
    };
    assert!(common::eventually(|| started() >= 2), "no task started");
    rs
}

fn remove_markers(gate: &common::Gate) {
    for i in 0..TASKS {
        let _ = std::fs::remove_file(format!("{}.started.{i}", gate.key()));
    }
}

/// A program that handles Ctrl-C by finishing its work: close(), join(),
/// then every result. The handler goes in before or after build().
fn graceful(handler_before_build: bool) {
    let mut sigfd = None;
    if handler_before_build {
        sigfd = Some(install_sigint_handler());
    }
    let pool = Pool::builder().processes(2).build().unwrap();
    if !handler_before_build {
        sigfd = Some(install_sigint_handler());
    }
    let gate = common::Gate::new("sigint");
    let rs = start_tasks(&pool, &gate);
    say_pids(&pool);
    say("PGRP", common::stat(std::process::id()).unwrap().pgrp);
    say("READY", "");
    assert!(wait_for_sigint(sigfd.unwrap()), "no SIGINT came");
    let unfinished = rs.iter().filter(|r| !r.ready()).count();
    say("UNFINISHED_AT_SIGINT", unfinished);
    gate.open();
    pool.close();
    let joined = pool.join();
    say("JOIN", format!("{joined:?}"));
    let mut ok = 0;
    for (i, r) in rs.into_iter().enumerate() {
        match r.get() {
            Ok(v) if v == (i as u64) * (i as u64) => ok += 1,
            other => say("WRONG", format!("task {i}: {other:?}")),
        }
    }
    say("RESULTS", format!("{ok} of {TASKS}"));
    say("CHILDREN", format!("{:?}", common::children()));
    remove_markers(&gate);
}

/// A program with no SIGINT handler: Ctrl-C ends it (default action).
fn no_handler() {
    // Default SIGINT, whatever this process inherited (a script's background
    // job starts with it ignored).
    set_disposition(libc::SIGINT, libc::SIG_DFL);
    let pool = Pool::builder().processes(2).build().unwrap();
    let gate = common::Gate::new("sigint-nohandler");
    let _rs = start_tasks(&pool, &gate);
    say_pids(&pool);
    say("READY", "");
    std::thread::sleep(Duration::from_secs(60));
    say("SURVIVED", "the SIGINT did not end this process");
    remove_markers(&gate);
}

/// A task: this worker's signal state (blocked, ignored, caught).
fn signal_state(_: ()) -> (u64, u64, u64) {
    (
        sig_mask("self", "SigBlk"),
        sig_mask("self", "SigIgn"),
        sig_mask("self", "SigCgt"),
    )
}

/// A task: runs `sh -c 'sleep 5'` as a job of its own (a process group),
/// sends the job SIGINT as a terminal would, returns how sh ended.
fn child_gets_sigint(_: ()) -> (Option<i32>, Option<i32>) {
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 5"])
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting sh");
    // SAFETY: kill of the process group of the child this task started
    // (its pgid is its pid) and has not reaped.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGINT) };
    let status = child.wait().expect("waiting for sh");
    (status.signal(), status.code())
}

/// A task that reads stdin: end-of-file at once (stdin is /dev/null).
fn read_stdin(_: ()) -> (String, usize) {
    use std::io::Read;
    let link = std::fs::read_link("/proc/self/fd/0")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut buf = [0u8; 16];
    let n = std::io::stdin().lock().read(&mut buf).unwrap_or(usize::MAX);
    (link, n)
}

/// A host that inherited SIGINT and SIGQUIT ignored (set before exec), and
/// that catches SIGTERM and blocks SIGUSR1 in the thread that builds: none
/// of it reaches a task.
fn dispositions() {
    say("HOST_IGNORED", sig_mask("self", "SigIgn"));
    extern "C" fn on_term(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing; blocks a signal in this
    // thread with a local set.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let pool = Pool::builder().processes(1).build().unwrap();
    let (blk, ign, cgt) = pool.apply(signal_state, ()).unwrap();
    say("TASK_SIGNALS", format!("{blk:x} {ign:x} {cgt:x}"));
    let server = pool.server_pid().to_string();
    say(
        "SERVER_SIGNALS",
        format!(
            "{:x} {:x}",
            sig_mask(&server, "SigBlk"),
            sig_mask(&server, "SigIgn")
        ),
    );
    let (signal, code) = pool.apply(child_gets_sigint, ()).unwrap();
    say("CHILD", format!("{signal:?} {code:?}"));
    let (link, n) = pool.apply(read_stdin, ()).unwrap();
    say("STDIN", format!("{link} {n}"));
    pool.close();
    pool.join().unwrap();
}

fn exit_with(code: i32) {
    std::process::exit(code)
}

fn inc(x: u64) -> u64 {
    x + 1
}

/// A host started with SIGCHLD ignored (set before exec): a worker's death
/// is still seen, with its status, and the pool still ends.
fn sigchld_ignored() {
    say("HOST_IGNORED", sig_mask("self", "SigIgn"));
    let pool = Pool::builder().processes(2).build().unwrap();
    say_pids(&pool);
    let r = pool.apply_async(exit_with, 7).unwrap();
    if !r.wait_timeout(Duration::from_secs(30)) {
        say("HUNG", "the crashing task never resolved");
        std::process::exit(3);
    }
    match r.get() {
        Err(Error::WorkerLost { status, .. }) => say("LOST", format!("{:?}", status.code())),
        other => say("LOST", format!("unexpected: {other:?}")),
    }
    say("AFTER", pool.apply(inc, 1).unwrap());
    say_pids(&pool);
    pool.close();
    say("JOIN", format!("{:?}", pool.join()));
    say("CHILDREN", format!("{:?}", common::children()));
}

fn read_the_terminal(_: ()) -> String {
    use std::io::Read;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    {
        Err(e) => format!("open failed: {}", e.raw_os_error().unwrap_or(0)),
        Ok(mut t) => {
            let mut b = [0u8; 1];
            match t.read(&mut b) {
                Ok(n) => format!("read {n}"),
                Err(e) => format!("read failed: {e}"),
            }
        }
    }
}

/// Run under a pseudo-terminal (`script`), so that the helper has a
/// controlling terminal: a task that opens it gets an error, never a stop.
fn tty() {
    let host = std::fs::File::open("/dev/tty").is_ok();
    say("HOST_TTY", host);
    let pool = Pool::builder().processes(1).build().unwrap();
    let r = pool.apply_async(read_the_terminal, ()).unwrap();
    if r.wait_timeout(std::time::Duration::from_secs(20)) {
        say("TASK", r.get().unwrap());
    } else {
        say("TASK", "hung");
    }
}

/// Not a test of its own: the body of the helper processes of this file.
#[test]
#[ignore = "the helper process of the tests in this file"]
fn signals_helper() {
    common::bounded(|| {
        let Some(mode) = common::helper_mode() else {
            return;
        };
        match mode.as_str() {
            "handler-after-build" => graceful(false),
            "handler-before-build" => graceful(true),
            "no-handler" => no_handler(),
            "dispositions" => dispositions(),
            "sigchld-ignored" => sigchld_ignored(),
            "tty" => tty(),
            other => panic!("unknown helper mode {other}"),
        }
    })
}

// ---- the tests -------------------------------------------------------------

/// Starts the helper in a process group of its own, as a shell starts a
/// foreground job; sends SIGINT to that whole group once its tasks run, as
/// a terminal's Ctrl-C does.
fn ctrl_c(mode: &str) -> (Helper, u32, Vec<u32>) {
    let mut h = Helper::start(&test_name!(HELPER), mode, |c| {
        c.process_group(0);
    });
    let (server, workers) = common::parse_pids(&h.expect("PIDS"));
    h.expect("READY");
    let job = h.child.id() as libc::pid_t;
    // SAFETY: a signal to the process group of the helper this test started
    // (its pgid is its pid: process_group(0)).
    assert_eq!(unsafe { libc::kill(-job, libc::SIGINT) }, 0);
    (h, server, workers)
}

/// The pool's processes are in a group of their own: the server leads it.
fn assert_own_group(job: u32, server: u32, workers: &[u32]) {
    for &p in std::iter::once(&server).chain(workers) {
        let st = common::stat(p).unwrap_or_else(|| panic!("process {p} is gone"));
        assert_eq!(st.pgrp, server, "process {p}'s group (the job's is {job})");
    }
    assert_ne!(server, job);
}

fn graceful_test(mode: &str) {
    let (mut h, server, workers) = ctrl_c(mode);
    assert_eq!(h.expect("PGRP"), h.child.id().to_string());
    assert_own_group(h.child.id(), server, &workers);
    let unfinished: u64 = h.expect("UNFINISHED_AT_SIGINT").parse().unwrap();
    assert_eq!(unfinished, TASKS, "the tasks wait for the gate");
    assert_eq!(h.expect("JOIN"), "Ok(())");
    let results = h.expect("RESULTS");
    let children = h.expect("CHILDREN");
    let (status, out) = h.finish();
    assert_eq!(results, format!("{TASKS} of {TASKS}"), "{out}");
    assert_eq!(children, "[]", "{out}");
    assert!(status.success(), "{status}: {out}");
    let all: Vec<u32> = std::iter::once(server).chain(workers).collect();
    common::assert_dead(&all, "the pool's processes after close() and join()");
}

/// Ctrl-C with a handler installed after build() (as `ctrlc` or
/// `tokio::signal::ctrl_c` would be): the handler's close() + join() lets
/// all 20 tasks, running and queued, finish with their values.
#[test]
fn ctrl_c_with_a_handler_installed_after_build_finishes_every_task() {
    common::bounded(|| {
        graceful_test("handler-after-build");
    })
}

/// The same with the handler installed before build().
#[test]
fn ctrl_c_with_a_handler_installed_before_build_finishes_every_task() {
    common::bounded(|| {
        graceful_test("handler-before-build");
    })
}

/// Without a handler, Ctrl-C ends the program (SIGINT's default action),
/// and its pool's processes go with it.
#[test]
fn ctrl_c_without_a_handler_ends_the_program_and_its_pool() {
    common::bounded(|| {
        let (h, server, workers) = ctrl_c("no-handler");
        let (status, out) = h.finish();
        assert_eq!(status.signal(), Some(libc::SIGINT), "{status}: {out}");
        let all: Vec<u32> = std::iter::once(server).chain(workers).collect();
        common::assert_dead(&all, "the pool's processes after their program died");
    })
}

/// Started with SIGINT and SIGQUIT ignored, a SIGTERM handler and SIGUSR1
/// blocked: a task still has every signal unblocked, only SIGPIPE ignored
/// (as in any Rust program) and no handler but the standard library's
/// (SIGSEGV, SIGBUS); a program it runs dies of SIGINT; its stdin is
/// /dev/null.
#[test]
fn tasks_run_with_a_fresh_programs_signal_state() {
    common::bounded(|| {
        let mut h = Helper::start(&test_name!(HELPER), "dispositions", |c| {
            // SAFETY: signal() is async-signal-safe, as pre_exec requires.
            unsafe {
                c.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_IGN);
                    libc::signal(libc::SIGQUIT, libc::SIG_IGN);
                    Ok(())
                });
            }
            // Held open and never written: a task that read it would wait.
            c.stdin(std::process::Stdio::piped());
        });
        let host: u64 = h.expect("HOST_IGNORED").parse().unwrap();
        assert_eq!(
            host & (bit(libc::SIGINT) | bit(libc::SIGQUIT)),
            bit(libc::SIGINT) | bit(libc::SIGQUIT),
            "the helper was not started with SIGINT and SIGQUIT ignored"
        );
        let task = h.expect("TASK_SIGNALS");
        let server = h.expect("SERVER_SIGNALS");
        let child = h.expect("CHILD");
        let stdin = h.expect("STDIN");
        let (status, out) = h.finish();
        assert!(status.success(), "{status}: {out}");
        let v: Vec<u64> = task
            .split_whitespace()
            .map(|x| u64::from_str_radix(x, 16).unwrap() & !LIBC_OWN)
            .collect();
        assert_eq!(v[0], 0, "signals blocked in a task: {:x}", v[0]);
        assert_eq!(
            v[1],
            bit(libc::SIGPIPE),
            "signals ignored in a task: {:x}",
            v[1]
        );
        assert_eq!(
            v[2] & !(bit(libc::SIGSEGV) | bit(libc::SIGBUS)),
            0,
            "signals caught in a task: {:x}",
            v[2]
        );
        let v: Vec<u64> = server
            .split_whitespace()
            .map(|x| u64::from_str_radix(x, 16).unwrap() & !LIBC_OWN)
            .collect();
        assert_eq!(
            v[0],
            bit(libc::SIGCHLD),
            "blocked in the server: {:x}",
            v[0]
        );
        assert_eq!(
            v[1],
            bit(libc::SIGPIPE),
            "ignored in the server: {:x}",
            v[1]
        );
        assert_eq!(
            child,
            format!("Some({}) None", libc::SIGINT),
            "how `sh -c 'sleep 5'` ended after a SIGINT"
        );
        assert_eq!(stdin, "/dev/null 0", "a task's stdin");
    })
}

/// Started with SIGCHLD ignored (set before exec, so the kernel would reap
/// children and lose their status): a worker that exits still fails its
/// task with WorkerLost and its exit code, the pool replaces it, and
/// close() + join() return with nothing left.
#[test]
fn sigchld_ignored_by_the_host_loses_no_worker() {
    common::bounded(|| {
        let mut h = Helper::start(&test_name!(HELPER), "sigchld-ignored", |c| {
            // SAFETY: signal() is async-signal-safe, as pre_exec requires.
            unsafe {
                c.pre_exec(|| {
                    libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                    Ok(())
                });
            }
        });
        let host: u64 = h.expect("HOST_IGNORED").parse().unwrap();
        assert_ne!(
            host & bit(libc::SIGCHLD),
            0,
            "the helper was not started with SIGCHLD ignored"
        );
        let (server, first) = common::parse_pids(&h.expect("PIDS"));
        let lost = h.expect("LOST");
        let after = h.expect("AFTER");
        let (_, later) = common::parse_pids(&h.expect("PIDS"));
        let joined = h.expect("JOIN");
        let children = h.expect("CHILDREN");
        let (status, out) = h.finish();
        assert_eq!(lost, "Some(7)", "{out}");
        assert_eq!(after, "2", "{out}");
        assert_eq!(joined, "Ok(())", "{out}");
        assert_eq!(children, "[]", "{out}");
        assert!(status.success(), "{status}: {out}");
        let all: Vec<u32> = std::iter::once(server).chain(first).chain(later).collect();
        common::assert_dead(&all, "the pool's processes after close() and join()");
    })
}

// ---- the fork server killed from outside (in this process) ----------------

fn gated_one(gate: String) -> u64 {
    common::wait_for_gate(&gate);
    1
}

fn assert_broken_by_kill<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) -> String {
    match r {
        Err(Error::Broken { reason, .. }) => {
            assert!(
                reason.contains("the fork server exited (killed by signal 9"),
                "{what}: {reason}"
            );
            reason
        }
        other => panic!("{what}: expected Broken, got {other:?}"),
    }
}

/// The fork server SIGKILLed: the task in flight fails with Broken, saying
/// how the server ended; so does every later call, and join().
#[test]
fn a_killed_fork_server_breaks_the_pool_for_every_later_call() {
    common::bounded(|| {
        let pool = Pool::builder().processes(2).build().unwrap();
        let gate = common::Gate::new("server-killed");
        let running = pool.apply_async(gated_one, gate.key()).unwrap();
        let server = pool.server_pid();
        let workers = pool.worker_pids();
        // SAFETY: a signal to the pool's own server, a pid from its API and a
        // child of this process that has not been reaped (the pool reaps it).
        let killed = unsafe { libc::kill(server as libc::pid_t, libc::SIGKILL) };
        assert_eq!(killed, 0);
        assert!(
            running.wait_timeout(common::HELPER_BOUND),
            "the task in flight never resolved"
        );
        let reason = assert_broken_by_kill(running.get(), "the task in flight");
        let _dog = common::watchdog(
            "calls on a pool whose server was killed",
            common::HELPER_BOUND,
        );
        assert_broken_by_kill(pool.apply(inc, 1), "apply");
        assert_broken_by_kill(pool.apply_async(inc, 1).map(|_| ()), "apply_async");
        assert_broken_by_kill(pool.map(inc, 0..10), "map");
        assert_broken_by_kill(pool.map_async(inc, 0..10).map(|_| ()), "map_async");
        let first = pool.imap(inc, 0..10).next().expect("one item");
        assert_broken_by_kill(first, "imap");
        pool.close();
        assert_eq!(
            assert_broken_by_kill(pool.join(), "join"),
            reason,
            "join's error"
        );
        assert_broken_by_kill(pool.join(), "join, again");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            assert_broken_by_kill(rt.block_on(pool.join_async()), "join_async"),
            reason,
            "join_async's error"
        );
        assert_broken_by_kill(pool.apply(inc, 1), "apply after close");
        // The server was reaped (it was this process's child); the workers died
        // with it.
        assert!(!common::exists(server), "server {server} was not reaped");
        common::assert_dead(&workers, "the workers of a killed server");
        gate.open();
    })
}

/// A task that opens the program's terminal gets an error at once: the
/// pool's processes are in a session of their own, without a controlling
/// terminal, so no read or write of theirs can be stopped by SIGTTIN or
/// SIGTTOU (which, outside the terminal's foreground job, would be forever).
#[test]
fn a_task_that_opens_the_terminal_gets_an_error_not_a_stop() {
    common::bounded(|| {
        let exe = std::env::current_exe().unwrap();
        let cmdline = format!(
            "{} {} --exact --ignored --nocapture --test-threads=1",
            exe.display(),
            test_name!(HELPER)
        );
        let run = common::run_program_with_deadline(
            std::process::Command::new("script")
                .args(["-qec", &cmdline, "/dev/null"])
                .env(common::HELPER_ENV, "tty"),
            common::HELPER_BOUND,
        );
        assert!(
            run.stdout.contains("HOST_TTY true"),
            "the helper had no terminal (is `script` there?): {:?}\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        assert!(
            run.stdout
                .contains(&format!("TASK open failed: {}", libc::ENXIO)),
            "{}",
            run.stdout
        );
    })
}
