//! The seccomp filters a sandboxed worker runs under: an allow-list of
//! system calls (some with their arguments checked), and `clone3` and
//! `openat2` answering `ENOSYS`.

/// The seccomp filters: an allow-list (anything it does not name fails
/// with `EPERM`), and one that makes `clone3` and `openat2` answer
/// `ENOSYS` ([`ANSWER_ENOSYS`]), so that glibc falls back to `clone` and
/// `openat`, whose flags and modes the allow-list checks.
pub(super) fn filters() -> Result<Vec<seccompiler::BpfProgram>, seccompiler::BackendError> {
    use seccompiler::{SeccompAction, SeccompFilter, SeccompRule, TargetArch};
    use std::collections::BTreeMap;
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in ALLOWED {
        rules.insert(nr, Vec::new());
    }
    rules.extend(allowed_with_arguments()?);
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?;
    let enosys = SeccompFilter::new(
        ANSWER_ENOSYS.iter().map(|&nr| (nr, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    // In the order they are installed: the allow-list last, since it
    // denies the calls (`prctl`, `seccomp`) that installing takes.
    Ok(vec![enosys.try_into()?, allow.try_into()?])
}

/// The calls that answer `ENOSYS`, so that the C library falls back to
/// an older call whose arguments a filter can read: `clone3` (its flags
/// are in memory; `clone`'s are in a register) and `openat2` (its mode is
/// in memory; `openat`'s is in a register).
const ANSWER_ENOSYS: &[i64] = &[libc::SYS_clone3, libc::SYS_openat2];

/// The set-user-ID and set-group-ID bits of a file mode: no file a task
/// makes, or changes the mode of, may carry them (the host would run it
/// with the file owner's privileges).
const SET_ID_BITS: u64 = (libc::S_ISUID | libc::S_ISGID) as u64;

/// The calls the allow-list admits only with some arguments (and those of
/// [`ANSWER_ENOSYS`], admitted here so that the other filter's `ENOSYS`
/// answers them).
fn allowed_with_arguments()
-> Result<Vec<(i64, Vec<seccompiler::SeccompRule>)>, seccompiler::BackendError> {
    use seccompiler::{
        SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule,
    };
    let when = |conds: Vec<Cond>| SeccompRule::new(conds);
    // Threads only: a clone without CLONE_THREAD would be a fork.
    let thread = libc::CLONE_THREAD as u64;
    let clone = vec![when(vec![Cond::new(
        0,
        Len::Qword,
        Op::MaskedEq(thread),
        thread,
    )?])?];
    // send() is sendto() without an address; with one it could reach a
    // socket by name.
    let sendto = vec![when(vec![Cond::new(4, Len::Qword, Op::Eq, 0)?])?];
    // Reading this process's limits only.
    let prlimit = vec![when(vec![
        Cond::new(0, Len::Dword, Op::Eq, 0)?,
        Cond::new(2, Len::Qword, Op::Eq, 0)?,
    ])?];
    let prctl = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_GET_DUMPABLE,
        libc::PR_SET_VMA,
    ];
    // ioctl: enough for isatty, non-blocking mode and FIONREAD; nothing
    // that could push input into a terminal (TIOCSTI) or reach a device.
    // (The request's type differs between C libraries.)
    #[allow(clippy::unnecessary_cast)]
    let ioctl = [
        libc::TCGETS as u64,
        libc::FIONBIO as u64,
        libc::FIONREAD as u64,
        libc::FIOCLEX as u64,
        libc::FIONCLEX as u64,
    ];
    let mut rules = vec![
        (libc::SYS_clone, clone),
        (libc::SYS_sendto, sendto),
        (libc::SYS_prlimit64, prlimit),
        (libc::SYS_prctl, one_of(0, prctl.map(|op| op as u64))?),
        (libc::SYS_ioctl, one_of(1, ioctl)?),
    ];
    // Admitted here so that the other filter's ENOSYS answers them.
    rules.extend(ANSWER_ENOSYS.iter().map(|&nr| (nr, Vec::new())));
    rules.extend(mode_rules()?);
    Ok(rules)
}

/// The calls that take a file mode, admitted only when the mode carries
/// no set-user-ID or set-group-ID bit; `mknod` only for FIFOs and regular
/// files. (`chmod` by path stays out: Landlock does not govern it, and a
/// task run as root owns the host's files.)
fn mode_rules() -> Result<Vec<(i64, Vec<seccompiler::SeccompRule>)>, seccompiler::BackendError> {
    use seccompiler::{
        SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule,
    };
    // The mode is a 32-bit argument; `arg` is its place in each call.
    let no_set_id = |arg: u8| Cond::new(arg, Len::Dword, Op::MaskedEq(SET_ID_BITS), 0);
    let plain = |arg: u8| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![no_set_id(arg)?])?])
    };
    let node = |arg: u8| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let kind = |k: libc::mode_t| {
            Cond::new(arg, Len::Dword, Op::MaskedEq(libc::S_IFMT as u64), k as u64)
        };
        Ok(vec![
            SeccompRule::new(vec![no_set_id(arg)?, kind(libc::S_IFIFO)?])?,
            SeccompRule::new(vec![no_set_id(arg)?, kind(libc::S_IFREG)?])?,
        ])
    };
    #[allow(unused_mut)]
    let mut rules = vec![
        (libc::SYS_openat, plain(3)?),
        (libc::SYS_mkdirat, plain(2)?),
        (libc::SYS_mknodat, node(2)?),
        (libc::SYS_fchmod, plain(1)?),
    ];
    // x86_64 keeps the older calls, which glibc still makes for
    // `creat`, `mknod`, `mkfifo` and `symlink` on some paths.
    #[cfg(target_arch = "x86_64")]
    rules.extend([
        (libc::SYS_open, plain(2)?),
        (libc::SYS_creat, plain(1)?),
        (libc::SYS_mkdir, plain(1)?),
        (libc::SYS_mknod, node(1)?),
    ]);
    Ok(rules)
}

