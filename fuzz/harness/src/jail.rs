//! Where the targets that write files (fuse, layer, archive) do their work: a worker
//! thread with its own mount namespace and root directory (`chroot`), on a private tmpfs of
//! [`JAIL_BYTES`].
//!
//! These targets run as root (the FUSE server switches its fsuid per request, the
//! unpacker restores owners), and what they fuzz is exactly the code that keeps guest
//! requests and image entries inside one directory. If the fuzzer finds a way out, it
//! should land in the jail, not on the host: a path that climbs out of its directory
//! reaches the tmpfs root, where [`check_clean`] sees it after the input. The tmpfs also
//! bounds the disk a guest's `fallocate` or an image bomb may take, and goes away with the
//! process.
//!
//! Only the worker thread is jailed: libFuzzer keeps writing its corpus from the main
//! thread, and coverage counters are shared by every thread. A crash on the worker makes
//! libFuzzer write the input from the worker, so the artifact directory (an absolute
//! `-artifact_prefix`, as cargo fuzz and scripts/fuzz give) is bind-mounted into the jail
//! at the same path. Without root (or without mount namespaces), or with `MSB_FUZZ_NO_JAIL` set
//! (to reproduce a crash with full symbols), the worker runs in a plain temporary
//! directory instead, with a warning.

use std::any::Any;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Size of the jail's tmpfs.
pub const JAIL_BYTES: u64 = 256 << 20;
/// Largest file any process of ours may write (a second bound, for the fallback without a
/// tmpfs; `SIGXFSZ` is ignored, so a larger write fails with `EFBIG`).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// A file at the jail's root that no input may change.
const SENTINEL: &str = "sentinel";
const SENTINEL_TEXT: &[u8] = b"outside every input's directory\n";

type Job = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;
type Outcome = std::thread::Result<Box<dyn Any + Send>>;

struct Jail {
    jobs: Mutex<mpsc::Sender<(Job, mpsc::SyncSender<Outcome>)>>,
    /// The directory inputs work under, as the worker sees it.
    base: PathBuf,
    /// Entries the jail's root may hold besides the sentinel: each directory on the way to
    /// the bind-mounted artifact directory, with its one child.
    allowed: Vec<(PathBuf, std::ffi::OsString)>,
}

static JAIL: OnceLock<Jail> = OnceLock::new();
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path")
}

fn check(what: &str, rc: libc::c_int) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

/// Bounds file sizes for the whole process.
fn limit_file_size() {
    let lim = libc::rlimit {
        rlim_cur: MAX_FILE_BYTES,
        rlim_max: MAX_FILE_BYTES,
    };
    // SAFETY: plain system calls on values we own; failure only leaves the defaults.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
    }
}

/// The directory libFuzzer writes a crashing input to, when given as an absolute
/// `-artifact_prefix` (cargo fuzz and scripts/fuzz give one). Without one, an input that
/// crashes the worker is written inside the jail and lost: rerun with a prefix.
fn artifact_dir() -> Option<PathBuf> {
    let p = std::env::args().find_map(|a| {
        a.strip_prefix("-artifact_prefix=")
            .or_else(|| a.strip_prefix("-exact_artifact_path="))
            .map(PathBuf::from)
    })?;
    if !p.is_absolute() {
        return None;
    }
    if p.as_os_str().as_encoded_bytes().ends_with(b"/") {
        Some(p)
    } else {
        p.parent().map(Path::to_path_buf)
    }
}

