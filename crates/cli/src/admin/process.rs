//! `replimesh_build_info` and the process metrics (resident memory, open
//! descriptors, CPU seconds), read from `/proc/self` at each scrape.

use crate::metrics::Registry;

/// Clock ticks per second of `/proc/self/stat` times (`USER_HZ`, 100 on
/// Linux whatever the kernel's own tick).
const TICKS_PER_SECOND: f64 = 100.0;

/// Registers the build info and the process metrics in `r` (idempotent:
/// a second call replaces them).
pub(super) fn register(r: &Registry) {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    r.gauge_fn(
        "replimesh_build_info",
        "Always 1; the labels say which build runs",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("arch", std::env::consts::ARCH),
            ("os", std::env::consts::OS),
            ("profile", profile),
        ],
        || 1.0,
    );
    r.gauge_fn(
        "process_resident_memory_bytes",
        "Resident memory of this process (VmRSS of /proc/self/status)",
        &[],
        || rss_bytes().unwrap_or(0) as f64,
    );
    r.gauge_fn(
        "process_open_fds",
        "Open file descriptors of this process (entries of /proc/self/fd)",
        &[],
        || open_fds().unwrap_or(0) as f64,
    );
    r.counter_fn(
        "process_cpu_seconds_total",
        "User and system CPU time of this process, in seconds (/proc/self/stat)",
        &[],
        || cpu_seconds().unwrap_or(0.0),
    );
}

/// VmRSS of `/proc/self/status`, in bytes.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Entries of `/proc/self/fd` (the directory's own descriptor included).
fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

/// utime + stime of `/proc/self/stat`, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After `)`: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let rss = rss_bytes().unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
        let before = open_fds().unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(open_fds().unwrap() > before);
        drop(f);
        // Burn a little CPU: the counter is read and never negative.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds().unwrap() >= 0.0);
        let r = Registry::new();
        register(&r);
        let text = r.render();
        let samples = crate::metrics::parse_text(&text).unwrap();
        let build = samples
            .iter()
            .find(|s| s.0 == "replimesh_build_info")
            .unwrap();
        assert_eq!(build.2, 1.0);
        assert!(
            text.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
            "{text}"
        );
        for name in ["process_resident_memory_bytes", "process_open_fds"] {
            assert!(
                samples.iter().any(|s| s.0 == name && s.2 > 0.0),
                "{name}: {text}"
            );
        }
    }
}
