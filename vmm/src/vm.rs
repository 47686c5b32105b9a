//! Building and running a VM: the one function that turns a plain-data [`VmConfig`] into a
//! live VM, in a fixed order, and the loop that waits for it to end.
//!
//! Order (see `docs/design.md`): validate the config; open the hypervisor; create the VM
//! (interrupt controllers, timer); map guest memory; load the kernel, initrd and boot data
//! (or a raw code blob for tests); create the devices and put them on the buses; create and
//! configure the vCPUs; start the vCPU threads; wait for the first ending event; stop the
//! vCPUs.
//!
//! Nothing here is specific to an architecture or a hypervisor: the architecture is reached
//! through the [`crate::arch`] facade and the hypervisor through [`hypervisor::open`].

use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_devices::legacy::{ResetHandler, Serial, I8042};
use msb_devices::system::{BootTimes, ReadyGate, SystemDevice, SystemEvent, SystemEventSink};
use msb_devices::virtio::block::{
    mmio_transport as block_transport, BlockError, BlockMetrics, OpenedDisk,
};
use msb_devices::virtio::fs::{
    mmio_transport as fs_transport, Budget, FsError, FsLimits, FsMetrics, Share,
};
use msb_devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use msb_devices::virtio::net::{
    mmio_transport as net_transport, NetConfig as NetDeviceConfig, NetError as NetDeviceError,
    NetMetrics,
};
use msb_devices::virtio::vsock::{Vsock, VsockConfig, VsockError};
use msb_net::{NetError, NetStats, Proxy, ProxyConfig, GUEST_MAC};
use msb_protocol::network::NetworkConfig;
use msb_protocol::sysdev::{ExitStatus, SYSDEV_BASE, SYSDEV_SIZE};
use vm_memory::GuestMemoryMmap;

use crate::arch::{self, BootError, CpuProfile, KernelBoot, VcpuSetup, VirtioMmioSlot};
use crate::bus::{BusError, Buses, SharedDevice};
use crate::console::{ConsoleLog, ConsoleWriter};
use crate::hypervisor::{
    self, ExitHandler, Hypervisor, HypervisorError, HypervisorVcpu, HypervisorVm, VcpuRun,
};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, VcpuCommand, VcpuEnd, VcpuError, VcpuHandle};

/// How a test guest's raw code starts (the architecture's modes).
pub use crate::arch::CodeMode;

/// The vsock device's virtio-mmio window and interrupt: the first window.
const VSOCK_SLOT: VirtioMmioSlot = VirtioMmioSlot {
    base: arch::VIRTIO_MMIO_BASE,
    size: MMIO_SIZE,
    irq: arch::VSOCK_IRQ,
};
/// Most virtio-fs devices (root and volumes) one VM can have (one fewer with a network
/// device, which takes the window after the last of them).
pub const MAX_FS_DEVICES: usize = (arch::LAST_IRQ - arch::FIRST_FS_IRQ + 1) as usize;
/// After a kernel panic line, how long to wait for the guest to reset on its own.
const PANIC_GRACE: Duration = Duration::from_secs(2);

/// What the VM boots.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A Linux kernel.
    Kernel {
        /// vmlinux (PVH) or bzImage.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// Raw machine code loaded at `addr` (tiny test guests, no Linux).
    Code {
        /// Load and start address.
        addr: u64,
        /// The code.
        code: Vec<u8>,
        /// CPU mode at start.
        mode: CodeMode,
    },
}

/// A disk the VM gets: its serial and the image, opened (and locked) before the jail. The
/// device takes the image when the VM is built; the locks go with it.
#[derive(Clone)]
pub struct DiskDevice {
    /// The serial the guest finds it by.
    pub serial: String,
    disk: Arc<Mutex<Option<OpenedDisk>>>,
}

