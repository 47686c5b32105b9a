//! What `msb-vmm` does before building a VM: pick the kernel and initramfs (building the
//! defaults when missing), and write the kernel command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use msb_devices::virtio::vsock::VsockConfig;
use msb_guest_kernel::{Flavour, GuestBuildError, Progress};
use msb_protocol::bootcmd;

use crate::arch::x86_64::cpuid::CpuProfile;
use crate::host::HostKind;
use crate::vm::{BootSource, VmConfig, VmmError};

/// Kernel command line every guest gets. `console=ttyS0` is the kernel log (the only UART);
/// `panic=-1` and `reboot=k` make a panic end the VM through the i8042 reset; the rest trims
/// boot work a microVM does not need.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=1 panic=-1 reboot=k no_timer_check tsc=reliable quiet";

/// The guest's vsock context id (the only guest of its VMM).
pub const GUEST_CID: u64 = 3;

/// Default guest memory for `msb-vmm`.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Everything `msb-vmm` was asked to do.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Kernel image; default: the cached flavour for this host, built if missing.
    pub kernel: Option<PathBuf>,
    /// Initramfs; default: the cached default initramfs, built if missing.
    pub initrd: Option<PathBuf>,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u8,
    /// KVM device node.
    pub kvm_path: PathBuf,
    /// Kernel console log file.
    pub serial_log: Option<PathBuf>,
    /// Echo the kernel console to stderr.
    pub console: bool,
    /// Stop the VM after this long.
    pub timeout: Option<Duration>,
    /// Guest hostname.
    pub hostname: String,
    /// Extra kernel command-line words.
    pub append: Vec<String>,
    /// Host socket of the guest's vsock device (hybrid mode); by default beside the control
    /// socket, else chosen by the caller.
    pub vsock_socket: Option<PathBuf>,
    /// The per-VM control socket the relay serves (implies a vsock device).
    pub control_socket: Option<PathBuf>,
    /// The relay's tap file.
    pub exec_log: Option<PathBuf>,
    /// The command to run in the guest (empty: serve clients until one shuts the VM down).
    pub command: Vec<OsString>,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            kernel: None,
            initrd: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            kvm_path: PathBuf::from("/dev/kvm"),
            serial_log: None,
            console: false,
            timeout: None,
            hostname: "msb".into(),
            append: Vec::new(),
            vsock_socket: None,
            control_socket: None,
            exec_log: None,
            command: Vec::new(),
        }
    }
}

impl Launch {
    /// The vsock device's host socket: the one given, else one beside the control socket.
    pub fn vsock_path(&self) -> Option<PathBuf> {
        self.vsock_socket.clone().or_else(|| {
            self.control_socket.as_ref().map(|c| {
                let mut p = c.clone().into_os_string();
                p.push(".vsock");
                PathBuf::from(p)
            })
        })
    }
}

