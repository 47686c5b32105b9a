//! `msb-vmm`: boots the guest kernel with the agent, runs one command over vsock, prints its
//! output and exits with its exit code (stdin is forwarded to it).
//!
//! ```text
//! msb-vmm [--kernel K] [--initrd I] [--memory MiB] [--cpus N] [--kvm-path P]
//!         [--serial-log FILE] [--console] [--timeout SECS] [--hostname H]
//!         [--append WORD]... [--report FILE] [--vsock-socket PATH]
//!         [--control-socket PATH [--exec-log FILE]] [--exit-with-stdin]
//!         [--layer DIR]... [--rootfs DIR] [--rw DIR] [--volume GUEST HOST]...
//!         [--ro-volume GUEST HOST]... [--tmpfs GUEST MiB|-]... [--lock FILE]
//!         [--idle-timeout SECS] [--max-duration SECS] [--metrics FILE]
//!         [--exit-record FILE] [--log-level LEVEL] [--security default|restricted]
//!         [--init auto|PATH [--init-arg ARG]... [--init-env K=V]...] -- CMD ARGS...
//! ```
//! `--security restricted` runs every guest command with `no_new_privs` and without
//! `CAP_SYS_ADMIN`; `--init` hands PID 1 to an init of the image once the agent has set
//! the guest up (the agent carries on as its child).
//! With `--control-socket`, the VMM itself enforces the sandbox's limits, whether or not
//! the process that started it is still there: `--idle-timeout` (no command running and no
//! request for that long, counted from the agent's first answer) and `--max-duration`
//! (from the start) drain the sandbox and ask the guest to power off; a client's `Drain`
//! does the same once its commands end. `--metrics FILE` is rewritten every second with
//! a JSON snapshot (vCPU time and CPU%, resident guest memory, filesystem bytes);
//! `--exit-record FILE` is written at exit with how the VM ended (`clean` true for an
//! orderly stop). `--log-level` is the VMM's own log filter on stderr (default `warn`).
//! `--lock FILE` holds an exclusive `flock` on FILE for the VMM's life and refuses to start
//! when another process holds it (the SDK passes its sandbox's lock).
//! The root filesystem is an overlay of read-only layers (`--layer`, bottom first;
//! `--rootfs DIR` is one layer; default: the default root filesystem) under a writable
//! layer `--rw DIR` (a temporary directory, removed at exit, when not given), shared over
//! virtio-fs. `--volume`/`--ro-volume` share a host directory at a guest path (read-only
//! enforced by the device); `--tmpfs` mounts a tmpfs of that many MiB (`-`: the kernel's
//! default size).
//! With `--vsock-socket` and no command, the agent serves exec requests over vsock (host
//! clients connect to the socket and send `CONNECT 1024`) until one asks it to shut down.
//! `--control-socket` serves the same protocol to host clients through a relay that taps
//! every session's output into `--exec-log` (JSON lines); the vsock socket then defaults to
//! the control socket's path plus `.vsock`. `--exit-with-stdin` ends the VM when stdin
//! reaches end of file: a parent that holds the other end of a pipe ties the VM to its own
//! lifetime.
//! Without `--kernel`/`--initrd` it uses the kernel flavour for this host and the default
//! initramfs, building them first (with progress on stderr) if they are missing.
//! Exit status: the command's (128 + N if killed by signal N); 125 when the VMM itself
//! fails (bad input, the guest crashed, ...), with the reason on stderr.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use msb_devices::system::{BootTimes, ReadyGate};
use msb_devices::virtio::fs::FsMetrics;
use msb_protocol::bootcmd::InitSpec;
use msb_protocol::error_chain;
use msb_protocol::vmmfiles::BootStage;
use msb_vmm::host::HostKind;
use msb_vmm::launch::{self, BootMemory, Launch, MountSpec};
use msb_vmm::lifecycle::{self, Action, ExitRecord, Limits, MetricsSnapshot, Policy};
use msb_vmm::relay::{Relay, RelayConfig};
use msb_vmm::runner::{self, CommandEnd};
use msb_vmm::vm::{Vm, VmConfig, VmEnd, VmOutcome, VmStopper};

