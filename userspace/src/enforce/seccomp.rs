//! seccomp: the syscalls a client with no listener and one QUIC connection never needs, and
//! the ones that would bypass the socket-level checks: `listen`, `accept`, `accept4`,
//! `io_uring_*` (its operations skip seccomp), MPTCP sockets, and `MSG_FASTOPEN` sends.
//! Refused with EPERM. The filter is synchronised to every thread of the process.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{probe, Layer, LayerState};

const COVERS: &str =
    "no listen/accept/accept4, no io_uring, no MPTCP sockets, no MSG_FASTOPEN sends (all threads)";

/// Builds the filter for this architecture.
pub fn filter() -> Result<BpfProgram, String> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("unsupported architecture: {e:?}"))?;
    let always = Vec::new;
    let masked = |arg: u8, mask: u64| -> Result<Vec<SeccompRule>, String> {
        let cond = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            mask,
        )
        .map_err(|e| e.to_string())?;
        Ok(vec![
            SeccompRule::new(vec![cond]).map_err(|e| e.to_string())?
        ])
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_listen, always());
    rules.insert(libc::SYS_accept, always());
    rules.insert(libc::SYS_accept4, always());
    rules.insert(libc::SYS_io_uring_setup, always());
    rules.insert(libc::SYS_io_uring_enter, always());
    rules.insert(libc::SYS_io_uring_register, always());
    let mptcp = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        probe::IPPROTO_MPTCP as u64,
    )
    .map_err(|e| e.to_string())?;
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![mptcp]).map_err(|e| e.to_string())?],
    );
    let fastopen = libc::MSG_FASTOPEN as u64;
    rules.insert(libc::SYS_sendto, masked(3, fastopen)?);
    rules.insert(libc::SYS_sendmsg, masked(2, fastopen)?);
    rules.insert(libc::SYS_sendmmsg, masked(3, fastopen)?);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
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
    if listen == Err(libc::EPERM) && uring == Err(libc::EPERM) {
        layer(
            LayerState::Active,
            "self-test: listen and io_uring_setup refused with EPERM".into(),
        )
    } else {
        layer(
            LayerState::Failed,
            format!(
                "self-test: listen answered {}, io_uring_setup {}",
                probe::name(&listen),
                probe::name(&uring)
            ),
        )
    }
}
