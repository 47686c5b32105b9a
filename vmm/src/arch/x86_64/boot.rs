//! Loading the guest: kernel (PVH ELF `vmlinux`, or a bzImage as the fallback), initrd,
//! command line, boot information, GDT, MP table and the VMM's boot stub; or raw test code.
//!
//! Both protocols enter the kernel in flat 32-bit protected mode with paging off, so the
//! vCPU setup is shared; only the boot information differs (PVH `hvm_start_info` in `ebx`,
//! or the Linux zero page in `esi`). Either way the vCPU first runs the boot stub, which
//! writes the system device's first-instruction register and jumps to the kernel.

use std::fs::File;
use std::path::PathBuf;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use msb_protocol::sysdev::{REG_FIRST_INSN, SYSDEV_BASE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::CpuStart;
use super::layout::*;
use super::{mptable, regs};
use crate::arch::{CodePlacement, KernelBoot, VirtioMmioSlot};

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE: u64 = 0x1000;

/// Failures loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// The kernel path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF `vmlinux` nor a bzImage.
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat {
        /// The kernel path.
        path: PathBuf,
    },
    /// The ELF kernel has no PVH entry point (built without CONFIG_PVH).
    #[error("ELF kernel {path} has no PVH entry note (build it with CONFIG_PVH=y)")]
    NoPvhEntry {
        /// The kernel path.
        path: PathBuf,
    },
    /// The kernel is in a known format but could not be loaded (e.g. too big for memory).
    #[error("cannot load kernel {path}")]
    KernelLoad {
        /// The kernel path.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// The initrd path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd of {size} bytes does not fit in guest memory above the kernel (room: {room} bytes); give the VM more memory")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Space available.
        room: u64,
    },
    /// The kernel command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing boot data into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The MP table could not be built.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    val: T,
    addr: u64,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, source })
}

fn write_bytes(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    addr: u64,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { what, source })
}

