//! What one run of `msb-vmm` is asked to do: its parsed command line
//! ([`msb_protocol::vmmargs::VmmArgs`], the contract the SDK renders) checked and turned
//! into a [`Launch`] and the settings around it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use msb_protocol::bootcmd::InitSpec;
use msb_protocol::vmmargs::{BootMemoryArg, Security, VmmArgs};

use crate::launch::{BootMemory, DiskSpec, Launch, MountSpec};
use crate::lifecycle::Limits;

/// A checked command line.
#[derive(Debug)]
pub struct Invocation {
    /// The VM to start.
    pub launch: Launch,
    /// The command as UTF-8 (the protocol's strings), when one is given.
    pub command: Option<Vec<String>>,
    /// Where to write the boot report at exit.
    pub report: Option<PathBuf>,
    /// End the VM when stdin reaches end of file.
    pub exit_with_stdin: bool,
    /// A file this VMM holds an exclusive `flock` on for its whole life.
    pub lock: Option<PathBuf>,
    /// Idle timeout and maximum duration.
    pub limits: Limits,
    /// The metrics file, rewritten every second.
    pub metrics: Option<PathBuf>,
    /// Where the exit record goes.
    pub exit_record: Option<PathBuf>,
    /// The VMM's own log filter.
    pub log_level: Option<String>,
    /// Run in the jail (`--jail`, on unless `off`).
    pub jail: bool,
    /// Filter every thread's syscalls (`--seccomp`, on unless `off`).
    pub seccomp: bool,
    /// Test hook: the thread kind that makes a denied syscall.
    pub test_seccomp_violation: Option<String>,
    /// The sandbox's secrets (read before the jail).
    pub secrets_file: Option<PathBuf>,
}

/// `on` or `off` of `flag` (default on).
fn switch(v: Option<&str>, flag: &str) -> Result<bool, String> {
    match v {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(format!("{flag} takes on or off, got {other:?}")),
    }
}

fn utf8(v: OsString, what: &str) -> Result<String, String> {
    v.into_string()
        .map_err(|v| format!("{what} must be UTF-8, got {v:?}"))
}

/// The values of a two-valued flag, a pair per occurrence (clap takes exactly two each).
fn pairs<T: Clone>(v: &[T], flag: &str) -> Result<Vec<(T, T)>, String> {
    v.chunks(2)
        .map(|c| match c {
            [a, b] => Ok((a.clone(), b.clone())),
            _ => Err(format!("{flag} needs two values")),
        })
        .collect()
}

