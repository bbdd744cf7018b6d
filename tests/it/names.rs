//! The pool's processes carry the program's name (`comm`), with a suffix
//! that says what each is, under both start methods and whatever thread
//! built the pool.

use crate::common;

use procpool::{Pool, StartMethod};
use std::time::Duration;

const BOUND: Duration = Duration::from_secs(120);

/// This test program's name, as `comm` would show it before the cut.
fn program() -> String {
    let exe = std::env::args_os().next().expect("argv[0]");
    std::path::Path::new(&exe)
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .expect("reading comm")
        .trim_end()
        .to_string()
}

/// `comm` is the program's name, cut, then `suffix` and (for a worker) a
/// slot number.
fn assert_named(pid: u32, suffix: &str) {
    let name = comm(pid);
    let at = name
        .rfind(':')
        .unwrap_or_else(|| panic!("{name:?} has no suffix"));
    let (prefix, rest) = name.split_at(at);
    assert!(
        !prefix.is_empty() && program().starts_with(prefix),
        "{name:?} does not begin with the program's name {:?}",
        program()
    );
    assert!(
        rest.starts_with(suffix) && rest[suffix.len()..].chars().all(|c| c.is_ascii_digit()),
        "{name:?} does not end with {suffix}"
    );
    assert!(name.len() <= 15);
}

fn check(method: StartMethod) {
    let pool = Pool::builder()
        .processes(2)
        .start_method(method)
        .build()
        .unwrap();
    assert_named(pool.server_pid(), ":srv");
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert_named(pid, ":w");
    }
}

#[test]
fn the_server_and_workers_carry_the_programs_name_under_forkserver() {
    common::within("names under ForkServer", BOUND, || {
        check(StartMethod::ForkServer)
    });
}

#[test]
fn the_server_and_workers_carry_the_programs_name_under_fork() {
    common::bounded(|| {
        common::within("names under Fork", BOUND, || check(StartMethod::Fork));
    })
}

#[test]
fn a_pool_built_on_a_named_thread_still_carries_the_programs_name() {
    common::within("names from a named thread", BOUND, || {
        for method in [StartMethod::Fork, StartMethod::ForkServer] {
            std::thread::Builder::new()
                .name("tokio-runtime-w".into())
                .spawn(move || check(method))
                .unwrap()
                .join()
                .unwrap();
        }
    });
}

#[test]
fn a_replaced_worker_is_named_too() {
    common::within("a replacement's name", BOUND, || {
        fn die(_: ()) {
            std::process::abort()
        }
        let pool = Pool::builder()
            .processes(1)
            .start_method(StartMethod::ForkServer)
            .build()
            .unwrap();
        let _ = pool.apply(die, ());
        let pid = pool.worker_pids()[0];
        assert_named(pid, ":w");
    });
}
