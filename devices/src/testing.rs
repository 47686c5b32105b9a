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

/// Opens copies of `/dev/null` until the process runs out of descriptors (`EMFILE`) and
/// returns them, for tests that lower `RLIMIT_NOFILE` first and then need a full table.
pub fn fill_descriptor_table() -> Vec<std::fs::File> {
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut fillers = Vec::new();
    loop {
        match null.try_clone() {
            Ok(f) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("filling the descriptor table: {e}"),
        }
    }
    drop(null);
    fillers.push(std::fs::File::open("/dev/null").expect("the descriptor just freed"));
    fillers
}
