//! Two real sites and two real mirror daemons, driven only through the CLI
//! along the seed's steps 1-5 (snapshot mode).

use std::time::{Duration, Instant};
use tern_testkit::{Site, random_bytes, rt, wait_until};
use tern_types::ImageSpec;

const MIB: u64 = 1 << 20;

fn two_sites() -> (Site, Site) {
    let a = Site::start("site-a");
    let b = Site::start("site-b");
    for (s, name) in [(&a, "site-a"), (&b, "site-b")] {
        // Seed step 1.
        s.tern_ok(&["osd", "pool", "create", "rbd", "128", "128"]);
        s.tern_ok(&["pool", "init", "rbd"]);
        s.tern_ok(&[
            "mirror",
            "pool",
            "enable",
            "rbd",
            "image",
            "--site-name",
            name,
        ]);
        let info = s.tern_json(&["mirror", "pool", "info", "rbd"]);
        assert_eq!(info["mode"], "image");
        assert_eq!(info["site_name"], name);
    }
    // Seed step 2: token on A, imported rx-tx on B.
    let token = a.tern_ok(&[
        "mirror",
        "pool",
        "peer",
        "bootstrap",
        "create",
        "--site-name",
        "site-a",
        "rbd",
    ]);
    b.import_token(&token, "site-b");
    // Re-import is idempotent.
    b.import_token(&token, "site-b");
    let ib = b.tern_json(&["mirror", "pool", "info", "rbd"]);
    let ia = a.tern_json(&["mirror", "pool", "info", "rbd"]);
    assert_eq!(ib["peers"].as_array().unwrap().len(), 1, "{ib}");
    assert_eq!(ib["peers"][0]["site_name"], "site-a");
    assert_eq!(ib["peers"][0]["direction"], "rx-tx");
    assert_eq!(ib["peers"][0]["client_name"], "client.rbd-mirror-peer");
    assert_eq!(
        ia["peers"].as_array().unwrap().len(),
        1,
        "reverse peer missing: {ia}"
    );
    assert_eq!(ia["peers"][0]["site_name"], "site-b");
    (a, b)
}

/// The newest complete non-primary mirror snapshot on a site, if any.
fn newest_copy(s: &Site, image: &str) -> Option<(String, u64)> {
    let o = s.tern(&[
        "snap",
        "ls",
        "--all",
        &format!("rbd/{image}"),
        "--format",
        "json",
    ]);
    if !o.status.success() {
        return None; // not adopted yet
    }
    let ls: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    ls.as_array()?
        .iter()
        .filter(|x| {
            let st = x["namespace"]["state"].as_str().unwrap_or("");
            st.starts_with("non-primary") && x["namespace"]["complete"] == true
        })
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["namespace"]["primary_snap_id"].as_u64().unwrap(),
            )
        })
        .next_back()
}

fn newest_primary(s: &Site, image: &str) -> (String, u64) {
    let ls = s.tern_json(&["snap", "ls", "--all", &format!("rbd/{image}")]);
    ls.as_array()
        .unwrap()
        .iter()
        .filter(|x| {
            matches!(
                x["namespace"]["state"].as_str(),
                Some("primary") | Some("demoted")
            )
        })
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["id"].as_u64().unwrap(),
            )
        })
        .next_back()
        .expect("a primary mirror snapshot")
}

fn export_sum(s: &Site, spec: &str) -> String {
    s.export_sha256(spec)
}

fn wait_synced(dst: &Site, src: &Site, image: &str, timeout: Duration) -> Duration {
    let (_, want) = newest_primary(src, image);
    let t = Instant::now();
    let ok = wait_until(timeout, || {
        newest_copy(dst, image).is_some_and(|(_, id)| id == want)
    });
    assert!(
        ok,
        "{image} did not sync primary snapshot {want} within {timeout:?}"
    );
    t.elapsed()
}

fn write_random(s: &Site, image: &str, seed: u64, total: u64, chunk: u64, size: u64) {
    use rand::{Rng, SeedableRng};
    let rt = rt();
    let c = s.client(&rt);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rt.block_on(async {
        let mut done = 0;
        let mut i = 0;
        while done < total {
            let off = rng.random_range(0..(size - chunk) / 4096) * 4096;
            let data = random_bytes(seed * 100_000 + i, chunk as usize);
            c.io()
                .write(&ImageSpec::new("rbd", image), off, data, false, "")
                .await
                .unwrap();
            done += chunk;
            i += 1;
        }
        c.io().flush(&ImageSpec::new("rbd", image)).await.unwrap();
    });
}

