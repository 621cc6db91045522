//! The crash tests' NBD workload: writes of self-describing 4 KiB
//! patterns to slots spread over an image, logged by the writer, and the
//! check of an image against that log after a crash (`kill -9` in
//! `tests/journal.rs`, a power cut in `tests/power_loss.rs`).

use crate::Site;
use crate::nbd::NbdClient;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub const SLOT: u64 = 4096;
/// Slots spread over the image, one per 64 KiB, so writes touch every
/// object and segments roll.
pub const SLOTS: u64 = 512;
pub const STRIDE: u64 = 64 << 10;
pub const IMAGE: u64 = SLOTS * STRIDE;

pub fn slot_off(slot: u64) -> u64 {
    slot * STRIDE
}

/// A slot's content names the write that produced it: slot and sequence,
/// then a stream derived from both, so a torn or misplaced write is seen.
pub fn pattern(slot: u64, seq: u64) -> Vec<u8> {
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
pub fn decode(slot: u64, b: &[u8]) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(0);
    }
    let s = u64::from_le_bytes(b[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
    (s == slot && pattern(slot, seq) == b).then_some(seq)
}

#[derive(Default)]
pub struct Log {
    /// Every sequence sent per slot (they may or may not have landed).
    pub sent: HashMap<u64, Vec<u64>>,
    /// Highest acknowledged sequence per slot.
    pub acked: HashMap<u64, u64>,
    /// Highest sequence per slot made durable: acknowledged with FUA, or
    /// acknowledged before a flush was sent that then completed.
    pub durable: HashMap<u64, u64>,
    pub writes_acked: u64,
    pub fua_acked: u64,
    pub flushes_acked: u64,
    pub in_flight_at_end: usize,
}

enum Op {
    Write { slot: u64, seq: u64, fua: bool },
    Flush { covers: Vec<(u64, u64)> },
}

/// Writes until the connection dies (the kill) or `stop`, keeping up to
/// 16 requests in flight, never two on one slot.
pub fn writer(mut c: NbdClient, seq: Arc<AtomicU64>, stop: Arc<AtomicBool>, seed: u64) -> Log {
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
pub fn read_slots(site: &Site, export: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut c = NbdClient::connect(&site.nbd_addr, export)?;
    let mut out = Vec::with_capacity(SLOTS as usize);
    for s in 0..SLOTS {
        out.push(c.read(slot_off(s), SLOT as u32)?);
    }
    c.disconnect();
    Ok(out)
}

pub fn walk(dir: &std::path::Path) -> Vec<String> {
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

/// Checks every slot of `rbd/j` against the log and the state before it
/// (every acknowledged write must be there); returns the new state.
pub fn verify(site: &Site, base: &[u64], log: &Log, what: &str) -> Vec<u64> {
    verify_image(site, "rbd/j", base, log, true, what)
}

/// Checks every slot of `export`: it holds one whole write (never torn,
/// never one not sent there), and nothing older than its value before
/// (`base`) or than the last write to it that had to be durable — every
/// acknowledged one if `acked_durable`, else those acknowledged with FUA or
/// before a completed flush. Returns the new state.
pub fn verify_image(
    site: &Site,
    export: &str,
    base: &[u64],
    log: &Log,
    acked_durable: bool,
    what: &str,
) -> Vec<u64> {
    let data = read_slots(site, export).unwrap_or_else(|e| {
        let listing: Vec<_> = walk(&site.data.join("objects"));
        panic!("{what}: {e}\nfiles: {listing:#?}")
    });
    let mut now = Vec::with_capacity(SLOTS as usize);
    for s in 0..SLOTS {
        let got = decode(s, &data[s as usize])
            .unwrap_or_else(|| panic!("{what}: slot {s} holds a torn or foreign write"));
        let acked = if acked_durable {
            log.acked.get(&s).copied().unwrap_or(0)
        } else {
            0
        };
        let must = base[s as usize]
            .max(acked)
            .max(log.durable.get(&s).copied().unwrap_or(0));
        let known = got == base[s as usize] || log.sent.get(&s).is_some_and(|v| v.contains(&got));
        assert!(
            known,
            "{what}: slot {s} holds seq {got}, never written there"
        );
        assert!(
            got >= must,
            "{what}: slot {s} holds seq {got} but write {must} was acknowledged{}",
            if acked_durable { "" } else { " and flushed" }
        );
        now.push(got);
    }
    now
}

pub fn inspect_clean(site: &Site, what: &str) -> serde_json::Value {
    let v = site.tern_json(&["journal", "inspect", "rbd/j"]);
    assert_eq!(
        v["errors"],
        serde_json::json!([]),
        "{what}: inspect found {v}"
    );
    v
}