const VMM_FAILURE: u8 = 125;
const TAIL_IN_ERROR: usize = 20;

const USAGE: &str =
    "usage: msb-vmm [--kernel K] [--initrd I] [--memory MiB] [--boot-memory MiB|all] [--cpus N] \
[--kvm-path P] [--serial-log FILE] [--console] [--timeout SECS] [--hostname H] \
[--append WORD]... [--report FILE] [--vsock-socket PATH] \
[--control-socket PATH [--exec-log FILE]] [--exit-with-stdin] \
[--layer DIR]... [--rootfs DIR] [--rw DIR] [--volume GUEST HOST]... [--ro-volume GUEST HOST]... \
[--tmpfs GUEST MiB|-]... [--lock FILE] [--idle-timeout SECS] [--max-duration SECS] \
[--metrics FILE] [--exit-record FILE] [--log-level LEVEL] [--security default|restricted] \
[--init auto|PATH [--init-arg ARG]... [--init-env K=V]...] -- CMD ARGS...";

struct Args {
    launch: Launch,
    /// The command as UTF-8 (the protocol's strings), when one is given.
    command: Option<Vec<String>>,
    report: Option<PathBuf>,
    exit_with_stdin: bool,
    /// A file this VMM holds an exclusive `flock` on for its whole life.
    lock: Option<PathBuf>,
    limits: Limits,
    metrics: Option<PathBuf>,
    exit_record: Option<PathBuf>,
    log_level: Option<String>,
}

fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let mut launch = Launch::default();
    let mut report = None;
    let mut exit_with_stdin = false;
    let mut lock = None;
    let mut limits = Limits::default();
    let mut metrics = None;
    let mut exit_record = None;
    let mut log_level = None;
    while let Some(arg) = it.next() {
        let name = arg.to_string_lossy().into_owned();
        if name == "--" {
            launch.command = it.collect();
            break;
        }
        let mut value = |what: &str| it.next().ok_or_else(|| format!("{name} needs {what}"));
        let number = |v: OsString, what: &str| -> Result<u64, String> {
            v.to_string_lossy()
                .parse::<u64>()
                .map_err(|_| format!("{name} needs {what}, got {:?}", v))
        };
        match name.as_str() {
            "--kernel" => launch.kernel = Some(value("a path")?.into()),
            "--initrd" => launch.initrd = Some(value("a path")?.into()),
            "--memory" => launch.memory_mib = number(value("MiB")?, "a number of MiB")?,
            "--boot-memory" => {
                launch.boot_memory = match value("MiB or all")? {
                    v if v == "all" => BootMemory::All,
                    v => BootMemory::Mib(number(v, "a number of MiB or all")?),
                }
            }
            "--cpus" => {
                let n = number(value("a count")?, "a vCPU count")?;
                launch.cpus = u8::try_from(n).map_err(|_| format!("--cpus {n} is too many"))?;
            }
            "--kvm-path" => launch.kvm_path = value("a path")?.into(),
            "--serial-log" => launch.serial_log = Some(value("a path")?.into()),
            "--console" => launch.console = true,
            "--timeout" => {
                launch.timeout = Some(Duration::from_secs(number(value("seconds")?, "seconds")?))
            }
            "--hostname" => launch.hostname = value("a name")?.to_string_lossy().into_owned(),
            "--append" => launch
                .append
                .push(value("a word")?.to_string_lossy().into_owned()),
            "--report" => report = Some(value("a path")?.into()),
            "--vsock-socket" => launch.vsock_socket = Some(value("a path")?.into()),
            "--control-socket" => launch.control_socket = Some(value("a path")?.into()),
            "--exec-log" => launch.exec_log = Some(value("a path")?.into()),
            "--exit-with-stdin" => exit_with_stdin = true,
            "--lock" => lock = Some(PathBuf::from(value("a path")?)),
            "--idle-timeout" | "--max-duration" => {
                let secs = number(value("seconds")?, "seconds above 0")?;
                if secs == 0 {
                    return Err(format!("{name} needs seconds above 0"));
                }
                let d = Some(Duration::from_secs(secs));
                if name == "--idle-timeout" {
                    limits.idle_timeout = d;
                } else {
                    limits.max_duration = d;
                }
            }
            "--metrics" => metrics = Some(PathBuf::from(value("a path")?)),
            "--exit-record" => exit_record = Some(PathBuf::from(value("a path")?)),
            "--log-level" => log_level = Some(value("a level")?.to_string_lossy().into_owned()),
            "--security" => match value("a profile")?.to_string_lossy().as_ref() {
                "restricted" => launch.restricted = true,
                "default" => launch.restricted = false,
                other => {
                    return Err(format!(
                        "--security takes default or restricted, got {other:?}"
                    ))
                }
            },
            "--init" => {
                let v = value("auto or a guest path")?
                    .to_string_lossy()
                    .into_owned();
                let path = match v.as_str() {
                    "auto" => None,
                    p if p.starts_with('/') => Some(p.to_string()),
                    p => {
                        return Err(format!(
                            "--init takes auto or an absolute guest path, got {p:?}"
                        ))
                    }
                };
                let spec = launch.init.get_or_insert_with(|| InitSpec {
                    path: None,
                    args: Vec::new(),
                    env: Vec::new(),
                });
                spec.path = path;
            }
            "--init-arg" | "--init-env" => {
                let v = value("a value")?.to_string_lossy().into_owned();
                let spec = launch
                    .init
                    .as_mut()
                    .ok_or_else(|| format!("{name} needs --init before it"))?;
                if name == "--init-arg" {
                    spec.args.push(v);
                } else {
                    let (k, val) = v
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| format!("--init-env needs KEY=VALUE, got {v:?}"))?;
                    spec.env.push((k.to_string(), val.to_string()));
                }
            }
            "--layer" | "--rootfs" => launch.layers.push(value("a directory")?.into()),
            "--rw" => launch.rw = Some(value("a directory")?.into()),
            "--volume" | "--ro-volume" => {
                let guest = value("a guest path and a host directory")?;
                let host = value("a host directory after the guest path")?;
                launch.mounts.push(MountSpec::Dir {
                    guest: guest.to_string_lossy().into_owned(),
                    host: host.into(),
                    readonly: name == "--ro-volume",
                });
            }
            "--tmpfs" => {
                let guest = value("a guest path and a size")?;
                let size = value("a size in MiB (or -) after the guest path")?;
                let size_mib = match size.to_string_lossy().as_ref() {
                    "-" => None,
                    v => Some(v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("--tmpfs needs a size in MiB above 0 or -, got {v:?}")
                    })?),
                };
                launch.mounts.push(MountSpec::Tmpfs {
                    guest: guest.to_string_lossy().into_owned(),
                    size_mib,
                });
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown option {name}")),
        }
    }
    if launch.command.is_empty() && launch.vsock_path().is_none() {
        return Err(
            "no command given (put it after --, or give --control-socket or --vsock-socket to serve)"
                .into(),
        );
    }
    if launch.control_socket.is_some() && !launch.command.is_empty() {
        return Err("--control-socket serves exec requests: give no command".into());
    }
    if launch.exec_log.is_some() && launch.control_socket.is_none() {
        return Err("--exec-log needs --control-socket (the relay writes it)".into());
    }
    if (limits != Limits::default() || metrics.is_some()) && launch.control_socket.is_none() {
        return Err(
            "--idle-timeout, --max-duration and --metrics need --control-socket (a served sandbox)"
                .into(),
        );
    }
    let command = if launch.command.is_empty() {
        None
    } else {
        let argv: Result<Vec<String>, _> = launch
            .command
            .iter()
            .map(|a| a.clone().into_string())
            .collect();
        Some(argv.map_err(|a| format!("the command's arguments must be UTF-8: {a:?}"))?)
    };
    Ok(Args {
        launch,
        command,
        report,
        exit_with_stdin,
        lock,
        limits,
        metrics,
        exit_record,
        log_level,
    })
}

