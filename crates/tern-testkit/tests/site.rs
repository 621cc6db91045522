//! One real site driven through the CLI and the client: pools, images,
//! import/export, sparse handling and random I/O against a model.

use std::time::Instant;
use tern_testkit::{Site, random_bytes, rt, sha256_file};
use tern_types::ImageSpec;

#[test]
fn pools_and_images_through_the_cli() {
    let s = Site::start("site-a");
    // Ceph's words: pg numbers accepted, `osd pool` alias.
    s.tern_ok(&["osd", "pool", "create", "vols", "128", "128"]);
    let st = s.tern_json(&["status"]);
    assert_eq!(
        st["health"]["status"], "HEALTH_WARN",
        "uninitialised pool should warn: {st}"
    );
    s.tern_ok(&["pool", "init", "vols"]);
    assert_eq!(s.tern_json(&["status"])["health"]["status"], "HEALTH_OK");
    assert_eq!(s.tern_ok(&["pool", "ls"]).trim(), "vols");

    s.tern_ok(&["create", "vols/db", "--size", "10G"]);
    s.tern_ok(&[
        "create",
        "vols/striped",
        "--size",
        "1G",
        "--object-size",
        "1M",
        "--stripe-unit",
        "64K",
        "--stripe-count",
        "4",
    ]);
    s.tern_ok(&[
        "create",
        "vols/small",
        "--size",
        "64",
        "--order",
        "16",
        "--image-feature",
        "layering,exclusive-lock",
    ]);
    assert_eq!(
        s.tern_json(&["ls", "vols"]),
        serde_json::json!(["db", "small", "striped"])
    );
    let long = s.tern_ok(&["ls", "-l", "vols"]);
    assert!(long.contains("NAME") && long.contains("10 GiB"), "{long}");

    let info = s.tern_json(&["info", "vols/db"]);
    assert_eq!(info["size"], 10u64 << 30);
    assert_eq!(info["order"], 22);
    assert_eq!(info["objects"], 2560);
    assert_eq!(
        info["features"],
        serde_json::json!([
            "layering",
            "exclusive-lock",
            "object-map",
            "fast-diff",
            "deep-flatten"
        ])
    );
    let info = s.tern_json(&["info", "vols/striped"]);
    assert_eq!(info["stripe_unit"], 65536);
    assert_eq!(info["stripe_count"], 4);
    assert!(
        info["features"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("striping"))
    );
    let info = s.tern_json(&["info", "vols/small"]);
    assert_eq!(
        (info["size"].as_u64(), info["object_size"].as_u64()),
        (Some(64 << 20), Some(65536))
    );
    let plain = s.tern_ok(&["info", "vols/db"]);
    assert!(plain.contains("size 10 GiB in 2560 objects"), "{plain}");

    s.tern_ok(&["resize", "vols/db", "--size", "20G"]);
    assert_eq!(s.tern_json(&["info", "vols/db"])["size"], 20u64 << 30);
    let (_, err) = s.tern_err(&["resize", "vols/db", "--size", "1G"]);
    assert!(err.contains("allow-shrink"), "{err}");
    s.tern_ok(&["resize", "vols/db", "--size", "1G", "--allow-shrink"]);
    s.tern_ok(&["rename", "vols/db", "vols/db2"]);
    assert_eq!(
        s.tern_json(&["ls", "vols"]),
        serde_json::json!(["db2", "small", "striped"])
    );

    let (code, err) = s.tern_err(&[
        "pool",
        "rm",
        "vols",
        "vols",
        "--yes-i-really-really-mean-it",
    ]);
    assert_eq!(code, 16, "{err}");
    assert!(err.contains("image"), "{err}");
    s.tern_ok(&["rm", "vols/db2"]);
    s.tern_ok(&["pool", "rm", "vols", "--force"]);
    assert_eq!(s.tern_ok(&["pool", "ls"]).trim(), "");

    // Central config, Ceph's words.
    s.tern_ok(&[
        "config",
        "set",
        "client.rbd-mirror",
        "rbd_mirror_concurrent_image_syncs",
        "20",
    ]);
    assert_eq!(
        s.tern_ok(&[
            "config",
            "get",
            "client.rbd-mirror",
            "rbd_mirror_concurrent_image_syncs"
        ])
        .trim(),
        "20"
    );
    assert_eq!(
        s.tern_ok(&[
            "config",
            "get",
            "client.other",
            "rbd_mirror_concurrent_image_syncs"
        ])
        .trim(),
        "5"
    );
    let dump = s.tern_json(&["config", "dump"]);
    assert_eq!(dump[0]["section"], "client.rbd-mirror");
    let (code, err) = s.tern_err(&["config", "set", "global", "rbd_no_such_option", "1"]);
    assert_eq!(code, 22);
    assert!(err.contains("unknown option"), "{err}");
    s.tern_err(&["config", "set", "global", "rbd_default_order", "big"]);

    // Clean shutdown on SIGTERM.
    let mut s = s;
    assert!(s.stop(), "ternd did not exit cleanly on SIGTERM");
}

