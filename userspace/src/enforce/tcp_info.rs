//! Not a layer: one socket option the standard library does not offer, `TCP_INFO`, read for
//! what a TCP connection still holds unsent (the byte pipe's, in `transport::pipe`). Here
//! because it is a foreign call.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Bytes written to `socket` that its kernel has not sent yet (`tcpi_notsent_bytes`, Linux
/// 4.6: what waits behind the peer's window). Still read once the connection was reset, which
/// purges them: the count is kept in the sequence numbers, which the reset leaves.
pub fn unsent_bytes(socket: &impl AsFd) -> io::Result<u32> {
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
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + size_of::<u32>();
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's TCP_INFO has no tcpi_notsent_bytes",
        ));
    }
    Ok(info.tcpi_notsent_bytes)
}
