//! Parsing the Client's and the Hub's configuration files.

use super::*;

#[test]
fn the_shipped_examples_parse_with_every_key() {
    let client: ClientConfig = include_str!("../../../examples/client.toml")
        .parse()
        .unwrap();
    assert_eq!(client.allow.names(), vec!["cache".to_string(), "db".into()]);
    assert_eq!(client.on_stop, OnStop::Revoke);
    assert_eq!(client.layers, LAYERS);
    let hub: HubConfig = include_str!("../../../examples/hub.toml").parse().unwrap();
    assert_eq!(hub.services.len(), 2);
}

#[test]
fn a_top_level_key_after_a_table_says_where_it_belongs() {
    let text = "hub = \"h:443\"\n[[allow]]\nname = \"db\"\naddress = \"127.0.0.1:5432\"\nstate_dir = \"/x\"\n";
    let err = text.parse::<ClientConfig>().unwrap_err();
    assert!(
        matches!(&err, ConfigError::Misplaced { key, .. } if key == "state_dir"),
        "{err}"
    );
    assert!(
        err.to_string().contains("write it before the first"),
        "{err}"
    );
    // A key unknown everywhere is a plain unknown key.
    let text = "hub = \"h:443\"\nstate_dirr = \"/x\"\n";
    assert!(matches!(
        text.parse::<ClientConfig>().unwrap_err(),
        ConfigError::Toml(_)
    ));
}

const CLIENT: &str = r#"
hub = "hub.example.net"
state_dir = "/var/lib/ewii"
[[allow]]
name = "db"
address = "10.0.0.5:5432"
"#;

#[test]
fn client_defaults() {
    let c: ClientConfig = CLIENT.parse().unwrap();
    assert_eq!(c.hub.to_string(), "hub.example.net:443");
    assert_eq!(c.on_stop, OnStop::Revoke);
    assert_eq!(c.audit, AuditOutput::Stdout);
    assert_eq!(c.allow.names(), ["db"]);
}

#[test]
fn client_threads_default_to_one_and_stay_in_range() {
    assert_eq!(CLIENT.parse::<ClientConfig>().unwrap().threads, 1);
    let with = |n: &str| format!("threads = {n}\n{CLIENT}").parse::<ClientConfig>();
    assert_eq!(with("4").unwrap().threads, 4);
    for bad in ["0", "65"] {
        let err = with(bad).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid(m) if m.contains("threads must be 1 to 64")),
            "{bad}: {err}"
        );
    }
    assert!(matches!(with("-1"), Err(ConfigError::Toml(_))));
}

#[test]
fn counts_out_of_their_range_are_refused_with_the_range() {
    for (key, bad, says) in [
        (
            "max_queries",
            "0",
            "max_queries must be 1 to 100000 (got 0)",
        ),
        ("max_queries", "100001", "max_queries must be 1 to 100000"),
        (
            "audit_backlog",
            "15",
            "audit_backlog must be 16 to 1000000 (got 15)",
        ),
        (
            "audit_backlog",
            "1000001",
            "audit_backlog must be 16 to 1000000",
        ),
    ] {
        let err = format!("{key} = {bad}\n{CLIENT}")
            .parse::<ClientConfig>()
            .unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid(m) if m.contains(says)),
            "{key} = {bad}: {err}"
        );
    }
    let ok = format!("max_queries = 100000\naudit_backlog = 16\n{CLIENT}");
    let c: ClientConfig = ok.parse().unwrap();
    assert_eq!((c.max_queries, c.audit_backlog), (100_000, 16));
    // An SVID lifetime a Client renews before its end: half of it is at least the 1 s gap a
    // Client keeps between renewals, with room for the round trip.
    // At most the 24 hours customers are promised (P7).
    for bad in [3, 86_401, 2_592_000] {
        let err = format!("state_dir = \"/s\"\nsvid_lifetime_secs = {bad}\n")
            .parse::<HubConfig>()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("between 4 and 86400 (24 hours): the customers are promised"),
            "{err}"
        );
    }
    let longest: HubConfig = "state_dir = \"/s\"\nsvid_lifetime_secs = 86400\n"
        .parse()
        .unwrap();
    assert_eq!(longest.svid_lifetime, Duration::from_secs(86_400));
    let shortest: HubConfig = "state_dir = \"/s\"\nsvid_lifetime_secs = 4\n"
        .parse()
        .unwrap();
    assert_eq!(shortest.svid_lifetime, Duration::from_secs(4));
}

