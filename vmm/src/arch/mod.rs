//! Architecture-specific code behind arch-neutral names.
//!
//! The rest of the VMM (`vm.rs`, `memory.rs`, `launch.rs`) reaches the architecture only
//! through the names re-exported here; only x86_64 exists today. Another architecture is
//! one module (`arch/aarch64/`) that provides the same names, plus its two `#[cfg]` lines
//! below. The names, which every architecture module provides:
//! - memory layout: [`ram_regions`] (guest RAM around the MMIO holes), [`split_ram`] (boot
//!   RAM and the blocks the guest adds later), where the legacy devices answer
//!   ([`CONSOLE_UART`] and [`CONSOLE_IRQ`]; [`I8042_PORTS`], `None` where there is no
//!   i8042) and the virtio-mmio windows and interrupts ([`VIRTIO_MMIO_BASE`],
//!   [`VSOCK_IRQ`], [`FIRST_FS_IRQ`]..=[`LAST_IRQ`]);
//! - kernel loading and boot setup: [`load_kernel`] (kernel, initrd, command line, boot
//!   information, and however the architecture announces the virtio-mmio devices),
//!   [`load_code`] (raw test code, started in a [`CodeMode`]), [`BootError`];
//! - vCPU setup: [`CpuStart`] (how the boot vCPU starts, from the loaders), [`VcpuSetup`]
//!   (what `HypervisorVcpu::configure` takes; it has a `pub id: u8`) and [`vcpu_setups`]
//!   (the setups of all vCPUs, asking the hypervisor what it needs, e.g. CPUID on x86);
//! - CPU profile: [`CpuProfile`] (`for_host`, `kernel_args`).
//!
//! The types every architecture shares ([`KernelBoot`], [`VirtioMmioSlot`],
//! [`CodePlacement`]) are defined here.

use std::path::Path;

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
use self::x86_64 as current;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("msb-vmm has architecture code for x86_64 only (see src/arch/mod.rs)");

pub use current::{
    layout::{
        ram_regions, split_ram, CONSOLE_IRQ, CONSOLE_UART, FIRST_FS_IRQ, I8042_PORTS, LAST_IRQ,
        VIRTIO_MMIO_BASE, VSOCK_IRQ,
    },
    load_code, load_kernel, vcpu_setups, BootError, CodeMode, CpuProfile, CpuStart, VcpuSetup,
};

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelBoot<'a> {
    /// Kernel image (x86_64: ELF vmlinux with a PVH note, or bzImage).
    pub kernel: &'a Path,
    /// Initial ramdisk, if any.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (x86_64: for the MP table).
    pub vcpus: u8,
    /// The RAM the guest's memory map shows at boot, as (start, length) ranges
    /// ([`split_ram`]); the rest of guest memory is added by the guest later.
    pub ram: &'a [(u64, u64)],
}

/// A virtio-mmio device as the guest kernel is told about it: its window and interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Base of the MMIO window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// Raw test code that does not fit its CPU mode or guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodePlacement {
    /// The guest address that does not fit.
    pub addr: u64,
}
