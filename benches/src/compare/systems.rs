//! The systems under test, each a set of real processes forwarding loopback TCP entries to
//! the same two services (the echo service and an `iperf3` server): raw TCP (no tunnel), a
//! bare-quinn reference, rathole with `noise` and with plain `tcp`, bore, and Ewii with and
//! without the eBPF lock.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context};
use tempfile::TempDir;

use super::procs::{free_port, free_tcp, run, Proc};

/// How long a system may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The user the images run Ewii as (Dockerfile). As root, the harness runs the unlocked
/// Client as this user, with its binary owned by root, as the image does: the kernel treats a
/// process that does not own its binary differently (it may not reclaim the binary's pages
/// from the page cache, only unmap them: `enforce::code`).
pub const IMAGE_UID: u32 = 65_532;

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The services directly: the ceiling.
    RawTcp,
    /// `ewii-quinn-ref`: TCP over one QUIC connection, Ewii's TLS and transport settings,
    /// nothing else (no framing, policy, audit or enforcement).
    QuinnRef,
    /// rathole 0.5 with the `noise` transport (Noise_NK_25519_ChaChaPoly_BLAKE2s).
    RatholeNoise,
    /// rathole 0.5 with the plain `tcp` transport (no encryption).
    RatholeTcp,
    /// bore (plain TCP, a new connection to the server per forwarded connection).
    Bore,
    /// Ewii: `ewii-hub` and `ewii-client`, Landlock, privileges and seccomp.
    Ewii,
    /// Ewii with the Client in its own cgroup under the eBPF egress lock (root only).
    EwiiLocked,
    /// Ewii with the Hub at `threads = 1`: one shard, one plain socket and no steering program,
    /// a control for the default's sharding (with one Client, both serve it on one thread); not
    /// the default, so not the figure the targets read.
    EwiiHubOneThread,
    /// Ewii from another build (`--candidate DIR`: its `ewii-hub` and `ewii-client`), run as
    /// `Ewii` is, for an A/B interleaved with the rest; only with that option.
    EwiiCandidate,
}

impl Kind {
    /// Every system, in report order.
    pub const ALL: [Kind; 9] = [
        Kind::RawTcp,
        Kind::QuinnRef,
        Kind::RatholeNoise,
        Kind::RatholeTcp,
        Kind::Bore,
        Kind::Ewii,
        Kind::EwiiLocked,
        Kind::EwiiHubOneThread,
        Kind::EwiiCandidate,
    ];

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::RawTcp => "raw TCP",
            Kind::QuinnRef => "bare quinn",
            Kind::RatholeNoise => "rathole noise",
            Kind::RatholeTcp => "rathole tcp",
            Kind::Bore => "bore",
            Kind::Ewii => "Ewii",
            Kind::EwiiLocked => "Ewii + eBPF lock",
            Kind::EwiiHubOneThread => "Ewii (Hub threads = 1)",
            Kind::EwiiCandidate => "Ewii (candidate)",
        }
    }

    /// Whether the traffic between the two tunnel ends is encrypted.
    pub fn encrypted(self) -> bool {
        matches!(
            self,
            Kind::QuinnRef
                | Kind::RatholeNoise
                | Kind::Ewii
                | Kind::EwiiLocked
                | Kind::EwiiHubOneThread
                | Kind::EwiiCandidate
        )
    }

    /// Whether it is one of Ewii's systems.
    pub fn ewii(self) -> bool {
        matches!(
            self,
            Kind::Ewii | Kind::EwiiLocked | Kind::EwiiHubOneThread | Kind::EwiiCandidate
        )
    }
}

/// The programs the harness runs.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `ewii-hub`.
    pub hub: PathBuf,
    /// `ewii-client` for the unlocked system.
    pub client: PathBuf,
    /// `ewii-client` built with the `ebpf` feature, for the locked system.
    pub client_ebpf: PathBuf,
    /// `ewii-quinn-ref`.
    pub quinn_ref: PathBuf,
    /// `rathole`, when installed.
    pub rathole: Option<PathBuf>,
    /// `bore`, when installed.
    pub bore: Option<PathBuf>,
    /// `ewii-hub` and `ewii-client` of the candidate build, when one is compared.
    pub candidate: Option<(PathBuf, PathBuf)>,
}

