//! Where the guest's serial output goes: `ttyS0` is the kernel console. Every line goes to
//! the serial log file (if any), to the VMM's stderr when echo is on, and into a tail of
//! recent lines kept for error reports. A kernel panic line is reported so the VM can end
//! even if the guest cannot reset. (Commands' output travels over vsock.)

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Lines of console output kept for error messages.
pub const TAIL_LINES: usize = 40;
const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Longest console line kept; longer lines are cut (the guest controls their length).
const MAX_LINE: usize = 4096;

/// Shared state of the console sink.
#[derive(Debug, Default)]
pub struct ConsoleLog {
    file: Option<File>,
    echo: bool,
    line: Vec<u8>,
    tail: VecDeque<String>,
    panicked: bool,
}

impl ConsoleLog {
    /// Creates the sink: `file` receives every line, `echo` copies them to stderr.
    pub fn new(file: Option<File>, echo: bool) -> Self {
        ConsoleLog {
            file,
            echo,
            ..Default::default()
        }
    }

    /// The last lines the guest printed on its console (the partial line included).
    pub fn tail(&self) -> Vec<String> {
        let mut t: Vec<String> = self.tail.iter().cloned().collect();
        if !self.line.is_empty() {
            t.push(String::from_utf8_lossy(&self.line).into_owned());
        }
        t
    }

    fn end_line(&mut self) -> bool {
        let text = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{text}");
        }
        if self.echo {
            let _ = writeln!(io::stderr().lock(), "{text}");
        }
        let new_panic = !self.panicked && text.contains(PANIC_MARKER);
        self.panicked |= new_panic;
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text);
        new_panic
    }

    /// Flushes the partial line (at the end of the VM).
    pub fn finish(&mut self) {
        if !self.line.is_empty() {
            self.end_line();
        }
        if let Some(f) = &mut self.file {
            let _ = f.flush();
        }
    }
}

/// The `Write` end the console UART transmits into.
pub struct ConsoleWriter {
    log: Arc<Mutex<ConsoleLog>>,
    on_panic: Box<dyn Fn() + Send>,
}

impl ConsoleWriter {
    /// Writes into `log`; `on_panic` runs once when a kernel panic line completes.
    pub fn new(log: Arc<Mutex<ConsoleLog>>, on_panic: Box<dyn Fn() + Send>) -> Self {
        ConsoleWriter { log, on_panic }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut panicked = false;
        {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            for b in buf {
                if *b == b'\n' {
                    panicked |= log.end_line();
                } else if log.line.len() < MAX_LINE {
                    log.line.push(*b);
                }
            }
        }
        if panicked {
            (self.on_panic)();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // vm-superio flushes after every byte; lines are written whole in `end_line`.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn console_keeps_a_bounded_tail_and_spots_panics() {
        let log = Arc::new(Mutex::new(ConsoleLog::new(None, false)));
        let panics = Arc::new(AtomicUsize::new(0));
        let p = panics.clone();
        let mut w = ConsoleWriter::new(
            log.clone(),
            Box::new(move || {
                p.fetch_add(1, Ordering::SeqCst);
            }),
        );
        for i in 0..100 {
            writeln!(w, "line {i}").expect("write");
        }
        w.write_all(b"Kernel panic - not syncing: No working init found\r\nagain Kernel panic - not syncing\npartial")
            .expect("write");
        let tail = log.lock().expect("lock").tail();
        assert_eq!(tail.len(), TAIL_LINES + 1);
        assert_eq!(tail.last().map(String::as_str), Some("partial"));
        assert!(tail
            .iter()
            .any(|l| l == "Kernel panic - not syncing: No working init found"));
        assert_eq!(panics.load(Ordering::SeqCst), 1, "reported once");
    }
}
