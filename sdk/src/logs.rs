//! Reading a sandbox's `exec.log`: the output of its commands, as written by the VMM.
//!
//! # The file
//!
//! Each line of `exec.log` is one JSON object, appended with a single `write()`:
//!
//! ```text
//! {"timestamp_ms": 1733100000123.456, "source": "stdout", "session_id": 3, "data": "hi\n"}
//! ```
//!
//! `timestamp_ms` is Unix epoch milliseconds with a microsecond fraction; `source` is one of
//! `stdout`, `stderr`, `output` (a terminal session) or `system`; `session_id` is the
//! command's session, or `null`; the bytes are in `data` as text, or in `data_b64` (standard
//! base64) when they are not UTF-8. The content is guest output and so untrusted: a line
//! that does not parse is skipped (with one warning), and only whole lines (up to the last
//! `'\n'`) are read, so a line being written is waited for, never half-read.
//!
//! # Rotation
//!
//! Past its size limit the writer renames `exec.log` to `exec.log.1` (replacing any older
//! one) and starts a new `exec.log`. Readers read `exec.log.1` and then `exec.log`; a
//! following [`LogStream`] notices the rename (the path no longer names the file it has
//! open), reads the old file to its end and carries on with the new one from its start.
//!
//! # Cursors
//!
//! Every [`LogEntry`] has a [`cursor`](LogEntry::cursor), an opaque string naming its place
//! in the log; pass it to [`LogStreamOptions::from_cursor`] to resume right after it. A
//! cursor is derived from the entry's timestamp and its rank among entries with the same
//! timestamp (counting entries of every source), so it is the same across calls and across
//! rotation. Its format is not part of the API.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;

use crate::error::{MicrosandboxError, MicrosandboxResult};

const LOG: &str = "exec.log";
const OLD_LOG: &str = "exec.log.1";
const POLL: Duration = Duration::from_millis(200);
const CHUNK: usize = 64 * 1024;
/// How long past `until` a following stream waits for late lines stamped before it.
const UNTIL_GRACE: TimeDelta = TimeDelta::seconds(1);

pub use msb_protocol::execlog::LogSource;

/// One entry of the log: a chunk of output as the VMM relayed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Where it came from.
    pub source: LogSource,
    /// The command's session, if it belongs to one.
    pub session_id: Option<u64>,
    /// When the VMM relayed it (microsecond precision).
    pub timestamp: DateTime<Utc>,
    /// The bytes, exactly as produced.
    pub data: Vec<u8>,
    /// Opaque position of this entry, for [`LogStreamOptions::from_cursor`].
    pub cursor: String,
}

impl LogEntry {
    /// The data as text, with invalid UTF-8 replaced by U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What a one-shot read of the log returns.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Keep only the last this many matching entries.
    pub tail: Option<usize>,
    /// Only entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only these sources; empty means stdout and stderr.
    pub sources: Vec<LogSource>,
}

impl LogOptions {
    /// Keeps only the last `n` matching entries.
    pub fn tail(mut self, n: usize) -> Self {
        self.tail = Some(n);
        self
    }

    /// Only entries at or after `t`.
    pub fn since(mut self, t: DateTime<Utc>) -> Self {
        self.since = Some(t);
        self
    }

    /// Only entries before `t`.
    pub fn until(mut self, t: DateTime<Utc>) -> Self {
        self.until = Some(t);
        self
    }

    /// Adds a source to the selection.
    pub fn source(mut self, s: LogSource) -> Self {
        self.sources.push(s);
        self
    }

    /// Adds these sources to the selection.
    pub fn sources(mut self, s: impl IntoIterator<Item = LogSource>) -> Self {
        self.sources.extend(s);
        self
    }
}

/// What a [`LogStream`] yields.
#[derive(Debug, Clone, Default)]
pub struct LogStreamOptions {
    /// Only these sources; empty means stdout, stderr and output.
    pub sources: Vec<LogSource>,
    /// Start at the first entry at or after this time (not with `from_cursor`).
    pub since: Option<DateTime<Utc>>,
    /// Start right after the entry with this cursor (not with `since`).
    pub from_cursor: Option<String>,
    /// End at the first entry at or after this time (when following, also once the clock
    /// is a little past it and the log is read).
    pub until: Option<DateTime<Utc>>,
    /// Keep yielding entries as they are written, until the sandbox stops.
    pub follow: bool,
}

