//! Guest physical memory layout (x86_64). See `docs/design.md`, "Memory layout".

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

#[cfg(test)]
mod tests {
    use super::*;

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
