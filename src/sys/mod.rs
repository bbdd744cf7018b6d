//! The only module that makes raw libc calls. Each function is a safe wrapper;
//! each `unsafe` block says why it holds.

pub(crate) mod sandbox;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// What `fork` returned.
pub(crate) enum Forked {
    /// In the child.
    Child,
    /// In the parent, with the child's pid.
    Parent(libc::pid_t),
}

/// `fork(2)`. The child must keep to async-signal-safe work until it has
/// made sure that no lock it needs was held by another thread of the parent
/// (see DESIGN.md); in this crate it only ever runs the fork server or a worker.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions; the callers keep the
    // child's work to the fork server and the worker loop (DESIGN.md).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p)),
    }
}

/// Ends the calling process at once, without running atexit handlers or
/// flushing stdio buffers that a forked child shares with its parent.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// A connected pair of close-on-exec stream sockets (one per worker: tasks
/// go one way, results the other). Writes use `MSG_NOSIGNAL`, so a dead peer
/// is `EPIPE`, never `SIGPIPE`.
pub(crate) fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(libc::SOCK_STREAM)
}

/// A connected pair of close-on-exec datagram-boundary sockets (the fork
/// server's channel, which also carries file descriptors).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(libc::SOCK_SEQPACKET)
}

fn socket_pair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two c_ints for socketpair to fill.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both are fresh fds that we alone own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets a socket's send and receive buffer sizes (best effort).
pub(crate) fn set_socket_buffers(fd: &OwnedFd, bytes: usize) {
    let v: libc::c_int = bytes.min(i32::MAX as usize) as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: v is a live c_int and its size is passed; the fd is open.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Puts an fd in non-blocking mode.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an open fd with integer arguments.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Half-closes a stream socket for writing: the peer reads end-of-file.
pub(crate) fn shutdown_write(fd: &OwnedFd) {
    // SAFETY: shutdown on an open fd; failure (already shut) is harmless.
    unsafe {
        libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR);
    }
}

/// `read(2)` into `buf`, retrying on `EINTR`. `Ok(0)` is end-of-file.
pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid writable region of buf.len() bytes.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`, retrying on `EINTR`: a dead peer gives
/// `EPIPE` rather than a `SIGPIPE` that could end the process.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is a valid readable region of buf.len() bytes.
        let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sends all of `buf` on a blocking socket.
pub(crate) fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = send(fd, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Sends one datagram with file descriptors attached (`SCM_RIGHTS`).
pub(crate) fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` zeroed, 8-aligned bytes, enough
        // for one header with fds.len() descriptors (CMSG_SPACE above); the
        // header pointer CMSG_FIRSTHDR returns lies within it, and CMSG_DATA
        // has room for fd_bytes bytes.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                fd_bytes as usize,
            );
        }
    }
    loop {
        // SAFETY: msg and everything it points to (iov, cbuf) live across the call.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives one datagram and any file descriptors attached to it (made
/// close-on-exec). Returns the byte count (0 is end-of-file) and the fds.
pub(crate) fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut fds = std::collections::VecDeque::new();
    // A datagram whose fd was lost is delivered without it: its handler
    // copes with a missing fd.
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let (n, _lost) = unsafe { recv_raw(sock, buf.as_mut_ptr(), buf.len(), &mut fds)? };
    Ok((n, fds.into()))
}

