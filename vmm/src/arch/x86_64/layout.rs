//! Guest physical memory layout (x86_64) and where the devices answer. See
//! `docs/design.md`, "Memory layout".

use crate::bus::{Space, Window};

/// GDT written by the VMM for 32-bit entry (5 entries: null, null, code 0x10, data 0x18,
/// TSS 0x20; the selectors match the Linux 32-bit boot protocol).
pub const GDT_ADDR: u64 = 0x500;
/// The VMM's boot stub: marks the first guest instruction, then jumps to the kernel.
pub const BOOT_STUB_ADDR: u64 = 0x600;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux zero page (bzImage boot).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line the x86 kernel accepts (COMMAND_LINE_SIZE), NUL included.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: kernels load at or above this.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap: no RAM between these addresses.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM's three-page TSS area (inside the gap, below the IOAPIC).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IOAPIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// The kernel console: COM1, eight I/O ports at 0x3f8.
pub const CONSOLE_UART: Window = Window {
    space: Space::Pio,
    base: 0x3f8,
    len: 8,
};
/// The console's interrupt line (ISA IRQ 4).
pub const CONSOLE_IRQ: u32 = 4;
/// The i8042: data port 0x60, command port 0x64. Its reset command is how the guest
/// reboots (`reboot=k`).
pub const I8042_PORTS: Option<Window> = Some(Window {
    space: Space::Pio,
    base: 0x60,
    len: 5,
});
/// First virtio-mmio window (right after the system device): the vsock device's.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_1000;
/// The vsock device's interrupt line.
pub const VSOCK_IRQ: u32 = 5;
/// virtio-fs devices follow the vsock window, one window and one interrupt each (IOAPIC
/// pins 6 to 23; the MP table routes all 24).
pub const FIRST_FS_IRQ: u32 = 6;
/// The last interrupt line a virtio-fs device may have.
pub const LAST_IRQ: u32 = 23;

// The fixed areas must not overlap; checked at compile time.
const _: () = {
    assert!(GDT_ADDR + 5 * 8 <= BOOT_STUB_ADDR);
    assert!(BOOT_STUB_ADDR + 64 <= PVH_INFO_ADDR);
    assert!(PVH_MEMMAP_ADDR + 8 * 24 <= ZERO_PAGE_ADDR);
    assert!(ZERO_PAGE_ADDR + 4096 <= CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
    assert!(msb_protocol::sysdev::SYSDEV_BASE >= MMIO_GAP_START);
};

/// Guest RAM regions for `size` bytes of memory: split around the MMIO gap.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

/// Size and alignment of a block of RAM the guest adds after boot: x86_64 Linux's memory
/// block (one 128 MiB sparsemem section), the unit its memory hotplug adds; the agent reads
/// the same constant from the protocol crate.
pub use msb_protocol::bootcmd::HOTMEM_BLOCK as HOTPLUG_BLOCK;

/// The RAM of a `size`-byte guest split into what its e820 map shows at boot and the
/// blocks it adds later (start addresses, each [`HOTPLUG_BLOCK`] long and aligned). With
/// `boot_limit`, every whole aligned block above that address is held back; the rest (the
/// RAM below it and pieces shorter than a block, which cannot be added later) is boot RAM.
/// Without one, all RAM is boot RAM.
pub fn split_ram(size: u64, boot_limit: Option<u64>) -> (Vec<(u64, u64)>, Vec<u64>) {
    let (mut boot, mut held) = (Vec::new(), Vec::new());
    for (start, len) in ram_regions(size) {
        let end = start + len;
        let Some(limit) = boot_limit else {
            boot.push((start, len));
            continue;
        };
        let first = start.max(limit).next_multiple_of(HOTPLUG_BLOCK);
        let mut b = first;
        while b.checked_add(HOTPLUG_BLOCK).is_some_and(|e| e <= end) {
            held.push(b);
            b += HOTPLUG_BLOCK;
        }
        if b == first {
            boot.push((start, len));
            continue;
        }
        if first > start {
            boot.push((start, first - start));
        }
        if end > b {
            boot.push((b, end - b));
        }
    }
    (boot, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn without_a_limit_all_ram_boots() {
        assert_eq!(split_ram(512 * MIB, None), (vec![(0, 512 * MIB)], vec![]));
    }

    #[test]
    fn whole_blocks_above_the_limit_are_held_back() {
        assert_eq!(
            split_ram(512 * MIB, Some(128 * MIB)),
            (vec![(0, 128 * MIB)], vec![128 * MIB, 256 * MIB, 384 * MIB])
        );
        // A tail shorter than a block cannot be added later: it boots.
        assert_eq!(
            split_ram(600 * MIB, Some(128 * MIB)),
            (
                vec![(0, 128 * MIB), (512 * MIB, 88 * MIB)],
                vec![128 * MIB, 256 * MIB, 384 * MIB]
            )
        );
        // Nothing whole above the limit: everything boots.
        assert_eq!(
            split_ram(192 * MIB, Some(128 * MIB)),
            (vec![(0, 192 * MIB)], vec![])
        );
        // A limit that is not block aligned holds back from the next block on.
        assert_eq!(
            split_ram(512 * MIB, Some(100 * MIB)),
            (vec![(0, 128 * MIB)], vec![128 * MIB, 256 * MIB, 384 * MIB])
        );
    }

    #[test]
    fn blocks_on_both_sides_of_the_gap_are_held_back() {
        let (boot, held) = split_ram(4 << 30, Some(128 * MIB));
        assert_eq!(boot, vec![(0, 128 * MIB)]);
        let below = (MMIO_GAP_START - 128 * MIB) / HOTPLUG_BLOCK;
        let above = ((4 << 30) - MMIO_GAP_START) / HOTPLUG_BLOCK;
        assert_eq!(held.len() as u64, below + above);
        assert!(held.iter().all(|b| b % HOTPLUG_BLOCK == 0));
        assert!(held
            .iter()
            .all(|b| *b + HOTPLUG_BLOCK <= MMIO_GAP_START || *b >= MMIO_GAP_END));
    }

    #[test]
    fn regions_split_around_the_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
