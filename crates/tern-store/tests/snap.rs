//! Snapshot lifecycle: O(1) creation, clone accounting, rollback, protection
//! and the rules that tie snapshots to image removal.

use tern_store::{CreateOpts, MirrorSnap, MirrorSnapState, SnapNamespace, Store};
use tern_types::{ErrorKind, Features, Layout};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn setup() -> (tempfile::TempDir, Store) {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(t.path()).unwrap();
    s.pool_create("p").unwrap();
    (t, s)
}

fn create(s: &Store, name: &str, size: u64, object_size: u64) {
    let o = CreateOpts {
        size,
        layout: Layout::simple(object_size),
        features: Features::DEFAULT,
    };
    s.image_create("p", name, &o).unwrap();
}

fn clone_files(s: &Store, image: &str) -> usize {
    let img = s.open_image("p", image).unwrap();
    std::fs::read_dir(img.data_dir())
        .map(|rd| {
            rd.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains('.')
            })
            .count()
        })
        .unwrap_or(0)
}

#[test]
fn create_is_o1() {
    let (_t, s) = setup();
    for (name, size) in [("small", GIB), ("huge", 1 << 40)] {
        create(&s, name, size, 4 * MIB);
        let img = s.open_image("p", name).unwrap();
        for k in 0..4u64 {
            img.write(k * (size / 4), &[7u8; 65536], false).unwrap();
        }
        s.snap_create("p", name, "warm", SnapNamespace::User)
            .unwrap();
        img.write(0, &[8u8; 4096], false).unwrap();
        let t0 = std::time::Instant::now();
        s.snap_create("p", name, "s", SnapNamespace::User).unwrap();
        let took = t0.elapsed();
        assert!(
            took < std::time::Duration::from_millis(50),
            "{name}: snapshot took {took:?}"
        );
    }
}

#[test]
fn ids_names_protection_and_removal_rules() {
    let (_t, s) = setup();
    create(&s, "i", 8 * MIB, 4 * MIB);
    let a = s.snap_create("p", "i", "a", SnapNamespace::User).unwrap();
    let b = s.snap_create("p", "i", "b", SnapNamespace::User).unwrap();
    assert_eq!((a.id, b.id), (1, 2));
    let e = s
        .snap_create("p", "i", "a", SnapNamespace::User)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    for bad in ["", "x@y", "x/y"] {
        let e = s
            .snap_create("p", "i", bad, SnapNamespace::User)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
    }
    assert_eq!(s.image_info("p", "i").unwrap().snap_count, 2);

    s.snap_set_protected("p", "i", "a", true).unwrap();
    let e = s.snap_remove("p", "i", "a", false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        e.to_string(),
        "snapshot 'p/i@a' is protected: unprotect it first"
    );
    let e = s.snap_purge("p", "i").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        s.snap_list("p", "i").unwrap().len(),
        2,
        "purge is all or nothing"
    );

    let e = s.image_remove("p", "i").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        e.to_string(),
        "image 'p/i' has snapshots: remove them with `tern snap purge p/i` first"
    );

    s.snap_rename("p", "i", "b", "c").unwrap();
    assert_eq!(s.snap_get("p", "i", "c").unwrap().id, 2);
    assert_eq!(
        s.snap_rename("p", "i", "c", "a").unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        s.snap_get("p", "i", "b").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // Mirror snapshots: not removable by hand, updatable, and no obstacle
    // to image removal.
    let m = s
        .snap_create("p", "i", "m", SnapNamespace::Mirror(MirrorSnap::default()))
        .unwrap();
    assert_eq!(m.id, 3);
    let e = s.snap_remove("p", "i", "m", false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("is a mirror snapshot"), "{e}");
    let m = s
        .snap_update_mirror("p", "i", 3, |m| {
            m.complete = true;
            m.state = MirrorSnapState::PrimaryDemoted;
        })
        .unwrap();
    assert_eq!(
        s.snap_get_by_id("p", "i", 3).unwrap().namespace,
        m.namespace
    );

    s.snap_set_protected("p", "i", "a", false).unwrap();
    assert_eq!(s.snap_purge("p", "i").unwrap(), 2);
    assert_eq!(
        s.snap_list("p", "i").unwrap().len(),
        1,
        "mirror snapshot stays"
    );
    s.image_remove("p", "i").unwrap();
    // The id sequence never goes back, even after removals.
    create(&s, "j", 8 * MIB, 4 * MIB);
    s.snap_create("p", "j", "x", SnapNamespace::User).unwrap();
    s.snap_remove("p", "j", "x", false).unwrap();
    assert_eq!(
        s.snap_create("p", "j", "y", SnapNamespace::User)
            .unwrap()
            .id,
        2
    );
}