impl LogStreamOptions {
    /// Adds a source to the selection.
    pub fn source(mut self, s: LogSource) -> Self {
        self.sources.push(s);
        self
    }

    /// Adds these sources to the selection.
    pub fn sources(mut self, s: impl IntoIterator<Item = LogSource>) -> Self {
        self.sources.extend(s);
        self
    }

    /// Starts at the first entry at or after `t`.
    pub fn since(mut self, t: DateTime<Utc>) -> Self {
        self.since = Some(t);
        self
    }

    /// Starts right after the entry with this [cursor](LogEntry::cursor).
    pub fn from_cursor(mut self, cursor: impl Into<String>) -> Self {
        self.from_cursor = Some(cursor.into());
        self
    }

    /// Ends at the first entry at or after `t`.
    pub fn until(mut self, t: DateTime<Utc>) -> Self {
        self.until = Some(t);
        self
    }

    /// Whether to keep following the log as it grows.
    pub fn follow(mut self, follow: bool) -> Self {
        self.follow = follow;
        self
    }
}

/// A stream of log entries, read on a background thread that stops soon after the stream
/// is dropped. Yields an error (and then ends) only if a log file cannot be read.
pub struct LogStream {
    rx: mpsc::Receiver<MicrosandboxResult<LogEntry>>,
}

impl fmt::Debug for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStream").finish_non_exhaustive()
    }
}

