//! `exec` and `shell`: commands in a running sandbox.

use std::io::IsTerminal;

use microsandbox::Sandbox;

use crate::args::{ExecArgs, ShellArgs};
use crate::error::{exit_byte, CliError, CliResult};
use crate::run::{split_argv, stream_command};

pub(crate) async fn cmd_exec(a: ExecArgs) -> CliResult<u8> {
    let (cmd, args) = split_argv(&a.command)?;
    let sb = Sandbox::connect(&a.name).await?;
    let code = if a.tty {
        sb.attach(cmd, args).await?
    } else {
        stream_command(&sb, cmd, a.flags.options(args), a.flags.timeout).await?
    };
    Ok(exit_byte(code))
}

pub(crate) async fn cmd_shell(a: ShellArgs) -> CliResult<u8> {
    let tty_in = std::io::stdin().is_terminal();
    if a.script.is_none() && tty_in && a.flags.is_set() {
        return Err(CliError::Usage(
            "--env, --workdir, --user and --timeout need a SCRIPT (an interactive shell \
             takes the sandbox's defaults)"
                .into(),
        ));
    }
    let sb = Sandbox::connect(&a.name).await?;
    let shell = sb
        .config()
        .shell
        .clone()
        .unwrap_or_else(|| "/bin/sh".to_string());
    let code = match a.script {
        Some(script) => {
            let opts = a.flags.options(vec!["-c".into(), script]);
            stream_command(&sb, shell, opts, a.flags.timeout).await?
        }
        None if tty_in => sb.attach_shell().await?,
        // Commands from stdin.
        None => stream_command(&sb, shell, a.flags.options(Vec::new()), a.flags.timeout).await?,
    };
    Ok(exit_byte(code))
}
