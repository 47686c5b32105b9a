//! The 8250/16550A UART, wrapping `vm-superio` and putting it on a bus.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::{BusDevice, Interrupt};

/// Adapts our [`Interrupt`] to `vm-superio`'s trigger trait.
struct IrqTrigger(Interrupt);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Counters of one UART.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    /// Bytes the guest transmitted.
    pub tx_bytes: AtomicU64,
    /// Guest accesses that were dropped (wrong width, or the output sink failed).
    pub dropped: AtomicU64,
}

/// An 8250 UART whose transmitted bytes go to `W`. Input is not wired yet.
pub struct Serial<W: Write + Send> {
    inner: vm_superio::Serial<IrqTrigger, NoEvents, W>,
    metrics: Arc<SerialMetrics>,
}

impl<W: Write + Send> std::fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("metrics", &self.metrics)
            .finish()
    }
}

impl<W: Write + Send> Serial<W> {
    /// Creates a UART raising `irq` and writing what the guest transmits to `out`.
    pub fn new(irq: Interrupt, out: W) -> Self {
        Serial {
            inner: vm_superio::Serial::new(IrqTrigger(irq), out),
            metrics: Arc::default(),
        }
    }

    /// The UART's counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// The sink the transmitted bytes go to.
    pub fn writer_mut(&mut self) -> &mut W {
        self.inner.writer_mut()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.inner.read(off),
            _ => {
                self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Offset 0 with DLAB clear is the transmit register; vm-superio forwards it to the
        // writer. Counting every offset-0 write is close enough for a byte counter.
        if off == 0 {
            self.metrics.tx_bytes.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.inner.write(off, *value) {
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl crate::InterruptTrigger for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_sink_and_raise_thre() {
        let irq = Arc::new(CountingIrq::default());
        let out = Shared::default();
        let mut s = Serial::new(irq.clone(), out.clone());
        s.write(1, &[0x02]); // IER: THR-empty interrupt enabled
        for b in b"hi\n" {
            s.write(0, &[*b]);
            // Reading IIR acknowledges THR-empty, as the guest driver does, so the next
            // byte raises it again.
            s.read(2, &mut [0u8]);
        }
        assert_eq!(&*out.0.lock().expect("not poisoned"), b"hi\n");
        assert!(irq.0.load(Ordering::Relaxed) >= 3);
        assert_eq!(s.metrics().tx_bytes.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn wide_accesses_are_dropped_not_fatal() {
        let mut s = Serial::new(Arc::new(CountingIrq::default()), Shared::default());
        s.write(0, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        s.read(5, &mut d);
        s.write(u64::MAX, &[1]);
        assert_eq!(s.metrics().dropped.load(Ordering::Relaxed), 3);
    }
}
