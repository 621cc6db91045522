//! Snapshots, diffs, export-diff/import-diff between two real sites, rbd's
//! stream formats (including one laid out by hand from the published
//! description), and kill -9 during writes and snapshot operations.

use rand::{Rng, SeedableRng};
use std::io::Write;
use std::time::Duration;
use tern_testkit::{Site, random_bytes, rt};
use tern_types::ImageSpec;
use tern_types::api::DiffRequest;

const MIB: u64 = 1 << 20;

fn write_random(s: &Site, image: &str, seed: u64, count: usize, size: u64) {
    let rt = rt();
    let c = s.client(&rt);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rt.block_on(async {
        for i in 0..count {
            let len = rng.random_range(1..64 * 1024u64);
            let off = rng.random_range(0..size - len);
            let data = random_bytes(seed * 1000 + i as u64, len as usize);
            let r = ImageSpec::new("rbd", image);
            c.io().write(&r, off, data, false, "").await.unwrap();
        }
        c.io().flush(&ImageSpec::new("rbd", image)).await.unwrap();
    });
}

fn export_sum(s: &Site, spec: &str) -> String {
    s.export_sha256(spec)
}

fn site() -> Site {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["pool", "init", "rbd"]);
    s
}

#[test]
fn snapshot_lifecycle_through_the_cli() {
    let s = site();
    s.tern_ok(&["create", "rbd/img", "--size", "16M", "--object-size", "1M"]);
    write_random(&s, "img", 1, 50, 16 * MIB);
    let at_s1 = export_sum(&s, "rbd/img");
    s.tern_ok(&["snap", "create", "rbd/img@s1"]);
    write_random(&s, "img", 2, 50, 16 * MIB);
    let at_head = export_sum(&s, "rbd/img");
    assert_ne!(at_s1, at_head);
    // The snapshot still reads as it was.
    assert_eq!(export_sum(&s, "rbd/img@s1"), at_s1);
    let info = s.tern_json(&["info", "rbd/img@s1"]);
    assert_eq!(info["size"], 16 * MIB);
    assert_eq!(s.tern_json(&["info", "rbd/img"])["snapshot_count"], 1);
    let ls = s.tern_json(&["snap", "ls", "rbd/img"]);
    assert_eq!(ls[0]["name"], "s1");
    assert!(s.tern_ok(&["snap", "ls", "rbd/img"]).contains("SNAPID"));

    // Writes to a snapshot are refused; so is removing a protected one.
    let rt = rt();
    let c = s.client(&rt);
    let e = rt
        .block_on(c.io().write(
            &ImageSpec::new("rbd", "img").at(Some("s1")),
            0,
            vec![1; 512],
            false,
            "",
        ))
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::ReadOnly, "{e}");
    s.tern_ok(&["snap", "protect", "rbd/img@s1"]);
    let (code, err) = s.tern_err(&["snap", "rm", "rbd/img@s1"]);
    assert_eq!(code, 16, "{err}");
    assert!(err.contains("protected"), "{err}");
    let (code, err) = s.tern_err(&["rm", "rbd/img"]);
    assert_eq!(code, 16, "{err}");
    assert!(err.contains("snap purge"), "{err}");
    s.tern_ok(&["snap", "unprotect", "rbd/img@s1"]);
    s.tern_ok(&["snap", "rename", "rbd/img@s1", "rbd/img@first"]);
    let (code, _) = s.tern_err(&["snap", "create", "rbd/img@first"]);
    assert_eq!(code, 17);

    // Rollback restores the snapshot and keeps later snapshots.
    s.tern_ok(&["snap", "create", "rbd/img@s2"]);
    s.tern_ok(&["snap", "rollback", "rbd/img@first"]);
    assert_eq!(export_sum(&s, "rbd/img"), at_s1);
    assert_eq!(export_sum(&s, "rbd/img@s2"), at_head);
    assert_eq!(export_sum(&s, "rbd/img@first"), at_s1);

    // diff: nothing changed since the rollback point...
    let d = s.tern_json(&["diff", "rbd/img", "--from-snap", "first"]);
    let changed: u64 = d
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    // ...except what the rollback itself rewrote, which diff may report (never less).
    assert!(changed <= 16 * MIB);
    let all = s.tern_json(&["diff", "rbd/img@first"]);
    assert!(!all.as_array().unwrap().is_empty());

    let out = s.tern_json(&["snap", "purge", "rbd/img"]);
    assert_eq!(out["removed"], 2);
    s.tern_ok(&["rm", "rbd/img"]);
}