impl DiskDevice {
    /// A disk with `serial` over the opened image.
    pub fn new(serial: String, disk: OpenedDisk) -> Self {
        DiskDevice {
            serial,
            disk: Arc::new(Mutex::new(Some(disk))),
        }
    }

    fn take(&self) -> Option<OpenedDisk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for DiskDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskDevice")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// Plain-data description of a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The KVM device node (the KVM backend's setting, see [`hypervisor::open`]).
    pub kvm_path: PathBuf,
    /// What to boot.
    pub boot: BootSource,
    /// CPUID filtering profile.
    pub cpu_profile: CpuProfile,
    /// File receiving the kernel console.
    pub serial_log: Option<PathBuf>,
    /// Copy the kernel console to stderr.
    pub console_echo: bool,
    /// A virtio-vsock device with this host socket and guest CID.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices, one per tag (the root first, then volumes).
    pub fs: Vec<Share>,
    /// What the guest may make all of them hold at once (host descriptors).
    pub fs_limits: FsLimits,
    /// virtio-blk devices (the root disk first, then disk volumes), opened before the jail.
    pub disks: Vec<DiskDevice>,
    /// A virtio-net device and the proxy behind it (`None`: no network device).
    pub net: Option<NetworkConfig>,
    /// The proxy's TLS interception and secrets (loaded before the jail).
    pub net_tls: Option<Arc<msb_net::tls::Interception>>,
    /// Where the proxy reports secret violations.
    pub net_events: Option<msb_net::tls::NetEvents>,
    /// Opened when the agent reports ready (for those who wait to talk to it).
    pub ready_gate: Option<ReadyGate>,
    /// RAM above this guest-physical address is held back from the boot e820 map in whole
    /// 128 MiB blocks, which the agent adds later ([`arch::split_ram`]); `None`: all RAM
    /// at boot.
    pub boot_ram_limit: Option<u64>,
}

/// Invalid configuration values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Zero memory.
    #[error("memory must be at least 1 MiB, got 0")]
    MemoryZero,
    /// More memory than the host has.
    #[error("memory of {requested_mib} MiB is more than the host's {host_mib} MiB")]
    MemoryTooLarge {
        /// Requested MiB.
        requested_mib: u64,
        /// Host MiB.
        host_mib: u64,
    },
    /// Zero vCPUs.
    #[error("cpus must be at least 1, got 0")]
    VcpusZero,
    /// More vCPUs than the hypervisor allows.
    #[error("{requested} vCPUs requested; this host allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// Allowed.
        max: usize,
    },
    /// More virtio-fs devices than interrupt lines.
    #[error(
        "{requested} shared directories and disks (root and volumes); at most {max} fit with these devices"
    )]
    TooManyShares {
        /// Requested.
        requested: usize,
        /// Allowed.
        max: usize,
    },
    /// Test code does not fit where it should go.
    #[error("test code at {addr:#x} does not fit its CPU mode or guest memory")]
    CodePlacement {
        /// Requested address.
        addr: u64,
    },
}

