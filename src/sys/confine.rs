//! The raw libc calls that confine a sandboxed worker (`src/sandbox/`):
//! namespaces, resource limits, capabilities, seals; kept apart from the
//! pool's own in the other files of `sys`. Each function is a safe
//! wrapper; each `unsafe` block says why it holds.

use super::cvt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// Whether this process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    ids().0 == 0
}

/// The effective uid and gid of this process.
fn ids() -> (libc::uid_t, libc::gid_t) {
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Moves this (single-threaded) process into a new network namespace, in
/// which nothing but a loopback device that is down exists. As root (with
/// `CAP_SYS_ADMIN`) that is one `unshare(CLONE_NEWNET)`; otherwise a new
/// user namespace comes with it, in which this process keeps its own uid
/// and gid (mapped to themselves), so files it creates are still its
/// user's. Must run before the process starts threads (a user namespace
/// needs a single-threaded caller).
pub(crate) fn unshare_network() -> io::Result<()> {
    // SAFETY: unshare with integer flags; it changes only this process's
    // namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return Ok(());
    }
    let (uid, gid) = ids();
    // SAFETY: as above.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) })?;
    // Map our own ids to themselves (setgroups must be denied before an
    // unprivileged process may write its gid_map).
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    Ok(())
}

/// Whether the kernel has seccomp filters (`PR_GET_SECCOMP` fails with
/// `EINVAL` on a kernel built without them).
pub(crate) fn seccomp_available() -> bool {
    // SAFETY: prctl with integer arguments, reading a flag of this process.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) >= 0 }
}

/// The Landlock ABI version the kernel offers (0: none).
pub(crate) fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: landlock_create_ruleset with a NULL attribute, size 0 and the
    // VERSION flag only returns a number; it creates nothing.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 { 0 } else { v as i32 }
}

/// The type of `setrlimit`'s resource argument (glibc's own; an int
/// elsewhere).
#[cfg(target_env = "gnu")]
pub(crate) type Resource = libc::__rlimit_resource_t;
/// The type of `setrlimit`'s resource argument (glibc's own; an int
/// elsewhere).
#[cfg(not(target_env = "gnu"))]
pub(crate) type Resource = libc::c_int;

/// Sets a resource limit, soft and hard, to `value`: the hard limit can
/// never be raised again by this process (nor by its tasks).
pub(crate) fn set_rlimit(resource: Resource, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: a valid resource number and a live rlimit struct.
    cvt(unsafe { libc::setrlimit(resource, &lim) })?;
    Ok(())
}

/// Makes this process not dumpable: no core file, its `/proc` files owned
/// by root, and no ptrace by processes of the same user.
pub(crate) fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
    Ok(())
}

/// Drops every capability this process has: the ambient set, the bounding
/// set (so no exec could regain any), then the effective, permitted and
/// inheritable sets. A process without `CAP_SETPCAP` cannot shrink its
/// bounding set, but then it has no capabilities to drop either: that
/// step's `EPERM` is ignored.
pub(crate) fn drop_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments; EINVAL past the last
        // capability the kernel knows.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(e);
            }
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a version-3 header and the two data structs that
    // version takes, all live across the call; pid 0 is this thread.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The word that the `SIGABRT` handler marks, and the value it writes.
static ABORT_WORD: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
static ABORT_MARK: AtomicU64 = AtomicU64::new(0);

/// Installs a `SIGABRT` handler that, when the process aborts right after
/// a call failed with `ENOMEM` (what Rust's allocation-failure path does:
/// the allocator sets `errno`, std prints a line and calls `abort`, and
/// neither touches `errno` on the way), writes `mark` into `word`, then
/// lets the abort go on.
///
/// # Safety
/// `word` must stay mapped, at the same address, for the life of the
/// process.
pub(crate) unsafe fn mark_abort_after_enomem(word: &AtomicU64, mark: u64) {
    ABORT_MARK.store(mark, Ordering::SeqCst);
    ABORT_WORD.store(word as *const AtomicU64 as *mut AtomicU64, Ordering::SeqCst);
    // SAFETY: a zeroed sigaction with its handler, flags and an empty mask
    // set; on_abort is async-signal-safe (see there).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_abort as *const () as usize;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGABRT, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_abort(_sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always
    // valid; reading it is async-signal-safe.
    let errno = unsafe { *libc::__errno_location() };
    if errno == libc::ENOMEM {
        let w = ABORT_WORD.load(Ordering::SeqCst);
        if !w.is_null() {
            // SAFETY: the pointer was made from a &AtomicU64 that stays
            // mapped for the life of the process (the caller's promise to
            // mark_abort_after_enomem); an atomic store is async-signal-safe.
            unsafe { (*w).store(ABORT_MARK.load(Ordering::SeqCst), Ordering::SeqCst) };
        }
    }
    // Returning lets abort() go on: it restores the default action
    // (SA_RESETHAND already did) and raises SIGABRT again.
}

