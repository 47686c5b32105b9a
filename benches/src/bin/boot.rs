//! Boot benchmark: N runs of `msb-vmm -- echo ready`, reporting the time from process start
//! to the guest's first instruction, to the agent's boot-timer write, to the command's
//! output on the host, to the guest's exit and to process exit, and the VMM's own RSS
//! outside guest memory. When Debian's `qemu-system-x86_64` is installed, the same kernel
//! and initramfs are booted by QEMU's `microvm` machine in the same run: its time to the
//! command's output and its RSS outside guest memory are printed beside ours.
//!
//! `cargo run --release -p msb-benches --bin boot -- [--runs N] [--memory MiB]`

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msb_benches::{ms, row};
use msb_e2e::{artifacts, host_is_pvm, host_kind};
use msb_vmm::arch::x86_64::cpuid::CpuProfile;
use msb_vmm::host::HostKind;
use msb_vmm::launch::{kernel_cmdline, Launch};
use msb_vmm::memory::rss_split_kib;

const READY: &[u8] = b"ready\n";

struct Args {
    runs: usize,
    memory_mib: u64,
    /// `msb-vmm --boot-memory` (MiB or `all`); default: the VMM's choice for this host.
    boot_memory: String,
}

fn parse() -> Args {
    let mut a = Args {
        runs: 3,
        memory_mib: 512,
        boot_memory: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let raw = it.next();
        let v = raw.as_deref().and_then(|v| v.parse().ok());
        match (k.as_str(), v) {
            ("--runs", Some(n)) if n > 0 => a.runs = n as usize,
            ("--memory", Some(m)) if m > 0 => a.memory_mib = m,
            ("--boot-memory", _) if raw.is_some() => a.boot_memory = raw.unwrap_or_default(),
            _ => {
                eprintln!("usage: boot [--runs N] [--memory MiB] [--boot-memory MiB|all]");
                std::process::exit(2);
            }
        }
    }
    a
}

/// Reads `child`'s stdout until `READY` arrives; returns when it did.
fn wait_for_output(stdout: &mut impl Read, start: Instant) -> Option<Duration> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(READY.len()).any(|w| w == READY) {
                    return Some(start.elapsed());
                }
            }
        }
    }
}

#[derive(Default)]
struct Ours {
    first_insn: Vec<f64>,
    init_started: Vec<f64>,
    root_mounted: Vec<f64>,
    boot_ready: Vec<f64>,
    output: Vec<f64>,
    guest_exit: Vec<f64>,
    process_exit: Vec<f64>,
    rss_kib: Vec<f64>,
}

