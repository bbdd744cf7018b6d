//! The two start methods: an exec'd fork server (the default), safe in a
//! program whose other threads hold locks, and a fork of the caller, which
//! shares the caller's memory.

use crate::common;

use procpool::{Error, Pool, StartMethod};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BOTH: [StartMethod; 2] = [StartMethod::ForkServer, StartMethod::Fork];

fn pool_with(method: StartMethod, n: usize) -> Pool {
    Pool::builder()
        .processes(n)
        .start_method(method)
        .build()
        .expect("building the pool")
}

// ---------------------------------------------------------------------------
// Locks held by other threads of the host
// ---------------------------------------------------------------------------

static SHARED: Mutex<u64> = Mutex::new(0);

/// In a worker: takes the locks the hammering threads take (the environment,
/// a global Mutex, the allocator).
fn take_the_locks(_: ()) -> usize {
    std::hint::black_box(std::env::var("PROCPOOL_HAMMER").ok());
    *SHARED.lock().unwrap() += 1;
    let heap: Vec<u8> = vec![1; 4096];
    heap.len()
}

/// Three threads that take std's environment lock (to write and to read), a
/// global Mutex and the allocator, without pause, until the process ends.
fn start_hammering() {
    std::thread::spawn(|| {
        let mut i = 0u64;
        loop {
            // SAFETY: this helper process reads and writes its environment
            // only through std (set_var/var), which serialises those calls
            // with its environment lock; no thread reads it through libc.
            unsafe { std::env::set_var("PROCPOOL_HAMMER", (i % 16).to_string()) };
            // A few values only: glibc keeps every distinct string it was
            // given, so endless new values would grow memory without bound.
            i += 1;
        }
    });
    std::thread::spawn(|| {
        loop {
            std::hint::black_box(std::env::var("PROCPOOL_HAMMER").ok());
        }
    });
    std::thread::spawn(|| {
        loop {
            let mut g = SHARED.lock().unwrap();
            *g += 1;
            let v: Vec<u64> = vec![*g; 64];
            std::hint::black_box(&v);
            drop(g);
        }
    });
}

/// Helper mode: builds `PROCPOOL_HAMMER_POOLS` pools one after another with
/// the hammering threads running, each running one task that takes the
/// same locks; prints `HUNG` and exits at the first task that does not
/// finish within 10 s, else prints `ALL DONE`. With `PROCPOOL_HAMMER_COUNT`
/// set it goes on instead, and prints how many hung (the README's figure).
#[test]
#[ignore = "a helper: run by pools_built_while_threads_hammer_locks_all_work_with_the_fork_server and the_same_program_hangs_with_fork"]
fn hammer_helper() {
    common::bounded(|| {
        let Ok(pools) = std::env::var("PROCPOOL_HAMMER_POOLS") else {
            return;
        };
        let pools: usize = pools.parse().unwrap();
        let count = std::env::var_os("PROCPOOL_HAMMER_COUNT").is_some();
        let mut hung = 0;
        start_hammering();
        for i in 0..pools {
            let pool = Pool::builder()
                .processes(2)
                .build()
                .expect("building the pool");
            let r = pool.apply_async(take_the_locks, ()).expect("submitting");
            if !r.wait_timeout(Duration::from_secs(if count { 2 } else { 10 })) {
                if count {
                    hung += 1;
                    continue;
                }
                println!("HUNG at pool {i}");
                // Leave at once: the hammering threads never stop, and the pool's
                // processes see end-of-file and exit.
                std::process::exit(0);
            }
            assert_eq!(r.get().expect("the task"), 4096);
        }
        if count {
            println!("COUNT {hung} of {pools} pools hung");
            std::process::exit(0);
        }
        println!("ALL DONE");
    })
}

#[test]
fn pools_built_while_threads_hammer_locks_all_work_with_the_fork_server() {
    common::bounded(|| {
        let run = common::run_helper(
            &test_name!("hammer_helper"),
            &[
                ("PROCPOOL_HAMMER_POOLS", "40"),
                ("PROCPOOL_START_METHOD", "forkserver"),
            ],
            Duration::from_secs(300),
        );
        assert!(run.status.is_some(), "the run hung:\n{}", run.stdout);
        assert!(
            run.stdout.contains("ALL DONE") && !run.stdout.contains("HUNG"),
            "a pool hung under ForkServer:\n{}\n{}",
            run.stdout,
            run.stderr
        );
    })
}

