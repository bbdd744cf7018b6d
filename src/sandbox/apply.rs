//! The sandbox at work: prepared once by the fork server, before it forks
//! any worker ([`prepare`]), and applied by each worker after its
//! initializer ([`Prepared::apply`]).

use super::seccomp::filters;
use super::{Spec, cause};
use crate::proto::words::{SharedWords, Status};
use crate::sys::confine;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// Address space a sandboxed worker under a memory cap may map beyond
/// the cap and the pool's blocks: for threads, whose stacks and malloc
/// arenas (64 MiB each, mostly reserved, never touched) count in it.
const THREAD_ROOM: u64 = 1 << 30;

/// A sandboxed worker's threads, its own included, when
/// [`Sandbox::max_threads`] does not say.
const DEFAULT_MAX_THREADS: u64 = 64;

/// fds kept free above a task's open-files allowance, for the blocks the
/// pool sends a worker.
const FD_RESERVE: u64 = 32;

/// The sandbox as the server prepared it, once, for every worker it forks.
pub(crate) struct Prepared {
    spec: Spec,
    filters: Vec<seccompiler::BpfProgram>,
    landlock: bool,
    exe: Option<PathBuf>,
    /// Whether each worker moves into a private root (no test pretends
    /// mount namespaces are missing).
    private_root: bool,
    /// Whether each worker moves into a user namespace of its own (no
    /// test pretends user namespaces are missing).
    own_users: bool,
    /// Root's programs only: the user namespace whose maps the listed
    /// paths' idmapped mounts show root's files through, as
    /// [`SANDBOX_ID`](confine::SANDBOX_ID)'s.
    idmap: Option<std::os::fd::OwnedFd>,
    /// The working directory, kept in the private root if a listed path
    /// holds it.
    cwd: Option<PathBuf>,
}

/// The devices a worker may use, in its private root and its Landlock
/// rules.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// How the server's preparation went.
pub(crate) enum Readiness {
    /// Every mechanism is there.
    Full(Prepared),
    /// Some are missing and the sandbox accepts that: what is missing.
    Weaker(Prepared, String),
    /// Some are missing, or one failed: why.
    Failed(String),
}

/// Prepares the sandbox in the server, once, before it forks any worker:
/// the network namespace, the seccomp filters, the Landlock check.
pub(crate) fn prepare(spec: Spec) -> Readiness {
    // For tests of a kernel that lacks a mechanism: the server pretends
    // that the ones named (`Sandbox::pretend_missing`) are missing.
    let pretend = spec.pretend_missing.clone();
    let lacks = |what: &str| pretend.iter().any(|p| p == what);
    let mut missing = Vec::new();
    let filters = if confine::seccomp_available() && !lacks("seccomp") {
        match filters() {
            Ok(f) => f,
            Err(e) => return Readiness::Failed(format!("the seccomp filter: {e}")),
        }
    } else {
        missing.push("seccomp filters".to_string());
        Vec::new()
    };
    let netns = if lacks("netns") {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    } else {
        confine::unshare_network()
    };
    if let Err(e) = netns {
        missing.push(format!("a network namespace ({e})"));
    }
    let abi = if lacks("landlock") {
        0
    } else {
        confine::landlock_abi()
    };
    if abi < 6 {
        missing.push(format!("Landlock ABI 6 (this kernel has {abi})"));
    }
    let prepared = Prepared {
        spec,
        filters,
        landlock: abi > 0,
        exe: std::env::current_exe().ok().filter(|p| p.exists()),
        private_root: !lacks("mountns"),
        own_users: !lacks("userns"),
        idmap: None,
        cwd: std::env::current_dir().ok(),
    };
    let mut prepared = prepared;
    if !prepared.private_root {
        missing.push("a mount namespace for a private root".to_string());
    }
    if !prepared.own_users {
        missing.push("a user namespace per worker".to_string());
    } else if confine::is_root() && prepared.private_root {
        match confine::idmap_namespace(confine::SANDBOX_ID) {
            Ok(fd) => prepared.idmap = Some(fd),
            Err(e) => {
                return Readiness::Failed(format!("a user namespace for idmapped mounts: {e}"));
            }
        }
    }
    if missing.is_empty() {
        Readiness::Full(prepared)
    } else if prepared.spec.allow_weaker {
        Readiness::Weaker(prepared, missing.join(", "))
    } else {
        Readiness::Failed(format!(
            "this system lacks {}; Sandbox::allow_weaker() accepts a sandbox without it",
            missing.join(", ")
        ))
    }
}

/// Set in a worker once its sandbox is being applied: its filters deny
/// every way to start a process.
static APPLIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is a sandboxed worker: a task in it can start no
/// process, so no pool of its own (`PoolBuilder::build` says so).
pub(crate) fn applied_here() -> bool {
    APPLIED.load(Ordering::SeqCst)
}

/// A worker's sandbox once applied: what it checks after each task.
pub(crate) struct Active {
    /// The first fd of the reserve above the task's open-files allowance.
    reserve_fd: Option<RawFd>,
}

