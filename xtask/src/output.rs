//! How xtask reports progress: one `==> ` line per step, with sizes and durations in a form a
//! person reads at a glance.
//!
//! Everything goes to stderr, as cargo's own progress does, so the two interleave in order.

use std::time::Duration;

/// Prints one progress line, `==> message`, formatted like `format!`.
macro_rules! step {
    ($($arg:tt)*) => {
        eprintln!("==> {}", format_args!($($arg)*))
    };
}

/// A byte count as `12.3 KiB (12595 bytes)`: readable, and exact for comparing builds.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
    }
}

/// A duration as `4.2s` below a minute and `3m07s` above.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs < 60 {
        format!("{:.1}s", duration.as_secs_f64())
    } else {
        format!("{}m{:02}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (bytes, expected) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB (1024 bytes)"),
            (12_595, "12.3 KiB (12595 bytes)"),
            (5 * 1024 * 1024, "5.0 MiB (5242880 bytes)"),
        ] {
            assert_eq!(human_size(bytes), expected, "{bytes} bytes");
        }
    }

    #[test]
    fn durations() {
        for (millis, expected) in [
            (0, "0.0s"),
            (4_240, "4.2s"),
            (59_900, "59.9s"),
            (60_000, "1m00s"),
            (187_000, "3m07s"),
        ] {
            assert_eq!(human_duration(Duration::from_millis(millis)), expected);
        }
    }
}
