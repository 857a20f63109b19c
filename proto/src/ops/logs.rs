//! The log flags every daemon shares (`--log-json`, `--log-level`) and the subscriber they set
//! up: text or JSON lines on stderr, levels per module as tracing `EnvFilter` directives.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Log flags, flattened into each daemon's command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log lines as JSON objects (one per line: timestamp, level, target, fields) instead of
    /// text, for a log collector.
    #[arg(long, env = "SCM_LOG_JSON", global = true)]
    pub log_json: bool,

    /// Log levels: tracing EnvFilter directives, a default level then per-module overrides,
    /// e.g. `info,scm_proxy::proxy::splice=debug` or `warn,scm_security::api=info`. Without
    /// it RUST_LOG is read, else `info`. A directive that does not parse is refused at start.
    #[arg(long, env = "SCM_LOG", global = true, value_parser = parse_directives, value_name = "DIRECTIVES")]
    pub log_level: Option<String>,
}

/// Checks that `s` parses as EnvFilter directives (a clap value parser).
pub fn parse_directives(s: &str) -> Result<String, String> {
    EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_string())
        .map_err(|e| {
            format!(
                "{s:?} is not a list of log directives ({e}); write LEVEL or \
                 LEVEL,module::path=LEVEL,... with LEVEL one of error, warn, info, debug, trace"
            )
        })
}

impl LogArgs {
    /// The filter these flags select: `--log-level`, else RUST_LOG, else `info`.
    pub fn filter(&self) -> Result<EnvFilter, String> {
        match &self.log_level {
            Some(d) => EnvFilter::builder().parse(d).map_err(|e| e.to_string()),
            None => match std::env::var("RUST_LOG") {
                Ok(d) if !d.is_empty() => EnvFilter::builder()
                    .parse(&d)
                    .map_err(|e| format!("RUST_LOG={d:?}: {e}")),
                _ => Ok(EnvFilter::new("info")),
            },
        }
    }

    /// Installs the global subscriber: stderr, text (colours on a terminal) or JSON lines.
    pub fn init(&self) -> Result<(), String> {
        let filter = self.filter()?;
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let r = if self.log_json {
            b.json().try_init()
        } else {
            b.with_ansi(std::io::stderr().is_terminal()).try_init()
        };
        r.map_err(|e| format!("installing the log subscriber: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_directives_parse_and_nonsense_is_refused() {
        assert!(parse_directives("info,scm_proxy::proxy::splice=debug").is_ok());
        assert!(parse_directives("warn").is_ok());
        let e = parse_directives("info,scm_proxy=loud").unwrap_err();
        assert!(e.contains("not a list of log directives"), "{e}");
    }
}
