//! What journaling costs, measured on the store directly in one run:
//! 4 KiB random writes from 32 threads and 64 KiB sequential writes from
//! one thread, on a plain image, a journaled image (strict: each write
//! durable when acknowledged, group-committed) and a journaled image in
//! `OnFlush` mode (durable at the next flush/FUA), all of the same store.
//! Prints rates and the ratios journaled / plain.
//!
//! The plain image's writes are not durable until a flush, the strict
//! journaled ones are: every measurement ends with a flush and its time
//! counts, so all three rates are rates of durable writes. `TERN_BENCH_SECS`
//! sets the time per measurement (default 2).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tern_store::{CreateOpts, Image, JournalDurability, JournalOptions, Store};
use tern_types::{Features, Layout};

const REGION: u64 = 64 << 20;

fn random_4k(img: &Arc<Image>, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..32u64)
        .map(|t| {
            let (img, stop, ops) = (img.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let data = vec![t as u8; 4096];
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % (REGION / 4096)) * 4096;
                    img.write(off, &data, false).unwrap();
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    // Until durable: the plain image's writes are not, before a flush.
    img.flush().unwrap();
    ops.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn seq_64k(img: &Image, secs: f64) -> f64 {
    let data = vec![0x5au8; 65536];
    let t0 = Instant::now();
    let mut off = 0;
    let mut bytes = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        img.write(off, &data, false).unwrap();
        off = (off + 65536) % REGION;
        bytes += 65536;
    }
    img.flush().unwrap();
    bytes as f64 / t0.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let secs: f64 = std::env::var("TERN_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let dir = tempfile::Builder::new()
        .prefix("tern-journal-bench")
        .tempdir_in(std::env::var("TMPDIR").unwrap_or("/var/tmp".into()))
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.pool_create("rbd").unwrap();
    let mk = |name: &str, features: u64| {
        store
            .image_create(
                "rbd",
                name,
                &CreateOpts {
                    size: 1 << 30,
                    layout: Layout::simple(4 << 20),
                    features: Features(features),
                },
            )
            .unwrap();
    };
    let lock = Features::EXCLUSIVE_LOCK;
    mk("plain", lock);
    mk("strict", lock | Features::JOURNALING);
    mk("onflush", lock | Features::JOURNALING);
    let plain = store.open_image("rbd", "plain").unwrap();
    let strict = store.open_image("rbd", "strict").unwrap();
    let onflush_id = store.image_info("rbd", "onflush").unwrap().id;
    store.set_image_journal_options(
        &onflush_id,
        Some(JournalOptions {
            durability: JournalDurability::OnFlush,
            ..JournalOptions::default()
        }),
    );
    let onflush = store.open_image("rbd", "onflush").unwrap();
    // Objects exist and hold data beforehand, so object creation and first
    // write intents are not what is measured.
    let fill = vec![1u8; 4 << 20];
    for img in [&plain, &strict, &onflush] {
        for o in 0..REGION / (4 << 20) {
            img.write(o * (4 << 20), &fill, false).unwrap();
        }
        img.flush().unwrap();
    }
    let imgs = [
        ("plain", &plain),
        ("journaled strict", &strict),
        ("journaled on-flush", &onflush),
    ];

    println!("4 KiB random writes, 32 threads ({secs} s each):");
    let mut r4 = Vec::new();
    for (name, img) in imgs {
        let before = img.journal().map(|j| (j.stats().syncs, j.last_tid()));
        let iops = random_4k(img, secs);
        img.flush().unwrap();
        let per_sync = img
            .journal()
            .zip(before)
            .map(|(j, (s0, t0))| (j.last_tid() - t0) as f64 / (j.stats().syncs - s0).max(1) as f64);
        match per_sync {
            Some(p) => println!("  {name:<20} {iops:>10.0} IOPS   ({p:.1} entries per fdatasync)"),
            None => println!("  {name:<20} {iops:>10.0} IOPS"),
        }
        r4.push(iops);
    }
    println!("64 KiB sequential writes, 1 thread ({secs} s each):");
    let mut r64 = Vec::new();
    for (name, img) in imgs {
        let mbps = seq_64k(img, secs);
        img.flush().unwrap();
        println!("  {name:<20} {mbps:>10.1} MB/s");
        r64.push(mbps);
    }
    // The plain image here only copies into the page cache, with no
    // network or protocol around it: these ratios show the committer's own
    // ceiling. The 0.8 target is through NBD (bench/journal-bench.sh).
    println!("ratios journaled / plain (the store alone; the 0.8 target is through NBD):");
    println!(
        "  4 KiB x32: strict {:.2}, on-flush {:.2}",
        r4[1] / r4[0],
        r4[2] / r4[0]
    );
    println!(
        "  64 KiB x1: strict {:.2}, on-flush {:.2}",
        r64[1] / r64[0],
        r64[2] / r64[0]
    );
}
