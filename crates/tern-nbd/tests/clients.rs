//! Real NBD clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio) against an
//! in-process server backed by `MemDevice`. Each test skips with a note when
//! its client binary is missing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{MemDevice, MemExports};
use rand::{Rng, SeedableRng};
use tern_nbd::{ServerConfig, serve};
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MIB: u64 = 1024 * 1024;

struct TestServer {
    port: u16,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start(exports: MemExports, cfg: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(serve(listener, Arc::new(exports), Arc::new(cfg), async {
            let _ = rx.await;
        }));
        TestServer {
            port,
            stop: Some(tx),
            handle,
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), &mut self.handle)
            .await
            .expect("server drains after shutdown")
            .unwrap()
            .unwrap();
    }
}

fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/bin").join(bin).is_file();
    if !found {
        eprintln!("SKIP: {bin} not installed (apt-get install fio libnbd-bin nbdkit qemu-utils)");
    }
    found
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(bin: &str, args: &[&str]) -> Out {
    let mut cmd = Command::new(bin);
    cmd.args(args).kill_on_drop(true);
    // Debian's nbdsh/python-based helpers want the system python first.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    cmd.env("PATH", path);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    let o = Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if !o.ok {
        eprintln!(
            "{bin} {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            o.stdout, o.stderr
        );
    }
    o
}

fn random_image(seed: u64, size: u64) -> Vec<u8> {
    // Data with holes in it, so sparse paths (OFFSET_HOLE, zero detection) are exercised.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; size as usize];
    for chunk in v.chunks_mut(256 * 1024) {
        if rng.random_bool(0.6) {
            rng.fill(chunk);
        }
    }
    v
}

