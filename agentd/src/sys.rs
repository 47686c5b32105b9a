//! The agent's raw-memory access: the VMM's system device, mapped through `/dev/mem`.
//! This is the only module of the agent with `unsafe` code.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use msb_protocol::sysdev::{
    BootPhase, ExitStatus, MAGIC, REG_BOOT_READY, REG_EXIT_STATUS, REG_MAGIC, REG_PHASE,
    SYSDEV_BASE, SYSDEV_SIZE,
};

/// The mapped system device page.
pub struct SystemDevice {
    base: *mut u8,
}

// SAFETY: the mapping lives for the whole process (it is never unmapped) and every access
// is one volatile load or store of a single device register, which any thread may make.
unsafe impl Send for SystemDevice {}
// SAFETY: as above; no access depends on another.
unsafe impl Sync for SystemDevice {}

impl SystemDevice {
    /// Maps the device and checks its magic value.
    pub fn open() -> std::io::Result<Self> {
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC)
            .open("/dev/mem")?;
        // SAFETY: mapping a fresh region (addr NULL) of one page of /dev/mem at the device's
        // physical address; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SYSDEV_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                SYSDEV_BASE as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let dev = SystemDevice {
            base: ptr.cast::<u8>(),
        };
        let magic = dev.read32(REG_MAGIC);
        if magic != MAGIC {
            return Err(std::io::Error::other(format!(
                "no microsandbox system device at {SYSDEV_BASE:#x} (read {magic:#x})"
            )));
        }
        Ok(dev)
    }

    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: offset is one of the device's 4-byte-aligned registers inside the mapped
        // page; a volatile access is what makes the VMM see exactly one read.
        unsafe { std::ptr::read_volatile(self.base.add(offset as usize).cast::<u32>()) }
    }

    /// Tells the VMM the agent is ready (the boot-timer mark).
    pub fn boot_ready(&self) {
        // SAFETY: one-byte register inside the mapped page; volatile so it is not elided.
        unsafe { std::ptr::write_volatile(self.base.add(REG_BOOT_READY as usize), 123u8) }
    }

    /// Tells the VMM the agent reached `phase` of its start.
    pub fn phase(&self, phase: BootPhase) {
        // SAFETY: one-byte register inside the mapped page; volatile so it is not elided.
        unsafe { std::ptr::write_volatile(self.base.add(REG_PHASE as usize), phase.encode()) }
    }

    /// Reports the command's status; the VMM ends the VM.
    pub fn exit(&self, status: ExitStatus) {
        // SAFETY: 4-byte-aligned register inside the mapped page; volatile store.
        unsafe {
            std::ptr::write_volatile(
                self.base.add(REG_EXIT_STATUS as usize).cast::<u32>(),
                status.encode(),
            )
        }
    }
}

/// Keeps freed memory in the agent's heap instead of giving it back to the kernel at once.
/// File transfers allocate and free a chunk buffer per frame; with glibc's default
/// thresholds the heap top is trimmed and regrown, and every regrown page is a fresh page
/// fault and a page the guest kernel zeroes, which on a host that emulates the guest
/// kernel costs more than moving the data itself. Peak memory stays what it was.
pub fn keep_freed_memory() {
    const KEEP: libc::c_int = 64 << 20;
    // SAFETY: mallopt only changes two allocator tunables; it is called at start-up
    // before the agent starts any thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP);
    }
}

/// Accepts one connection on a listening socket.
pub fn accept(listener: &std::os::fd::OwnedFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fd = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(std::fs::File::from(owned))
}

/// A resource limit for the child, by name (`nofile`, `nproc`, `as`, `cpu`, `fsize`, `core`,
/// `stack`, `data`, `memlock`); `None` for a name we do not know.
pub fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "as" => libc::RLIMIT_AS,
        "cpu" => libc::RLIMIT_CPU,
        "fsize" => libc::RLIMIT_FSIZE,
        "core" => libc::RLIMIT_CORE,
        "stack" => libc::RLIMIT_STACK,
        "data" => libc::RLIMIT_DATA,
        "memlock" => libc::RLIMIT_MEMLOCK,
        _ => return None,
    })
}

/// Forks, refusing when the process has more than one thread (then the child could find a
/// lock held by a thread that does not exist in it).
pub fn fork_single_threaded() -> Result<nix::unistd::ForkResult, String> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
    if threads != 1 {
        return Err(format!(
            "the agent runs {threads} threads: cannot fork safely"
        ));
    }
    // SAFETY: the process has one thread (checked above), so the child may run any code.
    unsafe { nix::unistd::fork() }.map_err(|e| format!("cannot fork: {e}"))
}