fn ms(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| {
        serde_json::json!(d.as_secs_f64() * 1000.0)
    })
}

fn write_report(path: &PathBuf, host: HostKind, o: &VmOutcome, total: Duration) {
    let report = serde_json::json!({
        "host_kind": host.describe(),
        "vcpu_start_ms": ms(Some(o.vcpu_start)),
        "first_instruction_ms": ms(o.times.first_instruction),
        "init_started_ms": ms(o.times.init_started),
        "root_mounted_ms": ms(o.times.root_mounted),
        "boot_ready_ms": ms(o.times.boot_ready),
        "guest_exit_ms": ms(o.times.exit),
        "vmm_total_ms": ms(Some(total)),
        "vmm_rss_kib": o.rss.map(|r| r.vmm_kib),
        "guest_rss_kib": o.rss.map(|r| r.guest_kib),
        "fs": o.fs.iter().map(|(tag, m)| (tag.clone(), serde_json::json!({
            "requests": FsMetrics::get(&m.requests),
            "read_bytes": FsMetrics::get(&m.read_bytes),
            "write_bytes": FsMetrics::get(&m.write_bytes),
            "errors": FsMetrics::get(&m.errors),
            "bad_requests": FsMetrics::get(&m.bad_requests),
        }))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "end": format!("{:?}", o.end),
    });
    // An explicit mode: the virtio-fs devices set this process's umask to 0.
    let written = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
        0o644,
    )
    .open(path)
    .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{report}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("msb-vmm: cannot write report {}: {e}", path.display());
    }
}

/// Where `--exit-record` goes (set once the arguments are parsed).
static EXIT_RECORD: OnceLock<PathBuf> = OnceLock::new();

/// Writes the exit record, if one was asked for.
fn record_exit(clean: bool, reason: &str, exit_code: u8) {
    if let Some(p) = EXIT_RECORD.get() {
        let rec = ExitRecord {
            clean,
            reason: reason.to_string(),
            exit_code,
            at_ms: lifecycle::epoch_ms(),
        };
        if let Err(e) = lifecycle::write_json_atomic(p, &rec) {
            eprintln!("msb-vmm: cannot write the exit record {}: {e}", p.display());
        }
    }
}

fn fail(msg: &str, tail: &[String]) -> ExitCode {
    record_exit(false, msg, VMM_FAILURE);
    eprintln!("msb-vmm: error: {msg}");
    if !tail.is_empty() {
        eprintln!("msb-vmm: last guest console lines:");
        for l in &tail[tail.len().saturating_sub(TAIL_IN_ERROR)..] {
            eprintln!("  | {l}");
        }
    }
    ExitCode::from(VMM_FAILURE)
}

/// A private directory, removed on drop, for what the caller did not give: the vsock
/// socket of a one-command VM (no client will look for it) and the writable layer of a VM
/// whose writes need not outlive it.
struct PrivateDir(Option<PathBuf>);

