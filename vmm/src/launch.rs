//! What `msb-vmm` does before building a VM: pick the kernel and initramfs (building the
//! defaults when missing), and write the kernel command line.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use msb_devices::virtio::block::{BlockError, DiskFormat};
use msb_devices::virtio::fs::{FsLimits, Quota, Share, ShareSource};
use msb_devices::virtio::vsock::VsockConfig;
use msb_guest_kernel::{Flavour, GuestBuildError, Progress};
use msb_protocol::bootcmd::{self, GuestMount};
use msb_protocol::disk::DiskOptions;

use crate::arch::split_ram;
use crate::arch::CpuProfile;
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
    /// RAM the guest's kernel gets at boot, MiB; the rest is held back in 128 MiB blocks
    /// the agent adds when the guest needs them (see [`BootMemory`]).
    pub boot_memory: BootMemory,
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
    /// Extra kernel command-line words (not `msb.` ones: those are the VMM's).
    pub append: Vec<String>,
    /// The restricted security profile for the guest's commands.
    pub restricted: bool,
    /// Hand PID 1 to this init after the agent's setup.
    pub init: Option<bootcmd::InitSpec>,
    /// Host socket of the guest's vsock device (hybrid mode); by default beside the control
    /// socket, else chosen by the caller.
    pub vsock_socket: Option<PathBuf>,
    /// The per-VM control socket the relay serves (implies a vsock device).
    pub control_socket: Option<PathBuf>,
    /// The relay's tap file.
    pub exec_log: Option<PathBuf>,
    /// The command to run in the guest (empty: serve clients until one shuts the VM down).
    pub command: Vec<OsString>,
    /// Read-only image layers of the root filesystem, bottom first (empty: the default
    /// root filesystem, built if missing).
    pub layers: Vec<PathBuf>,
    /// A disk image as the root instead of the layers and the writable layer.
    pub root_disk: Option<DiskSpec>,
    /// The writable layer's size limit in MiB (`ENOSPC` in the guest past it).
    pub upper_size_mib: Option<u64>,
    /// The writable layer: a host directory holding `upper/` and `work/` (created when
    /// missing). Required by [`resolve`] unless the root is a disk; `msb-vmm` makes a
    /// temporary one when not given.
    pub rw: Option<PathBuf>,
    /// Volumes and tmpfs mounts, in the order given (parents are mounted before children).
    pub mounts: Vec<MountSpec>,
    /// The network (`None`: no network device, the guest has only `lo`).
    pub network: Option<msb_protocol::network::NetworkConfig>,
}

/// A mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// A host directory (its own virtio-fs device).
    Dir {
        /// Absolute guest path.
        guest: String,
        /// Host directory.
        host: PathBuf,
        /// The guest may only read (enforced by the device).
        readonly: bool,
    },
    /// A disk image (its own virtio-blk device).
    Disk {
        /// Absolute guest path.
        guest: String,
        /// The image.
        disk: DiskSpec,
    },
    /// A tmpfs.
    Tmpfs {
        /// Absolute guest path.
        guest: String,
        /// Size limit in MiB (the kernel's default when `None`).
        size_mib: Option<u32>,
    },
}

impl MountSpec {
    /// The guest path.
    pub fn guest(&self) -> &str {
        match self {
            MountSpec::Dir { guest, .. }
            | MountSpec::Disk { guest, .. }
            | MountSpec::Tmpfs { guest, .. } => guest,
        }
    }
}

/// A disk image the guest mounts (as its root or at a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image on the host.
    pub path: PathBuf,
    /// Its format (the caller's word, never read off the file).
    pub format: DiskFormat,
    /// The guest may only read (the device refuses writes too).
    pub readonly: bool,
    /// The filesystem on it (`None`: the agent reads it off the disk).
    pub fstype: Option<String>,
}

impl DiskSpec {
    /// Reads `--disk`'s middle value, `FORMAT,ro|rw[,FSTYPE]`, for the image at `path`.
    pub fn parse(spec: &str, path: PathBuf) -> Result<DiskSpec, String> {
        let o: DiskOptions = spec.parse().map_err(|e| format!("--disk: {e}"))?;
        Ok(DiskSpec {
            path,
            format: o.format,
            readonly: o.readonly,
            fstype: o.fstype,
        })
    }
}

