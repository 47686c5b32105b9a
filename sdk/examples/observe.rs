//! Logs and metrics: read what commands printed (by source, tail, since), follow new
//! output, and watch resource use.
//!
//! ```text
//! cargo run -p microsandbox --example observe
//! ```

use std::time::Duration;

use futures_util::StreamExt;
use microsandbox::{LogOptions, LogSource, LogStreamOptions, MicrosandboxResult, Sandbox};

#[tokio::main]
async fn main() -> MicrosandboxResult<()> {
    let sb = Sandbox::builder("observe")
        .ephemeral(true)
        .replace()
        .create()
        .await?;
    sb.shell("echo to-stdout; echo to-stderr >&2").await?;

    for e in sb.logs(&LogOptions::default().tail(10)).await? {
        println!("[{} {}] {}", e.timestamp, e.source, e.text().trim_end());
    }
    let system = sb
        .logs(&LogOptions::default().source(LogSource::System))
        .await?;
    println!("{} system entries", system.len());

    // Follow: entries arrive as commands print them.
    let mut stream = sb.log_stream(LogStreamOptions::default().follow(true))?;
    let printer = sb
        .shell_stream("for i in 1 2 3; do echo tick $i; sleep 1; done")
        .await?;
    let mut seen = 0;
    while let Some(Ok(e)) = stream.next().await {
        print!("followed: {}", e.text());
        seen += 1;
        if seen == 5 {
            break;
        }
    }
    printer.wait().await?;

    let mut metrics = Box::pin(sb.metrics_stream(Duration::from_secs(1)));
    for _ in 0..3 {
        if let Some(m) = metrics.next().await {
            let m = m?;
            println!(
                "cpu {:.1}% · mem {} / {} MiB · disk r {} w {} bytes · up {:?}",
                m.cpu_percent,
                m.memory_bytes >> 20,
                m.memory_limit_bytes >> 20,
                m.disk_read_bytes,
                m.disk_write_bytes,
                m.uptime
            );
        }
    }
    drop(metrics);
    sb.stop().await?; // ephemeral: nothing is left
    Ok(())
}
