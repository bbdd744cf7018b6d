//! procpool inside a shared library (a plugin, a Python extension): the
//! default start method cannot work there, since exec'ing the program's
//! executable would start the host program, not this library; `build()`
//! says so and names `StartMethod::Fork` as the way out, which works.
//!
//! Built as a `cdylib`; `tests/it/start_method.rs` loads it with `dlopen` and
//! calls [`procpool_plugin_try`].

use procpool::{Pool, StartMethod};

fn triple(x: u64) -> u64 {
    3 * x
}

/// Builds a one-worker pool with the start method `fork` (non-zero) or the
/// default exec'd server (zero) and runs one task; writes `ok N` or
/// `err MESSAGE` into `out` (at most `cap` bytes, NUL-terminated).
///
/// # Safety
/// `out` must be valid for writes of `cap` bytes, and `cap` at least 1.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn procpool_plugin_try(fork: i32, out: *mut u8, cap: usize) {
    let method = if fork != 0 {
        StartMethod::Fork
    } else {
        StartMethod::ForkServer
    };
    let text = match Pool::builder()
        .processes(1)
        .start_method(method)
        .build()
        .and_then(|p| p.apply(triple, 14))
    {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("err {e}"),
    };
    let n = text.len().min(cap - 1);
    // SAFETY: the caller promises `out` is valid for `cap` bytes; we write
    // n + 1 <= cap of them.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), out, n);
        *out.add(n) = 0;
    }
}
