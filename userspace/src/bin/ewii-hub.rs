//! `ewii-hub`: the operator's Hub — state setup, join tokens, and the server itself.
//!
//! Exit status: 0 done; 1 error; 2 bad configuration file or arguments; 3 the state directory
//! is not initialised (run `ewii-hub init`); 4 a command that writes the state directory runs
//! as another user than its owner.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use ewii::audit::Audit;
use ewii::config::{self, HubConfig};
use ewii::hub::{admin, Hub, HubError};
use ewii::logging::{fail, say, LogArgs};
use ewii_common::audit::Side;

/// `print!` for a command's answer: [`ewii::logging::out`] (a closed pipe ends it quietly).
macro_rules! out {
    ($($arg:tt)*) => {
        ewii::logging::out(&format!($($arg)*))
    };
}

/// `println!` for a command's answer: [`ewii::logging::out`] (a closed pipe ends it quietly).
macro_rules! outln {
    () => {
        ewii::logging::out("\n")
    };
    ($($arg:tt)*) => {
        ewii::logging::out(&format!("{}\n", format_args!($($arg)*)))
    };
}

#[derive(Parser)]
#[command(
    name = "ewii-hub",
    version,
    about = "Ewii Hub: the operator's end of the outbound-only connector"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Create the CA, the Hub SVID and the database in the state directory.
    Init {
        /// State directory (created 0700).
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// SPIFFE trust domain, e.g. example.org.
        #[arg(long)]
        trust_domain: String,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Issue an SVID for an operator workload that calls a TLS service listener.
    WorkloadSvid {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// Workload name: the SVID is spiffe://<td>/workload/<name>.
        #[arg(long)]
        name: String,
        /// Directory for svid.pem, svid.key and bundle.pem.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
    },
    /// Rotate the CA: prepare (publish the next CA), activate (sign with it), retire (drop the old).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Revoke a Client now: its live session closes within a second, it cannot come back,
    /// and the customer's webhook (if registered) is notified.
    Revoke {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// Client name.
        #[arg(long)]
        client: String,
        /// Reason, recorded and sent in the webhook.
        #[arg(long, default_value = "revoked by the operator")]
        reason: String,
    },
    /// Lift the revocation of a [[federation]] Client (SPIRE-issued SVIDs: no token to enrol
    /// it again with). The customer also deletes the `revoked` marker in its state directory.
    Readmit {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// Client name.
        #[arg(long)]
        client: String,
    },
    /// List enrolled clients, their sessions, serials and revocation state.
    Clients {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print the bundle hash Clients pin at install.
    BundleHash {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
    },
    /// Print the key customers verify webhook deliveries with (`whpk_…`), for a
    /// `[[federation]]` webhook (`token create --webhook` prints it too).
    WebhookKey {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
    },
    /// Run the Hub.
    Run {
        /// Configuration file (TOML).
        #[arg(long, env = "EWII_HUB_CONFIG", default_value = "/etc/ewii/hub.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make the next CA and add it to the bundle pushed to every Client.
    Prepare {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
    },
    /// Sign with the prepared CA from now on (the old one stays trusted).
    Activate {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
    },
    /// Remove the old CA from the bundle.
    Retire {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// Retire even if some Clients still hold SVIDs from the old CA (they will be refused).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time join token for a Client.
    Create {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// Client name: its SVID will be spiffe://<td>/client/<name>.
        #[arg(long)]
        client: String,
        /// How long the token may wait for its one use, e.g. 1h.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The customer's webhook URL for revocation notices.
        #[arg(long)]
        webhook: Option<String>,
        /// Accept a loopback or link-local webhook address (tests only).
        #[arg(long)]
        danger_allow_private_webhook: bool,
        /// The address Clients dial (`host:port`), for the enrolment line printed for the
        /// customer.
        #[arg(long, env = "EWII_HUB_ADDRESS")]
        hub_address: Option<String>,
    },
    /// List unused tokens (by id: a token itself is shown only once, when created).
    List {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete unused tokens: one by id, or every one of a client.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "client"])))]
    Revoke {
        /// State directory.
        #[arg(long, env = "EWII_HUB_STATE_DIR", default_value = "/var/lib/ewii-hub")]
        state_dir: PathBuf,
        /// The token's id (from `token list` or `token create`).
        #[arg(long)]
        id: Option<String>,
        /// Every unused token of this client.
        #[arg(long)]
        client: Option<String>,
    },
}

