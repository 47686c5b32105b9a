//! The VMM's syscall filters: one allow-list per kind of thread, installed by each thread
//! as it starts (the start hook of `msb_devices::threads`) and by the main thread before
//! the guest's first instruction; no new privileges; and the capabilities the VMM never
//! uses dropped.
//!
//! A syscall outside a thread's list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the handler
//! writes the thread's kind and the syscall's number to stderr (the sandbox's `vmm.log`)
//! and the process then dies of that `SIGSYS`, so its parent sees the signal. Filters are
//! inherited by the threads a thread makes and can only narrow: the kinds that make
//! threads (main, relay, the spawner of device workers) allow what their children need.
//!
//! The lists were taken from `strace -f` of the end-to-end suite, per thread, and are kept
//! by that suite running with the filters on. `--seccomp off` is for debugging only.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The kinds of threads of `msb-vmm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread once the VM is built: starts the vCPUs, waits for the end, writes
    /// the report and the exit record.
    Main,
    /// A vCPU: `KVM_RUN` and the devices' register accesses (the vsock device's socket
    /// work runs here too when the guest notifies).
    Vcpu,
    /// The vsock device's event loop.
    Vsock,
    /// A virtio-fs worker: the passthrough filesystem.
    Fs,
    /// The virtio-net worker and the proxy's host sockets.
    Net,
    /// A virtio-blk worker: reads and writes of its disk image (opened before the jail).
    Block,
    /// The control socket's relay (acceptor, clients, agent pumps).
    Relay,
    /// The lifecycle monitor: limits (asking the agent to power off), metrics file,
    /// `/proc` readings.
    Monitor,
    /// The stdin watcher: ends the VMM when its parent goes.
    Watch,
    /// The one-command runner and its stdin pump.
    Runner,
    /// The thread that starts device workers for the vCPUs (see `msb_devices::threads`).
    Spawner,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 11] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::Net,
        ThreadKind::Block,
        ThreadKind::Relay,
        ThreadKind::Monitor,
        ThreadKind::Watch,
        ThreadKind::Runner,
        ThreadKind::Spawner,
    ];

    /// The kind's name (as `--test-seccomp-violation` takes it).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Fs => "fs",
            ThreadKind::Net => "net",
            ThreadKind::Block => "block",
            ThreadKind::Relay => "relay",
            ThreadKind::Monitor => "monitor",
            ThreadKind::Watch => "watch",
            ThreadKind::Runner => "runner",
            ThreadKind::Spawner => "spawner",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind of the thread a start hook names.
    pub fn of_thread(name: &str) -> Option<ThreadKind> {
        Some(match name {
            "vcpu" => ThreadKind::Vcpu,
            "vsock" => ThreadKind::Vsock,
            "virtio-fs" => ThreadKind::Fs,
            "virtio-net" => ThreadKind::Net,
            "virtio-blk" => ThreadKind::Block,
            "relay-accept" | "relay-client" | "relay-agent" => ThreadKind::Relay,
            "lifecycle" => ThreadKind::Monitor,
            "stdin-watch" => ThreadKind::Watch,
            "runner" | "runner-stdin" => ThreadKind::Runner,
            SPAWNER_THREAD => ThreadKind::Spawner,
            _ => return None,
        })
    }

    fn index(self) -> u8 {
        ThreadKind::ALL
            .iter()
            .position(|k| *k == self)
            .map_or(u8::MAX, |i| i as u8)
    }
}

/// The spawner thread's name.
pub const SPAWNER_THREAD: &str = "device-spawner";

/// What every thread does: memory, locks, time, signals, its own end, logging.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_rseq,
    // Who we are (the relay compares its clients' uid with its own).
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// Starting threads (what a new thread does before its start hook runs is under the
/// filter of the thread that made it).
const SPAWN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    // The new thread installs its own filter.
    libc::SYS_seccomp,
];

/// Sockets: the vsock device's host side, the relay, the proxy's host connections.
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_ioctl,
];

/// Event plumbing made while devices activate.
const EVENTS: &[i64] = &[
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Files by path, for the threads that write the VMM's own files (metrics, records, the
/// console log) and read `/proc`.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_ftruncate,
    libc::SYS_fchmod,
    libc::SYS_fsync,
    libc::SYS_pread64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_mkdir,
    libc::SYS_fchmodat,
    // Guest RSS: which pages of guest memory are resident.
    libc::SYS_mincore,
];

/// The passthrough filesystem, serving the guest's FUSE requests.
const FUSE: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_copy_file_range,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_lsetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_flock,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Disk images: positioned I/O on descriptors opened before the jail, flushes, holes and
/// zeroed ranges, and what imago asks of a file (its size, its flags).
const DISK: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

