//! Journaling at the store level: a seeded model test (reads, the journal
//! as a reader sees it, trimming against a lagging client, replay on
//! reopen), feature toggles, torn tails, disconnection and blocking reads.
//!
//! `TERN_JOURNAL_SEEDS=N` runs N seeds (default 40); `TERN_JOURNAL_SEED=S`
//! runs only seed S.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use tern_store::journal::MAX_WRITE_ENTRY;
use tern_store::{CreateOpts, JournalDurability, JournalOp, JournalOptions, SnapNamespace, Store};
use tern_types::{ErrorKind, Features, Layout};

fn journaled() -> Features {
    Features(Features::EXCLUSIVE_LOCK | Features::JOURNALING | Features::LAYERING)
}

fn small_opts() -> JournalOptions {
    JournalOptions {
        segment_size: 64 << 10,
        max_size: 1 << 30,
        checkpoint_bytes: 96 << 10,
        durability: JournalDurability::Strict,
        commit_age_us: 0,
    }
}

/// Opens a store that a test just dropped to stand for a crash. A dropped
/// store's background work (a lazy checkpoint) may still hold its lock for
/// a moment, as a dying process would until the kernel reaps it.
fn reopen(dir: &std::path::Path) -> Store {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match Store::open(dir) {
            Err(tern_store::StoreError::InUse { .. }) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.unwrap(),
        }
    }
}

fn create(s: &Store, name: &str, size: u64, layout: Layout, features: Features) {
    s.image_create(
        "p",
        name,
        &CreateOpts {
            size,
            layout,
            features,
        },
    )
    .unwrap();
}

/// The journal as client `peer` reads it, checked against what was done.
struct Reader {
    pos: u64,
}

impl Reader {
    fn catch_up(
        &mut self,
        s: &Store,
        img: &str,
        expected: &[JournalOp],
        rng: &mut ChaCha8Rng,
        ctx: &str,
    ) {
        let j = s.journal("p", img).unwrap();
        loop {
            let max = rng.random_range(1..200_000u64);
            let got = j
                .read_from(self.pos + 1, max)
                .unwrap_or_else(|e| panic!("{ctx}: reading from {}: {e}", self.pos + 1));
            if got.is_empty() {
                break;
            }
            for e in got {
                assert_eq!(e.tid, self.pos + 1, "{ctx}: entries in order, once");
                let want = &expected[(e.tid - 1) as usize];
                assert_eq!(&e.op, want, "{ctx}: entry {}", e.tid);
                self.pos = e.tid;
            }
        }
        assert_eq!(
            self.pos,
            expected.len() as u64,
            "{ctx}: reader saw every entry"
        );
    }
}

