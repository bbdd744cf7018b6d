//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::process::Command;

const ISOLATED: &str = "PROCPOOL_TEST_ISOLATED";

/// Runs the calling test's body in a fresh process of this test binary, so
/// that it can count the process's children or open fds without the other
/// tests that `cargo test` runs on other threads of the same process.
///
/// Call it first thing in a test, with the test's own name:
/// `if common::isolated("my_test") { return; }`. In the parent it re-runs
/// the binary with only that test and returns true (after asserting that the
/// child passed); in that child it returns false, and the body runs.
pub fn isolated(name: &str) -> bool {
    isolated_with_env(name, &[])
}

/// [`isolated`], with these variables set in the fresh process's
/// environment (for a test of what the environment changes).
pub fn isolated_with_env(name: &str, vars: &[(&str, &str)]) -> bool {
    if std::env::var(ISOLATED).as_deref() == Ok(name) {
        return false;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED, name)
        .envs(vars.iter().copied())
        .output()
        .expect("re-running the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "isolated run of {name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "isolated run of {name} ran no test:\n{stdout}\n{stderr}"
    );
    true
}

/// The pids of this process's direct children (every thread's).
pub fn children() -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// How many fds this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Whether a process with this pid exists (a zombie counts).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits (polling, bounded) until `cond` holds; returns whether it did.
/// For waiting on an outside event such as a process disappearing, never
/// as a timing assertion: the bound is generous.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cond()
}

/// A file that a gated task waits for (with [`wait_for_gate`]); the test
/// creates it with [`Gate::open`] to let the task finish. Makes "not finished
/// yet" states deterministic. The file is removed on drop.
pub struct Gate(std::path::PathBuf);

impl Gate {
    /// A fresh gate, shut, under the temp dir: its name holds `label`, this
    /// process's pid and a counter, so that no two gates share a file.
    pub fn new(label: &str) -> Gate {
        static GATES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = GATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("procpool-{label}-gate-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Gate(p)
    }

    /// The gate's path, to send to a task.
    pub fn key(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    /// Opens the gate: creates the file that the gated tasks wait for.
    pub fn open(&self) {
        std::fs::write(&self.0, b"open").expect("opening the gate");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// In a worker: waits until the gate at `path` (a [`Gate::key`]) is open,
/// polling every 2 ms; bounded (60 s) in case the test failed.
pub fn wait_for_gate(path: &str) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::path::Path::new(path).exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A pool of `n` worker processes with the default settings.
pub fn pool(n: usize) -> procpool::Pool {
    procpool::Pool::builder()
        .processes(n)
        .build()
        .expect("building the pool")
}

/// A path under the temp dir, unique to this process and call (its name holds
/// `tag`, this process's pid and a counter); it and its `.tmp` sibling (see
/// [`write_pid`]) are removed on creation and on drop.
pub struct TempPath(pub std::path::PathBuf);

impl TempPath {
    pub fn new(tag: &str) -> TempPath {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("procpool-tmp-{tag}-{}-{n}", std::process::id()));
        let t = TempPath(p);
        t.clean();
        t
    }

    /// The path, to send to a task.
    pub fn string(&self) -> String {
        self.0.to_str().expect("utf-8 temp path").to_string()
    }

    pub fn exists(&self) -> bool {
        self.0.exists()
    }

    /// The pid that [`write_pid`] left in the file, once it has.
    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }

    /// Creates the file, empty (for a task polling for it).
    pub fn create(&self) {
        std::fs::write(&self.0, b"").expect("creating a gate file");
    }

    fn clean(&self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(format!("{}.tmp", self.0.display()));
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        self.clean();
    }
}

/// In a worker: writes this process's pid into `path` atomically (write,
/// then rename), for [`TempPath::read_pid`].
pub fn write_pid(path: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, std::process::id().to_string()).expect("writing a marker");
    std::fs::rename(&tmp, path).expect("renaming a marker");
}
