//! Crash handling: every way a worker can fail (a panic, `abort`, a
//! segfault, `exit(3)`, SIGKILL from outside) in every phase of a task
//! (decoding its argument, running, encoding its result), plus a result that
//! fails to decode in the caller (the other codec errors are in
//! codec_errors.rs).
//!
//! Each case checks the exact error, that the pool has its full count of
//! workers as soon as the error is seen, and that the pool then serves more
//! tasks correctly.

use crate::common;

use crate::common::{TempPath, write_pid};

use procpool::{Error, Pool};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const WORKERS: usize = 2;
const PANIC_TEXT: &str = "crash-matrix deliberate panic";

fn sigkill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a live
    // worker of a pool this test owns (taken from worker_pids()).
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Mode {
    Panic,
    Abort,
    Segfault,
    Exit3,
    Sigkill,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Decoding,
    Running,
    Encoding,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Spec {
    mode: Mode,
    phase: Phase,
    marker: String,
    value: u64,
}

/// No core files from the deliberate crashes, whatever the machine's limit
/// (called in the worker that is about to crash).
fn no_core_files() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// Fails the way `spec` says (in the worker). Writes the worker's pid to the
/// marker first. Returns only if the failure did not happen (or, for
/// `Sigkill`, if nobody killed the worker within 30 s).
fn fail(spec: &Spec) {
    write_pid(&spec.marker);
    no_core_files();
    match spec.mode {
        Mode::Panic => panic!("{PANIC_TEXT} while {:?}", spec.phase),
        Mode::Abort => std::process::abort(),
        Mode::Segfault => {
            // A store through a null pointer: the worker dies of SIGSEGV
            // (the test checks the signal, so an abort instead would fail it).
            let p = std::ptr::null_mut::<i32>();
            // SAFETY: deliberately not safe: this write must crash the worker.
            unsafe { p.write_volatile(1) };
        }
        Mode::Exit3 => std::process::exit(3),
        Mode::Sigkill => std::thread::sleep(Duration::from_secs(30)),
    }
}

/// The argument: its `Deserialize` (in the worker) fails in the decoding phase.
struct Arg(Spec);

impl Serialize for Arg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Arg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = Spec::deserialize(d)?;
        if spec.phase == Phase::Decoding {
            fail(&spec);
        }
        Ok(Arg(spec))
    }
}

/// The result: its `Serialize` (in the worker) fails in the encoding phase.
#[derive(Debug)]
struct Res {
    value: u64,
    spec: Option<Spec>,
}

impl Serialize for Res {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let Some(spec) = &self.spec
            && spec.phase == Phase::Encoding
        {
            fail(spec);
        }
        s.serialize_u64(self.value)
    }
}

impl<'de> Deserialize<'de> for Res {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Res {
            value: u64::deserialize(d)?,
            spec: None,
        })
    }
}

fn crash_task(arg: Arg) -> Res {
    let spec = arg.0;
    if spec.phase == Phase::Running {
        fail(&spec);
    }
    Res {
        value: spec.value * 2,
        spec: Some(spec),
    }
}