impl PrivateDir {
    fn fill_in(launch: &mut Launch) -> PrivateDir {
        let needs_socket = !launch.command.is_empty() && launch.vsock_path().is_none();
        if !needs_socket && launch.rw.is_some() {
            return PrivateDir(None);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("msb-vmm-{}-{nanos:x}", std::process::id()));
        if std::fs::create_dir(&dir).is_err() {
            // `resolve` then reports that no socket path or writable layer is set.
            return PrivateDir(None);
        }
        if needs_socket {
            launch.vsock_socket = Some(dir.join("v.sock"));
        }
        if launch.rw.is_none() {
            launch.rw = Some(dir.join("rw"));
        }
        PrivateDir(Some(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Ends the process when stdin reaches end of file (the parent holding the pipe is gone),
/// removing `sockets` and the private directory; unless a client detached the VM first.
fn watch_stdin(sockets: Vec<PathBuf>, private: Option<PathBuf>, relay: Option<Arc<Relay>>) {
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            if relay.as_ref().is_some_and(|r| r.is_detached()) {
                return;
            }
            eprintln!("msb-vmm: stdin closed (the owning process ended): stopping the VM");
            record_exit(true, "the owning process ended", VMM_FAILURE);
            for s in sockets {
                let _ = std::fs::remove_file(s);
            }
            if let Some(d) = private {
                let _ = std::fs::remove_dir_all(d);
            }
            std::process::exit(i32::from(VMM_FAILURE));
        });
    if let Err(e) = spawned {
        eprintln!("msb-vmm: warning: cannot watch stdin: {e}");
    }
}

/// Takes an exclusive `flock` on `path` (created if missing) without waiting.
fn lock_file(path: &PathBuf) -> Result<std::fs::File, String> {
    let f = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        0o600,
    )
    .open(path)
    .map_err(|e| format!("cannot open the lock {}: {e}", path.display()))?;
    // A reader probing the lock (the SDK, with a shared lock) holds it for an instant:
    // retry for a second before calling it held.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(f),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(format!(
                    "the sandbox is in use by another VMM (lock {} is held)",
                    path.display()
                ))
            }
            Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

/// What the lifecycle monitor works with.
struct MonitorSetup {
    relay: Arc<Relay>,
    stopper: VmStopper,
    limits: Limits,
    metrics: Option<PathBuf>,
    mem: vm_memory::GuestMemoryMmap,
    fs: Vec<(String, Arc<FsMetrics>)>,
    memory_limit: u64,
    times: Arc<Mutex<BootTimes>>,
}

/// A thread that enforces the limits and writes the metrics file while the VM runs.
struct Monitor {
    done: Sender<()>,
    thread: std::thread::JoinHandle<Option<String>>,
}

const MONITOR_TICK: Duration = Duration::from_millis(250);
const METRICS_EVERY: Duration = Duration::from_secs(1);
const POWER_OFF_CONNECT: Duration = Duration::from_secs(5);

