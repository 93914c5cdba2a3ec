//! `ewii-client`: the customer's Client — enrol once, then run; `status` and `health` read the
//! status file (there is no listener of any kind).
//!
//! Exit status: 0 stopped; 1 error (including a second Client on the same state directory);
//! 2 bad configuration or arguments, or `enroll` run as another user than the state
//! directory's owner (exit 4 in `ewii-hub`; here 4 is taken); 3 not enrolled, enrolment
//! refused, or SVID expired (enrol again); 4 the kernel enforcement required by the config is
//! unavailable; 5 the Hub could not be reached to enrol; 10 revoked by the Hub (a restart
//! exits 10 again at once, without touching the network).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use ewii::audit::{Audit, AuditOutput};
use ewii::client::enrol::EnrolError;
use ewii::client::{self, status::Status, ClientError, Exit};
use ewii::config::{self, ClientConfig, HubAddress};
use ewii::enforce;
use ewii::identity::parse_bundle_hash;
use ewii::logging::{say, LogArgs};
use ewii_common::audit::Side;
use ewii_common::session::PENDING_REVOKE_REASON;
use ewii_common::text::printable;

/// `println!` for a command's answer: [`ewii::logging::out`] (a closed pipe ends it quietly).
macro_rules! outln {
    () => {
        ewii::logging::out("\n")
    };
    ($($arg:tt)*) => {
        ewii::logging::out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's answer (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {
        ewii::logging::out(&format!($($arg)*))
    };
}

/// Exit status when the Hub has revoked this Client.
const EXIT_REVOKED: u8 = 10;
/// Stopped by a second signal during an enrolment (as a shell reports SIGINT's death).
const EXIT_STOPPED_ENROLLING: u8 = 130;
const EXIT_CONFIG: u8 = 2;
const EXIT_NOT_ENROLLED: u8 = 3;
/// Exit status when `enforcement.require` cannot be met.
const EXIT_ENFORCEMENT: u8 = 4;
/// Exit status when the Hub cannot be reached (or resolved) to enrol.
const EXIT_UNREACHABLE: u8 = 5;
/// `verify-webhook --seen`: a valid delivery whose id was verified before.
const EXIT_SEEN: u8 = 6;
/// What a revoked customer does next.
const REVOKED_NEXT: &str = "ask the operator for a new token, then run `ewii-client enroll --replace` \
     (or start with the new token in EWII_TOKEN and EWII_BUNDLE_HASH: a start enrols again with them)";
/// The same, for an SVID from a SPIFFE Workload API (no token: the operator readmits it).
const REVOKED_NEXT_SPIRE: &str = "ask the operator to readmit this Client (`ewii-hub readmit --client <name>`), then delete the `revoked` file in the state directory";

