//! `metrics`: resource use of one running sandbox or of all, once or every so often.

use std::io::IsTerminal;

use microsandbox::{all_sandbox_metrics, MicrosandboxError, Sandbox, SandboxMetrics};
use serde_json::Value;

use crate::args::MetricsArgs;
use crate::error::{out, say, CliError, CliResult};
use crate::format::{json_line, metrics_json, metrics_row, table, METRICS_HEADERS};
use crate::run::interrupts;

/// One round of `msb metrics`: (name, metrics) by name.
async fn metrics_round(name: Option<&str>) -> CliResult<Vec<(String, SandboxMetrics)>> {
    match name {
        Some(n) => {
            let m = Sandbox::get(n).await?.metrics().await?;
            Ok(vec![(n.to_string(), m)])
        }
        None => {
            let mut all: Vec<_> = all_sandbox_metrics().await?.into_iter().collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(all)
        }
    }
}

fn print_metrics(a: &MetricsArgs, round: &[(String, SandboxMetrics)]) -> CliResult<()> {
    if a.json {
        let pretty = a.watch.is_none();
        return match (&a.name, round.first()) {
            (Some(_), Some((n, m))) => json_line(&metrics_json(n, m), pretty),
            _ => json_line(
                &Value::Array(round.iter().map(|(n, m)| metrics_json(n, m)).collect()),
                pretty,
            ),
        };
    }
    let rows: Vec<Vec<String>> = round.iter().map(|(n, m)| metrics_row(n, m)).collect();
    let mut text = String::new();
    if a.watch.is_some() && std::io::stdout().is_terminal() {
        // Clear the screen and go home.
        text.push_str("\x1b[2J\x1b[H");
    }
    text.push_str(&table(&METRICS_HEADERS, &rows));
    if a.watch.is_some() && !std::io::stdout().is_terminal() {
        text.push('\n');
    }
    out(text.as_bytes())
}

pub(crate) async fn cmd_metrics(a: MetricsArgs) -> CliResult<u8> {
    let Some(every) = a.watch else {
        let round = metrics_round(a.name.as_deref()).await?;
        print_metrics(&a, &round)?;
        return Ok(0);
    };
    let mut sigint = interrupts()?;
    let mut first = true;
    loop {
        match metrics_round(a.name.as_deref()).await {
            Ok(round) => print_metrics(&a, &round)?,
            // The watched sandbox stopped: the watch is over.
            Err(CliError::Sdk(MicrosandboxError::NotRunning(n))) if !first => {
                say(&format!("msb: {n} is not running any more"));
                return Ok(0);
            }
            Err(e) => return Err(e),
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = sigint.recv() => return Ok(0),
        }
    }
}
