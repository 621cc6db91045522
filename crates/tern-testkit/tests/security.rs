//! Every call is authenticated and authorised; a wrong key, a missing key,
//! a read-only user writing, a removed user and a certificate that does not
//! match the pinned fingerprint are refused, and nothing changes.

use tern_client::SiteClient;
use tern_client::config::TlsMode;
use tern_testkit::{Site, random_bytes, rt, sha256_file};
use tern_types::ImageSpec;

fn setup() -> (Site, String) {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    let src = s.root.path().join("img.raw");
    std::fs::write(&src, random_bytes(1, 4 << 20)).unwrap();
    s.tern_ok(&["import", src.to_str().unwrap(), "rbd/img"]);
    let sum = sha256_file(&src);
    (s, sum)
}

fn image_sum(s: &Site) -> String {
    let out = s
        .root
        .path()
        .join(format!("check-{}.raw", rand::random::<u32>()));
    s.tern_ok(&["export", "rbd/img", out.to_str().unwrap()]);
    let h = sha256_file(&out);
    std::fs::remove_file(out).unwrap();
    h
}

#[test]
fn wrong_or_missing_keys_are_refused() {
    let (s, sum) = setup();
    // A keyring with a well-formed but wrong key.
    let bad = s.root.path().join("bad.keyring");
    std::fs::write(
        &bad,
        "[client.admin]\n\tkey = AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n",
    )
    .unwrap();
    let (code, err) = s.tern_err(&["--keyring", bad.to_str().unwrap(), "rm", "rbd/img"]);
    assert_eq!(code, 13, "{err}");
    assert!(
        err.contains("authentication failed for client.admin"),
        "{err}"
    );
    // A keyring without our entity.
    let empty = s.root.path().join("empty.keyring");
    std::fs::write(&empty, "").unwrap();
    let (code, err) = s.tern_err(&["--keyring", empty.to_str().unwrap(), "ls"]);
    assert_eq!(code, 13, "{err}");
    assert!(err.contains("no key for client.admin"), "{err}");
    // No credentials at all on the wire.
    let conf = s.config();
    let rt = rt();
    let _g = rt.enter();
    let c = SiteClient::connect_with(&s.addr, &conf.tls, "", "").unwrap();
    let e = rt
        .block_on(c.image().remove(&ImageSpec::new("rbd", "img"), false))
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::Unauthenticated, "{e}");
    assert!(e.message.contains("no credentials"), "{e}");
    // An unknown entity.
    let c = SiteClient::connect_with(
        &s.addr,
        &conf.tls,
        "client.nobody",
        "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==",
    )
    .unwrap();
    let e = rt.block_on(c.pool().list()).unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::Unauthenticated);
    assert_eq!(image_sum(&s), sum);
    assert_eq!(s.tern_ok(&["ls"]).trim(), "img");
}

