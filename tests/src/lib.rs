//! Harness for the end-to-end tests: they boot the real guest kernel with the real agent
//! through the `msb-vmm` binary, as a user would.
//!
//! The kernel flavour follows the host kind (`/sys/module/kvm_pvm` means PVM and the
//! `pvm-compat` flavour); the host kind is printed so test logs say where they ran. On a
//! PVM host a boot takes tens of seconds, so timeouts are long and each test boots once.
#![forbid(unsafe_code)]

pub mod dns;
pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use msb_guest_kernel::{Flavour, Progress};
use msb_vmm::host::HostKind;

/// Generous per-VM limit: a PVM boot takes ~20-40 s, hardware KVM well under a second.
pub const VM_TIMEOUT_SECS: u64 = 300;

/// True when the host's KVM is `kvm_pvm` (or `MSB_HOST_KIND=pvm`): the VMM's own
/// detection.
pub fn host_is_pvm() -> bool {
    HostKind::detect() == HostKind::Pvm
}

/// Human name of the host kind.
pub fn host_kind() -> &'static str {
    HostKind::detect().describe()
}

/// The guest artifacts: the kernel every test boots, with the agent directory as its root
/// (`msb-vmm`'s default), and the initramfs other VMMs boot the same agent from.
#[derive(Debug)]
pub struct Artifacts {
    /// The kernel for this host.
    pub kernel: PathBuf,
    /// The default initramfs (for QEMU: the peer in the boot benchmark, the TCG boot test).
    pub initrd: PathBuf,
    /// The agent directory `msb-vmm` shares as the guest kernel's root.
    pub agent_dir: PathBuf,
    /// The VMM binary.
    pub msb_vmm: PathBuf,
}

fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// `msb-vmm` from the same build profile as this test, built if missing.
fn msb_vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MSB_VMM_BIN") {
        return PathBuf::from(p);
    }
    workspace_binary("msb-vmm")
}

/// The `msb` command-line tool from the same build profile as this test, built if missing.
pub fn msb_cli() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("msb")).clone()
}

/// The workspace binary `name` of this test's build profile, built (`cargo build --bin`).
fn workspace_binary(name: &str) -> PathBuf {
    // Tests live in target/<profile>/deps/, binaries (the benchmarks) in target/<profile>/.
    let exe = std::env::current_exe().expect("executable path");
    let mut profile_dir = exe.parent().expect("target/<profile>").to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let bin = profile_dir.join(name);
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--bin", name, "--manifest-path"])
        .arg(workspace().join("Cargo.toml"));
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building {name} failed");
    assert!(bin.exists(), "{name} not found at {}", bin.display());
    bin
}

/// Builds (once per test process) or finds the artifacts, printing the host kind.
pub fn artifacts() -> &'static Artifacts {
    static ART: OnceLock<Artifacts> = OnceLock::new();
    ART.get_or_init(|| {
        let flavour = if host_is_pvm() {
            Flavour::PvmCompat
        } else {
            Flavour::Microvm
        };
        eprintln!(
            "e2e: host kind: {}; kernel flavour: {}",
            host_kind(),
            flavour.name()
        );
        // MSB_KERNEL runs the suite against a given kernel instead of the cached build.
        let kernel = match std::env::var_os("MSB_KERNEL") {
            Some(k) => PathBuf::from(k),
            None => msb_guest_kernel::ensure_kernel(flavour, &mut Progress::new("guest-kernel"))
                .expect("guest kernel builds"),
        };
        let initrd = msb_guest_kernel::ensure_initramfs(&mut Progress::new("initramfs"))
            .expect("initramfs builds");
        let agent_dir = msb_guest_kernel::ensure_agent_dir(&mut Progress::new("agent"))
            .expect("agent directory builds");
        Artifacts {
            kernel,
            initrd,
            agent_dir,
            msb_vmm: msb_vmm_binary(),
        }
    })
}

/// `len` incompressible bytes (xorshift) from `seed`: layer blobs of the size asked for,
/// bodies a transfer cannot shrink.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Prints that one check of `suite` passed, with the host kind and how long it took.
pub fn check(suite: &str, name: &str, start: std::time::Instant) {
    eprintln!(
        "{suite} e2e [{}]: {name}: ok ({:.1} s)",
        host_kind(),
        start.elapsed().as_secs_f64()
    );
}

/// Runs `script` with the sandbox's shell: its exit code and its stdout then stderr.
pub async fn sh(sb: &microsandbox::Sandbox, script: &str) -> (i32, String) {
    let out = sb.shell(script).await.expect("shell runs");
    let text = format!(
        "{}{}",
        out.stdout().unwrap_or_default(),
        out.stderr().unwrap_or_default()
    );
    (out.exit_code(), text)
}

