//! Journaling through the real path: `kill -9` of ternd at 50 random
//! moments under concurrent NBD writes with FUA and flushes, checked against
//! the writer's own log; kills during replay; a torn tail; the journal
//! commands; feature toggles on a live image.

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};
use tern_store::journal::{JournalEntry, JournalOp};
use tern_testkit::Site;
use tern_testkit::nbd::NbdClient;
use tern_testkit::slots::{
    IMAGE, Log, SLOTS, decode, inspect_clean, pattern, slot_off, verify, writer,
};

#[test]
fn kill9_under_nbd_writes_loses_no_acknowledged_write() {
    let cycles: u64 = std::env::var("TERN_JOURNAL_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut site = tern_testkit::journaled_site("jcrash", &format!("{}M", IMAGE >> 20));
    let seq = Arc::new(AtomicU64::new(1));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut base = vec![0u64; SLOTS as usize];
    let (mut acked, mut fua, mut flushes, mut torn_in_flight) = (0, 0, 0, 0);
    let (mut replay_kills, mut entries_max) = (0, 0u64);
    let started = Instant::now();
    for cycle in 0..cycles {
        let c = NbdClient::connect(&site.nbd_addr, "rbd/j").expect("nbd connect");
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (seq, stop) = (seq.clone(), stop.clone());
            std::thread::spawn(move || writer(c, seq, stop, cycle))
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(30..300)));
        site.kill9();
        let log = w.join().expect("writer");
        acked += log.writes_acked;
        fua += log.fua_acked;
        flushes += log.flushes_acked;
        torn_in_flight += log.in_flight_at_end;
        site.restart();
        if cycle % 5 == 4 {
            // Kill again while the open replays the journal: replay must be
            // idempotent.
            let _c = NbdClient::connect(&site.nbd_addr, "rbd/j");
            std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
            site.kill9();
            site.restart();
            replay_kills += 1;
        }
        base = verify(&site, &base, &log, &format!("cycle {cycle}"));
        let v = inspect_clean(&site, &format!("cycle {cycle}"));
        entries_max = entries_max.max(v["entries"].as_u64().unwrap_or(0));
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "crash test over its time budget"
        );
    }
    eprintln!(
        "{cycles} kills ({replay_kills} during replay): {acked} writes acknowledged ({fua} FUA), \
         {flushes} flushes, {torn_in_flight} requests in flight at the kills, \
         largest journal {entries_max} entries, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        acked > cycles * 20,
        "the workload barely ran: {acked} writes"
    );

    // A clean stop checkpoints everything: nothing left to replay.
    assert!(site.stop(), "clean stop failed:\n{}", site.log());
    site.restart();
    let info = site.tern_json(&["journal", "info", "rbd/j"]);
    assert_eq!(info["applied_tid"], info["last_tid"], "{info}");
    let none = Log::default();
    base = verify(&site, &base, &none, "after clean restart");

    // A torn tail: an append cut short by the crash. It must be detected
    // and dropped, never applied.
    let last = info["last_tid"].as_u64().unwrap();
    let id = info["image_id"].as_str().unwrap().to_string();
    let jdir = site.data.join("objects").join(&id).join("journal");
    let mut torn_cases = 0;
    for (case, cut) in [(0, true), (1, false)] {
        let victim = case as u64;
        let seg = {
            let mut segs: Vec<_> = std::fs::read_dir(&jdir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "jseg"))
                .collect();
            segs.sort();
            segs.pop().expect("a segment")
        };
        let live = site.tern_json(&["journal", "info", "rbd/j"]);
        let tid = live["last_tid"].as_u64().unwrap().max(last) + 1;
        site.kill9();
        let entry = JournalEntry {
            tid,
            timestamp_us: 1,
            op: JournalOp::Write {
                offset: slot_off(victim),
                data: pattern(victim, u64::MAX / 2),
            },
        }
        .encode();
        let mut bytes = entry.clone();
        if cut {
            bytes.truncate(entry.len() * 2 / 3);
        } else {
            // Whole length, one bit wrong in the data: the crc catches it.
            let n = bytes.len();
            bytes[n - 100] ^= 0x10;
        }
        let before = std::fs::metadata(&seg).unwrap().len();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
            f.write_all(&bytes).unwrap();
        }
        site.restart();
        let now = verify(&site, &base, &none, &format!("torn tail case {case}"));
        assert_eq!(
            now[victim as usize], base[victim as usize],
            "the torn entry was applied"
        );
        // Cut off, not skipped over: what follows (the flush of the NBD
        // close) starts where the torn entry did, and every entry checks.
        inspect_clean(&site, "after a torn tail");
        let after = std::fs::read(&seg).unwrap();
        assert!(
            after.len() < before as usize + bytes.len()
                || after[before as usize..before as usize + bytes.len()] != bytes[..],
            "the torn tail is still in the segment"
        );
        torn_cases += 1;
    }
    assert_eq!(torn_cases, 2);
}