#[test]
fn the_same_program_hangs_with_fork() {
    common::bounded_for(Duration::from_secs(300), || {
        // Shows that the test above can catch the hang: under Fork, a lock that
        // a hammering thread held at the fork stays held in the workers.
        let run = common::run_helper(
            &test_name!("hammer_helper"),
            &[
                ("PROCPOOL_HAMMER_POOLS", "300"),
                ("PROCPOOL_START_METHOD", "fork"),
            ],
            Duration::from_secs(240),
        );
        assert!(
            run.status.is_none() || run.stdout.contains("HUNG"),
            "no pool hung under Fork:\n{}\n{}",
            run.stdout,
            run.stderr
        );
    })
}

// ---------------------------------------------------------------------------
// What a worker inherits
// ---------------------------------------------------------------------------

static SET_BEFORE_BUILD: AtomicU64 = AtomicU64::new(0);

fn read_static(_: ()) -> u64 {
    SET_BEFORE_BUILD.load(Ordering::SeqCst)
}

#[test]
fn a_static_set_before_build_is_seen_by_fork_workers_only() {
    common::bounded(|| {
        SET_BEFORE_BUILD.store(42, Ordering::SeqCst);
        let fork = pool_with(StartMethod::Fork, 1);
        assert_eq!(fork.apply(read_static, ()).unwrap(), 42);
        let server = pool_with(StartMethod::ForkServer, 1);
        assert_eq!(server.apply(read_static, ()).unwrap(), 0);
    })
}

static INIT_RUNS: AtomicU64 = AtomicU64::new(0);

fn count_init(path: String) {
    INIT_RUNS.fetch_add(1, Ordering::SeqCst);
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("opening the log");
    // One write per line, so that workers' lines do not interleave.
    f.write_all(format!("{}\n", std::process::id()).as_bytes())
        .expect("writing the log");
}

fn init_runs(_: ()) -> (u32, u64) {
    std::thread::sleep(Duration::from_millis(20));
    (std::process::id(), INIT_RUNS.load(Ordering::SeqCst))
}

#[test]
fn the_initializer_runs_once_in_each_worker_under_both_methods() {
    common::bounded(|| {
        for method in BOTH {
            let log = common::TempPath::new("init-once");
            let pool = Pool::builder()
                .processes(3)
                .start_method(method)
                .initializer(count_init, log.string())
                .build()
                .expect("building the pool");
            let seen = pool.map(init_runs, vec![(); 12]).unwrap();
            assert!(seen.iter().all(|&(_, n)| n == 1), "{method:?}: {seen:?}");
            let workers = pool.worker_pids();
            pool.close();
            pool.join().unwrap();
            let mut logged: Vec<u32> = std::fs::read_to_string(&log.0)
                .unwrap()
                .lines()
                .map(|l| {
                    l.parse()
                        .unwrap_or_else(|_| panic!("{method:?}: log line {l:?}"))
                })
                .collect();
            logged.sort_unstable();
            let mut expected = workers.clone();
            expected.sort_unstable();
            assert_eq!(logged, expected, "{method:?}: one line per worker");
        }
    })
}

fn env_marker(_: ()) -> Option<String> {
    std::env::var("PROCPOOL_FORK_SERVER").ok()
}

#[test]
fn a_worker_does_not_see_the_server_marker() {
    common::bounded(|| {
        for method in BOTH {
            let pool = pool_with(method, 1);
            assert_eq!(pool.apply(env_marker, ()).unwrap(), None, "{method:?}");
        }
    })
}

/// A constructor of the test program, as `inventory`-style registries have:
/// it must have run in the exec'd server too.
static CONSTRUCTED: AtomicU64 = AtomicU64::new(0);

extern "C" fn test_constructor() {
    CONSTRUCTED.store(7, Ordering::SeqCst);
}

#[used]
#[unsafe(link_section = ".init_array")]
static TEST_CONSTRUCTOR: extern "C" fn() = test_constructor;

fn constructed(_: ()) -> u64 {
    CONSTRUCTED.load(Ordering::SeqCst)
}

#[test]
fn the_programs_constructors_have_run_in_workers() {
    common::bounded(|| {
        for method in BOTH {
            let pool = pool_with(method, 1);
            assert_eq!(pool.apply(constructed, ()).unwrap(), 7, "{method:?}");
        }
    })
}

