//! Not a layer: the one socket option the Hub's sharding needs and the standard library does
//! not offer, `SO_ATTACH_REUSEPORT_CBPF`. Here because it is a foreign call; the program it
//! attaches is built (and explained) in `transport::shard`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Attaches the classic BPF `program` to the `SO_REUSEPORT` group of `socket`: for each
/// datagram the kernel runs it and hands the datagram to the group's socket at the index it
/// returns (in the order the sockets were bound), or falls back to the 4-tuple hash for an
/// index past the last socket. Unprivileged; the kernel checks the program before it runs.
pub fn attach_reuseport_cbpf(socket: &impl AsFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel copies the program during the call and never writes through this pointer.
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the option length is the
    // size of the `sock_fprog` passed; the descriptor is borrowed, so it is open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
