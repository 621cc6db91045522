//! Power loss, not only process death (issue 18 item 4): the site's data
//! directory on a FUSE filesystem that keeps only what was synced
//! (`tern_testkit::powerfs`), cut under NBD writes. A `kill -9` keeps the
//! page cache; a power cut here does not, so a missing `fdatasync` shows.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use tern_testkit::powerfs::{PowerFs, fuse_available, is_fuse_mount};

fn need_fuse() {
    // Never a skip: without FUSE this mode does not exist, which is a failure.
    if let Err(e) = fuse_available() {
        panic!("power-loss tests need FUSE: {e}");
    }
}

fn punch(f: &File, off: i64, len: i64) {
    // SAFETY: fallocate on an fd we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
}

fn rw(p: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

#[test]
fn powerfs_keeps_what_was_synced_and_only_that() {
    need_fuse();
    let t = tempfile::tempdir().unwrap();
    let (backing, mnt) = (t.path().join("durable"), t.path().join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fs = PowerFs::mount(&backing, &mnt).unwrap();
    assert!(is_fuse_mount(&mnt));
    let a = mnt.join("a");
    let big = tern_testkit::random_bytes(1, 3 * 4096 + 100);

    // Written, never synced: the file exists (directory entries are
    // applied at once) but its content is gone after the cut.
    std::fs::write(mnt.join("unsynced"), b"lost").unwrap();
    // Written and fdatasynced: kept.
    let f = rw(&a);
    f.write_all_at(&big, 0).unwrap();
    f.sync_data().unwrap();
    // Then overwritten in part without a sync: the old bytes come back.
    f.write_all_at(b"NEW", 10).unwrap();
    assert_eq!(
        &std::fs::read(&a).unwrap()[10..13],
        b"NEW",
        "reads see the overlay"
    );
    drop(f);
    // Written, synced, renamed into place (the store's tmp+rename).
    let mut g = File::create(mnt.join("state.tmp")).unwrap();
    g.write_all(b"state v1").unwrap();
    g.sync_all().unwrap();
    drop(g);
    std::fs::rename(mnt.join("state.tmp"), mnt.join("state")).unwrap();
    // A synced file truncated, and one punched, both unsynced: undone.
    let tr = rw(&mnt.join("truncated"));
    tr.write_all_at(&big, 0).unwrap();
    tr.sync_data().unwrap();
    tr.set_len(100).unwrap();
    tr.set_len(8192).unwrap();
    assert_eq!(
        std::fs::read(mnt.join("truncated")).unwrap()[100..],
        [0u8; 8092]
    );
    let pu = rw(&mnt.join("punched"));
    pu.write_all_at(&big, 0).unwrap();
    pu.sync_data().unwrap();
    punch(&pu, 4096, 8192);
    // A hole punched and synced: stays zero.
    let ps = rw(&mnt.join("punched_synced"));
    ps.write_all_at(&big, 0).unwrap();
    punch(&ps, 100, 5000);
    ps.sync_data().unwrap();
    // Closed and opened again: close is not a sync, the overlay survives
    // it, and a sync through the new descriptor keeps it.
    std::fs::write(mnt.join("reopened"), b"kept after reopen").unwrap();
    File::open(mnt.join("reopened"))
        .unwrap()
        .sync_all()
        .unwrap();
    // A directory created, a file in it written, the directory renamed
    // (the journal's `journal.new` → `journal`), then the file synced.
    std::fs::create_dir(mnt.join("j.new")).unwrap();
    let s = rw(&mnt.join("j.new/seg"));
    s.write_all_at(b"segment", 0).unwrap();
    std::fs::rename(mnt.join("j.new"), mnt.join("j")).unwrap();
    s.sync_data().unwrap();
    drop(s);
    // statvfs passes through (ternd's status reports disk space).
    let st = nix_statvfs(&mnt);
    assert!(st > 0, "statvfs through the mount");

    // Unmounting needs every file closed (ternd is killed before its cuts).
    drop((tr, pu, ps));
    let (files, pages) = fs.dirty();
    let r = fs.cut().unwrap();
    eprintln!("cut: {r:?} (dirty before: {files} files, {pages} pages)");
    assert!(r.files >= 4, "{r:?}");

    assert_eq!(std::fs::read(mnt.join("unsynced")).unwrap(), b"");
    assert_eq!(std::fs::read(&a).unwrap(), big);
    assert_eq!(std::fs::read(mnt.join("state")).unwrap(), b"state v1");
    assert!(!mnt.join("state.tmp").exists());
    assert_eq!(std::fs::read(mnt.join("truncated")).unwrap(), big);
    assert_eq!(std::fs::read(mnt.join("punched")).unwrap(), big);
    let mut want = big.clone();
    want[100..5100].fill(0);
    assert_eq!(std::fs::read(mnt.join("punched_synced")).unwrap(), want);
    assert_eq!(
        std::fs::read(mnt.join("reopened")).unwrap(),
        b"kept after reopen"
    );
    assert_eq!(std::fs::read(mnt.join("j/seg")).unwrap(), b"segment");
    // The backing directory holds exactly that.
    assert_eq!(std::fs::read(backing.join("a")).unwrap(), big);

    // A cut that keeps some: of 64 unsynced pages, some survive, some not,
    // each whole (the writeback works in pages).
    let k = rw(&mnt.join("some"));
    let data = tern_testkit::random_bytes(2, 64 * 4096);
    k.write_all_at(&data, 0).unwrap();
    k.sync_data().unwrap();
    let newer = tern_testkit::random_bytes(3, 64 * 4096);
    k.write_all_at(&newer, 0).unwrap();
    drop(k);
    let r = fs.cut_keeping_some(7).unwrap();
    let got = std::fs::read(mnt.join("some")).unwrap();
    let kept = (0..64)
        .filter(|&p| {
            let (a, b) = (p * 4096, (p + 1) * 4096);
            if got[a..b] == newer[a..b] {
                true
            } else {
                assert_eq!(got[a..b], data[a..b], "page {p} is neither version");
                false
            }
        })
        .count();
    eprintln!("cut keeping some: {kept} of 64 unsynced pages survived ({r:?})");
    assert!(kept > 0 && kept < 64, "{kept} of 64 kept");
    assert_eq!(kept as u64, r.kept);

    drop(fs);
    assert!(!is_fuse_mount(&mnt), "unmounted on drop");
}

fn nix_statvfs(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct; c is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_blocks
}

use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};
use tern_testkit::Site;
use tern_testkit::nbd::NbdClient;
use tern_testkit::slots::{IMAGE, Log, SLOTS, inspect_clean, verify_image, writer};

/// Power cuts in the tests below; `TERN_POWER_CUT_CYCLES` for more.
fn cycles() -> u64 {
    std::env::var("TERN_POWER_CUT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
}

#[derive(Default)]
struct Totals {
    acked: u64,
    fua: u64,
    flushes: u64,
    /// Slots whose value had to survive a cut (a durable write in the
    /// cycle), checked.
    durable_checked: u64,
    pages_dropped: u64,
    files_dropped: u64,
    /// Unsynced pages written back at the cuts that keep some.
    pages_kept: u64,
}

/// `cycles` rounds of: the writer of `tests/journal.rs` on `export`, a
/// power cut at a random moment, the image checked against the writer's
/// log. Every `replay_every`th round is cut again while the restart's
/// first open replays the journal.
fn cut_under_writes(
    site: &mut Site,
    export: &str,
    acked_durable: bool,
    replay_every: Option<u64>,
    check: impl Fn(&Site, &str),
) -> Totals {
    let cycles = cycles();
    let seq = Arc::new(AtomicU64::new(1));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(18);
    let mut base = vec![0u64; SLOTS as usize];
    let mut t = Totals::default();
    let started = Instant::now();
    for cycle in 0..cycles {
        let c = NbdClient::connect(&site.nbd_addr, export).expect("nbd connect");
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (seq, stop) = (seq.clone(), stop.clone());
            std::thread::spawn(move || writer(c, seq, stop, 1000 + cycle))
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(100..400)));
        // Every other cut keeps a random part of what was unsynced, as the
        // kernel's writeback may have: torn journal tails, headers without
        // their data.
        let keep = (cycle % 2 == 1).then_some(cycle);
        let r = site.power_cut_with(keep);
        let log: Log = w.join().expect("writer");
        t.pages_dropped += r.pages - r.kept;
        t.pages_kept += r.kept;
        t.files_dropped += r.files;
        t.acked += log.writes_acked;
        t.fua += log.fua_acked;
        t.flushes += log.flushes_acked;
        t.durable_checked += if acked_durable {
            log.acked.len()
        } else {
            log.durable.len()
        } as u64;
        if replay_every.is_some_and(|n| cycle % n == n - 1) {
            // Cut again while the open replays the journal (its applies to
            // the object files are not synced until the checkpoint).
            let _c = NbdClient::connect(&site.nbd_addr, export);
            std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
            let r = site.power_cut_with(Some(cycle + 100));
            t.pages_dropped += r.pages - r.kept;
            t.pages_kept += r.kept;
        }
        base = verify_image(
            site,
            export,
            &base,
            &log,
            acked_durable,
            &format!("cycle {cycle}"),
        );
        check(site, &format!("cycle {cycle}"));
        assert!(
            started.elapsed() < Duration::from_secs(200),
            "power-cut test over its time budget after {cycle} cycles"
        );
    }
    assert!(
        t.acked > cycles * 20,
        "the workload barely ran: {} writes",
        t.acked
    );
    // The cuts must have had something to drop, or they tested nothing.
    assert!(t.pages_dropped > 0, "no cut dropped anything");
    eprintln!(
        "{} unsynced pages written back at the cuts that keep some",
        t.pages_kept
    );
    t
}

