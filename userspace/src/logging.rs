//! Process logging: human-readable lines on stderr, filtered by `EWII_LOG` (audit records go
//! elsewhere: stdout or a file, see [`crate::audit`]).

/// Installs the stderr subscriber; `default` applies when `EWII_LOG` is unset.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EWII_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only on a terminal: a log file or a container log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}
