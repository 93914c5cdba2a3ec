//! Each check both ways: the facts of a healthy unprivileged Client hold every promise they
//! can; each fact broken on purpose breaks its promise (and only says so, never panics).

use super::procfs::{Socket, TCP_LISTEN};
use super::*;
use crate::enforce::{Layer, Report};

const NOW: i64 = 1_800_000_000;

fn sock(proto: Proto, local: &str, remote: &str, state: u8) -> Socket {
    Socket {
        proto,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state,
        uid: 65532,
        inode: 7,
    }
}

fn leaf(not_before: i64, not_after: i64) -> LeafInfo {
    LeafInfo {
        id: "spiffe://op.example/client/acme".parse().unwrap(),
        serial: "0a".into(),
        not_before,
        not_after,
    }
}

fn good() -> Facts {
    let enforcement = Report {
        layers: vec![
            Layer::new("landlock", LayerState::Active, "tcp".into(), "ok".into()),
            Layer::new("seccomp", LayerState::Active, "listen".into(), "ok".into()),
        ],
        ..Report::default()
    };
    let status = Status {
        state: State::Connected,
        pid: 42,
        updated_us: 0,
        hub: "hub.op.example:443".into(),
        spiffe_id: "spiffe://op.example/client/acme".into(),
        svid_not_after: NOW + 3600,
        session_id: Some(1),
        allow_list: vec!["db=10.0.0.5:5432".into()],
        failures: 0,
        last_error: None,
        enforcement,
        kernel_denied: vec![],
        svid_serial: "0a".into(),
        svid_not_before: NOW - 3600,
        next_renewal_unix: Some(NOW + 600),
        hub_spiffe_id: "spiffe://op.example/hub".into(),
        bundle: vec!["sha256:ab".into()],
        allow_list_digest: "sha256:00".into(),
        audit: "stdout (ewii JSON lines)".into(),
        on_stop: "revoke".into(),
        metrics: Default::default(),
        hub_connections: 1,
        svid_source: "state-dir".into(),
    };
    Facts {
        now: NOW,
        state_dir: "/var/lib/ewii".into(),
        status,
        status_age: 3,
        credentials: Ok(Credentials {
            name: "ewii-client".into(),
            uids: [65532; 4],
            gids: [65532; 4],
            no_new_privs: true,
            seccomp: 2,
            ..Credentials::default()
        }),
        sockets: Ok(Sockets {
            attribution: Attribution::Descriptors,
            sockets: vec![
                sock(Proto::Udp, "0.0.0.0:40000", "192.0.2.10:443", 1),
                sock(Proto::Tcp, "10.0.0.2:50000", "10.0.0.5:5432", 1),
            ],
            other_families: 0,
            read: vec![],
        }),
        svid: Ok(leaf(NOW - 3600, NOW + 3600)),
        workload_api: None,
        key_mode: Ok(0o600),
        bundle_on_disk: Ok(vec!["sha256:ab".into()]),
        revoked: None,
        revoke_pending: false,
        resolvers: vec!["10.0.0.53".parse().unwrap()],
        config: None,
    }
}

fn verdict(f: &Facts, id: &str) -> Verdict {
    let findings = assess(f);
    let x = findings.iter().find(|x| x.id == id).unwrap();
    x.verdict
}

fn broken(id: &str, break_it: impl FnOnce(&mut Facts)) {
    let mut f = good();
    if id != "P16" {
        assert_eq!(verdict(&f, id), Verdict::Holds, "{id} holds before");
    }
    break_it(&mut f);
    assert_eq!(verdict(&f, id), Verdict::Broken, "{id} broken after");
}

#[test]
fn a_healthy_unprivileged_client_holds_every_promise_it_can_show() {
    let f = good();
    let findings = assess(&f);
    assert_eq!(findings.len(), 16);
    for x in &findings {
        let expected = match x.id {
            "P1" => Verdict::Elsewhere,
            "P16" => Verdict::Off,
            _ => Verdict::Holds,
        };
        assert_eq!(x.verdict, expected, "{x:?}");
        assert!(!x.evidence.is_empty(), "{x:?}");
    }
    let text = render(&f, &findings);
    assert!(
        text.contains("P13  HOLDS     no inbound listener"),
        "{text}"
    );
    assert!(
        text.contains("14 hold, 0 broken, 1 off, 1 checked elsewhere"),
        "{text}"
    );
    assert_eq!(to_json(&f, &findings)["holds"], true);
}

#[test]
fn p2_root_breaks_it() {
    broken("P2", |f| f.credentials.as_mut().unwrap().uids[2] = 0);
    broken("P2", |f| f.credentials = Err("gone".into()));
}