#[test]
fn unknown_keys_and_empty_lists_are_errors() {
    let typo = CLIENT.replace("[[allow]]", "[[alow]]");
    assert!(matches!(
        typo.parse::<ClientConfig>(),
        Err(ConfigError::Toml(_))
    ));
    let none = "hub = \"h:443\"\nstate_dir = \"/s\"\n";
    assert!(matches!(
        none.parse::<ClientConfig>(),
        Err(ConfigError::Policy(PolicyError::Empty))
    ));
    let wild = CLIENT.replace("10.0.0.5", "0.0.0.0");
    assert!(matches!(
        wild.parse::<ClientConfig>(),
        Err(ConfigError::Policy(_))
    ));
}

#[test]
fn hub_addresses() {
    for (s, want) in [
        ("10.0.0.1:8443", "10.0.0.1:8443"),
        ("[::1]:443", "[::1]:443"),
        ("::1", "[::1]:443"),
        ("[2001:db8::1]", "[2001:db8::1]:443"),
        ("10.0.0.1", "10.0.0.1:443"),
        ("Hub.Example.NET:4433", "hub.example.net:4433"),
    ] {
        assert_eq!(s.parse::<HubAddress>().unwrap().to_string(), want);
    }
    for bad in [
        "",
        "hub:0",
        "hub:x",
        "hu b:1",
        "a/b:1",
        "10.0.0.1:0",
        "[::1]:0",
        "[::1",
        "[10.0.0.1]",
    ] {
        assert!(bad.parse::<HubAddress>().is_err(), "{bad}");
    }
}

#[test]
fn hub_services_need_a_principal_or_tls() {
    let base = "state_dir = \"/s\"\n[[service]]\nname = \"pg\"\nlisten = \"127.0.0.1:0\"\nclient = \"acme\"\ndestination = \"db\"\n";
    assert!(base.parse::<HubConfig>().is_err());
    let tcp = format!("{base}principal = \"billing\"\n");
    let h: HubConfig = tcp.parse().unwrap();
    assert_eq!(
        h.services[0].mode,
        ServiceMode::Tcp {
            principal: "billing".into()
        }
    );
    assert_eq!(h.listen.port(), 443);
    let tls = format!("{base}tls = true\nworkloads = [\"billing\", \"reports\"]\n");
    assert_eq!(
        tls.parse::<HubConfig>().unwrap().services[0].mode,
        ServiceMode::Tls {
            workloads: vec!["billing".into(), "reports".into()]
        }
    );
    // A TLS service names who may call it: never "any workload of the trust domain".
    for (extra, says) in [
        ("tls = true\n", "needs `workloads`"),
        ("tls = true\nworkloads = []\n", "`workloads` is empty"),
        (
            "tls = true\nworkloads = [\"Bad Name\"]\n",
            "invalid workload name",
        ),
        (
            "principal = \"b\"\nworkloads = [\"billing\"]\n",
            "`workloads` is for TLS services",
        ),
        // It travels in every query's header, which the Client bounds to 4 KiB.
        (
            &format!("principal = \"{}\"\n", "b".repeat(1_025)),
            "`principal` is longer than 1024 bytes",
        ),
    ] {
        let err = format!("{base}{extra}").parse::<HubConfig>().unwrap_err();
        assert!(err.to_string().contains(says), "{extra}: {err}");
    }
    let both = format!("{base}tls = true\nprincipal = \"x\"\n");
    assert!(both.parse::<HubConfig>().is_err());
    // A bad destination is named with its service and key.
    let bad_dest = base.replace("\"db\"", "\"DB!\"") + "principal = \"b\"\n";
    let err = bad_dest.parse::<HubConfig>().unwrap_err().to_string();
    assert!(
        err.contains("service \"pg\": `destination` is not the name of an entry in the Client's allow-list: invalid entry name \"DB!\""),
        "{err}"
    );
}

