//! Process logging on stderr, filtered by `EWII_LOG` (audit records go elsewhere: stdout or a
//! file, see [`crate::audit`]): human-readable lines (`--log-format text`, the default) or one
//! JSON object per line (`--log-format json`) for a log collector. What the binaries tell the
//! operator (the effective allow-list, the layers, errors) goes through [`say`] and [`fail`],
//! so a JSON log holds nothing but JSON.

use std::sync::OnceLock;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields.message`).
    Json,
}

/// The `--log-format` option both binaries take (or `EWII_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LogArgs {
    /// How log lines on stderr are written.
    #[arg(
        long,
        global = true,
        env = "EWII_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the stderr subscriber; `default` applies when `EWII_LOG` is unset.
pub fn init(default: &str, format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_env("EWII_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        // Colour codes only on a terminal: a log file or a container log collector gets plain
        // text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// A line for the operator on stderr: as it is in text mode, an `info` event in JSON mode.
pub fn say(line: &str) {
    if json() {
        tracing::info!(target: "ewii", "{line}");
    } else {
        eprintln!("{line}");
    }
}

/// An error for the operator on stderr: as it is in text mode, an `error` event in JSON mode.
pub fn fail(line: &str) {
    if json() {
        tracing::error!(target: "ewii", "{line}");
    } else {
        eprintln!("{line}");
    }
}
