//! Two real sites and two real mirror daemons, driven only through the CLI
//! along the seed's steps 1-5 (snapshot mode).

use std::time::{Duration, Instant};
use tern_client::{image_ref, pb};
use tern_testkit::{Site, random_bytes, rt, sha256_file, wait_until};

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
    let tf = b.root.path().join("token");
    std::fs::write(&tf, &token).unwrap();
    b.tern_ok(&[
        "mirror",
        "pool",
        "peer",
        "bootstrap",
        "import",
        "--site-name",
        "site-b",
        "--direction",
        "rx-tx",
        "rbd",
        tf.to_str().unwrap(),
    ]);
    // Re-import is idempotent.
    b.tern_ok(&[
        "mirror",
        "pool",
        "peer",
        "bootstrap",
        "import",
        "--site-name",
        "site-b",
        "--direction",
        "rx-tx",
        "rbd",
        tf.to_str().unwrap(),
    ]);
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
    let ls = s.tern_json(&["snap", "ls", "--all", &format!("rbd/{image}")]);
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
    let out = s
        .root
        .path()
        .join(format!("x-{}.raw", rand::random::<u64>()));
    s.tern_ok(&["export", spec, out.to_str().unwrap()]);
    let h = sha256_file(&out);
    std::fs::remove_file(out).unwrap();
    h
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
            c.write(pb::WriteRequest {
                image: Some(image_ref("rbd", image)),
                offset: off,
                data,
                ..Default::default()
            })
            .await
            .unwrap();
            done += chunk;
            i += 1;
        }
        c.flush(image_ref("rbd", image)).await.unwrap();
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
}
