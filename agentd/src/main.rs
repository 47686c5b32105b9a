//! `agentd`: the microsandbox guest agent, PID 1 inside the VM.
//!
//! This first cut mounts the kernel filesystems, sets the hostname, runs the one command the
//! VMM passed on the kernel command line (`msb.cmd=`, see `msb_protocol::bootcmd`), streams
//! its stdout and stderr to the VMM over the second serial port (framed, see
//! `msb_protocol::output`), reaps every child, and reports the command's exit status to the
//! VMM's system device, which ends the VM. The vsock protocol replaces the command line and
//! the serial port in a later step.
#![deny(unsafe_code)]

mod reaper;
mod server;
#[allow(unsafe_code)]
mod sys;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use msb_protocol::bootcmd;
use msb_protocol::output::{encode, Stream};
use msb_protocol::sysdev::ExitStatus;
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

const OUTPUT_TTY: &str = "/dev/ttyS1";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/.msb/scripts";
/// glibc tunables that keep user space off AVX and AVX-512 (see [`avoid_extended_state`]).
const NO_AVX_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

pub(crate) fn log(msg: &str) {
    // PID 1's stderr is /dev/console, which the VMM writes to its serial log.
    let _ = writeln!(std::io::stderr().lock(), "msb-agentd: {msg}");
}

/// With `noxsave` the kernel saves only the x87/SSE state of a process on a context switch.
/// Where user-mode CPUID is not virtualised (the PVM host runs guest user code on the
/// hardware, with the host's XCR0), glibc still sees AVX and AVX-512 and uses them in
/// memcpy and friends, and their upper register halves leak between processes: memory
/// copies go wrong and processes crash. So on such a kernel every process of ours runs
/// with glibc told not to use those extensions: the agent re-executes itself with the
/// tunables, and passes them to what it runs.
fn avoid_extended_state(cmdline: &str) -> Option<&'static str> {
    cmdline
        .split_ascii_whitespace()
        .any(|w| w == "noxsave")
        .then_some(NO_AVX_TUNABLES)
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => {}
        Err(e) => log(&format!("cannot mount {fstype} on {target}: {e}")),
    }
}

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

/// The serial port the command's output is framed onto, in raw mode (8-bit clean, no
/// newline translation).
fn open_output() -> std::io::Result<File> {
    let tty = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(OUTPUT_TTY)?;
    let mut t = nix::sys::termios::tcgetattr(&tty)?;
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&tty, nix::sys::termios::SetArg::TCSANOW, &t)?;
    Ok(tty)
}

fn send(out: &Mutex<File>, stream: Stream, data: &[u8]) {
    let mut frame = Vec::with_capacity(data.len() + 8);
    encode(stream, data, &mut frame);
    let mut f = out.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = f.write_all(&frame) {
        log(&format!("cannot write output: {e}"));
    }
}

/// Runs `argv`, streaming its output to `out`, reaping every child until it ends.
fn run_command(argv: Vec<Vec<u8>>, tunables: Option<&str>, out: Arc<Mutex<File>>) -> ExitStatus {
    let mut args = argv.into_iter().map(OsString::from_vec);
    let Some(program) = args.next() else {
        return ExitStatus::Code(127);
    };
    let mut cmd = Command::new(&program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .env("TERM", "linux");
    if let Some(t) = tunables {
        cmd.env("GLIBC_TUNABLES", t);
    }
    let spawned = cmd
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let (code, why) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found".to_string()),
                std::io::ErrorKind::PermissionDenied => (126, "permission denied".to_string()),
                _ => (126, e.to_string()),
            };
            let msg = format!("msb: {}: {why}\n", program.to_string_lossy());
            send(&out, Stream::Stderr, msg.as_bytes());
            return ExitStatus::Code(code);
        }
    };

    let (done_tx, done_rx) = mpsc::channel();
    let pipes: Vec<(Box<dyn Read + Send>, Stream)> = [
        child
            .stdout
            .take()
            .map(|p| (Box::new(p) as Box<dyn Read + Send>, Stream::Stdout)),
        child
            .stderr
            .take()
            .map(|p| (Box::new(p) as Box<dyn Read + Send>, Stream::Stderr)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let readers = pipes.len();
    for (mut pipe, stream) in pipes {
        let out = out.clone();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => send(&out, stream, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    }

    let pid = Pid::from_raw(child.id() as i32);
    let status = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => break ExitStatus::Code(code as u8),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => break ExitStatus::Signal(sig as u8),
            Ok(_) | Err(Errno::EINTR) => {} // another child reaped, as PID 1 must
            Err(e) => {
                log(&format!("waitpid failed: {e}"));
                break ExitStatus::Code(125);
            }
        }
    };
    for _ in 0..readers {
        if done_rx.recv_timeout(server::DRAIN_GRACE).is_err() {
            log("output still open after the command exited; not waiting longer");
            break;
        }
    }
    status
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("msb-agentd runs as PID 1 inside a microsandbox VM");
        std::process::exit(2);
    }
    // The re-executed agent (below) finds the filesystems mounted already.
    if std::env::var("GLIBC_TUNABLES").as_deref() != Ok(NO_AVX_TUNABLES) {
        mount_kernel_filesystems();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let tunables = avoid_extended_state(&cmdline);
    if let Some(t) = tunables {
        if std::env::var("GLIBC_TUNABLES").as_deref() != Ok(t) {
            // Only returns on failure; then carry on as we are.
            let e = Command::new("/proc/self/exe")
                .env("GLIBC_TUNABLES", t)
                .exec();
            log(&format!("cannot re-execute with glibc tunables: {e}"));
        }
    }
    let hostname = bootcmd::find_param(&cmdline, bootcmd::HOSTNAME_KEY).unwrap_or("msb");
    if let Err(e) = nix::unistd::sethostname(hostname) {
        log(&format!("cannot set hostname: {e}"));
    }

    let sysdev = SYSDEV.get_or_init(|| {
        sys::SystemDevice::open()
            .map_err(|e| log(&format!("system device unavailable: {e}")))
            .ok()
    });
    if let Some(d) = sysdev {
        d.boot_ready();
    }

    let status = match bootcmd::find_param(&cmdline, bootcmd::CMD_KEY).map(bootcmd::decode) {
        Some(Ok(argv)) => match open_output() {
            Ok(tty) => run_command(argv, tunables, Arc::new(Mutex::new(tty))),
            Err(e) => {
                log(&format!("cannot open {OUTPUT_TTY}: {e}"));
                ExitStatus::Code(125)
            }
        },
        Some(Err(e)) => {
            log(&format!("bad command on the kernel command line: {e}"));
            ExitStatus::Code(125)
        }
        // No one-shot command: serve exec requests over vsock until told to shut down.
        None => {
            let env: &'static server::Env = Box::leak(Box::new(server::Env {
                path: PATH,
                tunables,
            }));
            match server::serve(env) {
                Ok(()) => ExitStatus::Code(0),
                Err(e) => {
                    log(&format!("cannot serve on vsock: {e}"));
                    ExitStatus::Code(125)
                }
            }
        }
    };
    shutdown(status);
}

static SYSDEV: std::sync::OnceLock<Option<sys::SystemDevice>> = std::sync::OnceLock::new();

/// Ends the VM reporting `status`. PID 1 never returns from here.
pub(crate) fn shutdown(status: ExitStatus) -> ! {
    nix::unistd::sync();
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
