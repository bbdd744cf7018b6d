//! When the process that owns a pool dies (SIGKILL: no destructor runs),
//! its fork server and every worker must die too.

use crate::common;

use procpool::Pool;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const HELPER_ENV: &str = "PROCPOOL_PARENT_DEATH_HELPER";
const HELPER: &str = "parent_death_helper";
const TAG: &str = "PROCPOOL-PIDS";
const WORKERS: usize = 3;

/// Not a test of its own: the body of the helper process that
/// `pool_processes_die_with_their_owner` starts (with `--ignored`).
#[test]
#[ignore = "the helper process of pool_processes_die_with_their_owner"]
fn parent_death_helper() {
    common::bounded(|| {
        if std::env::var_os(HELPER_ENV).is_none() {
            return;
        }
        let pool = Pool::builder().processes(WORKERS).build().unwrap();
        let pids: Vec<String> = std::iter::once(pool.server_pid())
            .chain(pool.worker_pids())
            .map(|p| p.to_string())
            .collect();
        let mut out = std::io::stdout().lock();
        writeln!(out, "{TAG} {}", pids.join(" ")).unwrap();
        out.flush().unwrap();
        drop(out);
        // Wait to be killed (the test does it as soon as it has read the line).
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    })
}

#[test]
fn pool_processes_die_with_their_owner() {
    common::bounded(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args([
                &test_name!(HELPER),
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the helper");
        let stdout = child.stdout.take().unwrap();
        // Read the helper's line on another thread, so that a helper that never
        // prints fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed "test name ... " on the same line.
                if let Some(at) = line.find(TAG) {
                    let _ = tx.send(line[at + TAG.len()..].to_string());
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the helper printed no pids ({e})");
            }
        };
        let pids: Vec<u32> = line
            .split_whitespace()
            .map(|p| p.parse().expect("a pid"))
            .collect();
        assert_eq!(pids.len(), 1 + WORKERS, "server and workers: {line}");
        let (server, workers) = (pids[0], &pids[1..]);
        // The process tree is as documented: the server is the helper's child,
        // the workers are the server's.
        assert_eq!(
            common::stat(server).map(|s| s.ppid),
            Some(child.id()),
            "the fork server's parent"
        );
        for &w in workers {
            assert_eq!(
                common::stat(w).map(|s| s.ppid),
                Some(server),
                "worker {w}'s parent"
            );
        }

        child.kill().expect("killing the helper");
        let status = child.wait().expect("reaping the helper");
        assert!(!status.success());
        reader.join().unwrap();

        common::assert_dead(
            &pids,
            &format!("server {server}, workers {workers:?}, after their owner died"),
        );
    })
}