fn run_seed(s: &Store, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let layouts = [
        Layout::simple(16384),
        Layout::simple(65536),
        Layout::new(16384, Some(4096), Some(3)).unwrap(),
    ];
    let l = layouts[(seed % 3) as usize];
    let name = format!("j{seed}");
    let mut size = rng.random_range(4096..=l.object_size * 6);
    create(s, &name, size, l, journaled());
    let j = s.journal("p", &name).unwrap();
    j.register_client("peer").unwrap();
    let mut model = vec![0u8; size as usize];
    let mut expected: Vec<JournalOp> = Vec::new();
    let mut reader = Reader { pos: 0 };
    let mut committed = 0u64;
    let mut snaps: Vec<(String, u64, Vec<u8>)> = Vec::new();
    let mut img = s.open_image("p", &name).unwrap();
    for step in 0..80 {
        let ctx = format!("seed {seed} step {step} size {size}");
        let off = rng.random_range(0..size);
        let len = rng.random_range(0..=(size - off).min(l.object_size * 2));
        match rng.random_range(0..100) {
            0..35 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                img.write(off, &data, rng.random_bool(0.1)).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                for (i, c) in data.chunks(MAX_WRITE_ENTRY).enumerate() {
                    expected.push(JournalOp::Write {
                        offset: off + (i * MAX_WRITE_ENTRY) as u64,
                        data: c.to_vec(),
                    });
                }
            }
            35..45 => {
                img.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                if len > 0 {
                    expected.push(JournalOp::Discard { offset: off, len });
                }
            }
            45..52 => {
                img.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                if len > 0 {
                    expected.push(JournalOp::WriteZeroes { offset: off, len });
                }
            }
            52..60 => {
                img.flush().unwrap();
                expected.push(JournalOp::Flush);
            }
            60..66 => {
                let new = rng.random_range(4096..=l.object_size * 6);
                s.image_resize("p", &name, new, true).unwrap();
                model.resize(new as usize, 0);
                size = new;
                expected.push(JournalOp::Resize { size: new });
            }
            66..71 => {
                let sn = format!("s{step}");
                let info = s.snap_create("p", &name, &sn, SnapNamespace::User).unwrap();
                expected.push(JournalOp::SnapCreate {
                    id: info.id,
                    name: sn.clone(),
                    namespace: SnapNamespace::User,
                });
                snaps.push((sn, info.id, model.clone()));
            }
            71..74 if !snaps.is_empty() => {
                let i = rng.random_range(0..snaps.len());
                let (sn, id, _) = snaps.remove(i);
                s.snap_remove("p", &name, &sn, false).unwrap();
                expected.push(JournalOp::SnapRemove { id });
            }
            74..77 if !snaps.is_empty() => {
                let i = rng.random_range(0..snaps.len());
                let (sn, id, content) = snaps[i].clone();
                s.snap_rollback("p", &name, &sn).unwrap();
                expected.push(JournalOp::SnapRollback { id });
                model = content;
                size = model.len() as u64;
            }
            77..85 => {
                let mut b = vec![0u8; len as usize];
                img.read(off, &mut b).unwrap();
                assert!(
                    b == model[off as usize..(off + len) as usize],
                    "{ctx}: read"
                );
            }
            85..93 => {
                reader.catch_up(s, &name, &expected, &mut rng, &ctx);
                // Commit somewhere between the last commit and what was read.
                committed = rng.random_range(committed..=reader.pos);
                j.commit("peer", committed).unwrap();
            }
            _ => {
                // Trimming never took what the client has not committed.
                let next = j.read_from(committed + 1, 1).unwrap();
                assert!(
                    next.is_empty() == (committed == expected.len() as u64),
                    "{ctx}: entry after the committed position is there"
                );
                let info = j.info();
                assert!(info.first_tid <= committed + 1, "{ctx}: {info:?}");
                assert!(info.clients.iter().all(|c| !c.disconnected));
            }
        }
        assert_eq!(
            j.last_tid(),
            expected.len() as u64,
            "{ctx}: one entry per op"
        );
    }
    let ctx = format!("seed {seed} final");
    let mut b = vec![0u8; size as usize];
    img.read(0, &mut b).unwrap();
    assert!(b == model, "{ctx}: content");
    for (sn, id, content) in &snaps {
        let mut b = vec![0u8; content.len()];
        img.read_at(Some(*id), 0, &mut b).unwrap();
        assert!(&b == content, "{ctx}: snapshot {sn}");
    }
    reader.catch_up(s, &name, &expected, &mut rng, &ctx);
    let r = j.inspect().unwrap();
    assert!(r.errors.is_empty(), "{ctx}: {r:?}");
    assert_eq!(r.last_tid, Some(expected.len() as u64));
    // Trimming happened (small segments), but not past the client.
    let info = j.info();
    assert!(info.first_tid <= committed + 1);
    drop(img);
    img = s.open_image("p", &name).unwrap();
    let mut b = vec![0u8; size as usize];
    img.read(0, &mut b).unwrap();
    assert!(b == model, "{ctx}: content through a new handle");
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("TERN_JOURNAL_SEED") {
        return vec![s.parse().unwrap()];
    }
    let n = std::env::var("TERN_JOURNAL_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    (0..n).collect()
}