/// `recvmsg` of at most `len` bytes into `ptr`, retrying on `EINTR`; fds
/// that arrive are appended to `fds` (made close-on-exec). Returns the byte
/// count and whether fds were lost (`MSG_CTRUNC`: EMFILE, or too many).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn recv_raw(
    sock: RawFd,
    ptr: *mut u8,
    len: usize,
    fds: &mut std::collections::VecDeque<OwnedFd>,
) -> io::Result<(usize, bool)> {
    let mut iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    // Room for the most fds one message can carry (MAX_FDS_PER_MSG: a
    // frame with many SharedBufs sends them in messages of that many).
    let mut cbuf = [0u64; 130];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: iov covers `len` writable bytes (the caller's promise) and
        // cbuf is live for the call.
        let r = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => break n,
        }
    };
    take_fds(&msg, fds);
    Ok((n, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Takes ownership of the fds that `recvmsg` delivered into `msg`'s
/// control buffer.
fn take_fds(msg: &libc::msghdr, fds: &mut std::collections::VecDeque<OwnedFd>) {
    // SAFETY: the kernel filled msg_control with well-formed headers up to
    // msg_controllen; CMSG_FIRSTHDR/NXTHDR walk only within it, and each
    // SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 fds that were
    // installed in this process for us alone to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push_back(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
}

/// In a freshly forked child: points every inherited fd from 3 up, except
/// those in `keep`, at `/dev/null` (close-on-exec).
///
/// The child's memory still holds the host's values that own those fds (a
/// `File` in a static, another pool's sockets): closing the fds would let
/// their numbers be reused for this process's own sockets and memory
/// blocks, and a task that wrote to the host's file would write into them.
/// Pointed at `/dev/null`, the numbers stay taken, harmlessly, and the
/// real files and sockets are released in this process (so another pool's
/// worker still sees end-of-file when its parent closes its end).
pub(crate) fn neuter_fds_except(keep: &[RawFd]) {
    let listed: Option<Vec<RawFd>> = std::fs::read_dir("/proc/self/fd").ok().map(|d| {
        d.flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect()
    });
    // SAFETY: a NUL-terminated static path and integer flags.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    let (Some(fds), true) = (listed, null >= 0) else {
        close_fds_except(keep);
        return;
    };
    for fd in fds {
        if fd < 3 || fd == null || keep.contains(&fd) {
            continue;
        }
        // SAFETY: dup3 atomically replaces what `fd` refers to; the fd was
        // listed as open a moment ago (the directory's own fd, now closed,
        // simply becomes a /dev/null too).
        unsafe { libc::dup3(null, fd, libc::O_CLOEXEC) };
    }
    close_fd(null);
}

/// Closes one fd that the caller owns by number only (in a forked child,
/// whose owning values are never dropped there).
pub(crate) fn close_fd(fd: RawFd) {
    // SAFETY: the caller owns `fd`; closing a closed fd is a harmless EBADF.
    unsafe { libc::close(fd) };
}

/// Closes every fd from 3 up, except those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&f| f >= 3).collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for k in keep {
        let k = k as u32;
        if k > from {
            close_range(from, k - 1);
        }
        from = k + 1;
    }
    close_range(from, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes fds. It is the fallback where
    // /proc/self/fd cannot be read, in a freshly forked child; values that
    // still own those numbers there are never used by the child's code
    // (see neuter_fds_except for what a task could still reach).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r == -1 {
        // Kernels before 5.9: close one by one up to the fd limit.
        // SAFETY: sysconf has no preconditions.
        let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
        let max = if max < 0 { 1024 } else { max as u64 };
        let last = (last as u64).min(max);
        for fd in first as u64..=last {
            // SAFETY: as above; closing a closed fd is a harmless EBADF.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

/// Sends `sig` to `pid`. Only the fork server calls this, and only for
/// children it has not yet reaped (so the pid cannot have been reused).
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Waits until child `pid` has stopped (after a SIGSTOP), without reaping
/// it if it exits instead; returns whether it stopped.
pub(crate) fn wait_stopped(pid: libc::pid_t) -> bool {
    loop {
        // SAFETY: info is a plain-data out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid id type, pid and out-pointer. WNOWAIT leaves the
        // child waitable: an exit is still reaped by the SIGCHLD loop.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == -1 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        return info.si_code == libc::CLD_STOPPED;
    }
}

/// Reaps any exited child without blocking: `(pid, raw wait status)`.
pub(crate) fn try_reap_any() -> Option<(libc::pid_t, i32)> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid > 0 { Some((pid, status)) } else { None }
}

/// Waits for (and reaps) one specific child; returns its raw wait status.
pub(crate) fn reap(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(status);
    }
}

/// Makes `SIGCHLD` the one signal blocked in the calling (single) thread
/// and returns a signalfd that becomes readable when a child changes state.
/// (The fork server calls it with every signal blocked, once its
/// dispositions are set: see [`default_dispositions`].)
pub(crate) fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: set is a local sigset_t that the calls initialise and read.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        cvt(libc::pthread_sigmask(
            libc::SIG_SETMASK,
            &set,
            std::ptr::null_mut(),
        ))?;
        Ok(fd)
    }
}

/// Empties a signalfd (or eventfd) that is in non-blocking mode.
pub(crate) fn drain(fd: RawFd) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = read(fd, &mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// Unblocks every signal and restores the default `SIGCHLD` disposition, in
/// a new worker (the fork server blocks `SIGCHLD`; its other dispositions,
/// which the worker inherits, are already those of [`default_dispositions`]).
pub(crate) fn reset_signals() {
    // SAFETY: set is a local sigset_t; signal() with SIG_DFL has no preconditions.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
    }
}

// ---------------------------------------------------------------------------
// The pool's processes and the host's signals: a session of their own,
// default dispositions, stdin (issue 11).

/// A signal mask, as [`block_all_signals`] found it.
pub(crate) struct SigMask(libc::sigset_t);

/// Blocks every signal (but SIGKILL and SIGSTOP, which cannot be) in the
/// calling thread; returns the mask it replaced, for [`restore_signal_mask`].
pub(crate) fn block_all_signals() -> SigMask {
    // SAFETY: both sets are local sigset_t values: sigfillset initialises
    // `all`, pthread_sigmask fills `old` (all-zero is a valid empty set if
    // the call fails, which it cannot with SIG_SETMASK and valid pointers).
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        SigMask(old)
    }
}