#[test]
fn snapshot_mirroring_end_to_end() {
    let (a, b) = two_sites();
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    // Seed step 4: image with exclusive-lock, snapshot mode.
    a.tern_ok(&[
        "create",
        "rbd/vol",
        "--size",
        "1G",
        "--image-feature",
        "exclusive-lock",
    ]);
    a.tern_ok(&["mirror", "image", "enable", "rbd/vol", "snapshot"]);
    write_random(&a, "vol", 1, 256 * MIB, MIB, 1 << 30);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/vol"]);
    let took = wait_synced(&b, &a, "vol", Duration::from_secs(120));
    eprintln!("initial sync of 256 MiB written in a 1 GiB image took {took:?}");
    let (copy, _) = newest_copy(&b, "vol").unwrap();
    let (prim, _) = newest_primary(&a, "vol");
    assert_eq!(
        export_sum(&b, &format!("rbd/vol@{copy}")),
        export_sum(&a, &format!("rbd/vol@{prim}"))
    );

    // Status on both sites names the peer; B says synced within a second.
    assert!(wait_until(Duration::from_secs(3), || {
        let st = b.tern_json(&["mirror", "image", "status", "rbd/vol"]);
        st["state"] == "up+replaying"
            && st["description"]
                .as_str()
                .unwrap_or("")
                .starts_with("replaying, {")
    }));
    let sb = b.tern_json(&["mirror", "image", "status", "rbd/vol"]);
    assert_eq!(sb["peer_sites"][0]["site_name"], "site-a", "{sb}");
    assert_eq!(sb["peer_sites"][0]["state"], "up+stopped", "{sb}");
    assert_eq!(sb["peer_sites"][0]["description"], "local image is primary");
    let sa = a.tern_json(&["mirror", "image", "status", "rbd/vol"]);
    assert_eq!(sa["state"], "up+stopped", "{sa}");
    assert_eq!(sa["description"], "local image is primary");
    assert_eq!(sa["peer_sites"][0]["site_name"], "site-b");
    assert_eq!(sa["peer_sites"][0]["state"], "up+replaying", "{sa}");
    let bs = b.tern_json(&["mirror", "pool", "status", "rbd", "--verbose"]);
    assert_eq!(bs["summary"]["health"], "OK", "{bs}");
    assert_eq!(bs["images"][0]["name"], "vol");

    // A 16 MiB change sends about 16 MiB, not the image.
    write_random(&a, "vol", 2, 16 * MIB, 4 * MIB, 1 << 30);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/vol"]);
    wait_synced(&b, &a, "vol", Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(3), || {
        let st = b.tern_json(&["mirror", "image", "status", "rbd/vol"]);
        st["description"]
            .as_str()
            .unwrap_or("")
            .contains("last_snapshot_bytes")
            && st["bytes_synced"].as_u64().unwrap_or(0) > 0
            || st["peer_sites"].is_array()
    }));
    let st = b.tern_json(&["mirror", "image", "status", "rbd/vol"]);
    let desc = st["description"]
        .as_str()
        .unwrap()
        .trim_start_matches("replaying, ");
    let d: serde_json::Value = serde_json::from_str(desc).unwrap();
    let sent = d["last_snapshot_bytes"].as_u64().unwrap();
    eprintln!("16 MiB changed, delta sent {sent} bytes");
    assert!(
        (16 * MIB..=18 * MIB).contains(&sent),
        "delta sent {sent} bytes for a 16 MiB change"
    );
    let (copy, _) = newest_copy(&b, "vol").unwrap();
    let (prim, _) = newest_primary(&a, "vol");
    assert_eq!(
        export_sum(&b, &format!("rbd/vol@{copy}")),
        export_sum(&a, &format!("rbd/vol@{prim}"))
    );

    // Writes to the non-primary copy are refused.
    let (code, err) = b.tern_err(&["bench", "rbd/vol", "--io-type", "write", "--io-total", "4K"]);
    assert_eq!(code, 30, "{err}");
    assert!(err.contains("non-primary"), "{err}");
    // So is removing it without --force, and nothing is lost.
    let (code, err) = b.tern_err(&["rm", "rbd/vol"]);
    assert_eq!(code, 22, "{err}");
    assert!(
        err.contains("non-primary mirror copy") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        export_sum(&b, &format!("rbd/vol@{copy}")),
        export_sum(&a, &format!("rbd/vol@{prim}"))
    );

    // Orderly switch: a promote before the demotion is replayed is refused in words.
    let (_, err) = b.tern_err(&["mirror", "image", "promote", "rbd/vol"]);
    assert!(
        err.contains("demotion of site-a has not been replayed"),
        "{err}"
    );
    a.tern_ok(&["mirror", "image", "demote", "rbd/vol"]);
    wait_synced(&b, &a, "vol", Duration::from_secs(60));
    b.tern_ok(&["mirror", "image", "promote", "rbd/vol"]);
    write_random(&b, "vol", 3, 8 * MIB, MIB, 1 << 30);
    b.tern_ok(&["mirror", "image", "snapshot", "rbd/vol"]);
    wait_synced(&a, &b, "vol", Duration::from_secs(60));
    let (copy, _) = newest_copy(&a, "vol").unwrap();
    let (prim, _) = newest_primary(&b, "vol");
    assert_eq!(
        export_sum(&a, &format!("rbd/vol@{copy}")),
        export_sum(&b, &format!("rbd/vol@{prim}"))
    );
    assert_eq!(
        export_sum(&a, "rbd/vol"),
        export_sum(&b, &format!("rbd/vol@{prim}"))
    );
    let (code, _) = a.tern_err(&["bench", "rbd/vol", "--io-type", "write", "--io-total", "4K"]);
    assert_eq!(code, 30);
    // Asked twice, the copy goes.
    a.tern_err(&["rm", "rbd/vol"]);
    a.tern_ok(&["rm", "rbd/vol", "--force"]);
}

