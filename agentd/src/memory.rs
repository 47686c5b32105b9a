//! RAM the guest adds after boot. The VMM leaves whole 128 MiB blocks of guest memory out
//! of the boot e820 map (`msb.hotmem=`, see `msb_protocol::bootcmd`), since setting RAM up
//! is guest kernel work per page, which is slow where that code is emulated. A thread of
//! the agent watches free memory and adds the next block through the kernel's memory
//! hotplug probe file when it runs low; the kernel puts it online itself
//! (`MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO`).

use std::time::Duration;

use msb_protocol::bootcmd::{self, HOTMEM_BLOCK, HOTMEM_KEY};

/// The kernel's memory hotplug probe file: writing a physical address adds the memory
/// block there.
const PROBE: &str = "/sys/devices/system/memory/probe";
/// The kernel's memory block size (hex bytes).
const BLOCK_SIZE: &str = "/sys/devices/system/memory/block_size_bytes";
/// How often free memory is looked at.
const INTERVAL: Duration = Duration::from_millis(500);

/// True when a guest with `free` of `total` bytes should add a block: when less than half
/// of its memory is free (a block takes ~2 s to add where guest kernel code is emulated,
/// so the margin must cover what a program allocates meanwhile).
pub fn should_add(free: u64, total: u64) -> bool {
    free.saturating_mul(2) < total
}

/// (free, total) bytes of RAM, from `sysinfo(2)` (cheap: no text to format, unlike
/// `/proc/meminfo`). Free is `MemFree`: the page cache counts as used.
fn free_and_total() -> Option<(u64, u64)> {
    let info = nix::sys::sysinfo::sysinfo().ok()?;
    let total = info.ram_total();
    Some((info.ram_unused(), total))
}

/// Starts the thread that adds the blocks the command line announces, if any.
pub fn start(cmdline: &str) {
    let Some(value) = bootcmd::find_param(cmdline, HOTMEM_KEY) else {
        return;
    };
    let Some(blocks) = bootcmd::decode_hotmem(value) else {
        crate::log(&format!("bad {HOTMEM_KEY}={value}"));
        return;
    };
    let size = std::fs::read_to_string(BLOCK_SIZE)
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
    if size != Some(HOTMEM_BLOCK) {
        crate::log(&format!(
            "memory blocks are {size:?} bytes, not {HOTMEM_BLOCK}: {} MiB stay unused",
            blocks.len() as u64 * (HOTMEM_BLOCK >> 20)
        ));
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("memory".into())
        .spawn(move || add_when_needed(blocks));
    if let Err(e) = spawned {
        crate::log(&format!("cannot watch memory: {e}"));
    }
}

fn add_when_needed(blocks: Vec<u64>) {
    let mut pending = blocks.into_iter();
    let mut next = pending.next();
    while let Some(addr) = next {
        std::thread::sleep(INTERVAL);
        let Some((free, total)) = free_and_total() else {
            continue;
        };
        if !should_add(free, total) {
            continue;
        }
        if let Err(e) = std::fs::write(PROBE, format!("{addr:#x}")) {
            crate::log(&format!("cannot add the memory block at {addr:#x}: {e}"));
        }
        next = pending.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_added_below_half_free() {
        const MIB: u64 = 1 << 20;
        assert!(!should_add(90 * MIB, 120 * MIB));
        assert!(!should_add(60 * MIB, 120 * MIB));
        assert!(should_add(59 * MIB, 120 * MIB));
        assert!(should_add(0, 120 * MIB));
        assert!(!should_add(0, 0));
    }
}