fn write_to_a_closed_socket(_: ()) -> String {
    use std::io::Write;
    let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(b);
    match a.write_all(b"x") {
        Ok(()) => "written".into(),
        Err(e) => format!("{:?}", e.kind()),
    }
}

#[test]
fn sigpipe_is_ignored_in_workers_as_in_a_rust_program() {
    common::bounded(|| {
        for method in BOTH {
            let pool = pool_with(method, 1);
            assert_eq!(
                pool.apply(write_to_a_closed_socket, ()).unwrap(),
                "BrokenPipe",
                "{method:?}"
            );
        }
    })
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(frame[3] + 1) + frame[5]
}

#[test]
fn a_stack_overflow_aborts_its_worker_under_both_methods() {
    common::bounded(|| {
        use std::os::unix::process::ExitStatusExt;
        for method in BOTH {
            // Its stderr through the pool, and dropped: std's report of the
            // overflow is not printed in the test's output.
            let pool = Pool::builder()
                .processes(1)
                .start_method(method)
                .stderr(procpool::Output::Null)
                .build()
                .expect("building the pool");
            match pool.apply(recurse, 0) {
                Err(Error::WorkerLost { status, .. }) => {
                    assert_eq!(status.signal(), Some(libc::SIGABRT), "{method:?}: {status}")
                }
                other => panic!("{method:?}: {other:?}"),
            }
            assert_eq!(
                pool.apply(square, 4).unwrap(),
                16,
                "{method:?}: the pool goes on"
            );
        }
    })
}

fn panics(_: ()) -> u32 {
    panic!("on purpose")
}

#[test]
fn a_panic_comes_back_under_both_methods() {
    common::bounded(|| {
        for method in BOTH {
            let pool = pool_with(method, 1);
            match pool.apply(panics, ()) {
                Err(Error::TaskPanicked { message, .. }) => assert!(message.contains("on purpose")),
                other => panic!("{method:?}: {other:?}"),
            }
        }
    })
}

// ---------------------------------------------------------------------------
// What the exec'd server holds
// ---------------------------------------------------------------------------

fn open_fds_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{}={target}", e.file_name().to_string_lossy())
        })
        .collect()
}

#[test]
fn the_exec_server_holds_only_stdio_its_socket_words_and_signalfd() {
    common::bounded(|| {
        // A file the test leaves open without close-on-exec, as a C library might.
        let f = common::TempPath::new("held-fd");
        std::fs::write(&f.0, b"secret").unwrap();
        let file = std::fs::File::open(&f.0).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: dup of an open fd; the copy is closed below.
        let copy = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(copy >= 0);
        let pool = pool_with(StartMethod::ForkServer, 1);
        // Eventually: just after a spawn, the server may not have closed its
        // copy of the worker's socket yet (it sends it, then closes it).
        let server = pool.server_pid();
        common::eventually(|| open_fds_of(server).len() <= 6);
        let fds = open_fds_of(server);
        // SAFETY: closes the copy made above, which nothing else owns.
        unsafe { libc::close(copy) };
        assert!(
            fds.len() <= 6,
            "the server holds more than stdio, its socket and the words: {fds:?}"
        );
        assert!(
            !fds.iter().any(|p| p.contains("held-fd")),
            "the server inherited the host's file: {fds:?}"
        );
        let worker = pool.worker_pids()[0];
        assert!(!open_fds_of(worker).iter().any(|p| p.contains("held-fd")));
    })
}

// ---------------------------------------------------------------------------
// The program's executable
// ---------------------------------------------------------------------------

fn pid_of_worker(_: ()) -> u32 {
    std::process::id()
}

/// Helper mode: deletes or replaces this copy of the binary, then builds a
/// pool and runs a task in it.
#[test]
#[ignore = "a helper: run by a_deleted_or_replaced_program_still_builds_pools"]
fn changed_binary_helper() {
    common::bounded(|| {
        let Ok(how) = std::env::var("PROCPOOL_CHANGE_BINARY") else {
            return;
        };
        let me = std::env::current_exe().unwrap();
        match how.as_str() {
            "delete" => std::fs::remove_file(&me).unwrap(),
            _ => {
                let tmp = me.with_extension("new");
                std::fs::write(&tmp, b"#!/bin/sh\nexit 99\n").unwrap();
                std::fs::rename(&tmp, &me).unwrap();
            }
        }
        let pool = Pool::builder()
            .processes(1)
            .start_method(StartMethod::ForkServer)
            .build()
            .expect("building a pool after the binary changed");
        let pid = pool.apply(pid_of_worker, ()).expect("running a task");
        assert_ne!(pid, std::process::id());
        println!("POOL OK");
    })
}

