//! The VMM's jail: before it opens anything the guest can reach, `msb-vmm` moves into its
//! own mount namespace whose root is an empty tmpfs holding only what this VM needs, each
//! at the path it has on the host (so no path in the launch changes): its shares (image
//! layers read-only), the kernel and initramfs (read-only), `/dev/kvm`, the directories of
//! its sockets, logs, metrics and records, `/etc/resolv.conf` when it has a network, and a
//! `/proc`. Whatever the guest makes the VMM resolve (a `..` the device missed, a symlink
//! a bug follows) finds nothing else of the host, as with Firecracker's jailer.
//!
//! A mount namespace is per thread until threads are made: [`enter`] must run while the
//! process has one thread, and every thread made later inherits the jail.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// Why the jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The process already has more than one thread (they would stay outside).
    #[error("cannot confine msb-vmm: it already runs {0} threads")]
    Threads(usize),
    /// A path the VM needs lies directly in `/` (its directory would be the whole host).
    #[error("cannot confine msb-vmm: {0} lies directly in / (put it in a directory of its own)")]
    InRoot(PathBuf),
    /// A step of making the jail failed.
    #[error("cannot confine msb-vmm: {step}")]
    Step {
        /// What was being done.
        step: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn step(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> JailError {
    let what = what.into();
    move |e| JailError::Step {
        step: what,
        source: e.into(),
    }
}

/// What the jail holds.
#[derive(Debug, Default, Clone)]
pub struct JailPlan {
    /// Host path -> read-only.
    entries: BTreeMap<PathBuf, bool>,
}

impl JailPlan {
    /// Adds a directory or file, read-only or not (a path added twice is writable if
    /// either asked for it).
    pub fn add(&mut self, path: &Path, readonly: bool) {
        let e = self.entries.entry(absolute(path)).or_insert(readonly);
        *e = *e && readonly;
    }

    /// Adds the directory of a file the VM creates or replaces (a socket, a log, a record
    /// written by rename).
    pub fn add_dir_of(&mut self, file: &Path) {
        let file = absolute(file);
        let dir = file
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        self.add(&dir, false);
    }

    /// The entries to bind, parents first; an entry inside a writable one with the same
    /// rights is left to its parent.
    pub fn binds(&self) -> Vec<(PathBuf, bool)> {
        let mut out: Vec<(PathBuf, bool)> = Vec::new();
        for (path, ro) in &self.entries {
            let covered = out
                .iter()
                .any(|(p, pro)| path.starts_with(p) && (!*pro || *ro == *pro));
            if !covered {
                out.push((path.clone(), *ro));
            }
        }
        out
    }
}

/// `p` made absolute against the current directory (lexically: `..` stays).
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

/// True when this process may make mount namespaces.
pub fn can_jail() -> bool {
    rustix::process::geteuid().is_root()
}

/// The jail, entered: the host directory it was made in is removed (through `parent`)
/// once the old root is gone.
#[derive(Debug)]
pub struct Jail {
    /// The bind mounts made, host path and read-only.
    pub binds: Vec<(PathBuf, bool)>,
}

/// Enters a jail holding `plan`. Must run before any thread is started.
pub fn enter(plan: &JailPlan) -> Result<Jail, JailError> {
    let n = threads();
    if n > 1 {
        return Err(JailError::Threads(n));
    }
    // What is missing stays missing in the jail: its user reports it as it would outside
    // (a missing KVM device, a log in a directory that does not exist).
    let binds: Vec<(PathBuf, bool)> = plan
        .binds()
        .into_iter()
        .filter(|(p, _)| std::fs::symlink_metadata(p).is_ok())
        .collect();
    for (p, _) in &binds {
        if p.parent().is_none() || p == Path::new("/") {
            return Err(JailError::InRoot(p.clone()));
        }
    }
    let cwd = std::env::current_dir().map_err(|source| JailError::Step {
        step: "reading the current directory".into(),
        source,
    })?;
    // The tmpfs that becomes the root is mounted on a fresh directory in the host's
    // temporary directory; the directory is removed once the jail is entered.
    let tmp = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = OsString::from(format!("msb-jail-{}-{nanos:x}", std::process::id()));
    let root = tmp.join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .map_err(|source| JailError::Step {
            step: format!("creating {}", root.display()),
            source,
        })?;
    let tmp_fd: OwnedFd = rustix::fs::open(&tmp, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        .map_err(step(format!("opening {}", tmp.display())))?;
    let made = build(&root, &binds, &cwd);
    // Gone from the host's view either way: in the namespace the jail is the root now, and
    // the directory it was mounted on is no longer a mount point.
    let _ = rustix::fs::unlinkat(&tmp_fd, &name, rustix::fs::AtFlags::REMOVEDIR);
    made?;
    Ok(Jail { binds })
}

fn build(root: &Path, binds: &[(PathBuf, bool)], cwd: &Path) -> Result<(), JailError> {
    // SAFETY: the process has one thread (checked by `enter`), so no other thread shares
    // the filesystem state this gives the calling thread its own copy of.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .map_err(step("making a mount namespace"))?;
    // Nothing mounted from here on reaches the host's namespace.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(step("making the mounts private"))?;
    rustix::mount::mount(
        "msb-jail",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=0755,size=1m",
    )
    .map_err(step("mounting the jail's tmpfs"))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for (path, ro) in binds {
        let target = inside(path);
        let dir = std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
        let made = if dir {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&target)
                        .map(drop)
                })
        };
        made.map_err(|source| JailError::Step {
            step: format!("making the mount point of {}", path.display()),
            source,
        })?;
        rustix::mount::mount_bind_recursive(path, &target)
            .map_err(step(format!("binding {}", path.display())))?;
        if *ro {
            rustix::mount::mount_remount(
                &target,
                MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                c"",
            )
            .map_err(step(format!("making {} read-only", path.display())))?;
        }
    }
    let proc_dir = inside(Path::new("/proc"));
    std::fs::create_dir_all(&proc_dir).map_err(|source| JailError::Step {
        step: "making /proc".into(),
        source,
    })?;
    rustix::mount::mount(
        "proc",
        &proc_dir,
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"",
    )
    .map_err(step("mounting /proc"))?;
    // Relative paths keep meaning what they meant: the current directory exists in the
    // jail (empty unless something in it was bound).
    let _ = std::fs::create_dir_all(inside(cwd));
    // The old root is stacked on the new one, then detached.
    rustix::process::chdir(root).map_err(step("entering the jail"))?;
    rustix::process::pivot_root(".", ".").map_err(step("pivot_root"))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(step("detaching the host's root"))?;
    rustix::process::chdir(cwd)
        .or_else(|_| rustix::process::chdir("/"))
        .map_err(step("entering the current directory"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_are_parents_first_and_writable_parents_cover_their_children() {
        let mut p = JailPlan::default();
        p.add(Path::new("/s/box/rw"), false);
        p.add_dir_of(Path::new("/s/box/console.log"));
        p.add(Path::new("/img/l1"), true);
        p.add(Path::new("/img/l1/sub"), true);
        p.add(Path::new("/s/box/layer"), true);
        p.add(Path::new("/k/vmlinux"), true);
        p.add(Path::new("/k/vmlinux"), false);
        assert_eq!(
            p.binds(),
            vec![
                (PathBuf::from("/img/l1"), true),
                (PathBuf::from("/k/vmlinux"), false),
                (PathBuf::from("/s/box"), false),
            ]
        );
        let mut q = JailPlan::default();
        q.add(Path::new("/ro"), true);
        q.add(Path::new("/ro/rw"), false);
        assert_eq!(
            q.binds(),
            vec![
                (PathBuf::from("/ro"), true),
                (PathBuf::from("/ro/rw"), false)
            ],
            "a writable child of a read-only entry keeps its own mount"
        );
    }
}