#[test]
fn model_with_journal_reader_and_trimming() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.set_journal_options(small_opts());
    s.pool_create("p").unwrap();
    let seeds = seeds();
    for &seed in &seeds {
        run_seed(&s, seed);
    }
    // Reopening the store (unclean: no close) replays whatever the last
    // checkpoint did not cover, and reads stay equal.
    let before: Vec<Vec<u8>> = seeds
        .iter()
        .map(|seed| {
            let img = s.open_image("p", &format!("j{seed}")).unwrap();
            let mut b = vec![0u8; img.size() as usize];
            img.read(0, &mut b).unwrap();
            b
        })
        .collect();
    drop(s);
    for _ in 0..2 {
        let s = reopen(t.path());
        for (seed, want) in seeds.iter().zip(&before) {
            let img = s.open_image("p", &format!("j{seed}")).unwrap();
            let mut b = vec![0u8; img.size() as usize];
            img.read(0, &mut b).unwrap();
            assert!(&b == want, "seed {seed}: content after reopen");
            let j = img.journal().unwrap();
            assert_eq!(j.applied_tid(), j.last_tid(), "replayed and checkpointed");
        }
    }
}

#[test]
fn feature_toggles() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.pool_create("p").unwrap();
    create(
        &s,
        "i",
        1 << 20,
        Layout::simple(65536),
        Features(Features::LAYERING),
    );
    let img = s.open_image("p", "i").unwrap();
    img.write(0, &[1u8; 8192], false).unwrap();
    // Journaling needs exclusive-lock.
    let e = s
        .image_set_features("p", "i", Features::JOURNALING, 0)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("exclusive-lock"), "{e}");
    let e = s
        .image_set_features("p", "i", Features::STRIPING, 0)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let info = s
        .image_set_features("p", "i", Features::EXCLUSIVE_LOCK | Features::JOURNALING, 0)
        .unwrap();
    assert!(info.features.has(Features::JOURNALING));
    assert!(img.info().features.has(Features::JOURNALING));
    let j = img.journal().expect("live handle journals now");
    // The journal starts after the current state.
    assert_eq!((j.last_tid(), j.applied_tid()), (0, 0));
    img.write(8192, &[2u8; 4096], false).unwrap();
    assert_eq!(j.last_tid(), 1);
    let e = s
        .image_set_features("p", "i", 0, Features::EXCLUSIVE_LOCK)
        .unwrap_err();
    assert!(e.to_string().contains("disable journaling first"), "{e}");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let jdir = img.data_dir().join("journal");
    assert!(jdir.exists());
    let info = s
        .image_set_features("p", "i", 0, Features::JOURNALING)
        .unwrap();
    assert!(!info.features.has(Features::JOURNALING));
    assert!(img.journal().is_none());
    assert!(!jdir.exists());
    let e = s.journal("p", "i").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let mut b = vec![0u8; 12288];
    img.read(0, &mut b).unwrap();
    assert!(b[..8192].iter().all(|&x| x == 1) && b[8192..].iter().all(|&x| x == 2));
    // Re-enabling starts a new journal at tid 1; and the feature survives
    // a reopen (the journal is found, nothing to replay).
    s.image_set_features("p", "i", Features::JOURNALING, 0)
        .unwrap();
    img.write(0, &[3u8; 4096], true).unwrap();
    assert_eq!(img.journal().unwrap().last_tid(), 1);
    drop(img);
    drop(s);
    let s = reopen(t.path());
    let img = s.open_image("p", "i").unwrap();
    let mut b = vec![0u8; 4096];
    img.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 3));
    assert_eq!(img.journal().unwrap().last_tid(), 1);
    // A stale journal on an image without the feature (a crash in the
    // middle of disabling) is removed at open.
    s.image_set_features("p", "i", 0, Features::JOURNALING)
        .unwrap();
    drop(img);
    drop(s);
    std::fs::create_dir_all(&jdir).unwrap();
    let s = reopen(t.path());
    let _img = s.open_image("p", "i").unwrap();
    assert!(!jdir.exists());
}

