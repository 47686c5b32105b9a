//! `msb-vmm`: boots the guest kernel with the agent, runs one command over vsock, prints its
//! output and exits with its exit code (stdin is forwarded to it); or, with
//! `--control-socket`, serves the host-agent protocol to the SDK until the guest powers off.
//! `msb-vmm --help` lists the options: they are the fields of
//! [`msb_protocol::vmmargs::VmmArgs`], the contract the SDK renders, parsed here with clap.
//!
//! With `--control-socket`, the VMM itself enforces the sandbox's limits, whether or not
//! the process that started it is still there (`--idle-timeout`, `--max-duration`, a
//! client's `Drain`), and rewrites `--metrics` every second. `--exit-record FILE` is written
//! at exit with how the VM ended (`clean` true for an orderly stop). The root filesystem
//! is an overlay of read-only layers under a writable layer, shared over virtio-fs.
//! Without `--kernel` it uses the kernel flavour for this host, building it first (with
//! progress on stderr) if it is missing.
//! Exit status: the command's (128 + N if killed by signal N); 125 when the VMM itself
//! fails (bad input, the guest crashed, ...), with the reason on stderr; 2 for bad usage.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser as _;
use msb_devices::system::ReadyGate;
use msb_devices::virtio::block::BlockMetrics;
use msb_devices::virtio::fs::FsMetrics;
use msb_devices::virtio::fs::ShareSource;
use msb_protocol::error_chain;
use msb_protocol::vmmargs::VmmArgs;
use msb_vmm::host::HostKind;
use msb_vmm::invocation::Invocation;
use msb_vmm::jail;
use msb_vmm::launch::{self, PrivateDir};
use msb_vmm::lifecycle::{self, ExitRecord};
use msb_vmm::monitor::{Monitor, MonitorSetup};
use msb_vmm::relay::{Relay, RelayConfig};
use msb_vmm::runner::{self, CommandEnd};
use msb_vmm::seccomp;
use msb_vmm::vm::{Vm, VmConfig, VmEnd, VmOutcome};

const VMM_FAILURE: u8 = 125;
const TAIL_IN_ERROR: usize = 20;

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
        "disks": o.disks.iter().map(|(serial, m)| (serial.clone(), serde_json::json!({
            "read_ops": BlockMetrics::get(&m.read_ops),
            "read_bytes": BlockMetrics::get(&m.read_bytes),
            "write_ops": BlockMetrics::get(&m.write_ops),
            "write_bytes": BlockMetrics::get(&m.write_bytes),
            "flushes": BlockMetrics::get(&m.flushes),
            "errors": BlockMetrics::get(&m.errors),
            "io_failures": BlockMetrics::get(&m.io_failures),
            "malformed_chains": BlockMetrics::get(&m.malformed_chains),
        }))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "net": o.net.as_ref().map(|n| {
            let d = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            serde_json::json!({
                "rx_frames": d(&n.device.rx_frames),
                "rx_bytes": d(&n.device.rx_bytes),
                "tx_frames": d(&n.device.tx_frames),
                "tx_bytes": d(&n.device.tx_bytes),
                "rx_dropped": d(&n.device.rx_dropped),
                "tx_dropped": d(&n.device.tx_dropped),
                "proxy": format!("{:?}", n.proxy.snapshot()),
            })
        }),
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
    use msb_protocol::terminal::escape_controls;
    record_exit(false, msg, VMM_FAILURE);
    // Both may carry the guest's words (an agent's message, console lines), and stderr may
    // be a terminal: escape sequences are shown, not obeyed.
    eprintln!("msb-vmm: error: {}", escape_controls(msg));
    if !tail.is_empty() {
        eprintln!("msb-vmm: last guest console lines:");
        for l in &tail[tail.len().saturating_sub(TAIL_IN_ERROR)..] {
            eprintln!("  | {}", escape_controls(l));
        }
    }
    ExitCode::from(VMM_FAILURE)
}

