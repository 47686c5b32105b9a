//! Progress lines on stderr for long builds.

use std::io::Write;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(15);

/// Reports a build's phases and, while compiling, how many steps `make` has done.
#[derive(Debug)]
pub struct Progress {
    label: String,
    start: Instant,
    last: Instant,
    counting: bool,
    steps: u64,
    quiet: bool,
}

impl Progress {
    /// Progress for the build named `label`.
    pub fn new(label: &str) -> Self {
        let now = Instant::now();
        Progress {
            label: label.to_string(),
            start: now,
            last: now,
            counting: false,
            steps: 0,
            quiet: false,
        }
    }

    /// A reporter that prints nothing.
    pub fn silent() -> Self {
        Progress {
            quiet: true,
            ..Progress::new("")
        }
    }

    fn print(&self, msg: &str) {
        if !self.quiet {
            let secs = self.start.elapsed().as_secs();
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}: [{:>2}m{:02}s] {msg}",
                self.label,
                secs / 60,
                secs % 60
            );
        }
    }

    /// A new phase starts.
    pub fn phase(&mut self, msg: &str) {
        self.print(msg);
    }

    /// The build finished.
    pub fn done(&mut self, msg: &str) {
        self.print(msg);
    }

    /// Start or stop counting output lines as steps.
    pub fn count_lines(&mut self, on: bool) {
        self.counting = on;
        self.steps = 0;
    }

    /// One line of a command's output.
    pub fn line(&mut self, line: &str) {
        if !self.counting {
            return;
        }
        self.steps += 1;
        if self.last.elapsed() >= EVERY {
            self.last = Instant::now();
            let what = line.trim();
            self.print(&format!("{} steps done, now: {what}", self.steps));
        }
    }
}