/// (offset, length, flags) lines of `nbdinfo --map`.
fn parse_map(s: &str) -> Vec<(u64, u64, u32)> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn flags_at(map: &[(u64, u64, u32)], off: u64) -> u32 {
    map.iter()
        .find(|(o, l, _)| *o <= off && off < o + l)
        .unwrap_or_else(|| panic!("no extent covers {off}: {map:?}"))
        .2
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_info_and_maps() {
    if !have("nbdinfo") {
        return;
    }
    let disk = MemDevice::new(8 * MIB, false);
    disk.put(MIB, &[0xaa; 8192]);
    disk.snapshot("x");
    disk.put(2 * MIB, &[0x55; 4096]);
    let ro = MemDevice::new(MIB, true);
    let srv = TestServer::start(
        MemExports::default()
            .with("disk", disk.clone())
            .with("ro", ro.clone()),
        ServerConfig::default(),
    )
    .await;

    let l = run(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", srv.port)],
    )
    .await;
    assert!(l.ok);
    assert!(
        l.stdout.contains("disk") && l.stdout.contains("ro"),
        "{}",
        l.stdout
    );
    assert!(
        l.stdout.contains("mem device of"),
        "descriptions listed: {}",
        l.stdout
    );

    let i = run("nbdinfo", &[&srv.uri("disk")]).await;
    assert!(i.ok);
    assert!(i.stdout.contains("export-size: 8388608"), "{}", i.stdout);
    assert!(i.stdout.contains("base:allocation"), "{}", i.stdout);
    assert!(i.stdout.contains("tern:changed-since:x"), "{}", i.stdout);
    assert!(
        i.stdout.contains("block_size_maximum: 33554432"),
        "{}",
        i.stdout
    );
    assert!(i.stdout.contains("can_multi_conn: true"), "{}", i.stdout);

    let r = run("nbdinfo", &[&srv.uri("ro")]).await;
    assert!(r.ok);
    assert!(r.stdout.contains("is_read_only: true"), "{}", r.stdout);

    let m = run("nbdinfo", &["--map", &srv.uri("disk")]).await;
    assert!(m.ok);
    let map = parse_map(&m.stdout);
    assert_eq!(flags_at(&map, 0), 3, "{}", m.stdout);
    assert_eq!(flags_at(&map, MIB), 0, "{}", m.stdout);
    assert_eq!(flags_at(&map, MIB + 8192), 3, "{}", m.stdout);
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 8 * MIB);

    let c = run("nbdinfo", &["--map=tern:changed-since:x", &srv.uri("disk")]).await;
    assert!(c.ok);
    let map = parse_map(&c.stdout);
    assert_eq!(flags_at(&map, MIB), 0, "written before x: {}", c.stdout);
    assert_eq!(flags_at(&map, 2 * MIB), 1, "written after x: {}", c.stdout);
    assert_eq!(flags_at(&map, 2 * MIB + 4096), 0, "{}", c.stdout);

    // (The NBD_REP_ERR_UNKNOWN text is checked byte-wise in protocol.rs; nbdinfo
    // does not print it.)
    let bad = run("nbdinfo", &[&srv.uri("nope")]).await;
    assert!(!bad.ok);
    assert!(bad.stderr.contains("nope"), "{}", bad.stderr);

    srv.stop().await;
    assert!(
        disk.closes.load(Ordering::SeqCst) >= 4,
        "close() called per connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_out_and_in() {
    if !have("qemu-img") {
        return;
    }
    let size = 16 * MIB;
    let src = random_image(1, size);
    let disk = MemDevice::new(size, false);
    disk.put(0, &src);
    let target = MemDevice::new(size, false);
    let srv = TestServer::start(
        MemExports::default()
            .with("disk", disk.clone())
            .with("target", target.clone()),
        ServerConfig::default(),
    )
    .await;
    let dir = tmp();
    let out = dir.path().join("out.raw");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri("disk"),
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.ok);
    assert!(
        std::fs::read(&out).unwrap() == src,
        "qemu-img read back differs"
    );

    let input = dir.path().join("in.raw");
    let data = random_image(2, size);
    std::fs::write(&input, &data).unwrap();
    let uri = format!("nbd:127.0.0.1:{}:exportname=target", srv.port);
    let i = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            input.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(i.ok);
    assert!(target.contents() == data, "qemu-img write differs");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_discard_zero() {
    if !have("qemu-io") {
        return;
    }
    let disk = MemDevice::new(4 * MIB, false);
    let srv = TestServer::start(
        MemExports::default().with("disk", disk.clone()),
        ServerConfig::default(),
    )
    .await;
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &srv.uri("disk"),
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "discard 0 4k",
            "-c",
            "write -z 8k 4k",
            "-c",
            "read -P 0 8k 4k",
            "-c",
            "read -P 0xab 12k 52k",
            "-c",
            "write -P 0xcd -f 64k 4k",
            "-c",
            "flush",
        ],
    )
    .await;
    assert!(o.ok);
    assert!(
        !o.stdout.contains("Pattern verification failed"),
        "{}",
        o.stdout
    );
    let c = disk.contents();
    assert!(c[4096..8192].iter().all(|&b| b == 0xab));
    assert!(c[8192..12288].iter().all(|&b| b == 0));
    assert!(c[12288..65536].iter().all(|&b| b == 0xab));
    assert!(c[65536..69632].iter().all(|&b| b == 0xcd));
    // Our MemDevice punches trimmed pages; qemu must have sent TRIM, not a write.
    assert!(c[..4096].iter().all(|&b| b == 0));

    // A second, read-only open sees the same data.
    let ro = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &srv.uri("disk"),
            "-c",
            "read -P 0xab 4k 4k",
        ],
    )
    .await;
    assert!(ro.ok);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_is_advertised_read_only() {
    if !have("qemu-io") {
        return;
    }
    let ro = MemDevice::new(MIB, true);
    ro.put(0, &[7; 4096]);
    let srv = TestServer::start(
        MemExports::default().with("ro", ro.clone()),
        ServerConfig::default(),
    )
    .await;
    // qemu honours NBD_FLAG_READ_ONLY by refusing a writable open (EPERM on the
    // wire for clients that write anyway is covered in protocol.rs).
    let rw = run(
        "qemu-io",
        &["-f", "raw", &srv.uri("ro"), "-c", "write -P 1 0 4k"],
    )
    .await;
    assert!(!rw.ok);
    assert!(
        rw.stderr.contains("Permission denied") || rw.stderr.contains("read-only"),
        "{}",
        rw.stderr
    );
    let r = run(
        "qemu-io",
        &["-f", "raw", "-r", &srv.uri("ro"), "-c", "read -P 7 0 4k"],
    )
    .await;
    assert!(r.ok);
    assert!(r.stdout.contains("read 4096/4096"), "{}", r.stdout);
    assert!(ro.contents()[..4096].iter().all(|&b| b == 7));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_out_and_in() {
    if !have("nbdcopy") {
        return;
    }
    let size = 32 * MIB;
    let src = random_image(3, size);
    let disk = MemDevice::new(size, false);
    disk.put(0, &src);
    let target = MemDevice::new(size, false);
    // Pre-dirty the target so a wrong "skip zeroes" would show.
    target.put(5 * MIB, &[9; 65536]);
    let srv = TestServer::start(
        MemExports::default()
            .with("disk", disk.clone())
            .with("target", target.clone()),
        ServerConfig::default(),
    )
    .await;
    let dir = tmp();
    let out: PathBuf = dir.path().join("out.raw");
    std::fs::File::create(&out).unwrap();
    let o = run(
        "nbdcopy",
        &["--flush", &srv.uri("disk"), out.to_str().unwrap()],
    )
    .await;
    assert!(o.ok);
    assert!(std::fs::read(&out).unwrap() == src, "nbdcopy read differs");

    let input = dir.path().join("in.raw");
    let data = random_image(4, size);
    std::fs::write(&input, &data).unwrap();
    let i = run(
        "nbdcopy",
        &["--flush", input.to_str().unwrap(), &srv.uri("target")],
    )
    .await;
    assert!(i.ok);
    assert!(target.contents() == data, "nbdcopy write differs");

    // NBD to NBD, using block status to skip holes.
    let c = run("nbdcopy", &[&srv.uri("disk"), &srv.uri("target")]).await;
    assert!(c.ok);
    assert!(target.contents() == src, "nbdcopy nbd->nbd differs");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randrw_is_served_concurrently_and_verifies() {
    if !have("fio") {
        return;
    }
    let disk = MemDevice::new(64 * MIB, false);
    // Latency makes queue depth visible as overlapping device calls.
    *disk.delay.lock().unwrap() = Duration::from_millis(1);
    let srv = TestServer::start(
        MemExports::default().with("fio", disk.clone()),
        ServerConfig::default(),
    )
    .await;
    let uri = srv.uri("fio");
    let o = run(
        "fio",
        &[
            "--name=randrw",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--size=16m",
            "--runtime=3",
            "--time_based",
            "--group_reporting",
        ],
    )
    .await;
    assert!(o.ok);
    let max = disk.max_in_flight.load(Ordering::SeqCst);
    eprintln!("max concurrent device calls under fio QD32: {max}");
    assert!(max > 1, "requests were serialised (max in flight {max})");

    *disk.delay.lock().unwrap() = Duration::ZERO;
    let v = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=8m",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
        ],
    )
    .await;
    assert!(v.ok);
    assert!(!v.stdout.contains("verify: bad"), "{}", v.stdout);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_nbdinfo() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tmp();
    let acceptor = make_tls(dir.path());
    let disk = MemDevice::new(MIB, false);
    disk.put(0, &[1; 4096]);
    let srv = TestServer::start(
        MemExports::default().with("disk", disk.clone()),
        ServerConfig {
            tls: Some(acceptor),
            require_tls: true,
            ..ServerConfig::default()
        },
    )
    .await;
    let plain = run("nbdinfo", &[&srv.uri("disk")]).await;
    assert!(!plain.ok, "clear text must be refused when TLS is required");
    let tls_uri = format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={}",
        srv.port,
        dir.path().display()
    );
    let t = run("nbdinfo", &["--map", &tls_uri]).await;
    assert!(t.ok, "TLS connection works");
    let map = parse_map(&t.stdout);
    assert_eq!(flags_at(&map, 0), 0);
    assert_eq!(flags_at(&map, 4096), 3);
    srv.stop().await;
}

/// Writes a CA (`ca-cert.pem`, the layout libnbd/gnutls expect) into `dir` and
/// returns an acceptor for a server certificate it signed for 127.0.0.1.
fn make_tls(dir: &Path) -> tokio_rustls::TlsAcceptor {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let chain = vec![cert.der().clone(), ca.der().clone()];
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}