/// Failures building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host's memory size could not be read.
    #[error("cannot read the host's memory size")]
    HostMemory(#[source] std::io::Error),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// vCPU threads could not be started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// A virtio-fs device could not be created.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A virtio-blk device could not be made.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A disk's image was already given to another VM built from the same config.
    #[error("the disk {0} was already used by a VM built from this configuration")]
    DiskTaken(String),
    /// The network proxy could not start (a published port could not be bound, ...).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The network device could not be created.
    #[error("cannot create the network device")]
    NetDevice(#[from] NetDeviceError),
    /// The serial log could not be created.
    #[error("cannot create serial log {path}")]
    SerialLog {
        /// The log path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reported its command's status and ended the VM.
    Exited(ExitStatus),
    /// The guest reset (i8042, triple fault) without reporting a status.
    Reset(&'static str),
    /// The guest powered off without reporting a status.
    Shutdown,
    /// The guest wrote an exit value the agent never writes.
    BadExitValue(u32),
    /// The guest kernel panicked.
    KernelPanic,
    /// The hypervisor could not run the guest.
    Failed(String),
    /// The VM ran past its time limit and was stopped.
    TimedOut(Duration),
    /// The host stopped the VM through a [`VmStopper`] (the reason it gave).
    StoppedByHost(String),
}

/// Stops, pauses and resumes a running VM from another thread (the guest did not power
/// off in time; a client asked for a pause).
#[derive(Clone)]
pub struct VmStopper(Arc<EventSink>);

impl std::fmt::Debug for VmStopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmStopper")
    }
}

impl VmStopper {
    /// Ends [`Vm::run`] with [`VmEnd::StoppedByHost`] (a no-op once it has ended).
    pub fn stop(&self, reason: impl Into<String>) {
        self.0.send(VmEvent::Stop(reason.into()));
    }

    /// Parks every vCPU (they wait, using no CPU, with their registers kept) and returns
    /// once all are parked; an error when the VM has ended or a vCPU did not stop within
    /// [`VCPU_PAUSE_WAIT`].
    pub fn pause(&self) -> Result<(), String> {
        self.vcpus(VcpuCommand::Pause)
    }

    /// Runs the vCPUs again after [`VmStopper::pause`].
    pub fn resume(&self) -> Result<(), String> {
        self.vcpus(VcpuCommand::Resume)
    }

    fn vcpus(&self, cmd: VcpuCommand) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.0.send(VmEvent::Vcpus(cmd, tx));
        // The run loop answers at once or after VCPU_PAUSE_WAIT; more is a VM that ended.
        match rx.recv_timeout(VCPU_PAUSE_WAIT * 2) {
            Ok(r) => r,
            Err(_) => Err("the VM is not running".into()),
        }
    }
}

/// How long a pause or resume waits for the vCPUs to get there.
pub const VCPU_PAUSE_WAIT: Duration = Duration::from_secs(2);

/// Memory of the VMM process at the end of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssReport {
    /// Resident guest memory, KiB.
    pub guest_kib: u64,
    /// Resident memory outside guest memory (the VMM's own), KiB.
    pub vmm_kib: u64,
}

/// Everything known when the VM has ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// How it ended.
    pub end: VmEnd,
    /// Boot-timer readings.
    pub times: BootTimes,
    /// First-KVM_RUN time relative to the VMM start (the earliest the guest could run).
    pub vcpu_start: Duration,
    /// The last console lines.
    pub console_tail: Vec<String>,
    /// Memory report.
    pub rss: Option<RssReport>,
    /// I/O accesses no device claimed (PIO, MMIO).
    pub unhandled_io: (u64, u64),
    /// Counters of each virtio-fs device, by tag.
    pub fs: Vec<(String, Arc<FsMetrics>)>,
    /// Counters of each virtio-blk device, by serial.
    pub disks: Vec<(String, Arc<BlockMetrics>)>,
    /// Counters of the network device and its proxy.
    pub net: Option<NetCounters>,
}

/// Counters of the network: the virtio-net device's (frames and bytes each way) and the
/// proxy's (connections, DNS, drops).
#[derive(Debug, Clone)]
pub struct NetCounters {
    /// The device's.
    pub device: Arc<NetMetrics>,
    /// The proxy's.
    pub proxy: Arc<NetStats>,
}

enum VmEvent {
    System(SystemEvent),
    Reset(&'static str),
    Vcpu(u8, VcpuEnd),
    KernelPanic,
    Stop(String),
    /// Pause or resume every vCPU; the answer says whether all got there.
    Vcpus(VcpuCommand, Sender<Result<(), String>>),
}

struct EventSink(Mutex<Sender<VmEvent>>);

impl EventSink {
    fn send(&self, e: VmEvent) {
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).send(e);
    }
}

struct SystemSink(Arc<EventSink>);
impl SystemEventSink for SystemSink {
    fn event(&self, event: SystemEvent, _: Duration) {
        self.0.send(VmEvent::System(event));
    }
}