/// Rules that admit a call whose argument `arg` (32 bits) is one of `values`.
fn one_of(
    arg: u8,
    values: impl IntoIterator<Item = u64>,
) -> Result<Vec<seccompiler::SeccompRule>, seccompiler::BackendError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    values
        .into_iter()
        .map(|v| {
            let eq = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
            SeccompRule::new(vec![eq])
        })
        .collect()
}

/// System calls a sandboxed worker may make with any arguments. Paths are
/// Landlock's business; sockets cannot be made (`socket`, `socketpair`,
/// `connect`, `bind`, `listen`, `accept` are absent); no program can be
/// started (`execve`, `execveat`, `fork`, `vfork` are absent); no other
/// process can be read or traced (`ptrace`, `process_vm_readv`,
/// `process_vm_writev`, `pidfd_*`); no `io_uring`, `bpf`, `userfaultfd`,
/// `perf_event_open`, `keyctl`, namespace or mount call; no `setrlimit`,
/// `capset`, `chmod`/`chown` by path.
const ALLOWED: &[i64] = &[
    // Files and fds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_truncate,
    libc::SYS_fallocate,
    libc::SYS_flock,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_umask,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_splice,
    libc::SYS_tee,
    libc::SYS_pipe2,
    libc::SYS_memfd_create,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // The worker's socket to the parent.
    libc::SYS_recvmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_msync,
    libc::SYS_mincore,
    // Threads, time, signals, identity.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrusage,
    libc::SYS_getrandom,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    // Signals to other processes are Landlock's business (its signal
    // scope keeps them within the worker).
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // x86_64 keeps older calls that aarch64 dropped for the *at ones.
    #[cfg(target_arch = "x86_64")]
    libc::SYS_renameat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_getrlimit,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_dup2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_pipe,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_select,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_create,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_time,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_symlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_link,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_clone3_first_then_the_allow_list() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 2);
        assert!(!f[0].is_empty() && f[0].len() < f[1].len());
    }

    #[test]
    fn one_of_makes_a_rule_per_value() {
        assert_eq!(one_of(1, [3, 5, 7]).unwrap().len(), 3);
        assert!(one_of(0, []).unwrap().is_empty());
        let args = allowed_with_arguments().unwrap();
        let nrs: Vec<i64> = args.iter().map(|(nr, _)| *nr).collect();
        assert!(nrs.contains(&libc::SYS_clone) && nrs.contains(&libc::SYS_ioctl));
        assert!(args.iter().all(|(nr, _)| !ALLOWED.contains(nr)));
    }
}