/// Sets the calling thread's signal mask back to `mask`.
pub(crate) fn restore_signal_mask(mask: &SigMask) {
    // SAFETY: mask holds a set that pthread_sigmask filled in.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask.0, std::ptr::null_mut()) };
}

/// Moves the calling process into a new session of its own (`setsid`),
/// and so a new process group, with no controlling terminal: the SIGINT,
/// SIGQUIT and SIGTSTP that a terminal sends to its foreground job
/// (Ctrl-C, Ctrl-\, Ctrl-Z) no longer reach it, nor the children it forks
/// after; and a task that opens the terminal (`/dev/tty`) gets an error
/// (ENXIO) instead of being stopped by SIGTTIN or SIGTTOU forever, as a
/// background job of the terminal would be. Where `setsid` is refused (the
/// process already leads a group: the exec'd server, which became a session
/// leader before its exec), a process group of its own.
pub(crate) fn own_process_group() {
    // SAFETY: setsid and setpgid take no pointers. setsid fails only for a
    // group leader, which setpgid(0, 0) leaves as it is.
    unsafe {
        if libc::setsid() == -1 {
            libc::setpgid(0, 0);
        }
    }
}

/// Gives every signal the disposition it has in a freshly started Rust
/// program: the default action, except SIGPIPE, ignored (as the standard
/// library sets it up, so that a write to a closed pipe is an `EPIPE`
/// error), and SIGSEGV and SIGBUS, left alone (the handlers the standard
/// library installs to report a stack overflow). Whatever the process
/// inherited (a SIGINT handler of the host, SIGCHLD or SIGINT ignored by
/// whoever started the program) is gone.
///
/// Each signal is set to "ignored" first: that discards one of it that is
/// pending (sent to the terminal's job while this process was still in it
/// and had every signal blocked), which would otherwise be delivered, with
/// its default action, once the signals are unblocked.
pub(crate) fn default_dispositions() {
    // Not the numbers between 31 and SIGRTMIN: the C library keeps them
    // for itself (thread cancellation, set*id across threads).
    for sig in (1..32).chain(libc::SIGRTMIN()..=libc::SIGRTMAX()) {
        if matches!(
            sig,
            libc::SIGKILL | libc::SIGSTOP | libc::SIGSEGV | libc::SIGBUS
        ) {
            continue;
        }
        set_disposition(sig, libc::SIG_IGN);
        if sig != libc::SIGPIPE {
            set_disposition(sig, libc::SIG_DFL);
        }
    }
}

fn set_disposition(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: sa is a local sigaction, zeroed (no flags, no mask) and given
    // SIG_IGN or SIG_DFL, which run no code of ours.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// This process's open-file limit (the soft `RLIMIT_NOFILE`), for messages.
pub(crate) fn open_file_limit() -> Option<u64> {
    // SAFETY: rl is a plain-data out-parameter for getrlimit.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid resource and out-pointer.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    (r == 0 && rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur as u64)
}

/// Points fd 0 at `/dev/null`, as Python's pool does for its workers: a
/// task that reads stdin gets end-of-file instead of competing with the
/// host for the terminal (and, outside the terminal's foreground job,
/// instead of being stopped by SIGTTIN).
pub(crate) fn stdin_from_dev_null() {
    // SAFETY: a NUL-terminated static path and integer flags. The fd is not
    // close-on-exec, which is what fd 0 must be; this single-threaded
    // process execs nothing while it is open.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    if null > 0 {
        // SAFETY: dup2 onto fd 0, which this process owns as its stdin;
        // then close the fd that open returned, which we alone own.
        unsafe {
            libc::dup2(null, 0);
            libc::close(null);
        }
    }
}

/// Asks the kernel to SIGKILL this process when its parent (the fork
/// server, which has one thread) exits; returns the parent pid to check
/// against, since the parent may already have gone.
pub(crate) fn die_with_parent() -> libc::pid_t {
    // SAFETY: prctl with integer arguments; getppid has no preconditions.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::getppid()
    }
}

/// A non-blocking, close-on-exec eventfd, used to wake the supervisor thread.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd with integer flags.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a fresh fd that we alone own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Increments an eventfd (wakes whoever polls it).
pub(crate) fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes the 8 bytes of a live u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// `poll(2)` on `fds`, retrying on `EINTR` (with the same timeout).
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: fds is a valid mutable slice of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => return Ok(n as usize),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the clock `Instant` reads on Linux).
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: ts is a plain-data out-parameter for clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A shared, read-write mapping of a memory file seen as an array of
/// `AtomicU64`, which (unlike a [`Mapping`]) the children of a `fork()`
/// inherit: the memory behind the status words (`proto::status`).
pub(crate) struct SharedAtomics {
    ptr: *mut AtomicU64,
    bytes: usize,
}