/// Runs `fut` to completion on a two-thread runtime; panics if it takes longer than
/// `limit`.
pub fn block_on_within<F: std::future::Future>(limit: std::time::Duration, fut: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or_else(|_| panic!("the checks did not finish within {limit:?}"))
    })
}

/// The default root filesystem (busybox), built if missing.
pub fn default_rootfs() -> PathBuf {
    msb_guest_kernel::ensure_rootfs(&mut Progress::new("rootfs")).expect("default rootfs builds")
}

/// The default root filesystem as entries of a test image layer, so images the tests
/// build have a shell and the usual tools.
pub fn busybox_layer() -> Vec<microsandbox::image::fixture::FixtureEntry> {
    use microsandbox::image::fixture::FixtureEntry;
    use std::os::unix::fs::PermissionsExt;
    fn walk(root: &Path, dir: &Path, out: &mut Vec<FixtureEntry>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("list the rootfs")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p
                .strip_prefix(root)
                .expect("inside")
                .to_string_lossy()
                .into_owned();
            let meta = std::fs::symlink_metadata(&p).expect("stat");
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).expect("readlink");
                out.push(FixtureEntry::symlink(&rel, &target.to_string_lossy()));
            } else if meta.is_dir() {
                out.push(FixtureEntry::Dir { path: rel, mode });
                walk(root, &p, out);
            } else {
                out.push(FixtureEntry::File {
                    path: rel,
                    data: std::fs::read(&p).expect("read"),
                    mode,
                    uid: 0,
                    gid: 0,
                });
            }
        }
    }
    let root = default_rootfs();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out
}

/// Points the SDK at the test artifacts with its state under `home`. Call it before any
/// thread of the process reads the environment.
pub fn sdk_env(home: &Path) {
    let a = artifacts();
    std::env::set_var("MSB_HOME", home);
    std::env::set_var("MSB_VMM", &a.msb_vmm);
    std::env::set_var("MSB_KERNEL", &a.kernel);
}

/// Runs `msb-vmm` with the test artifacts, `opts` and the guest command `cmd`.
pub fn run_vm(opts: &[&str], cmd: &[&str]) -> Output {
    run_vm_with_stdin(opts, cmd, None)
}

/// [`run_vm`] with `input` on msb-vmm's stdin (else `/dev/null`).
pub fn run_vm_with_stdin(opts: &[&str], cmd: &[&str], input: Option<&[u8]>) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let a = artifacts();
    let timeout = VM_TIMEOUT_SECS.to_string();
    // No network device unless a test asks (`--net ...` in `opts`): these tests talk to
    // the agent only, and on PVM hosts the device costs ~2 s of every boot.
    let net_opts = opts.iter().any(|o| o.starts_with("--net") || *o == "-p");
    let mut child = Command::new(&a.msb_vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .args(["--timeout", &timeout])
        .args((!net_opts).then_some("--no-net"))
        .args(opts)
        .arg("--")
        .args(cmd)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("msb-vmm runs");
    // Written from another thread: the output must be read meanwhile.
    let writer = match (input, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || stdin.write_all(&data)))
        }
        _ => None,
    };
    let out = child.wait_with_output().expect("msb-vmm ends");
    if let Some(w) = writer {
        w.join().expect("writer").expect("stdin written");
    }
    eprintln!(
        "e2e [{}]: {:?} -> {:?}\n--- stderr ---\n{}",
        host_kind(),
        cmd,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A VM booted in serve mode (the agent serves exec over vsock). Dropping it kills the VMM
/// and, during a panic, prints the end of the guest's console.
pub struct ServedVm {
    child: std::process::Child,
    serial: PathBuf,
}

impl ServedVm {
    /// Waits for the VMM to exit (after a `Shutdown`).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("msb-vmm ends")
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// How a running VMM process is confined, read from the host's `/proc`.
#[derive(Debug)]
pub struct Confinement {
    /// Per thread: its name, `Seccomp:` mode (2: filtered) and number of filters.
    pub threads: Vec<(String, u32, u32)>,
    /// `NoNewPrivs:` of the main thread.
    pub no_new_privs: bool,
    /// `CapEff:` of the main thread.
    pub cap_eff: u64,
    /// What the VMM sees at `/` (names, sorted).
    pub root: Vec<String>,
}

/// Reads how the process `pid` is confined.
pub fn confinement(pid: u32) -> Confinement {
    let field = |status: &str, key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut threads = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = field(&status, "Name:");
        let mode = field(&status, "Seccomp:").parse().unwrap_or(0);
        let filters = field(&status, "Seccomp_filters:").parse().unwrap_or(0);
        threads.push((name, mode, filters));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    Confinement {
        threads,
        no_new_privs: field(&status, "NoNewPrivs:") == "1",
        cap_eff: u64::from_str_radix(&field(&status, "CapEff:"), 16).unwrap_or(u64::MAX),
        root,
    }
}

/// Asserts what every VMM must show once its guest runs: each thread filtered, no new
/// privileges, no `CAP_SYS_ADMIN`, and a root holding none of the host's files.
pub fn assert_confined(pid: u32) {
    let c = confinement(pid);
    eprintln!("e2e [{}]: msb-vmm {pid} confinement: {c:?}", host_kind());
    for (name, mode, filters) in &c.threads {
        assert!(
            *mode == 2 && *filters >= 1,
            "thread {name} is not filtered: {c:?}"
        );
    }
    assert!(c.no_new_privs, "{c:?}");
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_PTRACE: u32 = 19;
    for cap in [CAP_SYS_ADMIN, CAP_SYS_PTRACE] {
        assert_eq!(c.cap_eff & (1 << cap), 0, "capability {cap} kept: {c:?}");
    }
    for host_only in ["usr", "bin", "home", "var", "boot"] {
        assert!(
            !c.root.iter().any(|n| n == host_only),
            "the jail shows /{host_only}: {c:?}"
        );
    }
    let root = format!("/proc/{pid}/root");
    for secret in ["etc/shadow", "etc/passwd", "root/.ssh", "usr/bin/env"] {
        assert!(
            !Path::new(&root).join(secret).exists(),
            "the jail shows the host's /{secret}"
        );
    }
}

impl Drop for ServedVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.serial).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- guest console (last 30 lines) ---\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }
}

