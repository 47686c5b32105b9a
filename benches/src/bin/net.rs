//! A real guest downloading from the host: `tests/guest/netprobe.c` (built static with the
//! host's gcc) runs `netprobe get GATEWAY PORT /blob` against an HTTP server this
//! benchmark runs on 127.0.0.1, hashes the body and prints its SHA-256, its length and the
//! milliseconds from connect to end of file; the hash is checked against the body's.
//! Before it, a 16-byte `/warm` fetch: a fresh guest's first TCP connection costs its
//! kernel ~10 s of one-time work on PVM hosts (under QEMU too: same kernel), which is no
//! part of a transfer, so it is timed on its own. Nothing is sent anywhere but 127.0.0.1.
//!
//! - Ours: `msb-vmm --net public,host` (virtio-net, the msb-net proxy, MTU 65520), the
//!   probe shared read-only with `--ro-volume /probe DIR`, fetching from the gateway
//!   10.200.200.1, which the proxy dials as 127.0.0.1. `--dns 127.0.0.1:1`: the guest
//!   resolves nothing, and no query could leave the machine if it did.
//! - Peer: QEMU's `microvm` machine on KVM with the same kernel and memory, an initramfs
//!   built here (busybox from the default root filesystem, the probe, and an `/init`
//!   script that brings eth0 up as 10.0.2.15/24, fetches from 10.0.2.2, which slirp maps
//!   to the host's 127.0.0.1, prints the result on the console and powers off), the
//!   kernel command line `msb-vmm` would give that initramfs (`kernel_cmdline`), and
//!   slirp (`-netdev user`, MTU 1500: slirp offers no offloads). passt when Debian's
//!   `passt` is installed (QEMU 7.2 has `-netdev stream`), else it says so.
//!
//! Figures per configuration (median, min, max over the runs): MB/s from the guest's own
//! elapsed time (netprobe), MB/s from the host's side (the server, from accepting the
//! connection to the guest's close after its last read), the first fetch's time, and the
//! VM's whole wall time (boot and fetches). On PVM hosts guest kernel code is emulated
//! (~1M instructions/s), so keep sizes modest.
//!
//! `cargo run --release -p msb-benches --bin net -- [--runs N] [--mib M] [--memory MiB]
//! [--peers-only]`

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msb_benches::{arg, summary};
use msb_e2e::{artifacts, host_is_pvm, host_kind, QEMU};
use msb_guest_kernel::cpio::{write_archive, Entry, Kind};
use msb_vmm::arch::x86_64::cpuid::CpuProfile;
use msb_vmm::host::HostKind;
use msb_vmm::launch::{kernel_cmdline, Launch};
use sha2::{Digest, Sha256};

const PASST: &str = "/usr/bin/passt";
/// The body of the first fetch in a fresh guest: its first TCP connection costs the
/// guest kernel ~10 s of one-time work on PVM hosts (the same under QEMU), which is no
/// part of the transfer, so it is reported on its own.
const WARM: &[u8] = b"warm-up fetch!!\n";
/// The limit of one VM's run.
const RUN_LIMIT: Duration = Duration::from_secs(900);

/// A deterministic body of `len` bytes (xorshift), so its hash means something.
fn body(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An HTTP/1.0 server on 127.0.0.1 serving `/blob`; each transfer's host-side time (from
/// accepting the connection to the client's close after the body) arrives on the channel.
fn http_server(body: Arc<Vec<u8>>) -> (u16, mpsc::Receiver<Duration>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let (body, tx) = (body.clone(), tx.clone());
            std::thread::spawn(move || {
                if let Some(d) = serve(s, &body) {
                    let _ = tx.send(d);
                }
            });
        }
    });
    (port, rx)
}

fn serve(mut s: TcpStream, body: &[u8]) -> Option<Duration> {
    let start = Instant::now();
    let _ = s.set_read_timeout(Some(RUN_LIMIT));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        let n = s.read(&mut buf).ok().filter(|&n| n > 0)?;
        req.extend_from_slice(&buf[..n]);
    }
    let (body, timed) = if req.starts_with(b"GET /blob ") {
        (body, true)
    } else if req.starts_with(b"GET /warm ") {
        (WARM, false)
    } else {
        let _ = s.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        return None;
    };
    let head = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let _ = s.shutdown(Shutdown::Write);
    // The client closes once it has read everything.
    while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    timed.then(|| start.elapsed())
}

/// `tests/guest/netprobe.c`, built static into `dir`.
fn build_probe(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/netprobe.c");
    let out = dir.join("netprobe");
    msb_benches::build_static(&src, &out, &[]);
    out
}