#[test]
fn import_export_256mib_identical() {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["pool", "init", "rbd"]);
    let src = s.root.path().join("src.raw");
    let mut data = random_bytes(7, 256 << 20);
    // A zero run in the middle must survive as zeros (and is not stored).
    data[100 << 20..108 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    drop(data);
    let t = Instant::now();
    s.tern_ok(&["import", src.to_str().unwrap(), "rbd/big"]);
    eprintln!("import of 256 MiB took {:?}", t.elapsed());
    assert_eq!(s.tern_json(&["info", "rbd/big"])["size"], 256u64 << 20);
    let used = s.object_bytes();
    assert!(used < (250 << 20), "zero run was stored: {used} bytes used");
    let out = s.root.path().join("out.raw");
    let t = Instant::now();
    s.tern_ok(&["export", "rbd/big", out.to_str().unwrap()]);
    eprintln!("export of 256 MiB took {:?}", t.elapsed());
    assert_eq!(sha256_file(&src), sha256_file(&out));
    // Through a pipe both ways.
    let piped = s.root.path().join("piped.raw");
    let f = std::fs::File::create(&piped).unwrap();
    let st = s
        .tern_cmd()
        .args(["export", "rbd/big", "-"])
        .stdout(f)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(sha256_file(&src), sha256_file(&piped));
    let st = s
        .tern_cmd()
        .args(["import", "-", "rbd/fromstdin"])
        .stdin(std::fs::File::open(&src).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let out2 = s.root.path().join("out2.raw");
    s.tern_ok(&["export", "rbd/fromstdin", out2.to_str().unwrap()]);
    assert_eq!(sha256_file(&src), sha256_file(&out2));
}

#[test]
fn sparse_10gib_image_exports_fast_and_stays_small() {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/sparse", "--size", "10G"]);
    let rt = rt();
    let c = s.client(&rt);
    let r = ImageSpec::new("rbd", "sparse");
    let mut written = Vec::new();
    rt.block_on(async {
        for i in 0..10u64 {
            let off = i * (1000 << 20) + 12345 * 4096;
            let data = random_bytes(i, 1 << 20);
            c.io()
                .write(&r, off, data.clone(), false, "")
                .await
                .unwrap();
            written.push((off, data));
        }
        c.io().flush(&r).await.unwrap();
    });
    let used = s.object_bytes();
    assert!(
        (10 << 20..12 << 20).contains(&used),
        "10 MiB written but {used} bytes on disk"
    );
    let out = s.root.path().join("sparse.raw");
    let t = Instant::now();
    s.tern_ok(&["export", "rbd/sparse", out.to_str().unwrap()]);
    let took = t.elapsed();
    eprintln!("export of a 10 GiB image with 10 MiB written took {took:?}");
    assert!(took.as_secs_f64() < 2.0, "export took {took:?}");
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), 10 << 30);
    use std::os::unix::fs::MetadataExt;
    assert!(
        m.blocks() * 512 < 12 << 20,
        "export is not sparse: {} bytes",
        m.blocks() * 512
    );
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&out).unwrap();
    for (off, data) in &written {
        let mut buf = vec![0u8; data.len()];
        f.read_exact_at(&mut buf, *off).unwrap();
        assert!(&buf == data, "mismatch at {off}");
    }
    let mut z = vec![1u8; 1 << 20];
    f.read_exact_at(&mut z, 5 << 30).unwrap();
    assert!(z.iter().all(|b| *b == 0));
}

/// Random reads and writes through a real ternd, checked against a model, over many seeds.
#[test]
fn random_io_matches_model() {
    use rand::{Rng, SeedableRng};
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    let rt = rt();
    let c = s.client(&rt);
    let size: u64 = 3 << 20;
    for seed in 0..24u64 {
        let name = format!("m{seed}");
        // Alternate plain and striped layouts with small objects so ops cross objects.
        let mut args = vec![
            "create".to_string(),
            format!("rbd/{name}"),
            "--size".into(),
            "3M".into(),
            "--object-size".into(),
            "64K".into(),
        ];
        if seed % 2 == 1 {
            args.extend([
                "--stripe-unit".into(),
                "16K".into(),
                "--stripe-count".into(),
                "3".into(),
            ]);
        }
        s.tern_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let r = ImageSpec::new("rbd", &name);
        let mut model = vec![0u8; size as usize];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rt.block_on(async {
            for op in 0..120 {
                let off = rng.random_range(0..size - 1);
                let len = rng.random_range(1..=(size - off).min(200_000));
                match rng.random_range(0..10) {
                    0..=4 => {
                        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        c.io()
                            .write(&r, off, data, rng.random_bool(0.1), "")
                            .await
                            .unwrap();
                    }
                    5 => {
                        model[off as usize..(off + len) as usize].fill(0);
                        c.io().discard(&r, off, len, "").await.unwrap();
                    }
                    6 => {
                        model[off as usize..(off + len) as usize].fill(0);
                        c.io().write_zeroes(&r, off, len, "").await.unwrap();
                    }
                    7 => {
                        c.io().flush(&r).await.unwrap();
                    }
                    _ => {
                        let got = c.io().read(&r, off, len).await.unwrap();
                        assert!(
                            got == model[off as usize..(off + len) as usize],
                            "seed {seed} op {op}: read {off}+{len} differs"
                        );
                    }
                }
            }
        });
        let out = s.root.path().join(format!("{name}.raw"));
        s.tern_ok(&["export", &format!("rbd/{name}"), out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == model,
            "seed {seed}: export differs from the model"
        );
    }
}
