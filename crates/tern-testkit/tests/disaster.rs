//! Disaster: a site lost under load, forced promotion of the survivor,
//! split-brain when the lost site returns, delta resync, failback; three
//! sites; `tern dr` interrupted and re-run; the seed's failover.sh and
//! failback.sh run against tern.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Pair, Site, random_bytes, rt, wait_until};
use tern_types::ImageSpec;

const GIB: u64 = 1 << 30;
const DIVERGE: u64 = 8 << 20;
const PIECE: u64 = 128 << 10;
const BLOCK: u64 = 4096;
const OBJECT: u64 = 4 << 20;
/// Data the image holds before the disaster, which no delta may send again:
/// a full copy moves it all, so a full copy cannot pass for a delta.
const BASE: u64 = 192 << 20;

fn spec(name: &str) -> String {
    format!("rbd/{name}")
}

/// Chunk hashes of an image (the site reads all of it).
fn sums(s: &Site, name: &str) -> Vec<Vec<u8>> {
    let rt = rt();
    let c = s.client(&rt);
    rt.block_on(c.image().checksum(&ImageSpec::new("rbd", name), 4 << 20))
        .map(|r| r.hashes)
        .unwrap_or_default()
}

fn export_sum(s: &Site, name: &str) -> String {
    s.export_sha256(&spec(name))
}

/// Byte for byte: both images exported whole and hashed.
fn assert_identical(a: &Site, b: &Site, name: &str) {
    assert_eq!(
        export_sum(a, name),
        export_sum(b, name),
        "{name} differs between {} and {}",
        a.name,
        b.name
    );
}

fn wait_same(src: &Site, dst: &Site, name: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    let want = sums(src, name);
    let ok = wait_until(timeout, || sums(dst, name) == want);
    assert!(
        ok,
        "{name} on {} did not become equal to {} within {timeout:?}: {}",
        dst.name,
        src.name,
        status(dst, name)
    );
    t.elapsed()
}

fn status(s: &Site, name: &str) -> serde_json::Value {
    let o = s.tern(&["mirror", "image", "status", &spec(name), "--format", "json"]);
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

fn pool_health(s: &Site) -> String {
    let v = s.tern_json(&["mirror", "pool", "status", "rbd"]);
    v["summary"]["health"].as_str().unwrap_or("").to_string()
}

fn is_split_brain(s: &Site, name: &str) -> bool {
    let st = status(s, name);
    st["state"] == "up+error"
        && st["description"]
            .as_str()
            .is_some_and(|d| d.contains("split-brain"))
}

/// Writes of PIECE bytes at random PIECE-aligned offsets, `total` bytes in
/// all; returns their offsets.
fn scatter(s: &Site, name: &str, seed: u64, total: u64) -> Vec<u64> {
    use rand::{Rng, SeedableRng};
    let rt = rt();
    let c = s.client(&rt);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let size = rt
        .block_on(c.image().info(&ImageSpec::new("rbd", name)))
        .unwrap()
        .size;
    let mut offs = Vec::new();
    rt.block_on(async {
        for i in 0..total / PIECE {
            let off = rng.random_range(0..size / PIECE) * PIECE;
            offs.push(off);
            c.io()
                .write(
                    &ImageSpec::new("rbd", name),
                    off,
                    random_bytes(seed * 1_000_000 + i, PIECE as usize),
                    false,
                    "",
                )
                .await
                .unwrap();
        }
        c.io().flush(&ImageSpec::new("rbd", name)).await.unwrap();
    });
    offs
}

/// `len` bytes of random data from `from`, in 4 MiB writes.
fn fill(s: &Site, name: &str, from: u64, len: u64) {
    let rt = rt();
    let c = s.client(&rt);
    rt.block_on(async {
        for (i, off) in (from..from + len).step_by(4 << 20).enumerate() {
            let n = (from + len - off).min(4 << 20);
            c.io()
                .write(
                    &ImageSpec::new("rbd", name),
                    off,
                    random_bytes(90_000 + i as u64, n as usize),
                    false,
                    "",
                )
                .await
                .unwrap();
        }
        c.io().flush(&ImageSpec::new("rbd", name)).await.unwrap();
    });
}

/// The 4 KiB blocks among `blocks` (block numbers) whose content differs
/// between the two sites: what a resync must move at the least.
fn differing(a: &Site, b: &Site, name: &str, blocks: &std::collections::BTreeSet<u64>) -> u64 {
    let rt = rt();
    let (ca, cb) = (a.client(&rt), b.client(&rt));
    let img = ImageSpec::new("rbd", name);
    // Adjacent blocks are read together: a few hundred reads, not thousands.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &blk in blocks {
        match runs.last_mut() {
            Some((start, n)) if *start + *n == blk && *n < 256 => *n += 1,
            _ => runs.push((blk, 1)),
        }
    }
    rt.block_on(async {
        let mut differ = 0;
        for (start, n) in runs {
            let (off, len) = (start * BLOCK, n * BLOCK);
            let x = ca.io().read(&img, off, len).await.unwrap();
            let y = cb.io().read(&img, off, len).await.unwrap();
            differ += x
                .chunks(BLOCK as usize)
                .zip(y.chunks(BLOCK as usize))
                .filter(|(p, q)| p != q)
                .count() as u64;
        }
        differ
    })
}

