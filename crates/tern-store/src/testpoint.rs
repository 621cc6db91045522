//! Named points where a test may hold a daemon or crash it. A test arms a
//! point by creating a file of its name in `$TERN_TEST_HOLD_DIR`: `<point>`
//! holds the thread there (`<point>.held` appears; `<point>.go` releases
//! it), `<point>.abort` aborts the process there, as a power cut of the
//! process would (no destructor, no flush). An abort file holding a number
//! N aborts at the Nth time the point is reached, so a test can crash a
//! loop part-way. Arming is one-shot. Release builds compile the points
//! away; the store and `ternd` share them.

/// Marks `point` on a path that tests want to stop or crash at.
pub fn reached(point: &str) {
    #[cfg(debug_assertions)]
    armed(point);
    #[cfg(not(debug_assertions))]
    let _ = point;
}

#[cfg(debug_assertions)]
fn armed(point: &str) {
    let Some(dir) = std::env::var_os("TERN_TEST_HOLD_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let abort = dir.join(format!("{point}.abort"));
    if let Ok(n) = std::fs::read_to_string(&abort) {
        match n.trim().parse::<u64>() {
            Ok(n) if n > 1 => {
                let _ = std::fs::write(&abort, (n - 1).to_string());
            }
            _ => {
                let _ = std::fs::remove_file(&abort);
                tracing::warn!(point, "test fault point: aborting");
                std::process::abort();
            }
        }
    }
    if std::fs::remove_file(dir.join(point)).is_err() {
        return;
    }
    tracing::info!(point, "test fault point: holding");
    let _ = std::fs::write(dir.join(format!("{point}.held")), b"");
    let go = dir.join(format!("{point}.go"));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !go.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(go);
}
