use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The tern site daemon: keeps a site's pools and images and serves them
/// over an authenticated TLS API. On first start it initialises the site
/// (site id, TLS certificate, client.admin) and writes a client config so
/// `tern --cluster NAME` can reach it.
#[derive(Parser)]
#[command(name = "ternd", version)]
struct Args {
    /// The site's data directory (created on first start).
    #[arg(long, env = "TERN_DATA")]
    data: PathBuf,
    /// Cluster name: names the client config `<conf-dir>/<cluster>.conf`.
    #[arg(long, default_value = tern_client::config::DEFAULT_CLUSTER)]
    cluster: String,
    /// Site name recorded at initialisation (default: the cluster name).
    #[arg(long)]
    site_name: Option<String>,
    /// API listen address; port 0 picks a free port (see <data>/ternd.addr).
    #[arg(long, default_value = "127.0.0.1:6789")]
    listen: SocketAddr,
    /// Where to write the client config and admin keyring
    /// (default: $TERN_CONF_DIR, else ~/.config/tern).
    #[arg(long)]
    conf_dir: Option<PathBuf>,
    /// Serve plaintext (loopback addresses only; for throwaway labs).
    #[arg(long)]
    insecure: bool,
    /// NBD listen address, or "off". On a non-loopback address clients must
    /// use TLS (STARTTLS with the site certificate).
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// Prometheus metrics (/metrics) and the status page (/) listen
    /// address, or "off".
    #[arg(long, default_value = "127.0.0.1:9284")]
    http_listen: String,
    /// Serve metrics and the status page on a non-loopback address (they
    /// are read-only and unauthenticated).
    #[arg(long)]
    http_allow_remote: bool,
    /// API connections open at once; more are closed on accept.
    #[arg(long, default_value_t = ternd::Options::API_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Metrics/status page connections open at once.
    #[arg(long, default_value_t = ternd::Options::HTTP_MAX_CONNECTIONS)]
    http_max_connections: usize,
    /// NBD connections open at once.
    #[arg(long, default_value_t = tern_nbd::DEFAULT_MAX_CONNECTIONS)]
    nbd_max_connections: usize,
    /// Seconds a new API or HTTP connection has to finish its TLS
    /// handshake (or send its first byte).
    #[arg(long, default_value_t = ternd::Options::HANDSHAKE_TIMEOUT_SECS)]
    handshake_timeout: u64,
    /// Seconds an API or HTTP connection may sit with no request in
    /// progress before it is closed.
    #[arg(long, default_value_t = ternd::Options::IDLE_TIMEOUT_SECS)]
    idle_timeout: u64,
    /// NBD read/write payload bytes in flight across all connections
    /// (e.g. 512M; plain numbers are MiB; at least 32M).
    #[arg(long, default_value = "512M")]
    nbd_memory_budget: String,
    /// Data read for API read streams (exports, syncs, diffs, journal
    /// reads) and not yet taken by clients, all streams together (at
    /// least 32M).
    #[arg(long, default_value = "256M")]
    api_memory_budget: String,
    /// Seconds an NBD client or an API read stream's client may take no
    /// data before its connection is closed.
    #[arg(long, default_value_t = ternd::Options::STALL_TIMEOUT_SECS)]
    stall_timeout: u64,
}

/// Threads of the one pool all store and file-system work runs on
/// ([`ternd::work::blocking`]). Each call holds one for a single store
/// operation, so this bounds the I/O ternd has in flight at once (beyond
/// it, calls queue); journaled images' own sync and apply threads are
/// outside it.
const BLOCKING_THREADS: usize = 64;

fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Buffers of 1 MiB and more (chunks of exports, syncs, NBD payloads) are
/// mapped and unmapped on their own. glibc's default raises the threshold
/// after the first such buffer is freed, and later ones then stay resident
/// in the worker threads' arenas once freed: ternd's memory would follow
/// the peak of every thread, not the budgets it keeps (measured: 24 stalled
/// export streams under a 64 MiB budget held 142 MiB, 96 MiB with this).
fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before the runtime
    // starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tern_daemon::log::init();
    raise_fd_limit();
    fixed_mmap_threshold();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("ternd")
        .build()
        .expect("tokio runtime");
    let http_listen = match args.http_listen.as_str() {
        "off" | "none" => None,
        a => match a.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                eprintln!("ternd: --http-listen '{a}' is not an address (use HOST:PORT or off)");
                return std::process::ExitCode::from(22);
            }
        },
    };
    let mut budgets = [0usize; 2];
    for (i, (flag, v, why)) in [
        (
            "--nbd-memory-budget",
            &args.nbd_memory_budget,
            "one maximal NBD request",
        ),
        (
            "--api-memory-budget",
            &args.api_memory_budget,
            "two streams' chunks",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        budgets[i] = match tern_types::size::parse_size(v) {
            Ok(n) if n >= 32 << 20 => n as usize,
            Ok(_) => {
                eprintln!("ternd: {flag} must be at least 32M ({why})");
                return std::process::ExitCode::from(22);
            }
            Err(e) => {
                eprintln!("ternd: {flag}: {e}");
                return std::process::ExitCode::from(22);
            }
        };
    }
    let [nbd_memory_budget, api_memory_budget] = budgets;
    for (flag, v) in [
        ("--max-connections", args.max_connections as u64),
        ("--http-max-connections", args.http_max_connections as u64),
        ("--nbd-max-connections", args.nbd_max_connections as u64),
        ("--handshake-timeout", args.handshake_timeout),
        ("--idle-timeout", args.idle_timeout),
        ("--stall-timeout", args.stall_timeout),
    ] {
        if v == 0 {
            eprintln!("ternd: {flag} must be at least 1");
            return std::process::ExitCode::from(22);
        }
    }
    let secs = std::time::Duration::from_secs;
    let opts = ternd::Options {
        api_limits: ternd::listen::Limits {
            max_connections: args.max_connections,
            handshake_timeout: secs(args.handshake_timeout),
            idle_timeout: secs(args.idle_timeout),
        },
        http_limits: ternd::listen::Limits {
            max_connections: args.http_max_connections,
            handshake_timeout: secs(args.handshake_timeout),
            idle_timeout: secs(args.idle_timeout),
        },
        nbd_max_connections: args.nbd_max_connections,
        nbd_memory_budget,
        api_memory_budget,
        stall_timeout: secs(args.stall_timeout),
        http_listen,
        http_allow_remote: args.http_allow_remote,
        data: args.data,
        cluster: args.cluster,
        site_name: args.site_name,
        listen: args.listen,
        conf_dir: args.conf_dir.unwrap_or_else(tern_client::config::conf_dir),
        insecure: args.insecure,
        nbd_listen: match args.nbd_listen.as_str() {
            "off" | "none" => None,
            a => match a.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    eprintln!("ternd: --nbd-listen '{a}' is not an address (use HOST:PORT or off)");
                    return std::process::ExitCode::from(22);
                }
            },
        },
    };
    match rt.block_on(ternd::run(opts)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ternd: {e}");
            std::process::ExitCode::from(e.kind.exit_code() as u8)
        }
    }
}
