//! `agentd`: the microsandbox guest agent, PID 1 inside the VM.
//!
//! It mounts the kernel filesystems, switches to the root filesystem the VMM shares over
//! virtio-fs (an overlay of image layers and a writable layer, `rootfs`), mounts the
//! volumes, sets the hostname, tells the VMM's system device it is ready, and serves the host-agent protocol on vsock port 1024 (`server`): commands with
//! streamed output, stdin, signals, timeouts and PTYs, reaping every child as PID 1
//! (`reaper`), and filesystem requests (`fs`). A `Shutdown` request ends the VM through the system device.
#![deny(unsafe_code)]

mod exec;
mod fs;
mod init;
mod memory;
mod net;
mod pool;
mod reaper;
mod reply;
mod rootfs;
mod server;
mod sessions;
#[allow(unsafe_code)]
mod spawn;
#[allow(unsafe_code)]
mod sys;
mod tls;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use msb_protocol::bootcmd;
use msb_protocol::sysdev::{BootPhase, ExitStatus};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// Exit status when the guest cannot set itself up (root filesystem, volumes).
pub(crate) const BOOT_FAILURE: u8 = 125;
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.msb/scripts";

pub(crate) fn log(msg: &str) {
    // PID 1's stderr is /dev/console, which the VMM writes to its serial log.
    let _ = writeln!(std::io::stderr().lock(), "msb-agentd: {msg}");
}

/// With `noxsave` the kernel saves only the x87/SSE state of a process on a context switch.
/// Where user-mode CPUID is not virtualised (the PVM host runs guest user code on the
/// hardware, with the host's XCR0), glibc still sees AVX and AVX-512 and uses them in
/// memcpy and friends, and their upper register halves leak between processes: memory
/// copies go wrong and processes crash. So on such a kernel every process of ours runs
/// with glibc told not to use those extensions: our VMM starts the agent with the tunables
/// in its environment (from the kernel command line; under another VMM the agent
/// re-executes itself with them), and the agent passes them to what it runs.
fn avoid_extended_state(cmdline: &str) -> Option<&'static str> {
    cmdline
        .split_ascii_whitespace()
        .any(|w| w == "noxsave")
        .then_some(bootcmd::NO_AVX_TUNABLES)
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => {}
        Err(e) => log(&format!("cannot mount {fstype} on {target}: {e}")),
    }
}

/// What the agent needs before it switches root (the root move carries them along).
fn mount_kernel_filesystems() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
}

/// The rest, in the final root.
fn mount_runtime_filesystems() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620"),
    );
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None);
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("msb-agentd runs as PID 1 inside a microsandbox VM");
        std::process::exit(2);
    }
    // One console line, so any VMM (and QEMU in the boot benchmark and the TCG boot test)
    // can see the agent start; keep it in step with `msb_e2e::AGENT_START_LINE`.
    log(&format!("starting ({})", env!("CARGO_PKG_VERSION")));
    sys::keep_freed_memory();
    // Mounted already (EBUSY) when this is a re-executed agent (below).
    mount_kernel_filesystems();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let tunables = avoid_extended_state(&cmdline);
    if let Some(t) = tunables {
        if std::env::var(bootcmd::TUNABLES_ENV).as_deref() != Ok(t) {
            // Only returns on failure; then carry on as we are.
            let e = Command::new("/proc/self/exe")
                .env(bootcmd::TUNABLES_ENV, t)
                .exec();
            log(&format!("cannot re-execute with glibc tunables: {e}"));
        }
    }
    // The system device first, so a failure below can still end the VM with a status.
    let sysdev = SYSDEV.get_or_init(|| {
        sys::SystemDevice::open()
            .map_err(|e| log(&format!("system device unavailable: {e}")))
            .ok()
    });
    if let Some(d) = sysdev {
        d.phase(BootPhase::InitStarted);
    }
    if let Err(e) = rootfs::switch_root(&cmdline) {
        log(&format!("cannot switch to the root filesystem: {e}"));
        shutdown(ExitStatus::Code(BOOT_FAILURE));
    }
    mount_runtime_filesystems();
    if let Err(e) = rootfs::mount_volumes(&cmdline) {
        log(&format!("cannot mount a volume: {e}"));
        shutdown(ExitStatus::Code(BOOT_FAILURE));
    }
    if let Some(d) = sysdev {
        d.phase(BootPhase::RootMounted);
    }
    let hostname = bootcmd::find_param(&cmdline, bootcmd::HOSTNAME_KEY).unwrap_or("msb");
    if let Err(e) = nix::unistd::sethostname(hostname) {
        log(&format!("cannot set hostname: {e}"));
    }
    if let Err(e) = net::setup(&cmdline) {
        log(&format!("network: {e}"));
    }
    let bundle = std::path::Path::new(msb_protocol::network::tls::GUEST_BUNDLE_PATH);
    let extra = match tls::install(std::path::Path::new("/"), bundle) {
        Ok(true) => tls::ca_env(),
        Ok(false) => Vec::new(),
        Err(e) => {
            log(&format!(
                "cannot add the TLS interception CA to the guest's trust: {e}"
            ));
            Vec::new()
        }
    };

    // The image's own init as PID 1, the agent as its child (before any thread starts).
    match bootcmd::InitSpec::from_cmdline(&cmdline) {
        Ok(None) => {}
        Ok(Some(spec)) => {
            if let Err(e) = init::hand_off(&spec, PATH) {
                log(&format!("cannot hand PID 1 to the init: {e}"));
                shutdown(ExitStatus::Code(BOOT_FAILURE));
            }
        }
        Err(e) => {
            log(&e);
            shutdown(ExitStatus::Code(BOOT_FAILURE));
        }
    }

    // Serve exec requests over vsock until a client asks for the VM to shut down; ready is
    // reported once the socket listens (the VMM connects only then).
    let restricted =
        bootcmd::find_param(&cmdline, bootcmd::SECURITY_KEY) == Some(bootcmd::SECURITY_RESTRICTED);
    let env: &'static exec::Env = Box::leak(Box::new(exec::Env {
        path: PATH,
        tunables,
        restricted,
        extra,
    }));
    let ready = || {
        if let Some(d) = sysdev {
            d.boot_ready();
        }
        memory::start(&cmdline);
    };
    let status = match server::serve(env, ready) {
        Ok(()) => ExitStatus::Code(0),
        Err(e) => {
            log(&format!("cannot serve on vsock: {e}"));
            ExitStatus::Code(125)
        }
    };
    shutdown(status);
}

static SYSDEV: std::sync::OnceLock<Option<sys::SystemDevice>> = std::sync::OnceLock::new();

/// Ends the VM reporting `status`. PID 1 never returns from here.
pub(crate) fn shutdown(status: ExitStatus) -> ! {
    nix::unistd::sync();
    rootfs::settle_disks();
    match SYSDEV.get().and_then(Option::as_ref) {
        Some(d) => d.exit(status),
        None => log(&format!(
            "ending with {status:?}; no system device to report to"
        )),
    }
    // Without our VMM (another VMM, or the write was lost), fall back to a reboot, which a
    // VMM run with "no reboot" treats as the end.
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
