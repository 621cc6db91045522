//! Timestamps in the two forms Ceph prints: `Sun Nov 29 20:54:41 2026`
//! (rbd info) and `2026-11-29 20:54:41` (mirror status), always UTC.

/// Since the Unix epoch by the system clock (0 for a clock set before it).
fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The time now, in seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

/// The time now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// The time now, in microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    since_epoch().as_micros() as u64
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil algorithm.
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

struct Parts {
    y: i64,
    mo: u32,
    d: u32,
    h: u64,
    mi: u64,
    s: u64,
    wd: usize,
}

fn parts(secs: u64) -> Parts {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    Parts {
        y,
        mo,
        d,
        h: rem / 3600,
        mi: rem / 60 % 60,
        s: rem % 60,
        wd: ((days + 4).rem_euclid(7)) as usize,
    }
}

const WD: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MO: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Sun Nov 29 20:54:41 2026`
pub fn ctime(secs: u64) -> String {
    let p = parts(secs);
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        WD[p.wd],
        MO[p.mo as usize - 1],
        p.d,
        p.h,
        p.mi,
        p.s,
        p.y
    )
}

/// `2026-11-29 20:54:41`
pub fn datetime(secs: u64) -> String {
    let p = parts(secs);
    format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02}",
        p.y, p.mo, p.d, p.h, p.mi, p.s
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats() {
        assert_eq!(super::ctime(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(super::datetime(1_795_985_681), "2026-11-29 20:54:41");
        assert_eq!(super::ctime(1_795_985_681), "Sun Nov 29 20:54:41 2026");
    }
}