#[test]
fn enforcement_layers_are_known_ordered_and_keep_the_lock_whole() {
    let base = "hub = \"h:443\"\nstate_dir = \"/s\"\n[[allow]]\nname = \"db\"\naddress = \"127.0.0.1:5432\"\n[enforcement]\n";
    let parse = |extra: &str| format!("{base}{extra}").parse::<ClientConfig>();
    assert_eq!(parse("").unwrap().layers, LAYERS);
    assert_eq!(
        parse("layers = [\"seccomp\", \"landlock\", \"privileges\"]\n")
            .unwrap()
            .layers,
        ["landlock", "privileges", "seccomp"]
    );
    for (extra, says) in [
        ("layers = [\"ebfp\"]\n", "unknown layer \"ebfp\""),
        (
            "layers = [\"ebpf\", \"landlock\"]\n",
            "\"ebpf\" needs \"privileges\" and \"seccomp\"",
        ),
        (
            "require = \"kernel\"\nlayers = [\"landlock\", \"privileges\", \"seccomp\"]\n",
            "needs \"ebpf\"",
        ),
    ] {
        let err = parse(extra).unwrap_err().to_string();
        assert!(err.contains(says), "{extra}: {err}");
    }
}

/// `CLIENT` with `keys` added at the top level.
fn client_with(keys: &str) -> Result<ClientConfig, ConfigError> {
    format!("{keys}\n{CLIENT}").parse()
}

#[test]
fn p7_svid_source_workload_api_needs_its_socket_and_the_hubs_trust_domain() {
    assert_eq!(
        client_with("").unwrap().svid_source,
        SvidSource::StateDir,
        "enrolment with a token is the default"
    );
    let c = client_with(
        "svid_source = \"workload-api\"\nworkload_api_socket = \"unix:///run/spire/agent.sock\"\nhub_trust_domain = \"Operator.Example\"",
    )
    .unwrap();
    assert_eq!(
        c.svid_source,
        SvidSource::WorkloadApi {
            socket: "unix:///run/spire/agent.sock".into(),
            hub_trust_domain: "operator.example".into(),
        }
    );
    for (keys, says) in [
        (
            "svid_source = \"workload-api\"\nhub_trust_domain = \"o.example\"",
            "needs workload_api_socket",
        ),
        (
            "svid_source = \"workload-api\"\nworkload_api_socket = \"unix:///a.sock\"",
            "needs hub_trust_domain",
        ),
        (
            "svid_source = \"workload-api\"\nworkload_api_socket = \"tcp://10.0.0.1:8081\"\nhub_trust_domain = \"o.example\"",
            "unix:///absolute/path",
        ),
        (
            "svid_source = \"workload-api\"\nworkload_api_socket = \"unix:relative.sock\"\nhub_trust_domain = \"o.example\"",
            "unix:///absolute/path",
        ),
        (
            "svid_source = \"workload-api\"\nworkload_api_socket = \"unix:///a.sock\"\nhub_trust_domain = \"bad domain\"",
            "hub_trust_domain",
        ),
        (
            "workload_api_socket = \"unix:///a.sock\"",
            "only used with svid_source",
        ),
        ("hub_trust_domain = \"o.example\"", "only used with svid_source"),
    ] {
        let err = client_with(keys).unwrap_err().to_string();
        assert!(err.contains(says), "{keys}: {err}");
    }
    assert!(matches!(
        client_with("svid_source = \"spire\"").unwrap_err(),
        ConfigError::Toml(_)
    ));
}

/// A Hub file with `federation` appended.
fn hub_with(federation: &str) -> Result<HubConfig, ConfigError> {
    format!("state_dir = \"/var/lib/ewii-hub\"\n{federation}").parse()
}

#[test]
fn hub_threads_default_to_one_per_core_and_stay_in_range() {
    assert_eq!(hub_with("").unwrap().threads, None);
    assert_eq!(hub_with("threads = 1").unwrap().threads, Some(1));
    assert_eq!(hub_with("threads = 256").unwrap().threads, Some(256));
    for bad in ["0", "257"] {
        let err = hub_with(&format!("threads = {bad}")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid(m) if m.contains("threads must be 1 to 256")),
            "{bad}: {err}"
        );
    }
    assert!(matches!(
        hub_with("threads = -1"),
        Err(ConfigError::Toml(_))
    ));
}

