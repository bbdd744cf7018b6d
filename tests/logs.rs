//! `forward_logs`: a worker's `log` records, from its task and from the
//! task's threads, reach this process's logger with the worker's pid; and
//! `Output::Log`, which makes each line a worker prints a record.
//!
//! A binary of its own, apart from the other integration tests
//! (`tests/it/`): these install a `log` logger, one per process for good,
//! and a worker forked from a process with a logger inherits it (which one
//! of the tests here shows), so in the shared binary they would change
//! what every other test's `Fork` workers start with.

#[macro_use]
#[path = "it/common/mod.rs"]
mod common;

use procpool::{Output, Pool, Sandbox, StartMethod};
use std::sync::Mutex;
use std::time::Duration;

const BOUND: Duration = Duration::from_secs(120);

/// Every record this process's logger saw: (level, target, message).
static SEEN: Mutex<Vec<(log::Level, String, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        let seen = (r.level(), r.target().to_string(), r.args().to_string());
        SEEN.lock().unwrap().push(seen);
    }
    fn flush(&self) {}
}

fn capture() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The records whose message holds `token`.
fn seen_with(token: &str) -> Vec<(log::Level, String, String)> {
    let seen = SEEN.lock().unwrap();
    seen.iter()
        .filter(|r| r.2.contains(token))
        .cloned()
        .collect()
}

/// Logs `token` at info from the task and at warn from a thread it
/// starts; returns its pid.
fn logs_twice(token: String) -> u32 {
    log::info!("task says {token}");
    let t = token.clone();
    std::thread::spawn(move || log::warn!("thread says {t}"))
        .join()
        .unwrap();
    std::process::id()
}

fn pool(method: StartMethod, level: Option<log::LevelFilter>) -> Pool {
    let b = Pool::builder().processes(2).start_method(method);
    match level {
        Some(l) => b.forward_logs(l),
        None => b,
    }
    .build()
    .unwrap()
}

#[test]
fn records_from_a_task_and_its_thread_reach_the_parents_logger() {
    common::within("forwarded logs", BOUND, || {
        capture();
        let pool = pool(StartMethod::ForkServer, Some(log::LevelFilter::Info));
        let token = "tok-both".to_string();
        let pid = pool.apply(logs_twice, token.clone()).unwrap();
        assert!(common::eventually(|| seen_with(&token).len() == 2));
        let seen = seen_with(&token);
        let task = seen.iter().find(|r| r.2.contains("task says")).unwrap();
        let thread = seen.iter().find(|r| r.2.contains("thread says")).unwrap();
        assert_eq!(task.0, log::Level::Info);
        assert_eq!(thread.0, log::Level::Warn);
        assert_eq!(task.1, "logs", "the record keeps its target");
        for r in [task, thread] {
            assert!(
                r.2.starts_with(&format!("[worker {pid}, task ")),
                "{:?}",
                r.2
            );
        }
    });
}

#[test]
fn only_records_up_to_the_level_are_forwarded() {
    common::within("the level", BOUND, || {
        capture();
        let pool = pool(StartMethod::ForkServer, Some(log::LevelFilter::Warn));
        let token = "tok-lvl-first".to_string();
        pool.apply(logs_twice, token.clone()).unwrap();
        assert!(common::eventually(|| !seen_with(&token).is_empty()));
        // A later marker from the same worker comes after any info would.
        pool.apply(logs_twice, "tok-level-after".into()).unwrap();
        assert!(common::eventually(
            || !seen_with("tok-level-after").is_empty()
        ));
        let seen = seen_with(&token);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, log::Level::Warn);
    });
}

#[test]
fn without_forward_logs_nothing_is_forwarded() {
    common::within("no forwarding", BOUND, || {
        capture();
        let quiet = pool(StartMethod::ForkServer, None);
        quiet.apply(logs_twice, "tok-off".into()).unwrap();
        // A forwarding pool's record, sent after, arrives; the quiet
        // pool's never does.
        let loud = pool(StartMethod::ForkServer, Some(log::LevelFilter::Info));
        loud.apply(logs_twice, "tok-on".into()).unwrap();
        assert!(common::eventually(|| seen_with("tok-on").len() == 2));
        assert!(seen_with("tok-off").is_empty());
    });
}

#[test]
fn a_sandboxed_workers_records_are_forwarded() {
    common::within("sandboxed logs", BOUND, || {
        capture();
        let pool = Pool::builder()
            .processes(1)
            .start_method(StartMethod::ForkServer)
            .sandbox(Sandbox::new())
            .forward_logs(log::LevelFilter::Info)
            .build()
            .unwrap();
        let pid = pool.apply(logs_twice, "tok-sandbox".into()).unwrap();
        assert!(common::eventually(|| seen_with("tok-sandbox").len() == 2));
        assert!(
            seen_with("tok-sandbox")
                .iter()
                .all(|r| r.2.starts_with(&format!("[worker {pid}, ")))
        );
    });
}

#[test]
fn under_fork_a_workers_copy_of_the_logger_keeps_its_records() {
    common::within("logs under Fork", BOUND, || {
        capture();
        let pool = pool(StartMethod::Fork, Some(log::LevelFilter::Info));
        pool.apply(logs_twice, "tok-fork".into()).unwrap();
        let loud = pool_forkserver_marker();
        assert!(common::eventually(|| seen_with("tok-marker").len() == 2));
        drop(loud);
        assert!(
            seen_with("tok-fork").is_empty(),
            "the worker's copy of this logger took them"
        );
    });
}

fn pool_forkserver_marker() -> Pool {
    let p = pool(StartMethod::ForkServer, Some(log::LevelFilter::Info));
    p.apply(logs_twice, "tok-marker".into()).unwrap();
    p
}

// ---- Output::Log ----

/// The records the workers' output became (target `procpool::worker`)
/// whose message holds `needle`.
fn output_records_with(needle: &str) -> Vec<(log::Level, String)> {
    let seen = SEEN.lock().unwrap();
    seen.iter()
        .filter(|r| r.1 == "procpool::worker" && r.2.contains(needle))
        .map(|r| (r.0, r.2.clone()))
        .collect()
}

/// A task: a line on stdout and one on stderr; returns its pid.
fn say_hello(token: String) -> u32 {
    use std::io::Write;
    let mut out = std::io::stdout();
    out.write_all(format!("hello {token}\n").as_bytes())
        .unwrap();
    out.flush().unwrap();
    std::io::stderr()
        .write_all(format!("warning {token}\n").as_bytes())
        .unwrap();
    std::process::id()
}

#[test]
fn log_mode_makes_each_line_a_record_naming_the_worker() {
    common::within("the log test", Duration::from_secs(180), || {
        capture();
        let token = format!("tok{}-output-log", std::process::id());
        let pool = Pool::builder()
            .processes(1)
            .stdout(Output::Log)
            .stderr(Output::Log)
            .build()
            .unwrap();
        let pid = pool.apply(say_hello, token.clone()).unwrap();
        pool.close();
        pool.join().unwrap();
        let found = common::eventually(|| output_records_with(&token).len() >= 2);
        let records = output_records_with(&token);
        assert!(found && records.len() == 2, "{records:?}");
        let out = format!("worker {pid}: hello {token}");
        let err = format!("worker {pid}: warning {token}");
        assert!(records.contains(&(log::Level::Info, out)), "{records:?}");
        assert!(records.contains(&(log::Level::Warn, err)), "{records:?}");
    });
}
