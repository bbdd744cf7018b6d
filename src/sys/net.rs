//! TCP helpers for the MPI backend's streams between hosts: this host's
//! IPv4 addresses, and how much of what was sent the peer has not yet
//! acknowledged.

use super::cvt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

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

/// The bytes written to a TCP socket that its peer has not yet
/// acknowledged (`SIOCOUTQ`): at 0, all of them are in the peer's receive
/// buffer.
pub(crate) fn unacked_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a socket) writes one c_int to the
    // pointer, which points to a live c_int; a closed fd is EBADF.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) })?;
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn loopback_is_listed_last() {
        let addrs = ipv4_addrs().unwrap();
        let first_lo = addrs.iter().position(|a| a.is_loopback());
        if let Some(i) = first_lo {
            assert!(addrs[i..].iter().all(|a| a.is_loopback()), "{addrs:?}");
        }
    }

    #[test]
    fn unacked_bytes_reach_zero_once_the_peer_has_them() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(&[7u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        b.read_exact(&mut got).unwrap();
        use std::os::fd::AsRawFd;
        let fd = a.as_raw_fd();
        // Read by the peer, so acknowledged (a bounded wait for the ack).
        let mut left = usize::MAX;
        for _ in 0..1000 {
            left = unacked_bytes(fd).unwrap();
            if left == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(left, 0);
        assert_eq!(got, [7u8; 1000]);
    }
}
