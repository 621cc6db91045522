//! An orderly stop: SIGTERM to a ternd that serves an NBD client holding
//! an image's exclusive lock, with journaled writes just made. ternd must
//! exit 0 within its shutdown bound, its log (a file) must carry no colour
//! codes, and the next start must find every acknowledged write and a
//! clean, checkpointed journal. Then the same for a ternd whose journal a
//! peer's mirror daemon is following (a stream that never ends by itself),
//! and for that daemon.

use std::time::{Duration, Instant};
use tern_testkit::nbd::NbdClient;
use tern_testkit::{create_mirrored, journaled_site, linked_sites, wait_until};

/// ternd's shutdown bound (`tern_daemon::SHUTDOWN_BOUND`): what it waits for
/// its tasks before it closes the store anyway.
const BOUND: Duration = Duration::from_secs(10);
const BLOCK: u64 = 4096;

fn block(i: u64) -> Vec<u8> {
    tern_testkit::random_bytes(i, BLOCK as usize)
}

/// Waits for the reply to `handle`; panics on an error reply.
fn acked(c: &NbdClient, handle: u64, what: &str) {
    let r = c
        .replies
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: no reply ({e})"));
    assert_eq!((r.handle, r.error), (handle, 0), "{what}");
}

#[test]
fn sigterm_with_a_locked_nbd_export_and_journaled_writes_stops_in_order() {
    // Small segments: the writes below span several, and the shutdown
    // checkpoint has some to trim.
    let mut site = journaled_site("shutdown", "64M");
    let mut c = NbdClient::connect(&site.nbd_addr, "rbd/j").expect("nbd connect");
    let locks = site.tern_ok(&["lock", "ls", "rbd/j"]);
    assert!(locks.contains("nbd"), "the export holds the lock: {locks}");

    // Flushed writes, then more acknowledged but not flushed: the journal
    // holds the newest ones past its last checkpoint when the stop comes.
    const FLUSHED: u64 = 256;
    const RECENT: u64 = 64;
    for i in 0..FLUSHED {
        let h = c
            .send_write(i * 3 * BLOCK, &block(i), false)
            .expect("write");
        acked(&c, h, &format!("write {i}"));
    }
    let h = c.send_flush().expect("flush");
    acked(&c, h, "flush");
    for i in FLUSHED..FLUSHED + RECENT {
        let h = c
            .send_write(i * 3 * BLOCK, &block(i), false)
            .expect("write");
        acked(&c, h, &format!("write {i}"));
    }
    let before = site.tern_json(&["journal", "info", "rbd/j"]);

    let t = Instant::now();
    let clean = site.stop();
    let took = t.elapsed();
    let log = site.log();
    eprintln!("ternd exited {took:?} after SIGTERM; journal before: {before}");
    assert!(clean, "ternd did not exit 0 after SIGTERM:\n{log}");
    assert!(took < BOUND, "ternd took {took:?} to stop:\n{log}");
    assert!(
        !log.contains("still running at the shutdown deadline"),
        "tasks outlived the shutdown:\n{log}"
    );
    for said in ["SIGTERM received", "nbd export closed", "ternd stopped"] {
        assert!(log.contains(said), "the log lacks '{said}':\n{log}");
    }
    assert!(
        !log.contains("\x1b["),
        "colour codes in the log file:\n{log}"
    );
    // The client was told: its connection ended.
    assert!(
        c.replies.recv_timeout(Duration::from_secs(5)).is_err(),
        "the NBD connection outlived ternd"
    );
    drop(c);

    site.restart();
    let v = site.tern_json(&["journal", "inspect", "rbd/j"]);
    assert_eq!(v["errors"], serde_json::json!([]), "journal inspect: {v}");
    // The stop checkpointed the journal: every entry is in the object
    // files, so the segments behind it are gone and nothing replays.
    let after = site.tern_json(&["journal", "info", "rbd/j"]);
    eprintln!("journal after the restart: {after}");
    let last = after["last_tid"].as_u64().expect("last_tid");
    assert_eq!(
        after["applied_tid"].as_u64(),
        Some(last),
        "entries left unapplied: {after}"
    );
    assert!(
        after["segments"].as_array().map_or(0, Vec::len)
            < before["segments"].as_array().map_or(0, Vec::len),
        "the shutdown checkpoint trimmed nothing: before {before}, after {after}"
    );
    let mut c = NbdClient::connect(&site.nbd_addr, "rbd/j").expect("nbd reconnect");
    for i in 0..FLUSHED + RECENT {
        assert!(
            c.read(i * 3 * BLOCK, BLOCK as u32).expect("read") == block(i),
            "write {i} lost across the stop"
        );
    }
    c.disconnect();
}

#[test]
fn sigterm_ends_journal_streams_a_mirror_daemon_follows() {
    let (mut a, b, _link) = linked_sites();
    let mut mb = b.start_mirror();
    create_mirrored(&a, "j", "16M", "journal");
    let mut c = NbdClient::connect(&a.nbd_addr, "rbd/j").expect("nbd connect");
    let h = c.send_write(0, &block(1), true).expect("write");
    acked(&c, h, "write");
    c.disconnect();
    let replaying = wait_until(Duration::from_secs(60), || {
        let o = b.tern(&["mirror", "image", "status", "rbd/j", "--format", "json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).is_ok_and(|v| {
            v["description"]
                .as_str()
                .is_some_and(|d| d.starts_with("replaying"))
        })
    });
    assert!(replaying, "B never replayed A's journal:\n{}", mb.log());

    let t = Instant::now();
    let clean = a.stop();
    let took = t.elapsed();
    eprintln!("the followed ternd exited {took:?} after SIGTERM");
    assert!(
        clean && took < BOUND,
        "ternd took {took:?} (exit 0: {clean}):\n{}",
        a.log()
    );

    let t = Instant::now();
    let clean = mb.stop();
    let took = t.elapsed();
    let log = mb.log();
    eprintln!("tern-mirror exited {took:?} after SIGTERM");
    assert!(
        clean && took < BOUND,
        "tern-mirror took {took:?} (exit 0: {clean}):\n{log}"
    );
    assert!(log.contains("tern-mirror stopping"), "{log}");
    assert!(
        !log.contains("\x1b["),
        "colour codes in the log file:\n{log}"
    );
}