#[derive(Parser)]
#[command(
    name = "ewii-client",
    version,
    about = "Ewii Client: one outbound QUIC connection to your operator's Hub, to allow-listed destinations only"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrol with the Hub using a one-time join token.
    Enroll {
        /// The Hub, host[:port] (port 443 by default).
        #[arg(long, env = "EWII_HUB")]
        hub: String,
        /// The one-time join token from the operator.
        #[arg(long, env = "EWII_TOKEN", hide_env_values = true)]
        token: String,
        /// The Hub's bundle hash from the operator (sha256:…).
        #[arg(long, env = "EWII_BUNDLE_HASH")]
        bundle_hash: String,
        /// State directory for svid.pem, svid.key and bundle.pem.
        #[arg(long, env = "EWII_STATE_DIR", default_value = "/var/lib/ewii")]
        state_dir: PathBuf,
        /// Replace an existing enrolment (e.g. after a revocation, with a new token from the
        /// operator). The old SVID, and the revoked or revoke-pending markers, are replaced
        /// only once the new enrolment has succeeded.
        #[arg(long)]
        replace: bool,
    },
    /// Run: connect to the Hub and serve its queries. With EWII_TOKEN and EWII_BUNDLE_HASH
    /// set and no SVID yet, enrol first.
    Run {
        /// Configuration file (TOML).
        #[arg(long, env = "EWII_CONFIG", default_value = "/etc/ewii/client.toml")]
        config: PathBuf,
    },
    /// Install the kernel layers as `run` would, then try what the policy forbids and print
    /// what the kernel answered (JSON). Run it in the Client's container to see the lock work.
    ProbeEnforcement {
        /// Configuration file (TOML).
        #[arg(long, env = "EWII_CONFIG", default_value = "/etc/ewii/client.toml")]
        config: PathBuf,
        /// Layers to install, comma-separated; by default the configuration's
        /// `[enforcement] layers`.
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = ["ebpf", "landlock", "privileges", "seccomp"]
        )]
        layers: Option<Vec<String>>,
    },
    /// Print the Client's state (from the status file).
    Status {
        /// State directory.
        #[arg(long, env = "EWII_STATE_DIR", default_value = "/var/lib/ewii")]
        state_dir: PathBuf,
    },
    /// The customer's evidence: promise by promise, what holds for the running Client and how
    /// it was checked (reads the state directory, the config and /proc; opens no socket).
    /// Exit status 1 when a promise is broken.
    Verify {
        /// State directory.
        #[arg(long, env = "EWII_STATE_DIR", default_value = "/var/lib/ewii")]
        state_dir: PathBuf,
        /// The Client's configuration file: its allow-list must be the running one.
        #[arg(long, env = "EWII_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a webhook delivery from the Hub (Standard Webhooks, v1a / Ed25519).
    VerifyWebhook {
        /// The operator's webhook key, whpk_….
        #[arg(long)]
        key: String,
        /// The `webhook-id` header.
        #[arg(long)]
        id: String,
        /// The `webhook-timestamp` header.
        #[arg(long)]
        timestamp: String,
        /// The `webhook-signature` header.
        #[arg(long)]
        signature: String,
        /// File with the exact request body (`-` for stdin).
        #[arg(long)]
        body: PathBuf,
        /// A file of the delivery ids verified so far: a delivery whose id is in it is
        /// refused with exit status 6 (a retry already handled, or a replay), and a verified
        /// one is added.
        #[arg(long)]
        seen: Option<PathBuf>,
        /// The SPIFFE ID of one of this receiver's Clients (repeat for each): a delivery about
        /// another Client is refused (exit 1). The Hub signs every customer's notices with one
        /// key, so without it another of the operator's customers could pass one of its own on.
        #[arg(long = "client")]
        clients: Vec<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Exit 0 when connected and running, 1 otherwise (for container health checks).
    Health {
        /// State directory.
        #[arg(long, env = "EWII_STATE_DIR", default_value = "/var/lib/ewii")]
        state_dir: PathBuf,
    },
}

fn verify(state_dir: &Path, config: Option<&Path>, json: bool) -> ExitCode {
    use client::verify;
    let facts = match verify::gather(state_dir, config, Path::new("/proc")) {
        Ok(f) => f,
        Err(e) => return fail(1, e.to_string()),
    };
    let findings = verify::assess(&facts);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&verify::to_json(&facts, &findings)).unwrap_or_default()
        );
    } else {
        out!("{}", verify::render(&facts, &findings));
    }
    // The report says what it could check without it; the file itself is a usage error, as it
    // is for `run`.
    if let Some((path, Err(e))) = &facts.config {
        return fail(EXIT_CONFIG, format!("{}: {e}", path.display()));
    }
    if findings
        .iter()
        .any(|f| f.verdict == verify::Verdict::Broken)
    {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ewii::logging::init("info", cli.log.log_format);
    match cli.command {
        Command::Enroll {
            hub,
            token,
            bundle_hash,
            state_dir,
            replace,
        } => {
            if let Some(code) = refuse_foreign_state_dir(&state_dir) {
                return code;
            }
            let audit = match Audit::open(Side::Client, &AuditOutput::Stdout) {
                Ok(a) => a,
                Err(e) => return fail(1, format!("opening the audit sink: {e}")),
            };
            let how = if replace {
                Enrolment::Replace
            } else {
                Enrolment::First
            };
            block_on(config::DEFAULT_CLIENT_THREADS, async move {
                let stopped = ewii::signal::terminate();
                let enrolment = enroll(&hub, &token, &bundle_hash, &state_dir, &audit, how);
                not_cut(enrolment, stopped).await.0
            })
        }
        Command::Run { config } => run(&config),
        Command::ProbeEnforcement { config, layers } => {
            probe_enforcement(&config, layers.as_deref())
        }
        Command::Status { state_dir } => match Status::read(&state_dir) {
            Ok(status) => {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, e),
        },
        Command::Verify {
            state_dir,
            config,
            json,
        } => verify(&state_dir, config.as_deref(), json),
        Command::VerifyWebhook {
            key,
            id,
            timestamp,
            signature,
            body,
            seen,
            clients,
        } => {
            let data = if body.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).map(|_| v)
            } else {
                std::fs::read(&body)
            };
            let data = match data {
                Ok(d) => d,
                Err(e) => return fail(EXIT_CONFIG, format!("{}: {e}", body.display())),
            };
            let now = ewii::now_timestamp().unix_secs() as i64;
            if let Err(e) = ewii::webhook::verify(&key, &id, &timestamp, &signature, &data, now)
                .and_then(|()| ewii::webhook::check_client(&data, &clients))
            {
                return fail(1, format!("INVALID: {e}"));
            }
            match seen.map(|path| ewii::webhook::check_and_record_seen(&path, &id, now)) {
                Some(Err(e @ ewii::webhook::WebhookError::Seen(_))) => {
                    fail(EXIT_SEEN, format!("DUPLICATE: {e}"))
                }
                Some(Err(e)) => fail(1, e.to_string()),
                _ => {
                    outln!("valid: signed by {key}");
                    ExitCode::SUCCESS
                }
            }
        }
        Command::Completions { shell } => {
            // Into memory first: the generator panics on a write that fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ewii-client", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            ExitCode::SUCCESS
        }
        Command::Health { state_dir } => {
            let verdict = Status::read(&state_dir).and_then(|s| s.healthy(ewii::now_timestamp().0));
            match verdict {
                Ok(()) => {
                    outln!("healthy");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, format!("unhealthy: {e}")),
            }
        }
    }
}

