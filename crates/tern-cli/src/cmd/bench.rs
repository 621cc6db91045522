//! `tern bench`, like `rbd bench`: io_threads concurrent requests of io_size
//! until io_total bytes moved, a line per second, then a summary.

use super::image_spec;
use crate::cli::{BenchArgs, IoPattern, IoType};
use crate::ctx::{Ctx, Result, invalid};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tern_types::format_size;
use tern_types::size::parse_size_default_unit;

pub async fn run(ctx: &Ctx, a: BenchArgs) -> Result<()> {
    let spec = image_spec(&a.spec)?;
    let io_size = parse_size_default_unit(&a.io_size, 1)?;
    let total = parse_size_default_unit(&a.io_total, 1)?;
    if io_size == 0 || io_size > 8 << 20 {
        return Err(invalid("--io-size must be between 1 byte and 8 MiB"));
    }
    if a.io_threads == 0 || a.io_threads > 1024 {
        return Err(invalid("--io-threads must be between 1 and 1024"));
    }
    if a.rw_mix_read > 100 {
        return Err(invalid("--rw-mix-read is a percentage (0-100)"));
    }
    let c = ctx.connect().await?;
    let r = spec.head();
    let info = c.image().info(&r).await?;
    let size = info.size;
    // Writers hold the exclusive lock, as rbd bench does.
    let writes = a.io_type != IoType::Read;
    let lock = if writes && info.features & tern_types::Features::EXCLUSIVE_LOCK != 0 {
        let addr = format!("tern-bench/{}", std::process::id());
        Some(tern_client::lock::LockGuard::acquire(&c, r.clone(), &addr).await?)
    } else {
        None
    };
    let cookie = lock
        .as_ref()
        .map(|l| l.cookie().to_string())
        .unwrap_or_default();
    if io_size > size {
        return Err(invalid("--io-size is larger than the image"));
    }
    let ops_total = total.div_ceil(io_size);
    let slots = size / io_size;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let pattern = match a.io_pattern {
        IoPattern::Seq => "sequential",
        IoPattern::Rand => "random",
    };
    let type_name = match a.io_type {
        IoType::Read => "read",
        IoType::Write => "write",
        IoType::Readwrite => "readwrite",
    };
    if !ctx.json() {
        println!(
            "bench  type {type_name} io_size {io_size} io_threads {} bytes {total} pattern {pattern}",
            a.io_threads
        );
        println!("  SEC       OPS   OPS/SEC   BYTES/SEC");
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..a.io_threads {
        let (c, r, next, done) = (c.clone(), r.clone(), next.clone(), done.clone());
        let cookie = cookie.clone();
        let (io_type, pattern, mix) = (a.io_type, a.io_pattern, a.rw_mix_read);
        tasks.push(tokio::spawn(async move {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 + 1);
            let data: Vec<u8> = (0..io_size).map(|_| rng.random()).collect();
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops_total {
                    break;
                }
                let off = match pattern {
                    IoPattern::Seq => (i % slots) * io_size,
                    IoPattern::Rand => rng.random_range(0..slots) * io_size,
                };
                let read = match io_type {
                    IoType::Read => true,
                    IoType::Write => false,
                    IoType::Readwrite => rng.random_range(0..100) < mix,
                };
                let t0 = Instant::now();
                if read {
                    c.io().read(&r, off, io_size).await?;
                } else {
                    c.io().write(&r, off, data.clone(), false, &cookie).await?;
                }
                lat.push(t0.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tern_client::ClientError>(lat)
        }));
    }
    let reporter = {
        let done = done.clone();
        let json = ctx.json();
        tokio::spawn(async move {
            let mut last = 0u64;
            let mut sec = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                sec += 1;
                let d = done.load(Ordering::Relaxed);
                if !json {
                    println!(
                        "{sec:>5} {d:>9} {:>9.2} {:>11}/s",
                        (d - last) as f64,
                        format_size((d - last) * io_size)
                    );
                }
                last = d;
            }
        })
    };
    let mut lats = Vec::new();
    let mut first_err = None;
    for t in tasks {
        match t.await {
            Ok(Ok(l)) => lats.extend(l),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => {
                first_err = first_err.or(Some(tern_client::ClientError::new(
                    tern_types::ErrorKind::Internal,
                    e.to_string(),
                )))
            }
        }
    }
    reporter.abort();
    if let Some(l) = lock {
        l.release().await;
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let el = start.elapsed().as_secs_f64();
    let ops = done.load(Ordering::Relaxed);
    lats.sort_unstable();
    let pct = |p: f64| {
        lats.get(((lats.len() as f64 * p) as usize).min(lats.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let (iops, bps) = (ops as f64 / el, (ops * io_size) as f64 / el);
    if ctx.json() {
        ctx.print_json(&json!({
            "io_type": type_name, "io_size": io_size, "io_threads": a.io_threads, "io_total": total,
            "io_pattern": pattern, "elapsed_sec": el, "ops": ops, "ops_per_sec": iops, "bytes_per_sec": bps,
            "latency_usec": {"p50": pct(0.5), "p99": pct(0.99), "max": lats.last().copied().unwrap_or(0)}
        }));
    } else {
        println!(
            "elapsed: {el:.2}   ops: {ops}   ops/sec: {iops:.2}   bytes/sec: {}/s   lat p50 {} us p99 {} us",
            format_size(bps as u64),
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}
