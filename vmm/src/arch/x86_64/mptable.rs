//! The Intel MultiProcessor table (spec 1.4) that tells the guest about its CPUs, the
//! IOAPIC and how ISA interrupts are wired. Built as bytes, then copied into guest memory
//! at the start of the EBDA, where Linux looks for it.

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;
/// Interrupt pins the in-kernel IOAPIC has.
const IOAPIC_PINS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
/// CPU signature (family 6) and feature flags (FPU, APIC) as the table reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LOCALINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building the table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More CPUs than the table can describe (APIC ids are 8 bits and one is the IOAPIC's).
    #[error("{0} vCPUs do not fit in an MP table")]
    TooManyCpus(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for `cpus` CPUs, to be placed at
/// guest address `addr`.
pub fn build(cpus: u8, addr: u64) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus == u8::MAX {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
        entries.extend_from_slice(&[ENTRY_CPU, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // KVM's default routing sends GSI 0 (the PIT) to IOAPIC pin 2, as PCs wire it.
        let pin = if irq == 0 { 2 } else { irq };
        if irq == 2 {
            continue;
        }
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 takes ExtINT from the PIC, LINT1 takes NMI, on every local APIC (0xff).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCALINT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = addr + FLOATING_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(SPEC_REV);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"MSB     ");
    header.extend_from_slice(b"MICROSANDBOX");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, filled below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    out[10] = checksum(&out[..FLOATING_LEN]);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        let t = build(2, 0x9fc00).expect("two cpus fit");
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        assert_eq!(u32::from_le_bytes([t[4], t[5], t[6], t[7]]), 0x9fc10);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 cpus + bus + ioapic + 23 io interrupts + 2 local interrupts
        assert_eq!(count, 2 + 1 + 1 + 23 + 2);
        // The first entry is the boot CPU.
        assert_eq!(
            &table[44..48],
            &[ENTRY_CPU, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOT]
        );
    }

    #[test]
    fn impossible_cpu_counts_are_errors() {
        assert!(build(0, 0).is_err());
        assert!(build(255, 0).is_err());
    }
}
