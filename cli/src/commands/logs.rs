//! `logs`: the captured output of a sandbox's commands, printed or followed.

use std::borrow::Cow;
use std::io::IsTerminal;

use futures_util::StreamExt;
use microsandbox::{
    escape_controls_bytes, LogEntry, LogOptions, LogSource, LogStreamOptions, Sandbox,
};

use crate::args::LogsArgs;
use crate::error::{err_out, out, CliResult};
use crate::format::{json_line, log_json, system_lines};
use crate::run::interrupts;

/// How entries are printed.
#[derive(Debug, Clone, Copy)]
struct Print {
    json: bool,
    /// Show control characters as escapes on stdout, on stderr: set for a terminal (the
    /// output is the guest's, and its escape sequences would drive the terminal), unless
    /// `--raw`.
    escape_out: bool,
    escape_err: bool,
}

impl Print {
    fn new(a: &LogsArgs) -> Self {
        Print {
            json: a.json,
            escape_out: !a.raw && std::io::stdout().is_terminal(),
            escape_err: !a.raw && std::io::stderr().is_terminal(),
        }
    }
}

/// The bytes of an entry as printed: exact, or with control characters (but tab and
/// newline) shown as escapes.
fn shown(data: &[u8], escape: bool) -> Cow<'_, [u8]> {
    match (escape, escape_controls_bytes(data)) {
        (true, Cow::Owned(text)) => Cow::Owned(text.into_bytes()),
        _ => Cow::Borrowed(data),
    }
}

fn print_entry(e: &LogEntry, p: Print) -> CliResult<()> {
    if p.json {
        // JSON escapes control characters itself.
        return json_line(&log_json(e), false);
    }
    match e.source {
        LogSource::Stderr => {
            err_out(&shown(&e.data, p.escape_err));
            Ok(())
        }
        LogSource::System => out(system_lines(&e.data, p.escape_out).as_bytes()),
        _ => out(&shown(&e.data, p.escape_out)),
    }
}

pub(crate) async fn cmd_logs(a: LogsArgs) -> CliResult<u8> {
    let h = Sandbox::get(&a.name).await?;
    let print = Print::new(&a);
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
        for e in h.logs(&opts).await? {
            print_entry(&e, print)?;
        }
        return Ok(0);
    }

    let mut stream_opts = LogStreamOptions::default().sources(sources).follow(true);
    stream_opts.until = a.until;
    match a.tail {
        Some(n) => {
            // The last n entries, then everything after the last one there is now.
            opts.tail = Some(n.max(1));
            let entries = h.logs(&opts).await?;
            let skip = entries.len().saturating_sub(n);
            for e in &entries[skip..] {
                print_entry(e, print)?;
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
                Some(Ok(e)) => tokio::task::block_in_place(|| print_entry(&e, print))?,
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(0),
            },
            _ = sigint.recv() => return Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_escape_sequences_are_shown_not_obeyed_unless_raw() {
        let hostile = b"ok\tdone\n\x1b[2J\x1b]0;owned\x07caf\xc3\xa9 \xff\n";
        assert_eq!(
            &*shown(hostile, true),
            b"ok\tdone\n\\x1b[2J\\x1b]0;owned\\x07caf\xc3\xa9 \\xff\n"
        );
        assert_eq!(&*shown(hostile, false), hostile);
        assert!(matches!(shown(b"plain\n", true), Cow::Borrowed(_)));
    }
}
