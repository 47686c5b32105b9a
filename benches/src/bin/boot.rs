//! Boot benchmark: N runs of `msb-vmm -- echo ready`, reporting the time from process start
//! to the guest's first instruction (the kernel's start), to the agent's start ("init
//! started") and its root being mounted, to ready, to the command's output on the host, to
//! the guest's exit and to process exit, and the VMM's own RSS outside guest memory.
//!
//! Two msb-vmm configurations: the default (the agent directory as the kernel's virtiofs
//! root, boot memory for this host) and the peer's setup (`--initrd` with the default
//! initramfs, all memory at boot). The peer, when Debian's `qemu-system-x86_64` is
//! installed: QEMU's `microvm` machine on KVM, same kernel, same initramfs, same memory,
//! same command line, timed from its start to the agent's start line on the console, which
//! is the moment msb-vmm reports as "init started"; its RSS outside guest memory beside
//! ours. (Firecracker is not installed on these machines: no figures for it.)
//!
//! `cargo run --release -p msb-benches --bin boot -- [--runs N] [--memory MiB]`

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msb_benches::{ms, row};
use msb_e2e::{artifacts, host_kind, qemu_to_agent_start, QEMU};
use msb_vmm::arch::x86_64::cpuid::CpuProfile;
use msb_vmm::host::HostKind;
use msb_vmm::launch::{kernel_cmdline, Launch};
use msb_vmm::memory::rss_split_kib;

const READY: &[u8] = b"ready\n";

struct Args {
    runs: usize,
    memory_mib: u64,
}

fn parse() -> Args {
    let mut a = Args {
        runs: 3,
        memory_mib: 512,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok());
        match (k.as_str(), v) {
            ("--runs", Some(n)) if n > 0 => a.runs = n as usize,
            ("--memory", Some(m)) if m > 0 => a.memory_mib = m,
            _ => {
                eprintln!("usage: boot [--runs N] [--memory MiB]");
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

impl Ours {
    fn print(&self, title: &str) {
        println!("{title} (times from process start):");
        println!(
            "{}",
            row("first instruction (kernel start)", &self.first_insn, "ms")
        );
        println!("{}", row("init started (agent)", &self.init_started, "ms"));
        println!("{}", row("root mounted", &self.root_mounted, "ms"));
        println!("{}", row("agent ready", &self.boot_ready, "ms"));
        println!("{}", row("command output on host", &self.output, "ms"));
        println!(
            "{}",
            row("guest exit (exit device)", &self.guest_exit, "ms")
        );
        println!("{}", row("process exit", &self.process_exit, "ms"));
        println!(
            "{}",
            row("VMM RSS outside guest memory", &self.rss_kib, "KiB")
        );
    }
}

fn run_ours(args: &Args, extra: &[&str], initrd: bool, out: &mut Ours) {
    let a = artifacts();
    let report = std::env::temp_dir().join(format!("msb-boot-bench-{}.json", std::process::id()));
    let start = Instant::now();
    let mut cmd = Command::new(&a.msb_vmm);
    cmd.arg("--kernel")
        .arg(&a.kernel)
        .args(["--memory", &args.memory_mib.to_string(), "--timeout", "600"])
        .args(extra);
    if initrd {
        cmd.arg("--initrd").arg(&a.initrd);
    }
    let mut child = cmd
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

fn main() {
    let args = parse();
    let a = artifacts();
    let host = HostKind::detect();
    println!(
        "boot benchmark: host kind {}; {} runs; {} MiB; 1 vCPU",
        host_kind(),
        args.runs,
        args.memory_mib
    );
    let configs: [(&str, &[&str], bool); 3] = [
        (
            "msb-vmm, default (agent directory as the virtiofs root, boot memory for this host, network on)",
            &[],
            false,
        ),
        (
            "msb-vmm --no-net (the default without a network device)",
            &["--no-net"],
            false,
        ),
        (
            "msb-vmm --initrd (the default initramfs) --boot-memory all --no-net: QEMU's setup",
            &["--boot-memory", "all", "--no-net"],
            true,
        ),
    ];
    for (title, extra, initrd) in configs {
        let mut ours = Ours::default();
        for i in 0..args.runs {
            eprintln!("boot: {title}: run {}/{}", i + 1, args.runs);
            run_ours(&args, extra, initrd, &mut ours);
        }
        ours.print(title);
    }

    if !Path::new(QEMU).exists() {
        println!("QEMU microvm: not installed (apt-get install qemu-system-x86); no peer figures");
        return;
    }
    // The command line msb-vmm gives a guest booting that initramfs on this host.
    let launch = Launch {
        initrd: Some(a.initrd.clone()),
        memory_mib: args.memory_mib,
        command: vec!["echo".into(), "ready".into()],
        ..Launch::default()
    };
    let cmdline = kernel_cmdline(&launch, CpuProfile::for_host(host)).expect("command line");
    let (mut to_agent, mut rss) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        eprintln!("boot: QEMU run {}/{}", i + 1, args.runs);
        match qemu_to_agent_start(
            &a.kernel,
            &a.initrd,
            &cmdline,
            "kvm",
            args.memory_mib,
            Duration::from_secs(600),
        ) {
            Ok(b) => {
                to_agent.push(ms(b.to_agent));
                let (_, other) = rss_split_kib(&b.smaps, |lo, hi| hi - lo == args.memory_mib << 20);
                rss.push(other as f64);
            }
            Err(e) => eprintln!("boot: QEMU run failed: {e}"),
        }
    }
    println!("QEMU microvm on KVM, same kernel, initramfs, memory and command line:");
    println!(
        "{}",
        row("init started (agent's console line)", &to_agent, "ms")
    );
    println!("{}", row("QEMU RSS outside guest memory", &rss, "KiB"));
}
