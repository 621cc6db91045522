//! A site that one hostile caller cannot break (issue 23): revoked keys
//! stay revoked and guessing is slowed, hostile names cannot break the
//! metrics page, a tampered token's site name is refused with nothing
//! stored, an image open through NBD cannot be removed under its writer,
//! mirror snapshots stay under their cap whoever asks for them, and the
//! small things (exit codes, odd files, invisible characters, config
//! ranges) say what happened.

use base64::Engine;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_client::SiteClient;
use tern_client::config::TlsMode;
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Site, http_get, random_bytes, rt, wait_until};
use tern_types::ImageSpec;
use tern_types::api::{MirrorSiteStatus, StatusReport};

fn keyring_key(ring: &str) -> String {
    ring.lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .expect("a key line")
        .to_string()
}

fn create_user(s: &Site, entity: &str, osd: &str, out: &Path) -> String {
    s.tern_ok(&[
        "auth",
        "get-or-create",
        entity,
        "mon",
        "profile rbd",
        "osd",
        osd,
        "-o",
        out.to_str().unwrap(),
    ]);
    keyring_key(&std::fs::read_to_string(out).unwrap())
}

fn as_user(s: &Site, id: &str, ring: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec!["--id", id, "--keyring", ring.to_str().unwrap()];
    a.extend_from_slice(args);
    s.tern(&a)
}

fn token_json(token: &str) -> serde_json::Value {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn token_of(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_string(v).unwrap())
}

/// Item 1: a removed and re-created entity gets a new key (also across a
/// restart, also for the peer user behind bootstrap tokens), `auth caps`
/// changes caps in place, and failed logins lock the address out.
#[test]
fn revoked_keys_stay_revoked_caps_change_in_place_and_guessing_is_slowed() {
    let mut s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/img", "--size", "4M"]);
    let ring = s.root.path().join("x.keyring");
    let k1 = create_user(&s, "client.x", "profile rbd", &ring);
    let old = s.root.path().join("x-old.keyring");
    std::fs::copy(&ring, &old).unwrap();
    assert!(as_user(&s, "x", &ring, &["ls"]).status.success());
    s.tern_ok(&["auth", "rm", "client.x"]);
    let k2 = create_user(&s, "client.x", "profile rbd", &ring);
    assert_ne!(k1, k2, "a re-created entity got its revoked key back");
    let o = as_user(&s, "x", &old, &["ls"]);
    assert_eq!(o.status.code(), Some(13), "the revoked key still works");
    assert!(as_user(&s, "x", &ring, &["ls"]).status.success());
    // After a restart, still never an old key.
    s.restart();
    s.tern_ok(&["auth", "rm", "client.x"]);
    let k3 = create_user(&s, "client.x", "profile rbd", &ring);
    assert!(k3 != k1 && k3 != k2, "{k1} {k2} {k3}");

    // auth caps: new caps, same key; the permission hint names it.
    s.tern_ok(&[
        "auth",
        "caps",
        "client.x",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd-read-only",
    ]);
    assert_eq!(
        s.tern_ok(&["auth", "print-key", "client.x"]).trim(),
        k3,
        "auth caps changed the key"
    );
    let o = as_user(&s, "x", &ring, &["rm", "rbd/img"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tern auth caps client.x mon 'profile rbd' osd 'profile rbd pool=rbd'"),
        "{err}"
    );
    s.tern_ok(&[
        "auth",
        "caps",
        "client.x",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=rbd",
    ]);
    s.tern_ok(&["create", "rbd/other", "--size", "4M"]);
    let o = as_user(&s, "x", &ring, &["rm", "rbd/other"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ls = s.tern_json(&["auth", "ls"]);
    let x = ls["auth_dump"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entity"] == "client.x")
        .unwrap()
        .clone();
    assert_eq!(x["caps"]["osd"], "profile rbd pool=rbd", "{x}");
    let (code, err) = s.tern_err(&["auth", "caps", "client.nobody", "osd", "profile rbd"]);
    assert_eq!(code, 2, "{err}");
    let (code, err) = s.tern_err(&["auth", "caps", "client.x", "osd", "profile bogus"]);
    assert_eq!(code, 22, "{err}");

    // The peer user behind a bootstrap token: re-created, the old token's key is dead.
    s.tern_ok(&[
        "mirror",
        "pool",
        "enable",
        "rbd",
        "image",
        "--site-name",
        "site-a",
    ]);
    let t1 = token_json(&s.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]));
    s.tern_ok(&["auth", "rm", "client.rbd-mirror-peer"]);
    let t2 = token_json(&s.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]));
    assert_ne!(t1["key"], t2["key"]);
    let rt = rt();
    let _g = rt.enter();
    let tls = TlsMode::Pinned(t1["tls_fingerprint"].as_str().unwrap().to_string());
    let hello = |key: &str| {
        let c = SiteClient::connect_with(&s.addr, &tls, "client.rbd-mirror-peer", key).unwrap();
        rt.block_on(c.hello())
    };
    let e = hello(t1["key"].as_str().unwrap()).unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::Unauthenticated, "{e}");
    hello(t2["key"].as_str().unwrap()).unwrap();

    // Failed logins: the first few answer "wrong key"; then the address is
    // locked out (even a right key waits), for a doubling time.
    let bad = s.root.path().join("bad.keyring");
    std::fs::write(
        &bad,
        "[client.admin]\n\tkey = AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n",
    )
    .unwrap();
    let guess = || s.tern_err(&["--keyring", bad.to_str().unwrap(), "ls"]);
    // One guess above already (the revoked peer key).
    for _ in 0..4 {
        let (code, err) = guess();
        assert_eq!(code, 13, "{err}");
        assert!(err.contains("authentication failed"), "{err}");
    }
    let (code, err) = guess();
    assert_eq!(code, 13, "{err}");
    assert!(err.contains("too many failed logins"), "{err}");
    let (code, err) = s.tern_err(&["ls"]);
    assert_eq!(code, 13, "a right key is refused during a lockout: {err}");
    assert!(err.contains("refused for"), "{err}");
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    s.tern_ok(&["ls"]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a success was slowed: {:?}",
        t.elapsed()
    );
    // The next failure doubles the lockout (0.5 s, then 1 s).
    let (_, err) = guess();
    assert!(err.contains("refused for 1.0 s"), "{err}");
    std::thread::sleep(Duration::from_millis(1200));
    s.tern_ok(&["ls"]);
}