/// The 4 KiB block numbers that writes of `len` bytes at `offs` touch.
fn blocks_of(offs: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
    offs.iter()
        .flat_map(|&(off, len)| off / BLOCK..(off + len).div_ceil(BLOCK))
        .collect()
}

/// What the application on a site does through its NBD connection.
#[derive(Default)]
struct App {
    stop: AtomicBool,
    /// Set: write DIVERGE bytes in PIECE writes scattered over the image
    /// (between load writes), then clear it.
    scatter: AtomicBool,
    /// Every write acknowledged: (offset, length).
    written: std::sync::Mutex<Vec<(u64, u64)>>,
}

/// 4 KiB NBD writes to the first 256 MiB at about `rate`/s until stopped
/// or until the site goes away; returns the writes acknowledged. The
/// connection holds the image's lock, so other writes go through it too.
fn load(s: &Site, name: &str, rate: u64, app: Arc<App>) -> std::thread::JoinHandle<u64> {
    let (addr, export) = (s.nbd_addr.clone(), spec(name));
    std::thread::spawn(move || {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let Ok(mut c) = NbdClient::connect(&addr, &export) else {
            return 0;
        };
        let t0 = Instant::now();
        let (mut n, mut last) = (0u64, 0u64);
        while !app.stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(120) {
            if app.scatter.load(Ordering::Relaxed) {
                // Whole objects: once A is killed, a snapshot-mode resync
                // must count every object A touched since its last
                // snapshot as wholly changed (its write intents outlive its
                // dirty maps), so 4 MiB is the unit of what diverged there.
                for i in 0..DIVERGE / PIECE {
                    let off = if i % (OBJECT / PIECE) == 0 {
                        rng.random_range(0..GIB / OBJECT) * OBJECT
                    } else {
                        last + PIECE
                    };
                    last = off;
                    app.written.lock().unwrap().push((off, PIECE));
                    c.send_write(off, &random_bytes(7_000_000 + i, PIECE as usize), false)
                        .unwrap();
                    assert_eq!(c.replies.recv().unwrap().error, 0);
                }
                c.send_flush().unwrap();
                assert_eq!(c.replies.recv().unwrap().error, 0);
                app.scatter.store(false, Ordering::Relaxed);
            }
            let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            let off = rng.random_range(0..65536u64) * 4096;
            // Before the send: a write in flight when the site dies may
            // have landed.
            app.written.lock().unwrap().push((off, 4096));
            if c.send_write(off, &random_bytes(n, 4096), false).is_err() {
                break;
            }
            match c.replies.recv_timeout(Duration::from_secs(5)) {
                Ok(r) if r.error == 0 => n += 1,
                _ => break,
            }
        }
        n
    })
}