fn run_ours(args: &Args, out: &mut Ours) {
    let a = artifacts();
    let report = std::env::temp_dir().join(format!("msb-boot-bench-{}.json", std::process::id()));
    let start = Instant::now();
    let mut child = Command::new(&a.msb_vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .args(["--memory", &args.memory_mib.to_string(), "--timeout", "600"])
        .args(if args.boot_memory.is_empty() {
            vec![]
        } else {
            vec!["--boot-memory", &args.boot_memory]
        })
        .arg("--report")
        .arg(&report)
        .args(["--", "echo", "ready"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("msb-vmm starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let output = wait_for_output(&mut stdout, start);
    let status = child.wait().expect("msb-vmm ends");
    let total = start.elapsed();
    let r: serde_json::Value = std::fs::read_to_string(&report)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    if !status.success() || output.is_none() {
        eprintln!("boot: msb-vmm run failed ({status}); report: {r}");
        return;
    }
    let push = |v: &mut Vec<f64>, key: &str| {
        if let Some(x) = r[key].as_f64() {
            v.push(x);
        }
    };
    push(&mut out.first_insn, "first_instruction_ms");
    push(&mut out.init_started, "init_started_ms");
    push(&mut out.root_mounted, "root_mounted_ms");
    push(&mut out.boot_ready, "boot_ready_ms");
    push(&mut out.guest_exit, "guest_exit_ms");
    push(&mut out.rss_kib, "vmm_rss_kib");
    out.output.extend(output.map(ms));
    out.process_exit.push(ms(total));
}

/// RSS of `pid` outside its mapping of exactly `guest_bytes` (QEMU's guest RAM), KiB.
fn rss_outside_guest(pid: u32, guest_bytes: u64) -> Option<f64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (_, other) = rss_split_kib(&smaps, |a, b| b - a == guest_bytes);
    Some(other as f64)
}

/// The same kernel command line `msb-vmm` gives the guest for `echo ready`.
fn qemu_cmdline() -> String {
    let launch = Launch {
        command: vec!["echo".into(), "ready".into()],
        ..Launch::default()
    };
    kernel_cmdline(&launch, CpuProfile::for_host(HostKind::detect())).expect("a valid command line")
}

fn run_qemu(args: &Args, qemu: &Path, output: &mut Vec<f64>, rss: &mut Vec<f64>) {
    let a = artifacts();
    let cpu = if host_is_pvm() {
        "host,-arch-capabilities"
    } else {
        "host"
    };
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-enable-kvm",
            "-cpu",
            cpu,
        ])
        .args(["-m", &args.memory_mib.to_string(), "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "null"])
        .args([
            "-chardev",
            "stdio,id=out",
            "-device",
            "isa-serial,chardev=out,iobase=0x2f8,irq=3",
        ])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .args(["-append", &qemu_cmdline()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu starts");
    let mut stdout = child.stdout.take().expect("stdout");
    let seen = wait_for_output(&mut stdout, start);
    if let Some(r) = rss_outside_guest(child.id(), args.memory_mib << 20) {
        rss.push(r);
    }
    // Our agent ends the VM through our system device, which QEMU does not have: stop it.
    let _ = child.kill();
    let _ = child.wait();
    match seen {
        Some(d) => output.push(ms(d)),
        None => eprintln!("boot: QEMU run did not produce the command's output"),
    }
}

fn main() {
    let args = parse();
    let _ = artifacts();
    println!(
        "boot benchmark: host kind {}; {} runs; {} MiB (boot memory: {}); 1 vCPU",
        host_kind(),
        args.runs,
        args.memory_mib,
        if args.boot_memory.is_empty() {
            "the VMM's default for this host"
        } else {
            &args.boot_memory
        }
    );
    let mut ours = Ours::default();
    for i in 0..args.runs {
        eprintln!("boot: msb-vmm run {}/{}", i + 1, args.runs);
        run_ours(&args, &mut ours);
    }
    println!("msb-vmm (times from process start, ms):");
    println!(
        "{}",
        row("first instruction (kernel start)", &ours.first_insn, "ms")
    );
    println!("{}", row("init started (agent)", &ours.init_started, "ms"));
    println!("{}", row("root mounted", &ours.root_mounted, "ms"));
    println!(
        "{}",
        row("agent ready (boot timer)", &ours.boot_ready, "ms")
    );
    println!("{}", row("command output on host", &ours.output, "ms"));
    println!(
        "{}",
        row("guest exit (exit device)", &ours.guest_exit, "ms")
    );
    println!("{}", row("process exit", &ours.process_exit, "ms"));
    println!(
        "{}",
        row("VMM RSS outside guest memory", &ours.rss_kib, "KiB")
    );

    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        println!("QEMU microvm: not installed (apt-get install qemu-system-x86); no peer figures");
        return;
    }
    let (mut out, mut rss) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        eprintln!("boot: QEMU run {}/{}", i + 1, args.runs);
        run_qemu(&args, qemu, &mut out, &mut rss);
    }
    println!("QEMU microvm, same kernel and initramfs (times from process start, ms):");
    println!("{}", row("command output on host", &out, "ms"));
    println!("{}", row("QEMU RSS outside guest memory", &rss, "KiB"));
}