/// `enroll`'s refusal of a state directory of another user, before the token is spent: an SVID
/// written as another user (root, typically) is one the Client, running as the directory's
/// owner, could not read.
fn refuse_foreign_state_dir(state_dir: &Path) -> Option<ExitCode> {
    match ewii::identity::store::foreign_owner(state_dir) {
        Ok(None) => None,
        Ok(Some(foreign)) => Some(fail(
            EXIT_CONFIG,
            format!(
                "{foreign}: the key and SVID enroll would write there would belong to uid {}, \
                 and a Client running as uid {} could not read them; the token was NOT sent. \
                 Enrol as the directory's owner: `{} ewii-client enroll …`",
                foreign.caller,
                foreign.owner,
                foreign.run_as()
            ),
        )),
        Err(e) => Some(fail(
            1,
            format!("state directory {}: {e}", state_dir.display()),
        )),
    }
}

/// How [`enroll`] treats an enrolment already in the state directory.
enum Enrolment<'a> {
    /// There is none: refused if there is.
    First,
    /// `enroll --replace`: taking the state directory's lock for it.
    Replace,
    /// `run` with a token, into a state directory with no identity or a revoked one: the
    /// caller holds the lock (a second one, taken here, would be refused as another Client).
    Held(&'a client::state_dir::StateLock),
}

