//! Probes: real syscalls whose errors show which layer stopped them. Used for the self-proof
//! at start and by `ewii-client probe-enforcement`. Each returns `Ok(())` when the kernel let
//! the call through, or the errno it answered with. Only loopback and the configured
//! destinations are ever probed, so nothing leaves the host when a layer is missing.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `IPPROTO_MPTCP` (Linux uapi, linux/in.h).
pub const IPPROTO_MPTCP: i32 = 262;

/// A probe's outcome: `Ok` or an errno.
pub type Verdict = Result<(), i32>;

/// What a probe's verdict means, in words that cannot be misread: `allowed`; `blocked (EPERM)`
/// when a layer refused it (EPERM, EACCES); `allowed (ECONNREFUSED)` when the call got past
/// every layer and the network answered; `failed (…)` for anything else.
pub fn name(v: &Verdict) -> String {
    match *v {
        Ok(()) => "allowed".into(),
        Err(e @ (libc::EPERM | libc::EACCES)) => format!("blocked ({})", errno_name(e)),
        Err(e @ (libc::ECONNREFUSED | libc::ETIMEDOUT | libc::EINPROGRESS | libc::ENETUNREACH)) => {
            format!("allowed ({})", errno_name(e))
        }
        Err(e) => format!("failed ({})", errno_name(e)),
    }
}

/// The errno's symbolic name (`EPERM`), or `errno N`.
pub fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EINPROGRESS => "EINPROGRESS".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        n => format!("errno {n}"),
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn last_errno() -> i32 {
    errno(&io::Error::last_os_error())
}

/// TCP connect (1 s timeout).
pub fn tcp_connect(addr: SocketAddr) -> Verdict {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map(drop)
        .map_err(|e| errno(&e))
}

/// TCP connect through an `AF_INET6` socket to the v4-mapped spelling of `addr`.
pub fn tcp_connect_v4_mapped(addr: SocketAddrV4) -> Verdict {
    let mapped = SocketAddr::new(IpAddr::V6(addr.ip().to_ipv6_mapped()), addr.port());
    tcp_connect(mapped)
}

/// One UDP datagram from an unconnected socket.
pub fn udp_send(addr: SocketAddr) -> Verdict {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    }
    .parse()
    .map_err(|_| libc::EINVAL)?;
    let s = UdpSocket::bind(bind).map_err(|e| errno(&e))?;
    s.send_to(b"ewii-probe", addr)
        .map(drop)
        .map_err(|e| errno(&e))
}

fn socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd, i32> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a fresh fd we own.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        Err(last_errno())
    } else {
        // SAFETY: `fd` is a valid descriptor returned just above and owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// `listen(2)` on a fresh, unbound TCP socket (which would otherwise auto-bind and listen).
pub fn listen() -> Verdict {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    // SAFETY: listen(2) on a descriptor we own; no pointers.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 1) };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

/// `accept4(2)` on a fresh, non-listening TCP socket: the kernel would answer EINVAL, so
/// EPERM can only come from the seccomp filter.
pub fn accept() -> Verdict {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    // SAFETY: accept4 on a descriptor we own, with no address buffer (both pointers null).
    let rc = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK,
        )
    };
    if rc >= 0 {
        // SAFETY: a non-negative result is a new descriptor that we own and close here.
        drop(unsafe { OwnedFd::from_raw_fd(rc) });
        Ok(())
    } else {
        Err(last_errno())
    }
}

/// `bind(2)` of a fresh TCP socket to `addr` (Landlock ABI 4 refuses TCP binds with EACCES).
pub fn tcp_bind(addr: SocketAddrV4) -> Verdict {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    with_sockaddr(&fd, addr, libc::bind)
}

/// `io_uring_setup(2)` with one entry.
pub fn io_uring_setup() -> Verdict {
    // struct io_uring_params is 120 bytes; zeroed means "no flags".
    let mut params = [0u8; 120];
    // SAFETY: the kernel writes at most sizeof(struct io_uring_params) = 120 bytes to `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: a non-negative result is a new io_uring fd that we own and close here.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// `socket(AF_INET, SOCK_STREAM)` through the x32 ABI (its syscall number with bit 30 set).
/// Without a filter the kernel answers ENOSYS (x32 not built) or makes a socket; EPERM is
/// seccomp refusing the ABI.
pub fn x32_socket() -> Verdict {
    const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;
    // SAFETY: socket(2) takes integers only; a returned descriptor is closed here.
    let fd = unsafe {
        libc::syscall(
            X32_SYSCALL_BIT | libc::SYS_socket,
            libc::AF_INET,
            libc::SOCK_STREAM,
            0,
        )
    };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: a non-negative result is a new socket that we own and close here.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// An ICMP "ping" socket (`SOCK_DGRAM`, `IPPROTO_ICMP`): made without privilege where the
/// process's group is in `net.ipv4.ping_group_range`, EACCES where it is not; EPERM is
/// seccomp refusing it. Closed at once; nothing is sent.
pub fn ping_socket() -> Verdict {
    socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP).map(drop)
}

/// `bpf(2)` with a command that does not exist: the kernel answers EINVAL, privileged or not;
/// EPERM is seccomp refusing `bpf` altogether.
pub fn bpf_call() -> Verdict {
    // SAFETY: a NULL attribute pointer with size 0 is never dereferenced.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 0xffff, std::ptr::null::<u8>(), 0u32) };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// An MPTCP socket connecting to `addr`.
pub fn mptcp_connect(addr: SocketAddrV4) -> Verdict {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP)?;
    with_sockaddr(&fd, addr, libc::connect)
}

/// `connect(2)` or `bind(2)` of `fd` to the IPv4 `addr`.
fn with_sockaddr(
    fd: &OwnedFd,
    addr: SocketAddrV4,
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> Verdict {
    let sa = sockaddr_in(addr);
    // SAFETY: `sa` is a valid sockaddr_in that outlives the call; the length matches it, and
    // `call` is connect(2) or bind(2), which only read it.
    let rc = unsafe {
        call(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

/// A TCP Fast Open send (`sendto` with `MSG_FASTOPEN`: connect and data in one call).
pub fn tfo_send(addr: SocketAddrV4) -> Verdict {
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    sendto_v4(&fd, b"ewii-probe", libc::MSG_FASTOPEN, addr)
}

/// An ICMP echo request from a raw socket (needs CAP_NET_RAW; the socket-address hooks do not
/// see raw sockets, only the cgroup_skb backstop does).
pub fn raw_icmp(dst: std::net::Ipv4Addr) -> Verdict {
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    // Type 8 (echo request), code 0, checksum over the 8-byte header.
    let mut pkt = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    let sum = pkt
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    sendto_v4(&fd, &pkt, 0, SocketAddrV4::new(dst, 0))
}

/// `sendto(2)` of `data` with `flags` to an IPv4 address.
fn sendto_v4(fd: &OwnedFd, data: &[u8], flags: i32, addr: SocketAddrV4) -> Verdict {
    let sa = sockaddr_in(addr);
    // SAFETY: `data` and `sa` are valid for the stated lengths during the call.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc >= 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}
