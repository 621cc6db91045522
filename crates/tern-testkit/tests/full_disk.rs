//! A full disk, for real: the site lives on a small tmpfs that the test
//! mounts in a mount namespace of its own (gone with the test process), and
//! fills with a file of its own. Writes through NBD then fail with ENOSPC,
//! no acknowledged write is lost, `ternd` stays up, and once the file is
//! removed writing goes on — with no restart, also on a journaled image
//! whose journal still had room while its object files had none.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Site, wait_until};

const MIB: u64 = 1 << 20;
const NBD_ENOSPC: u32 = 28;

/// A tmpfs of `size` at `dir`, seen by this thread and the processes it
/// starts only; unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        let c = |s: &[u8]| CString::new(s).unwrap();
        let (root, tmpfs) = (c(b"/"), c(b"tmpfs"));
        let target = c(dir.as_os_str().as_bytes());
        let opts = c(format!("size={size}").as_bytes());
        // SAFETY: plain syscalls on valid NUL-terminated strings. The new
        // mount namespace belongs to this thread, which starts the site.
        unsafe {
            assert_eq!(
                libc::unshare(libc::CLONE_NEWNS),
                0,
                "unshare(CLONE_NEWNS): {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                0,
                "making / private: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    0,
                    opts.as_ptr().cast()
                ),
                0,
                "mounting tmpfs: {}",
                std::io::Error::last_os_error()
            );
        }
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: as above.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Fills the filesystem with `path` until a write fails for lack of space.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 256 << 10];
    for _ in 0..4096 {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            return;
        }
    }
    panic!("the filesystem never filled");
}

fn pattern(region: u64) -> Vec<u8> {
    let mut b = vec![0u8; MIB as usize];
    for (i, x) in b.chunks_mut(8).enumerate() {
        x.copy_from_slice(&(region << 32 | i as u64).to_le_bytes());
    }
    b
}

/// One write, waited for: its NBD error (0 for success).
fn write(c: &mut NbdClient, region: u64) -> u32 {
    let h = c.send_write(region * MIB, &pattern(region), false).unwrap();
    let r = c
        .replies
        .recv_timeout(Duration::from_secs(30))
        .expect("a reply");
    assert_eq!(r.handle, h);
    r.error
}

/// Writes 1 MiB regions from `first` on until one fails; returns the
/// first region not written (and checks it failed with ENOSPC).
fn write_until_full(c: &mut NbdClient, first: u64, limit: u64) -> u64 {
    for region in first..limit {
        match write(c, region) {
            0 => {}
            e => {
                assert_eq!(e, NBD_ENOSPC, "region {region} failed with {e}, not ENOSPC");
                return region;
            }
        }
    }
    panic!("no write failed up to region {limit}");
}

/// Trimmed journal segments kept for reuse, over the site's images.
fn spares(site: &Site) -> usize {
    let Ok(images) = std::fs::read_dir(site.data.join("objects")) else {
        return 0;
    };
    images
        .flatten()
        .filter_map(|i| std::fs::read_dir(i.path().join("journal")).ok())
        .flat_map(|d| d.flatten())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jspare"))
        .count()
}

fn write_all(c: &mut NbdClient, regions: std::ops::Range<u64>) {
    for region in regions {
        assert_eq!(write(c, region), 0, "region {region}");
    }
}

fn reads_back(c: &mut NbdClient, regions: std::ops::Range<u64>) -> bool {
    regions
        .into_iter()
        .all(|r| c.read(r * MIB, MIB as u32).is_ok_and(|d| d == pattern(r)))
}

