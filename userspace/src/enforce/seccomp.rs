//! seccomp: what a Client with no listener, one QUIC connection and TCP to its allow-list never
//! needs, and what would let code in the process bypass or undo the other layers. Refused
//! with EPERM, synchronised to every thread, installed last (after the eBPF lock is attached
//! and the privileges are dropped). docs/ebpf.md has the table, family by family:
//!
//! - the x32 ABI (syscall numbers with bit 30 set), checked before anything else: a filter that
//!   matches x86-64 numbers would otherwise let its x32 twins through;
//! - serving: `listen`, `accept`, `accept4`;
//! - sockets the Client does not use: any family but `AF_UNIX`, `AF_INET`, `AF_INET6` and
//!   `AF_NETLINK`; netlink other than `NETLINK_ROUTE` (glibc reads addresses through it when it
//!   sorts DNS answers); raw, packet, RDM and DCCP socket types; MPTCP; `MSG_FASTOPEN` sends;
//! - io_uring (its operations skip seccomp);
//! - the kernel lock and other processes: `bpf` (after start-up: the lock is attached),
//!   `ptrace`, `process_vm_readv`/`process_vm_writev`, `pidfd_getfd`, `kcmp`,
//!   `perf_event_open`, `userfaultfd`;
//! - running other code or changing the process's world: `execve`, `execveat`, `unshare`,
//!   `setns`, `mount`, `umount2`, `pivot_root`, `chroot`, `capset`, the keyring, module, kexec,
//!   reboot, swap, clock and accounting calls.
//!
//! Everything else is allowed (the filter's default): see docs/ebpf.md for why this is still a
//! deny-list.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::{probe, Layer, LayerState};

const COVERS: &str = "no x32 ABI; no listen/accept/accept4; sockets only AF_UNIX, AF_INET, AF_INET6 and netlink route, internet sockets only TCP and UDP (no ICMP ping sockets, SCTP, UDP-Lite or MPTCP), no raw/packet sockets, no MSG_FASTOPEN; no io_uring; no bpf, ptrace, process_vm_*, pidfd_getfd, execve, unshare/setns/mount, capset (all threads)";

/// Syscalls refused whatever their arguments.
const ALWAYS: &[i64] = &[
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_capset,
    libc::SYS_add_key,
    libc::SYS_keyctl,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_open_by_handle_at,
    libc::SYS_fanotify_init,
];

/// Socket families the Client uses.
const FAMILIES: [i32; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// Socket types it never uses (the low four bits of `socket`'s second argument).
const REFUSED_TYPES: [i32; 4] = [
    libc::SOCK_RAW,
    libc::SOCK_RDM,
    10, // SOCK_PACKET (obsolete packet sockets)
    6,  // SOCK_DCCP
];

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| e.to_string())
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| e.to_string())
}

/// The rules on `socket(domain, type, protocol)`: any one matching refuses the call.
fn socket_rules() -> Result<Vec<SeccompRule>, String> {
    let mut rules = vec![
        // A family not in FAMILIES.
        rule(
            FAMILIES
                .iter()
                .map(|f| cond(0, SeccompCmpOp::Ne, *f as u64))
                .collect::<Result<_, _>>()?,
        )?,
        // Netlink other than NETLINK_ROUTE.
        rule(vec![
            cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
            cond(2, SeccompCmpOp::Ne, libc::NETLINK_ROUTE as u64)?,
        ])?,
        // MPTCP.
        rule(vec![cond(
            2,
            SeccompCmpOp::Eq,
            probe::IPPROTO_MPTCP as u64,
        )?])?,
    ];
    // Internet sockets are TCP or UDP only: protocol 0 (the type's default), IPPROTO_TCP
    // or IPPROTO_UDP, and no SOCK_SEQPACKET (SCTP's default). Without this, a ping socket
    // (SOCK_DGRAM, IPPROTO_ICMP: no privilege needed where `ping_group_range` covers the
    // process) or SCTP would reach any address, with no Landlock rule to stop them.
    for family in [libc::AF_INET, libc::AF_INET6] {
        rules.push(rule(vec![
            cond(0, SeccompCmpOp::Eq, family as u64)?,
            cond(2, SeccompCmpOp::Ne, 0)?,
            cond(2, SeccompCmpOp::Ne, libc::IPPROTO_TCP as u64)?,
            cond(2, SeccompCmpOp::Ne, libc::IPPROTO_UDP as u64)?,
        ])?);
        rules.push(rule(vec![
            cond(0, SeccompCmpOp::Eq, family as u64)?,
            cond(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_SEQPACKET as u64)?,
        ])?);
    }
    // (Netlink sockets are SOCK_RAW by nature; their protocol is checked above.)
    for ty in REFUSED_TYPES {
        rules.push(rule(vec![
            cond(1, SeccompCmpOp::MaskedEq(0xf), ty as u64)?,
            cond(0, SeccompCmpOp::Ne, libc::AF_NETLINK as u64)?,
        ])?);
    }
    Ok(rules)
}

/// Builds the filter for this architecture.
pub fn filter() -> Result<BpfProgram, String> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("unsupported architecture: {e:?}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALWAYS.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(libc::SYS_socket, socket_rules()?);
    let fastopen = libc::MSG_FASTOPEN as u64;
    let masked = |arg| -> Result<Vec<SeccompRule>, String> {
        Ok(vec![rule(vec![cond(
            arg,
            SeccompCmpOp::MaskedEq(fastopen),
            fastopen,
        )?])?])
    };
    rules.insert(libc::SYS_sendto, masked(3)?);
    rules.insert(libc::SYS_sendmsg, masked(2)?);
    rules.insert(libc::SYS_sendmmsg, masked(3)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    Ok([refuse_x32().as_slice(), prog.as_slice()].concat())
}

/// Syscall numbers with the x32 bit, refused before the filter proper (x86-64 only: on other
/// architectures this prefix is empty).
fn refuse_x32() -> Vec<sock_filter> {
    if !cfg!(target_arch = "x86_64") {
        return Vec::new();
    }
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // A = seccomp_data.nr
        op(BPF_LD_W_ABS, 0, 0, 0),
        // nr >= X32_SYSCALL_BIT ? refuse : go on
        op(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ]
}

/// Installs the filter on every thread, then proves it.
pub fn install() -> Layer {
    let layer = |state, detail: String| Layer::new("seccomp", state, COVERS.into(), detail);
    let prog = match filter() {
        Ok(p) => p,
        Err(e) => return layer(LayerState::Failed, format!("cannot build the filter: {e}")),
    };
    if let Err(e) = seccompiler::apply_filter_all_threads(&prog) {
        return layer(LayerState::Unavailable, format!("cannot install: {e}"));
    }
    let listen = probe::listen();
    let uring = probe::io_uring_setup();
    let x32 = probe::x32_socket();
    let bpf = probe::bpf_call();
    let ping = probe::ping_socket();
    if [listen, uring, x32, bpf, ping]
        .iter()
        .all(|v| *v == Err(libc::EPERM))
    {
        layer(
            LayerState::Active,
            "self-test: listen, io_uring_setup, an x32 socket call, bpf and an ICMP ping socket refused with EPERM"
                .into(),
        )
    } else {
        layer(
            LayerState::Failed,
            format!(
                "self-test: listen answered {}, io_uring_setup {}, x32 socket {}, bpf {}, ICMP ping socket {}",
                probe::name(&listen),
                probe::name(&uring),
                probe::name(&x32),
                probe::name(&bpf),
                probe::name(&ping)
            ),
        )
    }
}
