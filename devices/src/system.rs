//! The VMM's system device: boot timer, exit status and first-instruction mark.
//!
//! Its register layout is part of the wire format (`msb_protocol::sysdev`). The guest is
//! untrusted: accesses of the wrong width or to unknown offsets are counted and ignored,
//! and an exit value the agent would never write is reported as such, not trusted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use msb_protocol::sysdev::{
    BootPhase, ExitStatus, MAGIC, REG_BOOT_READY, REG_EXIT_STATUS, REG_FIRST_INSN, REG_MAGIC,
    REG_PHASE,
};

use crate::BusDevice;

/// What the guest reported to the system device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    /// The VMM's boot stub ran: the guest's first instruction.
    FirstInstruction,
    /// The agent reached a step of its start.
    Phase(BootPhase),
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
    /// When the boot stub ran (it jumps to the kernel's entry right after).
    pub first_instruction: Option<Duration>,
    /// When the kernel ran the agent.
    pub init_started: Option<Duration>,
    /// When the agent had the root filesystem and the volumes mounted.
    pub root_mounted: Option<Duration>,
    /// When the agent reported ready.
    pub boot_ready: Option<Duration>,
    /// When the guest wrote its exit status.
    pub exit: Option<Duration>,
}

/// Opens when the agent reports ready: who talks to the agent waits here instead of
/// knocking on the guest while it boots (every refused attempt is a packet the guest
/// kernel handles, which costs boot time where guest kernel code is emulated).
#[derive(Debug, Clone, Default)]
pub struct ReadyGate(Arc<(Mutex<bool>, Condvar)>);

impl ReadyGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the gate and wakes every waiter (idempotent).
    pub fn open(&self) {
        let (m, cv) = &*self.0;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// True once opened.
    pub fn is_open(&self) -> bool {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the gate opens or `deadline` passes; true when it is open.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let (m, cv) = &*self.0;
        let mut open = m.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            open = cv
                .wait_timeout(open, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// The system device.
pub struct SystemDevice {
    start: Instant,
    times: Arc<Mutex<BootTimes>>,
    sink: Box<dyn SystemEventSink>,
    dropped: AtomicU64,
    ready: Option<ReadyGate>,
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
            ready: None,
        }
    }

    /// Opens `gate` when the agent reports ready.
    pub fn with_ready_gate(mut self, gate: ReadyGate) -> Self {
        self.ready = Some(gate);
        self
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
                SystemEvent::Phase(BootPhase::InitStarted) => &mut t.init_started,
                SystemEvent::Phase(BootPhase::RootMounted) => &mut t.root_mounted,
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
        if let (SystemEvent::BootReady, Some(gate)) = (event, &self.ready) {
            gate.open();
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
            (REG_PHASE, &[raw]) => match BootPhase::decode(raw) {
                Some(p) => self.record(SystemEvent::Phase(p)),
                None => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            },
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
        dev.write(REG_PHASE, &[BootPhase::InitStarted.encode()]);
        dev.write(REG_PHASE, &[BootPhase::RootMounted.encode()]);
        dev.write(REG_BOOT_READY, &[123]);
        dev.write(REG_EXIT_STATUS, &ExitStatus::Code(3).encode().to_le_bytes());
        let events: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            events,
            vec![
                SystemEvent::FirstInstruction,
                SystemEvent::Phase(BootPhase::InitStarted),
                SystemEvent::Phase(BootPhase::RootMounted),
                SystemEvent::BootReady,
                SystemEvent::Exit(ExitStatus::Code(3))
            ]
        );
        let t = *dev.times().lock().expect("not poisoned");
        assert!(t.first_instruction <= t.init_started && t.init_started <= t.root_mounted);
        assert!(t.root_mounted <= t.boot_ready && t.boot_ready <= t.exit);
    }

    #[test]
    fn the_ready_gate_opens_on_boot_ready_only() {
        let gate = ReadyGate::new();
        let (tx, _rx) = mpsc::channel();
        let mut dev = SystemDevice::new(Instant::now(), Box::new(Chan(Mutex::new(tx))))
            .with_ready_gate(gate.clone());
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.wait_until(Instant::now() + Duration::from_secs(30)))
        };
        dev.write(REG_FIRST_INSN, &[1]);
        dev.write(REG_PHASE, &[BootPhase::RootMounted.encode()]);
        assert!(!gate.is_open());
        assert!(!gate.wait_until(Instant::now() + Duration::from_millis(10)));
        dev.write(REG_BOOT_READY, &[1]);
        assert!(gate.is_open());
        assert!(waiter.join().expect("waiter"));
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
        dev.write(REG_PHASE, &[0]); // no such phase
        dev.write(REG_PHASE, &[1, 0]); // wrong width
        dev.write(REG_BOOT_READY, &[1]);
        dev.write(REG_BOOT_READY, &[1]); // repeat
        assert_eq!(dev.dropped(), 6);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn foreign_exit_value_is_reported_not_trusted() {
        let (mut dev, rx) = device();
        dev.write(REG_EXIT_STATUS, &0xdead_beef_u32.to_le_bytes());
        assert_eq!(rx.try_recv().ok(), Some(SystemEvent::BadExit(0xdead_beef)));
    }
}