/// The e820 map for the boot RAM `ram`: low RAM, the EBDA/BIOS hole, then the rest of the
/// ranges (up to the MMIO gap and above 4 GiB).
fn e820_map(ram: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram {
        let end = start + len;
        let start = (*start).max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// The stub the vCPU runs first (32-bit code): mark the first instruction on the system
/// device, then jump to `entry`. It touches only `eax`, so `ebx`/`esi` reach the kernel.
pub fn boot_stub(entry: u32) -> Vec<u8> {
    let mark = (SYSDEV_BASE + REG_FIRST_INSN) as u32;
    let mut code = vec![0xc6, 0x05]; // mov byte [mark], 1
    code.extend_from_slice(&mark.to_le_bytes());
    code.push(1);
    code.push(0xb8); // mov eax, entry
    code.extend_from_slice(&entry.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xe0]); // jmp eax
    code
}

/// Highest address an initrd may end at, and the lowest it may start at.
fn place_initrd(
    ram: &[(u64, u64)],
    size: u64,
    kernel_end: u64,
    max_end: u64,
) -> Result<u64, BootError> {
    // The end of the boot RAM range the kernel is in.
    let low_end = ram
        .iter()
        .filter(|(start, len)| *start <= kernel_end && start + len <= MMIO_GAP_START)
        .map(|(start, len)| start + len)
        .max()
        .unwrap_or(0)
        .min(max_end);
    let lowest = kernel_end.next_multiple_of(PAGE);
    let room = low_end.saturating_sub(lowest);
    if size > room {
        return Err(BootError::InitrdTooLarge { size, room });
    }
    Ok((low_end - size) & !(PAGE - 1))
}

/// Loads everything into `mem` and returns how the boot vCPU starts.
pub fn load(mem: &GuestMemoryMmap, boot: &KernelBoot<'_>) -> Result<CpuStart, BootError> {
    let path = boot.kernel.to_path_buf();
    let mut file = File::open(boot.kernel).map_err(|source| BootError::KernelOpen {
        path: path.clone(),
        source,
    })?;

    let cmdline_len = boot.cmdline.len() + 1;
    if cmdline_len > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline_len,
            max: CMDLINE_MAX,
        });
    }

    let himem = Some(GuestAddress(HIMEM_START));
    let (start_kind, loaded) = match Elf::load(mem, None, &mut file, himem) {
        Ok(res) => match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (Some(entry.raw_value()), res),
            _ => return Err(BootError::NoPvhEntry { path }),
        },
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            match BzImage::load(mem, None, &mut file, himem) {
                Ok(res) => (None, res),
                Err(loader::Error::Bzimage(
                    loader::bzimage::Error::InvalidBzImage
                    | loader::bzimage::Error::ReadBzImageHeader,
                )) => return Err(BootError::KernelFormat { path }),
                Err(source) => return Err(BootError::KernelLoad { path, source }),
            }
        }
        Err(source) => return Err(BootError::KernelLoad { path, source }),
    };

    // Initrd: at the top of low memory, above the kernel.
    let initrd = match boot.initrd {
        Some(p) => {
            let data = std::fs::read(p).map_err(|source| BootError::InitrdRead {
                path: p.to_path_buf(),
                source,
            })?;
            let max_end = loaded
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max) + 1)
                .unwrap_or(MMIO_GAP_START);
            let addr = place_initrd(boot.ram, data.len() as u64, loaded.kernel_end, max_end)?;
            write_bytes(mem, &data, addr, "initrd")?;
            Some((addr, data.len() as u64))
        }
        None => None,
    };

    let mut cmdline = boot.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write_bytes(mem, &cmdline, CMDLINE_ADDR, "kernel command line")?;
    let gdt: Vec<u8> = regs::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    write_bytes(mem, &gdt, GDT_ADDR, "GDT")?;
    write_bytes(
        mem,
        &mptable::build(boot.vcpus, EBDA_START)?,
        EBDA_START,
        "MP table",
    )?;
    let e820 = e820_map(boot.ram);

    let (entry, ebx, esi) = match start_kind {
        Some(entry) => {
            let mut info = hvm_start_info {
                magic: PVH_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_ADDR,
                memmap_paddr: PVH_MEMMAP_ADDR,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            if let Some((addr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_ADDR;
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                write(mem, module, PVH_MODLIST_ADDR, "PVH module list")?;
            }
            for (i, (addr, size, type_)) in e820.iter().enumerate() {
                let entry = hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: *type_,
                    reserved: 0,
                };
                write(
                    mem,
                    entry,
                    PVH_MEMMAP_ADDR + 24 * i as u64,
                    "PVH memory map",
                )?;
            }
            write(mem, info, PVH_INFO_ADDR, "PVH start info")?;
            (entry, PVH_INFO_ADDR, 0)
        }
        None => {
            // Linux 32-bit boot protocol (Documentation/arch/x86/boot.rst).
            let mut params = boot_params::default();
            if let Some(hdr) = loaded.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = 0xff;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = boot.cmdline.len() as u32;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (i, (addr, size, type_)) in e820.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    type_: *type_,
                };
            }
            params.e820_entries = e820.len() as u8;
            write(mem, params, ZERO_PAGE_ADDR, "zero page")?;
            (loaded.kernel_load.raw_value(), 0, ZERO_PAGE_ADDR)
        }
    };
    write_bytes(mem, &boot_stub(entry as u32), BOOT_STUB_ADDR, "boot stub")?;
    Ok(CpuStart::Protected32 {
        entry: BOOT_STUB_ADDR,
        gdt: GDT_ADDR,
        ebx,
        esi,
    })
}

/// Loads the kernel as [`load`] does. x86 guests here have neither ACPI nor a device tree,
/// so the virtio-mmio devices are announced on the kernel command line
/// (`virtio_mmio.device=SIZE@BASE:IRQ`, one word each, in order).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    boot: &KernelBoot<'_>,
    virtio: &[VirtioMmioSlot],
) -> Result<CpuStart, BootError> {
    let cmdline = with_virtio_mmio(boot.cmdline, virtio);
    load(
        mem,
        &KernelBoot {
            cmdline: &cmdline,
            ..boot.clone()
        },
    )
}

/// `cmdline` with a `virtio_mmio.device=` word for each of `virtio`, in order.
fn with_virtio_mmio(cmdline: &str, virtio: &[VirtioMmioSlot]) -> String {
    let mut cmdline = cmdline.to_string();
    for d in virtio {
        cmdline.push_str(&format!(
            " virtio_mmio.device={}K@{:#x}:{}",
            d.size >> 10,
            d.base,
            d.irq
        ));
    }
    cmdline
}

/// How a test guest's raw code starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeMode {
    /// 16-bit real mode (the address must be below 64 KiB).
    Real,
    /// Flat 32-bit protected mode, paging off.
    Protected32,
}

