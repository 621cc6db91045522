//! Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) against a real
//! ternd, and `tern device map` giving a block device that carries ext4.

use std::process::Command;
use tern_testkit::{Site, random_bytes, sha256_file};

const MIB: u64 = 1 << 20;

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A missing tool skips the test on a developer's machine; under CI it
/// fails it, so a green CI never means "not run".
fn skip(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and {why}"
    );
    eprintln!("skipping: {why}");
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn site() -> Site {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s
}

/// Data extents (offset, length) from `nbdinfo --map --json`, merged.
fn nbd_data_map(uri: &str, context: Option<&str>, flag_set_means_data: bool) -> Vec<(u64, u64)> {
    let mut cmd = Command::new("nbdinfo");
    match context {
        Some(c) => cmd.arg(format!("--map={c}")),
        None => cmd.arg("--map"),
    };
    let out = ok(cmd.arg("--json").arg(uri));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let mut r: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let t = e["type"].as_u64().unwrap();
        let is = if flag_set_means_data {
            t & 1 == 1
        } else {
            t & 1 == 0
        };
        if is {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match r.last_mut() {
                Some((po, pl)) if *po + *pl == o => *pl += l,
                _ => r.push((o, l)),
            }
        }
    }
    r
}

fn tern_diff(s: &Site, spec: &str, from: Option<&str>) -> Vec<(u64, u64)> {
    let mut args = vec!["diff", spec];
    if let Some(f) = from {
        args.extend(["--from-snap", f]);
    }
    let v = s.tern_json(&args);
    let mut r: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if from.is_none() && e["exists"] != "true" {
            continue;
        }
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match r.last_mut() {
            Some((po, pl)) if *po + *pl == o => *pl += l,
            _ => r.push((o, l)),
        }
    }
    r
}

