//! Measurements for reports: the process's peak memory and curves thinned for JSON.

/// The peak resident set size of this process so far in bytes (`VmHWM` in `/proc/self/status`), or `None` where
/// the operating system does not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM` line of a `/proc/<pid>/status` text, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut words = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// Thins a curve whose coordinates never decrease (ROC, PRO) to about `max_points` points for a report: the first
/// and last points are kept, and a point in between is kept when it lies at least 1/`max_points` of the curve's
/// extent (x plus y) beyond the last kept one.
pub fn thin_curve(points: &[(f64, f64)], max_points: usize) -> Vec<[f64; 2]> {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Vec::new();
    };
    let extent = (last.0 - first.0) + (last.1 - first.1);
    let step = extent / max_points.max(1) as f64;
    let mut out = vec![[first.0, first.1]];
    for (i, p) in points.iter().enumerate().skip(1) {
        let kept = out[out.len() - 1];
        let is_last = i == points.len() - 1;
        if is_last || (p.0 - kept[0]) + (p.1 - kept[1]) >= step {
            out.push([p.0, p.1]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tpatchcore\nVmPeak:\t  900 kB\nVmHWM:\t    1536 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1536 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB"), None);
        assert_eq!(parse_vm_hwm("VmHWM: x kB"), None);
        // On Linux the running test process has a peak of at least a few pages.
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 4096);
        }
    }

    #[test]
    fn thinning_keeps_ends_and_bounds_the_count() {
        let points: Vec<(f64, f64)> = (0..=1000).map(|i| (i as f64 / 1000.0, 1.0)).collect();
        let thin = thin_curve(&points, 10);
        assert_eq!(thin[0], [0.0, 1.0]);
        assert_eq!(thin[thin.len() - 1], [1.0, 1.0]);
        // Extent 1, step 0.1: points 0, 0.1, …, 1.0 (rounding may keep one more).
        assert!((11..=12).contains(&thin.len()), "{}", thin.len());
        let few = [(0.0, 0.0), (1.0, 1.0)];
        assert_eq!(thin_curve(&few, 500), [[0.0, 0.0], [1.0, 1.0]]);
        assert!(thin_curve(&[], 10).is_empty());
    }
}