/// A torn or garbled tail of the last segment is dropped, never applied,
/// and the journal continues correctly after it.
#[test]
fn recycled_segments_keep_entries_apart_across_crashes() {
    // Trimmed segments are reused in place: their old entries stay behind
    // the new ones until overwritten. Crashes (dropping the store without
    // closing it) at every stage must never let an old entry pass for a new
    // one, and data and entries stay exact.
    let t = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; 1 << 20];
    let mut last = 0u64;
    let mut reused = 0;
    for round in 0..12u64 {
        let s = reopen(t.path());
        s.set_journal_options(small_opts());
        if round == 0 {
            s.pool_create("p").unwrap();
            create(&s, "i", 1 << 20, Layout::simple(65536), journaled());
        }
        let img = s.open_image("p", "i").unwrap();
        let j = img.journal().unwrap();
        assert_eq!(j.last_tid(), last, "round {round}: entries after reopen");
        let mut b = vec![0u8; 1 << 20];
        img.read(0, &mut b).unwrap();
        assert!(b == model, "round {round}: data after reopen");
        let r = j.inspect().unwrap();
        assert!(r.errors.is_empty(), "round {round}: {r:?}");
        let spares = std::fs::read_dir(j.dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .to_string_lossy()
                    .ends_with(".jspare")
            })
            .count();
        reused += spares;
        // Sizes differ from round to round, so entries of old lives end at
        // other offsets than new ones.
        let n = 20 + round * 7;
        for k in 0..n {
            let len = 512 * (1 + ((k + round) % 9) as usize);
            let off = ((k * 7919 + round * 104_729) % ((1 << 20) - len as u64)) & !511;
            let v = (round * 31 + k) as u8 | 1;
            img.write(off, &vec![v; len], false).unwrap();
            model[off as usize..off as usize + len].fill(v);
            last += 1;
        }
        if round % 3 == 1 {
            img.flush().unwrap();
            last += 1;
        }
        drop((j, img));
        drop(s);
    }
    assert!(reused > 0, "no segment was ever recycled");
}

#[test]
fn segment_created_without_its_header_is_dropped() {
    // A crash between creating the next segment file and writing its
    // header leaves an empty newest segment: the one before it is current
    // again, and appends continue there.
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.pool_create("p").unwrap();
    create(&s, "i", 1 << 20, Layout::simple(65536), journaled());
    let img = s.open_image("p", "i").unwrap();
    for k in 0..5u8 {
        img.write(u64::from(k) * 4096, &[k + 1; 4096], false)
            .unwrap();
    }
    let dir = img.journal().unwrap().dir().to_path_buf();
    drop(img);
    drop(s);
    std::fs::File::create(dir.join("0000000000000001.jseg")).unwrap();
    let s = reopen(t.path());
    let img = s.open_image("p", "i").unwrap();
    let j = img.journal().unwrap();
    assert_eq!(j.last_tid(), 5);
    assert!(!dir.join("0000000000000001.jseg").exists());
    img.write(0, &[9; 4096], false).unwrap();
    assert_eq!(j.last_tid(), 6);
    let r = j.inspect().unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    let mut b = vec![0u8; 4096 * 5];
    img.read(0, &mut b).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 9));
    assert!(b[4096 * 4..].iter().all(|&x| x == 5));
}

#[test]
fn torn_tail_is_dropped() {
    for garble in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let s = reopen(t.path());
        s.pool_create("p").unwrap();
        create(&s, "i", 1 << 20, Layout::simple(65536), journaled());
        let img = s.open_image("p", "i").unwrap();
        for k in 0..10u8 {
            img.write(u64::from(k) * 4096, &[k + 1; 4096], false)
                .unwrap();
        }
        let j = img.journal().unwrap();
        assert_eq!(j.last_tid(), 10);
        let seg = j.dir().join("0000000000000000.jseg");
        drop((j, img));
        // Dropping the store without `close` does not checkpoint: to the
        // journal this is a crash.
        drop(s);
        let len = std::fs::metadata(&seg).unwrap().len();
        let entry = 32 + 8 + 4096;
        // Cut (or damage) the last entry, and then overwrite what entry 10
        // wrote so we can tell whether it was replayed.
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        if garble {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0xEE; 16], len - 100).unwrap();
        } else {
            f.set_len(len - entry as u64 / 2).unwrap();
        }
        let obj = t.path().join("objects");
        drop(f);
        // Entry 10 wrote [36864, 40960) with 10s; make the object show 0s
        // there, as if the apply never reached the file.
        let img_dir = std::fs::read_dir(&obj)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        {
            use std::os::unix::fs::FileExt;
            let of = std::fs::OpenOptions::new()
                .write(true)
                .open(img_dir.join("0000000000000000"))
                .unwrap();
            of.write_all_at(&[0u8; 4096], 4096 + 9 * 4096).unwrap();
        }
        let s = reopen(t.path());
        let img = s.open_image("p", "i").unwrap();
        let j = img.journal().unwrap();
        assert_eq!(j.last_tid(), 9, "garble={garble}: torn entry dropped");
        let mut b = vec![0u8; 40960];
        img.read(0, &mut b).unwrap();
        for k in 0..9usize {
            assert!(
                b[k * 4096..(k + 1) * 4096]
                    .iter()
                    .all(|&x| x == k as u8 + 1)
            );
        }
        assert!(b[36864..].iter().all(|&x| x == 0), "torn entry not applied");
        assert!(j.inspect().unwrap().errors.is_empty());
        // The journal continues after it: tid 10 again, readable.
        img.write(36864, &[42; 4096], false).unwrap();
        assert_eq!(j.last_tid(), 10);
        let e = j.read_from(10, 1 << 20).unwrap();
        assert_eq!(e.len(), 1);
        assert!(matches!(&e[0].op, JournalOp::Write { offset: 36864, data } if data[0] == 42));
        let r = j.inspect().unwrap();
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!((r.entries, r.last_tid), (10, Some(10)));
    }
}