/// A disk the VM gets: its serial (how the agent finds it) and the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The virtio-blk serial.
    pub serial: String,
    /// The image.
    pub spec: DiskSpec,
}

/// The serial of the `i`-th disk volume.
pub fn disk_serial(i: usize) -> String {
    format!("msb-disk-{i}")
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            kernel: None,
            initrd: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            boot_memory: BootMemory::ForHost,
            cpus: 1,
            kvm_path: PathBuf::from("/dev/kvm"),
            serial_log: None,
            console: false,
            timeout: None,
            hostname: "msb".into(),
            append: Vec::new(),
            restricted: false,
            init: None,
            vsock_socket: None,
            control_socket: None,
            exec_log: None,
            command: Vec::new(),
            layers: Vec::new(),
            root_disk: None,
            upper_size_mib: None,
            rw: None,
            mounts: Vec::new(),
            network: None,
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

/// How much of the guest's RAM its kernel sets up while it boots.
///
/// Setting up RAM costs the guest kernel work per page (its `struct page`s and the page
/// allocator's lists): on hardware KVM ~10 ms for 512 MiB, on a PVM host, where guest
/// kernel code is emulated, ~2 s per 128 MiB. So on PVM hosts the kernel boots with
/// [`PVM_BOOT_MEMORY_MIB`] and the agent adds the rest (whole 128 MiB blocks, through
/// memory hotplug) when free memory runs low; pieces shorter than a block boot with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMemory {
    /// All of it on hardware KVM, [`PVM_BOOT_MEMORY_MIB`] on PVM hosts.
    ForHost,
    /// All of it.
    All,
    /// At most this many MiB (rounded up to a 128 MiB block).
    Mib(u64),
}

/// Boot memory on PVM hosts, MiB (one memory block).
pub const PVM_BOOT_MEMORY_MIB: u64 = 128;