// SAFETY: the region is only ever accessed through &AtomicU64, which is Sync.
unsafe impl Send for SharedAtomics {}
// SAFETY: as above.
unsafe impl Sync for SharedAtomics {}

impl SharedAtomics {
    /// Maps the first `bytes` bytes of `fd` (a multiple of the page size,
    /// at most the file's length; the file must be sealed against
    /// shrinking, as [`memfd`]'s are).
    pub(crate) fn new(fd: &OwnedFd, bytes: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of an open memfd with no address
        // hint, of at most the file's length (the caller's promise, which
        // a sealed memfd keeps: it cannot shrink).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedAtomics {
            ptr: p.cast(),
            bytes,
        })
    }

    /// Word `i`.
    pub(crate) fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.bytes / 8);
        // SAFETY: i is within the mapping, which holds zero-initialised,
        // 8-aligned u64s (page aligned); AtomicU64 has u64's layout, and the
        // mapping lives as long as &self.
        unsafe { &*self.ptr.add(i) }
    }

    /// Unmaps every page of the region but the page-aligned byte range
    /// `keep`. No reference to a word outside `keep` may be used in this
    /// process afterwards (the caller's promise: see
    /// `SharedWords::keep_only`).
    pub(crate) fn unmap_except(&self, keep: std::ops::Range<usize>) {
        assert!(keep.start <= keep.end && keep.end <= self.bytes);
        // SAFETY: both ranges lie within the mapping made in new() (keep.end
        // <= bytes by the assertion above), page aligned; no reference into
        // them is used in this process again (the caller's promise).
        unsafe {
            if keep.start > 0 {
                libc::munmap(self.ptr.cast(), keep.start);
            }
            if keep.end < self.bytes {
                libc::munmap(
                    self.ptr.cast::<u8>().add(keep.end).cast(),
                    self.bytes - keep.end,
                );
            }
        }
    }
}

impl Drop for SharedAtomics {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes are exactly the mapping made in new(), and no
        // reference into it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// A new anonymous memory file (`memfd_create`), close-on-exec, sealed
/// against shrinking: a mapping of it can never lose pages under it (which
/// would turn reads into SIGBUS).
pub(crate) fn memfd() -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated static string.
    let fd = cvt(unsafe {
        libc::memfd_create(
            c"procpool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    })?;
    // SAFETY: a fresh fd that we alone own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on an open fd with integer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) })?;
    Ok(fd)
}

/// Sets a file's size.
pub(crate) fn set_len(fd: &OwnedFd, len: usize) -> io::Result<()> {
    // SAFETY: ftruncate on an open fd with an integer length.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    Ok(())
}

/// A file's size.
pub(crate) fn file_len(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: st is a plain-data out-parameter for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and st is valid for writes.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_size as usize)
}

/// A shared, read-write mapping of the first `len` bytes of a file.
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory. It is shared with another process,
// and handed out as &[u8]/&mut [u8]: that is sound because the pool's
// protocol gives a block to one side at a time (the parent writes an
// argument and does not touch the block until the worker's DONE; the worker
// writes nothing to it once it has sent DONE), and &/&mut on Mapping order the
// accesses within this process.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (which must be at least that long);
    /// `populate` pre-faults the pages.
    pub(crate) fn new(fd: &OwnedFd, len: usize, populate: bool) -> io::Result<Mapping> {
        Self::map(fd, len, populate, true)
    }

    /// Maps `len` bytes of `fd` for reading only (a sealed block).
    pub(crate) fn read_only(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        Self::map(fd, len, false, false)
    }

    /// An empty mapping (maps nothing).
    pub(crate) fn empty() -> Mapping {
        Mapping {
            ptr: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
            writable: true,
        }
    }

    fn map(fd: &OwnedFd, len: usize, populate: bool, write: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping::empty());
        }
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of an open fd with no address hint.
        // The callers map at most the file's length (fstat, or the length
        // they just set), and every block file is sealed against shrinking
        // (memfd), so no page of the mapping can vanish under a reader.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Large blocks: ask for huge pages where the kernel offers them on request.
        // SAFETY: advice on a range we just mapped; failure is harmless.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        // Not inherited by a process another thread forks: it would hold a
        // writable mapping of the block until it execs, and sealing the
        // block against writes (a sandboxed pool) fails while one exists.
        // No child of this process uses a block through this mapping.
        // SAFETY: advice on a range we just mapped; failure leaves the
        // mapping inherited, as before.
        unsafe { libc::madvise(p, len, libc::MADV_DONTFORK) };
        Ok(Mapping {
            ptr: p.cast(),
            len,
            writable: write,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the mapping's lifetime
        // (dangling but unused when len is 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "a read-only mapping written to");
        // SAFETY: as in as_slice; &mut self makes this the only view here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: exactly the region mapped in new(); no view outlives self.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

impl Mapping {
    /// Leaves this mapping out of the children of a later `fork()`
    /// (`MADV_DONTFORK`): in a child its range is not mapped at all.
    pub(crate) fn dont_fork(&self) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        // SAFETY: advice on exactly the range this mapping owns; it changes
        // nothing in this process, only what a child of fork() inherits.
        cvt(unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTFORK) })?;
        Ok(())
    }
}

