//! The integration tests, in one test binary: each file of this directory
//! is a module (`apply`, `sandbox`, ...), so a test's name is
//! `module::test` (`cargo test --test it apply::`, or
//! `cargo test -- sandbox::a_task_cannot_erase_or_forge_the_parents_log`).
//!
//! Under plain `cargo test` every test of every module shares this process,
//! on the harness's threads. So:
//! - each test body runs under a bound of its own (`common::bounded`): a
//!   hang fails that test, by name, and the others go on (`bounds.rs`
//!   checks that every test has one);
//! - a test that counts what the whole process holds (children, fds,
//!   threads, memory) or changes it (limits, the global pool) runs its body
//!   again in a fresh process of this binary, alone (`common::isolated`);
//! - a test that needs a program of its own runs this binary again with one
//!   `#[ignore]`d helper test (`common::Helper`, `common::run_helper`).
//!
//! Both name the test they re-run with `test_name!`, which qualifies it with
//! its module. The tests that install a `log` logger, which is one per
//! process and changes what a forked worker inherits, are a binary of their
//! own: `tests/logs.rs`.

#[macro_use]
mod common;

mod apply;
mod as_completed;
mod bounds;
mod callbacks;
mod capture;
mod chaos;
mod codec_errors;
mod crash_matrix;
mod future;
mod global;
mod imap;
mod imap_auto;
mod imap_input;
mod initializer;
mod join_async;
mod leaks;
mod lifecycle;
mod map;
mod memory_recycle;
mod mpi;
mod names;
mod output;
mod parent_death;
mod platform;
mod recycle;
mod resize;
mod resources;
mod robustness;
mod sandbox;
mod seed_programs;
mod shared_buf;
mod signals;
mod soft_timeout;
mod start_method;
mod stats;
mod stdio;
mod stream;
mod timeout_cancel;
mod traceback;
