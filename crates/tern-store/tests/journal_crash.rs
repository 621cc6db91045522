//! kill -9 of a process writing to a journaled image from several threads
//! (with FUA writes, flushes and snapshots): after reopening, every
//! acknowledged write is there (whole: with journaling a write is never
//! torn), replay is idempotent (a second reopen shows the same bytes) and
//! `inspect` finds the journal clean. The child logs each acknowledgement
//! to a file only after the call returned.

use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_store::{CreateOpts, SnapNamespace, Store};
use tern_types::{Features, Layout};

const THREADS: u64 = 4;
const SLOTS_PER_THREAD: u64 = 8;
const SLOT: u64 = 20_000;
const SIZE: u64 = THREADS * SLOTS_PER_THREAD * SLOT;

fn pattern(slot: u64, seq: u64) -> Vec<u8> {
    (0..SLOT)
        .map(|k| (k as u8).wrapping_mul(31) ^ (seq as u8) ^ ((seq >> 8) as u8) ^ (slot as u8))
        .collect()
}

#[test]
#[ignore = "child process of kill9_journaled_concurrent_writers"]
fn journal_crash_child() {
    let Ok(dir) = std::env::var("TERN_JCRASH_DIR") else {
        return;
    };
    let image = std::env::var("TERN_JCRASH_IMAGE").unwrap();
    let s = Arc::new(Store::open(std::path::Path::new(&dir)).unwrap());
    if s.pool_get("p").is_err() {
        s.pool_create("p").unwrap();
    }
    s.image_create(
        "p",
        &image,
        &CreateOpts {
            size: SIZE,
            layout: Layout::new(65536, Some(4096), Some(3)).unwrap(),
            features: Features(Features::EXCLUSIVE_LOCK | Features::JOURNALING),
        },
    )
    .unwrap();
    let log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{dir}/acks-{image}"))
            .unwrap(),
    ));
    let img = s.open_image("p", &image).unwrap();
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let (img, log) = (img.clone(), log.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t);
            for seq in 1u64.. {
                let slot = t * SLOTS_PER_THREAD + rng.random_range(0..SLOTS_PER_THREAD);
                img.write(slot * SLOT, &pattern(slot, seq), rng.random_bool(0.2))
                    .unwrap();
                if rng.random_bool(0.1) {
                    img.flush().unwrap();
                }
                let line = format!("ack {slot} {seq}\n");
                log.lock().unwrap().write_all(line.as_bytes()).unwrap();
            }
        }));
    }
    for n in 0u64.. {
        std::thread::sleep(Duration::from_millis(20));
        let name = format!("s{n}");
        s.snap_create("p", &image, &name, SnapNamespace::User)
            .unwrap();
        let line = format!("snap {name}\n");
        log.lock().unwrap().write_all(line.as_bytes()).unwrap();
    }
}

fn read_all(s: &Store, image: &str) -> Vec<u8> {
    let img = s.open_image("p", image).unwrap();
    let mut b = vec![0u8; SIZE as usize];
    img.read(0, &mut b).unwrap();
    b
}

#[test]
fn kill9_journaled_concurrent_writers() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_str().unwrap().to_string();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let rounds = 12;
    for round in 0..rounds {
        let image = format!("i{round}");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "journal_crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TERN_JCRASH_DIR", &dir)
            .env("TERN_JCRASH_IMAGE", &image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let log_path = format!("{dir}/acks-{image}");
        let want = rng.random_range(40..400usize);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = std::fs::read_to_string(&log_path)
                .map(|s| s.lines().filter(|l| l.starts_with("ack")).count())
                .unwrap_or(0);
            if n >= want || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL, mid-workload
        child.wait().unwrap();
        let log = std::fs::read_to_string(&log_path).unwrap();
        let mut last: HashMap<u64, u64> = HashMap::new();
        let mut thread_last: HashMap<u64, u64> = HashMap::new();
        let mut snaps = Vec::new();
        for line in log.lines() {
            let w: Vec<&str> = line.split(' ').collect();
            match w.as_slice() {
                ["ack", slot, seq] => {
                    let (slot, seq): (u64, u64) = (slot.parse().unwrap(), seq.parse().unwrap());
                    last.insert(slot, seq);
                    thread_last.insert(slot / SLOTS_PER_THREAD, seq);
                }
                ["snap", name] => snaps.push(name.to_string()),
                _ => {} // a line cut by the kill
            }
        }
        assert!(last.len() > 1, "round {round}: the child made progress");

        let s = Store::open(t.path()).unwrap();
        let content = read_all(&s, &image);
        for (&slot, &seq) in &last {
            let got = &content[(slot * SLOT) as usize..((slot + 1) * SLOT) as usize];
            // The slot's thread may have had its next write in flight (seq
            // counts the thread's writes to all its slots): that one is
            // either wholly there or not at all.
            let next = thread_last[&(slot / SLOTS_PER_THREAD)] + 1;
            let ok = got == pattern(slot, seq) || got == pattern(slot, next);
            assert!(
                ok,
                "round {round}: slot {slot} lost acknowledged write {seq}"
            );
        }
        for name in &snaps {
            s.snap_get("p", &image, name)
                .unwrap_or_else(|e| panic!("round {round}: snapshot {name}: {e}"));
        }
        let j = s.journal("p", &image).unwrap();
        let r = j.inspect().unwrap();
        assert!(r.errors.is_empty(), "round {round}: {r:?}");
        assert_eq!(j.applied_tid(), j.last_tid(), "round {round}: replayed");
        // Every earlier round's image too (replayed again, unchanged).
        let all: Vec<Vec<u8>> = (0..=round)
            .map(|r| read_all(&s, &format!("i{r}")))
            .collect();
        drop(j);
        drop(s);
        let s = Store::open(t.path()).unwrap();
        for (r, before) in all.iter().enumerate() {
            assert!(
                &read_all(&s, &format!("i{r}")) == before,
                "round {round}: image i{r} changed on a second reopen"
            );
        }
    }
}
