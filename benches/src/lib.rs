//! Benchmarks of the microsandbox VMM. Each is a binary that prints its figures (median,
//! min, max over N runs), the host kind, and a peer's figures from the same run where a
//! peer can run here. Timings live here, never in tests.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use microsandbox::{ExecEvent, Sandbox};

pub mod mock_guest;

/// Builds `benches/guest/<name>.c` static with the host's gcc into `dir` (extra flags in
/// `extra`); the binary's path.
pub fn build_guest_program(
    dir: &std::path::Path,
    name: &str,
    extra: &[&str],
) -> std::path::PathBuf {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guest")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    build_static(&src, &out, extra);
    out
}

/// Builds the C program `src` static (`-O2`, plus `extra`) with the host's gcc as `out`.
pub fn build_static(src: &std::path::Path, out: &std::path::Path, extra: &[&str]) {
    let status = std::process::Command::new("gcc")
        .args(["-O2", "-static"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "building {} failed", src.display());
}

/// What the exec benchmarks measure through the SDK.
#[derive(Debug, Clone)]
pub struct ExecFigures {
    /// Round trips of `true` (exec call to collected output), ms.
    pub rtt_ms: Vec<f64>,
    /// Bytes streamed and the seconds it took.
    pub stream: (u64, f64),
}

impl ExecFigures {
    /// Prints the figures under `title`.
    pub fn print(&self, title: &str) {
        println!("{title}");
        println!("{}", row("exec round trip of `true`", &self.rtt_ms, "ms"));
        println!(
            "  p50 {:.3} ms, p99 {:.3} ms over {} runs",
            percentile(&self.rtt_ms, 0.5),
            percentile(&self.rtt_ms, 0.99),
            self.rtt_ms.len()
        );
        let (bytes, secs) = self.stream;
        println!(
            "  stdout throughput: {:.2} MB/s ({bytes} bytes in {secs:.2} s)",
            bytes as f64 / secs / 1e6
        );
    }
}

/// Round trips of `true` (exec call to collected output) through the SDK, ms.
pub async fn exec_rtt(sb: &Sandbox, runs: usize) -> Vec<f64> {
    let mut rtt_ms = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let out = sb
            .exec("true", Vec::<String>::new())
            .await
            .expect("exec true");
        assert!(out.success(), "true failed: {out:?}");
        rtt_ms.push(ms(start.elapsed()));
    }
    rtt_ms
}

/// Streams the output of `cmd` (which must print `bytes`) through the SDK without keeping
/// it; returns the bytes and the seconds it took.
pub async fn exec_stream(sb: &Sandbox, cmd: &str, bytes: u64) -> (u64, f64) {
    let start = Instant::now();
    let mut h = sb.shell_stream(cmd).await.expect("stream");
    let mut got = 0u64;
    loop {
        match h.recv().await.expect("event") {
            Some(ExecEvent::Stdout(d)) => got += d.len() as u64,
            Some(ExecEvent::Exited(s)) => {
                assert!(s.success(), "{s:?}");
                break;
            }
            Some(_) => {}
            None => panic!("the stream ended without an exit"),
        }
    }
    assert_eq!(got, bytes, "every byte arrived");
    (got, start.elapsed().as_secs_f64())
}

/// The number after `--name` on the command line, else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
