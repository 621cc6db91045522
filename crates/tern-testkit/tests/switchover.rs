//! Orderly switchover and switch back: a plain promote succeeds only when
//! the promoted site holds the old primary's last flushed writes, however
//! soon after the last switch it comes; and once promote returns, no
//! mirroring step begun before it changes the image's role or content.
//! Fault points (`Site::arm`) hold a daemon between two steps while the
//! test promotes.

use std::time::{Duration, Instant};
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Pair, Site, random_bytes, rt, wait_until};
use tern_types::ImageSpec;

const MIB: u64 = 1 << 20;

fn spec(name: &str) -> String {
    format!("rbd/{name}")
}

fn create(s: &Site, name: &str, size: &str, mode: &str) {
    tern_testkit::create_mirrored(s, name, size, mode)
}

/// Writes through NBD, flushes (acknowledged and durable), disconnects.
fn nbd_write(s: &Site, name: &str, offset: u64, data: &[u8]) {
    let mut c = NbdClient::connect(&s.nbd_addr, &spec(name)).expect("nbd connect");
    c.send_write(offset, data, false).unwrap();
    let r = c.replies.recv().unwrap();
    assert_eq!(r.error, 0, "NBD write on {} refused", s.name);
    c.send_flush().unwrap();
    assert_eq!(
        c.replies.recv().unwrap().error,
        0,
        "NBD flush on {}",
        s.name
    );
    c.disconnect();
}

fn read(s: &Site, name: &str, offset: u64, len: u64) -> Vec<u8> {
    let rt = rt();
    let c = s.client(&rt);
    rt.block_on(c.io().read(&ImageSpec::new("rbd", name), offset, len))
        .expect("read")
}

