//! Spawns real tern processes for tests: each [`Site`] is a `ternd` on a
//! loopback port with its own data and config directories under a temp dir,
//! in its own process group, killed when the test ends (also on panic).

pub mod nbd;
pub mod powerfs;
pub mod slots;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tern_client::{ClusterConfig, SiteClient};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/test-xxxx → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` (nextest builds it)",
        p.display()
    );
    p
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Site {
    pub name: String,
    pub root: tempfile::TempDir,
    pub data: PathBuf,
    pub conf_dir: PathBuf,
    pub addr: String,
    /// The NBD listener (host:port).
    pub nbd_addr: String,
    /// Metrics and status page (http://ADDR/metrics, http://ADDR/).
    pub http_addr: String,
    listen: String,
    nbd_listen: String,
    http_listen: String,
    child: Option<Child>,
    extra: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) for ternd, kept across restarts.
    nofile: Option<u64>,
    /// The power-loss filesystem `data` is mounted from, if any.
    power: Option<powerfs::PowerFs>,
}

impl Site {
    /// [`Self::start_with`] with ternd limited to `nofile` descriptors
    /// (soft and hard, so ternd cannot raise it), as under `ulimit -n`.
    pub fn start_with_nofile(name: &str, extra: &[&str], nofile: u64) -> Site {
        Self::start_inner(&std::env::temp_dir(), name, extra, Some(nofile))
    }

    /// Starts a new site named `name` on a free loopback port.
    pub fn start(name: &str) -> Site {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Site {
        Self::start_under(&std::env::temp_dir(), name, extra)
    }

    /// [`Self::start_with`], keeping the site's files (data, config, log)
    /// in a new directory under `parent` (a small filesystem, say).
    pub fn start_under(parent: &Path, name: &str, extra: &[&str]) -> Site {
        Self::start_inner(parent, name, extra, None)
    }

    /// [`Self::start_with`] with the data directory on a power-loss
    /// filesystem ([`powerfs`]): what ternd never synced is lost at
    /// [`Self::power_cut`].
    pub fn start_power_cut(name: &str, extra: &[&str]) -> Site {
        Self::start_inner_full(&std::env::temp_dir(), name, extra, None, true)
    }

    fn start_inner(parent: &Path, name: &str, extra: &[&str], nofile: Option<u64>) -> Site {
        Self::start_inner_full(parent, name, extra, nofile, false)
    }

    fn start_inner_full(
        parent: &Path,
        name: &str,
        extra: &[&str],
        nofile: Option<u64>,
        power: bool,
    ) -> Site {
        let root = tempfile::Builder::new()
            .prefix(&format!("tern-{name}-"))
            .tempdir_in(parent)
            .expect("tempdir");
        let data = root.path().join("data");
        let conf_dir = root.path().join("conf");
        let mut s = Site {
            name: name.to_string(),
            data,
            conf_dir,
            root,
            addr: String::new(),
            nbd_addr: String::new(),
            http_addr: String::new(),
            http_listen: "127.0.0.1:0".into(),
            listen: "127.0.0.1:0".into(),
            nbd_listen: "127.0.0.1:0".into(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            nofile,
            power: None,
        };
        if power {
            // The data directory is a power-loss filesystem over `durable`.
            let durable = s.root.path().join("durable");
            std::fs::create_dir_all(&durable).expect("durable dir");
            std::fs::create_dir_all(&s.data).expect("data dir");
            if let Err(e) = powerfs::fuse_available() {
                panic!("power-loss mode needs FUSE: {e}");
            }
            s.power = Some(powerfs::PowerFs::mount(&durable, &s.data).expect("mount powerfs"));
        }
        s.spawn();
        // Restarts reuse the ports so configs, tokens and NBD URIs stay valid.
        s.listen = s.addr.clone();
        s.nbd_listen = s.nbd_addr.clone();
        s.http_listen = s.http_addr.clone();
        s
    }

    fn spawn(&mut self) {
        let addr_file = self.data.join("ternd.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("ternd.log"))
            .expect("log file");
        let mut cmd = Command::new(bin("ternd"));
        let _ = std::fs::create_dir_all(self.hold_dir());
        cmd.env("TERN_TEST_HOLD_DIR", self.hold_dir());
        cmd.args(["--data"])
            .arg(&self.data)
            .args([
                "--cluster",
                &self.name,
                "--listen",
                &self.listen,
                "--nbd-listen",
                &self.nbd_listen,
                "--http-listen",
                &self.http_listen,
                "--conf-dir",
            ])
            .arg(&self.conf_dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let Some(n) = self.nofile {
            let rl = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the
            // child between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn ternd");
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(20), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("ternd exited early ({st}):\n{}", self.log());
            }
            std::fs::read_to_string(&addr_file)
                .map(|s| s.ends_with('\n'))
                .unwrap_or(false)
        });
        assert!(ok, "ternd did not start within 20 s:\n{}", self.log());
        self.addr = std::fs::read_to_string(&addr_file)
            .expect("addr")
            .trim()
            .to_string();
        self.nbd_addr = std::fs::read_to_string(self.data.join("nbd.addr"))
            .expect("nbd addr")
            .trim()
            .to_string();
        self.http_addr = std::fs::read_to_string(self.data.join("http.addr"))
            .expect("http addr")
            .trim()
            .to_string();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("ternd.log")).unwrap_or_default()
    }

    /// Where this site's daemons (ternd and tern-mirror) look for armed
    /// test fault points.
    pub fn hold_dir(&self) -> PathBuf {
        self.root.path().join("holds")
    }

    /// Arms a fault point: the next daemon of this site to reach it waits
    /// there until [`Self::release`].
    pub fn arm(&self, point: &str) {
        let _ = std::fs::remove_file(self.hold_dir().join(format!("{point}.held")));
        std::fs::write(self.hold_dir().join(point), b"").expect("arm");
    }

    /// Arms `point` to abort ternd when it gets there (one-shot).
    pub fn arm_abort(&self, point: &str) {
        std::fs::write(self.hold_dir().join(format!("{point}.abort")), b"").expect("arm");
    }

    /// Arms `point` to abort ternd the `nth` time it gets there.
    pub fn arm_abort_at(&self, point: &str, nth: u64) {
        std::fs::write(
            self.hold_dir().join(format!("{point}.abort")),
            nth.to_string(),
        )
        .expect("arm");
    }

    /// Whether ternd has exited (within `timeout`), as after an armed abort.
    pub fn wait_exited(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        wait_until(timeout, || matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Whether a daemon is waiting at `point` (within `timeout`).
    pub fn wait_held(&self, point: &str, timeout: Duration) -> bool {
        let f = self.hold_dir().join(format!("{point}.held"));
        wait_until(timeout, || f.exists())
    }

    /// Lets the daemon waiting at `point` go on.
    pub fn release(&self, point: &str) {
        let _ = std::fs::remove_file(self.hold_dir().join(format!("{point}.held")));
        std::fs::write(self.hold_dir().join(format!("{point}.go")), b"").expect("release");
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9` of ternd.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns its exit status success.
    pub fn stop(&mut self) -> bool {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    return st.success();
                }
                if Instant::now() > end {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        true
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A power cut: `kill -9` of ternd (and anything in its process
    /// group), every change it had not synced dropped, then ternd started
    /// again on what is left. Only for sites from [`Self::start_power_cut`].
    pub fn power_cut(&mut self) -> powerfs::CutReport {
        self.power_cut_with(None)
    }

    /// [`Self::power_cut`]; with `Some(seed)` a random part of what was
    /// unsynced survives ([`powerfs::PowerFs::cut_keeping_some`]).
    pub fn power_cut_with(&mut self, keep_seed: Option<u64>) -> powerfs::CutReport {
        self.kill_group();
        let fs = self
            .power
            .as_mut()
            .expect("site not started with start_power_cut");
        let r = match keep_seed {
            None => fs.cut(),
            Some(seed) => fs.cut_keeping_some(seed),
        }
        .expect("power cut");
        self.spawn();
        r
    }

    /// The power-loss filesystem under `data`, if the site has one.
    pub fn powerfs(&self) -> Option<&powerfs::PowerFs> {
        self.power.as_ref()
    }

    fn kill_group(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: the child leads its own process group.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        }
        self.kill9();
    }

    /// `nbd://host:port/EXPORT`
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd_addr)
    }

    pub fn conf_path(&self) -> PathBuf {
        self.conf_dir.join(format!("{}.conf", self.name))
    }

    /// A `tern` command aimed at this site.
    pub fn tern_cmd(&self) -> Command {
        let mut c = Command::new(bin("tern"));
        c.env("TERN_CONF_DIR", &self.conf_dir)
            .env_remove("TERN_CLUSTER")
            .arg("--cluster")
            .arg(&self.name);
        c.stdin(Stdio::null());
        c
    }

    /// Imports a bootstrap token into pool `rbd` here, rx-tx, naming this
    /// site `site_name` (seed step 2).
    pub fn import_token(&self, token: &str, site_name: &str) {
        let o = self.try_import_token(token, site_name);
        assert!(
            o.status.success(),
            "token import failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// [`Self::import_token`] that may fail: the command's output.
    pub fn try_import_token(&self, token: &str, site_name: &str) -> Output {
        let f = self
            .root
            .path()
            .join(format!("token-{}", rand::random::<u32>()));
        std::fs::write(&f, token).expect("token file");
        self.tern(&[
            "mirror",
            "pool",
            "peer",
            "bootstrap",
            "import",
            "--site-name",
            site_name,
            "--direction",
            "rx-tx",
            "rbd",
            f.to_str().expect("utf8"),
        ])
    }

    /// SHA-256 of `tern export SPEC` (an image or image@snap), byte for byte.
    pub fn export_sha256(&self, spec: &str) -> String {
        let out = self
            .root
            .path()
            .join(format!("x-{}.raw", rand::random::<u64>()));
        self.tern_ok(&["export", spec, out.to_str().expect("utf8")]);
        let h = sha256_file(&out);
        std::fs::remove_file(out).expect("remove export");
        h
    }

    pub fn tern(&self, args: &[&str]) -> Output {
        self.tern_cmd().args(args).output().expect("run tern")
    }

    /// Runs `tern ARGS`, panics unless it succeeds; returns stdout.
    pub fn tern_ok(&self, args: &[&str]) -> String {
        let o = self.tern(args);
        assert!(
            o.status.success(),
            "tern {args:?} failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("utf8")
    }

    /// Runs `tern ARGS`, panics if it succeeds; returns (exit code, stderr).
    pub fn tern_err(&self, args: &[&str]) -> (i32, String) {
        let o = self.tern(args);
        assert!(
            !o.status.success(),
            "tern {args:?} unexpectedly succeeded:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    }

    pub fn tern_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let out = self.tern_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tern {args:?}: bad json ({e}): {out}"))
    }

    pub fn config(&self) -> ClusterConfig {
        ClusterConfig::load(Some(&self.name), Some(&self.conf_path())).expect("cluster config")
    }

    /// An API client acting as client.admin, bound to `rt`.
    pub fn client(&self, rt: &tokio::runtime::Runtime) -> SiteClient {
        let _guard = rt.enter();
        let conf = self.config();
        let ring = self
            .conf_dir
            .join(format!("{}.client.admin.keyring", self.name));
        SiteClient::connect(&conf, "client.admin", Some(&ring)).expect("client")
    }

    /// Bytes allocated on disk under the site's object directory.
    pub fn object_bytes(&self) -> u64 {
        du(&self.data.join("objects"))
    }
}

/// A running `tern-mirror` for a site.
pub struct MirrorDaemon {
    child: Option<Child>,
    log: PathBuf,
    site_name: String,
    conf_dir: PathBuf,
    /// "metrics serving" lines in the log before the current run started.
    spawns: usize,
}

impl Site {
    /// Creates `client.rbd-mirror` (profile rbd-mirror) if needed and starts a mirror daemon.
    pub fn start_mirror(&self) -> MirrorDaemon {
        let ring = self
            .conf_dir
            .join(format!("{}.client.rbd-mirror.keyring", self.name));
        if !ring.exists() {
            self.tern_ok(&[
                "auth",
                "get-or-create",
                "client.rbd-mirror",
                "mon",
                "profile rbd-mirror",
                "osd",
                "profile rbd",
                "-o",
                ring.to_str().expect("utf8"),
            ]);
        }
        let mut d = MirrorDaemon {
            child: None,
            log: self.root.path().join("tern-mirror.log"),
            site_name: self.name.clone(),
            conf_dir: self.conf_dir.clone(),
            spawns: 0,
        };
        d.spawn();
        d
    }
}

impl MirrorDaemon {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = Command::new(bin("tern-mirror"));
        cmd.env("TERN_CONF_DIR", &self.conf_dir)
            .env("TERN_LOG", "info,tern_mirror=debug")
            .env("TERN_TEST_HOLD_DIR", self.conf_dir.with_file_name("holds"))
            .args(["--cluster", &self.site_name, "--id", "rbd-mirror"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.spawns = self.log().matches("metrics serving").count();
        self.child = Some(cmd.spawn().expect("spawn tern-mirror"));
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the running daemon serves /metrics (from its log; waits up to 10 s).
    pub fn metrics_addr(&self) -> Option<String> {
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            let log = self.log();
            let before = self.spawns;
            let addrs: Vec<String> = log
                .lines()
                .filter(|l| l.contains("metrics serving"))
                .map(strip_ansi)
                .filter_map(|l| {
                    l.split("addr=")
                        .nth(1)
                        .and_then(|a| a.split_whitespace().next())
                        .map(String::from)
                })
                .collect();
            // The current run's: the first line after those of earlier runs.
            if addrs.len() > before {
                found = addrs.get(before).cloned();
                true
            } else {
                false
            }
        });
        found
    }

    /// SIGTERM and wait; true if it exited cleanly.
    pub fn stop(&mut self) -> bool {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(st)) = c.try_wait() {
                    return st.success();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            return false;
        }
        true
    }
}

impl Drop for MirrorDaemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- tern-mirror log of site {} ----\n{}",
                self.site_name,
                self.log()
            );
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill_group();
        // Unmounted before `root` is removed, which would otherwise reach
        // through the mount.
        self.power.take();
        if std::thread::panicking() {
            eprintln!("---- ternd log of site {} ----\n{}", self.name, self.log());
        }
    }
}