/// The seals that fix a `SharedBuf`'s file at its size for good: it can
/// neither shrink (a mapping would lose pages under a reader: SIGBUS) nor
/// grow, and no seal can be added or removed after these.
pub(crate) const SIZE_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new memory file of `len` bytes (zero-filled), close-on-exec, named
/// `name` (as `/proc/*/maps` shows it), sealed with [`SIZE_SEALS`].
pub(crate) fn sealed_memfd(name: &std::ffi::CStr, len: usize) -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated string that outlives the call.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: a fresh fd that we alone own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_len(&fd, len)?;
    // SAFETY: fcntl on an open fd with integer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SIZE_SEALS) })?;
    Ok(fd)
}

/// A memory file's seals (`F_GET_SEALS`); an error for a file that is not
/// a memory file.
pub(crate) fn seals(fd: &OwnedFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on an open fd with no pointer arguments.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// What `fstat` says of a file: its identity (device and inode, unique
/// among the files that exist), its size, and how many of its bytes have
/// storage (pages of a memory file that were written or faulted in).
pub(crate) struct FileId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: usize,
    pub(crate) allocated: u64,
}

/// `fstat` of an open file.
pub(crate) fn file_id(fd: &OwnedFd) -> io::Result<FileId> {
    // SAFETY: st is a plain-data out-parameter for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and st is valid for writes.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(FileId {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as usize,
        allocated: (st.st_blocks as u64).saturating_mul(512),
    })
}

/// This process's soft limit on open files (`RLIMIT_NOFILE`).
pub(crate) fn fd_soft_limit() -> u64 {
    // SAFETY: rlimit is plain data, an out-parameter for getrlimit.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: r is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == -1 {
        return 1024;
    }
    r.rlim_cur
}

static FORKS: AtomicU64 = AtomicU64::new(0);
static FORKS_WATCHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn count_fork_in_child() {
    // An atomic add: async-signal-safe, as work in a fork child must be.
    FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// A number that differs in the child of every `fork()` of this process
/// from what it was in the parent at the fork (from the first call on): a
/// value made in one process can tell that it is a copy in a child.
pub(crate) fn fork_generation() -> u64 {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a handler that glibc calls in the child after
        // each fork(); the handler only increments an atomic, which is
        // async-signal-safe, and is a plain function that lives as long
        // as the process.
        let r = unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
        FORKS_WATCHED.store(r == 0, std::sync::atomic::Ordering::SeqCst);
    });
    if FORKS_WATCHED.load(std::sync::atomic::Ordering::Relaxed) {
        FORKS.load(std::sync::atomic::Ordering::Relaxed)
    } else {
        // No handler (pthread_atfork failed): the pid tells a child apart.
        // SAFETY: getpid has no preconditions.
        u64::from(unsafe { libc::getpid() } as u32) << 32
    }
}

/// The most fds that one `sendmsg` on a Unix socket may carry (the
/// kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MSG: usize = 253;