fn setup_image(a: &Site, image: &str, size: &str) {
    a.tern_ok(&[
        "create",
        &format!("rbd/{image}"),
        "--size",
        size,
        "--image-feature",
        "exclusive-lock",
    ]);
    a.tern_ok(&[
        "mirror",
        "image",
        "enable",
        &format!("rbd/{image}"),
        "snapshot",
    ]);
}

fn status_json(s: &Site, image: &str) -> serde_json::Value {
    s.tern_json(&["mirror", "image", "status", &format!("rbd/{image}")])
}

/// Status does not lie: synced shows within a second of the copy; a dead
/// primary site shows as down within 3 s (2.5 s after its last report).
#[test]
fn status_tells_the_truth() {
    let (mut a, b) = two_sites();
    let mut ma = a.start_mirror();
    let _mb = b.start_mirror();
    setup_image(&a, "s", "256M");
    write_random(&a, "s", 7, 32 * MIB, MIB, 256 * MIB);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/s"]);
    let (_, want) = newest_primary(&a, "s");
    assert!(wait_until(Duration::from_secs(60), || newest_copy(&b, "s")
        .is_some_and(|(_, id)| id == want)));
    let copied = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || {
            let st = status_json(&b, "s");
            st["state"] == "up+replaying" && st["bytes_synced"].as_u64().unwrap_or(0) > 0
        }),
        "status did not say synced within 1 s of the copy: {}",
        status_json(&b, "s")
    );
    eprintln!(
        "status showed the sync {:?} after the copy appeared",
        copied.elapsed()
    );

    // The seed's check-mirror-lag.sh runs unchanged with `rbd` calling tern.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/check-mirror-lag.sh"
    );
    let run_check = |s: &Site| {
        let tern = tern_testkit::bin("tern");
        let o = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "rbd() {{ {} --cluster {} \"$@\"; }}; export -f rbd; bash {script} rbd 300",
                tern.display(),
                s.name
            ))
            .env("TERN_CONF_DIR", &s.conf_dir)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let (code, out) = run_check(&b);
    assert_eq!(
        code,
        Some(0),
        "check-mirror-lag.sh on a healthy pool: {out}"
    );
    assert!(
        out.contains("Image: s") && out.contains("Overall Health: OK"),
        "{out}"
    );

    // Kill the primary site's processes: within 3 s (2.5 s after its last
    // report) the secondary shows that peer as down, not as its last good
    // state.
    ma.kill9();
    a.kill9();
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || {
            let st = status_json(&b, "s");
            st["peer_sites"][0]["state"]
                .as_str()
                .unwrap_or("")
                .starts_with("down+")
        }),
        "peer still shown up 3 s after it died: {}",
        status_json(&b, "s")
    );
    eprintln!("dead peer shown down after {:?}", killed.elapsed());
    let st = status_json(&b, "s");
    assert_eq!(st["peer_sites"][0]["reason"], "unreachable", "{st}");
    // And the pool is no longer OK; the check script notices.
    assert!(wait_until(Duration::from_secs(5), || b
        .tern_json(&["mirror", "pool", "status", "rbd"])["summary"]["health"]
        != "OK"));
    let (code, out) = run_check(&b);
    assert_eq!(code, Some(1), "{out}");
    // So is the site's: `tern status` rolls the pool's health up.
    let site = b.tern_json(&["status"]);
    assert_ne!(site["health"]["status"], "HEALTH_OK", "{site}");
    assert!(
        site["health"]["checks"]
            .to_string()
            .contains("MIRROR_POOL_"),
        "{site}"
    );

    // Split-brain is an error on both sites, and nothing is overwritten.
    a.restart();
    let _ma2 = a.start_mirror();
    b.tern_ok(&["mirror", "image", "promote", "--force", "rbd/s"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let st = status_json(&a, "s");
            st["peer_sites"][0]["state"] == "up+error"
        }),
        "split-brain not reported: {}",
        status_json(&a, "s")
    );
    let (code, out) = run_check(&a);
    assert_eq!(
        code,
        Some(1),
        "check-mirror-lag.sh with an image in error: {out}"
    );
    assert!(out.contains("Overall Health: ERROR"), "{out}");
    // Both sites primary: HEALTH_ERR on both (it was HEALTH_OK).
    for s in [&a, &b] {
        assert!(
            wait_until(
                Duration::from_secs(10),
                || s.tern_json(&["status"])["health"]["status"] == "HEALTH_ERR"
            ),
            "{}: {}",
            s.name,
            s.tern_json(&["status"])
        );
    }
    let text = a.tern_ok(&["status"]);
    assert!(
        text.contains("HEALTH_ERR") && text.contains("MIRROR_POOL_ERROR"),
        "{text}"
    );
}