/// Exit status for a bad configuration file or argument.
const EXIT_CONFIG: u8 = 2;
/// Exit status when the state directory holds no Hub (no `ewii-hub init` yet).
const EXIT_NOT_INITIALISED: u8 = 3;
/// Exit status when a command that writes the state directory runs as a user other than its
/// owner.
const EXIT_NOT_OWNER: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ewii::logging::init("info", cli.log.log_format);
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            fail(&format!("ewii-hub: {}", ewii::logging::causes(e.as_ref())));
            // A value the command refuses is a bad argument, as clap's own refusals are.
            let invalid = matches!(e.downcast_ref::<HubError>(), Some(HubError::Invalid(_)));
            ExitCode::from(if invalid { EXIT_CONFIG } else { 1 })
        }
    }
}

/// Refuses, once and clearly, a state directory that `ewii-hub init` never made. One this
/// user may not look into is not called uninitialised: its error says so, and whose it is.
fn initialised(state_dir: &std::path::Path) -> Result<(), ExitCode> {
    match std::fs::symlink_metadata(state_dir.join(admin::CA_CERT)) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // A file where the directory should be: not a question of who runs the command.
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            fail(&format!(
                "ewii-hub: {} is not a directory: give --state-dir (or `state_dir` in the config) the Hub's state directory, made by `ewii-hub init`",
                state_dir.display()
            ));
            return Err(ExitCode::from(1));
        }
        Err(e) => {
            let who = match std::fs::metadata(state_dir) {
                Ok(m) => format!(
                    "its owner (uid {}), the user the Hub runs as",
                    std::os::unix::fs::MetadataExt::uid(&m)
                ),
                Err(_) => "the user the Hub runs as".to_owned(),
            };
            fail(&format!(
                "ewii-hub: cannot read the Hub state in {}: {e}; run this as {who}",
                state_dir.display(),
            ));
            return Err(ExitCode::from(1));
        }
    }
    fail(&format!(
        "ewii-hub: {} holds no Hub state: run `ewii-hub init --state-dir {} --trust-domain <your.domain>` first",
        state_dir.display(),
        state_dir.display()
    ));
    Err(ExitCode::from(EXIT_NOT_INITIALISED))
}

/// Refuses to write into a state directory that belongs to another user: the keys and
/// certificates this command would create there (0600) would be the caller's, and a Hub running
/// as the directory's owner could not read them. Root is refused too: that is the usual mistake.
fn owned(state_dir: &std::path::Path) -> Result<(), ExitCode> {
    match admin::foreign_owner(state_dir) {
        Ok(None) => Ok(()),
        Ok(Some(foreign)) => {
            fail(&format!(
                "ewii-hub: {foreign}: the files it writes there would belong to uid {}, and a Hub \
                 running as uid {} could not read them; nothing was changed. Run it as the \
                 directory's owner: `{} ewii-hub …`",
                foreign.caller,
                foreign.owner,
                foreign.run_as()
            ));
            Err(ExitCode::from(EXIT_NOT_OWNER))
        }
        Err(e) => {
            fail(&format!("ewii-hub: {}: {e}", state_dir.display()));
            Err(ExitCode::from(1))
        }
    }
}