/// `sendmsg` of `buf` with up to [`MAX_FDS_PER_MSG`] fds attached (to its
/// first byte), with `MSG_NOSIGNAL`; returns the bytes sent (the fds went
/// with them if > 0).
pub(crate) fn send_fds(sock: RawFd, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.is_empty() || fds.len() > MAX_FDS_PER_MSG {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // Room for one header and MAX_FDS_PER_MSG fds, 8-aligned.
    let mut cbuf = [0u64; 130];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes) } as _;
    // SAFETY: cbuf (1040 bytes, 8-aligned) holds CMSG_SPACE(4 * 253) = 1032
    // bytes, so one header and fds.len() <= 253 fds, which CMSG_FIRSTHDR and
    // CMSG_DATA address within it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(c),
            fd_bytes as usize,
        );
    }
    loop {
        // SAFETY: msg and what it points to (iov, cbuf) live across the call.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Like [`read_append`], through `recvmsg`: fds that arrive are appended
/// to `fds` in order (made close-on-exec).
pub(crate) fn recv_append(
    sock: RawFd,
    buf: &mut Vec<u8>,
    max: usize,
    fds: &mut std::collections::VecDeque<OwnedFd>,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < max {
        buf.try_reserve(max)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    }
    let spare = buf.capacity() - buf.len();
    let want = spare.min(max.max(1));
    // SAFETY: [len, len + want) lies within buf's allocation (want <= spare
    // capacity), so the pointer is valid for writes of `want` bytes.
    let (n, lost) = unsafe { recv_raw(sock, buf.as_mut_ptr().add(buf.len()), want, fds)? };
    // SAFETY: recvmsg initialised exactly n <= want bytes past len.
    unsafe { buf.set_len(buf.len() + n) };
    if lost {
        // The frames that name the lost fds would take the wrong ones: the
        // stream cannot be trusted any more.
        return Err(io::Error::other(
            "file descriptors sent with the stream were lost",
        ));
    }
    Ok(n)
}

/// How long the supervisor thread and an idle worker poll without sleeping
/// before they block: a result or the next task often comes within
/// microseconds, while waking a thread that sleeps on an idle CPU costs
/// tens of microseconds on a virtual machine (measured here: a synchronous
/// `apply` took 70-80 us with no spin, 8-15 us with a 50 us spin). The spin
/// happens only at the moment a thread runs out of work, so an idle pool
/// uses no CPU. `PROCPOOL_SPIN_US` overrides it (0 turns it off); on a
/// machine with one CPU there is none.
pub(crate) fn spin_budget() -> std::time::Duration {
    static US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    std::time::Duration::from_micros(*US.get_or_init(|| {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return 0;
        }
        std::env::var("PROCPOOL_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50)
    }))
}

/// Spins (for at most [`spin_budget`]) until `ready()` holds; returns it.
pub(crate) fn spin_until(mut ready: impl FnMut() -> bool) -> bool {
    let budget = spin_budget();
    if budget.is_zero() {
        return false;
    }
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        // Yield rather than hog the CPU: a thread just woken on this CPU
        // (the caller of a synchronous apply, say) runs at once.
        std::thread::yield_now();
    }
}

/// Whether `fd` has data (or end-of-file) to read right now.
pub(crate) fn readable_now(fd: RawFd) -> bool {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(poll(&mut p, 0), Ok(n) if n > 0)
}

// ---------------------------------------------------------------------------
// The program image: the constructor that turns an exec'd copy of the
// program into a fork server, the object that holds the task code, and the
// spawn of that copy. See `start.rs` for the design.
// ---------------------------------------------------------------------------

/// The environment variable that makes an exec'd copy of the program a fork
/// server; its value is `SOCKET_FD,WORDS_FD,CONFIG_FD`.
pub(crate) const SERVER_ENV: &str = "PROCPOOL_FORK_SERVER";

/// The argument list glibc passes to an `.init_array` entry.
pub(crate) type Constructor =
    extern "C" fn(libc::c_int, *const *const libc::c_char, *const *const libc::c_char);

/// The value of [`SERVER_ENV`] in `envp` (the environment a constructor
/// is given), if it is set. Allocates only when it is.
pub(crate) fn server_marker(envp: *const *const libc::c_char) -> Option<String> {
    if envp.is_null() {
        return None;
    }
    let key = SERVER_ENV.as_bytes();
    let mut i = 0;
    loop {
        // SAFETY: envp is the NULL-terminated array of NUL-terminated
        // strings that the C runtime passes to constructors; we stop at
        // the NULL entry.
        let entry = unsafe { *envp.add(i) };
        if entry.is_null() {
            return None;
        }
        // SAFETY: entry is a NUL-terminated string of the environment.
        let bytes = unsafe { std::ffi::CStr::from_ptr(entry) }.to_bytes();
        if bytes.len() > key.len() && bytes.starts_with(key) && bytes[key.len()] == b'=' {
            return Some(String::from_utf8_lossy(&bytes[key.len() + 1..]).into_owned());
        }
        i += 1;
    }
}

const DT_INIT_ARRAY: isize = 25;
const DT_INIT_ARRAYSZ: isize = 27;

/// A loaded ELF object, as the dynamic loader describes it: its load
/// bias and its program headers.
struct Loaded<'a> {
    bias: usize,
    headers: &'a [libc::Elf64_Phdr],
}

