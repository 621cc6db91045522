//! Pool and image lifecycle, persistence, sparseness and concurrency.

use std::sync::Arc;
use std::time::Instant;
use tern_store::{CreateOpts, KvTable, Store};
use tern_types::{ErrorKind, Features, Layout};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn opts(size: u64) -> CreateOpts {
    CreateOpts {
        size,
        layout: Layout::simple(4 * MIB),
        features: Features::DEFAULT,
    }
}

fn setup() -> (tempfile::TempDir, Store) {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(t.path()).unwrap();
    s.pool_create("p").unwrap();
    (t, s)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn pools() {
    let (_t, s) = setup();
    let e = s.pool_create("p").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(e.to_string(), "pool 'p' already exists");
    let e = s.pool_get("x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.to_string(), "pool 'x' does not exist");
    assert_eq!(
        s.pool_init("x", "rbd").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    let a = s.pool_create("a").unwrap();
    assert_ne!(a.id, s.pool_get("p").unwrap().id);
    assert_eq!(a.application, None);
    assert_eq!(
        s.pool_init("a", "rbd").unwrap().application.as_deref(),
        Some("rbd")
    );
    assert_eq!(
        s.pool_init("a", "rbd").unwrap().application.as_deref(),
        Some("rbd")
    );
    let names: Vec<_> = s.pool_list().unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["a", "p"]);

    // Non-empty pool: Busy unless forced; forced removal takes data too.
    s.image_create("a", "i1", &opts(8 * MIB)).unwrap();
    s.image_create("a", ".hidden", &opts(8 * MIB)).unwrap();
    let img = s.open_image("a", "i1").unwrap();
    img.write(0, &[7u8; 4096], false).unwrap();
    let data_dir = img.data_dir().to_path_buf();
    assert!(data_dir.exists());
    let e = s.pool_remove("a", false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        e.to_string(),
        "pool 'a' has 2 images; remove them or use --force"
    );

    let st = s.pool_stats("a").unwrap();
    assert_eq!(st.images, 1, "hidden images are not counted");
    assert_eq!(st.provisioned_bytes, 16 * MIB);
    assert_eq!(st.objects, 1);
    assert!(st.used_bytes >= 4096);

    s.pool_remove("a", true).unwrap();
    assert!(!data_dir.exists());
    assert_eq!(
        img.read(0, &mut [0u8; 10]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(s.pool_get("a").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(
        s.pool_remove("a", false).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    s.pool_create("e").unwrap();
    s.pool_remove("e", false).unwrap();
}

#[test]
fn image_lifecycle_errors() {
    let (_t, s) = setup();
    let e = s.image_create("nope", "i", &opts(MIB)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.to_string(), "pool 'nope' does not exist");

    s.image_create("p", "i", &opts(MIB)).unwrap();
    let e = s.image_create("p", "i", &opts(MIB)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(e.to_string(), "image 'p/i' already exists");

    for bad in [0, (1 << 60) + 1] {
        let e = s.image_create("p", "z", &opts(bad)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }
    s.image_create("p", "max", &opts(1 << 60)).unwrap();
    let bad_layout = CreateOpts {
        size: MIB,
        layout: Layout {
            object_size: 5000,
            stripe_unit: 5000,
            stripe_count: 1,
        },
        features: Features::DEFAULT,
    };
    assert_eq!(
        s.image_create("p", "z", &bad_layout).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let bad_features = CreateOpts {
        features: Features(Features::JOURNALING),
        ..opts(MIB)
    };
    assert_eq!(
        s.image_create("p", "z", &bad_features).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        s.image_create("p", "a/b", &opts(MIB)).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let e = s.image_info("p", "z").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.to_string(), "image 'p/z' does not exist");
    assert_eq!(
        s.open_image("p", "z").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        s.image_remove("p", "z").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // Striping is recorded as a feature.
    let striped = CreateOpts {
        size: MIB,
        layout: Layout::new(65536, Some(4096), Some(4)).unwrap(),
        features: Features::DEFAULT,
    };
    let info = s.image_create("p", "s", &striped).unwrap();
    assert!(info.features.has(Features::STRIPING));
    assert_eq!(info.layout, striped.layout);

    // Hidden names: usable, not listed.
    s.image_create("p", ".internal", &opts(MIB)).unwrap();
    assert_eq!(s.image_info("p", ".internal").unwrap().name, ".internal");
    let names: Vec<_> = s
        .image_list("p")
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["i", "max", "s"]);
    assert_eq!(
        s.image_list("nope").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // Rename: collision refused, data follows, open handle sees the new name.
    let img = s.open_image("p", "i").unwrap();
    img.write(100, b"hello", false).unwrap();
    let e = s.image_rename("p", "i", "s").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(e.to_string(), "image 'p/s' already exists");
    assert_eq!(
        s.image_rename("p", "zz", "yy").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    s.image_rename("p", "i", "j").unwrap();
    assert_eq!(img.info().name, "j");
    assert_eq!(
        s.image_info("p", "i").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let j = s.open_image("p", "j").unwrap();
    assert!(Arc::ptr_eq(&img, &j), "one handle per image while open");
    let mut b = [0u8; 5];
    j.read(100, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert_eq!(s.image_info("p", "j").unwrap().id, img.id().clone());

    // Remove while open: the old handle fails with NotFound, reopen fails.
    s.image_remove("p", "j").unwrap();
    for e in [
        img.read(0, &mut b).unwrap_err(),
        img.write(0, b"x", false).unwrap_err(),
        img.flush().unwrap_err(),
        img.discard(0, 1).unwrap_err(),
        img.allocated_extents(0, 1).unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }
    assert_eq!(
        s.open_image("p", "j").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(!img.data_dir().exists());
    // The name is free again and the new image starts empty.
    s.image_create("p", "j", &opts(MIB)).unwrap();
    let j2 = s.open_image("p", "j").unwrap();
    assert!(!Arc::ptr_eq(&img, &j2));
    j2.read(100, &mut b).unwrap();
    assert_eq!(b, [0u8; 5]);
}

#[test]
fn range_and_resize_errors() {
    let (_t, s) = setup();
    s.image_create("p", "i", &opts(10000)).unwrap();
    let img = s.open_image("p", "i").unwrap();
    let e = img.write(8192, &[1u8; 4096], false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        e.to_string(),
        "write of 4096 bytes at offset 8192 is past the end of image 'p/i' (size 10000)"
    );
    assert_eq!(
        img.read(u64::MAX, &mut [0u8; 2]).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        img.discard(9999, 2).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    img.write(9999, &[1], false).unwrap();
    img.write(10000, &[], false).unwrap();

    img.write(0, &[9u8; 10000], false).unwrap();
    let e = s.image_resize("p", "i", 5000, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(
        e.to_string(),
        "shrinking image 'p/i' from 10000 to 5000 loses data: use --allow-shrink"
    );
    assert_eq!(
        s.image_resize("p", "i", 0, true).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        s.image_resize("p", "i", (1 << 60) + 1, false)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(s.image_resize("p", "i", 5000, true).unwrap().size, 5000);
    assert_eq!(img.size(), 5000);
    assert_eq!(
        img.write(5000, &[1], false).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    // Growing back shows zeros where the cut data was.
    s.image_resize("p", "i", 20 * MIB, false).unwrap();
    let mut b = vec![1u8; 20000];
    img.read(0, &mut b).unwrap();
    assert!(b[..5000].iter().all(|&x| x == 9));
    assert!(b[5000..].iter().all(|&x| x == 0));
    img.write(19 * MIB, &[3u8; 100], false).unwrap();
    // Shrinking across whole objects deletes them.
    s.image_resize("p", "i", 4096, true).unwrap();
    assert_eq!(s.pool_stats("p").unwrap().objects, 1);
    s.image_resize("p", "i", 20 * MIB, false).unwrap();
    let mut b = vec![1u8; 100];
    img.read(19 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(s.image_info("p", "i").unwrap().size, 20 * MIB);
}

#[test]
fn kv_tables() {
    let (t, s) = setup();
    s.kv_put(KvTable::Site, "site_name", "a").unwrap();
    s.kv_put(KvTable::Users, "client.admin", "{}").unwrap();
    s.kv_put(KvTable::Users, "client.b", "{\"k\":1}").unwrap();
    s.kv_put(KvTable::Users, "other", "x").unwrap();
    assert_eq!(
        s.kv_get(KvTable::Site, "site_name").unwrap().as_deref(),
        Some("a")
    );
    assert_eq!(s.kv_get(KvTable::Config, "site_name").unwrap(), None);
    let l = s.kv_list(KvTable::Users, "client.").unwrap();
    assert_eq!(
        l,
        vec![
            ("client.admin".to_string(), "{}".to_string()),
            ("client.b".to_string(), "{\"k\":1}".to_string())
        ]
    );
    assert_eq!(s.kv_list(KvTable::Users, "").unwrap().len(), 3);
    assert!(s.kv_delete(KvTable::Users, "other").unwrap());
    assert!(!s.kv_delete(KvTable::Users, "other").unwrap());
    drop(s);
    let s = Store::open(t.path()).unwrap();
    assert_eq!(
        s.kv_get(KvTable::Site, "site_name").unwrap().as_deref(),
        Some("a")
    );
    assert_eq!(s.kv_list(KvTable::Users, "").unwrap().len(), 2);
}

#[test]
fn reopen_keeps_data_and_metadata_and_drops_orphans() {
    let t = tempfile::tempdir().unwrap();
    let (id, info) = {
        let s = Store::open(t.path()).unwrap();
        s.pool_create("p").unwrap();
        s.pool_init("p", "rbd").unwrap();
        let striped = CreateOpts {
            size: 3 * MIB + 123,
            layout: Layout::new(65536, Some(4096), Some(3)).unwrap(),
            features: Features::DEFAULT,
        };
        let info = s.image_create("p", "i", &striped).unwrap();
        let img = s.open_image("p", "i").unwrap();
        img.write(12345, &pattern(1, 200_000), false).unwrap();
        img.write(3 * MIB, &pattern(2, 123), true).unwrap();
        img.flush().unwrap();
        (img.id().clone(), info)
    };
    // A crash between removal's metadata commit and its data deletion
    // leaves a directory nobody owns.
    let orphan = t.path().join("objects").join("deadbeef0001");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("0000000000000000"), b"x").unwrap();

    let s = Store::open(t.path()).unwrap();
    assert!(!orphan.exists());
    assert!(t.path().join("objects").join(id.as_str()).exists());
    assert_eq!(s.pool_get("p").unwrap().application.as_deref(), Some("rbd"));
    let info2 = s.image_info("p", "i").unwrap();
    assert_eq!(info2, info);
    let img = s.open_image("p", "i").unwrap();
    let mut b = vec![0u8; 200_000];
    img.read(12345, &mut b).unwrap();
    assert_eq!(b, pattern(1, 200_000));
    let mut b = vec![0u8; 123];
    img.read(3 * MIB, &mut b).unwrap();
    assert_eq!(b, pattern(2, 123));
    let mut b = vec![1u8; 12345];
    img.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn corrupt_object_is_named() {
    let t = tempfile::tempdir().unwrap();
    let dir = {
        let s = Store::open(t.path()).unwrap();
        s.pool_create("p").unwrap();
        s.image_create("p", "i", &opts(MIB)).unwrap();
        let img = s.open_image("p", "i").unwrap();
        img.write(0, b"data", true).unwrap();
        img.data_dir().to_path_buf()
    };
    let obj = dir.join("0000000000000000");
    let mut bytes = std::fs::read(&obj).unwrap();
    bytes[3] ^= 0xff;
    std::fs::write(&obj, &bytes).unwrap();
    let s = Store::open(t.path()).unwrap();
    let img = s.open_image("p", "i").unwrap();
    let e = img.read(0, &mut [0u8; 4]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("bad magic"), "{e}");
}

#[test]
fn sparse_image_uses_what_it_holds() {
    let (_t, s) = setup();
    s.image_create("p", "big", &opts(10 * GIB)).unwrap();
    let img = s.open_image("p", "big").unwrap();
    // Ten 1 MiB writes, scattered, some straddling an object boundary.
    let mut want = Vec::new();
    for k in 0..10u64 {
        let off = k * GIB + k * 7 * MIB + if k % 3 == 0 { 3 * MIB } else { 0 };
        img.write(off, &pattern(k as u8, MIB as usize), false)
            .unwrap();
        want.push((off, MIB));
    }
    img.flush().unwrap();
    let used = img.used_bytes().unwrap();
    assert!((10 * MIB..12 * MIB).contains(&used), "used {used}");
    assert_eq!(s.used_bytes().unwrap(), used);
    let start = Instant::now();
    let ext = img.allocated_extents(0, 10 * GIB).unwrap();
    let took = start.elapsed();
    assert_eq!(ext, want);
    assert!(took.as_secs_f64() < 2.0, "allocated_extents took {took:?}");
    // A narrow query returns the clipped piece.
    assert_eq!(
        img.allocated_extents(3 * MIB + 100, MIB).unwrap(),
        vec![(3 * MIB + 100, MIB - 100)]
    );
    // Discarding everything is as cheap and frees it all.
    let start = Instant::now();
    img.discard(0, 10 * GIB).unwrap();
    assert!(start.elapsed().as_secs_f64() < 2.0);
    assert_eq!(img.allocated_extents(0, 10 * GIB).unwrap(), vec![]);
    assert!(img.used_bytes().unwrap() < MIB);
}

#[test]
fn sparse_striped_partial_punch() {
    let (_t, s) = setup();
    let o = CreateOpts {
        size: GIB,
        layout: Layout::new(4 * MIB, Some(64 * 1024), Some(8)).unwrap(),
        features: Features::DEFAULT,
    };
    s.image_create("p", "st", &o).unwrap();
    let img = s.open_image("p", "st").unwrap();
    img.write(100 * MIB, &pattern(5, 2 * MIB as usize), false)
        .unwrap();
    assert_eq!(
        img.allocated_extents(0, GIB).unwrap(),
        vec![(100 * MIB, 2 * MIB)]
    );
    img.write_zeroes(100 * MIB + 4096, 8192).unwrap();
    assert_eq!(
        img.allocated_extents(0, GIB).unwrap(),
        vec![(100 * MIB, 4096), (100 * MIB + 12288, 2 * MIB - 12288)]
    );
    let mut b = vec![1u8; 8192];
    img.read(100 * MIB + 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn concurrent_writers_readers_and_flushes() {
    let (_t, s) = setup();
    let o = CreateOpts {
        size: 64 * MIB,
        layout: Layout::new(MIB, Some(64 * 1024), Some(4)).unwrap(),
        features: Features::DEFAULT,
    };
    s.image_create("p", "c", &o).unwrap();
    let img = s.open_image("p", "c").unwrap();
    let threads = 4u64;
    let region = 16 * MIB;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let img = img.clone();
            sc.spawn(move || {
                for k in 0..64u64 {
                    let off = t * region + k * 256 * 1024 + 17;
                    let d = pattern((t * 64 + k) as u8, 100_000);
                    img.write(off, &d, k % 16 == 0).unwrap();
                    let mut b = vec![0u8; d.len()];
                    img.read(off, &mut b).unwrap();
                    assert_eq!(b, d);
                    if k % 8 == 0 {
                        img.flush().unwrap();
                    }
                }
            });
        }
    });
    img.flush().unwrap();
    for t in 0..threads {
        for k in 0..64u64 {
            let off = t * region + k * 256 * 1024 + 17;
            let mut b = vec![0u8; 100_000];
            img.read(off, &mut b).unwrap();
            assert_eq!(b, pattern((t * 64 + k) as u8, 100_000));
        }
    }
}

#[test]
fn resize_during_io_does_not_corrupt() {
    let (_t, s) = setup();
    s.image_create("p", "r", &opts(16 * MIB)).unwrap();
    let img = s.open_image("p", "r").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let done = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|sc| {
        let img2 = img.clone();
        let (stop, done) = (&stop, &done);
        sc.spawn(move || {
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let off = (k % 32) * 128 * 1024;
                img2.write(off, &pattern(k as u8, 128 * 1024), false)
                    .unwrap();
                // Writes to the tail may land before or after a shrink;
                // either way they must be refused or succeed, not corrupt.
                let _ = img2.write(12 * MIB, &[1u8; 4096], false);
                k += 1;
                done.store(k, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let mut i = 0;
        while i < 40 || done.load(std::sync::atomic::Ordering::Relaxed) < 200 {
            let size = if i % 2 == 0 { 8 * MIB } else { 16 * MIB };
            s.image_resize("p", "r", size, true).unwrap();
            i += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    img.flush().unwrap();
    // The first 4 MiB were only ever written with whole patterns.
    for k in 0..32u64 {
        let mut b = vec![0u8; 128 * 1024];
        img.read(k * 128 * 1024, &mut b).unwrap();
        assert!(b[0] & 1 == 1, "chunk {k} was never written or was zeroed");
    }
}

/// A writer that never flushes cannot hold a descriptor per object: dirty
/// files are synced and closed at the cap, and a flush afterwards still
/// covers them (issue 23, item 2).
#[test]
fn fd_cap_holds_without_flush() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open_with_fd_cap(t.path(), 16).unwrap();
    s.pool_create("p").unwrap();
    let o = CreateOpts {
        size: 300 * 4096,
        layout: Layout::simple(4096),
        features: Features::DEFAULT,
    };
    s.image_create("p", "f", &o).unwrap();
    s.image_create("p", "g", &o).unwrap();
    let img = s.open_image("p", "f").unwrap();
    let other = s.open_image("p", "g").unwrap();
    for k in 0..300u64 {
        img.write(k * 4096 + 7, &pattern(k as u8, 512), false)
            .unwrap();
        assert!(s.open_fds() <= 16, "{} fds open after {k}", s.open_fds());
    }
    other.write(4096, &pattern(9, 512), false).unwrap();
    img.flush().unwrap();
    other.flush().unwrap();
    drop((img, other));
    drop(s);
    let s = Store::open_with_fd_cap(t.path(), 16).unwrap();
    let img = s.open_image("p", "f").unwrap();
    for k in 0..300u64 {
        let mut b = vec![0u8; 512];
        img.read(k * 4096 + 7, &mut b).unwrap();
        assert_eq!(b, pattern(k as u8, 512), "object {k}");
    }
}

#[test]
fn fd_cap_is_respected() {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open_with_fd_cap(t.path(), 16).unwrap();
    s.pool_create("p").unwrap();
    let o = CreateOpts {
        size: 200 * 4096,
        layout: Layout::simple(4096),
        features: Features::DEFAULT,
    };
    s.image_create("p", "f", &o).unwrap();
    let img = s.open_image("p", "f").unwrap();
    for k in 0..200u64 {
        img.write(k * 4096 + 1, &pattern(k as u8, 100), false)
            .unwrap();
        if k % 20 == 19 {
            // Dirty fds stay open until synced; after a flush they may go.
            img.flush().unwrap();
        }
        assert!(s.open_fds() <= 16 + 20, "{} fds open", s.open_fds());
    }
    img.flush().unwrap();
    for k in 0..200u64 {
        let mut b = vec![0u8; 100];
        img.read(k * 4096 + 1, &mut b).unwrap();
        assert_eq!(b, pattern(k as u8, 100));
        assert!(s.open_fds() <= 16 + 1);
    }
}

#[test]
fn one_opening_at_a_time() {
    // Two openings of one directory would replay the same journals and
    // trim each other's segments; the second is refused until the first
    // and every handle it gave out are gone.
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(t.path()).unwrap();
    s.pool_create("p").unwrap();
    s.image_create("p", "i", &opts(MIB)).unwrap();
    let img = s.open_image("p", "i").unwrap();
    let Err(e) = Store::open(t.path()) else {
        panic!("second opening allowed");
    };
    assert!(matches!(e, tern_store::StoreError::InUse { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("in use"), "{e}");
    drop(s);
    // A live image handle still belongs to the first opening.
    assert!(matches!(
        Store::open(t.path()),
        Err(tern_store::StoreError::InUse { .. })
    ));
    drop(img);
    let s = Store::open(t.path()).unwrap();
    assert_eq!(s.image_info("p", "i").unwrap().size, MIB);
}
