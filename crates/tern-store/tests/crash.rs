//! kill -9 in the middle of writes and metadata changes: every write
//! acknowledged by a flush, and every committed metadata change, survives.
//! (A killed process keeps the page cache, so this checks the store's own
//! recovery, notably redb's after an unclean close, not fsync ordering.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use tern_store::{CreateOpts, KvTable, Store};
use tern_types::{Features, Layout};

const SLOTS: u64 = 64;
const SLOT: u64 = 20_000;

fn pattern(i: u64) -> Vec<u8> {
    (0..SLOT)
        .map(|k| (k as u8).wrapping_add(i as u8) ^ (i >> 8) as u8)
        .collect()
}

/// The child half: runs only when the parent starts it.
#[test]
#[ignore = "child process of kill9_keeps_acknowledged_writes"]
fn crash_child() {
    let Ok(dir) = std::env::var("TERN_CRASH_DIR") else {
        return;
    };
    let s = Store::open(std::path::Path::new(&dir)).unwrap();
    if s.pool_get("p").is_err() {
        s.pool_create("p").unwrap();
        let o = CreateOpts {
            size: SLOTS * SLOT,
            layout: Layout::new(65536, Some(4096), Some(3)).unwrap(),
            features: Features::DEFAULT,
        };
        s.image_create("p", "i", &o).unwrap();
    }
    let img = s.open_image("p", "i").unwrap();
    for i in 0.. {
        img.write((i % SLOTS) * SLOT, &pattern(i), false).unwrap();
        if i % 4 == 3 {
            img.flush().unwrap();
            s.kv_put(KvTable::Config, "acked", &i.to_string()).unwrap();
            println!("acked {i}");
        }
    }
}

#[test]
fn kill9_keeps_acknowledged_writes() {
    let t = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TERN_CRASH_DIR", t.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut acked = None;
        let out = BufReader::new(child.stdout.take().unwrap());
        for line in out.lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("acked ") {
                acked = Some(n.parse::<u64>().unwrap());
                if acked.unwrap() >= 200 + round * 37 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = acked.expect("child acknowledged writes");

        let s = Store::open(t.path()).unwrap();
        let stored: u64 = s
            .kv_get(KvTable::Config, "acked")
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert!(stored >= acked, "metadata lost: {stored} < {acked}");
        let img = s.open_image("p", "i").unwrap();
        for slot in 0..SLOTS {
            // The slot holds the last acknowledged write to it, or a later one.
            let last = (0..=acked).rev().find(|i| i % SLOTS == slot);
            let mut b = vec![0u8; SLOT as usize];
            img.read(slot * SLOT, &mut b).unwrap();
            let ok = match last {
                None => true,
                Some(l) => (l..l + 2000 * SLOTS)
                    .step_by(SLOTS as usize)
                    .any(|j| b == pattern(j)),
            };
            assert!(ok, "round {round}: slot {slot} lost its acknowledged write");
        }
        // The next child restarts at i = 0, so leave a clean slate.
        drop(img);
        s.image_remove("p", "i").unwrap();
        s.pool_remove("p", false).unwrap();
    }
}
