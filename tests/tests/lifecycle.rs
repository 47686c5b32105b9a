//! The persisted lifecycle end to end, through the SDK and the `msb` CLI, on the real
//! kernel and agent: detached sandboxes that outlive their creator, get/list/label
//! filters, logs and metrics, drain, stop and start, crash detection after a SIGKILL of
//! the VMM, idle timeout and max duration enforced by the VMM with no SDK process around,
//! ephemeral sandboxes, bad input that leaves nothing behind, and a creator killed with
//! SIGKILL mid-create.
//!
//! One test drives everything (boots are ~30 s each on a PVM host); child processes (this
//! test binary again, or `msb`) create the sandboxes that must outlive their creator.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use microsandbox::{
    ExecEvent, Init, LogOptions, LogSource, LogStreamOptions, MicrosandboxError, Sandbox,
    SandboxFilter, SandboxStatus,
};
use msb_e2e::{host_kind, sdk_env};

const GUEST_MIB: u32 = 256;
/// The child-process entry point below reads these.
const CHILD_ENV: &str = "MSB_E2E_LIFECYCLE_CHILD";
const CHILD_TEST: &str = "child_creates_a_detached_sandbox";

fn check(name: &str, start: Instant) {
    msb_e2e::check("lifecycle", name, start);
}

fn sandbox_dir(home: &Path, name: &str) -> PathBuf {
    home.join("sandboxes").join(name)
}

/// Not a test of its own: the entry point of the child process that creates a detached
/// sandbox and exits (run by `lifecycle_end_to_end` with `CHILD_ENV` set).
#[test]
fn child_creates_a_detached_sandbox() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode = std::env::var("MSB_E2E_CHILD_MODE").unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let b = Sandbox::builder(&name)
            .memory(GUEST_MIB)
            .label("team", "e2e")
            .label("role", "main")
            .env("FROM_CHILD", "yes")
            .volume("/scratch", |v| v.tmpfs().size(96));
        if mode == "hang" {
            // The parent SIGKILLs this process while the detached create boots.
            let _made = b.create_detached().await;
            std::thread::sleep(Duration::from_secs(3600));
            return;
        }
        let sb = b.create_detached().await.expect("detached create");
        assert!(!sb.owns_lifecycle());
        let out = sb
            .shell("echo child-was-here > /root/mark")
            .await
            .expect("exec");
        assert_eq!(out.exit_code(), 0);
        println!("child: created {name} detached, vmm pid {:?}", sb.vmm_pid());
    });
    // Exits here, dropping the handle: the sandbox must run on.
}

fn spawn_child(name: &str, mode: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary");
    Command::new(exe)
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env("MSB_E2E_CHILD_MODE", mode)
        .stdin(Stdio::null())
        .spawn()
        .expect("child runs")
}

#[test]
fn lifecycle_end_to_end() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let home = tempfile::tempdir().expect("tempdir");
    // One test in this process reads the environment; children inherit it.
    sdk_env(home.path());
    let _reaper = Reaper(home.path().to_path_buf());
    eprintln!("lifecycle e2e: host kind {}", host_kind());
    msb_e2e::block_on_within(Duration::from_secs(3000), run_all(home.path())).expect("checks");
}

/// Kills whatever VMM of this test's home is still running when the test ends (a failed
/// check must not leave detached VMs behind).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--"])
            .arg(format!("--control-socket {}/", self.0.display()))
            .status();
    }
}

type R = Result<(), String>;

