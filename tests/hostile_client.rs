//! Test harness only: hostile code inside a locked-down Client process (issue: the eBPF lock
//! must survive code running inside the Client).
//!
//! `ewii-hostile-client --config client.toml` does what `ewii-client run` does before it
//! serves — `Plan::for_config`, then `enforce::install` with every layer and the lock held by
//! the cgroup, the same library calls — and then plays a compromised dependency: from another
//! thread it tries every way it has to lift, widen or get around the lock, and prints what the
//! kernel answered to each, as JSON. (Code cannot be injected into the real `ewii-client`
//! binary from outside: `ptrace` and `process_vm_writev` are among what the layers refuse, and
//! the binary is static. This harness runs the binary's own start-up code instead.)
#![allow(unsafe_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use ewii::enforce::{self, probe, Hold};

fn verdict(rc: libc::c_long) -> String {
    if rc < 0 {
        probe::name(&Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap()))
    } else {
        "allowed".into()
    }
}

/// `bpf(cmd, attr)` with `attr` as raw bytes.
fn bpf(cmd: libc::c_long, attr: &[u32]) -> String {
    // SAFETY: bpf(2) reads `size` bytes of the attribute buffer we own.
    verdict(unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), size_of_val(attr) as u32) })
}

fn attacks(plan: &enforce::Plan) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    let cgroup = enforce::ebpf::own_cgroup().unwrap();
    // Raw: the descriptor is closed below with all the others.
    let cg = std::os::fd::IntoRawFd::into_raw_fd(std::fs::File::open(&cgroup).unwrap());
    // Detach the connect4 program from the cgroup (BPF_PROG_DETACH = 9, no program fd needed
    // in the exclusive mode), and replace it with nothing.
    out.insert("bpf_prog_detach", bpf(9, &[cg as u32, 0, 10, 0]));
    // Write an allow entry into every descriptor the process holds, as if it were a map
    // (BPF_MAP_UPDATE_ELEM = 2): {map_fd, pad, key ptr, value ptr, flags}.
    let key = [0u8; 64];
    let value = [1u8; 8];
    let mut updates: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .map(|fd| {
            let k = key.as_ptr() as u64;
            let v = value.as_ptr() as u64;
            bpf(
                2,
                &[
                    fd,
                    0,
                    k as u32,
                    (k >> 32) as u32,
                    v as u32,
                    (v >> 32) as u32,
                    0,
                    0,
                ],
            )
        })
        .collect();
    updates.sort();
    updates.dedup();
    out.insert("bpf_map_update_on_every_fd", updates.join(", "));
    // Raise CAP_BPF and CAP_NET_ADMIN again (capset v3), or into the ambient set.
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    let header = [0x2008_0522u32, 0];
    let data = [
        1 << CAP_NET_ADMIN,
        1 << CAP_NET_ADMIN,
        0,
        1 << (CAP_BPF - 32),
        1 << (CAP_BPF - 32),
        0,
    ];
    // SAFETY: capset reads a v3 header and two data structs (6 u32) that we own.
    out.insert(
        "capset_raise",
        verdict(unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) }),
    );
    // SAFETY: prctl with integer arguments.
    out.insert(
        "ambient_raise",
        verdict(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                CAP_NET_ADMIN as libc::c_ulong,
                0,
                0,
            )
        } as libc::c_long),
    );
    // Another process's memory, or our own through the back door.
    // SAFETY: ptrace with integer arguments (PTRACE_ATTACH to the parent).
    out.insert(
        "ptrace_attach",
        verdict(unsafe {
            libc::ptrace(
                libc::PTRACE_ATTACH,
                libc::getppid(),
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        }),
    );
    let mut buf = [0u8; 8];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec each side, both pointing at our own 8-byte buffer.
    out.insert(
        "process_vm_writev",
        verdict(unsafe {
            libc::syscall(
                libc::SYS_process_vm_writev,
                libc::getpid(),
                &local as *const libc::iovec,
                1,
                &remote as *const libc::iovec,
                1,
                0,
            )
        }),
    );
    // SAFETY: pidfd_open and pidfd_getfd take integers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    out.insert(
        "pidfd_getfd",
        verdict(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, 0, 0) }),
    );
    // Run something else (a missing path: the kernel would say ENOENT; seccomp says EPERM).
    let path = c"/nonexistent-ewii-hostile";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: NUL-terminated path, NULL-terminated argv and envp.
    out.insert(
        "execve",
        verdict(unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) } as _),
    );
    // A user namespace (full capabilities inside it).
    // SAFETY: unshare takes flags.
    out.insert(
        "unshare_user_namespace",
        verdict(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as _),
    );
    // Sockets that would get below the socket hooks.
    let socket = |d, t, p| {
        // SAFETY: socket takes integers; a descriptor it returns is closed at once.
        let fd = unsafe { libc::socket(d, t, p) };
        if fd >= 0 {
            // SAFETY: we own the descriptor.
            unsafe { libc::close(fd) };
        }
        verdict(fd as _)
    };
    out.insert(
        "raw_socket",
        socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
    );
    out.insert("packet_socket", socket(libc::AF_PACKET, libc::SOCK_RAW, 0));
    out.insert(
        "netlink_sock_diag",
        socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_SOCK_DIAG),
    );
    out.insert("x32_socket", probe::name(&probe::x32_socket()));
    // Internet sockets that are neither TCP nor UDP: no Landlock rule covers them.
    out.insert(
        "icmp_ping_socket",
        socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
    );
    out.insert(
        "icmpv6_ping_socket",
        socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
    );
    out.insert(
        "sctp_socket",
        socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
    );
    out.insert(
        "sctp_seqpacket_socket",
        socket(libc::AF_INET6, libc::SOCK_SEQPACKET, 0),
    );
    out.insert(
        "udplite_socket",
        socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
    );
    // Make the read-only mappings of the kernel's maps writable (the ring buffer's data and
    // the count of refusals it had no room for) and write them: the kernel refuses. (Code in
    // the process can still unmap them and read nothing, or move the ring buffer's consumer
    // position, which is the process's to write: hiding refusals from this process's records,
    // not lifting the lock; the kernel's per-hook counters stay out of its reach.)
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut remaps: Vec<String> = maps
        .lines()
        .filter(|l| l.ends_with("anon_inode:bpf-map"))
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| !p.contains('w'))
        })
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (lo, hi) = range.split_once('-').unwrap();
            let lo = usize::from_str_radix(lo, 16).unwrap();
            let hi = usize::from_str_radix(hi, 16).unwrap();
            // SAFETY: a mapping of this process's, named by the kernel; if the call succeeded
            // the memory would only become writable, and nothing writes it.
            verdict(unsafe {
                libc::mprotect(
                    lo as *mut libc::c_void,
                    hi - lo,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            } as _)
        })
        .collect();
    remaps.sort();
    remaps.dedup();
    out.insert(
        "mprotect_bpf_maps_writable",
        if remaps.is_empty() {
            "no read-only mapping of a bpf map found".into()
        } else {
            remaps.join(", ")
        },
    );
    // Close every descriptor the start-up left (the ring buffer's included): a lock held by
    // a descriptor would go with it.
    for fd in 3..1024 {
        // SAFETY: closing descriptors we may or may not hold; no Rust object uses them after.
        unsafe { libc::close(fd) };
    }
    // Now the lock itself: the allowed port at another address (Landlock lets the port
    // through; only the eBPF address check can refuse it), and UDP somewhere else.
    let allowed = plan.allow[0];
    let SocketAddr::V4(v4) = allowed else {
        panic!("the harness needs an IPv4 allow-list entry")
    };
    let other = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), v4.port()));
    out.insert(
        "tcp_allowed_port_other_address",
        probe::name(&probe::tcp_connect(other)),
    );
    out.insert(
        "udp_elsewhere",
        probe::name(&probe::udp_send(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::LOCALHOST,
            plan.denied_port(),
        )))),
    );
    out.insert("tcp_allowed", probe::name(&probe::tcp_connect(allowed)));
    let caps = enforce::privileges::Privileges::read().unwrap();
    out.insert(
        "capabilities_left",
        format!(
            "permitted {:#x} effective {:#x} inheritable {:#x} ambient {:#x} no_new_privs {}",
            caps.permitted, caps.effective, caps.inheritable, caps.ambient, caps.no_new_privs
        ),
    );
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = match args.as_slice() {
        [_, flag, path] if flag == "--config" => path.clone(),
        _ => {
            eprintln!("usage: ewii-hostile-client --config client.toml");
            std::process::exit(2);
        }
    };
    let config: ewii::config::ClientConfig = ewii::config::load(config.as_ref()).unwrap();
    // What `ewii-client run` does before it serves.
    let plan = enforce::Plan::for_config(&config);
    let layers: Vec<&str> = config.layers.iter().map(String::as_str).collect();
    let (report, denies) = enforce::install(&plan, &layers, Hold::Cgroup);
    // Its descriptor is about to be closed behind its back: never drop it.
    std::mem::forget(denies);
    // The compromised dependency runs on a thread of its own, as a library's would.
    let attacks = std::thread::spawn(move || attacks(&plan)).join().unwrap();
    println!(
        "{}",
        serde_json::json!({ "layers": report.layers, "attacks": attacks })
    );
}