/// One run: the first fetch's milliseconds (16 bytes: mostly the guest's first connect),
/// the big fetch's milliseconds as the guest timed it, the host's time, the VM's whole
/// wall time.
struct Fetch {
    first_ms: f64,
    guest_ms: f64,
    host: Option<Duration>,
    wall: Duration,
}

/// Finds netprobe's "<sha256> <length> <ms>" line for a body of `len` bytes in `text`,
/// checks its hash and returns the milliseconds.
fn parse_result(text: &str, hash: &str, len: usize) -> Result<f64, String> {
    let len_text = len.to_string();
    let line = text
        .lines()
        .map(|l| {
            l.trim_start_matches("netbench: result ")
                .trim_start_matches("netbench: warm ")
                .trim()
        })
        .find(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.len() == 3 && f[0].len() == 64 && f[1] == len_text
        })
        .ok_or_else(|| format!("no result line for {len} bytes from netprobe in {text:?}"))?;
    let f: Vec<&str> = line.split(' ').collect();
    if f[0] != hash {
        return Err(format!("wrong body: got {line:?}, expected hash {hash}"));
    }
    f[2].parse()
        .map_err(|_| format!("no elapsed time in {line:?}"))
}

/// Both results of a run's output: the first fetch's milliseconds and the big one's.
fn parse_run(text: &str, hash: &str, len: usize) -> Result<(f64, f64), String> {
    let warm = hex::encode(Sha256::digest(WARM));
    Ok((
        parse_result(text, &warm, WARM.len())?,
        parse_result(text, hash, len)?,
    ))
}

fn run_ours(
    probe_dir: &Path,
    port: u16,
    memory: u64,
    hash: &str,
    len: usize,
    host_times: &mpsc::Receiver<Duration>,
) -> Result<Fetch, String> {
    let a = artifacts();
    while host_times.try_recv().is_ok() {}
    let start = Instant::now();
    let out = Command::new(&a.msb_vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .args(["--memory", &memory.to_string()])
        .args(["--timeout", &RUN_LIMIT.as_secs().to_string()])
        .args(["--net", "public,host", "--dns", "127.0.0.1:1"])
        .arg("--ro-volume")
        .arg("/probe")
        .arg(probe_dir)
        .args(["--", "/bin/sh", "-c"])
        .arg(format!(
            "/probe/netprobe get 10.200.200.1 {port} /warm && /probe/netprobe get 10.200.200.1 {port} /blob"
        ))
        .output()
        .map_err(|e| format!("cannot run msb-vmm: {e}"))?;
    let wall = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "msb-vmm failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (first_ms, guest_ms) = parse_run(&stdout, hash, len)?;
    Ok(Fetch {
        first_ms,
        guest_ms,
        host: host_times.recv_timeout(Duration::from_secs(10)).ok(),
        wall,
    })
}

/// The peer's initramfs: busybox, the probe and an `/init` that fetches from `server`.
fn qemu_initramfs(path: &Path, probe: &Path, server: &str, port: u16) -> Result<(), String> {
    let rootfs = msb_e2e::default_rootfs();
    let busybox = std::fs::read(rootfs.join("bin/busybox"))
        .map_err(|e| format!("cannot read busybox from {}: {e}", rootfs.display()))?;
    let probe = std::fs::read(probe).map_err(|e| format!("cannot read the probe: {e}"))?;
    let init = format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B ip link set lo up
if ! $B ip link set eth0 up; then
    echo "netbench: failed: no eth0 (interfaces: $($B ls /sys/class/net | $B tr '\n' ' '))"
    $B poweroff -f
fi
$B ip addr add 10.0.2.15/24 dev eth0
$B ip route add default via 10.0.2.2
echo "netbench: eth0 up, MTU $($B cat /sys/class/net/eth0/mtu)"
out=$(/netprobe get {server} {port} /warm 2>&1)
echo "netbench: warm $out"
out=$(/netprobe get {server} {port} /blob 2>&1)
echo "netbench: result $out"
$B poweroff -f
"#
    );
    let dir = |p: &str| Entry {
        path: p.into(),
        perm: 0o755,
        kind: Kind::Dir,
    };
    let entries = vec![
        dir("bin"),
        dir("dev"),
        dir("proc"),
        dir("sys"),
        dir("tmp"),
        Entry {
            path: "dev/console".into(),
            perm: 0o600,
            kind: Kind::CharDev(5, 1),
        },
        Entry {
            path: "bin/busybox".into(),
            perm: 0o755,
            kind: Kind::File(busybox),
        },
        Entry {
            path: "netprobe".into(),
            perm: 0o755,
            kind: Kind::File(probe),
        },
        Entry {
            path: "init".into(),
            perm: 0o755,
            kind: Kind::File(init.into_bytes()),
        },
    ];
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).map_err(|e| format!("cannot create the initramfs: {e}"))?,
    );
    write_archive(&mut f, &entries)
        .and_then(|()| f.flush())
        .map_err(|e| format!("cannot write the initramfs: {e}"))
}

