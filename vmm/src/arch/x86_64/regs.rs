//! GDT and segment registers for 32-bit protected-mode entry.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// Selector of the flat 32-bit code segment (Linux's `__BOOT_CS`).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (Linux's `__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;

/// One descriptor: access byte and flags nibble packed as `0xF0AA` (flags in bits 12-15).
#[derive(Debug, Clone, Copy)]
struct Descriptor {
    flags_access: u16,
    base: u32,
    limit: u32,
}

const CODE: Descriptor = Descriptor {
    flags_access: 0xc09b, // 4 KiB granularity, 32-bit; present, ring 0, code, read, accessed
    base: 0,
    limit: 0xfffff,
};
const DATA: Descriptor = Descriptor {
    flags_access: 0xc093, // 4 KiB granularity, 32-bit; present, ring 0, data, write, accessed
    base: 0,
    limit: 0xfffff,
};
const TSS: Descriptor = Descriptor {
    flags_access: 0x008b, // byte granularity; present, busy 32-bit TSS
    base: 0,
    limit: 0x67,
};

impl Descriptor {
    /// The 8-byte GDT encoding.
    fn encode(self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        let fa = u64::from(self.flags_access);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((fa & 0xff) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((fa >> 12) & 0xf) << 52)
            | (((base >> 24) & 0xff) << 56)
    }

    /// The segment register KVM caches for this descriptor.
    fn segment(self, selector: u16) -> kvm_segment {
        let fa = self.flags_access;
        let g = (fa >> 15) & 1;
        let limit = if g == 1 {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: u64::from(self.base),
            limit,
            selector,
            type_: (fa & 0xf) as u8,
            present: ((fa >> 7) & 1) as u8,
            dpl: ((fa >> 5) & 3) as u8,
            db: ((fa >> 14) & 1) as u8,
            s: ((fa >> 4) & 1) as u8,
            l: ((fa >> 13) & 1) as u8,
            g: g as u8,
            avl: ((fa >> 12) & 1) as u8,
            unusable: 0,
            padding: 0,
        }
    }
}

/// The GDT the VMM writes at `layout::GDT_ADDR`.
pub fn gdt() -> [u64; 5] {
    [0, 0, CODE.encode(), DATA.encode(), TSS.encode()]
}

/// Sets `sregs` for flat 32-bit protected mode, paging off, with the GDT at `gdt_addr`.
pub fn set_protected32(sregs: &mut kvm_sregs, gdt_addr: u64) {
    let code = CODE.segment(CODE_SELECTOR);
    let data = DATA.segment(DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = TSS.segment(TSS_SELECTOR);
    sregs.gdt.base = gdt_addr;
    sregs.gdt.limit = (gdt().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_descriptor_encodes_as_expected() {
        // The canonical flat 32-bit ring-0 code descriptor.
        assert_eq!(CODE.encode(), 0x00cf_9b00_0000_ffff);
        assert_eq!(DATA.encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(TSS.encode(), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_are_flat_4g() {
        let cs = CODE.segment(CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.db, cs.l),
            (0, 0xffff_ffff, 0xb, 1, 0)
        );
        let tr = TSS.segment(TSS_SELECTOR);
        assert_eq!((tr.limit, tr.s, tr.g), (0x67, 0, 0));
    }
}