#[test]
fn clones_are_made_once_and_freed_with_their_snapshots() {
    let (_t, s) = setup();
    create(&s, "i", 4 * 65536, 65536);
    let img = s.open_image("p", "i").unwrap();
    img.write(0, &[1u8; 65536 * 2], false).unwrap();
    s.snap_create("p", "i", "a", SnapNamespace::User).unwrap();
    s.snap_create("p", "i", "b", SnapNamespace::User).unwrap();
    assert_eq!(clone_files(&s, "i"), 0, "snapshots alone copy nothing");
    img.write(0, &[2u8; 100], false).unwrap();
    img.write(200, &[3u8; 100], false).unwrap();
    assert_eq!(clone_files(&s, "i"), 1, "one clone serves a and b");
    s.snap_create("p", "i", "c", SnapNamespace::User).unwrap();
    img.discard(0, 65536 * 2).unwrap();
    assert_eq!(clone_files(&s, "i"), 3);
    let mut buf = vec![0u8; 65536 * 2];
    for (snap, first) in [(1, 1u8), (2, 1), (3, 2)] {
        img.read_at(Some(snap), 0, &mut buf).unwrap();
        assert_eq!(buf[0], first);
        assert_eq!(buf[65536], 1);
    }
    // b shares its clone with a: removing b frees nothing, then a frees it.
    s.snap_remove("p", "i", "b", false).unwrap();
    assert_eq!(clone_files(&s, "i"), 3);
    s.snap_remove("p", "i", "a", false).unwrap();
    assert_eq!(clone_files(&s, "i"), 2);
    img.read_at(Some(3), 0, &mut buf).unwrap();
    assert_eq!((buf[0], buf[200], buf[65536]), (2, 3, 1));
    s.snap_remove("p", "i", "c", false).unwrap();
    assert_eq!(clone_files(&s, "i"), 0);
}

#[test]
fn rollback_restores_content_and_size_and_keeps_later_snapshots() {
    let (_t, s) = setup();
    create(&s, "i", 3 * 65536, 65536);
    let img = s.open_image("p", "i").unwrap();
    img.write(0, &[1u8; 65536], false).unwrap();
    s.snap_create("p", "i", "a", SnapNamespace::User).unwrap();
    img.write(100, &[2u8; 10], false).unwrap();
    s.image_resize("p", "i", 4 * 65536, false).unwrap();
    img.write(3 * 65536, &[4u8; 65536], false).unwrap();
    s.snap_create("p", "i", "b", SnapNamespace::User).unwrap();
    img.write(0, &[3u8; 50], false).unwrap();

    s.snap_rollback("p", "i", "a").unwrap();
    assert_eq!(img.size(), 3 * 65536);
    let mut buf = vec![0u8; 3 * 65536];
    img.read(0, &mut buf).unwrap();
    assert!(buf[..65536].iter().all(|&x| x == 1));
    assert!(buf[65536..].iter().all(|&x| x == 0));
    // b is intact, size and all.
    let mut b = vec![0u8; 4 * 65536];
    img.read_at(Some(2), 0, &mut b).unwrap();
    assert_eq!(b[0], 1);
    assert_eq!(&b[100..110], &[2u8; 10]);
    assert!(b[3 * 65536..].iter().all(|&x| x == 4));
    // The diff from a to head is empty again (content equal), except chunks
    // rolled back, which must read as a's content.
    for e in img.diff(Some(1), None, 0, 3 * 65536, false).unwrap() {
        assert!(e.offset < 65536 || !e.data, "{e:?}");
    }
    s.snap_rollback("p", "i", "b").unwrap();
    let mut h = vec![0u8; 4 * 65536];
    img.read(0, &mut h).unwrap();
    assert_eq!(h, b);
}

#[test]
fn diff_reports_data_and_zero_extents() {
    let (_t, s) = setup();
    create(&s, "i", 64 * MIB, 4 * MIB);
    let img = s.open_image("p", "i").unwrap();
    assert_eq!(img.diff_granularity(), 8192);
    img.write(0, &[1u8; 8192 * 3], false).unwrap();
    s.snap_create("p", "i", "a", SnapNamespace::User).unwrap();
    img.write(8 * MIB + 5, &[2u8; 10], false).unwrap();
    img.discard(8192, 8192).unwrap();
    let d = img.diff(Some(1), None, 0, 64 * MIB, false).unwrap();
    let v: Vec<(u64, u64, bool)> = d.iter().map(|e| (e.offset, e.length, e.data)).collect();
    // The new object ends at its last byte written: the rest of the chunk
    // is a zero extent.
    assert_eq!(
        v,
        vec![
            (8192, 8192, false),
            (8 * MIB, 15, true),
            (8 * MIB + 15, 8192 - 15, false)
        ]
    );
    let w = img.diff(Some(1), None, 0, 64 * MIB, true).unwrap();
    let v: Vec<(u64, u64, bool)> = w.iter().map(|e| (e.offset, e.length, e.data)).collect();
    assert_eq!(v, vec![(0, 4 * MIB, true), (8 * MIB, 4 * MIB, true)]);
    let full = img.diff(None, Some(1), 0, 64 * MIB, false).unwrap();
    assert_eq!(full.len(), 1);
    assert_eq!((full[0].offset, full[0].length), (0, 8192 * 3));
    assert_eq!(
        img.allocated_extents_at(Some(1), 0, 64 * MIB).unwrap(),
        vec![(0, 8192 * 3)]
    );
    assert_eq!(img.diff(Some(1), Some(1), 0, MIB, false).unwrap(), vec![]);
    let e = img
        .read_at(Some(1), 64 * MIB - 1, &mut [0u8; 2])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        img.read_at(Some(9), 0, &mut [0u8; 2]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
