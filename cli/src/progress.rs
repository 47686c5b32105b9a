//! Progress on stderr: a pull's layers (bars on a terminal, a line per step otherwise) and
//! the stage of a sandbox's start.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use microsandbox::PullEvent;

use crate::error::{say, CliResult};
use crate::format::{human_bytes, short_digest};

/// Shows a pull's progress on stderr (bars on a terminal, a line per step otherwise) and
/// returns its result.
pub(crate) async fn show_progress<T: Send + 'static>(
    mut session: microsandbox::PullSession<T>,
    sandbox: Option<&str>,
) -> CliResult<T> {
    let start = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut bars = Bars::new(tty);
    let mut line = StageLine::default();
    // The events go on until the create is done (boot included): the stage line is drawn
    // between them, under the bars, once no layer is being pulled.
    let stage_of = sandbox.filter(|_| tty);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut pulled = false;
    loop {
        tokio::select! {
            event = session.next_event() => {
                let Some(event) = event else { break };
                // The bars move the cursor by whole lines: the stage line goes first.
                line.clear();
                pulled |= matches!(event, PullEvent::Complete { .. });
                bars.event(&event);
            }
            _ = tick.tick(), if stage_of.is_some() && (pulled || bars.layers.is_empty()) => {
                line.draw(stage_of.unwrap_or_default(), start);
            }
        }
    }
    line.clear();
    bars.finish();
    Ok(match stage_of {
        Some(name) => with_stage_line(session.result(), name, start, tty).await?,
        None => session.result().await?,
    })
}

/// One line of stderr, replaced in place, saying what a sandbox's start is doing and for
/// how long (terminal only).
#[derive(Default)]
struct StageLine {
    shown: bool,
}

impl StageLine {
    fn draw(&mut self, name: &str, start: std::time::Instant) {
        let what = microsandbox::boot_stage(name).map_or(
            "preparing the root filesystem",
            microsandbox::BootStage::describe,
        );
        let text = format!("\r\x1b[2K{what} ({:.1}s)", start.elapsed().as_secs_f64());
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(text.as_bytes()).and_then(|()| e.flush());
        self.shown = true;
    }

    /// Erases the line, leaving the cursor at its start.
    fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(b"\r\x1b[2K").and_then(|()| e.flush());
        }
    }
}

/// Awaits `work` (a sandbox's create or start); on a terminal meanwhile shows the stage
/// line (cleared before anything else is printed). Nothing extra when stderr is not a
/// terminal.
pub(crate) async fn with_stage_line<T>(
    work: impl std::future::Future<Output = T>,
    name: &str,
    start: std::time::Instant,
    tty: bool,
) -> T {
    if !tty {
        return work.await;
    }
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut line = StageLine::default();
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => line.draw(name, start),
        }
    };
    line.clear();
    result
}

/// The state of a pull, drawn as one line per layer.
struct Bars {
    tty: bool,
    layers: BTreeMap<usize, (String, u64, u64, &'static str)>,
    drawn: usize,
    last_draw: std::time::Instant,
    pulling: bool,
}

impl Bars {
    fn new(tty: bool) -> Self {
        Bars {
            tty,
            layers: BTreeMap::new(),
            drawn: 0,
            last_draw: std::time::Instant::now(),
            pulling: false,
        }
    }

    fn event(&mut self, e: &PullEvent) {
        let line = match e {
            PullEvent::Resolved {
                reference,
                manifest_digest,
                layer_count,
                total_download_bytes,
            } => {
                self.pulling = *total_download_bytes > 0;
                if !self.pulling {
                    return;
                }
                Some(format!(
                    "{reference}: {} ({layer_count} layers, {} to download)",
                    short_digest(manifest_digest),
                    human_bytes(*total_download_bytes)
                ))
            }
            PullEvent::LayerDownloadProgress {
                layer_index,
                digest,
                downloaded_bytes,
                total_bytes,
            } => {
                self.set(
                    *layer_index,
                    digest,
                    *downloaded_bytes,
                    *total_bytes,
                    "downloading",
                );
                None
            }
            PullEvent::LayerDownloadComplete {
                layer_index,
                digest,
                downloaded_bytes,
            } => {
                self.set(
                    *layer_index,
                    digest,
                    *downloaded_bytes,
                    *downloaded_bytes,
                    "downloaded",
                );
                (!self.tty).then(|| {
                    format!(
                        "layer {layer_index} {}: downloaded {}",
                        short_digest(digest),
                        human_bytes(*downloaded_bytes)
                    )
                })
            }
            PullEvent::LayerDownloadVerifying { layer_index, .. } => {
                self.state(*layer_index, "verifying");
                None
            }
            PullEvent::LayerMaterializeStarted { layer_index, .. } => {
                self.state(*layer_index, "unpacking");
                None
            }
            PullEvent::LayerMaterializeComplete {
                layer_index,
                diff_id,
            } => {
                self.state(*layer_index, "done");
                (!self.tty)
                    .then(|| format!("layer {layer_index}: unpacked {}", short_digest(diff_id)))
            }
            PullEvent::Complete {
                reference,
                layer_count,
            } => {
                if !self.pulling && self.layers.is_empty() {
                    return;
                }
                Some(format!("{reference}: complete ({layer_count} layers)"))
            }
            _ => None,
        };
        if let Some(line) = line {
            self.clear();
            say(&line);
        }
        self.draw(false);
    }

    fn set(&mut self, index: usize, digest: &str, done: u64, total: u64, state: &'static str) {
        self.layers
            .insert(index, (short_digest(digest), done, total, state));
    }

    fn state(&mut self, index: usize, state: &'static str) {
        if let Some(l) = self.layers.get_mut(&index) {
            l.3 = state;
        }
    }

    /// Erases the bars drawn last (terminal only).
    fn clear(&mut self) {
        if self.tty && self.drawn > 0 {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    fn draw(&mut self, force: bool) {
        if !self.tty || self.layers.is_empty() {
            return;
        }
        if !force && self.drawn > 0 && self.last_draw.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.clear();
        let mut err = std::io::stderr().lock();
        for (index, (digest, done, total, state)) in &self.layers {
            let width = 30usize;
            let filled = if *total == 0 {
                width
            } else {
                ((*done as f64 / *total as f64) * width as f64) as usize
            };
            let bar: String =
                "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
            let _ = writeln!(
                err,
                "layer {index} {digest} [{bar}] {}/{} {state}",
                human_bytes(*done),
                human_bytes(*total)
            );
        }
        self.drawn = self.layers.len();
        self.last_draw = std::time::Instant::now();
    }

    fn finish(&mut self) {
        self.draw(true);
    }
}