async fn run_all(home: &Path) -> R {
    bad_input(home).await;

    // --- A detached sandbox outlives the process that created it.
    let t = Instant::now();
    let mut child = spawn_child("lc-main", "");
    let status = child.wait().expect("child ends");
    assert!(status.success(), "the child failed: {status:?}");
    let h = Sandbox::get("lc-main")
        .await
        .expect("get after the creator exited");
    assert_eq!(h.status(), SandboxStatus::Running);
    assert!(h.detached());
    assert!(h.vmm_pid().is_some());
    assert_eq!(h.labels().get("team").map(String::as_str), Some("e2e"));
    let cfg = h.config().expect("config parses");
    assert_eq!(cfg.memory_mib, GUEST_MIB);
    assert!(h.created_at().is_some_and(|c| c <= chrono::Utc::now()));
    let sb = h.connect().await.expect("connect");
    assert!(!sb.owns_lifecycle());
    let out = sb
        .shell("cat /root/mark; echo $FROM_CHILD")
        .await
        .expect("exec after the creator exited");
    assert_eq!(out.stdout().expect("utf-8"), "child-was-here\nyes\n");
    check(
        "a child creates a sandbox detached and exits; get, connect and exec find it",
        t,
    );
    let out = sb
        .shell(
            "grep NoNewPrivs /proc/self/status; mount -t tmpfs none /mnt && echo mounted; \
             unshare -U true 2>/dev/null && echo userns || echo no-userns",
        )
        .await
        .expect("exec");
    assert_eq!(
        out.stdout().expect("utf-8"),
        "NoNewPrivs:\t0\nmounted\nuserns\n",
        "default profile"
    );

    // --- Listing and label filters; a taken name; remove while running.
    let t = Instant::now();
    let all = Sandbox::list().await.expect("list");
    assert_eq!(
        all.iter().map(|h| h.name()).collect::<Vec<_>>(),
        ["lc-main"]
    );
    let f = SandboxFilter::new().with_label("team", "e2e");
    assert_eq!(Sandbox::list_with(f).await.expect("list").len(), 1);
    let f = SandboxFilter::new().with_labels([("team", "e2e"), ("role", "other")]);
    assert!(Sandbox::list_with(f).await.expect("list").is_empty());
    let f = SandboxFilter::new().with_status(SandboxStatus::Stopped);
    assert!(Sandbox::list_with(f).await.expect("list").is_empty());
    let e = Sandbox::builder("lc-main")
        .create()
        .await
        .expect_err("taken");
    assert!(matches!(e, MicrosandboxError::AlreadyExists(_)), "{e:?}");
    let e = Sandbox::remove("lc-main").await.expect_err("running");
    assert!(matches!(e, MicrosandboxError::StillRunning(_)), "{e:?}");
    assert_eq!(
        Sandbox::get("lc-main").await.expect("get").status(),
        SandboxStatus::Running,
        "a refused create or remove leaves the sandbox as it was"
    );
    check(
        "list, label filters, duplicate name and remove-while-running refused",
        t,
    );

    logs(&sb).await;
    metrics(&sb).await;
    cli_on_running(home).await;

    // --- Max duration, enforced by the VMM on a detached, ephemeral sandbox.
    let t_max = Instant::now();
    // No network device: the 60 s count from the VMM's start, and the boot (longer with
    // the device on PVM hosts) must leave time to start the command.
    let max = Sandbox::builder("lc-max")
        .memory(GUEST_MIB)
        .disable_network()
        .max_duration(60)
        .ephemeral(true)
        .create_detached()
        .await
        .expect("max-duration sandbox");
    // A command that would run forever: the limit cuts it.
    let mut forever = max
        .exec_stream("sleep", ["100000"])
        .await
        .expect("sleep starts");
    drop(max);
    check(
        "a detached ephemeral sandbox with a 60 s max duration boots",
        t_max,
    );

    // --- Drain: running commands finish, new ones are refused, then the sandbox stops.
    let t = Instant::now();
    sb.shell("echo kept > /root/upper-file")
        .await
        .expect("write");
    let mut slow = sb
        .shell_stream("sleep 8; echo slow-done")
        .await
        .expect("slow command");
    sb.drain().await.expect("drain");
    assert_eq!(
        Sandbox::get("lc-main").await.expect("get").status(),
        SandboxStatus::Draining
    );
    let e = sb
        .exec("echo", ["late"])
        .await
        .expect_err("refused while draining");
    assert!(matches!(e, MicrosandboxError::AgentUnavailable(_)), "{e:?}");
    let mut slow_out = String::new();
    while let Some(ev) = slow.recv().await.expect("event") {
        match ev {
            ExecEvent::Stdout(d) => slow_out.push_str(&String::from_utf8_lossy(&d)),
            ExecEvent::Exited(st) => assert_eq!(st.code(), Some(0)),
            _ => {}
        }
    }
    assert_eq!(slow_out, "slow-done\n", "the running command finished");
    let st = sb.wait().await.expect("wait for the drained sandbox");
    assert!(st.success(), "{st:?}");
    let h = Sandbox::get("lc-main").await.expect("get");
    assert_eq!(h.status(), SandboxStatus::Stopped);
    assert!(
        h.exit_reason().is_some_and(|r| r.contains("drain")),
        "{:?}",
        h.exit_reason()
    );
    drop(sb);
    check(
        "drain: the running command finishes, a new one is refused, then stopped",
        t,
    );

    // --- Start again (attached): config and writable layer kept; detach() lets it run on.
    let t = Instant::now();
    let sb = Sandbox::start("lc-main").await.expect("start again");
    assert!(sb.owns_lifecycle());
    assert_eq!(sb.config(), &cfg, "the configuration is kept");
    let out = sb
        .shell("cat /root/upper-file /root/mark")
        .await
        .expect("exec");
    assert_eq!(out.stdout().expect("utf-8"), "kept\nchild-was-here\n");
    let h = Sandbox::get("lc-main").await.expect("get");
    assert_eq!(h.status(), SandboxStatus::Running);
    assert!(!h.detached());
    check("stop then start keeps the config and the writable layer", t);
    let t = Instant::now();
    sb.detach().await.expect("detach");
    // Dropped: an attached sandbox would stop now (its lifeline closes); this one runs on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let h = Sandbox::get("lc-main").await.expect("get");
    assert_eq!(h.status(), SandboxStatus::Running);
    assert!(h.detached());
    let out = h
        .connect()
        .await
        .expect("connect")
        .exec("echo", ["still-here"])
        .await
        .expect("exec");
    assert_eq!(out.stdout().expect("utf-8"), "still-here\n");
    check("detach() of an attached sandbox: it outlives its handle", t);

    // --- replace: the running sandbox is stopped and removed, a fresh one takes the name.
    let t = Instant::now();
    let sb = Sandbox::builder("lc-main")
        .memory(GUEST_MIB)
        .label("generation", "2")
        // PID 1 handed to an init of the image, with arguments and environment.
        .patch(|p| {
            p.text(
                "/init.sh",
                "#!/bin/sh\necho \"$MSB_INIT_NOTE $*\" > /init-ran\nexec sleep 2147483647\n",
                Some(0o755),
                false,
            )
        })
        .init(
            Init::path("/init.sh")
                .args(["a", "b c"])
                .env("MSB_INIT_NOTE", "hello"),
        )
        .replace_with_timeout(Duration::from_secs(20))
        .create()
        .await
        .expect("replace a running sandbox");
    let out = sb
        .shell("test -e /root/mark && echo old || echo fresh")
        .await
        .expect("exec");
    assert_eq!(out.stdout().expect("utf-8"), "fresh\n");
    let out = sb
        .shell("cat /init-ran; tr '\\0' ' ' < /proc/1/cmdline; echo")
        .await
        .expect("exec under a custom init");
    assert_eq!(
        out.stdout().expect("utf-8"),
        "hello a b c\nsleep 2147483647 \n",
        "PID 1 is the image's init; the agent serves as its child"
    );
    let h = Sandbox::get("lc-main").await.expect("get");
    assert_eq!(h.labels().get("generation").map(String::as_str), Some("2"));
    assert!(h.labels().get("team").is_none(), "the old row is gone");
    check(
        "replace stops and removes a running sandbox, then boots a fresh one with its own init",
        t,
    );

    // --- SIGKILL of the VMM: crashed.
    let t = Instant::now();
    let pid = sb.vmm_pid().expect("vmm pid");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("SIGKILL the VMM");
    let _ = sb.wait().await;
    let h = Sandbox::get("lc-main").await.expect("get");
    assert_eq!(
        h.status(),
        SandboxStatus::Crashed,
        "a SIGKILLed VMM is a crash"
    );
    assert_eq!(h.vmm_pid(), None);
    // The VMM says nothing; the SDK that reaped it says what it saw.
    let reason = h.exit_reason().expect("a crash seen has a reason");
    assert!(reason.contains("killed by signal 9"), "{reason}");
    drop(sb);
    let listed = Sandbox::list().await.expect("list");
    assert!(listed
        .iter()
        .any(|h| h.name() == "lc-main" && h.status() == SandboxStatus::Crashed));
    h.remove().await.expect("a crashed sandbox can be removed");
    assert!(!sandbox_dir(home, "lc-main").exists());
    let e = Sandbox::get("lc-main").await.expect_err("gone");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    check(
        "SIGKILL of msb-vmm shows as crashed; remove deletes row and directory",
        t,
    );

    // --- The max-duration sandbox ends by itself; being ephemeral, nothing is left.
    let t = Instant::now();
    let mut cut = false;
    while let Ok(Some(ev)) = forever.recv().await {
        if matches!(ev, ExecEvent::Exited(_)) {
            cut = true;
        }
    }
    let waited = Instant::now();
    loop {
        match Sandbox::get("lc-max").await {
            Err(MicrosandboxError::NotFound(_)) => break,
            Ok(h) => assert!(
                waited.elapsed() < Duration::from_secs(120),
                "lc-max still {:?} {:.0} s after its limit",
                h.status(),
                t_max.elapsed().as_secs_f64()
            ),
            Err(e) => panic!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lived = t_max.elapsed();
    assert!(lived >= Duration::from_secs(60), "ended early: {lived:?}");
    assert!(
        !sandbox_dir(home, "lc-max").exists(),
        "ephemeral: the directory is gone"
    );
    eprintln!(
        "lifecycle e2e: lc-max gone {:.1} s after create (limit 60 s + boot); its sleep {}",
        lived.as_secs_f64(),
        if cut {
            "was cut (exited)"
        } else {
            "lost its connection"
        }
    );
    check(
        "max duration fires with no SDK handle left; ephemeral leaves nothing",
        t,
    );

    idle_timeout_via_cli(home).await;
    killed_mid_create(home).await;
    msb_run(home).await;
    Ok(())
}

/// Bad input: a typed error and nothing created (no row, no directory, no process).
async fn bad_input(home: &Path) {
    let t = Instant::now();
    let nothing_left = |name: &str| {
        assert!(
            !sandbox_dir(home, name).exists(),
            "{name}: a directory was left"
        );
    };
    for bad in ["", "a/b", "..", ".", &"x".repeat(129), "new\nline", "nul\0"] {
        let e = Sandbox::builder(bad).create().await.expect_err("bad name");
        assert!(
            matches!(e, MicrosandboxError::InvalidName { .. }),
            "{bad:?}: {e:?}"
        );
    }
    let e = Sandbox::builder("bad-mem")
        .memory(0)
        .create()
        .await
        .expect_err("0 MiB");
    assert!(matches!(e, MicrosandboxError::InvalidConfig(_)), "{e:?}");
    nothing_left("bad-mem");
    let e = Sandbox::builder("bad-cpu")
        .cpus(0)
        .create_detached()
        .await
        .expect_err("0 cpus");
    assert!(matches!(e, MicrosandboxError::InvalidConfig(_)), "{e:?}");
    nothing_left("bad-cpu");
    let e = Sandbox::builder("bad-label")
        .label("sandbox.id", "x")
        .create()
        .await
        .expect_err("reserved label");
    assert!(matches!(e, MicrosandboxError::InvalidConfig(_)), "{e:?}");
    let e = Sandbox::builder("bad-image")
        .image(home.join("no-such-image.tar"))
        .create()
        .await
        .expect_err("missing image");
    assert!(matches!(e, MicrosandboxError::ImageNotFound(_)), "{e:?}");
    nothing_left("bad-image");
    let kernel = std::env::var_os("MSB_KERNEL").expect("kernel set");
    std::env::set_var("MSB_KERNEL", home.join("no-such-kernel"));
    let e = Sandbox::builder("bad-kernel")
        .create()
        .await
        .expect_err("missing kernel");
    std::env::set_var("MSB_KERNEL", kernel);
    assert!(matches!(e, MicrosandboxError::KernelNotFound(_)), "{e:?}");
    nothing_left("bad-kernel");
    let e = Sandbox::start("never-made")
        .await
        .expect_err("start of nothing");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    let e = Sandbox::remove("never-made")
        .await
        .expect_err("remove of nothing");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    assert!(
        Sandbox::list().await.expect("list").is_empty(),
        "no row was left"
    );
    check("bad input: typed errors, no row, no directory", t);
}

async fn logs(sb: &Sandbox) {
    let t = Instant::now();
    sb.shell("echo out-line; echo err-line >&2")
        .await
        .expect("exec");
    let entries = sb.logs(&LogOptions::default()).await.expect("logs");
    let texts: Vec<(LogSource, String)> = entries.iter().map(|e| (e.source, e.text())).collect();
    assert!(
        texts.contains(&(LogSource::Stdout, "out-line\n".into())),
        "{texts:?}"
    );
    assert!(
        texts.contains(&(LogSource::Stderr, "err-line\n".into())),
        "{texts:?}"
    );
    assert!(
        entries
            .iter()
            .all(|e| matches!(e.source, LogSource::Stdout | LogSource::Stderr)),
        "default sources are stdout and stderr"
    );
    let system = sb
        .logs(&LogOptions::default().source(LogSource::System))
        .await
        .expect("logs");
    assert!(
        system
            .iter()
            .any(|e| e.text().contains("exec [\"/bin/sh\"")),
        "{system:?}"
    );
    // stdout and stderr are separate pipes: their relative order is not fixed, so tail is
    // checked on a command of its own.
    sb.exec("echo", ["tail-mark"]).await.expect("exec");
    let last = sb.logs(&LogOptions::default().tail(1)).await.expect("tail");
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].text(), "tail-mark\n");
    let two = sb.logs(&LogOptions::default().tail(2)).await.expect("tail");
    assert_eq!(two.len(), 2);
    assert_eq!(two[1].text(), "tail-mark\n");
    let mark = chrono::Utc::now();
    sb.shell("echo after-mark").await.expect("exec");
    let since = sb
        .logs(&LogOptions::default().since(mark))
        .await
        .expect("since");
    assert_eq!(
        since.iter().map(|e| e.text()).collect::<Vec<_>>(),
        ["after-mark\n"]
    );
    // Follow: an entry written after the stream opened arrives; a cursor resumes after it.
    let mut stream = sb
        .log_stream(LogStreamOptions::default().since(mark).follow(true))
        .expect("stream");
    let first = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("first entry")
        .expect("some")
        .expect("ok");
    assert_eq!(first.text(), "after-mark\n");
    sb.shell("echo followed").await.expect("exec");
    let next = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a followed entry")
        .expect("some")
        .expect("ok");
    assert_eq!(next.text(), "followed\n");
    drop(stream);
    let resumed = sb
        .log_stream(LogStreamOptions::default().from_cursor(first.cursor.clone()))
        .expect("stream");
    let rest: Vec<String> = resumed.map(|e| e.expect("entry").text()).collect().await;
    assert_eq!(rest, ["followed\n"]);
    check("logs: sources, tail, since, follow and cursor", t);
}