fn pair() -> Pair {
    Pair::new()
}

fn create(s: &Site, name: &str, size: &str, mode: &str) {
    tern_testkit::create_mirrored(s, name, size, mode)
}

/// Snapshot mode needs a mirror snapshot to have something to copy.
fn snap_if(s: &Site, name: &str, mode: &str) {
    if mode == "snapshot" {
        s.tern_ok(&["mirror", "image", "snapshot", &spec(name)]);
    }
}

/// `resync [args]` on `site`, until the daemon records it done and the
/// copy equals `primary`; returns the summary it recorded.
fn resync(
    site: &Site,
    primary: &Site,
    name: &str,
    args: &[&str],
    log: impl Fn() -> String,
) -> String {
    let mirroring = || site.tern_json(&["info", &spec(name)])["mirroring"].clone();
    let before = mirroring()["last_resync"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut cmd = vec!["mirror", "image", "resync"];
    cmd.extend_from_slice(args);
    let s = spec(name);
    cmd.push(&s);
    site.tern_ok(&cmd);
    let done = || {
        let m = mirroring();
        m["resync_requested"] == false
            && m["last_resync"]
                .as_str()
                .is_some_and(|r| !r.is_empty() && r != before)
    };
    if !wait_until(Duration::from_secs(180), done) {
        panic!(
            "resync {args:?} on {} never finished: {} / {}\n--- its daemon ---\n{}",
            site.name,
            mirroring(),
            status(site, name),
            log()
        );
    }
    wait_same(primary, site, name, Duration::from_secs(60));
    mirroring()["last_resync"].as_str().unwrap().to_string()
}

fn unplanned_failover(mode: &str) {
    let (mut a, b, link) = tern_testkit::linked_sites();
    let mut ma = a.start_mirror();
    let _mb = b.start_mirror();
    let features = if mode == "journal" {
        "layering,exclusive-lock,journaling"
    } else {
        "layering,exclusive-lock"
    };
    a.tern_ok(&[
        "create",
        &spec("vol"),
        "--size",
        "1G",
        "--image-feature",
        features,
    ]);
    fill(&a, "vol", 512 << 20, BASE);
    let initial = link.meter();
    a.tern_ok(&["mirror", "image", "enable", &spec("vol"), mode]);
    scatter(&a, "vol", 1, 16 << 20);
    snap_if(&a, "vol", mode);
    wait_same(&a, &b, "vol", Duration::from_secs(180));
    let initial = initial.stop();

    // Site A under load; its links go, it writes on alone, then it dies.
    let app = Arc::new(App::default());
    let w = load(&a, "vol", 300, app.clone());
    std::thread::sleep(Duration::from_secs(2));
    snap_if(&a, "vol", mode);
    std::thread::sleep(Duration::from_secs(2));
    link.set_cut(true);
    app.scatter.store(true, Ordering::Relaxed);
    let ok = wait_until(Duration::from_secs(60), || {
        !app.scatter.load(Ordering::Relaxed)
    });
    assert!(ok, "the divergent writes on A did not finish");
    std::thread::sleep(Duration::from_millis(500));
    a.kill9();
    ma.kill9();
    app.stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(acked > 500, "the load wrote only {acked} times");

    // Forced promotion of B: the RTO for one image.
    let t = Instant::now();
    let out = b.tern_ok(&[
        "mirror",
        "image",
        "promote",
        "--force",
        &spec("vol"),
        "--format",
        "json",
    ]);
    let rto = t.elapsed();
    let info = b.tern_json(&["info", &spec("vol")]);
    eprintln!("[{mode}] forced promote of one image: {rto:?} ({out}) {info}");
    let on_b = scatter(&b, "vol", 3, DIVERGE);
    snap_if(&b, "vol", mode);

    // A comes back, still primary: split-brain on both sides, nothing overwritten.
    a.restart();
    // Counted from the links' return: whatever A's daemon fetches while
    // split-brain is part of what the resync costs.
    let m = link.meter();
    link.set_cut(false);
    let mut ma = a.start_mirror();
    let (sa, sb) = (sums(&a, "vol"), sums(&b, "vol"));
    assert_ne!(sa, sb);
    let ok = wait_until(Duration::from_secs(20), || {
        is_split_brain(&a, "vol") && is_split_brain(&b, "vol")
    });
    assert!(
        ok,
        "split-brain not reported on both sites: A {} / B {}",
        status(&a, "vol"),
        status(&b, "vol")
    );
    assert_eq!(pool_health(&a), "ERROR");
    assert_eq!(pool_health(&b), "ERROR");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sums(&a, "vol"), sa, "A was overwritten during split-brain");
    assert_eq!(sums(&b, "vol"), sb, "B was overwritten during split-brain");

    // Demoted, A still refuses to follow B: its history left B's.
    a.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
    let ok = wait_until(Duration::from_secs(20), || {
        let st = status(&a, "vol");
        st["description"]
            .as_str()
            .is_some_and(|d| d.contains("split-brain") && d.contains("resync"))
    });
    assert!(
        ok,
        "demoted A did not report split-brain: {}",
        status(&a, "vol")
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sums(&a, "vol"),
        sa,
        "A was overwritten before a resync was asked for"
    );

    // What diverged, from the test's own writes: every block A wrote after
    // the sites were last equal and every block B wrote after its
    // promotion, less those both sides hold alike (A's writes that reached
    // B before the cut).
    let mut written = app.written.lock().unwrap().clone();
    written.extend(on_b.iter().map(|&off| (off, PIECE)));
    let candidates = blocks_of(&written);
    let diverged = differing(&a, &b, "vol", &candidates) * BLOCK;
    assert!(
        diverged >= DIVERGE,
        "only {diverged} bytes differ: the divergent writes are missing"
    );

    // Delta resync: only what diverged crosses the links, either way.
    let before = m.stop();
    let t = Instant::now();
    let summary = resync(&a, &b, "vol", &[], || ma.log());
    let delta = m.stop();
    let took = t.elapsed();
    assert_identical(&a, &b, "vol");
    eprintln!(
        "[{mode}] delta resync of a 1 GiB image ({} MiB allocated): {} bytes differed \
         ({} blocks written on either side), {delta} moved ({:.2}× the divergence) in \
         {took:?} ({before} of it before the resync was asked for); {summary}",
        (BASE + (16 << 20)) >> 20,
        diverged,
        candidates.len(),
        delta.total() as f64 / diverged as f64
    );
    assert!(
        summary.starts_with("delta"),
        "not a delta resync: {summary}"
    );
    // Snapshot mode finds A's writes in its dirty maps: an 8 KiB chunk per
    // 4 KiB write at best, and A was killed, so each object the load
    // touched after A's last snapshot goes whole (with data that never
    // diverged). Journal mode reads A's writes from its journal.
    let (factor, fx) = if mode == "journal" {
        (3, "1.5")
    } else {
        (4, "2")
    };
    assert!(
        delta.total() * 2 <= diverged * factor,
        "the delta resync moved {delta}, over {fx}× the {diverged} bytes that diverged"
    );

    // A resync of a copy that is already equal has nothing to move.
    let m = link.meter();
    let summary = resync(&a, &b, "vol", &[], || ma.log());
    let healthy = m.stop();
    assert_identical(&a, &b, "vol");
    eprintln!("[{mode}] resync of the healthy copy: {healthy} moved; {summary}");
    assert!(
        healthy.total() <= 1 << 20,
        "a resync of a healthy copy moved {healthy}: {summary}"
    );

    // A full copy of the same image, for scale: the delta must be a small
    // part of it.
    let m = link.meter();
    let summary = resync(&a, &b, "vol", &["--full"], || ma.log());
    let full = m.stop();
    assert_identical(&a, &b, "vol");
    eprintln!(
        "[{mode}] resync --full of the same image: {full} moved ({summary}); the first sync \
         moved {initial}; the delta was {:.3}× the full copy",
        delta.total() as f64 / full.total() as f64
    );
    assert!(
        summary.starts_with("full copy"),
        "not a full copy: {summary}"
    );
    assert!(
        delta.total() * 4 < full.total(),
        "the delta resync moved {delta}, not under a quarter of a full copy's {full}"
    );

    // Fail back to A with no data loss: B writes, hands over, A promotes.
    let app = Arc::new(App::default());
    let w = load(&b, "vol", 300, app.clone());
    std::thread::sleep(Duration::from_secs(2));
    app.stop.store(true, Ordering::Relaxed);
    let n = w.join().unwrap();
    assert!(n > 100);
    b.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
    let ok = wait_until(Duration::from_secs(60), || {
        a.tern(&["mirror", "image", "promote", &spec("vol")])
            .status
            .success()
    });
    assert!(
        ok,
        "plain promote on A never succeeded: {}",
        status(&a, "vol")
    );
    assert_identical(&a, &b, "vol");
    scatter(&a, "vol", 4, 1 << 20);
    snap_if(&a, "vol", mode);
    wait_same(&a, &b, "vol", Duration::from_secs(60));
    assert_identical(&a, &b, "vol");
    ma.stop();
}

