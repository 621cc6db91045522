//! What snapshots cost, measured on the store directly (no RPC in the way):
//! snapshot create on a 1 GiB vs a 1 TiB sparse image, the first 4 KiB write
//! to an object after a snapshot (write intent + copy-on-write) vs a plain
//! 4 KiB write, and `diff` on a 1 TiB sparse image with 100 changed extents.
//! Run with `bench/snap-costs.sh`; prints medians and ratios.

use std::time::{Duration, Instant};
use tern_store::{CreateOpts, SnapNamespace, Store};
use tern_types::{Features, Layout};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let dir = tempfile::Builder::new()
        .prefix("tern-snap-bench")
        .tempdir_in(std::env::var("TMPDIR").unwrap_or("/var/tmp".into()))
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.pool_create("rbd").unwrap();
    let opts = |size| CreateOpts {
        size,
        layout: Layout::simple(4 << 20),
        features: Features::DEFAULT,
    };
    store.image_create("rbd", "small", &opts(1 << 30)).unwrap();
    store.image_create("rbd", "huge", &opts(1 << 40)).unwrap();
    let data = vec![0x5au8; 4096];
    // The same amount of data (64 objects touched) in both, so only the size differs.
    for name in ["small", "huge"] {
        let img = store.open_image("rbd", name).unwrap();
        let size = img.size();
        for i in 0..64u64 {
            img.write(i * (size / 64), &data, false).unwrap();
        }
        img.flush().unwrap();
    }

    let mut create = Vec::new();
    for name in ["small", "huge"] {
        let img = store.open_image("rbd", name).unwrap();
        let mut t = Vec::new();
        for i in 0..21 {
            // A write between snapshots, so each create has work to flush.
            img.write(0, &data, false).unwrap();
            let s = Instant::now();
            store
                .snap_create("rbd", name, &format!("s{i}"), SnapNamespace::User)
                .unwrap();
            t.push(s.elapsed());
        }
        create.push(median(t));
    }
    println!(
        "snapshot create, 1 GiB image:          {:>9.0} us",
        us(create[0])
    );
    println!(
        "snapshot create, 1 TiB image:          {:>9.0} us   (ratio 1 TiB / 1 GiB: {:.2})",
        us(create[1]),
        create[1].as_secs_f64() / create[0].as_secs_f64()
    );

    // Plain writes: objects already written in this epoch.
    store.image_create("rbd", "w", &opts(8 << 30)).unwrap();
    let img = store.open_image("rbd", "w").unwrap();
    let objects = 256u64;
    let full = vec![0x11u8; 4 << 20];
    for o in 0..objects {
        img.write(o * (4 << 20), &full, false).unwrap();
    }
    img.flush().unwrap();
    let mut plain = Vec::new();
    for o in 0..objects {
        let s = Instant::now();
        img.write(o * (4 << 20) + 8192, &data, false).unwrap();
        plain.push(s.elapsed());
    }
    store
        .snap_create("rbd", "w", "before", SnapNamespace::User)
        .unwrap();
    let mut first = Vec::new();
    for o in 0..objects {
        let s = Instant::now();
        img.write(o * (4 << 20) + 16384, &data, false).unwrap();
        first.push(s.elapsed());
    }
    let mut second = Vec::new();
    for o in 0..objects {
        let s = Instant::now();
        img.write(o * (4 << 20) + 32768, &data, false).unwrap();
        second.push(s.elapsed());
    }
    let (p, f, s2) = (median(plain), median(first), median(second));
    println!("4 KiB write, plain:                    {:>9.1} us", us(p));
    println!(
        "4 KiB write, first after a snapshot:   {:>9.1} us   (ratio {:.1}: one intent fsync + copy of a 4 MiB object)",
        us(f),
        f.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "4 KiB write, second after a snapshot:  {:>9.1} us   (ratio {:.2})",
        us(s2),
        s2.as_secs_f64() / p.as_secs_f64()
    );

    // diff on a 1 TiB image with 100 changed extents.
    let huge = store.open_image("rbd", "huge").unwrap();
    store
        .snap_create("rbd", "huge", "base", SnapNamespace::User)
        .unwrap();
    let base = store.snap_get("rbd", "huge", "base").unwrap().id;
    for i in 0..100u64 {
        huge.write(i * ((1 << 40) / 100) + 12288, &data, false)
            .unwrap();
    }
    huge.flush().unwrap();
    let mut t = Vec::new();
    let mut n = 0;
    for _ in 0..11 {
        let s = Instant::now();
        let d = huge.diff(Some(base), None, 0, 1 << 40, false).unwrap();
        t.push(s.elapsed());
        n = d.len();
    }
    println!(
        "diff, 1 TiB image, 100 changed extents: {:>8.0} us   ({n} extents reported)",
        us(median(t))
    );
}
