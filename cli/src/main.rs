//! `msb`: the microsandbox command-line tool, a thin layer over the SDK.
//!
//! ```text
//! msb run [CREATE OPTIONS] [-t] [--keep] NAME [[--] CMD ARGS...]
//!                                  create an attached sandbox, run CMD, stop, remove
//! msb create [CREATE OPTIONS] NAME create a detached sandbox (prints its name)
//! msb start NAME                   boot a stopped sandbox, detached
//! msb stop [-t DUR] NAME          power it off (killed after the timeout, default 10s)
//! msb kill NAME                    kill its VM at once
//! msb rm [-f] NAME...              delete stopped sandboxes (-f stops running ones first)
//! msb drain NAME                   refuse new commands, stop once running ones end
//! msb pause NAME | resume NAME     park its vCPUs (no CPU used) | run them again
//! msb ls [--label K=V]... [--status S] [--json] [-q]
//! msb exec [-t] [-e K=V]... [-w DIR] [-u USER] [--timeout DUR] NAME [--] CMD ARGS...
//! msb shell [-e K=V]... [-w DIR] [-u USER] [--timeout DUR] NAME [SCRIPT]
//! msb logs [-f] [-n N] [--since T] [--until T] [-s SOURCE]... [--json] NAME
//! msb metrics [NAME] [--json] [--watch DUR]
//! msb inspect NAME                 the sandbox's state and configuration, as JSON
//! msb cp SRC DST                   copy a file; one side is NAME:/guest/path
//! msb ssh [-l USER] NAME [-- CMD]  a shell (or CMD) through ssh
//! msb ssh --serve [-p PORT] [--authorized-keys FILE] NAME
//!                                  an SSH endpoint on 127.0.0.1 until Ctrl-C
//! msb pull [--policy P] [--insecure-registry HOST]... REF
//!                                  fetch an image into the store, with progress bars
//! msb image ls [--json] | inspect REF | rm REF... | prune | load [--tag REF] FILE
//!           | save -o FILE REF...
//! ```
//!
//! Registry credentials come from `MSB_REGISTRY_USERNAME` and `MSB_REGISTRY_PASSWORD` for
//! the registry `MSB_REGISTRY_HOST`, else from `~/.docker/config.json`.
//!
//! Durations are a number of seconds (`30`) or units: `500ms`, `30s`, `10m`, `2h`, `1d`,
//! combined as in `1h30m`. Sizes in MiB take `512`, `512M`, `2G`. Errors print
//! `msb: error: ...` (with their causes) and exit 1; bad usage exits 2; `run`, `exec`
//! and `shell` exit with the command's code (128 + N when a signal N ended it).

mod args;
mod commands;
mod error;
mod format;
mod parse;
mod progress;
mod run;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::commands::{cp, exec, image, logs, metrics, sandbox, snapshot, ssh};
use crate::error::{report, say, CliResult};

/// `SIGINT`, as the guest numbers it.
pub(crate) const SIGINT: i32 = 2;
/// Exit code after an interrupt (128 + SIGINT).
pub(crate) const EXIT_INTERRUPTED: u8 = 130;
/// Exit code once our stdout is closed (128 + SIGPIPE).
pub(crate) const EXIT_STDOUT_CLOSED: u8 = 141;
pub(crate) const MIB: u64 = 1 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(&format!("msb: error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(dispatch(cli));
    // A blocked read of stdin (or the like) must not hold up the exit.
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(cli: Cli) -> CliResult<u8> {
    match cli.command {
        Command::Run(a) => sandbox::cmd_run(a).await,
        Command::Create(a) => sandbox::cmd_create(a).await,
        Command::Start(a) => sandbox::cmd_start(a).await,
        Command::Stop(a) => sandbox::cmd_stop(a).await,
        Command::Kill(a) => sandbox::cmd_kill(a).await,
        Command::Rm(a) => sandbox::cmd_rm(a).await,
        Command::Drain(a) => sandbox::cmd_drain(a).await,
        Command::Pause(a) => sandbox::cmd_pause(a, true).await,
        Command::Resume(a) => sandbox::cmd_pause(a, false).await,
        Command::Ls(a) => sandbox::cmd_ls(a).await,
        Command::Exec(a) => exec::cmd_exec(a).await,
        Command::Shell(a) => exec::cmd_shell(a).await,
        Command::Logs(a) => logs::cmd_logs(a).await,
        Command::Metrics(a) => metrics::cmd_metrics(a).await,
        Command::Inspect(a) => sandbox::cmd_inspect(a).await,
        Command::Cp(a) => cp::cmd_cp(a).await,
        Command::Ssh(a) => ssh::cmd_ssh(a).await,
        Command::Pull(a) => image::cmd_pull(a).await,
        Command::Image(c) => image::cmd_image(c).await,
        Command::Snapshot(c) => snapshot::cmd_snapshot(c).await,
    }
}
