//! Not a layer: one socket option the standard library does not offer, `TCP_INFO`, read for
//! what the peer's kernel acknowledged of a TCP connection (the byte pipe's, in
//! `transport::pipe`). Here because it is a foreign call.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Bytes of `socket`'s connection the peer acknowledged (`tcpi_bytes_acked`, Linux 4.1: data
/// bytes, and one more once a FIN of this side was acknowledged). Still read once the
/// connection was reset: the count stays.
pub fn bytes_acked(socket: &impl AsFd) -> io::Result<u64> {
    // SAFETY: `tcp_info` is plain old data, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which has that size, and
    // stores how many it wrote in `len`; the descriptor is borrowed, so it is open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // A kernel older than the field writes less: it cannot tell.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + size_of::<u64>();
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's TCP_INFO has no tcpi_bytes_acked",
        ));
    }
    Ok(info.tcpi_bytes_acked)
}