#[test]
fn damage_is_reported_by_inspect_and_refused_at_open() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.set_journal_options(JournalOptions {
        segment_size: 16 << 10,
        checkpoint_bytes: 1 << 30,
        ..small_opts()
    });
    s.pool_create("p").unwrap();
    create(&s, "i", 1 << 20, Layout::simple(65536), journaled());
    let img = s.open_image("p", "i").unwrap();
    for k in 0..20u64 {
        img.write(k * 4096, &[7; 4096], false).unwrap();
    }
    let j = img.journal().unwrap();
    assert!(j.info().segments.len() > 2);
    let first = j.dir().join("0000000000000000.jseg");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap();
        f.write_all_at(&[0x55], 96 + 32 + 100).unwrap();
    }
    let r = j.inspect().unwrap();
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert!(r.errors[0].contains("checksum"), "{r:?}");
    drop((j, img));
    drop(s);
    let s = reopen(t.path());
    let e = s.open_image("p", "i").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn lagging_client_is_disconnected_past_max_size() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.set_journal_options(JournalOptions {
        segment_size: 32 << 10,
        max_size: 256 << 10,
        checkpoint_bytes: 64 << 10,
        durability: JournalDurability::OnFlush,
        commit_age_us: 0,
    });
    s.pool_create("p").unwrap();
    create(&s, "i", 4 << 20, Layout::simple(65536), journaled());
    let img = s.open_image("p", "i").unwrap();
    let j = img.journal().unwrap();
    j.register_client("slow").unwrap();
    j.register_client("fast").unwrap();
    assert_eq!(
        j.register_client("local").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    for k in 0..200u64 {
        img.write((k % 64) * 4096, &[k as u8; 4096], false).unwrap();
        if k % 10 == 9 {
            img.flush().unwrap();
            let d = j.durable_tid();
            j.commit("fast", d).unwrap();
        }
    }
    img.flush().unwrap();
    let info = j.info();
    let slow = info.clients.iter().find(|c| c.id == "slow").unwrap();
    let fast = info.clients.iter().find(|c| c.id == "fast").unwrap();
    assert!(slow.disconnected, "{info:?}");
    assert!(!fast.disconnected, "{info:?}");
    assert!(slow.entries_behind > 0);
    assert!(info.bytes <= (256 << 10) + (64 << 10), "{info:?}");
    let e = j.read_from(1, 1 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
    let e = j.commit("slow", 5).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Fenced, "{e}");
    assert_eq!(
        j.commit("nobody", 1).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let e = j.commit("fast", j.durable_tid() + 5).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // Re-registering (after a resync) reconnects at the current end.
    let c = j.register_client("slow").unwrap();
    assert!(!c.disconnected);
    assert_eq!(c.commit_tid, j.durable_tid());
    j.unregister_client("slow").unwrap();
    assert_eq!(
        j.unregister_client("slow").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // The positions are persisted.
    drop((j, img));
    drop(s);
    let s = reopen(t.path());
    let info = s.journal("p", "i").unwrap().info();
    let ids: Vec<&str> = info.clients.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["local", "fast"]);
}

#[test]
fn wait_for_wakes_on_new_entries_and_markers_order() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.pool_create("p").unwrap();
    create(&s, "i", 1 << 20, Layout::simple(65536), journaled());
    let img = s.open_image("p", "i").unwrap();
    let j = img.journal().unwrap();
    let start = std::time::Instant::now();
    assert_eq!(j.wait_for(0, Duration::from_millis(50)), 0);
    assert!(start.elapsed() >= Duration::from_millis(45));
    let waiter = {
        let j = j.clone();
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let last = j.wait_for(0, Duration::from_secs(20));
            (last, t0.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    img.write(0, b"hello", false).unwrap();
    let (last, waited) = waiter.join().unwrap();
    assert_eq!(last, 1);
    assert!(waited < Duration::from_secs(10));
    let tid = img.journal_marker("demote", b"epoch=3").unwrap();
    assert_eq!(tid, 2);
    let all: Vec<_> = j.entries(1).map(|e| e.unwrap()).collect();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[1].op,
        JournalOp::Marker {
            kind: "demote".into(),
            payload: b"epoch=3".to_vec()
        }
    );
    assert!(all[0].timestamp_us > 0 && all[1].timestamp_us >= all[0].timestamp_us);
    // Removal wakes waiters for good.
    drop(img);
    let waiter = {
        let j = j.clone();
        std::thread::spawn(move || j.wait_for(2, Duration::from_secs(30)))
    };
    std::thread::sleep(Duration::from_millis(50));
    s.image_remove("p", "i").unwrap();
    assert_eq!(waiter.join().unwrap(), 2);
}

/// A journaled write is acknowledged once its entry is durable and applied
/// to the object files just after; a read issued after the acknowledgement
/// must still see it. Eight writers, each on its own range, read back every
/// write (plain and through a ticket) and the block status of its range as
/// soon as it returns, with zeroes and discards mixed in.
#[test]
fn acknowledged_writes_are_read_back_at_once() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.pool_create("p").unwrap();
    let region = 1u64 << 20;
    create(&s, "i", 8 * region, Layout::simple(256 << 10), journaled());
    let img = s.open_image("p", "i").unwrap();
    let threads: Vec<_> = (0..8u64)
        .map(|k| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(k);
                let base = k * region;
                for i in 0..300 {
                    let len = rng.random_range(1..=16u64) * 4096;
                    let off = base + rng.random_range(0..(region - len) / 4096) * 4096;
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data[..]);
                    data[0] |= 1;
                    match i % 10 {
                        0 => img.write_zeroes(off, len).unwrap(),
                        1 => img.discard(off, len).unwrap(),
                        2 => match img.try_queue_write(off, data.clone(), false) {
                            Ok(ticket) => ticket.unwrap().wait().unwrap(),
                            Err(data) => img.write(off, &data, false).unwrap(),
                        },
                        _ => img.write(off, &data, false).unwrap(),
                    }
                    let mut got = vec![0u8; len as usize];
                    img.read(off, &mut got).unwrap();
                    if i % 10 < 2 {
                        assert!(got.iter().all(|&b| b == 0), "writer {k} op {i}: zeroed");
                    } else {
                        assert!(got == data, "writer {k} op {i}: read back what was written");
                        let ext = img.allocated_extents(off, len).unwrap();
                        assert_eq!(ext, vec![(off, len)], "writer {k} op {i}: allocated");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// An acknowledged write whose apply to the object files fails (as on a
/// full disk) is not lost: the apply stage stops there and retries, reads
/// of unapplied ranges and new writes fail meanwhile (other reads work),
/// barriers refuse, and once the apply can succeed everything goes on with
/// no restart. A store closed while stalled replays the write on reopen.
#[test]
fn failed_apply_stalls_retries_and_is_replayed() {
    let t = tempfile::tempdir().unwrap();
    let obj = 64u64 << 10;
    let block = |img: &std::sync::Arc<tern_store::Image>, no: u64| {
        // The object's file cannot be created: a directory is in its place.
        let p = img.data_dir().join(format!("{no:016x}"));
        std::fs::create_dir(&p).unwrap();
        p
    };
    let blocker;
    {
        let s = reopen(t.path());
        s.pool_create("p").unwrap();
        create(&s, "i", 8 * obj, Layout::simple(obj), journaled());
        let img = s.open_image("p", "i").unwrap();
        img.write(0, &[7u8; 4096], false).unwrap();
        blocker = block(&img, 2);
        img.write(2 * obj + 4096, &[9u8; 4096], false)
            .expect("acknowledged: the entry is durable");
        let mut b = vec![0u8; 4096];
        let e = img.read(2 * obj + 4096, &mut b).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("from journal entry 2 on") && msg.contains("retries"),
            "{msg}"
        );
        img.read(0, &mut b).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let e = img.write(5 * obj, &[1u8; 4096], false).unwrap_err();
        assert!(e.to_string().contains("cannot be applied"), "{e}");
        let e = s
            .snap_create("p", "i", "s1", SnapNamespace::User)
            .unwrap_err();
        assert!(e.to_string().contains("cannot be applied"), "{e}");
        drop(img);
        // Not a clean close: the entry is above the checkpoint.
        assert!(s.close().is_err());
    }
    std::fs::remove_dir(&blocker).unwrap();
    let s = reopen(t.path());
    let img = s.open_image("p", "i").unwrap();
    let mut b = vec![0u8; 4096];
    img.read(2 * obj + 4096, &mut b).unwrap();
    assert_eq!(b, [9u8; 4096], "replayed at open");
    img.read(0, &mut b).unwrap();
    assert_eq!(b, [7u8; 4096]);

    // The same while running: freed, it goes on by itself.
    let blocker = block(&img, 3);
    img.write(3 * obj, &[5u8; 8192], false).unwrap();
    // The read waits for the apply, which fails: the stall is on.
    assert!(img.read(3 * obj, &mut b).is_err());
    img.write(4 * obj, &[6u8; 4096], false).unwrap_err();
    std::thread::sleep(Duration::from_millis(300));
    assert!(img.read(3 * obj, &mut b).is_err(), "still stalled");
    std::fs::remove_dir(&blocker).unwrap();
    let ok = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        img.read(3 * obj, &mut b).is_ok()
    });
    assert!(ok, "the apply did not resume");
    assert_eq!(b, [5u8; 4096]);
    img.write(4 * obj, &[6u8; 4096], false).unwrap();
    img.read(4 * obj, &mut b).unwrap();
    assert_eq!(b, [6u8; 4096]);
    s.snap_create("p", "i", "s1", SnapNamespace::User).unwrap();
}