impl futures_core::Stream for LogStream {
    type Item = MicrosandboxResult<LogEntry>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Reads the entries now in `exec.log.1` and `exec.log` under `dir` that match `opts`.
/// [`read_logs`] off the async runtime's threads (the log can be large).
pub(crate) async fn read_logs_async(
    dir: std::path::PathBuf,
    opts: LogOptions,
) -> MicrosandboxResult<Vec<LogEntry>> {
    crate::image::store::blocking(move || read_logs(&dir, &opts)).await
}

pub(crate) fn read_logs(dir: &Path, opts: &LogOptions) -> MicrosandboxResult<Vec<LogEntry>> {
    let sources = if opts.sources.is_empty() {
        vec![LogSource::Stdout, LogSource::Stderr]
    } else {
        opts.sources.clone()
    };
    let start = opts.since.map_or(Start::All, Start::Since);
    let mut proc = Processor::new(dir, start, opts.until, sources, false);
    let mut out = VecDeque::new();
    let mut emit = |line: &[u8]| {
        if let Verdict::Emit(e) = proc.line(line) {
            out.push_back(e);
            if opts.tail.is_some_and(|t| out.len() > t) {
                out.pop_front();
            }
        }
        true
    };
    let (old, cur) = open_files(dir, None)?;
    if let Some(mut f) = old {
        f.read_available(&mut emit)?;
        f.finish(&mut emit);
    }
    if let Some(mut f) = cur {
        f.read_available(&mut emit)?;
    }
    Ok(out.into())
}

/// Streams the entries of the log under `dir`; `alive` says whether the writer may still
/// append (checked only when following).
pub(crate) fn log_stream(
    dir: PathBuf,
    opts: LogStreamOptions,
    alive: Box<dyn Fn() -> bool + Send + Sync>,
) -> MicrosandboxResult<LogStream> {
    let start = match (&opts.since, &opts.from_cursor) {
        (Some(_), Some(_)) => {
            return Err(MicrosandboxError::InvalidConfig(
                "log stream: since and from_cursor cannot both be set".into(),
            ))
        }
        (Some(t), None) => Start::Since(*t),
        (None, Some(c)) => {
            let (ts, n) = parse_cursor(c).ok_or_else(|| {
                MicrosandboxError::InvalidConfig(format!("invalid log cursor {c:?}"))
            })?;
            Start::After(ts, n)
        }
        (None, None) => Start::All,
    };
    let sources = if opts.sources.is_empty() {
        vec![LogSource::Stdout, LogSource::Stderr, LogSource::Output]
    } else {
        opts.sources.clone()
    };
    let proc = Processor::new(&dir, start, opts.until, sources, true);
    let (tx, rx) = mpsc::channel(256);
    std::thread::Builder::new()
        .name("msb-logs".into())
        .spawn(move || {
            if let Err(e) = stream_loop(&dir, proc, opts.follow, opts.until, &*alive, &tx) {
                let _ = tx.blocking_send(Err(e.into()));
            }
        })?;
    Ok(LogStream { rx })
}

fn stream_loop(
    dir: &Path,
    mut proc: Processor,
    follow: bool,
    until: Option<DateTime<Utc>>,
    alive: &dyn Fn() -> bool,
    tx: &mpsc::Sender<MicrosandboxResult<LogEntry>>,
) -> std::io::Result<()> {
    // Returns false once the stream should end (until reached, or the receiver is gone).
    let mut emit = |line: &[u8]| match proc.line(line) {
        Verdict::Skip => true,
        Verdict::Emit(e) => tx.blocking_send(Ok(e)).is_ok(),
        Verdict::Stop => false,
    };
    let (old, mut cur) = open_files(dir, None)?;
    let mut last_id = None;
    if let Some(mut f) = old {
        if !f.read_available(&mut emit)? || !f.finish(&mut emit) {
            return Ok(());
        }
        last_id = Some(f.id);
    }
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        // Sampled before reading to the end: whatever a dead writer wrote is then read.
        let dead = follow && !alive();
        if let Some(f) = cur.as_mut() {
            last_id = Some(f.id);
            if !f.read_available(&mut emit)? {
                return Ok(());
            }
        }
        if !follow {
            return Ok(());
        }
        let now_id = file_id(&dir.join(LOG))?;
        if now_id.is_some() && now_id != cur.as_ref().map(|f| f.id) {
            // Rotated: the old file is complete once renamed; read it to its end.
            if let Some(mut f) = cur.take() {
                if !f.read_available(&mut emit)? || !f.finish(&mut emit) {
                    return Ok(());
                }
            }
            // A file rotated out before we saw it is exec.log.1 now: read it first.
            let (old, new) = open_files(dir, last_id)?;
            if let Some(mut f) = old {
                if !f.read_available(&mut emit)? || !f.finish(&mut emit) {
                    return Ok(());
                }
            }
            cur = new;
            continue;
        }
        if dead {
            return Ok(());
        }
        let past_until = until
            .and_then(|u| u.checked_add_signed(UNTIL_GRACE))
            .is_some_and(|u| Utc::now() >= u);
        if past_until {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

type FileId = (u64, u64);

fn file_id(path: &Path) -> std::io::Result<Option<FileId>> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens `exec.log` and then `exec.log.1` (that order, so a rotation in between makes
/// both the same file rather than losing one); `exec.log.1` is left out when it is
/// `exec.log` or the file `seen`. Returns them in reading order: (old, current).
fn open_files(
    dir: &Path,
    seen: Option<FileId>,
) -> std::io::Result<(Option<LogFile>, Option<LogFile>)> {
    let cur = LogFile::open(&dir.join(LOG))?;
    let old = LogFile::open(&dir.join(OLD_LOG))?
        .filter(|o| Some(o.id) != cur.as_ref().map(|c| c.id) && Some(o.id) != seen);
    Ok((old, cur))
}

/// An open log file and the start of a line not yet ended.
struct LogFile {
    file: File,
    id: FileId,
    buf: Vec<u8>,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<Option<LogFile>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let m = file.metadata()?;
        Ok(Some(LogFile {
            file,
            id: (m.dev(), m.ino()),
            buf: Vec::new(),
        }))
    }

    /// Feeds each whole line up to the end of the file to `f` (without its `'\n'`); stops
    /// early, returning false, when `f` does.
    fn read_available(&mut self, f: &mut dyn FnMut(&[u8]) -> bool) -> std::io::Result<bool> {
        loop {
            let old_len = self.buf.len();
            self.buf.resize(old_len + CHUNK, 0);
            let n = match self.file.read(&mut self.buf[old_len..]) {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(old_len);
                    if e.kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            self.buf.truncate(old_len + n);
            if n == 0 {
                return Ok(true);
            }
            // Bytes before old_len hold no '\n': they were scanned last time.
            let mut start = 0;
            let mut from = old_len;
            while let Some(i) = self.buf[from..].iter().position(|&b| b == b'\n') {
                let end = from + i;
                if !f(&self.buf[start..end]) {
                    self.buf.drain(..=end);
                    return Ok(false);
                }
                start = end + 1;
                from = start;
            }
            self.buf.drain(..start);
        }
    }

    /// The file will not grow: feeds a last line that lacks its `'\n'` to `f` anyway.
    fn finish(&mut self, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        let rest = std::mem::take(&mut self.buf);
        rest.is_empty() || f(&rest)
    }
}

/// Where reading starts.
#[derive(Clone, Copy)]
enum Start {
    All,
    Since(DateTime<Utc>),
    /// Strictly after the entry with this cursor (microseconds, rank).
    After(i64, u64),
}

enum Verdict {
    Skip,
    Emit(LogEntry),
    Stop,
}

/// Turns lines into entries: numbers them for cursors, and filters them.
struct Processor {
    dir: PathBuf,
    prev_ts: Option<i64>,
    rank: u64,
    start: Start,
    until: Option<DateTime<Utc>>,
    sources: Vec<LogSource>,
    stop_at_until: bool,
    warned: bool,
}

impl Processor {
    fn new(
        dir: &Path,
        start: Start,
        until: Option<DateTime<Utc>>,
        sources: Vec<LogSource>,
        stop_at_until: bool,
    ) -> Self {
        Processor {
            dir: dir.to_path_buf(),
            prev_ts: None,
            rank: 0,
            start,
            until,
            sources,
            stop_at_until,
            warned: false,
        }
    }

    fn line(&mut self, line: &[u8]) -> Verdict {
        let rec = match parse_line(line) {
            Ok(rec) => rec,
            Err(why) => {
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(dir = %self.dir.display(), "skipping malformed exec.log line(s): {why}");
                }
                return Verdict::Skip;
            }
        };
        self.rank = if self.prev_ts == Some(rec.ts_us) {
            self.rank + 1
        } else {
            0
        };
        self.prev_ts = Some(rec.ts_us);
        let skip = match self.start {
            Start::All => false,
            Start::Since(t) => rec.timestamp < t,
            Start::After(ts, n) => rec.ts_us < ts || (rec.ts_us == ts && self.rank <= n),
        };
        if skip {
            return Verdict::Skip;
        }
        if self.until.is_some_and(|u| rec.timestamp >= u) {
            return if self.stop_at_until {
                Verdict::Stop
            } else {
                Verdict::Skip
            };
        }
        match rec.source {
            Some(source) if self.sources.contains(&source) => Verdict::Emit(LogEntry {
                source,
                session_id: rec.session_id,
                timestamp: rec.timestamp,
                data: rec.data,
                cursor: format!("{}-{}", rec.ts_us, self.rank),
            }),
            _ => Verdict::Skip,
        }
    }
}

fn parse_cursor(c: &str) -> Option<(i64, u64)> {
    let (ts, n) = c.rsplit_once('-')?;
    Some((ts.parse().ok()?, n.parse().ok()?))
}

#[derive(serde::Deserialize)]
struct RawLine {
    timestamp_ms: f64,
    source: String,
    #[serde(default)]
    session_id: Option<u64>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    data_b64: Option<String>,
}

struct Record {
    ts_us: i64,
    timestamp: DateTime<Utc>,
    /// `None` for a source this version does not know: it still counts for cursors.
    source: Option<LogSource>,
    session_id: Option<u64>,
    data: Vec<u8>,
}

fn parse_line(line: &[u8]) -> Result<Record, String> {
    let raw: RawLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if !raw.timestamp_ms.is_finite() {
        return Err("timestamp_ms is not finite".into());
    }
    let ts_us = (raw.timestamp_ms * 1000.0).round() as i64;
    let timestamp = DateTime::from_timestamp_micros(ts_us).ok_or("timestamp_ms is out of range")?;
    let data = match (raw.data, raw.data_b64) {
        (Some(text), _) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("data_b64: {e}"))?,
        (None, None) => return Err("neither data nor data_b64".into()),
    };
    Ok(Record {
        ts_us,
        timestamp,
        source: raw.source.parse().ok(),
        session_id: raw.session_id,
        data,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use futures_util::StreamExt;

    use super::*;

    const T0: f64 = 1_733_100_000_123.456;

    fn line(ts: f64, source: &str, data: &str) -> String {
        let v = serde_json::json!({"timestamp_ms": ts, "source": source, "session_id": 1, "data": data});
        format!("{v}\n")
    }

    fn append(dir: &Path, name: &str, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .expect("open log");
        f.write_all(text.as_bytes()).expect("write log");
    }

    fn rotate(dir: &Path) {
        std::fs::rename(dir.join(LOG), dir.join(OLD_LOG)).expect("rotate");
    }

    fn at(ts: f64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros((ts * 1000.0).round() as i64).expect("timestamp")
    }

    fn texts(entries: &[LogEntry]) -> Vec<String> {
        entries.iter().map(LogEntry::text).collect()
    }

    fn read(dir: &Path, opts: LogOptions) -> Vec<String> {
        texts(&read_logs(dir, &opts).expect("read_logs"))
    }

    fn stream(dir: &Path, opts: LogStreamOptions) -> LogStream {
        log_stream(dir.to_path_buf(), opts, Box::new(|| true)).expect("log_stream")
    }

    async fn next(s: &mut LogStream) -> Option<LogEntry> {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("stream stalled")
            .map(|r| r.expect("stream error"))
    }

    async fn collect(mut s: LogStream) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = next(&mut s).await {
            out.push(e.text());
        }
        out
    }

    #[tokio::test]
    async fn default_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for (i, src) in ["stdout", "stderr", "output", "system"].iter().enumerate() {
            append(d, LOG, &line(T0 + i as f64, src, src));
        }
        assert_eq!(read(d, LogOptions::default()), ["stdout", "stderr"]);
        let sys = LogOptions::default().source(LogSource::System);
        assert_eq!(read(d, sys), ["system"]);
        let s = stream(d, LogStreamOptions::default());
        assert_eq!(collect(s).await, ["stdout", "stderr", "output"]);
    }

    #[test]
    fn missing_files_are_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read(&dir.path().join("absent"), LogOptions::default()).is_empty());
    }