/// Failures preparing a launch.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The default kernel or initramfs could not be built.
    #[error(transparent)]
    Build(#[from] GuestBuildError),
    /// The guest needs a vsock device and no socket path was chosen.
    #[error("no vsock socket path (give --vsock-socket or --control-socket)")]
    NoVsock,
    /// The hostname is not a valid hostname.
    #[error("invalid hostname {0:?}: use 1-64 letters, digits, '-' and '.'")]
    Hostname(String),
    /// An extra kernel argument would break the command line.
    #[error("invalid kernel argument {0:?}")]
    Append(String),
    /// The VMM rejected the config or failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// The kernel flavour for a host kind.
pub fn default_flavour(host: HostKind) -> Flavour {
    match host {
        HostKind::HardwareKvm => Flavour::Microvm,
        HostKind::Pvm => Flavour::PvmCompat,
    }
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The kernel command line for `launch` on a host with CPU `profile`.
pub fn kernel_cmdline(launch: &Launch, profile: CpuProfile) -> Result<String, LaunchError> {
    if !valid_hostname(&launch.hostname) {
        return Err(LaunchError::Hostname(launch.hostname.clone()));
    }
    let mut words: Vec<String> = BASE_CMDLINE.split(' ').map(str::to_string).collect();
    words.extend(profile.kernel_args().split_whitespace().map(str::to_string));
    for a in &launch.append {
        if a.is_empty() || a.contains(char::is_whitespace) || a.starts_with("msb.") {
            return Err(LaunchError::Append(a.clone()));
        }
        words.push(a.clone());
    }
    words.push(format!("{}={}", bootcmd::HOSTNAME_KEY, launch.hostname));
    Ok(words.join(" "))
}

/// Resolves defaults (building them when missing, with progress on stderr) and returns the
/// VM configuration.
pub fn resolve(launch: &Launch, host: HostKind) -> Result<VmConfig, LaunchError> {
    let profile = CpuProfile::for_host(host);
    let cmdline = kernel_cmdline(launch, profile)?;
    let mut cfg = VmConfig {
        memory_mib: launch.memory_mib,
        vcpus: launch.cpus,
        kvm_path: launch.kvm_path.clone(),
        boot: BootSource::Kernel {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline,
        },
        cpu_profile: profile,
        serial_log: launch.serial_log.clone(),
        console_echo: launch.console,
        // The agent is reached over vsock only, so every guest gets the device.
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: launch.vsock_path().ok_or(LaunchError::NoVsock)?,
        }),
    };
    // Cheap checks first: bad input fails before any build.
    crate::vm::validate_basic(&cfg)?;
    if let Some(k) = &launch.kernel {
        std::fs::File::open(k).map_err(|source| {
            VmmError::Boot(crate::arch::x86_64::boot::BootError::KernelOpen {
                path: k.clone(),
                source,
            })
        })?;
    }
    let kernel = match &launch.kernel {
        Some(k) => k.clone(),
        None => msb_guest_kernel::ensure_kernel(
            default_flavour(host),
            &mut Progress::new("guest-kernel"),
        )?,
    };
    let initrd = match &launch.initrd {
        Some(i) => i.clone(),
        None => msb_guest_kernel::ensure_initramfs(&mut Progress::new("initramfs"))?,
    };
    if let BootSource::Kernel {
        kernel: k,
        initrd: i,
        ..
    } = &mut cfg.boot
    {
        *k = kernel;
        *i = Some(initrd);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            command: vec![OsString::from("true")],
            ..Launch::default()
        }
    }

    #[test]
    fn cmdline_carries_profile_and_hostname() {
        let line = kernel_cmdline(&launch(), CpuProfile::PvmCompat).expect("valid");
        assert!(line.starts_with(BASE_CMDLINE));
        assert!(line.contains("noxsave"));
        assert_eq!(
            bootcmd::find_param(&line, bootcmd::HOSTNAME_KEY),
            Some("msb")
        );
        let plain = kernel_cmdline(&launch(), CpuProfile::Host).expect("valid");
        assert!(!plain.contains("noxsave"));
    }

    #[test]
    fn bad_input_is_typed() {
        let mut l = launch();
        l.hostname = "bad host".into();
        assert!(matches!(
            kernel_cmdline(&l, CpuProfile::Host),
            Err(LaunchError::Hostname(_))
        ));
        let mut l = launch();
        l.append = vec!["a b".into()];
        assert!(matches!(
            kernel_cmdline(&l, CpuProfile::Host),
            Err(LaunchError::Append(_))
        ));
        assert!(matches!(
            resolve(&launch(), HostKind::HardwareKvm),
            Err(LaunchError::NoVsock)
        ));
    }

    #[test]
    fn the_vsock_socket_defaults_beside_the_control_socket() {
        let mut l = launch();
        assert_eq!(l.vsock_path(), None);
        l.control_socket = Some("/run/x/c.sock".into());
        assert_eq!(l.vsock_path(), Some(PathBuf::from("/run/x/c.sock.vsock")));
        l.vsock_socket = Some("/v.sock".into());
        assert_eq!(l.vsock_path(), Some(PathBuf::from("/v.sock")));
    }
}