#[test]
fn export_diff_import_diff_between_two_sites() {
    let a = site();
    let b = Site::start("site-b");
    b.tern_ok(&["pool", "create", "rbd"]);
    let size = 32 * MIB;
    a.tern_ok(&["create", "rbd/vol", "--size", "32M", "--object-size", "1M"]);
    b.tern_ok(&["create", "rbd/vol", "--size", "32M", "--object-size", "4M"]);
    write_random(&a, "vol", 10, 200, size);
    a.tern_ok(&["snap", "create", "rbd/vol@s1"]);
    let d1 = a.root.path().join("s1.diff");
    a.tern_ok(&["export-diff", "rbd/vol@s1", d1.to_str().unwrap()]);
    b.tern_ok(&["import-diff", d1.to_str().unwrap(), "rbd/vol"]);
    assert_eq!(export_sum(&b, "rbd/vol@s1"), export_sum(&a, "rbd/vol@s1"));

    // An incremental of random writes and a discard, through a pipe between the sites.
    write_random(&a, "vol", 11, 100, size);
    let rt = rt();
    let c = a.client(&rt);
    rt.block_on(
        c.io()
            .discard(&ImageSpec::new("rbd", "vol"), 3 * MIB, 2 * MIB, ""),
    )
    .unwrap();
    a.tern_ok(&["snap", "create", "rbd/vol@s2"]);
    let incr = a.root.path().join("s1-s2.diff");
    a.tern_ok(&[
        "export-diff",
        "--from-snap",
        "s1",
        "rbd/vol@s2",
        incr.to_str().unwrap(),
    ]);
    let incr_len = std::fs::metadata(&incr).unwrap().len();
    assert!(
        incr_len < size / 2,
        "incremental diff is {incr_len} bytes: not incremental"
    );
    let mut exp = a
        .tern_cmd()
        .args([
            "export-diff",
            "--from-snap",
            "s1",
            "--export-format",
            "2",
            "rbd/vol@s2",
            "-",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = b
        .tern_cmd()
        .args(["import-diff", "-", "rbd/vol"])
        .stdin(exp.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(exp.wait().unwrap().success() && st.success());
    assert_eq!(export_sum(&b, "rbd/vol"), export_sum(&a, "rbd/vol@s2"));
    assert_eq!(export_sum(&b, "rbd/vol@s2"), export_sum(&a, "rbd/vol@s2"));
    let names: Vec<String> = b
        .tern_json(&["snap", "ls", "rbd/vol"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["s1", "s2"]);

    // Refused, and the target unchanged: a truncated diff (several cut points),
    // a diff whose start snapshot the target lacks, a repeated import.
    write_random(&a, "vol", 12, 50, size);
    a.tern_ok(&["snap", "create", "rbd/vol@s3"]);
    let d3 = a.root.path().join("s2-s3.diff");
    a.tern_ok(&[
        "export-diff",
        "--from-snap",
        "s2",
        "rbd/vol@s3",
        d3.to_str().unwrap(),
    ]);
    let full = std::fs::read(&d3).unwrap();
    let before = export_sum(&b, "rbd/vol");
    for cut in [5, 30, 60, full.len() / 2, full.len() - 1] {
        let t = b.root.path().join(format!("cut{cut}.diff"));
        std::fs::write(&t, &full[..cut]).unwrap();
        let (code, err) = b.tern_err(&["import-diff", t.to_str().unwrap(), "rbd/vol"]);
        assert_eq!(code, 22, "cut {cut}: {err}");
        assert!(
            err.contains("truncated") || err.contains("banner"),
            "cut {cut}: {err}"
        );
        assert_eq!(
            export_sum(&b, "rbd/vol"),
            before,
            "cut {cut} changed the image"
        );
    }
    let names_now = b.tern_json(&["snap", "ls", "rbd/vol"]);
    assert_eq!(names_now.as_array().unwrap().len(), 2, "{names_now}");
    b.tern_ok(&["create", "rbd/other", "--size", "32M"]);
    let (code, err) = b.tern_err(&["import-diff", d3.to_str().unwrap(), "rbd/other"]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("does not have"), "{err}");
    assert_eq!(b.tern_json(&["diff", "rbd/other"]), serde_json::json!([]));
    b.tern_ok(&["import-diff", d3.to_str().unwrap(), "rbd/vol"]);
    assert_eq!(export_sum(&b, "rbd/vol"), export_sum(&a, "rbd/vol@s3"));
    let (code, err) = b.tern_err(&["import-diff", d3.to_str().unwrap(), "rbd/vol"]);
    assert_eq!(code, 17, "{err}");
}

/// A stream written by the test straight from the published v1 and v2
/// descriptions (doc/dev/rbd-diff.rst), not by tern.
#[test]
fn hand_made_streams_import() {
    let s = site();
    s.tern_ok(&["create", "rbd/h", "--size", "1M"]);
    for v2 in [false, true] {
        let mut b: Vec<u8> = if v2 {
            b"rbd diff v2\n".to_vec()
        } else {
            b"rbd diff v1\n".to_vec()
        };
        let name = if v2 { "snap-v2" } else { "snap-v1" };
        let rec = |b: &mut Vec<u8>, tag: u8, payload: &[u8]| {
            b.push(tag);
            if v2 {
                b.extend((payload.len() as u64).to_le_bytes());
            }
            b.extend(payload);
        };
        let mut to = (name.len() as u32).to_le_bytes().to_vec();
        to.extend(name.as_bytes());
        rec(&mut b, b't', &to);
        rec(&mut b, b's', &(2 * MIB).to_le_bytes());
        let mut w = 4096u64.to_le_bytes().to_vec();
        w.extend(10u64.to_le_bytes());
        w.extend(b"0123456789");
        rec(&mut b, b'w', &w);
        let mut w = (MIB + 5).to_le_bytes().to_vec();
        w.extend(3u64.to_le_bytes());
        w.extend([0xaa, 0xbb, 0xcc]);
        rec(&mut b, b'w', &w);
        let mut z = 4100u64.to_le_bytes().to_vec();
        z.extend(2u64.to_le_bytes());
        rec(&mut b, b'z', &z);
        b.push(b'e');
        let mut child = s
            .tern_cmd()
            .args(["import-diff", "-", "rbd/h"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&b).unwrap();
        assert!(child.wait().unwrap().success());
        let out = s.root.path().join(format!("{name}.raw"));
        s.tern_ok(&["export", &format!("rbd/h@{name}"), out.to_str().unwrap()]);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(
            got.len() as u64,
            2 * MIB,
            "the 's' record resizes the image"
        );
        assert_eq!(&got[4096..4106], b"0123\x00\x006789");
        assert_eq!(
            &got[(MIB + 5) as usize..(MIB + 8) as usize],
            &[0xaa, 0xbb, 0xcc]
        );
    }
    // A stream whose data reaches past its own size record is refused.
    let mut b = b"rbd diff v1\n".to_vec();
    b.push(b's');
    b.extend((64 * 1024u64).to_le_bytes());
    b.push(b'w');
    b.extend((64 * 1024u64).to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend([1, 2, 3, 4]);
    b.push(b'e');
    let before = export_sum(&s, "rbd/h");
    let mut child = s
        .tern_cmd()
        .args(["import-diff", "-", "rbd/h"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&b).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("past its declared image size"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(export_sum(&s, "rbd/h"), before);
    assert_eq!(s.tern_json(&["info", "rbd/h"])["size"], 2 * MIB);
}

#[test]
fn export_format_2_carries_snapshots() {
    let a = site();
    let b = Site::start("site-b");
    b.tern_ok(&["pool", "create", "rbd"]);
    a.tern_ok(&[
        "create",
        "rbd/full",
        "--size",
        "8M",
        "--object-size",
        "64K",
        "--image-feature",
        "layering,exclusive-lock",
    ]);
    write_random(&a, "full", 20, 40, 8 * MIB);
    a.tern_ok(&["snap", "create", "rbd/full@one"]);
    a.tern_ok(&["snap", "protect", "rbd/full@one"]);
    write_random(&a, "full", 21, 40, 8 * MIB);
    a.tern_ok(&["snap", "create", "rbd/full@two"]);
    write_random(&a, "full", 22, 40, 8 * MIB);
    let f = a.root.path().join("full.v2");
    a.tern_ok(&[
        "export",
        "--export-format",
        "2",
        "rbd/full",
        f.to_str().unwrap(),
    ]);
    b.tern_ok(&[
        "import",
        "--export-format",
        "2",
        f.to_str().unwrap(),
        "rbd/full",
    ]);
    for spec in ["rbd/full", "rbd/full@one", "rbd/full@two"] {
        assert_eq!(export_sum(&b, spec), export_sum(&a, spec), "{spec}");
    }
    let ls = b.tern_json(&["snap", "ls", "rbd/full"]);
    assert_eq!(ls[0]["protected"], "true");
    assert_eq!(b.tern_json(&["info", "rbd/full"])["object_size"], 65536);
    // A truncated full export leaves no image behind.
    let bytes = std::fs::read(&f).unwrap();
    let t = b.root.path().join("cut.v2");
    std::fs::write(&t, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (code, err) = b.tern_err(&[
        "import",
        "--export-format",
        "2",
        t.to_str().unwrap(),
        "rbd/cut",
    ]);
    assert_eq!(code, 22, "{err}");
    assert_eq!(b.tern_json(&["ls", "rbd"]), serde_json::json!(["full"]));
}

#[test]
fn exclusive_lock_one_writer() {
    let s = site();
    s.tern_ok(&["config", "set", "global", "rbd_lock_lease_seconds", "3"]);
    s.tern_ok(&["create", "rbd/locked", "--size", "64M"]);
    let bench = |total: &str| {
        s.tern_cmd()
            .args([
                "bench",
                "rbd/locked",
                "--io-type",
                "write",
                "--io-size",
                "4K",
                "--io-threads",
                "2",
                "--io-total",
                total,
                "--io-pattern",
                "rand",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Writer 1 takes the lock.
    let first = bench("100G");
    assert!(tern_testkit::wait_until(Duration::from_secs(10), || {
        s.tern_json(&["lock", "ls", "rbd/locked"])
            .as_array()
            .is_some_and(|a| !a.is_empty())
    }));
    let locks = s.tern_json(&["lock", "ls", "rbd/locked"]);
    let (id, locker) = (
        locks[0]["id"].as_str().unwrap().to_string(),
        locks[0]["locker"].as_str().unwrap().to_string(),
    );
    assert_eq!(locker, "client.admin");
    // Writer 2 is refused while writer 1 holds it, naming the holder.
    let second = bench("1M").wait_with_output().unwrap();
    assert_eq!(
        second.status.code(),
        Some(16),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("locked by client.admin"));
    // So is a plain write without the lock.
    let rt = rt();
    let c = s.client(&rt);
    let e = rt
        .block_on(c.io().write(
            &ImageSpec::new("rbd", "locked"),
            0,
            vec![1; 4096],
            false,
            "",
        ))
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::Busy);
    // Breaking the lock fences writer 1: its next writes are refused and it stops.
    s.tern_ok(&["lock", "rm", "rbd/locked", &id, &locker]);
    let out = first.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(108),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fenced"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = rt
        .block_on(c.io().write(
            &ImageSpec::new("rbd", "locked"),
            0,
            vec![1; 4096],
            false,
            &id,
        ))
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::Fenced);
    // A writer killed with -9 loses the lock when its lease (3 s) runs out.
    let mut third = bench("100G");
    assert!(tern_testkit::wait_until(Duration::from_secs(10), || {
        s.tern_json(&["lock", "ls", "rbd/locked"])
            .as_array()
            .is_some_and(|a| !a.is_empty())
    }));
    third.kill().unwrap();
    third.wait().unwrap();
    let killed = std::time::Instant::now();
    let got = rt.block_on(async {
        loop {
            match tern_client::lock::LockGuard::acquire(&c, ImageSpec::new("rbd", "locked"), "test")
                .await
            {
                Ok(g) => return g,
                Err(e) => {
                    assert_eq!(e.kind, tern_types::ErrorKind::Busy, "{e}");
                    assert!(
                        killed.elapsed() < Duration::from_secs(5),
                        "lock not free 5 s after the holder died"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    eprintln!(
        "lock taken over {:?} after the holder was killed (lease 3 s)",
        killed.elapsed()
    );
    rt.block_on(c.io().write(
        &ImageSpec::new("rbd", "locked"),
        0,
        vec![7; 4096],
        false,
        got.cookie(),
    ))
    .unwrap();
}

/// kill -9 of ternd during writes and snapshot operations: every snapshot
/// whose create returned reads back as it was, and no diff misses a change.
#[test]
fn kill9_during_snapshots_keeps_them_and_their_diffs() {
    let mut s = site();
    let size = 8 * MIB;
    s.tern_ok(&["create", "rbd/k", "--size", "8M", "--object-size", "256K"]);
    let rt = rt();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let mut model = vec![0u8; size as usize];
    // name -> content at creation
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut n = 0;
    for round in 0..10 {
        let c = s.client(&rt);
        let ops = rng.random_range(5..40);
        let kill_at = rng.random_range(0..ops);
        let mut dead = false;
        for op in 0..ops {
            if op == kill_at {
                // Kill while an operation is in flight.
                let pid = s.pid().unwrap();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 5));
                    // SAFETY: signalling the ternd child of this test.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                });
            }
            let r = ImageSpec::new("rbd", "k");
            let res = match rng.random_range(0..10) {
                0..=6 => {
                    let len = rng.random_range(1..100_000u64);
                    let off = rng.random_range(0..size - len);
                    let data = random_bytes(n, len as usize);
                    n += 1;
                    let res = rt.block_on(c.io().write(&r, off, data.clone(), false, ""));
                    // A write that failed may or may not have landed; it is
                    // only in the model once acknowledged, and then checked
                    // only through snapshots taken after it.
                    if res.is_ok() {
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    res.map(|_| ())
                }
                7 => rt.block_on(c.io().flush(&r)).map(|_| ()),
                _ => {
                    let name = format!("r{round}o{op}");
                    let res = rt.block_on(c.snap().create(&r, &name));
                    if res.is_ok() {
                        snaps.push((name, model.clone()));
                    }
                    res.map(|_| ())
                }
            };
            if res.is_err() {
                dead = true;
                break;
            }
        }
        if !dead {
            s.kill9();
        }
        s.restart();
        // The in-flight write may have landed: resync the model to the head.
        let head = read_all(&s, &rt, None, size);
        model = head.clone();
        let c = s.client(&rt);
        let listed = rt
            .block_on(c.snap().list(&ImageSpec::new("rbd", "k"), true))
            .unwrap();
        for (name, content) in &snaps {
            assert!(
                listed.iter().any(|x| &x.name == name),
                "round {round}: snapshot {name} lost"
            );
            let got = read_all(&s, &rt, Some(name), size);
            assert!(&got == content, "round {round}: snapshot {name} changed");
            // diff(name -> head) covers every 4 KiB block that differs.
            let d = rt
                .block_on(c.snap().diff(DiffRequest {
                    image: ImageSpec::new("rbd", "k"),
                    from_snap: name.clone(),
                    ..Default::default()
                }))
                .unwrap();
            let mut covered = vec![false; size as usize];
            for e in &d.extents {
                covered[e.offset as usize..(e.offset + e.length) as usize].fill(true);
            }
            for i in 0..size as usize {
                if got[i] != head[i] {
                    assert!(
                        covered[i],
                        "round {round}: diff from {name} misses byte {i}: {:?}",
                        d.extents
                    );
                }
            }
        }
    }
    assert!(!snaps.is_empty());
}

fn read_all(s: &Site, rt: &tokio::runtime::Runtime, snap: Option<&str>, size: u64) -> Vec<u8> {
    let c = s.client(rt);
    let mut out = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(4 << 20) {
        let r = ImageSpec::new("rbd", "k").at(snap);
        let len = (4 << 20).min(size - off);
        out.extend(rt.block_on(c.io().read(&r, off, len)).unwrap());
    }
    out
}
