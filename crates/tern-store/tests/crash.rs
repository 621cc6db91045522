//! kill -9 in the middle of writes and metadata changes: every write
//! acknowledged by a flush, and every committed metadata change, survives.
//! (A killed process keeps the page cache, so this checks the store's own
//! recovery, notably redb's after an unclean close, not fsync ordering.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use tern_store::{CreateOpts, KvTable, Store};
use tern_types::{Features, Layout};

const SLOTS: u64 = 64;
const SLOT: u64 = 20_000;

fn pattern(i: u64) -> Vec<u8> {
    (0..SLOT)
        .map(|k| (k as u8).wrapping_add(i as u8) ^ (i >> 8) as u8)
        .collect()
}

/// The child half: runs only when the parent starts it.
#[test]
#[ignore = "child process of kill9_keeps_acknowledged_writes"]
fn crash_child() {
    let Ok(dir) = std::env::var("TERN_CRASH_DIR") else {
        return;
    };
    let s = Store::open(std::path::Path::new(&dir)).unwrap();
    if s.pool_get("p").is_err() {
        s.pool_create("p").unwrap();
        let o = CreateOpts {
            size: SLOTS * SLOT,
            layout: Layout::new(65536, Some(4096), Some(3)).unwrap(),
            features: Features::DEFAULT,
        };
        s.image_create("p", "i", &o).unwrap();
    }
    let img = s.open_image("p", "i").unwrap();
    for i in 0.. {
        img.write((i % SLOTS) * SLOT, &pattern(i), false).unwrap();
        if i % 4 == 3 {
            img.flush().unwrap();
            s.kv_put(KvTable::Config, "acked", &i.to_string()).unwrap();
            println!("acked {i}");
        }
    }
}

#[test]
fn kill9_keeps_acknowledged_writes() {
    let t = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TERN_CRASH_DIR", t.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut acked = None;
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("acked ") {
                acked = Some(n.parse::<u64>().unwrap());
                if acked.unwrap() >= 200 + round * 37 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = acked.expect("child acknowledged writes");

        let s = Store::open(t.path()).unwrap();
        let stored: u64 = s
            .kv_get(KvTable::Config, "acked")
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert!(stored >= acked, "metadata lost: {stored} < {acked}");
        let img = s.open_image("p", "i").unwrap();
        for slot in 0..SLOTS {
            // The slot holds the last acknowledged write to it, or a later one.
            let last = (0..=acked).rev().find(|i| i % SLOTS == slot);
            let mut b = vec![0u8; SLOT as usize];
            img.read(slot * SLOT, &mut b).unwrap();
            // Per 4 KiB stripe unit (what one positioned write covers): a
            // later, unacknowledged write may be torn at a kill, all the
            // more since a first write to an object in an epoch syncs its
            // write intent between stripe units.
            let ok = match last {
                None => true,
                Some(l) => {
                    let mut k = 0;
                    let mut ok = true;
                    while k < SLOT {
                        let img_off = slot * SLOT + k;
                        let n = (4096 - img_off % 4096).min(SLOT - k);
                        let r = k as usize..(k + n) as usize;
                        ok &= (l..l + 2000 * SLOTS)
                            .step_by(SLOTS as usize)
                            .any(|j| b[r.clone()] == pattern(j)[r.clone()]);
                        k += n;
                    }
                    ok
                }
            };
            assert!(ok, "round {round}: slot {slot} lost its acknowledged write");
        }
        // The next child restarts at i = 0, so leave a clean slate.
        drop(img);
        s.image_remove("p", "i").unwrap();
        s.pool_remove("p", false).unwrap();
    }
}

/// The child of `kill9_keeps_snapshots_and_diffs`: writes slots, flushes
/// every 4 writes and snapshots every 10, printing what it acknowledged
/// (and each snapshot's checksum) only after the call returned.
#[test]
#[ignore = "child process of kill9_keeps_snapshots_and_diffs"]
fn snap_crash_child() {
    let Ok(dir) = std::env::var("TERN_SNAP_CRASH_DIR") else {
        return;
    };
    let s = Store::open(std::path::Path::new(&dir)).unwrap();
    s.pool_create("p").unwrap();
    let o = CreateOpts {
        size: SLOTS * SLOT,
        layout: Layout::new(65536, Some(4096), Some(3)).unwrap(),
        features: Features::DEFAULT,
    };
    s.image_create("p", "i", &o).unwrap();
    let img = s.open_image("p", "i").unwrap();
    for i in 0u64.. {
        img.write((i % SLOTS) * SLOT, &pattern(i), false).unwrap();
        if i % 4 == 3 {
            img.flush().unwrap();
            println!("acked {i}");
        }
        if i % 10 == 9 {
            let name = format!("s{i}");
            let snap = s
                .snap_create("p", "i", &name, tern_store::SnapNamespace::User)
                .unwrap();
            let mut b = vec![0u8; (SLOTS * SLOT) as usize];
            img.read_at(Some(snap.id), 0, &mut b).unwrap();
            println!("snap {name} {} {i} {}", snap.id, crc32c::crc32c(&b));
        }
        if i % 37 == 36 {
            // Some discards too, so zero extents are part of the history.
            img.discard(((i * 7) % SLOTS) * SLOT, SLOT).unwrap();
            println!("discard {i}");
        }
    }
}