/// The syscalls a kind may make.
pub fn syscalls(kind: ThreadKind) -> Vec<i64> {
    let parts: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[BASE, SOCKETS, EVENTS, FILES],
        ThreadKind::Vsock => &[BASE, SOCKETS],
        ThreadKind::Fs => &[BASE, FUSE],
        ThreadKind::Net => &[BASE, SOCKETS, EVENTS],
        ThreadKind::Block => &[BASE, DISK],
        ThreadKind::Relay => &[BASE, SPAWN, SOCKETS, FILES],
        // A limit or a drain ends the guest through the agent: a vsock connection.
        ThreadKind::Monitor => &[BASE, FILES, SOCKETS, &[libc::SYS_kill]],
        ThreadKind::Watch => &[BASE, FILES],
        ThreadKind::Runner => &[BASE, SPAWN, SOCKETS],
        // Its children are device workers: it carries what they need.
        ThreadKind::Spawner => &[BASE, SPAWN, SOCKETS, EVENTS, FUSE, DISK],
        // It starts the vCPUs, so it carries theirs.
        ThreadKind::Main => &[BASE, SPAWN, SOCKETS, EVENTS, FILES, &[libc::SYS_kill]],
    };
    let mut all: Vec<i64> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Failures installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter could not be compiled.
    #[error("cannot compile the {kind} thread's syscall filter: {why}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// What the compiler said.
        why: String,
    },
    /// A filter could not be installed.
    #[error("cannot install the {kind} thread's syscall filter: {why}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// What failed.
        why: String,
    },
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// Capabilities could not be dropped.
    #[error("cannot drop capabilities: {0}")]
    Caps(String),
    /// The spawner thread could not be started.
    #[error("cannot start the device spawner thread")]
    Spawner(#[source] std::io::Error),
}

/// The filter of `kind`: its list allowed, anything else trapped.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError::Compile {
        kind: kind.name(),
        why: e.to_string(),
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls(kind)
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