#[test]
fn p3_a_held_capability_breaks_it() {
    broken("P3", |f| f.credentials.as_mut().unwrap().cap_eff = 1 << 12);
    broken("P3", |f| f.credentials.as_mut().unwrap().cap_amb = 1 << 21);
}

#[test]
fn p4_a_connection_outside_the_list_or_a_changed_file_breaks_it() {
    broken("P4", |f| {
        let s = f.sockets.as_mut().unwrap();
        s.sockets
            .push(sock(Proto::Tcp, "10.0.0.2:50001", "10.0.0.6:5432", 2));
    });
    broken("P4", |f| {
        let config: ClientConfig =
            "hub = \"h:443\"\nstate_dir = \"/x\"\n[[allow]]\nname = \"db\"\naddress = \"10.0.0.9:5432\"\n"
                .parse()
                .unwrap();
        f.config = Some(("/etc/ewii/client.toml".into(), Ok(config)));
    });
    // The same file holds.
    let mut f = good();
    let config: ClientConfig =
        "hub = \"h:443\"\nstate_dir = \"/x\"\n[[allow]]\nname = \"db\"\naddress = \"10.0.0.5:5432\"\n"
            .parse()
            .unwrap();
    f.status.allow_list_digest = format!("sha256:{}", hex::encode(config.allow.digest()));
    f.config = Some(("/etc/ewii/client.toml".into(), Ok(config)));
    assert_eq!(verdict(&f, "P4"), Verdict::Holds);
    // A v4-mapped spelling of an allowed address is the same address.
    let s = f.sockets.as_mut().unwrap();
    s.sockets.push(sock(
        Proto::Tcp,
        "[::ffff:10.0.0.2]:1",
        "[::ffff:10.0.0.5]:5432",
        1,
    ));
    assert_eq!(verdict(&f, "P4"), Verdict::Holds);
}

#[test]
fn p5_p6_a_second_udp_or_a_raw_socket_breaks_them() {
    broken("P5", |f| {
        let s = f.sockets.as_mut().unwrap();
        s.sockets
            .push(sock(Proto::Udp, "0.0.0.0:40001", "0.0.0.0:0", 7));
    });
    broken("P5", |f| f.sockets.as_mut().unwrap().sockets.clear());
    broken("P6", |f| {
        let s = f.sockets.as_mut().unwrap();
        s.sockets
            .push(sock(Proto::Raw, "0.0.0.0:1", "0.0.0.0:0", 7));
    });
    broken("P6", |f| {
        let s = f.sockets.as_mut().unwrap();
        s.sockets
            .push(sock(Proto::Udp, "0.0.0.0:40001", "8.8.4.4:443", 1));
    });
    // The connection a rotation replaced, still draining, is accounted for.
    let mut f = good();
    f.status.hub_connections = 2;
    let s = f.sockets.as_mut().unwrap();
    s.sockets
        .push(sock(Proto::Udp, "0.0.0.0:40001", "192.0.2.10:443", 1));
    assert_eq!(verdict(&f, "P5"), Verdict::Holds);
    assert_eq!(verdict(&f, "P6"), Verdict::Holds);
    assert_eq!(verdict(&f, "P13"), Verdict::Holds);
    // A DNS query in flight is not a second connection.
    let mut f = good();
    let s = f.sockets.as_mut().unwrap();
    s.sockets
        .push(sock(Proto::Udp, "0.0.0.0:40002", "10.0.0.53:53", 1));
    assert_eq!(verdict(&f, "P6"), Verdict::Holds);
    // Port 53 of an address that is no resolver is a second connection like any other.
    let mut f = good();
    let s = f.sockets.as_mut().unwrap();
    s.sockets
        .push(sock(Proto::Udp, "0.0.0.0:40002", "203.0.113.9:53", 1));
    assert_eq!(verdict(&f, "P6"), Verdict::Broken);
    // A ping socket is not allowed either.
    let mut f = good();
    let s = f.sockets.as_mut().unwrap();
    s.sockets
        .push(sock(Proto::OtherIp, "0.0.0.0:7", "203.0.113.9:0", 1));
    assert_eq!(verdict(&f, "P6"), Verdict::Broken);
}

#[test]
fn p7_p8_an_expired_long_lived_or_exposed_svid_breaks_them() {
    broken("P7", |f| f.svid = Ok(leaf(NOW - 7200, NOW - 1)));
    broken("P7", |f| f.svid = Ok(leaf(NOW - 3600, NOW + 30 * 3600)));
    broken("P7", |f| f.key_mode = Ok(0o644));
    broken("P7", |f| f.svid = Err("no such file".into()));
    broken("P8", |f| f.svid = Ok(leaf(NOW - 3600, NOW + 30 * 3600)));
    broken("P8", |f| f.svid = Ok(leaf(NOW - 7200, NOW - 1)));
}