    #[test]
    fn tail_keeps_last_matching() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            append(
                dir.path(),
                LOG,
                &line(T0 + i as f64, "stdout", &i.to_string()),
            );
            append(dir.path(), LOG, &line(T0 + i as f64, "system", "sys"));
        }
        assert_eq!(read(dir.path(), LogOptions::default().tail(2)), ["3", "4"]);
        assert!(read(dir.path(), LogOptions::default().tail(0)).is_empty());
        assert_eq!(read(dir.path(), LogOptions::default().tail(9)).len(), 5);
    }

    #[test]
    fn since_inclusive_until_exclusive() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..4 {
            append(
                dir.path(),
                LOG,
                &line(T0 + i as f64, "stdout", &i.to_string()),
            );
        }
        let opts = LogOptions::default()
            .since(at(T0 + 1.0))
            .until(at(T0 + 3.0));
        assert_eq!(read(dir.path(), opts), ["1", "2"]);
    }

    #[test]
    fn utf8_and_base64_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        append(dir.path(), LOG, &line(T0, "stdout", "héllo\n"));
        let b64 = serde_json::json!({"timestamp_ms": T0 + 1.0, "source": "stderr",
            "session_id": null, "data_b64": "YQBi/w0K"});
        append(dir.path(), LOG, &format!("{b64}\n"));
        let e = read_logs(dir.path(), &LogOptions::default()).expect("read_logs");
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].data, "héllo\n".as_bytes());
        assert_eq!((e[0].source, e[0].session_id), (LogSource::Stdout, Some(1)));
        assert_eq!(e[0].timestamp, at(T0));
        assert_eq!(e[0].timestamp.timestamp_subsec_micros(), 123_456);
        assert_eq!(e[1].data, b"a\0b\xff\r\n");
        assert_eq!((e[1].source, e[1].session_id), (LogSource::Stderr, None));
        assert_eq!(e[1].text(), "a\0b\u{fffd}\r\n");
    }

    #[test]
    fn malformed_and_partial_lines_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        append(d, LOG, "not json\n");
        append(d, LOG, &line(T0, "stdout", "a"));
        append(
            d,
            LOG,
            "{\"timestamp_ms\": \"x\", \"source\": \"stdout\", \"data\": \"\"}\n",
        );
        append(
            d,
            LOG,
            "{\"timestamp_ms\": 1, \"source\": \"stdout\", \"data_b64\": \"*\"}\n",
        );
        append(d, LOG, "{\"timestamp_ms\": 1, \"source\": \"stdout\"}\n\n");
        append(d, LOG, &line(T0 + 1.0, "stdout", "b"));
        let partial = line(T0 + 2.0, "stdout", "c");
        let (head, tail) = partial.split_at(20);
        append(d, LOG, head);
        assert_eq!(read(d, LogOptions::default()), ["a", "b"]);
        append(d, LOG, tail);
        assert_eq!(read(d, LogOptions::default()), ["a", "b", "c"]);
    }

    #[test]
    fn reads_across_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        append(dir.path(), LOG, &line(T0, "stdout", "a"));
        append(dir.path(), LOG, &line(T0 + 1.0, "stdout", "b"));
        rotate(dir.path());
        append(dir.path(), LOG, &line(T0 + 2.0, "stdout", "c"));
        assert_eq!(read(dir.path(), LogOptions::default()), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn cursor_resume_gives_exactly_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        append(d, LOG, &line(T0, "stdout", "a"));
        append(d, LOG, &line(T0, "system", "hidden"));
        append(d, LOG, &line(T0, "stderr", "b"));
        append(d, LOG, &line(T0 + 0.001, "stdout", "c"));
        let all = read_logs(d, &LogOptions::default()).expect("read_logs");
        let cursors: Vec<_> = all.iter().map(|e| e.cursor.clone()).collect();
        assert_eq!(
            cursors,
            [
                "1733100000123456-0",
                "1733100000123456-2",
                "1733100000123457-0"
            ]
        );
        // Stable across rotation.
        rotate(d);
        append(d, LOG, &line(T0 + 1.0, "stdout", "d"));
        let after_rotation = read_logs(d, &LogOptions::default()).expect("read_logs");
        assert_eq!(after_rotation[..3], all[..]);
        let want = ["a", "b", "c", "d"];
        for (i, c) in cursors.iter().enumerate() {
            let s = stream(d, LogStreamOptions::default().from_cursor(c.as_str()));
            assert_eq!(collect(s).await, want[i + 1..], "after {c}");
        }
    }

    #[tokio::test]
    async fn stream_without_follow_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        append(dir.path(), OLD_LOG, &line(T0, "stdout", "a"));
        append(dir.path(), LOG, &line(T0 + 1.0, "stdout", "b"));
        append(dir.path(), LOG, &line(T0 + 3.0, "stdout", "c"));
        append(dir.path(), LOG, &line(T0 + 2.0, "stdout", "d"));
        let s = stream(dir.path(), LogStreamOptions::default());
        assert_eq!(collect(s).await, ["a", "b", "c", "d"]);
        let s = stream(dir.path(), LogStreamOptions::default().since(at(T0 + 1.0)));
        assert_eq!(collect(s).await, ["b", "c", "d"]);
        // until ends the stream at the first entry at or past it.
        let s = stream(dir.path(), LogStreamOptions::default().until(at(T0 + 3.0)));
        assert_eq!(collect(s).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn stream_follows_appends_and_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        append(d, LOG, &line(T0, "stdout", "a"));
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let opts = LogStreamOptions::default().follow(true);
        let is_alive = Box::new(move || flag.load(Ordering::SeqCst));
        let mut s = log_stream(d.to_path_buf(), opts, is_alive).expect("log_stream");
        assert_eq!(next(&mut s).await.map(|e| e.text()).as_deref(), Some("a"));
        append(d, LOG, &line(T0 + 1.0, "stdout", "b"));
        assert_eq!(next(&mut s).await.map(|e| e.text()).as_deref(), Some("b"));
        // A line written just before the rotation, and one after it, in the new file.
        append(d, LOG, &line(T0 + 2.0, "stderr", "c"));
        rotate(d);
        append(d, LOG, &line(T0 + 3.0, "stdout", "d"));
        assert_eq!(next(&mut s).await.map(|e| e.text()).as_deref(), Some("c"));
        assert_eq!(next(&mut s).await.map(|e| e.text()).as_deref(), Some("d"));
        // The writer's last words, then it dies: they are read, and the stream ends.
        append(d, LOG, &line(T0 + 4.0, "stdout", "e"));
        alive.store(false, Ordering::SeqCst);
        assert_eq!(collect(s).await, ["e"]);
    }

    #[tokio::test]
    async fn follow_waits_for_the_file_and_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let opts = LogStreamOptions::default().follow(true);
        let mut s = stream(d, opts);
        let l = line(T0, "stdout", "a");
        let (head, tail) = l.split_at(10);
        append(d, LOG, head);
        let early = tokio::time::timeout(Duration::from_millis(500), s.next()).await;
        assert!(early.is_err(), "a partial line is not yielded");
        append(d, LOG, tail);
        assert_eq!(next(&mut s).await.map(|e| e.text()).as_deref(), Some("a"));
    }

    #[test]
    fn since_with_cursor_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let both = LogStreamOptions::default()
            .since(at(T0))
            .from_cursor("1733100000123456-0");
        let bad = LogStreamOptions::default().from_cursor("garbage");
        for opts in [both, bad] {
            let r = log_stream(dir.path().to_path_buf(), opts, Box::new(|| true));
            assert!(matches!(r, Err(MicrosandboxError::InvalidConfig(_))));
        }
    }
}
