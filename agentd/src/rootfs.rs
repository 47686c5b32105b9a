//! Switching to the sandbox's root filesystem and mounting its volumes.
//!
//! A disk root (`msb.rootdisk=`) is simpler: the virtio-blk disk whose serial the word
//! names is mounted as it is (its filesystem read off it unless given) and becomes `/`;
//! disk volumes are found the same way, by serial in `/sys/block/vd*/serial`.
//!
//! The VMM shares the root as the virtio-fs tag [`ROOT_TAG`]: read-only image layers at
//! `/l/0` (bottom) to `/l/N-1` and the writable layer at `/rw` (see
//! `msb_protocol::bootcmd`). The agent mounts it, stacks an overlay of the layers under
//! `/rw/upper`, moves `/dev`, `/proc` and `/sys` into it and makes it `/`. The raw share
//! stays mounted only in the abandoned initramfs, where no path from the new root leads
//! (guest root could still mount the tag itself; the device keeps the layers read-only
//! whatever it does). Volumes
//! and tmpfs mounts follow, inside the new root, so image symlinks resolve as the image
//! means them.

use std::path::Path;

use msb_protocol::bootcmd::{
    self, DiskRoot, GuestMount, MOUNT_KEY, ROOT_DISK_KEY, ROOT_KEY, ROOT_TAG,
};
use nix::mount::{mount, MsFlags};

/// Where the share and the overlay go before the switch (inside the initramfs).
const SHARE_DIR: &str = "/mnt/msb-fs";
const NEW_ROOT: &str = "/mnt/msb-root";

fn mkdir(p: &str) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("cannot create {p}: {e}"))
}

fn do_mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(Some(source), target, fstype, flags, data).map_err(|e| {
        format!(
            "cannot mount {} ({source}) on {target}: {e}",
            fstype.unwrap_or("a move")
        )
    })
}

/// The overlayfs options for `layers` read-only layers under the share at [`SHARE_DIR`]:
/// the top layer first, as overlayfs lists them; `userxattr` keeps overlayfs' markers in
/// `user.overlay.*`, which the host side can set without privileges.
pub fn overlay_options(layers: usize) -> String {
    let lower: Vec<String> = (0..layers)
        .rev()
        .map(|i| format!("{SHARE_DIR}/l/{i}"))
        .collect();
    format!(
        "lowerdir={},upperdir={SHARE_DIR}/rw/upper,workdir={SHARE_DIR}/rw/work,userxattr",
        lower.join(":")
    )
}

/// Switches to the root filesystem the command line announces; `Ok(false)` when it
/// announces none (the initramfs stays the root).
pub fn switch_root(cmdline: &str) -> Result<bool, String> {
    if let Some(v) = bootcmd::find_param(cmdline, ROOT_DISK_KEY) {
        let root = DiskRoot::decode(v).ok_or_else(|| format!("bad {ROOT_DISK_KEY}={v}"))?;
        mkdir(NEW_ROOT)?;
        mount_disk(
            &root.serial,
            root.fstype.as_deref(),
            NEW_ROOT,
            root.readonly,
            MsFlags::empty(),
        )?;
        enter(NEW_ROOT)?;
        return Ok(true);
    }
    let Some(n) = bootcmd::find_param(cmdline, ROOT_KEY) else {
        return Ok(false);
    };
    let layers: usize = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("bad {ROOT_KEY}={n}"))?;
    mkdir(SHARE_DIR)?;
    mkdir(NEW_ROOT)?;
    do_mount(
        ROOT_TAG,
        SHARE_DIR,
        Some("virtiofs"),
        MsFlags::empty(),
        None,
    )?;
    let opts = overlay_options(layers);
    do_mount(
        "overlay",
        NEW_ROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(&opts),
    )?;
    enter(NEW_ROOT)?;
    Ok(true)
}

/// Moves `/dev`, `/proc` and `/sys` into `new_root` and makes it `/`.
fn enter(new_root: &str) -> Result<(), String> {
    for d in ["dev", "proc", "sys"] {
        let target = format!("{new_root}/{d}");
        mkdir(&target)?;
        do_mount(&format!("/{d}"), &target, None, MsFlags::MS_MOVE, None)?;
    }
    std::env::set_current_dir(new_root).map_err(|e| format!("cannot enter {new_root}: {e}"))?;
    do_mount(".", "/", None, MsFlags::MS_MOVE, None)?;
    nix::unistd::chroot(".").map_err(|e| format!("cannot chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter /: {e}"))?;
    Ok(())
}

/// Before the VM ends: every disk filesystem (the root and disk volumes) remounted
/// read-only, so its journal is clean and the next mount has nothing to recover (a
/// recovery is kernel work, slow where guest kernel code is emulated). Processes that
/// still hold files open for writing are killed first; nothing runs after this.
pub fn settle_disks() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut disks: Vec<String> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, path) = (f.next()?, f.next()?);
            dev.starts_with("/dev/vd").then(|| path.to_string())
        })
        .collect();
    if disks.is_empty() {
        return;
    }
    // Deepest first: a volume before the root it sits in.
    disks.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    nix::unistd::sync();
    for path in disks {
        let path = path.replace("\\040", " ");
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        // Killed processes close their files as they exit: a few tries.
        for _ in 0..20 {
            match mount(
                None::<&str>,
                path.as_str(),
                None::<&str>,
                flags,
                None::<&str>,
            ) {
                Err(nix::errno::Errno::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                _ => break,
            }
        }
    }
}