#[test]
fn p9_p10_disconnect_on_stop_or_a_revocation_breaks_them() {
    broken("P9", |f| f.status.on_stop = "disconnect".into());
    broken("P10", |f| f.revoked = Some("operator".into()));
}

#[test]
fn p11_p12_a_discarded_audit_breaks_them() {
    broken("P11", |f| {
        f.status.audit = "discard (ewii JSON lines)".into()
    });
    broken("P12", |f| {
        f.status.audit = "discard (ewii JSON lines)".into()
    });
}

#[test]
fn p13_a_listener_breaks_it() {
    broken("P13", |f| {
        let s = f.sockets.as_mut().unwrap();
        s.sockets
            .push(sock(Proto::Tcp, "0.0.0.0:8080", "0.0.0.0:0", TCP_LISTEN));
    });
}

#[test]
fn p13_a_udp_socket_that_takes_datagrams_from_anyone_breaks_it() {
    // The QUIC socket not connected to the Hub (an older Client's) receives from any source.
    broken("P13", |f| {
        f.sockets.as_mut().unwrap().sockets[0] = sock(Proto::Udp, "0.0.0.0:40000", "0.0.0.0:0", 7);
    });
    // A socket connected to one peer is no way in, whatever that peer (P6 judges it).
    let mut f = good();
    f.sockets.as_mut().unwrap().sockets.push(sock(
        Proto::Udp,
        "0.0.0.0:40002",
        "203.0.113.53:53",
        1,
    ));
    assert_eq!(verdict(&f, "P13"), Verdict::Holds);
    assert_eq!(verdict(&f, "P6"), Verdict::Broken);
}

#[test]
fn p14_a_gone_stale_or_stopped_client_breaks_it() {
    broken("P14", |f| f.credentials = Err("no such process".into()));
    broken("P14", |f| f.status_age = 120);
    broken("P14", |f| f.status.state = State::Expired);
    let mut f = good();
    f.status.state = State::Backoff;
    f.status.failures = 3;
    assert_eq!(
        verdict(&f, "P14"),
        Verdict::Holds,
        "backing off is reconnecting"
    );
}

#[test]
fn p15_a_missing_bundle_breaks_it() {
    broken("P15", |f| f.bundle_on_disk = Ok(vec![]));
    broken("P15", |f| f.bundle_on_disk = Err("unreadable".into()));
}

#[test]
fn p16_an_active_lock_holds_and_a_failed_layer_breaks_it() {
    broken("P16", |f| {
        f.status.enforcement.layers.insert(
            0,
            Layer::new("ebpf", LayerState::Active, "all".into(), "ok".into()),
        );
        assert_eq!(verdict(f, "P16"), Verdict::Holds);
        f.status.enforcement.layers[1].state = LayerState::Failed;
    });
}

/// `good()` for a Client whose SVID comes from a SPIRE agent: no key and no bundle on disk.
fn from_agent() -> Facts {
    let mut f = good();
    f.workload_api = Some("unix:///run/spire/agent.sock".into());
    f.key_mode = Err("/var/lib/ewii/svid.key: No such file or directory".into());
    f.bundle_on_disk = Err("/var/lib/ewii/bundle.pem: No such file or directory".into());
    f.status.next_renewal_unix = None;
    f
}

#[test]
fn p7_p15_an_svid_from_the_workload_api_is_evidenced_without_files_and_breaks_when_expired() {
    let f = from_agent();
    for id in ["P7", "P8", "P15"] {
        assert_eq!(verdict(&f, id), Verdict::Holds, "{id}");
    }
    let p7 = assess(&f).into_iter().find(|x| x.id == "P7").unwrap();
    assert!(
        p7.evidence.iter().any(|e| e.contains("memory only")),
        "{:?}",
        p7.evidence
    );
    let mut expired = from_agent();
    expired.svid = Ok(leaf(NOW - 7200, NOW - 1));
    assert_eq!(verdict(&expired, "P7"), Verdict::Broken);
    let mut no_bundle = from_agent();
    no_bundle.status.bundle.clear();
    assert_eq!(verdict(&no_bundle, "P15"), Verdict::Broken);
    // A state-dir Client without its key file still breaks P7.
    let mut missing = good();
    missing.key_mode = Err("svid.key: No such file or directory".into());
    assert_eq!(verdict(&missing, "P7"), Verdict::Broken);
}
