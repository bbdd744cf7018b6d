//! Where a task panicked: its location always, its worker's backtrace when
//! asked for (builder option or RUST_BACKTRACE), payloads that are not
//! strings, and capture that takes no lock the host may have held at the
//! fork.

use crate::common;

use procpool::{Error, MapOptions, Pool};
use std::sync::mpsc;
use std::time::Duration;

/// Generous: only there so that a hang fails the test instead.
const BOUND: Duration = Duration::from_secs(60);

const BOOM_LINE: u32 = line!() + 3;
#[inline(never)]
fn boom(x: u32) -> u32 {
    panic!("boom {x}")
}

const DEEP_LINE: u32 = line!() + 3;
#[inline(never)]
fn deep(x: u32) -> u32 {
    std::hint::black_box(x).checked_sub(100).expect("too small")
}

#[inline(never)]
fn calls_deep(x: u32) -> u32 {
    let r = deep(x);
    std::hint::black_box(r)
}

fn pool_with(backtraces: bool) -> Pool {
    Pool::builder()
        .processes(1)
        .backtraces(backtraces)
        .build()
        .expect("building the pool")
}

/// The parts of a TaskPanicked.
fn panicked(
    r: Result<u32, Error>,
) -> (
    String,
    Option<procpool::PanicLocation>,
    Option<procpool::RemoteBacktrace>,
    String,
) {
    match r {
        Err(e @ Error::TaskPanicked { .. }) => {
            let shown = e.to_string();
            let Error::TaskPanicked {
                message,
                location,
                backtrace,
                ..
            } = e
            else {
                unreachable!()
            };
            (message, location, backtrace, shown)
        }
        other => panic!("expected TaskPanicked, got {other:?}"),
    }
}

#[test]
fn a_panic_carries_its_location() {
    common::bounded(|| {
        let pool = pool_with(false);
        let (message, location, backtrace, shown) = panicked(pool.apply(boom, 3));
        assert_eq!(message, "boom 3");
        let l = location.expect("a location");
        assert!(l.file().ends_with(file!()), "{l}");
        assert_eq!((l.line(), l.column()), (BOOM_LINE, 5), "{l}");
        assert!(backtrace.is_none(), "no backtrace was asked for");
        assert_eq!(
            shown,
            format!("the task panicked at {l}: boom 3"),
            "Display shows where"
        );
        // A panic inside std (an expect) is located at the caller's line.
        let (message, location, _, _) = panicked(pool.apply(calls_deep, 5));
        assert_eq!(message, "too small");
        assert_eq!(location.expect("a location").line(), DEEP_LINE);
    })
}

#[test]
fn items_of_a_chunk_carry_their_own_location() {
    common::bounded(|| {
        let pool = pool_with(false);
        let got: Vec<Result<u32, Error>> = pool
            .imap_with(boom, 0..3u32, MapOptions::new().chunksize(3))
            .collect();
        assert_eq!(got.len(), 3);
        for (i, r) in got.into_iter().enumerate() {
            let (message, location, _, _) = panicked(r);
            assert_eq!(message, format!("boom {i}"));
            assert_eq!(location.expect("a location").line(), BOOM_LINE);
        }
    })
}

#[test]
fn a_backtrace_when_the_builder_asks_for_one() {
    common::bounded(|| {
        let pool = pool_with(true);
        let (message, location, backtrace, shown) = panicked(pool.apply(calls_deep, 5));
        assert_eq!(message, "too small");
        assert_eq!(location.unwrap().line(), DEEP_LINE);
        let bt = backtrace.expect("a backtrace");
        let frames = bt.frames();
        let names: Vec<&str> = frames.iter().filter_map(|f| f.function()).collect();
        let at = |what: &str| {
            names
                .iter()
                .position(|n| n.ends_with(what))
                .unwrap_or_else(|| panic!("no frame {what} in {names:#?}"))
        };
        // Innermost first: deep, then its caller, and the task's function last.
        let (d, c) = (at("traceback::deep"), at("traceback::calls_deep"));
        assert!(d < c, "{names:#?}");
        assert_eq!(
            c,
            frames.len() - 1,
            "the task's function ends the short trace: {names:#?}"
        );
        let deep = &frames[d];
        assert!(deep.file().is_some_and(|f| f.ends_with(file!())));
        assert_eq!(deep.line(), Some(DEEP_LINE));
        // The pool's own frames are left out of the short trace, not of all.
        assert!(
            !names.iter().any(|n| n.starts_with("procpool::")),
            "{names:#?}"
        );
        assert!(
            bt.all_frames()
                .iter()
                .any(|f| f.function().is_some_and(|n| n.contains("procpool::worker"))),
            "{bt:#}"
        );
        // Display: the message, then the backtrace, as CPython's RemoteTraceback.
        let (head, tail) = shown.split_once("\n\nworker backtrace:\n").expect(&shown);
        assert!(head.starts_with("the task panicked at "), "{shown}");
        assert!(head.ends_with(": too small"), "{shown}");
        assert!(tail.contains("traceback::calls_deep"), "{shown}");
        assert!(
            tail.contains(&format!("{}:{DEEP_LINE}", file!())),
            "{shown}"
        );
    })
}