/// Acknowledging before the apply must not let a fast writer run
/// arbitrarily far ahead of a slow apply stage: the acknowledged,
/// unapplied data stays within 32 MiB plus one round, and everything reads
/// back afterwards.
#[test]
fn apply_backlog_is_bounded() {
    let t = tempfile::tempdir().unwrap();
    let s = reopen(t.path());
    s.pool_create("p").unwrap();
    let (mib, writers) = (1u64 << 20, 4u64);
    create(&s, "i", 64 * mib, Layout::simple(4 * mib), journaled());
    let img = s.open_image("p", "i").unwrap();
    let j = img.journal().unwrap();
    j.slow_apply_for_tests(Duration::from_millis(30));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (j, stop) = (j.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                max = max.max(j.apply_backlog());
                std::thread::sleep(Duration::from_millis(1));
            }
            max
        })
    };
    let threads: Vec<_> = (0..writers)
        .map(|k| {
            let img = img.clone();
            std::thread::spawn(move || {
                // 64 MiB per writer in 1 MiB writes over its 16 MiB range.
                for i in 0..64u64 {
                    let off = k * 16 * mib + (i % 16) * mib;
                    img.write(off, &vec![(i as u8) | 1; mib as usize], false)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let max = sampler.join().unwrap();
    assert!(
        max <= (32 + writers) * mib,
        "apply backlog reached {max} bytes"
    );
    assert!(max >= 16 * mib, "the apply was the slow stage: {max}");
    let mut b = vec![0u8; mib as usize];
    for k in 0..writers {
        for r in 0..16u64 {
            img.read(k * 16 * mib + r * mib, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == ((48 + r) as u8) | 1));
        }
    }
}
