//! Interactive sessions: a guest PTY bridged to a host terminal.
//!
//! The host terminal goes to raw mode (restored on every way out), its size becomes the
//! guest PTY's size, `SIGWINCH` resizes the guest PTY, keystrokes go to the command's stdin
//! and the PTY's output goes to the terminal. Reading and writing the terminal happen on
//! two plain threads (the reader stops when the session ends), and stdin is written by its
//! own task, so neither a blocked terminal nor a guest slow to take input stalls output.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;

use rustix::termios::{self, OptionalActions, Termios};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::error::{MicrosandboxError, MicrosandboxResult};
use crate::exec::ExecEvent;
use crate::sandbox::Sandbox;

/// Puts a terminal into raw mode until dropped.
struct RawMode {
    tty: File,
    saved: Termios,
}

impl RawMode {
    fn enter(tty: &File) -> MicrosandboxResult<RawMode> {
        let saved = termios::tcgetattr(tty).map_err(|e| {
            MicrosandboxError::NotATerminal(format!("cannot read the terminal's settings: {e}"))
        })?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(tty, OptionalActions::Now, &raw).map_err(std::io::Error::from)?;
        Ok(RawMode {
            tty: tty.try_clone()?,
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(&self.tty, OptionalActions::Now, &self.saved);
    }
}

/// Reads keystrokes from `input` into `keys` until `cancel` becomes readable (its write end
/// closed), `input` ends, or nobody takes keys any more.
fn read_keys(input: &mut File, cancel: &std::io::PipeReader, keys: &mpsc::Sender<Vec<u8>>) {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            PollFd::new(input, PollFlags::IN),
            PollFd::new(cancel, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return,
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if keys.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        }
    }
}

fn size_of(tty: &File) -> (u16, u16) {
    match termios::tcgetwinsize(tty) {
        Ok(w) if w.ws_row > 0 && w.ws_col > 0 => (w.ws_row, w.ws_col),
        _ => (24, 80),
    }
}

impl Sandbox {
    /// Runs `cmd args` on a guest PTY bridged to this process's terminal (stdin must be a
    /// TTY) until it exits; returns its exit code (128 + N when killed by signal N).
    pub async fn attach(
        &self,
        cmd: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> MicrosandboxResult<i32> {
        let input = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        let output = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
        self.attach_terminal(cmd, args, input, output).await
    }

    /// [`Sandbox::attach`] to the sandbox's shell.
    pub async fn attach_shell(&self) -> MicrosandboxResult<i32> {
        let shell = self.default_shell().to_string();
        self.attach(shell, std::iter::empty::<String>()).await
    }

    /// [`Sandbox::attach`] with an explicit terminal: `input` (a TTY: its size and raw mode
    /// are used) and `output`, e.g. both ends of a PTY a server hands to a remote user.
    pub async fn attach_terminal(
        &self,
        cmd: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
        input: File,
        output: File,
    ) -> MicrosandboxResult<i32> {
        if !termios::isatty(&input) {
            return Err(MicrosandboxError::NotATerminal(
                "stdin is not a terminal".into(),
            ));
        }
        let (rows, cols) = size_of(&input);
        let mut winch = signal(SignalKind::window_change())?;
        let raw = RawMode::enter(&input)?;
        let mut handle = self
            .exec_stream_with(cmd, |o| o.args(args).tty_size(rows, cols).stdin_pipe())
            .await?;
        let sink = handle
            .take_stdin()
            .ok_or_else(|| MicrosandboxError::Agent("no stdin pipe".into()))?;

        // Keystrokes: a thread reads the terminal until told to stop (the cancel pipe's
        // write end closes), a task writes them to the command's stdin, so a stdin the guest
        // is slow to take never holds up output.
        let (key_tx, mut keys) = mpsc::channel::<Vec<u8>>(4);
        let (cancel_r, cancel_w) = std::io::pipe()?;
        let mut reader = input.try_clone()?;
        std::thread::Builder::new()
            .name("attach-input".into())
            .spawn(move || read_keys(&mut reader, &cancel_r, &key_tx))?;
        let stdin_task = tokio::spawn(async move {
            while let Some(d) = keys.recv().await {
                if sink.write(&d).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(4);
        let mut writer = output;
        let out_thread = std::thread::Builder::new()
            .name("attach-output".into())
            .spawn(move || {
                while let Some(d) = out_rx.blocking_recv() {
                    if writer.write_all(&d).and_then(|()| writer.flush()).is_err() {
                        return;
                    }
                }
            })?;

        let result = loop {
            tokio::select! {
                ev = handle.recv() => match ev {
                    Ok(Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d))) => {
                        if out_tx.send(d).await.is_err() {
                            break Err(MicrosandboxError::Io(std::io::Error::other(
                                "the terminal stopped accepting output",
                            )));
                        }
                    }
                    Ok(Some(ExecEvent::Started { .. })) => {}
                    Ok(Some(ExecEvent::Exited(status))) => break Ok(status.exit_code()),
                    Ok(None) => break Err(MicrosandboxError::ConnectionClosed),
                    Err(e) => break Err(e),
                },
                _ = winch.recv() => {
                    let (rows, cols) = size_of(&raw.tty);
                    // A failed resize shows up as the session's own error.
                    let _ = handle.resize(rows, cols).await;
                }
            }
        };
        drop(cancel_w);
        stdin_task.abort();
        // Let the output already received reach the terminal before restoring it.
        drop(out_tx);
        let _ = tokio::task::spawn_blocking(move || out_thread.join()).await;
        drop(raw);
        result
    }
}