/// Sets an environment variable in this process, which the caller has
/// just checked has a single thread (a sandboxed worker, as its sandbox
/// applies).
pub(crate) fn set_env_single_threaded(key: &str, value: &str) {
    // SAFETY: the process has one thread (checked by the caller, and no
    // task has run yet), so nothing reads the environment concurrently.
    unsafe { std::env::set_var(key, value) };
}

/// Restores a signal's default action (a host that ignores `SIGXFSZ`
/// passes that on through exec).
pub(crate) fn default_signal(sig: libc::c_int) {
    // SAFETY: signal() with SIG_DFL has no memory-safety preconditions.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// The seals that make a memory file immutable: no write, no growth, no
/// shrinking, and no change of seals.
pub(crate) const SEALED: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Seals a memory file with [`SEALED`]; fails while a writable shared
/// mapping of it exists (`EBUSY`).
pub(crate) fn seal(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an open fd with integer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALED) })?;
    Ok(())
}

/// Whether `fd` is open in this process.
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: fcntl(F_GETFD) on an integer: EBADF if it is not open.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// How a path is bound into a private root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindAs {
    /// Read-only, no set-user-ID, no devices.
    ReadOnly,
    /// Writable, no set-user-ID, no devices.
    ReadWrite,
    /// A device node (`/dev/null`, say): writable, no set-user-ID.
    Device,
}

/// Where the private root's tmpfs is mounted before it becomes `/`: the
/// first of these that is a directory (in this process's own mount
/// namespace, so the host's stays as it was).
const ROOT_AT: [&str; 3] = ["/tmp", "/mnt", "/var/tmp"];

/// Moves this process (single-threaded, with `CAP_SYS_ADMIN` in its user
/// namespace) into a mount namespace of its own whose root is a small
/// read-only tmpfs holding only `binds`, each at its own path (bind
/// mounts, `nosuid`, `nodev` but for devices, read-only where asked; seen
/// through `idmap`'s maps where given and the filesystem allows), and a
/// writable tmpfs of `scratch` bytes at `/tmp` if asked; the working
/// directory becomes `cwd` if it is inside one of the binds, else `/`.
/// The host's tree is detached: nothing else can be reached by any path.
pub(crate) fn enter_private_root(
    binds: &[(std::path::PathBuf, BindAs)],
    scratch: Option<u64>,
    idmap: Option<RawFd>,
    cwd: Option<&std::path::Path>,
) -> io::Result<()> {
    use std::path::Path;
    let named = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    // SAFETY: unshare with an integer flag; it changes only this process.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    // Nothing mounted from here on propagates back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // Each path's tree, cloned (detached) before anything is mounted here,
    // so that no clone holds the new root; its flags set while detached.
    let mut trees = Vec::with_capacity(binds.len());
    for (path, how) in binds {
        let tree = clone_tree(path).map_err(|e| named("cloning", path, e))?;
        let dir = path.is_dir();
        set_tree_flags(&tree, *how, dir, idmap).map_err(|e| named("binding", path, e))?;
        trees.push((tree, path.as_path(), dir));
    }
    // Shortest first: a path inside another is bound on top of it.
    trees.sort_by_key(|t| t.1.as_os_str().len());
    let root = ROOT_AT
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or_else(|| io::Error::other("no directory to mount the private root on"))?;
    let tmpfs_flags = libc::MS_NOSUID | libc::MS_NODEV;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        tmpfs_flags,
        Some("size=64k,mode=0755"),
    )?;
    if let Some(bytes) = scratch {
        // First, so that paths listed under /tmp are bound on top of it.
        let tmp = root.join("tmp");
        std::fs::create_dir(&tmp)?;
        let opts = format!("size={bytes},mode=1777");
        mount(Some("tmpfs"), &tmp, Some("tmpfs"), tmpfs_flags, Some(&opts))?;
    }
    for (tree, path, dir) in &trees {
        let at = root.join(path.strip_prefix("/").unwrap_or(path));
        attach(tree, &at, *dir).map_err(|e| named("binding", path, e))?;
    }
    let old = root.join(".host");
    std::fs::create_dir(&old)?;
    let (new_c, old_c) = (cstring(root)?, cstring(&old)?);
    // SAFETY: pivot_root with two NUL-terminated paths that live for the call.
    cvt(unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) } as i32)?;
    std::env::set_current_dir("/")?;
    let host = cstring(Path::new("/.host"))?;
    // SAFETY: umount2 of a NUL-terminated path that lives for the call.
    cvt(unsafe { libc::umount2(host.as_ptr(), libc::MNT_DETACH) })?;
    std::fs::remove_dir("/.host")?;
    // This mount only (MS_BIND), never its filesystem's superblock.
    let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | tmpfs_flags;
    mount(None, Path::new("/"), None, ro, None)?;
    if let Some(cwd) = cwd.filter(|c| binds.iter().any(|(p, _)| c.starts_with(p))) {
        std::env::set_current_dir(cwd)?;
    }
    Ok(())
}

