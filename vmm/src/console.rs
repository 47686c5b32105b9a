//! Where the guest's serial output goes: `ttyS0` is the kernel console. Every line goes to
//! the serial log file (if any; [`ConsoleFile`], which rotates past a size limit), to the
//! VMM's stderr when echo is on, and into a tail of recent lines kept for error reports. A
//! kernel panic line is reported so the VM can end even if the guest cannot reset.
//! (Commands' output travels over vsock.)

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Lines of console output kept for error messages.
pub const TAIL_LINES: usize = 40;
const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Longest console line kept; longer lines are cut (the guest controls their length).
const MAX_LINE: usize = 4096;
/// Default size past which the serial log rotates to `<file>.1`. The guest writes the
/// console as much as it likes (a kernel that loops on a warning fills gigabytes): with
/// one old file kept, the two hold at most twice this, and the newest lines are always
/// there.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 8 << 20;

/// The serial log file: whole lines appended; once the next line would take it past its
/// limit it is renamed to `<path>.1` (replacing the older one) and a new file started.
#[derive(Debug)]
pub struct ConsoleFile {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
    failed: bool,
}

impl ConsoleFile {
    /// Takes `file`, just created (empty) at `path`, with the default limit. A `<path>.1`
    /// left by an earlier run goes: the pair always belongs to this run.
    pub fn new(file: File, path: &Path) -> Self {
        let _ = std::fs::remove_file(rotated(path));
        ConsoleFile {
            path: path.to_path_buf(),
            max_bytes: DEFAULT_LOG_MAX_BYTES,
            file,
            size: 0,
            failed: false,
        }
    }

    /// Rotates past `max_bytes` instead of the default.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Appends `text` and a newline, in one write. A failing disk costs log lines (warned
    /// once), never the VM.
    fn write_line(&mut self, text: &str) {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        let result = (|| -> io::Result<()> {
            if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
                match std::fs::rename(&self.path, rotated(&self.path)) {
                    // Deleted from outside: start a new file all the same.
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                // An explicit mode: the virtio-fs devices set this process's umask to 0.
                self.file = std::os::unix::fs::OpenOptionsExt::mode(
                    OpenOptions::new().create(true).write(true).truncate(true),
                    0o600,
                )
                .open(&self.path)?;
                self.size = 0;
            }
            self.file.write_all(&line)?;
            self.size += line.len() as u64;
            Ok(())
        })();
        if let Err(e) = result {
            if !std::mem::replace(&mut self.failed, true) {
                tracing::warn!("cannot write the console log {}: {e}", self.path.display());
            }
        }
    }
}

/// `<path>.1`: where the serial log's older half goes.
fn rotated(path: &Path) -> PathBuf {
    let mut old = path.as_os_str().to_os_string();
    old.push(".1");
    PathBuf::from(old)
}

/// Shared state of the console sink.
#[derive(Debug, Default)]
pub struct ConsoleLog {
    file: Option<ConsoleFile>,
    echo: bool,
    line: Vec<u8>,
    tail: VecDeque<String>,
    panicked: bool,
}

impl ConsoleLog {
    /// Creates the sink: `file` receives every line, `echo` copies them to stderr.
    pub fn new(file: Option<ConsoleFile>, echo: bool) -> Self {
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
            f.write_line(&text);
        }
        if self.echo {
            // The operator's terminal: the guest's escape sequences are shown, not obeyed.
            let safe = msb_protocol::terminal::escape_controls(&text);
            let _ = writeln!(io::stderr().lock(), "{safe}");
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
            let _ = f.file.flush();
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

    #[test]
    fn the_console_log_rotates_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let old = dir.path().join("console.log.1");
        std::fs::write(&old, "from an earlier run\n").expect("stale file");
        let file = ConsoleFile::new(File::create(&path).expect("create"), &path);
        assert!(!old.exists(), "an earlier run's old file goes");
        let log = Arc::new(Mutex::new(ConsoleLog::new(
            Some(file.with_max_bytes(100)),
            false,
        )));
        let mut w = ConsoleWriter::new(log.clone(), Box::new(|| {}));
        // 10-byte lines: ten fit in 100 bytes, the eleventh starts a new file.
        for i in 0..25 {
            writeln!(w, "line {i:04}").expect("write");
        }
        let size = |p: &Path| std::fs::metadata(p).expect("metadata").len();
        let current = std::fs::read_to_string(&path).expect("current");
        let previous = std::fs::read_to_string(&old).expect("rotated");
        assert_eq!(
            current,
            (20..25)
                .map(|i| format!("line {i:04}\n"))
                .collect::<String>()
        );
        assert_eq!(
            previous,
            (10..20)
                .map(|i| format!("line {i:04}\n"))
                .collect::<String>()
        );
        assert!(size(&path) <= 100 && size(&old) <= 100);
        // A line longer than the limit is still written whole, alone in its file.
        writeln!(w, "{}", "x".repeat(300)).expect("write");
        writeln!(w, "after").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("current"), "after\n");
        assert_eq!(size(&old), 301);
    }
}