/// Allocated bytes (st_blocks) of every file below `dir`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// A plain HTTP GET on loopback: (status code, body); None if nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Some((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = b.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the first sample of `name` whose labels contain every
/// `k="v"` in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Creates `n` mirrored 4 MiB images `rbd/img000`… on `site` (the pool
/// in `pool` mirroring mode), each with 64 KiB of its own data and a
/// mirror snapshot: the scale tests' fleet.
pub fn mirrored_fleet(site: &Site, n: u64) {
    use tern_types::ImageSpec;
    use tern_types::api::ImageCreate;
    let rt = rt();
    let c = site.client(&rt);
    rt.block_on(async {
        for i in 0..n {
            let name = format!("img{i:03}");
            c.image()
                .create(ImageCreate {
                    pool: "rbd".into(),
                    image: name.clone(),
                    size: 4 << 20,
                    ..Default::default()
                })
                .await
                .unwrap();
            c.io()
                .write(
                    &ImageSpec::new("rbd", &name),
                    i * 4096,
                    random_bytes(i, 64 * 1024),
                    false,
                    "",
                )
                .await
                .unwrap();
            c.mirror()
                .image_snapshot(&ImageSpec::new("rbd", &name))
                .await
                .unwrap();
        }
    });
}

pub fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            total += du(&e.path());
        } else {
            total += m.blocks() * 512;
        }
    }
    total
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// A tokio runtime for tests that use the async client.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A TCP proxy on loopback that counts the bytes it carries: a link of the
/// test's making between a site and whoever talks to it.
pub struct Proxy {
    pub addr: String,
    /// Bytes from the target to the clients (what a mirror daemon downloads).
    pub down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub up: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, the link is down: connections are dropped and refused.
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// One-way delay in microseconds, added to every byte in each direction.
    delay_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr").to_string();
        let (down, up, stop, cut) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, u, st, target) = (down.clone(), up.clone(), stop.clone(), target.to_string());
        let cu = cut.clone();
        let delay_us = Arc::new(AtomicU64::new(0));
        let dl = delay_us.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((client, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if cu.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (mut from, to, count) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                        u.clone(),
                    ),
                    (server, client, d.clone()),
                ] {
                    let (st, cu, dl) = (st.clone(), cu.clone(), dl.clone());
                    // A delay line: the reader stamps each chunk with when it
                    // may leave, the writer holds it until then, so latency
                    // is added without capping throughput.
                    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
                    let mut to2 = to.try_clone().expect("clone");
                    std::thread::spawn(move || {
                        use std::io::Write;
                        for (at, b) in rx {
                            if let Some(d) = at.checked_duration_since(Instant::now()) {
                                std::thread::sleep(d);
                            }
                            if to2.write_all(&b).is_err() {
                                break;
                            }
                        }
                        let _ = to2.shutdown(std::net::Shutdown::Both);
                    });
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = vec![0u8; 64 << 10];
                        let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                        while !st.load(Ordering::Relaxed) && !cu.load(Ordering::Relaxed) {
                            match from.read(&mut buf) {
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) =>
                                {
                                    continue;
                                }
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    count.fetch_add(n as u64, Ordering::Relaxed);
                                    let at = Instant::now()
                                        + Duration::from_micros(dl.load(Ordering::Relaxed));
                                    if tx.send((at, buf[..n].to_vec())).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        drop(tx);
                        if cu.load(Ordering::Relaxed) || st.load(Ordering::Relaxed) {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            down,
            up,
            stop,
            cut,
            delay_us,
        }
    }

    /// Adds `one_way` of latency in each direction (a round trip gains
    /// twice that).
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us.store(
            one_way.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Takes the link down (every connection dropped, new ones refused) or
    /// brings it back.
    pub fn set_cut(&self, down: bool) {
        self.cut.store(down, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn down_bytes(&self) -> u64 {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes from the clients to the target.
    pub fn up_bytes(&self) -> u64 {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Both links between two sites: every cross-site connection (mirror
/// daemons, peer status queries, bootstrap) goes through one of these
/// counting proxies, so a test can measure all the traffic, cut it or slow
/// it.
pub struct Links {
    /// Site B (its daemon, its `ternd`) reaches A through this.
    pub to_a: Proxy,
    /// Site A reaches B through this.
    pub to_b: Proxy,
}

impl Links {
    /// Takes both links down, or brings them back.
    pub fn set_cut(&self, down: bool) {
        self.to_a.set_cut(down);
        self.to_b.set_cut(down);
    }

    /// Adds `one_way` of latency in each direction on both links.
    pub fn set_delay(&self, one_way: Duration) {
        self.to_a.set_delay(one_way);
        self.to_b.set_delay(one_way);
    }

    /// Bytes that went from A to B so far, over either link.
    pub fn a_to_b(&self) -> u64 {
        self.to_a.down_bytes() + self.to_b.up_bytes()
    }

    /// Bytes that went from B to A so far, over either link.
    pub fn b_to_a(&self) -> u64 {
        self.to_b.down_bytes() + self.to_a.up_bytes()
    }

    /// Every byte that crossed between the sites so far, both ways.
    pub fn bytes(&self) -> u64 {
        self.a_to_b() + self.b_to_a()
    }

    /// Counts from here on: `stop()` on the result gives what crossed since.
    pub fn meter(&self) -> Meter<'_> {
        Meter {
            links: self,
            a_to_b: self.a_to_b(),
            b_to_a: self.b_to_a(),
        }
    }
}

/// The traffic between two sites since a [`Links::meter`] call.
pub struct Meter<'a> {
    links: &'a Links,
    a_to_b: u64,
    b_to_a: u64,
}

/// What crossed between two sites in a measured stretch, by direction.
#[derive(Debug, Clone, Copy)]
pub struct Crossed {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

impl Crossed {
    pub fn total(&self) -> u64 {
        self.a_to_b + self.b_to_a
    }
}

impl std::fmt::Display for Crossed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes ({} A→B, {} B→A)",
            self.total(),
            self.a_to_b,
            self.b_to_a
        )
    }
}

impl Meter<'_> {
    pub fn stop(&self) -> Crossed {
        Crossed {
            a_to_b: self.links.a_to_b() - self.a_to_b,
            b_to_a: self.links.b_to_a() - self.b_to_a,
        }
    }
}

/// Sites A and B, pool `rbd` mirrored in image mode and peered rx-tx, each
/// reaching the other only through [`Links`] the caller can count, cut or
/// slow down.
pub fn linked_sites() -> (Site, Site, Links) {
    let a = Site::start("site-a");
    let b = Site::start("site-b");
    for (s, name) in [(&a, "site-a"), (&b, "site-b")] {
        s.tern_ok(&["pool", "create", "rbd"]);
        s.tern_ok(&[
            "mirror",
            "pool",
            "enable",
            "rbd",
            "image",
            "--site-name",
            name,
        ]);
    }
    let to_a = Proxy::start(&a.addr);
    let to_b = Proxy::start(&b.addr);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let token = a.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]);
    let mut j: serde_json::Value =
        serde_json::from_slice(&b64.decode(token.trim()).unwrap()).unwrap();
    j["mon_host"] = serde_json::json!(to_a.addr);
    b.import_token(&b64.encode(j.to_string()), "site-b");
    // The rx-tx import registered B on A under B's own address: A's side
    // would bypass the proxy, and its traffic go uncounted.
    let info = a.tern_json(&["mirror", "pool", "info", "rbd"]);
    let uuid = info["peers"][0]["uuid"]
        .as_str()
        .expect("peer uuid")
        .to_string();
    a.tern_ok(&[
        "mirror", "pool", "peer", "set", "rbd", &uuid, "mon-host", &to_b.addr,
    ]);
    for (s, via) in [(&a, &to_b.addr), (&b, &to_a.addr)] {
        let info = s.tern_json(&["mirror", "pool", "info", "rbd"]);
        let peers = info["peers"].as_array().expect("peers");
        assert_eq!(peers.len(), 1, "{info}");
        assert!(
            peers[0].to_string().contains(via.as_str()),
            "{} reaches its peer other than through the proxy {via}: {info}",
            s.name
        );
    }
    (a, b, Links { to_a, to_b })
}

