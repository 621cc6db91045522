//! Named crash points (`tern-store/src/testpoint.rs`, debug builds): ternd
//! aborts at a step of an operation, as a power cut of the process would;
//! after a restart the image and its snapshots are exactly as before the
//! operation or exactly as after it, and the next operation works.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Site, random_bytes};

const MIB: usize = 1 << 20;

/// An "rbd diff v1" stream and the image it makes from `base`.
struct Diff {
    bytes: Vec<u8>,
    after: Vec<u8>,
}

fn name_rec(out: &mut Vec<u8>, tag: u8, name: &str) {
    out.push(tag);
    out.extend((name.len() as u32).to_le_bytes());
    out.extend(name.as_bytes());
}

fn diff(base: &[u8], from: Option<&str>, to: &str, size: usize, seed: u64, n: usize) -> Diff {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut after = base.to_vec();
    after.resize(size, 0);
    let mut b = b"rbd diff v1\n".to_vec();
    if let Some(f) = from {
        name_rec(&mut b, b'f', f);
    }
    name_rec(&mut b, b't', to);
    b.push(b's');
    b.extend((size as u64).to_le_bytes());
    for i in 0..n {
        let len = rng.random_range(1..=16) * 4096;
        let off = rng.random_range(0..(size - len) / 4096) * 4096;
        let data = random_bytes(seed * 1000 + i as u64, len);
        after[off..off + len].copy_from_slice(&data);
        b.push(b'w');
        b.extend((off as u64).to_le_bytes());
        b.extend((len as u64).to_le_bytes());
        b.extend(&data);
    }
    b.push(b'e');
    Diff { bytes: b, after }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `tern import-diff - SPEC` fed `bytes`; whether it succeeded.
fn import_diff(s: &Site, spec: &str, bytes: &[u8]) -> bool {
    let mut child = s
        .tern_cmd()
        .args(["import-diff", "-", spec])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A crashed site may stop reading: a broken pipe is part of the test.
    let _ = child.stdin.take().unwrap().write_all(bytes);
    child.wait().unwrap().success()
}

fn snaps(s: &Site, spec: &str) -> Vec<String> {
    s.tern_json(&["snap", "ls", spec])
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect()
}

/// Arms `point`, runs `op` (which must fail: ternd is gone mid-way), and
/// restarts ternd.
fn crash_at(s: &mut Site, point: &str, op: impl FnOnce(&Site) -> bool) {
    s.arm_abort(point);
    assert!(!op(s), "{point}: the operation succeeded through a crash");
    assert!(
        s.wait_exited(Duration::from_secs(20)),
        "{point}: ternd did not reach its crash point"
    );
    s.restart();
}

#[test]
fn import_diff_is_exactly_before_or_after_a_crash_at_each_step() {
    let mut s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/dst", "--size", "4M", "--object-size", "64K"]);
    let d1 = diff(&vec![0; 4 * MIB], None, "s1", 4 * MIB, 1, 20);
    let d12 = diff(&d1.after, Some("s1"), "s2", 4 * MIB, 2, 60);
    let d23 = diff(&d12.after, Some("s2"), "s3", 5 * MIB, 3, 30);
    assert!(import_diff(&s, "rbd/dst", &d1.bytes));
    assert_eq!(s.export_sha256("rbd/dst"), sha(&d1.after));

    // Before the end snapshot the import is undone; from the end snapshot
    // on it is done, whatever is left of its bookkeeping.
    for (point, done) in [
        ("import-data", false),
        ("import-diff-end-snap", false),
        ("import-diff-drop-safety", true),
        ("import-diff-forget", true),
    ] {
        crash_at(&mut s, point, |s| import_diff(s, "rbd/dst", &d12.bytes));
        let (want, want_snaps) = if done {
            (&d12.after, vec!["s1", "s2"])
        } else {
            (&d1.after, vec!["s1"])
        };
        assert_eq!(s.export_sha256("rbd/dst"), sha(want), "{point}: head");
        assert_eq!(snaps(&s, "rbd/dst"), want_snaps, "{point}: snapshots");
        assert_eq!(s.export_sha256("rbd/dst@s1"), sha(&d1.after), "{point}");
        assert!(
            s.log().contains(if done {
                "finishing an import-diff"
            } else {
                "rolling back an import-diff"
            }),
            "{point}: {}",
            s.log()
        );
        // The next operation works: the same diff is imported (or refused
        // as imported), and the image is put back at s1 for the next point.
        assert_eq!(import_diff(&s, "rbd/dst", &d12.bytes), !done, "{point}");
        assert_eq!(s.export_sha256("rbd/dst@s2"), sha(&d12.after), "{point}");
        s.tern_ok(&["snap", "rollback", "rbd/dst@s1"]);
        s.tern_ok(&["snap", "rm", "rbd/dst@s2"]);
    }
    // The chain goes on from the right head.
    assert!(import_diff(&s, "rbd/dst", &d12.bytes));
    assert!(import_diff(&s, "rbd/dst", &d23.bytes));
    assert_eq!(s.export_sha256("rbd/dst"), sha(&d23.after));
    assert_eq!(snaps(&s, "rbd/dst"), ["s1", "s2", "s3"]);
    let j = s.tern_json(&["info", "rbd/dst"]);
    assert_eq!(j["size"], 5 * MIB);
}

#[test]
fn an_import_cut_by_a_crash_leaves_nothing() {
    let mut s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    let raw = s.root.path().join("in.raw");
    std::fs::write(&raw, random_bytes(7, 3 * MIB)).unwrap();
    crash_at(&mut s, "import-data", |s| {
        s.tern(&["import", raw.to_str().unwrap(), "rbd/new"])
            .status
            .success()
    });
    assert_eq!(s.tern_json(&["ls", "rbd"]), serde_json::json!([]));
    assert!(
        s.log()
            .contains("removing an import interrupted by a crash")
    );
    s.tern_ok(&["import", raw.to_str().unwrap(), "rbd/new"]);
    assert_eq!(s.export_sha256("rbd/new"), tern_testkit::sha256_file(&raw));
}

/// Issue 18 item 3: a journal replay cut by a crash part-way (the kill
/// lands during the open, with thousands of entries to go) runs again at
/// the next open and the image is exactly what was acknowledged.
#[test]
fn a_journal_replay_cut_by_a_crash_runs_again() {
    const IMAGE: usize = 64 * MIB;
    const WRITES: u64 = 3000;
    let mut s = tern_testkit::journaled_site("jreplay", "64M");
    // The apply stage stops at its first batch: every write after it is
    // acknowledged (in the journal) and not in the object files.
    s.arm("journal-apply");
    let mut model = vec![0u8; IMAGE];
    nbd_random_writes(&s, "rbd/j", &mut model, WRITES, 11);
    assert!(s.wait_held("journal-apply", Duration::from_secs(5)));
    let info = s.tern_json(&["journal", "info", "rbd/j"]);
    let backlog = info["last_tid"].as_u64().unwrap() - info["applied_tid"].as_u64().unwrap();
    assert!(
        backlog >= WRITES - 16,
        "only {backlog} entries unapplied: {info}"
    );
    s.kill9();
    s.restart();

    // The first open replays; the site dies at its 1,000th entry.
    s.arm_abort_at("journal-replay", 1000);
    let _ = NbdClient::connect(&s.nbd_addr, "rbd/j");
    assert!(
        s.wait_exited(Duration::from_secs(30)),
        "ternd did not crash in the replay"
    );
    assert!(
        s.log().contains("test fault point: aborting"),
        "{}",
        s.log()
    );
    s.restart();
    assert_eq!(s.export_sha256("rbd/j"), sha(&model));
    assert!(
        s.log()
            .contains("replayed the journal entries an unclean stop left unapplied"),
        "{}",
        s.log()
    );
    let info = s.tern_json(&["journal", "info", "rbd/j"]);
    assert_eq!(info["applied_tid"], info["last_tid"], "{info}");
    let v = s.tern_json(&["journal", "inspect", "rbd/j"]);
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    eprintln!("{backlog} unapplied entries; the replay was cut at its 1,000th and ran again whole");
}

/// The `n`th MiB of new data (seeded from `seed + n`) somewhere in the
/// image, flushed.
fn write_mib(s: &Site, spec: &str, n: u64, seed: u64) {
    let mut c = NbdClient::connect(&s.nbd_addr, spec).expect("nbd connect");
    c.send_write((n % 24) * MIB as u64, &random_bytes(seed + n, MIB), false)
        .unwrap();
    assert_eq!(c.replies.recv().unwrap().error, 0, "write on {}", s.name);
    c.send_flush().unwrap();
    assert_eq!(c.replies.recv().unwrap().error, 0, "flush on {}", s.name);
    c.disconnect();
}

fn mirror_info(s: &Site, spec: &str) -> serde_json::Value {
    s.tern_json(&["info", spec])["mirroring"].clone()
}

/// Demote and promote aborted at each step (journal mode, where the
/// demotion also writes a marker the peer stops at). The commit point of
/// each is its mirror snapshot: a crash before it leaves the role as it
/// was, from it on the step is finished at restart — never a primary
/// without its promotion snapshot and fork, nor a demotion the peer cannot
/// see. After each, the opposite switch works and the images end equal.
#[test]
fn promote_and_demote_are_exactly_done_or_not_after_a_crash() {
    let mut p = tern_testkit::Pair::new();
    let _ma = p.a.start_mirror();
    let _mb = p.b.start_mirror();
    let vol = "rbd/vol";
    tern_testkit::create_mirrored(&p.a, "vol", "32M", "journal");
    let mut n = 0u64;
    let mut write = |s: &Site| {
        n += 1;
        write_mib(s, vol, n, 1000);
    };
    write(&p.a);
    let same = |a: &Site, b: &Site| {
        tern_testkit::wait_until(Duration::from_secs(60), || {
            a.export_sha256(vol) == b.export_sha256(vol)
        })
    };
    assert!(
        tern_testkit::wait_until(Duration::from_secs(30), || p
            .b
            .tern(&["info", vol])
            .status
            .success()),
        "B never created its copy"
    );
    assert!(same(&p.a, &p.b), "initial copy");
    // A plain promote, retried while refused (B replays A's demotion);
    // true once ternd died at an armed point instead of answering.
    let promote = |s: &mut Site| -> bool {
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            let ok = s
                .tern(&["mirror", "image", "promote", vol])
                .status
                .success();
            if s.wait_exited(Duration::from_millis(200)) {
                assert!(!ok, "promote succeeded through a crash");
                return true;
            }
            if ok {
                return false;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("promote neither succeeded nor crashed within 60 s");
    };

    for point in ["demote-marker", "demote-commit"] {
        p.a.arm_abort(point);
        assert!(
            !p.a.tern(&["mirror", "image", "demote", vol])
                .status
                .success()
        );
        assert!(p.a.wait_exited(Duration::from_secs(20)), "{point}");
        p.a.restart();
        assert!(p.a.log().contains("finishing a demotion"), "{point}");
        let m = mirror_info(&p.a, vol);
        assert_eq!(m["primary"], false, "{point}: {m}");
        // The peer sees the demotion (in journal mode, its marker) and a
        // plain promote there goes through.
        assert!(!promote(&mut p.b), "{point}: B crashed");
        write(&p.b);
        assert!(same(&p.b, &p.a), "{point}: A did not follow B");
        p.b.tern_ok(&["mirror", "image", "demote", vol]);
        assert!(!promote(&mut p.a), "{point}: A crashed");
        write(&p.a);
        assert!(same(&p.a, &p.b), "{point}: B did not follow A");
    }

    for (point, done) in [("promote-snap", false), ("promote-commit", true)] {
        p.a.tern_ok(&["mirror", "image", "demote", vol]);
        let epoch = mirror_info(&p.b, vol)["promotion_epoch"].as_u64().unwrap();
        p.b.arm_abort(point);
        assert!(
            promote(&mut p.b),
            "{point}: B did not reach its crash point"
        );
        p.b.restart();
        let m = mirror_info(&p.b, vol);
        assert_eq!(m["primary"], done, "{point}: {m}");
        if done {
            assert!(p.b.log().contains("finishing a promotion"), "{point}");
            assert!(
                m["promotion_epoch"].as_u64().unwrap() > epoch,
                "{point}: {m}"
            );
            let snap = m["promoted_from"]["snap_id"].as_u64().unwrap();
            let snaps = p.b.tern_json(&["snap", "ls", vol, "--all"]);
            assert!(
                snaps
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["id"].as_u64() == Some(snap)),
                "{point}: the fork names snapshot {snap}, which B lacks: {snaps}"
            );
        } else {
            assert!(
                p.b.log()
                    .contains("a promotion a crash interrupted before its snapshot did not happen"),
                "{point}"
            );
            assert!(!promote(&mut p.b), "{point}: B crashed again");
        }
        write(&p.b);
        assert!(same(&p.b, &p.a), "{point}: A did not follow B");
        p.b.tern_ok(&["mirror", "image", "demote", vol]);
        assert!(!promote(&mut p.a), "{point}: A crashed");
        write(&p.a);
        assert!(same(&p.a, &p.b), "{point}: B did not follow A");
    }
}

/// A sync (snapshot mode) and a resync aborted at completion, before and
/// after the snapshot that marks the copy whole: after the restart the copy
/// is not left "syncing" over a complete snapshot (which refused a plain
/// promote for ever), a resync is recorded as done once, and the images end
/// equal.
#[test]
fn sync_and_resync_completion_are_settled_after_a_crash() {
    let mut p = tern_testkit::Pair::new();
    let _ma = p.a.start_mirror();
    let _mb = p.b.start_mirror();
    let vol = "rbd/vol";
    tern_testkit::create_mirrored(&p.a, "vol", "32M", "snapshot");
    let mut n = 0u64;
    let mut write_and_snap = |s: &Site| {
        n += 1;
        write_mib(s, vol, n, 2000);
        s.tern_ok(&["mirror", "image", "snapshot", vol]);
    };
    let same = |a: &Site, b: &Site| {
        tern_testkit::wait_until(Duration::from_secs(60), || {
            b.tern(&["info", vol]).status.success() && a.export_sha256(vol) == b.export_sha256(vol)
        })
    };
    let settled = |s: &Site| {
        tern_testkit::wait_until(Duration::from_secs(30), || {
            s.tern_json(&["mirror", "image", "status", vol])["description"]
                .as_str()
                .is_some_and(|d| d.starts_with("replaying"))
        })
    };
    write_and_snap(&p.a);
    assert!(same(&p.a, &p.b), "initial copy");

    for point in ["sync-complete-snap", "sync-complete"] {
        p.b.arm_abort(point);
        write_and_snap(&p.a);
        assert!(
            p.b.wait_exited(Duration::from_secs(30)),
            "{point}: B never got there"
        );
        p.b.restart();
        if point == "sync-complete" {
            assert!(p.b.log().contains("finishing a sync"), "{point}");
        }
        assert!(same(&p.a, &p.b), "{point}: B did not catch up");
        assert!(
            settled(&p.b),
            "{point}: {}",
            p.b.tern_json(&["mirror", "image", "status", vol])
        );
    }
    // The copy is whole and not syncing: a plain switch goes through.
    p.a.tern_ok(&["mirror", "image", "demote", vol]);
    assert!(
        tern_testkit::wait_until(Duration::from_secs(60), || p
            .b
            .tern(&["mirror", "image", "promote", vol])
            .status
            .success()),
        "B's plain promote refused: {}",
        p.b.tern_json(&["mirror", "image", "status", vol])
    );
    write_and_snap(&p.b);
    assert!(same(&p.b, &p.a), "A did not follow B");

    // A resync of A (now the copy) cut after its snapshot is recorded done.
    p.a.arm_abort("sync-complete");
    p.a.tern_ok(&["mirror", "image", "resync", vol]);
    assert!(
        p.a.wait_exited(Duration::from_secs(30)),
        "A's resync never completed"
    );
    p.a.restart();
    assert!(p.a.log().contains("finishing a sync"));
    let m = mirror_info(&p.a, vol);
    assert_eq!(m["resync_requested"], false, "{m}");
    assert!(
        m["last_resync"].as_str().is_some_and(|s| !s.is_empty()),
        "{m}"
    );
    assert!(same(&p.b, &p.a), "A's resync left it unequal");
    assert!(settled(&p.a));
    write_and_snap(&p.b);
    assert!(same(&p.b, &p.a), "A did not follow B after its resync");
}

/// 4 KiB random writes through NBD, pipelined, then a flush; `model`
/// follows them.
fn nbd_random_writes(s: &Site, spec: &str, model: &mut [u8], n: u64, seed: u64) {
    let mut c = NbdClient::connect(&s.nbd_addr, spec).expect("nbd connect");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Distinct blocks: two writes in flight to one block may land in
    // either order.
    let mut blocks: Vec<usize> = (0..model.len() / 4096).collect();
    let (picked, _) = blocks.partial_shuffle(&mut rng, n as usize);
    let picked = picked.to_vec();
    let mut inflight = 0;
    for (i, b) in picked.into_iter().enumerate() {
        let i = i as u64;
        let off = b * 4096;
        let data = random_bytes(seed * 100_000 + i, 4096);
        model[off..off + 4096].copy_from_slice(&data);
        c.send_write(off as u64, &data, false).unwrap();
        inflight += 1;
        while inflight >= 16 {
            assert_eq!(
                c.replies
                    .recv_timeout(Duration::from_secs(20))
                    .unwrap()
                    .error,
                0
            );
            inflight -= 1;
        }
    }
    c.send_flush().unwrap();
    while inflight >= 0 {
        assert_eq!(
            c.replies
                .recv_timeout(Duration::from_secs(20))
                .unwrap()
                .error,
            0
        );
        inflight -= 1;
    }
    c.disconnect();
}

/// A journal checkpoint (the one a stop takes) aborted after the object
/// files are synced and before the checkpoint is recorded, then after it is
/// recorded and before the journal is trimmed: the restart replays from
/// whichever checkpoint is on disk and the image is exactly what was
/// written; the journal is clean and a later clean stop leaves nothing to
/// replay.
#[test]
fn a_journal_checkpoint_cut_by_a_crash_loses_nothing() {
    let mut s = tern_testkit::journaled_site("jckpt", "64M");
    let mut model = vec![0u8; 64 * MIB];
    for (round, point) in ["journal-checkpoint-record", "journal-checkpoint-trim"]
        .into_iter()
        .enumerate()
    {
        nbd_random_writes(&s, "rbd/j", &mut model, 2000, 20 + round as u64);
        let aborts = s.log().matches("test fault point: aborting").count();
        s.arm_abort(point);
        assert!(!s.stop(), "{point}: the stop's checkpoint did not crash");
        assert_eq!(
            s.log().matches("test fault point: aborting").count(),
            aborts + 1,
            "{point}"
        );
        s.restart();
        assert_eq!(s.export_sha256("rbd/j"), sha(&model), "{point}");
        let info = s.tern_json(&["journal", "info", "rbd/j"]);
        assert_eq!(info["applied_tid"], info["last_tid"], "{point}: {info}");
        let v = s.tern_json(&["journal", "inspect", "rbd/j"]);
        assert_eq!(v["errors"], serde_json::json!([]), "{point}: {v}");
    }
    nbd_random_writes(&s, "rbd/j", &mut model, 500, 30);
    assert!(s.stop(), "clean stop:\n{}", s.log());
    s.restart();
    assert_eq!(s.export_sha256("rbd/j"), sha(&model));
}

/// The peer's journal replay aborted after a batch is applied and flushed
/// and before its position is saved: the restarted site is sent the batch
/// again, applies it again (idempotently) and the copy ends equal.
#[test]
fn a_peer_journal_replay_cut_before_its_position_is_saved_resumes() {
    let mut p = tern_testkit::Pair::new();
    let _ma = p.a.start_mirror();
    let _mb = p.b.start_mirror();
    let vol = "rbd/vol";
    tern_testkit::create_mirrored(&p.a, "vol", "32M", "journal");
    let mut model = vec![0u8; 32 * MIB];
    nbd_random_writes(&p.a, vol, &mut model, 200, 40);
    let same = |b: &Site, model: &[u8]| {
        tern_testkit::wait_until(Duration::from_secs(60), || {
            b.tern(&["info", vol]).status.success() && b.export_sha256(vol) == sha(model)
        })
    };
    assert!(same(&p.b, &model), "initial copy");
    p.b.arm_abort_at("journal-apply-persist", 2);
    for round in 0..8 {
        nbd_random_writes(&p.a, vol, &mut model, 300, 50 + round);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        p.b.wait_exited(Duration::from_secs(30)),
        "B never saved a replay position"
    );
    p.b.restart();
    nbd_random_writes(&p.a, vol, &mut model, 200, 60);
    assert!(same(&p.b, &model), "B did not catch up after the crash");
    assert_eq!(p.a.export_sha256(vol), sha(&model));
    assert!(tern_testkit::wait_until(Duration::from_secs(20), || {
        p.b.tern_json(&["mirror", "image", "status", vol])["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("replaying"))
    }));
}