fn double(x: u64) -> u64 {
    x * 2
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

/// The pool serves 100 more tasks, each correctly.
fn serves_100(pool: &Pool) {
    let rs: Vec<_> = (0..100u64)
        .map(|i| pool.apply_async(double, i).expect("submitting"))
        .collect();
    for (i, r) in rs.into_iter().enumerate() {
        assert_eq!(r.get().expect("a task after the crash"), 2 * i as u64);
    }
}

fn run_case(mode: Mode, phase: Phase) {
    let pool = Pool::builder().processes(WORKERS).build().unwrap();
    let before = pool.worker_pids();
    assert_eq!(before.len(), WORKERS);
    let marker = TempPath::new(&format!("{mode:?}-{phase:?}"));
    let spec = Spec {
        mode,
        phase,
        marker: marker.string(),
        value: 21,
    };
    let r = pool.apply_async(crash_task, Arg(spec)).unwrap();
    if mode == Mode::Sigkill {
        assert!(
            common::eventually(|| marker.read_pid().is_some()),
            "the task never reached the {phase:?} phase"
        );
        let pid = marker.read_pid().unwrap();
        assert!(
            pool.worker_pids().contains(&pid),
            "the task ran in {pid}, not one of the pool's workers {:?}",
            pool.worker_pids()
        );
        sigkill(pid);
    }
    // A liveness bound, not a timing check: a worker that never answers
    // (deadlocked, say) fails the test instead of hanging it.
    assert!(
        r.wait_timeout(Duration::from_secs(60)),
        "the task never resolved: its worker hangs"
    );
    let res = r.get();
    // The library promises the replacement exists once the error is seen.
    let after = pool.worker_pids();
    assert_eq!(
        after.len(),
        WORKERS,
        "worker count right after the error ({res:?}): {after:?}"
    );
    let worker = marker
        .read_pid()
        .expect("the task wrote its pid before failing");
    assert!(
        before.contains(&worker),
        "{worker} was not a worker: {before:?}"
    );
    match mode {
        Mode::Panic => {
            match &res {
                Err(Error::TaskPanicked { message, .. }) => assert!(
                    message.contains(PANIC_TEXT) && message.contains(&format!("{phase:?}")),
                    "panic message {message:?}"
                ),
                other => panic!("expected TaskPanicked, got {other:?}"),
            }
            assert_eq!(
                sorted(after),
                sorted(before),
                "a panic must not cost a worker"
            );
        }
        _ => {
            let (want_signal, want_code) = match mode {
                Mode::Abort => (Some(libc::SIGABRT), None),
                Mode::Segfault => (Some(libc::SIGSEGV), None),
                Mode::Exit3 => (None, Some(3)),
                Mode::Sigkill => (Some(libc::SIGKILL), None),
                Mode::Panic => unreachable!(),
            };
            match &res {
                Err(Error::WorkerLost { pid, status, .. }) => {
                    assert_eq!(*pid, worker, "the lost worker's pid");
                    assert_eq!(status.signal(), want_signal, "signal of {status}");
                    assert_eq!(status.code(), want_code, "exit code of {status}");
                }
                other => panic!("expected WorkerLost, got {other:?}"),
            }
            assert!(
                !after.contains(&worker),
                "the dead worker {worker} is still listed: {after:?}"
            );
        }
    }
    serves_100(&pool);
}

macro_rules! crash_cases {
    ($($name:ident: $mode:ident, $phase:ident;)*) => {
        $(
            #[test]
            fn $name() {
                common::bounded(|| run_case(Mode::$mode, Phase::$phase));
            }
        )*
    };
}

crash_cases! {
    panic_while_decoding: Panic, Decoding;
    panic_while_running: Panic, Running;
    panic_while_encoding: Panic, Encoding;
    abort_while_decoding: Abort, Decoding;
    abort_while_running: Abort, Running;
    abort_while_encoding: Abort, Encoding;
    segfault_while_decoding: Segfault, Decoding;
    segfault_while_running: Segfault, Running;
    segfault_while_encoding: Segfault, Encoding;
    exit3_while_decoding: Exit3, Decoding;
    exit3_while_running: Exit3, Running;
    exit3_while_encoding: Exit3, Encoding;
    sigkill_while_decoding: Sigkill, Decoding;
    sigkill_while_running: Sigkill, Running;
    sigkill_while_encoding: Sigkill, Encoding;
}

// ---- a result that fails to decode in the caller (no crash) ----

const REFUSE: &str = "crash-matrix refuses";

/// A result that encodes fine in the worker and refuses to decode in the caller.
struct Undecodable(u64);

impl Serialize for Undecodable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Undecodable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _ = u64::deserialize(d)?;
        Err(D::Error::custom(format!("{REFUSE} to decode this result")))
    }
}

