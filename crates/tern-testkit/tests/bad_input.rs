//! Bad input gets a clear error and a non-zero exit, and leaves nothing behind.

use std::io::Write;
use std::time::Duration;
use tern_testkit::{Site, random_bytes, rt, wait_until};
use tern_types::api::{DataChunk, ImageCreate, WriteMessage, WriteOpen};

fn site() -> Site {
    let s = Site::start("site-a");
    s.tern_ok(&["pool", "create", "rbd"]);
    s.tern_ok(&["create", "rbd/keep", "--size", "1G"]);
    s
}

fn assert_unchanged(s: &Site) {
    assert_eq!(s.tern_json(&["ls", "rbd"]), serde_json::json!(["keep"]));
    assert_eq!(s.tern_json(&["info", "rbd/keep"])["size"], 1u64 << 30);
}

#[test]
fn bad_sizes_names_and_features() {
    let s = site();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["create", "rbd/a", "--size", "0"], 22, "greater than 0"),
        (
            &["create", "rbd/a", "--size", "12Q"],
            22,
            "invalid size '12Q'",
        ),
        (&["create", "rbd/a", "--size", "-5"], 22, "invalid size"),
        (
            &["create", "rbd/a@snap", "--size", "1G"],
            22,
            "not a snapshot",
        ),
        (
            &["create", "rbd/a/b", "--size", "1G"],
            22,
            "not an image spec",
        ),
        (&["pool", "create", "a/b"], 22, "may not contain '/'"),
        (&["pool", "create", "a@b"], 22, "may not contain"),
        (&["create", "nopool/a", "--size", "1G"], 2, "pool 'nopool'"),
        (&["info", "rbd/nothere"], 2, "nothere"),
        (&["rm", "rbd/nothere"], 2, "nothere"),
        (&["create", "rbd/keep", "--size", "1G"], 17, "exists"),
        (
            &[
                "create",
                "rbd/j",
                "--size",
                "1G",
                "--image-feature",
                "layering,journaling",
            ],
            22,
            "journaling requires exclusive-lock",
        ),
        (
            &[
                "create",
                "rbd/f",
                "--size",
                "1G",
                "--image-feature",
                "fast-diff,exclusive-lock",
            ],
            22,
            "fast-diff requires object-map",
        ),
        (
            &[
                "create",
                "rbd/u",
                "--size",
                "1G",
                "--image-feature",
                "warp-drive",
            ],
            22,
            "unknown image feature",
        ),
        (
            &["create", "rbd/o", "--size", "1G", "--object-size", "3000"],
            22,
            "power of two",
        ),
        (
            &["create", "rbd/o", "--size", "1G", "--order", "40"],
            22,
            "order",
        ),
        (
            &[
                "create",
                "rbd/o",
                "--size",
                "1G",
                "--stripe-unit",
                "3K",
                "--stripe-count",
                "2",
            ],
            22,
            "stripe unit",
        ),
        (&["resize", "rbd/keep", "--size", "2000P"], 22, ""),
        (&["resize", "rbd/keep", "--size", "0"], 22, "greater than 0"),
        (&["resize", "rbd/keep", "--size", "1M"], 22, "allow-shrink"),
        (&["rename", "rbd/keep", "rbd/x@y"], 22, ""),
        (&["rename", "rbd/nothere", "rbd/x"], 2, ""),
        (
            &["import", "/nonexistent/file", "rbd/x"],
            2,
            "/nonexistent/file",
        ),
        (
            &["bench", "rbd/keep", "--io-type", "write", "--io-size", "0"],
            22,
            "io-size",
        ),
        (
            &["auth", "get-or-create", "bob", "mon", "profile rbd"],
            22,
            "client.NAME",
        ),
        (
            &[
                "auth",
                "get-or-create",
                "client.bob",
                "mon",
                "profile nonsense",
            ],
            22,
            "unsupported mon cap",
        ),
        (
            &["config", "set", "nobody", "rbd_default_order", "22"],
            22,
            "config section",
        ),
    ];
    for (args, code, needle) in cases {
        let (got, err) = s.tern_err(args);
        assert_eq!(got, *code, "tern {args:?}: {err}");
        assert!(err.starts_with("tern: "), "tern {args:?}: {err}");
        assert!(
            err.contains(needle),
            "tern {args:?}: expected '{needle}' in: {err}"
        );
    }
    assert_unchanged(&s);
}