#[test]
fn full_disk_loses_no_acknowledged_write_and_recovers_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let fs_dir = tmp.path().join("fs");
    std::fs::create_dir(&fs_dir).unwrap();
    let _fs = SmallFs::mount(&fs_dir, "160m");
    let mut site = Site::start_under(&fs_dir, "full", &[]);
    site.tern_ok(&["pool", "create", "rbd"]);
    site.tern_ok(&["create", "rbd/plain", "--size", "256M"]);
    site.tern_ok(&[
        "create",
        "rbd/jrnl",
        "--size",
        "256M",
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    // Small segments, trimmed early: the journal laps (its files are
    // overwritten in place) before the disk fills.
    for (k, v) in [
        ("rbd_journal_object_size", "1M"),
        ("rbd_journal_max_size", "8M"),
    ] {
        site.tern_ok(&["config", "image", "set", "rbd/jrnl", k, v]);
    }
    let filler = fs_dir.join("filler");

    // Journaled: 16 MiB written while there is room, then the disk is
    // filled: the journal still takes entries, the object files cannot.
    let mut j = NbdClient::connect(&site.nbd_addr, "rbd/jrnl").unwrap();
    write_all(&mut j, 0..16);
    // The journal has lapped once trimmed segments wait as spares (on
    // disk, so writing into them needs no new space). Trimming follows a
    // lazy checkpoint, which comes late on a loaded machine.
    assert!(
        wait_until(Duration::from_secs(20), || spares(&site) >= 2),
        "the journal kept no spare segments"
    );
    // And everything so far is applied (a read waits for that), so the
    // first write after the fill meets the full disk itself, not a late
    // apply of an earlier one.
    assert!(reads_back(&mut j, 0..16));
    fill(&filler);
    let stop = write_until_full(&mut j, 16, 200);
    eprintln!("journaled image: regions 16..{stop} acknowledged on a full disk");
    assert!(stop > 16, "the journal itself had no room");
    // The last acknowledged write is in the journal but could not be
    // applied: its range does not read (rather than read stale), later
    // writes are refused, and ternd answers and says why.
    assert!(!reads_back(&mut j, stop - 1..stop));
    assert_eq!(write(&mut j, stop + 1), NBD_ENOSPC);
    assert!(
        site.log().contains("durable but applying it failed"),
        "{}",
        site.log()
    );
    let info = site.tern_json(&["journal", "info", "rbd/jrnl"]);
    assert!(
        info["durable_tid"].as_u64() >= info["applied_tid"].as_u64(),
        "{info}"
    );
    // Room again: the stalled apply goes on by itself.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || reads_back(&mut j, 0..stop)),
        "acknowledged writes not readable after space came back"
    );
    write_all(&mut j, stop..stop + 4);
    let jrnl_end = stop + 4;

    // Plain: filled, writes fail with ENOSPC, every acknowledged one reads
    // back at once; with room again, writes go on.
    let mut p = NbdClient::connect(&site.nbd_addr, "rbd/plain").unwrap();
    write_all(&mut p, 0..8);
    fill(&filler);
    let pstop = write_until_full(&mut p, 8, 200);
    eprintln!("plain image: regions 8..{pstop} acknowledged before ENOSPC");
    assert!(reads_back(&mut p, 0..pstop));
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(write(&mut p, pstop), 0);
    assert!(reads_back(&mut p, 0..pstop + 1));

    // And all of it survives a kill -9.
    drop((j, p));
    site.kill9();
    site.restart();
    let mut j = NbdClient::connect(&site.nbd_addr, "rbd/jrnl").unwrap();
    assert!(reads_back(&mut j, 0..jrnl_end));
    let mut p = NbdClient::connect(&site.nbd_addr, "rbd/plain").unwrap();
    assert!(reads_back(&mut p, 0..pstop + 1));
    let o = site.tern(&["journal", "inspect", "rbd/jrnl"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A journal that has not lapped needs new space for its entries: on a
/// full disk its writes are refused with ENOSPC (room is taken before an
/// entry is), never half-written into a segment, which failed the journal
/// with EIO until a restart; with room again it takes writes at once.
#[test]
fn full_disk_refuses_journal_entries_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let fs_dir = tmp.path().join("fs");
    std::fs::create_dir(&fs_dir).unwrap();
    let _fs = SmallFs::mount(&fs_dir, "96m");
    let mut site = Site::start_under(&fs_dir, "jfull", &[]);
    site.tern_ok(&["pool", "create", "rbd"]);
    site.tern_ok(&[
        "create",
        "rbd/j",
        "--size",
        "256M",
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    site.tern_ok(&[
        "config",
        "image",
        "set",
        "rbd/j",
        "rbd_journal_object_size",
        "4M",
    ]);
    let filler = fs_dir.join("filler");
    let mut j = NbdClient::connect(&site.nbd_addr, "rbd/j").unwrap();
    write_all(&mut j, 0..1);
    fill(&filler);
    let stop = write_until_full(&mut j, 1, 200);
    eprintln!("fresh journal: regions 1..{stop} acknowledged on a full disk");
    assert_eq!(write(&mut j, stop), NBD_ENOSPC, "a retry");
    let o = site.tern(&["journal", "info", "rbd/j"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || write(&mut j, stop) == 0),
        "writes still refused with room again"
    );
    write_all(&mut j, stop + 1..stop + 4);
    assert!(reads_back(&mut j, 0..stop + 4));
    drop(j);
    site.kill9();
    site.restart();
    let mut j = NbdClient::connect(&site.nbd_addr, "rbd/j").unwrap();
    assert!(reads_back(&mut j, 0..stop + 4));
    let o = site.tern(&["journal", "inspect", "rbd/j"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