struct ResetSink(Arc<EventSink>);
impl ResetHandler for ResetSink {
    fn reset(&self) {
        self.0.send(VmEvent::Reset("i8042 reset"));
    }
}

/// A built VM, ready to run.
pub struct Vm {
    start: Instant,
    // Field order is drop order: vCPUs go before the VM and its memory.
    vcpus: Vec<(Box<dyn HypervisorVcpu>, VcpuSetup)>,
    buses: Arc<Buses>,
    events_tx: Arc<EventSink>,
    events: Receiver<VmEvent>,
    console: Arc<Mutex<ConsoleLog>>,
    times: Arc<Mutex<BootTimes>>,
    fs_metrics: Vec<(String, Arc<FsMetrics>)>,
    disk_metrics: Vec<(String, Arc<BlockMetrics>)>,
    net: Option<NetCounters>,
    _vm: Box<dyn HypervisorVm>,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .field("buses", &self.buses.pio)
            .finish_non_exhaustive()
    }
}

/// The check that needs the hypervisor (after [`validate_basic`]): its vCPU limit.
fn validate_vcpu_limit(cfg: &VmConfig, hv: &dyn Hypervisor) -> Result<(), VmmError> {
    let max = hv.max_vcpus().min(254);
    if usize::from(cfg.vcpus) > max {
        return Err(ConfigError::TooManyVcpus {
            requested: cfg.vcpus,
            max,
        }
        .into());
    }
    Ok(())
}

/// Checks the parts of a config that need no hypervisor (memory and vCPU counts against
/// zero and the host's memory), so callers can fail before any other work.
pub fn validate_basic(cfg: &VmConfig) -> Result<(), VmmError> {
    if cfg.memory_mib == 0 {
        return Err(ConfigError::MemoryZero.into());
    }
    if cfg.vcpus == 0 {
        return Err(ConfigError::VcpusZero.into());
    }
    let max_fs = MAX_FS_DEVICES - usize::from(cfg.net.is_some());
    if cfg.fs.len() + cfg.disks.len() > max_fs {
        return Err(ConfigError::TooManyShares {
            requested: cfg.fs.len() + cfg.disks.len(),
            max: max_fs,
        }
        .into());
    }
    let host_mib = crate::host::host_memory_bytes().map_err(VmmError::HostMemory)? >> 20;
    if cfg.memory_mib > host_mib {
        return Err(ConfigError::MemoryTooLarge {
            requested_mib: cfg.memory_mib,
            host_mib,
        }
        .into());
    }
    Ok(())
}

impl Vm {
    /// Builds the VM described by `cfg`; times are measured from `start` (the VMM process
    /// start).
    pub fn build(cfg: &VmConfig, start: Instant) -> Result<Vm, VmmError> {
        validate_basic(cfg)?;
        let hv = hypervisor::open(hypervisor::HypervisorSettings {
            kvm_path: &cfg.kvm_path,
        })?;
        validate_vcpu_limit(cfg, &*hv)?;
        // Before the guest exists: a published port that cannot be bound fails the start.
        let proxy = cfg
            .net
            .as_ref()
            .map(|n| {
                Proxy::new(ProxyConfig {
                    tls: cfg.net_tls.clone(),
                    events: cfg.net_events.clone(),
                    ..ProxyConfig::new(n.clone())
                })
            })
            .transpose()?;
        let vm = hv.create_vm()?;

        let mem = memory::create(cfg.memory_mib << 20)?;
        memory::register(&*vm, &mem)?;

        let bsp_start = match &cfg.boot {
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                // The guest is told about its virtio-mmio devices (no ACPI, no PCI); how is
                // the architecture's business.
                let mut virtio = Vec::with_capacity(cfg.fs.len() + 1);
                if cfg.vsock.is_some() {
                    virtio.push(VSOCK_SLOT);
                }
                virtio.extend((0..cfg.fs.len()).map(fs_slot));
                if cfg.net.is_some() {
                    virtio.push(fs_slot(cfg.fs.len()));
                }
                virtio.extend((0..cfg.disks.len()).map(|j| disk_slot(cfg, j)));
                let (ram, _) = arch::split_ram(cfg.memory_mib << 20, cfg.boot_ram_limit);
                arch::load_kernel(
                    &mem,
                    &KernelBoot {
                        kernel,
                        initrd: initrd.as_deref(),
                        cmdline,
                        vcpus: cfg.vcpus,
                        ram: &ram,
                    },
                    &virtio,
                )?
            }
            BootSource::Code { addr, code, mode } => arch::load_code(&mem, *addr, code, *mode)
                .map_err(|e| ConfigError::CodePlacement { addr: e.addr })?,
        };