impl Invocation {
    /// Checks `args` (what clap cannot: how flags go together, UTF-8 where the guest needs
    /// it) and fills in the defaults.
    pub fn from_args(args: VmmArgs) -> Result<Invocation, String> {
        let network = args.network().map_err(|e| format!("network: {e}"))?;
        let mut launch = Launch {
            kernel: args.kernel,
            initrd: args.initrd,
            serial_log: args.serial_log,
            console: args.console,
            timeout: args.timeout.map(Duration::from_secs),
            append: args.append,
            restricted: args.security == Security::Restricted,
            vsock_socket: args.vsock_socket,
            control_socket: args.control_socket,
            exec_log: args.exec_log,
            layers: args.layers,
            upper_size_mib: args.upper_size,
            rw: args.rw,
            network,
            ..Launch::default()
        };
        if let Some(m) = args.memory {
            launch.memory_mib = m;
        }
        if let Some(b) = args.boot_memory {
            launch.boot_memory = match b {
                BootMemoryArg::All => BootMemory::All,
                BootMemoryArg::Mib(n) => BootMemory::Mib(n),
            };
        }
        if let Some(c) = args.cpus {
            launch.cpus = c;
        }
        if let Some(p) = args.kvm_path {
            launch.kvm_path = p;
        }
        if let Some(h) = args.hostname {
            launch.hostname = h;
        }
        for (list, readonly) in [(args.volumes, false), (args.ro_volumes, true)] {
            let flag = if readonly { "--ro-volume" } else { "--volume" };
            for (guest, host) in pairs(&list, flag)? {
                launch.mounts.push(MountSpec::Dir {
                    guest: utf8(guest, &format!("{flag}'s guest path"))?,
                    host: host.into(),
                    readonly,
                });
            }
        }
        for d in args.disks.chunks(3) {
            let [guest, spec, image] = d else {
                return Err("--disk needs three values".into());
            };
            let guest = utf8(guest.clone(), "--disk's guest path")?;
            let spec = utf8(spec.clone(), "--disk's FORMAT,ro|rw[,FSTYPE]")?;
            let disk = DiskSpec::parse(&spec, PathBuf::from(image))?;
            if guest == "/" {
                if launch.root_disk.replace(disk).is_some() {
                    return Err("two --disk / (one root disk at most)".into());
                }
            } else {
                launch.mounts.push(MountSpec::Disk { guest, disk });
            }
        }
        for (guest, size) in pairs(&args.tmpfs, "--tmpfs")? {
            let size_mib = match size.as_str() {
                "-" => None,
                v => Some(v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("--tmpfs needs a size in MiB above 0 or -, got {v:?}")
                })?),
            };
            launch.mounts.push(MountSpec::Tmpfs { guest, size_mib });
        }
        if let Some(init) = args.init {
            let path = match init.as_str() {
                "auto" => None,
                p if p.starts_with('/') => Some(p.to_string()),
                p => {
                    return Err(format!(
                        "--init takes auto or an absolute guest path, got {p:?}"
                    ))
                }
            };
            let env = args
                .init_env
                .iter()
                .map(|v| {
                    v.split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .map(|(k, val)| (k.to_string(), val.to_string()))
                        .ok_or_else(|| format!("--init-env needs KEY=VALUE, got {v:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            launch.init = Some(InitSpec {
                path,
                args: args.init_arg,
                env,
            });
        } else if !args.init_arg.is_empty() {
            return Err("--init-arg needs --init before it".into());
        } else if !args.init_env.is_empty() {
            return Err("--init-env needs --init before it".into());
        }
        launch.command = args.command;
        let limits = Limits {
            idle_timeout: args.idle_timeout.map(Duration::from_secs),
            max_duration: args.max_duration.map(Duration::from_secs),
        };
        if launch.command.is_empty() && launch.vsock_path().is_none() {
            return Err(
                "no command given (put it after the options, or give --control-socket or \
                 --vsock-socket to serve)"
                    .into(),
            );
        }
        if launch.control_socket.is_some() && !launch.command.is_empty() {
            return Err("--control-socket serves exec requests: give no command".into());
        }
        if launch.exec_log.is_some() && launch.control_socket.is_none() {
            return Err("--exec-log needs --control-socket (the relay writes it)".into());
        }
        if (limits != Limits::default() || args.metrics.is_some())
            && launch.control_socket.is_none()
        {
            return Err(
                "--idle-timeout, --max-duration and --metrics need --control-socket (a served \
                 sandbox)"
                    .into(),
            );
        }
        let command = if launch.command.is_empty() {
            None
        } else {
            let argv = launch
                .command
                .iter()
                .map(|a| utf8(a.clone(), "the command's arguments"))
                .collect::<Result<Vec<String>, _>>()?;
            Some(argv)
        };
        Ok(Invocation {
            launch,
            command,
            report: args.report,
            exit_with_stdin: args.exit_with_stdin,
            lock: args.lock,
            limits,
            metrics: args.metrics,
            exit_record: args.exit_record,
            log_level: args.log_level,
            jail: switch(args.jail.as_deref(), "--jail")?,
            seccomp: switch(args.seccomp.as_deref(), "--seccomp")?,
            secrets_file: args.secrets_file,
            test_seccomp_violation: match args.test_seccomp_violation {
                Some(k) if crate::seccomp::ThreadKind::from_name(&k).is_none() => {
                    return Err(format!("--test-seccomp-violation: no thread kind {k:?}"))
                }
                other => other,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(words: &[&str]) -> Result<VmmArgs, clap::Error> {
        VmmArgs::try_parse_from(std::iter::once("msb-vmm").chain(words.iter().copied()))
    }

    #[test]
    fn what_the_sdk_renders_parses_back_to_the_same_arguments() {
        let mut a = VmmArgs {
            kernel: Some("/k".into()),
            memory: Some(256),
            boot_memory: Some(BootMemoryArg::All),
            cpus: Some(2),
            console: true,
            timeout: Some(30),
            hostname: Some("box".into()),
            append: vec!["-weird".into(), "printk.time=1".into()],
            control_socket: Some("/run/c.sock".into()),
            exec_log: Some("/run/exec.log".into()),
            exit_with_stdin: true,
            layers: vec!["/l1".into(), "/l2".into()],
            rw: Some("/rw".into()),
            idle_timeout: Some(60),
            max_duration: Some(600),
            metrics: Some("/m.json".into()),
            log_level: Some("info".into()),
            security: Security::Restricted,
            init: Some("auto".into()),
            init_arg: vec!["--flag".into()],
            init_env: vec!["A=b=c".into()],
            ..VmmArgs::default()
        };
        a.volume("/data", "/srv/data", false);
        a.volume("/ro", "/srv/ro", true);
        a.tmpfs("/tmp", Some(64));
        let back =
            VmmArgs::try_parse_from(std::iter::once(OsString::from("msb-vmm")).chain(a.to_args()))
                .expect("parses");
        assert_eq!(back, a);
        let inv = Invocation::from_args(back).expect("valid");
        assert_eq!(inv.launch.memory_mib, 256);
        assert_eq!(inv.launch.boot_memory, BootMemory::All);
        assert_eq!(inv.launch.mounts.len(), 3);
        assert_eq!(
            inv.launch.init.as_ref().map(|i| i.env.clone()),
            Some(vec![("A".to_string(), "b=c".to_string())])
        );
        assert!(inv.launch.restricted);
        assert_eq!(inv.limits.idle_timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn the_command_follows_the_options_with_or_without_a_separator() {
        for words in [
            &["--memory", "128", "/bin/echo", "-n", "hello"][..],
            &["--memory", "128", "--", "/bin/echo", "-n", "hello"][..],
        ] {
            let inv = Invocation::from_args(parse(words).expect("parses")).expect("valid");
            assert_eq!(inv.launch.memory_mib, 128);
            assert_eq!(
                inv.command,
                Some(vec!["/bin/echo".into(), "-n".into(), "hello".into()])
            );
        }
    }

    #[test]
    fn defaults_are_the_launch_defaults() {
        let inv = Invocation::from_args(parse(&["/bin/true"]).expect("parses")).expect("valid");
        let d = Launch::default();
        assert_eq!(inv.launch.memory_mib, d.memory_mib);
        assert_eq!(inv.launch.boot_memory, d.boot_memory);
        assert_eq!(inv.launch.cpus, d.cpus);
        assert_eq!(inv.launch.hostname, d.hostname);
        assert!(!inv.launch.restricted && !inv.exit_with_stdin);
    }

    #[test]
    fn bad_combinations_are_refused_with_a_reason() {
        let refused = |words: &[&str]| match parse(words) {
            Err(_) => true,
            Ok(a) => Invocation::from_args(a).is_err(),
        };
        assert!(refused(&[]));
        assert!(refused(&["--control-socket", "/c", "/bin/true"]));
        assert!(refused(&["--exec-log", "/e", "/bin/true"]));
        assert!(refused(&["--idle-timeout", "5", "/bin/true"]));
        assert!(refused(&["--idle-timeout", "0", "--control-socket", "/c"]));
        assert!(refused(&["--metrics", "/m", "/bin/true"]));
        assert!(refused(&["--init", "relative", "/bin/true"]));
        assert!(refused(&["--init-arg", "x", "/bin/true"]));
        assert!(refused(&[
            "--init",
            "auto",
            "--init-env",
            "novalue",
            "/bin/true"
        ]));
        assert!(refused(&["--tmpfs", "/t", "0", "/bin/true"]));
        assert!(refused(&["--tmpfs", "/t"]));
        assert!(refused(&["--boot-memory", "lots", "/bin/true"]));
        assert!(refused(&["--security", "lax", "/bin/true"]));
        assert!(refused(&["--cpus", "300", "/bin/true"]));
        assert!(!refused(&["--tmpfs", "/t", "-", "--vsock-socket", "/v"]));
        assert!(!refused(&["--rootfs", "/r", "/bin/true"]));
        let unknown = parse(&["--bogus", "/bin/true"]).expect_err("an unknown flag");
        assert_eq!(unknown.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