impl Monitor {
    fn spawn(setup: MonitorSetup) -> Monitor {
        let (done, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lifecycle".into())
            .spawn(move || monitor(setup, rx));
        match thread {
            Ok(thread) => Monitor { done, thread },
            Err(e) => {
                // Without it the limits cannot be kept: not a sandbox to leave running.
                fail(&format!("cannot start the lifecycle monitor: {e}"), &[]);
                std::process::exit(i32::from(VMM_FAILURE));
            }
        }
    }

    /// Stops the thread; the reason the host stopped the VM, if it did.
    fn finish(self) -> Option<String> {
        let _ = self.done.send(());
        self.thread.join().ok().flatten()
    }
}

fn monitor(m: MonitorSetup, done: Receiver<()>) -> Option<String> {
    let started_ms = lifecycle::epoch_ms();
    let mut policy = Policy::new(m.limits, Instant::now());
    let mut last_cpu = (Instant::now(), lifecycle::vcpu_time_ns());
    let mut next_metrics = Instant::now();
    let mut powering_off = None;
    let mut stage = BootStage::Kernel;
    while let Err(RecvTimeoutError::Timeout) = done.recv_timeout(MONITOR_TICK) {
        let now = Instant::now();
        let activity = m.relay.activity();
        match policy.tick(now, activity, m.relay.agent_ready(), m.relay.is_draining()) {
            Action::Wait => {}
            Action::Drain(why) => {
                m.relay.drain();
                m.relay.log_system(&format!("draining: {why}"));
            }
            Action::PowerOff(why) => {
                m.relay.log_system(&format!("stopping: {why}"));
                if let Err(e) = m.relay.shutdown_guest(POWER_OFF_CONNECT) {
                    eprintln!("msb-vmm: cannot ask the guest to power off: {e}");
                }
                powering_off = Some(why);
            }
            Action::Stop(why) => {
                m.relay.log_system(&format!("stopping the VM: {why}"));
                m.stopper.stop(why);
            }
        }
        let now_stage = {
            let t = m.times.lock().unwrap_or_else(|p| p.into_inner());
            match (t.init_started, t.root_mounted, t.boot_ready) {
                (_, _, Some(_)) => BootStage::Ready,
                (_, Some(_), None) => BootStage::RootMounted,
                (Some(_), None, None) => BootStage::Agent,
                (None, None, None) => BootStage::Kernel,
            }
        };
        // A new stage is written at once (the CLI shows it while it waits).
        let moved_on = std::mem::replace(&mut stage, now_stage) != now_stage;
        if let Some(path) = m
            .metrics
            .as_ref()
            .filter(|_| now >= next_metrics || moved_on)
        {
            next_metrics = now + METRICS_EVERY;
            let cpu = lifecycle::vcpu_time_ns();
            let wall = now.saturating_duration_since(last_cpu.0).as_nanos() as f64;
            let cpu_percent = if wall > 0.0 {
                cpu.saturating_sub(last_cpu.1) as f64 * 100.0 / wall
            } else {
                0.0
            };
            last_cpu = (now, cpu);
            let (guest_kib, vmm_kib) = msb_vmm::memory::own_rss_split_kib(&m.mem).unwrap_or((0, 0));
            let sum = |f: fn(&FsMetrics) -> u64| m.fs.iter().map(|(_, x)| f(x)).sum::<u64>();
            let snap = MetricsSnapshot {
                timestamp_ms: lifecycle::epoch_ms(),
                started_at_ms: started_ms,
                cpu_percent,
                vcpu_time_ns: cpu,
                guest_rss_bytes: guest_kib << 10,
                vmm_rss_bytes: vmm_kib << 10,
                memory_limit_bytes: m.memory_limit,
                disk_read_bytes: sum(|x| FsMetrics::get(&x.read_bytes)),
                disk_write_bytes: sum(|x| FsMetrics::get(&x.write_bytes)),
                net_rx_bytes: 0,
                net_tx_bytes: 0,
                sessions: activity.sessions as u64,
                draining: m.relay.is_draining(),
                boot_stage: stage,
            };
            if let Err(e) = lifecycle::write_json_atomic(path, &snap) {
                eprintln!("msb-vmm: cannot write metrics {}: {e}", path.display());
            }
        }
    }
    if let Some(p) = &m.metrics {
        let _ = std::fs::remove_file(p);
    }
    powering_off.or_else(|| policy.drain_reason().map(str::to_string))
}

/// The virtio-fs devices keep a descriptor per guest-visible inode: allow as many as the
/// hard limit does.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own; setrlimit only reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let mut args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("msb-vmm: error: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(if msg.is_empty() { 0 } else { 2 });
        }
    };
    let filter = match &args.log_level {
        Some(level) => match tracing_subscriber::EnvFilter::try_new(level) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("msb-vmm: error: --log-level {level:?}: {e}");
                return ExitCode::from(2);
            }
        },
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();
    // Held until the process ends: a second VMM for the same sandbox (and a remove) sees it.
    let _lock = match &args.lock {
        Some(p) => match lock_file(p) {
            Ok(f) => Some(f),
            Err(e) => return fail(&e, &[]),
        },
        None => None,
    };
    // Only the VMM that holds the sandbox's lock speaks for how it ended.
    if let Some(p) = &args.exit_record {
        let _ = std::fs::remove_file(p);
        let _ = EXIT_RECORD.set(p.clone());
    }
    let private = PrivateDir::fill_in(&mut args.launch);
    let host = HostKind::detect();
    let cfg = match launch::resolve(&args.launch, host) {
        Ok(c) => c,
        Err(e) => return fail(&error_chain(&e), &[]),
    };
    let cfg = VmConfig {
        ready_gate: Some(ReadyGate::new()),
        ..cfg
    };
    let relay = match (&args.launch.control_socket, args.launch.vsock_path()) {
        (Some(control), Some(vsock)) => {
            let mut rc = RelayConfig::new(control.clone(), vsock, args.launch.exec_log.clone());
            rc.ready = cfg.ready_gate.clone();
            match Relay::start(rc) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => return fail(&error_chain(&e), &[]),
            }
        }
        _ => None,
    };
    // After the relay: a control socket in use by another VMM is refused before this VM's
    // device could touch the vsock socket beside it.
    let vm = match Vm::build(&cfg, start) {
        Ok(vm) => vm,
        Err(e) => return fail(&error_chain(&e), &[]),
    };
    if args.exit_with_stdin {
        let sockets = [args.launch.control_socket.clone(), args.launch.vsock_path()];
        watch_stdin(
            sockets.into_iter().flatten().collect(),
            private.0.clone(),
            relay.clone(),
        );
    }
    if let Some(r) = &relay {
        r.log_system("vm started");
    }
    let monitor = relay.as_ref().map(|r| {
        Monitor::spawn(MonitorSetup {
            relay: r.clone(),
            stopper: vm.stopper(),
            limits: args.limits,
            metrics: args.metrics.clone(),
            mem: vm.guest_memory(),
            fs: vm.fs_metrics(),
            memory_limit: args.launch.memory_mib << 20,
            times: vm.boot_times(),
        })
    });
    let command = match (&args.command, args.launch.vsock_path()) {
        (Some(argv), Some(vsock)) => {
            match runner::spawn(vsock, argv.clone(), cfg.ready_gate.clone()) {
                Ok(rx) => Some(rx),
                Err(e) => return fail(&format!("cannot start the command runner: {e}"), &[]),
            }
        }
        _ => None,
    };
    let outcome = match vm.run(args.launch.timeout) {
        Ok(o) => o,
        Err(e) => return fail(&error_chain(&e), &[]),
    };
    // Why the host stopped it, when it did (idle, max duration, a drain).
    let stopped_for = monitor.and_then(Monitor::finish);
    if let Some(r) = relay {
        r.log_system(&format!("vm ended: {:?}", outcome.end));
    }
    if let Some(p) = &args.report {
        write_report(p, host, &outcome, start.elapsed());
    }
    drop(private);
    let tail = &outcome.console_tail;
    match outcome.end {
        // The runner asks for the power-off once the command has ended.
        VmEnd::Exited(_) if command.is_some() => match command.and_then(|rx| rx.try_recv().ok()) {
            Some(end) => match (end.shell_code(), end) {
                (Some(code), CommandEnd::Refused { message, .. }) => {
                    eprintln!("msb-vmm: {message}");
                    ExitCode::from(code as u8)
                }
                (Some(code), _) => ExitCode::from(code as u8),
                (None, CommandEnd::Refused { kind, message }) => fail(
                    &format!("the agent refused the command ({kind:?}): {message}"),
                    tail,
                ),
                (None, other) => fail(&format!("the command was lost: {other:?}"), tail),
            },
            None => fail("the guest powered off before the command ended", tail),
        },
        VmEnd::Exited(status) => {
            let code = status.shell_code() as u8;
            let clean = code == 0;
            let reason = match (&stopped_for, clean) {
                (Some(why), true) => format!("stopped: {why}"),
                (_, true) => "the guest powered off".to_string(),
                (_, false) => format!("the guest ended with status {code}"),
            };
            record_exit(clean, &reason, code);
            ExitCode::from(code)
        }
        VmEnd::StoppedByHost(why) => {
            record_exit(true, &format!("stopped: {why}"), 0);
            ExitCode::SUCCESS
        }
        VmEnd::KernelPanic => fail("the guest kernel panicked", tail),
        VmEnd::Reset(why) => fail(
            &format!("the guest reset ({why}) before reporting an exit status"),
            tail,
        ),
        VmEnd::Shutdown => fail(
            "the guest powered off before reporting an exit status",
            tail,
        ),
        VmEnd::BadExitValue(v) => fail(
            &format!("the guest wrote an invalid exit value {v:#x}"),
            tail,
        ),
        VmEnd::Failed(why) => fail(&format!("the VM failed: {why}"), tail),
        VmEnd::TimedOut(t) => fail(
            &format!(
                "the VM did not finish within {}s and was stopped",
                t.as_secs()
            ),
            tail,
        ),
    }
}