/// A site on a power-loss filesystem with the journaled image `rbd/j`
/// (small journal segments, so that rolls and recycling happen).
fn journaled_power_site(name: &str) -> Site {
    let site = Site::start_power_cut(name, &[]);
    site.tern_ok(&["pool", "create", "rbd"]);
    site.tern_ok(&["config", "set", "global", "rbd_journal_object_size", "256K"]);
    site.tern_ok(&[
        "create",
        "rbd/j",
        "--size",
        &format!("{}M", IMAGE >> 20),
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    site
}

#[test]
fn power_cuts_under_nbd_writes_lose_no_acknowledged_journaled_write() {
    need_fuse();
    let mut site = journaled_power_site("jpower");
    let started = Instant::now();
    // Strict journal (the default): every acknowledged write is durable.
    let t = cut_under_writes(&mut site, "rbd/j", true, Some(5), |s, what| {
        inspect_clean(s, what);
    });
    eprintln!(
        "{} power cuts (strict journal): {} writes acknowledged ({} FUA), {} flushes, \
         {} slots checked for their last acknowledged write, {} unsynced pages in {} files \
         dropped, {:.1} s",
        cycles(),
        t.acked,
        t.fua,
        t.flushes,
        t.durable_checked,
        t.pages_dropped,
        t.files_dropped,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn power_cuts_under_nbd_writes_lose_no_flushed_write_in_journal_flush_mode() {
    need_fuse();
    let mut site = journaled_power_site("jfpower");
    site.tern_ok(&[
        "config",
        "image",
        "set",
        "rbd/j",
        "rbd_journal_durability",
        "flush",
    ]);
    let started = Instant::now();
    // `flush` mode: durable at a flush or FUA, like a plain image.
    let t = cut_under_writes(&mut site, "rbd/j", false, Some(5), |s, what| {
        inspect_clean(s, what);
    });
    eprintln!(
        "{} power cuts (journal, flush mode): {} writes acknowledged ({} FUA), {} flushes, \
         {} slots checked for their last flushed write, {} unsynced pages in {} files \
         dropped, {:.1} s",
        cycles(),
        t.acked,
        t.fua,
        t.flushes,
        t.durable_checked,
        t.pages_dropped,
        t.files_dropped,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn power_cuts_under_nbd_writes_lose_no_flushed_plain_write() {
    need_fuse();
    let mut site = Site::start_power_cut("ppower", &[]);
    site.tern_ok(&["pool", "create", "rbd"]);
    site.tern_ok(&[
        "create",
        "rbd/j",
        "--size",
        &format!("{}M", IMAGE >> 20),
        "--image-feature",
        "layering,exclusive-lock",
    ]);
    let started = Instant::now();
    // No journal: a write is durable once flushed, or with FUA.
    let t = cut_under_writes(&mut site, "rbd/j", false, None, |_, _| {});
    eprintln!(
        "{} power cuts (plain image): {} writes acknowledged ({} FUA), {} flushes, \
         {} slots checked for their last flushed write, {} unsynced pages in {} files \
         dropped, {:.1} s",
        cycles(),
        t.acked,
        t.fua,
        t.flushes,
        t.durable_checked,
        t.pages_dropped,
        t.files_dropped,
        started.elapsed().as_secs_f64()
    );
}