impl Active {
    /// Whether the task that just ended went past the open-files cap: it
    /// holds an fd of the reserve, or it panicked with `EMFILE`.
    pub(crate) fn over_open_files(&self, panic_message: Option<&str>) -> bool {
        let Some(fd) = self.reserve_fd else {
            return false;
        };
        // io::Error's Display and Debug forms of EMFILE.
        let emfile = |m: &str| {
            m.contains(&format!("os error {}", libc::EMFILE))
                || m.contains(&format!("code: {}", libc::EMFILE))
                || m.contains("Too many open files")
        };
        confine::fd_is_open(fd) || panic_message.is_some_and(emfile)
    }
}

impl Prepared {
    /// Applies the sandbox to this worker, after its initializer: fails if
    /// the worker has more than one thread. `status` is the worker's own
    /// status words, which stay mapped for the life of the process.
    pub(crate) fn apply(&self, status: Status<'static>) -> Result<Active, String> {
        let threads = crate::sys::thread_count(std::process::id());
        if threads != Some(1) {
            return Err(format!(
                "the worker has {} threads after its initializer; a sandbox binds only the \
                 calling thread, so the initializer must not leave threads running",
                threads.map_or("an unknown number of".to_string(), |n| n.to_string())
            ));
        }
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        confine::set_rlimit(libc::RLIMIT_CORE, 0).map_err(|e| fail("RLIMIT_CORE", &e))?;
        if let Some(bytes) = self.spec.memory {
            // Rust's allocation-failure path prints a backtrace first when
            // RUST_BACKTRACE asks for one, and the files it opens for that
            // overwrite the ENOMEM that names the limit (see `cause`).
            confine::set_env_single_threaded("RUST_BACKTRACE", "0");
            confine::set_rlimit(libc::RLIMIT_DATA, bytes).map_err(|e| fail("RLIMIT_DATA", &e))?;
            // Shared memory (shared anonymous mappings, memfds a task maps,
            // new SharedBufs) is outside RLIMIT_DATA: the address space as
            // a whole is capped above it, by what the worker maps now and
            // room for the pool's blocks and for threads.
            let now = crate::sys::address_space(std::process::id())
                .ok_or_else(|| "reading the worker's address space".to_string())?;
            let room = self.spec.limits().result.saturating_mul(2) + THREAD_ROOM;
            let cap = now.saturating_add(bytes).saturating_add(room);
            confine::set_rlimit(libc::RLIMIT_AS, cap).map_err(|e| fail("RLIMIT_AS", &e))?;
            // SAFETY: the worker's own status page stays mapped until the
            // process ends (`SharedWords::keep_only` keeps it, and the
            // worker never unmaps it).
            unsafe { confine::mark_abort_after_enomem(status.died_of, cause::MEMORY) };
        }
        if let Some(bytes) = self.spec.file_size {
            crate::proto::shm::limit_block_size(bytes);
            confine::default_signal(libc::SIGXFSZ);
            confine::set_rlimit(libc::RLIMIT_FSIZE, bytes).map_err(|e| fail("RLIMIT_FSIZE", &e))?;
        }
        let mut reserve_fd = None;
        if let Some(n) = self.spec.open_files {
            let top = highest_fd().map_err(|e| fail("listing the worker's fds", &e))?;
            let allowance = top as u64 + 1 + n;
            reserve_fd = Some(allowance.min(i32::MAX as u64) as RawFd);
            confine::set_rlimit(libc::RLIMIT_NOFILE, allowance + FD_RESERVE)
                .map_err(|e| fail("RLIMIT_NOFILE", &e))?;
        }
        self.isolate()?;
        confine::set_not_dumpable().map_err(|e| fail("PR_SET_DUMPABLE", &e))?;
        confine::drop_capabilities().map_err(|e| fail("dropping capabilities", &e))?;
        if self.landlock {
            let full = self.landlock().map_err(|e| fail("Landlock", &e))?;
            if !full && !self.spec.allow_weaker {
                return Err("Landlock could not be fully enforced".into());
            }
        }
        // Before the filters: from here on this process is one that may
        // start no other (a task that builds a pool is told why).
        APPLIED.store(true, Ordering::SeqCst);
        for f in &self.filters {
            seccompiler::apply_filter(f).map_err(|e| fail("the seccomp filter", &e))?;
        }
        Ok(Active { reserve_fd })
    }

