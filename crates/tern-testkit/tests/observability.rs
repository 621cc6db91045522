//! What operators watch: Prometheus metrics from ternd and tern-mirror
//! during real replication, the shipped alert rules under promtool, the
//! status page in headless Chromium, the systemd units, completions and
//! man pages, and `tern status`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tern_testkit::nbd::NbdClient;
use tern_testkit::{Site, bin, http_get, linked_sites, metric, random_bytes, wait_until};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn image_state(s: &Site, spec: &str) -> String {
    let o = s.tern(&["mirror", "image", "status", spec, "--format", "json"]);
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| v["state"].as_str().map(String::from))
        .unwrap_or_default()
}

/// The daemon and pool-health series of a site, for failure messages.
fn daemon_lines(s: &Site) -> String {
    scrape(&s.http_addr)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("daemon") || l.contains("pool_health"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn scrape(addr: &str) -> Option<String> {
    match http_get(addr, "/metrics") {
        Some((200, body)) => Some(body),
        _ => None,
    }
}

/// NBD writes of 4 KiB at `rate`/s to the first 64 MiB until stopped.
fn writer(
    s: &Site,
    export: &str,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let (addr, export) = (s.nbd_addr.clone(), export.to_string());
    std::thread::spawn(move || {
        let mut c = NbdClient::connect(&addr, &export).expect("nbd");
        let t0 = Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
            let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
            c.send_write((n * 7919 % 16384) * 4096, &random_bytes(n, 4096), false)
                .unwrap();
            assert_eq!(c.replies.recv().unwrap().error, 0);
            n += 1;
        }
        n
    })
}

/// Metric names an expression file uses (alerts, dashboard).
fn names_used(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(p) = text[i..].find("tern_") {
        let start = i + p;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let before_ok =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let name = &text[start..end];
        if before_ok && name.len() > 5 && !name.starts_with("tern_mirror_alerts") {
            out.push(name.to_string());
        }
        i = end;
    }
    out.sort();
    out.dedup();
    out
}

/// Scrapes both daemons while a journaled image replicates through a slow
/// link: the lag metric rises under load and falls to 0 after; then the
/// mirror daemon is killed (its series vanish, its site marks it down and
/// the pool's daemon health degrades) and restarted (healed).
#[test]
fn metrics_follow_replication_and_daemon_death() {
    let (a, b, _link) = linked_sites();
    let _ma = a.start_mirror();
    let mut mb = b.start_mirror();
    a.tern_ok(&[
        "create",
        "rbd/db",
        "--size",
        "64M",
        "--image-feature",
        "layering,exclusive-lock,journaling",
    ]);
    a.tern_ok(&["mirror", "image", "enable", "rbd/db", "journal"]);
    let mb_addr = mb.metrics_addr().expect("B's daemon serves metrics");
    let ok = wait_until(Duration::from_secs(60), || {
        image_state(&b, "rbd/db") == "up+replaying"
    });
    assert!(ok, "B never replayed");
    // A thin link: B's daemon may pull 1 MiB/s while A writes about 4 MiB/s,
    // so B falls behind for as long as the load lasts.
    b.tern_ok(&[
        "config",
        "set",
        "client.rbd-mirror",
        "rbd_mirror_bandwidth_limit",
        "1M",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&a, "rbd/db", 1000, stop.clone());
    let (mut max_daemon, mut max_site) = (0.0f64, 0.0f64);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(400));
        if let Some(m) = scrape(&mb_addr) {
            let lag = metric(
                &m,
                "tern_mirror_daemon_image_replay_lag_seconds",
                &[("image", "db")],
            );
            max_daemon = max_daemon.max(lag.unwrap_or(0.0));
        }
        if let Some(m) = scrape(&a.http_addr) {
            let lag = metric(
                &m,
                "tern_mirror_image_replay_lag_seconds",
                &[("image", "db"), ("site", "site-b")],
            );
            max_site = max_site.max(lag.unwrap_or(0.0));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = w.join().unwrap();
    b.tern_ok(&[
        "config",
        "rm",
        "client.rbd-mirror",
        "rbd_mirror_bandwidth_limit",
    ]);
    eprintln!("{writes} writes; max lag seen: daemon {max_daemon:.2} s, site A {max_site:.2} s");
    assert!(
        max_daemon > 0.1,
        "the daemon's lag metric never rose: {max_daemon}\n{}\n{}",
        scrape(&mb_addr).unwrap_or_default(),
        b.tern_ok(&["mirror", "image", "status", "rbd/db"])
    );
    assert!(max_site > 0.1, "site A's lag metric never rose: {max_site}");
    let t = Instant::now();
    let ok = wait_until(Duration::from_secs(30), || {
        let d = scrape(&mb_addr).and_then(|m| {
            metric(
                &m,
                "tern_mirror_daemon_image_replay_lag_seconds",
                &[("image", "db")],
            )
        });
        let s = scrape(&a.http_addr).and_then(|m| {
            metric(
                &m,
                "tern_mirror_image_replay_lag_seconds",
                &[("image", "db"), ("site", "site-b")],
            )
        });
        d == Some(0.0) && s == Some(0.0)
    });
    assert!(ok, "lag did not fall to 0 after the load");
    eprintln!("lag back to 0 {:?} after the writes stopped", t.elapsed());

    // What the scrapes hold, and that every name the alerts and the
    // dashboard use is exported.
    let md = scrape(&mb_addr).unwrap();
    let sa = scrape(&a.http_addr).unwrap();
    let sb = scrape(&b.http_addr).unwrap();
    assert!(
        metric(
            &md,
            "tern_mirror_daemon_replicated_bytes_total",
            &[("image", "db")]
        )
        .unwrap()
            >= (writes * 4096) as f64
    );
    assert!(
        metric(
            &md,
            "tern_mirror_daemon_replicated_entries_total",
            &[("image", "db")]
        )
        .unwrap()
            >= writes as f64
    );
    assert_eq!(
        metric(
            &md,
            "tern_mirror_daemon_image_entries_behind",
            &[("image", "db")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&md, "tern_mirror_daemon_info", &[("site", "site-b")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&sb, "tern_mirror_daemons_up", &[("pool", "rbd")]),
        Some(1.0)
    );
    assert!(
        metric(
            &sa,
            "tern_nbd_request_duration_seconds_count",
            &[("pool", "rbd"), ("op", "write")]
        )
        .unwrap()
            >= writes as f64
    );
    assert!(
        metric(
            &sa,
            "tern_nbd_requests_total",
            &[("pool", "rbd"), ("op", "write")]
        )
        .unwrap()
            >= writes as f64
    );
    assert!(metric(&sa, "tern_journal_bytes", &[("image", "db")]).is_some());
    assert_eq!(
        metric(&sa, "tern_mirror_image_primary", &[("image", "db")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&sb, "tern_mirror_image_primary", &[("image", "db")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &sb,
            "tern_mirror_pool_health",
            &[("pool", "rbd"), ("kind", "health")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&sb, "tern_mirror_daemon_up", &[("site", "site-b")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &sb,
            "tern_mirror_image_state",
            &[("image", "db"), ("site", "site-b"), ("state", "replaying")]
        ),
        Some(1.0)
    );
    let all = format!("{md}\n{sa}\n{sb}");
    for f in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/tern-dashboard.json",
    ] {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        for name in names_used(&text) {
            assert!(
                all.lines().any(|l| l.starts_with(&name)),
                "{f} uses {name}, which no daemon exports"
            );
        }
    }

    // The mirror daemon dies: its endpoint is gone, its site marks it down.
    mb.kill9();
    assert!(scrape(&mb_addr).is_none(), "a killed daemon still answers");
    let t = Instant::now();
    let ok = wait_until(Duration::from_secs(15), || {
        let sb = scrape(&b.http_addr).unwrap_or_default();
        let st = b.tern_json(&["mirror", "pool", "status", "rbd"]);
        metric(&sb, "tern_mirror_daemon_up", &[("site", "site-b")]) == Some(0.0)
            && metric(&sb, "tern_mirror_daemons_up", &[("pool", "rbd")]) == Some(0.0)
            && metric(
                &sb,
                "tern_mirror_pool_health",
                &[("pool", "rbd"), ("kind", "daemon")],
            )
            .is_some_and(|h| h >= 1.0)
            && st["summary"]["daemon_health"] != "OK"
            && image_state(&b, "rbd/db").starts_with("down+")
    });
    assert!(
        ok,
        "B did not show its daemon down: {}\n{}",
        b.tern_json(&["mirror", "pool", "status", "rbd", "--verbose"]),
        daemon_lines(&b)
    );
    eprintln!("daemon shown down {:?} after the kill", t.elapsed());
    let status = b.tern_ok(&["status"]);
    assert!(
        status.contains("DOWN"),
        "tern status does not show the dead daemon:\n{status}"
    );

    // Restarted: healed.
    mb.restart();
    let mb_addr = mb.metrics_addr().expect("metrics after restart");
    let ok = wait_until(Duration::from_secs(30), || {
        let sb = scrape(&b.http_addr).unwrap_or_default();
        scrape(&mb_addr).is_some()
            && metric(
                &sb,
                "tern_mirror_pool_health",
                &[("pool", "rbd"), ("kind", "daemon")],
            ) == Some(0.0)
            && image_state(&b, "rbd/db") == "up+replaying"
    });
    assert!(
        ok,
        "B did not heal after the daemon restarted: {} / {:?}\n{}",
        image_state(&b, "rbd/db"),
        scrape(&mb_addr).map(|m| m.len()),
        daemon_lines(&b)
    );
    let status = b.tern_ok(&["status"]);
    assert!(
        status.contains("rbd-mirror:") && status.contains(" up, heartbeat"),
        "{status}"
    );
    let j = b.tern_json(&["status"]);
    assert!(
        j["mirroring"][0]["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["up"] == true && d["heartbeat_age_secs"].as_u64().unwrap() <= 3),
        "{j}"
    );
}

/// `promtool check rules` and `promtool test rules` on the shipped rules.
#[test]
fn alert_rules_pass_promtool() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let o = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool (scripts/deps.sh installs the prometheus package)");
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let dash: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("deploy/grafana/tern-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 8);
}

/// The status page during a sync, rendered by headless Chromium; the
/// screenshot is kept in target/test-output/status-page.png.
#[test]
fn status_page_during_a_sync() {
    let (a, b, _link) = linked_sites();
    let _ma = a.start_mirror();
    // A slow daemon at B so the sync is seen in progress.
    b.tern_ok(&[
        "config",
        "set",
        "client.rbd-mirror",
        "rbd_mirror_bandwidth_limit",
        "8M",
    ]);
    let _mb = b.start_mirror();
    a.tern_ok(&["create", "rbd/db", "--size", "64M"]);
    let f = a.root.path().join("data.raw");
    std::fs::write(&f, random_bytes(3, 96 << 20)).unwrap();
    a.tern_ok(&["import", f.to_str().unwrap(), "rbd/vm-disk2"]);
    for img in ["rbd/vm-disk2", "rbd/db"] {
        a.tern_ok(&["mirror", "image", "enable", img, "snapshot"]);
    }
    let mut page = String::new();
    let ok = wait_until(Duration::from_secs(60), || {
        page = http_get(&b.http_addr, "/")
            .map(|(_, p)| p)
            .unwrap_or_default();
        page.contains("vm-disk2") && page.contains(">syncing<")
    });
    assert!(ok, "the page never showed the sync:\n{page}");
    assert!(page.contains("http-equiv=\"refresh\""));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "external assets in the page"
    );
    let out_dir = repo().join("target/test-output");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium (scripts/deps.sh installs it)");
    let o = Command::new("timeout")
        .args([
            "60",
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,800",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("http://{}/", b.http_addr))
        .output()
        .unwrap();
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "no screenshot ({} bytes): {}",
        png.len(),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!(
        "status page screenshot: {} ({} bytes)",
        shot.display(),
        png.len()
    );
}

/// The systemd units verify; completions and man pages are generated
/// from the CLI definition.
#[test]
fn units_completions_and_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man");
    let o = Command::new(bin("tern"))
        .args(["man"])
        .arg(&man)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pages: Vec<_> = std::fs::read_dir(&man).unwrap().flatten().collect();
    assert!(pages.len() > 20, "{} man pages", pages.len());
    let main = std::fs::read_to_string(man.join("tern.1")).unwrap();
    assert!(main.contains(".TH tern 1"), "{main}");
    assert!(man.join("tern-dr-failover.1").exists());
    // Units: binaries pointed at this build; man:tern(1) found via MANPATH.
    let mandir = dir.path().join("share/man/man1");
    std::fs::create_dir_all(&mandir).unwrap();
    for p in &pages {
        std::fs::copy(p.path(), mandir.join(p.file_name())).unwrap();
    }
    for unit in ["ternd@.service", "tern-mirror@.service"] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
        let text = text
            .replace("/usr/bin/ternd", bin("ternd").to_str().unwrap())
            .replace("/usr/bin/tern-mirror", bin("tern-mirror").to_str().unwrap());
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let o = Command::new("systemd-analyze")
        .args([
            "verify",
            "./ternd@site-a.service",
            "./tern-mirror@site-a.service",
        ])
        .current_dir(dir.path())
        .env("MANPATH", dir.path().join("share/man"))
        .output()
        .expect("systemd-analyze");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "systemd-analyze verify:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    for (shell, want) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef tern"),
        ("fish", "complete -c tern"),
    ] {
        let o = Command::new(bin("tern"))
            .args(["completion", shell])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && s.contains(want), "{shell}: {s}");
        assert!(
            s.contains("failover"),
            "{shell} completion lacks dr failover"
        );
    }
}