#[test]
fn a_deleted_or_replaced_program_still_builds_pools() {
    common::bounded(|| {
        let dir = common::TempPath::new("binary-copy");
        std::fs::create_dir_all(&dir.0).unwrap();
        for how in ["delete", "replace"] {
            let copy = dir.0.join(format!("copy-{how}"));
            std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
            let run = common::run_program_with_deadline(
                std::process::Command::new(&copy)
                    .args([
                        &test_name!("changed_binary_helper"),
                        "--exact",
                        "--ignored",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env("PROCPOOL_CHANGE_BINARY", how),
                Duration::from_secs(120),
            );
            let _ = std::fs::remove_file(&copy);
            assert!(
                run.status.is_some_and(|s| s.success()) && run.stdout.contains("POOL OK"),
                "{how}: {:?}\n{}\n{}",
                run.status,
                run.stdout,
                run.stderr
            );
        }
        let _ = std::fs::remove_dir_all(&dir.0);
    })
}

#[test]
fn a_task_from_outside_the_executable_is_refused() {
    common::bounded(|| {
        // A function of the C library (a shared object): its offset from the
        // crate's anchor would mean nothing in the exec'd server.
        // SAFETY: the pointer is only compared against the executable's address
        // ranges and refused; it is never called.
        let foreign: fn(u64) -> u64 = unsafe { std::mem::transmute(libc::labs as *const ()) };
        let pool = pool_with(StartMethod::ForkServer, 1);
        match pool.apply(foreign, 3) {
            Err(Error::Config(msg)) => assert!(msg.contains("shared library"), "{msg}"),
            other => panic!("a foreign function was accepted: {other:?}"),
        }
        match pool.map(foreign, [1, 2]) {
            Err(Error::Config(_)) => {}
            other => panic!("a foreign function was accepted by map: {other:?}"),
        }
        // The pool goes on.
        assert_eq!(pool.apply(square, 3).unwrap(), 9);
    })
}

/// Helper mode: builds a pool with the environment as given and prints the
/// outcome.
#[test]
#[ignore = "a helper: run by procpool_start_method_sets_the_default"]
fn env_default_helper() {
    common::bounded(|| {
        if std::env::var_os("PROCPOOL_ENV_HELPER").is_none() {
            return;
        }
        SET_BEFORE_BUILD.store(5, Ordering::SeqCst);
        match Pool::builder().processes(1).build() {
            Ok(pool) => println!("VALUE {}", pool.apply(read_static, ()).unwrap()),
            Err(e) => println!("ERROR {e:?}"),
        }
    })
}

#[test]
fn procpool_start_method_sets_the_default() {
    common::bounded(|| {
        let cases = [
            ("fork", "VALUE 5"),
            ("forkserver", "VALUE 0"),
            ("bogus", "ERROR Config"),
        ];
        for (value, expect) in cases {
            let run = common::run_helper(
                &test_name!("env_default_helper"),
                &[
                    ("PROCPOOL_ENV_HELPER", "1"),
                    ("PROCPOOL_START_METHOD", value),
                ],
                Duration::from_secs(120),
            );
            assert!(
                run.stdout.contains(expect),
                "{value}: {}\n{}",
                run.stdout,
                run.stderr
            );
        }
    })
}

fn env_and_cwd(_: ()) -> (Option<String>, String) {
    (
        std::env::var("PROCPOOL_SET_AT_RUN_TIME").ok(),
        std::env::current_dir()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    )
}

/// Helper mode: sets a variable and the working directory at run time,
/// then builds a pool and prints what its worker sees.
#[test]
#[ignore = "a helper: run by the_server_starts_from_the_callers_environment_and_directory_at_build"]
fn env_and_cwd_helper() {
    common::bounded(|| {
        let Ok(dir) = std::env::var("PROCPOOL_CWD_HELPER") else {
            return;
        };
        // SAFETY: no other thread of this helper process reads the
        // environment: the harness runs it with --test-threads=1, its test
        // thread only waits for this one (common::bounded), and no pool
        // exists yet.
        unsafe { std::env::set_var("PROCPOOL_SET_AT_RUN_TIME", "yes") };
        std::env::set_current_dir(&dir).unwrap();
        for method in BOTH {
            let pool = pool_with(method, 1);
            let (var, cwd) = pool.apply(env_and_cwd, ()).unwrap();
            println!("{method:?} VAR {var:?} CWD {cwd}");
        }
    })
}

#[test]
fn the_server_starts_from_the_callers_environment_and_directory_at_build() {
    common::bounded(|| {
        let dir = common::TempPath::new("cwd");
        std::fs::create_dir_all(&dir.0).unwrap();
        let dir_s = dir.0.canonicalize().unwrap().to_string_lossy().into_owned();
        let run = common::run_helper(
            &test_name!("env_and_cwd_helper"),
            &[("PROCPOOL_CWD_HELPER", &dir_s)],
            Duration::from_secs(120),
        );
        let _ = std::fs::remove_dir_all(&dir.0);
        for method in ["ForkServer", "Fork"] {
            let line = format!("{method} VAR Some(\"yes\") CWD {dir_s}");
            assert!(
                run.stdout.contains(&line),
                "missing {line:?}:\n{}\n{}",
                run.stdout,
                run.stderr
            );
        }
    })
}

/// Helper mode: closes stdin (so the pool's first fds get low numbers),
/// then builds pools under both methods.
#[test]
#[ignore = "a helper: run by a_program_with_stdin_closed_builds_pools"]
fn closed_stdin_helper() {
    common::bounded(|| {
        if std::env::var_os("PROCPOOL_CLOSED_STDIN").is_none() {
            return;
        }
        // SAFETY: fd 0 is this helper process's stdin, which nothing in it uses.
        unsafe { libc::close(0) };
        for method in BOTH {
            let pool = pool_with(method, 2);
            println!("{method:?} {}", pool.apply(square, 12).unwrap());
            pool.close();
            pool.join().unwrap();
        }
    })
}

#[test]
fn a_program_with_stdin_closed_builds_pools() {
    common::bounded(|| {
        let run = common::run_helper(
            &test_name!("closed_stdin_helper"),
            &[("PROCPOOL_CLOSED_STDIN", "1")],
            Duration::from_secs(120),
        );
        assert!(
            run.stdout.contains("ForkServer 144") && run.stdout.contains("Fork 144"),
            "{:?}\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
    })
}

#[test]
fn a_process_started_with_the_server_marker_never_runs_main() {
    common::bounded(|| {
        // The constructor takes over before main; with fds that are not open it
        // gives up at once with an exit code of its own, and main (the test
        // harness, which would print "running") never runs.
        let exe = std::env::current_exe().unwrap();
        let run = common::run_program_with_deadline(
            std::process::Command::new(exe)
                .arg("--list")
                .env("PROCPOOL_FORK_SERVER", "1000,1001,1002"),
            Duration::from_secs(60),
        );
        let status = run.status.expect("the would-be server did not exit");
        assert!(!status.success());
        assert!(!run.stdout.contains(": test"), "main ran: {}", run.stdout);
    })
}

// ---------------------------------------------------------------------------
// An async runtime
// ---------------------------------------------------------------------------

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn a_pool_built_inside_a_busy_tokio_runtime_works() {
    common::bounded(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let total = rt.block_on(async {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut busy = Vec::new();
            for _ in 0..4 {
                let stop = stop.clone();
                busy.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let v: Vec<u64> = vec![1; 128];
                        std::hint::black_box((std::env::var("HOME").ok(), v));
                        *SHARED.lock().unwrap() += 1;
                        tokio::task::yield_now().await;
                    }
                }));
            }
            let pool = Pool::builder().processes(2).build().expect("building");
            let mut sum = 0;
            for i in 0..20u64 {
                sum += pool.apply_async(square, i).unwrap().await.unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            for b in busy {
                b.await.unwrap();
            }
            sum
        });
        assert_eq!(total, (0..20u64).map(|i| i * i).sum::<u64>());
    })
}

