//! Running commands in a sandbox: output streamed to ours, our stdin copied to theirs,
//! Ctrl-C passed on.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use microsandbox::{ExecEvent, ExecOptions, ExecSink, MicrosandboxError, Sandbox};
use tokio::signal::unix::{signal, SignalKind};

use crate::error::{err_out, out, say, CliError, CliResult};
use crate::{EXIT_INTERRUPTED, SIGINT};

pub(crate) fn interrupts() -> CliResult<tokio::signal::unix::Signal> {
    signal(SignalKind::interrupt()).map_err(|e| CliError::Io {
        what: "cannot catch Ctrl-C".into(),
        source: e,
    })
}

/// Copies our stdin to a command's stdin, then closes it. A plain thread reads stdin
/// (a blocking read cannot be cancelled; the thread ends with the process).
async fn feed_stdin(sink: ExecSink) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let spawned = std::thread::Builder::new()
        .name("msb-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    if spawned.is_ok() {
        while let Some(chunk) = rx.recv().await {
            if sink.write(&chunk).await.is_err() {
                return;
            }
        }
    }
    let _ = sink.close().await;
}

/// Runs `cmd` (options in `opts`), streaming its output to ours and, when stdin is not a
/// terminal, our stdin to it. Returns its exit code. Ctrl-C sends it SIGINT; a second
/// one gives up (130).
pub(crate) async fn stream_command(
    sb: &Sandbox,
    cmd: String,
    opts: ExecOptions,
    timeout: Option<Duration>,
) -> CliResult<i32> {
    let pipe = !std::io::stdin().is_terminal();
    let opts = if pipe { opts.stdin_pipe() } else { opts };
    let mut sigint = interrupts()?;
    let mut handle = sb.exec_stream_with(cmd, move |_| opts).await?;
    let feeder = handle.take_stdin().map(|s| tokio::spawn(feed_stdin(s)));
    let mut interrupted = false;
    let result = loop {
        tokio::select! {
            ev = handle.recv() => match ev {
                Ok(Some(ExecEvent::Stdout(d))) => {
                    if let Err(e) = tokio::task::block_in_place(|| out(&d)) {
                        break Err(e);
                    }
                }
                Ok(Some(ExecEvent::Stderr(d))) => tokio::task::block_in_place(|| err_out(&d)),
                Ok(Some(ExecEvent::Started { .. })) => {}
                Ok(Some(ExecEvent::Exited(status))) => break Ok(status),
                Ok(None) => break Err(MicrosandboxError::ConnectionClosed.into()),
                Err(e) => break Err(e.into()),
            },
            _ = sigint.recv() => {
                if interrupted {
                    break Err(CliError::Failed("interrupted".into()));
                }
                interrupted = true;
                // Bounded: stdin may hold the connection's writer while the guest is not
                // reading.
                let _ = tokio::time::timeout(Duration::from_secs(1), handle.signal(SIGINT)).await;
            }
        }
    };
    if let Some(f) = feeder {
        f.abort();
    }
    match result {
        Ok(status) => {
            if status.timed_out() {
                let after = timeout.map_or_else(String::new, |t| format!(" after {t:?}"));
                say(&format!("msb: the command timed out{after} and was killed"));
            }
            Ok(status.exit_code())
        }
        // The end of the connection after a Ctrl-C (which also reaches an attached VMM
        // in our process group) is the interrupt's doing.
        Err(CliError::Sdk(_) | CliError::Failed(_)) if interrupted => {
            Ok(i32::from(EXIT_INTERRUPTED))
        }
        Err(e) => Err(e),
    }
}

/// `argv[0]` and the rest.
pub(crate) fn split_argv(argv: &[String]) -> CliResult<(String, Vec<String>)> {
    match argv.split_first() {
        Some((cmd, args)) if !cmd.is_empty() => Ok((cmd.clone(), args.to_vec())),
        _ => Err(CliError::Usage("the command is empty".into())),
    }
}