impl BootMemory {
    /// The guest-physical address above which whole blocks are held back, if any.
    pub fn limit(self, profile: CpuProfile) -> Option<u64> {
        match (self, profile) {
            (BootMemory::All, _) | (BootMemory::ForHost, CpuProfile::Host) => None,
            (BootMemory::ForHost, CpuProfile::PvmCompat) => Some(PVM_BOOT_MEMORY_MIB << 20),
            (BootMemory::Mib(m), _) => Some(m.max(1).saturating_mul(1 << 20)),
        }
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
    /// No writable layer was given.
    #[error("no writable layer (give --rw DIR)")]
    NoRw,
    /// A guest mount path is not an absolute, normalised path other than `/`.
    #[error("invalid guest mount path {0:?}: use an absolute path without '.', '..' or '//', other than /")]
    GuestPath(String),
    /// Two mounts at one guest path.
    #[error("two mounts at {0}")]
    DuplicateMount(String),
    /// A shared host directory is missing or is not a directory.
    #[error("cannot share {path}: not an existing directory")]
    HostDir {
        /// The path.
        path: PathBuf,
    },
    /// Two shared host directories overlap: the guest could reach one through the other
    /// (a directory moved out of the inner one, then `..`).
    #[error("cannot share both {outer} and {inner}: one contains the other")]
    OverlappingShares {
        /// The directory that contains the other (or either, when they are the same).
        outer: PathBuf,
        /// The one inside it.
        inner: PathBuf,
    },
    /// A disk image could not be opened (missing, in use, unsupported).
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A disk root with image layers or patches of the overlay root.
    #[error("a disk root replaces the image layers: give --disk / or --layer, not both")]
    DiskRootWithLayers,
    /// The writable layer could not be prepared.
    #[error("cannot prepare the writable layer {path}")]
    Rw {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The virtio-fs tag of the `i`-th volume.
pub fn volume_tag(i: usize) -> String {
    format!("msbvol{i}")
}

/// True for an absolute guest path with no empty, `.` or `..` component, other than `/`.
pub fn valid_guest_path(p: &str) -> bool {
    p.len() > 1
        && p.starts_with('/')
        && !p.contains('\0')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The devices and command-line words for the root and the mounts of `launch`.
fn shares(
    launch: &Launch,
    layers: Vec<PathBuf>,
    rw: Option<&std::path::Path>,
) -> Result<Mounts, LaunchError> {
    let mut out = Mounts::default();
    match &launch.root_disk {
        Some(root) => {
            out.words.push(
                bootcmd::DiskRoot {
                    serial: bootcmd::ROOT_DISK_SERIAL.into(),
                    fstype: root.fstype.clone(),
                    readonly: root.readonly,
                }
                .encode(),
            );
            out.disks.push(DiskPlan {
                serial: bootcmd::ROOT_DISK_SERIAL.into(),
                spec: root.clone(),
            });
        }
        None => {
            let limit = launch.upper_size_mib.map(|m| m.saturating_mul(1 << 20));
            let (share, word) = overlay_root(layers, rw.ok_or(LaunchError::NoRw)?, limit)?;
            out.shares.push(share);
            out.words.push(word);
        }
    }
    // Parents before children, otherwise in the order given.
    let mut mounts: Vec<&MountSpec> = launch.mounts.iter().collect();
    mounts.sort_by_key(|m| m.guest().matches('/').count());
    let mut seen = std::collections::HashSet::new();
    for m in mounts {
        let guest = m.guest();
        if !valid_guest_path(guest) {
            return Err(LaunchError::GuestPath(guest.into()));
        }
        if !seen.insert(guest.to_string()) {
            return Err(LaunchError::DuplicateMount(guest.into()));
        }
        let mount = match m {
            MountSpec::Dir {
                guest,
                host,
                readonly,
            } => {
                if !host.is_dir() {
                    return Err(LaunchError::HostDir { path: host.clone() });
                }
                let volumes = out
                    .shares
                    .iter()
                    .filter(|s| s.tag != bootcmd::ROOT_TAG)
                    .count();
                let tag = volume_tag(volumes);
                out.shares.push(Share {
                    tag: tag.clone(),
                    source: ShareSource::Dir {
                        path: host.clone(),
                        readonly: *readonly,
                    },
                });
                GuestMount::Virtiofs {
                    tag,
                    path: guest.clone(),
                    readonly: *readonly,
                }
            }
            MountSpec::Disk { guest, disk } => {
                let volumes = out
                    .disks
                    .iter()
                    .filter(|d| d.serial != bootcmd::ROOT_DISK_SERIAL)
                    .count();
                let serial = disk_serial(volumes);
                out.disks.push(DiskPlan {
                    serial: serial.clone(),
                    spec: disk.clone(),
                });
                GuestMount::Disk {
                    serial,
                    fstype: disk.fstype.clone(),
                    path: guest.clone(),
                    readonly: disk.readonly,
                }
            }
            MountSpec::Tmpfs { guest, size_mib } => GuestMount::Tmpfs {
                path: guest.clone(),
                size_mib: *size_mib,
                readonly: false,
            },
        };
        out.words
            .push(format!("{}={}", bootcmd::MOUNT_KEY, mount.encode()));
    }
    Ok(out)
}

/// What [`shares`] plans: virtio-fs devices, disks and the command-line words.
#[derive(Debug, Default)]
pub(crate) struct Mounts {
    pub(crate) shares: Vec<Share>,
    pub(crate) disks: Vec<DiskPlan>,
    pub(crate) words: Vec<String>,
}

/// The overlay root: its share (layers and the writable layer) and its command-line word.
fn overlay_root(
    layers: Vec<PathBuf>,
    rw: &std::path::Path,
    upper_limit: Option<u64>,
) -> Result<(Share, String), LaunchError> {
    // The guest writes inside `rw`: never follow what it may have put there.
    let rw_err = |path: &std::path::Path, source| LaunchError::Rw {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(rw).map_err(|e| rw_err(rw, e))?;
    // The guest's setuid files live in here: no other host user may reach them (the
    // device keeps setuid bits only in a 0700 writable layer).
    std::fs::set_permissions(rw, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| rw_err(rw, e))?;
    for p in [rw.to_path_buf(), rw.join("upper"), rw.join("work")] {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(rw_err(
                    &p,
                    std::io::Error::other("not a directory (a symlink or a file)"),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&p).map_err(|e| rw_err(&p, e))?
            }
            Err(e) => return Err(rw_err(&p, e)),
        }
    }
    for l in &layers {
        if !l.is_dir() {
            return Err(LaunchError::HostDir { path: l.clone() });
        }
    }
    // With a limit: what the writable layer holds now, kept up to date by the device from
    // here on. Without one the device counts nothing (no work on its request path).
    let quota = match upper_limit {
        Some(limit) => {
            let q = Quota::new(Some(limit));
            q.scan(rw).map_err(|e| rw_err(rw, e))?;
            Some(Arc::new(q))
        }
        None => None,
    };
    let word = format!("{}={}", bootcmd::ROOT_KEY, layers.len());
    let share = Share {
        tag: bootcmd::ROOT_TAG.into(),
        source: ShareSource::Root {
            layers,
            rw: rw.to_path_buf(),
            quota,
        },
    };
    Ok((share, word))
}

/// Refuses shares whose host directories overlap (one contains the other): with two, a
/// guest could move a directory out of the inner one through the outer and climb out of
/// the inner share from it. Layers, the writable layer, the agent's directory and volumes
/// are all checked against each other.
pub fn check_overlaps(shares: &[Share]) -> Result<(), LaunchError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for s in shares {
        match &s.source {
            ShareSource::Dir { path, .. } => dirs.push(path.clone()),
            ShareSource::Root { layers, rw, .. } => {
                dirs.extend(layers.iter().cloned());
                dirs.push(rw.clone());
            }
        }
    }
    let dirs: Vec<PathBuf> = dirs
        .into_iter()
        .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
        .collect();
    for (i, a) in dirs.iter().enumerate() {
        for b in &dirs[i + 1..] {
            let (outer, inner) = if b.starts_with(a) {
                (a, b)
            } else if a.starts_with(b) {
                (b, a)
            } else {
                continue;
            };
            return Err(LaunchError::OverlappingShares {
                outer: outer.clone(),
                inner: inner.clone(),
            });
        }
    }
    Ok(())
}

/// Descriptors `msb-vmm` keeps for itself beyond the shares' and the proxy's: KVM, vCPUs,
/// eventfds, sockets, logs.
pub const FD_RESERVE: u64 = 1024;

/// The open-file limit `msb-vmm` asks for: what the shares' budget and the proxy's
/// connections can hold at most, plus [`FD_RESERVE`]. No more: the guest can make the VMM
/// hold these, and nothing beyond.
pub fn fd_limit_wanted(net_connections: usize) -> u64 {
    let fs = FsLimits::default();
    (fs.max_inodes + fs.max_handles + net_connections) as u64 + FD_RESERVE
}

/// The shares' budget under an open-file limit of `limit`: the default, or, under a lower
/// limit, what is left after the proxy's connections and [`FD_RESERVE`] (four fifths
/// inodes, one fifth handles), so the guest can never run the VMM out of descriptors.
pub fn fs_limits_under(limit: u64, net_connections: usize) -> FsLimits {
    let default = FsLimits::default();
    let left = limit.saturating_sub(net_connections as u64 + FD_RESERVE) as usize;
    if left >= default.max_inodes + default.max_handles {
        return default;
    }
    FsLimits {
        max_inodes: (left * 4 / 5).max(64),
        max_handles: (left / 5).max(16),
    }
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
    if launch.initrd.is_none() {
        // The agent directory is the kernel's root (its share is added by `resolve`).
        words.extend([
            format!("root={}", bootcmd::INIT_TAG),
            "rootfstype=virtiofs".into(),
            "init=/init".into(),
        ]);
    }
    if profile == CpuProfile::PvmCompat {
        // Init's environment from the start: the agent need not re-execute itself.
        words.push(format!(
            "{}={}",
            bootcmd::TUNABLES_ENV,
            bootcmd::NO_AVX_TUNABLES
        ));
    }
    for a in &launch.append {
        if a.is_empty() || a.contains(char::is_whitespace) || a.starts_with("msb.") {
            return Err(LaunchError::Append(a.clone()));
        }
        words.push(a.clone());
    }
    words.push(format!("{}={}", bootcmd::HOSTNAME_KEY, launch.hostname));
    let (_, held) = split_ram(launch.memory_mib << 20, launch.boot_memory.limit(profile));
    if let Some(v) = bootcmd::encode_hotmem(&held) {
        words.push(format!("{}={v}", bootcmd::HOTMEM_KEY));
    }
    if let Some(net) = &launch.network {
        words.push(
            bootcmd::GuestNet {
                address: net.guest(),
                prefix: net.subnet.prefix_len(),
                gateway: net.gateway(),
                mtu: net.mtu,
            }
            .encode(),
        );
    }
    if launch.restricted {
        words.push(format!(
            "{}={}",
            bootcmd::SECURITY_KEY,
            bootcmd::SECURITY_RESTRICTED
        ));
    }
    if let Some(init) = &launch.init {
        words.extend(init.encode());
    }
    Ok(words.join(" "))
}

/// Resolves defaults (building them when missing, with progress on stderr) and returns the
/// VM configuration.
pub fn resolve(launch: &Launch, host: HostKind) -> Result<VmConfig, LaunchError> {
    let profile = CpuProfile::for_host(host);
    let mut cmdline = kernel_cmdline(launch, profile)?;
    let mut cfg = VmConfig {
        memory_mib: launch.memory_mib,
        vcpus: launch.cpus,
        kvm_path: launch.kvm_path.clone(),
        boot: BootSource::Kernel {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
        },
        cpu_profile: profile,
        serial_log: launch.serial_log.clone(),
        console_echo: launch.console,
        // The agent is reached over vsock only, so every guest gets the device.
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: launch.vsock_path().ok_or(LaunchError::NoVsock)?,
        }),
        fs: Vec::new(),
        disks: Vec::new(),
        net: launch.network.clone(),
        net_tls: None,
        net_events: None,
        ready_gate: None,
        fs_limits: Default::default(),
        boot_ram_limit: launch.boot_memory.limit(profile),
    };
    let rw = launch.rw.as_deref();
    if launch.root_disk.is_some() && !launch.layers.is_empty() {
        return Err(LaunchError::DiskRootWithLayers);
    }
    // Cheap checks first: bad input fails before any build.
    crate::vm::validate_basic(&cfg)?;
    if let Some(k) = &launch.kernel {
        std::fs::File::open(k).map_err(|source| {
            VmmError::Boot(crate::arch::BootError::KernelOpen {
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
    // Without an initramfs the agent's directory is the kernel's root, read on demand over
    // virtio-fs (an initramfs is unpacked by guest kernel code at every boot).
    let (initrd, agent_dir) = match &launch.initrd {
        Some(i) => (Some(i.clone()), None),
        None => (
            None,
            Some(msb_guest_kernel::ensure_agent_dir(&mut Progress::new(
                "agent",
            ))?),
        ),
    };
    let layers = if launch.root_disk.is_some() {
        Vec::new()
    } else if launch.layers.is_empty() {
        vec![msb_guest_kernel::ensure_rootfs(&mut Progress::new(
            "rootfs",
        ))?]
    } else {
        launch.layers.clone()
    };
    let Mounts {
        shares: mut fs,
        disks,
        words,
    } = shares(launch, layers, rw)?;
    // Opened (and locked) here, before the jail: the VMM's threads never open them by path.
    for d in disks {
        let opened =
            msb_devices::virtio::block::open_disk(&d.spec.path, d.spec.format, d.spec.readonly)?;
        cfg.disks.push(crate::vm::DiskDevice::new(d.serial, opened));
    }
    if let Some(dir) = agent_dir {
        fs.push(Share {
            tag: bootcmd::INIT_TAG.into(),
            source: ShareSource::Dir {
                path: dir,
                readonly: true,
            },
        });
    }
    check_overlaps(&fs)?;
    cfg.fs = fs;
    for w in words {
        cmdline.push(' ');
        cmdline.push_str(&w);
    }
    if let BootSource::Kernel {
        kernel: k,
        initrd: i,
        cmdline: c,
    } = &mut cfg.boot
    {
        *k = kernel;
        *i = initrd;
        *c = cmdline;
    }
    Ok(cfg)
}

/// A private directory, removed on drop, for what the caller did not give: the vsock
/// socket of a one-command VM (no client will look for it) and the writable layer of a VM
/// whose writes need not outlive it.
pub struct PrivateDir {
    dir: Option<PathBuf>,
    /// The directory's parent, opened before the jail: in the jail the directory is a
    /// mount point that cannot be removed by its path.
    parent: Option<std::os::fd::OwnedFd>,
}

impl PrivateDir {
    /// Makes the directory if `launch` needs it and points `launch` into it.
    pub fn fill_in(launch: &mut Launch) -> PrivateDir {
        let none = PrivateDir {
            dir: None,
            parent: None,
        };
        let needs_socket = !launch.command.is_empty() && launch.vsock_path().is_none();
        if !needs_socket && launch.rw.is_some() {
            return none;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = std::env::temp_dir();
        let dir = tmp.join(format!("msb-vmm-{}-{nanos:x}", std::process::id()));
        // 0700: it holds the writable layer, where the guest's setuid files are kept.
        if std::fs::DirBuilder::new().mode(0o700).create(&dir).is_err() {
            // `resolve` then reports that no socket path or writable layer is set.
            return none;
        }
        if needs_socket {
            launch.vsock_socket = Some(dir.join("v.sock"));
        }
        if launch.rw.is_none() {
            launch.rw = Some(dir.join("rw"));
        }
        let parent = rustix::fs::open(
            &tmp,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok();
        PrivateDir {
            dir: Some(dir),
            parent,
        }
    }

    /// The directory, when one was made.
    pub fn path(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Removes the directory and what it holds (again: nothing).
    pub fn remove(&self) {
        let Some(d) = &self.dir else {
            return;
        };
        let _ = std::fs::remove_dir_all(d);
        if let (Some(parent), Some(name)) = (&self.parent, d.file_name()) {
            let _ = rustix::fs::unlinkat(parent, name, rustix::fs::AtFlags::REMOVEDIR);
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        self.remove();
    }
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
    fn without_an_initramfs_the_agent_directory_is_the_root_and_appends_come_later() {
        let mut l = launch();
        l.append = vec!["init=/mine".into()];
        let line = kernel_cmdline(&l, CpuProfile::Host).expect("valid");
        assert!(line.contains("root=msbinit rootfstype=virtiofs init=/init"));
        // The kernel takes the last init=: the caller's own word wins.
        assert!(line.find("init=/init") < line.find("init=/mine"), "{line}");
        l.initrd = Some("/some/initrd".into());
        let line = kernel_cmdline(&l, CpuProfile::Host).expect("valid");
        assert!(
            !line.contains("root=msbinit") && !line.contains("init=/init"),
            "{line}"
        );
    }

    #[test]
    fn ram_above_the_boot_limit_is_announced_in_blocks() {
        let mut l = launch();
        l.memory_mib = 512;
        let pvm = kernel_cmdline(&l, CpuProfile::PvmCompat).expect("valid");
        assert_eq!(
            bootcmd::find_param(&pvm, bootcmd::HOTMEM_KEY),
            Some("0x8000000+3")
        );
        let hw = kernel_cmdline(&l, CpuProfile::Host).expect("valid");
        assert_eq!(bootcmd::find_param(&hw, bootcmd::HOTMEM_KEY), None);
        l.boot_memory = BootMemory::All;
        let all = kernel_cmdline(&l, CpuProfile::PvmCompat).expect("valid");
        assert_eq!(bootcmd::find_param(&all, bootcmd::HOTMEM_KEY), None);
        l.boot_memory = BootMemory::Mib(256);
        let some = kernel_cmdline(&l, CpuProfile::Host).expect("valid");
        assert_eq!(
            bootcmd::find_param(&some, bootcmd::HOTMEM_KEY),
            Some("0x10000000+2")
        );
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
    fn cmdline_carries_the_security_profile_and_the_init() {
        let mut l = launch();
        let line = kernel_cmdline(&l, CpuProfile::Host).expect("valid");
        assert_eq!(bootcmd::find_param(&line, bootcmd::SECURITY_KEY), None);
        assert_eq!(bootcmd::InitSpec::from_cmdline(&line), Ok(None));
        l.restricted = true;
        let init = bootcmd::InitSpec {
            path: Some("/sbin/my init".into()),
            args: vec!["--x".into()],
            env: vec![("A".into(), "b c".into())],
        };
        l.init = Some(init.clone());
        let line = kernel_cmdline(&l, CpuProfile::Host).expect("valid");
        assert_eq!(
            bootcmd::find_param(&line, bootcmd::SECURITY_KEY),
            Some(bootcmd::SECURITY_RESTRICTED)
        );
        assert_eq!(bootcmd::InitSpec::from_cmdline(&line), Ok(Some(init)));
        // The VMM's own words cannot be forged through --append.
        l.append = vec!["msb.init=auto".into()];
        assert!(matches!(
            kernel_cmdline(&l, CpuProfile::Host),
            Err(LaunchError::Append(_))
        ));
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
    fn mounts_become_devices_and_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (host, rw, layer) = (
            dir.path().join("h"),
            dir.path().join("rw"),
            dir.path().join("l"),
        );
        std::fs::create_dir_all(&host).expect("mkdir");
        std::fs::create_dir_all(&layer).expect("mkdir");
        let mut l = launch();
        l.mounts = vec![
            MountSpec::Dir {
                guest: "/data/sub".into(),
                host: host.clone(),
                readonly: true,
            },
            MountSpec::Tmpfs {
                guest: "/tmp".into(),
                size_mib: Some(8),
            },
            MountSpec::Dir {
                guest: "/data".into(),
                host: host.clone(),
                readonly: false,
            },
        ];
        let (devs, words) = two(shares(&l, vec![layer.clone()], Some(&rw))).expect("valid");
        assert!(rw.join("upper").is_dir() && rw.join("work").is_dir());
        assert_eq!(devs.len(), 3);
        assert_eq!(devs[0].tag, bootcmd::ROOT_TAG);
        assert_eq!(words[0], "msb.root=1");
        // Parents first: /tmp and /data (one level) before /data/sub.
        let mounts: Vec<GuestMount> = words[1..]
            .iter()
            .map(|w| GuestMount::decode(w.strip_prefix("msb.mnt=").expect("key")).expect("decodes"))
            .collect();
        assert_eq!(mounts[0].path(), "/tmp");
        assert_eq!(mounts[1].path(), "/data");
        assert_eq!(mounts[2].path(), "/data/sub");
        assert_eq!(
            mounts[2],
            GuestMount::Virtiofs {
                tag: "msbvol1".into(),
                path: "/data/sub".into(),
                readonly: true
            }
        );
        assert_eq!(
            devs[2].source,
            ShareSource::Dir {
                path: host.clone(),
                readonly: true
            }
        );

        for bad in ["", "/", "rel", "/a/../b", "/a//b", "/a/.", "/a/"] {
            let mut l = launch();
            l.mounts = vec![MountSpec::Tmpfs {
                guest: bad.into(),
                size_mib: None,
            }];
            assert!(
                matches!(shares_of(&l, &layer, &rw), Err(LaunchError::GuestPath(_))),
                "{bad:?}"
            );
        }
        let mut l = launch();
        l.mounts = vec![
            MountSpec::Tmpfs {
                guest: "/x".into(),
                size_mib: None,
            },
            MountSpec::Dir {
                guest: "/x".into(),
                host: host.clone(),
                readonly: false,
            },
        ];
        assert!(matches!(
            shares_of(&l, &layer, &rw),
            Err(LaunchError::DuplicateMount(_))
        ));
        let mut l = launch();
        l.mounts = vec![MountSpec::Dir {
            guest: "/x".into(),
            host: dir.path().join("missing"),
            readonly: false,
        }];
        assert!(matches!(
            shares_of(&l, &layer, &rw),
            Err(LaunchError::HostDir { .. })
        ));
        assert!(matches!(
            two(shares(
                &launch(),
                vec![dir.path().join("nolayer")],
                Some(&rw)
            )),
            Err(LaunchError::HostDir { .. })
        ));
        // A guest that swapped its upper for a symlink gets no directory made through it.
        let target = dir.path().join("elsewhere");
        std::fs::remove_dir(rw.join("work")).expect("rmdir");
        std::os::unix::fs::symlink(&target, rw.join("work")).expect("symlink");
        assert!(matches!(
            two(shares(&launch(), vec![layer.clone()], Some(&rw))),
            Err(LaunchError::Rw { .. })
        ));
        assert!(!target.exists());
    }

    #[test]
    fn the_private_directory_is_0700_and_removed() {
        let mut l = launch();
        let private = PrivateDir::fill_in(&mut l);
        let dir = private.path().expect("made").to_path_buf();
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "it holds the writable layer");
        assert!(l.rw.as_deref().is_some_and(|rw| rw.starts_with(&dir)));
        std::fs::create_dir_all(dir.join("rw/upper")).expect("mkdir");
        drop(private);
        assert!(!dir.exists());
    }

    #[test]
    fn the_fd_limit_bounds_the_shares_budget() {
        let want = fd_limit_wanted(1024);
        assert_eq!(fs_limits_under(want, 1024), FsLimits::default());
        assert_eq!(fs_limits_under(u64::MAX, 0), FsLimits::default());
        let low = fs_limits_under(20_000, 1024);
        assert!(low.max_inodes + low.max_handles + 1024 + FD_RESERVE as usize <= 20_000);
        assert!(low.max_inodes > 10_000, "{low:?}");
        let tiny = fs_limits_under(256, 1024);
        assert!(tiny.max_inodes >= 64 && tiny.max_handles >= 16, "{tiny:?}");
    }

    #[test]
    fn the_writable_layer_is_private_and_overlapping_shares_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (data, layer, rw) = (
            dir.path().join("data"),
            dir.path().join("l"),
            dir.path().join("rw"),
        );
        for d in [data.join("sub"), layer.clone(), rw.clone()] {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let vol = |guest: &str, host: &std::path::Path| MountSpec::Dir {
            guest: guest.into(),
            host: host.to_path_buf(),
            readonly: false,
        };
        let mut l = launch();
        l.mounts = vec![vol("/d", &data)];
        let (fs, _) = two(shares(&l, vec![layer.clone()], Some(&rw))).expect("disjoint shares");
        check_overlaps(&fs).expect("disjoint shares");
        let mode = std::fs::metadata(&rw).expect("rw").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the writable layer is made private");

        let refused = |mounts: Vec<MountSpec>, layers: Vec<PathBuf>, rw: &std::path::Path| {
            let mut l = launch();
            l.mounts = mounts;
            let (fs, _) = two(shares(&l, layers, Some(rw))).expect("shares");
            check_overlaps(&fs)
        };
        // A volume inside another, the same directory twice, a volume holding a layer or
        // the writable layer, a layer inside the writable layer.
        for (mounts, layers, rw_at) in [
            (
                vec![vol("/d", &data), vol("/s", &data.join("sub"))],
                vec![layer.clone()],
                rw.clone(),
            ),
            (
                vec![vol("/a", &data), vol("/b", &data)],
                vec![layer.clone()],
                rw.clone(),
            ),
            (vec![vol("/h", dir.path())], vec![layer.clone()], rw.clone()),
            (vec![], vec![rw.join("upper")], rw.clone()),
        ] {
            let err = refused(mounts, layers, &rw_at).expect_err("overlap");
            assert!(
                matches!(err, LaunchError::OverlappingShares { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("one contains the other"), "{err}");
        }
    }

    fn shares_of(
        l: &Launch,
        layer: &std::path::Path,
        rw: &std::path::Path,
    ) -> Result<(Vec<Share>, Vec<String>), LaunchError> {
        two(shares(l, vec![layer.to_path_buf()], Some(rw)))
    }

    fn two(m: Result<Mounts, LaunchError>) -> Result<(Vec<Share>, Vec<String>), LaunchError> {
        m.map(|m| (m.shares, m.words))
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