/// The mirror daemon killed mid initial sync resumes where it stopped.
#[test]
fn killed_daemon_resumes_the_initial_sync() {
    let (a, b) = two_sites();
    let _ma = a.start_mirror();
    setup_image(&a, "big", "2G");
    write_random(&a, "big", 9, 768 * MIB, 4 * MIB, 2 << 30);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/big"]);
    let mut mb = b.start_mirror();
    let mut at_kill = 0.0;
    assert!(
        wait_until(Duration::from_secs(60), || {
            let st = b.tern_json(&["mirror", "pool", "status", "rbd"]);
            let p = st["images"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|i| i["progress"].as_f64())
                .unwrap_or(0.0);
            at_kill = p;
            p > 0.2
        }),
        "no sync progress seen"
    );
    mb.kill9();
    eprintln!(
        "daemon killed at {:.0}% of the initial sync",
        at_kill * 100.0
    );
    let mut mb = b.start_mirror();
    wait_synced(&b, &a, "big", Duration::from_secs(120));
    // The copy is complete before its daemon reports it: wait for the report.
    wait_until(Duration::from_secs(10), || {
        status_json(&b, "big")["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("replaying, "))
    });
    let st = status_json(&b, "big");
    let d: serde_json::Value = serde_json::from_str(
        st["description"]
            .as_str()
            .unwrap()
            .trim_start_matches("replaying, "),
    )
    .unwrap();
    let sent_after = d["last_snapshot_bytes"].as_u64().unwrap();
    let total = 768 * MIB; // written; the copy sends what is allocated
    let remaining = ((1.0 - at_kill) * total as f64) as u64;
    eprintln!(
        "after the restart the daemon sent {sent_after} bytes; {remaining} remained at the kill"
    );
    assert!(
        sent_after < remaining + 4 * MIB + 64 * MIB,
        "sync started over: sent {sent_after}, remaining {remaining}"
    );
    assert!(
        sent_after < total * 9 / 10,
        "sync started over: sent {sent_after} of {total}"
    );
    let (copy, _) = newest_copy(&b, "big").unwrap();
    let (prim, _) = newest_primary(&a, "big");
    assert_eq!(
        export_sum(&b, &format!("rbd/big@{copy}")),
        export_sum(&a, &format!("rbd/big@{prim}"))
    );
    assert!(mb.stop(), "tern-mirror did not stop cleanly on SIGTERM");
}

/// A site restarted mid-delta, bad tokens and a removed peer key: each is
/// a clear error, and once fixed the images end equal.
#[test]
fn faults_end_in_clear_errors_then_equal_images() {
    let a = Site::start("site-a");
    let mut b = Site::start("site-b");
    for (s, name) in [(&a, "site-a"), (&b, "site-b")] {
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
    }
    let token = a.tern_ok(&[
        "mirror",
        "pool",
        "peer",
        "bootstrap",
        "create",
        "--site-name",
        "site-a",
        "rbd",
    ]);
    let token = token.trim().to_string();
    let import = |t: &str| b.try_import_token(t, "site-b");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut j: serde_json::Value = serde_json::from_slice(&b64.decode(&token).unwrap()).unwrap();
    // Garbage, a changed key, a changed fingerprint, a changed site id.
    let o = import("not a token");
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("malformed bootstrap token")
    );
    let good_key = j["key"].as_str().unwrap().to_string();
    let mut bad_key: Vec<char> = good_key.chars().collect();
    bad_key[10] = if bad_key[10] == 'B' { 'C' } else { 'B' };
    j["key"] = serde_json::json!(bad_key.into_iter().collect::<String>());
    let o = import(&b64.encode(j.to_string()));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(13), "{err}");
    assert!(err.contains("refused the token's key"), "{err}");
    j["key"] = serde_json::json!(good_key);
    let fp = j["tls_fingerprint"].as_str().unwrap().to_string();
    j["tls_fingerprint"] = serde_json::json!(format!(
        "{}{}",
        if fp.starts_with('0') { "1" } else { "0" },
        &fp[1..]
    ));
    let o = import(&b64.encode(j.to_string()));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success() && err.contains("certificate"), "{err}");
    j["tls_fingerprint"] = serde_json::json!(fp);
    j["fsid"] = serde_json::json!("00000000-0000-0000-0000-000000000000");
    let o = import(&b64.encode(j.to_string()));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("altered"));
    assert_eq!(
        b.tern_json(&["mirror", "pool", "info", "rbd"])["peers"],
        serde_json::json!([])
    );
    // The real token works.
    assert!(import(&token).status.success());

    let _ma = a.start_mirror();
    let mut mb = b.start_mirror();
    setup_image(&a, "f", "512M");
    write_random(&a, "f", 11, 64 * MIB, MIB, 512 * MIB);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/f"]);
    wait_synced(&b, &a, "f", Duration::from_secs(60));

    // Site B restarted in the middle of a delta.
    write_random(&a, "f", 12, 256 * MIB, 4 * MIB, 512 * MIB);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/f"]);
    // Restart as soon as the delta is under way (or done, if it was quicker than us).
    let caught = wait_until(Duration::from_secs(30), || {
        let st = status_json(&b, "f");
        st["state"].as_str().unwrap_or("").contains("syncing")
            || st["progress"].as_f64().unwrap_or(0.0) > 0.0
    });
    eprintln!(
        "site-b restarted {} the delta",
        if caught { "in the middle of" } else { "after" }
    );
    b.restart();
    wait_synced(&b, &a, "f", Duration::from_secs(120));
    let (copy, _) = newest_copy(&b, "f").unwrap();
    let (prim, _) = newest_primary(&a, "f");
    assert_eq!(
        export_sum(&b, &format!("rbd/f@{copy}")),
        export_sum(&a, &format!("rbd/f@{prim}"))
    );

    // The peer's key is removed on A: B says so, then a new token fixes it.
    a.tern_ok(&["auth", "rm", "client.rbd-mirror-peer"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let st = status_json(&b, "f");
            st["description"]
                .as_str()
                .unwrap_or("")
                .contains("authentication failed")
        }),
        "no clear status after the peer key was removed: {}",
        status_json(&b, "f")
    );
    write_random(&a, "f", 13, 8 * MIB, MIB, 512 * MIB);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/f"]);
    let token = a.tern_ok(&["mirror", "pool", "peer", "bootstrap", "create", "rbd"]);
    assert!(b.try_import_token(token.trim(), "site-b").status.success());
    mb.restart();
    wait_synced(&b, &a, "f", Duration::from_secs(60));
    let (copy, _) = newest_copy(&b, "f").unwrap();
    let (prim, _) = newest_primary(&a, "f");
    assert_eq!(
        export_sum(&b, &format!("rbd/f@{copy}")),
        export_sum(&a, &format!("rbd/f@{prim}"))
    );
}

