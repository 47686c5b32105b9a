//! The VMM's system device: boot timer, exit status and first-instruction mark.
//!
//! Its register layout is part of the wire format (`msb_protocol::sysdev`). The guest is
//! untrusted: accesses of the wrong width or to unknown offsets are counted and ignored,
//! and an exit value the agent would never write is reported as such, not trusted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msb_protocol::sysdev::{
    ExitStatus, MAGIC, REG_BOOT_READY, REG_EXIT_STATUS, REG_FIRST_INSN, REG_MAGIC,
};

use crate::BusDevice;

/// What the guest reported to the system device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// The VMM's boot stub ran: the guest's first instruction.
    FirstInstruction,
    /// The agent is ready.
    BootReady,
    /// The guest is done with this status.
    Exit(ExitStatus),
    /// The guest wrote an exit value our agent never writes.
    BadExit(u32),
}

/// Receives the device's events (the VMM turns `Exit` into the end of the VM).
pub trait SystemEventSink: Send {
    /// Called once per event, from the vCPU thread that made the access.
    fn event(&self, event: SystemEvent, since_start: Duration);
}

/// Times recorded by the device, relative to the VMM's start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BootTimes {
    /// When the boot stub ran.
    pub first_instruction: Option<Duration>,
    /// When the agent reported ready.
    pub boot_ready: Option<Duration>,
    /// When the guest wrote its exit status.
    pub exit: Option<Duration>,
}

/// The system device.
pub struct SystemDevice {
    start: Instant,
    times: Arc<Mutex<BootTimes>>,
    sink: Box<dyn SystemEventSink>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for SystemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemDevice")
            .field("times", &self.times)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl SystemDevice {
    /// Creates the device; times are measured from `start` (the VMM's own start).
    pub fn new(start: Instant, sink: Box<dyn SystemEventSink>) -> Self {
        SystemDevice {
            start,
            times: Arc::default(),
            sink,
            dropped: AtomicU64::new(0),
        }
    }

    /// A handle to the recorded times.
    pub fn times(&self) -> Arc<Mutex<BootTimes>> {
        self.times.clone()
    }

    /// Accesses that were ignored (bad width or offset).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn record(&self, event: SystemEvent) {
        let now = self.start.elapsed();
        {
            let mut t = self.times.lock().unwrap_or_else(|p| p.into_inner());
            let slot = match event {
                SystemEvent::FirstInstruction => &mut t.first_instruction,
                SystemEvent::BootReady => &mut t.boot_ready,
                SystemEvent::Exit(_) | SystemEvent::BadExit(_) => &mut t.exit,
            };
            if slot.is_some() {
                // Only the first of each event counts; a repeat is the guest misbehaving.
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *slot = Some(now);
        }
        self.sink.event(event, now);
    }
}

impl BusDevice for SystemDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == REG_MAGIC && data.len() == 4 {
            data.copy_from_slice(&MAGIC.to_le_bytes());
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (REG_BOOT_READY, [_]) => self.record(SystemEvent::BootReady),
            (REG_FIRST_INSN, [_]) => self.record(SystemEvent::FirstInstruction),
            (REG_EXIT_STATUS, &[a, b, c, d]) => {
                let raw = u32::from_le_bytes([a, b, c, d]);
                self.record(match ExitStatus::decode(raw) {
                    Some(status) => SystemEvent::Exit(status),
                    None => SystemEvent::BadExit(raw),
                });
            }
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Chan(Mutex<mpsc::Sender<SystemEvent>>);
    impl SystemEventSink for Chan {
        fn event(&self, e: SystemEvent, _: Duration) {
            let _ = self.0.lock().expect("not poisoned").send(e);
        }
    }

    fn device() -> (SystemDevice, mpsc::Receiver<SystemEvent>) {
        let (tx, rx) = mpsc::channel();
        (
            SystemDevice::new(Instant::now(), Box::new(Chan(Mutex::new(tx)))),
            rx,
        )
    }

    #[test]
    fn boot_sequence_records_times_in_order() {
        let (mut dev, rx) = device();
        dev.write(REG_FIRST_INSN, &[1]);
        dev.write(REG_BOOT_READY, &[123]);
        dev.write(REG_EXIT_STATUS, &ExitStatus::Code(3).encode().to_le_bytes());
        let events: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            events,
            vec![
                SystemEvent::FirstInstruction,
                SystemEvent::BootReady,
                SystemEvent::Exit(ExitStatus::Code(3))
            ]
        );
        let t = *dev.times().lock().expect("not poisoned");
        assert!(t.first_instruction <= t.boot_ready && t.boot_ready <= t.exit);
    }

    #[test]
    fn magic_reads_back() {
        let (mut dev, _rx) = device();
        let mut d = [0u8; 4];
        dev.read(REG_MAGIC, &mut d);
        assert_eq!(u32::from_le_bytes(d), MAGIC);
    }

    #[test]
    fn hostile_accesses_are_counted_and_ignored() {
        let (mut dev, rx) = device();
        dev.write(REG_EXIT_STATUS, &[1, 2]); // wrong width
        dev.write(0x800, &[1]); // unknown offset
        dev.read(REG_BOOT_READY, &mut [0u8; 8]);
        dev.write(REG_BOOT_READY, &[1]);
        dev.write(REG_BOOT_READY, &[1]); // repeat
        assert_eq!(dev.dropped(), 4);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn foreign_exit_value_is_reported_not_trusted() {
        let (mut dev, rx) = device();
        dev.write(REG_EXIT_STATUS, &0xdead_beef_u32.to_le_bytes());
        assert_eq!(rx.try_recv().ok(), Some(SystemEvent::BadExit(0xdead_beef)));
    }
}
