//! Handing PID 1 to the image's own init (`msb.init=` on the kernel command line): once
//! the agent has mounted the root and the volumes, it forks; the parent, PID 1, execs the
//! init, and the child carries on as the agent (a child subreaper, so the orphans of its
//! commands still come back to it). The init reaps everything else. Ending the VM stays
//! the agent's: it writes the exit status to the system device whatever the init does.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use msb_protocol::bootcmd::{InitSpec, INIT_CANDIDATES};

/// The init to run: the given path, or the first candidate that is an executable file.
fn resolve(spec: &InitSpec, exists: impl Fn(&str) -> bool) -> Result<String, String> {
    match &spec.path {
        Some(p) if exists(p) => Ok(p.clone()),
        Some(p) => Err(format!("the init {p} is not an executable file")),
        None => INIT_CANDIDATES
            .iter()
            .find(|c| exists(c))
            .map(|c| c.to_string())
            .ok_or_else(|| format!("no init found (looked for {})", INIT_CANDIDATES.join(", "))),
    }
}

fn executable(p: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(Path::new(p))
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Hands PID 1 to the init: returns in the agent (now PID 1's child); PID 1 itself never
/// returns. `Err` before anything changed (no init, a process with threads already).
pub fn hand_off(spec: &InitSpec, path_env: &str) -> Result<(), String> {
    let init = resolve(spec, executable)?;
    match crate::sys::fork_single_threaded()? {
        nix::unistd::ForkResult::Child => {
            if let Err(e) = crate::sys::become_subreaper() {
                crate::log(&format!(
                    "cannot become a child subreaper ({e}): orphans go to the init"
                ));
            }
            Ok(())
        }
        nix::unistd::ForkResult::Parent { .. } => {
            let e = Command::new(&init)
                .args(&spec.args)
                .env_clear()
                .env("PATH", path_env)
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .exec();
            crate::log(&format!("cannot run the init {init}: {e}"));
            crate::shutdown(msb_protocol::sysdev::ExitStatus::Code(crate::BOOT_FAILURE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_first_candidate_there() {
        let auto = InitSpec {
            path: None,
            args: vec![],
            env: vec![],
        };
        assert_eq!(
            resolve(&auto, |p| p == "/lib/systemd/systemd"
                || p == "/usr/sbin/init"),
            Ok("/usr/sbin/init".to_string())
        );
        assert!(resolve(&auto, |_| false).is_err());
        let given = InitSpec {
            path: Some("/opt/init".into()),
            ..auto
        };
        assert_eq!(resolve(&given, |_| true), Ok("/opt/init".to_string()));
        assert!(resolve(&given, |_| false).is_err());
    }
}
