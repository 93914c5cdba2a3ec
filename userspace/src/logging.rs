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

/// Installs the stderr subscriber; `default` applies when `EWII_LOG` is unset or empty. A
/// filter that does not parse is reported on stderr, and the default applies.
pub fn init(default: &str, format: LogFormat) {
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = FORMAT.set(format);
    let (filter, refused) = log_filter(std::env::var("EWII_LOG").ok().as_deref(), default);
    // Colour codes only on a terminal: a log file or a container log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    subscriber(filter, format, std::io::stderr, ansi).init();
    if let Some(reason) = refused {
        fail(&format!(
            "EWII_LOG is not a log filter ({reason}): logging with `{default}`; write a level \
             (`debug`) or `target=level` pairs separated by commas (`info,ewii=debug`)"
        ));
    }
}

/// Log lines in `format` to `writer`, for what `filter` enables: the filter is the only one
/// (the `fmt` builder's own default level would cap `EWII_LOG=debug` at `info`).
fn subscriber<W>(
    filter: tracing_subscriber::filter::Targets,
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    let lines = tracing_subscriber::fmt::layer().with_writer(writer);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => Box::new(registry.with(lines.json())),
        LogFormat::Text => Box::new(registry.with(lines.with_ansi(ansi))),
    }
}

/// The log filter `spec` (`EWII_LOG`) describes: comma-separated directives, each a level
/// (`off`, `error`, `warn`, `info`, `debug`, `trace`) for every target or `target=level`, where a
/// target is a module path prefix (`ewii::hub`). No spec gives `default`; one that does not
/// parse gives `default` too, with why in the second place.
///
/// A [`Targets`] filter, not the `EnvFilter`: the latter's span and field directives bring a
/// regex engine (~0.24 MB of the binary, resident in every Client) that nothing here needs.
/// Parsed here rather than by `Targets`' own parser, which takes a typo (`verbose`) for a
/// target and `ewii[span]=debug` for a target name.
///
/// [`Targets`]: tracing_subscriber::filter::Targets
pub fn log_filter(
    spec: Option<&str>,
    default: &str,
) -> (tracing_subscriber::filter::Targets, Option<String>) {
    let fallback = || parse_filter(default).unwrap_or_default();
    match spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_filter)
    {
        None => (fallback(), None),
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (fallback(), Some(e)),
    }
}

fn parse_filter(spec: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let mut filter = Targets::new();
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        // (`LevelFilter` takes an empty string for `error`.)
        let level: LevelFilter = Some(level)
            .filter(|l| !l.is_empty())
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| {
                format!("`{level}` in `{directive}` is not a level: off, error, warn, info, debug or trace")
            })?;
        filter = match target {
            None => filter.with_default(level),
            Some(target) if is_module_path(target) => filter.with_target(target, level),
            Some(target) => {
                return Err(format!(
                    "`{target}` in `{directive}` is not a module path such as `ewii::hub`"
                ))
            }
        };
    }
    Ok(filter)
}

fn is_module_path(target: &str) -> bool {
    target
        .split("::")
        .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
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

/// A command's answer on stdout (`status`, `clients`, a report), written whole. A reader that
/// closed the pipe before the end (`… | head`) ends the command quietly with status 141, as
/// SIGPIPE ends other tools (Rust ignores the signal, and `println!` would panic instead);
/// another write error is said on stderr, status 1.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            fail(&format!("cannot write the answer to stdout: {e}"));
            std::process::exit(1);
        }
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

/// An error and its causes, `outer: inner: …`, each said once: most of this crate's errors
/// already end with their cause's words, which a plain walk of the chain would repeat
/// (`cannot listen on …: Address already in use: Address already in use`).
pub fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let words = e.to_string();
        if !said.ends_with(&words) {
            if !said.is_empty() {
                said.push_str(": ");
            }
            said.push_str(&words);
        }
        next = e.source();
    }
    said
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::{causes, log_filter, subscriber, LogFormat};

    /// A cause that the message already says is not said again; one it does not is added.
    #[test]
    fn an_errors_causes_are_said_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let bind = crate::hub::HubError::Bind {
            addr: ([127, 0, 0, 1], 443).into(),
            source: io(),
        };
        assert_eq!(
            causes(&bind),
            format!("cannot listen on 127.0.0.1:443: {}", io())
        );
        #[derive(Debug, thiserror::Error)]
        #[error("starting the runtime")]
        struct Context(#[source] std::io::Error);
        assert_eq!(
            causes(&Context(io())),
            format!("starting the runtime: {}", io())
        );
    }
    use tracing::Level;
    use tracing_subscriber::filter::LevelFilter;

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `spec` lets through of one event per level, in `format`.
    fn logged(spec: &str, format: LogFormat) -> String {
        let (filter, refused) = log_filter(Some(spec), "info");
        assert_eq!(refused, None);
        let lines = Lines::default();
        let sink = lines.clone();
        let sub = subscriber(filter, format, move || sink.clone(), false);
        tracing::subscriber::with_default(sub, || {
            tracing::trace!("at-trace");
            tracing::debug!("at-debug");
            tracing::info!("at-info");
        });
        let out = lines.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_filter_alone_decides_what_is_written_in_both_formats() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let debug = logged("debug", format);
            assert!(debug.contains("at-debug"), "{format:?}: {debug}");
            assert!(debug.contains("at-info"), "{format:?}: {debug}");
            assert!(!debug.contains("at-trace"), "{format:?}: {debug}");
            let trace = logged("trace", format);
            assert!(trace.contains("at-trace"), "{format:?}: {trace}");
            let warn = logged("warn", format);
            assert!(warn.is_empty(), "{format:?}: {warn}");
        }
    }

    #[test]
    fn a_bare_level_applies_to_every_target() {
        let (filter, refused) = log_filter(Some("debug"), "info");
        assert_eq!(refused, None);
        assert!(filter.would_enable("quinn_proto::connection", &Level::DEBUG));
        assert!(!filter.would_enable("quinn_proto::connection", &Level::TRACE));
    }

    #[test]
    fn target_pairs_filter_by_module_prefix() {
        let (filter, refused) = log_filter(Some("warn, ewii::hub=trace ,"), "info");
        assert_eq!(refused, None);
        assert!(filter.would_enable("ewii::hub::session", &Level::TRACE));
        assert!(!filter.would_enable("ewii::client", &Level::INFO));
        assert!(filter.would_enable("ewii::client", &Level::WARN));
    }

    #[test]
    fn no_or_an_empty_spec_gives_the_default() {
        for spec in [None, Some(""), Some("  ")] {
            let (filter, refused) = log_filter(spec, "info");
            assert_eq!(refused, None, "{spec:?}");
            assert!(filter.would_enable("ewii", &Level::INFO), "{spec:?}");
            assert!(!filter.would_enable("ewii", &Level::DEBUG), "{spec:?}");
        }
    }

    #[test]
    fn a_spec_that_does_not_parse_is_reported_and_the_default_applies() {
        for spec in [
            "verbose",
            "ewii=loud",
            "ewii[span]=debug",
            "=debug",
            "ewii=",
            "a b=info",
            "ewii:hub=debug",
            "info,ewii::=debug",
        ] {
            let (filter, refused) = log_filter(Some(spec), "warn");
            assert!(refused.is_some(), "{spec} was taken as a filter");
            assert_eq!(
                filter.default_level(),
                Some(LevelFilter::WARN),
                "{spec}: not the default filter"
            );
        }
    }
}
