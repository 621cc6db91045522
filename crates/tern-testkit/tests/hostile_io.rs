//! Issue 23: one caller must not be able to break the site for the others.
//! Descriptors (item 2), against a real ternd.

use std::time::Duration;
use tern_testkit::Site;
use tern_testkit::nbd::NbdClient;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// `len` bytes that differ for every `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    for (i, x) in b.chunks_mut(8).enumerate() {
        let v = (seed << 32 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let n = x.len();
        x.copy_from_slice(&v.to_le_bytes()[..n]);
    }
    b
}

/// Sends `reqs` and waits for every reply; returns their NBD errors.
fn batch(c: &mut NbdClient, reqs: &[(u64, Vec<u8>)]) -> Vec<u32> {
    for (off, data) in reqs {
        c.send_write(*off, data, false).unwrap();
    }
    (0..reqs.len())
        .map(|_| {
            c.replies
                .recv_timeout(Duration::from_secs(60))
                .expect("a reply")
                .error
        })
        .collect()
}

fn flush(c: &mut NbdClient) {
    let h = c.send_flush().unwrap();
    let r = c.replies.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!((r.handle, r.error), (h, 0), "flush failed");
}

/// Item 2: ternd under `ulimit -n 256`; 1,200 unflushed 512-byte writes
/// to distinct 4 KiB objects through NBD. Before the fix each dirty object
/// kept its descriptor, the process hit EMFILE and everything else failed.
#[test]
fn scattered_unflushed_writes_do_not_wedge_the_site() {
    let mut s = Site::start_with_nofile("fds", &[], 256);
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/many", "--size", "64M", "--object-size", "4K"]);
    s.tern_ok(&["create", "rbd/other", "--size", "8M"]);
    const N: u64 = 1200;
    // 13 is coprime with the 16,384 objects: every write a new object.
    let off = |k: u64| ((k * 13) % 16384) * 4 * KIB + (k % 7) * 512;
    let writes: Vec<(u64, Vec<u8>)> = (0..N).map(|k| (off(k), pattern(k, 512))).collect();
    let mut c = NbdClient::connect(&s.nbd_addr, "rbd/many").unwrap();
    for (i, chunk) in writes.chunks(40).enumerate() {
        let errs = batch(&mut c, chunk);
        assert!(
            errs.iter().all(|&e| e == 0),
            "writes {}..{} failed with {errs:?}:\n{}",
            i * 40,
            i * 40 + chunk.len(),
            s.log()
        );
    }
    // Still unflushed: another image, the API and an export all work.
    let mut o = NbdClient::connect(&s.nbd_addr, "rbd/other").unwrap();
    assert_eq!(batch(&mut o, &[(MIB, pattern(7, 4096))]), vec![0]);
    flush(&mut o);
    assert_eq!(o.read(MIB, 4096).unwrap(), pattern(7, 4096));
    o.disconnect();
    assert!(s.tern_ok(&["ls", "rbd"]).contains("other"));
    s.export_sha256("rbd/other");
    flush(&mut c);
    for (k, (off, data)) in writes.iter().enumerate().step_by(7) {
        assert_eq!(
            &c.read(*off, 512).unwrap(),
            data,
            "write {k} before restart"
        );
    }
    drop(c);
    // Every write acknowledged before the flush survives kill -9, though
    // most of their descriptors were closed (after a sync) long before it.
    s.restart();
    let mut c = NbdClient::connect(&s.nbd_addr, "rbd/many").unwrap();
    for (k, (off, data)) in writes.iter().enumerate() {
        assert_eq!(&c.read(*off, 512).unwrap(), data, "write {k} after kill -9");
    }
    assert!(
        !s.log().contains("Too many open files"),
        "descriptors ran out:\n{}",
        s.log()
    );
}
