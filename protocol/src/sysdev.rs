//! Register layout of the VMM's system device: one 4 KiB MMIO page at [`SYSDEV_BASE`].
//!
//! | offset | width | direction | meaning |
//! |---|---|---|---|
//! | [`REG_BOOT_READY`] | 8 bits | guest write | the agent is up; the VMM records the time since its start |
//! | [`REG_EXIT_STATUS`] | 32 bits | guest write | the guest is done; the value is an [`ExitStatus`]; the VMM ends the VM |
//! | [`REG_FIRST_INSN`] | 8 bits | guest write | written by the VMM's boot stub before it jumps to the kernel |
//! | [`REG_MAGIC`] | 32 bits | guest read | [`MAGIC`], so the guest can check the device is there |
//! | [`REG_PHASE`] | 8 bits | guest write | the agent reached a [`BootPhase`]; the VMM records the time |

/// Guest-physical base address of the system device (inside the 32-bit MMIO gap).
pub const SYSDEV_BASE: u64 = 0xd000_0000;
/// Size of the system device's MMIO window.
pub const SYSDEV_SIZE: u64 = 0x1000;
/// Boot-ready register offset.
pub const REG_BOOT_READY: u64 = 0x00;
/// Exit-status register offset.
pub const REG_EXIT_STATUS: u64 = 0x04;
/// First-instruction register offset (written by the VMM's own boot stub).
pub const REG_FIRST_INSN: u64 = 0x08;
/// Magic register offset.
pub const REG_MAGIC: u64 = 0x0c;
/// Boot-phase register offset (the value is a [`BootPhase`]).
pub const REG_PHASE: u64 = 0x10;
/// Value read from [`REG_MAGIC`]: "MSB1" in little-endian byte order.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MSB1");

/// Steps of the guest's start the agent reports between the kernel's start (the boot
/// stub's first instruction) and ready ([`REG_BOOT_READY`]), so a slow start shows where
/// its time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootPhase {
    /// The kernel ran the agent: its first step as PID 1.
    InitStarted,
    /// The root filesystem and the volumes are mounted.
    RootMounted,
}

impl BootPhase {
    /// Every phase, in boot order.
    pub const ALL: [BootPhase; 2] = [BootPhase::InitStarted, BootPhase::RootMounted];

    /// The register value.
    pub fn encode(self) -> u8 {
        match self {
            BootPhase::InitStarted => 1,
            BootPhase::RootMounted => 2,
        }
    }

    /// The phase a register value names, if any.
    pub fn decode(raw: u8) -> Option<BootPhase> {
        Self::ALL.into_iter().find(|p| p.encode() == raw)
    }
}

/// Bit set in an encoded exit status when the command was killed by a signal.
const SIGNALED: u32 = 1 << 8;

/// How the guest's command ended, as written to [`REG_EXIT_STATUS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The command exited with this code.
    Code(u8),
    /// The command was killed by this signal.
    Signal(u8),
}

impl ExitStatus {
    /// Encodes the status as the 32-bit register value.
    pub fn encode(self) -> u32 {
        match self {
            ExitStatus::Code(c) => u32::from(c),
            ExitStatus::Signal(s) => SIGNALED | u32::from(s),
        }
    }

    /// Decodes a register value written by the guest. Bits above the signal flag must be
    /// clear: anything else is not a value our agent writes.
    pub fn decode(raw: u32) -> Option<ExitStatus> {
        if raw & !(SIGNALED | 0xff) != 0 {
            return None;
        }
        let low = (raw & 0xff) as u8;
        Some(if raw & SIGNALED != 0 {
            ExitStatus::Signal(low)
        } else {
            ExitStatus::Code(low)
        })
    }

    /// The exit code a shell would report: the code itself, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => i32::from(c),
            ExitStatus::Signal(s) => 128 + i32::from(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_round_trips() {
        for s in [
            ExitStatus::Code(0),
            ExitStatus::Code(3),
            ExitStatus::Code(255),
            ExitStatus::Signal(9),
            ExitStatus::Signal(15),
        ] {
            assert_eq!(ExitStatus::decode(s.encode()), Some(s));
        }
    }

    #[test]
    fn foreign_bits_are_rejected() {
        assert_eq!(ExitStatus::decode(0x1_0000), None);
        assert_eq!(ExitStatus::decode(u32::MAX), None);
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
    }

    #[test]
    fn phases_round_trip_and_foreign_values_are_none() {
        for p in BootPhase::ALL {
            assert_eq!(BootPhase::decode(p.encode()), Some(p));
        }
        assert_eq!(BootPhase::decode(0), None);
        assert_eq!(BootPhase::decode(200), None);
    }

    #[test]
    fn magic_spells_msb1() {
        assert_eq!(&MAGIC.to_le_bytes(), b"MSB1");
    }
}