/// On the worker thread: a private mount namespace, a tmpfs over the existing directory
/// `mountpoint` (with `/proc` in it when `with_proc`, and `keep` bind-mounted at its own
/// path), and a chroot into it.
fn enter(mountpoint: &Path, with_proc: bool, keep: Option<&Path>) -> Result<(), String> {
    if std::env::var_os("MSB_FUZZ_NO_JAIL").is_some() {
        return Err("MSB_FUZZ_NO_JAIL is set".into());
    }
    if !is_root() {
        return Err("not root".into());
    }
    if let Some(k) = keep {
        std::fs::create_dir_all(k).map_err(|e| format!("mkdir {k:?}: {e}"))?;
    }
    let mp = cstr(mountpoint);
    let opts = CString::new(format!("size={JAIL_BYTES},mode=0755")).expect("no NUL");
    // SAFETY: system calls with valid NUL-terminated strings that outlive them. unshare
    // gives this thread (only) its own filesystem context and mount namespace; "/" is made
    // private first so that nothing mounted below propagates back to the host's namespace.
    unsafe {
        check("unshare", libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS))?;
        check(
            "make / private",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
    }
    // Opened in the new namespace (a bind's source must be in it) and before the tmpfs may
    // hide it; bound through /proc/self/fd below.
    let keep = match keep {
        Some(k) => Some((
            k,
            std::fs::File::open(k).map_err(|e| format!("open {k:?}: {e}"))?,
        )),
        None => None,
    };
    // SAFETY: as above.
    unsafe {
        check(
            "mount tmpfs",
            libc::mount(
                c"tmpfs".as_ptr(),
                mp.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            ),
        )?;
    }
    if with_proc {
        // fuse-backend-rs reopens its O_PATH handles through /proc/self/fd.
        let proc_dir = mountpoint.join("proc");
        std::fs::create_dir(&proc_dir).map_err(|e| format!("mkdir proc: {e}"))?;
        let p = cstr(&proc_dir);
        // SAFETY: as above.
        unsafe {
            check(
                "mount proc",
                libc::mount(
                    c"proc".as_ptr(),
                    p.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
            )?;
        }
    }
    if let Some((keep, dir)) = keep {
        use std::os::fd::AsRawFd;
        let inside = mountpoint.join(keep.strip_prefix("/").unwrap_or(keep));
        std::fs::create_dir_all(&inside).map_err(|e| format!("mkdir {inside:?}: {e}"))?;
        let from = cstr(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())));
        let to = cstr(&inside);
        // SAFETY: as above.
        unsafe {
            check(
                "bind the artifact directory",
                libc::mount(
                    from.as_ptr(),
                    to.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
            )?;
        }
    }
    // SAFETY: as above; chroot and chdir affect this thread only (CLONE_FS was unshared).
    unsafe {
        check("chroot", libc::chroot(mp.as_ptr()))?;
        check("chdir", libc::chdir(c"/".as_ptr()))?;
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn start(with_proc: bool) -> Jail {
    limit_file_size();
    let (jobs_tx, jobs_rx) = mpsc::channel::<(Job, mpsc::SyncSender<Outcome>)>();
    let (ready_tx, ready_rx) = mpsc::sync_channel::<(PathBuf, bool)>(1);
    let keep = artifact_dir();
    let keep_in_jail = keep.clone();
    std::thread::Builder::new()
        .name("jail".into())
        .spawn(move || {
            // The tmpfs goes over the temporary directory, in this thread's namespace only:
            // nothing is created on the host.
            let jailed = enter(&std::env::temp_dir(), with_proc, keep.as_deref());
            let base = match &jailed {
                Ok(()) => PathBuf::from("/"),
                Err(e) if is_root() && std::env::var_os("MSB_FUZZ_NO_JAIL").is_none() => {
                    // Root without a jail would fuzz file code against the host's files.
                    panic!(
                        "msb-fuzz: cannot set the jail up: {e} (MSB_FUZZ_NO_JAIL=1 to go without)"
                    )
                }
                Err(e) => {
                    let dir = tempfile::Builder::new()
                        .prefix("msb-fuzz-")
                        .tempdir()
                        .expect("temporary directory")
                        .keep();
                    eprintln!(
                        "msb-fuzz: no jail ({e}): file targets run in {} on the host",
                        dir.display()
                    );
                    dir
                }
            };
            std::fs::write(base.join(SENTINEL), SENTINEL_TEXT).expect("sentinel");
            ready_tx.send((base, jailed.is_ok())).expect("caller waits");
            for (job, done) in jobs_rx {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                let _ = done.send(outcome);
            }
        })
        .expect("jail thread");
    let (base, jailed) = ready_rx.recv().expect("jail set up");
    let mut allowed = Vec::new();
    if let (true, Some(keep)) = (jailed, keep_in_jail) {
        let mut dir = PathBuf::from("/");
        for part in keep.components().skip(1) {
            allowed.push((dir.clone(), part.as_os_str().to_os_string()));
            dir.push(part);
        }
    }
    Jail {
        jobs: Mutex::new(jobs_tx),
        base,
        allowed,
    }
}

/// Runs `f` on the jail's worker thread (set up on first use; `with_proc` mounts `/proc`
/// in it) and returns what it returns; a panic in `f` is a panic here.
pub fn run<R: Send + 'static>(with_proc: bool, f: impl FnOnce() -> R + Send + 'static) -> R {
    let jail = JAIL.get_or_init(|| start(with_proc));
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    // To check that a crash in the jail still leaves its input on the host.
    let selftest = std::env::var_os("MSB_FUZZ_JAIL_SELFTEST").is_some();
    let job: Job = Box::new(move || {
        assert!(!selftest, "MSB_FUZZ_JAIL_SELFTEST: a panic inside the jail");
        Box::new(f()) as Box<dyn Any + Send>
    });
    jail.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((job, done_tx))
        .expect("jail worker alive");
    match done_rx.recv().expect("jail worker answers") {
        Ok(r) => *r.downcast::<R>().expect("the job's own type"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A fresh directory for one input under the jail's root (call on the worker), removed
/// with everything in it on drop.
pub fn scratch() -> tempfile::TempDir {
    let base = &JAIL.get().expect("called from a jail job").base;
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    tempfile::Builder::new()
        .prefix(&format!("in{n}-"))
        .tempdir_in(base)
        .expect("scratch directory")
}

/// Panics if anything but the sentinel (and `/proc`, and the way to the artifact
/// directory) is at the jail's root, or the sentinel changed: an input wrote outside its
/// directory. Call on the worker after the input's directory is gone.
pub fn check_clean() {
    let jail = JAIL.get().expect("called from a jail job");
    let base = &jail.base;
    for (dir, child) in &jail.allowed {
        let stray: Vec<_> = std::fs::read_dir(dir)
            .expect("a directory on the way to the artifacts")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n != child && !(dir == base && (n == SENTINEL || n == "proc")))
            .collect();
        assert!(
            stray.is_empty(),
            "files appeared outside the input's directory, in {dir:?}: {stray:?}"
        );
    }
    let sentinel = std::fs::read(base.join(SENTINEL));
    assert!(
        sentinel.as_deref().ok() == Some(SENTINEL_TEXT),
        "the sentinel outside the input's directory changed: {sentinel:?}"
    );
    let stray: Vec<String> = std::fs::read_dir(base)
        .expect("jail root")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != SENTINEL && n != "proc")
        .filter(|n| {
            !jail
                .allowed
                .iter()
                .any(|(d, c)| d == base && c == n.as_str())
        })
        .collect();
    assert!(
        stray.is_empty(),
        "files appeared outside the input's directory: {stray:?}"
    );
}