/// Boots a VM with `memory_mib` whose agent serves on the hybrid socket `sock`; its console
/// goes to `serial`.
pub fn serve_vm(sock: &Path, serial: &Path, memory_mib: u32) -> ServedVm {
    let a = artifacts();
    let child = Command::new(&a.msb_vmm)
        .arg("--kernel")
        .arg(&a.kernel)
        .args([
            "--memory",
            &memory_mib.to_string(),
            "--timeout",
            "1800",
            "--vsock-socket",
        ])
        .arg(sock)
        .arg("--serial-log")
        .arg(serial)
        .arg("--no-net")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("msb-vmm starts");
    ServedVm {
        child,
        serial: serial.to_path_buf(),
    }
}

/// A minimal blocking client of the agent over the VM's hybrid vsock socket (the SDK's
/// client comes later; tests need only this).
pub mod agent {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use msb_protocol::frame::{read_frame, write_frame, Frame, ProtocolError};
    use msb_protocol::message::{ErrorKind, ExecStart, Message, AGENT_PORT, PROTOCOL_VERSION};

    /// What one session produced.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct Outcome {
        /// Stdout bytes.
        pub stdout: Vec<u8>,
        /// Stderr bytes.
        pub stderr: Vec<u8>,
        /// Exit code.
        pub code: Option<i32>,
        /// Terminating signal.
        pub signal: Option<i32>,
        /// Killed by its timeout.
        pub timed_out: bool,
        /// The agent refused the request.
        pub error: Option<(ErrorKind, String)>,
    }

    /// A connection to the agent.
    pub struct Agent {
        stream: UnixStream,
        pending: HashMap<u32, Outcome>,
        done: HashMap<u32, Outcome>,
    }

    impl Agent {
        /// Connects through `sock` (retrying until the guest's agent listens or `wait`
        /// passes) and says hello.
        pub fn connect(sock: &Path, wait: Duration) -> Self {
            let start = Instant::now();
            loop {
                assert!(
                    start.elapsed() < wait,
                    "the agent did not answer on {} within {wait:?}",
                    sock.display()
                );
                let Ok(mut s) = UnixStream::connect(sock) else {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                };
                s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
                    .expect("connect line");
                let mut line = String::new();
                let ok = BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("OK ");
                if !ok {
                    // Reset: nothing listens in the guest yet.
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                // A hung agent fails the test instead of hanging it.
                s.set_read_timeout(Some(Duration::from_secs(120)))
                    .expect("read timeout");
                let mut agent = Agent {
                    stream: s,
                    pending: HashMap::new(),
                    done: HashMap::new(),
                };
                agent.send(&Frame::new(
                    0,
                    Message::Hello {
                        version: PROTOCOL_VERSION,
                    },
                ));
                match agent.recv() {
                    Ok(Some(Frame {
                        message: Message::Ready { version, .. },
                        ..
                    })) => {
                        assert_eq!(version, PROTOCOL_VERSION);
                        return agent;
                    }
                    other => panic!("expected Ready, got {other:?}"),
                }
            }
        }

        /// Sends a frame.
        pub fn send(&mut self, f: &Frame) {
            write_frame(&mut self.stream, f).expect("send to the agent");
        }

        fn recv(&mut self) -> Result<Option<Frame>, ProtocolError> {
            read_frame(&mut self.stream)
        }

        /// Starts a session.
        pub fn start(&mut self, id: u32, req: ExecStart) {
            self.pending.insert(id, Outcome::default());
            self.send(&Frame::new(id, Message::ExecStart(req)));
        }

        /// Reads frames until session `id` ended; returns its outcome.
        pub fn wait(&mut self, id: u32) -> Outcome {
            loop {
                if let Some(o) = self.done.remove(&id) {
                    return o;
                }
                let f = self
                    .recv()
                    .expect("frame")
                    .expect("the agent closed the connection");
                let o = self.pending.entry(f.id).or_default();
                let end = match f.message {
                    Message::Stdout(d) | Message::PtyOutput(d) => {
                        o.stdout.extend(d);
                        false
                    }
                    Message::Stderr(d) => {
                        o.stderr.extend(d);
                        false
                    }
                    Message::Started { .. } | Message::Pong(_) => false,
                    Message::Exited {
                        code,
                        signal,
                        timed_out,
                    } => {
                        (o.code, o.signal, o.timed_out) = (code, signal, timed_out);
                        true
                    }
                    Message::Error { kind, message } => {
                        o.error = Some((kind, message));
                        true
                    }
                    other => panic!("unexpected {other:?}"),
                };
                if end {
                    let o = self.pending.remove(&f.id).unwrap_or_default();
                    self.done.insert(f.id, o);
                }
            }
        }

        /// Runs one command to the end.
        pub fn run(&mut self, id: u32, req: ExecStart) -> Outcome {
            self.start(id, req);
            self.wait(id)
        }
    }

    /// An exec request for `cmd args` with defaults.
    pub fn exec(cmd: &str, args: &[&str]) -> ExecStart {
        ExecStart::command(cmd, args)
    }
}