/// A path as a C string.
fn cstring(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

/// A detached copy of the mount tree at `path` (`open_tree` with
/// `OPEN_TREE_CLONE`), submounts included.
fn clone_tree(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree with a NUL-terminated path that lives for the
    // call; it returns a new fd or -1.
    let tree = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to this process; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(tree as RawFd) })
}

/// Sets a detached tree's flags: `nosuid`; `nodev` and the idmap (where
/// given and the filesystem allows one) but for devices; read-only if
/// asked. Flags the tree has already stay (a user namespace may not drop
/// them). Where the filesystem cannot be idmapped, the tree goes without,
/// if its mode lets any user in as asked.
fn set_tree_flags(tree: &OwnedFd, how: BindAs, dir: bool, idmap: Option<RawFd>) -> io::Result<()> {
    let mut set = MOUNT_ATTR_NOSUID;
    match how {
        BindAs::ReadOnly => set |= MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV,
        BindAs::ReadWrite => set |= MOUNT_ATTR_NODEV,
        BindAs::Device => return mount_setattr(tree, set, None),
    }
    let Some(userns) = idmap else {
        return mount_setattr(tree, set, None);
    };
    match mount_setattr(tree, set | MOUNT_ATTR_IDMAP, Some(userns)) {
        // A filesystem that cannot be idmapped (devtmpfs, say).
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if !open_to_others(tree, how, dir)? {
                return Err(io::Error::other(format!(
                    "its filesystem cannot be idmapped ({e}), and its mode does not let \
                     another user {} it",
                    if how == BindAs::ReadOnly {
                        "read"
                    } else {
                        "write"
                    }
                )));
            }
            mount_setattr(tree, set, None)
        }
        other => other,
    }
}

/// `mount_setattr` on a whole detached tree: sets `set` (and the idmap of
/// `userns`, with `MOUNT_ATTR_IDMAP`).
fn mount_setattr(tree: &OwnedFd, set: u64, userns: Option<RawFd>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd as u64),
    };
    // SAFETY: mount_setattr on an fd this process owns, an empty
    // NUL-terminated path, and a live mount_attr of the size passed.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    } as i32)?;
    Ok(())
}

/// Attaches a detached tree at `at`, made first (an empty directory or
/// file) in the private root if it is not there.
fn attach(tree: &OwnedFd, at: &std::path::Path, dir: bool) -> io::Result<()> {
    if !at.exists() {
        if let Some(parent) = at.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if dir {
            std::fs::create_dir(at)?;
        } else {
            std::fs::File::create(at)?;
        }
    }
    let c = cstring(at)?;
    // SAFETY: move_mount of a detached tree (an fd this process owns) to a
    // NUL-terminated path; both live for the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    } as i32)?;
    Ok(())
}

/// Whether the mode of the file behind `fd` lets a user other than its
/// owner and group use it as `how` asks (read, or write too; and search a
/// directory).
fn open_to_others(fd: &OwnedFd, how: BindAs, dir: bool) -> io::Result<bool> {
    // SAFETY: stat is plain data; all zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd this process holds, into a live stat.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    let mut need = libc::S_IROTH;
    if how == BindAs::ReadWrite {
        need |= libc::S_IWOTH;
    }
    if dir {
        need |= libc::S_IXOTH;
    }
    Ok(st.st_mode & need == need)
}

