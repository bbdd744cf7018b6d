//! The calling thread's stack: stack-overflow detection for the exec'd
//! fork server (as std sets it up before `main`), and a lock-free walk of
//! the return addresses for a worker's backtrace.

use super::memory::page_size;

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