async fn sample(sb: &Sandbox) -> microsandbox::SandboxMetrics {
    // The VMM rewrites its snapshot every second: let one full interval pass.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    sb.metrics().await.expect("metrics")
}

async fn metrics(sb: &Sandbox) {
    let t = Instant::now();
    // Idle: a quiet window (on a PVM host even an idle guest's timer work is emulated,
    // so "idle" is far from 0 there).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle0 = sample(sb).await;
    let idle = sample(sb).await;
    assert_eq!(idle.memory_limit_bytes, u64::from(GUEST_MIB) << 20);
    assert!(idle.uptime > Duration::from_secs(1));
    assert!(
        idle.memory_available_bytes.is_some(),
        "the guest reports its memory"
    );
    let rate = |a: &microsandbox::SandboxMetrics, b: &microsandbox::SandboxMetrics| {
        let wall = (b.timestamp - a.timestamp).num_milliseconds().max(1) as f64 * 1e6;
        (b.vcpu_time_ns.saturating_sub(a.vcpu_time_ns)) as f64 / wall * 100.0
    };
    let mut busy = sb
        .shell_stream("while :; do :; done")
        .await
        .expect("busy loop");
    let loaded0 = sample(sb).await;
    let loaded = sample(sb).await;
    busy.kill().await.expect("stop the loop");
    while let Ok(Some(_)) = busy.recv().await {}
    let (idle_rate, busy_rate) = (rate(&idle0, &idle), rate(&loaded0, &loaded));
    eprintln!(
        "lifecycle e2e [{}]: cpu_percent idle {:.1}% -> busy loop {:.1}%; vCPU time per wall time idle {:.1}% -> busy {:.1}%",
        host_kind(),
        idle.cpu_percent,
        loaded.cpu_percent,
        idle_rate,
        busy_rate
    );
    assert!(
        loaded.cpu_percent > idle.cpu_percent + 15.0 && busy_rate > idle_rate + 15.0,
        "CPU% moves under a busy loop: {} -> {} ({idle_rate:.1} -> {busy_rate:.1})",
        idle.cpu_percent,
        loaded.cpu_percent
    );
    assert!(loaded.vcpu_time_ns > idle.vcpu_time_ns);

    let before = sample(sb).await;
    let out = sb
        .shell("dd if=/dev/zero of=/scratch/fill bs=1M count=24 2>&1")
        .await
        .expect("fill the tmpfs");
    assert_eq!(out.exit_code(), 0, "{:?}", out.stderr());
    let after = sample(sb).await;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "lifecycle e2e [{}]: guest used {:.1} -> {:.1} MiB, host RSS of guest memory {:.1} -> {:.1} MiB after writing 24 MiB to a tmpfs",
        host_kind(),
        mib(before.memory_bytes),
        mib(after.memory_bytes),
        mib(before.memory_host_resident_bytes.unwrap_or(0)),
        mib(after.memory_host_resident_bytes.unwrap_or(0)),
    );
    assert!(
        after.memory_bytes >= before.memory_bytes + (20 << 20),
        "guest memory in use moves: {} -> {}",
        before.memory_bytes,
        after.memory_bytes
    );
    assert!(
        after.memory_host_resident_bytes.unwrap_or(0)
            >= before.memory_host_resident_bytes.unwrap_or(0) + (16 << 20),
        "host RSS of guest memory moves"
    );
    // The fs counters move with file traffic through the root share.
    sb.shell("head -c 2000000 /dev/zero > /root/f && cat /root/f > /dev/null")
        .await
        .expect("file traffic");
    let io = sample(sb).await;
    assert!(
        io.disk_write_bytes >= after.disk_write_bytes + 2_000_000,
        "{io:?}"
    );
    // Network bytes are checked against a real transfer in tests/network.rs.
    let all = microsandbox::all_sandbox_metrics().await.expect("all");
    assert!(all.contains_key("lc-main"));
    let mut stream = Box::pin(sb.metrics_stream(Duration::from_millis(500)));
    let a = stream.next().await.expect("one").expect("ok");
    let b = stream.next().await.expect("two").expect("ok");
    assert!(b.timestamp >= a.timestamp);
    check("metrics: CPU% and memory move, fs bytes counted, stream", t);
}