/// Ends the process when stdin reaches end of file (the parent holding the pipe is gone),
/// removing `sockets` and the private directory; unless a client detached the VM first.
fn watch_stdin(sockets: Vec<PathBuf>, private: Arc<PrivateDir>, relay: Option<Arc<Relay>>) {
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            msb_devices::threads::started("stdin-watch");
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
            private.remove();
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

/// Raises the open-file limit to what the guest can make the VMM hold (the shares' budget
/// and the proxy's connections; never beyond the hard limit) and returns the shares'
/// budget under the limit it got.
fn plan_fds(net_connections: usize) -> msb_devices::virtio::fs::FsLimits {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let want = launch::fd_limit_wanted(net_connections);
    let cur = lim.current.unwrap_or(u64::MAX);
    if cur < want {
        let raised = lim.maximum.map_or(want, |max| want.min(max));
        lim.current = Some(raised);
        if setrlimit(Resource::Nofile, lim).is_ok() {
            return launch::fs_limits_under(raised, net_connections);
        }
    }
    launch::fs_limits_under(cur, net_connections)
}

/// What the jail holds for this VM: its shares, kernel, KVM, and the directories of the
/// files it writes.
fn jail_plan(args: &Invocation, cfg: &VmConfig) -> jail::JailPlan {
    let mut plan = jail::JailPlan::default();
    if let msb_vmm::vm::BootSource::Kernel { kernel, initrd, .. } = &cfg.boot {
        plan.add(kernel, true);
        if let Some(i) = initrd {
            plan.add(i, true);
        }
    }
    plan.add(&cfg.kvm_path, false);
    for share in &cfg.fs {
        match &share.source {
            ShareSource::Dir { path, readonly } => plan.add(path, *readonly),
            ShareSource::Root { layers, rw, .. } => {
                for l in layers {
                    plan.add(l, true);
                }
                plan.add(rw, false);
            }
        }
    }
    let l = &args.launch;
    let written = [
        l.serial_log.clone(),
        l.vsock_path(),
        l.control_socket.clone(),
        l.exec_log.clone(),
        args.metrics.clone(),
        args.exit_record.clone(),
        args.report.clone(),
        args.lock.clone(),
    ];
    for f in written.iter().flatten() {
        plan.add_dir_of(f);
    }
    let resolv = std::path::Path::new("/etc/resolv.conf");
    if cfg.net.is_some() && resolv.exists() {
        plan.add(resolv, true);
    }
    plan
}

/// Where the proxy's secret violations go: the sandbox's log (unless the secret says only
/// block) and, for block-and-terminate, the VM's end. Filled in once the relay and the VM
/// exist; the proxy reports only after the guest runs.
#[derive(Default)]
struct Violations {
    relay: OnceLock<Option<Arc<Relay>>>,
    stopper: OnceLock<msb_vmm::vm::VmStopper>,
}

impl Violations {
    fn sink(self: &Arc<Self>) -> msb_net::tls::NetEvents {
        let me = self.clone();
        msb_net::tls::NetEvents(Arc::new(move |event| {
            let msb_net::tls::NetEvent::SecretViolation { action, .. } = event;
            use msb_protocol::network::tls::ViolationAction;
            if *action == ViolationAction::Block {
                return;
            }
            if let Some(Some(r)) = me.relay.get() {
                r.log_system(&event.to_string());
            }
            if *action == ViolationAction::BlockAndTerminate {
                if let Some(s) = me.stopper.get() {
                    s.stop(format!("{event}; the sandbox was stopped"));
                }
            }
        }))
    }
}

/// Prints what clap found wrong (or the help it was asked for) and the exit status.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::UnknownArgument => {
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => a.clone(),
                _ => String::new(),
            };
            eprintln!("msb-vmm: error: unknown option {arg}");
            eprintln!("(msb-vmm --help lists the options)");
            ExitCode::from(2)
        }
        _ => {
            let _ = e.print();
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    // One malloc arena for every thread: glibc reads /proc/sys/vm/overcommit_memory the
    // first time it shrinks a thread's own arena, a file open no thread's syscall filter
    // allows (the VMM's threads allocate little; they share the main arena's lock).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of the allocator, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // Bad usage exits 2; --help and --version exit 0.
    let parsed = match VmmArgs::try_parse() {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    let mut args = match Invocation::from_args(parsed) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("msb-vmm: error: {msg}");
            eprintln!("(msb-vmm --help lists the options)");
            return ExitCode::from(2);
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
    let private = Arc::new(PrivateDir::fill_in(&mut args.launch));
    let host = HostKind::detect();
    let cfg = match launch::resolve(&args.launch, host) {
        Ok(c) => c,
        Err(e) => return fail(&error_chain(&e), &[]),
    };
    let net_connections = args
        .launch
        .network
        .as_ref()
        .map_or(0, |n| n.max_connections);
    // Files the proxy's thread may not open later: the CA, the roots, the secrets.
    let net_tls =
        match msb_vmm::tls::load(args.launch.network.as_ref(), args.secrets_file.as_deref()) {
            Ok(t) => t,
            Err(e) => return fail(&error_chain(&e), &[]),
        };
    // Secret violations go to the sandbox's log; block-and-terminate also stops the VM.
    let violations = Arc::new(Violations::default());
    let cfg = VmConfig {
        ready_gate: Some(ReadyGate::new()),
        fs_limits: plan_fds(net_connections),
        net_events: net_tls.as_ref().map(|_| violations.sink()),
        net_tls,
        ..cfg
    };
    // Into the jail while this is the only thread: every thread made later is in it.
    if args.jail {
        if jail::can_jail() {
            let plan = jail_plan(&args, &cfg);
            match jail::enter(&plan) {
                Ok(j) => tracing::info!("jailed: {} bind mounts", j.binds.len()),
                Err(e) => return fail(&error_chain(&e), &[]),
            }
        } else {
            eprintln!(
                "msb-vmm: warning: not running as root: no jail (a mount namespace needs \
                 CAP_SYS_ADMIN); the guest's shares are still guarded by the device"
            );
        }
    }
    // No new privileges and only the capabilities the devices use, for every thread made
    // from here on; then each thread's syscall filter as it starts.
    if let Err(e) = seccomp::drop_privileges() {
        return fail(&error_chain(&e), &[]);
    }
    if args.seccomp {
        let violation = args
            .test_seccomp_violation
            .as_deref()
            .and_then(seccomp::ThreadKind::from_name);
        if let Err(e) = seccomp::install(violation) {
            return fail(&error_chain(&e), &[]);
        }
    } else {
        eprintln!("msb-vmm: warning: --seccomp off: the VMM's threads run without syscall filters");
    }
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
    let _ = violations.relay.set(relay.clone());
    let _ = violations.stopper.set(vm.stopper());
    if args.exit_with_stdin {
        let sockets = [args.launch.control_socket.clone(), args.launch.vsock_path()];
        watch_stdin(
            sockets.into_iter().flatten().collect(),
            private.clone(),
            relay.clone(),
        );
    }
    if let Some(r) = &relay {
        r.set_vcpu_control(Box::new(vm.stopper()));
        r.log_system("vm started");
    }
    let monitor = match &relay {
        Some(r) => {
            let setup = MonitorSetup {
                relay: r.clone(),
                stopper: vm.stopper(),
                limits: args.limits,
                metrics: args.metrics.clone(),
                mem: vm.guest_memory(),
                fs: vm.fs_metrics(),
                disks: vm.disk_metrics(),
                upper: cfg.fs.iter().find_map(|s| match &s.source {
                    ShareSource::Root { quota, .. } => quota.clone(),
                    ShareSource::Dir { .. } => None,
                }),
                net: vm.net_counters(),
                memory_limit: args.launch.memory_mib << 20,
                times: vm.boot_times(),
            };
            // Without it the limits cannot be kept: not a sandbox to leave running.
            match Monitor::spawn(setup) {
                Ok(m) => Some(m),
                Err(e) => return fail(&format!("cannot start the lifecycle monitor: {e}"), &[]),
            }
        }
        None => None,
    };
    let command = match (&args.command, args.launch.vsock_path()) {
        (Some(argv), Some(vsock)) => {
            match runner::spawn(vsock, argv.clone(), cfg.ready_gate.clone()) {
                Ok(rx) => Some(rx),
                Err(e) => return fail(&format!("cannot start the command runner: {e}"), &[]),
            }
        }
        _ => None,
    };
    // The main thread's own filter, before the first guest instruction.
    if let Err(e) = seccomp::apply(seccomp::ThreadKind::Main) {
        return fail(&error_chain(&e), &[]);
    }
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
    private.remove();
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