#[test]
fn read_only_user_cannot_write_and_removed_user_is_locked_out() {
    let (s, sum) = setup();
    let ro = s.root.path().join("ro.keyring");
    s.tern_ok(&[
        "auth",
        "get-or-create",
        "client.ro",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd-read-only",
        "-o",
        ro.to_str().unwrap(),
    ]);
    let ring = std::fs::read_to_string(&ro).unwrap();
    assert!(
        ring.contains("[client.ro]") && ring.contains("key = AQ"),
        "{ring}"
    );
    // Same caps again: same key (idempotent); other caps: refused.
    let again = s.tern_ok(&[
        "auth",
        "get-or-create",
        "client.ro",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd-read-only",
    ]);
    assert_eq!(again.lines().nth(1), ring.lines().nth(1));
    let (code, err) = s.tern_err(&["auth", "get-or-create", "client.ro", "osd", "profile rbd"]);
    assert_eq!(code, 17, "{err}");

    let as_ro = |args: &[&str]| {
        let mut a = vec!["--id", "ro", "--keyring", ro.to_str().unwrap()];
        a.extend_from_slice(args);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| s.tern(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Reading works.
    assert!(run(as_ro(&["info", "rbd/img"])).status.success());
    // Every kind of write is refused, with the reason.
    let src = s.root.path().join("other.raw");
    std::fs::write(&src, random_bytes(2, 1 << 20)).unwrap();
    for args in [
        as_ro(&["rm", "rbd/img"]),
        as_ro(&["resize", "rbd/img", "--size", "1G"]),
        as_ro(&["create", "rbd/new", "--size", "1G"]),
        as_ro(&["import", src.to_str().unwrap(), "rbd/new2"]),
        as_ro(&["pool", "create", "p2"]),
        as_ro(&[
            "auth",
            "get-or-create",
            "client.evil",
            "mon",
            "allow *",
            "osd",
            "allow *",
        ]),
    ] {
        let o = run(args.clone());
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("client.ro (profile rbd-read-only) may not"),
            "{args:?}: {err}"
        );
    }
    // Direct API writes too.
    let conf = s.config();
    let key = tern_client::Keyring::load(&ro)
        .unwrap()
        .key_for("client.ro")
        .unwrap()
        .to_string();
    let rt = rt();
    let _g = rt.enter();
    let c = SiteClient::connect_with(&s.addr, &conf.tls, "client.ro", &key).unwrap();
    let e = rt
        .block_on(
            c.io()
                .write(&ImageSpec::new("rbd", "img"), 0, vec![1; 4096], false, ""),
        )
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::PermissionDenied);
    assert_eq!(image_sum(&s), sum);
    assert_eq!(s.tern_ok(&["ls"]).trim(), "img");

    // A pool-restricted rbd user may write only in its pool.
    s.tern_ok(&["pool", "create", "other"]);
    let rw = s.root.path().join("rw.keyring");
    s.tern_ok(&[
        "auth",
        "get-or-create",
        "client.rw",
        "mon",
        "profile rbd",
        "osd",
        "profile rbd pool=other",
        "-o",
        rw.to_str().unwrap(),
    ]);
    let rw_args = |args: &[&str]| {
        let mut a = vec!["--id", "rw", "--keyring", rw.to_str().unwrap()];
        a.extend_from_slice(args);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    assert!(
        run(rw_args(&["create", "other/x", "--size", "1M"]))
            .status
            .success()
    );
    assert!(
        !run(rw_args(&["create", "rbd/x", "--size", "1M"]))
            .status
            .success()
    );

    // Removing a user makes its key useless at once.
    s.tern_ok(&["auth", "rm", "client.ro"]);
    let o = run(as_ro(&["info", "rbd/img"]));
    assert_eq!(
        o.status.code(),
        Some(13),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let listed = s.tern_ok(&["auth", "ls"]);
    assert!(
        !listed.contains("client.ro") && listed.contains("client.admin"),
        "{listed}"
    );
    // The admin cannot remove itself.
    s.tern_err(&["auth", "rm", "client.admin"]);
}

#[test]
fn certificate_fingerprint_mismatch_is_refused() {
    let (s, sum) = setup();
    let conf = s.config();
    let TlsMode::Pinned(fp) = &conf.tls else {
        panic!("site must use TLS by default")
    };
    let mut wrong = fp.clone();
    wrong.replace_range(0..2, if &fp[0..2] == "00" { "11" } else { "00" });
    let text = std::fs::read_to_string(s.conf_path())
        .unwrap()
        .replace(fp.as_str(), &wrong);
    let other = s.root.path().join("wrong.conf");
    std::fs::write(&other, text).unwrap();
    let ring = s.conf_dir.join("site-a.client.admin.keyring");
    let (code, err) = s.tern_err(&[
        "--conf",
        other.to_str().unwrap(),
        "--keyring",
        ring.to_str().unwrap(),
        "rm",
        "rbd/img",
    ]);
    assert_eq!(code, 13, "{err}");
    assert!(err.contains("fingerprint"), "{err}");
    // A plaintext client cannot talk to a TLS site either.
    let rt = rt();
    let _g = rt.enter();
    let c = SiteClient::connect_with(&s.addr, &TlsMode::Insecure, "client.admin", "x").unwrap();
    assert!(rt.block_on(c.pool().list()).is_err());
    assert_eq!(image_sum(&s), sum);
}

#[test]
fn insecure_mode_is_loopback_only() {
    let root = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(tern_testkit::bin("ternd"))
        .args([
            "--data",
            root.path().join("d").to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--conf-dir",
        ])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