#[test]
fn qemu_img_nbdcopy_and_nbdinfo() {
    for b in ["qemu-img", "nbdcopy", "nbdinfo"] {
        if !have(b) {
            skip(&format!(
                "{b} is not installed (scripts/deps.sh installs it)"
            ));
            return;
        }
    }
    let s = site();
    s.tern_ok(&["create", "rbd/img", "--size", "256M"]);
    let src = s.root.path().join("src.raw");
    let mut data = random_bytes(3, (256 * MIB) as usize);
    data[(64 * MIB) as usize..(96 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let uri = s.nbd_uri("rbd/img");
    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    let back = s.root.path().join("back.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back));
    assert_eq!(sha256_file(&src), sha256_file(&back), "qemu-img round trip");
    // The CLI sees the same bytes.
    let exp = s.root.path().join("exp.raw");
    s.tern_ok(&["export", "rbd/img", exp.to_str().unwrap()]);
    assert_eq!(sha256_file(&src), sha256_file(&exp));

    // nbdcopy both ways, into a second image.
    s.tern_ok(&["create", "rbd/copy", "--size", "256M"]);
    ok(Command::new("nbdcopy").arg(&src).arg(s.nbd_uri("rbd/copy")));
    let out = s.root.path().join("nbdcopy.raw");
    ok(Command::new("nbdcopy").arg(s.nbd_uri("rbd/copy")).arg(&out));
    assert_eq!(sha256_file(&src), sha256_file(&out), "nbdcopy round trip");

    // nbdinfo --map shows holes and data exactly where tern diff does.
    s.tern_ok(&["create", "rbd/sparse", "--size", "64M"]);
    let q = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        ok(c.arg(s.nbd_uri("rbd/sparse")))
    };
    q(&[
        "write -P 0x11 1M 192k",
        "write -P 0x22 40M 4k",
        "write -P 0x33 63M 1M",
    ]);
    let nbd = nbd_data_map(&s.nbd_uri("rbd/sparse"), None, false);
    let tern = tern_diff(&s, "rbd/sparse", None);
    assert_eq!(nbd, tern, "nbdinfo --map vs tern diff");
    assert_eq!(
        tern,
        vec![(MIB, 192 * 1024), (40 * MIB, 4096), (63 * MIB, MIB)]
    );

    // tern:changed-since:<snap> is what backup tools read for deltas.
    s.tern_ok(&["snap", "create", "rbd/sparse@s1"]);
    q(&["write -P 0x44 10M 8k", "write -z 63M 64k"]);
    let changed = nbd_data_map(
        &s.nbd_uri("rbd/sparse"),
        Some("tern:changed-since:s1"),
        true,
    );
    assert_eq!(
        changed,
        tern_diff(&s, "rbd/sparse", Some("s1")),
        "changed-since vs tern diff"
    );
    assert!(
        changed
            .iter()
            .any(|(o, _)| *o <= 10 * MIB && 10 * MIB < o + 8192 + 65536),
        "{changed:?}"
    );
}

#[test]
fn qemu_io_against_a_model_and_read_only_exports() {
    if !have("qemu-io") {
        skip("qemu-io is not installed");
        return;
    }
    let s = site();
    s.tern_ok(&["create", "rbd/m", "--size", "8M", "--object-size", "1M"]);
    let uri = s.nbd_uri("rbd/m");
    let mut model = vec![0u8; (8 * MIB) as usize];
    let mut cmds: Vec<String> = Vec::new();
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for i in 0..40 {
        let len = rng.random_range(1..64u64) * 512;
        let off = rng.random_range(0..(8 * MIB - len) / 512) * 512;
        let (o, e) = (off as usize, (off + len) as usize);
        match i % 4 {
            0 | 1 => {
                let pat = rng.random_range(1..255u8);
                model[o..e].fill(pat);
                cmds.push(format!("write -P {pat} {off} {len}"));
            }
            2 => {
                model[o..e].fill(0);
                cmds.push(format!("write -z {off} {len}"));
            }
            _ => {
                model[o..e].fill(0);
                cmds.push(format!("discard {off} {len}"));
            }
        }
        if i % 5 == 0 {
            cmds.push("flush".into());
        }
    }
    // Reads with pattern checks inside the same session.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in &cmds {
        c.args(["-c", x]);
    }
    ok(c.arg(&uri));
    let out = s.root.path().join("m.raw");
    s.tern_ok(&["export", "rbd/m", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == model,
        "image differs from the model after qemu-io"
    );
    let pat = model[4096];
    let o = ok(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", &format!("read -P {pat} 4096 1")])
        .arg(&uri));
    assert!(!o.contains("Pattern verification failed"), "{o}");

    // A snapshot export reads the snapshot and refuses writes.
    s.tern_ok(&["snap", "create", "rbd/m@s1"]);
    ok(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 64k"])
        .arg(&uri));
    let snap_uri = s.nbd_uri("rbd/m@s1");
    let o = ok(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-r",
            "-c",
            &format!("read -P {} 0 512", model[0]),
        ])
        .arg(&snap_uri));
    assert!(
        !o.contains("Pattern verification failed"),
        "snapshot export does not read the snapshot: {o}"
    );
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(&snap_uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success()
            || text.contains("denied")
            || text.contains("read-only")
            || text.contains("Operation not permitted"),
        "write to a snapshot export: {text}"
    );
    let snap_out = s.root.path().join("s1.raw");
    s.tern_ok(&["export", "rbd/m@s1", snap_out.to_str().unwrap()]);
    assert!(
        std::fs::read(&snap_out).unwrap() == model,
        "the snapshot changed"
    );
}

#[test]
fn a_writable_export_holds_the_lock() {
    if !have("nbdfuse") || !have("qemu-io") {
        skip("nbdfuse or qemu-io missing");
        return;
    }
    let s = site();
    s.tern_ok(&["create", "rbd/l", "--size", "16M"]);
    // Keep the export open for writing with a long-running client.
    let mnt = s.root.path().join("hold");
    std::fs::create_dir_all(&mnt).unwrap();
    let fuse = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(s.nbd_uri("rbd/l"))
        .spawn()
        .unwrap();
    // Unmounted and reaped even if an assertion below fails.
    struct Fuse(std::process::Child, std::path::PathBuf);
    impl Drop for Fuse {
        fn drop(&mut self) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.1).status();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let fuse = Fuse(fuse, mnt.clone());
    assert!(tern_testkit::wait_until(
        std::time::Duration::from_secs(10),
        || mnt.join("nbd").exists()
    ));
    let locks = s.tern_json(&["lock", "ls", "rbd/l"]);
    assert_eq!(locks[0]["locker"], "nbd", "{locks}");
    // A second writer is refused, over NBD and over the API.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(s.nbd_uri("rbd/l"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    // NBD cannot ask for read-only access: a second client gets the export
    // read-only, so a writable open fails.
    assert!(!o.status.success(), "second writer not refused: {text}");
    let t = text.to_lowercase();
    assert!(
        t.contains("read-only") || t.contains("permission denied"),
        "{text}"
    );
    let (code, err) = s.tern_err(&["bench", "rbd/l", "--io-type", "write", "--io-total", "4K"]);
    assert_eq!(code, 16, "{err}");
    // Read-only access still works.
    ok(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read 0 4k"])
        .arg(s.nbd_uri("rbd/l")));
    drop(fuse);
    assert!(tern_testkit::wait_until(
        std::time::Duration::from_secs(5),
        || {
            s.tern_json(&["lock", "ls", "rbd/l"])
                .as_array()
                .is_some_and(|a| a.is_empty())
        }
    ));
}

