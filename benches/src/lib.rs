//! Benchmarks of the microsandbox VMM. Each is a binary that prints its figures (median,
//! min, max over N runs), the host kind, and a peer's figures from the same run where a
//! peer can run here. Timings live here, never in tests.

use std::time::Duration;

/// Median, min and max of `xs` (which must not be empty).
pub fn summary(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

/// One row of a report: label and values in milliseconds (or KiB), `-` when absent.
pub fn row(label: &str, xs: &[f64], unit: &str) -> String {
    if xs.is_empty() {
        return format!("  {label:<34} {:>12}", "-");
    }
    let (med, min, max) = summary(xs);
    format!("  {label:<34} median {med:>10.1} {unit}  min {min:>10.1}  max {max:>10.1}")
}

/// The value below which `q` (0..=1) of `xs` fall (nearest rank; `xs` not empty).
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 50.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn summary_of_odd_and_even() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