#[test]
fn each_side_s_query_window_defaults_to_one_mib_and_stays_within_half_the_connection_s() {
    let client = |keys: &str| format!("{keys}\n{CLIENT}").parse::<ClientConfig>();
    assert_eq!(client("").unwrap().query_window, 1 << 20);
    assert_eq!(hub_with("").unwrap().query_window, 1 << 20);
    for (kib, bytes) in [(64, 64 << 10), (4096, 4 << 20), (8192, 8 << 20)] {
        let keys = format!("query_window_kib = {kib}");
        assert_eq!(client(&keys).unwrap().query_window, bytes, "{keys}");
        assert_eq!(hub_with(&keys).unwrap().query_window, bytes, "{keys}");
    }
    for bad in ["0", "63", "8193", "16384", "4294967295"] {
        let keys = format!("query_window_kib = {bad}");
        let says = format!("query_window_kib must be 64 to 8192 (got {bad})");
        for err in [client(&keys).unwrap_err(), hub_with(&keys).unwrap_err()] {
            assert!(
                matches!(&err, ConfigError::Invalid(m) if m.contains(&says)),
                "{keys}: {err}"
            );
        }
    }
    for bad in ["-1", "\"8MiB\"", "4294967296"] {
        let keys = format!("query_window_kib = {bad}");
        assert!(matches!(client(&keys), Err(ConfigError::Toml(_))), "{keys}");
        assert!(
            matches!(hub_with(&keys), Err(ConfigError::Toml(_))),
            "{keys}"
        );
    }
}

#[test]
fn p7_federation_names_each_client_once_in_its_own_trust_domain() {
    let h = hub_with(
        "[[federation]]\ntrust_domain = \"Customer.Example\"\nbundle = \"/etc/ewii-hub/customer.pem\"\nclients = { acme = \"spiffe://customer.example/ewii/db\" }\n",
    )
    .unwrap();
    assert_eq!(h.federation.len(), 1);
    assert_eq!(h.federation[0].trust_domain, "customer.example");
    assert_eq!(
        h.federation[0].clients["acme"].to_string(),
        "spiffe://customer.example/ewii/db"
    );
    assert!(hub_with("").unwrap().federation.is_empty());
    let table = |td: &str, clients: &str| {
        format!("[[federation]]\ntrust_domain = \"{td}\"\nbundle = \"/b.pem\"\nclients = {{ {clients} }}\n")
    };
    for (text, says) in [
        (table("c.example", ""), "`clients` is empty"),
        (
            table("c.example", "acme = \"spiffe://other.example/x\""),
            "is not in trust domain c.example",
        ),
        (
            table("c.example", "Acme = \"spiffe://c.example/x\""),
            "invalid client name",
        ),
        (
            table("c.example", "acme = \"https://c.example/x\""),
            "client \"acme\"",
        ),
        (
            table(
                "c.example",
                "acme = \"spiffe://c.example/x\", beta = \"spiffe://c.example/x\"",
            ),
            "listed already",
        ),
        (
            table("c.example", "acme = \"spiffe://c.example/x\"")
                + &table("d.example", "acme = \"spiffe://d.example/x\""),
            "listed already",
        ),
        (
            table("c.example", "acme = \"spiffe://c.example/x\"")
                + &table("c.example", "beta = \"spiffe://c.example/y\""),
            "listed twice",
        ),
        (
            table("not a domain", "acme = \"spiffe://x/y\""),
            "invalid trust domain",
        ),
    ] {
        let err = hub_with(&text).unwrap_err().to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}

/// Two of the Hub's TCP listeners on one port where the second could not bind are refused when
/// the file is read, naming both; listeners that can share a port are not.
#[test]
fn hub_listeners_that_cannot_share_a_port_are_refused_when_read() {
    let svc = |name: &str, listen: &str| {
        format!("[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\nclient = \"acme\"\ndestination = \"db\"\nprincipal = \"p\"\n")
    };
    let hub = |body: String| hub_with(&body);
    for (a, b) in [
        ("127.0.0.1:5432", "127.0.0.1:5432"),
        ("0.0.0.0:5432", "127.0.0.1:5432"),
        ("127.0.0.1:5432", "0.0.0.0:5432"),
        ("[::]:5432", "127.0.0.1:5432"),
        ("[::1]:5432", "[::]:5432"),
    ] {
        let e = hub(svc("one", a) + &svc("two", b)).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "service \"two\" listens on {b}, where service \"one\" listens ({a})"
            )),
            "{a} {b}: {e}"
        );
    }
    let e = hub(format!(
        "metrics_listen = \"127.0.0.1:9100\"\n{}",
        svc("one", "0.0.0.0:9100")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("metrics_listen listens on 127.0.0.1:9100"),
        "{e}"
    );
    for (a, b) in [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:5432", "127.0.0.2:5432"),
        ("0.0.0.0:5432", "[::1]:5432"),
        ("127.0.0.1:5432", "127.0.0.1:5433"),
    ] {
        hub(svc("one", a) + &svc("two", b)).unwrap_or_else(|e| panic!("{a} {b}: {e}"));
    }
}
