//! Switching to the sandbox's root filesystem and mounting its volumes.
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

use msb_protocol::bootcmd::{self, GuestMount, MOUNT_KEY, ROOT_KEY, ROOT_TAG};
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
    for d in ["dev", "proc", "sys"] {
        let target = format!("{NEW_ROOT}/{d}");
        mkdir(&target)?;
        do_mount(&format!("/{d}"), &target, None, MsFlags::MS_MOVE, None)?;
    }
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("cannot enter {NEW_ROOT}: {e}"))?;
    do_mount(".", "/", None, MsFlags::MS_MOVE, None)?;
    nix::unistd::chroot(".").map_err(|e| format!("cannot chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter /: {e}"))?;
    Ok(true)
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
    fn overlay_lists_the_top_layer_first() {
        assert_eq!(
            overlay_options(3),
            "lowerdir=/mnt/msb-fs/l/2:/mnt/msb-fs/l/1:/mnt/msb-fs/l/0,\
             upperdir=/mnt/msb-fs/rw/upper,workdir=/mnt/msb-fs/rw/work,userxattr"
        );
    }
}
