//! The only module that makes raw libc calls. Each function is a safe wrapper;
//! each `unsafe` block says why it holds.

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
    let mut cbuf = [0u64; 16];
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

/// Blocks `SIGCHLD` in the calling (single) thread and returns a signalfd
/// that becomes readable when a child changes state.
pub(crate) fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: set is a local sigset_t that the calls initialise and read.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        cvt(libc::pthread_sigmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
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
/// a new worker (the fork server blocks `SIGCHLD`).
pub(crate) fn reset_signals() {
    // SAFETY: set is a local sigset_t; signal() with SIG_DFL has no preconditions.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
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

/// How many words each worker slot has in [`SharedWords`].
pub(crate) const STATUS_WORDS: usize = 4;

/// What a worker says of itself, in memory its parent reads: the sequence
/// number of the task it started last, when it started it (CLOCK_MONOTONIC
/// nanoseconds, the clock of `Instant`), the sequence number of the last
/// task whose result it has written, and (written by the parent) a task to
/// skip. A task is running while
/// `started == seq && finished < seq`.
#[derive(Clone, Copy)]
pub(crate) struct Status<'a> {
    pub(crate) started: &'a AtomicU64,
    pub(crate) start_ns: &'a AtomicU64,
    pub(crate) finished: &'a AtomicU64,
    /// Written by the parent: a task the worker must skip (cancelled before
    /// it started).
    pub(crate) skip: &'a AtomicU64,
}

impl Status<'_> {
    /// Zeroes the words (for a new worker in the slot).
    pub(crate) fn reset(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.started.store(0, SeqCst);
        self.start_ns.store(0, SeqCst);
        self.finished.store(0, SeqCst);
        self.skip.store(0, SeqCst);
    }

    /// Whether task `seq` is running now.
    pub(crate) fn running(&self, seq: u64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.started.load(SeqCst) == seq && self.finished.load(SeqCst) < seq
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

/// A region of memory shared with every process forked after it was made
/// (`MAP_SHARED | MAP_ANONYMOUS`), seen as an array of `AtomicU64`.
pub(crate) struct SharedWords {
    ptr: *mut AtomicU64,
    len: usize,
}

// SAFETY: the region is only ever accessed through &AtomicU64, which is Sync.
unsafe impl Send for SharedWords {}
// SAFETY: as above.
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// A zeroed region of `len` words.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        let bytes = (len.max(1) * 8).next_multiple_of(4096);
        // SAFETY: an anonymous shared mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedWords { ptr: p.cast(), len })
    }

    /// The status words of worker slot `slot`.
    pub(crate) fn status(&self, slot: usize) -> Status<'_> {
        Status {
            started: self.word(slot * STATUS_WORDS),
            start_ns: self.word(slot * STATUS_WORDS + 1),
            finished: self.word(slot * STATUS_WORDS + 2),
            skip: self.word(slot * STATUS_WORDS + 3),
        }
    }

    /// Word `i`.
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len);
        // SAFETY: i < len and the mapping holds len zero-initialised,
        // 8-aligned u64s (page aligned); AtomicU64 has u64's layout, and the
        // mapping lives as long as &self.
        unsafe { &*self.ptr.add(i) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        let bytes = (self.len.max(1) * 8).next_multiple_of(4096);
        // SAFETY: ptr/bytes are exactly the mapping made in new(), and no
        // reference into it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), bytes) };
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
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh shared mapping of an open fd with no address hint.
        // The callers map at most the file's length (fstat, or the length
        // they just set), and every block file is sealed against shrinking
        // (memfd), so no page of the mapping can vanish under a reader.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Large blocks: ask for huge pages where the kernel offers them on request.
        // SAFETY: advice on a range we just mapped; failure is harmless.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(Mapping { ptr: p.cast(), len })
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

/// `sendmsg` of `buf` with one fd attached (to its first byte), with
/// `MSG_NOSIGNAL`; returns the bytes sent (the fd went with them if > 0).
pub(crate) fn send_fd(sock: RawFd, buf: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let fd_bytes = std::mem::size_of::<RawFd>() as u32;
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes) } as _;
    // SAFETY: cbuf (32 bytes, 8-aligned) holds CMSG_SPACE(4) = 24 bytes: one
    // header and one fd, which CMSG_FIRSTHDR/CMSG_DATA address within it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
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