    /// The fd the server keeps for its workers (the idmap's user
    /// namespace), if it has one.
    pub(crate) fn own_fd(&self) -> Option<RawFd> {
        self.idmap.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// Moves this worker into its private root, then gives it an identity
    /// of its own: a root program's worker gives up root for
    /// [`SANDBOX_ID`](confine::SANDBOX_ID) (the listed paths seen
    /// through idmapped mounts, so root's files there are its), and every
    /// worker moves into a user namespace of its own, where its thread cap
    /// (`RLIMIT_NPROC`) counts its threads alone. Needs the capabilities
    /// (in the server's user namespace when not root): before they go.
    fn isolate(&self) -> Result<(), String> {
        let weaker = |e: String| {
            if self.spec.allow_weaker {
                Ok(())
            } else {
                Err(e)
            }
        };
        let proc_self = confine::open_proc_self().map_err(|e| format!("/proc/self: {e}"));
        if self.private_root {
            let idmap = self.idmap.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
            let root = confine::enter_private_root(
                &self.binds(),
                self.spec.scratch,
                idmap,
                self.cwd.as_deref(),
            );
            if let Some(fd) = idmap {
                // The task has no use for it. `self.idmap` still names it,
                // but this worker's copy of `Prepared` is never dropped (a
                // worker ends with `_exit`), so this is the one close.
                crate::sys::close_fd(fd);
            }
            root.map_err(|e| format!("a private root: {e}"))
                .or_else(weaker)?;
        }
        if !self.own_users {
            return Ok(());
        }
        let own = (|| {
            if self.idmap.is_some() {
                confine::become_id(confine::SANDBOX_ID)?;
            }
            confine::own_user_namespace(&proc_self.map_err(std::io::Error::other)?)
        })();
        own.map_err(|e| format!("an identity of its own: {e}"))
            .or_else(weaker)?;
        let threads = self.spec.max_threads.unwrap_or(DEFAULT_MAX_THREADS);
        confine::set_rlimit(libc::RLIMIT_NPROC, threads).map_err(|e| format!("RLIMIT_NPROC: {e}"))
    }

    /// What a worker's private root holds: the listed paths, its
    /// executable (read-only, for symbols) and the harmless devices.
    fn binds(&self) -> Vec<(PathBuf, confine::BindAs)> {
        use confine::BindAs;
        let mut binds: Vec<(PathBuf, BindAs)> = Vec::new();
        binds.extend(
            self.spec
                .read_only
                .iter()
                .map(|p| (p.clone(), BindAs::ReadOnly)),
        );
        binds.extend(
            self.spec
                .read_write
                .iter()
                .map(|p| (p.clone(), BindAs::ReadWrite)),
        );
        binds.extend(self.exe.iter().map(|p| (p.clone(), BindAs::ReadOnly)));
        binds.extend(DEVICES.iter().map(|d| (PathBuf::from(d), BindAs::Device)));
        binds
    }

    /// Restricts this process with Landlock; returns whether every access
    /// right asked for is enforced.
    fn landlock(&self) -> Result<bool, String> {
        use landlock::{
            ABI, Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
            RulesetCreatedAttr, RulesetStatus, Scope,
        };
        let abi = ABI::V6;
        let read: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
        let write = read
            | AccessFs::WriteFile
            | AccessFs::RemoveDir
            | AccessFs::RemoveFile
            | AccessFs::MakeDir
            | AccessFs::MakeReg
            | AccessFs::MakeSym
            | AccessFs::MakeFifo
            | AccessFs::Refer
            | AccessFs::Truncate;
        let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
        rules.extend(self.spec.read_only.iter().map(|p| (p.clone(), read)));
        rules.extend(self.spec.read_write.iter().map(|p| (p.clone(), write)));
        if self.spec.scratch.is_some() {
            // The private root's scratch tmpfs (a path listed read-only
            // under it stays so: its bind mount is read-only).
            rules.push((PathBuf::from("/tmp"), write));
        }
        // What a worker itself may need: its executable (symbols for a
        // backtrace) and the harmless devices.
        rules.extend(self.exe.iter().map(|p| (p.clone(), read)));
        for dev in DEVICES {
            rules.push((dev.into(), read | AccessFs::WriteFile));
        }
        // A path that cannot be opened is an error, never skipped: the task
        // would lose a path it was promised, or the worker one it needs,
        // with nothing said.
        let mut opened = Vec::with_capacity(rules.len());
        for (path, access) in rules {
            let fd = PathFd::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            opened.push(PathBeneath::new(fd, access));
        }
        let restrict = || -> Result<_, landlock::RulesetError> {
            Ruleset::default()
                .handle_access(AccessFs::from_all(abi))?
                .handle_access(AccessNet::from_all(abi))?
                .scope(Scope::from_all(abi))?
                .create()?
                .add_rules(opened.into_iter().map(Ok::<_, landlock::RulesetError>))?
                .restrict_self()
        };
        let status = restrict().map_err(|e| e.to_string())?;
        Ok(status.ruleset == RulesetStatus::FullyEnforced)
    }
}

/// The highest fd open in this process.
fn highest_fd() -> std::io::Result<RawFd> {
    let mut top = 2;
    for e in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = e?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        {
            top = top.max(fd);
        }
    }
    Ok(top)
}

/// The status words of worker slot `slot`, for the life of this worker
/// process: keeps only its page mapped (see [`SharedWords::keep_only`]).
pub(crate) fn isolate_words(words: &'static SharedWords, slot: usize) -> Status<'static> {
    words.keep_only(slot);
    let status = words.status(slot);
    status.died_of.store(0, Ordering::SeqCst);
    status
}