/// The line the agent prints on the console as it starts (its first act as PID 1).
pub const AGENT_START_LINE: &str = "msb-agentd: starting";

/// QEMU's x86_64 system emulator (Debian's `qemu-system-x86`, which `scripts/setup`
/// installs).
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// What [`qemu_to_agent_start`] saw.
#[derive(Debug)]
pub struct QemuBoot {
    /// From QEMU's start to the agent's start line on the serial console.
    pub to_agent: Duration,
    /// QEMU's `/proc/<pid>/smaps` at that moment (for its memory outside the guest's).
    pub smaps: String,
}

/// Boots `kernel` with `initrd` and `cmdline` in QEMU's `microvm` machine (`accel`: `kvm`
/// or `tcg`; one vCPU, `memory_mib`), the console on QEMU's stdout, and waits for the
/// agent's start line; QEMU is killed afterwards either way. An error names what went
/// wrong with the console seen so far.
pub fn qemu_to_agent_start(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    accel: &str,
    memory_mib: u64,
    limit: Duration,
) -> Result<QemuBoot, String> {
    use std::io::BufRead;
    let cpu = match (accel, host_is_pvm()) {
        ("tcg", _) => "max",
        // QEMU cannot set MSR_IA32_ARCH_CAPABILITIES on a PVM host.
        (_, true) => "host,-arch-capabilities",
        (_, false) => "host",
    };
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(["-M", "microvm,x-option-roms=off,rtc=off", "-accel", accel])
        .args(["-cpu", cpu, "-smp", "1", "-m", &memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {QEMU}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .split(b'\n')
            .map_while(Result::ok)
        {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let result = loop {
        let left = limit.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(AGENT_START_LINE) => {
                let to_agent = start.elapsed();
                let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id()))
                    .unwrap_or_default();
                break Ok(QemuBoot { to_agent, smaps });
            }
            Ok(line) => console.push(line),
            Err(_) => {
                let tail = console[console.len().saturating_sub(20)..].join("\n");
                break Err(format!(
                    "no {AGENT_START_LINE:?} line within {}s; console:\n{tail}",
                    limit.as_secs()
                ));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}