/// Boots QEMU's microvm with `initrd` and the network `netdev` (its `-netdev` value, id
/// n0), waits for the init's result line, and kills QEMU.
fn run_qemu(
    initrd: &Path,
    cmdline: &str,
    netdev: &str,
    memory: u64,
    hash: &str,
    len: usize,
    host_times: &mpsc::Receiver<Duration>,
) -> Result<Fetch, String> {
    let a = artifacts();
    let cpu = if host_is_pvm() {
        // QEMU cannot set MSR_IA32_ARCH_CAPABILITIES on a PVM host.
        "host,-arch-capabilities"
    } else {
        "host"
    };
    while host_times.try_recv().is_ok() {}
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off",
            "-accel",
            "kvm",
        ])
        .args(["-cpu", cpu, "-smp", "1", "-m", &memory.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .args(["-netdev", netdev, "-device", "virtio-net-device,netdev=n0"])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {QEMU}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .split(b'\n')
            .map_while(Result::ok)
        {
            let line = String::from_utf8_lossy(&line).into_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let result = loop {
        let left = RUN_LIMIT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("netbench: result") => {
                let wall = start.elapsed();
                console.push(line);
                let text = console.join("\n");
                break parse_run(&text, hash, len).map(|(first_ms, guest_ms)| Fetch {
                    first_ms,
                    guest_ms,
                    host: host_times.recv_timeout(Duration::from_secs(10)).ok(),
                    wall,
                });
            }
            Ok(line) if line.contains("netbench: failed") => break Err(line),
            Ok(line) => console.push(line),
            Err(_) => {
                let mut err = String::new();
                let _ = child.kill();
                let _ = stderr.read_to_string(&mut err);
                let tail = console[console.len().saturating_sub(20)..].join("\n");
                break Err(format!(
                    "no result within {} s (or QEMU ended); QEMU said: {}; console:\n{tail}",
                    RUN_LIMIT.as_secs(),
                    err.trim()
                ));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The runs of one configuration.
#[derive(Default)]
struct Figures {
    first: Vec<f64>,
    guest: Vec<f64>,
    host: Vec<f64>,
    wall: Vec<f64>,
    errors: Vec<String>,
}

impl Figures {
    fn add(&mut self, r: Result<Fetch, String>, len: usize) {
        match r {
            Ok(f) => {
                eprintln!(
                    "net: run: first fetch {:.0} ms, guest {:.0} ms, host {:?}, VM wall {:.1} s",
                    f.first_ms,
                    f.guest_ms,
                    f.host,
                    f.wall.as_secs_f64()
                );
                let mb = len as f64 / 1e6;
                self.first.push(f.first_ms / 1000.0);
                self.guest.push(mb / (f.guest_ms / 1000.0));
                if let Some(h) = f.host {
                    self.host.push(mb / h.as_secs_f64());
                }
                self.wall.push(f.wall.as_secs_f64());
            }
            Err(e) => {
                eprintln!("net: run failed: {e}");
                self.errors.push(e);
            }
        }
    }

    fn print(&self, title: &str) {
        let row = |label: &str, xs: &[f64], unit: &str| {
            if xs.is_empty() {
                return format!("  {label:<34} {:>12}", "-");
            }
            let (med, min, max) = summary(xs);
            format!("  {label:<34} median {med:>8.2} {unit}  min {min:>8.2}  max {max:>8.2}")
        };
        println!("{title}:");
        println!(
            "{}",
            row("MB/s, guest-timed (netprobe)", &self.guest, "MB/s")
        );
        println!(
            "{}",
            row("MB/s, host-timed (the server)", &self.host, "MB/s")
        );
        println!(
            "{}",
            row("first fetch, 16 bytes (cold guest)", &self.first, "s")
        );
        println!("{}", row("VM wall time (boot + fetches)", &self.wall, "s"));
        for e in &self.errors {
            let first = e.lines().next().unwrap_or_default();
            println!("  a run failed: {first}");
        }
    }
}

fn main() {
    let runs = arg("--runs", 2).max(1);
    let mib = arg("--mib", 8).max(1);
    let memory = arg("--memory", 512).max(128);
    let len = usize::try_from(mib << 20).expect("size");
    let blob = Arc::new(body(len));
    let hash = hex::encode(Sha256::digest(&*blob));
    let (port, host_times) = http_server(blob);
    let dir = tempfile::tempdir().expect("tempdir");
    let probe_dir = dir.path().join("probe");
    std::fs::create_dir_all(&probe_dir).expect("probe dir");
    let probe = build_probe(&probe_dir);
    let a = artifacts();
    println!(
        "net benchmark: host kind {}; {runs} runs of a {mib} MiB fetch from 127.0.0.1 by netprobe in the guest; {memory} MiB, 1 vCPU; kernel {}",
        host_kind(),
        a.kernel.display()
    );

    // `--peers-only` skips msb-vmm (for checking the peers' setup).
    let peers_only = std::env::args().any(|a| a == "--peers-only");
    let mut ours = Figures::default();
    for i in 0..if peers_only { 0 } else { runs } {
        eprintln!("net: msb-vmm run {}/{runs}", i + 1);
        ours.add(
            run_ours(&probe_dir, port, memory, &hash, len, &host_times),
            len,
        );
    }
    if !peers_only {
        ours.print(
            "msb-vmm --net public,host (virtio-net + msb-net proxy, MTU 65520), from 10.200.200.1",
        );
    }

    if !Path::new(QEMU).exists() {
        println!("QEMU: not installed (apt-get install qemu-system-x86); no peer figures");
        return;
    }
    let initrd = dir.path().join("qemu-initramfs.cpio");
    if let Err(e) = qemu_initramfs(&initrd, &probe, "10.0.2.2", port) {
        println!("QEMU: cannot build its initramfs: {e}");
        return;
    }
    // The command line msb-vmm gives a guest booting an initramfs on this host.
    let launch = Launch {
        initrd: Some(initrd.clone()),
        memory_mib: memory,
        ..Launch::default()
    };
    let cmdline =
        kernel_cmdline(&launch, CpuProfile::for_host(HostKind::detect())).expect("command line");
    let mut slirp = Figures::default();
    for i in 0..runs {
        eprintln!("net: QEMU + slirp run {}/{runs}", i + 1);
        slirp.add(
            run_qemu(
                &initrd,
                &cmdline,
                "user,id=n0",
                memory,
                &hash,
                len,
                &host_times,
            ),
            len,
        );
    }
    slirp.print("QEMU microvm on KVM + slirp (-netdev user, MTU 1500), same kernel, from 10.0.2.2");

    if !Path::new(PASST).exists() {
        println!("QEMU + passt: passt: not installed");
        return;
    }
    let mut passt = Figures::default();
    for i in 0..runs {
        eprintln!("net: QEMU + passt run {}/{runs}", i + 1);
        passt.add(
            run_passt(
                &initrd,
                &cmdline,
                memory,
                &hash,
                len,
                &host_times,
                dir.path(),
            ),
            len,
        );
    }
    passt.print("QEMU microvm on KVM + passt (-netdev stream), same kernel, from 10.0.2.2");
}

/// QEMU with passt: passt listens on a UNIX socket (`--foreground --one-off`), QEMU 7.2
/// connects with `-netdev stream`. passt maps the guest's gateway to the host's loopback
/// (its default) and is given the slirp addresses so the same initramfs serves. (Not run
/// on the machines this was written on: passt is not installed there.)
fn run_passt(
    initrd: &Path,
    cmdline: &str,
    memory: u64,
    hash: &str,
    len: usize,
    host_times: &mpsc::Receiver<Duration>,
    dir: &Path,
) -> Result<Fetch, String> {
    let sock = dir.join("passt.sock");
    let _ = std::fs::remove_file(&sock);
    let mut passt = Command::new(PASST)
        .args(["--foreground", "--one-off", "--socket"])
        .arg(&sock)
        .args(["--address", "10.0.2.15", "--netmask", "24"])
        .args(["--gateway", "10.0.2.2", "-4"])
        .args(["--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run passt: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = if sock.exists() {
        let netdev = format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            sock.display()
        );
        run_qemu(initrd, cmdline, &netdev, memory, hash, len, host_times)
    } else {
        let mut err = String::new();
        let _ = passt.kill();
        if let Some(mut e) = passt.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        Err(format!("passt did not create its socket: {}", err.trim()))
    };
    let _ = passt.kill();
    let _ = passt.wait();
    r
}