#[test]
fn io_past_the_end_is_refused() {
    let s = site();
    let rt = rt();
    let c = s.client(&rt);
    let r = tern_types::ImageSpec::new("rbd", "keep");
    let e = rt
        .block_on(c.io().write(&r, (1 << 30) - 100, vec![1; 4096], false, ""))
        .unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::InvalidArgument, "{e}");
    assert!(e.message.contains("past the end"), "{e}");
    let e = rt.block_on(c.io().read(&r, 1 << 30, 1)).unwrap_err();
    assert_eq!(e.kind, tern_types::ErrorKind::InvalidArgument, "{e}");
    assert_eq!(s.object_bytes(), 0, "a refused write stored data");
    assert_unchanged(&s);
}

/// An import stream that ends without its commit, from a client that
/// vanishes mid-stream, or a site that dies mid-import: no image appears and
/// no data stays behind.
#[test]
fn truncated_imports_leave_nothing() {
    let mut s = site();
    // 1. The API stream ends without a commit.
    let rt = rt();
    let c = s.client(&rt);
    let e = rt.block_on(async {
        let msgs = vec![
            WriteMessage::Open(Box::new(WriteOpen {
                create: Some(ImageCreate {
                    pool: "rbd".into(),
                    image: "partial".into(),
                    size: 8 << 20,
                    ..Default::default()
                }),
                image: None,
                ..Default::default()
            })),
            WriteMessage::Chunk(DataChunk {
                offset: 0,
                length: 1 << 20,
                zero: false,
                data: random_bytes(1, 1 << 20).into(),
            }),
        ];
        c.io()
            .write_stream(futures::stream::iter(msgs))
            .await
            .unwrap_err()
    });
    assert!(e.message.contains("ended before its commit"), "{e:?}");
    assert_unchanged(&s);
    assert!(
        wait_until(Duration::from_secs(5), || s.object_bytes() == 0),
        "data of a discarded import remains"
    );

    // 2. The tern process importing from stdin is killed mid-stream.
    let mut child = s
        .tern_cmd()
        .args(["import", "-", "rbd/killed"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..4 {
        stdin.write_all(&random_bytes(i, 4 << 20)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    assert!(
        wait_until(Duration::from_secs(5), || s.object_bytes() == 0),
        "data of a killed import remains"
    );
    assert_unchanged(&s);

    // 3. A stdin import whose input ends early is simply shorter; a commit
    //    that claims more bytes than arrived is refused.
    let e = rt.block_on(async {
        let msgs = vec![
            WriteMessage::Open(Box::new(WriteOpen {
                create: Some(ImageCreate {
                    pool: "rbd".into(),
                    image: "short".into(),
                    size: 0,
                    ..Default::default()
                }),
                image: None,
                ..Default::default()
            })),
            WriteMessage::Chunk(DataChunk {
                offset: 0,
                length: 4096,
                zero: false,
                data: vec![7; 4096].into(),
            }),
            WriteMessage::Commit {
                final_size: 8192,
                total_bytes: 8192,
            },
        ];
        c.io()
            .write_stream(futures::stream::iter(msgs))
            .await
            .unwrap_err()
    });
    assert!(e.message.contains("import incomplete"), "{e:?}");
    assert_unchanged(&s);

    // 4. ternd dies mid-import: after restart the half import is gone.
    let mut child = s
        .tern_cmd()
        .args(["import", "-", "rbd/crashed"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..4 {
        stdin.write_all(&random_bytes(i, 4 << 20)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    s.kill9();
    drop(stdin);
    let _ = child.wait();
    s.restart();
    assert_unchanged(&s);
    assert_eq!(
        s.object_bytes(),
        0,
        "data of an import interrupted by a crash remains"
    );
}

#[test]
fn second_ternd_on_one_data_dir_is_refused() {
    // Two daemons on one directory would corrupt it: the second says so
    // and exits, and the first goes on serving.
    let s = site();
    let out = std::process::Command::new(tern_testkit::bin("ternd"))
        .arg("--data")
        .arg(&s.data)
        .args([
            "--cluster",
            "site-a",
            "--listen",
            "127.0.0.1:0",
            "--nbd-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--conf-dir",
        ])
        .arg(s.root.path().join("conf2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second ternd started: {err}");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(out.status.code(), Some(16), "{err}");
    assert_unchanged(&s);
    s.tern_ok(&["create", "rbd/after", "--size", "1M"]);
}