// ---------------------------------------------------------------------------
// Inside a shared library
// ---------------------------------------------------------------------------

/// The plugin example (`examples/plugin.rs`, a cdylib), built if it is not
/// there yet (a `cargo test` of every target builds it anyway).
fn plugin_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let lib = profile_dir.join("examples").join("libplugin.so");
    if !lib.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--example", "plugin", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let run = common::run_program_with_deadline(&mut cmd, Duration::from_secs(600));
        assert!(
            run.status.is_some_and(|s| s.success()),
            "building the plugin: {}",
            run.stderr
        );
    }
    lib
}

/// Helper mode: loads the plugin and reports what each start method gives
/// inside it.
#[test]
#[ignore = "a helper: run by inside_a_shared_library_the_fork_server_refuses_clearly_and_fork_works"]
fn plugin_helper() {
    common::bounded(|| {
        let Ok(lib) = std::env::var("PROCPOOL_PLUGIN") else {
            return;
        };
        let path = std::ffi::CString::new(lib).unwrap();
        // SAFETY: dlopen of a library built from this crate's examples; its
        // constructors (procpool's own, which sees no server marker) only set
        // a flag.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        assert!(!handle.is_null(), "dlopen failed");
        // SAFETY: a symbol lookup in the handle just opened.
        let sym = unsafe { libc::dlsym(handle, c"procpool_plugin_try".as_ptr()) };
        assert!(!sym.is_null(), "no procpool_plugin_try in the plugin");
        type Try = unsafe extern "C" fn(i32, *mut u8, usize);
        // SAFETY: the symbol is the plugin's `procpool_plugin_try`, of type Try.
        let f = unsafe { std::mem::transmute::<*mut libc::c_void, Try>(sym) };
        for (name, fork) in [("ForkServer", 0), ("Fork", 1)] {
            let mut buf = vec![0u8; 1024];
            // SAFETY: buf is valid for its length, which is at least 1.
            unsafe { f(fork, buf.as_mut_ptr(), buf.len()) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            println!("{name}: {}", String::from_utf8_lossy(&buf[..end]));
        }
    })
}

#[test]
fn inside_a_shared_library_the_fork_server_refuses_clearly_and_fork_works() {
    common::bounded_for(Duration::from_secs(660), || {
        let lib = plugin_path();
        let run = common::run_helper(
            &test_name!("plugin_helper"),
            &[("PROCPOOL_PLUGIN", lib.to_str().unwrap())],
            Duration::from_secs(120),
        );
        let line = |name: &str| {
            run.stdout
                .lines()
                .find_map(|l| {
                    l.split_once(&format!("{name}: "))
                        .map(|(_, r)| r.to_string())
                })
                .unwrap_or_else(|| panic!("no {name} line:\n{}\n{}", run.stdout, run.stderr))
        };
        let server = line("ForkServer");
        assert!(
            server.starts_with("err could not start the fork server")
                && server.contains("shared library")
                && server.contains("StartMethod::Fork"),
            "{server}"
        );
        assert_eq!(line("Fork"), "ok 42");
    })
}

// ---------------------------------------------------------------------------
// A server that never comes up
// ---------------------------------------------------------------------------

/// A constructor of this test program that hangs, but only in an exec'd
/// fork server and only when asked: the server then never says hello.
extern "C" fn hang_in_server_if_asked() {
    if std::env::var_os("PROCPOOL_FORK_SERVER").is_some()
        && std::env::var_os("PROCPOOL_TEST_HANG_SERVER").is_some()
    {
        std::thread::sleep(Duration::from_secs(600));
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static HANG_CONSTRUCTOR: extern "C" fn() = hang_in_server_if_asked;

/// Helper mode: builds a pool whose server hangs before it says hello.
#[test]
#[ignore = "a helper: run by a_server_that_never_says_hello_is_an_error_not_a_hang"]
fn silent_server_helper() {
    common::bounded(|| {
        if std::env::var_os("PROCPOOL_TEST_HANG_SERVER").is_none() {
            return;
        }
        match Pool::builder()
            .processes(1)
            .start_method(StartMethod::ForkServer)
            .build()
        {
            Ok(_) => println!("BUILT"),
            Err(e) => println!("ERROR {e}"),
        }
        println!("CHILDREN {:?}", common::children());
    })
}

#[test]
fn a_server_that_never_says_hello_is_an_error_not_a_hang() {
    common::bounded(|| {
        let run = common::run_helper(
            &test_name!("silent_server_helper"),
            &[
                ("PROCPOOL_TEST_HANG_SERVER", "1"),
                ("PROCPOOL_SERVER_START_TIMEOUT_MS", "300"),
            ],
            Duration::from_secs(120),
        );
        assert!(
            run.stdout.contains("ERROR could not start the fork server")
                && run.stdout.contains("did not answer"),
            "{:?}\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        assert!(run.stdout.contains("CHILDREN []"), "{}", run.stdout);
    })
}