#[test]
fn kill9_keeps_snapshots_and_diffs() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for round in 0..4 {
        let t = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "snap_crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TERN_SNAP_CRASH_DIR", t.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // (name, id, after write i, crc)
        let mut snaps: Vec<(String, u64, u64, u32)> = Vec::new();
        let mut acked: Option<u64> = None;
        // Changes as (order key, slot): write i has key 2i, the discard
        // that follows write i (and the snapshot after it) has 2i+1.
        let mut changes: Vec<(u64, u64)> = Vec::new();
        let stop = rng.random_range(30..150u64);
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line.unwrap();
            let w: Vec<&str> = line.split(' ').collect();
            match w[0] {
                "acked" => acked = Some(w[1].parse().unwrap()),
                "discard" => {
                    let i: u64 = w[1].parse().unwrap();
                    // Discarding a slot never written changes nothing.
                    let slot = (i * 7) % SLOTS;
                    if slot <= i {
                        changes.push((2 * i + 1, slot));
                    }
                }
                "snap" => snaps.push((
                    w[1].to_string(),
                    w[2].parse().unwrap(),
                    w[3].parse().unwrap(),
                    w[4].parse().unwrap(),
                )),
                _ => {}
            }
            if acked.is_some_and(|a| a >= stop) {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL, somewhere in the workload
        child.wait().unwrap();
        let acked = acked.expect("child acknowledged writes");
        for i in 0..=acked {
            changes.push((2 * i, i % SLOTS));
        }

        let s = Store::open(t.path()).unwrap();
        let img = s.open_image("p", "i").unwrap();
        let size = SLOTS * SLOT;
        for (name, id, _, crc) in &snaps {
            let mut b = vec![0u8; size as usize];
            img.read_at(Some(*id), 0, &mut b).unwrap();
            assert_eq!(
                crc32c::crc32c(&b),
                *crc,
                "round {round}: snapshot {name} changed"
            );
        }
        let covers = |ext: &[tern_store::DiffExtent], off: u64, len: u64| {
            let mut pos = off;
            for e in ext {
                if e.offset <= pos && pos < e.offset + e.length {
                    pos = e.offset + e.length;
                }
            }
            pos >= off + len
        };
        // Consecutive logged points, the last one being the head (whose
        // flushed state is everything up to the last acknowledged flush):
        // every change in between is in the diff.
        let mut points: Vec<(Option<u64>, u64)> = snaps
            .iter()
            .map(|(_, id, after, _)| (Some(*id), 2 * after))
            .collect();
        points.push((None, 2 * acked));
        for w in points.windows(2) {
            let ((a, a_key), (b, b_key)) = (w[0], w[1]);
            let ext = img.diff(a, b, 0, size, false).unwrap();
            for &(key, slot) in &changes {
                if key > a_key && key <= b_key {
                    assert!(
                        covers(&ext, slot * SLOT, SLOT),
                        "round {round}: diff {a:?}..{b:?} misses change {key} (slot {slot}): {:?}",
                        ext.iter()
                            .filter(|e| e.offset + e.length > slot * SLOT
                                && e.offset < (slot + 1) * SLOT)
                            .collect::<Vec<_>>()
                    );
                }
            }
        }
        // Stronger: writes that were never flushed but reached the file
        // (the page cache survives a kill) are changes too. Whatever the
        // head shows that differs from the last snapshot is in the diff;
        // only the write intent (recovery) can know about those.
        if let Some((_, id, _, _)) = snaps.last() {
            let ext = img.diff(Some(*id), None, 0, size, false).unwrap();
            let (mut a, mut h) = (vec![0u8; size as usize], vec![0u8; size as usize]);
            img.read_at(Some(*id), 0, &mut a).unwrap();
            img.read(0, &mut h).unwrap();
            for k in 0..size as usize {
                if a[k] != h[k] {
                    assert!(
                        covers(&ext, k as u64, 1),
                        "round {round}: unflushed change at {k} missed by the diff"
                    );
                }
            }
        }
        // From nothing to the head: every byte holding data is reported.
        let ext = img.diff(None, None, 0, size, false).unwrap();
        let mut b = vec![0u8; size as usize];
        img.read(0, &mut b).unwrap();
        for (k, &x) in b.iter().enumerate() {
            if x != 0 {
                assert!(
                    covers(&ext, k as u64, 1),
                    "round {round}: data at {k} not reported"
                );
            }
        }
    }
}