        let (tx, events) = channel();
        let events_tx = Arc::new(EventSink(Mutex::new(tx)));

        // Devices.
        let log_file = match &cfg.serial_log {
            Some(p) => Some(
                File::create(p)
                    .map(|f| crate::console::ConsoleFile::new(f, p))
                    .map_err(|source| VmmError::SerialLog {
                        path: p.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        let console = Arc::new(Mutex::new(ConsoleLog::new(log_file, cfg.console_echo)));
        let panic_sink = events_tx.clone();
        let console_uart: SharedDevice = Arc::new(Mutex::new(Serial::new(
            vm.interrupt_line(arch::CONSOLE_IRQ)?,
            ConsoleWriter::new(
                console.clone(),
                Box::new(move || panic_sink.send(VmEvent::KernelPanic)),
            ),
        )));
        let mut buses = Buses::default();
        buses.insert(arch::CONSOLE_UART, console_uart)?;
        if let Some(ports) = arch::I8042_PORTS {
            let i8042: SharedDevice = Arc::new(Mutex::new(I8042::new(Box::new(ResetSink(
                events_tx.clone(),
            )))));
            buses.insert(ports, i8042)?;
        }
        let mut sysdev = SystemDevice::new(start, Box::new(SystemSink(events_tx.clone())));
        if let Some(gate) = &cfg.ready_gate {
            sysdev = sysdev.with_ready_gate(gate.clone());
        }
        let times = sysdev.times();
        let sysdev: SharedDevice = Arc::new(Mutex::new(sysdev));

        buses.mmio.insert(SYSDEV_BASE, SYSDEV_SIZE, sysdev)?;
        if let Some(vcfg) = &cfg.vsock {
            let transport: SharedDevice = Arc::new(Mutex::new(MmioTransport::new(
                Vsock::new(vcfg.clone())?,
                mem.clone(),
                vm.interrupt_line(VSOCK_SLOT.irq)?,
            )));
            buses
                .mmio
                .insert(VSOCK_SLOT.base, VSOCK_SLOT.size, transport)?;
        }
        let mut fs_metrics = Vec::with_capacity(cfg.fs.len());
        let budget = Budget::of(cfg.fs_limits);
        for (i, share) in cfg.fs.iter().enumerate() {
            let slot = fs_slot(i);
            let line = vm.interrupt_line(slot.irq)?;
            let (transport, metrics) = fs_transport(share, mem.clone(), line, &budget)?;
            fs_metrics.push((share.tag.clone(), metrics));
            buses.mmio.insert(slot.base, slot.size, transport)?;
        }
        let mut net = None;
        if let (Some(proxy), Some(ncfg)) = (proxy, &cfg.net) {
            let slot = fs_slot(cfg.fs.len());
            let stats = proxy.stats();
            let dev = NetDeviceConfig {
                mac: GUEST_MAC,
                mtu: ncfg.mtu,
            };
            let (transport, metrics) = net_transport(
                dev,
                crate::net::ProxyBackend(proxy),
                mem.clone(),
                vm.interrupt_line(slot.irq)?,
            )?;
            buses.mmio.insert(slot.base, slot.size, transport)?;
            net = Some(NetCounters {
                device: metrics,
                proxy: stats,
            });
        }
        let mut disk_metrics = Vec::with_capacity(cfg.disks.len());
        for (j, d) in cfg.disks.iter().enumerate() {
            let slot = disk_slot(cfg, j);
            let disk = d
                .take()
                .ok_or_else(|| VmmError::DiskTaken(d.serial.clone()))?;
            let (transport, metrics) =
                block_transport(disk, &d.serial, mem.clone(), vm.interrupt_line(slot.irq)?)?;
            disk_metrics.push((d.serial.clone(), metrics));
            buses.mmio.insert(slot.base, slot.size, transport)?;
        }
        let buses = Arc::new(buses);

        // vCPUs.
        let setups = arch::vcpu_setups(&*hv, cfg.cpu_profile, cfg.vcpus, bsp_start)?;
        let mut vcpus = Vec::with_capacity(setups.len());
        for setup in setups {
            let vcpu = vm.create_vcpu(setup.id)?;
            vcpu.configure(&setup)?;
            vcpus.push((vcpu, setup));
        }

        Ok(Vm {
            start,
            vcpus,
            buses,
            events_tx,
            events,
            console,
            times,
            fs_metrics,
            disk_metrics,
            net,
            _vm: vm,
            mem,
        })
    }

    /// A handle that ends [`Vm::run`] from another thread.
    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.events_tx.clone())
    }

    /// The times the system device records (live while the VM runs).
    pub fn boot_times(&self) -> Arc<Mutex<BootTimes>> {
        self.times.clone()
    }

    /// Counters of the network (live while the VM runs).
    pub fn net_counters(&self) -> Option<NetCounters> {
        self.net.clone()
    }

    /// Counters of each virtio-fs device, by tag (live while the VM runs).
    pub fn fs_metrics(&self) -> Vec<(String, Arc<FsMetrics>)> {
        self.fs_metrics.clone()
    }

    /// Counters of each virtio-blk device, by serial (live while the VM runs).
    pub fn disk_metrics(&self) -> Vec<(String, Arc<BlockMetrics>)> {
        self.disk_metrics.clone()
    }

    /// The guest memory (a cheap clone that keeps the mapping alive), for accounting its
    /// resident size while the VM runs ([`memory::own_rss_split_kib`]).
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    /// Runs the VM until the guest ends it, it fails, or `timeout` passes.
    pub fn run(mut self, timeout: Option<Duration>) -> Result<VmOutcome, VmmError> {
        let vcpu_start = self.start.elapsed();
        let mut handles: Vec<VcpuHandle> = Vec::new();
        for (vcpu, setup) in self.vcpus.drain(..) {
            let sink = self.events_tx.clone();
            let exits: Arc<dyn ExitHandler + Send> = self.buses.clone();
            handles.push(vcpu::spawn(
                setup.id,
                vcpu,
                exits,
                Box::new(move |id, end| sink.send(VmEvent::Vcpu(id, end))),
            )?);
        }

        let deadline = timeout.map(|t| Instant::now() + t);
        let mut panic_deadline: Option<Instant> = None;
        let end = loop {
            let now = Instant::now();
            let wait_until = match (deadline, panic_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let event = match wait_until {
                Some(t) => self.events.recv_timeout(t.saturating_duration_since(now)),
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok(VmEvent::System(SystemEvent::Exit(status))) => break VmEnd::Exited(status),
                Ok(VmEvent::System(SystemEvent::BadExit(v))) => break VmEnd::BadExitValue(v),
                Ok(VmEvent::System(
                    SystemEvent::FirstInstruction | SystemEvent::Phase(_) | SystemEvent::BootReady,
                )) => {}
                // After a panic line the kernel's own reset is how the panic ends.
                Ok(VmEvent::Reset(_)) if panic_deadline.is_some() => break VmEnd::KernelPanic,
                Ok(VmEvent::Reset(src)) => break VmEnd::Reset(src),
                Ok(VmEvent::Stop(why)) => break VmEnd::StoppedByHost(why),
                Ok(VmEvent::Vcpus(cmd, reply)) => {
                    let _ = reply.send(command_vcpus(&handles, cmd));
                }
                Ok(VmEvent::KernelPanic) => {
                    panic_deadline.get_or_insert(Instant::now() + PANIC_GRACE);
                }
                Ok(VmEvent::Vcpu(id, end)) => {
                    let panicked = panic_deadline.is_some();
                    break match end {
                        _ if panicked => VmEnd::KernelPanic,
                        VcpuEnd::Stopped(VcpuRun::Reset(src)) => VmEnd::Reset(src),
                        VcpuEnd::Stopped(VcpuRun::Shutdown) => VmEnd::Shutdown,
                        VcpuEnd::Stopped(VcpuRun::Halted) => {
                            VmEnd::Failed(format!("vCPU {id} halted with no way to wake up"))
                        }
                        VcpuEnd::Stopped(other) => VmEnd::Failed(format!("vCPU {id}: {other:?}")),
                        VcpuEnd::Error(e) => VmEnd::Failed(format!("vCPU {id}: {e}")),
                    };
                }
                Err(RecvTimeoutError::Timeout) => {
                    if panic_deadline.is_some_and(|t| Instant::now() >= t) {
                        break VmEnd::KernelPanic;
                    }
                    if let Some(t) = timeout {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break VmEnd::TimedOut(t);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break VmEnd::Failed("all vCPU threads ended".into())
                }
            }
        };

        // Measure before tearing down: this is the steady-state footprint.
        let rss = memory::own_rss_split_kib(&self.mem)
            .ok()
            .map(|(guest_kib, vmm_kib)| RssReport { guest_kib, vmm_kib });
        drop(handles);
        let console_tail = {
            let mut c = self.console.lock().unwrap_or_else(|p| p.into_inner());
            c.finish();
            c.tail()
        };
        let times = *self.times.lock().unwrap_or_else(|p| p.into_inner());
        Ok(VmOutcome {
            end,
            times,
            vcpu_start,
            console_tail,
            rss,
            unhandled_io: (self.buses.pio.unhandled(), self.buses.mmio.unhandled()),
            fs: self.fs_metrics.clone(),
            disks: self.disk_metrics.clone(),
            net: self.net.clone(),
        })
    }
}

/// Sends `cmd` (pause or resume) to every vCPU and waits for each to get there.
fn command_vcpus(handles: &[VcpuHandle], cmd: VcpuCommand) -> Result<(), String> {
    // One deadline for all: every vCPU is told first, then each is waited for.
    for h in handles {
        h.send(cmd);
    }
    let deadline = Instant::now() + VCPU_PAUSE_WAIT;
    for h in handles {
        let now = h.wait_kicking(cmd, deadline);
        if now != cmd.target() {
            return Err(format!("vCPU {} is {now:?} after a {cmd:?}", h.id()));
        }
    }
    Ok(())
}

/// The virtio-mmio window and interrupt of the `j`-th disk: after the virtio-fs devices
/// and the network device.
fn disk_slot(cfg: &VmConfig, j: usize) -> VirtioMmioSlot {
    fs_slot(cfg.fs.len() + usize::from(cfg.net.is_some()) + j)
}

/// The virtio-mmio window and interrupt of the `i`-th virtio-fs device.
fn fs_slot(i: usize) -> VirtioMmioSlot {
    VirtioMmioSlot {
        base: VSOCK_SLOT.base + (i as u64 + 1) * MMIO_SIZE,
        size: MMIO_SIZE,
        irq: arch::FIRST_FS_IRQ + i as u32,
    }
}