/// Makes this process the reaper of its descendants' orphans (instead of PID 1).
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl sets a flag of this process; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `CAP_SYS_ADMIN` (linux/capability.h): mount, among much else.
const CAP_SYS_ADMIN_BIT: libc::c_ulong = 21;

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

const LD_ABS_W: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET: u16 = 0x06; // BPF_RET | BPF_K
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
const EPERM: u32 = 0x0005_0000 | libc::EPERM as u32; // SECCOMP_RET_ERRNO | EPERM
const ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;
const NR_CLONE: u32 = 56;
const NR_UNSHARE: u32 = 272;
const NR_CLONE3: u32 = 435;

/// The restricted profile's seccomp filter (`struct seccomp_data`: nr at 0, arch at 4,
/// args from 16): no new user namespace (`unshare` or `clone` with `CLONE_NEWUSER`;
/// `clone3`, whose flags a filter cannot read, is `ENOSYS`, so libc falls back to
/// `clone`), and no system calls through another ABI (i386, x32) that would slip past.
static NO_USER_NS: [libc::sock_filter; 15] = [
    stmt(LD_ABS_W, 4),
    jump(JEQ, AUDIT_ARCH_X86_64, 1, 0),
    stmt(RET, EPERM),
    stmt(LD_ABS_W, 0),
    jump(JGE, X32_SYSCALL_BIT, 0, 1),
    stmt(RET, EPERM),
    jump(JEQ, NR_CLONE3, 0, 1),
    stmt(RET, ENOSYS),
    jump(JEQ, NR_UNSHARE, 2, 0),
    jump(JEQ, NR_CLONE, 1, 0),
    stmt(RET, ALLOW),
    stmt(LD_ABS_W, 16),
    jump(JSET, libc::CLONE_NEWUSER as u32, 0, 1),
    stmt(RET, EPERM),
    stmt(RET, ALLOW),
];

/// Makes the child apply `limits`, when `controlling_tty` start a new session whose
/// controlling terminal is its stdin (the PTY slave), and when `restricted` set
/// `no_new_privs`, drop `CAP_SYS_ADMIN` from its bounding set (root then execs without
/// it) and install [`NO_USER_NS`], just before it executes.
pub fn child_setup(
    cmd: &mut std::process::Command,
    limits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    controlling_tty: bool,
    restricted: bool,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setrlimit, setsid, ioctl, prctl) on values it owns;
    // `prog` points at a static program the kernel copies.
    unsafe {
        cmd.pre_exec(move || {
            // Built here, in the child: no allocation, and no raw pointer crosses threads.
            let prog = libc::sock_fprog {
                len: NO_USER_NS.len() as u16,
                // The kernel only reads (copies) the program.
                filter: NO_USER_NS.as_ptr().cast_mut(),
            };
            // std has switched to the command's user by now: only root may (and needs
            // to) drop from the bounding set; no_new_privs stops setuid and file
            // capabilities for everyone.
            if restricted
                && ((libc::geteuid() == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_ADMIN_BIT, 0, 0, 0) != 0)
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                        &prog as *const libc::sock_fprog as libc::c_ulong,
                    ) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            for (res, soft, hard) in &limits {
                let lim = libc::rlimit {
                    rlim_cur: *soft,
                    rlim_max: *hard,
                };
                if libc::setrlimit(*res, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if controlling_tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets the window size of the terminal `fd` (a PTY master).
pub fn set_window_size(fd: &impl AsRawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(restricted: bool, program: &str, args: &[&str]) -> std::process::ExitStatus {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        child_setup(&mut cmd, Vec::new(), false, restricted);
        cmd.status().expect("runs")
    }

    #[test]
    fn the_restricted_profile_refuses_user_namespaces_and_keeps_the_rest() {
        if !std::path::Path::new("/usr/bin/unshare").exists() {
            eprintln!("no unshare(1) on this host: skipped");
            return;
        }
        // What the profile takes away...
        assert!(
            !run(true, "unshare", &["-U", "true"]).success(),
            "a user namespace"
        );
        assert!(!run(true, "unshare", &["-Ur", "true"]).success());
        // ...and what it leaves: ordinary processes, threads (clone without the flag,
        // clone3 falling back), pipes.
        assert!(run(true, "sh", &["-c", "true | cat; echo x > /dev/null"]).success());
        assert!(run(
            true,
            "sh",
            &["-c", "grep -q '^NoNewPrivs:.*1' /proc/self/status"]
        )
        .success());
        // Without it, the same user namespace is allowed (where the host allows them).
        let unrestricted = run(false, "unshare", &["-U", "true"]);
        eprintln!("unshare -U without the profile: {unrestricted:?}");
    }
}