#[test]
fn rust_backtrace_in_the_environment_turns_backtraces_on() {
    common::bounded(|| {
        if common::isolated_with_env(
            &test_name!("rust_backtrace_in_the_environment_turns_backtraces_on"),
            &[("RUST_BACKTRACE", "1")],
        ) {
            return;
        }
        let pool = common::pool(1);
        let (_, location, backtrace, _) = panicked(pool.apply(boom, 1));
        assert!(location.is_some());
        let bt = backtrace.expect("RUST_BACKTRACE=1 asks for a backtrace");
        assert!(
            bt.frames()
                .iter()
                .any(|f| f.function().is_some_and(|n| n.ends_with("traceback::boom"))),
            "{bt}"
        );
        // The builder's word wins over the environment.
        let (_, location, backtrace, _) = panicked(pool_with(false).apply(boom, 1));
        assert!(location.is_some());
        assert!(backtrace.is_none());
    })
}

#[test]
fn rust_backtrace_0_leaves_them_off() {
    common::bounded(|| {
        if common::isolated_with_env(
            &test_name!("rust_backtrace_0_leaves_them_off"),
            &[("RUST_BACKTRACE", "0")],
        ) {
            return;
        }
        let (_, location, backtrace, _) = panicked(common::pool(1).apply(boom, 1));
        assert!(location.is_some());
        assert!(backtrace.is_none());
    })
}

#[derive(Debug)]
struct Opaque;

fn panic_any_number(x: u32) -> u32 {
    std::panic::panic_any(x)
}

fn panic_any_error(_: u32) -> u32 {
    let e: Box<dyn std::error::Error + Send + Sync> = "disk on fire".into();
    std::panic::panic_any(e)
}

const OPAQUE_LINE: u32 = line!() + 2;
fn panic_any_opaque(_: u32) -> u32 {
    std::panic::panic_any(Opaque)
}

#[test]
fn payloads_that_are_not_strings() {
    common::bounded(|| {
        let pool = pool_with(false);
        let (message, location, _, _) = panicked(pool.apply(panic_any_number, 42));
        assert!(
            message.contains("u32") && message.contains("42"),
            "{message}"
        );
        assert!(location.is_some());
        let (message, _, _, _) = panicked(pool.apply(panic_any_error, 0));
        assert!(message.contains("disk on fire"), "{message}");
        let (message, location, _, _) = panicked(pool.apply(panic_any_opaque, 0));
        assert!(message.contains("panic_any"), "{message}");
        // Even then, where it panicked is known.
        assert_eq!(location.expect("a location").line(), OPAQUE_LINE);
    })
}

fn init_panics(_: ()) {
    panic!("init boom")
}

#[test]
fn a_failed_initializer_says_where() {
    common::bounded(|| {
        let r = Pool::builder()
            .processes(1)
            .initializer(init_panics, ())
            .build();
        match r {
            Err(Error::InitializerFailed { message, .. }) => {
                assert!(message.starts_with("init boom (at "), "{message}");
                assert!(message.contains(&format!("{}:", file!())), "{message}");
            }
            other => panic!("expected InitializerFailed, got {other:?}"),
        }
    })
}

/// Capture in the worker must not take std's backtrace lock: under the
/// fork start method, another thread of the host may hold it at the fork,
/// and in the worker it would then never be released. Here a thread
/// resolves std backtraces in a loop (holding that lock most of the time)
/// while pools are forked, and a panic with a backtrace must still come
/// back from each.
#[test]
fn capture_takes_no_lock_the_host_held_at_the_fork() {
    common::bounded(|| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let (warm_tx, warm_rx) = mpsc::channel();
        let hammer = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let shown = std::backtrace::Backtrace::force_capture().to_string();
                n += shown.len() as u64;
                let _ = warm_tx.send(());
            }
            n
        });
        warm_rx.recv().expect("the hammer thread resolved once");
        for round in 0..4 {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let pool = pool_with(true);
                let _ = tx.send(pool.apply(boom, round));
            });
            let r = rx
                .recv_timeout(BOUND)
                .unwrap_or_else(|_| panic!("round {round}: the panic never came back"));
            let (message, _, backtrace, _) = panicked(r);
            assert_eq!(message, format!("boom {round}"));
            assert!(backtrace.is_some_and(|b| !b.frames().is_empty()));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(hammer.join().unwrap() > 0);
    })
}
