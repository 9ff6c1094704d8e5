//! Who is on the other end of a local socket: the kernel's word (`SO_PEERCRED`,
//! `SCM_CREDENTIALS`), never what a client says. The doorbell counts a ring only from the
//! user's own uid or root; the control and status sockets answer root (or the service's own
//! uid) only.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};

/// The uid of the process that connected `stream` (as of `connect`).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    // SAFETY: an all-zero ucred is a valid value; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a socket we own, and a buffer of the stated length.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether `uid` may use the service's root-only sockets: root, or the uid the service runs as.
pub fn is_admin(uid: u32) -> bool {
    // SAFETY: geteuid cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Asks the kernel to attach the sender's credentials to every datagram `sock` receives.
pub fn pass_credentials(sock: &UnixDatagram) -> io::Result<()> {
    set_int_option(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1)
}

/// Sets an int socket option on `fd`.
pub fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option of the stated size; a bad descriptor is an error, not UB.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram into `buf`: its length (more than `buf.len()` when it was truncated)
/// and the sender's uid, when the kernel gave it (see [`pass_credentials`]).
pub fn recv_with_uid(sock: &UnixDatagram, buf: &mut [u8]) -> io::Result<(usize, Option<u32>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one SCM_CREDENTIALS message, aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: an all-zero msghdr is valid; the pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at buffers that live across the call, with their lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut uid = None;
    // SAFETY: walking the control messages recvmsg just wrote, with the libc macros, within
    // msg_controllen; the data is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                let cred: libc::ucred =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::ucred);
                uid = Some(cred.uid);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let n = n as usize;
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0;
    Ok((if truncated { buf.len() + 1 } else { n }, uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_names_the_sender() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s");
        let server = UnixDatagram::bind(&p).unwrap();
        pass_credentials(&server).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to(b"alice", &p).unwrap();
        client.send_to(&[b'x'; 100], &p).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::getuid() };
        assert_eq!(recv_with_uid(&server, &mut buf).unwrap(), (5, Some(me)));
        assert_eq!(&buf[..5], b"alice");
        assert_eq!(recv_with_uid(&server, &mut buf).unwrap().0, 17);
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), me);
        drop(b);
    }
}
