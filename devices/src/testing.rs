//! Test doubles shared by the device tests and benchmarks.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::InterruptTrigger;

/// An interrupt line that counts how often it was raised.
#[derive(Debug, Default)]
pub struct CountingInterrupt(AtomicUsize);

impl CountingInterrupt {
    /// How often the line was raised.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl InterruptTrigger for CountingInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