/// Runs an enrolment to its end even when a stop (SIGTERM, SIGINT) comes meanwhile: one cut
/// after its token left may have spent the token with nothing stored, and every later start
/// would be refused. The enrolment is bounded (its lookup, dial and answer each have a
/// timeout); a second stop ends the process at once, saying what that may cost. `stopped` is
/// made before the enrolment starts, so that a signal is not the default action (death)
/// meanwhile. Whether a stop came.
async fn not_cut(
    enrolment: impl std::future::Future<Output = ExitCode>,
    stopped: impl std::future::Future<Output = ()>,
) -> (ExitCode, bool) {
    tokio::pin!(enrolment);
    tokio::select! {
        code = &mut enrolment => return (code, false),
        () = stopped => {}
    }
    // Watched before anything is said: a second signal meanwhile is not lost.
    let again = ewii::signal::terminate();
    say("ewii-client: stopping once the enrolment under way ends (it is bounded); a second signal stops at once, and may leave the token spent with nothing stored");
    tokio::select! {
        code = enrolment => (code, true),
        () = again => {
            fail(
                EXIT_STOPPED_ENROLLING,
                "stopped during the enrolment: the token may be spent with nothing stored; if the next enrolment is refused, ask the operator for a new token".into(),
            );
            // At once: the runtime's end would wait for a blocking write or lookup still
            // under way (a volume that hangs is what a second signal escapes).
            std::process::exit(i32::from(EXIT_STOPPED_ENROLLING));
        }
    }
}

async fn enroll(
    hub: &str,
    token: &str,
    bundle_hash: &str,
    state_dir: &Path,
    audit: &Audit,
    how: Enrolment<'_>,
) -> ExitCode {
    let hub: HubAddress = match hub.parse() {
        Ok(h) => h,
        Err(e) => return fail(EXIT_CONFIG, e.to_string()),
    };
    let pin = match parse_bundle_hash(bundle_hash) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_CONFIG, e.to_string()),
    };
    let enrolled = match how {
        Enrolment::First => client::enrol::enrol(&hub, token, pin, state_dir, audit).await,
        Enrolment::Replace => {
            client::enrol::enrol_replacing(&hub, token, pin, state_dir, audit).await
        }
        Enrolment::Held(lock) => {
            client::enrol::enrol_replacing_held(&hub, token, pin, state_dir, audit, lock).await
        }
    };
    match enrolled {
        Ok(id) => {
            say(&format!(
                "ewii-client: enrolled as {id}; state in {}",
                state_dir.display()
            ));
            ExitCode::SUCCESS
        }
        Err(e @ (EnrolError::Unreachable { .. } | EnrolError::Resolve(_))) => {
            fail(EXIT_UNREACHABLE, e.to_string())
        }
        Err(e @ (EnrolError::Busy(_) | EnrolError::StateDir { .. })) => fail(1, e.to_string()),
        Err(e) => fail(EXIT_NOT_ENROLLED, e.to_string()),
    }
}

