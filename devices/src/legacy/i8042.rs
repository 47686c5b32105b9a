//! The i8042 keyboard controller, present only so the guest can request a reset by
//! writing `0xfe` to its command port (the traditional PC reset path).

use crate::BusDevice;

/// Called when the guest asks for a reset.
pub trait ResetHandler: Send {
    /// The guest requested a CPU reset.
    fn reset(&self);
}

/// Adapts our handler to `vm-superio`'s trigger trait.
struct ResetTrigger(Box<dyn ResetHandler>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.reset();
        Ok(())
    }
}

/// The i8042 controller on ports 0x60-0x64 (registered at 0x60, offsets 0 and 4).
pub struct I8042 {
    inner: vm_superio::I8042Device<ResetTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates the controller; `on_reset` runs when the guest pulses the reset line.
    pub fn new(on_reset: Box<dyn ResetHandler>) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(ResetTrigger(on_reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // The trigger is infallible.
            let _ = self.inner.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Flag(Arc<AtomicBool>);
    impl ResetHandler for Flag {
        fn reset(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn command_fe_resets() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(Box::new(Flag(flag.clone())));
        dev.write(4, &[0xfe]);
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn other_writes_do_not_reset() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(Box::new(Flag(flag.clone())));
        dev.write(4, &[0x20]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfe, 0]);
        assert!(!flag.load(Ordering::SeqCst));
    }
}
