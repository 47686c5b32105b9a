//! `cp`: one file between the host and a running sandbox.

use std::path::Path;

use microsandbox::Sandbox;

use crate::args::CpArgs;
use crate::error::{CliError, CliResult};
use crate::parse::{guest_file_name, parse_location, Location};

pub(crate) async fn cmd_cp(a: CpArgs) -> CliResult<u8> {
    match (parse_location(&a.src), parse_location(&a.dst)) {
        (Location::Host(src), Location::Guest { sandbox, path }) => {
            copy_in(&src, &sandbox, &path).await?
        }
        (Location::Guest { sandbox, path }, Location::Host(dst)) => {
            copy_out(&sandbox, &path, &dst).await?
        }
        (Location::Host(_), Location::Host(_)) => {
            return Err(CliError::Usage(
                "one side must be in a sandbox: NAME:/guest/path".into(),
            ))
        }
        (Location::Guest { .. }, Location::Guest { .. }) => {
            return Err(CliError::Usage(
                "one side must be a host path (copying between sandboxes is not supported)".into(),
            ))
        }
    }
    Ok(0)
}

async fn copy_in(src: &Path, sandbox: &str, guest: &str) -> CliResult<()> {
    if src.is_dir() {
        return Err(CliError::Failed(format!(
            "{} is a directory: msb cp copies single files",
            src.display()
        )));
    }
    let sb = Sandbox::connect(sandbox).await?;
    let into_dir = guest.ends_with('/')
        || sb
            .fs()
            .stat(guest)
            .await
            .map(|m| m.is_dir())
            .unwrap_or(false);
    let target = if into_dir {
        let name = src
            .file_name()
            .ok_or_else(|| CliError::Failed(format!("{} names no file", src.display())))?;
        format!("{}/{}", guest.trim_end_matches('/'), name.to_string_lossy())
    } else {
        guest.to_string()
    };
    sb.fs().copy_from_host(src, &target).await?;
    Ok(())
}

async fn copy_out(sandbox: &str, guest: &str, dst: &Path) -> CliResult<()> {
    let sb = Sandbox::connect(sandbox).await?;
    if sb.fs().stat(guest).await?.is_dir() {
        return Err(CliError::Failed(format!(
            "{sandbox}:{guest} is a directory: msb cp copies single files"
        )));
    }
    let into_dir = dst.is_dir() || dst.as_os_str().to_string_lossy().ends_with('/');
    let target = if into_dir {
        let name = guest_file_name(guest)
            .ok_or_else(|| CliError::Failed(format!("{guest} names no file")))?;
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    sb.fs().copy_to_host(guest, &target).await?;
    Ok(())
}