/// Snapshot schedules run on time at image and pool level, show in ls and
/// status, and follow the primary role across an orderly switch.
#[test]
fn schedules_follow_the_primary() {
    let (a, b) = two_sites();
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    setup_image(&a, "sch", "64M");
    // 2 s and 3 s stand in for 1m in a test (tern accepts an `s` suffix for that).
    a.tern_ok(&[
        "mirror", "snapshot", "schedule", "add", "--pool", "rbd", "--image", "sch", "2s",
    ]);
    let start = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let t = now % 86400;
        format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
    };
    a.tern_ok(&[
        "mirror",
        "snapshot",
        "schedule",
        "add",
        "--pool",
        "rbd",
        "3s",
        "--start-time",
        &start,
    ]);
    let ls = a.tern_json(&["mirror", "snapshot", "schedule", "ls", "--recursive"]);
    let items: Vec<(String, String)> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["image"].as_str().unwrap().to_string(),
                x["interval"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        items.contains(&("sch".into(), "2s".into())) && items.contains(&("".into(), "3s".into())),
        "{ls}"
    );
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|x| x["start_time"] == start.as_str()),
        "{ls}"
    );
    assert_eq!(
        a.tern_ok(&[
            "mirror", "snapshot", "schedule", "ls", "--pool", "rbd", "--image", "sch"
        ])
        .trim(),
        "every 2s"
    );
    let st = a.tern_json(&["mirror", "snapshot", "schedule", "status", "--pool", "rbd"]);
    assert_eq!(st["scheduled"][0]["image"], "rbd/sch", "{st}");

    let newest = |s: &Site| -> u64 {
        let ls = s.tern_json(&["snap", "ls", "--all", "rbd/sch"]);
        ls.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["namespace"]["state"] == "primary")
            .map(|x| x["id"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    let first = newest(&a);
    assert!(
        wait_until(Duration::from_secs(5), || newest(&a) > first),
        "no scheduled snapshot within 5 s"
    );
    let second = newest(&a);
    assert!(
        wait_until(Duration::from_secs(5), || newest(&a) > second),
        "schedule did not repeat"
    );
    // The copies follow.
    assert!(wait_until(Duration::from_secs(15), || newest_copy(
        &b, "sch"
    )
    .is_some()));

    // Orderly switch: B's schedule runs (B has the same schedules), A's stops.
    b.tern_ok(&[
        "mirror", "snapshot", "schedule", "add", "--pool", "rbd", "--image", "sch", "2s",
    ]);
    a.tern_ok(&["mirror", "image", "demote", "rbd/sch"]);
    wait_synced(&b, &a, "sch", Duration::from_secs(30));
    b.tern_ok(&["mirror", "image", "promote", "rbd/sch"]);
    let a_last = newest(&a);
    let b_first = newest(&b);
    assert!(
        wait_until(Duration::from_secs(6), || newest(&b) > b_first),
        "the new primary's schedule did not run"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        newest(&a),
        a_last,
        "the demoted side kept taking scheduled snapshots"
    );
    assert!(
        a.tern_json(&["mirror", "snapshot", "schedule", "status", "--pool", "rbd"])["scheduled"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// 200 mirrored images in one pool sync with one daemon, and the verbose
/// pool status answers in under a second.
#[test]
fn two_hundred_images_one_daemon() {
    let (a, b) = two_sites();
    // Pool mode: every image is mirrored as it is created.
    a.tern_ok(&[
        "mirror",
        "pool",
        "enable",
        "rbd",
        "pool",
        "--site-name",
        "site-a",
    ]);
    tern_testkit::mirrored_fleet(&a, 200);
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    let t = Instant::now();
    let all_synced = || {
        let st = b.tern_json(&["mirror", "pool", "status", "rbd"]);
        st["summary"]["states"]["replaying"].as_u64() == Some(200)
    };
    assert!(
        wait_until(Duration::from_secs(240), all_synced),
        "200 images not replaying within 240 s"
    );
    eprintln!("200 images synced in {:?}", t.elapsed());
    for side in [&a, &b] {
        let t = Instant::now();
        let st = side.tern_json(&["mirror", "pool", "status", "rbd", "--verbose"]);
        let took = t.elapsed();
        assert_eq!(st["images"].as_array().unwrap().len(), 200);
        eprintln!(
            "{}: pool status --verbose for 200 images in {took:?}",
            side.name
        );
        assert!(took < Duration::from_secs(1), "pool status took {took:?}");
    }
    for i in [0u64, 99, 199] {
        let name = format!("img{i:03}");
        let (copy, _) = newest_copy(&b, &name).unwrap();
        let (prim, _) = newest_primary(&a, &name);
        assert_eq!(
            export_sum(&b, &format!("rbd/{name}@{copy}")),
            export_sum(&a, &format!("rbd/{name}@{prim}"))
        );
    }
}

/// `mirror image verify` compares per-extent BLAKE3 hashes computed on
/// each site, and names the extent a test corrupts behind tern's back.
#[test]
fn verify_names_a_corrupted_extent() {
    let (a, b) = two_sites();
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    setup_image(&a, "v", "64M");
    write_random(&a, "v", 21, 32 * MIB, MIB, 64 * MIB);
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/v"]);
    wait_synced(&b, &a, "v", Duration::from_secs(60));
    let v = b.tern_json(&["mirror", "image", "verify", "rbd/v"]);
    assert_eq!(v["equal"], true, "{v}");
    assert_eq!(v["compared_extents"], 16, "{v}");
    assert!(
        b.tern_ok(&["mirror", "image", "verify", "rbd/v"])
            .contains("equal to site-a")
    );

    // Corrupt object 3 of the copy on disk.
    let id = b.tern_json(&["info", "rbd/v"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let obj = b.data.join("objects").join(&id).join(format!("{:016x}", 3));
    assert!(obj.exists(), "{} missing", obj.display());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&obj).unwrap();
        f.write_all_at(b"corrupted behind tern's back", 4096 + 1000)
            .unwrap();
    }
    let o = b.tern(&["mirror", "image", "verify", "rbd/v", "--format", "json"]);
    assert_eq!(
        o.status.code(),
        Some(74),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["equal"], false);
    assert_eq!(
        v["differing"],
        serde_json::json!([{"offset": 3 * 4 * MIB, "length": 4 * MIB}]),
        "{v}"
    );

    // The repair: a full resync, taken up by the running daemon.
    b.tern_ok(&["mirror", "image", "resync", "--full", "rbd/v"]);
    let resynced = || {
        b.tern_json(&["info", "rbd/v"])["mirroring"]["last_resync"]
            .as_str()
            .unwrap_or_default()
            .starts_with("full copy (requested with --full)")
    };
    assert!(
        wait_until(Duration::from_secs(60), resynced),
        "no full resync: {}",
        b.tern_json(&["info", "rbd/v"])
    );
    wait_synced(&b, &a, "v", Duration::from_secs(60));
    let v = b.tern_json(&["mirror", "image", "verify", "rbd/v"]);
    assert_eq!(v["equal"], true, "{v}");
    assert_eq!(b.export_sha256("rbd/v"), a.export_sha256("rbd/v"));
}

/// Over a link of the test's making (a counting proxy in front of site A):
/// zstd sends fewer bytes for compressible data, and a 20 MiB/s limit holds
/// the measured rate within 10 %.
#[test]
fn compression_and_bandwidth_limit() {
    // B reaches A through a link of the test's making, which counts bytes.
    let (a, b, link) = tern_testkit::linked_sites();
    let _ma = a.start_mirror();
    let _mb = b.start_mirror();
    setup_image(&a, "c", "512M");
    wait_synced(&b, &a, "c", Duration::from_secs(30));

    let text: Vec<u8> =
        b"tern replicates this line, and zstd squeezes it well. 0123456789\n".repeat(1 << 20);
    let write_at = |off: u64, data: &[u8]| {
        let rt = rt();
        let c = a.client(&rt);
        rt.block_on(async {
            for (i, piece) in data.chunks(4 << 20).enumerate() {
                let at = off + i as u64 * (4 << 20);
                c.io()
                    .write(&ImageSpec::new("rbd", "c"), at, piece.to_vec(), false, "")
                    .await
                    .unwrap();
            }
            c.io().flush(&ImageSpec::new("rbd", "c")).await.unwrap();
        });
    };
    let sync_bytes = |off: u64, data: &[u8]| {
        write_at(off, data);
        let before = link.to_a.down_bytes();
        a.tern_ok(&["mirror", "image", "snapshot", "rbd/c"]);
        wait_synced(&b, &a, "c", Duration::from_secs(120));
        link.to_a.down_bytes() - before
    };
    let data = &text[..64 << 20];
    let plain = sync_bytes(0, data);
    b.tern_ok(&[
        "config",
        "set",
        "client.rbd-mirror",
        "rbd_mirror_compression",
        "zstd",
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    let mut other = data.to_vec();
    other[0] = b'X';
    let zstd = sync_bytes(64 << 20, &other);
    eprintln!("64 MiB of compressible data: {plain} bytes on the link plain, {zstd} with zstd");
    assert!(plain > 60 << 20, "plain sync moved only {plain} bytes");
    assert!(
        zstd < plain / 4,
        "zstd did not shrink the transfer: {zstd} vs {plain}"
    );

    // 20 MiB/s for the daemon, incompressible data; rate measured on the link.
    b.tern_ok(&[
        "config",
        "set",
        "client.rbd-mirror",
        "rbd_mirror_compression",
        "none",
    ]);
    b.tern_ok(&[
        "config",
        "set",
        "client.rbd-mirror",
        "rbd_mirror_bandwidth_limit",
        "20M",
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    write_at(128 << 20, &random_bytes(5, 120 << 20));
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (s, st, d) = (samples.clone(), stop.clone(), link.to_a.down.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                s.lock()
                    .unwrap()
                    .push((Instant::now(), d.load(std::sync::atomic::Ordering::Relaxed)));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    a.tern_ok(&["mirror", "image", "snapshot", "rbd/c"]);
    wait_synced(&b, &a, "c", Duration::from_secs(120));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let s = samples.lock().unwrap();
    // The steady part of the transfer: past the first 16 MiB (the stream's
    // 8 MiB flow-control window fills at once, ahead of the limiter) to
    // 1 MiB before the end.
    let (b0, b1) = (s.first().unwrap().1, s.last().unwrap().1);
    let start = s.iter().find(|x| x.1 > b0 + (16 << 20)).unwrap();
    let end = s.iter().rev().find(|x| x.1 < b1 - (1 << 20)).unwrap();
    let rate = (end.1 - start.1) as f64 / end.0.duration_since(start.0).as_secs_f64();
    let target = 20.0 * 1048576.0;
    eprintln!(
        "limit 20 MiB/s: measured {:.1} MiB/s on the link",
        rate / 1048576.0
    );
    assert!(
        (rate - target).abs() < target * 0.10,
        "measured {:.1} MiB/s",
        rate / 1048576.0
    );
    let (copy, _) = newest_copy(&b, "c").unwrap();
    let (prim, _) = newest_primary(&a, "c");
    assert_eq!(
        export_sum(&b, &format!("rbd/c@{copy}")),
        export_sum(&a, &format!("rbd/c@{prim}"))
    );
}

/// Issue 17 case 1: in a pool-mode pool a journaled image is mirrored in
/// journal mode (its RPO is the journal's, not a schedule's), and asking
/// for another mode on an enabled image is refused in words, not a silent
/// "Mirroring enabled" that changes nothing.
#[test]
fn pool_mode_mirrors_journaled_images_in_journal_mode() {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&[
        "mirror",
        "pool",
        "enable",
        "rbd",
        "pool",
        "--site-name",
        "site-a",
    ]);
    s.tern_ok(&["create", "rbd/plain", "--size", "8M"]);
    s.tern_ok(&[
        "create",
        "rbd/j",
        "--size",
        "8M",
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    let mode =
        |img: &str| s.tern_json(&["info", &format!("rbd/{img}")])["mirroring"]["mode"].clone();
    assert_eq!(mode("j"), "journal");
    assert_eq!(mode("plain"), "snapshot");
    let info = s.tern_ok(&["info", "rbd/j"]);
    assert!(info.contains("mirroring mode: journal"), "{info}");
    // The same mode again is idempotent; another is refused, and nothing changes.
    s.tern_ok(&["mirror", "image", "enable", "rbd/j", "journal"]);
    let (code, err) = s.tern_err(&["mirror", "image", "enable", "rbd/plain", "journal"]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("already enabled in snapshot mode"), "{err}");
    let (code, err) = s.tern_err(&["mirror", "image", "enable", "rbd/j", "snapshot"]);
    assert_eq!(code, 22, "{err}");
    assert!(err.contains("already enabled in journal mode"), "{err}");
    assert_eq!(mode("j"), "journal");
    assert_eq!(mode("plain"), "snapshot");
}
