//! `logs`: the captured output of a sandbox's commands, printed or followed.

use futures_util::StreamExt;
use microsandbox::{LogEntry, LogOptions, LogSource, LogStreamOptions, Sandbox};

use crate::args::LogsArgs;
use crate::error::{err_out, out, CliResult};
use crate::format::{json_line, log_json, system_lines};
use crate::run::interrupts;

fn print_entry(e: &LogEntry, as_json: bool) -> CliResult<()> {
    if as_json {
        return json_line(&log_json(e), false);
    }
    match e.source {
        LogSource::Stderr => {
            err_out(&e.data);
            Ok(())
        }
        LogSource::System => out(system_lines(&e.data).as_bytes()),
        _ => out(&e.data),
    }
}

pub(crate) async fn cmd_logs(a: LogsArgs) -> CliResult<u8> {
    let h = Sandbox::get(&a.name).await?;
    let sources: Vec<LogSource> = if a.sources.is_empty() {
        vec![LogSource::Stdout, LogSource::Stderr, LogSource::Output]
    } else {
        a.sources.iter().map(|&s| s.into()).collect()
    };
    let mut opts = LogOptions::default().sources(sources.iter().copied());
    opts.since = a.since;
    opts.until = a.until;
    opts.tail = a.tail;

    if !a.follow {
        for e in h.logs(&opts)? {
            print_entry(&e, a.json)?;
        }
        return Ok(0);
    }

    let mut stream_opts = LogStreamOptions::default().sources(sources).follow(true);
    stream_opts.until = a.until;
    match a.tail {
        Some(n) => {
            // The last n entries, then everything after the last one there is now.
            opts.tail = Some(n.max(1));
            let entries = h.logs(&opts)?;
            let skip = entries.len().saturating_sub(n);
            for e in &entries[skip..] {
                print_entry(e, a.json)?;
            }
            match entries.last() {
                Some(last) => stream_opts = stream_opts.from_cursor(last.cursor.clone()),
                None => stream_opts.since = a.since,
            }
        }
        None => stream_opts.since = a.since,
    }
    let mut stream = h.log_stream(stream_opts)?;
    let mut sigint = interrupts()?;
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(e)) => tokio::task::block_in_place(|| print_entry(&e, a.json))?,
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(0),
            },
            _ = sigint.recv() => return Ok(0),
        }
    }
}