fn run(path: &Path) -> ExitCode {
    let config: ClientConfig = match config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, format!("{}: {e}", path.display())),
    };
    // Before any thread of ours allocates: one heap arena per worker thread.
    enforce::heap::limit_arenas(config.threads);
    let token = std::env::var("EWII_TOKEN").ok().filter(|v| !v.is_empty());
    let hash = std::env::var("EWII_BUNDLE_HASH")
        .ok()
        .filter(|v| !v.is_empty());
    match (&token, &hash) {
        (Some(_), None) => return fail(
            EXIT_CONFIG,
            "EWII_TOKEN is set but EWII_BUNDLE_HASH is not: enrolling on first start needs both"
                .into(),
        ),
        (None, Some(_)) => return fail(
            EXIT_CONFIG,
            "EWII_BUNDLE_HASH is set but EWII_TOKEN is not: enrolling on first start needs both"
                .into(),
        ),
        (Some(_), Some(_)) if config.svid_source != config::SvidSource::StateDir => {
            return fail(
                EXIT_CONFIG,
                "EWII_TOKEN is set, but svid_source = \"workload-api\": the SVID comes from the SPIRE agent; unset EWII_TOKEN and EWII_BUNDLE_HASH".into(),
            )
        }
        _ => {}
    }
    // Run as another user than the state directory's owner (root, usually), what this start
    // writes there (the lock, the status, a renewed key) would be that user's, and the owner's
    // next start could not use it. Said, not refused: the Client itself can run.
    if let Ok(Some(foreign)) = ewii::identity::store::foreign_owner(&config.state_dir) {
        say(&format!(
            "ewii-client: warning: {foreign}: what this Client writes there would belong to uid \
             {}, and a later start as uid {} could not use it; run it as the directory's owner \
             (`{} ewii-client run …`, or `--user {}:{}` in a container)",
            foreign.caller,
            foreign.owner,
            foreign.run_as(),
            foreign.owner,
            foreign.group
        ));
    }
    // Not enrolled, and no token to enrol with: said before anything is created, printed or
    // installed (the directory it would create could belong to the wrong user for `enroll`).
    if token.is_none() && config.svid_source == config::SvidSource::StateDir {
        if let Err(e) = client::check_enrolled(&config.state_dir) {
            return fail(EXIT_NOT_ENROLLED, e.to_string());
        }
    }
    // Revoked, and no token to enrol again with: said first, in the same words and with the
    // same exit code as when the start gets that far, with nothing printed or installed before.
    if token.is_none() {
        if let Err(e) = client::check_not_revoked(&config.state_dir) {
            let next = match config.svid_source {
                config::SvidSource::StateDir => REVOKED_NEXT,
                config::SvidSource::WorkloadApi { .. } => REVOKED_NEXT_SPIRE,
            };
            return fail(
                EXIT_REVOKED,
                format!("{}; {next}", printable(&e.to_string())),
            );
        }
    }
    // One Client per state directory, checked before anything is installed or written.
    // (Created 0700 when missing, so that a first start can enrol into it.)
    // An error here shows up as the lock's, below.
    let _ = ewii::identity::store::create_private_dir(&config.state_dir);
    // A directory this user cannot write is reported after the enforcement check (which says
    // more about a missing privilege); a second Client is refused here, before anything.
    let lock = match client::state_dir::StateLock::acquire(&config.state_dir) {
        Err(e @ client::state_dir::LockError::Busy(_)) => return fail(1, e.to_string()),
        other => other,
    };
    say(&format!("ewii-client: hub {}", config.hub));
    say("ewii-client: effective allow-list (the only destinations this Client dials):");
    for line in client::describe_allow_list(&config) {
        say(&format!("  {line}"));
    }
    // The kernel layers go in before any other thread exists (Landlock binds the calling
    // thread and the threads it creates; the audit writer and the runtime come after).
    // A name that does not resolve now installs every layer that needs no address; the
    // session reaches the Hub with backoff once DNS answers (P14).
    // A socket per query, plus the QUIC socket, the state files and the runtime's own.
    let wanted = u64::from(config.max_queries) + 256;
    match enforce::privileges::raise_open_files(wanted) {
        Ok(n) if n < wanted => say(&format!(
            "ewii-client: open files limited to {n} (max_queries = {} wants {wanted}): raise the hard limit (ulimit -Hn, the container's nofile) or lower max_queries",
            config.max_queries
        )),
        Ok(_) => {}
        Err(e) => say(&format!("ewii-client: cannot raise the open-files limit: {e}")),
    }
    let plan = enforce::Plan::for_config(&config);
    for name in &plan.unresolved {
        say(&format!(
            "ewii-client: no address to dial for {name} now; the Client will keep trying"
        ));
    }
    let layers: Vec<&str> = config.layers.iter().map(String::as_str).collect();
    let (report, denies) = enforce::install(&plan, &layers, enforce::Hold::Cgroup);
    for layer in &report.layers {
        let state = match layer.state {
            enforce::LayerState::Active => "active",
            enforce::LayerState::Unavailable => "unavailable",
            enforce::LayerState::Failed => "FAILED",
        };
        say(&format!(
            "ewii-client: {} {state}: {}",
            layer.name, layer.detail
        ));
    }
    for gap in &report.not_covered {
        say(&format!("ewii-client: not covered: {gap}"));
    }
    if let Err(e) = report.check(config.require) {
        return fail(EXIT_ENFORCEMENT, e.to_string());
    }
    let lock = match lock {
        Ok(lock) => lock,
        Err(e) => return fail(1, e.to_string()),
    };
    let audit = match Audit::open(Side::Client, &config.audit) {
        Ok(a) => a
            .with_format(config.audit_format)
            .with_backlog(config.audit_backlog),
        Err(e) => return fail(1, format!("opening the audit sink: {e}")),
    };
    if let Err(e) =
        enforce::heap::tune_for_bulk(&audit, enforce::heap::ProgramPages::ReleaseOnceServing)
    {
        say(&format!(
            "ewii-client: freed heap will not be returned after load: {e}"
        ));
    }
    block_on(config.threads, async move {
        // Watched from here: a stop during an enrolment lets it end (`not_cut`), and the
        // run that follows sees it.
        let stopped = ewii::signal::terminate();
        tokio::pin!(stopped);
        // A token in the environment enrols a Client that has no identity, and one whose
        // identity was revoked (a stop with on_stop = "revoke", or the operator): a
        // rescheduled pod or a recreated container comes back with the new token it was
        // given, where it would otherwise stop on the revoked SVID at every start. A token
        // already spent is refused by the Hub, and the revoked state stays as it was.
        if let (Some(token), Some(hash)) = (token, hash) {
            let dir = &config.state_dir;
            // Small reads, but off the async workers all the same.
            let (d, t) = (dir.clone(), token.clone());
            let (enrolled, revoked, spent) = tokio::task::spawn_blocking(move || {
                let enrolled = d.join(ewii::identity::store::SVID_CERT).exists();
                let revoked = std::fs::read_to_string(d.join(client::REVOKED_MARKER)).ok();
                let spent = revoked.is_some() && client::enrol::token_spent(&d, &t);
                (enrolled, revoked, spent)
            })
            .await
            .unwrap_or((true, None, true));
            let how = match (enrolled, &revoked) {
                (false, _) => Some(Enrolment::Held(&lock)),
                (true, Some(_)) if spent => {
                    say("ewii-client: EWII_TOKEN is the token this Client was enrolled with, spent: not sent again; this Client stays revoked until it is given a new one");
                    None
                }
                (true, Some(reason)) => {
                    say(&format!(
                        "ewii-client: the identity in {} was revoked ({}); enrolling again with EWII_TOKEN",
                        dir.display(),
                        printable(reason.trim())
                    ));
                    Some(Enrolment::Held(&lock))
                }
                (true, None) => None,
            };
            if let Some(how) = how {
                let hub = config.hub.to_string();
                let enrolment = enroll(&hub, &token, &hash, dir, &audit, how);
                let (code, stop) = not_cut(enrolment, stopped.as_mut()).await;
                if code != ExitCode::SUCCESS {
                    return code;
                }
                if stop {
                    say("ewii-client: enrolled; stopped before running, as asked");
                    return ExitCode::SUCCESS;
                }
            }
        }
        let (next, expired) = match config.svid_source {
            config::SvidSource::StateDir => (REVOKED_NEXT, "the SVID expired without renewal (the Hub was unreachable, or the host asleep, until its end); enrol again with a new token"),
            config::SvidSource::WorkloadApi { .. } => (REVOKED_NEXT_SPIRE, "the SVID expired and the Workload API delivered no newer one; check the SPIRE agent"),
        };
        match client::run_enforced(config, audit, report, denies, lock, stopped).await {
            Ok(Exit::Stopped) => ExitCode::SUCCESS,
            // The revoke of an earlier stop, delivered at this start, is the Client's own.
            Ok(Exit::Revoked { reason }) if reason == PENDING_REVOKE_REASON => fail(
                EXIT_REVOKED,
                format!("revoked: {reason}; this Client will not reconnect; {next}"),
            ),
            Ok(Exit::Revoked { reason }) => fail(
                EXIT_REVOKED,
                format!(
                    "revoked by the Hub: {}; this Client will not reconnect; {next}",
                    reason.strip_prefix("by the Hub: ").unwrap_or(&reason)
                ),
            ),
            Ok(Exit::Expired) => fail(EXIT_NOT_ENROLLED, expired.into()),
            Err(e @ ClientError::WorkloadApi(_)) => fail(EXIT_NOT_ENROLLED, e.to_string()),
            Err(e @ ClientError::RevokedEarlier(_)) => fail(
                EXIT_REVOKED,
                format!("{}; {next}", printable(&e.to_string())),
            ),
            Err(e @ ClientError::SvidExpired(_)) => fail(EXIT_NOT_ENROLLED, e.to_string()),
            Err(e @ ClientError::NotEnrolled { .. }) => fail(EXIT_NOT_ENROLLED, e.to_string()),
            Err(e @ ClientError::Busy(_)) => fail(1, e.to_string()),
            Err(e @ ClientError::Enforcement(_)) => fail(EXIT_ENFORCEMENT, e.to_string()),
            Err(e) => fail(1, e.to_string()),
        }
    })
}