#[test]
fn fio_random_io_verifies() {
    if !have("fio") {
        skip("fio is not installed");
        return;
    }
    let s = site();
    s.tern_ok(&["create", "rbd/f", "--size", "64M"]);
    let uri = s.nbd_uri("rbd/f");
    ok(Command::new("fio").args([
        "--name=v",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=32M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--verify_fatal=1",
    ]));
}

#[test]
fn device_map_carries_ext4() {
    let root = unsafe { libc::geteuid() } == 0;
    if !root
        || !have("nbdfuse")
        || !have("losetup")
        || !have("mkfs.ext4")
        || !std::path::Path::new("/dev/fuse").exists()
    {
        skip("needs root, /dev/fuse, nbdfuse, losetup and mkfs.ext4");
        return;
    }
    let s = site();
    s.tern_ok(&["create", "rbd/fs", "--size", "128M"]);
    let state = s.root.path().join("state");
    let tern = |args: &[&str]| {
        let o = s
            .tern_cmd()
            .env("TERN_STATE_DIR", &state)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tern {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let mnt = s.root.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let dev = tern(&["device", "map", "rbd/fs"]);
    assert!(dev.starts_with("/dev/"), "{dev}");
    assert!(tern(&["device", "list"]).contains("rbd/fs"));
    ok(Command::new("mkfs.ext4").args(["-q", &dev]));
    ok(Command::new("mount").arg(&dev).arg(&mnt));
    let payload = random_bytes(9, 3 << 20);
    std::fs::write(mnt.join("data.bin"), &payload).unwrap();
    std::fs::write(mnt.join("hello.txt"), "hello from tern\n").unwrap();
    ok(Command::new("umount").arg(&mnt));
    tern(&["device", "unmap", &dev]);
    assert!(!tern(&["device", "list"]).contains("rbd/fs"));

    s.tern_ok(&["snap", "create", "rbd/fs@before"]);
    let dev = tern(&["device", "map", "rbd/fs"]);
    ok(Command::new("mount").arg(&dev).arg(&mnt));
    assert_eq!(std::fs::read(mnt.join("data.bin")).unwrap(), payload);
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "hello from tern\n"
    );
    std::fs::write(mnt.join("later.txt"), "after the snapshot\n").unwrap();
    ok(Command::new("umount").arg(&mnt));
    tern(&["device", "unmap", "rbd/fs"]);

    // The snapshot maps read-only and has the files as they were.
    let dev = tern(&["device", "map", "rbd/fs@before"]);
    ok(Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&dev)
        .arg(&mnt));
    assert_eq!(std::fs::read(mnt.join("data.bin")).unwrap(), payload);
    assert!(!mnt.join("later.txt").exists());
    ok(Command::new("umount").arg(&mnt));
    tern(&["device", "unmap", &dev]);
}

/// STARTTLS with the site certificate: a client that trusts the site's
/// certificate (as its CA) gets an encrypted connection.
#[test]
fn nbd_over_tls_with_the_site_certificate() {
    if !have("nbdinfo") {
        skip("nbdinfo is not installed");
        return;
    }
    let s = site();
    s.tern_ok(&["create", "rbd/t", "--size", "4M"]);
    let certs = s.root.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(s.data.join("tls/cert.pem"), certs.join("ca-cert.pem")).unwrap();
    let port = s.nbd_addr.rsplit_once(':').unwrap().1;
    let uri = format!(
        "nbds://localhost:{port}/rbd/t?tls-certificates={}",
        certs.display()
    );
    let out = ok(Command::new("nbdinfo").arg(&uri));
    assert!(out.contains("using TLS") || out.contains("TLS"), "{out}");
    assert!(out.contains("export-size: 4194304"), "{out}");
}