/// Calls `visit` for each loaded object, the main program first, until it
/// returns true.
fn each_object(mut visit: impl FnMut(&Loaded<'_>) -> bool) {
    extern "C" fn callback(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of
        // the call, whose dlpi_phdr points at dlpi_phnum program headers;
        // data is the &mut dyn FnMut given below, alive across the call.
        let (info, visit) = unsafe {
            (
                &*info,
                &mut *data.cast::<&mut dyn FnMut(&Loaded<'_>) -> bool>(),
            )
        };
        let headers = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let o = Loaded {
            bias: info.dlpi_addr as usize,
            headers,
        };
        libc::c_int::from(visit(&o))
    }
    let mut visit: &mut dyn FnMut(&Loaded<'_>) -> bool = &mut visit;
    // SAFETY: callback matches the type dl_iterate_phdr expects and only
    // reads what the loader passes; data points at `visit`, alive across
    // the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(callback),
            (&mut visit as *mut &mut dyn FnMut(&Loaded<'_>) -> bool).cast(),
        )
    };
}

/// The main executable's `.init_array` (from its dynamic section), or
/// `None` for an executable without one (a static, non-PIE program).
fn main_init_array() -> Option<&'static [usize]> {
    /// An entry of an ELF dynamic section (`Elf64_Dyn`).
    #[repr(C)]
    struct Dyn {
        d_tag: isize,
        d_val: usize,
    }
    let (mut array, mut bytes) = (0usize, 0usize);
    each_object(|o| {
        for ph in o.headers.iter().filter(|ph| ph.p_type == libc::PT_DYNAMIC) {
            let mut d = (o.bias + ph.p_vaddr as usize) as *const Dyn;
            // SAFETY: PT_DYNAMIC of a loaded object is its mapped dynamic
            // section, an array of Dyn (the native word size) ended by
            // DT_NULL.
            unsafe {
                while (*d).d_tag != 0 {
                    match (*d).d_tag {
                        DT_INIT_ARRAY => array = o.bias + (*d).d_val,
                        DT_INIT_ARRAYSZ => bytes = (*d).d_val,
                        _ => {}
                    }
                    d = d.add(1);
                }
            }
        }
        // The first object is the main program: stop there.
        true
    });
    if array == 0 || bytes == 0 {
        return None;
    }
    // SAFETY: DT_INIT_ARRAY/DT_INIT_ARRAYSZ describe an array of function
    // addresses in the main program's mapped, never-unmapped image.
    Some(unsafe { std::slice::from_raw_parts(array as *const usize, bytes / size_of::<usize>()) })
}

/// Runs the main executable's constructors that come after `me` (this
/// crate's own), as the C runtime would have once `me` returned.
pub(crate) fn run_later_constructors(
    me: Constructor,
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) {
    let Some(array) = main_init_array() else {
        return;
    };
    let me = me as usize;
    let Some(at) = array.iter().position(|&f| f == me) else {
        return;
    };
    for &f in &array[at + 1..] {
        if f == 0 || f == usize::MAX {
            continue;
        }
        // SAFETY: every other entry of .init_array is a constructor the C
        // runtime would call with exactly these arguments, once, before
        // main; it is called here instead, once, since the runtime's loop
        // never gets past this crate's entry in a server (the caller, `me`,
        // never returns).
        let c = unsafe { std::mem::transmute::<usize, Constructor>(f) };
        c(argc, argv, envp);
    }
}

/// A loaded ELF object: the address ranges of its `PT_LOAD` segments, and
/// whether it is the main program.
pub(crate) struct Object {
    pub(crate) ranges: Vec<(usize, usize)>,
    pub(crate) is_main: bool,
}

/// The loaded ELF object that contains `addr`.
pub(crate) fn object_of(addr: usize) -> Option<Object> {
    let mut index = 0;
    let mut found = None;
    each_object(|o| {
        let ranges: Vec<(usize, usize)> = o
            .headers
            .iter()
            .filter(|ph| ph.p_type == libc::PT_LOAD)
            .map(|ph| {
                let lo = o.bias + ph.p_vaddr as usize;
                (lo, lo + ph.p_memsz as usize)
            })
            .collect();
        let is_main = index == 0;
        index += 1;
        if ranges.iter().any(|&(lo, hi)| (lo..hi).contains(&addr)) {
            found = Some(Object { ranges, is_main });
            return true;
        }
        false
    });
    found
}

/// Spawns `cmd` in a session of its own, with the fds in `keep` left open
/// across its exec (they are close-on-exec here, and stay so: only the
/// child clears the flag, after the fork, so no other thread's spawn can
/// inherit them).
pub(crate) fn spawn_keeping(
    cmd: &mut std::process::Command,
    keep: [RawFd; 3],
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and
    // makes only setsid and fcntl calls, which are async-signal-safe, on
    // itself and on fds that it inherited from this process; it touches no
    // lock and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own from before the exec (see
            // own_process_group): no terminal's signal can reach the
            // server while it starts.
            libc::setsid();
            for fd in keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Removes a variable from the environment of this single-threaded
/// process (the exec'd fork server, before it starts any worker).
pub(crate) fn remove_env_single_threaded(key: &str) {
    // SAFETY: the exec'd fork server has one thread (it never ran `main`,
    // and the constructors it ran do not leave threads that read the
    // environment), so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(key) };
}

/// Ignores `SIGPIPE`, as std does before `main` in a Rust program (the
/// exec'd fork server never gets there): a write to a closed pipe in a
/// task is then an `EPIPE` error, as it would be in the host.
pub(crate) fn ignore_sigpipe() {
    // SAFETY: signal() with SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Waits until `fd` is readable (or hung up), at most `timeout`; returns
/// whether it is.
pub(crate) fn wait_readable(fd: RawFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    Ok(poll(&mut p, ms)? > 0)
}

/// Kills and reaps a child that this process spawned and has not reaped.
pub(crate) fn kill_and_reap(pid: libc::pid_t) {
    kill(pid, libc::SIGKILL);
    let _ = reap(pid);
}

static GUARD_LO: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static GUARD_HI: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Stack-overflow detection for the calling (main) thread, as std sets up
/// before `main` (the exec'd fork server never gets there): a fault in the
/// page below the stack prints "has overflowed its stack" and aborts
/// (SIGABRT), any other fault keeps its default action. Best effort: where
/// the stack bounds or an alternate stack cannot be had, nothing changes.
pub(crate) fn install_stack_overflow_handler() {
    const ALT: usize = 64 << 10;
    // SAFETY: the attr is initialised by pthread_getattr_np before use and
    // destroyed after; the out-parameters are valid locals.
    let (addr, _size) = unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let r = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        if r != 0 {
            return;
        }
        (addr as usize, size)
    };
    let page = page_size() as usize;
    GUARD_LO.store(
        addr.saturating_sub(page),
        std::sync::atomic::Ordering::SeqCst,
    );
    GUARD_HI.store(addr, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: a fresh private anonymous mapping with no address hint.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ALT,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return;
    }
    let ss = libc::stack_t {
        ss_sp: stack,
        ss_flags: 0,
        ss_size: ALT,
    };
    // SAFETY: ss describes the mapping just made, which is never unmapped;
    // the sigaction struct is zeroed plain data with its fields then set.
    unsafe {
        if libc::sigaltstack(&ss, std::ptr::null_mut()) != 0 {
            return;
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fault as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSEGV/SIGBUS, whose
    // si_addr is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let lo = GUARD_LO.load(std::sync::atomic::Ordering::Relaxed);
    let hi = GUARD_HI.load(std::sync::atomic::Ordering::Relaxed);
    if (lo..hi).contains(&addr) {
        let msg =
            b"\nthread 'main' has overflowed its stack\nfatal runtime error: stack overflow\n";
        // SAFETY: write and abort are async-signal-safe; msg is a static buffer.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
    // Not a stack overflow: the default action, when the fault recurs on
    // return.
    // SAFETY: signal() with SIG_DFL is async-signal-safe.
    unsafe { libc::signal(sig, libc::SIG_DFL) };
}

/// Takes ownership of an fd that this process inherited through exec by
/// number (named by its parent), after checking it is open; makes it
/// close-on-exec again.
pub(crate) fn adopt_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: fcntl on an integer fd: EBADF if it is not open.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return None;
    }
    // SAFETY: the fd is open, and its number was handed to this process
    // (through the environment, by the parent that left it open across
    // exec) for it alone to own; nothing else in this fresh image uses it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of `fd` numbered 3 or above: for an fd that
/// must not be mistaken for stdin, stdout or stderr (a program started with
/// those closed gets its first sockets at 0-2).
pub(crate) fn dup_above_stdio(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open fd makes a new fd.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: a fresh fd that we alone own.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The return addresses of the calling thread's stack, innermost first, at
/// most `max` of them, walked with the unwinder (`_Unwind_Backtrace`).
/// Takes no lock: not std's backtrace lock (which another thread of the
/// host may have held when this process was forked), nor the backtrace
/// crate's. A panic is unwound by the same unwinder a moment later, so this
/// needs nothing that the panic does not need anyway.
pub(crate) fn return_addresses(max: usize) -> Vec<usize> {
    let mut ips = Vec::with_capacity(max.min(64));
    // SAFETY: `trace_unsynchronized` is unsafe only because it skips the
    // backtrace crate's lock. That lock guards the state of backends that
    // are not thread-safe (dbghelp on Windows); on Linux the backend is
    // `_Unwind_Backtrace`, which is, and which only reads this thread's
    // stack and the unwind tables. The closure only pushes into a Vec.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            ips.push(frame.ip() as usize);
            ips.len() < max
        });
    }
    ips
}

/// This process's private resident memory in bytes: its resident anonymous
/// pages (`RssAnon`), which is `resident - shared` in `/proc/self/statm`
/// (shared counts file and shared-memory pages: the executable, libraries
/// and the pool's memfd blocks). Pages still shared with the parent since
/// the fork are counted, but do not change as a task runs, so a growth
/// over a baseline is memory the worker allocated and wrote.
pub(crate) fn private_memory() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/statm")?;
    let mut f = text.split_ascii_whitespace().skip(1);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/statm");
    let resident: u64 = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let shared: u64 = f.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    Ok(resident.saturating_sub(shared) * page_size())
}

/// The size of a memory page.
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}