fn undecodable_task(x: u64) -> Undecodable {
    Undecodable(x)
}

#[test]
fn result_that_fails_to_decode_in_the_caller() {
    common::bounded(|| {
        let pool = Pool::builder().processes(WORKERS).build().unwrap();
        let before = pool.worker_pids();
        match pool.apply(undecodable_task, 5).map(|u| u.0) {
            Err(Error::Decode { what, source, .. }) => {
                assert_eq!(what, "result");
                assert!(
                    source.message().contains(REFUSE),
                    "the Deserialize error's message is lost: {source}"
                );
            }
            other => panic!("expected Decode {{ what: \"result\" }}, got {other:?}"),
        }
        // Nothing died: the same workers serve on.
        assert_eq!(sorted(pool.worker_pids()), sorted(before));
        serves_100(&pool);
    })
}

// ---- a crash inside a stream of tasks ----

fn abort_on_7(x: u64) -> u64 {
    if x == 7 {
        no_core_files();
        std::process::abort();
    }
    x * 2
}

/// A worker that dies fails only the item it was running: the items it had
/// finished before still give their values, and those sent to it behind that
/// one run elsewhere and succeed.
#[test]
fn crash_in_imap_fails_only_that_item() {
    common::bounded(|| {
        let pool = Pool::builder().processes(WORKERS).build().unwrap();
        let out: Vec<_> = pool.imap(abort_on_7, 0..40u64).collect();
        assert_eq!(out.len(), 40);
        let mut wrong = Vec::new();
        for (i, r) in out.into_iter().enumerate() {
            let ok = match &r {
                Err(Error::WorkerLost { status, .. }) if i == 7 => {
                    status.signal() == Some(libc::SIGABRT)
                }
                Ok(v) if i != 7 => *v == 2 * i as u64,
                _ => false,
            };
            if !ok {
                wrong.push((i, r));
            }
        }
        assert!(
            wrong.is_empty(),
            "item 7 must be WorkerLost(SIGABRT) and every other item its value; wrong: {wrong:?}"
        );
        assert_eq!(pool.worker_pids().len(), WORKERS);
        serves_100(&pool);
    })
}

// ---- a panic in a worker forked while another thread held a std lock ----

fn panics(_: u64) -> u64 {
    panic!("{PANIC_TEXT} (after a fork)");
}

/// The fork server is forked from a process with many threads. If one of
/// them is inside the standard library's backtrace machinery at that moment
/// (a panic being reported on another thread, a `Backtrace` being
/// resolved), the lock it holds is copied, held, into the server and every
/// worker; a task that panics then blocks in the panic hook for ever instead
/// of becoming `TaskPanicked`.
#[test]
fn a_panicking_task_resolves_even_if_another_thread_was_reporting_a_backtrace() {
    common::bounded(|| {
        if common::isolated(&test_name!(
            "a_panicking_task_resolves_even_if_another_thread_was_reporting_a_backtrace"
        )) {
            return;
        }
        /// Stops the backtrace thread when dropped, even if the test panics.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let b = std::backtrace::Backtrace::force_capture();
                    let _ = b.to_string();
                }
            });
            let _stop = Stop(&stop);
            for round in 0..20 {
                let pool = Pool::builder().processes(1).build().unwrap();
                let r = pool.apply_async(panics, round).unwrap();
                // A liveness bound, not a timing check (a panicking task takes
                // milliseconds).
                assert!(
                    r.wait_timeout(Duration::from_secs(10)),
                    "round {round}: a panicking task never resolved (its worker hangs)"
                );
                match r.get() {
                    Err(Error::TaskPanicked { message, .. }) => {
                        assert!(message.contains(PANIC_TEXT))
                    }
                    other => panic!("round {round}: expected TaskPanicked, got {other:?}"),
                }
            }
        });
    })
}
