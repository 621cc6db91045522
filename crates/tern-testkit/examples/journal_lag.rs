//! Journal-mode replication lag, measured end to end: two real sites on
//! loopback (or through a proxy adding delay), a paced QD1 NBD writer on
//! the primary that marks a probe write every 50 ms, and a reader on the
//! secondary that polls for each probe and records how long after its
//! acknowledgement it became readable there. Prints p50/p99 lag at 25, 50
//! and 90 % of the primary's maximum journaled write rate, and the
//! primary's rate with the peer replaying and without.
//!
//! Run by `bench/journal-mirror-bench.sh` (release build).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Site, linked_sites, wait_until};

const SLOT: u64 = 4096;
const SLOTS: u64 = 1024;
const PROBE_SLOT: u64 = SLOTS; // one past the workload's slots

fn block(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat((SLOT / 8) as usize)
}

/// Writes at `rate` per second (0: as fast as it goes) for `secs`; every
/// 50 ms one write is a probe: (seq, when acknowledged) published.
fn write_for(a: &Site, rate: f64, secs: f64, probe: Option<Arc<Mutex<(u64, Instant)>>>) -> f64 {
    let mut c = NbdClient::connect(&a.nbd_addr, "rbd/lag").expect("nbd");
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut next_probe = t0;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while t0.elapsed().as_secs_f64() < secs {
        if rate > 0.0 {
            let due = t0 + Duration::from_secs_f64(n as f64 / rate);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        n += 1;
        let is_probe = probe.is_some() && Instant::now() >= next_probe;
        let (off, data) = if is_probe {
            next_probe += Duration::from_millis(50);
            (PROBE_SLOT * SLOT, block(n))
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x % SLOTS) * SLOT, block(n))
        };
        c.send_write(off, &data, false).unwrap();
        assert_eq!(c.replies.recv().unwrap().error, 0);
        if is_probe && let Some(p) = &probe {
            *p.lock().unwrap() = (n, Instant::now());
        }
    }
    c.disconnect();
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Waits (up to a minute) until the secondary reports no entries behind.
fn caught_up(b: &Site) {
    wait_until(Duration::from_secs(60), || {
        let o = b.tern(&["mirror", "image", "status", "rbd/lag", "--format", "json"]);
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
            return false;
        };
        let d = v["description"].as_str().unwrap_or("");
        d.strip_prefix("replaying, ")
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .is_some_and(|f| f["entries_behind_primary"] == 0)
    });
    // Statuses are a second old at most.
    std::thread::sleep(Duration::from_millis(1500));
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn run(label: &str, delay: Option<Duration>, secs: f64, out: &mut String) {
    let (a, b, link) = linked_sites();
    if let Some(d) = delay {
        link.set_delay(d / 2);
    }
    a.tern_ok(&[
        "create",
        "rbd/lag",
        "--size",
        "8M",
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    a.tern_ok(&["mirror", "image", "enable", "rbd/lag", "journal"]);
    let _ma = a.start_mirror();
    // The primary's rate without a peer replaying, then with.
    let alone = write_for(&a, 0.0, secs.min(5.0), None);
    let mut mb = b.start_mirror();
    let ok = wait_until(Duration::from_secs(60), || {
        b.tern(&["mirror", "image", "status", "rbd/lag", "--format", "json"])
            .stdout
            .windows(20)
            .any(|w| w == b"non_primary_position")
    });
    assert!(ok, "the secondary never started replaying");
    let with = write_for(&a, 0.0, secs.min(5.0), None);
    out.push_str(&format!(
        "{label}: primary max journaled write rate (QD1) {alone:.0}/s without a peer, {with:.0}/s with one replaying ({:.2})\n",
        with / alone
    ));
    out.push_str(&format!(
        "{label}:   load   rate/s    probes   lag p50 (s)   lag p99 (s)   max (s)\n"
    ));
    for share in [0.25, 0.5, 0.9] {
        // Each level starts with the secondary caught up.
        caught_up(&b);
        let probe = Arc::new(Mutex::new((0u64, Instant::now())));
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (b2, p, s) = (b.nbd_addr.clone(), probe.clone(), stop.clone());
            let bsite = SiteAddr(b2);
            std::thread::spawn(move || watch_addr(&bsite, p, s))
        };
        let rate = write_for(&a, with * share, secs, Some(probe));
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let mut lags = w.join().unwrap();
        let max = lags.iter().cloned().fold(0.0, f64::max);
        out.push_str(&format!(
            "{label}:   {:>3.0} %  {rate:>7.0}  {:>8}   {:>11.3}   {:>11.3}   {max:>7.3}\n",
            share * 100.0,
            lags.len(),
            pct(&mut lags, 0.5),
            pct(&mut lags, 0.99),
        ));
    }
    mb.stop();
}

struct SiteAddr(String);

/// Polls the secondary for each new probe; returns the lags seen.
fn watch_addr(b: &SiteAddr, probe: Arc<Mutex<(u64, Instant)>>, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut c = NbdClient::connect(&b.0, "rbd/lag").expect("nbd on the secondary");
    let mut lags = Vec::new();
    let mut seen = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (want, at) = *probe.lock().unwrap();
        if want == seen {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        loop {
            let d = c.read(PROBE_SLOT * SLOT, 8).unwrap();
            let got = u64::from_le_bytes(d[..8].try_into().unwrap());
            if got >= want {
                lags.push(at.elapsed().as_secs_f64());
                seen = want;
                break;
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    lags
}

fn main() {
    let secs: f64 = std::env::var("RT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10.0);
    let mut out = String::new();
    run("loopback", None, secs, &mut out);
    run("20 ms RTT", Some(Duration::from_millis(20)), secs, &mut out);
    print!("{out}");
}