/// Item 6: hostile names cannot break /metrics; promtool parses the page
/// and the names come back as they were.
#[test]
fn metrics_escape_hostile_label_values() {
    let s = Site::start("site-a");
    let pool = "p\"\\q";
    s.tern_ok(&["pool", "create", pool]);
    s.tern_ok(&["mirror", "pool", "enable", pool, "image"]);
    let names = ["k\"z", "a\\b", "x{y}=,", "ü名\\\"", "end\\"];
    for n in names {
        let spec = format!("{pool}/{n}");
        s.tern_ok(&["create", &spec, "--size", "4M"]);
        s.tern_ok(&["mirror", "image", "enable", &spec, "snapshot"]);
    }
    let (code, page) = http_get(&s.http_addr, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let file = s.root.path().join("metrics.txt");
    std::fs::write(&file, &page).unwrap();
    let o = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (scripts/deps.sh installs the prometheus package)");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && !out.contains("parsing error"),
        "promtool: {out}\n{page}"
    );
    // Each name reads back from the escaped label value.
    let unescape = |v: &str| {
        let mut out = String::new();
        let mut it = v.chars();
        while let Some(c) = it.next() {
            if c == '\\' {
                match it.next() {
                    Some('n') => out.push('\n'),
                    Some(c) => out.push(c),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let images: Vec<(String, String)> = page
        .lines()
        .filter(|l| l.starts_with("tern_mirror_image_primary{"))
        .map(|l| {
            let label = |k: &str| {
                let start = l.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
                let rest = &l[start..];
                let mut end = 0;
                let b = rest.as_bytes();
                while b[end] != b'"' {
                    end += if b[end] == b'\\' { 2 } else { 1 };
                }
                unescape(&rest[..end])
            };
            (label("pool"), label("image"))
        })
        .collect();
    for n in names {
        assert!(
            images.contains(&(pool.to_string(), n.to_string())),
            "{n:?} not read back from {images:?}\n{page}"
        );
    }
}

fn mirror_site(name: &str) -> Site {
    let s = Site::start(name);
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&[
        "mirror",
        "pool",
        "enable",
        "rbd",
        "image",
        "--site-name",
        name,
    ]);
    s
}

fn peers(s: &Site) -> usize {
    s.tern_json(&["mirror", "pool", "info", "rbd"])["peers"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Item 7: a token whose site_name was altered is refused, loudly, and
/// nothing is stored on either site.
#[test]
fn tampered_token_site_name_is_refused_and_nothing_stored() {
    let a = mirror_site("site-a");
    let b = mirror_site("site-b");
    let token = a.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]);
    let good = token_json(&token);
    let info_before = b.tern_ok(&["mirror", "pool", "info", "rbd"]);
    for (name, why) in [
        ("evil\nsite-z: forged line", "visible characters"),
        ("\u{1b}[31mred\u{1b}[0m", "visible characters"),
        ("a\u{202e}b", "visible characters"),
        (&"x".repeat(10_000), "at most 64"),
        ("site-b", "this site's own name"),
        ("site-c", "calls itself 'site-a'"),
    ] {
        let mut t = good.clone();
        t["site_name"] = name.into();
        let o = b.try_import_token(&token_of(&t), "site-b");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{name:?} was accepted");
        assert!(err.contains(why), "{name:?}: {err}");
        assert!(
            !err.chars().any(|c| c == '\u{1b}' || c == '\u{202e}')
                && err.trim_end().lines().count() == 1
                && err.len() < 1000,
            "raw input echoed: {err:?}"
        );
        assert_eq!(peers(&b), 0, "{name:?}: a peer was stored");
        assert_eq!(peers(&a), 0, "{name:?}: a reverse peer was stored");
        assert_eq!(b.tern_ok(&["mirror", "pool", "info", "rbd"]), info_before);
    }
    // A local site name that is not a name is refused before anything too.
    let o = b.try_import_token(&token, "bad\u{7}name");
    assert!(!o.status.success());
    assert_eq!(peers(&b), 0);
    // The untouched token works.
    b.import_token(&token, "site-b");
    let ib = b.tern_json(&["mirror", "pool", "info", "rbd"]);
    assert_eq!(ib["peers"][0]["site_name"], "site-a", "{ib}");
    assert_eq!(peers(&a), 1);
    // A peer's key cannot forge a site's name in status reports either.
    let rt = rt();
    let _g = rt.enter();
    let peer = SiteClient::connect_with(
        &a.addr,
        &TlsMode::Pinned(good["tls_fingerprint"].as_str().unwrap().to_string()),
        "client.rbd-mirror-peer",
        good["key"].as_str().unwrap(),
    )
    .unwrap();
    let e = rt
        .block_on(peer.mirror_daemon().status_report(StatusReport {
            pool: "rbd".into(),
            global_id: "g".into(),
            status: MirrorSiteStatus {
                site_name: "site-b\nforged: OK".into(),
                ..Default::default()
            },
            daemon: None,
        }))
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::InvalidArgument, "{e}");
}

/// The NBD error of the reply to request `h`.
fn wait_reply(c: &mut NbdClient, h: u64) -> u32 {
    let r = c
        .replies
        .recv_timeout(Duration::from_secs(30))
        .expect("a reply");
    assert_eq!(r.handle, h);
    r.error
}

/// Item 8: `rm` refuses while an NBD client has the image open (as rbd
/// refuses while an image has watchers), naming who; the writer keeps
/// working; once it disconnects, rm goes through.
#[test]
fn rm_refused_while_an_nbd_client_has_the_image_open() {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/locked", "--size", "16M"]);
    s.tern_ok(&[
        "create",
        "rbd/plain",
        "--size",
        "16M",
        "--image-feature",
        "layering",
    ]);
    for (image, who) in [
        (
            "locked",
            "an NBD client writing to rbd/locked (exclusive lock nbd ",
        ),
        ("plain", "an NBD client writing to rbd/plain"),
    ] {
        let spec = format!("rbd/{image}");
        let mut c = NbdClient::connect(&s.nbd_addr, &spec).unwrap();
        let data = random_bytes(7, 1 << 20);
        let h = c.send_write(0, &data, true).unwrap();
        assert_eq!(wait_reply(&mut c, h), 0);
        let (code, err) = s.tern_err(&["rm", &spec]);
        assert_eq!(code, 16, "{err}");
        assert!(err.contains("image has watchers - not removing"), "{err}");
        assert!(err.contains(who), "{err}");
        // Still there, and the writer still writes and reads.
        s.tern_ok(&["info", &spec]);
        let h = c.send_write(1 << 20, &data, true).unwrap();
        assert_eq!(wait_reply(&mut c, h), 0);
        assert_eq!(c.read(0, 1 << 20).unwrap(), data);
        c.disconnect();
        assert!(
            wait_until(Duration::from_secs(10), || s
                .tern(&["rm", &spec])
                .status
                .success()),
            "rm still refused after the client left"
        );
    }
    assert_eq!(s.tern_ok(&["ls", "rbd"]).trim(), "");
}

fn primary_snaps(s: &Site, image: &str) -> usize {
    s.tern_json(&["snap", "ls", "--all", &format!("rbd/{image}")])
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| {
            matches!(
                x["namespace"]["state"].as_str(),
                Some("primary") | Some("demoted")
            )
        })
        .count()
}

/// Item 9: whoever asks (an operator, a schedule, a peer's key), an image
/// keeps at most rbd_mirroring_max_mirroring_snapshots mirror snapshots;
/// a peer that never synced is reported as fallen behind, and once its
/// daemon runs it still ends byte-equal.
#[test]
fn mirror_snapshots_stay_under_their_cap_and_a_late_peer_ends_equal() {
    let a = mirror_site("site-a");
    let b = mirror_site("site-b");
    let token = a.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]);
    b.import_token(&token, "site-b");
    let t = token_json(&token);
    for (image, mode, features) in [
        ("snap", "snapshot", "exclusive-lock"),
        ("jrnl", "journal", "exclusive-lock,journaling"),
    ] {
        a.tern_ok(&[
            "create",
            &format!("rbd/{image}"),
            "--size",
            "32M",
            "--image-feature",
            features,
        ]);
        a.tern_ok(&["mirror", "image", "enable", &format!("rbd/{image}"), mode]);
    }
    let rt = rt();
    let admin = a.client(&rt);
    let peer = {
        let _g = rt.enter();
        SiteClient::connect_with(
            &a.addr,
            &TlsMode::Pinned(t["tls_fingerprint"].as_str().unwrap().to_string()),
            "client.rbd-mirror-peer",
            t["key"].as_str().unwrap(),
        )
        .unwrap()
    };
    rt.block_on(async {
        for i in 0..150u64 {
            admin
                .io()
                .write(
                    &ImageSpec::new("rbd", "snap"),
                    (i % 32) << 20,
                    random_bytes(i, 64 << 10),
                    false,
                    "",
                )
                .await
                .unwrap();
            admin
                .mirror()
                .image_snapshot(&ImageSpec::new("rbd", "snap"))
                .await
                .unwrap();
        }
        // A peer key may not take snapshots of a snapshot-mode image...
        let e = peer
            .mirror()
            .image_snapshot(&ImageSpec::new("rbd", "snap"))
            .await
            .unwrap_err();
        assert_eq!(e.kind, tern_types::ErrorKind::PermissionDenied, "{e}");
        // ...and its sync points on a journal-mode image stay under the cap.
        for _ in 0..150 {
            peer.mirror()
                .image_snapshot(&ImageSpec::new("rbd", "jrnl"))
                .await
                .unwrap();
        }
    });
    assert!(
        primary_snaps(&a, "snap") <= 5,
        "{}",
        primary_snaps(&a, "snap")
    );
    assert!(
        primary_snaps(&a, "jrnl") <= 5,
        "{}",
        primary_snaps(&a, "jrnl")
    );
    // The peer that never synced shows as fallen behind.
    let st = a.tern_json(&["mirror", "image", "status", "rbd/snap"]);
    let p = &st["peer_sites"][0];
    assert!(
        p["description"].as_str().unwrap().contains("fell behind:"),
        "{st}"
    );
    // The cap is a config option with a range.
    let (code, err) = a.tern_err(&[
        "config",
        "set",
        "client",
        "rbd_mirroring_max_mirroring_snapshots",
        "1",
    ]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("allowed 3 to 1000"), "{err}");

    // The peer's daemon starts late and still ends equal.
    let _mb = b.start_mirror();
    let want = a.export_sha256("rbd/snap");
    let synced = wait_until(Duration::from_secs(60), || {
        let o = b.tern(&["info", "rbd/snap"]);
        o.status.success() && {
            let st = a.tern_json(&["mirror", "image", "status", "rbd/snap"]);
            !st["peer_sites"][0]["description"]
                .as_str()
                .unwrap_or("fell behind")
                .contains("fell behind")
                && st["peer_sites"][0]["state"]
                    .as_str()
                    .is_some_and(|s| s.contains("replaying"))
        }
    });
    assert!(
        synced,
        "{}",
        b.tern_ok(&["mirror", "pool", "status", "rbd", "--verbose"])
    );
    let newest = a.tern_json(&["snap", "ls", "--all", "rbd/snap"]);
    let newest = newest.as_array().unwrap().last().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        wait_until(Duration::from_secs(60), || {
            b.tern_json(&["snap", "ls", "--all", "rbd/snap"])
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["namespace"]["complete"] == true && x["name"].as_str().is_some())
        }),
        "no complete copy on site-b"
    );
    let _ = newest;
    assert!(
        wait_until(Duration::from_secs(60), || b.export_sha256("rbd/snap")
            == want),
        "site-b's copy differs from the primary"
    );
    assert!(primary_snaps(&a, "snap") <= 5);
}

