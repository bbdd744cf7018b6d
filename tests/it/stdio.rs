//! What tasks print reaches the program's stdout, even without a newline:
//! a worker flushes after each task, and before it exits for a reason of
//! its own (end of work, `max_tasks_per_child`, a failed initializer).
//!
//! The pool runs in a helper process (see `common::Helper`) whose stdout
//! the test captures: a worker writes to the stdout it inherited, which
//! libtest's in-process capture does not see.

use crate::common;

use crate::common::{Helper, say};
use procpool::{Error, Pool};

const HELPER: &str = "stdio_helper";

fn print_no_newline(i: u64) -> u64 {
    print!("<task {i}>");
    i
}

fn init_prints(tag: String) {
    print!("<init {tag} {}>", std::process::id());
}

fn init_prints_then_panics(tag: String) {
    print!("<init {tag}>");
    panic!("the initializer fails");
}

fn print_everything() {
    let pool = Pool::builder()
        .processes(2)
        .initializer(init_prints, "plain".to_string())
        .build()
        .unwrap();
    let v = pool.map(print_no_newline, 0..10).unwrap();
    assert_eq!(v, (0..10).collect::<Vec<_>>());
    let workers = pool.worker_pids();
    pool.close();
    pool.join().unwrap();
    say(
        "WORKERS",
        workers
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    );
    // Workers retired after each task, each printing in its initializer.
    let pool = Pool::builder()
        .processes(1)
        .max_tasks_per_child(1)
        .initializer(init_prints, "recycled".to_string())
        .build()
        .unwrap();
    for i in 100..103 {
        assert_eq!(pool.apply(print_no_newline, i).unwrap(), i);
    }
    pool.close();
    pool.join().unwrap();
    // An initializer that fails: build() says so; what it printed is out.
    match Pool::builder()
        .processes(1)
        .initializer(init_prints_then_panics, "failing".to_string())
        .build()
    {
        Err(Error::InitializerFailed { .. }) => {}
        other => panic!("expected InitializerFailed, got {other:?}"),
    }
    // A worker killed after its task: what the task printed was flushed
    // when the task ended, so it is not lost with the worker.
    let pool = Pool::builder().processes(1).build().unwrap();
    assert_eq!(pool.apply(print_no_newline, 500).unwrap(), 500);
    let pid = pool.worker_pids()[0];
    // SAFETY: a signal to the pool's own worker, a pid from its API.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    drop(pool);
    say("DONE", "");
}

/// Not a test of its own: the body of the helper process of this file.
#[test]
#[ignore = "the helper process of the tests in this file"]
fn stdio_helper() {
    common::bounded(|| match common::helper_mode().as_deref() {
        None => {}
        Some("print") => print_everything(),
        Some(other) => panic!("unknown helper mode {other}"),
    })
}

#[test]
fn output_without_a_newline_reaches_stdout_after_close_and_join() {
    common::bounded(|| {
        let mut h = Helper::start(&test_name!(HELPER), "print", |_| {});
        let workers = h.expect("WORKERS");
        h.expect("DONE");
        let (status, out) = h.finish();
        assert!(status.success(), "{status}: {out}");
        for i in (0..10).chain(100..103).chain([500]) {
            assert!(
                out.contains(&format!("<task {i}>")),
                "<task {i}> is missing:\n{out}"
            );
        }
        for w in workers.split_whitespace() {
            assert!(
                out.contains(&format!("<init plain {w}>")),
                "worker {w}'s initializer output is missing:\n{out}"
            );
        }
        // One per worker that ran a task (and maybe one for a replacement
        // started before close()).
        assert!(
            out.matches("<init recycled ").count() >= 3,
            "one initializer per recycled worker:\n{out}"
        );
        assert!(out.contains("<init failing>"), "{out}");
    })
}