struct Settings {
    filters: HashMap<ThreadKind, BpfProgram>,
    violation: Option<ThreadKind>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

thread_local! {
    /// This thread's kind (`u8::MAX`: none yet), for the `SIGSYS` handler.
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Capabilities the VMM keeps: what the passthrough filesystem needs to serve files of
/// every owner as the guest's users (and the overlay's whiteouts and file capabilities),
/// and binding published ports below 1024.
const KEPT_CAPS: [caps::Capability; 10] = [
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_SETFCAP,
    caps::Capability::CAP_NET_BIND_SERVICE,
];

/// Drops every capability but [`KEPT_CAPS`] from this thread (and so from every thread it
/// makes later), bounding set included, and sets no-new-privileges.
pub fn drop_privileges() -> Result<(), SeccompError> {
    let err = |e: caps::errors::CapsError| SeccompError::Caps(e.to_string());
    let keep: caps::CapsHashSet = KEPT_CAPS.into_iter().collect();
    if caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false)
    {
        for c in caps::all() {
            if !keep.contains(&c) {
                caps::drop(None, caps::CapSet::Bounding, c).map_err(err)?;
            }
        }
    }
    let _ = caps::clear(None, caps::CapSet::Ambient);
    let permitted = caps::read(None, caps::CapSet::Permitted).map_err(err)?;
    let kept: caps::CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, caps::CapSet::Inheritable, &caps::CapsHashSet::new()).map_err(err)?;
    caps::set(None, caps::CapSet::Effective, &kept).map_err(err)?;
    caps::set(None, caps::CapSet::Permitted, &kept).map_err(err)?;
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SeccompError::Caps(format!(
            "no_new_privs: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Compiles every filter, installs the `SIGSYS` handler, and makes every thread that
/// starts from now on install its kind's filter (and device workers start from the
/// spawner thread). `violation`: the test hook's kind. Call once, before any thread but
/// the main one exists.
pub fn install(violation: Option<ThreadKind>) -> Result<(), SeccompError> {
    let mut filters = HashMap::new();
    for kind in ThreadKind::ALL {
        filters.insert(kind, compile(kind)?);
    }
    install_sigsys_handler()?;
    let _ = SETTINGS.set(Settings { filters, violation });
    msb_devices::threads::set_start_hook(on_thread_start);
    msb_devices::threads::Spawner::install(SPAWNER_THREAD).map_err(SeccompError::Spawner)?;
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (nothing when [`install`] was not
/// called: filters are off).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(settings) = SETTINGS.get() else {
        return Ok(());
    };
    let Some(prog) = settings.filters.get(&kind) else {
        return Ok(());
    };
    KIND.with(|k| k.set(kind.index()));
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install {
        kind: kind.name(),
        why: e.to_string(),
    })?;
    if settings.violation == Some(kind) {
        tracing::warn!(
            "test hook: the {} thread makes a syscall outside its filter",
            kind.name()
        );
        // SAFETY: ptrace(PTRACE_TRACEME) takes no pointers; the filter traps it before
        // the kernel acts on it.
        unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    }
    Ok(())
}

/// The start hook: the thread's kind's filter, or the end of the process (a thread that
/// cannot be confined must not run).
fn on_thread_start(name: &str) {
    let kind = ThreadKind::of_thread(name).unwrap_or(ThreadKind::Main);
    if let Err(e) = apply(kind) {
        eprintln!("msb-vmm: error: thread {name}: {e}");
        std::process::exit(125);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; sigemptyset and sigaction
    // only read and write the struct we own; the handler is an `extern "C"` function that
    // only makes async-signal-safe syscalls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Appends the decimal digits of `n` to `buf` at `at`; the new end.
fn put_num(buf: &mut [u8], mut at: usize, n: i64) -> usize {
    if n < 0 {
        at = put(buf, at, b"-");
    }
    let mut digits = [0u8; 20];
    let mut v = n.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in (0..len).rev() {
        at = put(buf, at, &[digits[i]]);
    }
    at
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    let n = s.len().min(buf.len().saturating_sub(at));
    buf[at..at + n].copy_from_slice(&s[..n]);
    at + n
}

/// The line the handler writes for a denied `nr` on a thread of `kind` (no allocation).
pub fn violation_line(buf: &mut [u8], kind: u8, nr: i64) -> usize {
    let name = ThreadKind::ALL
        .get(usize::from(kind))
        .map_or("unfiltered", |k| k.name());
    let mut at = put(buf, 0, b"msb-vmm: seccomp: the ");
    at = put(buf, at, name.as_bytes());
    at = put(buf, at, b" thread made syscall ");
    at = put_num(buf, at, nr);
    put(buf, at, b", outside its filter: the VMM dies of SIGSYS\n")
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The x86_64 `_sigsys` fields of siginfo: the caller's address at 16, then the
    // syscall number (int) at 24.
    // SAFETY: the kernel hands a SIGSYS handler a full siginfo_t (128 bytes); offset 24
    // holds the syscall number for SIGSYS from seccomp.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 160];
    let len = violation_line(&mut buf, kind, i64::from(nr));
    // SAFETY: write, signal, getpid, gettid and tgkill are async-signal-safe and in every
    // filter; `buf` outlives the write. With the default action restored, the SIGSYS sent
    // here ends the process once the handler returns.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_no_kind_may_exec_or_trace() {
        for kind in ThreadKind::ALL {
            compile(kind).expect("compiles");
            let list = syscalls(kind);
            for denied in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_unshare,
                libc::SYS_setns,
                libc::SYS_init_module,
                libc::SYS_bpf,
                libc::SYS_fork,
                libc::SYS_vfork,
            ] {
                assert!(!list.contains(&denied), "{kind:?} allows {denied}");
            }
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert!(!syscalls(ThreadKind::Vsock).contains(&libc::SYS_openat));
        assert!(!syscalls(ThreadKind::Fs).contains(&libc::SYS_socket));
    }

    #[test]
    fn threads_spawned_by_a_kind_keep_what_they_need() {
        let has_all = |parent: ThreadKind, child: ThreadKind| {
            let p = syscalls(parent);
            syscalls(child).iter().all(|n| p.contains(n))
        };
        assert!(has_all(ThreadKind::Main, ThreadKind::Vcpu));
        assert!(has_all(ThreadKind::Spawner, ThreadKind::Fs));
        assert!(has_all(ThreadKind::Spawner, ThreadKind::Net));
        assert!(has_all(ThreadKind::Spawner, ThreadKind::Block));
        assert!(!syscalls(ThreadKind::Block).contains(&libc::SYS_openat));
        assert!(!syscalls(ThreadKind::Block).contains(&libc::SYS_socket));
    }

    #[test]
    fn the_violation_line_names_the_thread_and_the_syscall() {
        let mut buf = [0u8; 160];
        let n = violation_line(&mut buf, ThreadKind::Vcpu.index(), 101);
        let line = std::str::from_utf8(&buf[..n]).expect("utf8");
        assert_eq!(
            line,
            "msb-vmm: seccomp: the vcpu thread made syscall 101, outside its filter: the VMM dies of SIGSYS\n"
        );
        let n = violation_line(&mut buf, u8::MAX, -1);
        assert!(std::str::from_utf8(&buf[..n])
            .expect("utf8")
            .contains("unfiltered thread made syscall -1"));
    }
}