/// Sites A and B peered both ways, each reaching the other through a
/// counting [`Proxy`] the test can cut or slow.
pub struct Pair {
    pub a: Site,
    pub b: Site,
    /// B reaches A through this, A reaches B through `to_b`.
    pub to_a: Proxy,
    pub to_b: Proxy,
}

impl Pair {
    pub fn new() -> Pair {
        let (a, b, Links { to_a, to_b }) = linked_sites();
        Pair { a, b, to_a, to_b }
    }

    /// Bytes that crossed each link, both directions: (B from A, A from B).
    pub fn crossed(&self) -> (u64, u64) {
        (
            self.to_a.down_bytes() + self.to_a.up_bytes(),
            self.to_b.down_bytes() + self.to_b.up_bytes(),
        )
    }
}

impl Default for Pair {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates `rbd/NAME` (with journaling in journal mode) and enables
/// mirroring on it in `mode`.
pub fn create_mirrored(s: &Site, name: &str, size: &str, mode: &str) {
    let features = if mode == "journal" {
        "layering,exclusive-lock,journaling"
    } else {
        "layering,exclusive-lock"
    };
    let spec = format!("rbd/{name}");
    s.tern_ok(&["create", &spec, "--size", size, "--image-feature", features]);
    s.tern_ok(&["mirror", "image", "enable", &spec, mode]);
}

/// A new site with pool `rbd` and the journaled image `rbd/j` of `size`,
/// its journal in small segments (256K) so that rolls and trimming happen
/// in any test's run.
pub fn journaled_site(name: &str, size: &str) -> Site {
    let site = Site::start(name);
    site.tern_ok(&["pool", "create", "rbd"]);
    site.tern_ok(&["config", "set", "global", "rbd_journal_object_size", "256K"]);
    site.tern_ok(&[
        "create",
        "rbd/j",
        "--size",
        size,
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    site
}