/// An API write and flush; the error text if refused.
fn try_write(s: &Site, name: &str, offset: u64, data: &[u8]) -> Result<(), String> {
    let rt = rt();
    let c = s.client(&rt);
    rt.block_on(async {
        c.io()
            .write(
                &ImageSpec::new("rbd", name),
                offset,
                data.to_vec(),
                false,
                "",
            )
            .await
            .map_err(|e| e.to_string())?;
        c.io()
            .flush(&ImageSpec::new("rbd", name))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

fn status(s: &Site, name: &str) -> serde_json::Value {
    let o = s.tern(&["mirror", "image", "status", &spec(name), "--format", "json"]);
    serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
}

fn is_primary(s: &Site, name: &str) -> bool {
    s.tern_json(&["mirror", "image", "status", &spec(name)])["description"]
        .as_str()
        .is_some_and(|d| d == "local image is primary")
}

fn is_split_brain(s: &Site, name: &str) -> bool {
    let st = status(s, name);
    st["state"] == "up+error"
        && st["description"]
            .as_str()
            .is_some_and(|d| d.contains("split-brain"))
}

/// Chunk hashes of an image, computed by its site (empty if it has none).
fn sums(s: &Site, name: &str) -> Vec<Vec<u8>> {
    let rt = rt();
    let c = s.client(&rt);
    rt.block_on(c.image().checksum(&ImageSpec::new("rbd", name), 4 << 20))
        .map(|r| r.hashes)
        .unwrap_or_default()
}

fn wait_same(src: &Site, dst: &Site, name: &str, timeout: Duration) {
    let want = sums(src, name);
    assert!(!want.is_empty(), "{name} on {} has no checksums", src.name);
    let ok = wait_until(timeout, || sums(dst, name) == want);
    assert!(
        ok,
        "{name} on {} did not become equal to {} within {timeout:?}: {}",
        dst.name,
        src.name,
        status(dst, name)
    );
}

/// Plain promote, retried while it is refused (at most `timeout`); the
/// refusals' texts.
fn promote_when_safe(s: &Site, name: &str, timeout: Duration) -> Vec<String> {
    let mut refusals = Vec::new();
    let t = Instant::now();
    loop {
        let o = s.tern(&["mirror", "image", "promote", &spec(name)]);
        if o.status.success() {
            return refusals;
        }
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            e.contains("cannot promote"),
            "promote on {} failed without saying why it is unsafe: {e}",
            s.name
        );
        refusals.push(e);
        assert!(
            t.elapsed() < timeout,
            "plain promote on {} refused for {timeout:?}: {refusals:?}\n{}",
            s.name,
            status(s, name)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn snap_if(s: &Site, name: &str, mode: &str) {
    if mode == "snapshot" {
        s.tern_ok(&["mirror", "image", "snapshot", &spec(name)]);
    }
}

/// Switch A → B, then at once B → A: A's promote must not succeed without
/// B's flushed write (before the fix it did, in both modes).
fn switch_back_at_once(mode: &str) {
    let p = Pair::new();
    let (a, b) = (&p.a, &p.b);
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    create(a, "vol", "64M", mode);
    nbd_write(a, "vol", 0, &random_bytes(1, (8 * MIB) as usize));
    snap_if(a, "vol", mode);
    wait_same(a, b, "vol", Duration::from_secs(60));
    let full = p.crossed();

    // A → B, orderly.
    a.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
    promote_when_safe(b, "vol", Duration::from_secs(60));

    // At once: 1 MiB on B, flushed; B hands back; A promotes.
    let last = random_bytes(2, MIB as usize);
    nbd_write(b, "vol", 16 * MIB, &last);
    b.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
    let first = a.tern(&["mirror", "image", "promote", &spec("vol")]);
    let refusals = if first.status.success() {
        Vec::new()
    } else {
        let e = String::from_utf8_lossy(&first.stderr).to_string();
        assert!(
            e.contains("site-b") && e.contains("--force"),
            "the refusal does not name the site to wait for and the way out: {e}"
        );
        let mut r = vec![e];
        r.extend(promote_when_safe(a, "vol", Duration::from_secs(60)));
        r
    };
    eprintln!(
        "[{mode}] promote on A refused {} time(s) first: {refusals:?}",
        refusals.len()
    );
    assert!(
        read(a, "vol", 16 * MIB, MIB) == last,
        "A was promoted without B's last flushed write"
    );
    // The new primary takes a write at once, and keeps taking them.
    try_write(a, "vol", 20 * MIB, &random_bytes(3, 4096)).expect("write on A after promote");
    // What each site says: A primary, B following; no split-brain.
    assert!(
        wait_until(Duration::from_secs(10), || is_primary(a, "vol")),
        "A's status does not say primary: {}",
        status(a, "vol")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !is_split_brain(a, "vol") && !is_split_brain(b, "vol"),
        "split-brain after an orderly switch back: A {} / B {}",
        status(a, "vol"),
        status(b, "vol")
    );
    try_write(a, "vol", 21 * MIB, &random_bytes(4, 4096)).expect("second write on A");
    snap_if(a, "vol", mode);
    wait_same(a, b, "vol", Duration::from_secs(60));
    let st = status(b, "vol");
    assert_eq!(st["state"], "up+replaying", "B after the switch back: {st}");
    let done = p.crossed();
    let moved = (done.0 - full.0) + (done.1 - full.1);
    eprintln!(
        "[{mode}] initial copy {} bytes; both switches together {moved} bytes (B←A {} / A←B {})",
        full.0 + full.1,
        done.0 - full.0,
        done.1 - full.1
    );
    assert!(
        moved < (full.0 + full.1) / 2,
        "two switches moved {moved} bytes: a full copy is {}",
        full.0 + full.1
    );
    assert_eq!(a.export_sha256(&spec("vol")), b.export_sha256(&spec("vol")));
}

#[test]
fn switch_back_at_once_journal_mode() {
    switch_back_at_once("journal");
}

#[test]
fn switch_back_at_once_snapshot_mode() {
    switch_back_at_once("snapshot");
}

/// A forced promote on B while B's ternd is between reading and writing
/// the image's record in a daemon step (`point`): once promote returns,
/// B is primary and takes writes, and stays so. Ends with A resynced from
/// B, byte for byte.
fn promote_during_step(mode: &str, point: &str) {
    let p = Pair::new();
    let (a, b) = (&p.a, &p.b);
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    create(a, "vol", "64M", mode);
    nbd_write(a, "vol", 0, &random_bytes(10, (4 * MIB) as usize));
    snap_if(a, "vol", mode);
    wait_same(a, b, "vol", Duration::from_secs(60));
    // Past the copy's own bookkeeping: replaying (journal) or idle (snapshot).
    assert!(
        wait_until(Duration::from_secs(30), || status(b, "vol")["state"]
            == "up+replaying"),
        "B is not replaying: {}",
        status(b, "vol")
    );

    b.arm(point);
    // Writes on A until B's daemon reaches the fault point (journal
    // replay records its position after a pause in the stream).
    let t = Instant::now();
    let mut i = 0;
    while !b.wait_held(point, Duration::from_secs(3)) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "B's daemon never reached {point}: {}",
            status(b, "vol")
        );
        try_write(a, "vol", 8 * MIB + i * 4096, &random_bytes(100 + i, 4096)).unwrap();
        snap_if(a, "vol", mode);
        i += 1;
    }
    let mut cmd = b.tern_cmd();
    cmd.args(["mirror", "image", "promote", "--force", "rbd/vol"]);
    let promote = std::thread::spawn(move || {
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    b.release(point);
    let (ok, err) = promote.join().unwrap();
    assert!(ok, "forced promote on B failed: {err}");
    try_write(b, "vol", 32 * MIB, &random_bytes(20, 4096))
        .expect("B refused a write right after promote returned");
    // The daemon's step goes on after the promotion: it must change nothing.
    std::thread::sleep(Duration::from_secs(3));
    try_write(b, "vol", 33 * MIB, &random_bytes(21, 4096))
        .expect("B refused a write after its daemon's step went on");
    let info = b.tern_json(&["info", &spec("vol")]);
    assert_eq!(info["mirroring"]["primary"], true, "B: {info}");
    // Both primary now: both sites say so.
    assert!(
        wait_until(Duration::from_secs(10), || is_split_brain(a, "vol")
            && is_split_brain(b, "vol")),
        "split-brain not reported on both: A {} / B {}",
        status(a, "vol"),
        status(b, "vol")
    );
    // A gives up its writes: demote, resync from B.
    let before = p.crossed();
    a.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
    a.tern_ok(&["mirror", "image", "resync", &spec("vol")]);
    snap_if(b, "vol", mode);
    wait_same(b, a, "vol", Duration::from_secs(60));
    let after = p.crossed();
    eprintln!(
        "[{mode}/{point}] resync of A: B←A {} bytes, A←B {} bytes",
        after.0 - before.0,
        after.1 - before.1
    );
    let resync = a.tern_json(&["info", &spec("vol")])["last_resync"].clone();
    assert!(
        after.1 - before.1 < 4 * MIB,
        "the resync copied {} bytes: a delta was expected ({resync})",
        after.1 - before.1
    );
    assert_eq!(a.export_sha256(&spec("vol")), b.export_sha256(&spec("vol")));
}

#[test]
fn promote_during_sync_begin_snapshot_mode() {
    promote_during_step("snapshot", "sync-begin");
}

#[test]
fn promote_during_journal_position_journal_mode() {
    promote_during_step("journal", "journal-position");
}

/// B's daemon held in the middle of a sync's data stream; a forced
/// promote on B rolls it back to its last complete copy, and the rest of
/// that stream must not land in the now primary image.
#[test]
fn promote_during_a_sync_stream_keeps_its_content() {
    let p = Pair::new();
    let (a, b) = (&p.a, &p.b);
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    create(a, "vol", "64M", "snapshot");
    let old = random_bytes(30, (16 * MIB) as usize);
    nbd_write(a, "vol", 0, &old);
    snap_if(a, "vol", "snapshot");
    wait_same(a, b, "vol", Duration::from_secs(60));
    let synced = b.export_sha256(&spec("vol"));

    b.arm("sync-chunk");
    nbd_write(a, "vol", 0, &random_bytes(31, (16 * MIB) as usize));
    snap_if(a, "vol", "snapshot");
    assert!(
        b.wait_held("sync-chunk", Duration::from_secs(30)),
        "B's daemon never held in its sync: {}",
        status(b, "vol")
    );
    b.tern_ok(&["mirror", "image", "promote", "--force", &spec("vol")]);
    let promoted = b.export_sha256(&spec("vol"));
    assert_eq!(
        promoted, synced,
        "forced promote did not go back to the last complete copy"
    );
    b.release("sync-chunk");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        b.export_sha256(&spec("vol")),
        synced,
        "the sync's data went on landing in B after its promotion"
    );
    try_write(b, "vol", 40 * MIB, &random_bytes(32, 4096)).expect("write on B");
    assert!(
        wait_until(Duration::from_secs(10), || is_split_brain(b, "vol")),
        "B does not report split-brain: {}",
        status(b, "vol")
    );
    // A gives up its writes; both end equal.
    a.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
    a.tern_ok(&["mirror", "image", "resync", &spec("vol")]);
    snap_if(b, "vol", "snapshot");
    wait_same(b, a, "vol", Duration::from_secs(60));
    let (ba, ab) = p.crossed();
    eprintln!("sync-stream test: B←A {ba} bytes, A←B {ab} bytes in all");
    assert_eq!(a.export_sha256(&spec("vol")), b.export_sha256(&spec("vol")));
}

/// 50 orderly flips with no pause: each round the primary writes and
/// flushes, demotes, and the other site promotes as soon as it is allowed;
/// then it must hold that write and take one at once.
fn flips(mode: &str) {
    const FLIPS: u64 = 50;
    const PIECE: u64 = 64 << 10;
    let p = Pair::new();
    let _ma = p.a.start_mirror();
    let _mb = p.b.start_mirror();
    create(&p.a, "vol", "32M", mode);
    nbd_write(&p.a, "vol", 0, &random_bytes(50, (8 * MIB) as usize));
    snap_if(&p.a, "vol", mode);
    wait_same(&p.a, &p.b, "vol", Duration::from_secs(60));
    let full = p.crossed();
    let full = full.0 + full.1;
    let t = Instant::now();
    let mut refused = 0;
    let sites = [&p.a, &p.b];
    for i in 0..FLIPS {
        let (from, to) = (sites[(i % 2) as usize], sites[((i + 1) % 2) as usize]);
        let off = 8 * MIB + (i * PIECE) % (16 * MIB);
        let data = random_bytes(1000 + i, PIECE as usize);
        nbd_write(from, "vol", off, &data);
        from.tern_ok(&["mirror", "image", "demote", &spec("vol")]);
        refused += promote_when_safe(to, "vol", Duration::from_secs(60)).len();
        assert!(
            read(to, "vol", off, PIECE) == data,
            "flip {i}: {} was promoted without {}'s last flushed write",
            to.name,
            from.name
        );
        try_write(to, "vol", off + PIECE / 2, &random_bytes(5000 + i, 4096))
            .unwrap_or_else(|e| panic!("flip {i}: {} refused a write after promote: {e}", to.name));
    }
    let last = sites[(FLIPS % 2) as usize];
    let other = sites[((FLIPS + 1) % 2) as usize];
    snap_if(last, "vol", mode);
    wait_same(last, other, "vol", Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(10), || is_primary(last, "vol")),
        "{}: {}",
        last.name,
        status(last, "vol")
    );
    assert!(!is_split_brain(other, "vol"), "{}", status(other, "vol"));
    let done = p.crossed();
    let moved = done.0 + done.1 - full;
    eprintln!(
        "[{mode}] {FLIPS} flips in {:?} ({refused} refusals while a demotion was on its way); \
         {moved} bytes crossed for them, a full copy {full} bytes",
        t.elapsed()
    );
    assert!(
        moved < FLIPS * full / 8,
        "{FLIPS} flips moved {moved} bytes; a full copy is {full}: not deltas"
    );
    assert_eq!(
        p.a.export_sha256(&spec("vol")),
        p.b.export_sha256(&spec("vol"))
    );
}

#[test]
fn fifty_flips_journal_mode() {
    flips("journal");
}

#[test]
fn fifty_flips_snapshot_mode() {
    flips("snapshot");
}