/// How many VMMs of this test's home run.
fn vmm_processes(home: &Path) -> usize {
    let out = Command::new("pgrep")
        .args(["-f", "--"])
        .arg(format!("--control-socket {}/", home.display()))
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Runs `msb args` (stdin: nothing).
fn msb(args: &[&str]) -> std::process::Output {
    let out = Command::new(msb_e2e::msb_cli())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("msb runs");
    eprintln!(
        "lifecycle e2e: msb {} -> {:?}{}",
        args.join(" "),
        out.status.code(),
        if out.stderr.is_empty() {
            String::new()
        } else {
            format!(
                "\n  stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            )
        }
    );
    out
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// `msb` flows on the running sandbox (its output read as a user's script would).
async fn cli_on_running(home: &Path) {
    let t = Instant::now();
    let ls = json_of(&msb(&["ls", "--json"]));
    let main = &ls.as_array().expect("array")[0];
    assert_eq!(main["name"], "lc-main");
    assert_eq!(main["status"], "running");
    assert_eq!(main["labels"]["team"], "e2e");
    let table = stdout_of(&msb(&["ls", "-l", "team=e2e"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("lc-main") && lines[1].contains("running"),
        "{table}"
    );
    assert_eq!(
        stdout_of(&msb(&["ls", "-l", "team=nobody"]))
            .lines()
            .count(),
        1
    );

    let out = msb(&[
        "exec",
        "lc-main",
        "--",
        "sh",
        "-c",
        "echo cli-out; echo cli-err >&2; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(stdout_of(&out), "cli-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cli-err"));
    let out = msb(&["shell", "lc-main", "echo $FROM_CHILD"]);
    assert_eq!(
        (out.status.code(), stdout_of(&out).as_str()),
        (Some(0), "yes\n")
    );

    let logs = msb(&["logs", "lc-main", "--json", "-n", "1"]);
    let last: serde_json::Value =
        serde_json::from_str(stdout_of(&logs).trim()).expect("one JSON line");
    assert_eq!(last["data"], "yes\n");
    assert_eq!(last["source"], "stdout");
    let logs = msb(&["logs", "lc-main", "-s", "stderr"]);
    assert!(
        String::from_utf8_lossy(&logs.stderr).contains("cli-err"),
        "{logs:?}"
    );

    let m = json_of(&msb(&["metrics", "lc-main", "--json"]));
    let m = if m.is_array() { m[0].clone() } else { m };
    assert_eq!(m["memory_limit_bytes"], u64::from(GUEST_MIB) << 20, "{m}");
    let inspect = json_of(&msb(&["inspect", "lc-main"]));
    assert_eq!(inspect["status"], "running");
    assert_eq!(inspect["config"]["memory_mib"], GUEST_MIB);

    let src = home.join("cp-in.txt");
    std::fs::write(&src, b"through msb cp\n").expect("write");
    let src_s = src.to_str().expect("utf-8 path");
    assert!(msb(&["cp", src_s, "lc-main:/root/cp.txt"]).status.success());
    let back = home.join("cp-out.txt");
    let back_s = back.to_str().expect("utf-8 path");
    assert!(msb(&["cp", "lc-main:/root/cp.txt", back_s])
        .status
        .success());
    assert_eq!(std::fs::read(&back).expect("read"), b"through msb cp\n");

    // logs -f: a line printed after it started arrives while it follows.
    let mut follow = Command::new(msb_e2e::msb_cli())
        .args(["logs", "-f", "-n", "0", "lc-main"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("msb logs -f");
    let mut follow_out = follow.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = follow_out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("followed-by-cli") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(msb(&["exec", "lc-main", "--", "echo", "followed-by-cli"])
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let followed = reader.join().expect("reader");
    assert!(followed.contains("followed-by-cli"), "{followed:?}");

    // exec -t on a terminal (script(1) gives msb one): the command sees a tty.
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} exec -t lc-main -- sh -c 'test -t 0 && echo on-a-tty; exit 5'",
            msb_e2e::msb_cli().display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("on-a-tty"), "{text:?}");
    assert_eq!(out.status.code(), Some(5), "{text:?}");

    let out = msb(&["stop", "no-such"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sandbox named"));
    let out = msb(&["rm", "lc-main"]);
    assert_eq!(out.status.code(), Some(1), "rm of a running sandbox fails");
    check(
        "msb ls/exec/exec -t/shell/logs/logs -f/metrics/inspect/cp on a running sandbox",
        t,
    );
}

/// A sandbox created detached by `msb` (which then exits) with an idle timeout: its VMM
/// stops it after the timeout with nobody watching.
async fn idle_timeout_via_cli(_home: &Path) {
    let t = Instant::now();
    let out = msb(&[
        "create",
        "--memory",
        "256",
        "--idle-timeout",
        "15",
        "--restricted",
        "lc-idle",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_of(&out).trim(), "lc-idle");
    // The restricted profile: no_new_privs, and root cannot mount.
    let sb = Sandbox::connect("lc-idle").await.expect("connect");
    let out = sb
        .shell("grep NoNewPrivs /proc/self/status; mount -t tmpfs none /mnt 2>/dev/null && echo mounted || echo refused")
        .await
        .expect("exec");
    assert_eq!(
        out.stdout().expect("utf-8"),
        "NoNewPrivs:\t1\nrefused\n",
        "restricted profile"
    );
    let out = sb
        .exec_with("sh", |o| {
            o.args([
                "-c",
                "id -u; grep NoNewPrivs /proc/self/status; unshare -U true 2>/dev/null && echo userns || echo no-userns",
            ])
            .user("65534")
        })
        .await
        .expect("a non-root command under the restricted profile");
    assert_eq!(
        out.stdout().expect("utf-8"),
        "65534\nNoNewPrivs:\t1\nno-userns\n",
        "restricted, as another user; no user namespaces"
    );
    drop(sb);
    let created = Instant::now();
    assert_eq!(
        Sandbox::get("lc-idle").await.expect("get").status(),
        SandboxStatus::Running,
        "it outlives the msb process that created it"
    );
    let h = loop {
        let h = Sandbox::get("lc-idle").await.expect("get");
        if h.status() == SandboxStatus::Stopped {
            break h;
        }
        assert!(
            created.elapsed() < Duration::from_secs(120),
            "lc-idle still {:?} after {:.0} s",
            h.status(),
            created.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let idle_for = created.elapsed();
    assert!(
        idle_for >= Duration::from_secs(15),
        "stopped early: {idle_for:?}"
    );
    assert!(
        h.exit_reason().is_some_and(|r| r.contains("idle for 15s")),
        "{:?}",
        h.exit_reason()
    );
    eprintln!(
        "lifecycle e2e [{}]: lc-idle stopped {:.1} s after msb create returned (idle timeout 15 s)",
        host_kind(),
        idle_for.as_secs_f64()
    );
    let system = stdout_of(&msb(&["logs", "lc-idle", "-s", "system"]));
    assert!(system.contains("draining: idle for 15s"), "{system}");
    assert!(msb(&["rm", "lc-idle"]).status.success());
    let e = Sandbox::get("lc-idle").await.expect_err("removed");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    check(
        "restricted profile; idle timeout fires in a sandbox msb created detached; msb rm",
        t,
    );
}

/// The process creating a detached sandbox is killed with SIGKILL while it boots: its VMM
/// ends with it (it boots on a lifeline until its row says running), and the row and the
/// directory go.
async fn killed_mid_create(home: &Path) {
    let t = Instant::now();
    let mut child = spawn_child("lc-doomed", "hang");
    // Let it claim the name and start the VMM.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !sandbox_dir(home, "lc-doomed").join("lock").exists() {
        assert!(Instant::now() < deadline, "the child never started its VMM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    child.kill().expect("SIGKILL the creator");
    let _ = child.wait();
    // Its VMM sees its lifeline close and ends; the next reader cleans up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = Sandbox::list().await.expect("list");
        let gone = !listed.iter().any(|h| h.name() == "lc-doomed")
            && !sandbox_dir(home, "lc-doomed").exists();
        if gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lc-doomed left behind: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let e = Sandbox::get("lc-doomed").await.expect_err("gone");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    assert_eq!(vmm_processes(home), 0, "no VMM was left");
    check(
        "creator SIGKILLed mid-create: no row, no directory, no VMM left",
        t,
    );
}

/// `msb run` boots, runs, stops and removes.
async fn msb_run(home: &Path) {
    let t = Instant::now();
    let out = msb(&[
        "run",
        "--memory",
        "256",
        "lc-run",
        "--",
        "sh",
        "-c",
        "echo run-out; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(stdout_of(&out), "run-out\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("booting"),
        "no stage line when stderr is not a terminal: {stderr:?}"
    );
    // On a terminal (script(1) gives msb one) the start shows its stage and the elapsed
    // time on one line replaced in place, cleared before the command's output.
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "{} run --memory 256 lc-run-tty -- echo tty-run-out",
            msb_e2e::msb_cli().display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown:?}");
    assert!(shown.contains("booting: kernel ("), "{shown:?}");
    assert!(shown.contains("booting: agent"), "{shown:?}");
    let cleared = shown.rfind("\r\x1b[2K").expect("the line is cleared");
    let output = shown.find("tty-run-out").expect("the command's output");
    assert!(cleared < output, "cleared before the output: {shown:?}");
    let e = Sandbox::get("lc-run")
        .await
        .expect_err("removed after the run");
    assert!(matches!(e, MicrosandboxError::NotFound(_)), "{e:?}");
    assert!(!sandbox_dir(home, "lc-run").exists());
    let ls = json_of(&msb(&["ls", "--json"]));
    assert_eq!(ls, serde_json::json!([]), "nothing is left of any sandbox");
    check("msb run: exit code and output, then nothing left", t);
}