#[test]
fn journal_commands_feature_toggle_and_readers() {
    let site = Site::start("jcmd");
    site.tern_ok(&["pool", "create", "rbd"]);
    site.tern_ok(&["create", "rbd/j", "--size", "8M"]);
    let (code, err) = site.tern_err(&["journal", "info", "rbd/j"]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("journaling"), "{err}");
    // Turned on live, with data already there: the journal starts after it.
    let mut c = NbdClient::connect(&site.nbd_addr, "rbd/j").unwrap();
    let h = c.send_write(0, &pattern(0, 1), true).unwrap();
    assert_eq!(c.replies.recv().unwrap().handle, h);
    c.disconnect();
    site.tern_ok(&["feature", "enable", "rbd/j", "journaling"]);
    let info = site.tern_json(&["info", "rbd/j"]);
    assert!(
        info["features"].to_string().contains("journaling"),
        "{info}"
    );
    let mut c = NbdClient::connect(&site.nbd_addr, "rbd/j").unwrap();
    let mut n = 0;
    for i in 0..20u64 {
        c.send_write(i * 4096, &pattern(i, 100 + i), i % 3 == 0)
            .unwrap();
        n += 1;
    }
    c.send_flush().unwrap();
    for _ in 0..=n {
        assert_eq!(c.replies.recv().unwrap().error, 0);
    }
    c.disconnect();
    site.tern_ok(&["snap", "create", "rbd/j@s1"]);
    site.tern_ok(&["resize", "rbd/j", "--size", "16M"]);

    // A reader from the start sees every entry once, in order.
    let out = site.tern_ok(&["--format", "json", "journal", "export", "rbd/j", "-"]);
    let entries: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tids: Vec<u64> = entries.iter().map(|e| e["tid"].as_u64().unwrap()).collect();
    assert_eq!(tids, (1..=tids.len() as u64).collect::<Vec<_>>());
    let ops: Vec<&str> = entries.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "write").count(), 20, "{ops:?}");
    assert!(ops.contains(&"flush") && ops.contains(&"snap_create") && ops.contains(&"resize"));
    let offsets: Vec<u64> = entries
        .iter()
        .filter(|e| e["op"] == "write")
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    let mut sorted = offsets.clone();
    sorted.sort();
    assert_eq!(sorted, (0..20).map(|i| i * 4096).collect::<Vec<_>>());
    // The raw export is the journal's own encoding, crc and all.
    let raw = site.root.path().join("j.export");
    site.tern_ok(&["journal", "export", "rbd/j", raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    let mut b = &bytes[..];
    let mut count = 0;
    while !b.is_empty() {
        let (e, used) = JournalEntry::decode(b).unwrap();
        assert_eq!(e.tid, count + 1);
        b = &b[used..];
        count += 1;
    }
    assert_eq!(count as usize, entries.len());

    let v = inspect_clean(&site, "live image");
    assert_eq!(v["entries"].as_u64().unwrap() as usize, entries.len());
    let text = site.tern_ok(&["journal", "inspect", "rbd/j"]);
    assert!(text.contains("No errors detected"), "{text}");

    // Per-image options, validated, applied live.
    site.tern_ok(&[
        "config",
        "image",
        "set",
        "rbd/j",
        "rbd_journal_max_size",
        "8M",
    ]);
    assert_eq!(
        site.tern_ok(&["config", "image", "get", "rbd/j", "rbd_journal_max_size"])
            .trim(),
        "8388608"
    );
    let info = site.tern_json(&["journal", "info", "rbd/j"]);
    assert_eq!(info["max_size"], 8 << 20, "{info}");
    let (code, err) = site.tern_err(&[
        "config",
        "image",
        "set",
        "rbd/j",
        "rbd_journal_durability",
        "sometimes",
    ]);
    assert_eq!(code, 22, "{err}");
    let (code, _) = site.tern_err(&[
        "config",
        "image",
        "set",
        "rbd/nope",
        "rbd_journal_max_size",
        "8M",
    ]);
    assert_eq!(code, 2);
    site.tern_ok(&["config", "image", "rm", "rbd/j", "rbd_journal_max_size"]);
    let info = site.tern_json(&["journal", "info", "rbd/j"]);
    assert_eq!(info["max_size"], 1u64 << 30, "{info}");

    // Turned off live: the data stays, the journal goes.
    site.tern_ok(&["feature", "disable", "rbd/j", "journaling"]);
    let (code, _) = site.tern_err(&["journal", "status", "rbd/j"]);
    assert_eq!(code, 22);
    let data = read_slots_at(&site, "rbd/j", 20);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(decode(i as u64, d), Some(100 + i as u64), "slot {i}");
    }
    // Journaling needs exclusive-lock, as in rbd.
    site.tern_ok(&[
        "create",
        "rbd/nolock",
        "--size",
        "1M",
        "--image-feature",
        "layering",
    ]);
    let (code, err) = site.tern_err(&["feature", "enable", "rbd/nolock", "journaling"]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("exclusive-lock"), "{err}");
}

fn read_slots_at(site: &Site, export: &str, n: u64) -> Vec<Vec<u8>> {
    let mut c = NbdClient::connect(&site.nbd_addr, export).expect("nbd connect");
    let out = (0..n).map(|i| c.read(i * 4096, 4096).unwrap()).collect();
    c.disconnect();
    out
}
