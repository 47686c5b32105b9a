//! End-to-end: the VMM's confinement. Every kind of thread has a syscall filter: a test
//! hook makes one thread of each kind call a syscall outside it, and the VMM must die of
//! SIGSYS and say which thread and which syscall. (That the filters allow what the VMM
//! does is shown by the whole suite, which runs with them on; `exec_vsock` checks a
//! serving VMM's threads and jail.)

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use msb_e2e::{artifacts, check, host_kind};

/// The kinds and whether the guest must boot for the thread to start (device workers
/// start when the guest's driver activates the device).
const KINDS: [&str; 11] = [
    "main", "spawner", "vcpu", "vsock", "relay", "monitor", "watch", "runner", "fs", "net", "block",
];

#[test]
fn a_syscall_outside_a_threads_filter_kills_the_vmm_with_sigsys_and_a_record() {
    let start = Instant::now();
    let a = artifacts();
    for kind in KINDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Instant::now();
        let mut cmd = Command::new(&a.msb_vmm);
        cmd.arg("--kernel")
            .arg(&a.kernel)
            .args(["--timeout", "300", "--test-seccomp-violation", kind])
            .arg("--serial-log")
            .arg(dir.path().join("console.log"));
        // The runner exists with a command; the relay and the monitor with a control
        // socket (which takes no command).
        if kind == "runner" {
            cmd.args(["--", "sleep", "60"]);
        } else {
            cmd.arg("--control-socket")
                .arg(dir.path().join("c.sock"))
                .arg("--metrics")
                .arg(dir.path().join("metrics.json"));
        }
        if kind == "watch" {
            cmd.arg("--exit-with-stdin");
        }
        if kind != "net" {
            cmd.arg("--no-net");
        }
        // The disk's worker starts when the guest's driver activates the disk.
        if kind == "block" {
            let img = dir.path().join("d.raw");
            let made = Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img)
                .arg("8M")
                .status()
                .expect("mkfs.ext4 (scripts/setup installs e2fsprogs)");
            assert!(made.success());
            cmd.args(["--disk", "/scratch", "raw,rw"]).arg(&img);
        }
        // Stdin stays open (a pipe nobody writes) so that only the hook ends the VMM.
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("msb-vmm starts");
        let out = child.wait_with_output().expect("msb-vmm ends");
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "e2e [{}]: --test-seccomp-violation {kind}: {:?} in {:.1}s\n{}",
            host_kind(),
            out.status,
            t.elapsed().as_secs_f64(),
            stderr
                .lines()
                .filter(|l| l.contains("seccomp"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: the VMM must die of SIGSYS\n{stderr}"
        );
        let record = format!(
            "the {kind} thread made syscall {}, outside its filter",
            libc::SYS_ptrace
        );
        assert!(stderr.contains(&record), "{kind}: no record\n{stderr}");
    }
    check("hardening", "seccomp violations", start);
}
