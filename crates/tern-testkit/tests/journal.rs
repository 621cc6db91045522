//! Journaling through the real path: `kill -9` of ternd at 50 random
//! moments under concurrent NBD writes with FUA and flushes, checked against
//! the writer's own log; kills during replay; a torn tail; the journal
//! commands; feature toggles on a live image.

use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tern_store::journal::{JournalEntry, JournalOp};
use tern_testkit::Site;
use tern_testkit::nbd::NbdClient;

const SLOT: u64 = 4096;
/// Slots spread over the image, one per 64 KiB, so writes touch every
/// object and segments roll.
const SLOTS: u64 = 512;
const STRIDE: u64 = 64 << 10;
const IMAGE: u64 = SLOTS * STRIDE;

fn slot_off(slot: u64) -> u64 {
    slot * STRIDE
}

/// A slot's content names the write that produced it: slot and sequence,
/// then a stream derived from both, so a torn or misplaced write is seen.
fn pattern(slot: u64, seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(SLOT as usize);
    b.extend_from_slice(&slot.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    let mut x = (slot << 40) ^ seq ^ 0x9E37_79B9_7F4A_7C15;
    while b.len() < SLOT as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

/// The sequence a slot holds (0: never written), or None if it holds
/// anything but one whole write.
fn decode(slot: u64, b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let s = u64::from_le_bytes(b[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
    (s == slot && pattern(slot, seq) == b).then_some(seq)
}

#[derive(Default)]
struct Log {
    /// Every sequence sent per slot (they may or may not have landed).
    sent: HashMap<u64, Vec<u64>>,
    /// Highest acknowledged sequence per slot.
    acked: HashMap<u64, u64>,
    /// Highest sequence per slot made durable: acknowledged with FUA, or
    /// acknowledged before a flush was sent that then completed.
    durable: HashMap<u64, u64>,
    writes_acked: u64,
    fua_acked: u64,
    flushes_acked: u64,
    in_flight_at_end: usize,
}

enum Op {
    Write { slot: u64, seq: u64, fua: bool },
    Flush { covers: Vec<(u64, u64)> },
}

/// Writes until the connection dies (the kill) or `stop`, keeping up to
/// 16 requests in flight, never two on one slot.
fn writer(mut c: NbdClient, seq: Arc<AtomicU64>, stop: Arc<AtomicBool>, seed: u64) -> Log {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut log = Log::default();
    let mut inflight: HashMap<u64, Op> = HashMap::new();
    let mut busy = std::collections::HashSet::new();
    let mut acked_unflushed: Vec<(u64, u64)> = Vec::new();
    let mut dead = false;
    while !dead {
        while !stop.load(Ordering::Relaxed) && inflight.len() < 16 {
            let sent = if rng.random_bool(0.08) {
                let covers = std::mem::take(&mut acked_unflushed);
                c.send_flush().map(|h| (h, Op::Flush { covers }))
            } else {
                let slot = loop {
                    let s = rng.random_range(0..SLOTS);
                    if !busy.contains(&s) {
                        break s;
                    }
                };
                let n = seq.fetch_add(1, Ordering::SeqCst);
                let fua = rng.random_bool(0.25);
                log.sent.entry(slot).or_default().push(n);
                busy.insert(slot);
                c.send_write(slot_off(slot), &pattern(slot, n), fua)
                    .map(|h| (h, Op::Write { slot, seq: n, fua }))
            };
            match sent {
                Ok((h, op)) => {
                    inflight.insert(h, op);
                }
                Err(_) => {
                    dead = true;
                    break;
                }
            }
        }
        if inflight.is_empty() {
            break;
        }
        match c.replies.recv_timeout(Duration::from_secs(20)) {
            Ok(r) => {
                let op = inflight
                    .remove(&r.handle)
                    .expect("reply to a request we sent");
                assert_eq!(r.error, 0, "request failed with NBD error {}", r.error);
                match op {
                    Op::Write { slot, seq, fua } => {
                        busy.remove(&slot);
                        log.writes_acked += 1;
                        let a = log.acked.entry(slot).or_default();
                        *a = (*a).max(seq);
                        if fua {
                            log.fua_acked += 1;
                            let d = log.durable.entry(slot).or_default();
                            *d = (*d).max(seq);
                        } else {
                            acked_unflushed.push((slot, seq));
                        }
                    }
                    Op::Flush { covers } => {
                        log.flushes_acked += 1;
                        for (slot, seq) in covers {
                            let d = log.durable.entry(slot).or_default();
                            *d = (*d).max(seq);
                        }
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => dead = true,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "no reply for 20 s with {} requests in flight",
                    inflight.len()
                )
            }
        }
    }
    log.in_flight_at_end = inflight.len();
    log
}

/// Reads every slot through NBD.
fn read_slots(site: &Site, export: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut c = NbdClient::connect(&site.nbd_addr, export)?;
    let mut out = Vec::with_capacity(SLOTS as usize);
    for s in 0..SLOTS {
        out.push(c.read(slot_off(s), SLOT as u32)?);
    }
    c.disconnect();
    Ok(out)
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(format!("{} {len}", p.display()));
        }
    }
    out
}

/// Checks every slot against the log and the state before it; returns the
/// new state.
fn verify(site: &Site, base: &[u64], log: &Log, what: &str) -> Vec<u64> {
    let data = read_slots(site, "rbd/j").unwrap_or_else(|e| {
        let listing: Vec<_> = walk(&site.data.join("objects"));
        panic!("{what}: {e}\nfiles: {listing:#?}")
    });
    let mut now = Vec::with_capacity(SLOTS as usize);
    for s in 0..SLOTS {
        let got = decode(s, &data[s as usize])
            .unwrap_or_else(|| panic!("{what}: slot {s} holds a torn or foreign write"));
        let must = base[s as usize]
            .max(log.acked.get(&s).copied().unwrap_or(0))
            .max(log.durable.get(&s).copied().unwrap_or(0));
        let known = got == base[s as usize] || log.sent.get(&s).is_some_and(|v| v.contains(&got));
        assert!(
            known,
            "{what}: slot {s} holds seq {got}, never written there"
        );
        assert!(
            got >= must,
            "{what}: slot {s} holds seq {got} but write {must} was acknowledged"
        );
        now.push(got);
    }
    now
}

fn inspect_clean(site: &Site, what: &str) -> serde_json::Value {
    let v = site.tern_json(&["journal", "inspect", "rbd/j"]);
    assert_eq!(
        v["errors"],
        serde_json::json!([]),
        "{what}: inspect found {v}"
    );
    v
}

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