#[test]
fn unplanned_failover_snapshot_mode() {
    unplanned_failover("snapshot");
}

#[test]
fn unplanned_failover_journal_mode() {
    unplanned_failover("journal");
}

/// Three sites peered pairwise: the image primary on A reaches B and C;
/// after a failover to C, B (and A) follow C; all three equal.
#[test]
fn three_sites() {
    let sites: Vec<Site> = ["site-a", "site-b", "site-c"]
        .iter()
        .map(|n| {
            let s = Site::start(n);
            s.tern_ok(&["pool", "create", "rbd"]);
            s.tern_ok(&["mirror", "pool", "enable", "rbd", "image", "--site-name", n]);
            s
        })
        .collect();
    let (a, b, c) = (&sites[0], &sites[1], &sites[2]);
    let token = |s: &Site| s.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]);
    b.import_token(&token(a), "site-b");
    c.import_token(&token(a), "site-c");
    c.import_token(&token(b), "site-c");
    for s in [a, b, c] {
        let info = s.tern_json(&["mirror", "pool", "info", "rbd"]);
        assert_eq!(info["peers"].as_array().unwrap().len(), 2, "{info}");
    }
    let _m: Vec<_> = sites.iter().map(|s| s.start_mirror()).collect();
    for (name, mode) in [("snapvol", "snapshot"), ("jvol", "journal")] {
        create(a, name, "64M", mode);
        scatter(a, name, 10, 8 << 20);
        snap_if(a, name, mode);
    }
    for name in ["snapvol", "jvol"] {
        wait_same(a, b, name, Duration::from_secs(60));
        wait_same(a, c, name, Duration::from_secs(60));
    }
    // Orderly failover to C: demote the pool at A, then `tern dr failover`
    // (plain) at C waits for each demotion to be replayed and promotes.
    a.tern_ok(&["mirror", "pool", "demote", "rbd"]);
    let log = c.root.path().join("dr.log");
    let out = c.tern_ok(&[
        "dr",
        "failover",
        "--pool",
        "rbd",
        "--timeout",
        "60",
        "--log",
        log.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for img in report["images"].as_array().unwrap() {
        assert_eq!(img["ok"], true, "{report}");
        assert_eq!(
            img["rpo_seconds"], 0.0,
            "a planned failover loses nothing: {report}"
        );
    }
    for name in ["snapvol", "jvol"] {
        assert_eq!(
            c.tern_json(&["info", &spec(name)])["mirroring"]["primary"],
            true
        );
        scatter(c, name, 11, 4 << 20);
        snap_if(c, name, if name == "snapvol" { "snapshot" } else { "" });
    }
    for name in ["snapvol", "jvol"] {
        wait_same(c, b, name, Duration::from_secs(60));
        wait_same(c, a, name, Duration::from_secs(60));
        let st = status(b, name);
        assert_eq!(st["state"], "up+replaying", "B does not follow C: {st}");
        assert_identical(c, b, name);
        assert_identical(c, a, name);
    }
    // Then C is lost: forced failover to B; A follows B.
    let mut sites = sites;
    let mut c = sites.pop().unwrap();
    c.kill9();
    let (a, b) = (&sites[0], &sites[1]);
    for name in ["snapvol", "jvol"] {
        b.tern_ok(&["mirror", "image", "promote", "--force", &spec(name)]);
        scatter(b, name, 12, 2 << 20);
        snap_if(b, name, if name == "snapvol" { "snapshot" } else { "" });
    }
    for name in ["snapvol", "jvol"] {
        wait_same(b, a, name, Duration::from_secs(60));
        assert_identical(b, a, name);
    }
}

/// Runs one of the seed's scripts on `site`, with `rbd` and `ceph` as shell
/// functions calling tern, in a private mount namespace whose /var/log is
/// a fresh tmpfs (the scripts log to /var/log/ceph). Bounded to 5 minutes.
fn run_seed_script(site: &Site, script: &str, args: &[&str]) -> (bool, String) {
    let path = format!("{}/tests/data/seed/{script}", env!("CARGO_MANIFEST_DIR"));
    let wrapper = r#"
set -e
mount -t tmpfs tmpfs /var/log
mkdir -p /var/log/ceph
rbd() { "$TERN" --cluster "$SITE" "$@"; }
ceph() { "$TERN" --cluster "$SITE" "$@"; }
export -f rbd ceph
exec bash "$0" "$@"
"#;
    let out = std::process::Command::new("timeout")
        .args(["300", "unshare", "-m", "bash", "-c", wrapper, &path])
        .args(args)
        .env("TERN", tern_testkit::bin("tern"))
        .env("SITE", &site.name)
        .env("TERN_CONF_DIR", &site.conf_dir)
        .env_remove("TERN_CLUSTER")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The seed's failover.sh (Step 6) and failback.sh (Step 7) against tern.
/// Changes to the scripts, each marked CHANGED in tests/data/seed/:
/// - failover.sh: `((PROMOTED++))` and `((FAILED++))` became `X=$((X + 1))`:
///   under `set -e` the post-increment of 0 is false and exits the script
///   after the first image.
/// - failback.sh: `wait_for_sync` read the DR site's own `.state`, which is
///   always `up+stopped` there (it is the primary), so it could only time
///   out after an hour; it reads `.peer_sites[0]` instead. Its grep for
///   `entries_behind"` never matched Ceph's `entries_behind_primary`, so it
///   never waited for replay; the key is fixed.
#[test]
fn seed_failover_and_failback_scripts() {
    let Pair {
        mut a,
        b,
        to_a,
        to_b,
    } = pair();
    let mut ma = a.start_mirror();
    let _mb = b.start_mirror();
    let images = [("db", "journal"), ("web", "snapshot"), ("logs", "snapshot")];
    for (name, mode) in images {
        create(&a, name, "64M", mode);
        scatter(&a, name, 20, 4 << 20);
        snap_if(&a, name, mode);
    }
    for (name, _) in images {
        wait_same(&a, &b, name, Duration::from_secs(60));
    }
    // Site A is lost.
    a.kill9();
    ma.kill9();
    to_a.set_cut(true);
    to_b.set_cut(true);
    let (ok, out) = run_seed_script(&b, "failover.sh", &["rbd", "--force"]);
    assert!(ok, "failover.sh failed:\n{out}");
    assert!(
        out.contains("Promotion complete: 3 succeeded, 0 failed"),
        "{out}"
    );
    for (name, mode) in images {
        assert_eq!(
            b.tern_json(&["info", &spec(name)])["mirroring"]["primary"],
            true
        );
        scatter(&b, name, 21, 2 << 20);
        snap_if(&b, name, mode);
    }
    // A returns: demote its images and resync them from B (Step 7).
    a.restart();
    to_a.set_cut(false);
    to_b.set_cut(false);
    let _ma = a.start_mirror();
    a.tern_ok(&["mirror", "pool", "demote", "rbd"]);
    for (name, _) in images {
        a.tern_ok(&["mirror", "image", "resync", &spec(name)]);
    }
    for (name, _) in images {
        wait_same(&b, &a, name, Duration::from_secs(60));
    }
    // failback.sh on the DR site waits for sync and demotes there.
    let (ok, out) = run_seed_script(&b, "failback.sh", &["rbd"]);
    assert!(ok, "failback.sh failed:\n{out}");
    for (name, _) in images {
        assert!(out.contains(&format!("{name} is fully synced")), "{out}");
        assert!(out.contains(&format!("{name} demoted on DR site")), "{out}");
    }
    // "Now promote images on primary site": failover.sh, plain, on A.
    let (ok, out) = run_seed_script(&a, "failover.sh", &["rbd"]);
    assert!(ok, "failover.sh on A failed:\n{out}");
    assert!(
        out.contains("Promotion complete: 3 succeeded, 0 failed"),
        "{out}"
    );
    for (name, mode) in images {
        assert_identical(&a, &b, name);
        scatter(&a, name, 22, 1 << 20);
        snap_if(&a, name, mode);
    }
    for (name, _) in images {
        wait_same(&a, &b, name, Duration::from_secs(60));
        assert_identical(&a, &b, name);
    }
}

fn primaries(s: &Site) -> usize {
    let rt = rt();
    let c = s.client(&rt);
    rt.block_on(c.mirror().image_list("rbd"))
        .map(|l| l.images.iter().filter(|i| i.primary).count())
        .unwrap_or(0)
}

/// `tern dr failover`: a dry run changes nothing; a run killed halfway and
/// run again finishes the job; the RTO for 200 images after a site loss.
#[test]
fn dr_failover_interrupted_then_finished() {
    const N: u64 = 200;
    let Pair {
        mut a,
        b,
        to_a,
        to_b,
    } = pair();
    a.tern_ok(&[
        "mirror",
        "pool",
        "enable",
        "rbd",
        "pool",
        "--site-name",
        "site-a",
    ]);
    tern_testkit::mirrored_fleet(&a, N);
    let rt = rt();
    let mut ma = a.start_mirror();
    let _mb = b.start_mirror();
    let ok = wait_until(Duration::from_secs(240), || {
        let st = b.tern_json(&["mirror", "pool", "status", "rbd"]);
        st["summary"]["states"]["replaying"].as_u64() == Some(N)
    });
    assert!(ok, "{N} images not replaying on B");
    a.kill9();
    ma.kill9();
    to_a.set_cut(true);
    to_b.set_cut(true);
    let log = b.root.path().join("dr.log");
    let log_s = log.to_str().unwrap();

    // Without --force, A being unreachable stops it before any change.
    let (code, err) = b.tern_err(&["dr", "failover", "--pool", "rbd", "--log", log_s]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot be reached") && err.contains("--force") || err.contains("preflight"),
        "{err}"
    );
    assert_eq!(primaries(&b), 0);
    // A dry run changes nothing.
    b.tern_ok(&[
        "dr",
        "failover",
        "--pool",
        "rbd",
        "--force",
        "--dry-run",
        "--log",
        log_s,
    ]);
    assert_eq!(primaries(&b), 0, "--dry-run promoted images");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("dry run: nothing was changed")
    );

    // Killed halfway...
    let t = Instant::now();
    let mut child = b
        .tern_cmd()
        .args(["dr", "failover", "--pool", "rbd", "--force", "--log", log_s])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A tight poll (no sleeps): the whole run takes well under a second.
    let mut ok = false;
    let cb = b.client(&rt);
    let count = || {
        rt.block_on(cb.mirror().image_list("rbd"))
            .map(|l| l.images.iter().filter(|i| i.primary).count())
            .unwrap_or(0)
    };
    while t.elapsed() < Duration::from_secs(60) {
        if count() >= 10 {
            ok = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let first = t.elapsed();
    assert!(ok, "the first run promoted fewer than 10 images in 60 s");
    let done = primaries(&b);
    assert!(
        (10..N as usize).contains(&done),
        "the kill came too late to test an interruption: {done} promoted"
    );
    // ...and run again: it finishes, skipping what is done.
    let t = Instant::now();
    let out = b.tern_ok(&[
        "dr", "failover", "--pool", "rbd", "--force", "--log", log_s, "--format", "json",
    ]);
    let second = t.elapsed();
    assert_eq!(primaries(&b), N as usize);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let imgs = report["images"].as_array().unwrap();
    assert_eq!(imgs.len(), N as usize);
    assert!(imgs.iter().all(|i| i["ok"] == true), "{report}");
    let skipped = imgs
        .iter()
        .filter(|i| i["result"].as_str().unwrap().contains("skipped"))
        .count();
    assert!(
        skipped >= done,
        "{skipped} skipped, {done} done before: {report}"
    );
    let with_rpo = imgs.iter().filter(|i| i["rpo_seconds"].is_number()).count();
    assert_eq!(with_rpo, N as usize - skipped, "RPO missing: {report}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("failover complete: {N} succeeded, 0 failed")),
        "{text}"
    );
    // A returns; its images are demoted and resynced, then `tern dr
    // failback --to site-a` on B hands every image back.
    a.restart();
    to_a.set_cut(false);
    to_b.set_cut(false);
    let _ma = a.start_mirror();
    a.tern_ok(&["mirror", "pool", "demote", "rbd"]);
    let ca = a.client(&rt);
    rt.block_on(async {
        for i in 0..N {
            ca.mirror()
                .image_resync(&ImageSpec::new("rbd", &format!("img{i:03}")), false)
                .await
                .unwrap();
        }
    });
    let ok = wait_until(Duration::from_secs(120), || {
        let st = a.tern_json(&["mirror", "pool", "status", "rbd"]);
        st["summary"]["states"]["replaying"].as_u64() == Some(N)
    });
    assert!(ok, "A's {N} images did not resync");
    for f in std::fs::read_dir(&a.conf_dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), b.conf_dir.join(f.file_name())).unwrap();
    }
    let t = Instant::now();
    let out = b.tern_ok(&[
        "dr", "failback", "--pool", "rbd", "--to", "site-a", "--log", log_s, "--format", "json",
    ]);
    let back = t.elapsed();
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        report["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["ok"] == true),
        "{report}"
    );
    assert_eq!(primaries(&a), N as usize);
    assert_eq!(primaries(&b), 0);
    for i in [0u64, 77, 199] {
        assert_identical(&a, &b, &format!("img{i:03}"));
    }
    // Idempotent: a second failback finds nothing to do.
    b.tern_ok(&[
        "dr", "failback", "--pool", "rbd", "--to", "site-a", "--log", log_s,
    ]);
    eprintln!("failback of {N} images (resynced by delta) to site-a: {back:?}");
    eprintln!(
        "RTO, {N} images: the first run promoted {done} in {first:?} before it was killed; the re-run \
         promoted the other {} (skipping {done}) in {second:?}: {:?} in all",
        N as usize - done,
        first + second
    );
}