fn probe_enforcement(path: &Path, layers: Option<&[String]>) -> ExitCode {
    let config: ClientConfig = match config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, format!("{}: {e}", path.display())),
    };
    let plan = enforce::Plan::for_config(&config);
    if !plan.unresolved.is_empty() {
        return fail(
            1,
            format!(
                "no address to probe for {}: the probes dial the addresses these names resolve to, and they resolve to none (or only to ones the Client refuses) from this host now; check its DNS, or probe with a config that writes the addresses",
                plan.unresolved.join(", ")
            ),
        );
    }
    let layers: Vec<&str> = layers
        .unwrap_or(&config.layers)
        .iter()
        .map(String::as_str)
        .collect();
    // The probe's lock is held by its own process: it leaves nothing behind.
    let (report, denies) = enforce::install(&plan, &layers, enforce::Hold::Process);
    let probes = enforce::matrix(&plan);
    let required = report.check(config.require);
    let mut result = serde_json::json!({
        "layers": report.layers,
        "not_covered": report.not_covered,
        "probes": probes,
    });
    if let Some(mut src) = denies {
        let audit = match Audit::open_with_tap(Side::Client, &AuditOutput::Discard) {
            Ok(a) => a,
            Err(e) => return fail(1, e.to_string()),
        };
        let records: Vec<serde_json::Value> = src
            .drain()
            .iter()
            .filter_map(|e| {
                serde_json::from_str(&enforce::deny_record(&audit, e).to_json_line()).ok()
            })
            .collect();
        result["kernel_denied"] = serde_json::Value::Array(records);
        result["counters"] = serde_json::json!(src
            .counters()
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>());
    }
    outln!(
        "{}",
        serde_json::to_string_pretty(&result).unwrap_or_default()
    );
    match required {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_ENFORCEMENT, e.to_string()),
    }
}

/// Runs `f` on a runtime of `threads` worker threads (`threads` in the configuration).
fn block_on(threads: usize, f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build();
    match rt {
        Ok(rt) => rt.block_on(f),
        Err(e) => fail(1, format!("starting the runtime: {e}")),
    }
}

fn fail(code: u8, msg: String) -> ExitCode {
    ewii::logging::fail(&format!("ewii-client: {msg}"));
    ExitCode::from(code)
}
