use clap::Parser;

/// The tern mirror daemon (like rbd-mirror): runs at one site with the
/// `client.rbd-mirror` key, finds every mirrored pool and its peers, and
/// copies images whose primary is at a peer into local non-primary copies,
/// reporting status to both sites.
#[derive(Parser)]
#[command(name = "tern-mirror", version)]
struct Args {
    /// Cluster name of the local site (reads <conf dir>/<NAME>.conf).
    #[arg(long)]
    cluster: Option<String>,
    /// Local cluster config file.
    #[arg(short = 'c', long)]
    conf: Option<std::path::PathBuf>,
    /// Client id (default rbd-mirror).
    #[arg(long, default_value = "rbd-mirror")]
    id: String,
    /// Keyring for client.ID.
    #[arg(short = 'k', long)]
    keyring: Option<std::path::PathBuf>,
    /// Prometheus metrics listen address (/metrics), or "off".
    #[arg(long, default_value = "127.0.0.1:9283")]
    metrics_listen: String,
    /// Serve metrics on a non-loopback address (unauthenticated).
    #[arg(long)]
    metrics_allow_remote: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tern_daemon::log::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let metrics_listen = match args.metrics_listen.as_str() {
        "off" | "none" => None,
        a => match a.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                eprintln!(
                    "tern-mirror: --metrics-listen '{a}' is not an address (use HOST:PORT or off)"
                );
                return std::process::ExitCode::from(22);
            }
        },
    };
    let opts = tern_mirror::Options {
        metrics_listen,
        metrics_allow_remote: args.metrics_allow_remote,
        cluster: args.cluster,
        conf: args.conf,
        id: args.id,
        keyring: args.keyring,
    };
    match rt.block_on(tern_mirror::run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-mirror: {}", e.message);
            std::process::ExitCode::from(e.kind.exit_code() as u8)
        }
    }
}
