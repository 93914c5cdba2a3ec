//! Landlock (ABI ≥ 4): the process may `connect` TCP only to the allow-list's ports (and 53
//! when names are resolved) and may not `bind` TCP at all. Landlock has no address rules and
//! no UDP rules; the eBPF layer adds those.

use landlock::{
    Access, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};

use super::{probe, Layer, LayerState, Plan};

/// Restricts this thread and every thread it creates later; then proves it.
pub fn install(plan: &Plan) -> Layer {
    let covers = format!(
        "TCP connect only to ports {:?}, no TCP bind (this process and its threads)",
        plan.tcp_ports
    );
    let layer = |state, detail: String| Layer::new("landlock", state, covers.clone(), detail);
    let result =
        Ruleset::default()
            .handle_access(AccessNet::from_all(ABI::V4))
            .and_then(|r| r.create())
            .and_then(|r| {
                r.add_rules(plan.tcp_ports.iter().map(|p| {
                    Ok::<_, landlock::RulesetError>(NetPort::new(*p, AccessNet::ConnectTcp))
                }))
            })
            .and_then(|r| r.restrict_self());
    match result {
        Ok(status) if status.ruleset == RulesetStatus::FullyEnforced => {
            prove(
                plan,
                |detail| layer(LayerState::Active, detail),
                |detail| layer(LayerState::Failed, detail),
            )
        }
        Ok(status) => layer(
            LayerState::Unavailable,
            format!(
                "the kernel does not enforce Landlock network rules ({:?}); needs ABI 4 (Linux 6.7)",
                status.ruleset
            ),
        ),
        Err(e) => layer(LayerState::Unavailable, format!("cannot install: {e}")),
    }
}

fn prove(plan: &Plan, ok: impl Fn(String) -> Layer, bad: impl Fn(String) -> Layer) -> Layer {
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], plan.denied_port()));
    match probe::tcp_connect(target) {
        Err(libc::EACCES) => ok(format!(
            "self-test: TCP connect to {target} refused with EACCES"
        )),
        other => bad(format!(
            "self-test: TCP connect to {target} answered {}, not EACCES",
            probe::name(&other)
        )),
    }
}