/// How long a disk may take to show up in `/sys/block` (the driver probes while the kernel
/// boots, so it is there before init; this is a margin).
const DISK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The `/dev` node of the virtio-blk disk whose serial is `serial`.
pub fn find_disk(serial: &str) -> Result<String, String> {
    let deadline = std::time::Instant::now() + DISK_WAIT;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with("vd") {
                    continue;
                }
                let found = std::fs::read(e.path().join("serial")).unwrap_or_default();
                let found = String::from_utf8_lossy(&found);
                if found.trim_end_matches(['\0', '\n']) == serial {
                    return Ok(format!("/dev/{name}"));
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "no disk with serial {serial} (is virtio-blk in the kernel?)"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The filesystem a disk's first blocks say it holds: ext2/3/4 (mounted as `ext4`) or
/// xfs; `None` for anything else.
pub fn detect_fstype(head: &[u8]) -> Option<&'static str> {
    // ext2/3/4: the superblock at 1024, its magic 0xEF53 at offset 56 of it.
    if head.get(1080..1082) == Some(&[0x53, 0xef]) {
        return Some("ext4");
    }
    if head.get(0..4) == Some(b"XFSB") {
        return Some("xfs");
    }
    None
}

/// Mounts the disk with `serial` at `target` (its filesystem read off it when `fstype` is
/// `None`).
fn mount_disk(
    serial: &str,
    fstype: Option<&str>,
    target: &str,
    readonly: bool,
    mut flags: MsFlags,
) -> Result<(), String> {
    let dev = find_disk(serial)?;
    let fstype = match fstype {
        Some(f) => f.to_string(),
        None => {
            let mut head = vec![0u8; 4096];
            let n = std::fs::File::open(&dev)
                .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                .map_err(|e| format!("cannot read {dev}: {e}"))?;
            detect_fstype(&head[..n])
                .ok_or_else(|| {
                    format!(
                        "no ext4 or xfs filesystem found on disk {serial} ({dev}); give its \
                         filesystem type"
                    )
                })?
                .to_string()
        }
    };
    // Read-only: a journal left dirty (a VMM killed before the agent settled the disk)
    // cannot be replayed on a read-only device; mount without replaying it.
    let data = match (readonly, fstype.as_str()) {
        (true, "ext4") => Some("noload"),
        (true, "xfs") => Some("norecovery"),
        _ => None,
    };
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    do_mount(&dev, target, Some(&fstype), flags, data)
}

/// Mounts every volume and tmpfs the command line announces, in order (the VMM puts
/// parents first). Mount points are created as needed; every mount is nosuid and nodev.
pub fn mount_volumes(cmdline: &str) -> Result<(), String> {
    for value in bootcmd::find_all(cmdline, MOUNT_KEY) {
        let m = GuestMount::decode(value).ok_or_else(|| format!("bad {MOUNT_KEY}={value}"))?;
        let path = m.path();
        if !path.starts_with('/') || Path::new(path).components().any(|c| c.as_os_str() == "..") {
            return Err(format!("bad mount path {path:?}"));
        }
        mkdir(path)?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        match &m {
            GuestMount::Virtiofs { tag, readonly, .. } => {
                if *readonly {
                    flags |= MsFlags::MS_RDONLY;
                }
                do_mount(tag, path, Some("virtiofs"), flags, None)?;
            }
            GuestMount::Disk {
                serial,
                fstype,
                readonly,
                ..
            } => mount_disk(serial, fstype.as_deref(), path, *readonly, flags)?,
            GuestMount::Tmpfs {
                size_mib, readonly, ..
            } => {
                if *readonly {
                    flags |= MsFlags::MS_RDONLY;
                }
                let data = match size_mib {
                    Some(s) => format!("mode=1777,size={s}m"),
                    None => "mode=1777".to_string(),
                };
                do_mount("tmpfs", path, Some("tmpfs"), flags, Some(&data))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystems_are_read_off_the_superblock() {
        let mut ext = vec![0u8; 4096];
        ext[1080] = 0x53;
        ext[1081] = 0xef;
        assert_eq!(detect_fstype(&ext), Some("ext4"));
        let mut xfs = vec![0u8; 4096];
        xfs[..4].copy_from_slice(b"XFSB");
        assert_eq!(detect_fstype(&xfs), Some("xfs"));
        assert_eq!(detect_fstype(&[0u8; 4096]), None);
        assert_eq!(detect_fstype(&[0u8; 10]), None);
    }

    #[test]
    fn overlay_lists_the_top_layer_first() {
        assert_eq!(
            overlay_options(3),
            "lowerdir=/mnt/msb-fs/l/2:/mnt/msb-fs/l/1:/mnt/msb-fs/l/0,\
             upperdir=/mnt/msb-fs/rw/upper,workdir=/mnt/msb-fs/rw/work,userxattr"
        );
    }
}