/// The services every system forwards to.
#[derive(Debug, Clone, Copy)]
pub struct Services {
    /// The echo service (round trips, connection rate, idle connections).
    pub echo: SocketAddr,
    /// `iperf3 -s` (bulk).
    pub iperf: SocketAddr,
}

/// A system, started: its processes and its entries.
#[derive(Debug)]
pub struct Running {
    /// Which system.
    pub kind: Kind,
    /// The tunnel's processes (not the load generator's, not the services').
    pub procs: Vec<Proc>,
    /// Indexes into `procs` of the customer-side agent (whose RSS is reported).
    pub agents: Vec<usize>,
    /// Entry forwarding to the echo service.
    pub echo: SocketAddr,
    /// Entry forwarding to the iperf3 server.
    pub iperf: SocketAddr,
    /// Ewii: from the Client's process start to its `session_up` record.
    pub start_to_serving: Option<Duration>,
    cgroup: Option<PathBuf>,
    _dir: Option<TempDir>,
}

impl Running {
    /// Process ids of the tunnel.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// Process ids of the customer-side agent.
    pub fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().map(|i| self.procs[*i].pid()).collect()
    }

    /// The second process of a two-process tunnel is its agent; its entries and its files.
    fn agent_serves(&mut self, agent: Proc, entries: (SocketAddr, SocketAddr), dir: TempDir) {
        self.procs.push(agent);
        self.agents = vec![self.procs.len() - 1];
        (self.echo, self.iperf) = entries;
        self._dir = Some(dir);
    }

    /// Fails if a process of the tunnel died.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.procs.iter_mut().try_for_each(Proc::check_alive)
    }

    /// Stops every process (agent first) and removes the cgroup.
    pub fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
        if let Some(cg) = self.cgroup.take() {
            for _ in 0..100 {
                if fs::remove_dir(&cg).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A Hub that listens, and where.
struct StartedHub {
    proc: Proc,
    udp: SocketAddr,
    /// The echo and iperf3 services' entries.
    entries: (SocketAddr, SocketAddr),
}

/// State kept across starts: Ewii's enrolled Hub and Client, rathole's noise keys.
#[derive(Debug)]
pub struct Setup {
    bins: Bins,
    services: Services,
    dir: TempDir,
    noise: Option<(String, String)>,
}

impl Setup {
    /// Initialises a Hub, enrols a Client `bench` allowed to reach both services, makes
    /// rathole's noise key pair.
    pub fn new(bins: Bins, services: Services) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ewii-compare-").tempdir()?;
        let mut setup = Self {
            bins,
            services,
            noise: None,
            dir,
        };
        let hub_dir = setup.path("hub");
        run(
            &setup.bins.hub,
            &[
                "init",
                "--state-dir",
                &hub_dir,
                "--trust-domain",
                "bench.ewii.test",
            ],
        )?;
        let mut hub = setup.start_hub(&setup.bins.hub, None)?;
        let hub_udp = hub.udp;
        let token = run(
            &setup.bins.hub,
            &[
                "token",
                "create",
                "--state-dir",
                &hub_dir,
                "--client",
                "bench",
                "--hub-address",
                &hub_udp.to_string(),
            ],
        )?;
        let field = |label: &str| {
            token
                .lines()
                .find_map(|l| l.trim().strip_prefix(label))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("no {label:?} in: {token}"))
        };
        run(
            &setup.bins.client,
            &[
                "enroll",
                "--hub",
                &hub_udp.to_string(),
                "--token",
                &field("token:")?,
                "--bundle-hash",
                &field("bundle hash:")?,
                "--state-dir",
                &setup.path("client"),
            ],
        )?;
        hub.proc.stop();
        if let Some(rathole) = &setup.bins.rathole {
            let out = run(rathole, &["--genkey"])?;
            let after = |label: &str| {
                let mut lines = out.lines();
                lines.find(|l| l.trim() == label);
                lines
                    .find(|l| !l.trim().is_empty())
                    .map(|l| l.trim().to_owned())
                    .with_context(|| format!("rathole --genkey printed no {label:?}: {out}"))
            };
            setup.noise = Some((after("Private Key:")?, after("Public Key:")?));
        }
        Ok(setup)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `bin`: the `ewii-hub` to run (the candidate's, or `bins.hub`). Each start takes fresh
    /// ports, and another try on new ones if a port was taken between the pick and the
    /// Hub's bind (`free_port` releases what it picked).
    fn start_hub(&self, bin: &Path, threads: Option<usize>) -> anyhow::Result<StartedHub> {
        const TRIES: usize = 3;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let udp = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
            let entries = (free_tcp()?, free_tcp()?);
            let config = self.path("hub.toml");
            let threads = threads
                .map(|n| format!("threads = {n}\n"))
                .unwrap_or_default();
            fs::write(
                &config,
                format!(
                    "state_dir = {:?}\nlisten = \"{udp}\"\naudit = \"stdout\"\n{threads}\n\
                     [[service]]\nname = \"echo\"\nlisten = \"{}\"\nclient = \"bench\"\ndestination = \"echo\"\nprincipal = \"bench\"\n\n\
                     [[service]]\nname = \"iperf\"\nlisten = \"{}\"\nclient = \"bench\"\ndestination = \"iperf\"\nprincipal = \"bench\"\n",
                    self.path("hub"),
                    entries.0,
                    entries.1,
                ),
            )?;
            let mut proc = Proc::spawn("ewii-hub", bin, &["run", "--config", &config], None)?;
            match proc.wait_line("listening on udp", START_TIMEOUT) {
                Ok(_) => return Ok(StartedHub { proc, udp, entries }),
                Err(e) if attempt < TRIES && proc.tail().contains("Address already in use") => {
                    eprintln!("ewii-hub: a port was taken before it bound, trying others: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts `kind` and waits until both of its entries echo.
    pub async fn start(&self, kind: Kind) -> anyhow::Result<Running> {
        let s = self.services;
        let mut running = Running {
            kind,
            procs: vec![],
            agents: vec![],
            echo: s.echo,
            iperf: s.iperf,
            start_to_serving: None,
            cgroup: None,
            _dir: None,
        };
        match kind {
            Kind::RawTcp => return Ok(running),
            Kind::Ewii | Kind::EwiiLocked | Kind::EwiiHubOneThread | Kind::EwiiCandidate => {
                self.start_ewii(&mut running, kind)?
            }
            Kind::QuinnRef => self.start_quinn_ref(&mut running)?,
            Kind::RatholeNoise | Kind::RatholeTcp => {
                self.start_rathole(&mut running, kind == Kind::RatholeNoise)?
            }
            Kind::Bore => self.start_bore(&mut running)?,
        }
        // The echo entry proves the tunnel carries bytes; the iperf3 entry only that it
        // accepts (iperf3 speaks first and does not echo).
        let iperf = running.iperf;
        let iperf_ready = async move {
            tokio::task::spawn_blocking(move || wait_listening(iperf, START_TIMEOUT)).await?
        };
        let ready = async {
            super::load::ready(running.echo, START_TIMEOUT).await?;
            iperf_ready.await
        };
        {
            if let Err(e) = ready.await {
                let logs: Vec<String> = running
                    .procs
                    .iter()
                    .map(|p| format!("--- {}\n{}", p.name, p.tail()))
                    .collect();
                running.stop();
                bail!("{}: {e}\n{}", kind.label(), logs.join("\n"));
            }
        }
        Ok(running)
    }

    /// `kind`: one of Ewii's systems, which says the binaries, the lock and the Hub's threads.
    fn start_ewii(&self, running: &mut Running, kind: Kind) -> anyhow::Result<()> {
        let locked = kind == Kind::EwiiLocked;
        let (hub_bin, client_bin) = match kind {
            Kind::EwiiCandidate => {
                let (hub, client) = self
                    .bins
                    .candidate
                    .as_ref()
                    .context("no candidate build was given (--candidate DIR)")?;
                (hub, client)
            }
            Kind::EwiiLocked => (&self.bins.hub, &self.bins.client_ebpf),
            _ => (&self.bins.hub, &self.bins.client),
        };
        let hub_threads = (kind == Kind::EwiiHubOneThread).then_some(1);
        let hub = self.start_hub(hub_bin, hub_threads)?;
        running.procs.push(hub.proc);
        let config = self.path(if locked {
            "client-locked.toml"
        } else {
            "client.toml"
        });
        let enforcement = if locked {
            "layers = [\"ebpf\", \"landlock\", \"privileges\", \"seccomp\"]\nrequire = \"kernel\"\n"
        } else {
            // Not "ebpf": outside a cgroup of its own the lock would fence the harness too.
            "layers = [\"landlock\", \"privileges\", \"seccomp\"]\n"
        };
        fs::write(
            &config,
            format!(
                "hub = \"{}\"\nstate_dir = {:?}\naudit = \"stdout\"\non_stop = \"disconnect\"\n\n\
                 [reconnect]\ninitial_ms = 50\nmax_ms = 500\n\n[enforcement]\n{enforcement}\n\
                 [[allow]]\nname = \"echo\"\naddress = \"{}\"\n\n[[allow]]\nname = \"iperf\"\naddress = \"{}\"\n",
                hub.udp,
                self.path("client"),
                self.services.echo,
                self.services.iperf
            ),
        )?;
        let cgroup = if locked {
            let cg = ewii::enforce::ebpf::cgroup2_mount()
                .context("the eBPF lock needs cgroup v2")?
                .join(format!("ewii-compare-{}", std::process::id()));
            fs::create_dir_all(&cg).with_context(|| format!("creating {}", cg.display()))?;
            running.cgroup = Some(cg.clone());
            Some(cg)
        } else {
            None
        };
        // The locked Client needs root for the lock (it drops every privilege after, so its
        // state directory must be root's again, not the image user's).
        let root = super::procs::is_root();
        let as_image = (!locked && root).then_some(IMAGE_UID);
        if root {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755))?;
            fs::set_permissions(&config, fs::Permissions::from_mode(0o644))?;
            super::procs::chown_tree(Path::new(&self.path("client")), as_image.unwrap_or(0))
                .context("handing the Client's state directory to the user it runs as")?;
        }
        let started = Instant::now();
        let mut client = Proc::spawn_as(
            "ewii-client",
            client_bin,
            &["run", "--config", &config],
            cgroup.as_deref(),
            as_image,
        )?;
        let up = client.wait_line("\"session_up\"", START_TIMEOUT);
        running.procs.push(client);
        running.agents = vec![1];
        running.start_to_serving = Some(up?.saturating_duration_since(started));
        (running.echo, running.iperf) = hub.entries;
        Ok(())
    }

    fn start_quinn_ref(&self, running: &mut Running) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cert = dir.path().join("cert.der").display().to_string();
        let udp = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
        let (e1, e2) = (free_tcp()?, free_tcp()?);
        let mut server = Proc::spawn(
            "quinn-ref server",
            &self.bins.quinn_ref,
            &[
                "server",
                "--udp",
                &udp.to_string(),
                "--cert-out",
                &cert,
                "--entry",
                &e1.to_string(),
                "--entry",
                &e2.to_string(),
            ],
            None,
        )?;
        server.wait_line("listening", START_TIMEOUT)?;
        running.procs.push(server);
        let client = Proc::spawn(
            "quinn-ref client",
            &self.bins.quinn_ref,
            &[
                "client",
                "--server",
                &udp.to_string(),
                "--cert",
                &cert,
                "--dest",
                &self.services.echo.to_string(),
                "--dest",
                &self.services.iperf.to_string(),
            ],
            None,
        )?;
        running.agent_serves(client, (e1, e2), dir);
        Ok(())
    }

    fn start_rathole(&self, running: &mut Running, noise: bool) -> anyhow::Result<()> {
        let rathole = self
            .bins
            .rathole
            .as_ref()
            .context("rathole is not installed")?;
        let dir = tempfile::tempdir()?;
        let control = free_tcp()?;
        let (e1, e2) = (free_tcp()?, free_tcp()?);
        let (server_transport, client_transport) = match (&self.noise, noise) {
            (Some((private, public)), true) => (
                format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
                format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
            ),
            (None, true) => bail!("no noise keys"),
            _ => (
                "[server.transport]\ntype = \"tcp\"\n".to_owned(),
                "[client.transport]\ntype = \"tcp\"\n".to_owned(),
            ),
        };
        let server_toml = dir.path().join("server.toml");
        fs::write(
            &server_toml,
            format!(
                "[server]\nbind_addr = \"{control}\"\n{server_transport}\n\
                 [server.services.echo]\ntoken = \"bench-token\"\nbind_addr = \"{e1}\"\n\
                 [server.services.iperf]\ntoken = \"bench-token\"\nbind_addr = \"{e2}\"\n"
            ),
        )?;
        let client_toml = dir.path().join("client.toml");
        fs::write(
            &client_toml,
            format!(
                "[client]\nremote_addr = \"{control}\"\n{client_transport}\n\
                 [client.services.echo]\ntoken = \"bench-token\"\nlocal_addr = \"{}\"\n\
                 [client.services.iperf]\ntoken = \"bench-token\"\nlocal_addr = \"{}\"\n",
                self.services.echo, self.services.iperf
            ),
        )?;
        let server = Proc::spawn(
            "rathole server",
            rathole,
            &["--server", &server_toml.display().to_string()],
            None,
        )?;
        running.procs.push(server);
        wait_listening(control, START_TIMEOUT)?;
        let client = Proc::spawn(
            "rathole client",
            rathole,
            &["--client", &client_toml.display().to_string()],
            None,
        )?;
        running.agent_serves(client, (e1, e2), dir);
        Ok(())
    }

    fn start_bore(&self, running: &mut Running) -> anyhow::Result<()> {
        let bore = self.bins.bore.as_ref().context("bore is not installed")?;
        let server = Proc::spawn(
            "bore server",
            bore,
            &["server", "--min-port", "1024", "--max-port", "65535"],
            None,
        )?;
        running.procs.push(server);
        // bore's control port is fixed.
        wait_listening(SocketAddr::from(([127, 0, 0, 1], 7835)), START_TIMEOUT)?;
        let mut entries = vec![];
        for (name, service) in [("echo", self.services.echo), ("iperf", self.services.iperf)] {
            let entry = free_tcp()?;
            let local = Proc::spawn(
                &format!("bore local ({name})"),
                bore,
                &[
                    "local",
                    &service.port().to_string(),
                    "--local-host",
                    "127.0.0.1",
                    "--to",
                    "127.0.0.1",
                    "--port",
                    &entry.port().to_string(),
                ],
                None,
            )?;
            running.procs.push(local);
            entries.push(entry);
        }
        // One process per forwarded port: the one serving the echo service is the agent whose
        // memory is reported.
        running.agents = vec![1];
        (running.echo, running.iperf) = (entries[0], entries[1]);
        Ok(())
    }
}

/// Until something accepts TCP connections on `addr`.
fn wait_listening(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {addr} after {within:?}")
}

/// `name` in `dir`, or on `PATH`.
pub fn find_program(name: &str, dir: Option<&Path>) -> Option<PathBuf> {
    let in_dir = dir.map(|d| d.join(name)).filter(|p| p.exists());
    in_dir.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
    })
}