/// A tmpfs of `size` at `dir`, seen by this thread and the processes it
/// starts only (as in full_disk.rs).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        let c = |s: &[u8]| CString::new(s).unwrap();
        let (root, tmpfs) = (c(b"/"), c(b"tmpfs"));
        let target = c(dir.as_os_str().as_bytes());
        let opts = c(format!("size={size}").as_bytes());
        // SAFETY: plain syscalls on valid NUL-terminated strings; the mount
        // namespace belongs to this thread.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0);
            assert_eq!(
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                0
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

/// Item 10: a full output disk exits 28; `import /dev/zero` says what is
/// wrong; names with invisible characters are refused and never echoed
/// raw; out-of-range config values are refused with their range.
#[test]
fn small_hostile_inputs_get_clear_answers() {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    let src = s.root.path().join("img.raw");
    std::fs::write(&src, random_bytes(3, 16 << 20)).unwrap();
    s.tern_ok(&["import", src.to_str().unwrap(), "rbd/img"]);

    // Export onto a full filesystem, and into a full device.
    let dir = s.root.path().join("small");
    std::fs::create_dir(&dir).unwrap();
    let _fs = SmallFs::mount(&dir, "4M");
    let out = dir.join("out.raw");
    let (code, err) = s.tern_err(&["export", "rbd/img", out.to_str().unwrap()]);
    assert_eq!(code, 28, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!out.exists(), "a partial export was left behind");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = s
        .tern_cmd()
        .args(["export", "rbd/img", "-"])
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(28),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A character device has no size.
    let (code, err) = s.tern_err(&["import", "/dev/zero", "rbd/zero"]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("is a character device"), "{err}");
    assert!(!err.contains("empty"), "{err}");
    // A pipe is read to its end.
    let fifo = s.root.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let writer = {
        let (fifo, src) = (fifo.clone(), src.clone());
        std::thread::spawn(move || {
            std::fs::write(&fifo, std::fs::read(src).unwrap()).unwrap();
        })
    };
    s.tern_ok(&["import", fifo.to_str().unwrap(), "rbd/piped"]);
    writer.join().unwrap();
    assert_eq!(
        s.export_sha256("rbd/piped"),
        tern_testkit::sha256_file(&src)
    );

    // Invisible characters: refused for every kind of name, shown escaped.
    for bad in [
        "a\u{202e}b",
        "zw\u{200b}j",
        "bom\u{feff}",
        "iso\u{2066}x",
        "esc\u{1b}[31m",
        "nl\nx",
        "tab\tx",
    ] {
        for args in [
            vec!["pool".to_string(), "create".into(), bad.into()],
            vec![
                "create".into(),
                format!("rbd/{bad}"),
                "--size".into(),
                "4M".into(),
            ],
            vec!["snap".into(), "create".into(), format!("rbd/img@{bad}")],
            vec!["rename".into(), "rbd/img".into(), format!("rbd/{bad}")],
        ] {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, err) = s.tern_err(&a);
            assert_eq!(code, 22, "{a:?}: {err}");
            assert!(err.contains("visible characters"), "{a:?}: {err}");
            assert!(
                !err.chars()
                    .any(|c| tern_types::text::is_invisible(c) && !matches!(c, ' ' | '\n')),
                "{a:?}: raw characters echoed: {err:?}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
        }
    }
    let (code, err) = s.tern_err(&[
        "auth",
        "get-or-create",
        "client.a\u{202e}b",
        "osd",
        "profile rbd",
    ]);
    assert_eq!(code, 22, "{err}");
    assert!(!err.contains('\u{202e}'), "{err:?}");
    assert_eq!(s.tern_ok(&["ls", "rbd"]).lines().count(), 2);

    // Config values outside their range are refused, with the range.
    for (key, value, range) in [
        ("rbd_default_order", "40", "allowed 12 to 30"),
        ("rbd_journal_object_size", "1K", "allowed 64 KiB to 1 GiB"),
        ("rbd_lock_lease_seconds", "0", "allowed 1 to 3600"),
        (
            "rbd_mirror_concurrent_image_syncs",
            "0",
            "allowed 1 to 1024",
        ),
    ] {
        let (code, err) = s.tern_err(&["config", "set", "global", key, value]);
        assert_eq!(code, 22, "{key}={value}: {err}");
        assert!(err.contains(range), "{key}={value}: {err}");
    }
    s.tern_ok(&["config", "set", "global", "rbd_default_order", "20"]);
}
