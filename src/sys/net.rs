//! What the MPI backend's TCP streams between hosts need of the system:
//! this host's IPv4 addresses.

use super::cvt;
use std::io;
use std::net::Ipv4Addr;

/// The IPv4 addresses of this host's interfaces that are up, those that
/// are not loopback first (in the kernel's order), then loopback ones.
pub(crate) fn ipv4_addrs() -> io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that we free below.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let (mut outer, mut lo) = (Vec::new(), Vec::new());
    let mut at = head;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet
        // freed; its ifa_addr, when not null, points to a sockaddr whose
        // family says its type, so a sockaddr_in is read only for AF_INET.
        unsafe {
            let ifa = &*at;
            let up = ifa.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
            if up
                && !ifa.ifa_addr.is_null()
                && (*ifa.ifa_addr).sa_family as libc::c_int == libc::AF_INET
            {
                let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if ip.is_loopback() {
                    lo.push(ip);
                } else {
                    outer.push(ip);
                }
            }
            at = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once, after its last
    // use.
    unsafe { libc::freeifaddrs(head) };
    outer.extend(lo);
    Ok(outer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_last() {
        let addrs = ipv4_addrs().unwrap();
        let first_lo = addrs.iter().position(|a| a.is_loopback());
        if let Some(i) = first_lo {
            assert!(addrs[i..].iter().all(|a| a.is_loopback()), "{addrs:?}");
        }
    }
}