/// Writes raw test code at `addr` (and, for 32-bit code, the GDT) and returns how the boot
/// vCPU starts.
pub fn load_code(
    mem: &GuestMemoryMmap,
    addr: u64,
    code: &[u8],
    mode: CodeMode,
) -> Result<CpuStart, CodePlacement> {
    let end = addr.checked_add(code.len() as u64);
    let fits_mode = match mode {
        CodeMode::Real => end.is_some_and(|e| e <= 0x1_0000),
        CodeMode::Protected32 => end.is_some_and(|e| e <= u64::from(u32::MAX)),
    };
    if !fits_mode || addr < 0x1000 {
        return Err(CodePlacement { addr });
    }
    mem.write_slice(code, GuestAddress(addr))
        .map_err(|_| CodePlacement { addr })?;
    Ok(match mode {
        CodeMode::Real => CpuStart::RealMode { ip: addr as u16 },
        CodeMode::Protected32 => {
            let gdt: Vec<u8> = regs::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
            mem.write_slice(&gdt, GuestAddress(GDT_ADDR))
                .map_err(|_| CodePlacement { addr: GDT_ADDR })?;
            CpuStart::Protected32 {
                entry: addr,
                gdt: GDT_ADDR,
                ebx: 0,
                esi: 0,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).expect("test memory")
    }

    #[test]
    fn e820_has_hole_and_high_ram() {
        let m = e820_map(&ram_regions(64 << 20));
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn e820_shows_only_boot_ram() {
        let (boot, held) = split_ram(600 << 20, Some(128 << 20));
        let m = e820_map(&boot);
        let ram: Vec<_> = m.iter().filter(|e| e.2 == E820_RAM).copied().collect();
        assert_eq!(
            ram,
            vec![
                (0, EBDA_START, E820_RAM),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
                (512 << 20, 88 << 20, E820_RAM)
            ]
        );
        for b in held {
            assert!(ram
                .iter()
                .all(|(s, l, _)| b + HOTPLUG_BLOCK <= *s || b >= s + l));
        }
    }

    #[test]
    fn initrd_goes_on_top_of_boot_ram_and_must_fit() {
        let ram = ram_regions(64 << 20);
        let addr = place_initrd(&ram, 10_000, 20 << 20, MMIO_GAP_START).expect("fits");
        assert_eq!(addr % PAGE, 0);
        assert!(addr + 10_000 <= 64 << 20);
        assert!(matches!(
            place_initrd(&ram, 60 << 20, 20 << 20, MMIO_GAP_START),
            Err(BootError::InitrdTooLarge { .. })
        ));
        // Never in RAM the guest adds later.
        let (boot, _) = split_ram(512 << 20, Some(128 << 20));
        let addr = place_initrd(&boot, 10_000, 20 << 20, MMIO_GAP_START).expect("fits");
        assert!(addr + 10_000 <= 128 << 20);
    }

    #[test]
    fn garbage_kernel_is_a_format_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = dir.path().join("kernel");
        std::fs::write(&k, vec![0x5a; 8192]).expect("write");
        let boot = KernelBoot {
            kernel: &k,
            initrd: None,
            cmdline: "console=ttyS0",
            vcpus: 1,
            ram: &ram_regions(64 << 20),
        };
        assert!(matches!(
            load(&mem(64 << 20), &boot),
            Err(BootError::KernelFormat { .. })
        ));
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = dir.path().join("kernel");
        std::fs::write(&k, b"x").expect("write");
        let long = "a".repeat(CMDLINE_MAX);
        let boot = KernelBoot {
            kernel: &k,
            initrd: None,
            cmdline: &long,
            vcpus: 1,
            ram: &ram_regions(64 << 20),
        };
        assert!(matches!(
            load(&mem(64 << 20), &boot),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn virtio_mmio_devices_go_on_the_command_line_in_order() {
        let slot = |base, irq| VirtioMmioSlot {
            base,
            size: 0x1000,
            irq,
        };
        assert_eq!(
            with_virtio_mmio("quiet", &[slot(0xd000_1000, 5), slot(0xd000_2000, 6)]),
            "quiet virtio_mmio.device=4K@0xd0001000:5 virtio_mmio.device=4K@0xd0002000:6"
        );
        assert_eq!(with_virtio_mmio("quiet", &[]), "quiet");
    }

    #[test]
    fn stub_marks_then_jumps() {
        let s = boot_stub(0x0100_0000);
        assert_eq!(&s[..2], &[0xc6, 0x05]);
        assert_eq!(
            &s[2..6],
            &((SYSDEV_BASE + REG_FIRST_INSN) as u32).to_le_bytes()
        );
        assert_eq!(&s[s.len() - 2..], &[0xff, 0xe0]);
    }
}
