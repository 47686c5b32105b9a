//! End-to-end: boot the real kernel with agentd as PID 1 through `msb-vmm`.

use msb_e2e::{run_vm, run_vm_with_stdin};

#[test]
fn echo_hello_prints_hello_and_exits_zero() {
    let out = run_vm(&[], &["/bin/echo", "hello"]);
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn output_bytes_streams_and_exit_code_are_exact() {
    // Binary bytes (NUL, 0xff, no trailing newline translation) on stdout, text on
    // stderr, and exit 3.
    let out = run_vm(
        &["--memory", "128"],
        &[
            "sh",
            "-c",
            "printf 'a\\000b\\377\\r\\nz'; printf 'to-stderr' >&2; exit 3",
        ],
    );
    assert_eq!(out.stdout, b"a\0b\xff\r\nz");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to-stderr"),
        "stderr carries the command's stderr"
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn two_cpus_are_online() {
    let out = run_vm(&["--cpus", "2"], &["nproc"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn memtotal_matches_the_memory_option() {
    let mib = 192u64;
    let out = run_vm(&["--memory", &mib.to_string()], &["cat", "/proc/meminfo"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    // MemTotal is RAM minus what the kernel reserves for itself (its image, page tables,
    // the BIOS hole): a little below the configured size, never above it.
    assert!(kib <= mib * 1024, "MemTotal {kib} kB exceeds {mib} MiB");
    assert!(
        kib >= mib * 1024 * 85 / 100,
        "MemTotal {kib} kB is far below {mib} MiB"
    );
}

#[test]
fn unknown_command_is_127_with_a_message() {
    let out = run_vm(&[], &["no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command: command not found"));
}

#[test]
fn a_command_killed_by_a_signal_reports_128_plus_n() {
    let out = run_vm(&[], &["sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
}

#[test]
fn hostname_is_applied() {
    let out = run_vm(&["--hostname", "sandbox-1"], &["hostname"]);
    assert_eq!(out.stdout, b"sandbox-1\n");
}

#[test]
fn kernel_panic_fails_with_the_last_console_lines() {
    // No init the kernel can run: it panics.
    let out = run_vm(
        &[
            "--append",
            "rdinit=/nonexistent",
            "--append",
            "init=/nonexistent",
        ],
        &["true"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr.contains("the guest kernel panicked"), "{stderr}");
    assert!(stderr.contains("Kernel panic - not syncing"), "{stderr}");
}

#[test]
fn the_guest_driver_brings_up_our_virtio_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("v.sock");
    let out = run_vm(
        &["--vsock-socket", &sock.display().to_string()],
        &["sh", "-c", "for d in /sys/bus/virtio/devices/*; do echo $(cat $d/device) $(cat $d/status); done | sort; test -c /dev/vsock && echo has-dev-vsock; grep -c virtiofs /proc/mounts || true"],
    );
    assert_eq!(out.status.code(), Some(0));
    // vsock (19), the root's virtio-fs and the agent directory's (26), each ACKNOWLEDGE |
    // DRIVER | DRIVER_OK | FEATURES_OK; neither share shows among the command's mounts
    // (the root share is the overlay's source, the agent directory the abandoned root).
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0x0013 0x0000000f\n0x001a 0x0000000f\n0x001a 0x0000000f\nhas-dev-vsock\n0\n"
    );
}

#[test]
fn stdin_reaches_the_command() {
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = run_vm_with_stdin(&[], &["cat"], Some(&input));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout, input,
        "stdin came back through cat byte for byte"
    );
}

/// RAM above the boot memory is added by the agent once the guest needs it: a 384 MiB guest
/// booted with 128 MiB shows ~128 MiB, and after 80 MiB of a file fill its page cache
/// (less than half free) a 128 MiB block comes online.
#[test]
fn memory_above_the_boot_ram_is_added_when_needed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/touch_file.c");
    let status = std::process::Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(dir.path().join("touch_file"))
        .arg(&src)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "building touch_file");
    let data: Vec<u8> = (0..80u32 << 20).map(|i| (i >> 12) as u8 | 1).collect();
    std::fs::write(dir.path().join("data"), &data).expect("data file");
    let host = dir.path().display().to_string();
    let script = "total() { sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; }; \
                  echo before $(total); /x/touch_file /x/data >/dev/null; \
                  for i in $(seq 40); do [ $(total) -gt 200000 ] && break; sleep 0.5; done; \
                  echo after $(total)";
    let out = run_vm(
        &[
            "--memory",
            "384",
            "--boot-memory",
            "128",
            "--ro-volume",
            "/x",
            &host,
        ],
        &["sh", "-c", script],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let kib = |word: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(word))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {word:?} in {text:?}"))
    };
    let (before, after) = (kib("before "), kib("after "));
    eprintln!("MemTotal before the page cache filled: {before} kB, after: {after} kB");
    assert!(before <= 128 * 1024, "booted with 128 MiB: {text}");
    assert!(
        after >= before + 120 * 1024 && after <= 384 * 1024,
        "a 128 MiB block was added: {text}"
    );
}
