//! The daemons' log: one line per event on stderr, filtered by `TERN_LOG`
//! (default `info`).

/// Installs the process's log subscriber. Colour codes are written only to
/// a terminal: stderr is usually a log file or the journal, where they
/// would be noise.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