/// [`owned`], then [`initialised`]: for the commands that write the state directory. In this
/// order, since a user who is not the owner may not even see into it.
fn writable(state_dir: &std::path::Path) -> Result<(), ExitCode> {
    owned(state_dir)?;
    initialised(state_dir)
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Completions { shell } => {
            // Into memory first: the generator panics on a write that fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ewii-hub", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
        }
        Command::Init {
            state_dir,
            trust_domain,
        } => {
            if let Err(code) = owned(&state_dir) {
                return Ok(code);
            }
            let r = admin::init(&state_dir, &trust_domain)?;
            outln!("initialised {}", state_dir.display());
            outln!("hub id:      {}", r.hub_id);
            outln!("bundle hash: {}", r.bundle_hash);
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    state_dir,
                    client,
                    ttl,
                    webhook,
                    danger_allow_private_webhook,
                    hub_address,
                },
        } => {
            if let Err(code) = writable(&state_dir) {
                return Ok(code);
            }
            let r = admin::create_token(
                &state_dir,
                &client,
                ttl,
                webhook.as_deref(),
                danger_allow_private_webhook,
            )?;
            // The token's opt-in alone does not deliver: the Hub's config must allow it too.
            if let Some(url) = webhook.as_deref().filter(|_| danger_allow_private_webhook) {
                if ewii::webhook::check_url(url, false).is_err() {
                    say(&format!(
                        "ewii-hub: warning: {} is not a public address: the running Hub delivers to it only with `[webhooks] danger_allow_private_targets = true` in its config; without it the first attempt is refused and the delivery waits in the outbox until a Hub starts with it",
                        ewii::webhook::redacted(url)
                    ));
                }
            }
            if let Some(state) = r.replaces {
                say(&format!(
                    "ewii-hub: warning: {client} is enrolled and not revoked ({state}): an enrolment with this token replaces its identity, and the Client that holds the current one is refused from its next connection; for a second machine, give it a client name of its own"
                ));
            }
            outln!("token:       {}", r.token);
            outln!(
                "token id:    {}   (for `ewii-hub token list` / `token revoke`)",
                r.id
            );
            outln!("client id:   {}", r.client_id);
            outln!("bundle hash: {}", r.bundle_hash);
            outln!(
                "expires:     {}",
                ewii_common::time::Timestamp(r.expires_at as u64 * 1_000_000)
            );
            if let Some(key) = &r.webhook_public_key {
                outln!("webhook key: {key}   (the customer verifies deliveries with it)");
            }
            outln!();
            outln!("The customer enrols with:");
            outln!(
                "  ewii-client enroll --hub {} --token {} --bundle-hash {}",
                hub_address.as_deref().unwrap_or("<hub-host>:443"),
                r.token,
                r.bundle_hash
            );
        }
        Command::Token {
            command: TokenCommand::List { state_dir, json },
        } => {
            if let Err(code) = initialised(&state_dir) {
                return Ok(code);
            }
            let rows = admin::tokens(&state_dir)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let now = ewii::now_timestamp().unix_secs() as i64;
                outln!("{:<18} {:<20} {:<28} WEBHOOK", "ID", "CLIENT", "EXPIRES");
                for t in rows {
                    let expires = ewii_common::time::Timestamp(t.expires_at as u64 * 1_000_000);
                    let expires = if t.expires_at <= now {
                        format!("{expires} (expired)")
                    } else {
                        expires.to_string()
                    };
                    outln!(
                        "{:<18} {:<20} {:<28} {}",
                        t.id,
                        t.client,
                        expires,
                        t.webhook
                            .as_deref()
                            .map_or_else(|| "-".to_owned(), ewii::webhook::redacted)
                    );
                }
            }
        }
        Command::Token {
            command:
                TokenCommand::Revoke {
                    state_dir,
                    id,
                    client,
                },
        } => {
            if let Err(code) = writable(&state_dir) {
                return Ok(code);
            }
            let which = match (id, client) {
                (Some(id), _) => ewii::hub::state::TokenSelector::Id(id),
                (None, Some(c)) => ewii::hub::state::TokenSelector::Client(c),
                (None, None) => {
                    fail("ewii-hub: token revoke needs --id <id> or --client <name>");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            let n = admin::revoke_tokens(&state_dir, &which)?;
            outln!("deleted {n} unused token(s); they can no longer enrol anything");
        }
        Command::WorkloadSvid {
            state_dir,
            name,
            out,
            lifetime,
        } => {
            if let Err(code) = initialised(&state_dir) {
                return Ok(code);
            }
            let id = admin::issue_workload_svid(&state_dir, &name, lifetime, &out)?;
            outln!("issued {id} into {}", out.display());
        }
        Command::Ca { command } => match command {
            CaCommand::Prepare { state_dir } => {
                if let Err(code) = writable(&state_dir) {
                    return Ok(code);
                }
                let hash = admin::ca_prepare(&state_dir)?;
                outln!("prepared the next CA ({hash}); it is in the bundle now.");
                outln!("Give Clients time to receive it, then: ewii-hub ca activate");
            }
            CaCommand::Activate { state_dir } => {
                if let Err(code) = writable(&state_dir) {
                    return Ok(code);
                }
                let hash = admin::ca_activate(&state_dir)?;
                outln!("activated the new CA ({hash}); new tokens carry this bundle hash.");
                outln!("After every Client has renewed (up to 60 % of an SVID lifetime): ewii-hub ca retire");
            }
            CaCommand::Retire { state_dir, force } => {
                if let Err(code) = writable(&state_dir) {
                    return Ok(code);
                }
                let stale = admin::ca_retire(&state_dir, force)?;
                outln!("retired the old CA; the bundle holds the signing CA only.");
                if !stale.is_empty() {
                    outln!(
                            "forced: {} may be refused until re-enrolled (those that held an old-CA SVID)",
                            stale.join(", ")
                        );
                }
            }
        },
        Command::Revoke {
            state_dir,
            client,
            reason,
        } => {
            if let Err(code) = writable(&state_dir) {
                return Ok(code);
            }
            let done = admin::revoke(&state_dir, &client, &reason)?;
            if !done.revoked {
                outln!("{client} was already revoked");
                return Ok(ExitCode::SUCCESS);
            }
            outln!("revoked {client}: a live session closes within 1 s; the Client cannot return");
            match done.webhook {
                Some(url) => outln!(
                    "a notice to the customer's webhook ({}) is queued: the running Hub delivers it (or the next to start), and its audit says when (`webhook_delivered`, or `webhook_failed`)",
                    ewii::webhook::redacted(&url)
                ),
                None => eprintln!(
                    "ewii-hub: warning: {client} has no webhook URL (its token was created without --webhook, or its [[federation]] entry names none): the customer is not notified; tell them yourself"
                ),
            }
        }
        Command::Readmit { state_dir, client } => {
            if let Err(code) = writable(&state_dir) {
                return Ok(code);
            }
            if admin::readmit(&state_dir, &client)? {
                outln!(
                    "readmitted {client}: its next handshake is accepted (the customer deletes the `revoked` marker in its state directory first)"
                );
            } else {
                outln!("{client} was not revoked");
            }
        }
        Command::Clients { state_dir, json } => {
            if let Err(code) = initialised(&state_dir) {
                return Ok(code);
            }
            let rows = admin::clients(&state_dir)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                outln!(
                    "{:<20} {:<10} {:<34} SVID EXPIRES",
                    "CLIENT",
                    "STATE",
                    "SERIAL"
                );
                for row in rows {
                    // As the running Hub recorded it: a live session, none, or revoked.
                    let state = if row.revoked_at.is_some() {
                        "revoked"
                    } else if row.session.is_some() {
                        "connected"
                    } else {
                        "offline"
                    };
                    let (serial, exp) = row
                        .serials
                        .last()
                        .map(|(s, e)| {
                            (
                                s.clone(),
                                ewii_common::time::Timestamp(*e as u64 * 1_000_000).to_string(),
                            )
                        })
                        .unwrap_or_else(|| ("-".into(), "-".into()));
                    outln!("{:<20} {:<10} {:<34} {}", row.name, state, serial, exp);
                }
            }
        }
        Command::BundleHash { state_dir } => {
            if let Err(code) = initialised(&state_dir) {
                return Ok(code);
            }
            outln!("{}", admin::current_bundle_hash(&state_dir)?);
        }
        Command::WebhookKey { state_dir } => {
            if let Err(code) = initialised(&state_dir) {
                return Ok(code);
            }
            // Made on first use: only then does it write.
            if !state_dir.join(ewii::webhook::KEY_FILE).exists() {
                if let Err(code) = owned(&state_dir) {
                    return Ok(code);
                }
            }
            outln!("{}", admin::webhook_key(&state_dir)?);
        }
        Command::Run { config: path } => {
            let config: HubConfig = match config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    fail(&format!("ewii-hub: {}: {e}", path.display()));
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            if let Err(code) = initialised(&config.state_dir) {
                return Ok(code);
            }
            // Said, not refused: this Hub can run, but what it writes (a renewed SVID, the
            // webhook key) would be the caller's, and the owner's Hub could not read it later.
            if let Ok(Some(foreign)) = admin::foreign_owner(&config.state_dir) {
                say(&format!(
                    "ewii-hub: warning: {foreign}: what this Hub writes there would belong to \
                     uid {}, and a later start as uid {} could not read it; run it as the \
                     directory's owner (`{} ewii-hub run …`)",
                    foreign.caller,
                    foreign.owner,
                    foreign.run_as()
                ));
            }
            let audit = Audit::open(Side::Hub, &config.audit)
                .context("opening the audit sink")?
                .with_format(config.audit_format)
                .with_backlog(config.audit_backlog);
            if let Err(e) =
                ewii::enforce::heap::tune_for_bulk(&audit, ewii::enforce::heap::ProgramPages::Keep)
            {
                say(&format!(
                    "ewii-hub: freed heap will not be returned after load: {e}"
                ));
            }
            // A socket per requester and per Client: the usual soft limit of 1,024 is far too
            // low for a Hub.
            match ewii::enforce::privileges::raise_open_files(1 << 20) {
                Ok(n) if n < 16_384 => say(&format!(
                    "ewii-hub: open files limited to {n}: raise the hard limit (LimitNOFILE, ulimit -Hn) for many Clients and requesters"
                )),
                Ok(_) => {}
                Err(e) => say(&format!("ewii-hub: cannot raise the open-files limit: {e}")),
            }
            // The Hub's own work — admitting new connections, the store watcher, webhooks,
            // metrics — runs on this thread; the Clients' connections, their service listeners'
            // accepts and their queries on `threads` shards.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(async {
                // Watched before the Hub starts: a stop while it starts, or right after it says
                // it listens, is an orderly one.
                let stop = ewii::signal::terminate();
                tokio::pin!(stop);
                // Set at a stop during the start: a wait for the trust lock (held by an
                // `ewii-hub ca …` command, maybe paused) gives up.
                let giving_up = Arc::new(AtomicBool::new(false));
                let bind = Hub::bind_unless(config, audit.clone(), giving_up.clone());
                tokio::pin!(bind);
                let (bound, stopped) = tokio::select! {
                    bound = &mut bind => (bound, false),
                    () = &mut stop => {
                        giving_up.store(true, Ordering::Relaxed);
                        (bind.await, true)
                    }
                };
                let hub = match bound {
                    Err(HubError::Stopped) => {
                        say("ewii-hub: stopped before it listened");
                        audit.flush_async().await;
                        return anyhow::Ok(());
                    }
                    bound => bound?,
                };
                say(&format!("ewii-hub: listening on udp {}", hub.local_addr()));
                if let Some(addr) = hub.metrics_addr() {
                    say(&format!("ewii-hub: metrics on http://{addr}/metrics"));
                }
                if stopped {
                    // The start had got past its waits: stop in order at once.
                    hub.run(std::future::ready(())).await?;
                } else {
                    hub.run(stop).await?;
                }
                audit.flush_async().await;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
