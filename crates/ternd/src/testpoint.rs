//! Named points where a test may hold ternd or crash it. A test arms a
//! point by creating a file of its name in `$TERN_TEST_HOLD_DIR`: `<point>`
//! holds the thread there (`<point>.held` appears; `<point>.go` releases
//! it), `<point>.abort` aborts the process there, as a power cut of the
//! process would (no destructor, no flush). Arming is one-shot. Release
//! builds compile the points away.

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
    if std::fs::remove_file(dir.join(format!("{point}.abort"))).is_ok() {
        tracing::warn!(point, "test fault point: aborting");
        std::process::abort();
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