/// `mount(2)` with Rust strings.
fn mount(
    source: Option<&str>,
    target: &std::path::Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    use std::ffi::CString;
    let opt = |s: Option<&str>| s.map(CString::new).transpose().map_err(io::Error::other);
    let (source, fstype, data) = (opt(source)?, opt(fstype)?, opt(data)?);
    let target = cstring(target)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that lives
    // for the call; mount changes only this process's mount namespace.
    cvt(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })?;
    Ok(())
}

/// The uid and gid a sandboxed worker of a program run as root takes on
/// the host: one no account uses, so that nothing on the host is its.
pub(crate) const SANDBOX_ID: u32 = 2_147_480_000;

/// A user namespace, as an fd, whose id maps say how a mount idmapped
/// with it shows a filesystem's ids: root's as `id` (uid and gid), `id`'s
/// as nobody, every other as itself. Made by a short-lived child (a user
/// namespace needs a process in it while its maps are written); needs
/// `CAP_SETUID` and `CAP_SETGID` (root).
pub(crate) fn idmap_namespace(id: u32) -> io::Result<OwnedFd> {
    let (ready_r, ready_w) = super::pipe()?;
    let (hold_r, hold_w) = super::pipe()?;
    match super::fork()? {
        super::Forked::Child => {
            drop((ready_r, hold_w));
            // SAFETY: unshare, write and read on fds this child holds, with
            // a live one-byte buffer; the child ends with _exit and takes
            // no lock (the server is single-threaded).
            unsafe {
                let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
                let b = [u8::from(ok)];
                libc::write(ready_w.as_raw_fd(), b.as_ptr().cast(), 1);
                let mut x = [0u8; 1];
                libc::read(hold_r.as_raw_fd(), x.as_mut_ptr().cast(), 1);
            }
            super::exit_now(0)
        }
        super::Forked::Parent(pid) => {
            drop((ready_w, hold_r));
            let mut b = [0u8; 1];
            let read = std::io::Read::read(&mut std::fs::File::from(ready_r), &mut b);
            let made = (|| {
                if read? != 1 || b[0] != 1 {
                    return Err(io::Error::other(
                        "the child could not make a user namespace",
                    ));
                }
                let rest = u32::MAX - 1 - id;
                let map = format!("0 {id} 1\n1 1 {}\n{} {} {rest}\n", id - 1, id + 1, id + 1);
                std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
                std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
                let ns = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
                Ok(OwnedFd::from(ns))
            })();
            drop(hold_w);
            let _ = super::reap(pid);
            made
        }
    }
}

/// The new mount API's flags and its attribute struct (linux/mount.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Takes the uid and gid `id` (with no supplementary groups): a root
/// process gives up root, and every capability with it. Leaves the process
/// dumpable (a change of ids makes it not), so that it may still write its
/// own user namespace's maps ([`own_user_namespace`]).
pub(crate) fn become_id(id: u32) -> io::Result<()> {
    // SAFETY: setgroups with an empty list; setresgid and setresuid with
    // integers; prctl with integers. They change only this process.
    unsafe {
        cvt(libc::setgroups(0, std::ptr::null()))?;
        cvt(libc::setresgid(id, id, id))?;
        cvt(libc::setresuid(id, id, id))?;
        cvt(libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0))?;
    }
    Ok(())
}

/// Moves this (single-threaded) process into a user namespace of its own,
/// keeping its uid and gid (mapped to themselves), so that the kernel
/// counts its threads apart from every other process's (`RLIMIT_NPROC`
/// counts per user namespace and uid). `proc_self` is this process's
/// `/proc` directory, opened before it lost `/proc`.
pub(crate) fn own_user_namespace(proc_self: &OwnedFd) -> io::Result<()> {
    let (uid, gid) = ids();
    // SAFETY: unshare with an integer flag; it changes only this process.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWUSER) })?;
    write_at(proc_self, c"setgroups", b"deny")?;
    write_at(proc_self, c"uid_map", format!("{uid} {uid} 1").as_bytes())?;
    write_at(proc_self, c"gid_map", format!("{gid} {gid} 1").as_bytes())?;
    Ok(())
}

/// Writes `bytes` in one `write` to the file `name` under `dir`.
fn write_at(dir: &OwnedFd, name: &std::ffi::CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: openat with a live dir fd and a NUL-terminated name.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fd was just opened by this process and is owned here alone.
    let f = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: write of a live buffer to an fd this process owns.
    let n = unsafe { libc::write(f.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// This process's `/proc` directory, to be written after `/proc` is gone
/// from its root ([`own_user_namespace`]).
pub(crate) fn open_proc_self() -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open("/proc/self")?;
    Ok(OwnedFd::from(f))
}
