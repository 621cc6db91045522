//! Issue 23: one caller must not be able to break the site for the others.
//! Descriptors (item 2) and huge sparse exports (item 5), each against a
//! real ternd.

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tern_client::{image_ref, pb};
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Site, rt};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

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

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which may hold spaces: state is 3.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[11] + f[12]) * 1000 / hz)
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

/// Spawns `tern export SPEC -` with its stdout piped.
fn export_to_pipe(s: &Site, spec: &str) -> Child {
    s.tern_cmd()
        .args(["export", spec, "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Item 5: a 64 TiB sparse image exports its first byte at once (it took
/// 63 s) and exactly what was written; an abandoned export of a 1 EiB
/// image stops with its client instead of burning a core.
#[test]
fn huge_sparse_exports_start_at_once_and_stop_with_their_client() {
    let s = Site::start("exp");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/huge", "--size", "64T"]);
    let size = 64 * TIB;
    let writes: Vec<(u64, Vec<u8>)> = [0, 17 * TIB + 12 * KIB, size - MIB]
        .iter()
        .enumerate()
        .map(|(i, &o)| (o, pattern(i as u64 + 1, MIB as usize)))
        .collect();
    let mut c = NbdClient::connect(&s.nbd_addr, "rbd/huge").unwrap();
    assert_eq!(batch(&mut c, &writes), vec![0; 3]);
    flush(&mut c);
    c.disconnect();

    let t = Instant::now();
    let mut child = export_to_pipe(&s, "rbd/huge");
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = tx.send(out.read_exact(&mut b).map(|()| b[0]));
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    let ttfb = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("64 TiB sparse export: first byte after {ttfb:?}");
    assert_eq!(
        first.expect("no byte within 60 s").unwrap(),
        writes[0].1[0],
        "first byte"
    );
    assert!(ttfb < Duration::from_secs(5), "first byte after {ttfb:?}");

    // The whole stream: contiguous, the written data where it was written,
    // zeros everywhere else, ending at the size.
    let rt = rt();
    let client = s.client(&rt);
    let t = Instant::now();
    let (pos, found) = rt.block_on(async {
        let mut st = client
            .raw()
            .read_stream(pb::ReadStreamRequest {
                image: Some(image_ref("rbd", "huge")),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (mut pos, mut found) = (0u64, Vec::new());
        while let Some(ch) = st.message().await.unwrap() {
            assert_eq!(ch.offset, pos, "stream skipped");
            if !ch.zero {
                found.push((ch.offset, ch.data));
            }
            pos += ch.length;
        }
        (pos, found)
    });
    eprintln!("64 TiB sparse export: whole stream in {:?}", t.elapsed());
    assert_eq!(pos, size);
    let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
    for (o, d) in found {
        match got.last_mut() {
            Some((po, pd)) if *po + pd.len() as u64 == o => pd.extend_from_slice(&d),
            _ => got.push((o, d)),
        }
    }
    assert_eq!(got.len(), writes.len(), "data ranges {:?}", {
        got.iter().map(|g| (g.0, g.1.len())).collect::<Vec<_>>()
    });
    for ((go, gd), (wo, wd)) in got.iter().zip(&writes) {
        assert_eq!(go, wo);
        assert!(gd == wd, "data at {wo} differs");
    }

    // 1 EiB, the largest image: start an export, abandon it.
    s.tern_ok(&["create", "rbd/eib", "--size", "1024P"]);
    let pid = s.pid().unwrap();
    let mut child = export_to_pipe(&s, "rbd/eib");
    std::thread::sleep(Duration::from_secs(1));
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(500));
    let a = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - a;
    eprintln!("ternd CPU over 3 s after the client of a 1 EiB export left: {used:?}");
    assert!(
        used < Duration::from_millis(600),
        "ternd used {used:?} of CPU in 3 s with no client"
    );
    // And it still serves.
    assert!(s.tern_ok(&["ls", "rbd"]).contains("eib"));
}
