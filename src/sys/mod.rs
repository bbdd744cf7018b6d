//! The only module that makes raw libc calls. Each function is a safe wrapper;
//! each `unsafe` block says why it holds. One file per mechanism; every
//! item is re-exported here, so callers name it `sys::name`. Nothing here
//! knows the pool's protocol: what the bytes and words mean is `proto`'s.

pub(crate) mod confine;
mod eventfd;
mod fd;
mod image;
mod memory;
#[cfg(feature = "mpi")]
mod net;
mod pipe;
mod poll;
mod process;
mod signal;
mod socket;
mod stack;
mod time;

pub(crate) use eventfd::*;
pub(crate) use fd::*;
pub(crate) use image::*;
pub(crate) use memory::*;
#[cfg(feature = "mpi")]
pub(crate) use net::*;
pub(crate) use pipe::*;
pub(crate) use poll::*;
pub(crate) use process::*;
pub(crate) use signal::*;
pub(crate) use socket::*;
pub(crate) use stack::*;
pub(crate) use time::*;

use std::io;

/// `Err(last_os_error)` for a libc call that returned -1.
fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// As [`cvt`], for a call that returns a byte count.
fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
