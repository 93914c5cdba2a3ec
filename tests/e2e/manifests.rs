//! The deployment examples (P1, P2, P3, P6, P13): the Compose file, the Kubernetes manifests of
//! both variants and the Hub's systemd unit pass real validators (scripts/check-manifests:
//! kubernetes-validate, the compose-spec schema, podman-compose, systemd-analyze), and say
//! what the customer page promises — non-root, no capability (or only the two the kernel lock
//! needs), a read-only root, no privilege gain, no host network, nothing published, readiness
//! by `ewii-client health` and no liveness probe (a restart is a stop, which revokes), egress
//! only to the Hub and the allow-list.

use std::process::Command;

use ewii_tests::require;
use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Runs scripts/check-manifests with `args`; `None` when its virtualenv is missing and the
/// run does not require it.
fn check(args: &[&str]) -> Option<std::process::Output> {
    let out = Command::new(format!("{ROOT}/scripts/check-manifests"))
        .args(args)
        .output()
        .unwrap();
    if out.status.code() == Some(3) {
        assert!(
            !require("EWII_REQUIRE_MANIFESTS"),
            "EWII_REQUIRE_MANIFESTS=1 but: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("SKIPPED: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(out)
}

fn documents(file: &str) -> Option<Vec<Value>> {
    let out = check(&["--json", &format!("{ROOT}/examples/{file}")])?;
    assert!(out.status.success(), "{out:?}");
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// What a Kubernetes file must say; `caps` is what the container adds.
fn kubernetes_promises(docs: &[Value], image: &str, caps: &[&str]) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut say = |ok: bool, what: &str| {
        if !ok {
            wrong.push(what.to_owned());
        }
    };
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .cloned()
            .unwrap_or_default()
    };
    let deploy = kind("Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    say(deploy["spec"]["replicas"] == 1, "one replica");
    say(
        deploy["spec"]["strategy"]["type"] == "Recreate",
        "recreated, never two at once",
    );
    say(
        pod["hostNetwork"].is_null() || pod["hostNetwork"] == false,
        "no host network",
    );
    say(
        pod["automountServiceAccountToken"] == false,
        "no service-account token",
    );
    say(
        pod["securityContext"]["runAsNonRoot"] == true,
        "runAsNonRoot",
    );
    say(pod["securityContext"]["runAsUser"] == 65532, "uid 65532");
    let containers = pod["containers"].as_array().cloned().unwrap_or_default();
    say(containers.len() == 1, "one container");
    for c in &containers {
        let sc = &c["securityContext"];
        say(
            c["image"].as_str().is_some_and(|i| i.contains(image)),
            "the image",
        );
        say(sc["readOnlyRootFilesystem"] == true, "read-only root");
        say(
            sc["allowPrivilegeEscalation"] == false,
            "no privilege escalation",
        );
        say(
            sc["privileged"].is_null() || sc["privileged"] == false,
            "not privileged",
        );
        say(
            strings(&sc["capabilities"]["drop"]) == ["ALL"],
            "drops every capability",
        );
        say(
            strings(&sc["capabilities"]["add"]) == caps,
            "adds only the lock's capabilities",
        );
        say(c["ports"].is_null(), "no container port (P13)");
        say(
            strings(&c["readinessProbe"]["exec"]["command"]) == ["ewii-client", "health"],
            "readiness by ewii-client health",
        );
        // `health` fails with no session (a Hub outage): a liveness probe would restart the
        // Client, and a stop revokes it (on_stop = "revoke", the default).
        say(
            c["livenessProbe"].is_null(),
            "no liveness probe: a restart would revoke the Client",
        );
        say(
            c["lifecycle"]["preStop"].is_null(),
            "SIGTERM alone stops and revokes",
        );
    }
    let policy = kind("NetworkPolicy");
    say(
        strings(&policy["spec"]["policyTypes"]) == ["Ingress", "Egress"],
        "the policy governs both directions",
    );
    say(
        policy["spec"]["ingress"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "nothing in (P13)",
    );
    // Out: UDP only to 443 (the Hub) and 53 (DNS); TCP only to 53 and the allow-list.
    for rule in policy["spec"]["egress"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let ports = rule["ports"].as_array().cloned().unwrap_or_default();
        say(!ports.is_empty(), "every egress rule names its ports (P6)");
        say(
            !rule["to"].as_array().is_none_or(Vec::is_empty),
            "every egress rule names its peers (P6)",
        );
        for p in ports {
            let udp_ok = p["protocol"] != "UDP" || p["port"] == 443 || p["port"] == 53;
            say(udp_ok, "UDP only to the Hub and DNS (P5)");
        }
    }
    wrong
}

#[test]
fn p1_p2_p3_p13_the_deployment_examples_validate_and_keep_the_promises() {
    let Some(out) = check(&[]) else { return };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let plain = documents("kubernetes/client.yaml").unwrap();
    assert_eq!(
        kubernetes_promises(&plain, "ewii-client:", &[]),
        Vec::<String>::new()
    );
    let ebpf = documents("kubernetes/client-ebpf.yaml").unwrap();
    assert_eq!(
        kubernetes_promises(&ebpf, "ewii-client-ebpf:", &["BPF", "NET_ADMIN"]),
        Vec::<String>::new()
    );
    // The checks can fail: a manifest that keeps a capability, listens or shares the host's
    // network is caught.
    let mut bad = plain.clone();
    let deploy = bad.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &mut deploy["spec"]["template"]["spec"];
    pod["hostNetwork"] = true.into();
    pod["containers"][0]["securityContext"]["capabilities"]["add"] = serde_json::json!(["NET_RAW"]);
    pod["containers"][0]["ports"] = serde_json::json!([{"containerPort": 8080}]);
    pod["containers"][0]["livenessProbe"] =
        serde_json::json!({"exec": {"command": ["ewii-client", "health"]}});
    assert_eq!(
        kubernetes_promises(&bad, "ewii-client:", &[]),
        [
            "no host network",
            "adds only the lock's capabilities",
            "no container port (P13)",
            "no liveness probe: a restart would revoke the Client"
        ]
    );
    // One name for the seccomp profile the lock needs, in both examples and in deploy.md's
    // recipe.
    let deploy = ebpf.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(
        deploy["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["localhostProfile"],
        "profiles/ewii-seccomp.json"
    );

    let compose = documents("compose.yaml").unwrap();
    let services = &compose[0]["services"];
    for (name, caps) in [
        ("ewii-client", vec![]),
        ("ewii-client-ebpf", vec!["BPF", "NET_ADMIN"]),
    ] {
        let s = &services[name];
        assert_eq!(s["user"], "65532:65532", "{name}");
        assert_eq!(s["read_only"], true, "{name}");
        assert_eq!(strings(&s["cap_drop"]), ["ALL"], "{name}");
        assert_eq!(strings(&s["cap_add"]), caps, "{name}");
        assert!(
            strings(&s["security_opt"]).contains(&"no-new-privileges:true"),
            "{name}"
        );
        assert!(
            s["ports"].is_null() && s["network_mode"].is_null(),
            "{name}: P13, P3"
        );
        assert_eq!(
            strings(&s["healthcheck"]["test"]),
            ["CMD", "ewii-client", "health"],
            "{name}"
        );
    }
    assert!(strings(&services["ewii-client-ebpf"]["security_opt"])
        .contains(&"seccomp=./ewii-seccomp.json"));
    let recipe = std::fs::read_to_string(format!("{ROOT}/docs/deploy.md")).unwrap();
    assert!(
        recipe.contains("> ewii-seccomp.json"),
        "deploy.md's recipe writes ewii-seccomp.json"
    );
}
