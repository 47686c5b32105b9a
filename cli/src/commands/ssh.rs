//! `ssh`: a shell or command in a sandbox through OpenSSH's `ssh`, or an SSH endpoint.

use std::io::IsTerminal;
use std::path::PathBuf;

use microsandbox::{Sandbox, SshOptions};

use crate::args::SshArgs;
use crate::error::{out, CliError, CliResult};
use crate::run::interrupts;

pub(crate) async fn cmd_ssh(a: SshArgs) -> CliResult<u8> {
    let sb = Sandbox::connect(&a.name).await?;
    if a.serve {
        serve(&sb, &a).await
    } else {
        session(&sb, &a).await
    }
}

/// The user's own public keys (`~/.ssh/id_*.pub`).
fn own_public_keys() -> CliResult<String> {
    let dir = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".ssh"))
        .ok_or_else(|| CliError::Failed("HOME is not set: pass --authorized-keys".into()))?;
    let mut text = String::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with("id_") && n.ends_with(".pub")) {
                if let Ok(t) = std::fs::read_to_string(&p) {
                    text.push_str(&t);
                    text.push('\n');
                }
            }
        }
    }
    if text.trim().is_empty() {
        return Err(CliError::Failed(format!(
            "no public key in {} (id_*.pub): pass --authorized-keys FILE",
            dir.display()
        )));
    }
    Ok(text)
}

async fn serve(sb: &Sandbox, a: &SshArgs) -> CliResult<u8> {
    let mut opts = SshOptions::new().port(a.port.unwrap_or(0));
    opts = match &a.authorized_keys {
        Some(f) => opts.authorized_keys_file(f)?,
        None => opts.authorized_keys(&own_public_keys()?)?,
    };
    let mut sigint = interrupts()?;
    let ep = sb.ssh_server(opts).await?;
    out(format!(
        "listening on {}\nhost key {}\nknown_hosts: {}\nconnect: ssh -p {} {}@127.0.0.1\n",
        ep.addr(),
        ep.fingerprint(),
        ep.known_hosts_line(),
        ep.port(),
        a.user
    )
    .as_bytes())?;
    let _ = sigint.recv().await;
    ep.shutdown().await;
    Ok(0)
}

/// Runs the system's `ssh` against a one-off endpoint with a one-off key; its exit code.
async fn session(sb: &Sandbox, a: &SshArgs) -> CliResult<u8> {
    let io = |what: &str, source: std::io::Error| CliError::Io {
        what: what.into(),
        source,
    };
    let dir = tempfile::Builder::new()
        .prefix("msb-ssh.")
        .tempdir()
        .map_err(|e| io("cannot make a temporary directory", e))?;
    let key = dir.path().join("id_ed25519");
    let ep = sb
        .ssh_server(SshOptions::new().client_key_file(&key))
        .await?;
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, format!("{}\n", ep.known_hosts_line()))
        .map_err(|e| io("cannot write known_hosts", e))?;
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-i"])
        .arg(&key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-p")
        .arg(ep.port().to_string());
    if a.command.is_empty() && std::io::stdin().is_terminal() {
        cmd.arg("-t");
    }
    // The user as an option's value and `--` before the host: neither is read as an
    // option of ssh's.
    cmd.arg("-l").arg(&a.user).args(["--", "127.0.0.1"]);
    cmd.args(&a.command);
    let status = match cmd.status().await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CliError::Failed(
                "ssh (OpenSSH's client) is not installed; `msb ssh --serve NAME` serves an \
                 endpoint for another client"
                    .into(),
            ))
        }
        Err(e) => return Err(io("cannot run ssh", e)),
    };
    ep.shutdown().await;
    Ok(status
        .code()
        .map_or(255, |c| u8::try_from(c).unwrap_or(255)))
}
